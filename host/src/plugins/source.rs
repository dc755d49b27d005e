//! Sources: read records, batch by batch, from the files the manifest grants.
use super::bindings::source::{Source as SourceWorld, SourcePre};
use super::bindings::types::Batch;
use super::engine::{LoadedPlugin, PluginEngine};
use super::error::{Failure, PluginError};
use super::instance::Instance;
use super::kind::PluginKind;
use super::sandbox::Grants;
use wasmtime::component::ResourceAny;

/// Anything that yields records: a sandboxed component or a trusted native library.
pub trait RecordSource: Send {
    fn name(&self) -> &str;
    /// At most `max` records, plus the malformed ones skipped on the way; `None` once the input is
    /// exhausted.
    fn next_batch(&mut self, max: u32) -> Result<Option<Batch>, PluginError>;
}

/// A source component running in the sandbox, with one open reader.
pub struct WasmSource {
    inst: Instance<SourceWorld>,
    reader: Option<ResourceAny>,
}

impl WasmSource {
    /// Instantiates the source and opens a reader with `config` (TOML text, paths absolute).
    pub fn open(engine: &PluginEngine, plugin: &LoadedPlugin, grants: &Grants, config: &str) -> Result<Self, PluginError> {
        let mut inst = Instance::new(engine, plugin, PluginKind::Source, grants, |pre, store| {
            SourcePre::new(pre)?.instantiate(store)
        })?;
        let reader = inst.call_fallible("open", |b, s| b.lorahost_plugin_source_api().call_open(s, config))?;
        Ok(WasmSource { inst, reader: Some(reader) })
    }
}

impl RecordSource for WasmSource {
    fn name(&self) -> &str {
        &self.inst.name
    }

    fn next_batch(&mut self, max: u32) -> Result<Option<Batch>, PluginError> {
        let Some(reader) = self.reader else { return Ok(None) };
        let batch = self.inst.call_fallible("next-batch", |b, s| {
            b.lorahost_plugin_source_api().reader().call_next_batch(s, reader, max)
        })?;
        check_batch(max, batch).map_err(|f| self.inst.error("next-batch", f))
    }
}

impl Drop for WasmSource {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            // Runs the guest's destructor; a failure here has nothing left to corrupt.
            let _ = reader.resource_drop(&mut self.inst.store);
        }
    }
}

/// The contract every source's reply must keep, wasm or native.
pub(crate) fn check_batch(max: u32, batch: Option<Batch>) -> Result<Option<Batch>, Failure> {
    match &batch {
        Some(b) if b.records.len() > max as usize => {
            Err(Failure::Malformed(format!("{} records for a request of at most {max}", b.records.len())))
        }
        _ => Ok(batch),
    }
}
