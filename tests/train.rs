//! The training loop on CPU: exact resume, refusing a changed run, damaged checkpoints, the quickstart, and
//! several ranks (threads, or processes over TCP) giving the same run.
mod common;

use lorahost::manifest::{Manifest, Packing};
use lorahost::train::run::{run, RunOptions, RunSummary};
use std::path::{Path, PathBuf};

/// A small run: the tiny model with the real vocabulary, a dozen records, dropout on (so resume must
/// reproduce the dropout draws too).
fn small_manifest(dir: &Path, extra_train: &str) -> PathBuf {
    let root = common::repo_root();
    let text = common::manifest_head("small", Some(3), "out", "cache", "model")
        + &format!(
            r#"
[model.tiny]
hidden_size = 32
num_layers = 2
num_heads = 2
intermediate_size = 64
init_std = 0.2
seed = 5

[lora]
rank = 4
alpha = 8
dropout = 0.1
targets = ["c_attn", "c_proj"]

[train]
micro_batch = 2
grad_accum = 2
epochs = 2
lr = 5e-3
weight_decay = 0.01
clip = 1.0
max_seq_len = 48
eval_count = 2
checkpoint_every = 2
{extra_train}

[scheduler]
plugin = "cosine"
warmup_steps = 1

[template]
plugin = "alpaca"

[[dataset]]
name = "dolly"
source = {{ plugin = "jsonl", path = "{root}/tests/fixtures/samples/dolly/databricks-dolly-15k.lines1-34.jsonl", fields = {{ input = "context", output = "response" }} }}
count = 14
"#,
            root = root.display()
        );
    let path = dir.join("small.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train(manifest: &Path, opts: RunOptions) -> anyhow::Result<RunSummary> {
    run(&Manifest::load(manifest).unwrap(), &opts)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn an_interrupted_then_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    let a = tempfile::tempdir().unwrap();
    let whole = train(&small_manifest(a.path(), ""), RunOptions::default()).unwrap();
    assert_eq!(whole.total_steps, 6, "12 training records / 4 per step x 2 epochs");
    assert_eq!(whole.steps_done, 6);

    let b = tempfile::tempdir().unwrap();
    let m = small_manifest(b.path(), "");
    let first = train(&m, RunOptions { stop_after: Some(3), ..Default::default() }).unwrap();
    assert!(first.interrupted && first.steps_done == 3 && first.adapter_dir.is_none());
    let second = train(&m, RunOptions::default()).unwrap();
    assert_eq!(second.resumed_from, Some(3));
    assert_eq!(second.steps_done, 6);

    // The same loss curve, bit for bit, and the same adapter bytes.
    assert_eq!(whole.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), second.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>());
    assert_eq!(whole.eval_losses.last().map(|e| e.1.to_bits()), second.eval_losses.last().map(|e| e.1.to_bits()));
    let adapter = |d: &Path| read(&d.join("out/adapter/adapter_model.safetensors"));
    assert_eq!(adapter(a.path()), adapter(b.path()));
    // The resumed run's log reads as one run: steps 1..=6 once each.
    let log = std::fs::read_to_string(b.path().join("out/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    assert!(b.path().join("out/loss.png").exists());
}

#[test]
fn a_changed_manifest_is_refused_with_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_manifest(dir.path(), "");
    train(&m, RunOptions { stop_after: Some(2), ..Default::default() }).unwrap();
    let changed = std::fs::read_to_string(&m).unwrap().replace("lr = 5e-3", "lr = 1e-3");
    std::fs::write(&m, changed).unwrap();
    let err = format!("{:#}", train(&m, RunOptions::default()).unwrap_err());
    assert!(err.contains("the manifest changed since the checkpoint") && err.contains("lr=0.001"), "{err}");
    assert!(err.contains("--fresh"), "{err}");
    // --fresh starts over.
    let s = train(&m, RunOptions { fresh: true, stop_after: Some(1), ..Default::default() }).unwrap();
    assert_eq!((s.resumed_from, s.steps_done), (None, 1));
}

#[test]
fn a_damaged_checkpoint_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_manifest(dir.path(), "");
    train(&m, RunOptions { stop_after: Some(2), ..Default::default() }).unwrap();
    let ckpt = dir.path().join("out/checkpoints/step-00000002");
    let weights = ckpt.join("adapter/adapter_model.safetensors");
    let bytes = read(&weights);
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let before: Vec<(PathBuf, Vec<u8>)> = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.safetensors", "state.json"]
        .iter()
        .map(|f| (ckpt.join(f), read(&ckpt.join(f))))
        .collect();
    let err = format!("{:#}", train(&m, RunOptions::default()).unwrap_err());
    assert!(err.contains("adapter_model.safetensors") && err.contains("resuming from"), "{err}");
    for (path, content) in before {
        assert_eq!(read(&path), content, "{} was changed", path.display());
    }
    // A foreign state file.
    std::fs::write(ckpt.join("state.json"), b"{\"hello\": 1}").unwrap();
    let err = format!("{:#}", train(&m, RunOptions::default()).unwrap_err());
    assert!(err.contains("state.json") && err.contains("not a lorahost checkpoint"), "{err}");
}

