//! The architecture description, in one place: hyper-parameters from an HF `config.json`, tensor names and
//! shapes. Everything else (loader, tiny checkpoints, LoRA, merge) asks this module rather than spelling
//! names or shapes itself, so another family (Qwen2: separate q/k/v with bias, GQA, `model.layers.{i}...`
//! names) can be added here as a new [`Family`] variant.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Model families. Only Qwen v1 (`model_type: "qwen"`) is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    QwenV1,
}

impl Family {
    /// The family for an HF `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Family> {
        match model_type {
            "qwen" => Ok(Family::QwenV1),
            "qwen2" | "qwen2_moe" | "qwen3" => {
                bail!("model_type {model_type:?} (Qwen2 family) is not implemented yet; only Qwen v1 (\"qwen\") is")
            }
            other => bail!("model_type {other:?} is not supported; only Qwen v1 (\"qwen\") is"),
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::QwenV1 => "qwen",
        }
    }

    /// The module path of layer `layer`'s linear `site`, as HF and PEFT name it.
    pub fn module_path(self, layer: usize, site: Site) -> String {
        match self {
            Family::QwenV1 => format!("transformer.h.{layer}.{}", site.qwen_v1_suffix()),
        }
    }

    /// The name of a tensor in the checkpoint.
    pub fn tensor_name(self, t: TensorId) -> String {
        match self {
            Family::QwenV1 => match t {
                TensorId::Embedding => "transformer.wte.weight".into(),
                TensorId::FinalNorm => "transformer.ln_f.weight".into(),
                TensorId::LmHead => "lm_head.weight".into(),
                TensorId::Ln1(i) => format!("transformer.h.{i}.ln_1.weight"),
                TensorId::Ln2(i) => format!("transformer.h.{i}.ln_2.weight"),
                TensorId::Weight(i, site) => format!("{}.weight", self.module_path(i, site)),
                TensorId::CAttnBias(i) => format!("{}.bias", self.module_path(i, Site::CAttn)),
            },
        }
    }
}

/// The linear layers of a Qwen v1 block: the places a LoRA adapter can sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// attn.c_attn: hidden -> 3 * hidden (q | k | v), with bias.
    CAttn,
    /// attn.c_proj: hidden -> hidden.
    AttnCProj,
    /// mlp.w1: hidden -> mlp width (the "up" projection).
    W1,
    /// mlp.w2: hidden -> mlp width (the gate, goes through SiLU).
    W2,
    /// mlp.c_proj: mlp width -> hidden.
    MlpCProj,
}

impl Site {
    pub const ALL: [Site; 5] = [Site::CAttn, Site::AttnCProj, Site::W1, Site::W2, Site::MlpCProj];

    /// Position in [`Site::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn qwen_v1_suffix(self) -> &'static str {
        match self {
            Site::CAttn => "attn.c_attn",
            Site::AttnCProj => "attn.c_proj",
            Site::W1 => "mlp.w1",
            Site::W2 => "mlp.w2",
            Site::MlpCProj => "mlp.c_proj",
        }
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
    CAttnBias(usize),
}

/// Hyper-parameters of a Qwen v1 model.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// `kv_channels`: the head dimension.
    pub head_dim: usize,
    /// `intermediate_size` as written in config.json: twice the width of w1 / w2 (Qwen v1 convention).
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// `layer_norm_epsilon` (RMSNorm).
    pub eps: f64,
    /// `rotary_emb_base`.
    pub rope_base: f64,
    /// `seq_length`: the training context length.
    pub seq_length: usize,
    /// `tie_word_embeddings` (false for Qwen v1; then `lm_head.weight` is a tensor of its own).
    pub tie_word_embeddings: bool,
}

