//! From a manifest's `plugin = "..."` to a running plugin: find the file (or the standard one), check its
//! pinned digest, grant it its folders, hand it its options.
use crate::manifest::{is_path_key, Manifest, PluginUse};
use crate::plugins::{
    standard, Grants, LoadedPlugin, NativePlugin, PluginEngine, PluginKind, RecordFilter, RecordSource, WasmFilter,
    WasmScheduler, WasmScorer, WasmSource, WasmTemplate,
};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// Where a plugin comes from, as recorded in the lock.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PluginOrigin {
    pub name: String,
    pub kind: PluginKind,
    /// "standard", or the file path.
    pub from: String,
    pub sha256: String,
    /// A native library: runs unsandboxed.
    pub native: bool,
    /// Whether the manifest pins it by sha256 (standard plugins are pinned by the binary).
    pub pinned: bool,
}

/// A plugin use ready to instantiate.
pub struct Resolved {
    pub origin: PluginOrigin,
    wasm: Option<LoadedPlugin>,
    native_path: Option<PathBuf>,
    /// The plugin's options as TOML text.
    pub config: String,
    pub grants: Grants,
}

/// Loads plugins for a manifest, with one engine and its compile cache.
pub struct PluginSet<'m> {
    pub engine: PluginEngine,
    manifest: &'m Manifest,
}

impl<'m> PluginSet<'m> {
    pub fn new(manifest: &'m Manifest) -> anyhow::Result<Self> {
        Ok(PluginSet { engine: PluginEngine::new(manifest.cache_dir())?, manifest })
    }

    /// Resolves one use of a plugin of `kind`; `key` is its place in the manifest, for messages.
    pub fn resolve(&self, kind: PluginKind, key: &str, use_: &PluginUse) -> anyhow::Result<Resolved> {
        let m = self.manifest;
        let file = m.file.display();
        let name = use_.plugin.as_str();
        let config = toml::to_string(&use_.config).with_context(|| format!("{file}: `{key}`: options"))?;
        let grants = Grants {
            read_dirs: grants_for(use_).map_err(|e| anyhow::anyhow!("{file}: `{key}.{e}"))?,
            seed: crate::rng::splitmix64(m.run.seed ^ crate::rng::Rng::derive(0, key).next_u64()),
            limits: use_.limits.clone().unwrap_or_default(),
        };
        if let Some(pf) = m.plugins.get(name) {
            let (bytes, sha) = self.read_pinned(name)?;
            let native = !bytes.starts_with(b"\0asm");
            let origin = PluginOrigin {
                name: name.into(),
                kind,
                from: pf.path.display().to_string(),
                sha256: sha,
                native,
                pinned: pf.sha256.is_some(),
            };
            if native {
                if !matches!(kind, PluginKind::Filter | PluginKind::Source) {
                    bail!("{file}: `{key}`: native plugins can only be filters or sources; `{name}` is used as a {kind}");
                }
                if !pf.trusted {
                    bail!(
                        "{file}: `plugins.{name}`: {} is a native library, which runs UNSANDBOXED with all your rights. \
                         Load it only if you trust it, by adding `trusted = true` to `plugins.{name}`",
                        pf.path.display()
                    );
                }
                return Ok(Resolved { origin, wasm: None, native_path: Some(pf.path.clone()), config, grants });
            }
            let loaded = self.engine.load(name, &bytes)?;
            loaded.info.expect(kind).map_err(|f| anyhow::anyhow!("{file}: `{key}`: plugin `{name}` {f}"))?;
            return Ok(Resolved { origin, wasm: Some(loaded), native_path: None, config, grants });
        }
        let Some(sp) = standard::find(kind, name) else {
            let known = standard::names(kind).join(", ");
            bail!(
                "{file}: `{key}.plugin`: no {kind} plugin named `{name}`. Standard {kind}s: {known}; \
                 or declare your own under [plugins] with a path"
            );
        };
        let loaded = self.engine.load(name, sp.wasm)?;
        let origin = PluginOrigin {
            name: name.into(),
            kind,
            from: "standard".into(),
            sha256: loaded.digest.clone(),
            native: false,
            pinned: true,
        };
        Ok(Resolved { origin, wasm: Some(loaded), native_path: None, config, grants })
    }
}

