//! `lorahost bench train`: training steps of a model at a named shape with random weights made on the
//! device (no checkpoint), through the real trainer code (the model's forward/backward, LoRA r8 on c_attn +
//! c_proj, AdamW), printing step time, tokens/s and peak GPU memory as JSON. The GPU numbers of BENCHMARKS.md come from here.
use crate::data;
use crate::model::lora::{Lora, LoraConfig};
use crate::manifest::Manifest;
use crate::model::fusion::Fusion;
use crate::train::batches::{HostBatch, Schedule};
use crate::train::optim;
use crate::model::config::{Family, ModelConfig};
use crate::model::transformer::Model;
use crate::model::rng::Rng as ModelRng;
use crate::model::weights::Weights;
use crate::train::optim::{AdamW, AdamWConfig};
use anyhow::bail;
use candle_core::{DType, Device};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub shape: String,
    pub device: String,
    pub dtype: String,
    pub micro_batch: usize,
    pub seq: usize,
    pub recompute: bool,
    /// The fused kernels in use (they apply to bf16 on a GPU only).
    pub fusion: Fusion,
    /// "random tokens" or the manifest whose token stream was trained on.
    pub data: String,
    pub lora_params: usize,
    pub timed_steps: usize,
    /// Median over the timed steps (forward + backward + optimizer), in ms.
    pub step_ms: f64,
    /// Tokens of the timed steps over their total time.
    pub tokens_per_s: f64,
    /// Peak GPU memory in use by tensors (PyTorch's `max_memory_allocated`), GiB; None on the CPU.
    pub peak_gib: Option<f64>,
    /// Loss of every step, warm-up included.
    pub losses: Vec<f64>,
}

/// The model shapes benchmarks can name: the published configs' numbers, one family each.
pub const SHAPES: &str = "qwen-14b, qwen-7b, qwen-1.8b, qwen2.5-14b, qwen2.5-7b, qwen2.5-0.5b, qwen3-14b, qwen3-8b, llama-3-8b, tiny";

