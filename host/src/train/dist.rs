//! The seam between the training loop and the ranks of a data-parallel run: [`Collective`].
//!
//! A rank is one copy of the trainer (its own model and adapter). The loop talks to the others only through
//! this trait: sum the adapter gradients and a few scalars, hand small data from one rank to all, wait for
//! all. Two implementations:
//! - [`Single`]: world size 1, every call a no-op (the ordinary run);
//! - [`Threads`]: ranks as threads of one process, an in-process all-reduce; `lorahost run --ranks N` on
//!   the CPU and the tests. Sums go in rank order, so a run is reproducible bit for bit.
//!
//! Ranks as processes (one per GPU, or `--procs` on the CPU) use the same trait: [`super::tcp`] (the CPU,
//! and every process run's rendezvous and failure channel) and `super::nccl` (the GPUs, `cuda` feature);
//! [`super::launch`] starts them and reads the launcher's environment.
//!
//! Failure: a rank that fails calls [`Collective::abort`] (the thread runner does it for every error and
//! panic), and every other rank's next or current collective call returns an error naming that rank. A
//! rank that neither arrives nor fails (a hang) is named by the others after the timeout.
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a rank waits for the others in one collective call before naming the missing ones. Long,
/// because rank 0 alone prepares the data and writes checkpoints while the others wait.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What a rank can ask of the group. Every rank must make the same calls in the same order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums each f32 tensor element-wise over the ranks, in place; every rank gets the same bits.
    fn all_reduce_sum(&self, tensors: &mut [&mut Tensor]) -> Result<()>;
    /// Sums scalars (loss sums, token counts: exact below 2^53) over the ranks, in place.
    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()>;
    /// Replaces `data` on every rank by `root`'s.
    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Tells the others this rank failed (`reason`), so they stop with an error naming it instead of waiting.
    fn abort(&self, reason: &str);
    /// This rank's run ended well: let the others know, so that its going away is not taken for a death.
    fn finish(&self) {}

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// World size 1: nothing to exchange.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [&mut Tensor]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_scalars(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut Vec<u8>, _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _: &str) {}
}

// ---------------------------------------------------------------------------------------------------------
// Ranks as threads.

/// One rank's contribution to a round.
#[derive(Debug)]
pub(super) enum Payload {
    F32(Vec<(Vec<usize>, Vec<f32>)>),
    F64(Vec<f64>),
    Bytes(Option<Vec<u8>>),
    Nothing,
}

impl Payload {
    pub(super) fn op(&self) -> &'static str {
        match self {
            Payload::F32(_) => "all_reduce_sum",
            Payload::F64(_) => "all_reduce_sum_scalars",
            Payload::Bytes(_) => "broadcast",
            Payload::Nothing => "barrier",
        }
    }
}

/// The first failure of the group: which rank, and why.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) rank: usize,
    pub(super) reason: String,
}

impl Failure {
    /// The run's error: `rank K of N failed: why`.
    pub(super) fn error(&self, world: usize) -> anyhow::Error {
        anyhow!("rank {} of {world} failed: {}", self.rank, self.reason)
    }

    /// The error of rank `me`, whose call `op` this failure stopped.
    pub(super) fn stopped(&self, me: usize, world: usize, op: &str) -> anyhow::Error {
        if self.rank == me {
            return self.error(world);
        }
        anyhow!("rank {me} of {world}: {op} stopped because rank {} failed: {}", self.rank, self.reason)
    }
}

struct Group {
    /// The round being collected (0-based count of the collective calls so far).
    round: u64,
    arrived: Vec<Option<Payload>>,
    /// The outcome of the last completed round, with its number.
    done: Option<(u64, Arc<Payload>)>,
    failed: Option<Failure>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    group: Mutex<Group>,
    changed: Condvar,
}

/// A group of ranks in one process; [`Threads::ranks`] gives each thread its handle.
pub struct Threads {
    shared: Arc<Shared>,
}

