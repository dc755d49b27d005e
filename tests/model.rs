//! Model, LoRA and optimizer tests: the forward against an independent NumPy reference, LoRA gradients
//! against finite differences, PEFT adapter files and merge, AdamW against hand-computed values, and a
//! memorisation smoke test. Everything runs on CPU in f32 (f64 for the gradient checks).
use candle_core::{DType, Device, Tensor};
use lorahost::model::lora::{self, Lora, LoraConfig, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use lorahost::model::config::{Family, ModelConfig, RopeScaling};
use lorahost::model::tiny::{write_tiny_checkpoint, TinySpec};
use lorahost::model::{GenerateOptions, Model, Sampling, Site};
use lorahost::rng::SplitMix;
use lorahost::data::batch::Layout;
use lorahost::data::TokenStream;
use lorahost::manifest::Packing;
use lorahost::train::optim::{clip_grad_norm, global_norm, AdamW, AdamWConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;

const CPU: Device = Device::Cpu;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("tests/fixtures/model")
}

/// The committed reference checkpoint: larger init than a real fresh model so that attention is far from
/// uniform and every op (norm weights included) visibly shapes the logits.
fn reference_spec() -> TinySpec {
    TinySpec {
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        intermediate_size: 192,
        vocab_size: 256,
        seq_length: 64,
        init_std: 0.125,
        norm_jitter: 0.1,
        shards: 1,
        ..TinySpec::default()
    }
}
const REFERENCE_SEED: u64 = 1234;

/// A smaller model for gradient checks (many forwards).
fn small_spec() -> TinySpec {
    TinySpec {
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        intermediate_size: 48,
        vocab_size: 64,
        seq_length: 32,
        init_std: 0.15,
        norm_jitter: 0.1,
        shards: 1,
        ..TinySpec::default()
    }
}

/// [`small_spec`] in another family, with that family's features (GQA, q/k norms, a head dim of its own,
/// tied embeddings, rope scaling; see `TinySpec::of_family`).
fn small_spec_of(family: Family) -> TinySpec {
    let f = TinySpec::of_family(family);
    TinySpec {
        family,
        num_kv_heads: f.num_kv_heads,
        head_dim: f.head_dim.map(|_| 10),
        tie_word_embeddings: f.tie_word_embeddings,
        rope_scaling: match f.rope_scaling {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, .. } => {
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: 16.0 }
            }
            other => other,
        },
        intermediate_size: if family == Family::QwenV1 { 48 } else { 24 },
        ..small_spec()
    }
}

fn lora_config(r: usize, alpha: f64, dropout: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        base_model_name_or_path: "tiny-qwen".into(),
    }
}

fn randn(shape: &[usize], std: f64, rng: &mut SplitMix, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| std * rng.normal()).collect();
    Tensor::from_vec(v, shape, &CPU).unwrap().to_dtype(dtype).unwrap()
}

/// LoRA B is zero at init; tests that need the adapter to matter set it to random values.
fn randomise_b(lora: &mut Lora, std: f64, seed: u64) {
    let mut rng = SplitMix::new(seed);
    for ad in lora.adapters_mut() {
        let dtype = ad.b.dtype();
        ad.b = randn(ad.b.dims(), std, &mut rng, dtype);
    }
}

fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix::new(seed);
    (0..b).map(|_| (0..t).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()).collect()
}

fn ids_tensor(ids: &[Vec<u32>]) -> Tensor {
    Tensor::new(ids.to_vec(), &CPU).unwrap()
}

/// Labels = ids with the first `masked[b]` positions of row b ignored (-100).
fn labels_tensor(ids: &[Vec<u32>], masked: &[usize]) -> Tensor {
    let rows: Vec<Vec<i64>> = ids
        .iter()
        .zip(masked)
        .map(|(row, &m)| row.iter().enumerate().map(|(t, &x)| if t < m { -100 } else { x as i64 }).collect())
        .collect();
    Tensor::new(rows, &CPU).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn write_small(dir: &Path, spec: &TinySpec, seed: u64) {
    write_tiny_checkpoint(dir, spec, seed).unwrap();
}

// ---------------------------------------------------------------------------------------------------------
// Forward against the NumPy reference.

/// Regenerates the committed checkpoint (then run make_reference.py). Not part of the normal run.
#[test]
#[ignore]
fn write_reference_fixture() {
    write_tiny_checkpoint(&fixture_dir().join("tiny-ref"), &reference_spec(), REFERENCE_SEED).unwrap();
}

#[test]
fn forward_matches_numpy_reference() {
    let dir = fixture_dir().join("tiny-ref");
    let model = Model::load(&dir, DType::F32, &CPU).unwrap();
    let refs = candle_core::safetensors::load(dir.join("reference.safetensors"), &CPU).unwrap();
    let ids = refs["input_ids"].to_dtype(DType::U32).unwrap();
    let want = &refs["logits"];

    let logits = model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims(), want.dims());
    let diff = max_abs_diff(&logits, want);
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    println!("max |logit| {scale:.3}, max |rust - numpy| {diff:.2e}");
    assert!(scale > 1.0, "reference logits are too flat to test anything");
    assert!(diff < 1e-4, "logits differ from the NumPy reference by {diff}");

    // The masked loss (shift, ignore -100, logsumexp) against the reference too.
    let (loss, n) = model.eval_loss(&ids, &refs["labels"], None, None).unwrap();
    let want_loss = refs["loss_sum"].to_vec1::<f64>().unwrap()[0];
    let want_n = refs["n_tokens"].to_vec1::<i64>().unwrap()[0];
    assert_eq!(n as i64, want_n);
    assert!((loss - want_loss).abs() < 1e-4, "loss {loss} vs reference {want_loss}");

    // Frozen weights are plain tensors: nothing can ever ask for their gradient.
    assert!(!model.weights.wte.is_variable() && !model.weights.layers[0].qkv.is_variable());
}

#[test]
fn tiny_checkpoint_is_byte_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(tmp.path(), &reference_spec(), REFERENCE_SEED).unwrap();
    let fixture = fixture_dir().join("tiny-ref");
    for f in ["config.json", "model.safetensors"] {
        let a = std::fs::read(tmp.path().join(f)).unwrap();
        let b = std::fs::read(fixture.join(f)).unwrap();
        assert!(a == b, "{f} differs from the committed fixture");
    }
    let other = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(other.path(), &reference_spec(), REFERENCE_SEED + 1).unwrap();
    assert_ne!(
        std::fs::read(other.path().join("model.safetensors")).unwrap(),
        std::fs::read(fixture.join("model.safetensors")).unwrap()
    );
    // The default spec is the brief's tiny model: real Qwen vocab, hidden 64, 2 layers, 4 heads.
    let spec = TinySpec::default();
    let cfg = ModelConfig::from_json_str(&spec.config_json(), "default spec").unwrap();
    assert_eq!((cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim), (151936, 64, 2, 4, 16));
    assert_eq!((cfg.mlp_width, cfg.seq_length), (128, 512));
}

