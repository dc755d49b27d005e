//! Hardening (issue 14): bounded memory around plugins, long records, safe run folders, a lock that pins
//! everything, counts that add up; one test per finding.
mod common;

use common::{lorahost, text};
use lorahost::data::{self, read};
use lorahost::manifest::Manifest;
use lorahost::plugins::{standard, PluginKind};
use lorahost::train::run::{run, RunOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

fn write(path: &Path, text: impl AsRef<[u8]>) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}


fn tokenizer() -> String {
    common::repo_root().join("tests/fixtures/tokenizer/qwen.tiktoken").display().to_string()
}

/// A data-only manifest (no model needed for `check`) in `dir`: one dataset from `source`, with `extra`
/// appended (more keys of that [[dataset]] or further tables).
fn data_manifest(dir: &Path, source: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[run]
name = "h"
output = "out"
cache = "cache"

[model]
path = "model"
tokenizer = {tok:?}

[template]
plugin = "alpaca"

[[dataset]]
name = "d"
source = {source}
{extra}"#,
        tok = tokenizer()
    );
    write(&dir.join("m.toml"), text)
}

/// A small training run on the tiny model; `data` is the dolly sample's path as the manifest writes it.
fn train_manifest(path: &Path, data: &str, extra: &str) -> PathBuf {
    let text = common::manifest_head("small", Some(3), "out", "cache", "model")
        + &format!(
            r#"
[model.tiny]
hidden_size = 16
num_layers = 1
num_heads = 2
intermediate_size = 32

[lora]
rank = 2
alpha = 4
targets = ["c_attn"]

[train]
micro_batch = 2
max_seq_len = 32
checkpoint_every = 1
max_steps = 4
{extra}

[template]
plugin = "alpaca"

[[dataset]]
name = "dolly"
source = {{ plugin = "jsonl", path = {data:?}, fields = {{ input = "context", output = "response" }} }}
count = 8
"#
        );
    write(path, text)
}

fn dolly() -> PathBuf {
    common::repo_root().join("tests/fixtures/samples/dolly/databricks-dolly-15k.lines1-34.jsonl")
}

fn train(manifest: &Path, opts: RunOptions) -> anyhow::Result<lorahost::train::run::RunSummary> {
    run(&Manifest::load(manifest)?, &opts)
}

fn err<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// 1. A source that never ends is stopped at its dataset's budget; `memory_mb` has a ceiling.

#[test]
fn an_endless_source_is_stopped_at_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = common::hostile_wasm("endless");
    let plugins = format!("[plugins]\nendless = {{ path = {:?} }}\n", wasm.display().to_string());
    let by_records = data_manifest(dir.path(), "{ plugin = \"endless\", record_kb = 1 }", &format!("budget = {{ records = 3000 }}\n{plugins}"));
    let start = std::time::Instant::now();
    let e = err(data::prepare(&Manifest::load(&by_records).unwrap()));
    assert!(e.contains("dataset `d`") && e.contains("source `endless`") && e.contains("budget of 3000 records"), "{e}");
    // By bytes: 2 MiB of 64 KiB records stops at the 33rd, whatever the record count allows.
    let by_bytes = data_manifest(dir.path(), "{ plugin = \"endless\", record_kb = 64 }", &format!("budget = {{ mb = 2 }}\n{plugins}"));
    let e = err(data::prepare(&Manifest::load(&by_bytes).unwrap()));
    assert!(e.contains("2 MiB of text") && e.contains("budget = {"), "{e}");
    assert!(start.elapsed().as_secs() < 60, "stopping took {:?}", start.elapsed());

    // The host's ceiling on a plugin's memory.
    let huge = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"x.jsonl\", limits = { memory_mb = 100000 } }", "");
    let e = Manifest::load(&huge).unwrap_err().to_string();
    assert!(e.contains("dataset[0].source.limits.memory_mb") && e.contains("1..=4096"), "{e}");
}

#[test]
fn check_states_each_datasets_budget() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.jsonl"), "{\"instruction\": \"Say hi\", \"output\": \"Hi\"}\n");
    let m = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"a.jsonl\" }", "budget = { records = 10 }");
    let o = lorahost(&["check", m.to_str().unwrap()], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("budget 10 records, 8192 MiB"), "{}", text(&o));
}

// 2. Long records pass; one too large for a call is named.

