//! `config.json` and `generation_config.json` in Hugging Face's format, from the GGUF metadata.
use super::gguf::GgufFile;
use crate::model::Family;
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// The model's family from `general.architecture`: llama.cpp names these families as HF's `model_type`
/// does (`llama`, `qwen2`, `qwen3`). Qwen v1 GGUFs (`qwen`) are refused: their tensors are laid out apart.
pub fn family(g: &GgufFile) -> Result<Family> {
    let arch = g.str_opt("general.architecture")?.with_context(|| format!("{}: metadata key general.architecture is missing", g.path.display()))?;
    match Family::from_model_type(arch) {
        Ok(f) if f != Family::QwenV1 => Ok(f),
        _ => bail!("{}: general.architecture = {arch:?} is not supported (supported: llama, qwen2, qwen3)", g.path.display()),
    }
}

/// The shape numbers the tensor conversion also needs.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Reads the attention shape: head counts and the head size (`key_length`, else hidden / heads).
pub fn shape(g: &GgufFile, f: Family) -> Result<Shape> {
    let a = f.model_type();
    let hidden = g.u64(&format!("{a}.embedding_length"))?;
    let heads = g.u64(&format!("{a}.attention.head_count"))?;
    let kv_heads = g.u64_opt(&format!("{a}.attention.head_count_kv"))?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        bail!("{}: {a}.attention.head_count = {heads} is not a multiple of {a}.attention.head_count_kv = {kv_heads}", g.path.display());
    }
    let head_dim = match g.u64_opt(&format!("{a}.attention.key_length"))? {
        Some(k) => k,
        None if hidden % heads == 0 => hidden / heads,
        None => bail!("{}: {a}.embedding_length = {hidden} is not a multiple of {a}.attention.head_count = {heads}, and {a}.attention.key_length is missing", g.path.display()),
    };
    if let Some(v) = g.u64_opt(&format!("{a}.attention.value_length"))? {
        if v != head_dim {
            bail!("{}: {a}.attention.value_length = {v} differs from the key length {head_dim}; these families use one head size", g.path.display());
        }
    }
    if let Some(r) = g.u64_opt(&format!("{a}.rope.dimension_count"))? {
        if r != head_dim {
            bail!("{}: {a}.rope.dimension_count = {r} rotates part of each {head_dim}-wide head, which {} does not do", g.path.display(), f.architecture());
        }
    }
    Ok(Shape { heads: heads as usize, kv_heads: kv_heads as usize, head_dim: head_dim as usize })
}

/// HF's `rope_scaling` from the GGUF's `rope.scaling.*` keys (None for none).
fn rope_scaling(g: &GgufFile, a: &str) -> Result<Option<Value>> {
    let kind = g.str_opt(&format!("{a}.rope.scaling.type"))?;
    let factor = g.f64_opt(&format!("{a}.rope.scaling.factor"))?.or(g.f64_opt(&format!("{a}.rope.scale_linear"))?);
    let original = g.u64_opt(&format!("{a}.rope.scaling.original_context_length"))?;
    let kind = match (kind, factor) {
        (None | Some("none"), None) | (Some("none"), _) => return Ok(None),
        (None, Some(_)) => "linear",
        (Some(k), _) => k,
    };
    let factor = factor.with_context(|| format!("{}: {a}.rope.scaling.type = {kind:?} without {a}.rope.scaling.factor", g.path.display()))?;
    let mut v = Map::new();
    match kind {
        "linear" => {}
        "yarn" => {
            let original = original.with_context(|| {
                format!("{}: yarn rope scaling without {a}.rope.scaling.original_context_length", g.path.display())
            })?;
            v.insert("original_max_position_embeddings".into(), json!(original));
        }
        other => bail!("{}: {a}.rope.scaling.type = {other:?} is not supported (linear, yarn)", g.path.display()),
    }
    v.insert("rope_type".into(), json!(kind));
    v.insert("factor".into(), json!(factor));
    Ok(Some(Value::Object(v)))
}