#[test]
fn sharded_checkpoint_loads_like_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec { shards: 3, ..reference_spec() };
    write_tiny_checkpoint(tmp.path(), &spec, REFERENCE_SEED).unwrap();
    assert!(tmp.path().join("model.safetensors.index.json").exists());
    assert!(!tmp.path().join("model.safetensors").exists());
    let ckpt = lorahost::model::ModelFiles::open(tmp.path()).unwrap();
    assert_eq!(ckpt.files.len(), 3);

    let sharded = Model::load(tmp.path(), DType::F32, &CPU).unwrap();
    let single = Model::load(&fixture_dir().join("tiny-ref"), DType::F32, &CPU).unwrap();
    let ids = ids_tensor(&random_ids(1, 9, 256, 3));
    let a = sharded.forward(&ids, None).unwrap();
    let b = single.forward(&ids, None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn config_and_weight_errors_name_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let spec = small_spec();
    write_small(dir, &spec, 1);
    let config_path = dir.join("config.json");
    let good_config = std::fs::read_to_string(&config_path).unwrap();
    let err_of = |r: anyhow::Result<ModelConfig>| format!("{:#}", r.unwrap_err());

    // Missing key, wrong type, unsupported family; unknown keys are fine.
    let text = good_config.replace("\"kv_channels\": 8,", "");
    std::fs::write(&config_path, &text).unwrap();
    let e = err_of(ModelConfig::from_file(&config_path));
    assert!(e.contains("kv_channels") && e.contains("missing") && e.contains(&config_path.display().to_string()), "{e}");
    let text = good_config.replace("\"hidden_size\": 32", "\"hidden_size\": \"big\"");
    let e = err_of(ModelConfig::from_json_str(&text, "cfg.json"));
    assert!(e.contains("hidden_size") && e.contains("cfg.json"), "{e}");
    let text = good_config.replace("\"model_type\": \"qwen\"", "\"model_type\": \"gpt2\"");
    let e = err_of(ModelConfig::from_json_str(&text, "cfg.json"));
    assert!(e.contains("gpt2") && e.contains("model_type") && e.contains("not supported"), "{e}");
    let text = good_config.replace("{\n", "{\n  \"some_future_key\": [1, 2],\n");
    ModelConfig::from_json_str(&text, "cfg.json").unwrap();
    std::fs::write(&config_path, &good_config).unwrap();

    // A missing tensor and a misshaped one.
    let weights = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &CPU).unwrap();
    let w1 = tensors.remove("transformer.h.1.mlp.w1.weight").unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let e = format!("{:#}", Model::load(dir, DType::F32, &CPU).err().unwrap());
    assert!(e.contains("transformer.h.1.mlp.w1.weight") && e.contains("missing") && e.contains("model.safetensors"), "{e}");
    tensors.insert("transformer.h.1.mlp.w1.weight".into(), w1.t().unwrap().contiguous().unwrap());
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let e = format!("{:#}", Model::load(dir, DType::F32, &CPU).err().unwrap());
    assert!(e.contains("transformer.h.1.mlp.w1.weight") && e.contains("[32, 24]") && e.contains("[24, 32]"), "{e}");

    // Shards: a shard named in the index but absent, and a tensor absent from the weight_map.
    let sharded = tempfile::tempdir().unwrap();
    write_small(sharded.path(), &TinySpec { shards: 2, ..spec }, 1);
    let index_path = sharded.path().join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    std::fs::write(&index_path, index.replace("model-00002-of-00002", "model-00009-of-00002")).unwrap();
    let e = format!("{:#}", Model::load(sharded.path(), DType::F32, &CPU).err().unwrap());
    assert!(e.contains("model-00009-of-00002.safetensors") && e.contains("does not exist"), "{e}");
    let without_ln_f: String = index.lines().filter(|l| !l.contains("transformer.ln_f.weight")).collect::<Vec<_>>().join("\n");
    std::fs::write(&index_path, without_ln_f).unwrap();
    let e = format!("{:#}", Model::load(sharded.path(), DType::F32, &CPU).err().unwrap());
    assert!(e.contains("transformer.ln_f.weight") && e.contains("weight_map"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// LoRA gradients against central finite differences (f64).

fn gradient_check(family: Family, dropout: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = small_spec_of(family);
    write_small(tmp.path(), &spec, 7);
    let model = Model::load(tmp.path(), DType::F64, &CPU).unwrap();
    let cfg = lora_config(3, 6.0, dropout, &["all-linear"]);
    let mut lora = Lora::new(cfg, &model.config, 11, &CPU).unwrap().to_dtype(DType::F64).unwrap();
    randomise_b(&mut lora, 0.3, 12);
    // Every module kind is adapted in every layer.
    assert_eq!(lora.adapters().len(), spec.num_layers * family.sites().len());

    let ids = random_ids(2, 7, spec.vocab_size, 5);
    let labels = labels_tensor(&ids, &[2, 0]);
    let ids = ids_tensor(&ids);
    let rng0 = SplitMix::new(99);

    let plain = model.loss_and_grads(&ids, &labels, None, &lora, &mut rng0.clone(), false).unwrap();
    let recomputed = model.loss_and_grads(&ids, &labels, None, &lora, &mut rng0.clone(), true).unwrap();
    assert_eq!(plain.n_tokens, 11);
    // Recomputation must give bit-identical results.
    assert_eq!(plain.loss_sum().unwrap().to_bits(), recomputed.loss_sum().unwrap().to_bits());
    for (g1, g2) in plain.grads.tensors().iter().zip(recomputed.grads.tensors()) {
        let (a, b) = (to_f64_vec(g1), to_f64_vec(g2));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "recompute changed a gradient");
    }
    // Without dropout the training loss is the evaluation loss; with it, the masks visibly change it.
    let (eval, n) = model.eval_loss(&ids, &labels, None, Some(&lora)).unwrap();
    assert_eq!(n, 11);
    if dropout == 0.0 {
        assert!((eval - plain.loss_sum().unwrap()).abs() < 1e-12);
    } else {
        assert!((eval - plain.loss_sum().unwrap()).abs() > 1e-3, "dropout had no effect");
    }

    let loss_at =
        |l: &Lora| model.loss_and_grads(&ids, &labels, None, l, &mut rng0.clone(), false).unwrap().loss_sum().unwrap();
    let eps = 1e-5;
    let mut rng = SplitMix::new(1);
    let names = lora.param_names();
    let grads: Vec<Tensor> = plain.grads.tensors().into_iter().cloned().collect();
    let mut worst = 0.0f64;
    for (k, name) in names.iter().enumerate() {
        let p = lora.params()[k].clone();
        let g = &grads[k];
        let shape = p.dims().to_vec();
        // (1) Directional derivative along a random direction: checks every element at once.
        let dir = randn(&shape, 1.0, &mut rng, DType::F64);
        let mut plus = lora.clone();
        *plus.params_mut()[k] = (&p + (&dir * eps).unwrap()).unwrap();
        let mut minus = lora.clone();
        *minus.params_mut()[k] = (&p - (&dir * eps).unwrap()).unwrap();
        let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps);
        let analytic = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(analytic.abs() > 1e-4, "{name}: gradient is suspiciously small ({analytic})");
        let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
        worst = worst.max(err);
        assert!(err < 1e-6, "{name}: directional derivative {analytic} vs finite difference {numeric}");
        // (2) Two single elements.
        let n = p.elem_count();
        for idx in [(rng.next_u64() % n as u64) as usize, n - 1] {
            let mut basis = vec![0.0f64; n];
            basis[idx] = eps;
            let e = Tensor::from_vec(basis, shape.as_slice(), &CPU).unwrap();
            let mut plus = lora.clone();
            *plus.params_mut()[k] = (&p + &e).unwrap();
            let mut minus = lora.clone();
            *minus.params_mut()[k] = (&p - &e).unwrap();
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps);
            let analytic = to_f64_vec(g)[idx];
            let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
            worst = worst.max(err);
            assert!(err < 1e-6, "{name}[{idx}]: gradient {analytic} vs finite difference {numeric}");
        }
    }
    println!("dropout {dropout}: worst relative error {worst:.2e} over {} parameter tensors", names.len());
}

#[test]
fn recomputation_that_keeps_the_top_layers_states_gives_the_same_bits() {
    // Spare memory (what offloading the embedding frees on a GPU) lets the top layers keep their state
    // instead of being recomputed; whatever the split, the step is the same computation.
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec { num_layers: 4, ..small_spec_of(Family::QwenV1) };
    write_small(tmp.path(), &spec, 7);
    let mut model = Model::load(tmp.path(), DType::F32, &CPU).unwrap();
    let mut lora = Lora::new(lora_config(3, 6.0, 0.25, &["all-linear"]), &model.config, 11, &CPU).unwrap();
    randomise_b(&mut lora, 0.3, 12);
    let ids = random_ids(2, 7, spec.vocab_size, 5);
    let labels = labels_tensor(&ids, &[2, 0]);
    let ids = ids_tensor(&ids);
    let rng0 = SplitMix::new(99);
    let plain = model.loss_and_grads(&ids, &labels, None, &lora, &mut rng0.clone(), false).unwrap();
    for spare in [0usize, 1 << 12, 1 << 14, 1 << 16, usize::MAX / 4] {
        model.recompute_spare_bytes = spare;
        let r = model.loss_and_grads(&ids, &labels, None, &lora, &mut rng0.clone(), true).unwrap();
        assert_eq!(plain.loss_sum().unwrap().to_bits(), r.loss_sum().unwrap().to_bits(), "spare {spare}");
        for (g1, g2) in plain.grads.tensors().iter().zip(r.grads.tensors()) {
            let (a, b) = (to_f64_vec(g1), to_f64_vec(g2));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "spare {spare}: a gradient changed");
        }
    }
    // On the CPU there is nothing to offload.
    assert_eq!(model.offload_embedding().unwrap(), 0);
}