/// Reads dataset 0 of `manifest` through its source, as the pipeline's first stage does.
fn read_only(manifest: &Path) -> anyhow::Result<read::ReadOutcome> {
    let m = Manifest::load(manifest)?;
    let set = data::plugins::PluginSet::new(&m)?;
    let key = "dataset[0].source";
    let resolved = set.resolve(PluginKind::Source, key, &m.datasets[0].source)?;
    read::read_dataset(&m.datasets[0], key, &|| set.source(&resolved))
}

fn long_records(path: &Path, sizes: &[usize]) {
    let lines: Vec<String> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| format!("{{\"instruction\": \"q{i}\", \"output\": \"{}\"}}\n", "y".repeat(n)))
        .collect();
    write(path, lines.concat());
}

#[test]
fn records_of_300_kb_and_10_mb_are_read() {
    let dir = tempfile::tempdir().unwrap();
    // 450 x 300 KB = 135 MB: over wasmtime's default copy limit (128 MiB) if asked for in one call.
    long_records(&dir.path().join("long.jsonl"), &[300_000; 450]);
    let m = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"long.jsonl\" }", "");
    let out = read_only(&m).unwrap();
    assert_eq!(out.records.len(), 450);
    assert!(out.records.iter().all(|r| r.turns[1].content.len() == 300_000));

    long_records(&dir.path().join("huge.jsonl"), &[10 << 20, 10, 10 << 20]);
    let m = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"huge.jsonl\" }", "");
    let out = read_only(&m).unwrap();
    assert_eq!(out.records.iter().map(|r| r.turns[1].content.len()).collect::<Vec<_>>(), vec![10 << 20, 10, 10 << 20]);

    // Short records, then long ones: the host asks for 512 at a time by then, and the source itself stops
    // each batch at 16 MiB, under a 32 MiB copy limit that 512 of these would break.
    let mut sizes = vec![100; 600];
    sizes.extend([1 << 20; 40]);
    long_records(&dir.path().join("mixed.jsonl"), &sizes);
    let m = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"mixed.jsonl\", limits = { reply_mb = 32 } }", "");
    assert_eq!(read_only(&m).unwrap().records.len(), 640);

    // A record over what one call may copy is named by its place.
    long_records(&dir.path().join("huge.jsonl"), &[10, 10 << 20]);
    let m = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"huge.jsonl\", limits = { reply_mb = 4 } }", "");
    let e = err(read_only(&m));
    assert!(e.contains("dataset `d`") && e.contains("record 2 ") && e.contains("4 MiB") && e.contains("reply_mb"), "{e}");
}

// 3 + 4. Run folders: one writer; what a killed run leaves is cleared; everything appears whole.

#[test]
fn a_run_killed_with_sigkill_leaves_nothing_a_normal_run_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let m = train_manifest(&dir.path().join("m.toml"), &dolly().display().to_string(), "");
    // What a kill -9 during model creation leaves: a half-written temporary beside the model folder, and
    // (from older versions) a model folder with its config but no weights.
    let stale = write(&dir.path().join(".model.tmp-2147483647/config.json"), "{}");
    write(&dir.path().join("model/config.json"), "{}");
    // A real kill -9 of a running `lorahost run`, wherever it lands.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["run", m.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("out/lorahost.pid");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&pid_file).is_ok_and(|t| t.contains(&format!("pid={}", child.id()))) && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let s = train(&m, RunOptions::default()).unwrap();
    assert_eq!(s.steps_done, 4);
    assert!(!stale.parent().unwrap().exists(), "the dead run's temporary folder is removed");
    let leftovers: Vec<String> = walk(dir.path()).into_iter().filter(|p| p.contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(dir.path().join("model/model.safetensors").exists() && dir.path().join("out/adapter/adapter_model.safetensors").exists());
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.push(e.path().display().to_string());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[test]
fn a_second_run_on_a_busy_run_folder_stops_at_once_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = train_manifest(&dir.path().join("m.toml"), &dolly().display().to_string(), "");
    train(&m, RunOptions { stop_after: Some(1), ..Default::default() }).unwrap();
    let snapshot = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = walk(d).into_iter().filter(|p| Path::new(p).is_file()).map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
        v.sort();
        v
    };
    let out = dir.path().join("out");
    let before = snapshot(&out.join("checkpoints"));
    // The first run still holds the folder (here: this process, as `lorahost run` would).
    let held = lorahost::run_folder::RunLock::acquire(&out, "run").unwrap();
    let e = err(train(&m, RunOptions::default()));
    assert!(e.contains(&format!("in use by process {}", std::process::id())) && e.contains("[run] output"), "{e}");
    let o = lorahost(&["check", m.to_str().unwrap()], dir.path());
    assert!(!o.status.success() && text(&o).contains("in use by process"), "{}", text(&o));
    assert_eq!(snapshot(&out.join("checkpoints")), before, "the refused run wrote nothing");
    drop(held);
    let s = train(&m, RunOptions::default()).unwrap();
    assert_eq!((s.resumed_from, s.steps_done), (Some(1), 4));
}

