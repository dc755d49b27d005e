//! Tokenizers: text to token ids and back.
//!
//! Two implementations of one [`Tokenizer`] trait:
//! - [`QwenTiktoken`]: Qwen (v1)'s byte-level BPE read straight from `qwen.tiktoken` (fast, hand-written split).
//! - [`HfTokenizer`]: any `tokenizer.json` through the `tokenizers` crate.
//!
//! Both share one security rule: [`Tokenizer::encode_ordinary`] never yields a special token, whatever the
//! text contains (a literal `<|endoftext|>` in data becomes ordinary byte-level tokens). Special tokens are only
//! ever inserted by id, through [`Tokenizer::special_id`], by the code that builds a training sequence.
mod hf;
mod split;
mod tiktoken;

pub use hf::HfTokenizer;
pub use tiktoken::QwenTiktoken;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::path::Path;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// File names looked for in a model folder, in order of preference.
pub const TIKTOKEN_FILE: &str = "qwen.tiktoken";
pub const HF_FILE: &str = "tokenizer.json";

/// A tokenizer: ordinary text to ids, special tokens by name, ids back to text.
pub trait Tokenizer: Send + Sync {
    /// Appends the ids of `text` to `out`. Never produces a special token: text that spells one
    /// (e.g. `<|endoftext|>`) is encoded as ordinary text.
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>);
    /// The id of a special token, e.g. `special_id("<|endoftext|>")`; None for an unknown name.
    fn special_id(&self, name: &str) -> Option<u32>;
    /// The text of `ids` (bytes joined, then lossy UTF-8); special tokens are rendered by name, ids outside the
    /// vocabulary as U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// Number of ids, special tokens included.
    fn vocab_size(&self) -> usize;
    /// sha256 (lowercase hex) of the file the tokenizer was loaded from, for cache keys.
    fn digest(&self) -> &str;
}

/// Loads a tokenizer from a file (`*.tiktoken`, or `tokenizer.json` / `*.json`) or from a model folder
/// (`qwen.tiktoken` if present, else `tokenizer.json`). A `*.tiktoken` file is read as Qwen (v1)'s:
/// Qwen's split pattern and its 208 special tokens.
pub fn load(path: &Path) -> Result<Box<dyn Tokenizer>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("tokenizer path {} does not exist or cannot be read", path.display()))?;
    let file = if meta.is_dir() {
        let tik = path.join(TIKTOKEN_FILE);
        let hf = path.join(HF_FILE);
        if tik.is_file() {
            tik
        } else if hf.is_file() {
            hf
        } else {
            bail!("folder {} has no tokenizer: neither {TIKTOKEN_FILE} nor {HF_FILE} is in it", path.display());
        }
    } else {
        path.to_path_buf()
    };
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".tiktoken") {
        Ok(Box::new(QwenTiktoken::from_file(&file)?))
    } else if name.ends_with(".json") {
        Ok(Box::new(HfTokenizer::from_file(&file)?))
    } else {
        bail!("tokenizer file {} has an unknown kind: expected a *.tiktoken file or a tokenizer.json", file.display())
    }
}

/// Qwen's special tokens in id order: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>`..`<|extra_204|>`.
pub fn qwen_special_names() -> Vec<String> {
    let mut names: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    names.extend((0..205).map(|i| format!("<|extra_{i}|>")));
    names
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// NFC of `text`, borrowing when it already is (always for ASCII).
pub(crate) fn nfc(text: &str) -> Cow<'_, str> {
    if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfc().collect())
    }
}
