//! The optimizer step and the gradient norm over every adapter tensor, one launch each.
use super::launch::*;
use candle_core::{bail, DType, Result, Tensor};

// ----- optimizer ------------------------------------------------------------------------------------------

/// AdamW hyper-parameters of one step, already combined (see train/optim.rs for the formula).
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step_size: f64,
    pub bias_correction2_sqrt: f64,
}

/// One AdamW step of every (param, grad, m, v) in one launch; returns the new parameters (the inputs are left
/// as they are) and updates the moments in place: the optimizer owns them and nothing else holds them, and
/// 480 fresh moment tensors a step at Qwen-14B would each cost an allocation and a free while the device
/// waits for the host. All f32, contiguous, on one GPU. `scale`: f32 [2] on the GPU, element 1 the factor
/// every gradient is multiplied by ([`grad_scale`]); not finite: the step is skipped (parameters copied).
pub fn adamw_multi(items: &[(&Tensor, &Tensor, &Tensor, &Tensor)], h: &AdamWStep, scale: &Tensor) -> Result<Vec<Tensor>> {
    let Some(first) = items.first() else { return Ok(Vec::new()) };
    let dev = cuda_device(first.0)?;
    let mut words = Vec::with_capacity(8 * items.len());
    let mut outs = Vec::with_capacity(items.len());
    let mut max_n = 0;
    for (p, g, m, v) in items {
        let n = p.elem_count();
        if g.elem_count() != n || m.elem_count() != n || v.elem_count() != n {
            bail!("adamw_multi: sizes differ");
        }
        if !m.is_contiguous() || !v.is_contiguous() {
            bail!("adamw_multi: the moments must be contiguous (they are updated in place)");
        }
        let (p, g) = (p.contiguous()?, g.contiguous()?);
        let out = uninit(&dev, p.shape(), DType::F32)?;
        for t in [&p, &g, *m, *v, &out, *m, *v] {
            words.push(device_ptr(t)?);
        }
        words.push(n as u64);
        max_n = max_n.max(n);
        // Keep the (possibly copied) inputs alive until the kernel is queued.
        outs.push((out, [p, g]));
    }
    let table = table(&dev, words)?;
    let args = [
        Arg::T(&table),
        Arg::F(h.lr as f32),
        Arg::F(h.beta1 as f32),
        Arg::F(h.beta2 as f32),
        Arg::F(h.eps as f32),
        Arg::F(h.weight_decay as f32),
        Arg::F(h.step_size as f32),
        Arg::F(h.bias_correction2_sqrt as f32),
        Arg::T(scale),
    ];
    let grid_x = blocks(max_n, EW_THREADS)?.min(64);
    launch_2d(&dev, "adamw_multi", (grid_x, items.len() as u32), EW_THREADS, &args)?;
    Ok(outs.into_iter().map(|(out, _inputs)| out).collect())
}

/// Sum of squares of all elements of all tensors (f32, on one GPU), as an f32 scalar tensor on the GPU.
pub fn sum_squares_multi(tensors: &[&Tensor]) -> Result<Tensor> {
    sum_squares_partials(tensors)?.sum_all()
}

/// The factor an update multiplies the gradients `grads` by, on the GPU (f32 [2]: the global norm times
/// `per_token`, and `per_token` times the clip coefficient for `max_norm`, or NaN when the norm or `loss_sum`
/// (an f64 scalar) is not finite), with no wait for the host.
pub fn grad_scale(grads: &[&Tensor], loss_sum: Option<&Tensor>, per_token: f64, max_norm: Option<f64>) -> Result<Tensor> {
    let partials = sum_squares_partials(grads)?;
    let dev = cuda_device(&partials)?;
    let out = uninit(&dev, 2, DType::F32)?;
    let loss = match loss_sum {
        Some(l) if l.dtype() == DType::F64 && l.elem_count() == 1 => Arg::T(l),
        Some(l) => bail!("grad_scale: the loss sum must be one f64, got {:?} {:?}", l.dtype(), l.dims()),
        None => Arg::U(0),
    };
    let args = [Arg::T(&partials), Arg::I(partials.elem_count() as i32), loss, Arg::U(per_token.to_bits()), Arg::U(max_norm.unwrap_or(0.0).to_bits()), Arg::T(&out)];
    launch(&dev, "grad_scale", 1, ROW_THREADS, &args)?;
    Ok(out)
}

/// One partial sum of squares per (tensor, block) of `tensors`: f32 [tensors, blocks].
fn sum_squares_partials(tensors: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = tensors.first() else { bail!("sum_squares_multi: no tensors") };
    let dev = cuda_device(first)?;
    let mut words = Vec::with_capacity(2 * tensors.len());
    let mut keep = Vec::with_capacity(tensors.len());
    let mut max_n = 0;
    for t in tensors {
        let t = t.contiguous()?;
        words.push(device_ptr(&t)?);
        words.push(t.elem_count() as u64);
        max_n = max_n.max(t.elem_count());
        keep.push(t);
    }
    let table = table(&dev, words)?;
    let grid_x = blocks(max_n, ROW_THREADS)?.min(64);
    // One partial sum per block, summed by candle (a fixed reduction order: deterministic).
    let out = uninit(&dev, (tensors.len(), grid_x as usize), DType::F32)?;
    launch_2d(&dev, "sum_squares_multi", (grid_x, tensors.len() as u32), ROW_THREADS, &[Arg::T(&table), Arg::T(&out)])?;
    drop(keep);
    Ok(out)
}


/// Every tensor cast to `to` (f32 -> bf16 or bf16 -> f32) in one launch: the adapter's ~240 parameters and
/// gradients at Qwen-14B, each of which would be a launch of its own.
pub fn cast_multi(tensors: &[&Tensor], to: DType) -> Result<Vec<Tensor>> {
    cast_multi_scaled(&tensors.iter().map(|t| (*t, 1.0)).collect::<Vec<_>>(), to)
}

/// [`cast_multi`] with each tensor multiplied by its factor on the way (in f32).
pub fn cast_multi_scaled(tensors: &[(&Tensor, f32)], to: DType) -> Result<Vec<Tensor>> {
    let Some(first) = tensors.first() else { return Ok(Vec::new()) };
    let from = match to {
        DType::BF16 => DType::F32,
        DType::F32 => DType::BF16,
        other => bail!("cast_multi: to {other:?} (f32 and bf16 only)"),
    };
    let dev = cuda_device(first.0)?;
    let mut words = Vec::with_capacity(4 * tensors.len());
    let mut keep = Vec::with_capacity(tensors.len());
    let mut outs = Vec::with_capacity(tensors.len());
    let mut max_n = 0;
    for &(t, factor) in tensors {
        if t.dtype() != from {
            bail!("cast_multi: a {:?} tensor among {from:?} ones", t.dtype());
        }
        let t = t.contiguous()?;
        let out = uninit(&dev, t.shape(), to)?;
        words.extend([device_ptr(&t)?, device_ptr(&out)?, t.elem_count() as u64, factor.to_bits() as u64]);
        max_n = max_n.max(t.elem_count());
        keep.push(t);
        outs.push(out);
    }
    let table = table(&dev, words)?;
    let grid_x = blocks(max_n, EW_THREADS)?.min(64);
    launch_2d(&dev, "cast_multi", (grid_x, tensors.len() as u32), EW_THREADS, &[Arg::T(&table), Arg::I((to == DType::BF16) as i32)])?;
    drop(keep);
    Ok(outs)
}