impl QwenConfig {
    /// Reads `config.json`; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<QwenConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `origin` names it in errors. Unknown keys are ignored.
    pub fn from_json_str(text: &str, origin: &str) -> Result<QwenConfig> {
        let v: Value = serde_json::from_str(text).with_context(|| format!("{origin}: not valid JSON"))?;
        let obj = v.as_object().with_context(|| format!("{origin}: expected a JSON object at the top level"))?;
        let model_type = match obj.get("model_type") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => bail!("{origin}: key \"model_type\" must be a string, found {other}"),
            None => bail!("{origin}: missing key \"model_type\" (expected \"qwen\")"),
        };
        let family = Family::from_model_type(model_type).with_context(|| origin.to_string())?;

        let int = |key: &str| -> Result<usize> {
            match obj.get(key) {
                None => bail!("{origin}: missing key \"{key}\""),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(n as usize),
                    _ => bail!("{origin}: key \"{key}\" must be a positive integer, found {v}"),
                },
            }
        };
        let float = |key: &str| -> Result<f64> {
            match obj.get(key) {
                None => bail!("{origin}: missing key \"{key}\""),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                    _ => bail!("{origin}: key \"{key}\" must be a positive number, found {v}"),
                },
            }
        };

        let cfg = QwenConfig {
            family,
            hidden_size: int("hidden_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads: int("num_attention_heads")?,
            head_dim: int("kv_channels")?,
            intermediate_size: int("intermediate_size")?,
            vocab_size: int("vocab_size")?,
            eps: float("layer_norm_epsilon")?,
            rope_base: float("rotary_emb_base")?,
            seq_length: int("seq_length")?,
            tie_word_embeddings: match obj.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => bail!("{origin}: key \"tie_word_embeddings\" must be true or false, found {other}"),
            },
        };
        // Partial rotary (rotary_pct < 1) exists in the HF code but in no released Qwen v1 model.
        if let Some(v) = obj.get("rotary_pct") {
            if v.as_f64() != Some(1.0) {
                bail!("{origin}: key \"rotary_pct\" is {v}; only 1.0 (RoPE over the full head dim) is supported");
            }
        }
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    /// Consistency checks the code relies on.
    pub fn validate(&self) -> Result<()> {
        if self.num_heads * self.head_dim != self.hidden_size {
            bail!(
                "num_attention_heads ({}) * kv_channels ({}) must equal hidden_size ({})",
                self.num_heads,
                self.head_dim,
                self.hidden_size
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("kv_channels ({}) must be even for rotary embeddings", self.head_dim);
        }
        if !self.intermediate_size.is_multiple_of(2) {
            bail!("intermediate_size ({}) must be even (w1 and w2 are intermediate_size / 2 wide)", self.intermediate_size);
        }
        Ok(())
    }

    /// The width of w1 / w2 (Qwen v1 halves `intermediate_size`).
    pub fn mlp_width(&self) -> usize {
        self.intermediate_size / 2
    }

    /// (in, out) features of a linear.
    pub fn linear_dims(&self, site: Site) -> (usize, usize) {
        let (c, m) = (self.hidden_size, self.mlp_width());
        match site {
            Site::CAttn => (c, 3 * c),
            Site::AttnCProj => (c, c),
            Site::W1 | Site::W2 => (c, m),
            Site::MlpCProj => (m, c),
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
            TensorId::CAttnBias(_) => vec![3 * c],
        }
    }

    /// Every tensor the model needs, in checkpoint order (lm_head left out when tied).
    pub fn tensors(&self) -> Vec<TensorId> {
        let mut v = vec![TensorId::Embedding];
        for i in 0..self.num_layers {
            v.push(TensorId::Ln1(i));
            v.push(TensorId::Weight(i, Site::CAttn));
            v.push(TensorId::CAttnBias(i));
            v.push(TensorId::Weight(i, Site::AttnCProj));
            v.push(TensorId::Ln2(i));
            v.push(TensorId::Weight(i, Site::W1));
            v.push(TensorId::Weight(i, Site::W2));
            v.push(TensorId::Weight(i, Site::MlpCProj));
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
            .flat_map(|l| Site::ALL.map(|s| (l, s)))
            .find(|&(l, s)| self.tensor_name(TensorId::Weight(l, s)) == name)
    }
}
