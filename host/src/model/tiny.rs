//! Tiny checkpoints of any family with random weights, written in the real layout (config.json +
//! safetensors, optionally sharded with an index), deterministic for a seed: the same spec and seed give the
//! same bytes. Used by tests and CPU quickstarts; with the real vocab size (151936) the real tokenizer can
//! drive it.
use super::config::{Family, ModelConfig, RopeScaling, TensorId};
use crate::rng::SplitMix;
use super::weights::{CONFIG_FILE, SINGLE_FILE};
use crate::fsutil::write_atomic;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct TinySpec {
    pub family: Family,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Key/value heads (GQA); ignored for Qwen v1, which has none.
    pub num_kv_heads: usize,
    /// None: hidden_size / num_heads (Qwen3 and Llama may set another).
    pub head_dim: Option<usize>,
    /// As in config.json: for Qwen v1 w1 / w2 are half of it, for the others it is their width.
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub seq_length: usize,
    /// Standard deviation of the normal init of linear weights, embeddings and the c_attn bias.
    pub init_std: f64,
    /// RMSNorm weights are 1 + norm_jitter * N(0, 1) (0: exactly 1, like a fresh model).
    pub norm_jitter: f64,
    /// 1: a single `model.safetensors`; more: that many shards plus `model.safetensors.index.json`.
    pub shards: usize,
    /// lm_head shares the embedding (Qwen2.5-0.5B, SmolLM2, Llama 3.2 do).
    pub tie_word_embeddings: bool,
    /// Llama only: biases on q/k/v (`attention_bias`).
    pub attention_bias: bool,
    pub rope_scaling: RopeScaling,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            family: Family::QwenV1,
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: None,
            intermediate_size: 2 * 128,
            vocab_size: 151936,
            seq_length: 512,
            init_std: 0.02,
            norm_jitter: 0.0,
            shards: 1,
            tie_word_embeddings: false,
            attention_bias: false,
            rope_scaling: RopeScaling::None,
        }
    }
}

impl TinySpec {
    /// A small model of `family` with the shape features that family has: GQA (2 query heads per kv head)
    /// for Qwen2, Qwen3 and Llama; a head dim other than hidden / heads for Qwen3; tied embeddings for
    /// Llama (as SmolLM2); Llama 3 rope scaling. Everything else as [`TinySpec::default`].
    pub fn of_family(family: Family) -> TinySpec {
        let base = TinySpec { family, ..TinySpec::default() };
        match family {
            Family::QwenV1 => base,
            Family::Qwen2 => TinySpec { num_kv_heads: 2, intermediate_size: 96, ..base },
            Family::Qwen3 => TinySpec { num_kv_heads: 2, head_dim: Some(24), intermediate_size: 96, ..base },
            Family::Llama => TinySpec {
                num_kv_heads: 2,
                intermediate_size: 96,
                tie_word_embeddings: true,
                rope_scaling: RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64.0 },
                ..base
            },
        }
    }

    pub fn config(&self) -> ModelConfig {
        let v1 = self.family == Family::QwenV1;
        ModelConfig {
            family: self.family,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: if v1 { self.num_heads } else { self.num_kv_heads },
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_heads),
            mlp_width: if v1 { self.intermediate_size / 2 } else { self.intermediate_size },
            vocab_size: self.vocab_size,
            eps: 1e-6,
            rope_base: if v1 { 10000.0 } else { 1_000_000.0 },
            rope_scaling: self.rope_scaling.clone(),
            seq_length: self.seq_length,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: match self.family {
                Family::QwenV1 | Family::Qwen2 => true,
                Family::Qwen3 => false,
                Family::Llama => self.attention_bias,
            },
            qk_norm: self.family == Family::Qwen3,
        }
    }

    /// config.json text with the keys of a real config of the family (fixed key order, so bytes are stable).
    pub fn config_json(&self) -> String {
        self.config().to_json()
    }
}

/// Writes config.json and the weights into `dir` (created if needed).
pub fn write_tiny_checkpoint(dir: &Path, spec: &TinySpec, seed: u64) -> Result<()> {
    let cfg = spec.config();
    cfg.validate().context("tiny spec")?;
    if spec.shards == 0 {
        bail!("tiny spec: shards must be at least 1");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomic(&dir.join(CONFIG_FILE), spec.config_json().as_bytes())?;

    // Every tensor from its own stream (seed, position in the tensor list).
    let ids = cfg.tensors();
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        let shape = cfg.tensor_shape(id);
        let n: usize = shape.iter().product();
        let mut rng = SplitMix::for_stream(seed, &[i as u64]);
        let values: Vec<f32> = match id {
            TensorId::FinalNorm | TensorId::Ln1(_) | TensorId::Ln2(_) | TensorId::QNorm(_) | TensorId::KNorm(_) => {
                (0..n).map(|_| if spec.norm_jitter == 0.0 { 1.0 } else { (1.0 + spec.norm_jitter * rng.normal()) as f32 }).collect()
            }
            _ => (0..n).map(|_| (spec.init_std * rng.normal()) as f32).collect(),
        };
        tensors.push((cfg.tensor_name(id), Tensor::from_vec(values, shape, &Device::Cpu)?));
    }

    let metadata: Option<HashMap<String, String>> = Some([("format".to_string(), "pt".to_string())].into());
    if spec.shards == 1 {
        let bytes = safetensors::serialize(tensors, metadata)?;
        write_atomic(&dir.join(SINGLE_FILE), &bytes)?;
        return Ok(());
    }
    // Contiguous groups of tensors, HF shard names, and the index.
    let per_shard = tensors.len().div_ceil(spec.shards);
    let mut weight_map: Vec<(String, String)> = Vec::new();
    let mut total_size = 0usize;
    let n_files = tensors.len().div_ceil(per_shard);
    for (k, group) in tensors.chunks(per_shard).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n_files);
        for (name, t) in group {
            weight_map.push((name.clone(), file.clone()));
            total_size += t.elem_count() * 4;
        }
        let bytes = safetensors::serialize(group.iter().map(|(n, t)| (n.as_str(), t)), metadata.clone())?;
        write_atomic(&dir.join(&file), &bytes)?;
    }
    super::weights::write_index(dir, weight_map, total_size)
}
