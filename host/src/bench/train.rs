//! `lorahost bench train`: training steps of a model at a named shape with random weights made on the
//! device (no checkpoint), through the real trainer code (the model's forward/backward, LoRA r8 on c_attn +
//! c_proj, AdamW), printing step time and tokens/s as JSON. The GPU numbers of BENCHMARKS.md come from here.
use crate::lora::{Lora, LoraConfig};
use crate::model::config::{Family, QwenConfig};
use crate::model::qwen::QwenModel;
use crate::model::rng::Rng as ModelRng;
use crate::model::weights::QwenWeights;
use crate::train::optim::{AdamW, AdamWConfig};
use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub shape: String,
    pub device: String,
    pub dtype: String,
    pub micro_batch: usize,
    pub seq: usize,
    pub recompute: bool,
    pub lora_params: usize,
    pub timed_steps: usize,
    /// Median over the timed steps (forward + backward + optimizer), in ms.
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub final_loss: f64,
}

/// The model shapes benchmarks can name.
pub fn shape(name: &str) -> anyhow::Result<QwenConfig> {
    let (hidden, layers, heads, intermediate, vocab, seq) = match name {
        "qwen-14b" => (5120, 40, 40, 27392, 152064, 2048),
        "qwen-7b" => (4096, 32, 32, 22016, 151936, 2048),
        "qwen-1.8b" => (2048, 24, 16, 11008, 151936, 2048),
        "tiny" => (64, 2, 4, 256, 151936, 2048),
        other => bail!("unknown shape `{other}`: qwen-14b, qwen-7b, qwen-1.8b or tiny"),
    };
    Ok(QwenConfig {
        family: Family::QwenV1,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        head_dim: hidden / heads,
        intermediate_size: intermediate,
        vocab_size: vocab,
        eps: 1e-6,
        rope_base: 10000.0,
        seq_length: seq,
        tie_word_embeddings: false,
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
}

pub fn run(o: &Options) -> anyhow::Result<TrainBench> {
    let config = shape(&o.shape)?;
    if o.seq > config.seq_length {
        bail!("--seq {} is longer than the shape's {}", o.seq, config.seq_length);
    }
    let weights = QwenWeights::random(&config, 0.02, o.dtype, &o.device)?;
    let model = QwenModel { config: config.clone(), weights, dtype: o.dtype, device: o.device.clone(), loss_chunk: 512 };
    let lora_cfg = LoraConfig {
        r: 8,
        alpha: 32.0,
        dropout: 0.1,
        targets: vec!["c_attn".into(), "c_proj".into()],
        base_model_name_or_path: o.shape.clone(),
    };
    let mut lora = Lora::new(lora_cfg, &config, 42, &o.device)?;
    let mut opt = AdamW::new(AdamWConfig::default(), lora.param_names(), &lora.params())?;
    // Random tokens, every position trained: the worst case for the loss over the vocabulary.
    let n = o.micro_batch * o.seq;
    let mut rng = ModelRng::new(7);
    let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % 151_000) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::from_vec(ids, (o.micro_batch, o.seq), &o.device)?;
    let labels = Tensor::from_vec(labels, (o.micro_batch, o.seq), &o.device)?;
    let mut times = Vec::new();
    let mut loss = f64::NAN;
    for step in 0..o.warmup + o.steps {
        let t0 = Instant::now();
        let mut dropout = ModelRng::for_stream(42, &[step as u64]);
        let mut out = model.loss_and_grads(&ids, &labels, &lora, &mut dropout, o.recompute)?;
        out.grads.scale(1.0 / out.n_tokens.max(1) as f64)?;
        opt.step(&mut lora.params_mut(), &out.grads.tensors(), 1e-4)?;
        o.device.synchronize()?;
        loss = out.loss_sum / out.n_tokens.max(1) as f64;
        if step >= o.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let step_s = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(TrainBench {
        shape: o.shape.clone(),
        device: format!("{:?}", o.device),
        dtype: format!("{:?}", o.dtype),
        micro_batch: o.micro_batch,
        seq: o.seq,
        recompute: o.recompute,
        lora_params: lora.num_params(),
        timed_steps: times.len(),
        step_ms: step_s * 1e3,
        tokens_per_s: n as f64 / step_s,
        final_loss: loss,
    })
}
