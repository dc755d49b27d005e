//! Filters: keep, drop (with a reason) or rewrite each record of a batch.
use super::bindings::filter::Filter as FilterWorld;
use super::bindings::filter::FilterPre;
use super::bindings::types::{Example, Verdict};
use super::engine::{LoadedPlugin, PluginEngine};
use super::error::{Failure, PluginError};
use super::instance::Instance;
use super::kind::PluginKind;
use super::sandbox::Grants;

/// Anything that filters records: a sandboxed component or a trusted native library.
pub trait RecordFilter: Send {
    fn name(&self) -> &str;
    /// One verdict per record of `batch`, in order.
    fn filter_batch(&mut self, batch: &[Example]) -> Result<Vec<Verdict>, PluginError>;
}

/// A filter component running in the sandbox.
pub struct WasmFilter(Instance<FilterWorld>);

impl WasmFilter {
    /// Instantiates the filter and hands it its configuration (the manifest table as TOML text).
    pub fn new(engine: &PluginEngine, plugin: &LoadedPlugin, grants: &Grants, config: &str) -> Result<Self, PluginError> {
        let mut inst = Instance::new(engine, plugin, PluginKind::Filter, grants, |pre, store| {
            FilterPre::new(pre)?.instantiate(store)
        })?;
        inst.call_fallible("init", |b, s| b.lorahost_plugin_filter_api().call_init(s, config))?;
        Ok(WasmFilter(inst))
    }
}

impl RecordFilter for WasmFilter {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn filter_batch(&mut self, batch: &[Example]) -> Result<Vec<Verdict>, PluginError> {
        let verdicts =
            self.0.call_fallible("filter-batch", |b, s| b.lorahost_plugin_filter_api().call_filter_batch(s, batch))?;
        check_verdicts(batch.len(), verdicts).map_err(|f| self.0.error("filter-batch", f))
    }
}

/// The contract every filter's reply must keep, wasm or native.
pub(crate) fn check_verdicts(asked: usize, verdicts: Vec<Verdict>) -> Result<Vec<Verdict>, Failure> {
    if verdicts.len() != asked {
        return Err(Failure::Malformed(format!("{} verdicts for a batch of {asked} records", verdicts.len())));
    }
    Ok(verdicts)
}
