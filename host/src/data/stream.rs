//! The token stream: every mixed record as ids and a loss mask, in training order, with its digest.
//! This is what the cache stores and the lock pins.
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenStream {
    /// Tokens per record.
    pub lengths: Vec<u32>,
    /// All ids, record after record.
    pub ids: Vec<u32>,
    /// 1 where the token is trained (counts in the loss), 0 where it is context.
    pub trained: Vec<u8>,
    /// Index into the manifest's datasets, per record.
    pub dataset: Vec<u16>,
    /// Records `0..n_train` are for training, the rest are the eval hold-out.
    pub n_train: usize,
}

impl TokenStream {
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Start offset of each record in `ids`.
    pub fn offsets(&self) -> Vec<usize> {
        let mut acc = 0usize;
        self.lengths
            .iter()
            .map(|&l| {
                let o = acc;
                acc += l as usize;
                o
            })
            .collect()
    }

    /// Record `i` as (ids, trained mask).
    pub fn record(&self, offsets: &[usize], i: usize) -> (&[u32], &[u8]) {
        let (a, b) = (offsets[i], offsets[i] + self.lengths[i] as usize);
        (&self.ids[a..b], &self.trained[a..b])
    }

    pub fn trained_tokens(&self, range: std::ops::Range<usize>) -> usize {
        let offsets = self.offsets();
        range.map(|i| self.record(&offsets, i).1.iter().filter(|&&t| t == 1).count()).sum()
    }

    /// sha256 over the records in order (length, ids, mask) and the train/eval split: the same digest
    /// means the model sees exactly the same tokens with the same loss mask.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"lorahost-token-stream-v1");
        h.update((self.n_train as u64).to_le_bytes());
        let offsets = self.offsets();
        for i in 0..self.len() {
            let (ids, mask) = self.record(&offsets, i);
            h.update((ids.len() as u64).to_le_bytes());
            for id in ids {
                h.update(id.to_le_bytes());
            }
            h.update(mask);
        }
        hex::encode(h.finalize())
    }
}
