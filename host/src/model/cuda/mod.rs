//! The fused CUDA kernels of the bf16 training step (`kernels.cu`, compiled to PTX by build.rs) and the
//! glue that launches them on candle's stream. Each function is the GPU twin of a composite op of
//! ops.rs / attention.rs / loss.rs (which stay the CPU path and the reference); `lorahost bench kernels`
//! checks every pair against each other on the card.
//!
//! Outputs are allocated uninitialised (every kernel writes all of its output); inputs must be
//! contiguous bf16 unless stated otherwise.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as blas_sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Device, Result, Shape, Storage, Tensor};
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lorahost_kernels.ptx"));

/// Threads per block of the row kernels and the elementwise kernels.
const ROW_THREADS: u32 = 256;
const EW_THREADS: u32 = 256;
/// Rows each thread of the LoRA-adding kernels walks (ROWS_PER_THREAD in kernels.cu).
const ROWS_PER_THREAD: usize = 8;
/// Elements per thread of the elementwise kernels (EW_PER_THREAD in kernels.cu).
const EW_PER_THREAD: usize = 8;

/// Whether every tensor starts on a 16-byte boundary (the 8-wide loads of the elementwise kernels).
fn vec_ok(ts: &[&Tensor]) -> Arg<'static> {
    let ok = ts.iter().all(|t| t.storage_and_layout().1.start_offset() % 8 == 0);
    Arg::I(ok as i32)
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("fused kernel called with a tensor on {other:?}"),
    }
}

/// A new tensor of `shape` and `dtype` on `dev`, not initialised.
fn uninit(dev: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: every caller launches a kernel that writes all n elements before the tensor is read.
    let storage = match dtype {
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<bf16>(n)? }, dev.clone()),
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone()),
        other => bail!("uninit: unsupported dtype {other:?}"),
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

/// One kernel argument.
enum Arg<'a> {
    /// A contiguous tensor, passed as a device pointer to its first element.
    T(&'a Tensor),
    I(i32),
    F(f32),
    U(u64),
}

/// Launches `name` with a 1-D grid on the tensors' device (candle's stream, so it is ordered with every
/// candle op).
fn launch(dev: &CudaDevice, name: &str, grid: u64, block: u32, args: &[Arg]) -> Result<()> {
    launch_2d(dev, name, (grid, 1), block, args)
}

/// [`launch`] with a 2-D grid (x, y).
fn launch_2d(dev: &CudaDevice, name: &str, grid: (u64, u32), block: u32, args: &[Arg]) -> Result<()> {
    launch_smem(dev, name, grid, block, 0, args)
}

