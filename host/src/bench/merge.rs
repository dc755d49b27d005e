//! `lorahost bench write-model`: a checkpoint at a named shape (bf16 or f32, ~2 GB shards) and a LoRA adapter
//! for it, written without holding the model in memory, so `lorahost merge` can be measured at real sizes
//! (BENCHMARKS.md, `merge` at the Qwen-14B shape). The values are a counter-based hash (fast in parallel),
//! not a trained model: merge's time and memory do not depend on them.
use crate::model::config::TensorId;
use crate::model::lora::{Lora, LoraConfig};
use crate::rng::uniform_at;
use crate::model::weights::{write_index, CONFIG_FILE};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::path::Path;

/// Target size of one shard.
const SHARD_BYTES: usize = 2 << 30;

/// Writes `<dir>/model` (config.json, shards, index) and `<dir>/adapter` (PEFT, rank 8 on the recipe's
/// matrices, B non-zero so merging changes the weights).
pub fn write_model(shape: &str, dir: &Path, dtype: DType) -> Result<()> {
    let cfg = super::train::shape(shape)?;
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).with_context(|| format!("cannot create {}", model_dir.display()))?;
    crate::fsutil::write_atomic(&model_dir.join(CONFIG_FILE), cfg.to_json().as_bytes())?;
    let ids = cfg.tensors();
    let elem = dtype.size_in_bytes();
    // Contiguous groups of tensors of about SHARD_BYTES each.
    let mut groups: Vec<Vec<(usize, TensorId)>> = vec![vec![]];
    let mut size = 0;
    for (i, &id) in ids.iter().enumerate() {
        let bytes = cfg.tensor_shape(id).iter().product::<usize>() * elem;
        if size + bytes > SHARD_BYTES && !groups.last().unwrap().is_empty() {
            groups.push(vec![]);
            size = 0;
        }
        groups.last_mut().unwrap().push((i, id));
        size += bytes;
    }
    let n_files = groups.len();
    let (mut weight_map, mut total) = (Vec::new(), 0);
    for (k, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n_files);
        let mut tensors = Vec::with_capacity(group.len());
        for &(i, id) in group {
            let shape = cfg.tensor_shape(id);
            let n: usize = shape.iter().product();
            let norm = matches!(id, TensorId::Ln1(_) | TensorId::Ln2(_) | TensorId::FinalNorm | TensorId::QNorm(_) | TensorId::KNorm(_));
            let v: Vec<f32> = (0..n as u64).into_par_iter().map(|j| if norm { 1.0 } else { 0.04 * (uniform_at(i as u64, j) - 0.5) }).collect();
            tensors.push((cfg.tensor_name(id), Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?));
            weight_map.push((cfg.tensor_name(id), file.clone()));
            total += n * elem;
        }
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)?;
        crate::fsutil::write_atomic(&model_dir.join(&file), &bytes)?;
        eprintln!("wrote {file} ({:.2} GB)", bytes.len() as f64 / 1e9);
    }
    write_index(&model_dir, weight_map, total)?;

    let lora_cfg = LoraConfig { r: 8, alpha: 32.0, dropout: 0.0, targets: super::train::recipe_targets(cfg.family), base_model_name_or_path: shape.into() };
    let mut lora = Lora::new(lora_cfg, &cfg, 1, &Device::Cpu)?;
    for (k, p) in lora.params_mut().into_iter().enumerate().filter(|(k, _)| k % 2 == 1) {
        *p = (p.ones_like()? * (0.001 * (1 + k % 7) as f64))?;
    }
    lora.save(&dir.join("adapter"))?;
    Ok(())
}
