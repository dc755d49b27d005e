//! Causal attention: scores from one cuBLAS GEMM with a fused softmax (and backward), and flash
//! attention (head dim 64 or 128, variable-length sequences, GQA) that never stores the scores.
use super::launch::{blocks as blocks_for, *};
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
    launch(&dev, "causal_softmax_fwd", blocks_for(rows, ROW_THREADS / 32)?, ROW_THREADS, &args)?;
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
    launch(&dev, "causal_softmax_bwd", blocks_for(rows, ROW_THREADS / 32)?, ROW_THREADS, &args)?;
    Ok(ds)
}

// ----- flash attention ------------------------------------------------------------------------------------

use crate::model::attention::{FlashBlocks, FLASH_HEAD_DIMS};
const FLASH_THREADS: u32 = 128;
/// Dynamic shared memory of each flash kernel (flash.cu): [64, D + 8] bf16 tiles; forward of 64 queries: 2 K + 2
/// V (Q passes through the second V), of 128 queries: 2 Q + 2 K + 2 V; dQ: Q + dO + 2 K + 2 V; dK/dV: K + V + 2
/// Q + 2 dO and two buffers of 64 lse and 64 row dots (f32); dQ from stored dS: 2 K and 2 [64, 136] dS tiles.
fn smem(kernel: &str, d: usize) -> u32 {
    let tile = 64 * (d + 8) * 2;
    let bytes = match kernel {
        "fwd64" => 4 * tile,
        "fwd128" => 6 * tile,
        "dkdv" => 6 * tile + 4 * 64 * 4,
        "dq_tiles" => 2 * tile + 2 * 64 * 136 * 2,
        _ => 6 * tile,
    };
    bytes as u32
}

fn check_flash(name: &str, q: &Tensor, k: &Tensor, blocks: &Tensor) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, hkv, kt, kd) = k.dims4()?;
    if !FLASH_HEAD_DIMS.contains(&d) {
        bail!("{name}: head dim {d}, the kernels are built for {FLASH_HEAD_DIMS:?}");
    }
    if (kb, kt, kd) != (b, t, d) || hkv == 0 || h % hkv != 0 {
        bail!("{name}: q {:?} and k {:?} do not fit (k/v heads must divide the query heads)", q.dims(), k.dims());
    }
    if blocks.dtype() != DType::U32 || blocks.rank() != 2 || blocks.dim(1)? != 4 {
        bail!("{name}: the block table must be u32 [n, 4], got {:?} {:?}", blocks.dtype(), blocks.dims());
    }
    Ok((b, h, hkv, t, d, blocks.dim(0)?))
}

/// Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D] (bf16) without the [T, T] scores in memory,
/// for the sequences of `blocks` (model/attention.rs, `FlashBlocks`: each row of the batch one sequence, or
/// several laid end to end; 128-query blocks when they are long, else 64): the output token-major [B T, H D]
/// (c_proj's input) and each row's log-sum-exp [B, H, T] (f32) for the backward. Every token must lie in a
/// listed sequence.
pub fn flash_forward(q: &Tensor, k: &Tensor, v: &Tensor, blocks: &FlashBlocks, scale: f64) -> Result<(Tensor, Tensor)> {
    check_bf16("flash_forward", &[q, k, v])?;
    let (kernel, table) = if blocks.forward128 { ("fwd128", &blocks.table128) } else { ("fwd64", &blocks.table) };
    let (b, h, hkv, t, d, n) = check_flash("flash_forward", q, k, table)?;
    let dev = cuda_device(q)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let o = uninit(&dev, (b * t, h * d), DType::BF16)?;
    let lse = uninit(&dev, (b, h, t), DType::F32)?;
    let args = [Arg::T(&q), Arg::T(&k), Arg::T(&v), Arg::T(&o), Arg::T(&lse), Arg::T(table), Arg::I(t as i32), Arg::I(h as i32), Arg::I(hkv as i32), Arg::F(scale as f32)];
    launch_smem(&dev, &format!("flash_{kernel}_{d}"), (n as u64, h as u32), FLASH_THREADS, smem(kernel, d), &args)?;
    Ok((o, lse))
}

/// The most memory the backward's dS tiles may take (bf16, 8 KiB per 64 x 64 tile of each sequence's causal
/// triangle, per query head): kv heads are done in groups that fit; past it even for one kv head (sequences
/// of ~20K tokens and more), dQ recomputes the tiles instead (one product per tile against three).
const DS_BUDGET_BYTES: usize = 512 << 20;

/// The input gradients of [`flash_forward`] given its output `o` [B T, H D], `lse` and d(o) [B T, H D]: dq, dk
/// and dv token-major side by side in d(qkv) [B T, (H + 2 Hkv) D] (c_attn's output gradient), RoPE undone on dq
/// and dk when `unrope` gives the tables (cos, sin, f32: [T, D] by position, or per token for a padding-free
/// batch). Under GQA each kv head's gradients sum its query heads' in a fixed order (deterministic).
/// `ds_tiles`: dQ from the dS tiles the dK/dV pass stores (up to [`DS_BUDGET_BYTES`]), else recomputed.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: &Tensor, d_o: &Tensor, blocks: &FlashBlocks, scale: f64, ds_tiles: bool, unrope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    flash_backward_within(q, k, v, o, lse, d_o, blocks, scale, if ds_tiles { DS_BUDGET_BYTES } else { 0 }, unrope)
}

