//! AdamW (PyTorch `torch.optim.AdamW` semantics) with f32 moments, and global-norm gradient clipping
//! (`torch.nn.utils.clip_grad_norm_`).
//!
//! One AdamW step for parameter p with gradient g at step t (1-based), learning rate lr:
//! ```text
//! p  = p * (1 - lr * weight_decay)                 decoupled weight decay, before the Adam update
//! m  = beta1 * m + (1 - beta1) * g
//! v  = beta2 * v + (1 - beta2) * g^2
//! p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//! Parameters are updated by replacing the tensors. On the GPU (f32 parameters) the whole step is one kernel
//! launch over every tensor (model/cuda: `adamw_multi`) instead of a dozen small ops per tensor; the gradient
//! norm likewise. The gradient may be scaled on the way in (`grad_scale`: the 1/tokens normalisation and the
//! clipping coefficient), which saves a pass over the gradients; on the GPU that factor is worked out on the
//! device ([`GradScale::Device`]), so the host queues the update without waiting for the norm.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults (betas 0.9 / 0.999, eps 1e-8, weight decay 0.01).
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// AdamW state for a fixed, named list of parameters.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far (t of the last step).
    step: u64,
    names: Vec<String>,
    /// First and second moments, f32 (f64 when the parameter is f64).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Use the one-launch GPU kernel when the parameters are f32 on a GPU (default).
    pub fused: bool,
}

fn moment_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

const FORMAT: &str = "lorahost-adamw-v1";

impl AdamW {
    /// Zero moments for `params` (named, e.g. by `Lora::param_names`, for saving).
    pub fn new(config: AdamWConfig, names: Vec<String>, params: &[&Tensor]) -> Result<AdamW> {
        if names.len() != params.len() {
            bail!("AdamW: {} names for {} parameters", names.len(), params.len());
        }
        let zeros = |p: &&Tensor| p.zeros_like()?.to_dtype(moment_dtype(p.dtype()));
        let m = params.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { config, step: 0, names, m, v, fused: true })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter with its gradient, at learning rate `lr` (from the schedule).
    pub fn step(&mut self, params: &mut [&mut Tensor], grads: &[&Tensor], lr: f64) -> Result<()> {
        self.step_scaled(params, grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first.
    pub fn step_scaled(&mut self, params: &mut [&mut Tensor], grads: &[&Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.step_with(params, grads, lr, &GradScale::Host { norm: f64::NAN, scale: grad_scale })
    }

    /// [`AdamW::step`] with every gradient multiplied by `scale`'s factor first; a factor worked out on the
    /// device that is not finite skips the update there (parameters and moments stay as they are).
    pub fn step_with(&mut self, params: &mut [&mut Tensor], grads: &[&Tensor], lr: f64, scale: &GradScale) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            bail!("AdamW: built for {} parameters, got {} parameters and {} gradients", self.m.len(), params.len(), grads.len());
        }
        let c = &self.config;
        self.step += 1;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        for i in 0..params.len() {
            if params[i].dims() != grads[i].dims() || params[i].dims() != self.m[i].dims() {
                bail!("AdamW: parameter {} has shape {:?}, gradient {:?}, state {:?}", self.names[i], params[i].dims(), grads[i].dims(), self.m[i].dims());
            }
        }
        #[cfg(feature = "cuda")]
        if self.fused && all_on_gpu_f32(params.iter().map(|p| &**p).chain(grads.iter().copied())) {
            use crate::model::cuda;
            let items: Vec<_> = (0..params.len()).map(|i| (&*params[i], grads[i], &self.m[i], &self.v[i])).collect();
            let h = cuda::AdamWStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                step_size,
                bias_correction2_sqrt,
            };
            let on_device = match scale {
                GradScale::Device(t) => t.clone(),
                GradScale::Host { norm, scale } => Tensor::new(&[*norm as f32, *scale as f32], params[0].device())?,
            };
            // The moments are updated in place, the parameters replaced.
            let new = cuda::adamw_multi(&items, &h, &on_device)?;
            for (i, p) in new.into_iter().enumerate() {
                *params[i] = p;
            }
            return Ok(());
        }
        let grad_scale = scale.scale()?;
        for i in 0..params.len() {
            let p = &mut *params[i];
            let work = self.m[i].dtype();
            let mut g = grads[i].to_dtype(work)?;
            if grad_scale != 1.0 {
                g = (g * grad_scale)?;
            }
            let pw = (p.to_dtype(work)? * (1.0 - lr * c.weight_decay))?;
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bias_correction2_sqrt)? + c.eps)?;
            let update = ((&self.m[i] / denom)? * step_size)?;
            *p = (pw - update)?.to_dtype(p.dtype())?;
        }
        Ok(())
    }

    /// Saves the moments and step count (safetensors: `m.<name>`, `v.<name>`; step in the metadata),
    /// atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::fsutil::write_atomic(path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// The state as [`AdamW::save`] writes it (also how rank 0 hands it to the other ranks).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, name) in self.names.iter().enumerate() {
            tensors.push((format!("m.{name}"), self.m[i].to_device(&Device::Cpu)?));
            tensors.push((format!("v.{name}"), self.v[i].to_device(&Device::Cpu)?));
        }
        let c = &self.config;
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("step", self.step.to_string()),
            ("beta1", c.beta1.to_string()),
            ("beta2", c.beta2.to_string()),
            ("eps", c.eps.to_string()),
            ("weight_decay", c.weight_decay.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(tensors, Some(metadata)).context("cannot serialise the optimizer state")
    }

    /// Restores a state saved by [`AdamW::save`] for the same named parameters (checked).
    /// `config` is the one to continue with (hyper-parameters may change between runs; the step count
    /// and moments come from the file).
    pub fn load(path: &Path, config: AdamWConfig, names: Vec<String>, params: &[&Tensor]) -> Result<AdamW> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string(), config, names, params)
    }

    /// [`AdamW::load`] from bytes [`AdamW::to_bytes`] gave; `origin` names them in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str, config: AdamWConfig, names: Vec<String>, params: &[&Tensor]) -> Result<AdamW> {
        let p = origin;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("{p}: not a valid safetensors file (truncated or corrupt?): {e}"))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| anyhow::anyhow!("{p}: {e}"))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{p}: not an AdamW state written by lorahost (format {:?})", meta.get("format"));
        }
        let step: u64 = meta.get("step").and_then(|s| s.parse().ok()).with_context(|| format!("{p}: missing step count"))?;
        if names.len() != params.len() || st.len() != 2 * names.len() {
            bail!("{p}: holds {} tensors, expected {} (m and v for {} parameters)", st.len(), 2 * names.len(), names.len());
        }
        let device = params.first().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        let mut m = Vec::new();
        let mut v = Vec::new();
        for (name, param) in names.iter().zip(params) {
            for (prefix, out) in [("m", &mut m), ("v", &mut v)] {
                let key = format!("{prefix}.{name}");
                let view = st.tensor(&key).map_err(|_| anyhow::anyhow!("{p}: missing tensor {key}"))?;
                if view.shape() != param.dims() {
                    bail!("{p}: tensor {key} has shape {:?}, the parameter {:?}", view.shape(), param.dims());
                }
                let t = candle_core::safetensors::Load::load(&view, &device)?.to_dtype(moment_dtype(param.dtype()))?;
                out.push(t);
            }
        }
        Ok(AdamW { config, step, names, m, v, fused: true })
    }
}

