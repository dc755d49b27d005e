//! An evaluation task as data: one TOML file naming a source plugin, how a record becomes a prompt, few-shot
//! examples and the kind (multiple choice by log-likelihood, or generation then a scorer plugin).
//!
//! The schema, with MMLU's values (docs/eval.md has every key):
//!
//! ```toml
//! kind = "multiple_choice"           # or "generate"
//! description = "The following are multiple choice questions (with answers) about {subject|words}.\n\n"
//! prompt = "{question|strip}\n{choices|lettered}\nAnswer:"
//! choices = "letters"                # multiple_choice: continuations " A", " B", ... or "texts": " {choice}"
//! [source]                           # a source plugin use, as in a [[dataset]]; paths relative to this file
//! plugin = "mmlu"
//! dir = "../../tests/fixtures/samples/mmlu/hf_export_variant"
//! split = "test"
//! [fewshot]
//! count = 5
//! same = "subject"                   # few-shot examples share this metadata value with the record
//! source = { plugin = "mmlu", dir = "...", split = "dev" }
//! ```
use crate::manifest::{folder_of, parse_toml, resolve_plugin_paths, PluginUse};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Log-likelihood of each choice given the prompt; the most likely one is the answer.
    MultipleChoice,
    /// Generate, cut at stop strings, then score with a scorer plugin.
    Generate,
}

/// How a multiple-choice record's continuations are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Choices {
    /// " A", " B", ... (MMLU: the prompt lists the choices, the model names the letter).
    Letters,
    /// " {choice text}" (TruthfulQA, BIG-bench: the model continues with the answer itself).
    Texts,
}

/// What a multiple-choice task reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// `acc` (the most likely choice is the gold one) and `acc_norm` (likelihood divided by the choice's
    /// length in characters, as lm-evaluation-harness does).
    Acc,
    /// TruthfulQA MC2: the probability mass of the right choices, normalised over all choices.
    Mc2,
}

/// How few-shot examples are picked from their pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// The first `count` of the pool (the harness's `first_n`, MMLU's default).
    FirstN,
    /// `count` drawn with a seeded generator per record (not the harness's Python draw: other examples).
    Random,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fewshot {
    pub count: usize,
    /// Where the examples come from (default: the task's own source; the record itself is never its own
    /// example).
    #[serde(default)]
    pub source: Option<PluginUse>,
    #[serde(default = "first_n")]
    pub sampler: Sampler,
    #[serde(default = "fewshot_seed")]
    pub seed: u64,
    /// A metadata key: examples are taken only among pool records with the same value as the record (MMLU's
    /// per-subject dev examples).
    #[serde(default)]
    pub same: Option<String>,
}

fn first_n() -> Sampler {
    Sampler::FirstN
}
fn fewshot_seed() -> u64 {
    1234
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generate {
    #[serde(default = "max_tokens")]
    pub max_tokens: usize,
    /// The generation is cut before the first of these (and stops there).
    #[serde(default)]
    pub stop: Vec<String>,
    /// 0: greedy; above: seeded sampling at this temperature.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub seed: u64,
}

fn max_tokens() -> usize {
    256
}

/// A task file as written.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Default: the file name without `.toml`.
    #[serde(default)]
    pub name: String,
    pub kind: Kind,
    pub source: PluginUse,
    /// Text before the few-shot examples (placeholders of the record allowed).
    #[serde(default)]
    pub description: String,
    /// The record's prompt (the harness's `doc_to_text`).
    pub prompt: String,
    /// The answer after the prompt (the harness's `doc_to_target`): few-shot examples show it; for
    /// `generate` tasks it is also the scorer's reference unless `references` is given. Multiple choice:
    /// default the gold choice.
    #[serde(default)]
    pub target: Option<String>,
    /// Scorer references, each a template (default: `[target]`).
    #[serde(default)]
    pub references: Option<Vec<String>>,
    #[serde(default = "space")]
    pub target_delimiter: String,
    #[serde(default = "blank_line")]
    pub fewshot_delimiter: String,
    /// Multiple choice only.
    #[serde(default)]
    pub choices: Option<Choices>,
    #[serde(default)]
    pub metric: Option<Metric>,
    #[serde(default)]
    pub fewshot: Option<Fewshot>,
    #[serde(default)]
    pub generate: Option<Generate>,
    /// Generate only: the scorer plugin use.
    #[serde(default)]
    pub scorer: Option<PluginUse>,
    /// The task file, for messages.
    #[serde(skip)]
    pub file: PathBuf,
}

