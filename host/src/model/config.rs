//! The architecture description, in one place: hyper-parameters from an HF `config.json`, tensor names and
//! shapes. Everything else (loader, tiny checkpoints, LoRA, merge) asks this module rather than spelling
//! names or shapes itself.
//!
//! Four families share one model code path; what differs between them is data, read here:
//!
//! | family | HF class | attention input | q/k norm | names |
//! |---|---|---|---|---|
//! | Qwen v1 | `QWenLMHeadModel` | one fused `c_attn` with bias, no GQA | no | `transformer.h.N.attn.c_attn` |
//! | Qwen2 / 2.5 | `Qwen2ForCausalLM` | q/k/v apart, with bias, GQA | no | `model.layers.N.self_attn.q_proj` |
//! | Qwen3 | `Qwen3ForCausalLM` | q/k/v apart, no bias, GQA, explicit head_dim | per head, before RoPE | as Qwen2 |
//! | Llama | `LlamaForCausalLM` | q/k/v apart, bias if `attention_bias`, GQA, rope scaling | no | as Qwen2 |
//!
//! Inside the model q, k and v always come from one fused weight (rows q | k | v, one GEMM): the loader
//! concatenates the separate projections. LoRA adapters keep each family's own modules.
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Model families (see the table above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    QwenV1,
    Qwen2,
    Qwen3,
    Llama,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::QwenV1, Family::Qwen2, Family::Qwen3, Family::Llama];

    /// The family for an HF `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Family> {
        match Family::ALL.into_iter().find(|f| f.model_type() == model_type) {
            Some(f) => Ok(f),
            None => bail!(
                "key \"model_type\" is {model_type:?}, which is not supported; supported: \"qwen\" (Qwen v1), \"qwen2\" (Qwen2, Qwen2.5), \"qwen3\", \"llama\" (Llama 2/3, SmolLM2, TinyLlama)"
            ),
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::QwenV1 => "qwen",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Llama => "llama",
        }
    }

    /// The HF class named in `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::QwenV1 => "QWenLMHeadModel",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
        }
    }

    /// The linear layers of one block, in checkpoint order.
    pub fn sites(self) -> &'static [Site] {
        match self {
            Family::QwenV1 => &[Site::Qkv, Site::O, Site::Up, Site::Gate, Site::Down],
            _ => &[Site::Q, Site::K, Site::V, Site::O, Site::Gate, Site::Up, Site::Down],
        }
    }

    /// The module path of layer `layer`'s linear `site`, as HF and PEFT name it.
    pub fn module_path(self, layer: usize, site: Site) -> String {
        format!("{}.{}", self.layer_prefix(layer), self.site_suffix(site))
    }

    fn layer_prefix(self, layer: usize) -> String {
        match self {
            Family::QwenV1 => format!("transformer.h.{layer}"),
            _ => format!("model.layers.{layer}"),
        }
    }

    fn site_suffix(self, site: Site) -> &'static str {
        match (self, site) {
            (Family::QwenV1, Site::Qkv) => "attn.c_attn",
            (Family::QwenV1, Site::O) => "attn.c_proj",
            (Family::QwenV1, Site::Up) => "mlp.w1",
            (Family::QwenV1, Site::Gate) => "mlp.w2",
            (Family::QwenV1, Site::Down) => "mlp.c_proj",
            (_, Site::Q) => "self_attn.q_proj",
            (_, Site::K) => "self_attn.k_proj",
            (_, Site::V) => "self_attn.v_proj",
            (_, Site::O) => "self_attn.o_proj",
            (_, Site::Gate) => "mlp.gate_proj",
            (_, Site::Up) => "mlp.up_proj",
            (_, Site::Down) => "mlp.down_proj",
            (f, s) => unreachable!("{f:?} has no {s:?} linear (see Family::sites)"),
        }
    }

    /// The name of a tensor in the checkpoint.
    pub fn tensor_name(self, t: TensorId) -> String {
        let v1 = self == Family::QwenV1;
        match t {
            TensorId::Embedding if v1 => "transformer.wte.weight".into(),
            TensorId::Embedding => "model.embed_tokens.weight".into(),
            TensorId::FinalNorm if v1 => "transformer.ln_f.weight".into(),
            TensorId::FinalNorm => "model.norm.weight".into(),
            TensorId::LmHead => "lm_head.weight".into(),
            TensorId::Ln1(i) if v1 => format!("transformer.h.{i}.ln_1.weight"),
            TensorId::Ln1(i) => format!("model.layers.{i}.input_layernorm.weight"),
            TensorId::Ln2(i) if v1 => format!("transformer.h.{i}.ln_2.weight"),
            TensorId::Ln2(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            TensorId::Weight(i, site) => format!("{}.weight", self.module_path(i, site)),
            TensorId::Bias(i, site) => format!("{}.bias", self.module_path(i, site)),
            TensorId::QNorm(i) => format!("{}.self_attn.q_norm.weight", self.layer_prefix(i)),
            TensorId::KNorm(i) => format!("{}.self_attn.k_norm.weight", self.layer_prefix(i)),
        }
    }
}

