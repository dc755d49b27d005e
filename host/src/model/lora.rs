//! LoRA adapters with PEFT semantics: parameters, init, gradients container, PEFT (de)serialisation and
//! merging into the base weights.
//!
//! - Targets match module paths by suffix, as PEFT does: a module `transformer.h.3.attn.c_proj` is adapted
//!   when a target equals it or it ends with `.` + target. So `c_proj` adapts both attn.c_proj and
//!   mlp.c_proj; `attn.c_proj` only the attention one. `all-linear` adapts every linear of every block
//!   (PEFT's shorthand; never lm_head). Module names are the family's own (`q_proj`, ..., `down_proj` for
//!   Qwen2/Qwen3/Llama; `c_attn`, `c_proj`, `w1`, `w2` for Qwen v1), as PEFT would name them.
//! - Forward: `y = W x + (alpha / r) * B A dropout(x)`; A [r, in] kaiming-uniform(a = sqrt(5)), which is
//!   U(-1/sqrt(in), 1/sqrt(in)); B [out, r] zeros, so a fresh adapter changes nothing.
//! - Parameters are f32 whatever the model dtype (cast in the forward).
//! - On disk: a folder with `adapter_config.json` and `adapter_model.safetensors`, keys
//!   `base_model.model.<module path>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r].
use crate::fsutil::write_atomic;
use super::config::{Family, ModelConfig, Site};
use crate::rng::SplitMix;
use super::weights::ModelFiles;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Hyper-parameters of an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f64,
    /// Module names matched by suffix (PEFT `target_modules`).
    pub targets: Vec<String>,
    /// Written to `adapter_config.json` for loaders that fetch the base model.
    pub base_model_name_or_path: String,
}

impl LoraConfig {
    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("lora_alpha must be a positive number, got {}", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("target_modules is empty");
        }
        Ok(())
    }
}

/// Does PEFT's suffix rule adapt `module_path` for `target`?
pub fn target_matches(module_path: &str, target: &str) -> bool {
    module_path == target || module_path.ends_with(&format!(".{target}"))
}

/// One adapted linear: A [r, in] and B [out, r].
#[derive(Clone, Debug)]
pub struct Adapter {
    pub layer: usize,
    pub site: Site,
    pub a: Tensor,
    pub b: Tensor,
}

/// All adapters of a model, ordered by (layer, site).
#[derive(Clone, Debug)]
pub struct Lora {
    pub config: LoraConfig,
    family: Family,
    adapters: Vec<Adapter>,
    /// slots[layer][site] = index into `adapters`.
    slots: Vec<[Option<usize>; Site::COUNT]>,
}

/// Gradients for every adapter, aligned with [`Lora::adapters`].
#[derive(Clone, Debug)]
pub struct LoraGrads {
    pub a: Vec<Tensor>,
    pub b: Vec<Tensor>,
}

impl Lora {
    /// A fresh adapter: A kaiming-uniform from `seed` (each adapter from its own stream (seed, layer,
    /// site), so adding a target does not change the others), B zeros; f32 on `device`.
    pub fn new(config: LoraConfig, model: &ModelConfig, seed: u64, device: &Device) -> Result<Lora> {
        config.validate()?;
        let sites = matched_sites(&config, model)?;
        let mut adapters = Vec::with_capacity(sites.len());
        for (layer, site) in sites {
            let (fan_in, fan_out) = model.linear_dims(site);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut rng = SplitMix::for_stream(seed, &[layer as u64, site.index() as u64]);
            let a: Vec<f32> = (0..config.r * fan_in).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
            let a = Tensor::from_vec(a, (config.r, fan_in), device)?;
            let b = Tensor::zeros((fan_out, config.r), DType::F32, device)?;
            adapters.push(Adapter { layer, site, a, b });
        }
        Ok(Self::from_adapters(config, model, adapters))
    }

