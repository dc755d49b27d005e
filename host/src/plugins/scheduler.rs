//! Schedulers: the learning rate at each optimizer step.
use super::bindings::scheduler::{Scheduler as SchedulerWorld, SchedulerPre};
use super::engine::{LoadedPlugin, PluginEngine};
use super::error::{Failure, PluginError};
use super::instance::Instance;
use super::kind::PluginKind;
use super::sandbox::Grants;

/// A scheduler component running in the sandbox.
pub struct WasmScheduler(Instance<SchedulerWorld>);

impl WasmScheduler {
    pub fn new(engine: &PluginEngine, plugin: &LoadedPlugin, grants: &Grants, config: &str) -> Result<Self, PluginError> {
        let mut inst = Instance::new(engine, plugin, PluginKind::Scheduler, grants, |pre, store| {
            SchedulerPre::new(pre)?.instantiate(store)
        })?;
        inst.call_fallible("init", |b, s| b.lorahost_plugin_scheduler_api().call_init(s, config))?;
        Ok(WasmScheduler(inst))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The learning rate for 0-based `step` of `total`; a negative or non-finite rate is an error.
    pub fn lr(&mut self, step: u64, total: u64, base: f64) -> Result<f64, PluginError> {
        let lr = self.0.call("lr", |b, s| b.lorahost_plugin_scheduler_api().call_lr(s, step, total, base))?;
        if !lr.is_finite() || lr < 0.0 {
            let msg = format!("learning rate {lr} at step {step} of {total}");
            return Err(self.0.error("lr", Failure::Malformed(msg)));
        }
        Ok(lr)
    }
}
