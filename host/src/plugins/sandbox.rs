//! What a plugin may touch, and the limits on each call.
//!
//! Each plugin instance gets its own [`Store`] holding a WASI context that starts from nothing: no network
//! (the socket interfaces are not even linked, so a component that imports them fails to instantiate), no
//! environment, no arguments, stdin closed, stdout discarded, stderr kept (its tail explains panics), a
//! fixed wall clock, a monotonic clock that only counts its own reads, randomness derived from the run seed,
//! and read-only access to the directories the manifest grants. Each call runs under a wall-clock deadline
//! (epoch interruption), an optional fuel budget, and a memory cap.
use super::error::Failure;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView as _};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock, WasiClocks, WasiClocksView as _};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView as _};
use wasmtime_wasi::p2::bindings::sync as wasi_sync;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

/// How often the engine's epoch advances: the resolution of per-call timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits on one plugin instance. Every field has a default; manifests override them per plugin.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock limit for one call, in milliseconds.
    pub timeout_ms: u64,
    /// Instruction budget for one call (deterministic, unlike the timeout); none by default.
    pub fuel: Option<u64>,
    /// Cap on the plugin's linear memory, in MiB.
    pub memory_mb: u64,
    /// The most one call's reply may copy out of the sandbox into the host, in MiB (wasmtime's
    /// "hostcall fuel"); the host sizes its requests to stay far below it.
    pub reply_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { timeout_ms: 60_000, fuel: None, memory_mb: 1024, reply_mb: 256 }
    }
}

/// The host's ceiling on `memory_mb` and `reply_mb`: all a wasm32 plugin can address.
pub const MAX_MEMORY_MB: u64 = 4096;

