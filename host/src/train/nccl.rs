//! Ranks on several GPUs: [`NcclRank`], a [`Collective`] whose gradient all-reduce runs on NCCL, one
//! process per GPU (`lorahost run --gpus N`, or a launcher such as torchrun).
//!
//! The adapter gradients are summed in f32 by one `ncclAllReduce` over a flat buffer on the training stream
//! (a 14B model's r8 LoRA gradients are ~30 MB: one bucket after the backward). Everything small goes over
//! the ranks' TCP group ([`TcpRank`], rank 0 the hub): the NCCL unique id (rank 0 makes it, a broadcast),
//! the loss and token sums (so they are exact and in rank order), the start's broadcasts and the barrier.
//! NCCL sums in the order of its algorithm (ring, tree), not rank order: runs agree with one GPU within f32
//! rounding, not bit for bit.
//!
//! Never a hang: the TCP group learns at once of a rank that failed or died (its connection closes); while a
//! GPU collective runs, this rank polls the stream, `ncclCommGetAsyncError` and the group's failure, and on
//! any of them, or after the timeout, calls `ncclCommAbort` and stops with an error naming the rank.
//!
//! libnccl is opened at run time (`libnccl.so.2` on the library path; PyTorch's `nvidia-nccl` wheel has
//! it), not linked: a CUDA build runs on one GPU without NCCL installed. candle links cudarc's libraries at
//! build time (its `dynamic-linking`), so cudarc's own `nccl` module would make every CUDA binary need
//! libnccl to start; the few entry points used here are declared below instead.
use super::dist::Collective;
use super::tcp::TcpRank;
use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys as cu, DevicePtr};
use candle_core::{CudaDevice, DType, Storage, Tensor};
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `ncclUniqueId`: the rendezvous token rank 0 makes and every rank passes to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
/// `ncclSuccess` and `ncclInProgress` (an async operation still running) of `ncclResult_t`.
const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
/// `ncclFloat32` of `ncclDataType_t`; `ncclSum` of `ncclRedOp_t`.
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

/// The NCCL entry points used, from the library opened at run time.
struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, cu::CUstream) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    /// Keeps the functions above loaded.
    _lib: libloading::Library,
}

/// Opens libnccl once per process.
fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| load().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

fn load() -> Result<Api> {
    // SAFETY: loading NCCL runs its initialisers, which expect nothing of the caller.
    let lib = ["libnccl.so.2", "libnccl.so"].iter().find_map(|n| unsafe { libloading::Library::new(n) }.ok()).context(
        "cannot open libnccl.so.2 (NCCL), needed for several GPUs: install it (`pip install nvidia-nccl-cu13`, or it comes \
         with PyTorch) and put its lib folder (site-packages/nvidia/nccl/lib) on LD_LIBRARY_PATH",
    )?;
    // SAFETY: each symbol has the C signature of NCCL's nccl.h (stable since NCCL 2.0; the config-free calls).
    unsafe {
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes()).with_context(|| format!("libnccl has no {}", $name))?
            };
        }
        Ok(Api {
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            all_reduce: sym!("ncclAllReduce"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            comm_abort: sym!("ncclCommAbort"),
            comm_destroy: sym!("ncclCommDestroy"),
            get_error_string: sym!("ncclGetErrorString"),
            get_version: sym!("ncclGetVersion"),
            _lib: lib,
        })
    }
}

impl Api {
    fn check(&self, what: &str, r: c_int) -> Result<()> {
        if r == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(r)) }.to_string_lossy();
        bail!("NCCL {what}: {text} (error {r}; NCCL_DEBUG=WARN says more)")
    }

    /// The library's version, as "2.21.5".
    fn version(&self) -> String {
        let mut v = 0;
        // SAFETY: writes one int.
        unsafe { (self.get_version)(&mut v) };
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    }
}

