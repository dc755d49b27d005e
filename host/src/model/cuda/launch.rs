//! Loading the kernels (once per GPU) and launching them on candle's stream: arguments are tensors
//! (passed as device pointers) and scalars; outputs are allocated uninitialised, each kernel writing all of
//! its output.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Result, Shape, Storage, Tensor};
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lorahost_kernels.ptx"));

/// Threads per block of the row kernels and the elementwise kernels.
pub(super) const ROW_THREADS: u32 = 256;
pub(super) const EW_THREADS: u32 = 256;
/// Rows each thread of the LoRA-adding kernels walks (ROWS_PER_THREAD in kernels.cu).
pub(super) const ROWS_PER_THREAD: usize = 8;
/// Elements per thread of the elementwise kernels (EW_PER_THREAD in kernels.cu).
pub(super) const EW_PER_THREAD: usize = 8;

/// Whether every tensor starts on a 16-byte boundary: the 8-wide (bf16) and 4-wide (f32) loads and stores.
pub(super) fn aligned16(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.storage_and_layout().1.start_offset() * t.dtype().size_in_bytes() % 16 == 0)
}

/// [`aligned16`] as the `vec` argument of the elementwise kernels.
pub(super) fn vec_ok(ts: &[&Tensor]) -> Arg<'static> {
    Arg::I(aligned16(ts) as i32)
}

pub(super) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("fused kernel called with a tensor on {other:?}"),
    }
}

/// A new tensor of `shape` and `dtype` on `dev`, not initialised.
pub(super) fn uninit(dev: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: every caller launches a kernel that writes all n elements before the tensor is read.
    let storage = match dtype {
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<bf16>(n)? }, dev.clone()),
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone()),
        DType::U8 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<u8>(n)? }, dev.clone()),
        other => bail!("uninit: unsupported dtype {other:?}"),
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

/// One kernel argument.
pub(super) enum Arg<'a> {
    /// A contiguous tensor, passed as a device pointer to its first element.
    T(&'a Tensor),
    I(i32),
    F(f32),
    U(u64),
}

/// Launches `name` with a 1-D grid on the tensors' device (candle's stream, so it is ordered with every
/// candle op).
pub(super) fn launch(dev: &CudaDevice, name: &str, grid: u64, block: u32, args: &[Arg]) -> Result<()> {
    launch_2d(dev, name, (grid, 1), block, args)
}

/// [`launch`] with a 2-D grid (x, y).
pub(super) fn launch_2d(dev: &CudaDevice, name: &str, grid: (u64, u32), block: u32, args: &[Arg]) -> Result<()> {
    launch_smem(dev, name, grid, block, 0, args)
}

/// The kernels' module, loaded once per GPU, and each kernel function once (with its dynamic shared-memory
/// limit raised to what it asks for: the flash-attention kernels need more than the default 48 KiB).
pub(super) fn function(dev: &CudaDevice, name: &str, smem: u32) -> Result<CudaFunction> {
    type Cache = Mutex<HashMap<(usize, String), CudaFunction>>;
    static MODULES: OnceLock<Mutex<HashMap<usize, Arc<CudaModule>>>> = OnceLock::new();
    static FUNCTIONS: OnceLock<Cache> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let key = (ctx.ordinal(), name.to_string());
    let functions = FUNCTIONS.get_or_init(Default::default);
    if let Some(f) = functions.lock().expect("kernel cache").get(&key) {
        return Ok(f.clone());
    }
    let module = {
        let mut modules = MODULES.get_or_init(Default::default).lock().expect("module cache");
        match modules.get(&ctx.ordinal()) {
            Some(m) => m.clone(),
            None => {
                let m = ctx.load_module(PTX.into()).w()?;
                modules.insert(ctx.ordinal(), m.clone());
                m
            }
        }
    };
    let f = module.load_function(name).w()?;
    if smem > 48 * 1024 {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
    }
    functions.lock().expect("kernel cache").insert(key, f.clone());
    Ok(f)
}