/// The kernels' module, loaded once per GPU, and each kernel function once (with its dynamic shared-memory
/// limit raised to what it asks for: the flash-attention kernels need more than the default 48 KiB).
fn function(dev: &CudaDevice, name: &str, smem: u32) -> Result<CudaFunction> {
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
fn launch_smem(dev: &CudaDevice, name: &str, (grid, grid_y): (u64, u32), block: u32, smem: u32, args: &[Arg]) -> Result<()> {
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
            CudaStorageSlice::U32(s) => s.device_ptr(&stream),
            CudaStorageSlice::I64(s) => s.device_ptr(&stream),
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
/// it stands for) must stay below 2^32; larger inputs panic here instead of computing garbage.
fn blocks(n: usize, threads: u32) -> u64 {
    assert!(n < u32::MAX as usize, "a fused kernel was asked for {n} threads (at most 2^32)");
    (n as u64).div_ceil(threads as u64)
}

fn check_bf16(name: &str, ts: &[&Tensor]) -> Result<()> {
    for t in ts {
        if t.dtype() != DType::BF16 {
            bail!("{name}: expected bf16, got {:?}", t.dtype());
        }
    }
    Ok(())
}

// ----- RMSNorm --------------------------------------------------------------------------------------------

/// y [N, C] and rstd [N, 1] (f32) for x [N, C], w [C].
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    check_bf16("rmsnorm", &[x, w])?;
    let (n, c) = x.dims2()?;
    let dev = cuda_device(x)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let y = uninit(&dev, (n, c), DType::BF16)?;
    let rstd = uninit(&dev, (n, 1), DType::F32)?;
    let args = [Arg::T(&x), Arg::T(&w), Arg::T(&y), Arg::T(&rstd), Arg::I(c as i32), Arg::F(eps as f32)];
    launch(&dev, "rmsnorm_fwd", n as u64, ROW_THREADS, &args)?;
    Ok((y, rstd))
}

/// dx (+ dres when given) for the saved x, rstd and the incoming dy.
pub fn rmsnorm_backward(x: &Tensor, rstd: &Tensor, w: &Tensor, dy: &Tensor, dres: Option<&Tensor>) -> Result<Tensor> {
    check_bf16("rmsnorm_backward", &[x, w, dy])?;
    let (n, c) = x.dims2()?;
    let dev = cuda_device(x)?;
    let dy = dy.contiguous()?;
    let dx = uninit(&dev, (n, c), DType::BF16)?;
    let dres = dres.map(|t| t.contiguous()).transpose()?;
    let args = [
        Arg::T(x),
        Arg::T(w),
        Arg::T(rstd),
        Arg::T(&dy),
        Arg::T(dres.as_ref().unwrap_or(&dy)),
        Arg::T(&dx),
        Arg::I(c as i32),
        Arg::I(dres.is_some() as i32),
    ];
    launch(&dev, "rmsnorm_bwd", n as u64, ROW_THREADS, &args)?;
    Ok(dx)
}

// ----- attention layout and RoPE --------------------------------------------------------------------------

/// c_attn's base output [N, 3C] (+ bias [3C], + the LoRA delta u B^T from u [N, r] and B [3C, r]) -> q, k
/// (rotated) and v [B, H, T, D].
#[allow(clippy::too_many_arguments)]
pub fn qkv_split_rope(base: &Tensor, bias: Option<&Tensor>, lora: Option<(&Tensor, &Tensor)>, cos: &Tensor, sin: &Tensor, b: usize, t: usize, h: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(base)?;
    let base = base.contiguous()?;
    let (u, lb) = match lora {
        Some((u, lb)) => (Some(aligned(u)?), Some(aligned(lb)?)),
        None => (None, None),
    };
    let r = u.as_ref().map_or(0, |u| u.dim(1).unwrap_or(0));
    let n = b * t;
    let q = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let k = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let v = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let args = [
        Arg::T(&base),
        Arg::T(u.as_ref().unwrap_or(&base)),
        Arg::T(lb.as_ref().unwrap_or(&base)),
        Arg::T(bias.unwrap_or(&base)),
        Arg::T(cos),
        Arg::T(sin),
        Arg::T(&q),
        Arg::T(&k),
        Arg::T(&v),
        Arg::I(n as i32),
        Arg::I(t as i32),
        Arg::I(h as i32),
        Arg::I(d as i32),
        Arg::I(r as i32),
        Arg::I(bias.is_some() as i32),
    ];
    launch(&dev, "qkv_split_rope", blocks(n.div_ceil(ROWS_PER_THREAD) * 3 * h * d / 2, EW_THREADS), EW_THREADS, &args)?;
    Ok((q, k, v))
}

/// Heads [B, H, T, D] side by side into columns col0.. of `dst` [N, stride]; `inverse_rope` applies
/// RoPE's backward on the way.
fn heads_merge_into(src: &Tensor, cos: &Tensor, sin: &Tensor, dst: &Tensor, col0: usize, inverse_rope: bool) -> Result<()> {
    let (b, h, t, d) = src.dims4()?;
    let (_, stride) = dst.dims2()?;
    let dev = cuda_device(src)?;
    let src = src.contiguous()?;
    let n = b * t;
    let args = [
        Arg::T(&src),
        Arg::T(cos),
        Arg::T(sin),
        Arg::T(dst),
        Arg::I(stride as i32),
        Arg::I(col0 as i32),
        Arg::I(n as i32),
        Arg::I(t as i32),
        Arg::I(h as i32),
        Arg::I(d as i32),
        Arg::I(inverse_rope as i32),
    ];
    launch(&dev, "heads_merge", blocks(n * h * d / 2, EW_THREADS), EW_THREADS, &args)
}

/// [B, H, T, D] -> [N, C] (the attention output into c_proj). `cos`/`sin` are not read.
pub fn merge_heads(y: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = y.dims4()?;
    let out = uninit(&cuda_device(y)?, (b * t, h * d), DType::BF16)?;
    heads_merge_into(y, cos, sin, &out, 0, false)?;
    Ok(out)
}

/// [N, C] -> [B, H, T, D]: the backward of [`merge_heads`].
pub fn split_heads(dy: &Tensor, b: usize, t: usize, h: usize, d: usize) -> Result<Tensor> {
    check_bf16("split_heads", &[dy])?;
    let dev = cuda_device(dy)?;
    let dy = dy.contiguous()?;
    let out = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let n = b * t;
    let args = [Arg::T(&dy), Arg::T(&out), Arg::I(n as i32), Arg::I(t as i32), Arg::I(h as i32), Arg::I(d as i32)];
    launch(&dev, "heads_split", blocks(n * h * d, EW_THREADS), EW_THREADS, &args)?;
    Ok(out)
}

/// Backward of [`qkv_split_rope`] (without bias and delta): dq, dk (un-rotated) and dv -> [N, 3C].
pub fn qkv_merge_unrope(dq: &Tensor, dk: &Tensor, dv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = dq.dims4()?;
    let c = h * d;
    let out = uninit(&cuda_device(dq)?, (b * t, 3 * c), DType::BF16)?;
    heads_merge_into(dq, cos, sin, &out, 0, true)?;
    heads_merge_into(dk, cos, sin, &out, c, true)?;
    heads_merge_into(dv, cos, sin, &out, 2 * c, false)?;
    Ok(out)
}

// ----- attention ------------------------------------------------------------------------------------------

/// scale * q k^T as f32 [B, H, T, T] for q, k [B, H, T, D] bf16: one strided-batched cuBLAS GEMM with
/// bf16 inputs and f32 output (candle's matmul returns the input dtype), so the softmax sees unrounded
/// scores, as a flash kernel would.
pub fn attention_scores(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    check_bf16("attention_scores", &[q, k])?;
    let (b, h, t, d) = q.dims4()?;
    let dev = cuda_device(q)?;
    let (q, k) = (q.contiguous()?, k.contiguous()?);
    let s = uninit(&dev, (b, h, t, t), DType::F32)?;
    {
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (ss, _) = s.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(ss)) = (&*qs, &*ks, &*ss) else {
            bail!("attention_scores: tensors not on the GPU")
        };
        let (qp, _gq) = qs.as_cuda_slice::<bf16>()?.device_ptr(&stream);
        let (kp, _gk) = ks.as_cuda_slice::<bf16>()?.device_ptr(&stream);
        let (sp, _gs) = ss.as_cuda_slice::<f32>()?.device_ptr(&stream);
        let qp = qp + (ql.start_offset() * 2) as u64;
        let kp = kp + (kl.start_offset() * 2) as u64;
        let (alpha, beta) = (scale as f32, 0f32);
        let (t_, d_) = (t as i32, d as i32);
        // Row-major S = Q K^T is column-major S^T = K Q^T: A = K (transposed), B = Q.
        // SAFETY: the pointers cover [B*H, T, D] bf16 inputs and a [B*H, T, T] f32 output on this stream.
        unsafe {
            cublas::gemm_strided_batched_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                t_,
                t_,
                d_,
                &alpha as *const f32 as *const _,
                kp as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                d_,
                (t * d) as i64,
                qp as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                d_,
                (t * d) as i64,
                &beta as *const f32 as *const _,
                sp as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                t_,
                (t * t) as i64,
                (b * h) as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
            .map_err(|e| candle_core::Error::Msg(format!("attention_scores: cuBLAS: {e:?}")))?;
        }
    }
    Ok(s)
}

