//! Stage 6: batches. Records of the stream as the model takes them, one forward pass each, in one of two
//! layouts ([`Packing`]):
//! - padded: `micro_batch` records per pass, one per row, each padded to the longest (padding is never
//!   trained);
//! - padding-free: records laid end to end in one row, their boundaries kept as `cu_seqlens`, as many per
//!   pass as fit in the token budget (a record is never split).
//!
//! Either way a position's label is the record's own next token, so both layouts count the same
//! positions in the loss.
use super::stream::TokenStream;
use crate::manifest::Packing;
use candle_core::{Device, Tensor};

/// One forward pass on the host: ids and HF-style labels (-100 where not trained), [rows, seq].
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub rows: usize,
    pub seq: usize,
    /// Tokens of the records themselves (padding excluded).
    pub tokens: usize,
    /// Positions whose prediction counts in the loss (what the model normalises by).
    pub trained: usize,
    /// Padding-free: the cumulative offsets of the records in the row (0, l0, l0 + l1, ...); None when each
    /// row is one padded record.
    pub cu_seqlens: Option<Vec<u32>>,
}

/// Positions of a record that count in the loss: those after its first token whose mask is set (the first
/// token is never predicted).
fn trained_positions(mask: &[u8]) -> usize {
    mask.iter().skip(1).filter(|&&m| m == 1).count()
}

/// The label of each token of a record: itself where trained, else -100.
fn labels_of<'a>(ids: &'a [u32], mask: &'a [u8]) -> impl Iterator<Item = i64> + 'a {
    ids.iter().zip(mask).map(|(&id, &m)| if m == 1 { id as i64 } else { -100 })
}

impl HostBatch {
    /// `records` of the stream, one per row, padded with `pad` to the longest.
    pub fn padded(stream: &TokenStream, offsets: &[usize], records: &[usize], pad: u32) -> HostBatch {
        let seq = records.iter().map(|&i| stream.lengths[i] as usize).max().unwrap_or(1).max(1);
        let mut ids = vec![pad; records.len() * seq];
        let mut labels = vec![-100i64; records.len() * seq];
        let (mut tokens, mut trained) = (0, 0);
        for (r, &i) in records.iter().enumerate() {
            let (rec, mask) = stream.record(offsets, i);
            tokens += rec.len();
            trained += trained_positions(mask);
            ids[r * seq..r * seq + rec.len()].copy_from_slice(rec);
            labels.splice(r * seq..r * seq + rec.len(), labels_of(rec, mask));
        }
        HostBatch { ids, labels, rows: records.len(), seq, tokens, trained, cu_seqlens: None }
    }

    /// `records` of the stream end to end in one row (empty records are left out).
    pub fn packed(stream: &TokenStream, offsets: &[usize], records: &[usize]) -> HostBatch {
        let (mut ids, mut labels, mut trained) = (Vec::new(), Vec::new(), 0);
        let mut cu_seqlens = vec![0u32];
        for &i in records.iter().filter(|&&i| stream.lengths[i] > 0) {
            let (rec, mask) = stream.record(offsets, i);
            ids.extend_from_slice(rec);
            labels.extend(labels_of(rec, mask));
            trained += trained_positions(mask);
            cu_seqlens.push(ids.len() as u32);
        }
        let tokens = ids.len();
        HostBatch { ids, labels, rows: 1, seq: tokens, tokens, trained, cu_seqlens: Some(cu_seqlens) }
    }

    /// (ids u32, labels i64) as CPU tensors: the model uploads the ids itself and reads the labels on the
    /// host, so a GPU step needs no device synchronisation to start.
    pub fn tensors(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let shape = (self.rows, self.seq);
        Ok((Tensor::from_slice(&self.ids, shape, &Device::Cpu)?, Tensor::from_slice(&self.labels, shape, &Device::Cpu)?))
    }
}

