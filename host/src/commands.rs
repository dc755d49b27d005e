//! The commands of the CLI: `check`, `preview`, `tokenize`, `run`, `generate`, `merge`, `eval`, `serve`. Each
//! is a few calls into the library.
use anyhow::{bail, Context};
use lorahost::data::{self, lock::Lock};
use lorahost::manifest::Manifest;
use std::io::{IsTerminal, Read};
use std::path::Path;

pub fn lock_path(m: &Manifest) -> std::path::PathBuf {
    m.run.output.join(data::lock::LOCK_FILE)
}

pub fn check(manifest: &Path, locked: bool, json: bool, show_drops: usize, lengths: Option<&Path>) -> anyhow::Result<()> {
    let m = Manifest::load(manifest)?;
    let mut plan = data::Plan::new(&m)?;
    plan.show_drops = show_drops;
    if locked {
        let want = Lock::read(&lock_path(&m))?;
        let changes = plan.lock.diff(&want);
        if !changes.is_empty() {
            bail!(
                "the inputs differ from {}:\n  {}\n(run `lorahost check` without --locked to accept them and rewrite the lock)",
                lock_path(&m).display(),
                changes.join("\n  ")
            );
        }
    }
    let prepared = data::prepare_plan(&plan)?;
    let overlaps = decontamination(&plan, &prepared.stream)?;
    if locked {
        let want = Lock::read(&lock_path(&m))?;
        if want.token_stream.is_some() && want.token_stream != prepared.lock.token_stream {
            bail!(
                "the inputs match the lock, but the token stream does not (sha256 {} vs locked {}): a lorahost \
                 version with a different pipeline made the lock",
                prepared.lock.token_stream.as_deref().unwrap_or("-"),
                want.token_stream.as_deref().unwrap_or("-")
            );
        }
    } else {
        // The run folder's lock file keeps a running `lorahost run` from having its lock rewritten.
        let _held = lorahost::run_folder::RunLock::acquire(&m.run.output, "check")?;
        prepared.lock.write(&lock_path(&m))?;
    }
    if let Some(path) = lengths {
        let train = &prepared.stream.lengths[..prepared.stream.n_train];
        let text: String = train.iter().map(|l| format!("{l}\n")).collect();
        lorahost::fsutil::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("lengths  {} training records written to {}", train.len(), path.display());
    }
    if json {
        let mut v = serde_json::to_value(&prepared.report)?;
        if let (Some(o), Some(list)) = (v.as_object_mut(), &overlaps) {
            o.insert("decontamination".into(), serde_json::to_value(list)?);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", prepared.report);
        if let Some(list) = &overlaps {
            print!("{}", lorahost::eval::decontam::text(list, 10));
        }
        if locked {
            println!("lock     matches {}", lock_path(&m).display());
        } else {
            println!("lock     written to {}", lock_path(&m).display());
        }
    }
    Ok(())
}

/// With `[eval] tasks` in the manifest: which of their records share a 13-gram with the training stream.
fn decontamination(plan: &data::Plan, stream: &data::TokenStream) -> anyhow::Result<Option<Vec<lorahost::eval::decontam::TaskOverlap>>> {
    use lorahost::eval::{decontam, run, task};
    let m = plan.manifest;
    if m.eval.tasks.is_empty() {
        return Ok(None);
    }
    let dirs = task::search_dirs(m);
    let mut tasks = Vec::new();
    for name in &m.eval.tasks {
        let t = lorahost::eval::Task::load(&task::find(name, &dirs).with_context(|| format!("{}: `eval.tasks`", m.file.display()))?)?;
        let records = run::read_records(&plan.set, &format!("eval.{}.source", t.name), &t.source)?;
        tasks.push((t.name, records));
    }
    let offsets = stream.offsets();
    let training = (0..stream.len()).map(|i| plan.tokenizer.decode(stream.record(&offsets, i).0));
    Ok(Some(decontam::overlaps(&tasks, training)))
}

pub fn preview(manifest: &Path, n: usize, tokens: bool) -> anyhow::Result<()> {
    let m = Manifest::load(manifest)?;
    let plan = data::Plan::new(&m)?;
    let prepared = data::prepare_plan(&plan)?;
    let tok = &plan.tokenizer;
    let color = std::io::stdout().is_terminal();
    let stream = &prepared.stream;
    let offsets = stream.offsets();
    let names: Vec<&str> = m.datasets.iter().map(|d| d.name.as_str()).collect();
    if !color && !tokens {
        println!("(trained tokens are shown [[like this]])");
    }
    for i in 0..n.min(stream.len()) {
        let (ids, mask) = stream.record(&offsets, i);
        let trained = mask.iter().filter(|&&t| t == 1).count();
        println!("=== record {i} of {} (dataset {}, {} tokens, {trained} trained) ===", stream.len(), names[stream.dataset[i] as usize], ids.len());
        if tokens {
            for (id, t) in ids.iter().zip(mask) {
                println!("{id:>7} {} {:?}", if *t == 1 { "T" } else { "." }, tok.decode(&[*id]));
            }
            continue;
        }
        // Decode runs of equal mask together so multi-byte characters split across tokens print whole.
        let mut start = 0;
        while start < ids.len() {
            let end = (start..ids.len()).find(|&j| mask[j] != mask[start]).unwrap_or(ids.len());
            let text = tok.decode(&ids[start..end]);
            match (mask[start] == 1, color) {
                (true, true) => print!("\x1b[32m{text}\x1b[0m"),
                (true, false) => print!("[[{text}]]"),
                (false, _) => print!("{text}"),
            }
            start = end;
        }
        println!();
    }
    let pad = tok.special_id("<|endoftext|>").unwrap_or(0);
    if stream.n_train > 0 {
        let first = lorahost::train::batches::Schedule::of(&m, stream.n_train, pad).step(stream, &offsets, 0);
        let shapes: Vec<String> = first.passes.iter().map(|b| format!("{} x {}", b.rows, b.seq)).collect();
        let trained: usize = first.passes.iter().map(|b| b.trained).sum();
        println!(
            "=== first step (packing = \"{}\"): passes {}; {} record tokens, {trained} trained ===",
            m.packing().name(),
            shapes.join(", "),
            first.tokens()
        );
    }
    Ok(())
}

pub fn tokenize(tokenizer: &Path, text: Option<String>, pieces: bool) -> anyhow::Result<()> {
    let tok = lorahost::tokenizer::load(tokenizer)?;
    let text = match text {
        Some(t) => t,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading standard input")?;
            s
        }
    };
    let mut ids = Vec::new();
    tok.encode_ordinary(&text, &mut ids);
    if pieces {
        for id in &ids {
            println!("{id:>7} {:?}", tok.decode(&[*id]));
        }
    } else {
        println!("{ids:?}");
    }
    eprintln!("{} tokens", ids.len());
    Ok(())
}

