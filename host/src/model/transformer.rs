//! The decoder of every family (Qwen v1, Qwen2, Qwen3, Llama; see [`super::config`]): the block as a
//! sequence of ops (forward and backward next to each other), the inference forward and `generate`, and
//! the training step `loss_and_grads`.
//!
//! Block (pre-norm, two residual branches):
//! ```text
//! h1 = ln_1(x)      q|k|v = qkv(h1) (+ bias)      q, k = rope(norm(q)), rope(norm(k))   (norm: Qwen3 only)
//!                   x1 = x + o(attn(q, k, v))      (GQA: each k/v head serves H / Hkv query heads)
//! h2 = ln_2(x1)     x2 = x1 + down(up(h2) * silu(gate(h2)))
//! ```
//! The training step keeps, per layer, either everything the backward needs (`BlockSaved`) or, with
//! `recompute`, only the layer's input, and re-runs the layer's forward just before its backward (all
//! layers but the top one, whose backward comes first). Dropout masks are a pure function of (step seed,
//! layer, module), so the recomputed layer is bit-identical.
use super::attention::{self, AttnSaved, FlashBlocks, Heads, Packed, QkNorm, QkvSaved, Rope};
use super::config::{ModelConfig, Site};
use super::fusion::Fusion;
use super::loss::{self, Targets};
use super::ops::{self, Dropout, LoraSaved, RmsNormSaved, SwiGluSaved};
use crate::rng::{self, SplitMix};
use super::weights::{ModelFiles, Weights};
use crate::model::lora::{Lora, LoraGrads};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// A frozen model of any supported family.
pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    pub dtype: DType,
    pub device: Device,
    /// Tokens per chunk in the lm_head + loss (bounds the [chunk, vocab] logits).
    pub loss_chunk: usize,
    /// Which fused GPU kernels to use (all by default; they apply only to bf16 on a GPU).
    pub fusion: Fusion,
    /// RoPE tables for the longest sequence seen so far, grown on demand; a batch takes its first T rows
    /// (building them per step would leave the GPU idle while the host computes them).
    rope: std::sync::Mutex<Option<Rope>>,
    /// The flash kernels' work list for rows of one sequence each, for the last [B, T] asked: every step of
    /// a run and every decoding step repeats its shape, so the table is made and uploaded once.
    flash_rows: std::sync::Mutex<Option<((usize, usize), FlashBlocks)>>,
    /// The embedding table in page-locked host memory read by a gather kernel ([`Model::offload_embedding`]).
    #[cfg(feature = "cuda")]
    host_wte: Option<super::cuda::HostTable>,
    /// Device memory the training step may spend, under recomputation, keeping the top layers' states
    /// instead of only their inputs (what offloading the embedding freed; 0 otherwise).
    pub recompute_spare_bytes: usize,
}

/// Result of one training micro-step. `grads` are gradients of `loss_sum` (not of the mean): divide by
/// the counted tokens of the whole accumulated batch.
pub struct LossAndGrads {
    /// The summed loss, an f64 scalar where it was computed (on a GPU: there, so that nothing waits for it
    /// before the step's update is queued); [`LossAndGrads::loss_sum`] reads it.
    pub loss: Tensor,
    pub n_tokens: usize,
    pub grads: LoraGrads,
}

impl LossAndGrads {
    pub fn loss_sum(&self) -> Result<f64> {
        loss_value(&self.loss)
    }
}

/// A loss tensor (a scalar, wherever it was computed: summed over passes too) read as f64 on the host.
pub fn loss_value(loss: &Tensor) -> Result<f64> {
    Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
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
    /// RoPE tables: [T, D] for rows that each hold one sequence from position 0, or [B, 1, T, D] gathered by
    /// each token's position in a padding-free batch.
    rope: Rope,
    /// The additive causal mask, for the composite attention only (block-diagonal in a padding-free batch).
    mask: Option<Tensor>,
    /// The sequences of a padding-free batch; None when each row is one sequence.
    packed: Option<Packed>,
    /// The flash kernels' work list when attention takes them (wherever they run, except KV-cached steps,
    /// whose queries see more keys than themselves); None for the scores and composite paths.
    flash: Option<FlashBlocks>,
    lora: Option<&'a Lora>,
    fusion: Fusion,
    /// (step seed, p) when dropout is active.
    dropout: Option<(u64, f64)>,
    /// Inference with a KV cache: the keys and values of earlier positions, extended by this call.
    cache: Option<&'a KvCache>,
}

/// The keys (after RoPE) and values of every layer for the positions run so far, [B, Hkv, T, D] each, so
/// generation runs one new token per step instead of the whole sequence (inference only).
///
/// Rows of different lengths: a batch is prefilled right-padded, then [`KvCache::end_rows_at`] marks each
/// row's padding slots as a gap that no later query sees; the positions of later slots close the gap, so
/// every row computes what it would alone. A later call with rows of different lengths is right-padded too,
/// and that padding stays in the cache (a row has one gap), so such a call must be the last on its cache
/// (log-likelihood continuations run on a copy, [`KvCache::rows`]); decoding adds one token per row.
#[derive(Default)]
pub struct KvCache {
    layers: std::cell::RefCell<Vec<Option<(Tensor, Tensor)>>>,
    len: std::cell::Cell<usize>,
    /// Per row, the padding slots `gap.0..gap.1`; empty when no row has any.
    gaps: std::cell::RefCell<Vec<(usize, usize)>>,
}

