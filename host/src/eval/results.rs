//! What `lorahost eval` writes for a task (`<run>/eval/<task>.json`) and reads back for `compare`.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One metric over the whole task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub name: String,
    pub value: f64,
    /// Standard error of the mean over records.
    pub stderr: f64,
}

/// One record's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordResult {
    pub id: String,
    /// The full context the model saw (few-shot examples included).
    pub prompt: String,
    /// Multiple choice: each continuation and its log-likelihood; the gold index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<usize>,
    /// Generate: the generation (cut at the stop strings), what the scorer read from it, the references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    /// Metric name -> this record's score.
    pub scores: BTreeMap<String, f64>,
}

/// A task's results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub kind: super::task::Kind,
    pub task_file: String,
    /// The model folder and the adapter folder (none: the base model).
    pub model: String,
    pub adapter: Option<String>,
    pub fewshot: usize,
    pub limit: Option<usize>,
    /// In the task's order: the main metric first.
    pub metrics: Vec<Aggregate>,
    pub records: Vec<RecordResult>,
}

impl TaskResult {
    /// Writes `<dir>/<task>.json` (atomically) and returns its path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("{}.json", self.task));
        crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(self)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    pub fn read(path: &Path) -> anyhow::Result<TaskResult> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not an eval result file: {e}", path.display()))
    }

    /// Per-record values of one metric, by record id.
    pub fn per_record(&self, metric: &str) -> BTreeMap<&str, f64> {
        self.records.iter().filter_map(|r| r.scores.get(metric).map(|v| (r.id.as_str(), *v))).collect()
    }
}

/// Aggregates per-record scores in the order of `names`.
pub fn aggregate(names: &[String], records: &[RecordResult]) -> Vec<Aggregate> {
    names
        .iter()
        .map(|name| {
            let values: Vec<f64> = records.iter().filter_map(|r| r.scores.get(name).copied()).collect();
            let (value, stderr) = super::stats::mean_stderr(&values);
            Aggregate { name: name.clone(), value, stderr }
        })
        .collect()
}
