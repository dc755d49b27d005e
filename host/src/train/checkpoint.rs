//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `<run>/checkpoints/step-NNNNNNNN/` holds the adapter (PEFT format), the optimizer moments and
//! `state.json` (step, the run's identity, the metrics so far). The data cursor is the step itself (the
//! token stream and each epoch's order are fixed by the manifest), and dropout draws are keyed by step,
//! so no generator state needs saving. A checkpoint is written into a temporary folder and renamed into
//! place: a crash leaves the previous checkpoint intact, never a half-written one.
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const ADAPTER_DIR: &str = "adapter";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// What the run is: data inputs and training settings. A checkpoint of another identity is refused.
    pub identity: BTreeMap<String, String>,
    /// The metrics lines written up to this step (so a resumed run's log is the uninterrupted run's log).
    pub metrics: Vec<String>,
}

pub const FORMAT: &str = "lorahost-checkpoint-v1";

pub fn dir_for(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// The checkpoints of a run, newest first (folders `step-N` holding a state file).
pub fn newest_first(run_dir: &Path) -> Vec<PathBuf> {
    let dir = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path().join(STATE_FILE).exists().then_some((step, e.path()))
        })
        .collect();
    steps.sort();
    steps.into_iter().rev().map(|(_, p)| p).collect()
}

/// Writes a checkpoint whole or not at all: `fill` writes the adapter and optimizer into the folder it is given.
pub fn write(run_dir: &Path, state: &State, fill: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<PathBuf> {
    let final_dir = dir_for(run_dir, state.step);
    std::fs::create_dir_all(run_dir.join("checkpoints"))?;
    crate::fsutil::write_dir_atomic(&final_dir, |tmp| {
        fill(tmp)?;
        std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(state)?)?;
        Ok(())
    })?;
    Ok(final_dir)
}

/// The newest intact checkpoint of `run_dir` as `load` reads it, with its state. A damaged one (cut short,
/// unreadable) is skipped for the one before, saying so; a checkpoint of another run is refused. With no
/// intact checkpoint left, the newest one's damage is the error.
pub fn resume<T>(
    run_dir: &Path,
    identity: &BTreeMap<String, String>,
    load: impl Fn(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<Option<(T, State)>> {
    let mut first_damage: Option<anyhow::Error> = None;
    let mut damaged = |dir: &Path, e: anyhow::Error| {
        eprintln!("note: checkpoint {} is damaged ({e:#}); trying the one before", dir.display());
        first_damage.get_or_insert(e);
    };
    for (i, dir) in newest_first(run_dir).into_iter().enumerate() {
        let state = match read_state(&dir) {
            Ok(state) => state,
            Err(e) => {
                damaged(&dir, e);
                continue;
            }
        };
        let changes = identity_diff(identity, &state.identity);
        if !changes.is_empty() {
            bail!(
                "the manifest changed since the checkpoint {}:\n  {}\nrun with --fresh to start over (the old checkpoints are removed)",
                dir.display(),
                changes.join("\n  ")
            );
        }
        match load(&dir).with_context(|| format!("resuming from {}", dir.display())) {
            Ok(t) => {
                if i > 0 {
                    eprintln!("note: resuming from {} (step {}), the newest intact checkpoint", dir.display(), state.step);
                }
                return Ok(Some((t, state)));
            }
            Err(e) => damaged(&dir, e),
        }
    }
    match first_damage {
        Some(e) => Err(e.context("no intact checkpoint to resume from (run with --fresh to start over)")),
        None => Ok(None),
    }
}

pub fn read_state(dir: &Path) -> anyhow::Result<State> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let state: State = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a lorahost checkpoint state (damaged or foreign)", path.display()))?;
    if state.format != FORMAT {
        bail!("{}: checkpoint format `{}`, this lorahost reads `{FORMAT}`", path.display(), state.format);
    }
    Ok(state)
}

/// Keeps the newest `keep` checkpoints and removes older ones.
pub fn prune(run_dir: &Path, keep: usize) -> anyhow::Result<()> {
    let dir = run_dir.join("checkpoints");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) && p.join(STATE_FILE).exists())
        .collect();
    all.sort();
    let n = all.len().saturating_sub(keep);
    for p in &all[..n] {
        std::fs::remove_dir_all(p)?;
    }
    Ok(())
}

/// Lines naming each difference between two identities.
pub fn identity_diff(now: &BTreeMap<String, String>, saved: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in now {
        match saved.get(k) {
            Some(s) if s != v => out.push(format!("`{k}`: now {v}, checkpoint {s}")),
            None => out.push(format!("`{k}`: new")),
            _ => {}
        }
    }
    for k in saved.keys().filter(|k| !now.contains_key(*k)) {
        out.push(format!("`{k}`: gone"));
    }
    out
}