    fn from_adapters(config: LoraConfig, model: &ModelConfig, adapters: Vec<Adapter>) -> Lora {
        let mut slots = vec![[None; Site::COUNT]; model.num_layers];
        for (i, ad) in adapters.iter().enumerate() {
            slots[ad.layer][ad.site.index()] = Some(i);
        }
        Lora { config, family: model.family, adapters, slots }
    }

    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// For tests and tools that set parameters directly (shapes must stay the same).
    pub fn adapters_mut(&mut self) -> &mut [Adapter] {
        &mut self.adapters
    }

    pub fn slot(&self, layer: usize, site: Site) -> Option<usize> {
        self.slots.get(layer).and_then(|s| s[site.index()])
    }

    pub fn adapter(&self, layer: usize, site: Site) -> Option<&Adapter> {
        self.slot(layer, site).map(|i| &self.adapters[i])
    }

    /// The PEFT module path of an adapter, e.g. `transformer.h.0.attn.c_attn`.
    pub fn module_path(&self, ad: &Adapter) -> String {
        self.family.module_path(ad.layer, ad.site)
    }

    /// Parameters in a fixed order: A0, B0, A1, B1, ... (the order of [`LoraGrads::tensors`] and
    /// [`Lora::param_names`]).
    pub fn params(&self) -> Vec<&Tensor> {
        self.adapters.iter().flat_map(|a| [&a.a, &a.b]).collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        self.adapters.iter_mut().flat_map(|a| [&mut a.a, &mut a.b]).collect()
    }

    /// PEFT key of each parameter, in [`Lora::params`] order.
    pub fn param_names(&self) -> Vec<String> {
        self.adapters
            .iter()
            .flat_map(|a| {
                let p = self.module_path(a);
                [peft_key(&p, "lora_A"), peft_key(&p, "lora_B")]
            })
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.adapters.iter().map(|a| a.a.elem_count() + a.b.elem_count()).sum()
    }

