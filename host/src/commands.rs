//! The data commands of the CLI: `check`, `preview`, `tokenize`. Each is a few calls into the library.
use anyhow::{bail, Context};
use lorahost::data::{self, batch, lock::Lock};
use lorahost::manifest::Manifest;
use std::io::{IsTerminal, Read};
use std::path::Path;

pub fn lock_path(m: &Manifest) -> std::path::PathBuf {
    m.run.output.join(data::lock::LOCK_FILE)
}

pub fn check(manifest: &Path, locked: bool, json: bool, show_drops: usize) -> anyhow::Result<()> {
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
    if json {
        println!("{}", serde_json::to_string_pretty(&prepared.report)?);
    } else {
        print!("{}", prepared.report);
        if locked {
            println!("lock     matches {}", lock_path(&m).display());
        } else {
            println!("lock     written to {}", lock_path(&m).display());
        }
    }
    Ok(())
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
    let batches = batch::micro_batches(stream, 0..stream.n_train.min(m.train.micro_batch), m.train.micro_batch, pad);
    if let Some(b) = batches.first() {
        println!("=== first micro-batch: {} x {} tokens, {} trained ===", b.rows, b.seq, b.trained_tokens());
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

pub fn run(manifest: Option<std::path::PathBuf>, fresh: bool, stop_after: Option<u64>, relock: bool) -> anyhow::Result<()> {
    let manifest = manifest.unwrap_or_else(|| {
        let q = quickstart();
        eprintln!("no manifest given: running the quickstart, {}", q.display());
        q
    });
    let m = Manifest::load(&manifest)?;
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupt.clone();
    // The first Ctrl-C asks for a checkpoint at the end of the current step; a second one kills.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step, with a checkpoint (Ctrl-C again to kill)");
    });
    let opts = lorahost::train::run::RunOptions {
        fresh,
        stop_after,
        progress: std::io::stderr().is_terminal(),
        interrupt: Some(interrupt),
        relock,
    };
    let summary = lorahost::train::run::run(&m, &opts)?;
    println!("{}", lorahost::train::run::summary_text(&summary));
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
    let config = lorahost::model::weights::Checkpoint::open(&m.model.path)?.config;
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
