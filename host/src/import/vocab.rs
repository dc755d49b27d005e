//! `tokenizer.json` and `tokenizer_config.json` from the vocabulary embedded in a GGUF file.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are converted: their tokens and merges are
//! already in the byte-to-character spelling HF uses, so they are copied as they are. What GGUF keeps only as a
//! name is the pre-tokenizer (`tokenizer.ggml.pre`): each known name maps to the split HF's own tokenizer.json of
//! that model family uses.
use super::gguf::{GgufFile, Value};
use anyhow::{bail, Context, Result};
use serde::ser::{SerializeMap, Serializer};
use serde_json::{json, Value as Json};

/// Qwen2 / Qwen2.5 / Qwen3: single digits, case-insensitive contractions.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3: as Qwen2's but numbers in runs of up to three digits.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// How a pre-tokenizer name is written in tokenizer.json.
struct Pre {
    names: &'static [&'static str],
    normalizer: fn() -> Json,
    pre_tokenizer: fn() -> Json,
    /// HF's Llama 3 tokenizer takes a whole word that is in the vocabulary without merging it.
    ignore_merges: bool,
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

const PRES: &[Pre] = &[
    Pre {
        names: &["qwen2", "deepseek-r1-qwen"],
        normalizer: || json!({"type": "NFC"}),
        pre_tokenizer: || split_then_bytes(QWEN2_SPLIT),
        ignore_merges: false,
    },
    Pre {
        names: &["llama-bpe", "llama3"],
        normalizer: || Json::Null,
        pre_tokenizer: || split_then_bytes(LLAMA3_SPLIT),
        ignore_merges: true,
    },
    // SmolLM / SmolLM2 (StarCoder's tokenizer): single digits, then GPT-2's split.
    Pre {
        names: &["smollm", "starcoder"],
        normalizer: || Json::Null,
        pre_tokenizer: || json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ignore_merges: false,
    },
    Pre { names: &["gpt-2", "gpt2"], normalizer: || Json::Null, pre_tokenizer: || byte_level(true), ignore_merges: false },
];

/// The embedded vocabulary, read from the `tokenizer.ggml.*` keys.
pub struct Vocab<'a> {
    pub tokens: Vec<&'a str>,
    pub types: Vec<i64>,
    pub merges: Vec<(&'a str, &'a str)>,
    pre: &'static Pre,
    pub bos: Option<u64>,
    pub eos: Option<u64>,
    pub pad: Option<u64>,
    pub unk: Option<u64>,
    pub add_bos: bool,
    /// Token strings that appear more than once: only the first id keeps them in the vocabulary.
    pub duplicates: Vec<String>,
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let v = g.required(key)?;
    let items = v.as_array().with_context(|| format!("{}: metadata key {key} must be an array of strings", g.path.display()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, s)| s.as_str().with_context(|| format!("{}: metadata key {key}[{i}] is not a string", g.path.display())))
        .collect()
}

