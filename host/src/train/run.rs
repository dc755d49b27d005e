//! `lorahost run`: the training loop, top to bottom.
//!
//! prepare data -> load (or create) the model -> adapter + optimizer (or the last checkpoint) -> for each
//! optimizer step: the scheduler plugin's learning rate and one [`step`] (its passes, gradients normalised
//! by the trained tokens of the whole step, clipped, AdamW); log, checkpoint, evaluate -> the PEFT adapter,
//! the metrics log and the loss curve in the run folder.
//!
//! On several ranks ([`dist`]) every rank runs this same loop: rank 0 alone prepares the data, reads the
//! checkpoint and runs the scheduler, and hands the result to the others ([`handoff`]); each step's passes
//! are split over the ranks inside [`step`]; rank 0 alone writes (the [`Ledger`]). A checkpoint holds
//! nothing rank-specific, so a run resumes on any number of ranks.
use super::batches::{self, Schedule};
use super::checkpoint::{self, State};
use super::dist::{self, Collective, Single};
use super::launch::{self, LaunchEnv};
use super::handoff::{self, Start};
use super::optim::{AdamW, AdamWConfig};
use super::split;
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
use std::time::{Duration, Instant};

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
    /// Ranks, as threads of this process with an in-process all-reduce (CPU only); 0 or 1: one rank.
    pub ranks: usize,
    /// How long a rank waits for the others in one collective call (default [`dist::DEFAULT_TIMEOUT`]).
    pub rank_timeout: Option<Duration>,
    /// Testing: rank `.0` fails with an injected error at 0-based step `.1`.
    #[doc(hidden)]
    pub fail_at: Option<(usize, u64)>,
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

/// [`load_model`] for training: under recomputation (the memory-saving mode) the embedding table moves to
/// page-locked host memory and the freed device memory keeps the top layers' states
/// ([`Model::offload_embedding`]).
fn load_training_model(m: &Manifest, device: &Device) -> anyhow::Result<Model> {
    let mut model = load_model(m, device)?;
    if m.train.recompute {
        offload_for_recompute(&mut model);
    }
    Ok(model)
}

/// [`Model::offload_embedding`], saying what happened. Page-locking 1-2 GB of host memory can be refused (a
/// container's limits): then the table stays on the GPU and training goes on.
pub(crate) fn offload_for_recompute(model: &mut Model) {
    match model.offload_embedding() {
        Ok(0) => {}
        Ok(freed) => eprintln!("recompute: embedding table in host memory ({:.2} GiB of device memory freed)", freed as f64 / (1u64 << 30) as f64),
        Err(e) => eprintln!("recompute: the embedding table stays on the GPU (page-locked host memory refused: {e})"),
    }
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
    if m.packing() != Packing::None {
        id.insert("train.packing".into(), format!("{} max_tokens_per_pass={}", m.packing().name(), t.tokens_per_pass()));
    }
    id.insert("scheduler".into(), format!("{} {} {:?}", m.scheduler.plugin, scheduler_sha, m.scheduler.config));
    id.insert("seed".into(), m.run.seed.to_string());
    id
}

/// Trains as the manifest says, on `opts.ranks` ranks (threads of this process on the CPU; one by default).
pub fn run(m: &Manifest, opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let ranks = opts.ranks.max(1);
    if ranks == 1 {
        return Ok(run_rank(m, opts, &Single)?.expect("rank 0 gives the summary"));
    }
    if m.model.device != "cpu" {
        bail!(
            "{}: {ranks} ranks as threads run on the CPU only (`model.device = \"{}\"`); for several GPUs use \
             `lorahost run --gpus {ranks}` (one process per GPU, NCCL; docs/multi-gpu.md)",
            m.file.display(),
            m.model.device
        );
    }
    warn_idle_ranks(m, ranks);
    let timeout = opts.rank_timeout.unwrap_or(dist::DEFAULT_TIMEOUT);
    let mut summaries = dist::run_threads(ranks, timeout, |comm| run_rank(m, opts, comm))?;
    summaries.swap_remove(0).context("rank 0 gives the summary")
}

