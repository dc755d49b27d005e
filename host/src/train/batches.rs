//! The training loop's batches: which records each optimizer step takes (a seeded order per epoch), laid
//! out as forward passes on the host (data/batch.rs: padded or padding-free), a few steps ahead on a
//! background thread (prefetch), so the GPU never waits for the host between steps.
use crate::data::batch::{HostBatch, Layout};
use crate::data::TokenStream;
use crate::manifest::Manifest;
use crate::rng::Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::Scope;

/// The forward passes of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepBatches {
    /// 0-based optimizer step.
    pub step: u64,
    pub passes: Vec<HostBatch>,
}

impl StepBatches {
    /// Tokens of the step's records (padding excluded).
    pub fn tokens(&self) -> usize {
        self.passes.iter().map(|b| b.tokens).sum()
    }
}

/// Which records each step takes, and how they are laid out.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub n_train: usize,
    /// Passes of `layout.micro_batch` records (padded) per step; the step takes micro_batch * grad_accum
    /// records in either layout.
    pub grad_accum: usize,
    pub seed: u64,
    pub layout: Layout,
}

impl Schedule {
    /// The schedule `[train]` and `[run] seed` of a manifest give over `n_train` records.
    pub fn of(m: &Manifest, n_train: usize, pad: u32) -> Schedule {
        let t = &m.train;
        let layout = Layout { packing: m.packing(), micro_batch: t.micro_batch, tokens_per_pass: t.tokens_per_pass(), pad };
        Schedule { n_train, grad_accum: t.grad_accum, seed: m.run.seed, layout }
    }

    pub fn per_step(&self) -> usize {
        self.layout.micro_batch * self.grad_accum
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

    /// The forward passes of optimizer step `step`.
    pub fn step(&self, stream: &TokenStream, offsets: &[usize], step: u64) -> StepBatches {
        let order = self.epoch_order(step / self.steps_per_epoch());
        let at = (step % self.steps_per_epoch()) as usize * self.per_step();
        let records = &order[at..(at + self.per_step()).min(order.len())];
        StepBatches { step, passes: self.layout.passes(stream, offsets, records) }
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
    use crate::manifest::Packing;

    fn schedule(micro_batch: usize) -> Schedule {
        Schedule { n_train: 5, grad_accum: 1, seed: 3, layout: Layout { packing: Packing::None, micro_batch, tokens_per_pass: 0, pad: 0 } }
    }

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
    fn prefetched_steps_equal_the_steps_built_in_place() {
        let s = stream();
        let sched = schedule(2);
        let direct: Vec<StepBatches> = (0..7).map(|st| sched.step(&s, &s.offsets(), st)).collect();
        let fetched: Vec<StepBatches> = std::thread::scope(|scope| prefetch(scope, &s, sched.clone(), 0..7, 2).iter().collect());
        assert_eq!(fetched, direct);
        // Epoch 1 (steps 3..6) is a reshuffle of epoch 0, covering every record once.
        let mut epoch1: Vec<u32> = direct[3..6].iter().flat_map(|sb| sb.passes.iter().flat_map(|b| b.ids.clone())).filter(|&i| i != 0).collect();
        epoch1.sort();
        assert_eq!(epoch1, (1..=10).collect::<Vec<u32>>());
    }

    #[test]
    fn a_consumer_that_stops_early_ends_the_producer() {
        let s = stream();
        let sched = schedule(1);
        let first = std::thread::scope(|scope| prefetch(scope, &s, sched, 0..1_000_000, 1).recv().unwrap());
        assert_eq!(first.step, 0);
    }
}
