//! Ranks as processes: where this process sits ([`LaunchEnv`], the launcher's environment, as torchrun sets
//! it) and starting the ranks of one host ([`spawn_ranks`], `lorahost run --gpus N` / `--procs N`).
//!
//! The spawner is a small launcher: it starts N copies of this binary with the environment a launcher
//! would set, and each joins the run as that rank, exactly as under torchrun. The parent only waits: when a
//! rank exits with a failure, the others learn of it through the group (they stop with an error naming
//! it, rank 0 after finishing the step it is in), and whatever has not ended after a grace period is killed.
use super::dist::Collective;
use super::tcp::TcpRank;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long the other ranks get to stop on their own after one failed, before they are killed.
const GRACE: Duration = Duration::from_secs(20);

/// Where this process sits in a multi-process run, as torchrun (and most launchers) set it: `RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK` (the GPU on this host), `MASTER_ADDR`, `MASTER_PORT` (rank 0's rendezvous).
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, the rendezvous; may be None for a world of one (then no group is made).
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
        let master = match get("MASTER_ADDR") {
            Some(addr) => {
                let port = num("MASTER_PORT", None)?;
                if port == 0 || port > 65535 {
                    bail!("environment variable MASTER_PORT={port} is not a TCP port (1-65535)");
                }
                // torchrun's agent keeps its own store on MASTER_PORT (and says so); lorahost's rendezvous
                // then takes the next port, the same on every rank.
                let port = if get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")) { port + 1 } else { port };
                if port > 65535 {
                    bail!("MASTER_PORT=65535 under torchrun: lorahost's rendezvous needs MASTER_PORT + 1; choose a lower port");
                }
                Some(format!("{addr}:{port}"))
            }
            None if world_size > 1 => bail!("WORLD_SIZE > 1 needs MASTER_ADDR (rank 0's host, for the rendezvous)"),
            None => None,
        };
        Ok(Some(LaunchEnv { rank, world_size, local_rank, master }))
    }
}

/// Joins the group `env` describes, whose rendezvous is `master`: over TCP when `device` is "cpu", else over
/// NCCL on `device` (this process's GPU, `cuda:LOCAL_RANK`). Whatever fails after the rendezvous is told to
/// the group, so the other ranks stop too instead of waiting.
pub fn join(env: &LaunchEnv, master: &str, device: &str, timeout: Duration) -> Result<Box<dyn Collective>> {
    let tcp = TcpRank::connect(env.rank, env.world_size, master, timeout)?;
    if device == "cpu" {
        return Ok(Box::new(tcp));
    }
    gpu_group(tcp, device, timeout)
}

#[cfg(feature = "cuda")]
fn gpu_group(tcp: TcpRank, device: &str, timeout: Duration) -> Result<Box<dyn Collective>> {
    let dev = match crate::model::device::open(device) {
        Ok(candle_core::Device::Cuda(dev)) => dev,
        Ok(_) => bail!("`{device}` is not a GPU"),
        Err(e) => {
            tcp.abort(&format!("rank {} cannot open {device}: {e:#}", tcp.rank()));
            return Err(e.context(format!("opening {device}")));
        }
    };
    Ok(Box::new(super::nccl::NcclRank::connect(tcp, &dev, timeout)?))
}

#[cfg(not(feature = "cuda"))]
fn gpu_group(tcp: TcpRank, device: &str, _: Duration) -> Result<Box<dyn Collective>> {
    let reason = format!(
        "`{device}` on several processes needs NCCL, and this lorahost was built without CUDA (build with \
         `--features cuda`, or use the CPU)"
    );
    tcp.abort(&reason);
    bail!(reason)
}

/// A rank's run failed with `e`: tells the group, and names this rank in its own failure (the group's
/// errors name their rank already), as the ranks' messages interleave on one terminal.
pub fn failed(comm: &dyn Collective, e: anyhow::Error) -> anyhow::Error {
    comm.abort(&format!("{e:#}"));
    let me = format!("rank {} of {}", comm.rank(), comm.world_size());
    if format!("{e}").starts_with(&me) {
        e
    } else {
        e.context(format!("{me} failed"))
    }
}

/// Starts `world` ranks of this binary on this host, each with `args` (its command line) and the
/// launcher's environment (`RANK`, `LOCAL_RANK` = `RANK`, `WORLD_SIZE`, `MASTER_ADDR` = this host, a free
/// `MASTER_PORT`), their output going to this process's. Ok when every rank exits well; when one does not,
/// an error naming it and how it ended (the others stopped).
pub fn spawn_ranks(world: usize, args: &[OsString]) -> Result<()> {
    let exe = std::env::current_exe().context("finding this binary to start the ranks")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("finding a free port for the ranks")?.port();
    let mut ranks: Vec<Child> = Vec::with_capacity(world);
    for rank in 0..world {
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => ranks.push(c),
            Err(e) => {
                end_all(&mut ranks, Duration::ZERO);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    let mut exited: Vec<Option<ExitStatus>> = vec![None; world];
    loop {
        for (rank, child) in ranks.iter_mut().enumerate() {
            if exited[rank].is_some() {
                continue;
            }
            exited[rank] = child.try_wait()?;
        }
        // Of the ranks that failed since the last look, one killed by a signal first: the others' failures are
        // mostly their reaction to it.
        let failed = exited.iter().enumerate().filter_map(|(r, s)| s.filter(|s| !s.success()).map(|s| (r, s)));
        if let Some((rank, status)) = failed.min_by_key(|(r, s)| (s.code().is_some(), *r)) {
            end_all(&mut ranks, GRACE);
            bail!(
                "rank {rank} of {world} exited with {status} (the other ranks were stopped; run the same command again to \
                 resume from the last checkpoint)"
            );
        }
        if exited.iter().all(Option::is_some) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `grace` for the ranks to end on their own, then kills the rest.
fn end_all(ranks: &mut [Child], grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ranks.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in ranks.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launcher_environment_is_read_and_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(LaunchEnv::parse(env(&[])).unwrap(), None);
        let one = LaunchEnv::parse(env(&[("WORLD_SIZE", "1")])).unwrap().unwrap();
        assert_eq!((one.rank, one.world_size, one.local_rank), (0, 1, 0));
        let two = LaunchEnv::parse(env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h0"), ("MASTER_PORT", "29500")]))
            .unwrap()
            .unwrap();
        assert_eq!(two, LaunchEnv { rank: 1, world_size: 2, local_rank: 1, master: Some("h0:29500".into()) });
        // Under torchrun, whose agent holds MASTER_PORT, the rendezvous takes the next port.
        let torchrun = &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h0"), ("MASTER_PORT", "29500"), ("TORCHELASTIC_USE_AGENT_STORE", "True")];
        assert_eq!(LaunchEnv::parse(env(torchrun)).unwrap().unwrap().master.as_deref(), Some("h0:29501"));
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
