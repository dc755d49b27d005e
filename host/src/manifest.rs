//! The run manifest: one TOML file that says everything about a run, so that sharing it shares the run.
//!
//! Parsing is strict: unknown keys are errors, and every error names the file, the line and the key path
//! (`dataset[1].source.plugin`) and says how to fix it. Relative paths resolve against the manifest's folder.
//! A plugin's own options sit beside `plugin = "..."` in its table and are handed to it as TOML text; the
//! host reserves only `plugin`, `limits` and `read` there.
use crate::plugins::{Limits, PluginKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A manifest problem, located.
#[derive(Debug)]
pub struct ManifestError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub name: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The run folder: lock, metrics, checkpoints, adapter.
    pub output: PathBuf,
    /// Where compiled plugins and tokenized data are cached (default: the user cache folder).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Folder with config.json, safetensors weights and the tokenizer.
    pub path: PathBuf,
    #[serde(default = "default_dtype")]
    pub dtype: DType,
    #[serde(default = "default_device")]
    pub device: String,
    /// A tokenizer file or folder, when it is not in the model folder.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Create a tiny random model at `path` when none is there (quickstarts, tests).
    #[serde(default)]
    pub tiny: Option<Tiny>,
}

/// The shape of a tiny random model; the real Qwen vocabulary, so the real tokenizer drives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiny {
    /// The family's HF `model_type`: "qwen" (Qwen v1), "qwen2", "qwen3" or "llama".
    #[serde(default = "tiny_family")]
    pub family: String,
    /// Key/value heads (GQA); default: the family's tiny default (see `TinySpec::of_family`).
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    #[serde(default = "tiny_hidden")]
    pub hidden_size: usize,
    #[serde(default = "tiny_layers")]
    pub num_layers: usize,
    #[serde(default = "tiny_heads")]
    pub num_heads: usize,
    #[serde(default = "tiny_intermediate")]
    pub intermediate_size: usize,
    /// Standard deviation of the random weights.
    #[serde(default = "tiny_std")]
    pub init_std: f64,
    #[serde(default)]
    pub seed: u64,
}

fn tiny_family() -> String {
    "qwen".into()
}
fn tiny_hidden() -> usize {
    64
}
fn tiny_layers() -> usize {
    2
}
fn tiny_heads() -> usize {
    4
}
fn tiny_intermediate() -> usize {
    256
}
fn tiny_std() -> f64 {
    0.02
}

fn default_dtype() -> DType {
    DType::Bf16
}
fn default_device() -> String {
    "cuda:0".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module names matched by suffix, as PEFT does: `c_proj` adapts attn.c_proj and mlp.c_proj.
    pub targets: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec!["c_attn".into()] }
    }
}

/// How a sequence longer than `max_seq_len` is cut, per prompt/answer pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Prompt and answer each keep their share of the cutoff, in proportion to their lengths
    /// (what the 2023 recipe did).
    Proportional,
    /// Prompt and answer each keep at most half of the cutoff (the recipe's older 512/512 variant).
    Halves,
}

/// How the records of an optimizer step are laid out for the model. Either way a step trains the same
/// `micro_batch * grad_accum` records with the same loss normalisation (equal losses and gradients, without
/// dropout; with it, the masks are drawn per pass, so they differ between the two layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Packing {
    /// `micro_batch` records per forward pass, each padded to the longest of the pass.
    #[default]
    None,
    /// The step's records laid end to end, no padding: each pass takes records in order while they fit in
    /// `max_tokens_per_pass` tokens; attention stays within each record.
    PaddingFree,
}