/// The quickstart manifest of the source tree this binary was built from.
fn quickstart() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.toml")
}

/// `lorahost run`'s options.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The run manifest (default: examples/quickstart.toml of this source tree).
    pub manifest: Option<std::path::PathBuf>,
    /// Ignore (and remove) existing checkpoints and start over.
    #[arg(long)]
    pub fresh: bool,
    /// Stop with a checkpoint after this many optimizer steps, as if interrupted.
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// Accept plugins whose files changed since the run's lock (run.lock), and rewrite it.
    #[arg(long)]
    pub relock: bool,
    /// Data-parallel over N GPUs of this host: one process per GPU (`cuda:0` .. `cuda:N-1`), gradients summed
    /// over NCCL; the same run as on one GPU (docs/multi-gpu.md). Needs a CUDA manifest and build.
    #[arg(long, value_name = "N", conflicts_with_all = ["ranks", "procs"])]
    pub gpus: Option<usize>,
    /// Data-parallel over N processes on the CPU, gradients summed over TCP: how the `--gpus` machinery is
    /// tested without GPUs (a CPU manifest).
    #[arg(long, value_name = "N", conflicts_with = "ranks")]
    pub procs: Option<usize>,
    /// Data-parallel over N threads of this process (CPU manifests): the same run split N ways, for tests.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub ranks: usize,
    /// Seconds a rank waits for the others in one collective call before naming the missing ones (default
    /// 1800: rank 0 alone prepares the data and writes checkpoints meanwhile).
    #[arg(long, value_name = "SECONDS")]
    pub rank_timeout: Option<u64>,
    /// Testing: rank R fails with an error at 0-based step S (`R:S`).
    #[arg(long, hide = true, value_name = "R:S")]
    pub fail_at: Option<String>,
}

