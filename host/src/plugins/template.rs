//! Templates: a conversation becomes segments of text, each trained or not.
use super::bindings::template::{Template as TemplateWorld, TemplatePre};
use super::bindings::types::{Example, Segment, TemplateInfo};
use super::engine::{LoadedPlugin, PluginEngine};
use super::error::{Failure, PluginError};
use super::instance::Instance;
use super::kind::PluginKind;
use super::sandbox::Grants;

/// A template component running in the sandbox.
pub struct WasmTemplate {
    inst: Instance<TemplateWorld>,
    info: TemplateInfo,
}

/// One record's rendering, or why the template rejected it.
pub type Rendering = Result<Vec<Segment>, String>;

impl WasmTemplate {
    pub fn new(engine: &PluginEngine, plugin: &LoadedPlugin, grants: &Grants, config: &str) -> Result<Self, PluginError> {
        let mut inst = Instance::new(engine, plugin, PluginKind::Template, grants, |pre, store| {
            TemplatePre::new(pre)?.instantiate(store)
        })?;
        let info = inst.call_fallible("init", |b, s| b.lorahost_plugin_template_api().call_init(s, config))?;
        if info.eos.is_empty() {
            return Err(inst.error("init", Failure::Malformed("the template names no end-of-sequence token".into())));
        }
        Ok(WasmTemplate { inst, info })
    }

    pub fn name(&self) -> &str {
        &self.inst.name
    }

    pub fn info(&self) -> &TemplateInfo {
        &self.info
    }

    /// One rendering per record of `batch`, in order.
    pub fn render_batch(&mut self, batch: &[Example]) -> Result<Vec<Rendering>, PluginError> {
        let out = self.inst.call("render-batch", |b, s| b.lorahost_plugin_template_api().call_render_batch(s, batch))?;
        if out.len() != batch.len() {
            let msg = format!("{} renderings for a batch of {} records", out.len(), batch.len());
            return Err(self.inst.error("render-batch", Failure::Malformed(msg)));
        }
        Ok(out)
    }
}
