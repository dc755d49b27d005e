//! The ops of a block, each as a forward and its backward side by side (attention and the loss live in
//! their own files). Conventions:
//! - Activations are 2-D `[N, features]` with N = batch * time, row-major and contiguous.
//! - Frozen weights are never differentiated: a linear's backward returns dX only.
//! - `*_forward` returns the output plus whatever its backward needs (`*Saved`); nothing else is kept.
//! - Matmuls take contiguous operands or `.t()` of contiguous ones (what CUDA's GEMM accepts).
use crate::rng;
use candle_core::{DType, Device, Result, Tensor, D};

/// The dtype for precision-sensitive math (norm statistics, RoPE, softmax, loss): f32 for half-precision
/// models, otherwise the model's own dtype (f32, or f64 in gradient checks).
pub fn acc_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Embedding: x[n] = wte[ids[n]]. The embedding is frozen, so there is no backward.

pub fn embedding_forward(wte: &Tensor, ids_flat: &Tensor) -> Result<Tensor> {
    wte.index_select(ids_flat, 0)
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm (Qwen v1): y = w * x / sqrt(mean(x^2) + eps), statistics in f32 (as Qwen does `x.float()`),
// normalised x cast back to the model dtype before the weight multiply (Qwen's `.type_as(x) * weight`).

pub struct RmsNormSaved {
    /// The input, in the model dtype (upcast again in backward: cheaper to keep than an f32 copy).
    x: Tensor,
    /// 1 / sqrt(mean(x^2) + eps), [N, 1].
    rstd: Tensor,
}

/// Bytes of a tensor's elements (a view counts as its own size).
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl RmsNormSaved {
    pub fn bytes(&self) -> usize {
        tensor_bytes(&self.x) + tensor_bytes(&self.rstd)
    }
}

/// `fused`: use the GPU kernel when it applies (see [`super::fusion`]).
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<(Tensor, RmsNormSaved)> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, x) {
        let (y, rstd) = super::cuda::rmsnorm_forward(x, w, eps)?;
        return Ok((y, RmsNormSaved { x: x.clone(), rstd }));
    }
    let _ = fused;
    let dtype = x.dtype();
    let xf = x.to_dtype(acc_dtype(dtype))?;
    let rstd = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = xf.broadcast_mul(&rstd)?;
    let y = xhat.to_dtype(dtype)?.broadcast_mul(w)?;
    Ok((y, RmsNormSaved { x: x.clone(), rstd }))
}

/// With xhat = x * rstd and g = dy * w (per feature):
///   dx = rstd * (g - xhat * mean(g * xhat))
/// (the second term is the gradient through rstd, which depends on every feature of the row).
/// `dres`, when given, is added to dx: the gradient the residual branch carries past the norm.
pub fn rmsnorm_backward(saved: &RmsNormSaved, w: &Tensor, dy: &Tensor, dres: Option<&Tensor>, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, dy) {
        return super::cuda::rmsnorm_backward(&saved.x, &saved.rstd, w, dy, dres);
    }
    let _ = fused;
    let dtype = dy.dtype();
    let acc = saved.rstd.dtype();
    let g = dy.broadcast_mul(w)?.to_dtype(acc)?;
    let xhat = saved.x.to_dtype(acc)?.broadcast_mul(&saved.rstd)?;
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&saved.rstd)?.to_dtype(dtype)?;
    match dres {
        Some(r) => dx + r,
        None => Ok(dx),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Linear with a frozen weight W [out, in] and optional bias: y = x W^T + b.
// Backward: dx = dy W. dW and db are never formed (the weights are frozen).

pub fn linear_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

pub fn linear_backward(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    dy.matmul(w)
}

/// `partial` + dy w: the input gradient of an input that feeds two linears (the MLP's up and gate), the
/// second linear's added to the first's. On the GPU (`fused`) cuBLAS adds the product into `partial` in
/// place (a fresh gradient nothing else holds): no second [N, in] product and no add.
pub fn linear_backward_add(partial: Tensor, dy: &Tensor, w: &Tensor, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, &partial) && dy.dtype() == DType::BF16 && w.dtype() == DType::BF16 {
        super::cuda::matmul_add_(&partial, dy, w)?;
        return Ok(partial);
    }
    let _ = fused;
    partial + linear_backward(dy, w)?
}

