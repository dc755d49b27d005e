//! Causal self-attention pieces, forward and backward side by side: head split/merge (layout only),
//! rotary position embeddings (RoPE), and scaled dot-product attention with a causal mask.
//! Layout inside attention is [B, H, T, D] (batch, head, time, head dim), contiguous.
use super::ops::acc_dtype;
use candle_core::{DType, Device, Result, Tensor, D};

// ---------------------------------------------------------------------------------------------------------
// Head split / merge. c_attn's output [N, 3C] holds q | k | v along features, each C = H * D wide with
// head h at features h*D .. (h+1)*D. The backward of a split is a concatenation and vice versa.

/// [N, 3C] -> q, k, v, each [B, H, T, D] contiguous.
pub fn split_qkv(qkv: &Tensor, b: usize, t: usize, h: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let c = h * d;
    let part = |i: usize| qkv.narrow(1, i * c, c)?.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous();
    Ok((part(0)?, part(1)?, part(2)?))
}

/// c_attn's output, as its parts (base = x W^T; bias; the LoRA delta u B^T from `lora` = (u [N, r],
/// B [3C, r])), to rotated q, k and v [B, H, T, D]. The fused kernel adds the parts, splits the heads and
/// applies RoPE in one pass.
#[allow(clippy::too_many_arguments)]
pub fn qkv_forward(base: &Tensor, bias: &Tensor, lora: Option<(&Tensor, &Tensor)>, rope: &Rope, b: usize, t: usize, h: usize, d: usize, fused: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let lora = match lora {
        Some((u, lb)) => Some((u, lb.to_dtype(base.dtype())?)),
        None => None,
    };
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, base) {
        let lora = lora.as_ref().map(|(u, lb)| (*u, lb));
        return super::cuda::qkv_split_rope(base, Some(bias), lora, &rope.cos, &rope.sin, b, t, h, d);
    }
    let _ = fused;
    let mut qkv = base.broadcast_add(bias)?;
    if let Some((u, lb)) = &lora {
        qkv = (qkv + u.matmul(&lb.t()?)?)?;
    }
    let (q, k, v) = split_qkv(&qkv, b, t, h, d)?;
    Ok((rope_forward(&q, rope)?, rope_forward(&k, rope)?, v))
}

/// Backward of [`qkv_forward`]: dq, dk (rotated back) and dv -> d(qkv) [N, 3C].
pub fn qkv_backward(dq: &Tensor, dk: &Tensor, dv: &Tensor, rope: &Rope, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, dq) {
        return super::cuda::qkv_merge_unrope(dq, dk, dv, &rope.cos, &rope.sin);
    }
    let _ = fused;
    let (dq, dk) = (rope_backward(dq, rope)?, rope_backward(dk, rope)?);
    Tensor::cat(&[merge_heads(&dq, rope, false)?, merge_heads(&dk, rope, false)?, merge_heads(dv, rope, false)?], 1)
}

/// [B, H, T, D] -> [N, C] contiguous (head-major features, as c_proj expects). `rope` is only the
/// fused kernel's (unread) table argument.
pub fn merge_heads(y: &Tensor, rope: &Rope, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, y) {
        return super::cuda::merge_heads(y, &rope.cos, &rope.sin);
    }
    let _ = (fused, rope);
    let (b, h, t, d) = y.dims4()?;
    y.transpose(1, 2)?.contiguous()?.reshape((b * t, h * d))
}

/// Backward of [`merge_heads`]: [N, C] -> [B, H, T, D].
pub fn merge_heads_backward(dy: &Tensor, b: usize, t: usize, h: usize, d: usize, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, dy) {
        return super::cuda::split_heads(dy, b, t, h, d);
    }
    let _ = fused;
    dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
}

// ---------------------------------------------------------------------------------------------------------
// RoPE, non-interleaved ("rotate_half"), over the full head dim, as Qwen v1:
//   y = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1]   (halves of the head dim)
// with angle(t, j) = t * base^(-2 (j mod D/2) / D). It is a rotation R per (t, pair), so the backward is
// the transposed rotation: dx = dy * cos + rotate_half^T(dy * sin),  rotate_half^T([g1, g2]) = [g2, -g1].
// Computed in f32 (acc dtype) and cast back, as Qwen does.

#[derive(Clone)]
pub struct Rope {
    /// [T, D] in the accumulation dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables of positions 0..t (rows of these; contiguous views, no copy).
    pub fn prefix(&self, t: usize) -> Result<Rope> {
        Ok(Rope { cos: self.cos.narrow(0, 0, t)?, sin: self.sin.narrow(0, 0, t)? })
    }

    /// Tables for positions 0..seq_len. The angles are computed in f32 exactly as the HF code does
    /// (`inv_freq = 1 / base ** (arange(0, D, 2) / D)`, `outer(t, inv_freq)`), then cos/sin.
    pub fn new(seq_len: usize, head_dim: usize, base: f64, model_dtype: DType, device: &Device) -> Result<Rope> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(seq_len * head_dim);
        let mut sin = Vec::with_capacity(seq_len * head_dim);
        for t in 0..seq_len {
            for j in 0..head_dim {
                let angle = (t as f32 * inv_freq[j % half]) as f64;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let acc = acc_dtype(model_dtype);
        let cos = Tensor::from_vec(cos, (seq_len, head_dim), device)?.to_dtype(acc)?;
        let sin = Tensor::from_vec(sin, (seq_len, head_dim), device)?.to_dtype(acc)?;
        Ok(Rope { cos, sin })
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

fn rotate_half_transposed(g: &Tensor) -> Result<Tensor> {
    let half = g.dim(D::Minus1)? / 2;
    let g1 = g.narrow(D::Minus1, 0, half)?;
    let g2 = g.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&g2, &g1.neg()?], D::Minus1)
}

/// x [B, H, T, D] -> rotated x, same dtype.
pub fn rope_forward(x: &Tensor, rope: &Rope) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(rope.cos.dtype())?;
    let y = (xf.broadcast_mul(&rope.cos)? + rotate_half(&xf)?.broadcast_mul(&rope.sin)?)?;
    y.to_dtype(dtype)
}

