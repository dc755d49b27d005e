//! Frozen weights from safetensors: one `model.safetensors`, or shards listed by the `weight_map` of
//! `model.safetensors.index.json` (never a hard-coded shard count). Weights are plain `Tensor`s, not
//! `Var`s: nothing ever asks for their gradient.
use super::config::{ModelConfig, Site, TensorId};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Writes `model.safetensors.index.json` for shards: `weight_map` (tensor name -> shard file, sorted) and the
/// total byte size, in HF's layout (fixed key order, so the bytes are stable).
pub fn write_index(dir: &Path, mut weight_map: Vec<(String, String)>, total_size: usize) -> Result<()> {
    weight_map.sort();
    let map_body: Vec<String> = weight_map.iter().map(|(n, f)| format!("    {n:?}: {f:?}")).collect();
    let index = format!(
        "{{\n  \"metadata\": {{\n    \"total_size\": {total_size}\n  }},\n  \"weight_map\": {{\n{}\n  }}\n}}\n",
        map_body.join(",\n")
    );
    crate::fsutil::write_atomic(&dir.join(INDEX_FILE), index.as_bytes())?;
    Ok(())
}

/// Where a model folder's config and tensors are (the frozen base; training checkpoints are train::checkpoint).
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The safetensors files: the single file, or the shards named in the index (sorted, each once).
    pub files: Vec<PathBuf>,
    /// The index file, when the checkpoint is sharded.
    pub index_path: Option<PathBuf>,
    /// Tensor name -> position in `files` (from the index; empty for a single file).
    weight_map: BTreeMap<String, usize>,
}

impl ModelFiles {
    /// Reads `config.json` and finds the tensor files in `dir`.
    pub fn open(dir: &Path) -> Result<ModelFiles> {
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing object \"weight_map\"", index_path.display()))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().with_context(|| {
                    format!("{}: weight_map entry for {tensor:?} must be a file name", index_path.display())
                })?;
                // Shards are files next to the index, nothing else.
                if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    bail!("{}: weight_map names a file outside the folder: {file:?}", index_path.display());
                }
                names.push(file.to_string());
            }
            names.sort();
            names.dedup();
            let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
            for f in &files {
                if !f.is_file() {
                    bail!("{} names shard {}, which does not exist", index_path.display(), f.display());
                }
            }
            let weight_map = map
                .iter()
                .map(|(t, f)| (t.clone(), names.binary_search(&f.as_str().unwrap().to_string()).unwrap()))
                .collect();
            Ok(ModelFiles { dir: dir.to_path_buf(), config, files, index_path: Some(index_path), weight_map })
        } else if single.is_file() {
            Ok(ModelFiles { dir: dir.to_path_buf(), config, files: vec![single], index_path: None, weight_map: BTreeMap::new() })
        } else {
            bail!("{}: neither {SINGLE_FILE} nor {INDEX_FILE} found", dir.display())
        }
    }

    /// The file that should hold `name`.
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        match &self.index_path {
            None => Ok(&self.files[0]),
            Some(index) => match self.weight_map.get(name) {
                Some(&i) => Ok(&self.files[i]),
                None => bail!("tensor {name} is not listed in the weight_map of {}", index.display()),
            },
        }
    }

    /// Loads every tensor the config calls for, converted to `dtype` on `device`.
    pub fn load_weights(&self, dtype: DType, device: &Device) -> Result<Weights> {
        // Memory-map each file once (the files must not change while loading).
        let mut mapped = Vec::with_capacity(self.files.len());
        for f in &self.files {
            // SAFETY: the mapping is read-only and lives only for this call; a file changed underneath
            // could give wrong values but not undefined behaviour in safe code we rely on.
            let st = unsafe { MmapedSafetensors::new(f) }
                .with_context(|| format!("{}: not a readable safetensors file", f.display()))?;
            mapped.push(st);
        }
        let cfg = &self.config;
        let load = |t: TensorId| -> Result<Tensor> {
            let name = cfg.tensor_name(t);
            let file = self.file_of(&name)?;
            let st = &mapped[self.files.iter().position(|f| f == file).unwrap()];
            let view = st.get(&name).map_err(|_| anyhow::anyhow!("tensor {name} is missing from {}", file.display()))?;
            let expected = cfg.tensor_shape(t);
            if view.shape() != expected.as_slice() {
                bail!(
                    "tensor {name} in {} has shape {:?}, expected {:?} (from {})",
                    file.display(),
                    view.shape(),
                    expected,
                    self.dir.join(CONFIG_FILE).display()
                );
            }
            let x = st.load(&name, device).with_context(|| format!("cannot load tensor {name} from {}", file.display()))?;
            Ok(x.to_dtype(dtype)?)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(LayerWeights::assemble(cfg, i, &load)?);
        }
        let wte = load(TensorId::Embedding)?;
        let lm_head = if cfg.tie_word_embeddings { wte.clone() } else { load(TensorId::LmHead)? };
        Ok(Weights { wte, layers, ln_f: load(TensorId::FinalNorm)?, lm_head })
    }
}

