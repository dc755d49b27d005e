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
    /// Per drop reason, the first few dropped records (`check --show-drops N`): id, then each turn's first line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub examples: BTreeMap<String, Vec<String>>,
}

/// Characters of a turn's first line shown for a dropped record.
const SHOWN_CHARS: usize = 100;

/// A dropped record as `check --show-drops` prints it: its id, then `role: first line` per turn (cut short).
pub fn drop_example(e: &Example) -> String {
    let mut out = e.id.clone();
    for t in &e.turns {
        let line = t.content.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        let cut: String = line.chars().take(SHOWN_CHARS).collect();
        let more = if cut.len() < line.len() || t.content.trim().lines().nth(1).is_some() { " …" } else { "" };
        out.push_str(&format!("\n{}: {cut}{more}", t.role));
    }
    out
}

/// Runs `records` through `filter`, returning the survivors (rewritten ones replaced); the first `show`
/// dropped records of each reason are kept in the stats as examples.
pub fn apply(
    filter: &mut dyn RecordFilter,
    key: &str,
    records: Vec<Example>,
    show: usize,
) -> anyhow::Result<(Vec<Example>, FilterStats)> {
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
                Verdict::Drop(reason) => {
                    if show > 0 {
                        let shown = stats.examples.entry(reason.clone()).or_default();
                        if shown.len() < show {
                            shown.push(drop_example(&example));
                        }
                    }
                    *stats.dropped.entry(reason).or_default() += 1;
                }
            }
        }
    }
    stats.kept = out.len();
    Ok((out, stats))
}
