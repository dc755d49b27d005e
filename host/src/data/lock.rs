//! The lock: the digest of every input that shapes the token stream, and of the stream itself.
//!
//! Every run writes `run.lock` in its folder; `lorahost check --locked` recomputes the inputs and fails,
//! naming each difference, when they no longer match. The cache key is the digest of the lock's inputs,
//! so "same lock inputs" and "cache hit" mean the same thing.
//!
//! Data files are recorded by their path relative to the manifest's folder (`../data/x.jsonl` for one
//! beside it) and their content digest, so a moved or copied checkout still matches its lock.
use super::plugins::Resolved;
use crate::manifest::{is_path_key, Manifest, PluginUse};
use crate::tokenizer::Tokenizer;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Component, Path};

/// Bump when the pipeline's output for the same inputs changes (it invalidates every cache entry).
pub const PIPELINE_VERSION: u32 = 1;

/// The lock's file name in the run folder.
pub const LOCK_FILE: &str = "run.lock";

/// The manifest key of the scheduler, which the lock pins but the token stream does not depend on.
const SCHEDULER_KEY: &str = "scheduler";

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
    /// The cache key: the digest of the inputs of the token stream (everything but the stream and the
    /// scheduler).
    pub fn key(&self) -> String {
        let mut inputs = self.clone();
        inputs.token_stream = None;
        inputs.plugins.remove(SCHEDULER_KEY);
        inputs.configs.remove(SCHEDULER_KEY);
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

    /// Plugin uses whose plugin is the same by name but not by content since `locked`: a file replaced
    /// under the manifest, one line each. (A manifest that names another plugin is a change of the run,
    /// which the checkpoint's identity catches.)
    pub fn swapped_plugins(&self, locked: &Lock) -> Vec<String> {
        let mut out = Vec::new();
        for (key, now) in &self.plugins {
            let Some(was) = locked.plugins.get(key) else { continue };
            let ((name, sha), (old_name, old_sha)) = (split_plugin(now), split_plugin(was));
            if name == old_name && sha != old_sha {
                out.push(format!("`{key}`: plugin `{name}` has sha256 {} (locked {})", short(sha), short(old_sha)));
            }
        }
        out
    }
}

/// "name sha256" as recorded in [`Lock::plugins`].
fn split_plugin(entry: &str) -> (&str, &str) {
    entry.rsplit_once(' ').unwrap_or((entry, ""))
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

/// The lock of a manifest's inputs (no token stream yet).
/// `uses` are the plugin uses as resolved (a filter's evaluation sets already written to the cache), in
/// [`Manifest::plugin_uses`] order, as `resolved` is.
pub fn input_lock(m: &Manifest, uses: &[PluginUse], resolved: &[(String, Resolved)], tok: &dyn Tokenizer) -> anyhow::Result<Lock> {
    let base = m.file.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = base.canonicalize().unwrap_or(base);
    let cache = m.cache_dir().map(|c| c.canonicalize().unwrap_or(c));
    let places = Places { base: &base, cache: cache.as_deref() };
    let mut lock = Lock { pipeline_version: PIPELINE_VERSION, tokenizer: tok.digest().to_string(), ..Default::default() };
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    // Every plugin, the scheduler included (it shapes training, not tokens: [`Lock::key`] leaves it out).
    for (use_, (key, r)) in uses.iter().zip(resolved) {
        lock.plugins.insert(key.clone(), format!("{} {}", r.origin.name, r.origin.sha256));
        let normalized = normalized_config(use_, &places, &mut digests, &mut lock.files)?;
        lock.configs.insert(key.clone(), hex::encode(<sha2::Sha256 as sha2::Digest>::digest(normalized.as_bytes())));
    }
    let s = &mut lock.settings;
    s.insert("seed".into(), m.run.seed.to_string());
    s.insert("mix".into(), format!("fraction={} shuffle={}", m.mix.fraction, m.mix.shuffle));
    s.insert("train.max_seq_len".into(), m.train.max_seq_len.to_string());
    s.insert("train.truncation".into(), format!("{:?}", m.train.truncation).to_lowercase());
    s.insert("train.eval".into(), format!("fraction={} count={:?}", m.train.eval_fraction, m.train.eval_count));
    for (i, d) in m.datasets.iter().enumerate() {
        s.insert(
            format!("dataset[{i}]"),
            format!("name={} repeat={} fraction={:?} count={:?} on_malformed={:?}", d.name, d.repeat, d.fraction, d.count, d.on_malformed),
        );
    }
    Ok(lock)
}

/// A plugin's options with every path replaced by its content digest, so the lock and the cache key do
/// not depend on where the data sits, only on what it is.
fn normalized_config(
    use_: &PluginUse,
    places: &Places,
    digests: &mut BTreeMap<String, String>,
    files: &mut BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let mut config = use_.config.clone();
    for (key, value) in config.iter_mut() {
        if !is_path_key(key) {
            continue;
        }
        let mut replace = |s: &mut String| -> anyhow::Result<()> {
            let d = match digests.get(s.as_str()) {
                Some(d) => d.clone(),
                None => {
                    let d = digest_path(Path::new(s.as_str()))?;
                    digests.insert(s.clone(), d.clone());
                    d
                }
            };
            files.insert(places.name(Path::new(s.as_str())), d.clone());
            *s = format!("sha256:{d}");
            Ok(())
        };
        match value {
            toml::Value::String(s) => replace(s)?,
            toml::Value::Array(items) => {
                for v in items {
                    if let toml::Value::String(s) = v {
                        replace(s)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(toml::to_string(&config)?)
}

/// Where the lock's data files are named from.
struct Places<'a> {
    /// The manifest's folder.
    base: &'a Path,
    /// The cache folder, which holds the evaluation sets a filter reads ([`super::eval_sets`]).
    cache: Option<&'a Path>,
}

impl Places<'_> {
    /// A data file's name in the lock: `<cache>/...` for one in the cache (wherever the cache is, so a
    /// checkout on another machine matches), else relative to the manifest's folder.
    fn name(&self, path: &Path) -> String {
        match self.cache.and_then(|c| path.strip_prefix(c).ok()) {
            Some(rest) => format!("<cache>/{}", rest.display()),
            None => relative_to(path, self.base),
        }
    }
}

/// `path` relative to the folder `base` (both absolute), with `..` where `path` is outside it; absolute
/// when the two share nothing below the root (a system folder stays where it is when a checkout moves).
fn relative_to(path: &Path, base: &Path) -> String {
    let (p, b): (Vec<Component>, Vec<Component>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common <= 1 {
        return path.display().to_string();
    }
    let mut rel = std::path::PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    rel.extend(&p[common..]);
    rel.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_paths_are_relative_to_the_manifest_folder() {
        let base = Path::new("/home/u/proj/examples");
        assert_eq!(relative_to(Path::new("/home/u/proj/examples/data/a.jsonl"), base), "data/a.jsonl");
        assert_eq!(relative_to(Path::new("/home/u/proj/tests/x.csv"), base), "../tests/x.csv");
        assert_eq!(relative_to(Path::new("/srv/d.json"), base), "/srv/d.json");
        // A file in the cache is named from the cache, wherever the cache is.
        let places = Places { base, cache: Some(Path::new("/home/u/.cache/lorahost")) };
        assert_eq!(places.name(Path::new("/home/u/.cache/lorahost/eval-sets/ab/mmlu.jsonl")), "<cache>/eval-sets/ab/mmlu.jsonl");
        assert_eq!(places.name(Path::new("/home/u/proj/tests/x.csv")), "../tests/x.csv");
    }
}
