//! Runs one task: read its records through the source plugin, build prompts, ask the model, score.
use super::lm::{encode_pair, GenerateRequest, LanguageModel, LoglikRequest};
use super::prompt::{self, Prompted};
use super::results::{aggregate, RecordResult, TaskResult};
use super::task::{Kind, Metric, Task};
use crate::data::plugins::PluginSet;
use crate::model::transformer::argmax;
use crate::manifest::{Dataset, OnMalformed, PluginUse};
use crate::plugins::scorer::ScoringRequest;
use crate::plugins::{Example, PluginKind};
use crate::tokenizer::Tokenizer;
use anyhow::Context;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a task run needs besides the task.
pub struct Options {
    /// Score only the first N records.
    pub limit: Option<usize>,
    /// Show progress on standard error.
    pub progress: bool,
    /// For the results file: the model and adapter folders.
    pub model: String,
    pub adapter: Option<String>,
    /// Prompts generated together (`generate` tasks): rows of one batched decode.
    pub batch: usize,
}

/// Records per call into the model or the scorer (also how often progress is shown).
const BLOCK: usize = 16;

/// The default of [`Options::batch`] (`lorahost eval --batch`).
pub const GENERATE_BATCH: usize = 8;

/// Reads every record of a plugin use (`key` names it in messages); malformed records stop the run.
pub fn read_records(set: &PluginSet, key: &str, use_: &PluginUse) -> anyhow::Result<Vec<Example>> {
    let resolved = set.resolve(PluginKind::Source, key, use_)?;
    let dataset = Dataset {
        name: key.to_string(),
        source: use_.clone(),
        filters: vec![],
        repeat: 1,
        fraction: None,
        count: None,
        on_malformed: OnMalformed::Fail,
        budget: Default::default(),
    };
    Ok(crate::data::read::read_dataset(&dataset, key, &|| set.source(&resolved))?.records)
}

/// A task's records (the first `limit`) with their prompts. Few-shot examples come from the few-shot source,
/// or else from all of the task's own records (never a record itself).
pub fn prompts(set: &PluginSet, task: &Task, limit: Option<usize>) -> anyhow::Result<Vec<(Example, Prompted)>> {
    let records = read_records(set, &format!("eval.{}.source", task.name), &task.source)?;
    let few = task.fewshot.as_ref().filter(|f| f.count > 0);
    let other_pool = match few.and_then(|f| f.source.as_ref()) {
        Some(u) => Some(read_records(set, &format!("eval.{}.fewshot.source", task.name), u)?),
        None => None,
    };
    let (pool, own) = match &other_pool {
        Some(p) => (p.as_slice(), false),
        None => (records.as_slice(), true),
    };
    let n = limit.unwrap_or(records.len()).min(records.len());
    records[..n]
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let shots = few.map(|f| prompt::shots(f, pool, own, e, i)).unwrap_or_default();
            Ok((e.clone(), prompt::build(task, e, &shots)?))
        })
        .collect()
}

/// Shows `done/total` at most twice a second.
struct Progress {
    on: bool,
    task: String,
    last: Instant,
}

impl Progress {
    fn show(&mut self, done: usize, total: usize) {
        if self.on && (done == total || self.last.elapsed() > Duration::from_millis(500)) {
            eprint!("\r{}: {done}/{total} records", self.task);
            if done == total {
                eprintln!();
            }
            self.last = Instant::now();
        }
    }
}

/// Runs `task` on `lm`; `set` resolves its plugins.
pub fn run_task(set: &PluginSet, task: &Task, lm: &dyn LanguageModel, tok: &dyn Tokenizer, opts: &Options) -> anyhow::Result<TaskResult> {
    let items = prompts(set, task, opts.limit)?;
    let mut progress = Progress { on: opts.progress, task: task.name.clone(), last: Instant::now() };
    let bos = tok.special_id("<|endoftext|>").unwrap_or(0);
    let (records, names) = match task.kind {
        Kind::MultipleChoice => multiple_choice(task, &items, lm, tok, bos, &mut progress)?,
        Kind::Generate => generate(set, task, &items, lm, tok, opts.batch, &mut progress)?,
    };
    Ok(TaskResult {
        task: task.name.clone(),
        kind: task.kind,
        task_file: task.file.display().to_string(),
        model: opts.model.clone(),
        adapter: opts.adapter.clone(),
        fewshot: task.fewshot.as_ref().map_or(0, |f| f.count),
        limit: opts.limit,
        metrics: aggregate(&names, &records),
        records,
    })
}

/// MC2: the probability mass of the right choices among all (softmax of the log-likelihoods).
fn mc2(logprobs: &[f64], labels: &[bool]) -> f64 {
    let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = logprobs.iter().map(|l| (l - max).exp()).collect();
    let right: f64 = p.iter().zip(labels).filter(|(_, &r)| r).map(|(x, _)| x).sum();
    right / p.iter().sum::<f64>()
}

/// The requests of a multiple-choice record, one per choice.
pub fn choice_requests(tok: &dyn Tokenizer, p: &Prompted, bos: u32) -> Vec<LoglikRequest> {
    p.continuations.iter().map(|c| encode_pair(tok, &p.context, c, bos)).collect()
}