impl Packing {
    /// The faster layout on a device when the manifest names none: padding-free on a GPU (the flash kernels
    /// take the records end to end, no padding computed), padded micro-batches on the CPU (where the
    /// composite attention over a packed row costs more than the padding it saves; README, "Training").
    pub fn default_on(cuda: bool) -> Packing {
        if cuda {
            Packing::PaddingFree
        } else {
            Packing::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Packing::None => "none",
            Packing::PaddingFree => "padding-free",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Train {
    #[serde(default = "one")]
    pub micro_batch: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides epochs when smaller).
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; none when absent.
    #[serde(default)]
    pub clip: Option<f64>,
    #[serde(default = "default_seq")]
    pub max_seq_len: usize,
    #[serde(default = "default_truncation")]
    pub truncation: Truncation,
    /// Hold out this fraction of the mixed records for eval loss.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Or exactly this many records.
    #[serde(default)]
    pub eval_count: Option<usize>,
    /// Recompute each layer in the backward pass instead of keeping its activations (the memory-saving mode:
    /// on a GPU the embedding table also moves to page-locked host memory, see `Model::offload_embedding`).
    #[serde(default)]
    pub recompute: bool,
    /// Write a checkpoint every N optimizer steps (and always at the end).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// "none" (padded micro-batches) or "padding-free"; unset: [`Manifest::packing`] picks by device.
    #[serde(default)]
    pub packing: Option<Packing>,
    /// With padding-free packing: the most tokens one forward pass takes (bounds activation memory);
    /// default `micro_batch * max_seq_len`, the most a padded micro-batch can hold.
    #[serde(default)]
    pub max_tokens_per_pass: Option<usize>,
}

impl Train {
    /// The token budget of one padding-free pass.
    pub fn tokens_per_pass(&self) -> usize {
        self.max_tokens_per_pass.unwrap_or(self.micro_batch * self.max_seq_len)
    }
}

fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-4
}
fn default_seq() -> usize {
    1024
}
fn default_truncation() -> Truncation {
    Truncation::Proportional
}

impl Default for Train {
    fn default() -> Self {
        toml::from_str("").expect("all train keys have defaults")
    }
}

/// One use of a plugin: `plugin = "name"` plus its options.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginUse {
    pub plugin: String,
    /// Per-call limits; defaults apply to what is left out.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Extra folders the plugin may read (paths in its options are granted automatically).
    #[serde(default)]
    pub read: Vec<PathBuf>,
    /// Everything else: the plugin's own configuration.
    #[serde(flatten)]
    pub config: toml::Table,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnMalformed {
    /// Stop at the first malformed record, naming file and line.
    #[default]
    Fail,
    /// Skip malformed records and count them.
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub name: String,
    pub source: PluginUse,
    /// Filters for this dataset only, run before the global `[[filter]]`s.
    #[serde(default)]
    pub filters: Vec<PluginUse>,
    /// Copies of each kept record (up-sampling), taken before `fraction`/`count`.
    #[serde(default = "one_u32")]
    pub repeat: u32,
    /// Keep this random fraction of the (repeated) records.
    #[serde(default)]
    pub fraction: Option<f64>,
    /// Or exactly this many.
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub on_malformed: OnMalformed,
    /// The most this dataset's source may give; past it the source is stopped with an error.
    #[serde(default)]
    pub budget: Budget,
}

/// Host-side bounds on what one dataset's source may yield, so a source that never ends (or data far
/// larger than expected) stops with an error instead of exhausting memory. Generous by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Records read (malformed ones not counted).
    pub records: u64,
    /// MiB of text read (ids, roles, contents, metadata).
    pub mb: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { records: 20_000_000, mb: 8192 }
    }
}

impl Budget {
    pub fn bytes(&self) -> u64 {
        self.mb.saturating_mul(1 << 20)
    }
}

fn one_u32() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    /// Keep this random fraction of all records after per-dataset sampling.
    #[serde(default = "one_f64")]
    pub fraction: f64,
    #[serde(default = "yes")]
    pub shuffle: bool,
}

fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl Default for Mix {
    fn default() -> Self {
        Mix { fraction: 1.0, shuffle: true }
    }
}