// ---------------------------------------------------------------------------------------------------------
// LoRA on a linear (PEFT): y += scale * B A dropout(x), A [r, in], B [out, r], scale = alpha / r.
// Computed as h = dropout(x); u = scale * (h A^T) [N, r]; delta = u B^T [N, out], so the scale touches
// only the small [N, r] tensor. Parameters are f32 (or f64); they are cast to the activation dtype here and
// their gradients come back in the parameter dtype. On the GPU (`fused`) the delta and the branch's input
// gradient go straight into the frozen linear's output and input gradient: written first, the linear's GEMM
// adding its product into them ([`linear_forward_delta`], [`InputGrad::Linear`]), or added in place into a
// product already formed ([`lora_add`], [`InputGrad::Add`]). With the GPU's dropout (a key) one kernel makes h,
// its mask's bits and u in one pass over x.

pub struct LoraSaved {
    /// dropout(x): the input A saw.
    h: Tensor,
    /// scale * h A^T.
    u: Tensor,
    /// The dropout applied to x; its backward applies the same mask to dh.
    dropout: Option<Dropout>,
}

impl LoraSaved {
    pub fn bytes(&self) -> usize {
        let mask = match &self.dropout {
            Some(Dropout::Mask(m)) | Some(Dropout::Key { bits: Some(m), .. }) => tensor_bytes(m),
            _ => 0,
        };
        tensor_bytes(&self.h) + tensor_bytes(&self.u) + mask
    }

    /// u = scale * dropout(x) A^T [N, r]: the branch's rank-r activation.
    pub fn u(&self) -> &Tensor {
        &self.u
    }
}

/// LoRA dropout: either a mask tensor (0 or 1/(1-p)), or, on the GPU, the key and p of a counter-based
/// mask the kernels recompute (the same values), and once the forward has applied it, the mask as bits (an
/// eighth of a byte an element) for the backward.
#[derive(Clone)]
pub enum Dropout {
    Mask(Tensor),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Key { key: u64, p: f64, bits: Option<Tensor> },
}

impl Dropout {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Dropout::Mask(m) => x * m,
            #[cfg(feature = "cuda")]
            Dropout::Key { key, p, .. } => Ok(super::cuda::dropout(x, *key, *p, false)?.0),
            #[cfg(not(feature = "cuda"))]
            Dropout::Key { .. } => unreachable!("key dropout is only built for the GPU"),
        }
    }
}

/// The branch up to rank r: h = dropout(x), u = scale * h A^T. Its delta u B^T goes with its linear through
/// [`linear_forward_delta`].
pub fn lora_forward(x: &Tensor, a: &Tensor, scale: f64, dropout: Option<Dropout>) -> Result<LoraSaved> {
    let a = a.to_dtype(x.dtype())?;
    #[cfg(feature = "cuda")]
    if let Some(Dropout::Key { key, p, .. }) = dropout {
        if let Some((h, u, bits)) = super::cuda::lora_a(x, &a, scale, key, p)? {
            return Ok(LoraSaved { h, u, dropout: Some(Dropout::Key { key, p, bits: Some(bits) }) });
        }
    }
    let (h, dropout) = match dropout {
        #[cfg(feature = "cuda")]
        Some(Dropout::Key { key, p, .. }) => {
            let (h, bits) = super::cuda::dropout(x, key, p, true)?;
            (h, Some(Dropout::Key { key, p, bits }))
        }
        Some(d) => (d.apply(x)?, Some(d)),
        None => (x.clone(), None),
    };
    let u = h.matmul(&a.t()?)?;
    let u = if scale == 1.0 { u } else { (u * scale)? }; // 1: folded into A already (GPU)
    Ok(LoraSaved { h, u, dropout })
}

/// y + u B^T for a delta's u [N, r] and B [out, r]. `y` is consumed: on the GPU the kernel adds into it in place
/// (it must be a fresh GEMM output).
pub fn lora_add(y: Tensor, u: &Tensor, b: &Tensor, fused: bool) -> Result<Tensor> {
    let b = b.to_dtype(y.dtype())?;
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, &y) {
        super::cuda::lora_up_add_(&y, u, &b)?;
        return Ok(y);
    }
    let _ = fused;
    y + u.matmul(&b.t()?)?
}

