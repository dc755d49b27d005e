//! Stage 1: a dataset's source plugin yields records, batch by batch, under the dataset's budget.
//!
//! Two bounds keep the host's memory in check whatever a source does:
//! - the dataset's [`Budget`] (records and bytes read in all): a source that never ends is stopped, with an
//!   error naming it, as soon as it goes past;
//! - batches sized by bytes: the host asks for fewer records per call when they are long (starting at one
//!   and doubling while replies stay small), so a reply stays near [`BATCH_BYTES`], far below what one call
//!   may copy out of the sandbox (`limits.reply_mb`).
use crate::manifest::{Budget, Dataset, OnMalformed};
use crate::plugins::{Example, Failure, PluginError, RecordSource};
use anyhow::bail;

/// The most records asked of a source per call: big enough to amortise the sandbox crossing.
pub const READ_BATCH: u32 = 512;

/// The size one reply aims at; the number of records asked for follows from the largest record seen. The
/// SDK's sources stop a batch at the same size (`lorahost_sdk::REPLY_BYTES`) when records grow longer
/// than the ask assumed.
pub const BATCH_BYTES: usize = 16 << 20;

/// What reading a dataset gave.
pub struct ReadOutcome {
    pub records: Vec<Example>,
    /// Bytes of text read (ids, roles, contents, metadata).
    pub bytes: u64,
    pub malformed: usize,
    /// The first few malformed-record messages, for the report.
    pub malformed_examples: Vec<String>,
}

/// The bytes a record holds: what the budget counts (the SDK's `Example::bytes` counts the same).
pub fn record_bytes(e: &Example) -> usize {
    let turns: usize = e.turns.iter().map(|t| t.role.len() + t.content.len()).sum();
    let meta: usize = e.meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    e.id.len() + turns + meta
}

/// Splits records of the given sizes into consecutive runs of at most `max` records and about
/// [`BATCH_BYTES`] (a larger record goes alone): the batches handed to filters and templates, so long
/// records never make one call's data unbounded.
pub fn byte_batches(sizes: impl IntoIterator<Item = usize>, max: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes, mut n) = (0, 0, 0);
    for size in sizes {
        if n > start && (n - start == max || bytes + size > BATCH_BYTES) {
            out.push(start..n);
            (start, bytes) = (n, 0);
        }
        bytes += size;
        n += 1;
    }
    if n > start {
        out.push(start..n);
    }
    out
}

/// How many records to ask for next: doubling from one, and no more than fit in [`BATCH_BYTES`] at the
/// size of the largest record seen in the last reply.
fn next_ask(last_ask: u32, largest: usize) -> u32 {
    let by_bytes = (BATCH_BYTES / largest.max(1)).clamp(1, READ_BATCH as usize) as u32;
    last_ask.saturating_mul(2).min(by_bytes).max(1)
}

/// A fresh reader on a dataset's source.
pub type OpenSource<'a> = dyn Fn() -> anyhow::Result<Box<dyn RecordSource>> + 'a;