/// One thread's handle on a [`Threads`] group.
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
    /// The round this rank's next call joins.
    round: Cell<u64>,
}

impl Threads {
    pub fn new(world: usize, timeout: Duration) -> Threads {
        let world = world.max(1);
        let group = Group { round: 0, arrived: (0..world).map(|_| None).collect(), done: None, failed: None };
        Threads { shared: Arc::new(Shared { world, timeout, group: Mutex::new(group), changed: Condvar::new() }) }
    }

    /// One handle per rank, rank 0 first.
    pub fn ranks(&self) -> Vec<ThreadRank> {
        (0..self.shared.world).map(|rank| ThreadRank { rank, shared: self.shared.clone(), round: Cell::new(0) }).collect()
    }

    /// The first failure, as an error naming the rank.
    fn failure(&self) -> Option<anyhow::Error> {
        let g = self.shared.group.lock().unwrap_or_else(|p| p.into_inner());
        g.failed.as_ref().map(|f| f.error(self.shared.world))
    }
}

/// Runs `body` on `world` ranks, one thread each, and returns each rank's result (rank 0 first). When a
/// rank fails (error or panic), the others stop at their next collective call, and the error names the
/// rank that failed first.
pub fn run_threads<T: Send>(world: usize, timeout: Duration, body: impl Fn(&ThreadRank) -> Result<T> + Sync) -> Result<Vec<T>> {
    let group = Threads::new(world, timeout);
    let results: Vec<Option<Result<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .ranks()
            .into_iter()
            .map(|rank| {
                let body = &body;
                scope.spawn(move || {
                    let guard = AbortOnPanic(&rank);
                    let out = body(&rank);
                    if let Err(e) = &out {
                        rank.abort(&format!("{e:#}"));
                    }
                    drop(guard);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    });
    if let Some(e) = group.failure() {
        return Err(e);
    }
    results.into_iter().enumerate().map(|(rank, r)| r.unwrap_or_else(|| Err(anyhow!("rank {rank} panicked")))).collect()
}

/// Reports a panicking rank to the others (a panic skips the error path).
struct AbortOnPanic<'a>(&'a ThreadRank);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort("panicked");
        }
    }
}