/// x W^T + u B^T: a frozen linear (no bias) with its LoRA delta, `delta` = (u [N, r], B [out, r]). On the GPU
/// (`fused`, r up to 32) the delta is written first and cuBLAS adds the product into it (beta = 1), so no kernel
/// reads and rewrites the output afterwards; elsewhere the delta is added to the product.
pub fn linear_forward_delta(x: &Tensor, w: &Tensor, delta: Option<(&Tensor, &Tensor)>, fused: bool) -> Result<Tensor> {
    linear_forward_onto(x, w, delta, None, fused, false)
}

/// `residual` + x W^T + u B^T: [`linear_forward_delta`] for a linear whose output goes onto the residual stream
/// (attention's o, the MLP's down). On the GPU with a delta the kernel writes residual + u B^T and cuBLAS adds
/// x W^T into that, so the residual add's pass over [N, out] is gone too; elsewhere [`residual_add`] (with the
/// `fused_add` switch) follows.
pub fn linear_forward_onto(x: &Tensor, w: &Tensor, delta: Option<(&Tensor, &Tensor)>, residual: Option<&Tensor>, fused: bool, fused_add: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (Some((u, b)), true) = (delta, super::fusion::on(fused, x) && w.dtype() == x.dtype()) {
        if let Some(y) = super::cuda::lora_up(u, &b.to_dtype(x.dtype())?, residual)? {
            super::cuda::linear_add_(&y, x, w)?;
            return Ok(y);
        }
    }
    let y = match delta {
        Some((u, b)) => lora_add(linear_forward(x, w, None)?, u, b, fused)?,
        None => linear_forward(x, w, None)?,
    };
    match residual {
        Some(r) => residual_add(r, &y, fused_add),
        None => Ok(y),
    }
}

/// What the LoRA branch's input gradient is added to (see [`lora_backward`]).
pub enum InputGrad<'a> {
    /// Nothing: the input gradient is not wanted (the lowest adapted layer's attention input: nothing below
    /// it trains), and none is computed.
    None,
    /// An input gradient already formed (consumed; updated in place on the GPU).
    Add(Tensor),
    /// The frozen linear's dy W, W [out, in], not yet formed: on the GPU (r up to 32) the branch's term is
    /// written first and cuBLAS adds dy W into it (as [`linear_forward_delta`]).
    Linear(&'a Tensor),
}

/// Backward of `delta = (scale * h A^T) B^T`, given d(delta) = dy, added onto the frozen linear's input
/// gradient `dx` (consumed; updated in place on the GPU):
///   dB = dy^T u            [out, r]
///   du = dy B              [N, r]  -> d(h A^T) = scale * du
///   dA = (scale du)^T h    [r, in]
///   dh = (scale du) A      [N, in] -> dx += dh * mask (dropout passes gradient only where it kept x)
/// Returns (dx, dA, dB); dA, dB in the parameter dtype; dx unless `dx` is [`InputGrad::None`].
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(saved: &LoraSaved, a: &Tensor, b: &Tensor, scale: f64, dy: &Tensor, dx: InputGrad, fused: bool) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let dtype = dy.dtype();
    let pdtype = a.dtype();
    let (a_c, b_c) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
    let db = dy.t()?.matmul(&saved.u)?;
    let du = dy.matmul(&b_c)?;
    let du = if scale == 1.0 { du } else { (du * scale)? };
    let da = du.t()?.matmul(&saved.h)?.to_dtype(pdtype)?;
    let dx = match dx {
        InputGrad::None => None,
        InputGrad::Add(dx) => Some(lora_input_grad(dx, &du, &a_c, saved.dropout.as_ref(), fused)?),
        InputGrad::Linear(w) => Some(linear_lora_input_grad(dy, w, &du, &a_c, saved.dropout.as_ref(), fused)?),
    };
    Ok((dx, da, db.to_dtype(pdtype)?))
}

/// The dropout as the GPU kernels take it: (key, p, the mask's bits), None for no dropout; Err for a mask
/// tensor (the composite path).
#[cfg(feature = "cuda")]
fn kernel_dropout(dropout: Option<&Dropout>) -> std::result::Result<Option<(u64, f64, Option<&Tensor>)>, ()> {
    match dropout {
        Some(Dropout::Key { key, p, bits }) => Ok(Some((*key, *p, bits.as_ref()))),
        Some(Dropout::Mask(_)) => Err(()),
        None => Ok(None),
    }
}

