//! Scorers: how good each generation of `lorahost eval` is, given its record's references.
pub use super::bindings::scorer::exports::lorahost::plugin::scorer_api::{Scored, ScoringRequest};
use super::bindings::scorer::{Scorer as ScorerWorld, ScorerPre};
use super::engine::{LoadedPlugin, PluginEngine};
use super::error::{Failure, PluginError};
use super::instance::Instance;
use super::kind::PluginKind;
use super::sandbox::Grants;

/// A scorer component running in the sandbox.
pub struct WasmScorer {
    inst: Instance<ScorerWorld>,
    /// The metric names of the first reply; every later reply must name the same ones.
    metrics: Option<Vec<String>>,
}

impl WasmScorer {
    pub fn new(engine: &PluginEngine, plugin: &LoadedPlugin, grants: &Grants, config: &str) -> Result<Self, PluginError> {
        let mut inst = Instance::new(engine, plugin, PluginKind::Scorer, grants, |pre, store| {
            ScorerPre::new(pre)?.instantiate(store)
        })?;
        inst.call_fallible("init", |b, s| b.lorahost_plugin_scorer_api().call_init(s, config))?;
        Ok(WasmScorer { inst, metrics: None })
    }

    pub fn name(&self) -> &str {
        &self.inst.name
    }

    /// One score per request, in order, each with the same metric names (at least one, finite values).
    pub fn score_batch(&mut self, batch: &[ScoringRequest]) -> Result<Vec<Scored>, PluginError> {
        let out = self.inst.call_fallible("score-batch", |b, s| b.lorahost_plugin_scorer_api().call_score_batch(s, batch))?;
        let bad = |msg: String| self.inst.error("score-batch", Failure::Malformed(msg));
        if out.len() != batch.len() {
            return Err(bad(format!("{} scores for a batch of {} generations", out.len(), batch.len())));
        }
        for s in &out {
            let names: Vec<String> = s.metrics.iter().map(|(n, _)| n.clone()).collect();
            if names.is_empty() {
                return Err(bad("a score with no metrics".into()));
            }
            if let Some((n, v)) = s.metrics.iter().find(|(_, v)| !v.is_finite()) {
                return Err(bad(format!("metric `{n}` is {v}")));
            }
            match &self.metrics {
                Some(want) if *want != names => {
                    return Err(bad(format!("metrics {names:?} after {want:?}: every score must name the same metrics")))
                }
                Some(_) => {}
                None => self.metrics = Some(names),
            }
        }
        Ok(out)
    }
}