/// A forward pass is the unit of the split (it keeps each pass's dropout draws whatever the ranks): warns
/// when a step has fewer passes than ranks.
fn warn_idle_ranks(m: &Manifest, ranks: usize) {
    if m.packing() == Packing::None && m.train.grad_accum < ranks {
        eprintln!(
            "WARNING: a step has {} pass(es) of micro_batch records and {ranks} ranks: {} rank(s) idle; set `train.grad_accum` \
             to a multiple of {ranks} (and micro_batch down to keep the step's records)",
            m.train.grad_accum,
            ranks - m.train.grad_accum
        );
    }
}

/// This process's share of a run over several processes (`env`: the launcher's environment, or that of
/// `lorahost run --gpus N`'s children): a CPU manifest talks over TCP ([`TcpRank`]); a CUDA one over NCCL on
/// the GPU `cuda:LOCAL_RANK` (the manifest's index is replaced). The summary on rank 0, None on the others.
pub fn run_process(m: &Manifest, opts: &RunOptions, env: &LaunchEnv) -> anyhow::Result<Option<RunSummary>> {
    let world = env.world_size;
    // Without a rendezvous (a launcher's world of one) this is the ordinary run; `--gpus 1` gives one, so
    // that one GPU runs through NCCL as several do.
    let Some(master) = env.master.as_deref() else {
        return run_rank(m, opts, &Single);
    };
    if env.rank == 0 {
        warn_idle_ranks(m, world);
    }
    let timeout = opts.rank_timeout.unwrap_or(dist::DEFAULT_TIMEOUT);
    let mut m = m.clone();
    if m.model.device != "cpu" {
        m.model.device = format!("cuda:{}", env.local_rank);
    }
    let comm = launch::join(env, master, &m.model.device, timeout)?;
    match run_rank(&m, opts, &*comm) {
        Ok(out) => {
            comm.finish();
            Ok(out)
        }
        Err(e) => Err(launch::failed(&*comm, e)),
    }
}

