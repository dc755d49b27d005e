//! `lorahost run`: the training loop, top to bottom.
//!
//! prepare data -> load (or create) the model -> adapter + optimizer (or the last checkpoint) -> for each
//! optimizer step: the scheduler plugin's learning rate and one [`step`] (its passes, gradients normalised
//! by the trained tokens of the whole step, clipped, AdamW); log, checkpoint, evaluate -> the PEFT adapter,
//! the metrics log and the loss curve in the run folder.
use super::batches::{self, Schedule};
use super::checkpoint::{self, State};
use super::optim::{AdamW, AdamWConfig};
use super::step::{step as train_step, StepConfig};
use crate::data::batch::Layout;
use crate::data::{self, TokenStream};
use crate::manifest::{DType, Manifest, Packing};
use crate::model::lora::{Lora, LoraConfig};
use crate::model::tiny;
use crate::model::transformer::Model;
use anyhow::{bail, Context};
use candle_core::Device;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Ignore existing checkpoints and start over.
    pub fresh: bool,
    /// Stop (with a checkpoint, as on Ctrl-C) after this many optimizer steps in all.
    pub stop_after: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
    /// Set to stop at the next step boundary (Ctrl-C).
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Accept plugins whose files changed since the run folder's lock (and rewrite it).
    pub relock: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps_done: u64,
    pub total_steps: u64,
    /// Training loss per completed step (the whole run, resumed steps included).
    pub losses: Vec<f64>,
    pub eval_losses: Vec<(u64, f64)>,
    pub resumed_from: Option<u64>,
    pub interrupted: bool,
    pub adapter_dir: Option<PathBuf>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub trained_tokens: usize,
    /// Tokens of the step's records (padding excluded).
    #[serde(default)]
    pub tokens: usize,
    /// `tokens` over the step's wall time.
    pub tokens_per_s: f64,
    /// Wall time of the step (forward, backward, optimizer).
    #[serde(default)]
    pub step_ms: f64,
    pub elapsed_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

pub fn device_of(m: &Manifest) -> anyhow::Result<Device> {
    let d = m.model.device.as_str();
    if d == "cpu" {
        return Ok(Device::Cpu);
    }
    if d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).is_some() {
        return crate::model::device::open(d).with_context(|| {
            format!("{}: `model.device = \"{d}\"`: no CUDA device (build with `--features cuda`, or use \"cpu\")", m.file.display())
        });
    }
    bail!("{}: `model.device`: `{d}` is not \"cpu\" or \"cuda:N\"", m.file.display())
}

pub fn dtype_of(m: &Manifest) -> candle_core::DType {
    match m.model.dtype {
        DType::F32 => candle_core::DType::F32,
        DType::Bf16 => candle_core::DType::BF16,
    }
}

/// Creates the tiny random model at `[model] path` when `[model.tiny]` asks for it and none is there.
pub fn ensure_tiny(m: &Manifest) -> anyhow::Result<()> {
    let Some(t) = &m.model.tiny else { return Ok(()) };
    if model_present(&m.model.path) {
        return Ok(());
    }
    let family = crate::model::Family::from_model_type(&t.family).with_context(|| format!("{}: `model.tiny.family`", m.file.display()))?;
    let defaults = tiny::TinySpec::of_family(family);
    let spec = tiny::TinySpec {
        hidden_size: t.hidden_size,
        num_layers: t.num_layers,
        num_heads: t.num_heads,
        num_kv_heads: t.num_kv_heads.unwrap_or(defaults.num_kv_heads.min(t.num_heads)),
        intermediate_size: t.intermediate_size,
        init_std: t.init_std,
        ..defaults
    };
    create_tiny(&m.model.path, &spec, t.seed).with_context(|| format!("creating the tiny model in {}", m.model.path.display()))
}

/// Loads the manifest's model, creating the tiny random one first when `[model.tiny]` asks for it.
pub fn load_model(m: &Manifest, device: &Device) -> anyhow::Result<Model> {
    ensure_tiny(m)?;
    Model::load(&m.model.path, dtype_of(m), device)
        .with_context(|| format!("{}: `model.path`: loading {}", m.file.display(), m.model.path.display()))
}

