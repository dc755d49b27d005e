//! A `tokenizer.json` through the `tokenizers` crate, with the added vocabulary bypassed.
//!
//! `tokenizers::Tokenizer::encode` first cuts the text at every added token (`<|endoftext|>`, ...), which would
//! let data inject control tokens. [`HfTokenizer`] instead runs the normaliser, the pre-tokeniser and the model
//! itself, so text only ever yields ids of the model's own vocabulary.
use super::{sha256_hex, Tokenizer};
use anyhow::{anyhow, bail, Context, Result};
use rustc_hash::FxHashMap;
use std::path::Path;
use tokenizers::{Model, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

/// A tokenizer read from a Hugging Face `tokenizer.json` (byte-level BPE, as Qwen's).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// id -> bytes for the model's vocabulary; `None` for ids that are only added tokens (or unused)
    id_bytes: Vec<Option<Box<[u8]>>>,
    /// added tokens by id, rendered by name when decoding
    added: FxHashMap<u32, String>,
    special_ids: FxHashMap<String, u32>,
    vocab_size: usize,
    digest: String,
}

/// GPT-2's byte-to-character map used by byte-level BPE vocabularies: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for U+0100.. in byte order.
fn byte_level_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    map
}

impl HfTokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<HfTokenizer> {
        let data = std::fs::read(path).with_context(|| format!("cannot read tokenizer file {}", path.display()))?;
        HfTokenizer::from_bytes(&data).with_context(|| format!("invalid tokenizer.json {}", path.display()))
    }

    /// Parses the contents of a `tokenizer.json`; the digest is the sha256 of `data`.
    pub fn from_bytes(data: &[u8]) -> Result<HfTokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(data).map_err(|e| anyhow!("cannot parse tokenizer.json: {e}"))?;
        let mut char_byte: FxHashMap<char, u8> = FxHashMap::default();
        for (b, c) in byte_level_chars().into_iter().enumerate() {
            char_byte.insert(c, b as u8);
        }
        let vocab = inner.get_vocab(false);
        let added_decoder = inner.get_added_tokens_decoder();
        let max_id = vocab.values().chain(added_decoder.keys()).copied().max().context("empty vocabulary")?;
        let vocab_size = max_id as usize + 1;
        let mut id_bytes: Vec<Option<Box<[u8]>>> = vec![None; vocab_size];
        for (token, id) in &vocab {
            let bytes: Option<Vec<u8>> = token.chars().map(|c| char_byte.get(&c).copied()).collect();
            let bytes = bytes.unwrap_or_else(|| token.as_bytes().to_vec());
            id_bytes[*id as usize] = Some(bytes.into());
        }
        let mut added = FxHashMap::default();
        let mut special_ids = FxHashMap::default();
        for (id, tok) in &added_decoder {
            added.insert(*id, tok.content.clone());
            special_ids.insert(tok.content.clone(), *id);
        }
        let tok = HfTokenizer { inner, id_bytes, added, special_ids, vocab_size, digest: sha256_hex(data) };
        // The pipeline must accept any text (encode_ordinary cannot fail): probe it once.
        let probe = "Hello, world! 123 caf\u{e9} \u{4e2d}\u{6587} \u{1f642}\r\n\t<|endoftext|>";
        let mut ids = Vec::new();
        tok.try_encode(probe, &mut ids).map_err(|e| anyhow!("the tokenizer cannot encode a probe text: {e}"))?;
        if tok.decode(&ids) != probe {
            bail!("the tokenizer does not round-trip a probe text (not a byte-level BPE?)");
        }
        Ok(tok)
    }

    fn try_encode(&self, text: &str, out: &mut Vec<u32>) -> tokenizers::Result<()> {
        let mut normalized = tokenizers::NormalizedString::from(text);
        if let Some(n) = self.inner.get_normalizer() {
            n.normalize(&mut normalized)?;
        }
        let mut pre = PreTokenizedString::from(normalized);
        if let Some(p) = self.inner.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre)?;
        }
        let model = self.inner.get_model();
        pre.tokenize(|s| model.tokenize(s.get()))?;
        for (_, _, tokens) in pre.get_splits(OffsetReferential::Normalized, OffsetType::None) {
            out.extend(tokens.iter().flatten().map(|t| t.id));
        }
        Ok(())
    }
}

impl Tokenizer for HfTokenizer {
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) {
        if let Err(e) = self.try_encode(text, out) {
            // Not reachable for a byte-level BPE (checked at load); a failure here is a bug, not bad data.
            panic!("tokenizer.json pipeline failed on {} bytes of text: {e}", text.len());
        }
    }

    fn special_id(&self, name: &str) -> Option<u32> {
        self.special_ids.get(name).copied()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(name) = self.added.get(&id) {
                bytes.extend_from_slice(name.as_bytes());
            } else if let Some(Some(b)) = self.id_bytes.get(id as usize) {
                bytes.extend_from_slice(b);
            } else {
                bytes.extend_from_slice("\u{FFFD}".as_bytes());
            }
        }
        String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn digest(&self) -> &str {
        &self.digest
    }
}
