//! Causal attention: scores from one cuBLAS GEMM with a fused softmax (and backward), and flash
//! attention (head dim 128) that never stores the scores.
use super::launch::*;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as blas_sys};
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{bail, DType, Result, Storage, Tensor};
use half::bf16;

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
    launch(&dev, "causal_softmax_fwd", blocks(rows, ROW_THREADS / 32)?, ROW_THREADS, &args)?;
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
    launch(&dev, "causal_softmax_bwd", blocks(rows, ROW_THREADS / 32)?, ROW_THREADS, &args)?;
    Ok(ds)
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
    launch(&dev, "flash_bwd_dot", blocks(rows, ROW_THREADS / 32)?, ROW_THREADS, &dot_args)?;
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
