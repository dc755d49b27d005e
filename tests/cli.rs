//! The command line as a user types it: exit codes and what it prints.
mod common;

use common::{lorahost, text};
use std::path::Path;
use std::process::Command;

#[test]
fn plugin_list_and_inspect() {
    let root = common::repo_root();
    let o = lorahost(&["plugin", "list"], &root);
    assert!(o.status.success());
    let t = text(&o);
    assert!(t.contains("dedup-exact") && t.contains("default-2023") && t.contains("wsd"), "{t}");

    let wasm = common::hostile_wasm("panic");
    let o = lorahost(&["plugin", "inspect", "--json", wasm.to_str().unwrap()], &root);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "filter");
    assert_eq!(v["wit"], "lorahost:plugin@0.1.1");
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    assert!(v["imports"].as_array().unwrap().iter().any(|i| i == "lorahost:plugin/types@0.1.1"));
}

#[test]
fn tokenize_from_argument_and_stdin() {
    let root = common::repo_root();
    let o = lorahost(&["tokenize", "--tokenizer", "tests/fixtures/tokenizer/qwen.tiktoken", "print(\"<|endoftext|>\")"], &root);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[1350, 9639, 91, 8691, 723, 427, 91, 82598]");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorahost"))
        .args(["tokenize", "--tokenizer", "tests/fixtures/tokenizer/qwen.tiktoken"])
        .current_dir(&root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"print(\"<|endoftext|>\")").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[1350, 9639, 91, 8691, 723, 427, 91, 82598]");
}

/// The quickstart manifest written into `dir` as `m.toml`, with `from -> to` replaced first, its paths
/// pointing into the repository and its output and cache in `dir`.
fn quickstart_in(dir: &Path, from: &str, to: &str) -> String {
    let root = common::repo_root();
    let manifest = std::fs::read_to_string(root.join("examples/quickstart.toml"))
        .unwrap()
        .replace(from, to)
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace(&format!("output = \"{}/runs/quickstart\"", root.display()), "output = \"out\"\ncache = \"cache\"");
    let m = dir.join("m.toml");
    std::fs::write(&m, manifest).unwrap();
    m.to_str().unwrap().to_string()
}

#[test]
fn check_writes_the_lock_and_check_locked_names_a_change() {
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    // A copy of the quickstart whose data lives in the temporary folder, so it can be changed.
    let data = dir.path().join("dolly.jsonl");
    std::fs::copy(root.join("tests/fixtures/samples/dolly/databricks-dolly-15k.lines1-34.jsonl"), &data).unwrap();
    let m = quickstart_in(dir.path(), "../tests/fixtures/samples/dolly/databricks-dolly-15k.lines1-34.jsonl", data.to_str().unwrap());
    let m = m.as_str();

    let o = lorahost(&["check", m], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("dolly") && t.contains("stream   sha256:") && t.contains("lock     written"), "{t}");
    assert!(dir.path().join("out/run.lock").exists());

    let o = lorahost(&["check", "--locked", m], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(from cache)"));

    // The training records' lengths, one per line, in the first epoch's order (the token stream's).
    let lengths = dir.path().join("lengths.txt");
    let o = lorahost(&["check", m, "--lengths", lengths.to_str().unwrap()], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let written: Vec<u32> = std::fs::read_to_string(&lengths).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    let prepared = lorahost::data::prepare(&lorahost::manifest::Manifest::load(Path::new(m)).unwrap()).unwrap();
    assert_eq!(written, prepared.stream.lengths[..prepared.stream.n_train]);
    assert!(written.len() > 10 && written.iter().all(|&l| l > 0 && l <= 128), "{written:?}");

    std::fs::write(&data, std::fs::read_to_string(&data).unwrap().replace("Virgin", "Virgil")).unwrap();
    let o = lorahost(&["check", "--locked", m], dir.path());
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("the inputs differ") && t.contains("data file `dolly.jsonl`"), "{t}");
}

#[test]
fn bench_train_runs_the_real_trainer_at_a_named_shape() {
    let root = common::repo_root();
    let o = lorahost(&["bench", "train", "--shape", "tiny", "--seq", "32", "--warmup", "0", "--steps", "1"], &root);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // LoRA r8 on c_attn (64 -> 192), attn.c_proj (64 -> 64) and mlp.c_proj (128 -> 64), two layers.
    assert_eq!(v["lora_params"], 2 * 8 * ((64 + 192) + (64 + 64) + (128 + 64)));
    assert_eq!(v["timed_steps"], 1);
    assert!(v["losses"][0].as_f64().unwrap().is_finite());
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["peak_gib"], serde_json::Value::Null, "no GPU memory on the CPU");
    let o = lorahost(&["bench", "train", "--shape", "qwen-99b"], &root);
    assert!(!o.status.success() && text(&o).contains("unknown shape"));
    let o = lorahost(&["bench", "train", "--fusion", "some"], &root);
    assert!(!o.status.success() && text(&o).contains("--fusion some: all, none, or one of no-dropout,") && text(&o).contains("no-ds-tiles"));
}

