//! Tiny Qwen v1 checkpoints with random weights, written in the real layout (config.json + safetensors,
//! optionally sharded with an index), deterministic for a seed: the same spec and seed give the same bytes.
//! Used by tests and CPU quickstarts; with the real vocab size (151936) the real tokenizer can drive it.
use super::config::{Family, QwenConfig, TensorId};
use super::rng::Rng;
use super::weights::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::fsutil::write_atomic;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct TinySpec {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// As in config.json: w1 / w2 are half of it.
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub seq_length: usize,
    /// Standard deviation of the normal init of linear weights, embeddings and the c_attn bias.
    pub init_std: f64,
    /// RMSNorm weights are 1 + norm_jitter * N(0, 1) (0: exactly 1, like a fresh model).
    pub norm_jitter: f64,
    /// 1: a single `model.safetensors`; more: that many shards plus `model.safetensors.index.json`.
    pub shards: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            intermediate_size: 2 * 128,
            vocab_size: 151936,
            seq_length: 512,
            init_std: 0.02,
            norm_jitter: 0.0,
            shards: 1,
        }
    }
}

impl TinySpec {
    pub fn config(&self) -> QwenConfig {
        QwenConfig {
            family: Family::QwenV1,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            head_dim: self.hidden_size / self.num_heads,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            eps: 1e-6,
            rope_base: 10000.0,
            seq_length: self.seq_length,
            tie_word_embeddings: false,
        }
    }

    /// config.json text with the keys of a real Qwen v1 config (fixed key order, so bytes are stable).
    pub fn config_json(&self) -> String {
        let c = self.config();
        let entries: Vec<(&str, Value)> = vec![
            ("architectures", json!(["QWenLMHeadModel"])),
            ("model_type", json!("qwen")),
            ("hidden_size", json!(c.hidden_size)),
            ("num_hidden_layers", json!(c.num_layers)),
            ("num_attention_heads", json!(c.num_heads)),
            ("kv_channels", json!(c.head_dim)),
            ("intermediate_size", json!(c.intermediate_size)),
            ("vocab_size", json!(c.vocab_size)),
            ("layer_norm_epsilon", json!(c.eps)),
            ("rotary_emb_base", json!(c.rope_base)),
            ("rotary_pct", json!(1.0)),
            ("seq_length", json!(c.seq_length)),
            ("max_position_embeddings", json!(c.seq_length)),
            ("no_bias", json!(true)),
            ("tie_word_embeddings", json!(false)),
            ("use_dynamic_ntk", json!(true)),
            ("use_logn_attn", json!(true)),
            ("torch_dtype", json!("float32")),
        ];
        let body: Vec<String> = entries.iter().map(|(k, v)| format!("  {k:?}: {v}")).collect();
        format!("{{\n{}\n}}\n", body.join(",\n"))
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
        let mut rng = Rng::for_stream(seed, &[i as u64]);
        let values: Vec<f32> = match id {
            TensorId::FinalNorm | TensorId::Ln1(_) | TensorId::Ln2(_) => {
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
    weight_map.sort();
    let map_body: Vec<String> = weight_map.iter().map(|(n, f)| format!("    {n:?}: {f:?}")).collect();
    let index = format!(
        "{{\n  \"metadata\": {{\n    \"total_size\": {total_size}\n  }},\n  \"weight_map\": {{\n{}\n  }}\n}}\n",
        map_body.join(",\n")
    );
    write_atomic(&dir.join(INDEX_FILE), index.as_bytes())?;
    Ok(())
}