/// The factor an update multiplies every gradient by (the loss normalisation times the clip coefficient) and
/// the global norm it came from.
#[derive(Debug, Clone)]
pub enum GradScale {
    Host { norm: f64, scale: f64 },
    /// f32 [2] on the GPU: the norm and the factor, NaN when the norm or the loss was not finite (the update is
    /// then skipped on the device). Worked out there so that the host does not wait for the norm between the
    /// backward and the update: it queues the update while the backward still runs.
    Device(Tensor),
}

impl GradScale {
    /// The scale of gradients `grads` of a loss summed over tokens: `per_token` (1 / the step's trained tokens)
    /// times the coefficient that clips the normalised gradient's global norm to `clip`. On the device when
    /// `fused` and the gradients are f32 on a GPU (`loss_sum`, an f64 scalar there, joins the finiteness
    /// test), else on the host.
    pub fn compute(grads: &[&Tensor], loss_sum: Option<&Tensor>, per_token: f64, clip: Option<f64>, fused: bool) -> Result<GradScale> {
        #[cfg(feature = "cuda")]
        if fused && !grads.is_empty() && all_on_gpu_f32(grads.iter().copied()) {
            let loss = loss_sum.filter(|l| l.device().same_device(grads[0].device()));
            return Ok(GradScale::Device(crate::model::cuda::grad_scale(grads, loss, per_token, clip)?));
        }
        let _ = loss_sum;
        let norm = global_norm_with(grads, fused)? * per_token;
        let coef = clip.map_or(1.0, |max| clip_coefficient(norm, max));
        Ok(GradScale::Host { norm, scale: per_token * coef })
    }

    /// The global norm (of the normalised gradient, before clipping); reads it from the device if need be.
    pub fn norm(&self) -> Result<f64> {
        Ok(match self {
            GradScale::Host { norm, .. } => *norm,
            GradScale::Device(t) => t.to_vec1::<f32>()?[0] as f64,
        })
    }

    /// The factor; reads it from the device if need be (NaN there: the step was skipped).
    pub fn scale(&self) -> Result<f64> {
        Ok(match self {
            GradScale::Host { scale, .. } => *scale,
            GradScale::Device(t) => t.to_vec1::<f32>()?[1] as f64,
        })
    }
}

/// True when every tensor is f32 on a GPU (what the multi-tensor kernels take).
#[cfg(feature = "cuda")]
fn all_on_gpu_f32<'a>(mut tensors: impl Iterator<Item = &'a Tensor>) -> bool {
    tensors.all(|t| t.device().is_cuda() && t.dtype() == DType::F32)
}

/// sqrt(sum of squares of every element of every tensor), in f64.
pub fn global_norm(tensors: &[&Tensor]) -> Result<f64> {
    global_norm_with(tensors, true)
}

/// [`global_norm`]; `fused`: one kernel launch (and one device synchronisation) for f32 tensors on a GPU.
pub fn global_norm_with(tensors: &[&Tensor], fused: bool) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if fused && !tensors.is_empty() && all_on_gpu_f32(tensors.iter().copied()) {
        let sum = crate::model::cuda::sum_squares_multi(tensors)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        return Ok(sum.sqrt());
    }
    let _ = fused;
    let mut sum = 0.0f64;
    for t in tensors {
        let work = if t.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        sum += t.to_dtype(work)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// The factor that brings a gradient of norm `norm` down to `max_norm` (PyTorch's `clip_grad_norm_`:
/// max_norm / (norm + 1e-6) when that is below 1), else 1. A non-finite norm gives 1.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        coef
    } else {
        1.0
    }
}

/// Scales the gradients so that their global norm is at most `max_norm` (PyTorch: multiply by
/// max_norm / (norm + 1e-6) when that is below 1). Returns the norm before clipping. A non-finite norm
/// leaves the gradients untouched; the caller should skip the step.
pub fn clip_grad_norm(grads: &mut [&mut Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>())?;
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for g in grads.iter_mut() {
            **g = (&**g * coef)?;
        }
    }
    Ok(norm)
}
