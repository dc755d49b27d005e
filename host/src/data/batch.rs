//! Stage 6: micro-batches. Records in stream order, `micro_batch` at a time, padded to the longest record
//! of the batch; padding is never trained.
use super::stream::TokenStream;

#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Row-major [rows, seq] token ids.
    pub ids: Vec<u32>,
    /// Row-major [rows, seq]: 1 where the token's prediction counts in the loss.
    pub trained: Vec<u8>,
    pub rows: usize,
    pub seq: usize,
}

impl MicroBatch {
    /// Tokens that count in the loss (the normaliser, summed over an accumulated step).
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().filter(|&&t| t == 1).count()
    }
}

/// Micro-batches over records `range` of `stream`, in order.
pub fn micro_batches(stream: &TokenStream, range: std::ops::Range<usize>, micro_batch: usize, pad_id: u32) -> Vec<MicroBatch> {
    let offsets = stream.offsets();
    let idx: Vec<usize> = range.collect();
    idx.chunks(micro_batch)
        .map(|rows| {
            let seq = rows.iter().map(|&i| stream.lengths[i] as usize).max().unwrap_or(0);
            let mut b = MicroBatch { ids: vec![pad_id; rows.len() * seq], trained: vec![0; rows.len() * seq], rows: rows.len(), seq };
            for (r, &i) in rows.iter().enumerate() {
                let (ids, mask) = stream.record(&offsets, i);
                b.ids[r * seq..r * seq + ids.len()].copy_from_slice(ids);
                b.trained[r * seq..r * seq + mask.len()].copy_from_slice(mask);
            }
            b
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_row_and_never_trains_padding() {
        let s = TokenStream {
            lengths: vec![2, 3, 1],
            ids: vec![1, 2, 3, 4, 5, 6],
            trained: vec![0, 1, 0, 1, 1, 1],
            dataset: vec![0, 0, 0],
            n_train: 3,
        };
        let b = micro_batches(&s, 0..3, 2, 99);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].ids, vec![1, 2, 99, 3, 4, 5]);
        assert_eq!(b[0].trained, vec![0, 1, 0, 0, 1, 1]);
        assert_eq!(b[0].trained_tokens(), 3);
        assert_eq!((b[1].rows, b[1].seq), (1, 1));
    }
}