/// dy W + dropout(du A).
fn linear_lora_input_grad(dy: &Tensor, w: &Tensor, du: &Tensor, a: &Tensor, dropout: Option<&Dropout>, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (true, Ok(key)) = (super::fusion::on(fused, dy) && w.dtype() == dy.dtype(), kernel_dropout(dropout)) {
        if let Some(dx) = super::cuda::lora_down(du, a, key)? {
            super::cuda::matmul_add_(&dx, dy, w)?;
            return Ok(dx);
        }
    }
    lora_input_grad(linear_backward(dy, w)?, du, a, dropout, fused)
}

/// dx + dropout(du A).
fn lora_input_grad(dx: Tensor, du: &Tensor, a: &Tensor, dropout: Option<&Dropout>, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (true, Ok(key)) = (super::fusion::on(fused, &dx), kernel_dropout(dropout)) {
        super::cuda::lora_down_add_(&dx, du, a, key)?;
        return Ok(dx);
    }
    let _ = fused;
    let dh = du.matmul(a)?;
    let dh = match dropout {
        Some(d) => d.apply(&dh)?,
        None => dh,
    };
    dx + dh
}

/// A dropout mask [rows, cols] of 0 (probability p) and 1/(1-p), a pure function of `key` (see
/// [`rng::dropout_uniform`]) so recomputation during backward reproduces it exactly.
pub fn dropout_mask(key: u64, rows: usize, cols: usize, p: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    use rayon::prelude::*;
    let keep_scale = (1.0 / (1.0 - p)) as f32;
    let p = p as f32;
    // Generated on the host (in parallel: each element is independent). A GPU kernel computing the same
    // formula would avoid the upload for large models.
    let values: Vec<f32> = (0..(rows * cols) as u64)
        .into_par_iter()
        .map(|i| if rng::dropout_uniform(key, i) < p { 0.0 } else { keep_scale })
        .collect();
    Tensor::from_vec(values, (rows, cols), device)?.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------------------------
// SwiGLU (Qwen v1 MLP middle): h = a * silu(g) with a = w1(x) (up) and g = w2(x) (gate),
// silu(g) = g * sigmoid(g).
// Backward: da = dh * silu(g); dg = dh * a * silu'(g), silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).

pub struct SwiGluSaved {
    a: Tensor,
    g: Tensor,
}

impl SwiGluSaved {
    pub fn bytes(&self) -> usize {
        tensor_bytes(&self.a) + tensor_bytes(&self.g)
    }
}

/// x + y on the residual stream: on the GPU one kernel with 16-byte accesses (with the `norm` switch).
pub fn residual_add(x: &Tensor, y: &Tensor, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, x) {
        return super::cuda::residual_add(x, y);
    }
    let _ = fused;
    x + y
}

pub fn swiglu_forward(a: &Tensor, g: &Tensor, fused: bool) -> Result<(Tensor, SwiGluSaved)> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, a) {
        let h = super::cuda::swiglu_forward(a, g)?;
        return Ok((h, SwiGluSaved { a: a.clone(), g: g.clone() }));
    }
    let _ = fused;
    let h = (a * g.silu()?)?;
    Ok((h, SwiGluSaved { a: a.clone(), g: g.clone() }))
}

pub fn swiglu_backward(saved: &SwiGluSaved, dh: &Tensor, fused: bool) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, dh) {
        return super::cuda::swiglu_backward(&saved.a, &saved.g, dh);
    }
    let _ = fused;
    let g = &saved.g;
    let s = (g.neg()?.exp()? + 1.0)?.recip()?; // sigmoid(g)
    let silu = (g * &s)?;
    let da = (dh * &silu)?;
    let dsilu = ((g * (1.0 - &s)?)? + 1.0)?.mul(&s)?; // s * (1 + g (1 - s))
    let dg = ((dh * &saved.a)? * dsilu)?;
    Ok((da, dg))
}

// ---------------------------------------------------------------------------------------------------------
// Residual add: y = x + f(x). Forward is `x + fx`; backward sends dy unchanged to both branches, so the
// block's backward adds the branch's input gradient onto dy (see qwen.rs).