/// One rank's run; the summary on rank 0, None on the others. World size 1 is the ordinary run.
pub fn run_rank(m: &Manifest, opts: &RunOptions, comm: &dyn Collective) -> anyhow::Result<Option<RunSummary>> {
    let device = device_of(m)?;
    let adamw = AdamWConfig { weight_decay: m.train.weight_decay, ..AdamWConfig::default() };

    // 1. Rank 0: the data, the model files, the checkpoint, the rates. 2. The others: what rank 0 decided,
    // then their own copy of the model (its files exist by then) and rank 0's adapter and optimizer state.
    let (start, model, mut lora, mut opt, ledger) = if comm.is_root() {
        let root = prepare_root(m, opts, &device, &adamw)?;
        (handoff::share_start(comm, Some(root.start))?, root.model, root.lora, root.opt, Some(root.ledger))
    } else {
        let start = handoff::share_start(comm, None)?;
        let model = load_training_model(m, &device)?;
        let lora = Lora::new(lora_config(m), &model.config, m.run.seed, &device)?;
        let opt = AdamW::new(adamw, lora.param_names(), &lora.params())?;
        (start, model, lora, opt, None)
    };
    handoff::share_state(comm, &mut lora, &mut opt)?;
    opt.fused = model.fusion.optimizer;

    let stream = &start.stream;
    let offsets = stream.offsets();
    let schedule = Schedule::of(m, stream.n_train, start.pad);
    let step_config = StepConfig { seed: m.run.seed, recompute: m.train.recompute, clip: m.train.clip };
    let steps_per_epoch = schedule.steps_per_epoch();
    let total = start.total();
    let mut ledger = ledger.map(|l| l.open()).transpose()?;
    let bar = progress_bar(opts.progress && ledger.is_some(), total, start.step);
    let started = Instant::now();
    let mut interrupted = false;
    let eval_rows: Vec<usize> = (stream.n_train..stream.len()).collect();
    let mut step = start.step;

    // 3. The loop: one iteration per optimizer step, its batches built ahead on a host thread.
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let upcoming = batches::prefetch(scope, stream, schedule.clone(), start.step..total, 2);
        while step < total {
            let step_batches = upcoming.recv().context("the batch thread stopped")?;
            debug_assert_eq!(step_batches.step, step);
            let lr = start.lrs[(step - start.step) as usize];
            if opts.fail_at == Some((comm.rank(), step)) {
                bail!("injected failure at step {} (test)", step + 1);
            }
            let out = train_step(&model, &mut lora, &mut opt, &step_batches, lr, &step_config, comm)?;
            step += 1;

            // Every rank stops at the same step: a Ctrl-C seen by any rank counts for all.
            let mut interrupt = [opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) as u8 as f64];
            comm.all_reduce_sum_scalars(&mut interrupt)?;
            let stop_now = opts.stop_after.is_some_and(|s| step >= s) || interrupt[0] > 0.0;
            let checkpoint_due = m.train.checkpoint_every.is_some_and(|n| step % n == 0) || step == total || stop_now;
            let eval_loss = match checkpoint_due && !eval_rows.is_empty() {
                true => Some(eval_loss(&model, &lora, stream, &offsets, &eval_rows, &schedule.layout, comm)?),
                false => None,
            };
            if let Some(ledger) = ledger.as_mut() {
                let log = StepLog {
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
                    eval_loss,
                };
                ledger.log(&log)?;
                if let Some(b) = &bar {
                    b.set_position(step);
                    b.set_message(format!("loss {:.4}  {:.0} tok/s", log.loss, log.tokens_per_s));
                }
                if checkpoint_due {
                    ledger.checkpoint(step, &lora, &opt)?;
                }
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
    match ledger {
        Some(ledger) => ledger.finish(m, &lora, step, total, interrupted).map(Some),
        None => Ok(None),
    }
}

/// What rank 0 alone prepares.
struct Root {
    start: Start,
    model: Model,
    lora: Lora,
    opt: AdamW,
    ledger: Ledger,
}

/// Rank 0's share of the start: the token stream (from the cache when unchanged) and the lock, the model
/// (created first when `[model.tiny]` asks), the adapter and optimizer (fresh, or the last checkpoint's
/// unless told to start over) and the scheduler plugin's rate for each remaining step.
fn prepare_root(m: &Manifest, opts: &RunOptions, device: &Device, adamw: &AdamWConfig) -> anyhow::Result<Root> {
    let run_dir = m.run.output.clone();
    let held = crate::run_folder::RunLock::acquire(&run_dir, "run")?;
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
    let pad = plan.tokenizer.special_id("<|endoftext|>").unwrap_or(0);

    let model = load_training_model(m, device)?;
    let model_config = std::fs::read_to_string(m.model.path.join("config.json")).unwrap_or_default();
    let identity = identity(m, &prepared.lock.key(), &plan.scheduler_sha(), &model_config);
    let schedule = Schedule::of(m, prepared.stream.n_train, pad);
    let mut total = schedule.steps_per_epoch() * m.train.epochs as u64;
    if let Some(max) = m.train.max_steps {
        total = total.min(max);
    }

    let mut lora = Lora::new(lora_config(m), &model.config, m.run.seed, device)?;
    let mut opt = AdamW::new(adamw.clone(), lora.param_names(), &lora.params())?;
    let mut ledger = Ledger { run_dir: run_dir.clone(), _held: held, identity, metrics: Vec::new(), resumed_from: None, file: None };
    if opts.fresh {
        let _ = std::fs::remove_dir_all(run_dir.join("checkpoints"));
    } else if let Some((loaded, state)) = checkpoint::resume(&run_dir, &ledger.identity, |dir| {
        let l = Lora::load(&dir.join(checkpoint::ADAPTER_DIR), &model.config, device)?;
        let o = AdamW::load(&dir.join(checkpoint::OPTIMIZER_FILE), adamw.clone(), l.param_names(), &l.params())?;
        Ok((l, o))
    })? {
        (lora, opt) = loaded;
        ledger.metrics = state.metrics;
        ledger.resumed_from = Some(state.step);
    }
    let step = ledger.resumed_from.unwrap_or(0);
    let mut scheduler = plan.scheduler()?;
    let lrs = (step..total).map(|s| scheduler.lr(s, total, m.train.lr)).collect::<Result<Vec<f64>, _>>()?;
    Ok(Root { start: Start { stream: prepared.stream, pad, step, lrs }, model, lora, opt, ledger })
}

/// What rank 0 alone writes: the metrics log, checkpoints, the adapter and the loss curve.
struct Ledger {
    run_dir: PathBuf,
    /// The run folder's lock, held until the run ends.
    _held: crate::run_folder::RunLock,
    /// The run's identity, recorded in each checkpoint.
    identity: BTreeMap<String, String>,
    /// Metrics lines so far (the checkpoint's, then this run's).
    metrics: Vec<String>,
    resumed_from: Option<u64>,
    file: Option<std::fs::File>,
}

impl Ledger {
    /// Rewrites the metrics log from what the checkpoint recorded, so it reads as one uninterrupted run.
    fn open(mut self) -> anyhow::Result<Ledger> {
        let path = self.run_dir.join("metrics.jsonl");
        crate::fsutil::write_atomic(&path, self.metrics.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes())?;
        self.file = Some(std::fs::OpenOptions::new().append(true).open(&path)?);
        Ok(self)
    }

    fn log(&mut self, log: &StepLog) -> anyhow::Result<()> {
        let line = serde_json::to_string(log)?;
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{line}")?;
        }
        self.metrics.push(line);
        Ok(())
    }

    fn checkpoint(&self, step: u64, lora: &Lora, opt: &AdamW) -> anyhow::Result<()> {
        let state = State { format: checkpoint::FORMAT.into(), step, identity: self.identity.clone(), metrics: self.metrics.clone() };
        checkpoint::write(&self.run_dir, &state, |dir| {
            lora.save(&dir.join(checkpoint::ADAPTER_DIR))?;
            opt.save(&dir.join(checkpoint::OPTIMIZER_FILE))?;
            Ok(())
        })?;
        checkpoint::prune(&self.run_dir, 3)
    }

    /// The adapter (PEFT layout, unless interrupted) and the loss curve; the run's summary.
    fn finish(self, m: &Manifest, lora: &Lora, steps_done: u64, total_steps: u64, interrupted: bool) -> anyhow::Result<RunSummary> {
        let logs: Vec<StepLog> = self.metrics.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let losses: Vec<f64> = logs.iter().map(|l| l.loss).collect();
        let eval_losses: Vec<(u64, f64)> = logs.iter().filter_map(|l| l.eval_loss.map(|e| (l.step, e))).collect();
        let mut adapter_dir = None;
        if !interrupted {
            let dir = self.run_dir.join("adapter");
            crate::fsutil::write_dir_atomic(&dir, |tmp| lora.save(tmp))?;
            adapter_dir = Some(dir);
        }
        if !logs.is_empty() {
            let train: Vec<(u64, f64)> = logs.iter().map(|l| (l.step, l.loss)).collect();
            super::plot::loss_png(&self.run_dir.join("loss.png"), &train, &eval_losses, &format!("{}: loss", m.run.name))?;
        }
        let run_dir = self.run_dir;
        Ok(RunSummary { run_dir, steps_done, total_steps, losses, eval_losses, resumed_from: self.resumed_from, interrupted, adapter_dir })
    }
}

/// Mean loss over the eval records, in the training passes' layout, the passes split over the ranks.
fn eval_loss(
    model: &Model,
    lora: &Lora,
    stream: &TokenStream,
    offsets: &[usize],
    rows: &[usize],
    layout: &Layout,
    comm: &dyn Collective,
) -> anyhow::Result<f64> {
    let passes = layout.passes(stream, offsets, rows);
    let mut sums = [0.0, 0.0];
    for i in split::assign(&passes, comm.world_size()).swap_remove(comm.rank()) {
        let batch = &passes[i];
        let (ids, labels) = batch.tensors()?;
        let (s, k) = model.eval_loss(&ids, &labels, batch.cu_seqlens.as_deref(), Some(lora))?;
        sums[0] += s;
        sums[1] += k as f64;
    }
    comm.all_reduce_sum_scalars(&mut sums)?;
    Ok(if sums[1] > 0.0 { sums[0] / sums[1] } else { f64::NAN })
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
