//! The block's pointwise and row-wise ops: RMSNorm, SwiGLU, LoRA dropout, the cross-entropy rows, and the
//! attention layout (qkv split with bias, LoRA delta and RoPE; head merges and their backward).
use super::launch::*;
use candle_core::{bail, DType, Result, Tensor};

// ----- RMSNorm --------------------------------------------------------------------------------------------

/// Whether the row kernels may read and write 8 elements at a time: rows of a multiple of 8 elements, every
/// tensor starting on a 16-byte boundary (the outputs are fresh allocations).
fn rows_vec(c: usize, ts: &[&Tensor]) -> Arg<'static> {
    Arg::I((c % 8 == 0 && aligned16(ts)) as i32)
}

/// y [N, C] and rstd [N, 1] (f32) for x [N, C], w [C].
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    check_bf16("rmsnorm", &[x, w])?;
    let (n, c) = x.dims2()?;
    let dev = cuda_device(x)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let y = uninit(&dev, (n, c), DType::BF16)?;
    let rstd = uninit(&dev, (n, 1), DType::F32)?;
    let args = [Arg::T(&x), Arg::T(&w), Arg::T(&y), Arg::T(&rstd), Arg::I(c as i32), Arg::F(eps as f32), rows_vec(c, &[&x, &w])];
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
        rows_vec(c, &[x, w, &dy, dres.as_ref().unwrap_or(&dy)]),
    ];
    launch(&dev, "rmsnorm_bwd", n as u64, ROW_THREADS, &args)?;
    Ok(dx)
}

// ----- attention layout and RoPE --------------------------------------------------------------------------

/// The attention input's output [N, W], W = (H + 2 Hkv) D, LoRA delta included (+ bias [W]) -> q [B, H, T, D]
/// (rotated), k [B, Hkv, T, D] (rotated) and v [B, Hkv, T, D]; 8 elements per access where the head dim is a
/// multiple of 16 and the rows are aligned.
#[allow(clippy::too_many_arguments)]
pub fn qkv_split_rope(base: &Tensor, bias: Option<&Tensor>, cos: &Tensor, sin: &Tensor, b: usize, t: usize, h: usize, hkv: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(base)?;
    let base = base.contiguous()?;
    let n = b * t;
    let q = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let k = uninit(&dev, (b, hkv, t, d), DType::BF16)?;
    let v = uninit(&dev, (b, hkv, t, d), DType::BF16)?;
    // Both kernels' arguments: base, bias, cos, sin, q, k, v, n, T, H, Hkv, D, has_bias, per_token.
    let args: Vec<Arg> = [Arg::T(&base), Arg::T(bias.unwrap_or(&base)), Arg::T(cos), Arg::T(sin), Arg::T(&q), Arg::T(&k), Arg::T(&v)]
        .into_iter()
        .chain([n, t, h, hkv, d].map(|x| Arg::I(x as i32)))
        .chain([Arg::I(bias.is_some() as i32), per_token(cos, n, d)?])
        .collect();
    if d % 16 == 0 && aligned16(&[&base, bias.unwrap_or(&base)]) {
        const SPLIT8_ROWS: usize = 4; // SPLIT8_ROWS in layers.cu
        launch(&dev, "qkv_split_rope8", blocks(n.div_ceil(SPLIT8_ROWS) * (h + 2 * hkv) * d / 16, EW_THREADS)?, EW_THREADS, &args)?;
    } else {
        launch(&dev, "qkv_split_rope", blocks(n.div_ceil(ROWS_PER_THREAD) * (h + 2 * hkv) * d / 2, EW_THREADS)?, EW_THREADS, &args)?;
    }
    Ok((q, k, v))
}

/// Whether the RoPE tables are per token ([B, 1, T, D], gathered by each token's position: a padding-free
/// batch) rather than per position ([T, D]).
pub(super) fn per_token(cos: &Tensor, n: usize, d: usize) -> Result<Arg<'static>> {
    match cos.rank() {
        2 => Ok(Arg::I(0)),
        4 if cos.elem_count() == n * d => Ok(Arg::I(1)),
        _ => bail!("RoPE tables of shape {:?} fit neither [T, {d}] nor {n} tokens", cos.dims()),
    }
}