/// Causal softmax of scaled scores [B, H, T, T] (f32) -> probabilities (bf16), masked keys 0.
pub fn causal_softmax(s: &Tensor) -> Result<Tensor> {
    let (b, h, t, _) = s.dims4()?;
    let dev = cuda_device(s)?;
    let p = uninit(&dev, (b, h, t, t), DType::BF16)?;
    let rows = b * h * t;
    let args = [Arg::T(s), Arg::T(&p), Arg::I(t as i32), Arg::U(rows as u64)];
    launch(&dev, "causal_softmax_fwd", blocks(rows, ROW_THREADS / 32), ROW_THREADS, &args)?;
    Ok(p)
}

/// d(q k^T) = scale * p * (dp - rowsum(p * dp)).
pub fn causal_softmax_backward(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    check_bf16("causal_softmax_backward", &[p, dp])?;
    let (b, h, t, _) = p.dims4()?;
    let dev = cuda_device(p)?;
    let dp = dp.contiguous()?;
    let ds = uninit(&dev, (b, h, t, t), DType::BF16)?;
    let rows = b * h * t;
    let args = [Arg::T(p), Arg::T(&dp), Arg::T(&ds), Arg::I(t as i32), Arg::F(scale as f32), Arg::U(rows as u64)];
    launch(&dev, "causal_softmax_bwd", blocks(rows, ROW_THREADS / 32), ROW_THREADS, &args)?;
    Ok(ds)
}

