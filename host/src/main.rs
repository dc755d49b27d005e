//! The `lorahost` command line: a thin layer over the library.
use anyhow::Context;
use clap::{Parser, Subcommand};
use lorahost::plugins::{inspect, scaffold, standard, PluginEngine, PluginKind};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod commands;

#[derive(Parser)]
#[command(name = "lorahost", version, about = "LoRA fine-tuning on one GPU with sandboxed WebAssembly data plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter as the manifest says (default: the quickstart). Resumes from the last
    /// checkpoint of the run folder; Ctrl-C stops with a checkpoint.
    Run(commands::RunArgs),
    /// Generate a reply with the manifest's model, template and (by default) the run's adapter.
    Generate {
        manifest: PathBuf,
        prompt: String,
        /// Adapter folder (default: the run folder's `adapter/`).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Use the base model without any adapter.
        #[arg(long)]
        base: bool,
        #[arg(long, default_value_t = 128)]
        max_new: usize,
        /// Sample at this temperature (seeded) instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write the base model with the adapter folded into its weights, in the same layout.
    Merge {
        manifest: PathBuf,
        /// Output folder for the merged model.
        #[arg(long)]
        out: PathBuf,
        /// Adapter folder (default: the run folder's `adapter/`).
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Validate a manifest and its data without a GPU or model weights: per-dataset counts, filter drops
    /// with reasons, the mix, token lengths, steps per epoch. Writes the run's lock.
    Check {
        manifest: PathBuf,
        /// Fail, naming what changed, when the inputs differ from the run's lock (and write nothing).
        #[arg(long)]
        locked: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Show the first N dropped records of each filter's drop reasons (id and each turn's first line).
        /// Reads and filters the data again, past the token cache.
        #[arg(long, value_name = "N", default_value_t = 0)]
        show_drops: usize,
        /// Also write the token length of each training record, one per line, in the first epoch's order
        /// (for scripts/realdata-baselines.py to replay the same lengths).
        #[arg(long, value_name = "FILE")]
        lengths: Option<PathBuf>,
    },
    /// Show rendered training examples, marking which tokens are trained.
    Preview {
        manifest: PathBuf,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 3)]
        n: usize,
        /// One line per token: id, text, trained.
        #[arg(long)]
        tokens: bool,
    },
    /// Print the token ids of a text (from the argument, or standard input).
    Tokenize {
        /// A tokenizer file (qwen.tiktoken, tokenizer.json) or a model folder.
        #[arg(long)]
        tokenizer: PathBuf,
        text: Option<String>,
        /// Also show each token's text.
        #[arg(long)]
        pieces: bool,
    },
    /// Write a model's logits for a text file to a safetensors file (ids [T] and logits [T, vocab], f32), to
    /// compare with another implementation (scripts/hf-check.py compares them with HF transformers).
    Logits {
        /// A model folder (config.json, safetensors, tokenizer).
        model: PathBuf,
        /// The text to score.
        #[arg(long)]
        text: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A PEFT adapter folder to apply (unmerged).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// At most this many tokens from the start of the text.
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Score the model (the run's adapter by default) on evaluation tasks; writes `<run>/eval/<task>.json`.
    /// `lorahost eval compare runs/a runs/b` puts runs side by side.
    Eval(EvalCli),
    /// Serve the model over HTTP: OpenAI-style /v1/completions (echo, logprobs) and the 2023 challenge's
    /// /process, /tokenize, /decode.
    Serve {
        manifest: PathBuf,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The address to listen on; the default answers this machine only.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Adapter folder (default: the run folder's `adapter/`).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Serve the base model without any adapter.
        #[arg(long)]
        base: bool,
    },
    /// Work with plugins: scaffold, inspect, list the standard ones.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Convert a model from another format into a Hugging Face folder lorahost (and transformers) can load.
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Measure speed; prints a table and writes JSON with --json.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct EvalCli {
    #[command(subcommand)]
    command: Option<EvalCommand>,
    /// The run manifest.
    #[arg(required = true)]
    manifest: Option<PathBuf>,
    /// Task names or task files, comma-separated (default: the manifest's `[eval] tasks`). A name is looked up
    /// as <name>.toml in `[eval] dir`, the manifest's eval/ folder, then the shipped examples/eval/.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Score only the first N records of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Adapter folder (default: the run folder's `adapter/`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Score the base model without any adapter (results go to `<run>/eval-base/`).
    #[arg(long)]
    base: bool,
    /// The folder for the results (default: `<run>/eval/`, or `<run>/eval-base/` with --base).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rows x tokens per batched forward of the log-likelihood tasks (bounds activations, the prompt caches'
    /// copies and the logits: x vocabulary x 4 bytes).
    #[arg(long, default_value_t = lorahost::eval::lm::BATCH_TOKENS)]
    batch_tokens: usize,
    /// Prompts generated together by the `generate` tasks (rows of one batched decode).
    #[arg(long, default_value_t = lorahost::eval::run::GENERATE_BATCH)]
    batch: usize,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Side-by-side table of runs' results, each later run's difference to the first and whether it is larger
    /// than its standard error (paired bootstrap).
    Compare {
        /// Run folders (their eval/ is read) or results folders.
        #[arg(num_args = 2.., required = true)]
        runs: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Write a new plugin crate that builds as it is: `lorahost plugin new filter my-filter`.
    New {
        /// source, filter, template, scheduler or scorer
        kind: String,
        name: String,
        /// Folder to create the crate in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the lorahost-sdk crate (default: the one in the source tree lorahost was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Print a plugin's kind, contract version, sha256 and imports.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the standard plugins built into this binary.
    List,
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A llama.cpp GGUF file (llama, qwen2, qwen3; F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K) to
    /// config.json, safetensors, tokenizer.json and tokenizer_config.json in a new folder.
    Gguf {
        file: PathBuf,
        /// The folder to create (it must not exist, or be empty).
        out: PathBuf,
        /// bf16 or f32
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The model a bench makes: random weights at a named shape, on a device, in a dtype.
#[derive(clap::Args)]
struct ShapeArgs {
    /// qwen-14b, qwen-7b, qwen-1.8b, qwen2.5-14b, qwen2.5-7b, qwen2.5-0.5b, qwen3-14b, qwen3-8b, llama-3-8b or tiny
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// The training step `bench train` and `bench ops` measure.
#[derive(clap::Args)]
struct StepArgs {
    #[command(flatten)]
    model: ShapeArgs,
    #[arg(long, default_value_t = 2)]
    micro_batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long)]
    recompute: bool,
    /// Fused GPU kernels: all, none, or no-<lever> (all but that one: no-flash is the scores-in-memory attention; the levers are those of `bench train --levers`).
    /// They apply to bf16 on a GPU only.
    #[arg(long, default_value = "all")]
    fusion: String,
}

impl StepArgs {
    fn options(self, warmup: usize, steps: usize, data: DataArgs, lr: f64) -> anyhow::Result<lorahost::bench::train::Options> {
        Ok(lorahost::bench::train::Options {
            device: parse_device(&self.model.device)?,
            dtype: parse_dtype(&self.model.dtype)?,
            fusion: parse_fusion(&self.fusion)?,
            shape: self.model.shape,
            micro_batch: self.micro_batch,
            seq: self.seq,
            recompute: self.recompute,
            warmup,
            steps,
            packing: data.packing.as_deref().map(parse_packing).transpose()?,
            manifest: data.manifest,
            lr,
        })
    }
}

/// What `bench train` trains on.
#[derive(clap::Args, Default)]
struct DataArgs {
    /// Train on this manifest's token stream with its [train] schedule (micro_batch, grad_accum, packing),
    /// as `lorahost run` does, instead of random tokens (shows the loss falling).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// none or padding-free: overrides the manifest's `packing` (random records are packed too).
    #[arg(long)]
    packing: Option<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Records per second through filter plugins at batch 1, 64, 1024, beside native code.
    Plugins {
        /// Size of each record in bytes.
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Records per second through the text filters (minhash-dedup, quality, language) on the sample data
    /// sets' records scaled up with edited copies; `scripts/filter-baselines.py` runs datasketch and lingua on
    /// the records `--export` writes.
    Filters {
        /// The samples folder (tests/fixtures/samples or ../shared/data/samples).
        #[arg(long, default_value = "tests/fixtures/samples")]
        samples: PathBuf,
        /// Records to make from them.
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        /// Write the records, with the language plugin's label of each, as JSON Lines here.
        #[arg(long)]
        export: Option<PathBuf>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Training steps at a model shape with random weights made on the device (no checkpoint needed).
    Train {
        #[command(flatten)]
        step: StepArgs,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Measure each fused kernel's gain: the same steps with none, then adding one lever at a time.
        #[arg(long)]
        levers: bool,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        #[arg(long)]
        json: Option<PathBuf>,
        /// Data-parallel over N GPUs (one process each, NCCL): on random tokens `micro_batch` records per GPU
        /// per step (a manifest's steps are split as `run` splits them); the report's tokens/s are the whole
        /// step's, for the scaling efficiency against `--gpus 1`.
        #[arg(long, value_name = "N", conflicts_with = "levers")]
        gpus: Option<usize>,
    },
    /// Evaluation throughput at a model shape with random weights, through the code `lorahost eval` runs:
    /// log-likelihood tokens/s over MMLU-like records (their choices sharing the prompt) and generated
    /// tokens/s of batched greedy decoding. Prints one JSON line.
    Eval {
        #[command(flatten)]
        model: ShapeArgs,
        /// Records scored by log-likelihood.
        #[arg(long, default_value_t = 64)]
        records: usize,
        /// Choices per record (1 to 3 tokens each).
        #[arg(long, default_value_t = 4)]
        choices: usize,
        /// The longest prompt (records' prompts run from about 3/4 of it up to it).
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// As `lorahost eval --batch-tokens`.
        #[arg(long, default_value_t = lorahost::eval::lm::BATCH_TOKENS)]
        batch_tokens: usize,
        /// Prompts decoded together.
        #[arg(long, default_value_t = lorahost::eval::run::GENERATE_BATCH)]
        batch: usize,
        /// Tokens generated per prompt (greedy, no stop).
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Where a training step's time goes: each op of one layer at the shape, timed alone, times its calls per
    /// step; plus the loss and the optimizer step.
    Ops {
        #[command(flatten)]
        step: StepArgs,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The GPU's fused bf16 training step against the CPU's f32 one: each kernel, then a small model's loss
    /// and adapter gradients. Exits non-zero when an error is over its tolerance.
    Numerics {
        /// cuda:N
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write a checkpoint at a named shape (~2 GB shards) and a rank-8 adapter for it under DIR/model and
    /// DIR/adapter, never holding the model in memory: to measure `lorahost merge` at real sizes.
    WriteModel {
        #[arg(long)]
        shape: String,
        #[arg(long)]
        dir: PathBuf,
        /// bf16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// Tokens per second through the whole data pipeline on generated alpaca records, and a cache hit.
    Pipeline {
        /// The JSONL file to read; generated first when it does not exist.
        #[arg(long)]
        data: PathBuf,
        /// Records to generate.
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        /// A tokenizer file or folder.
        #[arg(long, default_value = "tests/fixtures/tokenizer/qwen.tiktoken")]
        tokenizer: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("CUDA_ERROR_OUT_OF_MEMORY") {
                // candle's error carries a backtrace; the useful part is what to change.
                eprintln!(
                    "error: out of GPU memory. Set `train.recompute = true` (bench: --recompute), or lower \
                     `train.micro_batch` / `train.max_seq_len`."
                );
            } else {
                eprintln!("error: {text}");
            }
            ExitCode::FAILURE
        }
    }
}

fn write_json(path: Option<PathBuf>, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        // A regular file is replaced atomically; anything else (/dev/stdout, a pipe) is written to as it is,
        // never renamed over.
        match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => std::fs::write(&path, text)?,
            _ => lorahost::fsutil::write_atomic(&path, text.as_bytes())?,
        }
    }
    Ok(())
}

/// `args` without `flag` and its value (`--flag V` or `--flag=V`).
fn without_flag(args: Vec<std::ffi::OsString>, flag: &str) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some(s) if s == flag => drop(it.next()),
            Some(s) if s.starts_with(&format!("{flag}=")) => {}
            _ => out.push(a),
        }
    }
    out
}

fn parse_kind(s: &str) -> anyhow::Result<PluginKind> {
    PluginKind::parse(s).with_context(|| format!("unknown plugin kind `{s}`: use source, filter, template, scheduler or scorer"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => commands::run(args)?,
        Command::Generate { manifest, prompt, adapter, base, max_new, temperature, seed } => {
            commands::generate(&manifest, &prompt, adapter, base, max_new, temperature, seed)?
        }
        Command::Merge { manifest, out, adapter } => commands::merge(&manifest, &out, adapter)?,
        Command::Check { manifest, locked, json, show_drops, lengths } => commands::check(&manifest, locked, json, show_drops, lengths.as_deref())?,
        Command::Preview { manifest, n, tokens } => commands::preview(&manifest, n, tokens)?,
        Command::Tokenize { tokenizer, text, pieces } => commands::tokenize(&tokenizer, text, pieces)?,
        Command::Logits { model, text, out, adapter, max_tokens, device, dtype } => {
            commands::logits(&model, &text, &out, adapter.as_deref(), max_tokens, &parse_device(&device)?, parse_dtype(&dtype)?)?
        }
        Command::Eval(e) => match (e.command, e.manifest) {
            (Some(EvalCommand::Compare { runs }), _) => commands::eval_compare(&runs)?,
            (None, Some(manifest)) => commands::eval(
                &manifest,
                commands::EvalArgs {
                    tasks: e.tasks,
                    limit: e.limit,
                    adapter: e.adapter,
                    base: e.base,
                    out: e.out,
                    batch_tokens: e.batch_tokens,
                    batch: e.batch,
                },
            )?,
            (None, None) => anyhow::bail!("lorahost eval: give a manifest (or `compare RUN RUN...`)"),
        },
        Command::Serve { manifest, port, host, adapter, base } => commands::serve(&manifest, &host, port, adapter, base)?,
        Command::Plugin { command } => match command {
            PluginCommand::New { kind, name, dir, sdk } => {
                let kind = parse_kind(&kind)?;
                let sdk = sdk
                    .or_else(scaffold::default_sdk_path)
                    .context("cannot find the lorahost-sdk crate: pass --sdk <path to plugins/sdk>")?;
                let root = scaffold::scaffold(kind, &name, &dir, &sdk)?;
                println!("created {} ({kind} plugin). Build it with:\n  cd {} && cargo build --release", root.display(), root.display());
            }
            PluginCommand::Inspect { file, json } => {
                let engine = PluginEngine::new(PluginEngine::default_cache_dir())?;
                let report = inspect::inspect(&engine, &file)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{report}");
                }
            }
            PluginCommand::List => {
                for kind in PluginKind::ALL {
                    println!("{kind:<10} {}", standard::names(kind).join(", "));
                }
            }
        },
        Command::Import { command: ImportCommand::Gguf { file, out, dtype, json } } => {
            let opts = lorahost::import::Options { dtype: lorahost::import::safetensors_out::OutDtype::parse(&dtype).context("--dtype")?, ..Default::default() };
            let start = std::time::Instant::now();
            let report = lorahost::import::import_gguf(&file, &out, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let types: Vec<String> = report.types.iter().map(|(t, n)| format!("{t} x{n}")).collect();
                println!(
                    "imported {} ({}, GGUF v{}): {} tensors, {} parameters ({}) in {:.1} s{}",
                    file.display(),
                    report.architecture,
                    report.gguf_version,
                    report.tensors,
                    report.parameters,
                    types.join(", "),
                    start.elapsed().as_secs_f64(),
                    if report.tied_embeddings { ", tied embeddings" } else { "" }
                );
                println!("wrote {}: {}", out.display(), report.files.join(", "));
                for note in &report.notes {
                    println!("note: {note}");
                }
            }
        }
        Command::Bench { command } => match command {
            BenchCommand::Plugins { record_bytes, seconds, json } => {
                let report = lorahost::bench::plugins::run(record_bytes, Duration::from_secs_f64(seconds))?;
                print!("{report}");
                write_json(json, &report)?;
            }
            BenchCommand::Filters { samples, records, export, json } => {
                let report = lorahost::bench::filters::run(&samples, records, export.as_deref())?;
                print!("{report}");
                write_json(json, &report)?;
            }
            BenchCommand::Train { step, warmup, steps, levers, data, lr, json, gpus } => {
                let o = step.options(warmup, steps, data, lr)?;
                let launched = lorahost::train::launch::LaunchEnv::from_env()?;
                if let Some(n) = gpus.filter(|_| launched.is_none()) {
                    // This command line again, once per GPU, without `--gpus` (the ranks see the launcher's env).
                    let args = without_flag(std::env::args_os().skip(1).collect(), "--gpus");
                    return lorahost::train::launch::spawn_ranks(n, &args);
                }
                if let Some(env) = launched {
                    if let Some(report) = lorahost::bench::train::run_process(&o, &env)? {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                        write_json(json, &report)?;
                    }
                } else if levers {
                    let rows = lorahost::bench::train::run_levers(&o)?;
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                    write_json(json, &rows)?;
                } else {
                    let report = lorahost::bench::train::run(&o)?;
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    write_json(json, &report)?;
                }
            }
            BenchCommand::Eval { model, records, choices, prompt_tokens, batch_tokens, batch, new_tokens, json } => {
                let o = lorahost::bench::eval::Options {
                    device: parse_device(&model.device)?,
                    dtype: parse_dtype(&model.dtype)?,
                    shape: model.shape,
                    records,
                    choices,
                    prompt_tokens,
                    batch_tokens,
                    batch,
                    new_tokens,
                };
                let report = lorahost::bench::eval::run(&o)?;
                println!("{}", serde_json::to_string(&report)?);
                write_json(json, &report)?;
            }
            BenchCommand::Ops { step, json } => {
                let o = step.options(0, 0, DataArgs::default(), 0.0)?;
                let report = lorahost::bench::ops::run(&o)?;
                for r in &report.ops {
                    println!("{:>9.3} ms x {:>3} = {:>8.2} ms  {}", r.ms, r.calls_per_step, r.step_ms, r.op);
                }
                println!("predicted step: {:.1} ms", report.predicted_step_ms);
                write_json(json, &report)?;
            }
            BenchCommand::Numerics { device, json } => {
                let report = lorahost::bench::numerics::run(&parse_device(&device)?)?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                write_json(json, &report)?;
                if !report.ok {
                    anyhow::bail!("numerics: an error is over its tolerance (see \"ok\": false above)");
                }
            }
            BenchCommand::WriteModel { shape, dir, dtype } => lorahost::bench::merge::write_model(&shape, &dir, parse_dtype(&dtype)?)?,
            BenchCommand::Pipeline { data, records, tokenizer, json } => {
                if !data.exists() {
                    lorahost::bench::pipeline::generate(records, &data, 7)?;
                }
                let report = lorahost::bench::pipeline::run(&data, &tokenizer)?;
                print!("{report}");
                write_json(json, &report)?;
            }
        },
    }
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N`.
fn parse_device(d: &str) -> anyhow::Result<candle_core::Device> {
    lorahost::model::device::open(d).context("--device")
}

fn parse_dtype(d: &str) -> anyhow::Result<candle_core::DType> {
    match d {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        other => anyhow::bail!("--dtype {other}: f32 or bf16"),
    }
}

fn parse_packing(p: &str) -> anyhow::Result<lorahost::manifest::Packing> {
    match p {
        "none" => Ok(lorahost::manifest::Packing::None),
        "padding-free" => Ok(lorahost::manifest::Packing::PaddingFree),
        other => anyhow::bail!("--packing {other}: none or padding-free"),
    }
}

fn parse_fusion(f: &str) -> anyhow::Result<lorahost::model::fusion::Fusion> {
    use lorahost::model::fusion::Fusion;
    Fusion::parse(f).ok_or_else(|| {
        let levers: Vec<String> = Fusion::LEVERS.iter().map(|(n, _)| format!("no-{n}")).collect();
        anyhow::anyhow!("--fusion {f}: all, none, or one of {}", levers.join(", "))
    })
}
