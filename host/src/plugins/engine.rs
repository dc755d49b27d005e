//! The wasmtime engine shared by every plugin, and the compile cache.
//!
//! Compiling a component takes ~0.1-1 s; loading the compiled artifact takes about a millisecond. So each
//! component is compiled once per content digest (and engine configuration) and kept under the cache
//! folder; later loads deserialize it.
use super::bindings::{compatible, WIT_PACKAGE, WIT_VERSION};
use super::error::{Failure, PluginError};
use super::kind::PluginKind;
use super::sandbox::{self, HostState, EPOCH_TICK};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

/// One engine for all plugins of a process, with its epoch ticker and compile cache.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
}

/// A compiled plugin, ready to instantiate.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// The name the manifest (or the file) gives it; errors use it.
    pub name: String,
    /// sha256 of the component bytes, hex.
    pub digest: String,
    pub component: Component,
    pub info: ComponentInfo,
    /// Whether the compiled code came from the cache (no compilation happened).
    pub from_cache: bool,
    pub load_time: Duration,
}

/// What a component says about itself, read from its types without running it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ComponentInfo {
    /// The plugin kind, if it exports one of the lorahost interfaces (of any version).
    pub kind: Option<PluginKind>,
    /// The lorahost contract version it exports, e.g. "0.1.0".
    pub wit_version: Option<String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

impl ComponentInfo {
    fn read(engine: &Engine, component: &Component) -> Self {
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        let mut kind = None;
        let mut wit_version = None;
        for name in &exports {
            // e.g. "lorahost:plugin/filter-api@0.1.0"
            let Some(rest) = name.strip_prefix(WIT_PACKAGE).and_then(|r| r.strip_prefix('/')) else { continue };
            let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
            if let Some(k) = PluginKind::ALL.into_iter().find(|k| k.interface() == iface) {
                kind = Some(k);
                wit_version = Some(version.to_string());
            }
        }
        ComponentInfo { kind, wit_version, imports, exports }
    }

    /// Checks that this component is a `kind` plugin for a contract version this host runs.
    pub fn expect(&self, kind: PluginKind) -> Result<(), Failure> {
        match (&self.kind, &self.wit_version) {
            (None, _) => Err(Failure::Invalid(format!(
                "it exports none of the lorahost interfaces (exports: {})",
                if self.exports.is_empty() { "nothing".to_string() } else { self.exports.join(", ") }
            ))),
            (Some(found), _) if *found != kind => {
                Err(Failure::WrongKind { expected: kind.to_string(), found: found.to_string() })
            }
            (_, Some(v)) if !compatible(v) => Err(Failure::WrongVersion {
                expected: format!("{WIT_PACKAGE}@{WIT_VERSION}"),
                found: format!("{WIT_PACKAGE}@{v}"),
            }),
            _ => Ok(()),
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl PluginEngine {
    /// An engine whose compiled plugins are cached under `cache_dir` (no caching with `None`).
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(true);
        // Same inputs, same outputs: no platform-dependent NaN bits or relaxed-SIMD results.
        config.cranelift_nan_canonicalization(true);
        config.relaxed_simd_deterministic(true);
        let engine = Engine::new(&config)?;
        spawn_epoch_ticker(&engine);
        let mut linker = Linker::new(&engine);
        sandbox::add_wasi_to_linker(&mut linker)?;
        // The shared record types are an interface with types only; it still has to exist by name.
        linker.instance(&format!("{WIT_PACKAGE}/types@{WIT_VERSION}"))?;
        Ok(PluginEngine { engine, linker, cache_dir })
    }

    /// The default cache folder: `$LORAHOST_CACHE`, else `$XDG_CACHE_HOME/lorahost`, else `~/.cache/lorahost`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("LORAHOST_CACHE") {
            return Some(PathBuf::from(dir));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("lorahost"))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// Reads a component file and loads it.
    pub fn load_file(&self, name: &str, path: &Path) -> Result<LoadedPlugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|e| {
            PluginError::new(name, "", "load", Failure::Invalid(format!("cannot read {}: {e}", path.display())))
        })?;
        self.load(name, &bytes)
    }

    /// Compiles (or fetches from the cache) the component in `bytes`.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<LoadedPlugin, PluginError> {
        let start = Instant::now();
        let digest = sha256_hex(bytes);
        let fail = |f: Failure| PluginError::new(name, &digest, "load", f);
        let cached = self.cache_path(&digest);
        let mut from_cache = false;
        let mut component = None;
        if let Some(path) = cached.as_ref().filter(|p| p.exists()) {
            // Read into memory rather than mapping the file: another process replacing the cache entry
            // must never pull code out from under us.
            if let Ok(artifact) = std::fs::read(path) {
                // SAFETY: the artifact was written by `Component::serialize` of an engine with this exact
                // configuration (the compatibility hash is part of the file name) into the user's own
                // cache. A corrupt or foreign file fails to deserialize and is simply recompiled.
                if let Ok(c) = unsafe { Component::deserialize(&self.engine, &artifact) } {
                    component = Some(c);
                    from_cache = true;
                }
            }
        }
        let component = match component {
            Some(c) => c,
            None => {
                if !bytes.starts_with(b"\0asm") {
                    return Err(fail(Failure::Invalid("the file is not WebAssembly (no \\0asm header)".into())));
                }
                let c = Component::from_binary(&self.engine, bytes)
                    .map_err(|e| fail(Failure::Invalid(format!("{e:#}"))))?;
                if let Some(path) = &cached {
                    if let Some(dir) = path.parent() {
                        crate::fsutil::remove_stale_temps(dir);
                    }
                    // A cache that cannot be written only costs time on the next run.
                    if let Ok(bytes) = c.serialize() {
                        let _ = crate::fsutil::write_atomic(path, &bytes);
                    }
                }
                c
            }
        };
        let info = ComponentInfo::read(&self.engine, &component);
        Ok(LoadedPlugin {
            name: name.to_string(),
            digest,
            component,
            info,
            from_cache,
            load_time: start.elapsed(),
        })
    }

    fn cache_path(&self, digest: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        Some(dir.join("plugins").join(format!("{digest}-{:016x}.cwasm", h.finish())))
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] so per-call deadlines fire; stops with the engine.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("lorahost-plugin-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .expect("cannot start the plugin epoch thread");
}