impl RunArgs {
    /// The command line of one rank started by `--gpus`/`--procs`: this one without the spawning flag.
    fn rank_args(&self, manifest: &Path) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["run".into(), manifest.into()];
        let flag = |a: &mut Vec<std::ffi::OsString>, on: bool, f: &str| on.then(|| a.push(f.into()));
        flag(&mut a, self.fresh, "--fresh");
        flag(&mut a, self.relock, "--relock");
        for (f, v) in [("--stop-after", self.stop_after), ("--rank-timeout", self.rank_timeout)] {
            if let Some(v) = v {
                a.extend([f.into(), v.to_string().into()]);
            }
        }
        if let Some(v) = &self.fail_at {
            a.extend(["--fail-at".into(), v.into()]);
        }
        a
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let launched = lorahost::train::launch::LaunchEnv::from_env()?;
    let processes = args.gpus.or(args.procs);
    if let Some(env) = &launched {
        if args.ranks > 1 || processes.is_some() {
            bail!("--ranks/--gpus/--procs under a launcher (WORLD_SIZE={}): give one or the other", env.world_size);
        }
    }
    if args.ranks == 0 || processes == Some(0) {
        bail!("0 ranks: a run needs at least one");
    }
    let manifest = args.manifest.clone().unwrap_or_else(|| {
        let q = quickstart();
        eprintln!("no manifest given: running the quickstart, {}", q.display());
        q
    });
    let m = Manifest::load(&manifest)?;
    if let Some(n) = processes {
        let on_gpu = m.model.device != "cpu";
        match (args.gpus.is_some(), on_gpu) {
            (true, false) => bail!("{}: --gpus needs `model.device = \"cuda:0\"`; for processes on the CPU use --procs", manifest.display()),
            (false, true) => bail!("{}: --procs runs CPU manifests; for the GPUs use --gpus", manifest.display()),
            _ => {}
        }
        // The ranks see Ctrl-C themselves (the terminal sends it to all) and stop together with a checkpoint.
        let _ = ctrlc::set_handler(|| {});
        return lorahost::train::launch::spawn_ranks(n, &args.rank_args(&manifest));
    }
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupt.clone();
    // The first Ctrl-C asks for a checkpoint at the end of the current step; a second one kills.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step, with a checkpoint (Ctrl-C again to kill)");
    });
    let fail_at = match &args.fail_at {
        Some(v) => Some(
            v.split_once(':')
                .and_then(|(r, s)| Some((r.parse().ok()?, s.parse().ok()?)))
                .with_context(|| format!("--fail-at {v}: expected RANK:STEP"))?,
        ),
        None => None,
    };
    let opts = lorahost::train::run::RunOptions {
        fresh: args.fresh,
        stop_after: args.stop_after,
        progress: std::io::stderr().is_terminal(),
        interrupt: Some(interrupt),
        relock: args.relock,
        ranks: args.ranks,
        rank_timeout: args.rank_timeout.map(std::time::Duration::from_secs),
        fail_at,
    };
    let summary = match &launched {
        Some(env) => lorahost::train::run::run_process(&m, &opts, env)?,
        None => Some(lorahost::train::run::run(&m, &opts)?),
    };
    if let Some(s) = summary {
        println!("{}", lorahost::train::run::summary_text(&s));
    }
    Ok(())
}

/// The manifest's model with the chosen adapter (None for the base model).
fn model_and_adapter(
    m: &Manifest,
    adapter: Option<std::path::PathBuf>,
    base: bool,
) -> anyhow::Result<(lorahost::model::transformer::Model, Option<lorahost::model::lora::Lora>)> {
    let device = lorahost::train::run::device_of(m)?;
    let model = lorahost::train::run::load_model(m, &device)?;
    if base {
        return Ok((model, None));
    }
    let dir = adapter.unwrap_or_else(|| m.run.output.join("adapter"));
    let lora = lorahost::model::lora::Lora::load(&dir, &model.config, &device)
        .with_context(|| format!("loading the adapter {} (train first, or pass --base or --adapter)", dir.display()))?;
    Ok((model, Some(lora)))
}

