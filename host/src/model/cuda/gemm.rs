//! A product added into a tensor that holds another (cuBLAS's beta = 1): d(h) = dA W_up + dG W_gate in two
//! GEMMs and no add.
use super::launch::*;
use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, Result, Tensor};

/// acc += x w in place, for acc [N, M] (a fresh product nothing else holds), x [N, K], w [K, M], all bf16
/// and contiguous; f32 accumulation, as candle's matmul.
pub fn matmul_add_(acc: &Tensor, x: &Tensor, w: &Tensor) -> Result<()> {
    check_bf16("matmul_add", &[acc, x, w])?;
    let (n, k) = x.dims2()?;
    let (k2, m) = w.dims2()?;
    if k != k2 || acc.dims2()? != (n, m) {
        bail!("matmul_add: [{n}, {k}] x {:?} into {:?}", w.dims(), acc.dims());
    }
    let dev = cuda_device(acc)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (pa, px, pw) = (device_ptr(acc)?, device_ptr(&x)?, device_ptr(&w)?);
    let blas = dev.cublas_handle();
    let (alpha, beta) = (1f32, 1f32);
    let dim = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("matmul_add: dimension {v} too large")));
    let (m, n, k) = (dim(m)?, dim(n)?, dim(k)?);
    // Row-major acc^T = w^T x^T is column-major acc = w x: no transposes, leading dimensions m, k, m.
    // SAFETY: the pointers are the live tensors' (held by the caller), the sizes checked above; the handle
    // is bound to candle's stream, so the product is ordered with everything else.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_N,
            sys::cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            &alpha as *const f32 as *const _,
            pw as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            m,
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