#[test]
fn bench_eval_measures_loglikelihood_and_generation_at_a_shape() {
    use lorahost::bench::eval::{choice_length, prompt_length};
    let root = common::repo_root();
    let args = ["bench", "eval", "--shape", "tiny", "--records", "5", "--prompt-tokens", "24", "--batch", "3", "--new-tokens", "4"];
    let o = lorahost(&args, &root);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Each record's prompt once plus its four choices' tokens.
    let want: usize = (0..5).map(|i| prompt_length(24, i) + (0..4).map(|k| choice_length(i, k)).sum::<usize>()).sum();
    assert_eq!(v["loglik_tokens"].as_u64(), Some(want as u64));
    assert!((18..=24).contains(&prompt_length(24, 3)) && prompt_length(24, 1) != prompt_length(24, 0), "ragged prompts");
    assert_eq!((v["generated_tokens"].as_u64(), v["batch"].as_u64()), (Some(12), Some(3)));
    assert!(v["loglik_tokens_per_s"].as_f64().unwrap() > 0.0 && v["generated_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!((v["implementation"].as_str(), v["shape"].as_str()), (Some("lorahost"), Some("tiny")));
    assert_eq!(v["peak_gib"], serde_json::Value::Null, "no GPU memory on the CPU");
    let o = lorahost(&["bench", "eval", "--prompt-tokens", "4000", "--new-tokens", "200"], &root);
    assert!(!o.status.success() && text(&o).contains("more than the shape's 4096"), "{}", text(&o));
}

#[test]
fn bench_train_on_two_ranks_runs_a_step_of_two_passes_and_reports_once() {
    // `--gpus 2` with `--device cpu`: two processes over TCP, the machinery the GPUs use with NCCL.
    let root = common::repo_root();
    let args = ["bench", "train", "--shape", "tiny", "--seq", "32", "--warmup", "0", "--steps", "2", "--device", "cpu", "--gpus", "2"];
    let o = lorahost(&args, &root);
    assert!(o.status.success(), "{}", text(&o));
    // Rank 0 alone reports: one JSON document.
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["ranks"].as_u64(), v["grad_accum"].as_u64(), v["timed_steps"].as_u64()), (Some(2), Some(2), Some(2)));
    assert!(v["losses"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap().is_finite()));
    let one = lorahost(&["bench", "train", "--shape", "tiny", "--seq", "32", "--warmup", "0", "--steps", "2"], &root);
    let one: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!((one["ranks"].as_u64(), one["grad_accum"].as_u64()), (Some(1), Some(1)));
}

#[test]
fn bench_train_on_a_manifests_tokens_lowers_the_loss() {
    // The quickstart's data cut to two records: one micro-batch of 2, seen at every step, so the adapter
    // can only get better at it.
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let toml = std::fs::read_to_string(root.join("examples/quickstart.toml"))
        .unwrap()
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace("count = 6\n", "count = 2\n")
        .replace("name = \"dolly\"\n", "name = \"dolly\"\ncount = 0\n")
        .replace("eval_fraction = 0.05\n", "");
    let manifest = dir.path().join("two-records.toml");
    std::fs::write(&manifest, toml).unwrap();
    let args = ["bench", "train", "--shape", "tiny", "--warmup", "0", "--steps", "6", "--lr", "1e-3", "--manifest", manifest.to_str().unwrap()];
    let o = lorahost(&args, &root);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["data"], manifest.to_str().unwrap());
    let losses: Vec<f64> = v["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 6);
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "the loss should fall at every step on the same real tokens: {losses:?}");
    assert_eq!((v["packing"].as_str(), v["micro_batch"].as_u64()), (Some("none"), Some(4)), "the manifest's schedule");

    // Padding-free: the same records in one row per step.
    let o = lorahost(&[&args[..], &["--packing", "padding-free"]].concat(), &root);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["packing"], "padding-free");
    let packed: Vec<f64> = v["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();
    assert!(packed.windows(2).all(|w| w[1] < w[0]), "{packed:?}");
    let o = lorahost(&[&args[..], &["--packing", "tight"]].concat(), &root);
    assert!(!o.status.success() && text(&o).contains("--packing tight: none or padding-free"), "{}", text(&o));
}

#[test]
fn bench_ops_accounts_for_every_op_of_a_step() {
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ops.json");
    let o = lorahost(&["bench", "ops", "--shape", "tiny", "--seq", "32", "--json", json.to_str().unwrap()], &root);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["predicted_step_ms"].as_f64().unwrap() > 0.0);
    let t = text(&o);
    for op in ["linear q|k|v forward", "lora down backward", "attention backward", "swiglu forward", "lm_head + loss", "optimizer"] {
        assert!(t.contains(op), "missing {op}: {t}");
    }
    assert!(t.contains("predicted step:"), "{t}");
    let o = lorahost(&["bench", "numerics", "--device", "cpu"], &root);
    assert!(!o.status.success() && text(&o).contains("pass --device cuda:N"), "{}", text(&o));
}