#[test]
fn the_quickstart_halves_its_loss() {
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("examples/quickstart.toml"))
        .unwrap()
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace(&format!("output = \"{}/runs/quickstart\"", root.display()), "output = \"out\"\ncache = \"cache\"")
        .replace(&format!("path = \"{}/runs/quickstart/model\"", root.display()), "path = \"model\"");
    let m = dir.path().join("quickstart.toml");
    std::fs::write(&m, text).unwrap();
    let s = train(&m, RunOptions::default()).unwrap();
    let per_epoch = (s.total_steps / 20) as usize;
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&s.losses[..per_epoch]), mean(&s.losses[s.losses.len() - per_epoch..]));
    assert!(last <= first / 2.0, "the loss fell from {first:.3} to {last:.3} only");

    // The adapter it wrote generates, and merges into a model that gives the same logits.
    let manifest = Manifest::load(&m).unwrap();
    let device = candle_core::Device::Cpu;
    let model = lorahost::train::run::load_model(&manifest, &device).unwrap();
    let lora = lorahost::model::lora::Lora::load(&dir.path().join("out/adapter"), &model.config, &device).unwrap();
    let merged_dir = dir.path().join("merged");
    lorahost::model::lora::merge(&manifest.model.path, &lora, &merged_dir).unwrap();
    let merged = lorahost::model::transformer::Model::load(&merged_dir, candle_core::DType::F32, &device).unwrap();
    let ids = candle_core::Tensor::new(&[[9707u32, 11, 1879, 0, 2585]], &device).unwrap();
    let a = model.forward(&ids, Some(&lora)).unwrap();
    let b = merged.forward(&ids, None).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "merged logits differ by {diff}");
}

#[test]
fn a_diverging_run_stops_at_the_first_non_finite_step_and_writes_no_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_manifest(dir.path(), "");
    // A learning rate that overflows f32 in one update (step 1 has lr 0: one warm-up step), so step 3 is
    // the first non-finite one.
    let text = std::fs::read_to_string(&m).unwrap().replace("lr = 5e-3", "lr = 1e36").replace("clip = 1.0\n", "");
    std::fs::write(&m, text).unwrap();
    let err = format!("{:#}", train(&m, RunOptions::default()).unwrap_err());
    assert!(err.contains("is NaN at step 3") && err.contains("stopping without writing"), "{err}");
    assert!(!dir.path().join("out/adapter").exists(), "no adapter from a diverged run");
    let log = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "the finite steps before it are logged: {log}");
}