pub fn generate(
    manifest: &Path,
    prompt: &str,
    adapter: Option<std::path::PathBuf>,
    base: bool,
    max_new: usize,
    temperature: Option<f64>,
    seed: u64,
) -> anyhow::Result<()> {
    use lorahost::model::transformer::{GenerateOptions, Sampling};
    use lorahost::plugins::{Example, Turn};
    let m = Manifest::load(manifest)?;
    let plan = data::Plan::new(&m)?;
    let mut template = plan.template()?;
    // Render the conversation with an empty answer and keep what comes before the first trained segment:
    // exactly the prompt the model saw in training.
    let example = Example {
        id: "prompt".into(),
        dataset: "generate".into(),
        turns: vec![Turn { role: "user".into(), content: prompt.into() }, Turn { role: "assistant".into(), content: String::new() }],
        meta: vec![],
    };
    let rendered = template.render_batch(std::slice::from_ref(&example))?.remove(0).map_err(anyhow::Error::msg)?;
    let prefix: Vec<_> = rendered.into_iter().take_while(|s| !s.trained).collect();
    let tok = &plan.tokenizer;
    let ids: Vec<u32> = data::encode::tokenize_segments(tok.as_ref(), &prefix)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .flat_map(|(ids, _)| ids)
        .collect();
    let eos = template.info().eos.clone();
    let stop_token = tok.special_id(&eos);
    let (model, lora) = model_and_adapter(&m, adapter, base)?;
    let sampling = match temperature {
        Some(t) => Sampling::Temperature { temperature: t, seed },
        None => Sampling::Greedy,
    };
    let out = model.generate(&ids, lora.as_ref(), &GenerateOptions { max_new, stop_token, sampling })?;
    let text_ids: Vec<u32> = out.iter().copied().filter(|&i| Some(i) != stop_token).collect();
    println!("{}", tok.decode(&text_ids));
    Ok(())
}

pub fn merge(manifest: &Path, out: &Path, adapter: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let m = Manifest::load(manifest)?;
    // Only the config and the adapter are loaded: the weights are read one shard at a time by the merge.
    lorahost::train::run::ensure_tiny(&m)?;
    let config = lorahost::model::weights::ModelFiles::open(&m.model.path)?.config;
    let dir = adapter.unwrap_or_else(|| m.run.output.join("adapter"));
    let lora = lorahost::model::lora::Lora::load(&dir, &config, &candle_core::Device::Cpu)
        .with_context(|| format!("loading the adapter {} (train first, or pass --adapter)", dir.display()))?;
    lorahost::model::lora::merge_with_progress(&m.model.path, &lora, out, |i, n, file| {
        eprintln!("merge: {}/{n} {}", i + 1, file.file_name().unwrap_or_default().to_string_lossy());
    })?;
    println!("merged model written to {}", out.display());
    Ok(())
}

/// `lorahost logits`: the model's logits for the first `max_tokens` tokens of a text file.
pub fn logits(
    model_dir: &Path,
    text: &Path,
    out: &Path,
    adapter: Option<&Path>,
    max_tokens: usize,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> anyhow::Result<()> {
    use candle_core::{DType, Tensor};
    let tok = lorahost::tokenizer::load(model_dir)?;
    let text = std::fs::read_to_string(text).with_context(|| format!("cannot read {}", text.display()))?;
    let mut ids = Vec::new();
    tok.encode_ordinary(&text, &mut ids);
    ids.truncate(max_tokens);
    if ids.is_empty() {
        anyhow::bail!("the text has no tokens");
    }
    let model = lorahost::model::Model::load(model_dir, dtype, device)?;
    let lora = match adapter {
        Some(dir) => Some(lorahost::model::Lora::load(dir, &model.config, device)?),
        None => None,
    };
    let input = Tensor::from_slice(&ids, (1, ids.len()), device)?;
    let logits = model.forward(&input, lora.as_ref())?.squeeze(0)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    let ids_t = Tensor::from_vec(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), ids.len(), &candle_core::Device::Cpu)?;
    let bytes = safetensors::serialize([("ids", &ids_t), ("logits", &logits)], None)?;
    lorahost::fsutil::write_atomic(out, &bytes)?;
    println!("{} tokens, logits {:?} written to {}", ids.len(), logits.dims(), out.display());
    Ok(())
}