// ----- SwiGLU ---------------------------------------------------------------------------------------------

pub fn swiglu_forward(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    check_bf16("swiglu", &[a, g])?;
    let dev = cuda_device(a)?;
    let (a, g) = (a.contiguous()?, g.contiguous()?);
    let n = a.elem_count();
    let h = uninit(&dev, a.shape(), DType::BF16)?;
    let args = [Arg::T(&a), Arg::T(&g), Arg::T(&h), Arg::U(n as u64), vec_ok(&[&a, &g])];
    launch(&dev, "swiglu_fwd", blocks(n.div_ceil(EW_PER_THREAD), EW_THREADS), EW_THREADS, &args)?;
    Ok(h)
}

/// (da, dg).
pub fn swiglu_backward(a: &Tensor, g: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    check_bf16("swiglu_backward", &[a, g, dh])?;
    let dev = cuda_device(a)?;
    let dh = dh.contiguous()?;
    let n = a.elem_count();
    let da = uninit(&dev, a.shape(), DType::BF16)?;
    let dg = uninit(&dev, a.shape(), DType::BF16)?;
    let args = [Arg::T(a), Arg::T(g), Arg::T(&dh), Arg::T(&da), Arg::T(&dg), Arg::U(n as u64), vec_ok(&[a, g, &dh])];
    launch(&dev, "swiglu_bwd", blocks(n.div_ceil(EW_PER_THREAD), EW_THREADS), EW_THREADS, &args)?;
    Ok((da, dg))
}

// ----- dropout --------------------------------------------------------------------------------------------

/// x with element i zeroed when `uniform_at(key, i) < p` and the rest scaled by 1 / (1 - p): the same
/// mask as [`super::ops::dropout_mask`] builds on the CPU. Applying it to a gradient is its backward.
pub fn dropout(x: &Tensor, key: u64, p: f64) -> Result<Tensor> {
    check_bf16("dropout", &[x])?;
    let dev = cuda_device(x)?;
    let x = x.contiguous()?;
    let n = x.elem_count();
    let y = uninit(&dev, x.shape(), DType::BF16)?;
    let args = [Arg::T(&x), Arg::T(&y), Arg::U(n as u64), Arg::U(key), Arg::F(p as f32), Arg::F((1.0 / (1.0 - p)) as f32), vec_ok(&[&x])];
    launch(&dev, "dropout", blocks(n.div_ceil(EW_PER_THREAD), EW_THREADS), EW_THREADS, &args)?;
    Ok(y)
}

// ----- cross-entropy --------------------------------------------------------------------------------------

/// Per-row loss [n] (f32) and, when `want_grad`, dz = softmax(z) - onehot(y) [n, V] (bf16), for logits
/// z [n, V] (bf16) and targets y [n] (u32).
pub fn cross_entropy_rows(z: &Tensor, y: &Tensor, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
    check_bf16("cross_entropy_rows", &[z])?;
    let (n, v) = z.dims2()?;
    let dev = cuda_device(z)?;
    let z = z.contiguous()?;
    let y = y.contiguous()?;
    if y.dtype() != DType::U32 || y.elem_count() != n {
        bail!("cross_entropy_rows: targets must be {n} u32 values");
    }
    let loss = uninit(&dev, n, DType::F32)?;
    let dz = if want_grad { Some(uninit(&dev, (n, v), DType::BF16)?) } else { None };
    let args = [Arg::T(&z), Arg::T(&y), Arg::T(&loss), Arg::T(dz.as_ref().unwrap_or(&z)), Arg::I(v as i32), Arg::I(want_grad as i32)];
    launch(&dev, "cross_entropy_rows", n as u64, ROW_THREADS * 4, &args)?;
    Ok((loss, dz))
}