/// A plugin file named in `[plugins]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginFile {
    pub path: PathBuf,
    /// Pins the file: a different digest is refused. Unpinned plugins are allowed but reported.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Required for native libraries, which run unsandboxed.
    #[serde(default)]
    pub trusted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    run: Run,
    model: Model,
    #[serde(default)]
    lora: LoraSection,
    #[serde(default)]
    train: Train,
    #[serde(default = "default_scheduler")]
    scheduler: PluginUse,
    template: PluginUse,
    #[serde(rename = "dataset")]
    datasets: Vec<Dataset>,
    #[serde(default, rename = "filter")]
    filters: Vec<PluginUse>,
    #[serde(default)]
    mix: Mix,
    #[serde(default)]
    plugins: BTreeMap<String, PluginFile>,
    #[serde(default)]
    eval: Eval,
}

/// `[eval]`: the evaluation tasks of a run (`lorahost eval` without `--tasks`, the decontamination report of
/// `lorahost check`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eval {
    /// Task names (looked up as `<name>.toml` in `dir`, the manifest's `eval/` folder, then the shipped
    /// `examples/eval/`) or paths to task files.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// A folder of task files, searched first.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

fn default_scheduler() -> PluginUse {
    PluginUse { plugin: "constant".into(), limits: None, read: vec![], config: toml::Table::new() }
}

/// A validated manifest with every path absolute.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// The manifest file.
    pub file: PathBuf,
    pub run: Run,
    pub model: Model,
    pub lora: LoraSection,
    pub train: Train,
    pub scheduler: PluginUse,
    pub template: PluginUse,
    pub datasets: Vec<Dataset>,
    pub filters: Vec<PluginUse>,
    pub mix: Mix,
    pub plugins: BTreeMap<String, PluginFile>,
    pub eval: Eval,
}

/// Option keys whose values are paths: resolved against the manifest folder and granted read-only.
pub fn is_path_key(key: &str) -> bool {
    matches!(key, "path" | "dir" | "paths" | "files") || key.ends_with("_path") || key.ends_with("_dir")
}

impl Manifest {
    pub fn load(file: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(file).map_err(|e| ManifestError {
            file: file.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read the manifest: {e}"),
        })?;
        Manifest::parse(file, &text)
    }

    /// Parses `text` as if read from `file` (relative paths resolve against its folder).
    pub fn parse(file: &Path, text: &str) -> Result<Manifest, ManifestError> {
        let err = |line: Option<usize>, key: &str, message: String| ManifestError {
            file: file.to_path_buf(),
            line,
            key: key.to_string(),
            message,
        };
        let raw: RawManifest = parse_toml(file, text)?;
        let dir = folder_of(file);
        let mut m = Manifest {
            file: file.to_path_buf(),
            run: raw.run,
            model: raw.model,
            lora: raw.lora,
            train: raw.train,
            scheduler: raw.scheduler,
            template: raw.template,
            datasets: raw.datasets,
            filters: raw.filters,
            mix: raw.mix,
            plugins: raw.plugins,
            eval: raw.eval,
        };
        m.resolve_paths(&dir);
        m.validate().map_err(|(key, message)| err(find_key_line(text, &key), &key, message))?;
        Ok(m)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let abs = |p: &mut PathBuf| *p = absolute(dir, p);
        abs(&mut self.run.output);
        if let Some(c) = self.run.cache.as_mut() {
            abs(c);
        }
        abs(&mut self.model.path);
        if let Some(t) = self.model.tokenizer.as_mut() {
            abs(t);
        }
        for p in self.plugins.values_mut() {
            abs(&mut p.path);
        }
        if let Some(d) = self.eval.dir.as_mut() {
            abs(d);
        }
        for u in self.plugin_uses_mut() {
            resolve_plugin_paths(u, dir);
        }
    }