/// The linear layers of a block: the places a LoRA adapter can sit. Qwen v1 has the fused `Qkv`; the
/// other families `Q`, `K` and `V`. Up and gate feed SwiGLU: `down(up(x) * silu(gate(x)))` (in Qwen v1,
/// w1 is up and w2 the gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    Qkv,
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Site {
    pub const ALL: [Site; 8] = [Site::Qkv, Site::Q, Site::K, Site::V, Site::O, Site::Gate, Site::Up, Site::Down];
    pub const COUNT: usize = Site::ALL.len();

    /// Position in [`Site::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Does this linear produce (part of) q, k and v?
    pub fn is_attention_input(self) -> bool {
        matches!(self, Site::Qkv | Site::Q | Site::K | Site::V)
    }
}

/// One tensor of the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorId {
    Embedding,
    FinalNorm,
    LmHead,
    Ln1(usize),
    Ln2(usize),
    /// The weight of a linear, stored [out, in].
    Weight(usize, Site),
    /// The bias of an attention-input linear (Qwen v1's c_attn, Qwen2's q/k/v, Llama with attention_bias).
    Bias(usize, Site),
    /// Qwen3's per-head RMSNorm weights [head_dim] on q and k.
    QNorm(usize),
    KNorm(usize),
}

/// RoPE frequency scaling, as `rope_scaling` in config.json says.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// `{"rope_type": "linear", "factor": f}`: every frequency divided by f.
    Linear { factor: f64 },
    /// Llama 3.1's: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// Hyper-parameters of a model of any family.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Key/value heads (GQA); equal to `num_heads` without GQA.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The width of the up / gate projections.
    pub mlp_width: usize,
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base (`rotary_emb_base` / `rope_theta`).
    pub rope_base: f64,
    pub rope_scaling: RopeScaling,
    /// The longest sequence the model takes (`seq_length` / `max_position_embeddings`).
    pub seq_length: usize,
    /// lm_head shares the embedding matrix (then `lm_head.weight` is not in the checkpoint).
    pub tie_word_embeddings: bool,
    /// The attention-input linears have biases.
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
}

/// Typed reads from config.json; errors name the file and the key.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn int(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            None => bail!("{}: missing key \"{key}\"", self.origin),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => bail!("{}: key \"{key}\" must be a positive integer, found {v}", self.origin),
            },
        }
    }

    fn int_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_none() {
            return Ok(default);
        }
        self.int(key)
    }

    fn float(&self, key: &str) -> Result<f64> {
        match self.get(key) {
            None => bail!("{}: missing key \"{key}\"", self.origin),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => bail!("{}: key \"{key}\" must be a positive number, found {v}", self.origin),
            },
        }
    }

    fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.get(key).is_none() {
            return Ok(default);
        }
        self.float(key)
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => bail!("{}: key \"{key}\" must be true or false, found {other}", self.origin),
        }
    }

    /// Refuses a key whose value would change the math in a way the model does not implement.
    fn require(&self, key: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if !ok(v) => bail!("{}: key \"{key}\" is {v}; only {what} is supported", self.origin),
            _ => Ok(()),
        }
    }
}