// ----- memory ---------------------------------------------------------------------------------------------

/// The stream-ordered memory pool candle allocates from (cudarc uses cuMemAllocAsync when it can).
fn default_pool(dev: &CudaDevice) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    // SAFETY: the device handle comes from a live context.
    unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }.w()
}

/// Highest bytes in use by tensors since the last [`reset_peak_memory`] (the equivalent of PyTorch's
/// `max_memory_allocated`).
pub fn peak_memory(dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let pool = default_pool(dev)?;
    let mut v: u64 = 0;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
    unsafe { result::mem_pool::get_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut v as *mut u64 as *mut _) }.w()?;
    Ok(v)
}

/// Sets the pool's release threshold to "never": freed blocks stay in the pool for the next step.
pub fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let pool = default_pool(dev)?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD is a cuuint64_t attribute.
    unsafe { result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut _) }.w()?;
    Ok(())
}

pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let pool = default_pool(dev)?;
    let mut zero: u64 = 0;
    // SAFETY: resetting the high-water mark takes a zero cuuint64_t.
    unsafe { result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut zero as *mut u64 as *mut _) }.w()?;
    Ok(())
}

// ----- LoRA folded into the frozen linear -----------------------------------------------------------------

/// `t` contiguous and starting on a 16-byte boundary (the rank-r rows are read with 16-byte loads).
fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    let offset = t.storage_and_layout().1.start_offset();
    if offset % 8 == 0 {
        Ok(t)
    } else {
        t.copy()
    }
}

/// y += u B^T in place, for y [N, out] (a fresh GEMM output nothing else holds), u [N, r], B [out, r].
pub fn lora_up_add_(y: &Tensor, u: &Tensor, b: &Tensor) -> Result<()> {
    check_bf16("lora_up_add", &[y, u, b])?;
    let (n, cols) = y.dims2()?;
    let r = u.dim(1)?;
    let dev = cuda_device(y)?;
    let (u, b) = (aligned(u)?, aligned(b)?);
    let args = [Arg::T(y), Arg::T(&u), Arg::T(&b), Arg::I(n as i32), Arg::I(cols as i32), Arg::I(r as i32)];
    launch(&dev, "lora_up_add", blocks(n.div_ceil(ROWS_PER_THREAD) * cols, EW_THREADS), EW_THREADS, &args)
}

/// dx += dropout(du A) in place, for dx [N, in] (a fresh GEMM output nothing else holds), du [N, r],
/// A [r, in]; the dropout of stream `key` with probability p (the same mask as [`dropout`]).
pub fn lora_down_add_(dx: &Tensor, du: &Tensor, a: &Tensor, dropout: Option<(u64, f64)>) -> Result<()> {
    check_bf16("lora_down_add", &[dx, du, a])?;
    let (n, cols) = dx.dims2()?;
    let r = du.dim(1)?;
    let dev = cuda_device(dx)?;
    let (du, a_t) = (aligned(du)?, a.t()?.contiguous()?);
    let (key, p) = dropout.unwrap_or((0, 0.0));
    let args = [
        Arg::T(dx),
        Arg::T(&du),
        Arg::T(&a_t),
        Arg::I(n as i32),
        Arg::I(cols as i32),
        Arg::I(r as i32),
        Arg::U(key),
        Arg::F(p as f32),
        Arg::F((1.0 / (1.0 - p)) as f32),
        Arg::I(dropout.is_some() as i32),
    ];
    launch(&dev, "lora_down_add", blocks(n.div_ceil(ROWS_PER_THREAD) * cols, EW_THREADS), EW_THREADS, &args)
}

// ----- optimizer ------------------------------------------------------------------------------------------