#[test]
fn a_damaged_last_checkpoint_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let m = train_manifest(&dir.path().join("m.toml"), &dolly().display().to_string(), "");
    train(&m, RunOptions { stop_after: Some(3), ..Default::default() }).unwrap();
    let weights = dir.path().join("out/checkpoints/step-00000003/adapter/adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    let s = train(&m, RunOptions::default()).unwrap();
    assert_eq!((s.resumed_from, s.steps_done), (Some(2), 4));
}

// 5. A copied checkout resumes, and its lock matches.

#[test]
fn a_copied_checkout_resumes_and_matches_its_lock() {
    let a = tempfile::tempdir().unwrap();
    let proj = a.path().join("proj");
    // The data sits outside the manifest's folder, as the quickstart's does.
    std::fs::create_dir_all(proj.join("data")).unwrap();
    std::fs::copy(dolly(), proj.join("data/dolly.jsonl")).unwrap();
    let m = train_manifest(&proj.join("examples/m.toml"), "../data/dolly.jsonl", "");
    train(&m, RunOptions { stop_after: Some(2), ..Default::default() }).unwrap();
    let lock = std::fs::read_to_string(proj.join("examples/out/run.lock")).unwrap();
    assert!(lock.contains("\"../data/dolly.jsonl\""), "{lock}");

    let b = tempfile::tempdir().unwrap();
    let copy = b.path().join("elsewhere/proj-copy");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    assert!(Command::new("cp").arg("-a").arg(&proj).arg(&copy).status().unwrap().success());
    let m2 = copy.join("examples/m.toml");
    let o = lorahost(&["check", "--locked", m2.to_str().unwrap()], &copy);
    assert!(o.status.success() && text(&o).contains("lock     matches"), "{}", text(&o));
    let s = train(&m2, RunOptions::default()).unwrap();
    assert_eq!((s.resumed_from, s.steps_done), (Some(2), 4));
}

// 6. Every plugin kind is locked, the scheduler too; `run` refuses a swapped plugin unless --relock.

#[test]
fn a_swapped_scheduler_is_caught_and_run_refuses_it_without_relock() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = |name: &str| standard::find(PluginKind::Scheduler, name).unwrap().wasm;
    let sched = write(&dir.path().join("sched.wasm"), wasm("constant"));
    let extra = "\n[scheduler]\nplugin = \"sched\"\n\n[plugins]\nsched = { path = \"sched.wasm\" }\n";
    let m = train_manifest(&dir.path().join("m.toml"), &dolly().display().to_string(), "");
    let text_m = std::fs::read_to_string(&m).unwrap() + extra;
    std::fs::write(&m, text_m).unwrap();
    train(&m, RunOptions { stop_after: Some(1), ..Default::default() }).unwrap();

    std::fs::write(&sched, wasm("linear")).unwrap();
    let o = lorahost(&["check", "--locked", m.to_str().unwrap()], dir.path());
    assert!(!o.status.success() && text(&o).contains("plugin `scheduler`"), "{}", text(&o));
    let e = err(train(&m, RunOptions::default()));
    assert!(e.contains("`scheduler`: plugin `sched` has sha256") && e.contains("--relock"), "{e}");
    // Accepted on purpose: the lock is rewritten (the checkpoint's identity then names the change).
    let e = err(train(&m, RunOptions { relock: true, ..Default::default() }));
    assert!(e.contains("the manifest changed since the checkpoint") && e.contains("scheduler"), "{e}");
    let lock = std::fs::read_to_string(dir.path().join("out/run.lock")).unwrap();
    assert!(lock.contains(&lorahost::plugins::engine::sha256_hex(wasm("linear"))), "{lock}");
}

// 7. CSV: every row is read or counted.

#[test]
fn csv_counts_add_up_past_an_unclosed_quote() {
    let dir = tempfile::tempdir().unwrap();
    let rows = "instruction,output\nq1,a1\nq2,a2\n\"q3 never closed,a3\nq4,a4\nq5,a5\nq6,a6\n";
    write(&dir.path().join("t.csv"), rows);
    let m = data_manifest(dir.path(), "{ plugin = \"csv\", path = \"t.csv\" }", "on_malformed = \"skip\"");
    let report = data::prepare(&Manifest::load(&m).unwrap()).unwrap().report;
    let d = &report.datasets[0];
    assert_eq!((d.read, d.malformed), (2, 4), "{:?}", d.malformed_examples);
    assert!(d.malformed_examples[0].contains("t.csv:4: a quote opened in this row is never closed"), "{:?}", d.malformed_examples);
}