    /// A copy with parameters in another dtype (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Lora> {
        let mut out = self.clone();
        for ad in &mut out.adapters {
            ad.a = ad.a.to_dtype(dtype)?;
            ad.b = ad.b.to_dtype(dtype)?;
        }
        Ok(out)
    }

    /// Errors unless every adapter has the shape the model's linear needs.
    pub fn check_fits(&self, model: &ModelConfig) -> Result<()> {
        if self.slots.len() != model.num_layers || self.family != model.family {
            bail!("the LoRA adapter was built for a model with {} layers, this one has {}", self.slots.len(), model.num_layers);
        }
        for ad in &self.adapters {
            let (fan_in, fan_out) = model.linear_dims(ad.site);
            if ad.a.dims() != [self.config.r, fan_in] || ad.b.dims() != [fan_out, self.config.r] {
                bail!(
                    "LoRA {}: A {:?} / B {:?} do not fit a {fan_in} -> {fan_out} linear with r = {}",
                    self.module_path(ad),
                    ad.a.dims(),
                    ad.b.dims(),
                    self.config.r
                );
            }
        }
        Ok(())
    }

    // ----- PEFT format ----------------------------------------------------------------------------------

    /// Writes `adapter_model.safetensors` then `adapter_config.json` into `dir`, each atomically (temp
    /// file in the same folder, then rename). Parameters are written as f32.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create adapter folder {}", dir.display()))?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, t) in self.param_names().into_iter().zip(self.params()) {
            tensors.push((name, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?));
        }
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let bytes = safetensors::serialize(tensors, Some(metadata)).context("cannot serialise the adapter")?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        write_atomic(&weights_path, &bytes).with_context(|| format!("cannot write {}", weights_path.display()))?;

        let c = &self.config;
        let cfg = json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": c.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.peft_target_modules(),
            "task_type": "CAUSAL_LM",
        });
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&cfg)? + "\n";
        write_atomic(&config_path, text.as_bytes()).with_context(|| format!("cannot write {}", config_path.display()))?;
        Ok(())
    }

    /// `target_modules` as PEFT reads it back: the manifest's names, with `all-linear` spelled out as the
    /// family's module names (PEFT expands `all-linear` only when it is the whole value, not in a list).
    fn peft_target_modules(&self) -> Vec<String> {
        if !self.config.targets.iter().any(|t| t == ALL_LINEAR) {
            return self.config.targets.clone();
        }
        let mut names: Vec<String> = Vec::new();
        for ad in &self.adapters {
            let leaf = self.module_path(ad).rsplit('.').next().unwrap_or_default().to_string();
            if !names.contains(&leaf) {
                names.push(leaf);
            }
        }
        names
    }

    /// Reads a PEFT LoRA adapter for `model`. Everything is checked (config fields, every expected key
    /// present with its exact shape, no foreign keys) before anything is returned; nothing is written.
    pub fn load(dir: &Path, model: &ModelConfig, device: &Device) -> Result<Lora> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let config = read_adapter_config(&config_path)?;
        let sites = matched_sites(&config, model).with_context(|| config_path.display().to_string())?;

        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).with_context(|| format!("cannot read {}", weights_path.display()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {e}", weights_path.display())
        })?;
        let mut found: BTreeMap<String, TensorView> = st.tensors().into_iter().collect();
        if !found.keys().any(|k| k.starts_with("base_model.model.") && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))) {
            let sample: Vec<&String> = found.keys().take(3).collect();
            bail!(
                "{}: contains no LoRA tensors (expected keys like base_model.model.<module>.lora_A.weight, found {sample:?}); is this a PEFT LoRA adapter?",
                weights_path.display()
            );
        }

        let mut adapters = Vec::with_capacity(sites.len());
        for (layer, site) in sites {
            let path = model.module_path(layer, site);
            let (fan_in, fan_out) = model.linear_dims(site);
            let mut get = |which: &str, shape: [usize; 2]| -> Result<Tensor> {
                let key = peft_key(&path, which);
                let view = found.remove(&key).with_context(|| {
                    format!("{}: missing tensor {key} (adapter_config.json targets {:?})", weights_path.display(), config.targets)
                })?;
                if view.shape() != shape {
                    bail!("{}: tensor {key} has shape {:?}, expected {:?}", weights_path.display(), view.shape(), shape);
                }
                if !matches!(view.dtype(), StDtype::F32 | StDtype::F16 | StDtype::BF16 | StDtype::F64) {
                    bail!("{}: tensor {key} has dtype {:?}, expected a float type", weights_path.display(), view.dtype());
                }
                Ok(view.load(&Device::Cpu)?.to_dtype(DType::F32)?.to_device(device)?)
            };
            let a = get("lora_A", [config.r, fan_in])?;
            let b = get("lora_B", [fan_out, config.r])?;
            adapters.push(Adapter { layer, site, a, b });
        }
        if let Some(extra) = found.keys().next() {
            bail!(
                "{}: unexpected tensor {extra} ({} in all) that adapter_config.json's target_modules do not explain",
                weights_path.display(),
                found.len()
            );
        }
        Ok(Self::from_adapters(config, model, adapters))
    }
}

fn peft_key(module_path: &str, which: &str) -> String {
    format!("base_model.model.{module_path}.{which}.weight")
}

/// PEFT's target that adapts every linear of the blocks.
pub const ALL_LINEAR: &str = "all-linear";

/// (layer, site) of every module a config adapts, in order; errors when a target matches nothing.
fn matched_sites(config: &LoraConfig, model: &ModelConfig) -> Result<Vec<(usize, Site)>> {
    let all = config.targets.iter().any(|t| t == ALL_LINEAR);
    let mut sites = Vec::new();
    for layer in 0..model.num_layers {
        for &site in model.sites() {
            let path = model.module_path(layer, site);
            if all || config.targets.iter().any(|t| target_matches(&path, t)) {
                sites.push((layer, site));
            }
        }
    }
    for t in config.targets.iter().filter(|t| *t != ALL_LINEAR) {
        let hit = (0..model.num_layers).any(|l| model.sites().iter().any(|&s| target_matches(&model.module_path(l, s), t)));
        if !hit {
            let names: Vec<String> = model.sites().iter().map(|&s| model.module_path(0, s).rsplit('.').next().unwrap_or("").to_string()).collect();
            bail!(
                "LoRA target {t:?} matches no linear layer of this {} model (adaptable: {}, or {ALL_LINEAR:?})",
                model.family.architecture(),
                names.join(", ")
            );
        }
    }
    Ok(sites)
}