/// Device pointer of a contiguous f32 tensor's first element.
fn f32_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else { bail!("not a GPU tensor") };
    if !layout.is_contiguous() {
        bail!("not contiguous");
    }
    let stream = cs.device.cuda_stream();
    let (ptr, _guard) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
    Ok(ptr + (layout.start_offset() * 4) as u64)
}

/// A table of 64-bit words on the device (pointers and sizes for the multi-tensor kernels).
fn table(dev: &CudaDevice, words: Vec<u64>) -> Result<Tensor> {
    let words: Vec<i64> = words.into_iter().map(|w| w as i64).collect();
    let n = words.len();
    Tensor::from_vec(words, n, &Device::Cuda(dev.clone()))
}

/// AdamW hyper-parameters of one step, already combined (see train/optim.rs for the formula).
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step_size: f64,
    pub bias_correction2_sqrt: f64,
    pub grad_scale: f64,
}

/// One AdamW step of every (param, grad, m, v) in one launch; returns the new (param, m, v) tensors (the
/// inputs are left as they are). All f32, contiguous, on one GPU.
pub fn adamw_multi(items: &[(&Tensor, &Tensor, &Tensor, &Tensor)], h: &AdamWStep) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
    let Some(first) = items.first() else { return Ok(Vec::new()) };
    let dev = cuda_device(first.0)?;
    let mut words = Vec::with_capacity(8 * items.len());
    let mut outs = Vec::with_capacity(items.len());
    let mut max_n = 0;
    for (p, g, m, v) in items {
        let n = p.elem_count();
        if g.elem_count() != n || m.elem_count() != n || v.elem_count() != n {
            bail!("adamw_multi: sizes differ");
        }
        let (p, g, m, v) = (p.contiguous()?, g.contiguous()?, m.contiguous()?, v.contiguous()?);
        let out = (uninit(&dev, p.shape(), DType::F32)?, uninit(&dev, p.shape(), DType::F32)?, uninit(&dev, p.shape(), DType::F32)?);
        for t in [&p, &g, &m, &v, &out.0, &out.1, &out.2] {
            words.push(f32_ptr(t)?);
        }
        words.push(n as u64);
        max_n = max_n.max(n);
        // Keep the (possibly copied) inputs alive until the kernel is queued.
        outs.push((out, [p, g, m, v]));
    }
    let table = table(&dev, words)?;
    let args = [
        Arg::T(&table),
        Arg::F(h.lr as f32),
        Arg::F(h.beta1 as f32),
        Arg::F(h.beta2 as f32),
        Arg::F(h.eps as f32),
        Arg::F(h.weight_decay as f32),
        Arg::F(h.step_size as f32),
        Arg::F(h.bias_correction2_sqrt as f32),
        Arg::F(h.grad_scale as f32),
    ];
    let grid_x = blocks(max_n, EW_THREADS).min(64);
    launch_2d(&dev, "adamw_multi", (grid_x, items.len() as u32), EW_THREADS, &args)?;
    Ok(outs.into_iter().map(|(out, _inputs)| out).collect())
}

/// Sum of squares of all elements of all tensors (f32, on one GPU), as an f32 scalar tensor on the GPU.
pub fn sum_squares_multi(tensors: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = tensors.first() else { bail!("sum_squares_multi: no tensors") };
    let dev = cuda_device(first)?;
    let mut words = Vec::with_capacity(2 * tensors.len());
    let mut keep = Vec::with_capacity(tensors.len());
    let mut max_n = 0;
    for t in tensors {
        let t = t.contiguous()?;
        words.push(f32_ptr(&t)?);
        words.push(t.elem_count() as u64);
        max_n = max_n.max(t.elem_count());
        keep.push(t);
    }
    let table = table(&dev, words)?;
    let grid_x = blocks(max_n, ROW_THREADS).min(64);
    // One partial sum per block, summed by candle (a fixed reduction order: deterministic).
    let out = uninit(&dev, (tensors.len(), grid_x as usize), DType::F32)?;
    launch_2d(&dev, "sum_squares_multi", (grid_x, tensors.len() as u32), ROW_THREADS, &[Arg::T(&table), Arg::T(&out)])?;
    drop(keep);
    out.sum_all()
}

// ----- flash attention ------------------------------------------------------------------------------------

