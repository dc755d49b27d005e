//! Stage 2: filters keep, drop or rewrite records, in manifest order; every drop is counted by reason.
use crate::plugins::{Example, RecordFilter, Verdict};
use std::collections::BTreeMap;

/// Records handed to a filter per call.
pub const FILTER_BATCH: usize = 1024;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct FilterStats {
    /// The filter's plugin name and its place in the manifest.
    pub plugin: String,
    pub key: String,
    pub seen: usize,
    pub kept: usize,
    pub rewritten: usize,
    pub dropped: BTreeMap<String, usize>,
}

/// Runs `records` through `filter`, returning the survivors (rewritten ones replaced).
pub fn apply(filter: &mut dyn RecordFilter, key: &str, records: Vec<Example>) -> anyhow::Result<(Vec<Example>, FilterStats)> {
    let mut stats = FilterStats { plugin: filter.name().to_string(), key: key.to_string(), ..Default::default() };
    let mut out = Vec::with_capacity(records.len());
    let ranges = super::read::byte_batches(records.iter().map(super::read::record_bytes), FILTER_BATCH);
    let mut records = records.into_iter();
    let mut batch = Vec::with_capacity(FILTER_BATCH);
    for range in ranges {
        batch.clear();
        batch.extend(records.by_ref().take(range.len()));
        let verdicts = filter.filter_batch(&batch)?;
        stats.seen += batch.len();
        for (example, verdict) in batch.drain(..).zip(verdicts) {
            match verdict {
                Verdict::Keep => out.push(example),
                Verdict::Rewrite(mut new) => {
                    // A filter may change content, never provenance.
                    new.dataset = example.dataset;
                    stats.rewritten += 1;
                    out.push(new);
                }
                Verdict::Drop(reason) => *stats.dropped.entry(reason).or_default() += 1,
            }
        }
    }
    stats.kept = out.len();
    Ok((out, stats))
}