/// Reads every record of `dataset` from the source `open` gives, stamping each with the dataset's name.
/// Malformed records stop the run or are counted, as the dataset's `on_malformed` says; going past the
/// budget stops the run.
pub fn read_dataset(dataset: &Dataset, key: &str, open: &OpenSource) -> anyhow::Result<ReadOutcome> {
    let mut out = ReadOutcome { records: Vec::new(), bytes: 0, malformed: 0, malformed_examples: Vec::new() };
    let mut source = open()?;
    let budget = &dataset.budget;
    let mut empty_in_a_row = 0;
    let mut ask = 1u32;
    loop {
        let batch = match source.next_batch(ask) {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(e) => return Err(reply_error(dataset, key, open, out.records.len() + out.malformed, ask, e)),
        };
        if let Some(first) = batch.malformed.first() {
            if dataset.on_malformed == OnMalformed::Fail {
                bail!(
                    "dataset `{}` ({key}): malformed record: {first}\n  (fix the data, or set `on_malformed = \"skip\"` in this [[dataset]] to skip and count such records)",
                    dataset.name
                );
            }
            out.malformed += batch.malformed.len();
            let room = 5usize.saturating_sub(out.malformed_examples.len());
            out.malformed_examples.extend(batch.malformed.into_iter().take(room));
        }
        // A source that keeps answering with nothing would spin forever.
        empty_in_a_row = if batch.records.is_empty() { empty_in_a_row + 1 } else { 0 };
        if empty_in_a_row > 10_000 {
            bail!("dataset `{}`: source `{}` keeps returning empty batches without ending", dataset.name, source.name());
        }
        let mut largest = 0;
        for mut e in batch.records {
            let size = record_bytes(&e);
            largest = largest.max(size);
            out.bytes += size as u64;
            if out.records.len() as u64 >= budget.records || out.bytes > budget.bytes() {
                return Err(over_budget(dataset, key, source.name(), budget));
            }
            e.dataset = dataset.name.clone();
            out.records.push(e);
        }
        ask = next_ask(ask, largest);
    }
    Ok(out)
}

fn over_budget(dataset: &Dataset, key: &str, source: &str, budget: &Budget) -> anyhow::Error {
    anyhow::anyhow!(
        "dataset `{}` ({key}): source `{source}` gave more than this dataset's budget of {} records or {} MiB of \
         text, and was stopped. If the data really is that large, raise `budget = {{ records = ..., mb = ... }}` \
         in this [[dataset]]; a source that never ends is a bug in the source",
        dataset.name,
        budget.records,
        budget.mb
    )
}

/// A failed `next-batch`; a reply over the copy limit names the record it carried.
fn reply_error(dataset: &Dataset, key: &str, open: &OpenSource, done: usize, ask: u32, e: PluginError) -> anyhow::Error {
    let Failure::ReplyTooBig(limit) = e.failure else { return e.into() };
    // The failed call is lost with its instance: read again, one record at a time past `done`, to find it.
    let which = match find_too_big(open, done, done + ask as usize) {
        Some(n) => format!("record {n} (counting from 1, malformed ones included) is"),
        None => format!("one of records {} to {} (counting from 1) is", done + 1, done + ask as usize),
    };
    anyhow::anyhow!(
        "dataset `{}` ({key}): {which} larger than the {} MiB one call may copy out of the plugin `{}`. \
         Split or drop that record, or raise `limits.reply_mb` of this source",
        dataset.name,
        limit >> 20,
        e.plugin
    )
}

/// The 1-based position, below `end`, of the first record a fresh reader cannot hand over alone; `None`
/// when the source does not fail the same way again.
fn find_too_big(open: &OpenSource, done: usize, end: usize) -> Option<usize> {
    let mut source = open().ok()?;
    let (mut seen, mut ask) = (0usize, 1u32);
    while seen < end {
        let want = if seen < done { ask.min((done - seen) as u32) } else { 1 };
        match source.next_batch(want) {
            Ok(Some(b)) => {
                seen += b.records.len() + b.malformed.len();
                ask = next_ask(ask, b.records.iter().map(record_bytes).max().unwrap_or(0));
            }
            Err(PluginError { failure: Failure::ReplyTooBig(_), .. }) if seen >= done => return Some(seen + 1),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_by_count_and_bytes() {
        assert_eq!(byte_batches([1, 1, 1, 1, 1], 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(byte_batches([BATCH_BYTES, 1, BATCH_BYTES / 2, BATCH_BYTES / 2], 100), vec![0..1, 1..3, 3..4]);
        assert!(byte_batches([], 4).is_empty());
    }

    #[test]
    fn asks_grow_from_one_and_follow_record_size() {
        assert_eq!(next_ask(1, 100), 2);
        assert_eq!(next_ask(256, 100), READ_BATCH);
        assert_eq!(next_ask(512, 300 << 10), 54);
        assert_eq!(next_ask(54, 10 << 20), 1);
        assert_eq!(next_ask(1, 100 << 20), 1);
    }
}