fn space() -> String {
    " ".into()
}
fn blank_line() -> String {
    "\n\n".into()
}

impl Task {
    pub fn load(file: &Path) -> anyhow::Result<Task> {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read the eval task {}", file.display()))?;
        let mut task: Task = parse_toml(file, &text)?;
        let dir = folder_of(file);
        resolve_plugin_paths(&mut task.source, &dir);
        if let Some(u) = task.fewshot.as_mut().and_then(|f| f.source.as_mut()) {
            resolve_plugin_paths(u, &dir);
        }
        if let Some(u) = task.scorer.as_mut() {
            resolve_plugin_paths(u, &dir);
        }
        if task.name.is_empty() {
            task.name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        }
        task.file = file.to_path_buf();
        task.validate().map_err(|(key, msg)| anyhow::anyhow!("{}: `{key}`: {msg}", file.display()))?;
        Ok(task)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        match self.kind {
            Kind::MultipleChoice => {
                if self.choices.is_none() {
                    return Err(("choices", "a multiple_choice task needs `choices = \"letters\"` or `\"texts\"`".into()));
                }
                if self.generate.is_some() || self.scorer.is_some() {
                    return Err(("kind", "[generate] and [scorer] belong to `kind = \"generate\"` tasks".into()));
                }
            }
            Kind::Generate => {
                if self.scorer.is_none() {
                    return Err(("scorer", "a generate task needs a [scorer] table, e.g. `plugin = \"exact-match\"`".into()));
                }
                if self.target.is_none() && self.references.is_none() {
                    return Err(("target", "a generate task needs `target` (or `references`): the answer to score against".into()));
                }
                if self.choices.is_some() || self.metric.is_some() {
                    return Err(("choices", "`choices` and `metric` belong to multiple_choice tasks".into()));
                }
                if let Some(g) = &self.generate {
                    if g.max_tokens == 0 {
                        return Err(("generate.max_tokens", "must be at least 1".into()));
                    }
                    if !(g.temperature >= 0.0 && g.temperature.is_finite()) {
                        return Err(("generate.temperature", "must be 0 (greedy) or a positive number".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The generation settings (defaults when the file has no [generate] table).
    pub fn generation(&self) -> Generate {
        self.generate.clone().unwrap_or(Generate { max_tokens: max_tokens(), stop: vec![], temperature: 0.0, seed: 0 })
    }
}

/// The shipped task files of the source tree this binary was built from.
pub fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/eval")
}

/// The task file for `name`: a path to a `.toml` file as it is, else `<name>.toml` in each of `dirs` in turn.
pub fn find(name: &str, dirs: &[PathBuf]) -> anyhow::Result<PathBuf> {
    if name.ends_with(".toml") {
        let p = PathBuf::from(name);
        if p.is_file() {
            return Ok(p);
        }
        bail!("eval task file {name} does not exist");
    }
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("eval task name `{name}`: use letters, digits, '-', '_' (or give a path to a .toml file)");
    }
    for dir in dirs {
        let p = dir.join(format!("{name}.toml"));
        if p.is_file() {
            return Ok(p);
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!("no eval task `{name}`: looked for {name}.toml in {}", looked.join(", "))
}

/// Where a manifest's task names are looked up: `[eval] dir`, the manifest's `eval/` folder, the shipped tasks.
pub fn search_dirs(m: &crate::manifest::Manifest) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = m.eval.dir.iter().cloned().collect();
    dirs.push(folder_of(&m.file).join("eval"));
    dirs.push(shipped_dir());
    dirs
}