/// Whether `dir` holds a model: its config and its weights (one file or an index).
fn model_present(dir: &Path) -> bool {
    use crate::model::weights::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
    dir.join(CONFIG_FILE).exists() && (dir.join(SINGLE_FILE).exists() || dir.join(INDEX_FILE).exists())
}

/// Creates the tiny model whole or not at all: written into a temporary folder beside `dir`, which is then
/// renamed to `dir`; where `dir` already exists (a run killed by an older lorahost left part of a model),
/// the files are moved in one by one, config.json last.
fn create_tiny(dir: &Path, spec: &tiny::TinySpec, seed: u64) -> anyhow::Result<()> {
    let parent = dir.parent().context("the model path has no parent folder")?;
    std::fs::create_dir_all(parent)?;
    crate::fsutil::remove_stale_temps(parent);
    let tmp = crate::fsutil::temp_sibling(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        tiny::write_tiny_checkpoint(&tmp, spec, seed)?;
        if std::fs::rename(&tmp, dir).is_ok() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        let mut names: Vec<_> = std::fs::read_dir(&tmp)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort_by_key(|n| n == crate::model::weights::CONFIG_FILE);
        for n in names {
            std::fs::rename(tmp.join(&n), dir.join(&n))?;
        }
        Ok(std::fs::remove_dir(&tmp)?)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn lora_config(m: &Manifest) -> LoraConfig {
    LoraConfig {
        r: m.lora.rank,
        alpha: m.lora.alpha,
        dropout: m.lora.dropout,
        targets: m.lora.targets.clone(),
        base_model_name_or_path: m.model.path.display().to_string(),
    }
}

/// What the run is, for refusing a checkpoint of a different one: data inputs and training settings.
fn identity(m: &Manifest, lock_key: &str, scheduler_sha: &str, model_config: &str) -> BTreeMap<String, String> {
    let t = &m.train;
    let mut id = BTreeMap::new();
    id.insert("data (token stream inputs)".into(), lock_key.to_string());
    id.insert("model config.json".into(), hex::encode(<sha2::Sha256 as sha2::Digest>::digest(model_config.as_bytes())));
    id.insert("model.dtype".into(), format!("{:?}", m.model.dtype));
    id.insert("lora".into(), format!("{:?}", m.lora));
    id.insert(
        "train".into(),
        format!(
            "micro_batch={} grad_accum={} epochs={} max_steps={:?} lr={} weight_decay={} clip={:?} recompute={}",
            t.micro_batch, t.grad_accum, t.epochs, t.max_steps, t.lr, t.weight_decay, t.clip, t.recompute
        ),
    );
    // Only when on, so that checkpoints written before the option existed still resume.
    if t.packing != Packing::None {
        id.insert("train.packing".into(), format!("{} max_tokens_per_pass={}", t.packing.name(), t.tokens_per_pass()));
    }
    id.insert("scheduler".into(), format!("{} {} {:?}", m.scheduler.plugin, scheduler_sha, m.scheduler.config));
    id.insert("seed".into(), m.run.seed.to_string());
    id
}

pub fn run(m: &Manifest, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let run_dir = m.run.output.clone();
    let _held = crate::run_folder::RunLock::acquire(&run_dir, "run")?;

    // 1. Data: the token stream (from the cache when unchanged) and the lock.
    let plan = data::Plan::new(m)?;
    let lock_path = run_dir.join(data::lock::LOCK_FILE);
    if !opts.relock && lock_path.exists() {
        let locked = data::lock::Lock::read(&lock_path).context("run with --relock to write a new lock")?;
        let changed = plan.lock.swapped_plugins(&locked);
        if !changed.is_empty() {
            bail!(
                "a plugin changed since {} was written:\n  {}\nif you replaced it on purpose, run with --relock to accept it",
                lock_path.display(),
                changed.join("\n  ")
            );
        }
    }
    let prepared = data::prepare_plan(&plan)?;
    prepared.lock.write(&lock_path)?;
    for p in prepared.report.plugins.iter().filter(|p| p.native) {
        eprintln!("WARNING: plugin `{}` ({}) is a native library and runs UNSANDBOXED (trusted = true)", p.name, p.from);
    }
    let stream = &prepared.stream;
    let offsets = stream.offsets();
    let mut scheduler = plan.scheduler()?;
    let pad = plan.tokenizer.special_id("<|endoftext|>").unwrap_or(0);

    // 2. Model and adapter.
    let device = device_of(m)?;
    let model = load_model(m, &device)?;
    let model_config = std::fs::read_to_string(m.model.path.join("config.json")).unwrap_or_default();
    let identity = identity(m, &prepared.lock.key(), &plan.scheduler_sha(), &model_config);

    let schedule = Schedule::of(m, stream.n_train, pad);
    let step_config = StepConfig { seed: m.run.seed, recompute: m.train.recompute, clip: m.train.clip };
    let steps_per_epoch = schedule.steps_per_epoch();
    let mut total = steps_per_epoch * m.train.epochs as u64;
    if let Some(max) = m.train.max_steps {
        total = total.min(max);
    }
    let adamw = AdamWConfig { weight_decay: m.train.weight_decay, ..AdamWConfig::default() };

    // 3. Resume from the last checkpoint, unless told to start over.
    let mut lora = Lora::new(lora_config(m), &model.config, m.run.seed, &device)?;
    let mut opt = AdamW::new(adamw.clone(), lora.param_names(), &lora.params())?;
    opt.fused = model.fusion.optimizer;
    let mut start_step = 0u64;
    let mut metrics: Vec<String> = Vec::new();
    let mut resumed_from = None;
    if opts.fresh {
        let _ = std::fs::remove_dir_all(run_dir.join("checkpoints"));
    } else if let Some((loaded, state)) = checkpoint::resume(&run_dir, &identity, |dir| {
        let l = Lora::load(&dir.join(checkpoint::ADAPTER_DIR), &model.config, &device)?;
        let o = AdamW::load(&dir.join(checkpoint::OPTIMIZER_FILE), adamw.clone(), l.param_names(), &l.params())?;
        Ok((l, o))
    })? {
        (lora, opt) = loaded;
        start_step = state.step;
        metrics = state.metrics;
        resumed_from = Some(state.step);
    }
    // The metrics log restarts from what the checkpoint recorded, so it reads as one uninterrupted run.
    let metrics_path = run_dir.join("metrics.jsonl");
    crate::fsutil::write_atomic(&metrics_path, metrics.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes())?;
    let mut metrics_file = std::fs::OpenOptions::new().append(true).open(&metrics_path)?;

    let bar = progress_bar(opts.progress, total, start_step);
    let started = Instant::now();
    let mut interrupted = false;
    let eval_rows: Vec<usize> = (stream.n_train..stream.len()).collect();
    let mut step = start_step;

    // 4. The loop: one iteration per optimizer step, its batches built ahead on a host thread.
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let upcoming = batches::prefetch(scope, stream, schedule.clone(), start_step..total, 2);
        while step < total {
            let step_batches = upcoming.recv().context("the batch thread stopped")?;
            debug_assert_eq!(step_batches.step, step);
            let lr = scheduler.lr(step, total, m.train.lr)?;
            let out = train_step(&model, &mut lora, &mut opt, &step_batches, lr, &step_config)?;
            step += 1;

            let mut log = StepLog {
                step,
                epoch: step as f64 / steps_per_epoch as f64,
                loss: out.loss,
                lr,
                grad_norm: out.grad_norm,
                trained_tokens: out.trained_tokens,
                tokens: out.tokens,
                tokens_per_s: out.tokens_per_s(),
                step_ms: out.seconds * 1e3,
                elapsed_s: started.elapsed().as_secs_f64(),
                eval_loss: None,
            };
            let stop_now = opts.stop_after.is_some_and(|s| step >= s)
                || opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
            let checkpoint_due = m.train.checkpoint_every.is_some_and(|n| step % n == 0) || step == total || stop_now;
            if checkpoint_due && !eval_rows.is_empty() {
                log.eval_loss = Some(eval_loss(&model, &lora, stream, &offsets, &eval_rows, &schedule.layout)?);
            }
            let line = serde_json::to_string(&log)?;
            writeln!(metrics_file, "{line}")?;
            metrics.push(line);
            if let Some(b) = &bar {
                b.set_position(step);
                b.set_message(format!("loss {:.4}  {:.0} tok/s", log.loss, log.tokens_per_s));
            }
            if checkpoint_due {
                let state = State { format: checkpoint::FORMAT.into(), step, identity: identity.clone(), metrics: metrics.clone() };
                checkpoint::write(&run_dir, &state, |dir| {
                    lora.save(&dir.join(checkpoint::ADAPTER_DIR))?;
                    opt.save(&dir.join(checkpoint::OPTIMIZER_FILE))?;
                    Ok(())
                })?;
                checkpoint::prune(&run_dir, 3)?;
            }
            if stop_now && step < total {
                interrupted = true;
                break;
            }
        }
        Ok(())
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    // 5. Outputs: the adapter (PEFT layout) and the loss curve.
    let logs: Vec<StepLog> = metrics.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let losses: Vec<f64> = logs.iter().map(|l| l.loss).collect();
    let eval_losses: Vec<(u64, f64)> = logs.iter().filter_map(|l| l.eval_loss.map(|e| (l.step, e))).collect();
    let mut adapter_dir = None;
    if !interrupted {
        let dir = run_dir.join("adapter");
        crate::fsutil::write_dir_atomic(&dir, |tmp| lora.save(tmp))?;
        adapter_dir = Some(dir);
    }
    if !logs.is_empty() {
        let train: Vec<(u64, f64)> = logs.iter().map(|l| (l.step, l.loss)).collect();
        super::plot::loss_png(&run_dir.join("loss.png"), &train, &eval_losses, &format!("{}: loss", m.run.name))?;
    }
    Ok(RunSummary { run_dir, steps_done: step, total_steps: total, losses, eval_losses, resumed_from, interrupted, adapter_dir })
}

/// Mean loss over the eval records, in the training passes' layout.
fn eval_loss(model: &Model, lora: &Lora, stream: &TokenStream, offsets: &[usize], rows: &[usize], layout: &Layout) -> anyhow::Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for batch in layout.passes(stream, offsets, rows) {
        let (ids, labels) = batch.tensors()?;
        let (s, k) = model.eval_loss(&ids, &labels, batch.cu_seqlens.as_deref(), Some(lora))?;
        sum += s;
        n += k;
    }
    Ok(if n > 0 { sum / n as f64 } else { f64::NAN })
}

fn progress_bar(show: bool, total: u64, at: u64) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(at);
    Some(bar)
}

pub fn summary_text(s: &RunSummary) -> String {
    let first = s.losses.first().copied().unwrap_or(f64::NAN);
    let last = s.losses.last().copied().unwrap_or(f64::NAN);
    let mut t = format!("{} of {} steps; loss {first:.4} -> {last:.4}", s.steps_done, s.total_steps);
    if let Some(r) = s.resumed_from {
        t.push_str(&format!(" (resumed at step {r})"));
    }
    if let Some((step, e)) = s.eval_losses.last() {
        t.push_str(&format!("; eval loss {e:.4} at step {step}"));
    }
    if s.interrupted {
        t.push_str(&format!("\nstopped with a checkpoint at step {}: run the same command again to resume", s.steps_done));
    } else if let Some(a) = &s.adapter_dir {
        t.push_str(&format!("\nadapter (PEFT format): {}", a.display()));
    }
    t.push_str(&format!("\nlog: {}  curve: {}", s.run_dir.join("metrics.jsonl").display(), s.run_dir.join("loss.png").display()));
    t
}