/// Heads [B, H, T, D] side by side into columns col0.. of `dst` [N, stride]; `unrope` (the RoPE tables cos,
/// sin) applies RoPE's backward on the way.
fn heads_merge_into(src: &Tensor, dst: &Tensor, col0: usize, unrope: Option<(&Tensor, &Tensor)>) -> Result<()> {
    let (b, h, t, d) = src.dims4()?;
    let (_, stride) = dst.dims2()?;
    let dev = cuda_device(src)?;
    let src = src.contiguous()?;
    let n = b * t;
    // Without RoPE to undo the kernels read no table: null pointers.
    let (cos, sin, per) = match unrope {
        Some((cos, sin)) => (Arg::T(cos), Arg::T(sin), per_token(cos, n, d)?),
        None => (Arg::U(0), Arg::U(0), Arg::I(0)),
    };
    let args = [
        Arg::T(&src),
        cos,
        sin,
        Arg::T(dst),
        Arg::I(stride as i32),
        Arg::I(col0 as i32),
        Arg::I(n as i32),
        Arg::I(t as i32),
        Arg::I(h as i32),
        Arg::I(d as i32),
        Arg::I(unrope.is_some() as i32),
        per,
    ];
    // 8 elements per access when the head dim, the column offsets and the buffers allow.
    if d % 16 == 0 && stride % 8 == 0 && col0 % 8 == 0 && aligned16(&[&src, dst]) {
        return launch(&dev, "heads_merge8", blocks(n * h * d / 16, EW_THREADS)?, EW_THREADS, &args);
    }
    launch(&dev, "heads_merge", blocks(n * h * d / 2, EW_THREADS)?, EW_THREADS, &args)
}

/// [B, H, T, D] -> [N, C] (the attention output into c_proj).
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = y.dims4()?;
    let out = uninit(&cuda_device(y)?, (b * t, h * d), DType::BF16)?;
    heads_merge_into(y, &out, 0, None)?;
    Ok(out)
}

/// [N, C] -> [B, H, T, D]: the backward of [`merge_heads`].
pub fn split_heads(dy: &Tensor, b: usize, t: usize, h: usize, d: usize) -> Result<Tensor> {
    check_bf16("split_heads", &[dy])?;
    let dev = cuda_device(dy)?;
    let dy = dy.contiguous()?;
    let out = uninit(&dev, (b, h, t, d), DType::BF16)?;
    let n = b * t;
    let vec = d % 8 == 0 && aligned16(&[&dy]);
    let args = [Arg::T(&dy), Arg::T(&out), Arg::I(n as i32), Arg::I(t as i32), Arg::I(h as i32), Arg::I(d as i32), Arg::I(vec as i32)];
    let per = if vec { 8 } else { 1 };
    launch(&dev, "heads_split", blocks(n * h * d / per, EW_THREADS)?, EW_THREADS, &args)?;
    Ok(out)
}

/// Backward of [`qkv_split_rope`] (without bias and delta): dq, dk (un-rotated) and dv -> [N, (H + 2 Hkv) D].
pub fn qkv_merge_unrope(dq: &Tensor, dk: &Tensor, dv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = dq.dims4()?;
    let hkv = dk.dim(1)?;
    let (q_w, kv_w) = (h * d, hkv * d);
    let out = uninit(&cuda_device(dq)?, (b * t, q_w + 2 * kv_w), DType::BF16)?;
    heads_merge_into(dq, &out, 0, Some((cos, sin)))?;
    heads_merge_into(dk, &out, q_w, Some((cos, sin)))?;
    heads_merge_into(dv, &out, q_w + kv_w, None)?;
    Ok(out)
}

// ----- SwiGLU ---------------------------------------------------------------------------------------------