/// The frozen weights of one block. Linear weights are [out, in] as stored, except q, k and v: one fused
/// [q | k | v, in] weight (one GEMM), whatever the family stores.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub ln_1: Tensor,
    pub qkv: Tensor,
    pub qkv_bias: Option<Tensor>,
    /// Qwen3's per-head norms on q and k, [head_dim].
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub o: Tensor,
    pub ln_2: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl LayerWeights {
    /// The weights of layer `i` from its checkpoint tensors (`get` loads one); q, k and v are fused here.
    pub fn assemble(cfg: &ModelConfig, i: usize, get: &dyn Fn(TensorId) -> Result<Tensor>) -> Result<LayerWeights> {
        let attn_in: Vec<Site> = cfg.sites().iter().copied().filter(|s| s.is_attention_input()).collect();
        let fuse = |parts: Vec<Tensor>| -> Result<Tensor> {
            Ok(if parts.len() == 1 { parts.into_iter().next().unwrap() } else { Tensor::cat(&parts, 0)? })
        };
        let qkv = fuse(attn_in.iter().map(|&s| get(TensorId::Weight(i, s))).collect::<Result<_>>()?)?;
        let qkv_bias = match cfg.qkv_bias {
            true => Some(fuse(attn_in.iter().map(|&s| get(TensorId::Bias(i, s))).collect::<Result<_>>()?)?),
            false => None,
        };
        let (q_norm, k_norm) = match cfg.qk_norm {
            true => (Some(get(TensorId::QNorm(i))?), Some(get(TensorId::KNorm(i))?)),
            false => (None, None),
        };
        Ok(LayerWeights {
            ln_1: get(TensorId::Ln1(i))?,
            qkv,
            qkv_bias,
            q_norm,
            k_norm,
            o: get(TensorId::Weight(i, Site::O))?,
            ln_2: get(TensorId::Ln2(i))?,
            gate: get(TensorId::Weight(i, Site::Gate))?,
            up: get(TensorId::Weight(i, Site::Up))?,
            down: get(TensorId::Weight(i, Site::Down))?,
        })
    }

    /// The frozen weight of a linear that is not an attention input (those live in `qkv`).
    pub fn linear(&self, site: Site) -> &Tensor {
        match site {
            Site::O => &self.o,
            Site::Gate => &self.gate,
            Site::Up => &self.up,
            Site::Down => &self.down,
            Site::Qkv | Site::Q | Site::K | Site::V => &self.qkv,
        }
    }

    fn map(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<LayerWeights> {
        let opt = |t: &Option<Tensor>| t.as_ref().map(f).transpose();
        Ok(LayerWeights {
            ln_1: f(&self.ln_1)?,
            qkv: f(&self.qkv)?,
            qkv_bias: opt(&self.qkv_bias)?,
            q_norm: opt(&self.q_norm)?,
            k_norm: opt(&self.k_norm)?,
            o: f(&self.o)?,
            ln_2: f(&self.ln_2)?,
            gate: f(&self.gate)?,
            up: f(&self.up)?,
            down: f(&self.down)?,
        })
    }
}

/// All frozen weights.
#[derive(Clone, Debug)]
pub struct Weights {
    /// [vocab, hidden]
    pub wte: Tensor,
    pub layers: Vec<LayerWeights>,
    pub ln_f: Tensor,
    /// [vocab, hidden]
    pub lm_head: Tensor,
}

impl Weights {
    /// A copy in `dtype` on `device` (e.g. a CPU f32 model's exact weights as bf16 on the GPU).
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Weights> {
        let cv = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        let layers = self.layers.iter().map(|l| l.map(&cv)).collect::<Result<Vec<_>>>()?;
        Ok(Weights { wte: cv(&self.wte)?, layers, ln_f: cv(&self.ln_f)?, lm_head: cv(&self.lm_head)? })
    }

    /// Random weights of `config`'s shape made directly on `device` (normal with `std`, norms at 1): for
    /// benchmarks at the real shapes without a checkpoint. Reproducible on the CPU; not across devices.
    pub fn random(config: &ModelConfig, std: f64, dtype: DType, device: &Device) -> Result<Weights> {
        // On the CPU from our own seeded generator (the same weights every time, for tests); on a GPU from
        // candle's generator there (fast at 14B scale; fixed seed per device).
        let next = std::cell::Cell::new(0u64);
        let normal = |t: TensorId| -> Result<Tensor> {
            let shape = config.tensor_shape(t);
            next.set(next.get() + 1);
            if device.is_cpu() {
                let mut rng = crate::rng::SplitMix::for_stream(0x7EA5, &[next.get()]);
                let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| (std * rng.normal()) as f32).collect();
                return Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?);
            }
            Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
        };
        let ones = |t: TensorId| -> Result<Tensor> { Ok(Tensor::ones(config.tensor_shape(t), dtype, device)?) };
        let get = |t: TensorId| match t {
            TensorId::Ln1(_) | TensorId::Ln2(_) | TensorId::QNorm(_) | TensorId::KNorm(_) | TensorId::FinalNorm => ones(t),
            _ => normal(t),
        };
        let layers = (0..config.num_layers).map(|i| LayerWeights::assemble(config, i, &get)).collect::<Result<Vec<_>>>()?;
        let wte = normal(TensorId::Embedding)?;
        let lm_head = if config.tie_word_embeddings { wte.clone() } else { normal(TensorId::LmHead)? };
        Ok(Weights { wte, layers, ln_f: ones(TensorId::FinalNorm)?, lm_head })
    }
}