    fn plugin_uses_mut(&mut self) -> impl Iterator<Item = &mut PluginUse> {
        let per_dataset = self.datasets.iter_mut().flat_map(|d| std::iter::once(&mut d.source).chain(d.filters.iter_mut()));
        per_dataset.chain(self.filters.iter_mut()).chain([&mut self.scheduler, &mut self.template])
    }

    /// How a step's records are laid out: `[train] packing`, or when unset the faster layout on the
    /// manifest's device ([`Packing::default_on`]).
    pub fn packing(&self) -> Packing {
        self.train.packing.unwrap_or(Packing::default_on(self.model.device.starts_with("cuda")))
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: &str| Err((key.to_string(), msg.to_string()));
        if self.datasets.is_empty() {
            return bad("dataset", "the manifest has no [[dataset]]: add at least one");
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.datasets.iter().enumerate() {
            let key = |k: &str| format!("dataset[{i}].{k}");
            if !names.insert(&d.name) {
                return bad(&key("name"), &format!("dataset name `{}` is used twice: names must be unique", d.name));
            }
            if d.fraction.is_some() && d.count.is_some() {
                return bad(&key("fraction"), "give either `fraction` or `count`, not both");
            }
            if let Some(f) = d.fraction {
                if !(f > 0.0 && f <= 1.0) {
                    return bad(&key("fraction"), &format!("{f} is not in (0, 1]"));
                }
            }
            if d.repeat == 0 {
                return bad(&key("repeat"), "must be at least 1 (leave the dataset out to drop it)");
            }
            if d.budget.records == 0 || d.budget.mb == 0 {
                return bad(&key("budget"), "records and mb must be at least 1");
            }
        }
        if !(self.mix.fraction > 0.0 && self.mix.fraction <= 1.0) {
            return bad("mix.fraction", &format!("{} is not in (0, 1]", self.mix.fraction));
        }
        let t = &self.train;
        if t.micro_batch == 0 || t.grad_accum == 0 {
            return bad("train.micro_batch", "micro_batch and grad_accum must be at least 1");
        }
        if t.max_seq_len < 2 {
            return bad("train.max_seq_len", "must be at least 2");
        }
        if let Some(n) = t.max_tokens_per_pass {
            if self.packing() != Packing::PaddingFree {
                return bad(
                    "train.max_tokens_per_pass",
                    "applies only to padding-free packing (the default on a GPU): set `packing = \"padding-free\"`, or remove this key",
                );
            }
            if n < t.max_seq_len {
                return bad(
                    "train.max_tokens_per_pass",
                    &format!("{n} is less than max_seq_len ({}): a record is never split across passes, so a pass must hold the longest", t.max_seq_len),
                );
            }
        }
        if !(0.0..1.0).contains(&t.eval_fraction) {
            return bad("train.eval_fraction", "must be in [0, 1)");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad("train.lr", "must be a positive number");
        }
        if self.lora.rank == 0 {
            return bad("lora.rank", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad("lora.dropout", "must be in [0, 1)");
        }
        if self.lora.targets.is_empty() {
            return bad("lora.targets", "name at least one module, e.g. [\"c_attn\", \"c_proj\"]");
        }
        for (_, key, use_) in self.plugin_uses() {
            if let Some(l) = &use_.limits {
                l.check().map_err(|(field, msg)| (format!("{key}.limits.{field}"), msg))?;
            }
        }
        for (name, p) in &self.plugins {
            if let Some(d) = &p.sha256 {
                if d.len() != 64 || !d.chars().all(|c| c.is_ascii_hexdigit()) {
                    return bad(&format!("plugins.{name}.sha256"), "must be 64 hex digits (`lorahost plugin inspect` prints it)");
                }
            }
        }
        Ok(())
    }

    /// Every plugin use with its kind and a key path for messages, in pipeline order.
    pub fn plugin_uses(&self) -> Vec<(PluginKind, String, &PluginUse)> {
        let mut out = Vec::new();
        for (i, d) in self.datasets.iter().enumerate() {
            out.push((PluginKind::Source, format!("dataset[{i}].source"), &d.source));
            for (j, f) in d.filters.iter().enumerate() {
                out.push((PluginKind::Filter, format!("dataset[{i}].filters[{j}]"), f));
            }
        }
        for (j, f) in self.filters.iter().enumerate() {
            out.push((PluginKind::Filter, format!("filter[{j}]"), f));
        }
        out.push((PluginKind::Template, "template".into(), &self.template));
        out.push((PluginKind::Scheduler, "scheduler".into(), &self.scheduler));
        out
    }

    /// The cache folder for this run.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.run.cache.clone().or_else(crate::plugins::PluginEngine::default_cache_dir)
    }
}

/// Deserializes a strict TOML file (the manifest, an eval task); errors name the file, the line and the key.
pub fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ManifestError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let err = |line: Option<usize>, key: &str, message: String| ManifestError {
        file: file.to_path_buf(),
        line,
        key: key.to_string(),
        message,
    };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| err(e.span().map(|s| line_of(s.start)), "", format!("malformed TOML: {}", e.message().trim())))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|s| line_of(s.start)).or_else(|| find_key_line(text, &key));
        let key = if key == "." { String::new() } else { key };
        err(line, &key, explain(inner.message()))
    })
}