/// How records become passes.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub packing: Packing,
    /// Records per padded pass.
    pub micro_batch: usize,
    /// The most tokens of a padding-free pass (a longer record gets a pass of its own).
    pub tokens_per_pass: usize,
    /// The padding token id.
    pub pad: u32,
}

impl Layout {
    /// The forward passes over `records`, in order.
    pub fn passes(&self, stream: &TokenStream, offsets: &[usize], records: &[usize]) -> Vec<HostBatch> {
        match self.packing {
            Packing::None => records.chunks(self.micro_batch.max(1)).map(|rows| HostBatch::padded(stream, offsets, rows, self.pad)).collect(),
            Packing::PaddingFree => {
                let mut groups: Vec<Vec<usize>> = Vec::new();
                let mut fill = 0;
                for &i in records {
                    let len = stream.lengths[i] as usize;
                    match groups.last_mut() {
                        Some(g) if fill + len <= self.tokens_per_pass => g.push(i),
                        _ => {
                            groups.push(vec![i]);
                            fill = 0;
                        }
                    }
                    fill += len;
                }
                groups.iter().map(|g| HostBatch::packed(stream, offsets, g)).filter(|b| b.tokens > 0).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> TokenStream {
        TokenStream {
            lengths: vec![2, 3, 1, 2],
            ids: vec![1, 2, 3, 4, 5, 6, 7, 8],
            trained: vec![0, 1, 0, 1, 1, 1, 0, 1],
            dataset: vec![0; 4],
            n_train: 4,
        }
    }

    fn layout(packing: Packing, tokens_per_pass: usize) -> Layout {
        Layout { packing, micro_batch: 2, tokens_per_pass, pad: 99 }
    }

    #[test]
    fn padded_rows_pad_to_the_longest_and_never_train_padding() {
        let s = stream();
        let b = HostBatch::padded(&s, &s.offsets(), &[0, 1], 99);
        assert_eq!((b.rows, b.seq, b.tokens, b.trained), (2, 3, 5, 3));
        assert_eq!(b.ids, vec![1, 2, 99, 3, 4, 5]);
        assert_eq!(b.labels, vec![-100, 2, -100, -100, 4, 5]);
        assert_eq!(b.cu_seqlens, None);
    }

    #[test]
    fn padding_free_passes_lay_records_end_to_end_within_the_budget() {
        let s = stream();
        let o = s.offsets();
        let all = layout(Packing::PaddingFree, 8).passes(&s, &o, &[0, 1, 2, 3]);
        assert_eq!(all.len(), 1);
        let b = &all[0];
        assert_eq!((b.rows, b.seq, b.tokens), (1, 8, 8));
        assert_eq!(b.ids, s.ids);
        assert_eq!(b.labels, vec![-100, 2, -100, 4, 5, 6, -100, 8]);
        assert_eq!(b.cu_seqlens.as_deref(), Some(&[0, 2, 5, 6, 8][..]));
        // The same positions count as in the padded micro-batches of the same records.
        let padded = layout(Packing::None, 0).passes(&s, &o, &[0, 1, 2, 3]);
        assert_eq!(padded.len(), 2);
        assert_eq!(b.trained, padded.iter().map(|p| p.trained).sum::<usize>());

        // A budget of 5 tokens: [0, 1] (5), then [2, 3] (3); records are never split.
        let split = layout(Packing::PaddingFree, 5).passes(&s, &o, &[0, 1, 2, 3]);
        let cuts: Vec<_> = split.iter().map(|b| b.cu_seqlens.clone().unwrap()).collect();
        assert_eq!(cuts, vec![vec![0, 2, 5], vec![0, 1, 3]]);
        // A record longer than the budget gets a pass of its own.
        let tight = layout(Packing::PaddingFree, 2).passes(&s, &o, &[1, 0]);
        assert_eq!(tight.iter().map(|b| b.tokens).collect::<Vec<_>>(), vec![3, 2]);
    }
}