#[test]
fn lora_gradients_match_finite_differences() {
    gradient_check(Family::QwenV1, 0.0);
}

#[test]
fn lora_gradients_with_dropout_match_finite_differences() {
    // Dropout masks are a pure function of the step seed, so the loss is a smooth function of the
    // parameters for a fixed seed and finite differences apply.
    gradient_check(Family::QwenV1, 0.25);
}

#[test]
fn qwen2_gradients_match_finite_differences() {
    // GQA (dK/dV summed over each query group), q/k/v biases, separate q/k/v adapters with their own masks.
    gradient_check(Family::Qwen2, 0.25);
}

#[test]
fn qwen3_gradients_match_finite_differences() {
    // Per-head q/k RMSNorm before RoPE, a head dim that is not hidden / heads, GQA.
    gradient_check(Family::Qwen3, 0.25);
}

#[test]
fn llama_gradients_match_finite_differences() {
    // GQA, tied embeddings, Llama 3 rope scaling.
    gradient_check(Family::Llama, 0.0);
}

#[test]
fn dropout_masks_are_reproducible_with_rate_p() {
    use lorahost::model::ops::dropout_mask;
    let m = dropout_mask(7, 200, 100, 0.1, DType::F32, &CPU).unwrap();
    let v = to_f64_vec(&m);
    let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
    assert!((dropped - 0.1).abs() < 0.01, "dropped fraction {dropped}");
    assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
    assert_eq!(v, to_f64_vec(&dropout_mask(7, 200, 100, 0.1, DType::F32, &CPU).unwrap()));
    assert_ne!(v, to_f64_vec(&dropout_mask(8, 200, 100, 0.1, DType::F32, &CPU).unwrap()));
}

#[test]
fn only_adapted_layers_are_backpropagated() {
    // An adapter on the last layer only: gradients must equal those with all layers present.
    let tmp = tempfile::tempdir().unwrap();
    write_small(tmp.path(), &small_spec(), 7);
    let model = Model::load(tmp.path(), DType::F64, &CPU).unwrap();
    let mut lora = Lora::new(lora_config(2, 4.0, 0.0, &["h.1.mlp.w2"]), &model.config, 3, &CPU).unwrap();
    assert_eq!(lora.adapters().len(), 1);
    assert_eq!((lora.adapters()[0].layer, lora.adapters()[0].site), (1, Site::Gate));
    randomise_b(&mut lora, 0.3, 4);
    let lora = lora.to_dtype(DType::F64).unwrap();
    let ids = random_ids(1, 6, 64, 8);
    let labels = labels_tensor(&ids, &[0]);
    let out = model.loss_and_grads(&ids_tensor(&ids), &labels, None, &lora, &mut SplitMix::new(0), false).unwrap();
    let eps = 1e-5;
    let p = lora.params()[0].clone();
    let dir = randn(p.dims(), 1.0, &mut SplitMix::new(2), DType::F64);
    let at = |s: f64| {
        let mut l = lora.clone();
        *l.params_mut()[0] = (&p + (&dir * s).unwrap()).unwrap();
        model.loss_and_grads(&ids_tensor(&ids), &labels, None, &l, &mut SplitMix::new(0), false).unwrap().loss_sum().unwrap()
    };
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    let analytic = (&out.grads.a[0] * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!((numeric - analytic).abs() < 1e-6 * analytic.abs().max(1.0), "{analytic} vs {numeric}");
}

// ---------------------------------------------------------------------------------------------------------
// Padding-free passes against padded micro-batches.

/// Records of different lengths, the first `prompt` tokens of each untrained.
fn records(lengths: &[usize], vocab: usize, seed: u64) -> TokenStream {
    let mut rng = SplitMix::new(seed);
    let ids: Vec<u32> = lengths.iter().flat_map(|&l| (0..l).map(|_| (rng.next_u64() % vocab as u64) as u32).collect::<Vec<_>>()).collect();
    let trained = lengths.iter().flat_map(|&l| (0..l).map(move |t| (t >= l / 3) as u8)).collect();
    TokenStream { lengths: lengths.iter().map(|&l| l as u32).collect(), ids, trained, dataset: vec![0; lengths.len()], n_train: lengths.len() }
}

/// Summed loss, counted tokens and summed adapter gradients over the passes of `layout`.
fn step_sums(model: &Model, lora: &Lora, stream: &TokenStream, layout: &Layout, recompute: bool) -> (f64, usize, Vec<Tensor>, usize) {
    let records: Vec<usize> = (0..stream.len()).collect();
    let passes = layout.passes(stream, &stream.offsets(), &records);
    let (mut loss, mut n, mut grads) = (0.0, 0, None::<lora::LoraGrads>);
    for b in &passes {
        let (ids, labels) = b.tensors().unwrap();
        let out = model.loss_and_grads(&ids, &labels, b.cu_seqlens.as_deref(), lora, &mut SplitMix::new(5), recompute).unwrap();
        assert_eq!(out.n_tokens, b.trained);
        loss += out.loss_sum().unwrap();
        n += out.n_tokens;
        match grads.as_mut() {
            Some(g) => g.add_assign(&out.grads).unwrap(),
            None => grads = Some(out.grads),
        }
    }
    (loss, n, grads.unwrap().tensors().into_iter().cloned().collect(), passes.len())
}

/// max |a - b| / max |b| over the elements of two tensors.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / to_f64_vec(b).iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

#[test]
fn a_padding_free_step_equals_the_padded_step_in_every_family() {
    // Exact math shows in f64 (1e-12); f32 adds only its rounding of differently shaped matmuls.
    for (dtype, loss_tol, grad_tol) in [(DType::F64, 1e-12, 1e-10), (DType::F32, 1e-6, 1e-5)] {
        let (mut worst_loss, mut worst) = (0.0f64, 0.0f64);
        for family in [Family::QwenV1, Family::Qwen2, Family::Qwen3, Family::Llama] {
            let (l, g) = packed_against_padded(family, dtype, loss_tol, grad_tol);
            (worst_loss, worst) = (worst_loss.max(l), worst.max(g));
        }
        println!("packed vs padded, {dtype:?}: worst relative difference {worst_loss:.1e} (loss), {worst:.1e} (gradients)");
    }
}

/// The worst relative differences (loss, gradients) between padded micro-batches of 2 records and
/// padding-free passes of the same records, at three budgets.
fn packed_against_padded(family: Family, dtype: DType, loss_tol: f64, grad_tol: f64) -> (f64, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = small_spec_of(family);
    write_small(tmp.path(), &spec, 7);
    let model = Model::load(tmp.path(), dtype, &CPU).unwrap();
    let mut lora = Lora::new(lora_config(3, 6.0, 0.0, &["all-linear"]), &model.config, 11, &CPU).unwrap().to_dtype(dtype).unwrap();
    randomise_b(&mut lora, 0.3, 12);
    let stream = records(&[5, 11, 3, 8, 1, 7], spec.vocab_size, 21);
    let layout = |packing, tokens_per_pass| Layout { packing, micro_batch: 2, tokens_per_pass, pad: 0 };

    let (loss, n, grads, passes) = step_sums(&model, &lora, &stream, &layout(Packing::None, 0), false);
    assert_eq!(passes, 3);
    let (mut worst_loss, mut worst) = (0.0f64, 0.0f64);
    // One row of all 35 tokens (longer than the model's 32 positions: each record has its own); then a
    // budget of 12 tokens, which splits the step into passes of 5, 11, 3 + 8 + 1 and 7 tokens; and the one
    // row with recomputation.
    for (tokens_per_pass, recompute, want_passes) in [(64, false, 1), (12, false, 4), (64, true, 1)] {
        let (p_loss, p_n, p_grads, p_passes) = step_sums(&model, &lora, &stream, &layout(Packing::PaddingFree, tokens_per_pass), recompute);
        assert_eq!((p_passes, p_n), (want_passes, n), "{family:?}");
        let loss_err = (p_loss - loss).abs() / loss.abs();
        assert!(loss_err < loss_tol, "{family:?} {dtype:?} budget {tokens_per_pass}: loss {p_loss} vs padded {loss}");
        worst_loss = worst_loss.max(loss_err);
        for (name, (g, want)) in lora.param_names().iter().zip(p_grads.iter().zip(&grads)) {
            let err = rel_diff(g, want);
            assert!(err < grad_tol, "{family:?} {dtype:?} budget {tokens_per_pass}: {name} differs from the padded gradient by {err:.2e}");
            worst = worst.max(err);
        }
    }
    (worst_loss, worst)
}

#[test]
fn sequence_offsets_that_do_not_fit_the_batch_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_small(tmp.path(), &small_spec(), 7);
    let model = Model::load(tmp.path(), DType::F32, &CPU).unwrap();
    let ids = random_ids(2, 4, 64, 1);
    let labels = labels_tensor(&ids, &[0, 0]);
    let ids = ids_tensor(&ids);
    let err = |cu: &[u32]| format!("{:#}", model.eval_loss(&ids, &labels, Some(cu), None).unwrap_err());
    assert!(err(&[0, 3, 8]).contains("crosses the end of row 0"), "{}", err(&[0, 3, 8]));
    assert!(err(&[0, 4, 7]).contains("from 0 to the 8 tokens"), "{}", err(&[0, 4, 7]));
    assert!(err(&[0, 4, 4, 8]).contains("rise strictly"));
    // Offsets at the rows' ends are the padded layout: the same loss.
    let (packed, n) = model.eval_loss(&ids, &labels, Some(&[0, 4, 8]), None).unwrap();
    let (padded, m) = model.eval_loss(&ids, &labels, None, None).unwrap();
    assert_eq!(n, m);
    assert!((packed - padded).abs() < 1e-6 * padded.abs(), "{packed} vs {padded}");
}