/// The 2023 recipe's adapted matrices in each family's names: Qwen v1's c_attn + both c_proj, which are
/// q, k, v, o and down elsewhere (what the Python baselines adapt too).
pub fn recipe_targets(family: Family) -> Vec<String> {
    let names: &[&str] = match family {
        Family::QwenV1 => &["c_attn", "c_proj"],
        _ => &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// The configuration of a named shape.
pub fn shape(name: &str) -> anyhow::Result<ModelConfig> {
    use crate::model::config::RopeScaling;
    // (family, hidden, layers, heads, kv heads, head dim, mlp width, vocab, rope base, tied)
    let (family, hidden, layers, heads, kv, head_dim, mlp, vocab, rope_base, tied) = match name {
        "qwen-14b" => (Family::QwenV1, 5120, 40, 40, 40, 128, 13696, 152064, 10000.0, false),
        "qwen-7b" => (Family::QwenV1, 4096, 32, 32, 32, 128, 11008, 151936, 10000.0, false),
        "qwen-1.8b" => (Family::QwenV1, 2048, 24, 16, 16, 128, 5504, 151936, 10000.0, false),
        "qwen2.5-14b" => (Family::Qwen2, 5120, 48, 40, 8, 128, 13824, 152064, 1e6, false),
        "qwen2.5-7b" => (Family::Qwen2, 3584, 28, 28, 4, 128, 18944, 152064, 1e6, false),
        "qwen2.5-0.5b" => (Family::Qwen2, 896, 24, 14, 2, 64, 4864, 151936, 1e6, true),
        "qwen3-14b" => (Family::Qwen3, 5120, 40, 40, 8, 128, 17408, 151936, 1e6, false),
        "qwen3-8b" => (Family::Qwen3, 4096, 36, 32, 8, 128, 12288, 151936, 1e6, false),
        "llama-3-8b" => (Family::Llama, 4096, 32, 32, 8, 128, 14336, 128256, 500000.0, false),
        "tiny" => (Family::QwenV1, 64, 2, 4, 4, 16, 128, 151936, 10000.0, false),
        other => bail!("unknown shape `{other}`: {SHAPES}"),
    };
    Ok(ModelConfig {
        family,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        mlp_width: mlp,
        vocab_size: vocab,
        eps: 1e-6,
        rope_base,
        rope_scaling: RopeScaling::None,
        seq_length: 4096,
        tie_word_embeddings: tied,
        qkv_bias: matches!(family, Family::QwenV1 | Family::Qwen2),
        qk_norm: family == Family::Qwen3,
    })
}

pub struct Options {
    pub shape: String,
    pub device: Device,
    pub dtype: DType,
    pub micro_batch: usize,
    pub seq: usize,
    pub recompute: bool,
    pub warmup: usize,
    pub steps: usize,
    pub fusion: Fusion,
    /// Train on this manifest's token stream (batches prefetched as in `lorahost run`) instead of random
    /// tokens of length `seq`.
    pub manifest: Option<PathBuf>,
    pub lr: f64,
}

/// Random weights at the named shape on the device, in the bench's model.
pub fn model(o: &Options) -> anyhow::Result<Model> {
    let config = shape(&o.shape)?;
    if o.seq > config.seq_length {
        bail!("--seq {} is longer than the shape's {}", o.seq, config.seq_length);
    }
    let weights = Weights::random(&config, 0.02, o.dtype, &o.device)?;
    let mut model = Model::new(config, weights, o.dtype, &o.device);
    // On the GPU bigger loss chunks mean fewer, fuller launches; 1024 x 152k bf16 logits are 311 MB.
    model.loss_chunk = if o.device.is_cuda() { 1024 } else { 512 };
    model.fusion = o.fusion;
    Ok(model)
}

pub fn run(o: &Options) -> anyhow::Result<TrainBench> {
    run_on(&model(o)?, o)
}

/// `--levers`: the same steps with the fused kernels switched on one at a time, on one model (the
/// weights are made once). The first row has none of them; each next row adds one.
pub fn run_levers(o: &Options) -> anyhow::Result<Vec<TrainBench>> {
    let mut model = model(o)?;
    // Flash attention stays as `o.fusion` has it (on by default; the model decides by length).
    let mut fusion = Fusion { flash: o.fusion.flash, ..Fusion::NONE };
    let mut rows = Vec::new();
    model.fusion = fusion;
    rows.push(run_on(&model, o)?);
    for (_, switch_on) in Fusion::LEVERS {
        switch_on(&mut fusion);
        model.fusion = fusion;
        rows.push(run_on(&model, o)?);
    }
    Ok(rows)
}

fn run_on(model: &Model, o: &Options) -> anyhow::Result<TrainBench> {
    let config = model.config.clone();
    let lora_cfg = LoraConfig {
        r: 8,
        alpha: 32.0,
        dropout: 0.1,
        targets: recipe_targets(config.family),
        base_model_name_or_path: o.shape.clone(),
    };
    let mut lora = Lora::new(lora_cfg, &config, 42, &o.device)?;
    let mut opt = AdamW::new(AdamWConfig::default(), lora.param_names(), &lora.params())?;
    opt.fused = model.fusion.optimizer;
    let total = o.warmup + o.steps;
    let batches = match &o.manifest {
        Some(path) => real_batches(path, o.micro_batch, total)?,
        None => vec![random_batch(o.micro_batch, o.seq)],
    };
    reset_peak(&o.device)?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut tokens_timed = 0usize;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // A host thread hands the batches over ahead of the steps, as in `lorahost run` (train/batches.rs).
        let (tx, upcoming) = std::sync::mpsc::sync_channel::<HostBatch>(2);
        let source = &batches;
        scope.spawn(move || {
            for step in 0..total {
                if tx.send(source[step % source.len()].clone()).is_err() {
                    break;
                }
            }
        });
        for step in 0..total {
            let batch = upcoming.recv()?;
            let t0 = Instant::now();
            let (ids, labels) = batch.tensors()?;
            let mut dropout = ModelRng::for_stream(42, &[step as u64]);
            let out = model.loss_and_grads(&ids, &labels, &lora, &mut dropout, o.recompute)?;
            let loss = out.loss_sum / out.n_tokens.max(1) as f64;
            if !loss.is_finite() {
                bail!("the loss is {loss} at step {}", step + 1);
            }
            // As `lorahost run` does it: normalise by the tokens and clip to 1 inside the optimizer step.
            let per_token = 1.0 / out.n_tokens.max(1) as f64;
            let norm = optim::global_norm_with(&out.grads.tensors(), model.fusion.optimizer)? * per_token;
            if !norm.is_finite() {
                bail!("the gradient norm is {norm} at step {}", step + 1);
            }
            opt.step_scaled(&mut lora.params_mut(), &out.grads.tensors(), o.lr, per_token * optim::clip_coefficient(norm, 1.0))?;
            o.device.synchronize()?;
            losses.push(loss);
            if step >= o.warmup {
                times.push(t0.elapsed().as_secs_f64());
                tokens_timed += batch.tokens;
            }
        }
        Ok(())
    })?;
    let peak_gib = peak(&o.device)?.map(|b| b as f64 / (1u64 << 30) as f64);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let step_s = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let total_s: f64 = times.iter().sum();
    Ok(TrainBench {
        shape: o.shape.clone(),
        device: format!("{:?}", o.device),
        dtype: format!("{:?}", o.dtype),
        micro_batch: o.micro_batch,
        seq: o.seq,
        recompute: o.recompute,
        fusion: model.fusion,
        data: o.manifest.as_ref().map_or("random tokens".into(), |p| p.display().to_string()),
        lora_params: lora.num_params(),
        timed_steps: times.len(),
        step_ms: step_s * 1e3,
        tokens_per_s: tokens_timed as f64 / total_s,
        peak_gib,
        losses,
    })
}

/// Random tokens, every position trained: the worst case for the loss over the vocabulary.
fn random_batch(micro_batch: usize, seq: usize) -> HostBatch {
    let n = micro_batch * seq;
    let mut rng = ModelRng::new(7);
    let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % 151_000) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    HostBatch { ids, labels, rows: micro_batch, seq, tokens: n }
}

/// The first `steps` micro-batches of a manifest's token stream, in training order.
fn real_batches(path: &std::path::Path, micro_batch: usize, steps: usize) -> anyhow::Result<Vec<HostBatch>> {
    let m = Manifest::load(path)?;
    let plan = data::Plan::new(&m)?;
    let prepared = data::prepare_plan(&plan)?;
    let stream = &prepared.stream;
    let pad = plan.tokenizer.special_id("<|endoftext|>").unwrap_or(0);
    let schedule = Schedule { n_train: stream.n_train, micro_batch, grad_accum: 1, seed: m.run.seed, pad };
    let offsets = stream.offsets();
    Ok((0..steps as u64).flat_map(|s| schedule.step(stream, &offsets, s).micro).collect())
}

fn reset_peak(device: &Device) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        crate::model::cuda::reset_peak_memory(d)?;
    }
    let _ = device;
    Ok(())
}

/// Peak bytes in use on the GPU since [`reset_peak`]; None on the CPU.
fn peak(device: &Device) -> anyhow::Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return Ok(Some(crate::model::cuda::peak_memory(d)?));
    }
    let _ = device;
    Ok(None)
}