fn read_adapter_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let p = path.display();
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(|x| x.as_str()) {
        Some("LORA") => {}
        other => bail!("{p}: peft_type is {other:?}, expected \"LORA\""),
    }
    let r = get("r").and_then(|x| x.as_u64()).filter(|&r| r > 0).with_context(|| format!("{p}: missing or invalid \"r\""))?;
    let alpha = get("lora_alpha").and_then(|x| x.as_f64()).with_context(|| format!("{p}: missing or invalid \"lora_alpha\""))?;
    let dropout = get("lora_dropout").map_or(Some(0.0), |x| x.as_f64()).with_context(|| format!("{p}: invalid \"lora_dropout\""))?;
    let targets: Vec<String> = match get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(String::from).with_context(|| format!("{p}: target_modules entries must be strings")))
            .collect::<Result<_>>()?,
        Some(Value::String(s)) if s == ALL_LINEAR => vec![ALL_LINEAR.to_string()],
        Some(Value::String(s)) => bail!("{p}: target_modules is a regular expression ({s:?}); only a list of names (or \"all-linear\") is supported"),
        _ => bail!("{p}: missing \"target_modules\""),
    };
    // Options that change the math: refuse rather than silently compute something else.
    if let Some(b) = get("bias").and_then(|x| x.as_str()) {
        if b != "none" {
            bail!("{p}: bias {b:?} is not supported (only \"none\")");
        }
    }
    for flag in ["fan_in_fan_out", "use_rslora", "use_dora"] {
        if get(flag).and_then(|x| x.as_bool()) == Some(true) {
            bail!("{p}: {flag} = true is not supported");
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if get(pattern).and_then(|x| x.as_object()).is_some_and(|o| !o.is_empty()) {
            bail!("{p}: a non-empty {pattern} is not supported");
        }
    }
    for unsupported in ["layers_to_transform", "modules_to_save"] {
        if get(unsupported).is_some() {
            bail!("{p}: {unsupported} is set; it is not supported");
        }
    }
    let config = LoraConfig {
        r: r as usize,
        alpha,
        dropout,
        targets,
        base_model_name_or_path: get("base_model_name_or_path").and_then(|x| x.as_str()).unwrap_or("").to_string(),
    };
    config.validate().with_context(|| p.to_string())?;
    Ok(config)
}

impl LoraGrads {
    /// Zeros shaped like the adapter's parameters.
    pub fn zeros_like(lora: &Lora) -> Result<LoraGrads> {
        let a = lora.adapters.iter().map(|ad| ad.a.zeros_like()).collect::<candle_core::Result<_>>()?;
        let b = lora.adapters.iter().map(|ad| ad.b.zeros_like()).collect::<candle_core::Result<_>>()?;
        Ok(LoraGrads { a, b })
    }

    /// self += other (gradient accumulation).
    pub fn add_assign(&mut self, other: &LoraGrads) -> Result<()> {
        for (x, y) in self.a.iter_mut().chain(self.b.iter_mut()).zip(other.a.iter().chain(other.b.iter())) {
            *x = (&*x + y)?;
        }
        Ok(())
    }

