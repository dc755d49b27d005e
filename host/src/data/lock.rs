//! The lock: the digest of every input that shapes the token stream, and of the stream itself.
//!
//! Every run writes `run.lock` in its folder; `lorahost check --locked` recomputes the inputs and fails,
//! naming each difference, when they no longer match. The cache key is the digest of the lock's inputs,
//! so "same lock inputs" and "cache hit" mean the same thing.
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Bump when the pipeline's output for the same inputs changes (it invalidates every cache entry).
pub const PIPELINE_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lock {
    pub pipeline_version: u32,
    /// sha256 of the tokenizer file.
    pub tokenizer: String,
    /// Manifest key (`dataset[0].source`) -> "name sha256".
    pub plugins: BTreeMap<String, String>,
    /// Manifest key -> sha256 of the plugin's options, with each path replaced by its content digest.
    pub configs: BTreeMap<String, String>,
    /// Data file (relative to the manifest's folder) -> sha256 of its content.
    pub files: BTreeMap<String, String>,
    /// Settings that shape the stream: seed, sampling, truncation, eval split.
    pub settings: BTreeMap<String, String>,
    /// sha256 of the resulting token stream (absent while only inputs are computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_stream: Option<String>,
}

impl Lock {
    /// The cache key: the digest of the inputs (everything but the stream).
    pub fn key(&self) -> String {
        let mut inputs = self.clone();
        inputs.token_stream = None;
        let json = serde_json::to_vec(&inputs).expect("a lock serializes");
        hex::encode(Sha256::digest(json))
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# Written by lorahost: the digests of every input of this run's token stream.\n\
             # `lorahost check --locked <manifest>` fails, naming what changed, when the inputs differ.\n{}",
            toml::to_string_pretty(self)?
        );
        crate::fsutil::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(path: &Path) -> anyhow::Result<Lock> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {} (run `lorahost check` without --locked once to write it)", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{} is not a lorahost lock file", path.display()))
    }

    /// What differs from `locked`, one line per difference (empty when the inputs match).
    pub fn diff(&self, locked: &Lock) -> Vec<String> {
        let mut out = Vec::new();
        if self.pipeline_version != locked.pipeline_version {
            out.push(format!("pipeline version: {} (locked {})", self.pipeline_version, locked.pipeline_version));
        }
        if self.tokenizer != locked.tokenizer {
            out.push(format!("tokenizer: sha256 {} (locked {})", short(&self.tokenizer), short(&locked.tokenizer)));
        }
        diff_maps(&mut out, "plugin", &self.plugins, &locked.plugins);
        diff_maps(&mut out, "plugin options", &self.configs, &locked.configs);
        diff_maps(&mut out, "data file", &self.files, &locked.files);
        diff_maps(&mut out, "setting", &self.settings, &locked.settings);
        out
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

fn diff_maps(out: &mut Vec<String>, what: &str, now: &BTreeMap<String, String>, locked: &BTreeMap<String, String>) {
    for (k, v) in now {
        match locked.get(k) {
            None => out.push(format!("{what} `{k}`: new (not in the lock)")),
            Some(l) if l != v => out.push(format!("{what} `{k}`: {} (locked {})", short(v), short(l))),
            _ => {}
        }
    }
    for k in locked.keys().filter(|k| !now.contains_key(*k)) {
        out.push(format!("{what} `{k}`: gone (in the lock, not in the manifest)"));
    }
}

/// sha256 of a file, or of a folder's files (sorted relative paths and contents).
pub fn digest_path(path: &Path) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        files.sort();
        for f in files {
            h.update(f.strip_prefix(path).unwrap_or(&f).to_string_lossy().as_bytes());
            h.update([0]);
            hash_file(&mut h, &f)?;
        }
    } else {
        hash_file(&mut h, path)?;
    }
    Ok(hex::encode(h.finalize()))
}

fn hash_file(h: &mut Sha256, path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}