impl KvCache {
    /// Slots cached (the longest row's positions plus padding).
    pub fn len(&self) -> usize {
        self.len.get()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After a right-padded prefill: row r's tokens end at slot `lens[r]`, the slots after it up to
    /// [`KvCache::len`] are padding.
    pub fn end_rows_at(&self, lens: &[usize]) -> Result<()> {
        let mut gaps = self.gaps.borrow_mut();
        if !gaps.is_empty() {
            bail!("end_rows_at: the rows' ends are already set (once, right after the prefill)");
        }
        if let Some(&l) = lens.iter().find(|&&l| l == 0 || l > self.len()) {
            bail!("end_rows_at: a row ending at {l}, outside 1..={}", self.len());
        }
        *gaps = lens.iter().map(|&l| (l, self.len())).collect();
        Ok(())
    }

    /// A cache of these rows, in this order (a row may repeat): the live rows of a batched decode, or a
    /// shared prompt's cache once per choice.
    pub fn rows(&self, rows: &[usize]) -> Result<KvCache> {
        let index = rows.iter().map(|&r| r as u32).collect::<Vec<u32>>();
        let gaps = self.gaps.borrow();
        let mut picked = Vec::new();
        for layer in self.layers.borrow().iter() {
            picked.push(match layer {
                Some((k, v)) => {
                    let index = Tensor::from_slice(&index, index.len(), k.device())?;
                    Some((k.index_select(&index, 0)?, v.index_select(&index, 0)?))
                }
                None => None,
            });
        }
        Ok(KvCache {
            layers: picked.into(),
            len: self.len.get().into(),
            gaps: rows.iter().filter_map(|&r| gaps.get(r).copied()).collect::<Vec<_>>().into(),
        })
    }

    /// For `t` new tokens of `b` rows: each token's position and the additive mask [B, 1, T, past + T]
    /// (query i of a row sees the keys up to its own slot, outside the row's gap); None when no row has a
    /// gap (positions are slots, the causal mask serves).
    fn gapped_layout(&self, b: usize, t: usize) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        let gaps = self.gaps.borrow();
        if gaps.iter().all(|g| g.0 == g.1) {
            return Ok(None);
        }
        if gaps.len() != b {
            bail!("the cache holds {} rows, the batch has {b}", gaps.len());
        }
        let past = self.len();
        let keys = past + t;
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = vec![f32::NEG_INFINITY; b * t * keys];
        for (r, &(from, to)) in gaps.iter().enumerate() {
            for i in 0..t {
                positions.push((past + i - (to - from)) as u32);
                let row = &mut mask[(r * t + i) * keys..(r * t + i + 1) * keys];
                row[..from].fill(0.0);
                row[to..=past + i].fill(0.0);
            }
        }
        Ok(Some((positions, mask)))
    }

    /// Appends this call's k and v for `layer`; returns the keys and values of every position.
    fn extend(&self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let mut layers = self.layers.borrow_mut();
        if layers.len() <= layer {
            layers.resize(layer + 1, None);
        }
        let all = match layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        layers[layer] = Some(all.clone());
        Ok(all)
    }
}

/// What the forward keeps of a layer for its backward: its state, or (recomputation) only its input.
enum Kept {
    State(BlockSaved),
    Input(Tensor),
}

/// What one block's backward needs.
struct BlockSaved {
    ln_1: RmsNormSaved,
    /// The LoRA branches of the attention-input linears (Qkv, or Q, K, V), by site.
    qkv_lora: Vec<(Site, LoraSaved)>,
    qkv: QkvSaved,
    attn: AttnSaved,
    o: Option<LoraSaved>,
    ln_2: RmsNormSaved,
    up: Option<LoraSaved>,
    gate: Option<LoraSaved>,
    swiglu: SwiGluSaved,
    down: Option<LoraSaved>,
}

impl BlockSaved {
    /// Device bytes of everything kept (tensors shared between parts counted once per part: an upper bound).
    fn bytes(&self) -> usize {
        let lora = |l: &Option<LoraSaved>| l.as_ref().map_or(0, LoraSaved::bytes);
        self.ln_1.bytes()
            + self.qkv_lora.iter().map(|(_, l)| l.bytes()).sum::<usize>()
            + self.qkv.bytes()
            + self.attn.bytes()
            + lora(&self.o)
            + self.ln_2.bytes()
            + lora(&self.up)
            + lora(&self.gate)
            + self.swiglu.bytes()
            + lora(&self.down)
    }
}

/// LoRA gradients (dA, dB) of one block, by site.
type BlockGrads = [Option<(Tensor, Tensor)>; Site::COUNT];

