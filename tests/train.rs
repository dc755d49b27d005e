//! The training loop on CPU: exact resume, refusing a changed run, damaged checkpoints, the quickstart.
mod common;

use lorahost::manifest::Manifest;
use lorahost::train::run::{run, RunOptions, RunSummary};
use std::path::{Path, PathBuf};

/// A small run: the tiny model with the real vocabulary, a dozen records, dropout on (so resume must
/// reproduce the dropout draws too).
fn small_manifest(dir: &Path, extra_train: &str) -> PathBuf {
    let root = common::repo_root();
    let text = format!(
        r#"[run]
name = "small"
seed = 3
output = "out"
cache = "cache"

[model]
path = "model"
dtype = "f32"
device = "cpu"
tokenizer = "{root}/tests/fixtures/tokenizer/qwen.tiktoken"

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
