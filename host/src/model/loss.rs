//! lm_head + masked next-token cross-entropy, forward and backward fused and chunked over tokens, so the
//! [tokens, vocab] logits never exist for more than `chunk` tokens at a time (2048 x 152064 f32 would be
//! 1.25 GB). Only counted tokens go through lm_head at all: prompt tokens cost nothing here.
//!
//! Per counted position i with logits z = h_i W^T (W = lm_head [V, C], frozen) and target y:
//!   loss_i = logsumexp(z) - z[y]
//!   dz     = softmax(z) - onehot(y)
//!   dh_i   = dz W
//! The loss is a plain sum; the caller divides by the number of counted tokens of the whole accumulated
//! batch (and scales the gradients the same way).
use super::ops::{acc_dtype, linear_backward, linear_forward};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// Tokens per chunk of the loss on `device`. On the CPU small chunks keep the [chunk, vocab] logits
/// cache-friendly (64 x 152k f32 is 39 MB; 512 would be 311 MB of fresh memory per chunk); on the GPU
/// bigger chunks mean fewer, fuller launches of the fused loss kernel (1024 x 152k bf16 logits: 311 MB).
pub fn default_chunk(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        64
    } else {
        1024
    }
}

/// HF convention for labels: [B, T] with -100 (any negative) meaning "not trained"; position t of a row is
/// trained to predict `labels[t + 1]` (the shift happens here, as in HF's `QWenLMHeadModel`).
pub const IGNORE_INDEX: i64 = -100;

/// The counted positions of a batch: which rows of the flattened [B*T, C] hidden states predict what.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// Row index into [B*T] (b * T + t).
    pub rows: Vec<u32>,
    /// The token row `rows[i]` must predict.
    pub tokens: Vec<u32>,
}

impl Targets {
    /// From HF-style labels (one Vec per sequence, all of the same length).
    pub fn from_labels(labels: &[Vec<i64>], vocab_size: usize) -> Result<Targets> {
        let mut out = Targets::default();
        let t_len = labels.first().map_or(0, |r| r.len());
        for (b, row) in labels.iter().enumerate() {
            if row.len() != t_len {
                bail!("labels row {b} has length {}, expected {t_len}", row.len());
            }
            for t in 0..t_len.saturating_sub(1) {
                let y = row[t + 1];
                if y < 0 {
                    continue;
                }
                if y as u64 >= vocab_size as u64 {
                    bail!("label {y} at row {b}, position {} is outside the vocabulary ({vocab_size})", t + 1);
                }
                out.rows.push((b * t_len + t) as u32);
                out.tokens.push(y as u32);
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Drops the positions whose next token begins a new sequence (`starts[row + 1]`).
    pub fn drop_before(&mut self, starts: &[bool]) {
        let before_start = |r: u32| starts.get(r as usize + 1).copied().unwrap_or(false);
        (self.rows, self.tokens) = self.rows.iter().zip(&self.tokens).filter(|(&r, _)| !before_start(r)).map(|(&r, &y)| (r, y)).unzip();
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Returns the summed loss (an f64 scalar tensor, read it with `to_scalar` once the backward is queued: on
/// the GPU reading it waits for the device) and, when `want_grad`, d(loss)/d(hf) [N, C] in hf's dtype.
/// `fused`: one GPU kernel per chunk for logsumexp, loss and dz (see [`super::fusion`]).
pub fn cross_entropy(hf: &Tensor, lm_head: &Tensor, targets: &Targets, chunk: usize, want_grad: bool, fused: bool) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, hf) {
        return cross_entropy_fused(hf, lm_head, targets, chunk, want_grad);
    }
    let _ = fused;
    let device = hf.device();
    let dtype = hf.dtype();
    let acc = acc_dtype(dtype);
    let mut loss_sum = 0.0f64;
    let mut dhf = if want_grad { Some(hf.zeros_like()?) } else { None };
    let chunk = chunk.max(1);
    for start in (0..targets.len()).step_by(chunk) {
        let end = (start + chunk).min(targets.len());
        let n = end - start;
        let rows = Tensor::from_slice(&targets.rows[start..end], n, device)?;
        let tokens = Tensor::from_slice(&targets.tokens[start..end], (n, 1), device)?;

        // Forward: logits of the counted rows only, then a stable logsumexp.
        let h = hf.index_select(&rows, 0)?;
        let z = linear_forward(&h, lm_head, None)?.to_dtype(acc)?; // [n, V]
        let z_max = z.max_keepdim(D::Minus1)?;
        let e = z.broadcast_sub(&z_max)?.exp()?;
        let sum_e = e.sum_keepdim(D::Minus1)?;
        let lse = (sum_e.log()? + z_max)?; // [n, 1]
        let picked = z.gather(&tokens, 1)?; // [n, 1]
        loss_sum += (lse - picked)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;

        // Backward: dz = softmax(z) - onehot(y), then dh = dz W, scattered back to the rows.
        if let Some(acc_grad) = dhf.as_mut() {
            let probs = e.broadcast_div(&sum_e)?;
            let minus_one = Tensor::full(-1.0f32, (n, 1), device)?.to_dtype(acc)?;
            let dz = probs.scatter_add(&tokens, &minus_one, 1)?;
            let dh = linear_backward(&dz.to_dtype(dtype)?, lm_head)?;
            *acc_grad = acc_grad.index_add(&rows, &dh, 0)?;
        }
    }
    Ok((Tensor::new(loss_sum, &candle_core::Device::Cpu)?, dhf))
}

/// [`cross_entropy`] with the per-chunk math in one kernel; the losses stay on the GPU.
#[cfg(feature = "cuda")]
fn cross_entropy_fused(hf: &Tensor, lm_head: &Tensor, targets: &Targets, chunk: usize, want_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
    let device = hf.device();
    let mut losses = Vec::new();
    let mut dhf = if want_grad { Some(hf.zeros_like()?) } else { None };
    // The counted positions are distinct rows: their gradients are scattered into the zeros (8 columns at a
    // time, so whole groups of 8), not index_added.
    let scatter = hf.dim(D::Minus1)? % 8 == 0;
    for start in (0..targets.len()).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(targets.len());
        let rows = Tensor::from_slice(&targets.rows[start..end], end - start, device)?;
        let tokens = Tensor::from_slice(&targets.tokens[start..end], end - start, device)?;
        let z = linear_forward(&hf.index_select(&rows, 0)?, lm_head, None)?;
        let (loss, dz) = super::cuda::cross_entropy_rows(&z, &tokens, want_grad)?;
        drop(z);
        losses.push(loss.sum_all()?);
        if let (Some(acc), Some(dz)) = (dhf.as_mut(), dz) {
            let dh = linear_backward(&dz, lm_head)?;
            match scatter {
                true => super::cuda::scatter_rows_(acc, &rows, &dh)?,
                false => *acc = acc.index_add(&rows, &dh, 0)?,
            }
        }
    }
    let loss_sum = match losses.len() {
        0 => Tensor::new(0f64, device)?,
        _ => Tensor::stack(&losses, 0)?.sum_all()?.to_dtype(DType::F64)?,
    };
    Ok((loss_sum, dhf))
}
