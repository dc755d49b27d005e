//! One optimizer step: the step `lorahost run` takes and `lorahost bench train` times, so the benchmark
//! measures what a run does.
//!
//! forward + backward of each pass (padded micro-batch or padding-free row) -> gradients summed ->
//! normalised once by the trained tokens of the whole step (not per pass: transformers PR #34191) ->
//! clipped by global norm -> AdamW.
//!
//! On several ranks ([`Collective`]) each rank runs its share of the step's passes ([`split`]), the
//! gradient and loss sums are all-reduced before the normalisation, and every rank then takes the same
//! AdamW step on the same summed gradient, so the adapters stay identical. One rank is world size 1.
use super::batches::StepBatches;
use super::dist::Collective;
use super::split;
use super::optim::{self, AdamW};
use crate::model::lora::{Lora, LoraGrads};
use crate::rng::SplitMix;
use crate::model::transformer::{loss_value, Model};
use anyhow::bail;
use candle_core::Tensor;
use std::time::Instant;

/// What a step needs beyond its batches and learning rate.
#[derive(Debug, Clone)]
pub struct StepConfig {
    /// Seeds each pass's dropout (with the step and pass index).
    pub seed: u64,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub recompute: bool,
    /// Global gradient-norm clip.
    pub clip: Option<f64>,
}

/// The outcome of one step.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// Mean loss over the trained tokens of the step.
    pub loss: f64,
    /// Global norm of the normalised gradient, before clipping.
    pub grad_norm: f64,
    /// Positions counted in the loss.
    pub trained_tokens: usize,
    /// Tokens of the step's records (padding excluded).
    pub tokens: usize,
    /// Wall time of the step, from the first forward to the optimizer's update done on the device.
    pub seconds: f64,
}

impl StepOutcome {
    /// Real tokens (the records', no padding) per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Trains `lora` one step on `batches` (the whole step's passes; this rank runs its share) at learning
/// rate `lr`. A non-finite loss or gradient norm stops with an error naming the step and leaves the adapter
/// as it was (on every rank alike: they see the same sums): checked before the update where the host knows
/// them, else the update is a no-op on the device (`GradScale::Device`) and the error comes after it.
pub fn step(
    model: &Model,
    lora: &mut Lora,
    opt: &mut AdamW,
    batches: &StepBatches,
    lr: f64,
    c: &StepConfig,
    comm: &dyn Collective,
) -> anyhow::Result<StepOutcome> {
    let t0 = Instant::now();
    let number = batches.step + 1;
    // The first pass's gradients are taken as they are: no zeros to add them to (240 tensors at Qwen-14B:
    // each a launch while the device waits, at the start and the end of a step).
    let mut grads: Option<LoraGrads> = None;
    // The loss sum stays where the model computed it (on a GPU: there) until the update is queued: reading it
    // earlier would leave the device idle while the host frees the step's tensors and builds the update.
    let mut loss_sum: Option<Tensor> = None;
    let mut n_tokens = 0usize;
    let mine = split::assign(&batches.passes, comm.world_size()).swap_remove(comm.rank());
    for pass in mine {
        let batch = &batches.passes[pass];
        let (ids, labels) = batch.tensors()?;
        // Keyed by the pass's index in the whole step, so its draws do not depend on the number of ranks.
        let mut dropout = SplitMix::for_stream(c.seed, &[batches.step, pass as u64]);
        let out = model.loss_and_grads(&ids, &labels, batch.cu_seqlens.as_deref(), lora, &mut dropout, c.recompute)?;
        debug_assert_eq!(out.n_tokens, batch.trained, "the model and the batch count the same positions");
        match grads.as_mut() {
            None => grads = Some(out.grads),
            Some(g) => g.add_assign(&out.grads)?,
        }
        loss_sum = Some(match loss_sum {
            None => out.loss,
            Some(l) => {
                let other = out.loss.to_device(l.device())?;
                (l + other)?
            }
        });
        n_tokens += out.n_tokens;
    }
    // A rank with no pass of this step contributes zeros.
    let mut grads = match grads {
        Some(g) => g,
        None => LoraGrads::zeros_like(lora)?,
    };
    // Gradients in f32, summed over the ranks in rank order (no-ops on one rank). Several ranks sum the loss
    // on the host (and so wait for it here).
    comm.all_reduce_sum(&mut grads.tensors_mut())?;
    if comm.world_size() > 1 {
        let mut sums = [loss_sum.as_ref().map_or(Ok(0.0), loss_value)?, n_tokens as f64];
        comm.all_reduce_sum_scalars(&mut sums)?;
        loss_sum = Some(Tensor::new(sums[0], &candle_core::Device::Cpu)?);
        n_tokens = sums[1] as usize;
    }
    debug_assert_eq!(n_tokens, batches.passes.iter().map(|b| b.trained).sum::<usize>(), "every pass ran once");
    // The division by the trained tokens and the clipping factor are applied inside the optimizer step (one
    // pass over the gradients, not three); on a GPU that factor is worked out there, and a non-finite norm or
    // loss makes the update a no-op.
    let per_token = 1.0 / n_tokens.max(1) as f64;
    let scale = optim::GradScale::compute(&grads.tensors(), loss_sum.as_ref(), per_token, c.clip, model.fusion.optimizer)?;
    let loss_of = |l: &Option<Tensor>| -> anyhow::Result<f64> {
        let sum = l.as_ref().map_or(Ok(0.0), loss_value)?;
        Ok(if n_tokens > 0 { sum / n_tokens as f64 } else { 0.0 })
    };
    let finite = |loss: f64, grad_norm: f64| -> anyhow::Result<()> {
        if !loss.is_finite() {
            bail!("the loss is {loss} at step {number} (learning rate too high? bad data?); stopping without writing");
        }
        if !grad_norm.is_finite() {
            bail!("the gradient norm is {grad_norm} at step {number} (loss {loss}); stopping without writing");
        }
        Ok(())
    };
    // What the host knows already is checked before the adapter is touched.
    let loss_on_host = loss_sum.as_ref().is_none_or(|l| !l.device().is_cuda());
    match &scale {
        optim::GradScale::Host { norm, .. } => finite(loss_of(&loss_sum)?, *norm)?,
        optim::GradScale::Device(_) if loss_on_host => finite(loss_of(&loss_sum)?, 0.0)?,
        optim::GradScale::Device(_) => {}
    }
    opt.step_with(&mut lora.params_mut(), &grads.tensors(), lr, &scale)?;
    // The gradients' frees are queued while the device still runs the update, not after it (the host's work
    // between steps is time the device waits).
    drop(grads);
    model.device.synchronize()?;
    let (loss, grad_norm) = (loss_of(&loss_sum)?, scale.norm()?);
    finite(loss, grad_norm)?; // on the device, a non-finite one skipped the update
    Ok(StepOutcome { loss, grad_norm, trained_tokens: n_tokens, tokens: batches.tokens(), seconds: t0.elapsed().as_secs_f64() })
}
