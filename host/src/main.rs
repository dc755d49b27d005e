//! The `lorahost` command line: a thin layer over the library.
use anyhow::Context;
use clap::{Parser, Subcommand};
use lorahost::plugins::{inspect, scaffold, standard, PluginEngine, PluginKind};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "lorahost", version, about = "LoRA fine-tuning on one GPU with sandboxed WebAssembly data plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugins: scaffold, inspect, list the standard ones.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Measure speed; prints a table and writes JSON with --json.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Write a new plugin crate that builds as it is: `lorahost plugin new filter my-filter`.
    New {
        /// source, filter, template or scheduler
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
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_kind(s: &str) -> anyhow::Result<PluginKind> {
    PluginKind::parse(s).with_context(|| format!("unknown plugin kind `{s}`: use source, filter, template or scheduler"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
        Command::Bench { command } => match command {
            BenchCommand::Plugins { record_bytes, seconds, json } => {
                let report = lorahost::bench::plugins::run(record_bytes, Duration::from_secs_f64(seconds))?;
                print!("{report}");
                if let Some(path) = json {
                    lorahost::fsutil::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
                }
            }
        },
    }
    Ok(())
}