impl PluginSet<'_> {
    /// Reads the `[plugins]` entry `name` and checks its pinned digest; returns the bytes and their sha256.
    pub fn read_pinned(&self, name: &str) -> anyhow::Result<(Vec<u8>, String)> {
        let file = self.manifest.file.display();
        let pf = &self.manifest.plugins[name];
        let bytes = std::fs::read(&pf.path).with_context(|| {
            format!("{file}: `plugins.{name}.path`: cannot read {} (build the plugin, or fix the path)", pf.path.display())
        })?;
        let sha = crate::plugins::engine::sha256_hex(&bytes);
        if let Some(want) = &pf.sha256 {
            if !want.eq_ignore_ascii_case(&sha) {
                bail!(
                    "{file}: `plugins.{name}.sha256`: the file {} has sha256 {sha}, but the manifest pins {want}. \
                     If you rebuilt or replaced it on purpose, set sha256 = \"{sha}\"",
                    pf.path.display()
                );
            }
        }
        Ok((bytes, sha))
    }

    pub fn source(&self, r: &Resolved) -> anyhow::Result<Box<dyn RecordSource>> {
        match (&r.wasm, &r.native_path) {
            (Some(p), _) => Ok(Box::new(WasmSource::open(&self.engine, p, &r.grants, &r.config)?)),
            (None, Some(path)) => Ok(Box::new(NativePlugin::open(&r.origin.name, path, PluginKind::Source, true, &r.config)?)),
            _ => unreachable!("a resolved plugin is wasm or native"),
        }
    }

    pub fn filter(&self, r: &Resolved) -> anyhow::Result<Box<dyn RecordFilter>> {
        match (&r.wasm, &r.native_path) {
            (Some(p), _) => Ok(Box::new(WasmFilter::new(&self.engine, p, &r.grants, &r.config)?)),
            (None, Some(path)) => Ok(Box::new(NativePlugin::open(&r.origin.name, path, PluginKind::Filter, true, &r.config)?)),
            _ => unreachable!("a resolved plugin is wasm or native"),
        }
    }

    pub fn template(&self, r: &Resolved) -> anyhow::Result<WasmTemplate> {
        Ok(WasmTemplate::new(&self.engine, r.wasm.as_ref().expect("templates are wasm"), &r.grants, &r.config)?)
    }

    pub fn scheduler(&self, r: &Resolved) -> anyhow::Result<WasmScheduler> {
        Ok(WasmScheduler::new(&self.engine, r.wasm.as_ref().expect("schedulers are wasm"), &r.grants, &r.config)?)
    }

    pub fn scorer(&self, r: &Resolved) -> anyhow::Result<WasmScorer> {
        Ok(WasmScorer::new(&self.engine, r.wasm.as_ref().expect("scorers are wasm"), &r.grants, &r.config)?)
    }
}

/// Folders a plugin use may read: its explicit `read` list plus the folder of every path in its options.
/// A path that does not exist is an error (`<key>`: ...), caught here rather than as a plugin's I/O error.
fn grants_for(use_: &PluginUse) -> Result<Vec<PathBuf>, String> {
    let mut dirs: Vec<PathBuf> = use_.read.clone();
    for dir in &dirs {
        if !dir.is_dir() {
            return Err(format!("read`: {} is not a folder", dir.display()));
        }
    }
    for (key, value) in &use_.config {
        if !is_path_key(key) {
            continue;
        }
        let paths: Vec<&str> = match value {
            toml::Value::String(s) => vec![s.as_str()],
            toml::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => vec![],
        };
        for p in paths {
            let p = Path::new(p);
            if !p.exists() {
                return Err(format!("{key}`: {} does not exist (paths are relative to the manifest's folder)", p.display()));
            }
            let dir = if p.is_dir() { p.to_path_buf() } else { p.parent().map(Path::to_path_buf).unwrap_or_default() };
            dirs.push(dir);
        }
    }
    dirs.sort();
    dirs.dedup();
    Ok(dirs)
}
