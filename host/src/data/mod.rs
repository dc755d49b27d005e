//! The data path, as a straight line: source -> filters -> mix -> template -> tokens -> batches.
//!
//! [`prepare`] runs it for a manifest (or takes the result from the cache) and returns the token stream,
//! the report `lorahost check` prints and the lock. Each stage is its own module:
//! [`read`], [`filter`], [`mix`], [`encode`] (template segments -> ids, truncation), [`batch`]; around them
//! [`plugins`] (resolving `plugin = "..."`), [`eval_sets`] (the evaluation sets a filter reads), [`cache`],
//! [`lock`] and [`report`].
pub mod batch;
pub mod cache;
pub mod encode;
pub mod eval_sets;
pub mod filter;
pub mod lock;
pub mod mix;
pub mod plugins;
pub mod read;
pub mod report;
pub mod stream;

use crate::manifest::Manifest;
use crate::plugins::{Example, WasmTemplate};
use crate::tokenizer::Tokenizer;
use anyhow::Context;
use lock::Lock;
use plugins::{PluginOrigin, PluginSet, Resolved};
use rayon::prelude::*;
use report::{DatasetReport, Report};
use std::collections::BTreeMap;
pub use stream::TokenStream;

/// The outcome of preparing a manifest's data.
pub struct Prepared {
    pub stream: TokenStream,
    pub report: Report,
    /// Inputs and token-stream digests.
    pub lock: Lock,
    pub from_cache: bool,
}

/// Loads the tokenizer a manifest names (`model.tokenizer`, else the model folder).
pub fn load_tokenizer(m: &Manifest) -> anyhow::Result<Box<dyn Tokenizer>> {
    let path = m.model.tokenizer.clone().unwrap_or_else(|| m.model.path.clone());
    crate::tokenizer::load(&path).with_context(|| format!("{}: `model.tokenizer`", m.file.display()))
}

/// Everything resolved for a manifest before any data moves: plugins, tokenizer, the lock of inputs.
pub struct Plan<'m> {
    pub manifest: &'m Manifest,
    pub set: PluginSet<'m>,
    /// In [`Manifest::plugin_uses`] order.
    pub resolved: Vec<(String, Resolved)>,
    pub tokenizer: Box<dyn Tokenizer>,
    pub lock: Lock,
    /// Dropped records to keep per filter and reason, for `check --show-drops` (0: none). When set, the
    /// pipeline runs without the token cache, whose reports hold no examples.
    pub show_drops: usize,
}

