//! LoRA folded into the frozen linear: its up-projection added into the linear's output, its input
//! gradient into the linear's, in place.
use super::launch::*;
use candle_core::{Result, Tensor};

// ----- LoRA folded into the frozen linear -----------------------------------------------------------------

/// Whether the rank-8 kernels with 8 columns per thread (16-byte accesses) apply: rank 8, whole groups of 8
/// columns, the output starting on a 16-byte boundary (u, B, A^T are made aligned by the callers).
fn rank8_vec(r: usize, cols: usize, out: &Tensor) -> bool {
    r == 8 && cols % 8 == 0 && aligned16(&[out])
}

/// y += u B^T in place, for y [N, out] (a fresh GEMM output nothing else holds), u [N, r], B [out, r].
pub fn lora_up_add_(y: &Tensor, u: &Tensor, b: &Tensor) -> Result<()> {
    check_bf16("lora_up_add", &[y, u, b])?;
    let (n, cols) = y.dims2()?;
    let r = u.dim(1)?;
    let dev = cuda_device(y)?;
    let (u, b) = (aligned(u)?, aligned(b)?);
    if rank8_vec(r, cols, y) {
        let args = [Arg::T(y), Arg::T(&u), Arg::T(&b), Arg::I(n as i32), Arg::I(cols as i32)];
        return launch(&dev, "lora_up_add8", blocks(n.div_ceil(ROWS_PER_THREAD) * cols / 8, EW_THREADS)?, EW_THREADS, &args);
    }
    let args = [Arg::T(y), Arg::T(&u), Arg::T(&b), Arg::I(n as i32), Arg::I(cols as i32), Arg::I(r as i32)];
    launch(&dev, "lora_up_add", blocks(n.div_ceil(ROWS_PER_THREAD) * cols, EW_THREADS)?, EW_THREADS, &args)
}

/// dx += dropout(du A) in place, for dx [N, in] (a fresh GEMM output nothing else holds), du [N, r],
/// A [r, in]; the dropout of stream `key` with probability p (the same mask as [`super::dropout`]), read
/// from its bits when the forward kept them.
pub fn lora_down_add_(dx: &Tensor, du: &Tensor, a: &Tensor, dropout: Option<(u64, f64, Option<&Tensor>)>) -> Result<()> {
    check_bf16("lora_down_add", &[dx, du, a])?;
    let (n, cols) = dx.dims2()?;
    let r = du.dim(1)?;
    let dev = cuda_device(dx)?;
    let (du, a_t) = (aligned(du)?, a.t()?.contiguous()?);
    let (key, p, bits) = dropout.unwrap_or((0, 0.0, None));
    let mask = [Arg::U(key), Arg::F(p as f32), Arg::F((1.0 / (1.0 - p)) as f32), Arg::I(dropout.is_some() as i32)];
    if rank8_vec(r, cols, dx) {
        let [k, pp, keep, on] = mask;
        let bits = bits.filter(|b| b.elem_count() * 8 >= n * cols).map_or(Arg::U(0), Arg::T);
        let args = [Arg::T(dx), Arg::T(&du), Arg::T(&a_t), Arg::I(n as i32), Arg::I(cols as i32), k, pp, keep, on, bits];
        return launch(&dev, "lora_down_add8", blocks(n.div_ceil(ROWS_PER_THREAD) * cols / 8, EW_THREADS)?, EW_THREADS, &args);
    }
    let [k, pp, keep, on] = mask;
    let args = [Arg::T(dx), Arg::T(&du), Arg::T(&a_t), Arg::I(n as i32), Arg::I(cols as i32), Arg::I(r as i32), k, pp, keep, on];
    launch(&dev, "lora_down_add", blocks(n.div_ceil(ROWS_PER_THREAD) * cols, EW_THREADS)?, EW_THREADS, &args)
}