/// One process's rank: its GPU's NCCL communicator and the ranks' TCP group.
pub struct NcclRank {
    tcp: TcpRank,
    comm: Comm,
    dev: CudaDevice,
    api: &'static Api,
    timeout: Duration,
    /// The communicator was aborted (it must not be used, or destroyed, again).
    aborted: Cell<bool>,
}

impl NcclRank {
    /// Makes this rank's communicator on `dev` (rank 0's unique id sent over `tcp`). On an error the
    /// group is told, so the other ranks stop too.
    pub fn connect(tcp: TcpRank, dev: &CudaDevice, timeout: Duration) -> Result<NcclRank> {
        match init(&tcp, dev, timeout) {
            Ok((api, comm)) => Ok(NcclRank { tcp, comm, dev: dev.clone(), api, timeout, aborted: Cell::new(false) }),
            Err(e) => {
                tcp.abort(&format!("{e:#}"));
                Err(e)
            }
        }
    }

    fn abort_comm(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: the communicator is live (not aborted or destroyed before).
            unsafe { (self.api.comm_abort)(self.comm) };
        }
    }

    /// Waits for this rank's stream (the all-reduce just enqueued and the work before it), polling so that a
    /// failed peer, an NCCL error or the timeout ends the wait with an error instead of a hang.
    fn wait(&self, op: &str) -> Result<()> {
        let stream = self.dev.cuda_stream();
        let deadline = Instant::now() + self.timeout;
        let rank = self.tcp.rank();
        let world = self.tcp.world_size();
        let mut nap = Duration::from_micros(20);
        loop {
            // SAFETY: the stream is the device's, alive for the call.
            match unsafe { cu::cuStreamQuery(stream.cu_stream()) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => {
                    self.abort_comm();
                    bail!("rank {rank} of {world}: {op}: CUDA error {e:?} while waiting for the GPU");
                }
            }
            let mut async_err = NCCL_SUCCESS;
            // SAFETY: the communicator is live; writes one int.
            unsafe { (self.api.comm_get_async_error)(self.comm, &mut async_err) };
            if async_err != NCCL_SUCCESS && async_err != NCCL_IN_PROGRESS {
                self.abort_comm();
                return self.api.check(&format!("rank {rank} of {world}: {op}"), async_err);
            }
            if let Some(e) = self.tcp.failure() {
                self.abort_comm();
                return Err(e.context(format!("rank {rank} of {world}: {op} stopped")));
            }
            if Instant::now() >= deadline {
                self.abort_comm();
                bail!(
                    "rank {rank} of {world}: {op} did not finish within {:?} (another rank hung, or the GPU did)",
                    self.timeout
                );
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }
}

/// The NCCL library, then rank 0's unique id to every rank, then the communicator (made on a helper
/// thread: `ncclCommInitRank` waits for every rank, and a rank that died meanwhile must not hang this one).
fn init(tcp: &TcpRank, dev: &CudaDevice, timeout: Duration) -> Result<(&'static Api, Comm)> {
    let (rank, world) = (tcp.rank(), tcp.world_size());
    // Connections at init (within the deadline below), not lazily inside the first all-reduce; set before
    // NCCL's first call, which may read its settings once.
    if std::env::var_os("NCCL_RUNTIME_CONNECT").is_none() {
        std::env::set_var("NCCL_RUNTIME_CONNECT", "0");
    }
    let api = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    let mut bytes = Vec::new();
    if rank == 0 {
        // SAFETY: writes the 128-byte id.
        api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
        bytes = id.internal.iter().map(|&c| c as u8).collect();
    }
    tcp.broadcast(&mut bytes, 0)?;
    if bytes.len() != 128 {
        bail!("rank {rank}: rank 0 sent an NCCL unique id of {} bytes, not 128", bytes.len());
    }
    bytes.iter().zip(id.internal.iter_mut()).for_each(|(b, c)| *c = *b as c_char);
    let ctx = dev.cuda_stream().context().clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name(format!("nccl init rank {rank}")).spawn(move || {
        let out = ctx.bind_to_thread().map_err(anyhow::Error::from).and_then(|()| {
            let mut comm: Comm = std::ptr::null_mut();
            // SAFETY: comm receives the new communicator; id is rank 0's; this thread's CUDA context is the GPU's.
            api.check("ncclCommInitRank", unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) })?;
            Ok(comm as usize)
        });
        let _ = tx.send(out.map_err(|e| format!("{e:#}")));
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(comm)) => {
                if rank == 0 {
                    eprintln!("NCCL {}: {world} ranks", api.version());
                }
                return Ok((api, comm as Comm));
            }
            Ok(Err(e)) => bail!("rank {rank} of {world}: {e}"),
            Err(_) => {
                if let Some(e) = tcp.failure() {
                    return Err(e.context(format!("rank {rank} of {world}: making the NCCL communicator")));
                }
                if Instant::now() >= deadline {
                    bail!("rank {rank} of {world}: the NCCL communicator was not made within {timeout:?} (a rank hung?)");
                }
            }
        }
    }
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    /// One `ncclAllReduce` (sum, f32, in place) over the tensors laid end to end in one buffer.
    fn all_reduce_sum(&self, tensors: &mut [&mut Tensor]) -> Result<()> {
        let (rank, world) = (self.rank(), self.world_size());
        if let Some(e) = self.tcp.failure() {
            return Err(e.context(format!("rank {rank} of {world}: all_reduce_sum stopped")));
        }
        if self.aborted.get() {
            bail!("rank {rank} of {world}: the NCCL communicator was aborted");
        }
        let mut parts = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if t.dtype() != DType::F32 || !t.device().is_cuda() {
                bail!("rank {rank}: all_reduce_sum takes f32 tensors on the GPU; tensor {i} is {:?} on {:?}", t.dtype(), t.device());
            }
            parts.push(t.flatten_all()?);
        }
        if parts.is_empty() {
            return Ok(());
        }
        // A buffer of its own (one tensor's flat view would share its storage).
        let flat = if parts.len() == 1 { parts[0].copy()? } else { Tensor::cat(&parts, 0)? };
        let n = flat.elem_count();
        {
            let stream = self.dev.cuda_stream();
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else { bail!("rank {rank}: the gradient buffer is not on the GPU") };
            let (ptr, guard) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
            let ptr = (ptr + (layout.start_offset() * 4) as u64) as *mut c_void;
            // SAFETY: ptr covers n f32 on this device, written in place on the training stream, which orders it
            // after the backward that filled it and before the optimizer that reads it.
            let r = unsafe { (self.api.all_reduce)(ptr, ptr, n, NCCL_FLOAT32, NCCL_SUM, self.comm, stream.cu_stream()) };
            drop(guard);
            if r != NCCL_SUCCESS {
                self.abort_comm();
                self.api.check(&format!("rank {rank} of {world}: ncclAllReduce of {n} floats"), r)?;
            }
        }
        self.wait("all_reduce_sum")?;
        let mut offset = 0;
        for t in tensors.iter_mut() {
            let len = t.elem_count();
            **t = flat.narrow(0, offset, len)?.reshape(t.dims())?;
            offset += len;
        }
        Ok(())
    }

    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        self.tcp.all_reduce_sum_scalars(values)
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        self.tcp.broadcast(data, root)
    }

    fn barrier(&self) -> Result<()> {
        self.tcp.barrier()
    }

    fn abort(&self, reason: &str) {
        self.tcp.abort(reason);
        self.abort_comm();
    }

    fn finish(&self) {
        self.tcp.finish();
    }
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        if !self.aborted.get() {
            // SAFETY: the communicator is live and no call on it is in flight (every call waited).
            unsafe { (self.api.comm_destroy)(self.comm) };
        }
    }
}