/// The head dimension the flash kernels are built for (Qwen-7B and -14B); other shapes take the
/// scores-in-memory path.
pub const FLASH_HEAD_DIM: usize = 128;
const FLASH_BLOCK: usize = 64;
const FLASH_THREADS: u32 = 128;
// Dynamic shared memory of each kernel (see the layouts at the top of each kernel in kernels.cu).
const LDK: usize = 136;
const LDP: usize = 72;
const LDS: usize = 68;
/// f32 row stride of the output scratch; 4 warps of [16, LDO] must fit in two [64, LDK] bf16 tiles.
const LDO: usize = 132;
const _: () = assert!(4 * 16 * LDO * 4 <= 2 * 64 * LDK * 2);
const FLASH_FWD_SMEM: usize = 2 * 64 * LDK * 2 + 4 * 16 * LDS * 4 + 4 * 16 * LDP * 2 + 4 * 16 * 4;
const FLASH_DKDV_SMEM: usize = 4 * 64 * LDK * 2 + 2 * 64 * LDP * 2 + 4 * 16 * LDS * 4 + 2 * 64 * 4;
const FLASH_DQ_SMEM: usize = 4 * 64 * LDK * 2 + 64 * LDP * 2 + 4 * 16 * LDS * 4 + 2 * 64 * 4;

/// Causal attention of q, k, v [B, H, T, 128] (bf16) without the [T, T] scores in memory: the output
/// [B, H, T, 128] and each row's log-sum-exp [B, H, T] (f32) for the backward.
pub fn flash_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    check_bf16("flash_forward", &[q, k, v])?;
    let (b, h, t, d) = q.dims4()?;
    if d != FLASH_HEAD_DIM {
        bail!("flash_forward: head dim {d}, the kernel is built for {FLASH_HEAD_DIM}");
    }
    let dev = cuda_device(q)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let o = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let lse = uninit(&dev, (b, h, t), DType::F32)?;
    let args = [Arg::T(&q), Arg::T(&k), Arg::T(&v), Arg::T(&o), Arg::T(&lse), Arg::I(t as i32), Arg::F(scale as f32)];
    let grid = (t.div_ceil(FLASH_BLOCK) as u64, (b * h) as u32);
    launch_smem(&dev, "flash_fwd", grid, FLASH_THREADS, FLASH_FWD_SMEM as u32, &args)?;
    Ok((o, lse))
}

/// (dq, dk, dv) of [`flash_forward`] given its output `o`, `lse` and d(o).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: &Tensor, d_o: &Tensor, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    check_bf16("flash_backward", &[q, k, v, o, d_o])?;
    let (b, h, t, d) = q.dims4()?;
    let dev = cuda_device(q)?;
    let d_o = d_o.contiguous()?;
    let rows = b * h * t;
    let dot = uninit(&dev, (b, h, t), DType::F32)?;
    let dot_args = [Arg::T(o), Arg::T(&d_o), Arg::T(&dot), Arg::U(rows as u64)];
    launch(&dev, "flash_bwd_dot", blocks(rows, ROW_THREADS / 32), ROW_THREADS, &dot_args)?;
    let dq = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let dk = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let dv = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let grid = (t.div_ceil(FLASH_BLOCK) as u64, (b * h) as u32);
    let (ti, sc) = (Arg::I(t as i32), Arg::F(scale as f32));
    let args = [Arg::T(q), Arg::T(k), Arg::T(v), Arg::T(&d_o), Arg::T(lse), Arg::T(&dot), Arg::T(&dk), Arg::T(&dv), ti, sc];
    launch_smem(&dev, "flash_bwd_dkdv", grid, FLASH_THREADS, FLASH_DKDV_SMEM as u32, &args)?;
    let (ti, sc) = (Arg::I(t as i32), Arg::F(scale as f32));
    let args = [Arg::T(q), Arg::T(k), Arg::T(v), Arg::T(&d_o), Arg::T(lse), Arg::T(&dot), Arg::T(&dq), ti, sc];
    launch_smem(&dev, "flash_bwd_dq", grid, FLASH_THREADS, FLASH_DQ_SMEM as u32, &args)?;
    Ok((dq, dk, dv))
}