// ---------------------------------------------------------------------------------------------------------
// LoRA targets, init, PEFT files, merge.

#[test]
fn lora_targets_follow_peft_suffix_rule_and_init() {
    let cfg = small_spec().config();
    let sites = |targets: &[&str]| -> Vec<(usize, Site)> {
        let l = Lora::new(lora_config(4, 8.0, 0.0, targets), &cfg, 1, &CPU).unwrap();
        l.adapters().iter().map(|a| (a.layer, a.site)).collect()
    };
    // `c_proj` adapts both attn.c_proj and mlp.c_proj.
    assert_eq!(
        sites(&["c_attn", "c_proj"]),
        vec![(0, Site::Qkv), (0, Site::O), (0, Site::Down), (1, Site::Qkv), (1, Site::O), (1, Site::Down)]
    );
    assert_eq!(sites(&["attn.c_proj"]), vec![(0, Site::O), (1, Site::O)]);
    assert_eq!(sites(&["w1", "w2"]), vec![(0, Site::Up), (0, Site::Gate), (1, Site::Up), (1, Site::Gate)]);
    assert_eq!(sites(&["transformer.h.0.mlp.c_proj"]), vec![(0, Site::Down)]);
    // "proj" is not a suffix after a dot: PEFT would not match it either.
    let e = Lora::new(lora_config(4, 8.0, 0.0, &["proj"]), &cfg, 1, &CPU).unwrap_err();
    assert!(format!("{e:#}").contains("\"proj\""), "{e:#}");

    // Init: A uniform in +-1/sqrt(in), B zero, f32, deterministic per seed.
    let l = Lora::new(lora_config(4, 8.0, 0.1, &["c_attn", "c_proj"]), &cfg, 42, &CPU).unwrap();
    assert_eq!(l.scale(), 2.0);
    for ad in l.adapters() {
        let fan_in = ad.a.dims()[1];
        let a = to_f64_vec(&ad.a);
        let bound = 1.0 / (fan_in as f64).sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound));
        assert!(a.iter().map(|x| x.abs()).fold(0.0, f64::max) > 0.8 * bound, "A does not fill its range");
        assert!(to_f64_vec(&ad.b).iter().all(|&x| x == 0.0));
        assert_eq!((ad.a.dtype(), ad.b.dtype()), (DType::F32, DType::F32));
    }
    let again = Lora::new(lora_config(4, 8.0, 0.1, &["c_attn", "c_proj"]), &cfg, 42, &CPU).unwrap();
    assert_eq!(to_f64_vec(&l.adapters()[2].a), to_f64_vec(&again.adapters()[2].a));
    let other = Lora::new(lora_config(4, 8.0, 0.1, &["c_attn", "c_proj"]), &cfg, 43, &CPU).unwrap();
    assert_ne!(to_f64_vec(&l.adapters()[2].a), to_f64_vec(&other.adapters()[2].a));

    // The reference recipe on Qwen-14B's shape: rank 8 on c_attn + c_proj is 15,851,520 parameters.
    let qwen14b = ModelConfig { hidden_size: 5120, num_layers: 40, num_heads: 40, num_kv_heads: 40, head_dim: 128, mlp_width: 13696, vocab_size: 152064, seq_length: 2048, ..cfg.clone() };
    let l = Lora::new(lora_config(8, 32.0, 0.1, &["c_attn", "c_proj"]), &qwen14b, 42, &CPU).unwrap();
    assert_eq!(l.num_params(), 15_851_520);
    assert_eq!(l.scale(), 4.0);
}

#[test]
fn adapter_save_load_roundtrip_in_peft_layout() {
    let spec = reference_spec();
    let cfg = spec.config();
    let mut l = Lora::new(lora_config(4, 16.0, 0.05, &["c_attn", "c_proj"]), &cfg, 5, &CPU).unwrap();
    randomise_b(&mut l, 0.1, 6);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    l.save(&dir).unwrap();

    // Exactly two files, no temporaries left behind.
    let mut files: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, vec![ADAPTER_CONFIG_FILE.to_string(), ADAPTER_WEIGHTS_FILE.to_string()]);

    // Keys and shapes exactly as PEFT writes them for Qwen v1.
    let bytes = std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut got: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
    got.sort();
    let mut want = Vec::new();
    for i in 0..2 {
        for (module, fan_in, fan_out) in [("attn.c_attn", 64, 192), ("attn.c_proj", 64, 64), ("mlp.c_proj", 96, 64)] {
            want.push((format!("base_model.model.transformer.h.{i}.{module}.lora_A.weight"), vec![4, fan_in]));
            want.push((format!("base_model.model.transformer.h.{i}.{module}.lora_B.weight"), vec![fan_out, 4]));
        }
    }
    want.sort();
    assert_eq!(got, want);
    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == safetensors::Dtype::F32));

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 16.0);
    assert_eq!(json["lora_dropout"], 0.05);
    assert_eq!(json["target_modules"], serde_json::json!(["c_attn", "c_proj"]));
    assert_eq!(json["bias"], "none");
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["inference_mode"], true);
    assert_eq!(json["base_model_name_or_path"], "tiny-qwen");

    // Round trip: identical parameters and config; saving again gives identical bytes.
    let back = Lora::load(&dir, &cfg, &CPU).unwrap();
    assert_eq!(back.config, l.config);
    assert_eq!(back.param_names(), l.param_names());
    for (a, b) in back.params().iter().zip(l.params()) {
        assert_eq!(to_f64_vec(a), to_f64_vec(b));
    }
    let dir2 = tmp.path().join("again");
    back.save(&dir2).unwrap();
    assert_eq!(std::fs::read(dir2.join(ADAPTER_WEIGHTS_FILE)).unwrap(), bytes);

    // Saving over an existing adapter replaces it whole.
    let mut l2 = l.clone();
    randomise_b(&mut l2, 0.1, 7);
    l2.save(&dir).unwrap();
    let back2 = Lora::load(&dir, &cfg, &CPU).unwrap();
    assert_eq!(to_f64_vec(back2.params()[1]), to_f64_vec(l2.params()[1]));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
}

