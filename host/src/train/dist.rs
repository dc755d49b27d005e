//! The seam between the training loop and the ranks of a data-parallel run: [`Collective`].
//!
//! A rank is one copy of the trainer (its own model and adapter). The loop talks to the others only through
//! this trait: sum the adapter gradients and a few scalars, hand small data from one rank to all, wait for
//! all. Two implementations:
//! - [`Single`]: world size 1, every call a no-op (the ordinary run);
//! - [`Threads`]: ranks as threads of one process, an in-process all-reduce; `lorahost run --ranks N` on
//!   the CPU and the tests. Sums go in rank order, so a run is reproducible bit for bit.
//!
//! An NCCL implementation (one process per GPU, behind the `cuda` feature) slots in behind the same trait;
//! docs/multi-gpu.md lists what it needs. [`LaunchEnv`] reads the launcher's environment it will use.
//!
//! Failure: a rank that fails calls [`Collective::abort`] (the thread runner does it for every error and
//! panic), and every other rank's next or current collective call returns an error naming that rank. A
//! rank that neither arrives nor fails (a hang) is named by the others after the timeout.
use anyhow::{anyhow, bail, Context, Result};
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
enum Payload {
    F32(Vec<(Vec<usize>, Vec<f32>)>),
    F64(Vec<f64>),
    Bytes(Option<Vec<u8>>),
    Nothing,
}

impl Payload {
    fn op(&self) -> &'static str {
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
struct Failure {
    rank: usize,
    reason: String,
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
        g.failed.as_ref().map(|f| anyhow!("rank {} of {} failed: {}", f.rank, self.shared.world, f.reason))
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
            if let Some(f) = &g.failed {
                return Err(self.stopped(op, f));
            }
            if let Some((round, out)) = &g.done {
                if *round == mine {
                    self.round.set(mine + 1);
                    return Ok(out.clone());
                }
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
        if f.rank == self.rank {
            anyhow!("rank {} of {} failed: {}", f.rank, self.shared.world, f.reason)
        } else {
            anyhow!("rank {} of {}: {op} stopped because rank {} failed: {}", self.rank, self.shared.world, f.rank, f.reason)
        }
    }
}

/// A round's outcome from every rank's payload, summing in rank order.
fn combine(arrived: Vec<Payload>) -> Result<Payload> {
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
        let mut mine = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if t.dtype() != DType::F32 {
                bail!("rank {}: all_reduce_sum takes f32 tensors; tensor {i} is {:?}", self.rank, t.dtype());
            }
            mine.push((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
        }
        let out = self.exchange(Payload::F32(mine))?;
        let Payload::F32(sums) = &*out else { unreachable!("combine keeps the kind") };
        for (t, (dims, sum)) in tensors.iter_mut().zip(sums) {
            **t = Tensor::from_slice(sum, dims.as_slice(), t.device())?;
        }
        Ok(())
    }

    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        let out = self.exchange(Payload::F64(values.to_vec()))?;
        let Payload::F64(sums) = &*out else { unreachable!("combine keeps the kind") };
        values.copy_from_slice(sums);
        Ok(())
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        let mine = (self.rank == root).then(|| std::mem::take(data));
        let out = self.exchange(Payload::Bytes(mine))?;
        let Payload::Bytes(Some(bytes)) = &*out else { unreachable!("combine checks the root gave data") };
        data.clone_from(bytes);
        Ok(())
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

// ---------------------------------------------------------------------------------------------------------
// The launcher's environment.

/// Where this process sits in a multi-process run, as torchrun (and most launchers) set it: `RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK` (the GPU on this host), `MASTER_ADDR`, `MASTER_PORT` (rank 0's rendezvous).
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`; None for a world of one.
    pub master: Option<String>,
}

impl LaunchEnv {
    /// The launcher's settings from the process environment; None when `WORLD_SIZE` is unset.
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        Self::parse(|k| std::env::var(k).ok())
    }

    /// [`LaunchEnv::from_env`] over any lookup (for tests).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let Some(world) = get("WORLD_SIZE") else { return Ok(None) };
        let num = |key: &str, default: Option<usize>| -> Result<usize> {
            match get(key) {
                Some(v) => v.trim().parse::<usize>().with_context(|| format!("environment variable {key}={v:?} is not a whole number")),
                None => default.with_context(|| format!("WORLD_SIZE={world} is set but {key} is not (a launcher such as torchrun sets both)")),
            }
        };
        let world_size = num("WORLD_SIZE", None)?;
        if world_size == 0 {
            bail!("environment variable WORLD_SIZE=0: a run needs at least one rank");
        }
        let rank = num("RANK", (world_size == 1).then_some(0))?;
        if rank >= world_size {
            bail!("environment variable RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let master = if world_size > 1 {
            let addr = get("MASTER_ADDR").context("WORLD_SIZE > 1 needs MASTER_ADDR (rank 0's host, for the rendezvous)")?;
            let port = num("MASTER_PORT", None)?;
            if port == 0 || port > 65535 {
                bail!("environment variable MASTER_PORT={port} is not a TCP port (1-65535)");
            }
            Some(format!("{addr}:{port}"))
        } else {
            None
        };
        Ok(Some(LaunchEnv { rank, world_size, local_rank, master }))
    }

    /// An error unless this build can join the run this environment describes: a world of one runs as
    /// usual; more ranks need the NCCL transport, which this build does not have.
    pub fn check_supported(&self) -> Result<()> {
        if self.world_size > 1 {
            bail!(
                "the launcher asks for rank {} of WORLD_SIZE={} (rendezvous {}), but this lorahost build cannot join a \
                 multi-process run: the NCCL transport is not built yet (docs/multi-gpu.md). Run one process without \
                 WORLD_SIZE, or `lorahost run --ranks N` for N ranks as threads on the CPU",
                self.rank,
                self.world_size,
                self.master.as_deref().unwrap_or("?")
            );
        }
        Ok(())
    }
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

    #[test]
    fn the_launcher_environment_is_read_and_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(LaunchEnv::parse(env(&[])).unwrap(), None);
        let one = LaunchEnv::parse(env(&[("WORLD_SIZE", "1")])).unwrap().unwrap();
        assert_eq!((one.rank, one.world_size, one.local_rank), (0, 1, 0));
        one.check_supported().unwrap();
        let two = LaunchEnv::parse(env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h0"), ("MASTER_PORT", "29500")]))
            .unwrap()
            .unwrap();
        assert_eq!(two, LaunchEnv { rank: 1, world_size: 2, local_rank: 1, master: Some("h0:29500".into()) });
        let refused = format!("{:#}", two.check_supported().unwrap_err());
        assert!(refused.contains("WORLD_SIZE=2") && refused.contains("NCCL") && refused.contains("h0:29500"), "{refused}");
        for (pairs, needle) in [
            (&[("WORLD_SIZE", "two")][..], "WORLD_SIZE=\"two\""),
            (&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")][..], "RANK is not"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "RANK=2 is not below"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0")][..], "MASTER_ADDR"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")][..], "MASTER_PORT=70000"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = pairs;
            let err = format!("{:#}", LaunchEnv::parse(env(pairs)).unwrap_err());
            assert!(err.contains(needle), "{err} should contain {needle}");
        }
    }
}
