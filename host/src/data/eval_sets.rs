//! Evaluation sets a filter reads through source plugins: `eval_tasks` and `eval_sources` in a filter use.
//!
//! ```toml
//! [[filter]]
//! plugin = "decontaminate"
//! eval_tasks = ["mmlu", "gsm8k"]          # eval task names or .toml files, found as `lorahost eval --tasks` finds them
//! eval_sources = [{ plugin = "truthfulqa", path = "data/TruthfulQA.csv" }]   # source uses, as a dataset's `source`
//! ```
//!
//! The host, not the plugin, reads these sets (a task's scored records: its `[source]`), so any format a
//! source plugin reads (a Parquet file, MMLU's folder of CSVs) can be kept out of a training mix. Each set
//! becomes a JSON Lines file in the cache, one line per record holding its turns' contents as a list of
//! strings, at `<cache>/eval-sets/<sha256 of the content>/<name>.jsonl`; the file is appended to the use's
//! `files` option, which grants its folder (and only it) read-only to the plugin. The keys themselves are
//! removed: the plugin sees `files`, as if the user had listed them. Being named by content, the file makes
//! the lock and the token cache follow the evaluation data: a changed eval set is a new file, a new digest.
use super::plugins::PluginSet;
use crate::eval::{run::read_records, task, Task};
use crate::manifest::{absolute, folder_of, resolve_plugin_paths, Manifest, PluginUse};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// Option keys the host takes out of a filter use (eval task names or files; source uses).
pub const TASKS_KEY: &str = "eval_tasks";
pub const SOURCES_KEY: &str = "eval_sources";

/// The option the texts are handed to the plugin in.
const FILES_KEY: &str = "files";

/// The cache's sub-folder for evaluation sets.
pub const CACHE_SUBDIR: &str = "eval-sets";

/// `use_` with its evaluation sets written to the cache and listed in `files`; `use_` itself when it names
/// none. `key` is the use's place in the manifest (`filter[0]`), for messages.
pub fn expand(set: &PluginSet, m: &Manifest, key: &str, use_: &PluginUse) -> anyhow::Result<PluginUse> {
    let mut out = use_.clone();
    let tasks = out.config.remove(TASKS_KEY);
    let sources = out.config.remove(SOURCES_KEY);
    if tasks.is_none() && sources.is_none() {
        return Ok(out);
    }
    let file = m.file.display();
    let err = |k: String, msg: String| anyhow::anyhow!("{file}: `{key}.{k}`: {msg}");
    let cache = m.cache_dir().ok_or_else(|| {
        err(TASKS_KEY.into(), "evaluation sets are written to the cache, and there is none: set `run.cache` (or LORAHOST_CACHE)".into())
    })?;
    let mut written: Vec<toml::Value> = Vec::new();
    let names = list(tasks, "task names or .toml files, e.g. [\"mmlu\", \"gsm8k\"]").map_err(|e| err(TASKS_KEY.into(), e))?;
    for (i, name) in names.iter().enumerate() {
        let k = format!("{TASKS_KEY}[{i}]");
        let name = name.as_str().ok_or_else(|| err(k.clone(), "must be a task name or a .toml file, in quotes".into()))?;
        let t = load_task(m, name).map_err(|e| err(k.clone(), format!("{e:#}")))?;
        let records = read_records(set, &format!("{key}.{k}.source"), &t.source)?;
        written.push(write_set(&cache, &t.name, &records).map_err(|e| err(k, format!("{e:#}")))?);
    }
    let dir = folder_of(&m.file);
    let hint = "source uses, e.g. [{ plugin = \"csv\", path = \"eval/test.csv\" }]";
    for (i, value) in list(sources, hint).map_err(|e| err(SOURCES_KEY.into(), e))?.into_iter().enumerate() {
        let k = format!("{SOURCES_KEY}[{i}]");
        let mut source: PluginUse = value
            .try_into()
            .map_err(|e| err(k.clone(), format!("{e}; each is a source use such as {{ plugin = \"csv\", path = \"eval/test.csv\" }}")))?;
        if let Some(l) = &source.limits {
            l.check().map_err(|(field, msg)| err(format!("{k}.limits.{field}"), msg))?;
        }
        resolve_plugin_paths(&mut source, &dir);
        let records = read_records(set, &format!("{key}.{k}"), &source)?;
        written.push(write_set(&cache, &source_name(&source), &records).map_err(|e| err(k, format!("{e:#}")))?);
    }
    match out.config.entry(FILES_KEY).or_insert_with(|| toml::Value::Array(vec![])) {
        toml::Value::Array(files) => files.extend(written),
        _ => bail!("{file}: `{key}.{FILES_KEY}`: must be a list of files when `{TASKS_KEY}` or `{SOURCES_KEY}` is given"),
    }
    Ok(out)
}

/// The items of an optional list option; a missing key is an empty list.
fn list(value: Option<toml::Value>, what: &str) -> Result<Vec<toml::Value>, String> {
    match value {
        None => Ok(vec![]),
        Some(toml::Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("must be a list of {what}")),
    }
}

/// A task by name (looked up as for `lorahost eval --tasks`) or by .toml file (relative to the manifest).
fn load_task(m: &Manifest, name: &str) -> anyhow::Result<Task> {
    let name = if name.ends_with(".toml") { absolute(&folder_of(&m.file), Path::new(name)).display().to_string() } else { name.to_string() };
    Task::load(&task::find(&name, &task::search_dirs(m))?)
}

/// A source set's file name: its plugin and the stem of its first path (`truthfulqa-TruthfulQA`; `mmlu` for
/// `dir = "data/mmlu"`).
fn source_name(u: &PluginUse) -> String {
    let path = u.config.iter().filter(|(k, _)| crate::manifest::is_path_key(k)).find_map(|(_, v)| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Array(a) => a.iter().find_map(|x| x.as_str().map(str::to_string)),
        _ => None,
    });
    match path.as_deref().and_then(|p| Path::new(p).file_stem()).map(|s| s.to_string_lossy()) {
        Some(stem) if stem != u.plugin => format!("{}-{stem}", u.plugin),
        _ => u.plugin.clone(),
    }
}

/// Writes the records' texts (one line per record: its turns' contents) under their content digest;
/// returns the file's path as a TOML string. A file already there with these bytes is kept as it is.
fn write_set(cache: &Path, name: &str, records: &[crate::plugins::Example]) -> anyhow::Result<toml::Value> {
    if records.is_empty() {
        bail!("the evaluation set has no records: check its source's options");
    }
    let mut text = String::new();
    for e in records {
        let turns: Vec<&str> = e.turns.iter().map(|t| t.content.as_str()).collect();
        text.push_str(&serde_json::to_string(&turns)?);
        text.push('\n');
    }
    let digest = crate::plugins::engine::sha256_hex(text.as_bytes());
    // A file name the sandbox and every file system take: the name's letters, digits, '-', '_', '.'.
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let path: PathBuf = cache.join(CACHE_SUBDIR).join(&digest).join(format!("{safe}.jsonl"));
    if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
        crate::fsutil::write_atomic(&path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    // The sandbox grants folders by their real path.
    let real = path.canonicalize().with_context(|| format!("reading back {}", path.display()))?;
    Ok(toml::Value::String(real.display().to_string()))
}
