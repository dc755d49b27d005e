//! `lorahost eval compare runs/a runs/b ...`: the runs' scores side by side, each later run's difference to
//! the first, and whether that difference is larger than its standard error (paired bootstrap over the
//! records both runs scored).
use super::results::TaskResult;
use super::stats::paired_bootstrap;
use anyhow::bail;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The bootstrap's seed: the same runs always give the same table.
pub const SEED: u64 = 0x5eed;

/// A run's results, by task: every `eval/*.json` in the run folder (or in the folder itself).
pub fn load_run(dir: &Path) -> anyhow::Result<BTreeMap<String, TaskResult>> {
    let eval = if dir.join("eval").is_dir() { dir.join("eval") } else { dir.to_path_buf() };
    let entries = std::fs::read_dir(&eval).map_err(|e| anyhow::anyhow!("cannot read {}: {e} (run `lorahost eval` first)", eval.display()))?;
    let mut paths: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
    paths.sort();
    let mut out = BTreeMap::new();
    for p in paths {
        let r = TaskResult::read(&p)?;
        out.insert(r.task.clone(), r);
    }
    if out.is_empty() {
        bail!("{} holds no eval results (run `lorahost eval` first)", eval.display());
    }
    Ok(out)
}

/// One later run against the first, for one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Difference {
    pub diff: f64,
    /// Standard error of the difference (paired bootstrap over the shared records).
    pub stderr: f64,
    pub shared: usize,
}

impl Difference {
    pub fn larger_than_stderr(&self) -> bool {
        self.diff.abs() > self.stderr
    }
}

/// One table row: a task's metric in every run.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub task: String,
    pub metric: String,
    /// (value, stderr) per run; none where the run lacks the task.
    pub values: Vec<Option<(f64, f64)>>,
    /// Per later run: its difference to the first, where both have the task.
    pub diffs: Vec<Option<Difference>>,
}

/// Compares the runs' results: one row per task and metric of any run.
pub fn compare(runs: &[BTreeMap<String, TaskResult>]) -> Vec<Row> {
    let mut keys: Vec<(String, String)> = vec![];
    for run in runs {
        for (task, r) in run {
            for m in &r.metrics {
                let key = (task.clone(), m.name.clone());
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    keys.into_iter()
        .map(|(task, metric)| {
            let values = runs
                .iter()
                .map(|run| run.get(&task).and_then(|r| r.metrics.iter().find(|m| m.name == metric)).map(|m| (m.value, m.stderr)))
                .collect();
            let first = runs[0].get(&task);
            let diffs = runs[1..]
                .iter()
                .map(|run| {
                    let (a, b) = (first?.per_record(&metric), run.get(&task)?.per_record(&metric));
                    let shared: Vec<&str> = a.keys().filter(|id| b.contains_key(*id)).copied().collect();
                    if shared.is_empty() {
                        return None;
                    }
                    let xa: Vec<f64> = shared.iter().map(|id| a[id]).collect();
                    let xb: Vec<f64> = shared.iter().map(|id| b[id]).collect();
                    let diff = (xb.iter().sum::<f64>() - xa.iter().sum::<f64>()) / shared.len() as f64;
                    Some(Difference { diff, stderr: paired_bootstrap(&xa, &xb, SEED), shared: shared.len() })
                })
                .collect();
            Row { task, metric, values, diffs }
        })
        .collect()
}

/// The side-by-side table; `names` head the run columns.
pub fn table(names: &[String], rows: &[Row]) -> String {
    let mut s = format!("{:<20} {:<18}", "task", "metric");
    for n in names {
        s.push_str(&format!(" {:>17}", truncate(n, 17)));
    }
    for n in &names[1..] {
        s.push_str(&format!(" {:>17} ", truncate(&format!("{} - {}", n, names[0]), 17)));
    }
    s.truncate(s.trim_end().len());
    s.push('\n');
    let mut marked = false;
    for r in rows {
        s.push_str(&format!("{:<20} {:<18}", r.task, r.metric));
        for v in &r.values {
            match v {
                Some((v, se)) => s.push_str(&format!(" {:>8.4} ± {:<6.4}", v, se)),
                None => s.push_str(&format!(" {:>17}", "-")),
            }
        }
        for d in &r.diffs {
            match d {
                Some(d) => {
                    let mark = if d.larger_than_stderr() { "*" } else { " " };
                    marked |= d.larger_than_stderr();
                    s.push_str(&format!(" {:>+8.4} ± {:<6.4}{mark}", d.diff, d.stderr));
                }
                None => s.push_str(&format!(" {:>17} ", "-")),
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
    }
    if marked {
        s.push_str(&format!(
            "* the difference is larger than its standard error (paired bootstrap over the shared records, {} resamples)\n",
            super::stats::BOOTSTRAP_RESAMPLES
        ));
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        format!("…{}", s.chars().skip(count - n + 1).collect::<String>())
    }
}
