//! Frozen weights from safetensors: one `model.safetensors`, or shards listed by the `weight_map` of
//! `model.safetensors.index.json` (never a hard-coded shard count). Weights are plain `Tensor`s, not
//! `Var`s: nothing ever asks for their gradient.
use super::config::{QwenConfig, Site, TensorId};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where a checkpoint's config and tensors are.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: QwenConfig,
    /// The safetensors files: the single file, or the shards named in the index (sorted, each once).
    pub files: Vec<PathBuf>,
    /// The index file, when the checkpoint is sharded.
    pub index_path: Option<PathBuf>,
    /// Tensor name -> position in `files` (from the index; empty for a single file).
    weight_map: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Reads `config.json` and finds the tensor files in `dir`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config = QwenConfig::from_file(&dir.join(CONFIG_FILE))?;
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
            Ok(Checkpoint { dir: dir.to_path_buf(), config, files, index_path: Some(index_path), weight_map })
        } else if single.is_file() {
            Ok(Checkpoint { dir: dir.to_path_buf(), config, files: vec![single], index_path: None, weight_map: BTreeMap::new() })
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
    pub fn load_weights(&self, dtype: DType, device: &Device) -> Result<QwenWeights> {
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
            layers.push(LayerWeights {
                ln_1: load(TensorId::Ln1(i))?,
                c_attn: load(TensorId::Weight(i, Site::CAttn))?,
                c_attn_bias: load(TensorId::CAttnBias(i))?,
                attn_c_proj: load(TensorId::Weight(i, Site::AttnCProj))?,
                ln_2: load(TensorId::Ln2(i))?,
                w1: load(TensorId::Weight(i, Site::W1))?,
                w2: load(TensorId::Weight(i, Site::W2))?,
                mlp_c_proj: load(TensorId::Weight(i, Site::MlpCProj))?,
            });
        }
        let wte = load(TensorId::Embedding)?;
        let lm_head = if cfg.tie_word_embeddings { wte.clone() } else { load(TensorId::LmHead)? };
        Ok(QwenWeights { wte, layers, ln_f: load(TensorId::FinalNorm)?, lm_head })
    }
}

/// The frozen weights of one block. Linear weights are [out, in] as stored.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub ln_1: Tensor,
    pub c_attn: Tensor,
    pub c_attn_bias: Tensor,
    pub attn_c_proj: Tensor,
    pub ln_2: Tensor,
    pub w1: Tensor,
    pub w2: Tensor,
    pub mlp_c_proj: Tensor,
}

impl LayerWeights {
    pub fn linear(&self, site: Site) -> &Tensor {
        match site {
            Site::CAttn => &self.c_attn,
            Site::AttnCProj => &self.attn_c_proj,
            Site::W1 => &self.w1,
            Site::W2 => &self.w2,
            Site::MlpCProj => &self.mlp_c_proj,
        }
    }
}

/// All frozen weights.
#[derive(Clone, Debug)]
pub struct QwenWeights {
    /// [vocab, hidden]
    pub wte: Tensor,
    pub layers: Vec<LayerWeights>,
    pub ln_f: Tensor,
    /// [vocab, hidden]
    pub lm_head: Tensor,
}

impl QwenWeights {
    /// A copy in `dtype` on `device` (e.g. a CPU f32 model's exact weights as bf16 on the GPU).
    pub fn to(&self, dtype: DType, device: &Device) -> Result<QwenWeights> {
        let cv = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    ln_1: cv(&l.ln_1)?,
                    c_attn: cv(&l.c_attn)?,
                    c_attn_bias: cv(&l.c_attn_bias)?,
                    attn_c_proj: cv(&l.attn_c_proj)?,
                    ln_2: cv(&l.ln_2)?,
                    w1: cv(&l.w1)?,
                    w2: cv(&l.w2)?,
                    mlp_c_proj: cv(&l.mlp_c_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(QwenWeights { wte: cv(&self.wte)?, layers, ln_f: cv(&self.ln_f)?, lm_head: cv(&self.lm_head)? })
    }

    /// Random weights of `config`'s shape made directly on `device` (normal with `std`, norms at 1): for
    /// benchmarks at the real shapes without a checkpoint. Reproducible on the CPU; not across devices.
    pub fn random(config: &QwenConfig, std: f64, dtype: DType, device: &Device) -> Result<QwenWeights> {
        // On the CPU from our own seeded generator (the same weights every time, for tests); on a GPU from
        // candle's generator there (fast at 14B scale; fixed seed per device).
        let next = std::cell::Cell::new(0u64);
        let normal = |t: TensorId| -> Result<Tensor> {
            let shape = config.tensor_shape(t);
            next.set(next.get() + 1);
            if device.is_cpu() {
                let mut rng = super::rng::Rng::for_stream(0x7EA5, &[next.get()]);
                let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| (std * rng.normal()) as f32).collect();
                return Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?);
            }
            Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
        };
        let ones = |t: TensorId| -> Result<Tensor> { Ok(Tensor::ones(config.tensor_shape(t), dtype, device)?) };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            layers.push(LayerWeights {
                ln_1: ones(TensorId::Ln1(i))?,
                c_attn: normal(TensorId::Weight(i, Site::CAttn))?,
                c_attn_bias: normal(TensorId::CAttnBias(i))?,
                attn_c_proj: normal(TensorId::Weight(i, Site::AttnCProj))?,
                ln_2: ones(TensorId::Ln2(i))?,
                w1: normal(TensorId::Weight(i, Site::W1))?,
                w2: normal(TensorId::Weight(i, Site::W2))?,
                mlp_c_proj: normal(TensorId::Weight(i, Site::MlpCProj))?,
            });
        }
        Ok(QwenWeights {
            wte: normal(TensorId::Embedding)?,
            layers,
            ln_f: ones(TensorId::FinalNorm)?,
            lm_head: normal(TensorId::LmHead)?,
        })
    }
}