impl ThreadRank {
    /// Adds this rank's payload to the current round, waits for the others, and returns the round's outcome.
    fn exchange(&self, payload: Payload) -> Result<Arc<Payload>> {
        let op = payload.op();
        let s = &*self.shared;
        let mine = self.round.get();
        let mut g = s.group.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &g.failed {
            return Err(self.stopped(op, f));
        }
        debug_assert_eq!(g.round, mine, "a rank joins only the round being collected");
        g.arrived[self.rank] = Some(payload);
        if g.arrived.iter().all(Option::is_some) {
            let arrived: Vec<Payload> = g.arrived.iter_mut().map(|p| p.take().expect("all arrived")).collect();
            match combine(arrived) {
                Ok(out) => g.done = Some((mine, Arc::new(out))),
                Err(e) => g.failed = Some(Failure { rank: self.rank, reason: format!("{op}: {e:#}") }),
            }
            g.round += 1;
            s.changed.notify_all();
        }
        let deadline = Instant::now() + s.timeout;
        loop {
            // The round's outcome first: a rank that failed after this round completed (in its next step) must
            // not cut this one short, so that rank 0 finishes the step it is in (and writes its checkpoint).
            if let Some((round, out)) = &g.done {
                if *round == mine {
                    self.round.set(mine + 1);
                    return Ok(out.clone());
                }
            }
            if let Some(f) = &g.failed {
                return Err(self.stopped(op, f));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> = (0..s.world).filter(|&r| g.arrived[r].is_none()).collect();
                let names = missing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
                let reason = format!("did not reach {op} (collective call {mine}) within {:?}: hung or dead", s.timeout);
                g.failed = Some(Failure { rank: missing.first().copied().unwrap_or(self.rank), reason: reason.clone() });
                s.changed.notify_all();
                bail!("rank {} of {}: timed out waiting for rank(s) {names}, which {reason}", self.rank, s.world);
            }
            g = s.changed.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn stopped(&self, op: &str, f: &Failure) -> anyhow::Error {
        f.stopped(self.rank, self.shared.world, op)
    }
}

/// A round's outcome from every rank's payload, summing in rank order.
pub(super) fn combine(arrived: Vec<Payload>) -> Result<Payload> {
    let first = arrived[0].op();
    if let Some((rank, p)) = arrived.iter().enumerate().find(|(_, p)| p.op() != first) {
        bail!("ranks disagree on the call: rank 0 made {first}, rank {rank} {} (a bug: every rank must make the same calls)", p.op());
    }
    let mut it = arrived.into_iter().enumerate();
    let (_, mut acc) = it.next().expect("world >= 1");
    for (rank, p) in it {
        match (&mut acc, p) {
            (Payload::F32(sum), Payload::F32(x)) => {
                if sum.len() != x.len() || sum.iter().zip(&x).any(|(a, b)| a.0 != b.0) {
                    bail!("rank {rank} gave tensors of other shapes than rank 0");
                }
                for ((_, s), (_, v)) in sum.iter_mut().zip(x) {
                    s.iter_mut().zip(v).for_each(|(s, v)| *s += v);
                }
            }
            (Payload::F64(sum), Payload::F64(x)) => {
                if sum.len() != x.len() {
                    bail!("rank {rank} gave {} scalars, rank 0 {}", x.len(), sum.len());
                }
                sum.iter_mut().zip(x).for_each(|(s, v)| *s += v);
            }
            (Payload::Bytes(root), Payload::Bytes(x)) => {
                if let Some(x) = x {
                    if root.is_some() {
                        bail!("two ranks (0 and {rank}) claim to be the root of one broadcast");
                    }
                    *root = Some(x);
                }
            }
            _ => {}
        }
    }
    if let Payload::Bytes(None) = acc {
        bail!("no rank gave the data of the broadcast (the root's index is out of range?)");
    }
    Ok(acc)
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, tensors: &mut [&mut Tensor]) -> Result<()> {
        all_reduce_by_rounds(self.rank, tensors, |p| self.exchange(p))
    }

    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        all_reduce_scalars_by_rounds(values, |p| self.exchange(p))
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        broadcast_by_rounds(self.rank, data, root, |p| self.exchange(p))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Payload::Nothing).map(|_| ())
    }

    fn abort(&self, reason: &str) {
        let mut g = self.shared.group.lock().unwrap_or_else(|p| p.into_inner());
        if g.failed.is_none() {
            g.failed = Some(Failure { rank: self.rank, reason: reason.to_string() });
        }
        self.shared.changed.notify_all();
    }
}

// The collective calls as rounds of payloads (`exchange`: this rank's part in, the round's outcome out), for
// the ranks that sum with [`combine`]: threads and TCP processes.