impl ModelConfig {
    /// Reads `config.json`; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `origin` names it in errors. Keys that do not change the math
    /// are ignored; keys that would are either implemented or refused by name.
    pub fn from_json_str(text: &str, origin: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).with_context(|| format!("{origin}: not valid JSON"))?;
        let obj = v.as_object().with_context(|| format!("{origin}: expected a JSON object at the top level"))?;
        let keys = Keys { obj, origin };
        let model_type = match obj.get("model_type") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => bail!("{origin}: key \"model_type\" must be a string, found {other}"),
            None => bail!("{origin}: missing key \"model_type\" (e.g. \"qwen2\", \"qwen3\", \"llama\", \"qwen\")"),
        };
        let family = Family::from_model_type(model_type).with_context(|| origin.to_string())?;
        if let Some(Value::Array(archs)) = keys.get("architectures") {
            if let Some(a) = archs.iter().filter_map(|a| a.as_str()).find(|&a| a != family.architecture()) {
                bail!("{origin}: key \"architectures\" names {a:?}, but model_type {model_type:?} is {}", family.architecture());
            }
        }
        let cfg = match family {
            Family::QwenV1 => Self::qwen_v1(&keys)?,
            _ => Self::llama_like(family, &keys)?,
        };
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    fn qwen_v1(k: &Keys) -> Result<ModelConfig> {
        // Partial rotary (rotary_pct < 1) exists in the HF code but in no released Qwen v1 model.
        k.require("rotary_pct", |v| v.as_f64() == Some(1.0), "1.0 (RoPE over the full head dim)")?;
        let heads = k.int("num_attention_heads")?;
        let intermediate = k.int("intermediate_size")?;
        if !intermediate.is_multiple_of(2) {
            bail!("{}: key \"intermediate_size\" ({intermediate}) must be even (Qwen v1's w1 and w2 are half of it)", k.origin);
        }
        Ok(ModelConfig {
            family: Family::QwenV1,
            hidden_size: k.int("hidden_size")?,
            num_layers: k.int("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: k.int("kv_channels")?,
            mlp_width: intermediate / 2,
            vocab_size: k.int("vocab_size")?,
            eps: k.float("layer_norm_epsilon")?,
            rope_base: k.float("rotary_emb_base")?,
            rope_scaling: RopeScaling::None,
            seq_length: k.int("seq_length")?,
            tie_word_embeddings: k.bool_or("tie_word_embeddings", false)?,
            qkv_bias: true,
            qk_norm: false,
        })
    }

    /// Qwen2, Qwen3 and Llama: the same keys (HF's Llama-style configs), different defaults.
    fn llama_like(family: Family, k: &Keys) -> Result<ModelConfig> {
        k.require("hidden_act", |v| v.as_str() == Some("silu"), "\"silu\"")?;
        k.require("mlp_bias", |v| v.as_bool() == Some(false), "false")?;
        k.require("use_sliding_window", |v| v.as_bool() == Some(false), "false (full attention)")?;
        k.require("pretraining_tp", |v| v.as_u64() == Some(1), "1")?;
        let hidden = k.int("hidden_size")?;
        let heads = k.int("num_attention_heads")?;
        let default_head_dim = if hidden.is_multiple_of(heads) { hidden / heads } else { 0 };
        let qkv_bias = match family {
            Family::Qwen2 => true, // Qwen2's q/k/v always have biases (no config key)
            _ => k.bool_or("attention_bias", false)?,
        };
        Ok(ModelConfig {
            family,
            hidden_size: hidden,
            num_layers: k.int("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: k.int_or("num_key_value_heads", heads)?,
            head_dim: k.int_or("head_dim", default_head_dim).and_then(|d| match d {
                0 => bail!("{}: key \"head_dim\" is needed: hidden_size {hidden} is not a multiple of num_attention_heads {heads}", k.origin),
                d => Ok(d),
            })?,
            mlp_width: k.int("intermediate_size")?,
            vocab_size: k.int("vocab_size")?,
            eps: k.float_or("rms_norm_eps", 1e-6)?,
            rope_base: k.float_or("rope_theta", 10000.0)?,
            rope_scaling: rope_scaling(k)?,
            seq_length: k.int("max_position_embeddings")?,
            // HF's Qwen2/Qwen3/Llama configs default to untied.
            tie_word_embeddings: k.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            qk_norm: family == Family::Qwen3,
        })
    }

    /// Consistency checks the code relies on.
    pub fn validate(&self) -> Result<()> {
        if self.family == Family::QwenV1 && self.num_heads * self.head_dim != self.hidden_size {
            bail!(
                "num_attention_heads ({}) * kv_channels ({}) must equal hidden_size ({})",
                self.num_heads,
                self.head_dim,
                self.hidden_size
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("the head dim ({}) must be even for rotary embeddings", self.head_dim);
        }
        Ok(())
    }

    /// Width of q (heads * head dim).
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of k and of v.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the fused q | k | v projection.
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }

    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// The rows of the fused q | k | v output an attention-input linear produces: (offset, count).
    pub fn qkv_rows(&self, site: Site) -> (usize, usize) {
        match site {
            Site::Qkv => (0, self.qkv_width()),
            Site::Q => (0, self.q_width()),
            Site::K => (self.q_width(), self.kv_width()),
            Site::V => (self.q_width() + self.kv_width(), self.kv_width()),
            other => panic!("{other:?} is not an attention-input linear"),
        }
    }

    /// The linear layers of one block (the family's).
    pub fn sites(&self) -> &'static [Site] {
        self.family.sites()
    }

    /// (in, out) features of a linear.
    pub fn linear_dims(&self, site: Site) -> (usize, usize) {
        let (c, m) = (self.hidden_size, self.mlp_width);
        match site {
            Site::Qkv | Site::Q | Site::K | Site::V => (c, self.qkv_rows(site).1),
            Site::O => (self.q_width(), c),
            Site::Gate | Site::Up => (c, m),
            Site::Down => (m, c),
        }
    }

    /// The shape a tensor must have.
    pub fn tensor_shape(&self, t: TensorId) -> Vec<usize> {
        let c = self.hidden_size;
        match t {
            TensorId::Embedding | TensorId::LmHead => vec![self.vocab_size, c],
            TensorId::FinalNorm | TensorId::Ln1(_) | TensorId::Ln2(_) => vec![c],
            TensorId::Weight(_, site) => {
                let (i, o) = self.linear_dims(site);
                vec![o, i]
            }
            TensorId::Bias(_, site) => vec![self.linear_dims(site).1],
            TensorId::QNorm(_) | TensorId::KNorm(_) => vec![self.head_dim],
        }
    }

    /// Every tensor of one layer, in checkpoint order.
    pub fn layer_tensors(&self, i: usize) -> Vec<TensorId> {
        let mut v = vec![TensorId::Ln1(i)];
        for &site in self.sites() {
            if site == Site::O && self.qk_norm {
                v.extend([TensorId::QNorm(i), TensorId::KNorm(i)]);
            }
            if site == Site::O {
                // Qwen v1 and the others both put the post-attention norm after the output projection.
                v.push(TensorId::Weight(i, site));
                v.push(TensorId::Ln2(i));
                continue;
            }
            v.push(TensorId::Weight(i, site));
            if site.is_attention_input() && self.qkv_bias {
                v.push(TensorId::Bias(i, site));
            }
        }
        v
    }

    /// Every tensor the model needs, in checkpoint order (lm_head left out when tied).
    pub fn tensors(&self) -> Vec<TensorId> {
        let mut v = vec![TensorId::Embedding];
        for i in 0..self.num_layers {
            v.extend(self.layer_tensors(i));
        }
        v.push(TensorId::FinalNorm);
        if !self.tie_word_embeddings {
            v.push(TensorId::LmHead);
        }
        v
    }

    pub fn tensor_name(&self, t: TensorId) -> String {
        self.family.tensor_name(t)
    }

    pub fn module_path(&self, layer: usize, site: Site) -> String {
        self.family.module_path(layer, site)
    }

    /// Maps a checkpoint tensor name back to the linear weight it is, if it is one.
    pub fn linear_of_tensor(&self, name: &str) -> Option<(usize, Site)> {
        (0..self.num_layers)
            .flat_map(|l| self.sites().iter().map(move |&s| (l, s)))
            .find(|&(l, s)| self.tensor_name(TensorId::Weight(l, s)) == name)
    }

    /// The keys of an HF config.json for this configuration, in a fixed order (tiny checkpoints, imports).
    pub fn to_json_entries(&self) -> Vec<(&'static str, Value)> {
        use serde_json::json;
        let mut e: Vec<(&'static str, Value)> = vec![
            ("architectures", json!([self.family.architecture()])),
            ("model_type", json!(self.family.model_type())),
            ("hidden_size", json!(self.hidden_size)),
            ("num_hidden_layers", json!(self.num_layers)),
            ("num_attention_heads", json!(self.num_heads)),
        ];
        if self.family == Family::QwenV1 {
            e.extend([
                ("kv_channels", json!(self.head_dim)),
                ("intermediate_size", json!(2 * self.mlp_width)),
                ("vocab_size", json!(self.vocab_size)),
                ("layer_norm_epsilon", json!(self.eps)),
                ("rotary_emb_base", json!(self.rope_base)),
                ("rotary_pct", json!(1.0)),
                ("seq_length", json!(self.seq_length)),
                ("max_position_embeddings", json!(self.seq_length)),
                ("no_bias", json!(true)),
                ("tie_word_embeddings", json!(self.tie_word_embeddings)),
                ("use_dynamic_ntk", json!(true)),
                ("use_logn_attn", json!(true)),
            ]);
        } else {
            e.extend([
                ("vocab_size", json!(self.vocab_size)),
                ("num_key_value_heads", json!(self.num_kv_heads)),
                ("head_dim", json!(self.head_dim)),
                ("intermediate_size", json!(self.mlp_width)),
                ("hidden_act", json!("silu")),
                ("rms_norm_eps", json!(self.eps)),
                ("rope_theta", json!(self.rope_base)),
                ("max_position_embeddings", json!(self.seq_length)),
            ]);
            if self.family == Family::Llama {
                e.push(("attention_bias", json!(self.qkv_bias)));
            }
            match &self.rope_scaling {
                RopeScaling::None => {}
                RopeScaling::Linear { factor } => e.push(("rope_scaling", json!({"rope_type": "linear", "factor": factor}))),
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => e.push((
                    "rope_scaling",
                    json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                           "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings}),
                )),
            }
            e.push(("tie_word_embeddings", json!(self.tie_word_embeddings)));
        }
        e.push(("torch_dtype", json!("float32")));
        e
    }

    /// config.json text (fixed key order, so the bytes are stable).
    pub fn to_json(&self) -> String {
        let body: Vec<String> = self.to_json_entries().iter().map(|(k, v)| format!("  {k:?}: {v}")).collect();
        format!("{{\n{}\n}}\n", body.join(",\n"))
    }
}

/// `rope_scaling`: absent, null, "default", "linear" or "llama3"; anything else is refused by name.
fn rope_scaling(k: &Keys) -> Result<RopeScaling> {
    let Some(v) = k.get("rope_scaling") else { return Ok(RopeScaling::None) };
    let o = v.as_object().with_context(|| format!("{}: key \"rope_scaling\" must be an object or null, found {v}", k.origin))?;
    let sub = Keys { obj: o, origin: k.origin };
    let kind = o.get("rope_type").or_else(|| o.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let f = |key: &str| sub.float(key).with_context(|| format!("in key \"rope_scaling\" ({kind})"));
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: f("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        }),
        other => bail!(
            "{}: key \"rope_scaling.rope_type\" is {other:?}; supported: \"default\", \"linear\", \"llama3\" (dynamic, yarn and longrope are not implemented)",
            k.origin
        ),
    }
}
