//! Qwen v1: the block as a sequence of ops (forward and backward next to each other), the inference
//! forward and `generate`, and the training step `loss_and_grads`.
//!
//! Block (pre-norm, two residual branches):
//! ```text
//! h1 = ln_1(x)                       x1 = x + c_proj(attn(rope(q), rope(k), v)),  q|k|v = c_attn(h1)
//! h2 = ln_2(x1)                      x2 = x1 + mlp.c_proj(w1(h2) * silu(w2(h2)))
//! ```
//! The training step keeps, per layer, either everything the backward needs (`BlockSaved`) or, with
//! `recompute`, only the layer's input, and re-runs the layer's forward just before its backward. Dropout
//! masks are a pure function of (step seed, layer, module), so the recomputed layer is bit-identical.
use super::attention::{self, AttnSaved, Rope};
use super::config::{QwenConfig, Site};
use super::fusion::Fusion;
use super::loss::{self, Targets};
use super::ops::{self, Dropout, LoraSaved, RmsNormSaved, SwiGluSaved};
use super::rng::{self, Rng};
use super::weights::{Checkpoint, QwenWeights};
use crate::lora::{Lora, LoraGrads};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// A frozen Qwen v1 model.
pub struct QwenModel {
    pub config: QwenConfig,
    pub weights: QwenWeights,
    pub dtype: DType,
    pub device: Device,
    /// Tokens per chunk in the lm_head + loss (bounds the [chunk, vocab] logits).
    pub loss_chunk: usize,
    /// Which fused GPU kernels to use (all by default; they apply only to bf16 on a GPU).
    pub fusion: Fusion,
    /// RoPE tables for every position up to `seq_length`, built on first use; a batch takes its first T rows
    /// (building them per step would leave the GPU idle while the host computes them).
    rope: std::sync::OnceLock<Rope>,
}

/// Result of one training micro-step. `grads` are gradients of `loss_sum` (not of the mean): divide by
/// the counted tokens of the whole accumulated batch.
pub struct LossAndGrads {
    pub loss_sum: f64,
    pub n_tokens: usize,
    pub grads: LoraGrads,
}

#[derive(Clone, Debug)]
pub enum Sampling {
    Greedy,
    /// Sample from softmax(logits / temperature) with a seeded generator.
    Temperature { temperature: f64, seed: u64 },
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new: usize,
    /// Stop after emitting this token (it is included in the output).
    pub stop_token: Option<u32>,
    pub sampling: Sampling,
}

/// Per-call context shared by the layers.
struct Ctx<'a> {
    b: usize,
    t: usize,
    rope: Rope,
    /// The additive causal mask, for the composite attention only.
    mask: Option<Tensor>,
    lora: Option<&'a Lora>,
    fusion: Fusion,
    /// (step seed, p) when dropout is active.
    dropout: Option<(u64, f64)>,
}

/// What one block's backward needs.
struct BlockSaved {
    ln_1: RmsNormSaved,
    c_attn: Option<LoraSaved>,
    attn: AttnSaved,
    attn_c_proj: Option<LoraSaved>,
    ln_2: RmsNormSaved,
    w1: Option<LoraSaved>,
    w2: Option<LoraSaved>,
    swiglu: SwiGluSaved,
    mlp_c_proj: Option<LoraSaved>,
}

/// LoRA gradients (dA, dB) of one block, by site.
type BlockGrads = [Option<(Tensor, Tensor)>; 5];

