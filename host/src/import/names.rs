//! llama.cpp tensor names to Hugging Face names, and which tensors llama.cpp stored with permuted rows.
use anyhow::{bail, Result};

/// Per-layer tensors: llama.cpp's name after `blk.N.` and HF's after `model.layers.N.`.
const LAYER: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Whole-model tensors.
const GLOBAL: &[(&str, &str)] =
    &[("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// Tensors llama.cpp derives from the config and HF does not store: left out of the import.
pub const DERIVED: &[&str] = &["rope_freqs.weight"];

/// Rows llama.cpp reordered for its rotary embedding, to be put back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    AsStored,
    /// q_proj (with the head count) or k_proj (with the KV head count) of a Llama model.
    Unpermute { heads: usize },
}

/// The HF name of a llama.cpp tensor name, e.g. `blk.3.ffn_up.weight` -> `model.layers.3.mlp.up_proj.weight`.
pub fn hf_name(gguf: &str) -> Result<String> {
    let Some((stem, suffix)) = gguf.rsplit_once('.').filter(|(_, s)| *s == "weight" || *s == "bias") else {
        bail!("tensor {gguf}: expected a name ending in .weight or .bias");
    };
    if let Some(rest) = stem.strip_prefix("blk.") {
        if let Some((layer, part)) = rest.split_once('.') {
            if let (Ok(n), Some((_, hf))) = (layer.parse::<u32>(), LAYER.iter().find(|(g, _)| *g == part)) {
                return Ok(format!("model.layers.{n}.{hf}.{suffix}"));
            }
        }
    } else if let Some((_, hf)) = GLOBAL.iter().find(|(g, _)| *g == stem) {
        return Ok(format!("{hf}.{suffix}"));
    }
    let known: Vec<String> = GLOBAL.iter().map(|(g, _)| g.to_string()).chain(LAYER.iter().map(|(g, _)| format!("blk.N.{g}"))).collect();
    bail!("tensor {gguf} has no Hugging Face name in this importer (known: {})", known.join(", "))
}

/// How the rows of `gguf` are to be read for `arch`: llama.cpp's converter permutes the rows (and biases) of
/// Llama's q and k projections, grouping each head's two rotary halves pairwise; Qwen's are stored as HF has them.
pub fn rows(arch: &str, gguf: &str, heads: usize, kv_heads: usize) -> Rows {
    if arch != "llama" {
        return Rows::AsStored;
    }
    let stem = gguf.rsplit_once('.').map_or(gguf, |(s, _)| s);
    match stem.rsplit_once('.').map(|(_, part)| part) {
        Some("attn_q") => Rows::Unpermute { heads },
        Some("attn_k") => Rows::Unpermute { heads: kv_heads },
        _ => Rows::AsStored,
    }
}

/// The stored row that HF's row `r` comes from, for `rows` rows in `heads` heads. llama.cpp stored HF's rows
/// (head h, half t, index i) at (head h, index i, half t): reshape(heads, 2, d/2, ..).swapaxes(1, 2).
pub fn source_row(r: usize, total_rows: usize, heads: usize) -> usize {
    let per_head = total_rows / heads;
    let half = per_head / 2;
    let (h, within) = (r / per_head, r % per_head);
    let (t, i) = (within / half, within % half);
    h * per_head + 2 * i + t
}

/// Checks that a permuted tensor's rows split into whole heads of an even size.
pub fn check_permutable(name: &str, total_rows: usize, heads: usize) -> Result<()> {
    if heads == 0 || total_rows % heads != 0 || (total_rows / heads) % 2 != 0 {
        bail!("tensor {name}: {total_rows} rows do not split into {heads} heads of an even size, so its rotary row order cannot be undone (check the head counts in the metadata)");
    }
    Ok(())
}
