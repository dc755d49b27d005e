//! A product added into a tensor that holds another (cuBLAS's beta = 1): d(h) = dA W_up + dG W_gate in two
//! GEMMs and no add; a LoRA delta (or its input gradient), written first, with the frozen linear's product.
use super::launch::*;
use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, Result, Tensor};

/// acc += x w in place, for acc [N, M] (a fresh product nothing else holds), x [N, K], w [K, M], all bf16
/// and contiguous; f32 accumulation, as candle's matmul.
pub fn matmul_add_(acc: &Tensor, x: &Tensor, w: &Tensor) -> Result<()> {
    gemm_add(acc, x, w, false)
}

/// acc += x w^T in place (a linear's forward: w [M, K] as stored), otherwise as [`matmul_add_`].
pub fn linear_add_(acc: &Tensor, x: &Tensor, w: &Tensor) -> Result<()> {
    gemm_add(acc, x, w, true)
}

fn gemm_add(acc: &Tensor, x: &Tensor, w: &Tensor, w_transposed: bool) -> Result<()> {
    check_bf16("matmul_add", &[acc, x, w])?;
    let (n, k) = x.dims2()?;
    let (k2, m) = if w_transposed { w.t()?.dims2()? } else { w.dims2()? };
    if k != k2 || acc.dims2()? != (n, m) {
        bail!("matmul_add: [{n}, {k}] x {:?}{} into {:?}", w.dims(), if w_transposed { "^T" } else { "" }, acc.dims());
    }
    let dev = cuda_device(acc)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (pa, px, pw) = (device_ptr(acc)?, device_ptr(&x)?, device_ptr(&w)?);
    let blas = dev.cublas_handle();
    let (alpha, beta) = (1f32, 1f32);
    let dim = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("matmul_add: dimension {v} too large")));
    let (m, n, k) = (dim(m)?, dim(n)?, dim(k)?);
    // Row-major acc^T = w^T x^T is column-major acc = w x: no transposes, leading dimensions m, k, m. A w stored
    // [M, K] is column-major w^T with leading dimension k: the transpose is cuBLAS's.
    let (op_w, ld_w) = if w_transposed { (sys::cublasOperation_t::CUBLAS_OP_T, k) } else { (sys::cublasOperation_t::CUBLAS_OP_N, m) };
    // SAFETY: the pointers are the live tensors' (held by the caller), the sizes checked above; the handle
    // is bound to candle's stream, so the product is ordered with everything else.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            op_w,
            sys::cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            &alpha as *const f32 as *const _,
            pw as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            ld_w,
            px as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            k,
            &beta as *const f32 as *const _,
            pa as *mut _,
            sys::cudaDataType_t::CUDA_R_16BF,
            m,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .w()
}