impl QwenModel {
    /// Loads `config.json` and the weights from a checkpoint folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<QwenModel> {
        let ckpt = Checkpoint::open(dir)?;
        let weights = ckpt.load_weights(dtype, device)?;
        Ok(QwenModel::new(ckpt.config, weights, dtype, device))
    }

    /// A model of these weights (loss chunks of 512 tokens, every fused kernel switched on).
    pub fn new(config: QwenConfig, weights: QwenWeights, dtype: DType, device: &Device) -> QwenModel {
        QwenModel { config, weights, dtype, device: device.clone(), loss_chunk: 512, fusion: Fusion::default(), rope: Default::default() }
    }

    // ----- inference ------------------------------------------------------------------------------------

    /// Logits [B, T, vocab] for token ids [B, T] (u32), optionally with a LoRA adapter (no dropout).
    pub fn forward(&self, ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let hf = self.hidden_states(ids, lora)?;
        let logits = ops::linear_forward(&hf, &self.weights.lm_head, None)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Summed masked loss and counted tokens, no gradients (evaluation).
    pub fn eval_loss(&self, ids: &Tensor, labels: &Tensor, lora: Option<&Lora>) -> Result<(f64, usize)> {
        let targets = self.targets(ids, labels)?;
        let hf = self.hidden_states(ids, lora)?;
        let (loss, _) = loss::cross_entropy(&hf, &self.weights.lm_head, &targets, self.loss_chunk, false, self.fusion.loss)?;
        Ok((loss.to_scalar::<f64>()?, targets.len()))
    }

    /// Final-norm hidden states [B*T, C].
    fn hidden_states(&self, ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let mut ctx = self.context(ids, lora, None)?;
        ctx.fusion.flash = false; // nothing is kept for a backward: the scores live one layer at a time
        let mut x = self.embed(ids)?;
        for layer in 0..self.config.num_layers {
            x = self.block_forward(&ctx, layer, &x)?.0;
        }
        Ok(ops::rmsnorm_forward(&x, &self.weights.ln_f, self.config.eps, self.fusion.norm)?.0)
    }

    /// Autoregressive generation for one prompt; returns the new tokens only. Recomputes the full forward
    /// per token (no KV cache yet). Stops at `max_new` tokens, after `stop_token`, or when the context
    /// reaches `seq_length`.
    pub fn generate(&self, prompt: &[u32], lora: Option<&Lora>, opts: &GenerateOptions) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            bail!("generate: the prompt is empty");
        }
        let mut rng = match opts.sampling {
            Sampling::Greedy => None,
            Sampling::Temperature { temperature, seed } => {
                if temperature.is_nan() || temperature <= 0.0 {
                    bail!("generate: temperature must be > 0 (use Sampling::Greedy for 0), got {temperature}");
                }
                Some(Rng::new(seed))
            }
        };
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        while out.len() < opts.max_new && ids.len() < self.config.seq_length {
            let t = ids.len();
            let input = Tensor::from_slice(&ids, (1, t), &self.device)?;
            let hf = self.hidden_states(&input, lora)?;
            let last = hf.narrow(0, t - 1, 1)?;
            let logits: Vec<f32> = ops::linear_forward(&last, &self.weights.lm_head, None)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let next = match (&opts.sampling, rng.as_mut()) {
                (Sampling::Temperature { temperature, .. }, Some(rng)) => sample(&logits, *temperature, rng),
                _ => argmax(&logits),
            };
            ids.push(next);
            out.push(next);
            if opts.stop_token == Some(next) {
                break;
            }
        }
        Ok(out)
    }

    // ----- training -------------------------------------------------------------------------------------

    /// One micro-step: forward, summed masked loss, backward to the LoRA parameters.
    ///
    /// - `ids` [B, T] token ids; `labels` [B, T] i64, HF convention (-100 = not trained; position t
    ///   predicts `labels[t + 1]`). Both may live on the CPU for a GPU model (the trainer passes them so:
    ///   checking them then costs no device synchronisation; the ids are uploaded here).
    /// - `dropout_rng` gives this step's dropout seed (one draw per call, also when dropout is 0).
    /// - `recompute`: keep only each layer's input and recompute the layer during backward (bounded
    ///   memory, one extra forward); gives bit-identical results on CPU.
    pub fn loss_and_grads(&self, ids: &Tensor, labels: &Tensor, lora: &Lora, dropout_rng: &mut Rng, recompute: bool) -> Result<LossAndGrads> {
        let targets = self.targets(ids, labels)?;
        let step_seed = dropout_rng.next_u64();
        let p = lora.config.dropout;
        let mut ctx = self.context(ids, Some(lora), (p > 0.0).then_some((step_seed, p)))?;
        // Flash attention where it pays (BENCHMARKS.md, the levers table): long sequences whose [T, T]
        // probabilities would otherwise be kept for every layer. Shorter ones, or one layer at a time
        // (recompute), are faster with the scores in memory.
        ctx.fusion.flash &= ctx.t >= attention::FLASH_MIN_SEQ && !recompute;
        let n_layers = self.config.num_layers;

        // Layers below the lowest adapted one need no backward at all.
        let Some(lowest) = lora.adapters().iter().map(|a| a.layer).min() else {
            bail!("the LoRA adapter has no parameters");
        };

        // Forward, keeping per layer either its saved state or just its input.
        let mut x = self.embed(ids)?;
        let mut inputs: Vec<Tensor> = Vec::new();
        let mut saved: Vec<BlockSaved> = Vec::new();
        for layer in 0..n_layers {
            let (y, s) = self.block_forward(&ctx, layer, &x)?;
            if layer >= lowest {
                if recompute {
                    inputs.push(x);
                } else {
                    saved.push(s);
                }
            }
            x = y;
        }
        let (hf, ln_f) = ops::rmsnorm_forward(&x, &self.weights.ln_f, self.config.eps, self.fusion.norm)?;
        drop(x);

        // Loss and its gradient w.r.t. the final hidden states, chunk by chunk.
        let (loss_sum, dhf) = loss::cross_entropy(&hf, &self.weights.lm_head, &targets, self.loss_chunk, true, self.fusion.loss)?;
        let dhf = dhf.expect("gradient requested");
        let mut dx = ops::rmsnorm_backward(&ln_f, &self.weights.ln_f, &dhf, None, self.fusion.norm)?;
        drop((hf, dhf, ln_f));

        // Backward, top layer first.
        let mut grads: Vec<Option<(Tensor, Tensor)>> = vec![None; lora.adapters().len()];
        for layer in (lowest..n_layers).rev() {
            let s = if recompute {
                let input = inputs.pop().expect("one input per layer");
                self.block_forward(&ctx, layer, &input)?.1
            } else {
                saved.pop().expect("one state per layer")
            };
            let (d, block_grads) = self.block_backward(&ctx, layer, &s, &dx)?;
            dx = d;
            for (site, g) in Site::ALL.into_iter().zip(block_grads) {
                if let (Some(g), Some(slot)) = (g, lora.slot(layer, site)) {
                    grads[slot] = Some(g);
                }
            }
        }
        let (a, b) = grads.into_iter().map(|g| g.expect("every adapter sits at or above the lowest layer")).unzip();
        let loss_sum = loss_sum.to_scalar::<f64>()?; // after the backward is queued: no idle device
        Ok(LossAndGrads { loss_sum, n_tokens: targets.len(), grads: LoraGrads { a, b } })
    }

    // ----- the block ------------------------------------------------------------------------------------

    fn block_forward(&self, ctx: &Ctx, layer: usize, x: &Tensor) -> Result<(Tensor, BlockSaved)> {
        let w = &self.weights.layers[layer];
        let cfg = &self.config;
        let (h, d) = (cfg.num_heads, cfg.head_dim);

        let f = ctx.fusion;

        // Attention branch.
        let (h1, ln_1) = ops::rmsnorm_forward(x, &w.ln_1, cfg.eps, f.norm)?;
        let (qkv, c_attn) = self.adapted_parts(ctx, layer, Site::CAttn, &h1)?;
        let lora_b = ctx.lora.and_then(|l| l.adapter(layer, Site::CAttn)).map(|a| &a.b);
        let lora = c_attn.as_ref().zip(lora_b).map(|(s, b)| (s.u(), b));
        let (q, k, v) = attention::qkv_forward(&qkv, &w.c_attn_bias, lora, &ctx.rope, ctx.b, ctx.t, h, d, f.rope)?;
        drop(qkv);
        let (y, attn) = attention::attention_forward(&q, &k, &v, ctx.mask.as_ref(), f.attention, f.flash)?;
        let y = attention::merge_heads(&y, &ctx.rope, f.rope)?;
        let (o, attn_c_proj) = self.adapted_forward(ctx, layer, Site::AttnCProj, &y)?;
        let x1 = (x + o)?;

        // MLP branch.
        let (h2, ln_2) = ops::rmsnorm_forward(&x1, &w.ln_2, cfg.eps, f.norm)?;
        let (a, w1) = self.adapted_forward(ctx, layer, Site::W1, &h2)?;
        let (g, w2) = self.adapted_forward(ctx, layer, Site::W2, &h2)?;
        let (m, swiglu) = ops::swiglu_forward(&a, &g, f.swiglu)?;
        let (o2, mlp_c_proj) = self.adapted_forward(ctx, layer, Site::MlpCProj, &m)?;
        let x2 = (&x1 + o2)?;

        Ok((x2, BlockSaved { ln_1, c_attn, attn, attn_c_proj, ln_2, w1, w2, swiglu, mlp_c_proj }))
    }

    /// Given d(x2), returns d(x) and the block's LoRA gradients.
    fn block_backward(&self, ctx: &Ctx, layer: usize, s: &BlockSaved, dx2: &Tensor) -> Result<(Tensor, BlockGrads)> {
        let w = &self.weights.layers[layer];
        let cfg = &self.config;
        let (h, d) = (cfg.num_heads, cfg.head_dim);
        let mut grads: BlockGrads = Default::default();

        // MLP branch: x2 = x1 + mlp(ln_2(x1)), so d(x1) = d(x2) + ln_2^T(mlp^T(d(x2))).
        let (dm, g) = self.adapted_backward(ctx, layer, Site::MlpCProj, s.mlp_c_proj.as_ref(), dx2)?;
        grads[Site::MlpCProj.index()] = g;
        let f = ctx.fusion;
        let (da, dg) = ops::swiglu_backward(&s.swiglu, &dm, f.swiglu)?;
        let (dh2_a, g) = self.adapted_backward(ctx, layer, Site::W1, s.w1.as_ref(), &da)?;
        grads[Site::W1.index()] = g;
        let (dh2_g, g) = self.adapted_backward(ctx, layer, Site::W2, s.w2.as_ref(), &dg)?;
        grads[Site::W2.index()] = g;
        let dh2 = (dh2_a + dh2_g)?; // h2 feeds both w1 and w2
        let dx1 = ops::rmsnorm_backward(&s.ln_2, &w.ln_2, &dh2, Some(dx2), f.norm)?;

        // Attention branch: x1 = x + attn(ln_1(x)).
        let (dy, g) = self.adapted_backward(ctx, layer, Site::AttnCProj, s.attn_c_proj.as_ref(), &dx1)?;
        grads[Site::AttnCProj.index()] = g;
        let dy = attention::merge_heads_backward(&dy, ctx.b, ctx.t, h, d, f.rope)?;
        let (dq, dk, dv) = attention::attention_backward(&s.attn, &dy, f.attention)?;
        let dqkv = attention::qkv_backward(&dq, &dk, &dv, &ctx.rope, f.rope)?;
        let (dh1, g) = self.adapted_backward(ctx, layer, Site::CAttn, s.c_attn.as_ref(), &dqkv)?;
        grads[Site::CAttn.index()] = g;
        let dx = ops::rmsnorm_backward(&s.ln_1, &w.ln_1, &dh1, Some(&dx1), f.norm)?;
        Ok((dx, grads))
    }

    /// A frozen linear (with bias) plus, when the adapter targets it, its LoRA term.
    fn adapted_forward(&self, ctx: &Ctx, layer: usize, site: Site, x: &Tensor) -> Result<(Tensor, Option<LoraSaved>)> {
        let (mut y, saved) = self.adapted_parts(ctx, layer, site, x)?;
        if site == Site::CAttn {
            y = y.broadcast_add(&self.weights.layers[layer].c_attn_bias)?;
        }
        if let (Some(s), Some(adapter)) = (&saved, ctx.lora.and_then(|l| l.adapter(layer, site))) {
            y = ops::lora_add(y, s, &adapter.b, ctx.fusion.lora)?;
        }
        Ok((y, saved))
    }

    /// The parts of an adapted linear, left for the caller to add: x W^T (no bias) and the LoRA branch.
    fn adapted_parts(&self, ctx: &Ctx, layer: usize, site: Site, x: &Tensor) -> Result<(Tensor, Option<LoraSaved>)> {
        let y = ops::linear_forward(x, self.weights.layers[layer].linear(site), None)?;
        let Some(adapter) = ctx.lora.and_then(|l| l.adapter(layer, site)) else {
            return Ok((y, None));
        };
        let dropout = match ctx.dropout {
            Some((seed, p)) => {
                let key = rng::stream_key(seed, &[layer as u64, site.index() as u64]);
                Some(self.dropout(ctx, key, p, x)?)
            }
            None => None,
        };
        let scale = ctx.lora.map(|l| l.scale()).unwrap_or(0.0);
        let saved = ops::lora_forward(x, &adapter.a, scale, dropout)?;
        Ok((y, Some(saved)))
    }

    /// The dropout of stream `key` for x: regenerated in the kernel on the GPU, a mask tensor elsewhere.
    fn dropout(&self, ctx: &Ctx, key: u64, p: f64, x: &Tensor) -> Result<Dropout> {
        #[cfg(feature = "cuda")]
        if super::fusion::on(ctx.fusion.dropout, x) {
            return Ok(Dropout::Key { key, p });
        }
        let _ = ctx;
        let (n, k) = x.dims2()?;
        Ok(Dropout::Mask(ops::dropout_mask(key, n, k, p, x.dtype(), x.device())?))
    }

    fn adapted_backward(&self, ctx: &Ctx, layer: usize, site: Site, saved: Option<&LoraSaved>, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let dx = ops::linear_backward(dy, self.weights.layers[layer].linear(site))?;
        match (saved, ctx.lora.and_then(|l| l.adapter(layer, site))) {
            (Some(saved), Some(adapter)) => {
                let scale = ctx.lora.map(|l| l.scale()).unwrap_or(0.0);
                let (dx, da, db) = ops::lora_backward(saved, &adapter.a, &adapter.b, scale, dy, dx, ctx.fusion.lora)?;
                Ok((dx, Some((da, db))))
            }
            _ => Ok((dx, None)),
        }
    }

    // ----- helpers --------------------------------------------------------------------------------------

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?.to_device(&self.device)?;
        Ok(ops::embedding_forward(&self.weights.wte, &ids)?)
    }

    /// Checks the ids and builds the per-call tables (RoPE, causal mask).
    fn context<'a>(&self, ids: &Tensor, lora: Option<&'a Lora>, dropout: Option<(u64, f64)>) -> Result<Ctx<'a>> {
        let (b, t) = ids.dims2().context("token ids must be a [batch, time] tensor")?;
        if ids.dtype() != DType::U32 {
            bail!("token ids must be u32, got {:?}", ids.dtype());
        }
        if t == 0 || b == 0 {
            bail!("empty batch ({b} x {t})");
        }
        if t > self.config.seq_length {
            bail!("sequence of {t} tokens is longer than seq_length {} (dynamic NTK / logn scaling are not implemented)", self.config.seq_length);
        }
        let max_id = ids.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            bail!("token id {max_id} is outside the vocabulary ({})", self.config.vocab_size);
        }
        if let Some(l) = lora {
            l.check_fits(&self.config)?;
        }
        let rope = match self.rope.get() {
            Some(r) => r,
            None => {
                let c = &self.config;
                let table = Rope::new(c.seq_length, c.head_dim, c.rope_base, self.dtype, &self.device)?;
                self.rope.get_or_init(|| table)
            }
        }
        .prefix(t)?;
        let fusion = self.fusion;
        let mask = match super::fusion::on_for(fusion.attention, self.dtype, &self.device) {
            true => None,
            false => Some(attention::causal_mask(t, self.dtype, &self.device)?),
        };
        Ok(Ctx { b, t, rope, mask, lora, dropout, fusion })
    }

    fn targets(&self, ids: &Tensor, labels: &Tensor) -> Result<Targets> {
        if labels.dims() != ids.dims() {
            bail!("labels have shape {:?}, ids {:?}: they must match", labels.dims(), ids.dims());
        }
        if labels.dtype() != DType::I64 {
            bail!("labels must be i64 (-100 = ignored), got {:?}", labels.dtype());
        }
        Targets::from_labels(&labels.to_vec2::<i64>()?, self.config.vocab_size)
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from softmax(logits / temperature).
fn sample(logits: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits.iter().map(|&z| ((z as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, w) in weights.iter().enumerate() {
        u -= w;
        if u < 0.0 {
            return i as u32;
        }
    }
    (logits.len() - 1) as u32
}
