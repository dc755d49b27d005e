//! The training loop's micro-batches: which records each optimizer step takes (a seeded order per epoch),
//! gathered and padded on the host, and built a few steps ahead on a background thread (prefetch), so the
//! GPU never waits for the host between steps.
use crate::data::TokenStream;
use crate::rng::Rng;
use candle_core::{Device, Tensor};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::Scope;

/// One padded micro-batch on the host: ids and HF-style labels (-100 where not trained), [rows, seq].
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub rows: usize,
    pub seq: usize,
    /// Tokens of the records themselves (padding excluded).
    pub tokens: usize,
}

impl HostBatch {
    /// Records `rows` of the stream, padded with `pad` to the longest.
    pub fn gather(stream: &TokenStream, offsets: &[usize], rows: &[usize], pad: u32) -> HostBatch {
        let seq = rows.iter().map(|&i| stream.lengths[i] as usize).max().unwrap_or(1).max(1);
        let mut ids = vec![pad; rows.len() * seq];
        let mut labels = vec![-100i64; rows.len() * seq];
        let mut tokens = 0;
        for (r, &i) in rows.iter().enumerate() {
            let (rec, mask) = stream.record(offsets, i);
            tokens += rec.len();
            for (t, (&id, &m)) in rec.iter().zip(mask).enumerate() {
                ids[r * seq + t] = id;
                if m == 1 {
                    labels[r * seq + t] = id as i64;
                }
            }
        }
        HostBatch { ids, labels, rows: rows.len(), seq, tokens }
    }

    /// (ids u32, labels i64) as CPU tensors: the model uploads the ids itself and reads the labels on the
    /// host, so a GPU step needs no device synchronisation to start.
    pub fn tensors(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let shape = (self.rows, self.seq);
        Ok((Tensor::from_slice(&self.ids, shape, &Device::Cpu)?, Tensor::from_slice(&self.labels, shape, &Device::Cpu)?))
    }
}

/// The micro-batches of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepBatches {
    /// 0-based optimizer step.
    pub step: u64,
    pub micro: Vec<HostBatch>,
}

impl StepBatches {
    pub fn tokens(&self) -> usize {
        self.micro.iter().map(|b| b.tokens).sum()
    }
}

/// Which records each step takes.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub n_train: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub pad: u32,
}

impl Schedule {
    pub fn per_step(&self) -> usize {
        self.micro_batch * self.grad_accum
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.n_train.div_ceil(self.per_step()) as u64
    }

    /// The order of training records in `epoch`: the stream's order first, then a seeded reshuffle per epoch.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n_train).collect();
        if epoch > 0 {
            Rng::derive(self.seed, &format!("epoch/{epoch}")).shuffle(&mut order);
        }
        order
    }

    /// The micro-batches of optimizer step `step`.
    pub fn step(&self, stream: &TokenStream, offsets: &[usize], step: u64) -> StepBatches {
        let order = self.epoch_order(step / self.steps_per_epoch());
        let at = (step % self.steps_per_epoch()) as usize * self.per_step();
        let records = &order[at..(at + self.per_step()).min(order.len())];
        let micro = records.chunks(self.micro_batch).map(|rows| HostBatch::gather(stream, offsets, rows, self.pad)).collect();
        StepBatches { step, micro }
    }
}

/// Builds steps `steps` on a thread of `scope`, at most `depth` steps ahead of the consumer. The thread ends
/// when all are built or when the receiver is dropped.
pub fn prefetch<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    stream: &'env TokenStream,
    schedule: Schedule,
    steps: std::ops::Range<u64>,
    depth: usize,
) -> Receiver<StepBatches> {
    let (tx, rx) = sync_channel(depth.max(1));
    scope.spawn(move || {
        let offsets = stream.offsets();
        for step in steps {
            if tx.send(schedule.step(stream, &offsets, step)).is_err() {
                break; // the loop stopped early
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> TokenStream {
        TokenStream {
            lengths: vec![2, 3, 1, 2, 2],
            ids: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            trained: vec![0, 1, 0, 1, 1, 1, 0, 1, 1, 1],
            dataset: vec![0; 5],
            n_train: 5,
        }
    }

    #[test]
    fn gathers_pads_and_never_trains_padding() {
        let s = stream();
        let b = HostBatch::gather(&s, &s.offsets(), &[0, 1], 99);
        assert_eq!((b.rows, b.seq, b.tokens), (2, 3, 5));
        assert_eq!(b.ids, vec![1, 2, 99, 3, 4, 5]);
        assert_eq!(b.labels, vec![-100, 2, -100, -100, 4, 5]);
    }

    #[test]
    fn prefetched_steps_equal_the_steps_built_in_place() {
        let s = stream();
        let sched = Schedule { n_train: 5, micro_batch: 2, grad_accum: 1, seed: 3, pad: 0 };
        let direct: Vec<StepBatches> = (0..7).map(|st| sched.step(&s, &s.offsets(), st)).collect();
        let fetched: Vec<StepBatches> = std::thread::scope(|scope| prefetch(scope, &s, sched.clone(), 0..7, 2).iter().collect());
        assert_eq!(fetched, direct);
        // Epoch 1 (steps 3..6) is a reshuffle of epoch 0, covering every record once.
        let mut epoch1: Vec<u32> = direct[3..6].iter().flat_map(|sb| sb.micro.iter().flat_map(|b| b.ids.clone())).filter(|&i| i != 0).collect();
        epoch1.sort();
        assert_eq!(epoch1, (1..=10).collect::<Vec<u32>>());
    }

    #[test]
    fn a_consumer_that_stops_early_ends_the_producer() {
        let s = stream();
        let sched = Schedule { n_train: 5, micro_batch: 1, grad_accum: 1, seed: 3, pad: 0 };
        let first = std::thread::scope(|scope| prefetch(scope, &s, sched, 0..1_000_000, 1).recv().unwrap());
        assert_eq!(first.step, 0);
    }
}
