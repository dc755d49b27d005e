//! Stage 1: a dataset's source plugin yields records, batch by batch.
use crate::manifest::{Dataset, OnMalformed};
use crate::plugins::{Example, RecordSource};
use anyhow::bail;

/// How many records are asked of a source per call: big enough to amortise the sandbox crossing.
pub const READ_BATCH: u32 = 512;

/// What reading a dataset gave.
pub struct ReadOutcome {
    pub records: Vec<Example>,
    pub malformed: usize,
    /// The first few malformed-record messages, for the report.
    pub malformed_examples: Vec<String>,
}

/// Reads every record of `dataset` from `source`, stamping each with the dataset's name. Malformed records
/// stop the run or are counted, as the dataset's `on_malformed` says.
pub fn read_dataset(dataset: &Dataset, key: &str, source: &mut dyn RecordSource) -> anyhow::Result<ReadOutcome> {
    let mut out = ReadOutcome { records: Vec::new(), malformed: 0, malformed_examples: Vec::new() };
    let mut empty_in_a_row = 0;
    while let Some(batch) = source.next_batch(READ_BATCH)? {
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
        for mut e in batch.records {
            e.dataset = dataset.name.clone();
            out.records.push(e);
        }
    }
    Ok(out)
}