impl<'a> Vocab<'a> {
    pub fn read(g: &'a GgufFile) -> Result<Vocab<'a>> {
        let p = g.path.display();
        let model = g.str_opt("tokenizer.ggml.model")?.with_context(|| format!("{p}: metadata key tokenizer.ggml.model is missing: the file has no vocabulary"))?;
        if model != "gpt2" {
            bail!("{p}: tokenizer.ggml.model = {model:?}: only byte-level BPE vocabularies (\"gpt2\") are converted to tokenizer.json");
        }
        let pre_name = g.str_opt("tokenizer.ggml.pre")?.unwrap_or("gpt-2");
        let pre = PRES.iter().find(|p| p.names.contains(&pre_name)).with_context(|| {
            let known: Vec<&str> = PRES.iter().flat_map(|p| p.names.iter().copied()).collect();
            format!("{p}: tokenizer.ggml.pre = {pre_name:?} names a pre-tokenizer this importer does not know (known: {})", known.join(", "))
        })?;
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types = match g.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(Value::Array(a)) if a.len() == tokens.len() => a
                .iter()
                .map(|v| match v {
                    Value::I32(t) => Ok(i64::from(*t)),
                    other => other.as_u64().map(|t| t as i64).context("not an integer"),
                })
                .collect::<Result<_>>()
                .with_context(|| format!("{p}: tokenizer.ggml.token_type must hold integers"))?,
            Some(_) => bail!("{p}: tokenizer.ggml.token_type must be an array as long as tokenizer.ggml.tokens ({})", tokens.len()),
        };
        let merges = strings(g, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
                [a, b] if !a.is_empty() && !b.is_empty() => Ok((a, b)),
                _ => bail!("{p}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by one space"),
            })
            .collect::<Result<_>>()?;
        let id = |k: &str| -> Result<Option<u64>> {
            match g.u64_opt(k)? {
                Some(i) if i as usize >= tokens.len() => bail!("{p}: {k} = {i} is outside the vocabulary of {} tokens", tokens.len()),
                other => Ok(other),
            }
        };
        let mut seen = std::collections::HashSet::new();
        let duplicates = tokens.iter().filter(|t| !seen.insert(**t)).map(|t| t.to_string()).collect();
        Ok(Vocab {
            merges,
            pre,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: g.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            duplicates,
            tokens,
            types,
        })
    }

    fn name(&self, id: Option<u64>) -> Json {
        id.map_or(Json::Null, |i| json!(self.tokens[i as usize]))
    }

    /// Control and user-defined tokens: HF's added tokens (control ones special).
    fn added(&self) -> Vec<Json> {
        (0..self.tokens.len())
            .filter(|&i| self.types[i] == TOKEN_CONTROL || self.types[i] == TOKEN_USER_DEFINED)
            .map(|i| {
                json!({"id": i, "content": self.tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": self.types[i] != TOKEN_CONTROL, "special": self.types[i] == TOKEN_CONTROL})
            })
            .collect()
    }

    /// The whole `tokenizer.json`. Every token, added ones included, is in the BPE vocabulary under its id, so
    /// `tokenizers` gives each added token the id the GGUF has (it takes a vocabulary entry's id over counting).
    pub fn tokenizer_json(&self) -> Result<String> {
        let post = match (self.add_bos, self.bos) {
            (true, Some(bos)) => {
                let b = self.tokens[bos as usize];
                json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {b: {"id": b, "ids": [bos], "tokens": [b]}}})
            }
            _ => Json::Null,
        };
        // The vocabulary in id order (a JSON object keeps the first of repeated strings).
        let mut first = std::collections::HashSet::new();
        let vocab: Vec<(usize, &str)> = self.tokens.iter().copied().enumerate().filter(|(_, t)| first.insert(*t)).collect();
        let doc = Doc {
            version: "1.0",
            truncation: None,
            padding: None,
            added_tokens: self.added(),
            normalizer: (self.pre.normalizer)(),
            pre_tokenizer: (self.pre.pre_tokenizer)(),
            post_processor: post,
            decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            model: Bpe {
                kind: "BPE",
                dropout: None,
                unk_token: self.unk.map(|i| self.tokens[i as usize]),
                continuing_subword_prefix: None,
                end_of_word_suffix: None,
                fuse_unk: false,
                byte_fallback: false,
                ignore_merges: self.pre.ignore_merges,
                vocab: IdOrder(&vocab),
                merges: &self.merges,
            },
        };
        Ok(serde_json::to_string(&doc)?)
    }

    /// `tokenizer_config.json`: special token names, the chat template, and the class transformers should use.
    pub fn tokenizer_config(&self, g: &GgufFile) -> Result<Json> {
        let mut c = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "bos_token": self.name(self.bos),
            "eos_token": self.name(self.eos),
            "pad_token": self.name(self.pad),
            "unk_token": self.name(self.unk),
        });
        if let Some(t) = g.str_opt("tokenizer.chat_template")? {
            c["chat_template"] = json!(t);
        }
        if let Some(arch) = g.str_opt("general.architecture")? {
            if let Some(n) = g.u64_opt(&format!("{arch}.context_length"))? {
                c["model_max_length"] = json!(n);
            }
        }
        Ok(c)
    }
}

/// tokenizer.json, fields in HF's order.
#[derive(serde::Serialize)]
struct Doc<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<Json>,
    normalizer: Json,
    pre_tokenizer: Json,
    post_processor: Json,
    decoder: Json,
    model: Bpe<'a>,
}

#[derive(serde::Serialize)]
struct Bpe<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<()>,
    end_of_word_suffix: Option<()>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: IdOrder<'a>,
    merges: &'a [(&'a str, &'a str)],
}

/// Serialises (id, token) pairs as a `{token: id}` object in id order.
struct IdOrder<'a>(&'a [(usize, &'a str)]);

impl serde::Serialize for IdOrder<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (id, t) in self.0 {
            m.serialize_entry(t, id)?;
        }
        m.end()
    }
}