// Weaker spots.

#[test]
fn a_template_that_renders_nothing_is_named_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.jsonl"), "{\"instruction\": \"Say hi\", \"output\": \"Hi\"}\n{\"instruction\": \"Add\", \"output\": \"2\"}\n");
    let silent = common::hostile_wasm("silent");
    let m = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"a.jsonl\" }", &format!("[plugins]\nsilent = {{ path = {:?} }}\n", silent.display().to_string()));
    let t = std::fs::read_to_string(&m).unwrap().replace("plugin = \"alpaca\"", "plugin = \"silent\"");
    std::fs::write(&m, t).unwrap();
    let e = err(data::prepare(&Manifest::load(&m).unwrap()));
    assert!(e.contains("template plugin `silent`") && e.contains("rendered 2 with no trained segment"), "{e}");
}

#[test]
fn an_eos_the_tokenizer_does_not_know_is_refused_at_check() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.jsonl"), "{\"instruction\": \"Say hi\", \"output\": \"Hi\"}\n");
    let m = data_manifest(dir.path(), "{ plugin = \"jsonl\", path = \"a.jsonl\" }", "");
    let t = std::fs::read_to_string(&m).unwrap().replace("plugin = \"alpaca\"", "plugin = \"alpaca\"\neos = \"</s>\"");
    std::fs::write(&m, t).unwrap();
    let o = lorahost(&["check", m.to_str().unwrap()], dir.path());
    let t = text(&o);
    assert!(!o.status.success() && t.contains("`template`") && t.contains("`</s>`") && t.contains("<|endoftext|>"), "{t}");
}

#[test]
fn merge_streams_shard_by_shard_and_equals_the_in_memory_merge() {
    use candle_core::{DType, Device};
    use lorahost::model::lora::{Lora, LoraConfig};
    use lorahost::model::tiny::{write_tiny_checkpoint, TinySpec};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let spec = TinySpec { hidden_size: 16, num_layers: 2, num_heads: 2, intermediate_size: 32, vocab_size: 64, shards: 3, ..Default::default() };
    write_tiny_checkpoint(&base, &spec, 1).unwrap();
    let cfg = lorahost::model::weights::ModelFiles::open(&base).unwrap().config;
    let lc = LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["c_attn".into(), "w2".into()], base_model_name_or_path: "t".into() };
    let mut lora = Lora::new(lc, &cfg, 7, &Device::Cpu).unwrap();
    for ad in lora.adapters_mut() {
        ad.b = ad.b.ones_like().unwrap().affine(0.05, 0.0).unwrap();
    }
    let out = dir.path().join("merged");
    let mut seen = vec![];
    lorahost::model::lora::merge_with_progress(&base, &lora, &out, |i, n, f| seen.push((i, n, f.file_name().unwrap().to_string_lossy().into_owned())))
        .unwrap();
    assert_eq!(seen.len(), 5, "config, index, 3 shards: {seen:?}");
    assert!(seen.iter().enumerate().all(|(k, (i, n, _))| k == *i && *n == 5));

    // The in-memory merge, whole shard at a time: W + scale * B A, serialised at once.
    for shard in seen.iter().map(|s| &s.2).filter(|f| f.ends_with(".safetensors")) {
        let tensors = candle_core::safetensors::load(base.join(shard), &Device::Cpu).unwrap();
        let mut merged: Vec<(String, candle_core::Tensor)> = tensors
            .into_iter()
            .map(|(name, w)| match cfg.linear_of_tensor(&name).and_then(|(l, s)| lora.adapter(l, s)) {
                Some(ad) => {
                    let delta = (ad.b.to_dtype(DType::F32).unwrap().matmul(&ad.a.to_dtype(DType::F32).unwrap()).unwrap() * lora.scale()).unwrap();
                    (name, (w + delta).unwrap())
                }
                None => (name, w),
            })
            .collect();
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        let bytes = std::fs::read(base.join(shard)).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let expected = safetensors::serialize(merged.iter().map(|(n, t)| (n.as_str(), t)), header.metadata().clone()).unwrap();
        assert_eq!(std::fs::read(out.join(shard)).unwrap(), expected, "{shard}");
    }
    for f in ["config.json", "model.safetensors.index.json"] {
        assert_eq!(std::fs::read(base.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap());
    }
}
