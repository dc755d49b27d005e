//! The tokenized cache: a token stream (and its report) stored under the digest of everything that
//! shaped it, so a second run with the same inputs skips reading, filtering and tokenizing altogether.
//!
//! File layout (little-endian): magic `LHTOKS01`, n_records, n_train, n_ids (u64 each), lengths (u32 x
//! n_records), dataset index (u16 x n_records), ids (u32 x n_ids), trained (u8 x n_ids).
use super::report::Report;
use super::stream::TokenStream;
use crate::fsutil::write_atomic;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"LHTOKS01";

pub fn paths(cache_dir: &Path, key: &str) -> (PathBuf, PathBuf) {
    let dir = cache_dir.join("tokens");
    (dir.join(format!("{key}.bin")), dir.join(format!("{key}.report.json")))
}

pub fn store(cache_dir: &Path, key: &str, stream: &TokenStream, report: &Report) -> anyhow::Result<()> {
    let buf = encode(stream);
    let (bin, json) = paths(cache_dir, key);
    // What a killed run was writing here is of no use to anyone.
    if let Some(dir) = bin.parent() {
        crate::fsutil::remove_stale_temps(dir);
    }
    // The report goes first: a stream without its report is never visible.
    write_atomic(&json, serde_json::to_string_pretty(report)?.as_bytes())?;
    write_atomic(&bin, &buf)?;
    Ok(())
}

/// A stream in the cache file's format (also how rank 0 hands it to the other ranks).
pub fn encode(stream: &TokenStream) -> Vec<u8> {
    let n = stream.len();
    let mut buf = Vec::with_capacity(32 + n * 6 + stream.ids.len() * 5);
    buf.extend_from_slice(MAGIC);
    for v in [n as u64, stream.n_train as u64, stream.ids.len() as u64] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    stream.lengths.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
    stream.dataset.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
    stream.ids.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
    buf.extend_from_slice(&stream.trained);
    buf
}

/// The cached stream and report for `key`, if both are present and whole.
pub fn load(cache_dir: &Path, key: &str) -> anyhow::Result<Option<(TokenStream, Report)>> {
    let (bin, json) = paths(cache_dir, key);
    if !bin.exists() || !json.exists() {
        return Ok(None);
    }
    let report: Report = match serde_json::from_slice(&std::fs::read(&json)?) {
        Ok(r) => r,
        Err(_) => return Ok(None), // An older report format: rebuild.
    };
    let bytes = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    match decode(&bytes) {
        Ok(stream) => Ok(Some((stream, report))),
        // A damaged entry is rebuilt, not trusted.
        Err(_) => Ok(None),
    }
}

/// The stream [`encode`] wrote; an error when the bytes are not one whole.
pub fn decode(bytes: &[u8]) -> anyhow::Result<TokenStream> {
    if bytes.len() < 32 || &bytes[..8] != MAGIC {
        bail!("not a token cache file");
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap()) as usize;
    let (n, n_train, n_ids) = (u64_at(0), u64_at(1), u64_at(2));
    let expected = 32usize
        .checked_add(n.checked_mul(6).context("size")?)
        .and_then(|v| v.checked_add(n_ids.checked_mul(5)?))
        .context("size")?;
    if bytes.len() != expected || n_train > n {
        bail!("truncated token cache file");
    }
    let mut at = 32;
    let mut take = |len: usize| {
        let s = &bytes[at..at + len];
        at += len;
        s
    };
    let lengths: Vec<u32> = take(n * 4).chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let dataset: Vec<u16> = take(n * 2).chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect();
    let ids: Vec<u32> = take(n_ids * 4).chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let trained = take(n_ids).to_vec();
    if lengths.iter().map(|&l| l as usize).sum::<usize>() != n_ids {
        bail!("inconsistent token cache file");
    }
    Ok(TokenStream { lengths, ids, trained, dataset, n_train })
}