/// [`launch_2d`] with `smem` bytes of dynamic shared memory.
pub(super) fn launch_smem(dev: &CudaDevice, name: &str, (grid, grid_y): (u64, u32), block: u32, smem: u32, args: &[Arg]) -> Result<()> {
    if grid == 0 || grid_y == 0 {
        return Ok(());
    }
    let grid = u32::try_from(grid).map_err(|_| candle_core::Error::Msg(format!("{name}: grid of {grid} blocks is too large")))?;
    let func = function(dev, name, smem)?;
    let stream = dev.cuda_stream();
    let locks: Vec<_> = args
        .iter()
        .filter_map(|a| match a {
            Arg::T(t) => Some(t.storage_and_layout()),
            _ => None,
        })
        .collect();
    let mut ptrs = Vec::with_capacity(locks.len());
    let mut guards = Vec::with_capacity(locks.len());
    for (storage, layout) in &locks {
        let Storage::Cuda(cs) = &**storage else { bail!("{name}: a tensor is not on the GPU") };
        if !layout.is_contiguous() {
            bail!("{name}: a tensor is not contiguous");
        }
        let (ptr, guard) = match &cs.slice {
            CudaStorageSlice::BF16(s) => s.device_ptr(&stream),
            CudaStorageSlice::F32(s) => s.device_ptr(&stream),
            CudaStorageSlice::F64(s) => s.device_ptr(&stream),
            CudaStorageSlice::U32(s) => s.device_ptr(&stream),
            CudaStorageSlice::I64(s) => s.device_ptr(&stream),
            CudaStorageSlice::U8(s) => s.device_ptr(&stream),
            _ => bail!("{name}: unsupported dtype {:?}", cs.dtype()),
        };
        ptrs.push(ptr + (layout.start_offset() * cs.dtype().size_in_bytes()) as u64);
        guards.push(guard);
    }
    let mut builder = stream.launch_builder(&func);
    let mut next_ptr = ptrs.iter();
    for a in args {
        match a {
            Arg::T(_) => builder.arg(next_ptr.next().expect("one pointer per tensor")),
            Arg::I(v) => builder.arg(v),
            Arg::F(v) => builder.arg(v),
            Arg::U(v) => builder.arg(v),
        };
    }
    let cfg = LaunchConfig { grid_dim: (grid, grid_y, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem };
    // SAFETY: the argument list matches the kernel's signature in kernels.cu, and every pointer stays
    // valid until the launch is enqueued (the storage locks and guards are held until then).
    unsafe { builder.launch(cfg) }.w()?;
    drop(guards);
    Ok(())
}

/// Blocks for n threads. The kernels decompose their thread index in 32 bits, so n (and the element count
/// it stands for) must stay below 2^32: larger inputs are refused with an error, not computed wrongly.
pub(super) fn blocks(n: usize, threads: u32) -> Result<u64> {
    if n >= u32::MAX as usize {
        bail!("a tensor too large for the fused kernels ({n} threads, at most 2^32): use smaller micro-batches");
    }
    Ok((n as u64).div_ceil(threads as u64))
}

pub(super) fn check_bf16(name: &str, ts: &[&Tensor]) -> Result<()> {
    for t in ts {
        if t.dtype() != DType::BF16 {
            bail!("{name}: expected bf16, got {:?}", t.dtype());
        }
    }
    Ok(())
}

/// `t` contiguous and starting on a 16-byte boundary (read with 16-byte loads: the rank-r rows, the RoPE tables).
pub(super) fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if aligned16(&[&t]) {
        Ok(t)
    } else {
        t.copy()
    }
}

/// Device pointer of a contiguous f32 or bf16 tensor's first element (for tables of pointers and cuBLAS).
pub(super) fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else { bail!("not a GPU tensor") };
    if !layout.is_contiguous() {
        bail!("not contiguous");
    }
    let stream = cs.device.cuda_stream();
    let (ptr, _guard) = match &cs.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(&stream),
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream),
        _ => bail!("unsupported dtype {:?}", cs.dtype()),
    };
    Ok(ptr + (layout.start_offset() * cs.dtype().size_in_bytes()) as u64)
}

/// A table of 64-bit words on the device (pointers and sizes for the multi-tensor kernels).
pub(super) fn table(dev: &CudaDevice, words: Vec<u64>) -> Result<Tensor> {
    let words: Vec<i64> = words.into_iter().map(|w| w as i64).collect();
    let n = words.len();
    Tensor::from_vec(words, n, &Device::Cuda(dev.clone()))
}