#[test]
fn a_gqa_family_run_resumes_bit_for_bit_and_its_adapter_merges() {
    // Qwen3's shape features (GQA, q/k norms) through the whole trainer: the same promises as Qwen v1's.
    let qwen3 = |dir: &Path| {
        let m = small_manifest(dir, "");
        let text = std::fs::read_to_string(&m)
            .unwrap()
            .replace("[model.tiny]\n", "[model.tiny]\nfamily = \"qwen3\"\nnum_kv_heads = 1\n")
            .replace(r#"targets = ["c_attn", "c_proj"]"#, r#"targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]"#);
        std::fs::write(&m, text).unwrap();
        m
    };
    let a = tempfile::tempdir().unwrap();
    let whole = train(&qwen3(a.path()), RunOptions::default()).unwrap();
    let b = tempfile::tempdir().unwrap();
    let m = qwen3(b.path());
    train(&m, RunOptions { stop_after: Some(3), ..Default::default() }).unwrap();
    let second = train(&m, RunOptions::default()).unwrap();
    assert_eq!(second.resumed_from, Some(3));
    assert_eq!(whole.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), second.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>());
    let config = std::fs::read_to_string(a.path().join("model/config.json")).unwrap();
    assert!(config.contains("Qwen3ForCausalLM") && config.contains("\"num_key_value_heads\": 1"), "{config}");

    // The adapter has PEFT's Qwen3 names, loads back and folds into the base in its own layout.
    use lorahost::model::{lora, Lora, Model};
    let device = candle_core::Device::Cpu;
    let base = Model::load(&a.path().join("model"), candle_core::DType::F32, &device).unwrap();
    let adapter = Lora::load(&a.path().join("out/adapter"), &base.config, &device).unwrap();
    assert!(adapter.param_names()[0].starts_with("base_model.model.model.layers.0.self_attn.q_proj.lora_A"));
    lora::merge(&a.path().join("model"), &adapter, &a.path().join("merged")).unwrap();
    let merged = Model::load(&a.path().join("merged"), candle_core::DType::F32, &device).unwrap();
    let ids = candle_core::Tensor::new(&[[9u32, 100, 2000, 30000]], &device).unwrap();
    let d = (base.forward(&ids, Some(&adapter)).unwrap() - merged.forward(&ids, None).unwrap()).unwrap();
    let d = d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "merged model differs from base + adapter by {d}");
}

#[test]
fn a_padding_free_run_gives_the_padded_runs_loss_curve() {
    // Without dropout (its masks are drawn per pass, so they differ between layouts) the curves are equal
    // up to f32 rounding: the same records per step, the same normalisation. A budget of max_seq_len tokens
    // splits each step into several passes and changes nothing either.
    let run_with = |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let m = small_manifest(dir.path(), extra);
        std::fs::write(&m, std::fs::read_to_string(&m).unwrap().replace("dropout = 0.1", "dropout = 0.0")).unwrap();
        let s = train(&m, RunOptions::default()).unwrap();
        let log = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (s, lines)
    };
    let (padded, padded_log) = run_with("");
    let field = |log: &[serde_json::Value], k: &str| log.iter().map(|l| l[k].as_u64().unwrap()).collect::<Vec<_>>();
    for extra in ["packing = \"padding-free\"", "packing = \"padding-free\"\nmax_tokens_per_pass = 48"] {
        let (packed, packed_log) = run_with(extra);
        assert_eq!(packed.losses.len(), padded.losses.len());
        for (step, (a, b)) in packed.losses.iter().zip(&padded.losses).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{extra}: step {}: loss {a} vs padded {b}", step + 1);
        }
        let (a, b) = (packed.eval_losses.last().unwrap().1, padded.eval_losses.last().unwrap().1);
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{extra}: eval loss {a} vs padded {b}");
        // The same tokens trained and counted per step; tokens/s and the step time are logged.
        assert_eq!(field(&packed_log, "trained_tokens"), field(&padded_log, "trained_tokens"));
        assert_eq!(field(&packed_log, "tokens"), field(&padded_log, "tokens"));
        for l in &packed_log {
            assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0 && l["step_ms"].as_f64().unwrap() > 0.0, "{l}");
        }
    }
}

#[test]
fn unset_packing_is_padding_free_on_a_gpu_and_padded_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let on = |device: &str, extra: &str| {
        let path = small_manifest(dir.path(), extra);
        let text = std::fs::read_to_string(&path).unwrap().replace("device = \"cpu\"", &format!("device = \"{device}\""));
        std::fs::write(&path, text).unwrap();
        Manifest::load(&path).unwrap().packing()
    };
    assert_eq!(on("cpu", ""), Packing::None);
    assert_eq!(on("cuda:0", ""), Packing::PaddingFree);
    assert_eq!(on("cuda:0", "packing = \"none\""), Packing::None, "a manifest's own choice wins");
    assert_eq!(on("cpu", "packing = \"padding-free\""), Packing::PaddingFree);
    // The token budget goes with the GPU's default too.
    assert_eq!(on("cuda:0", "max_tokens_per_pass = 96"), Packing::PaddingFree);
}