impl<'m> Plan<'m> {
    pub fn new(m: &'m Manifest) -> anyhow::Result<Plan<'m>> {
        let set = PluginSet::new(m)?;
        let tokenizer = load_tokenizer(m)?;
        // Every declared plugin is checked against its pin, used or not: a wrong digest is wrong anywhere.
        for name in m.plugins.keys() {
            set.read_pinned(name)?;
        }
        let (mut uses, mut resolved) = (Vec::new(), Vec::new());
        for (kind, key, use_) in m.plugin_uses() {
            // A filter's evaluation sets are read here, through source plugins, into files it is granted.
            let use_ = if kind == crate::plugins::PluginKind::Filter { eval_sets::expand(&set, m, &key, use_)? } else { use_.clone() };
            resolved.push((key.clone(), set.resolve(kind, &key, &use_)?));
            uses.push(use_);
        }
        let lock = lock::input_lock(m, &uses, &resolved, tokenizer.as_ref())?;
        let plan = Plan { manifest: m, set, resolved, tokenizer, lock, show_drops: 0 };
        plan.check_eos()?;
        Ok(plan)
    }

    /// Refuses a template whose end-of-sequence token the tokenizer does not know: the model would never
    /// learn to stop, and `generate` would never stop.
    fn check_eos(&self) -> anyhow::Result<()> {
        let template = self.template()?;
        let eos = &template.info().eos;
        if self.tokenizer.special_id(eos).is_some() {
            return Ok(());
        }
        let known: Vec<&str> = ["<|endoftext|>", "<|im_end|>", "</s>", "<eos>", "<|eot_id|>"]
            .into_iter()
            .filter(|t| self.tokenizer.special_id(t).is_some())
            .collect();
        anyhow::bail!(
            "{}: `template`: plugin `{}` ends answers with eos `{eos}`, which the tokenizer does not have as a \
             special token. Set `eos` in [template] to one it has ({})",
            self.manifest.file.display(),
            self.manifest.template.plugin,
            if known.is_empty() { "see the tokenizer's special tokens".to_string() } else { known.join(", ") }
        )
    }

    fn get(&self, key: &str) -> &Resolved {
        &self.resolved.iter().find(|(k, _)| k == key).expect("every plugin use is resolved").1
    }

    pub fn origins(&self) -> Vec<PluginOrigin> {
        self.resolved.iter().map(|(_, r)| r.origin.clone()).collect()
    }

    /// The scheduler instance for this manifest.
    pub fn scheduler(&self) -> anyhow::Result<crate::plugins::WasmScheduler> {
        self.set.scheduler(self.get("scheduler"))
    }

    pub fn scheduler_sha(&self) -> String {
        self.get("scheduler").origin.sha256.clone()
    }

    /// The template instance for this manifest.
    pub fn template(&self) -> anyhow::Result<WasmTemplate> {
        self.set.template(self.get("template"))
    }
}

/// Prepares the manifest's token stream, from the cache when the inputs are unchanged.
pub fn prepare(m: &Manifest) -> anyhow::Result<Prepared> {
    prepare_plan(&Plan::new(m)?)
}

/// [`prepare`] with a plan the caller keeps (for its tokenizer, template or scheduler), so plugins are not
/// resolved and data files not digested a second time.
pub fn prepare_plan(plan: &Plan) -> anyhow::Result<Prepared> {
    let m = plan.manifest;
    let key = plan.lock.key();
    let cache_dir = if plan.show_drops > 0 { None } else { m.cache_dir() };
    if let Some(dir) = &cache_dir {
        if let Some((stream, mut report)) = cache::load(dir, &key)? {
            report.plugins = plan.origins();
            report.from_cache = true;
            // Budgets are not inputs of the stream (they only stop a run): show the manifest's own.
            for (r, d) in report.datasets.iter_mut().zip(&m.datasets) {
                r.budget = d.budget.clone();
            }
            let mut lock = plan.lock.clone();
            lock.token_stream = Some(report.token_stream_sha256.clone());
            return Ok(Prepared { stream, report, lock, from_cache: true });
        }
    }
    let (stream, mut report) = run_pipeline(plan)?;
    if let Some(dir) = &cache_dir {
        cache::store(dir, &key, &stream, &report).context("writing the token cache")?;
    }
    report.plugins = plan.origins();
    let mut lock = plan.lock.clone();
    lock.token_stream = Some(report.token_stream_sha256.clone());
    Ok(Prepared { stream, report, lock, from_cache: false })
}

/// Runs every stage; no cache involved.
pub fn run_pipeline(plan: &Plan) -> anyhow::Result<(TokenStream, Report)> {
    let m = plan.manifest;
    // 1-2. Read each dataset and run its own filters; datasets in parallel, each with its own plugins.
    let per_dataset: Vec<(Vec<Example>, DatasetReport)> = m
        .datasets
        .par_iter()
        .enumerate()
        .map(|(i, d)| -> anyhow::Result<_> {
            let key = format!("dataset[{i}].source");
            let outcome = read::read_dataset(d, &key, &|| plan.set.source(plan.get(&key)))?;
            let mut rep = DatasetReport {
                name: d.name.clone(),
                read: outcome.records.len(),
                bytes: outcome.bytes,
                budget: d.budget.clone(),
                malformed: outcome.malformed,
                malformed_examples: outcome.malformed_examples,
                ..Default::default()
            };
            let mut records = outcome.records;
            for j in 0..d.filters.len() {
                let fkey = format!("dataset[{i}].filters[{j}]");
                let mut f = plan.set.filter(plan.get(&fkey))?;
                let (kept, stats) = filter::apply(f.as_mut(), &fkey, records, plan.show_drops)?;
                records = kept;
                rep.filters.push(stats);
            }
            Ok((records, rep))
        })
        .collect::<anyhow::Result<_>>()?;
    let (mut pools, mut dreports): (Vec<Vec<Example>>, Vec<DatasetReport>) = per_dataset.into_iter().unzip();

    // 2b. Global filters see all datasets, in manifest order (so cross-dataset dedup keeps the first).
    let mut global_stats = Vec::new();
    for j in 0..m.filters.len() {
        let fkey = format!("filter[{j}]");
        let mut f = plan.set.filter(plan.get(&fkey))?;
        let sizes: Vec<usize> = pools.iter().map(Vec::len).collect();
        let all: Vec<Example> = pools.drain(..).flatten().collect();
        let (kept, stats) = filter::apply(f.as_mut(), &fkey, all, plan.show_drops)?;
        global_stats.push(stats);
        // Re-split by dataset (records keep their dataset name; order is preserved).
        let names: Vec<&str> = m.datasets.iter().map(|d| d.name.as_str()).collect();
        let mut split: Vec<Vec<Example>> = sizes.iter().map(|_| Vec::new()).collect();
        for e in kept {
            let i = names.iter().position(|n| *n == e.dataset).expect("filters keep the dataset name");
            split[i].push(e);
        }
        pools = split;
    }
    for (i, d) in dreports.iter_mut().enumerate() {
        d.kept = pools[i].len();
        if d.kept == 0 {
            anyhow::bail!(
                "dataset `{}` is empty after filtering ({} read, {} malformed): check its source options and filters \
                 (`lorahost check` shows what each filter dropped)",
                d.name,
                d.read,
                d.malformed
            );
        }
    }

    // 3. Mix: which (dataset, record) pairs, in which order.
    let mut chosen: Vec<(u16, u32)> = Vec::new();
    for (i, d) in m.datasets.iter().enumerate() {
        for r in mix::sample_dataset(pools[i].len(), d, m.run.seed) {
            chosen.push((i as u16, r as u32));
        }
    }
    let order: Vec<(u16, u32)> = mix::mix_all(chosen.len(), &m.mix, m.run.seed).into_iter().map(|p| chosen[p]).collect();

    // 4-5. Render and tokenize each distinct record once (repeats share their tokens), in parallel.
    let mut needed: Vec<(u16, u32)> = order.clone();
    needed.sort_unstable();
    needed.dedup();
    let encoded = encode::encode_records(plan, &pools, &needed)?;
    let lookup: BTreeMap<(u16, u32), usize> = needed.iter().enumerate().map(|(k, v)| (*v, k)).collect();

    // Assemble the stream in mix order, dropping records the template rejected or truncation emptied.
    let mut report = Report { max_seq_len: m.train.max_seq_len, global_filters: global_stats, ..Default::default() };
    let mut kept_order: Vec<usize> = Vec::with_capacity(order.len());
    for (pos, key) in order.iter().enumerate() {
        match &encoded[lookup[key]] {
            Err(reason) => *report.template_rejected.entry(reason.clone()).or_default() += 1,
            Ok(e) if !e.trained.contains(&true) && e.truncated => report.no_trained_tokens += 1,
            Ok(e) if !e.trained.contains(&true) => report.template_untrained += 1,
            Ok(_) => kept_order.push(pos),
        }
    }
    let n_eval = mix::eval_size(kept_order.len(), m.train.eval_fraction, m.train.eval_count);
    let mut stream = TokenStream { n_train: kept_order.len() - n_eval, ..Default::default() };
    for &pos in &kept_order {
        let key = order[pos];
        let e = encoded[lookup[&key]].as_ref().expect("kept records encoded");
        stream.lengths.push(e.ids.len() as u32);
        stream.ids.extend_from_slice(&e.ids);
        stream.trained.extend(e.trained.iter().map(|&t| t as u8));
        stream.dataset.push(key.0);
        dreports[key.0 as usize].in_mix += 1;
        report.truncated += e.truncated as usize;
    }
    if stream.n_train == 0 {
        anyhow::bail!("{}", nothing_left(m, &report, order.len(), n_eval));
    }
    report.datasets = dreports;
    report.train_records = stream.n_train;
    report.eval_records = n_eval;
    report.total_tokens = stream.ids.len();
    report.trained_tokens = stream.trained.iter().filter(|&&t| t == 1).count();
    report.length_histogram = report::histogram(stream.lengths.iter().map(|&l| l as usize), m.train.max_seq_len);
    report.sequences_per_step = m.train.micro_batch * m.train.grad_accum;
    report.steps_per_epoch = stream.n_train.div_ceil(report.sequences_per_step);
    report.token_stream_sha256 = stream.digest();
    Ok((stream, report))
}

/// Why no training record is left, naming the template and what it did to the records that reached it.
fn nothing_left(m: &Manifest, report: &Report, mixed: usize, n_eval: usize) -> String {
    let rejected: usize = report.template_rejected.values().sum();
    let mut why = vec![];
    if rejected > 0 {
        let reasons: Vec<String> = report.template_rejected.iter().take(3).map(|(r, n)| format!("{n}: {r}")).collect();
        why.push(format!("rejected {rejected} ({})", reasons.join("; ")));
    }
    if report.template_untrained > 0 {
        why.push(format!("rendered {} with no trained segment (nothing for the loss)", report.template_untrained));
    }
    if report.no_trained_tokens > 0 {
        why.push(format!(
            "{} lost every trained token to truncation at `train.max_seq_len = {}`",
            report.no_trained_tokens, m.train.max_seq_len
        ));
    }
    if n_eval > 0 {
        why.push(format!("{n_eval} went to the eval hold-out"));
    }
    format!(
        "no training records are left after the mix: {mixed} records reached the template plugin `{}` ([template]), \
         which {}. Check the template's options and that its renderings mark the answer as trained \
         (`lorahost preview` shows them)",
        m.template.plugin,
        if why.is_empty() { "left none".to_string() } else { why.join(", ") }
    )
}