pub fn swiglu_forward(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    check_bf16("swiglu", &[a, g])?;
    let dev = cuda_device(a)?;
    let (a, g) = (a.contiguous()?, g.contiguous()?);
    let n = a.elem_count();
    let h = uninit(&dev, a.shape(), DType::BF16)?;
    let args = [Arg::T(&a), Arg::T(&g), Arg::T(&h), Arg::U(n as u64), vec_ok(&[&a, &g])];
    launch(&dev, "swiglu_fwd", blocks(n.div_ceil(EW_PER_THREAD), EW_THREADS)?, EW_THREADS, &args)?;
    Ok(h)
}

/// a + b for two bf16 tensors of one shape (the residual stream).
pub fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_bf16("residual_add", &[a, b])?;
    if a.dims() != b.dims() {
        bail!("residual_add: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let dev = cuda_device(a)?;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let n = a.elem_count();
    let out = uninit(&dev, a.shape(), DType::BF16)?;
    let args = [Arg::T(&a), Arg::T(&b), Arg::T(&out), Arg::U(n as u64), vec_ok(&[&a, &b])];
    launch(&dev, "residual_add", blocks(n.div_ceil(EW_PER_THREAD), EW_THREADS)?, EW_THREADS, &args)?;
    Ok(out)
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
    launch(&dev, "swiglu_bwd", blocks(n.div_ceil(EW_PER_THREAD), EW_THREADS)?, EW_THREADS, &args)?;
    Ok((da, dg))
}

// ----- dropout --------------------------------------------------------------------------------------------

/// x with element i zeroed when `dropout_uniform(key, i) < p` (model/rng.rs) and the rest scaled by 1 / (1 - p): the same
/// mask as [`super::ops::dropout_mask`] builds on the CPU. Applying it to a gradient is its backward.
/// And, when `bits`, the mask as bits (u8 [ceil(n / 8)], bit k of byte j set when element 8 j + k is
/// dropped) for the backward ([`super::lora_down_add_`]) to read instead of hashing again.
pub fn dropout(x: &Tensor, key: u64, p: f64, bits: bool) -> Result<(Tensor, Option<Tensor>)> {
    check_bf16("dropout", &[x])?;
    let dev = cuda_device(x)?;
    let x = x.contiguous()?;
    let n = x.elem_count();
    let y = uninit(&dev, x.shape(), DType::BF16)?;
    let mask = if bits { Some(uninit(&dev, n.div_ceil(EW_PER_THREAD), DType::U8)?) } else { None };
    let mask_arg = mask.as_ref().map_or(Arg::U(0), Arg::T);
    let args = [Arg::T(&x), Arg::T(&y), Arg::U(n as u64), Arg::U(key), Arg::F(p as f32), Arg::F((1.0 / (1.0 - p)) as f32), vec_ok(&[&x]), mask_arg];
    launch(&dev, "dropout", blocks(n.div_ceil(EW_PER_THREAD), EW_THREADS)?, EW_THREADS, &args)?;
    Ok((y, mask))
}

// ----- cross-entropy --------------------------------------------------------------------------------------

/// out[rows[r]] = src[r] in place, for out [M, cols] (a fresh tensor nothing else holds), src [n, cols] and
/// distinct row indices rows [n] (u32, each below M): the loss's scatter of its counted positions' gradients.
pub fn scatter_rows_(out: &Tensor, rows: &Tensor, src: &Tensor) -> Result<()> {
    check_bf16("scatter_rows", &[out, src])?;
    let (n, cols) = src.dims2()?;
    if out.dim(1)? != cols || cols % 8 != 0 || rows.dtype() != DType::U32 || rows.elem_count() != n || !aligned16(&[out, src]) {
        bail!("scatter_rows: [n, cols] rows into [M, cols] with cols a multiple of 8, 16-byte aligned, and n u32 row indices");
    }
    let dev = cuda_device(out)?;
    let (src, rows) = (src.contiguous()?, rows.contiguous()?);
    let args = [Arg::T(&src), Arg::T(&rows), Arg::T(out), Arg::I(n as i32), Arg::I(cols as i32)];
    launch(&dev, "scatter_rows8", blocks(n * cols / 8, EW_THREADS)?, EW_THREADS, &args)
}

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