impl Model {
    /// Loads `config.json` and the weights from a checkpoint folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
        let ckpt = ModelFiles::open(dir)?;
        let weights = ckpt.load_weights(dtype, device)?;
        Ok(Model::new(ckpt.config, weights, dtype, device))
    }

    /// A model of these weights (every fused kernel switched on, loss chunks sized for the device).
    pub fn new(config: ModelConfig, weights: Weights, dtype: DType, device: &Device) -> Model {
        let loss_chunk = loss::default_chunk(device);
        Model {
            config,
            weights,
            dtype,
            device: device.clone(),
            loss_chunk,
            fusion: Fusion::default(),
            rope: Default::default(),
            flash_rows: Default::default(),
            #[cfg(feature = "cuda")]
            host_wte: None,
            recompute_spare_bytes: 0,
        }
    }

    /// Moves the embedding table (frozen, read only for the rows of each batch) to page-locked host memory
    /// that the GPU reads through its mapping, and returns the device bytes freed: recomputation's trade of
    /// speed for memory. The freed memory becomes [`Model::recompute_spare_bytes`]. Nothing happens (0) on
    /// the CPU, for dtypes other than bf16, or when lm_head shares the table; on an error (the host memory
    /// could not be page-locked) the model is unchanged.
    pub fn offload_embedding(&mut self) -> Result<usize> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(dev), DType::BF16, false) = (&self.device, self.dtype, self.config.tie_word_embeddings) {
            if self.host_wte.is_none() {
                let table = super::cuda::HostTable::new(&self.weights.wte, dev)?;
                let freed = table.bytes();
                // A placeholder keeps the type; the device copy is freed with the old tensor.
                self.weights.wte = Tensor::zeros((1, self.config.hidden_size), self.dtype, &Device::Cpu)?;
                self.host_wte = Some(table);
                self.recompute_spare_bytes = freed;
                return Ok(freed);
            }
        }
        Ok(0)
    }

    // ----- inference ------------------------------------------------------------------------------------

    /// Logits [B, T, vocab] for token ids [B, T] (u32), optionally with a LoRA adapter (no dropout).
    pub fn forward(&self, ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let hf = self.hidden_states(ids, self.context(ids, lora, None, None)?)?;
        Ok(self.logits(&hf)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// Summed masked loss and counted tokens, no gradients (evaluation). `cu_seqlens`: as in
    /// [`Model::loss_and_grads`].
    pub fn eval_loss(&self, ids: &Tensor, labels: &Tensor, cu_seqlens: Option<&[u32]>, lora: Option<&Lora>) -> Result<(f64, usize)> {
        let ctx = self.context(ids, lora, None, cu_seqlens)?;
        let targets = self.targets(ids, labels, ctx.packed.as_ref())?;
        let hf = self.hidden_states(ids, ctx)?;
        let (loss, _) = loss::cross_entropy(&hf, &self.weights.lm_head, &targets, self.loss_chunk, false, self.fusion.loss)?;
        Ok((loss.to_scalar::<f64>()?, targets.len()))
    }

    /// Final-norm hidden states [B*T, C].
    fn hidden_states(&self, ids: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for layer in 0..self.config.num_layers {
            x = self.block_forward(&ctx, layer, &x)?.0;
        }
        Ok(ops::rmsnorm_forward(&x, &self.weights.ln_f, self.config.eps, self.fusion.norm)?.0)
    }

    /// Final-norm hidden states [B*T, C] of `ids` [B, T] placed after the positions `cache` holds, which it
    /// then holds too. The keys of earlier positions come from the cache, so each new token costs one
    /// position's work.
    pub fn hidden_states_cached(&self, ids: &Tensor, lora: Option<&Lora>, cache: &KvCache) -> Result<Tensor> {
        let past = cache.len();
        let (b, t) = ids.dims2()?;
        let mut ctx = self.context(ids, lora, None, None)?;
        match cache.gapped_layout(b, t)? {
            None => {
                if past + t > self.config.seq_length {
                    bail!("{} cached + {t} new positions are more than seq_length {}", past, self.config.seq_length);
                }
                ctx.rope = self.rope_prefix(past + t)?.slice(past, t)?;
                if past > 0 {
                    // The fused softmax and flash attention take a square [T, T]; the rectangle of new queries
                    // over every key takes the composite path.
                    ctx.fusion.attention = false;
                    ctx.flash = None;
                    ctx.mask = Some(attention::causal_mask_after(t, past, self.dtype, &self.device)?);
                }
            }
            Some((positions, mask)) => {
                let last = positions.iter().copied().max().unwrap_or(0) as usize;
                if last >= self.config.seq_length {
                    bail!("position {last} is past seq_length {}", self.config.seq_length);
                }
                ctx.rope = self.rope_prefix(last + 1)?.at(&positions, b, t)?;
                // Per-row positions (the fused split reads RoPE tables per token, as in a padding-free batch)
                // and per-row masks over the gapped keys (the composite attention).
                (ctx.fusion.attention, ctx.flash) = (false, None);
                let keys = past + t;
                ctx.mask = Some(Tensor::from_vec(mask, (b, 1, t, keys), &self.device)?.to_dtype(ops::acc_dtype(self.dtype))?);
            }
        }
        ctx.cache = Some(cache);
        let mut x = self.embed(ids)?;
        for layer in 0..self.config.num_layers {
            x = self.block_forward(&ctx, layer, &x)?.0;
        }
        cache.len.set(past + t);
        Ok(ops::rmsnorm_forward(&x, &self.weights.ln_f, self.config.eps, self.fusion.norm)?.0)
    }

    /// Runs `rows` (right-padded with `pad`) into a fresh cache, their padding marked as each row's gap:
    /// the cache and each row's final-norm hidden state at its last token [rows, C] (what predicts the next).
    pub fn prefill(&self, rows: &[&[u32]], pad: u32, lora: Option<&Lora>) -> Result<(KvCache, Tensor)> {
        let lens: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        let cache = KvCache::default();
        let hf = self.hidden_states_cached(&right_padded(rows, pad, &self.device)?, lora, &cache)?;
        cache.end_rows_at(&lens)?;
        let last: Vec<u32> = lens.iter().enumerate().map(|(r, &l)| (r * t + l - 1) as u32).collect();
        let last = hf.index_select(&Tensor::from_vec(last, rows.len(), &self.device)?, 0)?;
        Ok((cache, last))
    }

    /// Logits [N, vocab] of final-norm hidden states [N, C].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(ops::linear_forward(hidden, &self.weights.lm_head, None)?)
    }

    /// Autoregressive generation for one prompt with a KV cache; returns the new tokens only. Stops at
    /// `max_new` tokens, after `stop_token`, or when the context reaches `seq_length`.
    pub fn generate(&self, prompt: &[u32], lora: Option<&Lora>, opts: &GenerateOptions) -> Result<Vec<u32>> {
        self.generate_with(prompt, lora, opts, &mut |_| false)
    }

    /// [`Model::generate`] that also ends when `stop` (shown the new tokens after each one) says so: stop
    /// strings, for instance.
    pub fn generate_with(&self, prompt: &[u32], lora: Option<&Lora>, opts: &GenerateOptions, stop: &mut dyn FnMut(&[u32]) -> bool) -> Result<Vec<u32>> {
        let mut out = self.generate_batch(&[prompt], lora, opts, &mut |_, so_far| stop(so_far))?;
        Ok(out.pop().expect("one row per prompt"))
    }

    /// [`Model::generate_with`] for several prompts at once: one batched prefill (right-padded), then one
    /// batched step per token; a row leaves the batch when it ends (`stop` is shown the row's index and its
    /// new tokens). Each row's tokens are those it would get alone (with sampling, each row draws from its
    /// own generator seeded alike). A prompt longer than `seq_length` gets no tokens.
    pub fn generate_batch(&self, prompts: &[&[u32]], lora: Option<&Lora>, opts: &GenerateOptions, stop: &mut dyn FnMut(usize, &[u32]) -> bool) -> Result<Vec<Vec<u32>>> {
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("generate: prompt {i} is empty");
        }
        let seed = match opts.sampling {
            Sampling::Greedy => None,
            Sampling::Temperature { temperature, seed } => {
                if temperature.is_nan() || temperature <= 0.0 {
                    bail!("generate: temperature must be > 0 (use Sampling::Greedy for 0), got {temperature}");
                }
                Some(seed)
            }
        };
        let mut rngs: Vec<Option<SplitMix>> = prompts.iter().map(|_| seed.map(SplitMix::new)).collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let fits = |p: &[u32], new: usize| p.len() + new <= self.config.seq_length;
        let mut live: Vec<usize> = (0..prompts.len()).filter(|&i| fits(prompts[i], 0)).collect();
        if live.is_empty() || opts.max_new == 0 {
            return Ok(out);
        }
        let rows: Vec<&[u32]> = live.iter().map(|&i| prompts[i]).collect();
        let (mut cache, mut hidden) = self.prefill(&rows, 0, lora)?;
        loop {
            let logits: Vec<Vec<f32>> = self.logits(&hidden)?.to_dtype(DType::F32)?.to_vec2()?;
            let (mut keep, mut next_ids) = (Vec::new(), Vec::new());
            for (k, &row) in live.iter().enumerate() {
                let next = match (&opts.sampling, rngs[row].as_mut()) {
                    (Sampling::Temperature { temperature, .. }, Some(rng)) => sample(&logits[k], *temperature, rng),
                    _ => argmax(logits[k].iter().copied()) as u32,
                };
                out[row].push(next);
                let done = opts.stop_token == Some(next) || stop(row, &out[row]);
                if !done && out[row].len() < opts.max_new && fits(prompts[row], out[row].len()) {
                    keep.push(k);
                    next_ids.push(next);
                }
            }
            if keep.is_empty() {
                return Ok(out);
            }
            if keep.len() < live.len() {
                cache = cache.rows(&keep)?;
                live = keep.iter().map(|&k| live[k]).collect();
            }
            let n = next_ids.len();
            hidden = self.hidden_states_cached(&Tensor::from_vec(next_ids, (n, 1), &self.device)?, lora, &cache)?;
        }
    }

    // ----- training -------------------------------------------------------------------------------------

    /// One micro-step: forward, summed masked loss, backward to the LoRA parameters.
    ///
    /// - `ids` [B, T] token ids; `labels` [B, T] i64, HF convention (-100 = not trained; position t
    ///   predicts `labels[t + 1]`). Both may live on the CPU for a GPU model (the trainer passes them so:
    ///   checking them then costs no device synchronisation; the ids are uploaded here).
    /// - `cu_seqlens`: None when each row is one sequence (padding is trained on nothing: labels -100);
    ///   for a padding-free batch, the cumulative offsets of the sequences laid end to end over the
    ///   flattened [B*T] tokens ([`Packed`]): each attends to itself only, its positions start at 0, and its
    ///   last token predicts nothing, so the loss and gradients equal those of the same sequences padded.
    /// - `dropout_rng` gives this step's dropout seed (one draw per call, also when dropout is 0).
    /// - `recompute`: keep only each layer's input and recompute the layer during backward (bounded
    ///   memory, one extra forward); gives bit-identical results on CPU. The top layer keeps its state: its
    ///   backward comes right after the loss, so recomputing it would only move the same memory later; and
    ///   so do as many layers below it as [`Model::recompute_spare_bytes`] pays for (a state's bytes beyond
    ///   the input it replaces), so the peak stays where recomputing them would have put it.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(&self, ids: &Tensor, labels: &Tensor, cu_seqlens: Option<&[u32]>, lora: &Lora, dropout_rng: &mut SplitMix, recompute: bool) -> Result<LossAndGrads> {
        // On a GPU the adapter's f32 parameters go to bf16 once, in one launch, rather than at each use (twice
        // each, forward and backward), and the gradients come back to f32 in one launch at the end: the same
        // values, ~720 launches fewer. (The `optimizer` switch: all adapter tensors in one launch.) The scale
        // alpha / r rides on A there (scale A as cast, scale dA as cast back, the branch run at scale 1: the
        // same u, and with a power-of-two scale the same bits), not on each site's [N, r] products: 240
        // launches a step fewer at Qwen-14B.
        #[cfg(feature = "cuda")]
        if super::fusion::on_for(self.fusion.optimizer, self.dtype, &self.device) && lora.params().iter().all(|p| p.dtype() == DType::F32) {
            let scale = lora.scale() as f32;
            let params: Vec<(&Tensor, f32)> = lora.adapters().iter().flat_map(|a| [(&a.a, scale), (&a.b, 1.0)]).collect();
            let mut cast = lora.clone();
            cast.config.alpha = cast.config.r as f64; // scale 1: folded into A
            for (p, c) in cast.params_mut().into_iter().zip(super::cuda::cast_multi_scaled(&params, self.dtype)?) {
                *p = c;
            }
            let mut out = self.loss_and_grads_as_given(ids, labels, cu_seqlens, &cast, dropout_rng, recompute)?;
            let n = out.grads.a.len();
            let grads: Vec<(&Tensor, f32)> = out.grads.a.iter().map(|g| (g, scale)).chain(out.grads.b.iter().map(|g| (g, 1.0))).collect();
            let mut f32s = super::cuda::cast_multi_scaled(&grads, DType::F32)?;
            let b = f32s.split_off(n);
            out.grads = LoraGrads { a: f32s, b };
            return Ok(out);
        }
        self.loss_and_grads_as_given(ids, labels, cu_seqlens, lora, dropout_rng, recompute)
    }

    /// [`Model::loss_and_grads`] with the adapter's parameters in the dtype they come in.
    #[allow(clippy::too_many_arguments)]
    fn loss_and_grads_as_given(&self, ids: &Tensor, labels: &Tensor, cu_seqlens: Option<&[u32]>, lora: &Lora, dropout_rng: &mut SplitMix, recompute: bool) -> Result<LossAndGrads> {
        let step_seed = dropout_rng.next_u64();
        let p = lora.config.dropout;
        let ctx = self.context(ids, Some(lora), (p > 0.0).then_some((step_seed, p)), cu_seqlens)?;
        let targets = self.targets(ids, labels, ctx.packed.as_ref())?;
        let n_layers = self.config.num_layers;

        // Layers below the lowest adapted one need no backward at all.
        let Some(lowest) = lora.adapters().iter().map(|a| a.layer).min() else {
            bail!("the LoRA adapter has no parameters");
        };

        // Forward, keeping per layer either its saved state or just its input.
        let mut x = self.embed(ids)?;
        let mut kept: Vec<Kept> = Vec::new();
        let mut keep_from = n_layers - 1; // recomputation: the layers from here up keep their state
        for layer in 0..n_layers {
            let (y, s) = self.block_forward(&ctx, layer, &x)?;
            if layer == lowest && recompute {
                // Every layer's state has the same size: the first one tells how many the spare memory keeps.
                let extra = s.bytes().saturating_sub(ops::tensor_bytes(&x)).max(1);
                keep_from = keep_from.saturating_sub(self.recompute_spare_bytes / extra).max(lowest);
            }
            if layer >= lowest {
                kept.push(if recompute && layer < keep_from { Kept::Input(x) } else { Kept::State(s) });
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
            let s = match kept.pop().expect("one kept entry per layer") {
                Kept::Input(input) => self.block_recompute(&ctx, layer, &input)?,
                Kept::State(s) => s,
            };
            let (d, block_grads) = self.block_backward(&ctx, layer, &s, &dx, layer > lowest)?;
            if let Some(d) = d {
                dx = d;
            }
            for (site, g) in Site::ALL.into_iter().zip(block_grads) {
                if let (Some(g), Some(slot)) = (g, lora.slot(layer, site)) {
                    grads[slot] = Some(g);
                }
            }
        }
        let (a, b) = grads.into_iter().map(|g| g.expect("every adapter sits at or above the lowest layer")).unzip();
        Ok(LossAndGrads { loss: loss_sum, n_tokens: targets.len(), grads: LoraGrads { a, b } })
    }

    // ----- the block ------------------------------------------------------------------------------------

    fn block_forward(&self, ctx: &Ctx, layer: usize, x: &Tensor) -> Result<(Tensor, BlockSaved)> {
        let (x2, saved) = self.block(ctx, layer, x, true)?;
        Ok((x2.expect("the output was asked for"), saved))
    }

    /// What the backward of a layer needs, recomputed from its input: the forward without the MLP's down
    /// projection and the residual add, whose only use is the layer's output (the backward needs the
    /// projection's input and LoRA branch, not its product): a fifth of the layer's GEMM work.
    fn block_recompute(&self, ctx: &Ctx, layer: usize, x: &Tensor) -> Result<BlockSaved> {
        Ok(self.block(ctx, layer, x, false)?.1)
    }

    /// The layer's forward; its output only when `output`.
    fn block(&self, ctx: &Ctx, layer: usize, x: &Tensor, output: bool) -> Result<(Option<Tensor>, BlockSaved)> {
        let w = &self.weights.layers[layer];
        let cfg = &self.config;
        let f = ctx.fusion;

        // Attention branch.
        let (h1, ln_1) = ops::rmsnorm_forward(x, &w.ln_1, cfg.eps, f.norm)?;
        let qkv_lora = self.qkv_lora_forward(ctx, layer, &h1)?;
        let delta = self.qkv_lora_delta(ctx, layer, &qkv_lora)?;
        let base = ops::linear_forward_delta(&h1, &w.qkv, delta.as_ref().map(|(u, b)| (u, b)), f.lora)?;
        drop(delta);
        let norm = w.q_norm.as_ref().zip(w.k_norm.as_ref()).map(|(q, k)| QkNorm { q, k, eps: cfg.eps });
        let heads = self.heads(ctx);
        let (q, k, v, qkv) = attention::qkv_forward(&base, w.qkv_bias.as_ref(), norm, &ctx.rope, heads, f.rope, f.norm)?;
        drop(base);
        let (k, v) = match ctx.cache {
            Some(cache) => cache.extend(layer, k, v)?,
            None => (k, v),
        };
        let (y, attn) = attention::attention_forward(&q, &k, &v, cfg.kv_groups(), ctx.mask.as_ref(), f.attention, ctx.flash.as_ref())?;
        let (x1, o_lora) = self.adapted_forward(ctx, layer, Site::O, &y, Some(x))?;

        // MLP branch.
        let (h2, ln_2) = ops::rmsnorm_forward(&x1, &w.ln_2, cfg.eps, f.norm)?;
        let (a, up) = self.adapted_forward(ctx, layer, Site::Up, &h2, None)?;
        let (g, gate) = self.adapted_forward(ctx, layer, Site::Gate, &h2, None)?;
        let (m, swiglu) = ops::swiglu_forward(&a, &g, f.swiglu)?;
        let (x2, down) = match output {
            true => {
                let (x2, down) = self.adapted_forward(ctx, layer, Site::Down, &m, Some(&x1))?;
                (Some(x2), down)
            }
            false => (None, self.lora_branch(ctx, layer, Site::Down, &m)?),
        };

        Ok((x2, BlockSaved { ln_1, qkv_lora, qkv, attn, o: o_lora, ln_2, up, gate, swiglu, down }))
    }

    /// Given d(x2), returns d(x) (when `want_dx`) and the block's LoRA gradients.
    fn block_backward(&self, ctx: &Ctx, layer: usize, s: &BlockSaved, dx2: &Tensor, want_dx: bool) -> Result<(Option<Tensor>, BlockGrads)> {
        let w = &self.weights.layers[layer];
        let cfg = &self.config;
        let mut grads: BlockGrads = Default::default();
        let f = ctx.fusion;

        // MLP branch: x2 = x1 + mlp(ln_2(x1)), so d(x1) = d(x2) + ln_2^T(mlp^T(d(x2))).
        let (dm, g) = self.adapted_backward(ctx, layer, Site::Down, s.down.as_ref(), dx2, None)?;
        grads[Site::Down.index()] = g;
        let (da, dg) = ops::swiglu_backward(&s.swiglu, &dm, f.swiglu)?;
        // h2 feeds both up and gate: the gate's input gradient is added to the up's.
        let (dh2, g) = self.adapted_backward(ctx, layer, Site::Up, s.up.as_ref(), &da, None)?;
        grads[Site::Up.index()] = g;
        let (dh2, g) = self.adapted_backward(ctx, layer, Site::Gate, s.gate.as_ref(), &dg, Some(dh2))?;
        grads[Site::Gate.index()] = g;
        let dx1 = ops::rmsnorm_backward(&s.ln_2, &w.ln_2, &dh2, Some(dx2), f.norm)?;

        // Attention branch: x1 = x + attn(ln_1(x)).
        let (dy, g) = self.adapted_backward(ctx, layer, Site::O, s.o.as_ref(), &dx1, None)?;
        grads[Site::O.index()] = g;
        // Flash attention's backward writes d(qkv) itself, RoPE undone; the scores paths give per-head gradients.
        let d_attn = attention::attention_backward(&s.attn, &dy, f.attention, f.ds_tiles, Some(&ctx.rope))?;
        let dqkv = attention::qkv_backward_of(&s.qkv, d_attn, &ctx.rope, self.heads(ctx), f.rope, f.norm)?;
        // The lowest adapted layer's input gradient has no use (nothing below it trains): not computed. A single
        // branch over all of c_attn's rows (Qwen v1) lets the GEMM add d(qkv) W into the branch's term.
        let whole = matches!(s.qkv_lora.as_slice(), [(site, _)] if cfg.qkv_rows(*site).1 == cfg.qkv_width());
        let mut dh1 = if want_dx && !whole { Some(ops::linear_backward(&dqkv, &w.qkv)?) } else { None };
        for (site, saved) in &s.qkv_lora {
            let adapter = ctx.lora.and_then(|l| l.adapter(layer, *site)).expect("a saved branch has its adapter");
            let (off, rows) = cfg.qkv_rows(*site);
            // Each linear's share of d(qkv): its own rows (all of them for Qwen v1's fused c_attn).
            let dy_site = if rows == cfg.qkv_width() { dqkv.clone() } else { dqkv.narrow(1, off, rows)?.contiguous()? };
            let scale = ctx.lora.map(|l| l.scale()).unwrap_or(0.0);
            let dx_in = match (want_dx, dh1.take()) {
                (false, _) => ops::InputGrad::None,
                (true, Some(d)) => ops::InputGrad::Add(d),
                (true, None) => ops::InputGrad::Linear(&w.qkv),
            };
            let (d, da, db) = ops::lora_backward(saved, &adapter.a, &adapter.b, scale, &dy_site, dx_in, f.lora)?;
            dh1 = d;
            grads[site.index()] = Some((da, db));
        }
        let dx = match dh1 {
            Some(dh1) => Some(ops::rmsnorm_backward(&s.ln_1, &w.ln_1, &dh1, Some(&dx1), f.norm)?),
            None => None,
        };
        Ok((dx, grads))
    }

    /// The LoRA branches (u = scale * dropout(x) A^T) of the adapted attention-input linears.
    fn qkv_lora_forward(&self, ctx: &Ctx, layer: usize, h1: &Tensor) -> Result<Vec<(Site, LoraSaved)>> {
        let mut out = Vec::new();
        for &site in self.config.sites().iter().filter(|s| s.is_attention_input()) {
            if let Some(saved) = self.lora_branch(ctx, layer, site, h1)? {
                out.push((site, saved));
            }
        }
        Ok(out)
    }

    /// The attention input's LoRA delta as one rank-r' product (u [N, r'], B [(H + 2 Hkv) D, r']) for the
    /// fused split kernel: the branches' u side by side and their B placed block-diagonally at their rows
    /// (each branch keeps its own dropout mask; the zero blocks cost r'-wide dot products, nothing more).
    fn qkv_lora_delta(&self, ctx: &Ctx, layer: usize, branches: &[(Site, LoraSaved)]) -> Result<Option<(Tensor, Tensor)>> {
        let lora = match (ctx.lora, branches) {
            (Some(l), [_, ..]) => l,
            _ => return Ok(None),
        };
        let width = self.config.qkv_width();
        let mut us = Vec::new();
        let mut bs = Vec::new();
        for (site, saved) in branches {
            let b = &lora.adapter(layer, *site).expect("a branch has its adapter").b;
            let (off, rows) = self.config.qkv_rows(*site);
            let r = b.dim(1)?;
            let mut rows_of_b = Vec::new();
            if off > 0 {
                rows_of_b.push(Tensor::zeros((off, r), b.dtype(), b.device())?);
            }
            rows_of_b.push(b.clone());
            if off + rows < width {
                rows_of_b.push(Tensor::zeros((width - off - rows, r), b.dtype(), b.device())?);
            }
            us.push(saved.u().clone());
            bs.push(if rows_of_b.len() == 1 { b.clone() } else { Tensor::cat(&rows_of_b, 0)? });
        }
        if us.len() == 1 {
            return Ok(Some((us.pop().unwrap(), bs.pop().unwrap())));
        }
        Ok(Some((Tensor::cat(&us, 1)?, Tensor::cat(&bs, 1)?)))
    }

    fn heads(&self, ctx: &Ctx) -> Heads {
        let c = &self.config;
        Heads { b: ctx.b, t: ctx.t, h: c.num_heads, hkv: c.num_kv_heads, d: c.head_dim }
    }

    /// A frozen linear (no bias) plus, when the adapter targets it, its LoRA term; plus `residual` when the
    /// output goes onto the residual stream.
    fn adapted_forward(&self, ctx: &Ctx, layer: usize, site: Site, x: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, Option<LoraSaved>)> {
        let saved = self.lora_branch(ctx, layer, site, x)?;
        let delta = match (&saved, ctx.lora.and_then(|l| l.adapter(layer, site))) {
            (Some(s), Some(adapter)) => Some((s.u(), &adapter.b)),
            _ => None,
        };
        let y = ops::linear_forward_onto(x, self.weights.layers[layer].linear(site), delta, residual, ctx.fusion.lora, ctx.fusion.norm)?;
        Ok((y, saved))
    }

    /// The LoRA branch of a linear up to rank r (dropout, A, scale), when the adapter targets it.
    fn lora_branch(&self, ctx: &Ctx, layer: usize, site: Site, x: &Tensor) -> Result<Option<LoraSaved>> {
        let Some(adapter) = ctx.lora.and_then(|l| l.adapter(layer, site)) else {
            return Ok(None);
        };
        let dropout = match ctx.dropout {
            Some((seed, p)) => {
                let key = rng::stream_key(seed, &[layer as u64, site.index() as u64]);
                Some(self.dropout(ctx, key, p, x)?)
            }
            None => None,
        };
        let scale = ctx.lora.map(|l| l.scale()).unwrap_or(0.0);
        Ok(Some(ops::lora_forward(x, &adapter.a, scale, dropout)?))
    }

    /// The dropout of stream `key` for x: regenerated in the kernel on the GPU, a mask tensor elsewhere.
    fn dropout(&self, ctx: &Ctx, key: u64, p: f64, x: &Tensor) -> Result<Dropout> {
        #[cfg(feature = "cuda")]
        if super::fusion::on(ctx.fusion.dropout, x) {
            return Ok(Dropout::Key { key, p, bits: None });
        }
        let _ = ctx;
        let (n, k) = x.dims2()?;
        Ok(Dropout::Mask(ops::dropout_mask(key, n, k, p, x.dtype(), x.device())?))
    }

    /// The input gradient of a frozen linear and its LoRA branch for dy, added to `partial` (another linear's
    /// gradient for the same input) when given; and the LoRA gradients.
    fn adapted_backward(&self, ctx: &Ctx, layer: usize, site: Site, saved: Option<&LoraSaved>, dy: &Tensor, partial: Option<Tensor>) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let w = self.weights.layers[layer].linear(site);
        let frozen = |partial: Option<Tensor>| match partial {
            Some(p) => ops::linear_backward_add(p, dy, w, ctx.fusion.swiglu),
            None => ops::linear_backward(dy, w),
        };
        match (saved, ctx.lora.and_then(|l| l.adapter(layer, site))) {
            (Some(saved), Some(adapter)) => {
                let scale = ctx.lora.map(|l| l.scale()).unwrap_or(0.0);
                let dx_in = match partial {
                    Some(p) => ops::InputGrad::Add(frozen(Some(p))?),
                    None => ops::InputGrad::Linear(w),
                };
                let (dx, da, db) = ops::lora_backward(saved, &adapter.a, &adapter.b, scale, dy, dx_in, ctx.fusion.lora)?;
                Ok((dx.expect("asked for"), Some((da, db))))
            }
            _ => Ok((frozen(partial)?, None)),
        }
    }

    // ----- helpers --------------------------------------------------------------------------------------

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?.to_device(&self.device)?;
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.host_wte {
            return Ok(table.gather(&ids)?);
        }
        Ok(ops::embedding_forward(&self.weights.wte, &ids)?)
    }

    /// Checks the ids and builds the per-call tables (RoPE, causal mask), for rows of one sequence each or,
    /// with `cu_seqlens`, a padding-free batch.
    fn context<'a>(&self, ids: &Tensor, lora: Option<&'a Lora>, dropout: Option<(u64, f64)>, cu_seqlens: Option<&[u32]>) -> Result<Ctx<'a>> {
        let (b, t) = ids.dims2().context("token ids must be a [batch, time] tensor")?;
        if ids.dtype() != DType::U32 {
            bail!("token ids must be u32, got {:?}", ids.dtype());
        }
        if t == 0 || b == 0 {
            bail!("empty batch ({b} x {t})");
        }
        let packed = cu_seqlens.map(|cu| Packed::new(cu, b, t)).transpose()?;
        let longest = packed.as_ref().map_or(t, Packed::longest);
        if longest > self.config.seq_length {
            bail!("sequence of {longest} tokens is longer than seq_length {} (dynamic NTK / logn scaling are not implemented)", self.config.seq_length);
        }
        let max_id = ids.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            bail!("token id {max_id} is outside the vocabulary ({})", self.config.vocab_size);
        }
        if let Some(l) = lora {
            l.check_fits(&self.config)?;
        }
        let mut fusion = self.fusion;
        if let Some(packed) = packed {
            // RoPE tables gathered by each token's position (the fused split kernel reads them per token).
            let rope = self.rope_prefix(longest)?.at(&packed.positions(), b, t)?;
            // Flash attention takes the sequences as its work list; without it, the composite attention
            // with a block-diagonal mask (the fused softmax masks one sequence per row).
            if self.flash_runs(fusion) {
                let flash = Some(FlashBlocks::packed(&packed, &self.device)?);
                return Ok(Ctx { b, t, rope, mask: None, packed: Some(packed), flash, lora, dropout, fusion, cache: None });
            }
            fusion.attention = false;
            let mask = Some(packed.mask(self.dtype, &self.device)?);
            return Ok(Ctx { b, t, rope, mask, packed: Some(packed), flash: None, lora, dropout, fusion, cache: None });
        }
        let rope = self.rope_prefix(t)?;
        let mask = match super::fusion::on_for(fusion.attention, self.dtype, &self.device) {
            true => None,
            false => Some(attention::causal_mask(t, self.dtype, &self.device)?),
        };
        let flash = match self.flash_runs(fusion) {
            true => Some(self.flash_rows(b, t)?),
            false => None,
        };
        Ok(Ctx { b, t, rope, mask, packed: None, flash, lora, dropout, fusion, cache: None })
    }

    /// [`FlashBlocks::rows`] for [b, t], from the cached table when the shape repeats.
    fn flash_rows(&self, b: usize, t: usize) -> Result<FlashBlocks> {
        let mut cached = self.flash_rows.lock().unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            Some((shape, blocks)) if *shape == (b, t) => Ok(blocks.clone()),
            _ => {
                let blocks = FlashBlocks::rows(b, t, &self.device)?;
                *cached = Some(((b, t), blocks.clone()));
                Ok(blocks)
            }
        }
    }

    fn flash_runs(&self, fusion: Fusion) -> bool {
        attention::flash_runs(fusion, self.dtype, &self.device, self.config.head_dim)
    }

    /// RoPE tables for positions 0..t, from the cached tables (rebuilt larger when a longer sequence comes).
    fn rope_prefix(&self, t: usize) -> Result<Rope> {
        let mut cached = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        if cached.as_ref().is_none_or(|r| r.len() < t) {
            // At least 2048 positions (or all of them), so short batches do not rebuild the table each time.
            let c = &self.config;
            let len = t.max(2048.min(c.seq_length));
            *cached = Some(Rope::new(len, c.head_dim, c.rope_base, &c.rope_scaling, self.dtype, &self.device)?);
        }
        Ok(cached.as_ref().expect("built above").prefix(t)?)
    }

    /// The counted positions; in a padding-free batch, never the last token of a sequence (whose next token
    /// is another sequence's first).
    fn targets(&self, ids: &Tensor, labels: &Tensor, packed: Option<&Packed>) -> Result<Targets> {
        if labels.dims() != ids.dims() {
            bail!("labels have shape {:?}, ids {:?}: they must match", labels.dims(), ids.dims());
        }
        if labels.dtype() != DType::I64 {
            bail!("labels must be i64 (-100 = ignored), got {:?}", labels.dtype());
        }
        let mut targets = Targets::from_labels(&labels.to_vec2::<i64>()?, self.config.vocab_size)?;
        if let Some(p) = packed {
            targets.drop_before(&p.starts());
        }
        Ok(targets)
    }
}

/// `rows` right-padded with `pad` (any valid id: causal attention keeps it out of the rows' own positions)
/// to the longest, as a [rows, longest] tensor on `device`.
pub fn right_padded(rows: &[&[u32]], pad: u32, device: &Device) -> Result<Tensor> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * t);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad, t - r.len()));
    }
    Ok(Tensor::from_vec(ids, (rows.len(), t), device)?)
}

/// The index of the largest value, the first on a tie (as numpy's argmax); 0 for an empty input. Greedy
/// decoding and evaluation's choices both pick with it.
pub fn argmax<T: PartialOrd>(values: impl IntoIterator<Item = T>) -> usize {
    let mut best: Option<(usize, T)> = None;
    for (i, x) in values.into_iter().enumerate() {
        if best.as_ref().is_none_or(|(_, b)| x > *b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// Draws from softmax(logits / temperature).
fn sample(logits: &[f32], temperature: f64, rng: &mut SplitMix) -> u32 {
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