#[test]
fn packing_settings_are_checked_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let err = |extra: &str| Manifest::load(&small_manifest(dir.path(), extra)).unwrap_err().to_string();
    let e = err("packing = \"packed\"");
    assert!(e.contains("train.packing") && e.contains("padding-free"), "{e}");
    let e = err("max_tokens_per_pass = 4096");
    assert!(e.contains("train.max_tokens_per_pass") && e.contains("only to padding-free packing") && e.contains("set `packing = \"padding-free\"`"), "{e}");
    let e = err("packing = \"padding-free\"\nmax_tokens_per_pass = 40");
    assert!(e.contains("train.max_tokens_per_pass") && e.contains("less than max_seq_len (48)"), "{e}");
    let m = Manifest::load(&small_manifest(dir.path(), "packing = \"padding-free\"")).unwrap();
    assert_eq!(m.train.tokens_per_pass(), 2 * 48, "micro_batch x max_seq_len by default");

    // A checkpoint of a padded run does not resume as a padding-free one (its dropout masks differ).
    let m = small_manifest(dir.path(), "");
    train(&m, RunOptions { stop_after: Some(1), ..Default::default() }).unwrap();
    let packed = small_manifest(dir.path(), "packing = \"padding-free\"");
    let e = format!("{:#}", train(&packed, RunOptions::default()).unwrap_err());
    assert!(e.contains("`train.packing`: new") && e.contains("--fresh"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// Several ranks (threads with the in-process all-reduce): the same run, split differently.

/// The small run with six single-record passes per step (2 steps an epoch, 4 in all), so one, two and
/// three ranks all get a share of every step.
fn ranks_manifest(dir: &Path) -> PathBuf {
    let m = small_manifest(dir, "");
    let text = std::fs::read_to_string(&m).unwrap().replace("micro_batch = 2", "micro_batch = 1").replace("grad_accum = 2", "grad_accum = 6");
    std::fs::write(&m, text).unwrap();
    m
}

fn on_ranks(ranks: usize) -> RunOptions {
    RunOptions { ranks, ..Default::default() }
}

/// Every tensor of a run's adapter, by name.
fn adapter_tensors(run_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = read(&run_dir.join("adapter/adapter_model.safetensors"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Asserts two runs' losses (train and eval) and adapters agree within 1e-6.
fn assert_same_run(what: &str, a: (&RunSummary, &Path), b: (&RunSummary, &Path)) {
    assert_eq!(a.0.losses.len(), b.0.losses.len(), "{what}");
    for (step, (x, y)) in a.0.losses.iter().zip(&b.0.losses).enumerate() {
        assert!((x - y).abs() <= 1e-6, "{what}: step {}: loss {x} vs {y}", step + 1);
    }
    assert_eq!(a.0.eval_losses.len(), b.0.eval_losses.len(), "{what}");
    for ((s, x), (_, y)) in a.0.eval_losses.iter().zip(&b.0.eval_losses) {
        assert!((x - y).abs() <= 1e-6, "{what}: eval loss at step {s}: {x} vs {y}");
    }
    let (ta, tb) = (adapter_tensors(a.1), adapter_tensors(b.1));
    assert_eq!(ta.iter().map(|t| &t.0).collect::<Vec<_>>(), tb.iter().map(|t| &t.0).collect::<Vec<_>>(), "{what}");
    let diff = ta.iter().zip(&tb).flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs())).fold(0.0f32, f32::max);
    let loss_diff = a.0.losses.iter().zip(&b.0.losses).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    eprintln!("{what}: losses differ by up to {loss_diff:e}, adapters by up to {diff:e}");
    assert!(diff <= 1e-6, "{what}: the adapters differ by up to {diff}");
}

/// The small ranks run on one rank, start to end: what the others are compared with.
fn one_rank_run() -> (tempfile::TempDir, RunSummary) {
    let dir = tempfile::tempdir().unwrap();
    let s = train(&ranks_manifest(dir.path()), on_ranks(1)).unwrap();
    (dir, s)
}

fn logged_steps(run_dir: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

#[test]
fn one_two_and_three_ranks_give_the_same_run() {
    let (one_dir, one) = one_rank_run();
    assert_eq!(one.total_steps, 4);
    let one_out = one_dir.path().join("out");
    // The loss moved: a run whose ranks did nothing would fail the comparisons below only by luck.
    assert!(one.losses[3] < one.losses[0], "{:?}", one.losses);
    for ranks in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let s = train(&ranks_manifest(dir.path()), on_ranks(ranks)).unwrap();
        let out = dir.path().join("out");
        assert_same_run(&format!("{ranks} ranks vs 1"), (&s, &out), (&one, &one_out));
        // Rank 0 alone writes: each step logged once, one set of checkpoints.
        assert_eq!(logged_steps(&out), vec![1, 2, 3, 4], "{ranks} ranks");
        let ckpts: Vec<_> = std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    }
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_rank_as_the_same_run() {
    let (whole_dir, whole) = one_rank_run();
    let dir = tempfile::tempdir().unwrap();
    let m = ranks_manifest(dir.path());
    let first = train(&m, RunOptions { stop_after: Some(2), ..on_ranks(2) }).unwrap();
    assert!(first.interrupted && first.steps_done == 2);
    let second = train(&m, on_ranks(1)).unwrap();
    assert_eq!((second.resumed_from, second.steps_done), (Some(2), 4));
    assert_same_run("2 ranks then 1 vs 1", (&second, &dir.path().join("out")), (&whole, &whole_dir.path().join("out")));
    assert_eq!(logged_steps(&dir.path().join("out")), vec![1, 2, 3, 4]);
}

#[test]
fn a_failing_rank_ends_the_run_with_an_error_naming_it_and_a_rerun_finishes() {
    let (whole_dir, whole) = one_rank_run();
    let dir = tempfile::tempdir().unwrap();
    let m = ranks_manifest(dir.path());
    let t0 = std::time::Instant::now();
    // Rank 2 fails as step 3 begins, right after step 2's last collective: rank 0 still finishes step 2 and
    // writes its checkpoint. A generous timeout that must not be waited for.
    let failing = RunOptions { fail_at: Some((2, 2)), rank_timeout: Some(std::time::Duration::from_secs(120)), ..on_ranks(3) };
    let err = format!("{:#}", train(&m, failing).unwrap_err());
    assert!(err.contains("rank 2 of 3 failed") && err.contains("injected failure at step 3"), "{err}");
    assert!(t0.elapsed().as_secs() < 60, "the other ranks stopped at once, not at the timeout");
    assert!(!dir.path().join("out/adapter").exists(), "no adapter from a failed run");
    // Resumed (here on 2 ranks) from the last checkpoint, it finishes as the uninterrupted run.
    let again = train(&m, on_ranks(2)).unwrap();
    assert_eq!(again.resumed_from, Some(2));
    assert_same_run("failed on 3, resumed on 2, vs 1", (&again, &dir.path().join("out")), (&whole, &whole_dir.path().join("out")));
}

#[test]
fn ranks_as_threads_refuse_a_gpu_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let m = ranks_manifest(dir.path());
    std::fs::write(&m, std::fs::read_to_string(&m).unwrap().replace("device = \"cpu\"", "device = \"cuda:0\"")).unwrap();
    let err = format!("{:#}", train(&m, on_ranks(2)).unwrap_err());
    assert!(err.contains("2 ranks as threads run on the CPU only") && err.contains("--gpus 2"), "{err}");
}

// Ranks as processes (`lorahost run --procs N`, or started by a launcher), over TCP.

/// A run's summary from its folder (what a process run leaves behind).
fn summary_of(run_dir: &Path) -> RunSummary {
    let logs: Vec<serde_json::Value> =
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    RunSummary {
        run_dir: run_dir.to_path_buf(),
        steps_done: logs.len() as u64,
        total_steps: logs.len() as u64,
        losses: logs.iter().map(|l| l["loss"].as_f64().unwrap()).collect(),
        eval_losses: logs.iter().filter_map(|l| Some((l["step"].as_u64()?, l["eval_loss"].as_f64()?))).collect(),
        resumed_from: None,
        interrupted: false,
        adapter_dir: Some(run_dir.join("adapter")),
    }
}

#[test]
fn two_processes_give_the_thread_ranks_run() {
    let threads_dir = tempfile::tempdir().unwrap();
    let threads = train(&ranks_manifest(threads_dir.path()), on_ranks(2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = ranks_manifest(dir.path());
    let out = common::lorahost(&["run", "--procs", "2", m.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", common::text(&out));
    let text = common::text(&out);
    // Rank 0 alone reports (and writes): one summary, each step logged once.
    assert_eq!(text.matches("4 of 4 steps").count(), 1, "{text}");
    let run_dir = dir.path().join("out");
    assert_eq!(logged_steps(&run_dir), vec![1, 2, 3, 4]);
    assert_same_run("2 processes vs 2 threads", (&summary_of(&run_dir), &run_dir), (&threads, &threads_dir.path().join("out")));
}

#[test]
fn a_failing_process_rank_is_named_and_rank_0_keeps_the_step_it_finished() {
    let dir = tempfile::tempdir().unwrap();
    let m = ranks_manifest(dir.path());
    // Rank 1 fails as step 3 begins, right after the checkpoint-due step 2.
    let out = common::lorahost(&["run", "--procs", "2", "--fail-at", "1:2", m.to_str().unwrap()], dir.path());
    let text = common::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("rank 1 of 2 failed: injected failure at step 3"), "{text}");
    assert!(text.contains("rank 0 of 2: all_reduce_sum stopped because rank 1 failed"), "{text}");
    assert!(text.contains("exited with exit status: 1"), "the spawner names how a rank ended: {text}");
    assert_eq!(logged_steps(&dir.path().join("out")), vec![1, 2]);
    assert!(dir.path().join("out/checkpoints").read_dir().unwrap().count() == 1, "step 2's checkpoint");
}

#[test]
fn a_killed_rank_under_a_launcher_ends_the_others_at_once_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let m = ranks_manifest(dir.path());
    // Long enough (20 steps) to be killed mid-run.
    std::fs::write(&m, std::fs::read_to_string(&m).unwrap().replace("epochs = 2", "epochs = 10")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let rank = |r: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lorahost"))
            .args(["run", m.to_str().unwrap()])
            .current_dir(dir.path())
            .envs([("RANK", r), ("LOCAL_RANK", r), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (rank0, mut rank1) = (rank("0"), rank("1"));
    let log = dir.path().join("out/metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |l| l.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "the run did not get to step 3");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    rank1.kill().unwrap();
    let killed = std::time::Instant::now();
    let out = rank0.wait_with_output().unwrap();
    let text = common::text(&out);
    assert!(killed.elapsed().as_secs() < 5, "rank 0 stopped {:?} after the kill", killed.elapsed());
    assert!(!out.status.success() && text.contains("because rank 1 failed: died (its connection closed"), "{text}");
    assert!(logged_steps(&dir.path().join("out")).len() < 20, "killed mid-run");
    // Resumed from the last checkpoint (here by the spawner), it finishes.
    let again = common::lorahost(&["run", "--procs", "2", m.to_str().unwrap()], dir.path());
    let text = common::text(&again);
    assert!(again.status.success() && text.contains("20 of 20 steps") && text.contains("resumed at step"), "{text}");
    assert_eq!(logged_steps(&dir.path().join("out")), (1..=20).collect::<Vec<u64>>());
}

#[test]
fn gpus_and_procs_check_the_manifests_device() {
    let dir = tempfile::tempdir().unwrap();
    let m = ranks_manifest(dir.path());
    let path = m.to_str().unwrap();
    let o = common::lorahost(&["run", "--gpus", "2", path], dir.path());
    assert!(!o.status.success() && common::text(&o).contains("for processes on the CPU use --procs"), "{}", common::text(&o));
    std::fs::write(&m, std::fs::read_to_string(&m).unwrap().replace("device = \"cpu\"", "device = \"cuda:0\"")).unwrap();
    let o = common::lorahost(&["run", "--procs", "2", path], dir.path());
    assert!(!o.status.success() && common::text(&o).contains("for the GPUs use --gpus"), "{}", common::text(&o));
    if cfg!(not(feature = "cuda")) {
        // Both ranks stop with the reason (rank 0 after the rendezvous), none waits for the other.
        let o = common::lorahost(&["run", "--gpus", "2", "--rank-timeout", "60", path], dir.path());
        let t = common::text(&o);
        assert!(!o.status.success() && t.contains("built without CUDA") && t.contains("exited with"), "{t}");
    }
}