/// The absolute folder of `file`, against which its relative paths resolve.
pub fn folder_of(file: &Path) -> PathBuf {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    dir.canonicalize().unwrap_or(dir)
}

/// Resolves the path options of a plugin use (`path`, `dir`, `*_path`, ... and `read`) against `dir`.
pub fn resolve_plugin_paths(u: &mut PluginUse, dir: &Path) {
    u.read.iter_mut().for_each(|p| *p = absolute(dir, p));
    for (key, value) in u.config.iter_mut() {
        if is_path_key(key) {
            resolve_value(value, dir);
        }
    }
}

/// `p` made absolute against `dir`, without `.` or `..` (the sandbox grants folders by their real path,
/// so `examples/../data/x.jsonl` must become `data/x.jsonl`); symlinks are resolved where the path exists.
pub fn absolute(dir: &Path, p: &Path) -> PathBuf {
    let joined = dir.join(p);
    if let Ok(real) = joined.canonicalize() {
        return real;
    }
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn resolve_value(value: &mut toml::Value, dir: &Path) {
    match value {
        toml::Value::String(s) => {
            *s = absolute(dir, Path::new(s.as_str())).to_string_lossy().into_owned();
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|v| resolve_value(v, dir)),
        _ => {}
    }
}

/// serde's messages, with a hint where one helps.
fn explain(message: &str) -> String {
    let m = message.trim();
    if m.starts_with("unknown field") {
        format!("{m}; remove it or fix its spelling")
    } else if m.starts_with("missing field") {
        format!("{m}; add it")
    } else {
        m.to_string()
    }
}

/// Best-effort line of the last component of a key path like `dataset[1].source.plugin`.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let last = key.rsplit('.').next()?.split('[').next()?;
    if last.is_empty() {
        return None;
    }
    // For `dataset[N]...`, start searching at the N-th `[[dataset]]` header.
    let mut start = 0;
    if let Some((head, rest)) = key.split_once('[') {
        if let Some(n) = rest.split(']').next().and_then(|n| n.parse::<usize>().ok()) {
            let header = format!("[[{head}]]");
            if let Some((pos, _)) = text.match_indices(&header).nth(n) {
                start = pos;
            }
        }
    }
    text[start..].lines().enumerate().find_map(|(i, l)| {
        let t = l.trim_start();
        let hit = t.starts_with(last) && t[last.len()..].trim_start().starts_with('=')
            || t.contains(&format!(" {last} =")) || t.contains(&format!("{{{last} ="))
            || t == format!("[{key}]");
        hit.then(|| text[..start].matches('\n').count() + i + 1)
    })
}