#[test]
fn adapter_load_rejects_truncated_and_foreign_files() {
    let spec = reference_spec();
    let cfg = spec.config();
    let l = Lora::new(lora_config(4, 16.0, 0.0, &["c_attn", "c_proj"]), &cfg, 5, &CPU).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    l.save(&good).unwrap();
    let config_bytes = std::fs::read(good.join(ADAPTER_CONFIG_FILE)).unwrap();
    let weight_bytes = std::fs::read(good.join(ADAPTER_WEIGHTS_FILE)).unwrap();

    let check = |name: &str, weights: &[u8], config: &[u8], expect: &[&str]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), config).unwrap();
        std::fs::write(dir.join(ADAPTER_WEIGHTS_FILE), weights).unwrap();
        let err = format!("{:#}", Lora::load(&dir, &cfg, &CPU).unwrap_err());
        for e in expect {
            assert!(err.contains(e), "{name}: error {err:?} does not mention {e:?}");
        }
        // Nothing was touched.
        assert_eq!(std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap(), weights);
        assert_eq!(std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap(), config);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        println!("{name}: {err}");
    };
    let file = ADAPTER_WEIGHTS_FILE;
    check("truncated-data", &weight_bytes[..weight_bytes.len() / 2], &config_bytes, &[file, "truncated"]);
    check("truncated-header", &weight_bytes[..20], &config_bytes, &[file, "truncated"]);
    let foreign = std::fs::read(fixture_dir().join("tiny-ref/model.safetensors")).unwrap();
    check("foreign", &foreign, &config_bytes, &[file, "no LoRA tensors", "LoRA adapter"]);
    let wrong_rank = String::from_utf8(config_bytes.clone()).unwrap().replace("\"r\": 4", "\"r\": 8");
    check("wrong-rank", &weight_bytes, wrong_rank.as_bytes(), &[file, "lora_A.weight", "[4, 64]", "[8, 64]"]);
    let fewer_targets = String::from_utf8(config_bytes.clone()).unwrap().replace("\"c_proj\"", "\"attn.c_proj\"");
    check("extra-tensors", &weight_bytes, fewer_targets.as_bytes(), &[file, "unexpected tensor", "mlp.c_proj"]);
    let not_lora = String::from_utf8(config_bytes.clone()).unwrap().replace("\"LORA\"", "\"IA3\"");
    check("not-lora", &weight_bytes, not_lora.as_bytes(), &[ADAPTER_CONFIG_FILE, "IA3"]);
    // The good adapter still loads.
    Lora::load(&good, &cfg, &CPU).unwrap();
}

#[test]
fn merged_model_matches_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let spec = TinySpec { shards: 2, init_std: 0.1, ..small_spec() };
    write_small(&base, &spec, 21);
    std::fs::write(base.join("tokenizer_config.json"), "{}\n").unwrap(); // other files are carried over
    let model = Model::load(&base, DType::F32, &CPU).unwrap();
    let mut l = Lora::new(lora_config(4, 8.0, 0.1, &["c_attn", "c_proj", "w1"]), &model.config, 9, &CPU).unwrap();
    randomise_b(&mut l, 0.2, 10);

    let merged_dir = tmp.path().join("merged");
    lora::merge(&base, &l, &merged_dir).unwrap();

    // Same files, same index and config bytes, same tensor names per shard, untouched tensors identical.
    let list = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(list(&base), list(&merged_dir));
    for f in ["config.json", "model.safetensors.index.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(base.join(f)).unwrap(), std::fs::read(merged_dir.join(f)).unwrap(), "{f}");
    }
    for shard in list(&base).iter().filter(|f| f.ends_with(".safetensors")) {
        let a = candle_core::safetensors::load(base.join(shard), &CPU).unwrap();
        let b = candle_core::safetensors::load(merged_dir.join(shard), &CPU).unwrap();
        let mut ka: Vec<_> = a.keys().collect();
        let mut kb: Vec<_> = b.keys().collect();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb);
        for k in ka {
            let changed = max_abs_diff(&a[k], &b[k]) > 0.0;
            let adapted = k.ends_with("c_attn.weight") || k.ends_with("c_proj.weight") || k.ends_with("w1.weight");
            assert_eq!(changed, adapted, "{k}");
            assert_eq!(a[k].dtype(), b[k].dtype());
        }
    }

    let merged = Model::load(&merged_dir, DType::F32, &CPU).unwrap();
    let ids = ids_tensor(&random_ids(2, 10, spec.vocab_size, 4));
    let with_adapter = model.forward(&ids, Some(&l)).unwrap();
    let folded = merged.forward(&ids, None).unwrap();
    let plain = model.forward(&ids, None).unwrap();
    let diff = max_abs_diff(&with_adapter, &folded);
    println!("merged vs base + adapter: {diff:.2e}; adapter effect {:.2e}", max_abs_diff(&with_adapter, &plain));
    assert!(max_abs_diff(&with_adapter, &plain) > 1e-2, "the adapter must visibly change the logits");
    assert!(diff < 1e-5, "merged logits differ by {diff}");

    // Refuses to write over the base.
    assert!(lora::merge(&base, &l, &base).is_err());
}

#[test]
fn every_family_writes_peft_keys_and_merges_into_its_own_layout() {
    for family in [Family::Qwen2, Family::Qwen3, Family::Llama] {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let spec = TinySpec { shards: 2, init_std: 0.1, ..small_spec_of(family) };
        write_small(&base, &spec, 21);
        let model = Model::load(&base, DType::F32, &CPU).unwrap();
        let mut l = Lora::new(lora_config(4, 8.0, 0.1, &["q_proj", "v_proj", "down_proj"]), &model.config, 9, &CPU).unwrap();
        randomise_b(&mut l, 0.2, 10);
        // PEFT's own names for this family (what PeftModel.from_pretrained looks up).
        let names = l.param_names();
        assert_eq!(names.len(), spec.num_layers * 3 * 2);
        assert_eq!(names[0], "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "{family:?}");
        assert_eq!(names[3], "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", "{family:?}");
        assert_eq!(names[5], "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", "{family:?}");
        // The shapes of k_proj-sized adapters follow GQA.
        let (fan_in, fan_out) = model.config.linear_dims(Site::V);
        assert_eq!((fan_in, fan_out), (spec.hidden_size, model.config.num_kv_heads * model.config.head_dim));
        let v = l.adapter(0, Site::V).unwrap();
        assert_eq!((v.a.dims(), v.b.dims()), (&[4, fan_in][..], &[fan_out, 4][..]));

        // Save / load round trip.
        let adapter_dir = tmp.path().join("adapter");
        l.save(&adapter_dir).unwrap();
        let back = Lora::load(&adapter_dir, &model.config, &CPU).unwrap();
        assert_eq!(back.param_names(), names);

        // Merge rewrites exactly the adapted weights; the merged model equals base + adapter.
        let merged_dir = tmp.path().join("merged");
        lora::merge(&base, &l, &merged_dir).unwrap();
        let ids = ids_tensor(&random_ids(2, 10, spec.vocab_size, 4));
        let with_adapter = model.forward(&ids, Some(&l)).unwrap();
        let plain = model.forward(&ids, None).unwrap();
        let merged = Model::load(&merged_dir, DType::F32, &CPU).unwrap();
        let folded = merged.forward(&ids, None).unwrap();
        assert!(max_abs_diff(&with_adapter, &plain) > 1e-3, "{family:?}: the adapter must visibly change the logits");
        assert!(max_abs_diff(&with_adapter, &folded) < 1e-5, "{family:?}: merged logits differ");
        for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            let a = candle_core::safetensors::load(base.join(shard), &CPU).unwrap();
            let b = candle_core::safetensors::load(merged_dir.join(shard), &CPU).unwrap();
            for (k, t) in &a {
                let adapted = ["q_proj.weight", "v_proj.weight", "down_proj.weight"].iter().any(|s| k.ends_with(s));
                assert_eq!(max_abs_diff(t, &b[k]) > 0.0, adapted, "{family:?}: {k}");
            }
        }
        // A Qwen v1 target name on this family is refused, naming what can be adapted.
        let e = Lora::new(lora_config(4, 8.0, 0.0, &["c_attn"]), &model.config, 9, &CPU).unwrap_err().to_string();
        assert!(e.contains("c_attn") && e.contains("q_proj") && e.contains("all-linear"), "{e}");
    }
}