pub fn rope_backward(dy: &Tensor, rope: &Rope) -> Result<Tensor> {
    let dtype = dy.dtype();
    let g = dy.to_dtype(rope.cos.dtype())?;
    let dx = (g.broadcast_mul(&rope.cos)? + rotate_half_transposed(&g.broadcast_mul(&rope.sin)?)?)?;
    dx.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------------------------
// Scaled dot-product attention with a causal mask:
//   s = q k^T / sqrt(D) + mask   (mask: 0 where key <= query, -inf above the diagonal)
//   p = softmax(s) along keys,  y = p v
// Backward, with dy:
//   dv = p^T dy;  dp = dy v^T;  ds = p * (dp - sum_keys(dp * p))   (softmax backward);
//   dq = ds k / sqrt(D);  dk = ds^T q / sqrt(D).
// Masked entries have p = 0, so their ds is 0 and nothing flows to future keys.
// Scores, softmax and its backward run in the acc dtype (f32 for bf16); matmuls in the model dtype.

/// [T, T] additive causal mask in the acc dtype.
pub fn causal_mask(t: usize, model_dtype: DType, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(m, (t, t), device)?.to_dtype(acc_dtype(model_dtype))
}

/// From this length on (and without recomputation) the training step uses flash attention: measured on an
/// H100 at the Qwen-14B shape, 1024-token steps are faster with the scores in memory, while 2048-token
/// steps only fit in 80 GB without recomputation with flash attention.
pub const FLASH_MIN_SEQ: usize = 2048;

pub struct AttnSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Softmax probabilities [B, H, T, T]: the acc dtype on the composite path, bf16 from the fused kernel
    /// (what the following matmul consumes anyway). None after flash attention.
    p: Option<Tensor>,
    /// Flash attention's output [B, H, T, D] and per-row log-sum-exp [B, H, T] (its backward recomputes
    /// the probabilities from them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    flash: Option<(Tensor, Tensor)>,
}

/// `mask` is needed only by the composite path (the fused softmax masks by index). `fused`: scores from
/// one GEMM and the fused softmax kernels; with `flash` too (and head dim 128), flash attention.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, fused: bool, flash: bool) -> Result<(Tensor, AttnSaved)> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, q) {
        let saved = |p, flash| AttnSaved { q: q.clone(), k: k.clone(), v: v.clone(), p, flash };
        if flash && q.dim(D::Minus1)? == super::cuda::FLASH_HEAD_DIM {
            let (y, lse) = super::cuda::flash_forward(q, k, v, scale)?;
            return Ok((y.clone(), saved(None, Some((y, lse)))));
        }
        let p = super::cuda::causal_softmax(&super::cuda::attention_scores(q, k, scale)?)?;
        let y = p.matmul(v)?;
        return Ok((y, saved(Some(p), None)));
    }
    let _ = (fused, flash);
    let Some(mask) = mask else { candle_core::bail!("attention_forward: the composite path needs the causal mask") };
    let s = (q.matmul(&k.t()?)?.to_dtype(mask.dtype())? * scale)?.broadcast_add(mask)?;
    let s_max = s.max_keepdim(D::Minus1)?; // finite: the diagonal is never masked
    let e = s.broadcast_sub(&s_max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let y = p.to_dtype(dtype)?.matmul(v)?;
    Ok((y, AttnSaved { q: q.clone(), k: k.clone(), v: v.clone(), p: Some(p), flash: None }))
}

/// Returns (dq, dk, dv), each [B, H, T, D].
pub fn attention_backward(saved: &AttnSaved, dy: &Tensor, fused: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = dy.dtype();
    let scale = 1.0 / (saved.q.dim(D::Minus1)? as f64).sqrt();
    #[cfg(feature = "cuda")]
    if let Some((o, lse)) = &saved.flash {
        return super::cuda::flash_backward(&saved.q, &saved.k, &saved.v, o, lse, dy, scale);
    }
    let Some(p) = &saved.p else { candle_core::bail!("attention_backward: no saved probabilities") };
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, dy) {
        let dv = p.t()?.matmul(dy)?;
        let dp = dy.matmul(&saved.v.t()?)?;
        let ds = super::cuda::causal_softmax_backward(p, &dp, scale)?;
        return Ok((ds.matmul(&saved.k)?, ds.t()?.matmul(&saved.q)?, dv));
    }
    let _ = fused;
    let p_m = p.to_dtype(dtype)?;
    let dv = p_m.t()?.matmul(dy)?;
    let dp = dy.matmul(&saved.v.t()?)?.to_dtype(p.dtype())?;
    let row_dot = (&dp * p)?.sum_keepdim(D::Minus1)?;
    let ds = ((dp.broadcast_sub(&row_dot)? * p)? * scale)?.to_dtype(dtype)?;
    let dq = ds.matmul(&saved.k)?;
    let dk = ds.t()?.matmul(&saved.q)?;
    Ok((dq, dk, dv))
}
