//! LoRA folded into the frozen linear: its up-projection added into the linear's output, its input
//! gradient into the linear's, in place; and its way in (dropout, x A^T) in one pass.
use super::launch::*;
use candle_core::{DType, Result, Tensor};

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
    let ([k, pp, keep, on], bits) = mask_args(dropout, n * cols);
    if rank8_vec(r, cols, dx) {
        let args = [Arg::T(dx), Arg::T(&du), Arg::T(&a_t), Arg::I(n as i32), Arg::I(cols as i32), k, pp, keep, on, bits];
        return launch(&dev, "lora_down_add8", blocks(n.div_ceil(ROWS_PER_THREAD) * cols / 8, EW_THREADS)?, EW_THREADS, &args);
    }
    let args = [Arg::T(dx), Arg::T(&du), Arg::T(&a_t), Arg::I(n as i32), Arg::I(cols as i32), Arg::I(r as i32), k, pp, keep, on];
    launch(&dev, "lora_down_add", blocks(n.div_ceil(ROWS_PER_THREAD) * cols, EW_THREADS)?, EW_THREADS, &args)
}

/// The dropout's kernel arguments for a tensor of `elems` elements: key, p, 1 / (1 - p), whether there is one;
/// and the forward's mask bits (the null pointer when there are none, or too few: the kernels hash instead).
fn mask_args<'a>(dropout: Option<(u64, f64, Option<&'a Tensor>)>, elems: usize) -> ([Arg<'a>; 4], Arg<'a>) {
    let (key, p, bits) = dropout.unwrap_or((0, 0.0, None));
    let bits = bits.filter(|b| b.elem_count() * 8 >= elems).map_or(Arg::U(0), Arg::T);
    ([Arg::U(key), Arg::F(p as f32), Arg::F((1.0 / (1.0 - p)) as f32), Arg::I(dropout.is_some() as i32)], bits)
}

// ----- the branch written first, the frozen GEMM adding into it --------------------------------------------
// The delta (forward) and the branch's input gradient (backward) are written into a fresh tensor by a
// tensor-core kernel (lora_rank16_tc / lora_rank32_tc), and the frozen linear's GEMM then adds its product
// into it (cuBLAS beta = 1, gemm.rs): no kernel passes over the GEMM's output again.

/// u B^T [N, out] (plus `base` [N, out], the residual stream the linear's output goes onto, when given) into a
/// fresh tensor, for u [N, r] and B [out, r]; None where the kernel does not apply.
pub fn lora_up(u: &Tensor, b: &Tensor, base: Option<&Tensor>) -> Result<Option<Tensor>> {
    rank_tc(u, b, false, None, base)
}

/// dropout(du A) [N, in] into a fresh tensor (the mask as in [`lora_down_add_`]), for du [N, r] and A [r, in];
/// None where the kernel does not apply.
pub fn lora_down(du: &Tensor, a: &Tensor, dropout: Option<(u64, f64, Option<&Tensor>)>) -> Result<Option<Tensor>> {
    rank_tc(du, a, true, dropout, None)
}

/// out = base + f(u w^T) for u [N, r], w [cols, r] (or, `w_t`, w^T [r, cols] as stored) (r even, at most 32; cols a
/// multiple of 16), f the dropout if any, base [N, cols] if given.
fn rank_tc(u: &Tensor, w: &Tensor, w_t: bool, dropout: Option<(u64, f64, Option<&Tensor>)>, base: Option<&Tensor>) -> Result<Option<Tensor>> {
    check_bf16("lora_rank_tc", &[u, w])?;
    let (n, r) = u.dims2()?;
    let (cols, r2) = match w_t {
        false => w.dims2()?,
        true => (w.dim(1)?, w.dim(0)?),
    };
    if r != r2 || r == 0 || r % 2 != 0 || r > 32 || cols % 16 != 0 {
        return Ok(None);
    }
    if let Some(b) = base {
        check_bf16("lora_rank_tc", &[b])?;
        if b.dims2()? != (n, cols) {
            return Ok(None);
        }
    }
    let dev = cuda_device(u)?;
    // 4-byte loads of rank pairs (w given transposed: 16-byte loads of its rows); 16-byte loads of base.
    let (u, w) = (aligned(u)?, aligned(w)?);
    let base = base.map(aligned).transpose()?;
    let out = uninit(&dev, (n, cols), DType::BF16)?;
    blocks(n * cols, 1)?; // the element index space fits the kernel's arithmetic
    let ([k, p, keep, on], bits) = mask_args(dropout, n * cols);
    let args = [
        Arg::T(&out),
        Arg::T(&u),
        Arg::T(&w),
        Arg::I(n as i32),
        Arg::I(cols as i32),
        Arg::I(r as i32),
        k,
        p,
        keep,
        on,
        bits,
        Arg::I(w_t as i32),
        base.as_ref().map_or(Arg::U(0), Arg::T),
    ];
    const TC_ROWS: usize = 64; // TC_ROWS in lora.cu
    let name = if r <= 16 { "lora_rank16_tc" } else { "lora_rank32_tc" };
    launch_2d(&dev, name, (cols.div_ceil(256) as u64, n.div_ceil(TC_ROWS) as u32), 128, &args)?;
    Ok(Some(out))
}

// ----- the branch's way in ---------------------------------------------------------------------------------

/// (h, u, bits) for x [N, in] and A [r, in]: h = dropout(x) and its mask's bits (exactly as [`super::dropout`]
/// makes them), u = scale * h A^T [N, r], in one pass over x; the dropout of stream `key` with probability p. None
/// where the kernel does not apply (r a multiple of 8 up to 32, `in` a multiple of 32).
pub fn lora_a(x: &Tensor, a: &Tensor, scale: f64, key: u64, p: f64) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    check_bf16("lora_a", &[x, a])?;
    let (n, cols) = x.dims2()?;
    let r = a.dim(0)?;
    if a.dim(1)? != cols || r % 8 != 0 || r == 0 || r > 32 || cols % 32 != 0 {
        return Ok(None);
    }
    let dev = cuda_device(x)?;
    let (x, a) = (aligned(x)?, aligned(a)?);
    blocks(n * cols, 1)?; // the element index space fits the kernel's arithmetic
    let h = uninit(&dev, (n, cols), DType::BF16)?;
    let u = uninit(&dev, (n, r), DType::BF16)?;
    let bits = uninit(&dev, n * cols / 8, DType::U8)?;
    let keep = (1.0 / (1.0 - p)) as f32;
    let args = [Arg::T(&x), Arg::T(&a), Arg::T(&h), Arg::T(&u), Arg::T(&bits), Arg::I(n as i32), Arg::I(cols as i32), Arg::U(key), Arg::F(p as f32), Arg::F(keep), Arg::F(scale as f32)];
    const LA_WARPS: u32 = 8; // LA_WARPS in lora.cu
    launch(&dev, &format!("lora_a{r}"), n.div_ceil(16) as u64, 32 * LA_WARPS, &args)?;
    Ok(Some((h, u, bits)))
}