pub(super) fn all_reduce_by_rounds(
    rank: usize,
    tensors: &mut [&mut Tensor],
    exchange: impl FnOnce(Payload) -> Result<Arc<Payload>>,
) -> Result<()> {
    let mut mine = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if t.dtype() != DType::F32 {
            bail!("rank {rank}: all_reduce_sum takes f32 tensors; tensor {i} is {:?}", t.dtype());
        }
        mine.push((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
    }
    let out = exchange(Payload::F32(mine))?;
    let Payload::F32(sums) = &*out else { bail!("rank {rank}: all_reduce_sum got the outcome of another call") };
    for (t, (dims, sum)) in tensors.iter_mut().zip(sums) {
        **t = Tensor::from_slice(sum, dims.as_slice(), t.device())?;
    }
    Ok(())
}

pub(super) fn all_reduce_scalars_by_rounds(values: &mut [f64], exchange: impl FnOnce(Payload) -> Result<Arc<Payload>>) -> Result<()> {
    let out = exchange(Payload::F64(values.to_vec()))?;
    match &*out {
        Payload::F64(sums) if sums.len() == values.len() => values.copy_from_slice(sums),
        _ => bail!("all_reduce_sum_scalars of {} values got the outcome of another call", values.len()),
    }
    Ok(())
}

pub(super) fn broadcast_by_rounds(
    rank: usize,
    data: &mut Vec<u8>,
    root: usize,
    exchange: impl FnOnce(Payload) -> Result<Arc<Payload>>,
) -> Result<()> {
    let mine = (rank == root).then(|| std::mem::take(data));
    let out = exchange(Payload::Bytes(mine))?;
    let Payload::Bytes(Some(bytes)) = &*out else { bail!("rank {rank}: broadcast got the outcome of another call") };
    data.clone_from(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        // Values whose f32 sum depends on the order: 1e8 + 1 - 1e8 is 0 left to right, 1 otherwise.
        let vals = [1e8f32, 1.0, -1e8];
        let out = run_threads(3, Duration::from_secs(10), |c| {
            let mut t = Tensor::from_slice(&[vals[c.rank()], 2.0], (1, 2), &Device::Cpu)?;
            c.all_reduce_sum(&mut [&mut t])?;
            let mut s = [c.rank() as f64, 1.0];
            c.all_reduce_sum_scalars(&mut s)?;
            Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?, s))
        })
        .unwrap();
        for (dims, t, s) in &out {
            assert_eq!(dims, &vec![1, 2]);
            assert_eq!(t, &vec![(1e8f32 + 1.0) - 1e8, 6.0]);
            assert_eq!(s, &[3.0, 3.0]);
        }
    }

    #[test]
    fn broadcast_and_barrier_reach_every_rank_and_rounds_do_not_mix() {
        let out = run_threads(4, Duration::from_secs(10), |c| {
            let mut got = Vec::new();
            for round in 0..20u8 {
                let mut data = if c.rank() == 2 { vec![round; round as usize] } else { vec![9] };
                c.broadcast(&mut data, 2)?;
                got.push(data);
                c.barrier()?;
            }
            Ok(got)
        })
        .unwrap();
        for got in out {
            assert_eq!(got, (0..20u8).map(|r| vec![r; r as usize]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_failing_rank_stops_the_others_with_an_error_naming_it() {
        let t0 = Instant::now();
        let err = run_threads(3, Duration::from_secs(60), |c| {
            for step in 0..5 {
                if c.rank() == 1 && step == 2 {
                    bail!("out of memory at step {step}");
                }
                c.barrier()?;
            }
            Ok(())
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("rank 1 of 3 failed") && msg.contains("out of memory at step 2"), "{msg}");
        assert!(t0.elapsed() < Duration::from_secs(10), "the others stop at once, not at the timeout");
    }

    #[test]
    fn a_panicking_rank_is_named_too() {
        let err = run_threads(2, Duration::from_secs(60), |c| {
            if c.rank() == 0 {
                panic!("boom");
            }
            c.barrier()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("rank 0 of 2 failed: panicked"), "{err:#}");
    }

    #[test]
    fn a_rank_that_never_arrives_is_named_after_the_timeout() {
        let err = run_threads(3, Duration::from_millis(300), |c| {
            if c.rank() == 2 {
                std::thread::sleep(Duration::from_millis(1500)); // hung, from the others' view
                return Ok(());
            }
            c.barrier()
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("rank 2 of 3 failed") && msg.contains("did not reach barrier"), "{msg}");
    }

    #[test]
    fn mismatched_calls_are_an_error_not_a_hang() {
        let err = run_threads(2, Duration::from_secs(60), |c| if c.rank() == 0 { c.barrier() } else { c.all_reduce_sum_scalars(&mut [1.0]) })
            .unwrap_err();
        assert!(format!("{err:#}").contains("ranks disagree on the call"), "{err:#}");
    }
}