impl Limits {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb.saturating_mul(1 << 20)
    }
    pub fn reply_bytes(&self) -> u64 {
        self.reply_mb.saturating_mul(1 << 20)
    }

    /// The field that is out of range and why, for the manifest's message.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, mb) in [("memory_mb", self.memory_mb), ("reply_mb", self.reply_mb)] {
            if mb == 0 || mb > MAX_MEMORY_MB {
                return Err((field, format!("{mb} is not in 1..={MAX_MEMORY_MB} MiB (a wasm32 plugin cannot address more)")));
            }
        }
        if self.timeout_ms == 0 {
            return Err(("timeout_ms", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Everything a plugin instance is allowed.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Directories the plugin may read (never write). Each appears inside the sandbox at its own absolute
    /// host path, so paths in the plugin's configuration mean the same thing on both sides.
    pub read_dirs: Vec<PathBuf>,
    /// Seeds the plugin's randomness (and so its hash maps): same seed, same behaviour.
    pub seed: u64,
    pub limits: Limits,
}

/// The store's data: WASI state plus the memory limiter.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
    pub(crate) stderr: StderrTail,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Refuses memory growth past the cap and remembers that it did, so the trap can be reported as such.
struct MemoryCap {
    cap: u64,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.cap {
            self.hit = true;
            // An error (rather than `Ok(false)`) traps at once instead of letting the guest's allocator
            // abort somewhere less clear.
            wasmtime::bail!("memory cap of {} bytes reached", self.cap);
        }
        Ok(true)
    }
    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Keeps the last few KiB a plugin wrote to stderr (a Rust panic message ends up there).
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

const STDERR_TAIL: usize = 4096;

impl StderrTail {
    pub(crate) fn text(&self) -> String {
        let buf = self.0.lock().unwrap();
        let (a, b) = buf.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only the WASIp2 stream is linked; this is never used.
        Box::new(tokio::io::sink())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        let mut buf = self.0.lock().unwrap();
        buf.extend(bytes.iter());
        let excess = buf.len().saturating_sub(STDERR_TAIL);
        buf.drain(..excess);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(1 << 16)
    }
}

/// A wall clock stopped at the Unix epoch: plugins must not depend on the date.
struct FixedWallClock;
impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A monotonic clock that advances one microsecond per read: deterministic, yet never stuck.
#[derive(Default)]
struct CountingClock(std::sync::atomic::AtomicU64);
impl HostMonotonicClock for CountingClock {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.0.fetch_add(1_000, std::sync::atomic::Ordering::Relaxed)
    }
}

/// `n` bytes drawn from the seed, for the guest's random streams.
fn seeded_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut out: Vec<u8> = (0..n.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
    out.truncate(n);
    out
}

/// Builds the store for one plugin instance.
pub fn new_store(engine: &wasmtime::Engine, grants: &Grants) -> anyhow::Result<Store<HostState>> {
    let mut wasi = WasiCtx::builder();
    let stderr = StderrTail::default();
    wasi.stderr(stderr.clone());
    wasi.wall_clock(FixedWallClock);
    wasi.monotonic_clock(CountingClock::default());
    // Random bytes cycle through 64 KiB drawn from the seed: plenty for hash-map keys and shuffles.
    wasi.secure_random(wasmtime_wasi::Deterministic::new(seeded_bytes(grants.seed, 1 << 16)));
    wasi.insecure_random(wasmtime_wasi::Deterministic::new(seeded_bytes(grants.seed ^ 0x5EED, 1 << 16)));
    wasi.insecure_random_seed(u128::from(grants.seed) << 64 | u128::from(grants.seed.rotate_left(17)));
    wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
    for dir in &grants.read_dirs {
        let dir = dir
            .canonicalize()
            .map_err(|e| anyhow::anyhow!("cannot grant {}: {e}", dir.display()))?;
        let guest = dir.to_str().ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", dir.display()))?;
        wasi.preopened_dir(&dir, guest, FsPerms::ReadOnly)?;
    }
    let state = HostState {
        wasi: wasi.build(),
        table: ResourceTable::new(),
        limiter: MemoryCap { cap: grants.limits.memory_bytes(), hit: false },
        stderr,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // Set deliberately rather than left at wasmtime's default (128 MiB): the cap on what one reply copies
    // into the host, so a plugin cannot make the host allocate without bound.
    store.set_hostcall_fuel(usize::try_from(grants.limits.reply_bytes()).unwrap_or(usize::MAX));
    store.epoch_deadline_trap();
    Ok(store)
}

struct HasTable;
impl HasData for HasTable {
    type Data<'a> = &'a mut ResourceTable;
}

/// The WASI interfaces a plugin may import: I/O streams, clocks, random, read-only files, and the CLI
/// basics Rust's standard library expects. Sockets and name lookup are deliberately absent.
pub fn add_wasi_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    use wasi_sync::{cli, clocks, filesystem, io, random};
    type T = HostState;
    let l = linker;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<T, HasTable>(l, |t| &mut t.table)?;
    io::poll::add_to_linker::<T, HasTable>(l, |t| &mut t.table)?;
    io::streams::add_to_linker::<T, HasTable>(l, |t| &mut t.table)?;
    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    clocks::monotonic_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    filesystem::types::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    filesystem::preopens::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    random::random::add_to_linker::<T, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure::add_to_linker::<T, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(l, |t| t.wasi.random())?;
    cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    Ok(())
}

/// Arms the per-call limits on `store` before a call into the guest.
pub fn arm(store: &mut Store<HostState>, limits: &Limits) {
    let ticks = limits.timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1);
    store.set_epoch_deadline(ticks);
    // Fuel is always metered (it is an engine-wide setting); without a budget it is effectively unbounded.
    let _ = store.set_fuel(limits.fuel.unwrap_or(u64::MAX));
}

/// Turns a wasmtime error from a call into the reason a person can act on.
pub fn classify(store: &mut Store<HostState>, limits: &Limits, err: &wasmtime::Error) -> Failure {
    if std::mem::take(&mut store.data_mut().limiter.hit) {
        return Failure::MemoryCap(limits.memory_bytes());
    }
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => Failure::Timeout(limits.timeout()),
        Some(wasmtime::Trap::OutOfFuel) => Failure::OutOfFuel(limits.fuel.unwrap_or(u64::MAX)),
        // wasmtime's error type for this is private; its message is stable.
        None if format!("{err:#}").contains("fuel allocated for hostcalls") => Failure::ReplyTooBig(limits.reply_bytes()),
        other => {
            let stderr = store.data().stderr.text();
            if let Some(at) = stderr.rfind("panicked at") {
                let msg = stderr[at..].trim().replace('\n', " ");
                return Failure::Panic(msg);
            }
            let what = match other {
                Some(trap) => trap.to_string(),
                None => format!("{err:#}"),
            };
            Failure::Trap(what)
        }
    }
}