/// Where `lorahost eval` writes: `--out`, else the run folder's `eval/` (`eval-base/` for `--base`).
fn eval_dir(m: &Manifest, out: Option<std::path::PathBuf>, base: bool) -> std::path::PathBuf {
    out.unwrap_or_else(|| m.run.output.join(if base { "eval-base" } else { "eval" }))
}

pub struct EvalArgs {
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub adapter: Option<std::path::PathBuf>,
    pub base: bool,
    pub out: Option<std::path::PathBuf>,
    pub batch_tokens: usize,
    pub batch: usize,
}

pub fn eval(manifest: &Path, a: EvalArgs) -> anyhow::Result<()> {
    use lorahost::eval::{run, task, ModelLm, Task};
    let m = Manifest::load(manifest)?;
    let names = if a.tasks.is_empty() { m.eval.tasks.clone() } else { a.tasks };
    if names.is_empty() {
        bail!("no tasks to run: pass --tasks mmlu,gsm8k, or list them under [eval] tasks in {}", m.file.display());
    }
    let dirs = task::search_dirs(&m);
    let tasks: Vec<Task> = names.iter().map(|n| Task::load(&task::find(n, &dirs)?)).collect::<anyhow::Result<_>>()?;
    let set = data::plugins::PluginSet::new(&m)?;
    let tok = data::load_tokenizer(&m)?;
    let adapter_dir = (!a.base).then(|| a.adapter.clone().unwrap_or_else(|| m.run.output.join("adapter")));
    let (model, lora) = model_and_adapter(&m, a.adapter, a.base)?;
    let lm = ModelLm { model: &model, lora: lora.as_ref(), batch_tokens: a.batch_tokens, pad: tok.special_id("<|endoftext|>").unwrap_or(0) };
    let opts = run::Options {
        limit: a.limit,
        progress: std::io::stderr().is_terminal(),
        model: m.model.path.display().to_string(),
        adapter: adapter_dir.map(|d| d.display().to_string()),
        batch: a.batch,
    };
    let out = eval_dir(&m, a.out, a.base);
    let mut results = Vec::new();
    for t in &tasks {
        let r = run::run_task(&set, t, &lm, tok.as_ref(), &opts)?;
        let path = r.write(&out)?;
        eprintln!("{}: {} records, written to {}", t.name, r.records.len(), path.display());
        results.push(r);
    }
    print!("{}", run::table(&results));
    Ok(())
}

pub fn eval_compare(runs: &[std::path::PathBuf]) -> anyhow::Result<()> {
    use lorahost::eval::compare;
    if runs.len() < 2 {
        bail!("compare needs at least two run folders, e.g. `lorahost eval compare runs/a runs/b`");
    }
    let loaded: Vec<_> = runs.iter().map(|r| compare::load_run(r)).collect::<anyhow::Result<_>>()?;
    let names: Vec<String> = runs.iter().map(|r| r.display().to_string()).collect();
    print!("{}", compare::table(&names, &compare::compare(&loaded)));
    Ok(())
}

pub fn serve(manifest: &Path, host: &str, port: u16, adapter: Option<std::path::PathBuf>, base: bool) -> anyhow::Result<()> {
    use lorahost::serve::{api, http, serve};
    let m = Manifest::load(manifest)?;
    let tok = data::load_tokenizer(&m)?;
    let (model, lora) = model_and_adapter(&m, adapter, base)?;
    let lm = lorahost::eval::ModelLm { model: &model, lora: lora.as_ref(), batch_tokens: lorahost::eval::lm::BATCH_TOKENS, pad: tok.special_id("<|endoftext|>").unwrap_or(0) };
    let api = api::Api {
        lm: &lm,
        tok: tok.as_ref(),
        model_name: m.run.name.clone(),
        limits: api::ApiLimits::default(),
        busy: std::sync::Mutex::new(()),
    };
    let listener = std::net::TcpListener::bind((host, port)).with_context(|| format!("cannot listen on {host}:{port}"))?;
    eprintln!("serving {} on http://{} (POST /v1/completions, /process, /tokenize, /decode)", m.run.name, listener.local_addr()?);
    serve(&listener, &api, &http::Limits::default(), &std::sync::atomic::AtomicBool::new(false));
    Ok(())
}