/// Llama 3's rope scaling as HF writes it, recovered from llama.cpp's `rope_freqs.weight` (the per-frequency
/// divisors its converter computes from that config). Llama 3.1-3.3 all use low 1, high 4, original 8192; the
/// factor is the largest divisor. The result is checked by recomputing every divisor.
pub fn llama3_rope_scaling(freq_factors: &[f32], theta: f64, head_dim: usize) -> Result<Value> {
    let factor = freq_factors.iter().copied().fold(f32::MIN, f32::max) as f64;
    let (low, high, original) = (1.0f64, 4.0f64, 8192.0f64);
    for (i, &got) in freq_factors.iter().enumerate() {
        let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let want = if wavelen < original / high {
            1.0
        } else if wavelen > original / low {
            factor
        } else {
            let smooth = (original / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        if ((got as f64) - want).abs() > 1e-3 * want.abs() {
            bail!("rope_freqs.weight[{i}] = {got} is not Llama 3's rope scaling (factor {factor}, low 1, high 4, original 8192 give {want}); this importer cannot express it in config.json");
        }
    }
    Ok(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original as u64,
    }))
}

/// What config.json needs besides the metadata.
pub struct Extra<'a> {
    pub vocab_size: usize,
    pub tied: bool,
    pub torch_dtype: &'a str,
    pub rope_freqs: Option<&'a [f32]>,
}

/// The `config.json` of the model.
pub fn hf_config(g: &GgufFile, f: Family, s: &Shape, extra: &Extra) -> Result<Value> {
    let a = f.model_type();
    let key = |k: &str| format!("{a}.{k}");
    let theta = g.f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let mut rope = rope_scaling(g, a)?;
    if let Some(freqs) = extra.rope_freqs {
        if rope.is_some() {
            bail!("{}: both rope_freqs.weight and {a}.rope.scaling.* are present; only one kind of rope scaling is supported", g.path.display());
        }
        rope = Some(llama3_rope_scaling(freqs, theta, s.head_dim).with_context(|| g.path.display().to_string())?);
    }
    let mut c = Map::new();
    let mut put = |k: &str, v: Value| c.insert(k.to_string(), v);
    put("architectures", json!([f.architecture()]));
    put("model_type", json!(f.model_type()));
    put("hidden_size", json!(g.u64(&key("embedding_length"))?));
    put("intermediate_size", json!(g.u64(&key("feed_forward_length"))?));
    put("num_hidden_layers", json!(g.u64(&key("block_count"))?));
    put("num_attention_heads", json!(s.heads));
    put("num_key_value_heads", json!(s.kv_heads));
    if f != Family::Qwen2 || g.get(&key("attention.key_length")).is_some() {
        put("head_dim", json!(s.head_dim));
    }
    put("hidden_act", json!("silu"));
    put("rms_norm_eps", json!(g.f64_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6)));
    put("rope_theta", json!(theta));
    put("rope_scaling", rope.unwrap_or(Value::Null));
    if let Some(ctx) = g.u64_opt(&key("context_length"))? {
        put("max_position_embeddings", json!(ctx));
    }
    put("vocab_size", json!(extra.vocab_size));
    put("tie_word_embeddings", json!(extra.tied));
    put("torch_dtype", json!(extra.torch_dtype));
    put("attention_dropout", json!(0.0));
    put("initializer_range", json!(0.02));
    put("use_cache", json!(true));
    match a {
        "qwen2" => {
            put("use_sliding_window", json!(false));
        }
        "llama" | "qwen3" => {
            put("attention_bias", json!(false));
        }
        _ => {}
    }
    if f == Family::Llama {
        put("mlp_bias", json!(false));
    }
    for (name, k) in [("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")] {
        if let Some(id) = g.u64_opt(k)? {
            put(name, json!(id));
        }
    }
    Ok(Value::Object(c))
}

/// `generation_config.json`: the stop tokens (eos, and the end-of-turn tokens where the GGUF names them).
pub fn generation_config(g: &GgufFile) -> Result<Value> {
    let mut c = Map::new();
    if let Some(bos) = g.u64_opt("tokenizer.ggml.bos_token_id")? {
        c.insert("bos_token_id".into(), json!(bos));
    }
    let mut stops = Vec::new();
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = g.u64_opt(k)? {
            if !stops.contains(&id) {
                stops.push(id);
            }
        }
    }
    match stops.as_slice() {
        [] => {}
        [one] => {
            c.insert("eos_token_id".into(), json!(one));
        }
        many => {
            c.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(pad) = g.u64_opt("tokenizer.ggml.padding_token_id")? {
        c.insert("pad_token_id".into(), json!(pad));
    }
    Ok(Value::Object(c))
}