/// [`flash_backward`] with the dS tiles held to `budget` bytes (kv heads in groups that fit; 0 or less than
/// one kv head's tiles: dQ recomputed). Every grouping gives the same bits (`bench numerics` checks).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward_within(q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: &Tensor, d_o: &Tensor, blocks: &FlashBlocks, scale: f64, budget: usize, unrope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    check_bf16("flash_backward", &[q, k, v, o, d_o])?;
    let (b, h, hkv, t, d, n) = check_flash("flash_backward", q, k, &blocks.table)?;
    let dev = cuda_device(q)?;
    if o.dims() != [b * t, h * d] || d_o.dims() != [b * t, h * d] {
        bail!("flash_backward: o {:?} and d(o) {:?} must be token-major [{}, {}]", o.dims(), d_o.dims(), b * t, h * d);
    }
    // flash_bwd_dot: 8 tokens a block, 16-byte loads.
    let (o, d_o) = (aligned(o)?, aligned(d_o)?);
    let tokens = b * t;
    let dot = uninit(&dev, (b, h, t), DType::F32)?;
    let dot_args = [Arg::T(&o), Arg::T(&d_o), Arg::T(&dot), Arg::I(t as i32), Arg::I(h as i32), Arg::I(d as i32), Arg::U(tokens as u64)];
    launch(&dev, "flash_bwd_dot", tokens.div_ceil(8) as u64, 256, &dot_args)?;
    // Every element is written: each token lies in a listed sequence, and dq, dk, dv fill their columns.
    let dqkv = uninit(&dev, (b * t, (h + 2 * hkv) * d), DType::BF16)?;
    // The RoPE tables (read 16 bytes at a time) and whether they are per token; none: null pointers (dq, dk
    // stored as they are).
    let tables = match unrope {
        Some((cos, sin)) if cos.dtype() != DType::F32 || sin.dtype() != DType::F32 => {
            bail!("flash_backward: the RoPE tables must be f32, got {:?}", cos.dtype())
        }
        Some((cos, sin)) => Some((aligned(cos)?, aligned(sin)?)),
        None => None,
    };
    let rope = || -> Result<[Arg; 3]> {
        Ok(match &tables {
            Some((cos, sin)) => [Arg::T(cos), Arg::T(sin), super::layers::per_token(cos, b * t, d)?],
            None => [Arg::U(0), Arg::U(0), Arg::I(0)],
        })
    };
    let groups = h / hkv;
    let tile_bytes = 64 * 64 * 2;
    let per_kv_head = groups * blocks.n_tiles.max(1) * tile_bytes;
    let chunk = (budget / per_kv_head).min(hkv);
    let dims = || [Arg::I(t as i32), Arg::I(h as i32), Arg::I(hkv as i32), Arg::F(scale as f32)];
    let n_tiles = || Arg::I(blocks.n_tiles as i32);
    // dK and dV of kv heads kvh0 .. kvh0 + heads, storing their dS tiles in `ds` (none: the null pointer).
    let dkdv = |ds: Option<&Tensor>, kvh0: usize, heads: usize| -> Result<()> {
        let ([a, b_, c, e], [rc, rs, rp]) = (dims(), rope()?);
        let ds = ds.map_or(Arg::U(0), Arg::T);
        let args = [Arg::T(q), Arg::T(k), Arg::T(v), Arg::T(&d_o), Arg::T(lse), Arg::T(&dot), Arg::T(&dqkv), rc, rs, rp, ds, Arg::T(&blocks.tiles), n_tiles(), Arg::T(&blocks.table), Arg::I(kvh0 as i32), a, b_, c, e];
        launch_smem(&dev, &format!("flash_bwd_dkdv_{d}"), (n as u64, heads as u32), FLASH_THREADS, smem("dkdv", d), &args)
    };
    if chunk == 0 {
        dkdv(None, 0, hkv)?;
        let ([a, b_, c, e], [rc, rs, rp]) = (dims(), rope()?);
        let args = [Arg::T(q), Arg::T(k), Arg::T(v), Arg::T(&d_o), Arg::T(lse), Arg::T(&dot), Arg::T(&dqkv), rc, rs, rp, Arg::T(&blocks.table), a, b_, c, e];
        launch_smem(&dev, &format!("flash_bwd_dq_{d}"), (n as u64, h as u32), FLASH_THREADS, smem("dq", d), &args)?;
        return Ok(dqkv);
    }
    let ds = uninit(&dev, chunk * per_kv_head / 2, DType::BF16)?;
    let n128 = blocks.table128.dim(0)? as u64;
    for kvh0 in (0..hkv).step_by(chunk) {
        let heads = chunk.min(hkv - kvh0);
        dkdv(Some(&ds), kvh0, heads)?;
        let ([a, b_, c, e], [rc, rs, rp]) = (dims(), rope()?);
        let args = [Arg::T(k), Arg::T(&ds), Arg::T(&dqkv), rc, rs, rp, Arg::T(&blocks.tiles128), n_tiles(), Arg::T(&blocks.table128), Arg::I((kvh0 * groups) as i32), a, b_, c, e];
        launch_smem(&dev, &format!("flash_bwd_dq_tiles_{d}"), (n128, (heads * groups) as u32), FLASH_THREADS, smem("dq_tiles", d), &args)?;
    }
    Ok(dqkv)
}