    /// self *= factor (e.g. 1 / counted tokens of the accumulated batch).
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for x in self.a.iter_mut().chain(self.b.iter_mut()) {
            *x = (&*x * factor)?;
        }
        Ok(())
    }

    /// In [`Lora::params`] order: dA0, dB0, dA1, dB1, ...
    pub fn tensors(&self) -> Vec<&Tensor> {
        self.a.iter().zip(&self.b).flat_map(|(a, b)| [a, b]).collect()
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        self.a.iter_mut().zip(self.b.iter_mut()).flat_map(|(a, b)| [a, b]).collect()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Merge: W' = W + scale * B A, written in the base's own layout (same tensor names, dtypes, shard files,
// index and other files), so anything that loads the base loads the merged model.

/// A tensor to write: unchanged bytes from the base, or a merged weight.
enum OutTensor<'a> {
    Base(TensorView<'a>),
    Merged(Tensor),
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> StDtype {
        match self {
            OutTensor::Base(v) => v.dtype(),
            OutTensor::Merged(t) => t.dtype().into(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Base(v) => v.shape(),
            OutTensor::Merged(t) => t.dims(),
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Base(v) => Cow::Borrowed(v.data()),
            OutTensor::Merged(t) => View::data(t),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutTensor::Base(v) => v.data().len(),
            OutTensor::Merged(t) => View::data_len(t),
        }
    }
}

/// Folds `lora` into the base checkpoint at `base_dir`, writing a complete model folder to `out_dir`.
/// Every top-level file of the base is reproduced (safetensors shards rewritten where they hold an adapted
/// weight, everything else copied), each written atomically.
pub fn merge(base_dir: &Path, lora: &Lora, out_dir: &Path) -> Result<()> {
    merge_with_progress(base_dir, lora, out_dir, |_, _, _| {})
}

/// [`merge`], one file at a time (peak memory about one shard), calling `progress(done, of, file)` before
/// each file.
pub fn merge_with_progress(base_dir: &Path, lora: &Lora, out_dir: &Path, mut progress: impl FnMut(usize, usize, &Path)) -> Result<()> {
    let ckpt = ModelFiles::open(base_dir)?;
    let cfg = &ckpt.config;
    lora.check_fits(cfg)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    if std::fs::canonicalize(base_dir)? == std::fs::canonicalize(out_dir)? {
        bail!("merge: the output folder must differ from the base folder {}", base_dir.display());
    }
    let mut entries: Vec<_> = std::fs::read_dir(base_dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    // Sub-folders are not part of an HF model layout.
    entries.retain(|e| e.file_type().is_ok_and(|t| t.is_file()));
    for (i, entry) in entries.iter().enumerate() {
        let src = entry.path();
        progress(i, entries.len(), &src);
        let dst = out_dir.join(entry.file_name());
        let tmp = crate::fsutil::temp_sibling(&dst);
        let written = if ckpt.files.contains(&src) { merge_shard(&src, cfg, lora, &tmp)? } else { false };
        let result = (|| {
            if !written {
                std::fs::copy(&src, &tmp).with_context(|| format!("cannot copy {}", src.display()))?;
            }
            std::fs::rename(&tmp, &dst).with_context(|| format!("cannot write {}", dst.display()))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
    }
    Ok(())
}

/// Writes the merged shard to `out` and returns true, or returns false when it holds no adapted weight
/// (copy it as it is). Only this shard is in memory, and the output is streamed to the file.
fn merge_shard(path: &Path, cfg: &ModelConfig, lora: &Lora, out: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut tensors: Vec<(String, OutTensor)> = Vec::new();
    let mut changed = false;
    for (name, view) in st.tensors() {
        let adapter = cfg.linear_of_tensor(&name).and_then(|(l, s)| lora.adapter(l, s));
        let t = match adapter {
            Some(ad) => {
                changed = true;
                let w = view.load(&Device::Cpu)?;
                let work = if w.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
                let a = ad.a.to_device(&Device::Cpu)?.to_dtype(work)?;
                let b = ad.b.to_device(&Device::Cpu)?.to_dtype(work)?;
                let delta = (b.matmul(&a)? * lora.scale())?;
                OutTensor::Merged((w.to_dtype(work)? + delta)?.to_dtype(w.dtype())?)
            }
            None => OutTensor::Base(view),
        };
        tensors.push((name, t));
    }
    if !changed {
        return Ok(false);
    }
    let data = tensors.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize_to_file(data, header.metadata().clone(), out)
        .with_context(|| format!("cannot write the merged shard {}", out.display()))?;
    Ok(true)
}