#[test]
fn family_configs_are_read_and_bad_options_named() {
    let cfg = |text: &str| ModelConfig::from_json_str(text, "config.json");
    let qwen2 = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 151936,
        "hidden_act": "silu", "use_sliding_window": false, "sliding_window": 32768, "torch_dtype": "bfloat16"}"#;
    let c = cfg(qwen2).unwrap();
    assert_eq!((c.family, c.head_dim, c.num_kv_heads, c.kv_groups()), (Family::Qwen2, 64, 2, 7));
    assert!(c.qkv_bias && !c.qk_norm && c.tie_word_embeddings && c.rope_base == 1e6);
    assert_eq!(c.qkv_width(), 896 + 2 * 128);

    let qwen3 = r#"{"model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000, "vocab_size": 151936, "attention_bias": false}"#;
    let c = cfg(qwen3).unwrap();
    assert!(c.qk_norm && !c.qkv_bias && !c.tie_word_embeddings);
    assert_eq!((c.q_width(), c.kv_width()), (5120, 1024));

    let llama = r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "vocab_size": 128256, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;
    let c = cfg(llama).unwrap();
    assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));

    // Options that would change the math are refused by key.
    for (bad, key) in [
        (llama.replace(r#""llama3""#, r#""yarn""#), "rope_scaling.rope_type"),
        (llama.replace(r#""model_type": "llama""#, r#""model_type": "mistral""#), "model_type"),
        (qwen2.replace(r#""use_sliding_window": false"#, r#""use_sliding_window": true"#), "use_sliding_window"),
        (qwen2.replace(r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#), "hidden_act"),
        (qwen2.replace(r#""num_key_value_heads": 2"#, r#""num_key_value_heads": 3"#), "num_key_value_heads"),
        (qwen2.replace("Qwen2ForCausalLM", "LlamaForCausalLM"), "architectures"),
    ] {
        let e = format!("{:#}", cfg(&bad).unwrap_err());
        assert!(e.contains(key) && e.contains("config.json"), "{key}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// AdamW and clipping.

#[test]
fn adamw_matches_hand_computed_steps() {
    // f(x) = sum(x^2), g = 2x; lr 0.1, weight decay 0.01, betas 0.9 / 0.999, eps 1e-8.
    // Step 1 for x = 1 by hand: x <- 1 * (1 - 0.1 * 0.01) = 0.999; m = 0.1 * 2 = 0.2; v = 0.001 * 4 = 0.004;
    // m_hat = 2, v_hat = 4: x <- 0.999 - 0.1 * 2 / (2 + 1e-8) = 0.8990000005.
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let mut x = Tensor::new(&[1.0f64, -2.0], &CPU).unwrap();
    let mut opt = AdamW::new(cfg, vec!["x".into()], &[&x]).unwrap();
    let want = [[0.8990000005, -1.89800000025], [0.7985190271685215, -1.7962725886447977], [0.6989111831582322, -1.6949445143849768]];
    for w in want {
        let g = (&x * 2.0).unwrap();
        opt.step(&mut [&mut x], &[&g], 0.1).unwrap();
        let got = x.to_vec1::<f64>().unwrap();
        for (a, b) in got.iter().zip(w) {
            assert!((a - b).abs() < 1e-12, "{got:?} vs {w:?}");
        }
    }
    assert_eq!(opt.steps(), 3);

    // f32 parameters: same values within f32 precision; moments stay f32.
    let mut y = Tensor::new(&[1.0f32, -2.0], &CPU).unwrap();
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.01, ..Default::default() }, vec!["y".into()], &[&y]).unwrap();
    for _ in 0..3 {
        let g = (&y * 2.0).unwrap();
        opt.step(&mut [&mut y], &[&g], 0.1).unwrap();
    }
    let got = y.to_vec1::<f32>().unwrap();
    assert!((got[0] as f64 - want[2][0]).abs() < 1e-6 && (got[1] as f64 - want[2][1]).abs() < 1e-6, "{got:?}");
}

#[test]
fn adamw_state_roundtrips() {
    let tmp = tempfile::tempdir().unwrap();
    let names = vec!["a".to_string(), "b".to_string()];
    let mut p = [Tensor::new(&[0.5f32, 1.5, -1.0], &CPU).unwrap(), Tensor::new(&[[2.0f32], [-3.0]], &CPU).unwrap()];
    let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let mut opt = AdamW::new(cfg.clone(), names.clone(), &[&p[0], &p[1]]).unwrap();
    let grads = |p: &[Tensor; 2]| [(p[0].sqr().unwrap() * 3.0).unwrap(), (&p[1] - 1.0).unwrap()];
    for _ in 0..2 {
        let g = grads(&p);
        let [p0, p1] = &mut p;
        opt.step(&mut [p0, p1], &[&g[0], &g[1]], 0.05).unwrap();
    }
    let path = tmp.path().join("optim.safetensors");
    opt.save(&path).unwrap();
    let mut restored = AdamW::load(&path, cfg.clone(), names.clone(), &[&p[0], &p[1]]).unwrap();
    assert_eq!(restored.steps(), 2);
    let mut q = p.clone();
    let g = grads(&p);
    let [p0, p1] = &mut p;
    opt.step(&mut [p0, p1], &[&g[0], &g[1]], 0.05).unwrap();
    let [q0, q1] = &mut q;
    restored.step(&mut [q0, q1], &[&g[0], &g[1]], 0.05).unwrap();
    for (a, b) in p.iter().zip(&q) {
        assert_eq!(to_f64_vec(a), to_f64_vec(b));
    }
    // Wrong parameter list: a clear error.
    let e = AdamW::load(&path, cfg, vec!["a".into(), "c".into()], &[&p[0], &p[1]]).err().unwrap();
    assert!(format!("{e:#}").contains("v.c") || format!("{e:#}").contains("m.c"), "{e:#}");
}

#[test]
fn clip_grad_norm_scales_correctly() {
    let mut g1 = Tensor::new(&[3.0f32, 0.0], &CPU).unwrap();
    let mut g2 = Tensor::new(&[[0.0f32], [4.0]], &CPU).unwrap();
    // Below the limit: untouched.
    let norm = clip_grad_norm(&mut [&mut g1, &mut g2], 10.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    assert_eq!(g1.to_vec1::<f32>().unwrap(), vec![3.0, 0.0]);
    // Above: scaled by max_norm / (norm + 1e-6), the pre-clip norm is returned.
    let norm = clip_grad_norm(&mut [&mut g1, &mut g2], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let coef = 1.0 / (5.0 + 1e-6);
    let a = g1.to_vec1::<f32>().unwrap();
    let b = g2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-6 && a[1] == 0.0);
    assert!((b[1] as f64 - 4.0 * coef).abs() < 1e-6 && b[0] == 0.0);
    assert!((global_norm(&[&g1, &g2]).unwrap() - 1.0).abs() < 1e-5);
}

// ---------------------------------------------------------------------------------------------------------
// Memorisation smoke test and generation.

fn memorise_run(recompute: bool) -> (Vec<f64>, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec { vocab_size: 512, seq_length: 64, init_std: 0.1, ..TinySpec::default() };
    write_tiny_checkpoint(tmp.path(), &spec, 42).unwrap();
    let model = Model::load(tmp.path(), DType::F32, &CPU).unwrap();
    let mut lora = Lora::new(lora_config(8, 16.0, 0.1, &["c_attn", "c_proj", "w1", "w2"]), &model.config, 42, &CPU).unwrap();
    let ids = random_ids(2, 24, spec.vocab_size, 77);
    let labels = labels_tensor(&ids, &[4, 4]);
    let ids = ids_tensor(&ids);
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, lora.param_names(), &lora.params()).unwrap();
    let mut dropout_rng = SplitMix::new(42);
    let mut losses = Vec::new();
    let start = Instant::now();
    for _ in 0..30 {
        let out = model.loss_and_grads(&ids, &labels, None, &lora, &mut dropout_rng, recompute).unwrap();
        losses.push(out.loss_sum().unwrap() / out.n_tokens as f64);
        let mut grads = out.grads;
        grads.scale(1.0 / out.n_tokens as f64).unwrap();
        clip_grad_norm(&mut grads.tensors_mut(), 1.0).unwrap();
        let g: Vec<Tensor> = grads.tensors().into_iter().cloned().collect();
        opt.step(&mut lora.params_mut(), &g.iter().collect::<Vec<_>>(), 1e-2).unwrap();
    }
    (losses, start.elapsed().as_secs_f64() / 30.0)
}

#[test]
fn memorises_a_small_batch_deterministically() {
    let (a, step_a) = memorise_run(false);
    let (b, step_b) = memorise_run(false);
    let (c, step_c) = memorise_run(true);
    println!("losses: {:?}", a.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>());
    println!("step time: {:.1} ms (recompute {:.1} ms, again {:.1} ms)", step_a * 1e3, step_c * 1e3, step_b * 1e3);
    assert!(a[29] <= 0.5 * a[0], "loss went from {} to {}", a[0], a[29]);
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "two runs differ");
    assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()), "recompute changed the run");
}

#[test]
fn generate_greedy_and_seeded_sampling() {
    let model = Model::load(&fixture_dir().join("tiny-ref"), DType::F32, &CPU).unwrap();
    let prompt = vec![3u32, 17, 42, 5];
    let greedy = GenerateOptions { max_new: 5, stop_token: None, sampling: Sampling::Greedy };
    let out = model.generate(&prompt, None, &greedy).unwrap();
    assert_eq!(out.len(), 5);
    // Each token is the argmax of the full forward over what came before.
    let mut seq = prompt.clone();
    for &tok in &out {
        let logits = model.forward(&Tensor::new(vec![seq.clone()], &CPU).unwrap(), None).unwrap();
        let last = logits.get(0).unwrap().get(seq.len() - 1).unwrap();
        assert_eq!(last.argmax(0).unwrap().to_scalar::<u32>().unwrap(), tok);
        seq.push(tok);
    }
    // Stop token: generation ends right after it.
    let stop = GenerateOptions { stop_token: Some(out[2]), ..greedy.clone() };
    let stopped = model.generate(&prompt, None, &stop).unwrap();
    let first = out.iter().position(|&t| t == out[2]).unwrap();
    assert_eq!(stopped, out[..=first].to_vec());
    // Seeded sampling is reproducible, differs across seeds, and approaches greedy as T -> 0.
    let sample = |seed, temperature| {
        let o = GenerateOptions { max_new: 8, stop_token: None, sampling: Sampling::Temperature { temperature, seed } };
        model.generate(&prompt, None, &o).unwrap()
    };
    assert_eq!(sample(1, 1.0), sample(1, 1.0));
    assert!((2..6).any(|s| sample(s, 1.0) != sample(1, 1.0)));
    assert_eq!(sample(1, 1e-4)[..5], out[..]);
}

/// A small f32 model of `family` (written under `tmp`) with an all-linear adapter whose B is random.
fn small_model_with_lora(family: Family, tmp: &Path) -> (TinySpec, Model, Lora) {
    let spec = small_spec_of(family);
    write_small(tmp, &spec, 3);
    let model = Model::load(tmp, DType::F32, &CPU).unwrap();
    let mut lora = Lora::new(lora_config(2, 4.0, 0.0, &["all-linear"]), &model.config, 1, &CPU).unwrap();
    randomise_b(&mut lora, 0.3, 2);
    (spec, model, lora)
}

#[test]
fn kv_cached_steps_equal_the_full_forward_in_every_family() {
    for family in Family::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let (spec, model, lora) = small_model_with_lora(family, tmp.path());
        let ids = random_ids(1, 12, spec.vocab_size, 9).remove(0);
        let full = model.forward(&ids_tensor(&[ids.clone()]), Some(&lora)).unwrap().squeeze(0).unwrap();
        // The same positions in pieces: a prefill of 5, two single tokens, then 5 more.
        let cache = lorahost::model::KvCache::default();
        let mut pieces = Vec::new();
        for (start, len) in [(0, 5), (5, 1), (6, 1), (7, 5)] {
            let hf = model.hidden_states_cached(&ids_tensor(&[ids[start..start + len].to_vec()]), Some(&lora), &cache).unwrap();
            pieces.push(hf.matmul(&model.weights.lm_head.t().unwrap()).unwrap());
        }
        assert_eq!(cache.len(), 12);
        let cached = Tensor::cat(&pieces, 0).unwrap();
        let diff = max_abs_diff(&cached, &full);
        assert!(diff < 1e-4, "{family:?}: cached logits differ from the full forward by {diff}");
    }
}

/// Timing on the brief's tiny model (real vocab 151936, hidden 64, 2 layers): not a correctness test.
/// `cargo test --test model -- --ignored --nocapture tiny_full_vocab_step_time`
#[test]
#[ignore]
fn tiny_full_vocab_step_time() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    write_tiny_checkpoint(tmp.path(), &TinySpec::default(), 1).unwrap();
    let model = Model::load(tmp.path(), DType::F32, &CPU).unwrap();
    println!("write + load: {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    let mut lora = Lora::new(lora_config(8, 32.0, 0.1, &["c_attn", "c_proj"]), &model.config, 42, &CPU).unwrap();
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, lora.param_names(), &lora.params()).unwrap();
    let ids = random_ids(2, 128, model.config.vocab_size, 1);
    let labels = labels_tensor(&ids, &[64, 64]);
    let ids = ids_tensor(&ids);
    let mut rng = SplitMix::new(0);
    for recompute in [false, true] {
        let mut times = Vec::new();
        for _ in 0..6 {
            let t = Instant::now();
            let out = model.loss_and_grads(&ids, &labels, None, &lora, &mut rng, recompute).unwrap();
            let mut grads = out.grads;
            grads.scale(1.0 / out.n_tokens as f64).unwrap();
            clip_grad_norm(&mut grads.tensors_mut(), 1.0).unwrap();
            let g: Vec<Tensor> = grads.tensors().into_iter().cloned().collect();
            opt.step(&mut lora.params_mut(), &g.iter().collect::<Vec<_>>(), 5e-5).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("2 x 128 tokens, recompute {recompute}: step median {:.1} ms (min {:.1})", times[3], times[0]);
    }
    let t = Instant::now();
    model.forward(&ids, None).unwrap();
    println!("forward with full logits: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
}

#[test]
fn all_linear_is_written_as_peft_reads_it_and_read_back() {
    // PEFT expands "all-linear" only as the whole `target_modules` value, never inside a list: the adapter file
    // names the family's modules instead, and a PEFT file with the bare string loads here too.
    let tmp = tempfile::tempdir().unwrap();
    let spec = small_spec_of(Family::Qwen2);
    write_small(tmp.path(), &spec, 1);
    let model = Model::load(tmp.path(), DType::F32, &CPU).unwrap();
    let l = Lora::new(lora_config(2, 4.0, 0.0, &["all-linear"]), &model.config, 1, &CPU).unwrap();
    let dir = tmp.path().join("adapter");
    l.save(&dir).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
    let names: Vec<&str> = cfg["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    assert_eq!(Lora::load(&dir, &model.config, &CPU).unwrap().adapters().len(), l.adapters().len());
    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap();
    let bare = text.replace(&serde_json::to_string_pretty(&cfg["target_modules"]).unwrap().replace('\n', "\n  "), "\"all-linear\"");
    assert!(bare.contains("\"all-linear\""), "{bare}");
    std::fs::write(dir.join(ADAPTER_CONFIG_FILE), bare).unwrap();
    assert_eq!(Lora::load(&dir, &model.config, &CPU).unwrap().param_names(), l.param_names());
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time_in_every_family() {
    for family in Family::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let (spec, model, lora) = small_model_with_lora(family, tmp.path());
        // Prompts of different lengths; the last ends 3 positions short of seq_length (32).
        let prompts: Vec<Vec<u32>> =
            [5, 1, 9, 3, 29].iter().enumerate().map(|(i, &t)| random_ids(1, t, spec.vocab_size, 20 + i as u64).remove(0)).collect();
        let rows: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        for sampling in [Sampling::Greedy, Sampling::Temperature { temperature: 1.0, seed: 5 }] {
            let opts = GenerateOptions { max_new: 8, stop_token: None, sampling };
            let alone: Vec<Vec<u32>> = prompts.iter().map(|p| model.generate(p, Some(&lora), &opts).unwrap()).collect();
            let batched = model.generate_batch(&rows, Some(&lora), &opts, &mut |_, _| false).unwrap();
            assert_eq!(batched, alone, "{family:?} {:?}", opts.sampling);
            assert!(alone[..4].iter().all(|o| o.len() == 8));
            assert_eq!(alone[4].len(), 4, "the context's end: 29 + 4 tokens fill seq_length 32 positions");

            // Each row ends at its own point: row 0 after 3 tokens, row 2 at its 5th token's value (a stop
            // rule per row, like a stop string), every row at the stop token (row 3's 2nd).
            let opts = GenerateOptions { stop_token: Some(alone[3][1]), ..opts };
            let rule = |row: usize, so_far: &[u32]| match row {
                0 => so_far.len() == 3,
                2 => so_far.last() == Some(&alone[2][4]),
                _ => false,
            };
            let alone: Vec<Vec<u32>> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| model.generate_with(p, Some(&lora), &opts, &mut |s| rule(i, s)).unwrap())
                .collect();
            let batched = model.generate_batch(&rows, Some(&lora), &opts, &mut |i, s| rule(i, s)).unwrap();
            assert_eq!(batched, alone, "{family:?} with stops");
            assert!(alone[0].len() <= 3 && alone[2].len() <= 5 && alone[3].len() <= 2);
            let mut ends: Vec<usize> = alone.iter().map(|o| o.len()).collect();
            ends.dedup();
            assert!(ends.len() > 2, "rows end at different points: {ends:?}");
        }
    }
}

#[test]
fn fusion_switches_parse_as_all_none_or_all_but_one_lever() {
    use lorahost::model::fusion::Fusion;
    assert_eq!(Fusion::parse("all"), Some(Fusion::ALL));
    assert_eq!(Fusion::parse("none"), Some(Fusion::NONE));
    assert_eq!(Fusion::parse("no-flash"), Some(Fusion { flash: false, ..Fusion::ALL }));
    assert_eq!(Fusion::parse("no-ds-tiles"), Some(Fusion { ds_tiles: false, ..Fusion::ALL }));
    // Every lever has its own switch: turning each one off leaves exactly one switch off.
    for (name, switch) in Fusion::LEVERS {
        let f = Fusion::parse(&format!("no-{name}")).unwrap_or_else(|| panic!("no-{name}"));
        assert_ne!(f, Fusion::ALL, "{name}");
        let mut back = f;
        *switch(&mut back) = true;
        assert_eq!(back, Fusion::ALL, "{name}");
    }
    for bad in ["some", "no-", "no-everything", "flash"] {
        assert_eq!(Fusion::parse(bad), None, "{bad}");
    }
}

#[test]
fn the_flash_work_list_covers_every_block_of_every_sequence_once_the_longest_first() {
    use lorahost::model::attention::{FlashBlocks, Packed};
    // Two rows of 200: sequences of 70 + 130, and 1 + 64 + 135 tokens.
    let packed = Packed::new(&[0, 70, 200, 201, 265, 400], 2, 200).unwrap();
    let seqs: Vec<(usize, usize, usize)> = packed.sequences().map(|s| (s.start / 200, s.start % 200, s.len())).collect();
    assert_eq!(seqs, vec![(0, 0, 70), (0, 70, 130), (1, 0, 1), (1, 1, 64), (1, 65, 135)]);
    let (with_tiles, n_tiles) = FlashBlocks::entries(seqs.iter().copied(), 64);
    let e: Vec<[u32; 4]> = with_tiles.iter().map(|(x, _)| *x).collect();
    // 64-token blocks: 2 + 3 + 1 + 1 + 3.
    assert_eq!(e.len(), 10);
    assert!(e.windows(2).all(|w| w[0][3] >= w[1][3]), "most work first: {e:?}");
    // Equal work keeps the batch order; the third blocks of the two 130+ sequences come first.
    assert_eq!(&e[..2], &[[0, 70, 130, 2], [1, 65, 135, 2]]);
    for &(row, first, len) in &seqs {
        let mut blocks: Vec<u32> = e.iter().filter(|x| x[..3] == [row as u32, first as u32, len as u32]).map(|x| x[3]).collect();
        blocks.sort();
        assert_eq!(blocks, (0..len.div_ceil(64) as u32).collect::<Vec<_>>(), "sequence {row}/{first}/{len}");
    }
    // The backward's dS tiles: each sequence's causal triangle of 64 x 64 tiles (nb (nb + 1) / 2), one after
    // the other in batch order; every entry of a sequence points at its sequence's first tile.
    assert_eq!(n_tiles, 3 + 6 + 1 + 1 + 6);
    let tiles: Vec<u32> = with_tiles.iter().map(|(_, t)| *t).collect();
    assert_eq!(tiles, vec![3, 11, 0, 3, 11, 0, 3, 9, 10, 11]);
    // The same per 128-token block (the long-sequence forward, dQ from the tiles): 1 + 2 + 1 + 1 + 2 entries,
    // pointing at the same tiles.
    let (long, long_tiles) = FlashBlocks::entries(seqs.iter().copied(), 128);
    assert_eq!(long_tiles, n_tiles);
    assert_eq!(long.iter().map(|(x, _)| x[3]).collect::<Vec<_>>(), vec![1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(long[0], ([0, 70, 130, 1], 3));
    assert_eq!(long[1], ([1, 65, 135, 1], 11));
    // Rows of one sequence each; 100 tokens are short (the 64-query forward), 512 long.
    let rows = FlashBlocks::rows(3, 100, &candle_core::Device::Cpu).unwrap();
    let t: Vec<u32> = rows.table.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(t, vec![0, 0, 100, 1, 1, 0, 100, 1, 2, 0, 100, 1, 0, 0, 100, 0, 1, 0, 100, 0, 2, 0, 100, 0]);
    let t: Vec<u32> = rows.table128.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(t, vec![0, 0, 100, 0, 1, 0, 100, 0, 2, 0, 100, 0]);
    assert!(!rows.forward128);
    assert!(FlashBlocks::rows(2, 512, &candle_core::Device::Cpu).unwrap().forward128);
}

#[test]
fn rope_tables_repeat_each_angle_in_both_halves_of_the_head_dim() {
    // The flash backward undoes RoPE reading only the first half of each table row (model/cuda/flash.cu,
    // store_rows): every pair (j, j + D/2) must share one angle, under every frequency scaling.
    use lorahost::model::attention::Rope;
    use lorahost::model::config::RopeScaling;
    let scalings = [
        RopeScaling::None,
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64.0 },
    ];
    for scaling in &scalings {
        for d in [64usize, 128] {
            let rope = Rope::new(300, d, 1_000_000.0, scaling, candle_core::DType::BF16, &candle_core::Device::Cpu).unwrap();
            let (cos, sin) = rope.tables();
            for table in [cos, sin] {
                let first: Vec<Vec<f32>> = table.narrow(1, 0, d / 2).unwrap().to_vec2().unwrap();
                let second: Vec<Vec<f32>> = table.narrow(1, d / 2, d / 2).unwrap().to_vec2().unwrap();
                assert_eq!(first, second, "{scaling:?}, head dim {d}");
                assert!(first[7].iter().any(|&x| x != first[7][0]), "the angles differ along a row");
            }
        }
    }
}