fn multiple_choice(
    task: &Task,
    items: &[(Example, Prompted)],
    lm: &dyn LanguageModel,
    tok: &dyn Tokenizer,
    bos: u32,
    progress: &mut Progress,
) -> anyhow::Result<(Vec<RecordResult>, Vec<String>)> {
    let metric = task.metric.unwrap_or(Metric::Acc);
    let mut out = Vec::with_capacity(items.len());
    for block in items.chunks(BLOCK) {
        let requests: Vec<LoglikRequest> = block.iter().flat_map(|(_, p)| choice_requests(tok, p, bos)).collect();
        let answers = lm.loglikelihoods(&requests).with_context(|| format!("eval task `{}`", task.name))?;
        let mut answers = answers.into_iter();
        for (e, p) in block {
            let lls: Vec<f64> = answers.by_ref().take(p.continuations.len()).map(|a| a.logprob).collect();
            let mut scores = BTreeMap::new();
            match metric {
                Metric::Acc => {
                    let acc = argmax(lls.iter().copied()) == p.gold;
                    let norm = argmax(lls.iter().zip(&p.choice_texts).map(|(l, c)| l / c.chars().count().max(1) as f64));
                    scores.insert("acc".to_string(), f64::from(u8::from(acc)));
                    scores.insert("acc_norm".to_string(), f64::from(u8::from(norm == p.gold)));
                }
                Metric::Mc2 => {
                    scores.insert("acc".to_string(), mc2(&lls, &p.labels));
                }
            }
            out.push(RecordResult {
                id: e.id.clone(),
                prompt: p.context.clone(),
                choices: p.continuations.clone(),
                logprobs: lls,
                gold: Some(p.gold),
                generation: None,
                extracted: None,
                references: vec![],
                scores,
            });
        }
        progress.show(out.len(), items.len());
    }
    let names = match metric {
        Metric::Acc => vec!["acc".to_string(), "acc_norm".to_string()],
        Metric::Mc2 => vec!["acc".to_string()],
    };
    Ok((out, names))
}

/// `text` cut before the first of `stop` (the harness cuts at each stop string in turn, which is the same).
pub fn cut_at_stop(text: &str, stop: &[String]) -> String {
    let end = stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
    text[..end].to_string()
}

fn generate(
    set: &PluginSet,
    task: &Task,
    items: &[(Example, Prompted)],
    lm: &dyn LanguageModel,
    tok: &dyn Tokenizer,
    batch: usize,
    progress: &mut Progress,
) -> anyhow::Result<(Vec<RecordResult>, Vec<String>)> {
    let g = task.generation();
    let key = format!("eval.{}.scorer", task.name);
    let scorer_use = task.scorer.as_ref().expect("validated: generate tasks have a scorer");
    let mut scorer = set.scorer(&set.resolve(PluginKind::Scorer, &key, scorer_use)?)?;
    let eos = tok.special_id("<|endoftext|>");
    let req = GenerateRequest { max_new: g.max_tokens, stop_token: eos, temperature: g.temperature, seed: g.seed };
    let budget = lm.max_length().saturating_sub(g.max_tokens).max(1);
    let mut out: Vec<RecordResult> = Vec::with_capacity(items.len());
    let mut names: Vec<String> = vec![];
    for block in items.chunks(batch.max(1)) {
        let prompts: Vec<Vec<u32>> = block
            .iter()
            .map(|(_, p)| {
                let mut ids = Vec::new();
                tok.encode_ordinary(&p.context, &mut ids);
                // As the harness does: keep the prompt's last tokens so the generation fits the context.
                if ids.len() > budget {
                    ids.drain(..ids.len() - budget);
                }
                ids
            })
            .collect();
        let rows: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let generated = lm.generate_batch(&rows, &req, &mut |_, so_far| {
            let text = tok.decode(so_far);
            g.stop.iter().any(|s| !s.is_empty() && text.contains(s.as_str()))
        })?;
        let mut requests = Vec::with_capacity(block.len());
        for (new, (e, p)) in generated.into_iter().zip(block) {
            let new: Vec<u32> = new.into_iter().filter(|&t| Some(t) != eos).collect();
            let generation = cut_at_stop(&tok.decode(&new), &g.stop);
            requests.push(ScoringRequest { generation, example: e.clone(), references: p.references.clone() });
        }
        let scored = scorer.score_batch(&requests)?;
        for ((req, s), (e, p)) in requests.into_iter().zip(scored).zip(block) {
            if names.is_empty() {
                names = s.metrics.iter().map(|(n, _)| n.clone()).collect();
            }
            out.push(RecordResult {
                id: e.id.clone(),
                prompt: p.context.clone(),
                choices: vec![],
                logprobs: vec![],
                gold: None,
                generation: Some(req.generation),
                extracted: Some(s.extracted),
                references: req.references,
                scores: s.metrics.into_iter().collect(),
            });
        }
        progress.show(out.len(), items.len());
    }
    Ok((out, names))
}

/// The results table: task, metric, value ± standard error, records.
pub fn table(results: &[TaskResult]) -> String {
    let mut s = format!("{:<20} {:<18} {:>8} {:>8} {:>8}\n", "task", "metric", "value", "stderr", "records");
    for r in results {
        for m in &r.metrics {
            s.push_str(&format!("{:<20} {:<18} {:>8.4} {:>8.4} {:>8}\n", r.task, m.name, m.value, m.stderr, r.records.len()));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_argmax_and_mc2() {
        let stop = vec!["Question:".to_string(), "\n\n".to_string()];
        assert_eq!(cut_at_stop(" 42\n\nQuestion: next", &stop), " 42");
        assert_eq!(cut_at_stop("no stop", &stop), "no stop");
        assert_eq!(cut_at_stop("Question:", &stop), "");
        assert_eq!(argmax([1.0, 3.0, 3.0].into_iter()), 1, "first on a tie");
        // Right choices with probabilities 0.5 and 0.25 among 0.5 + 0.25 + 0.25.
        let lp = [0.5f64.ln(), 0.25f64.ln(), 0.25f64.ln()];
        assert!((mc2(&lp, &[true, false, true]) - 0.75).abs() < 1e-12);
    }
}