#[test]
fn check_show_drops_prints_examples_of_each_drop_reason() {
    let dir = tempfile::tempdir().unwrap();
    // The quickstart with a tighter length filter on GSM8K, so a reason has more drops than are shown.
    let m = quickstart_in(dir.path(), "unit = \"words\", max = 400", "unit = \"words\", max = 60");
    let m = m.as_str();

    let o = lorahost(&["check", m], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let plain = text(&o);
    assert!(plain.contains(": longer than 60 words") && !plain.contains("e.g."), "{plain}");

    let o = lorahost(&["check", "--show-drops", "2", m], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let lines: Vec<&str> = t.lines().collect();
    let at = lines.iter().position(|l| l.contains(": longer than 60 words")).expect("the reason line");
    let n: usize = lines[at].split(':').next().unwrap().split_whitespace().last().unwrap().parse().unwrap();
    assert!(n > 2, "the test wants more drops than are shown: {n}");
    // Two examples under the reason, each its id then one line per turn.
    let shown: Vec<&str> = lines[at + 1..].iter().take_while(|l| !l.contains("dropped") && !l.contains("filter ")).copied().collect();
    assert_eq!(shown.iter().filter(|l| l.trim_start().starts_with("e.g. train.first200.jsonl:")).count(), 2, "{t}");
    assert_eq!(shown.iter().filter(|l| l.trim_start().starts_with("user: ")).count(), 2, "{t}");
    assert_eq!(shown.iter().filter(|l| l.trim_start().starts_with("assistant: ")).count(), 2, "{t}");
    // The per-reason counts stay the same.
    assert!(t.contains(&lines[at].to_string()) && plain.contains(lines[at]), "{t}");
    // --json carries the examples too.
    let o = lorahost(&["check", "--json", "--show-drops", "1", m], dir.path());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let examples = &v["datasets"][1]["filters"][0]["examples"]["longer than 60 words"];
    assert_eq!(examples.as_array().map(Vec::len), Some(1), "{v}");
}

#[test]
fn a_launchers_environment_is_checked_before_any_work() {
    // torchrun's environment, wrong: the error names the variable, and nothing is written.
    let dir = tempfile::tempdir().unwrap();
    let launched = |env: &[(&str, &str)], args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_lorahost")).args(args).current_dir(dir.path()).envs(env.iter().copied()).output().unwrap();
        (o.status.success(), text(&o))
    };
    let rank2 = [("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
    let (ok, t) = launched(&rank2, &["run", "missing.toml"]);
    assert!(!ok && t.contains("RANK=2 is not below WORLD_SIZE=2"), "{t}");
    let (ok, t) = launched(&[("WORLD_SIZE", "2"), ("RANK", "1")], &["run", "missing.toml"]);
    assert!(!ok && t.contains("MASTER_ADDR"), "{t}");
    // Under a launcher, the ranks are the launcher's to start.
    let rank1 = [("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
    let (ok, t) = launched(&rank1, &["run", "--procs", "2", "missing.toml"]);
    assert!(!ok && t.contains("under a launcher (WORLD_SIZE=2)"), "{t}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
    // A world of one is an ordinary run (here: the missing manifest is the error).
    let (ok, t) = launched(&[("WORLD_SIZE", "1")], &["run", "missing.toml"]);
    assert!(!ok && t.contains("missing.toml"), "{t}");
}

#[test]
fn bench_write_model_writes_a_sharded_model_and_an_adapter_that_merge_folds_in() {
    // The merge benchmark's input at the tiny shape: a loadable checkpoint, an adapter that fits it, and a merge
    // that changes exactly the adapted weights.
    let dir = tempfile::tempdir().unwrap();
    let o = lorahost(&["bench", "write-model", "--shape", "tiny", "--dir", dir.path().to_str().unwrap(), "--dtype", "f32"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let device = candle_core::Device::Cpu;
    let ckpt = lorahost::model::ModelFiles::open(&dir.path().join("model")).unwrap();
    assert!(ckpt.index_path.is_some(), "written with an index, as real sharded checkpoints are");
    let lora = lorahost::model::Lora::load(&dir.path().join("adapter"), &ckpt.config, &device).unwrap();
    lorahost::model::lora::merge(&dir.path().join("model"), &lora, &dir.path().join("merged")).unwrap();
    let shard = "model-00001-of-00001.safetensors";
    let a = candle_core::safetensors::load(dir.path().join("model").join(shard), &device).unwrap();
    let b = candle_core::safetensors::load(dir.path().join("merged").join(shard), &device).unwrap();
    for (k, t) in &a {
        let changed = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0;
        assert_eq!(changed, k.ends_with("c_attn.weight") || k.ends_with("c_proj.weight"), "{k}");
    }
}
