//! `lorahost bench train`: training steps of a model at a named shape with random weights made on the
//! device (no checkpoint), through the trainer's own step (train/step.rs: the passes' forward/backward,
//! LoRA r8 on the recipe's matrices, normalisation, clipping, AdamW) and its prefetched batches, printing
//! step time, tokens/s and peak GPU memory as JSON. The GPU numbers of BENCHMARKS.md come from here.
//!
//! `--gpus N` ([`run_process`]): the same step data-parallel over N ranks (one process per GPU, NCCL), each
//! rank one pass of `micro_batch` random records per step, for the scaling efficiency (tokens/s on N GPUs
//! over N times one GPU's).
use crate::data::batch::Layout;
use crate::data::{self, TokenStream};
use crate::manifest::{Manifest, Packing};
use crate::model::config::{Family, ModelConfig};
use crate::model::fusion::Fusion;
use crate::model::lora::{Lora, LoraConfig};
use crate::rng::SplitMix;
use crate::model::transformer::Model;
use crate::model::weights::Weights;
use crate::train::batches::{self, Schedule};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::dist::{self, Collective, Single};
use crate::train::launch::{self, LaunchEnv};
use crate::train::step::{step as train_step, StepConfig};
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use std::path::PathBuf;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub shape: String,
    pub device: String,
    pub dtype: String,
    pub micro_batch: usize,
    /// Passes of `micro_batch` records per step (a manifest's `grad_accum`; 1 on random tokens).
    pub grad_accum: usize,
    /// "none" (padded) or "padding-free".
    pub packing: String,
    /// Tokens per record (random tokens) or the manifest's `max_seq_len`.
    pub seq: usize,
    pub recompute: bool,
    /// The fused kernels in use (they apply to bf16 on a GPU only; a padding-free pass runs without `rope`,
    /// `attention` and `flash`, see model/fusion.rs).
    pub fusion: Fusion,
    /// "random tokens" or the manifest whose token stream was trained on.
    pub data: String,
    pub lora_params: usize,
    /// Data-parallel ranks (GPUs), each running `micro_batch` records of every step.
    pub ranks: usize,
    pub timed_steps: usize,
    /// Median over the timed steps (forward + backward + optimizer), in ms.
    pub step_ms: f64,
    /// Tokens of the timed steps' records (padding excluded) over their total time.
    pub tokens_per_s: f64,
    /// Peak GPU memory in use by tensors (PyTorch's `max_memory_allocated`), GiB; None on the CPU.
    pub peak_gib: Option<f64>,
    /// Loss of every step, warm-up included.
    pub losses: Vec<f64>,
}

/// The model shapes benchmarks can name: the published configs' numbers, one family each.
pub const SHAPES: &str = "qwen-14b, qwen-7b, qwen-1.8b, qwen2.5-14b, qwen2.5-7b, qwen2.5-0.5b, qwen3-14b, qwen3-8b, llama-3-8b, tiny";

/// The 2023 recipe's adapted matrices in each family's names: Qwen v1's c_attn + both c_proj, which are
/// q, k, v, o and down elsewhere (what the Python baselines adapt too).
pub fn recipe_targets(family: Family) -> Vec<String> {
    let names: &[&str] = match family {
        Family::QwenV1 => &["c_attn", "c_proj"],
        _ => &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// The configuration of a named shape.
pub fn shape(name: &str) -> anyhow::Result<ModelConfig> {
    use crate::model::config::RopeScaling;
    // (family, hidden, layers, heads, kv heads, head dim, mlp width, vocab, rope base, tied)
    let (family, hidden, layers, heads, kv, head_dim, mlp, vocab, rope_base, tied) = match name {
        "qwen-14b" => (Family::QwenV1, 5120, 40, 40, 40, 128, 13696, 152064, 10000.0, false),
        "qwen-7b" => (Family::QwenV1, 4096, 32, 32, 32, 128, 11008, 151936, 10000.0, false),
        "qwen-1.8b" => (Family::QwenV1, 2048, 24, 16, 16, 128, 5504, 151936, 10000.0, false),
        "qwen2.5-14b" => (Family::Qwen2, 5120, 48, 40, 8, 128, 13824, 152064, 1e6, false),
        "qwen2.5-7b" => (Family::Qwen2, 3584, 28, 28, 4, 128, 18944, 152064, 1e6, false),
        "qwen2.5-0.5b" => (Family::Qwen2, 896, 24, 14, 2, 64, 4864, 151936, 1e6, true),
        "qwen3-14b" => (Family::Qwen3, 5120, 40, 40, 8, 128, 17408, 151936, 1e6, false),
        "qwen3-8b" => (Family::Qwen3, 4096, 36, 32, 8, 128, 12288, 151936, 1e6, false),
        "llama-3-8b" => (Family::Llama, 4096, 32, 32, 8, 128, 14336, 128256, 500000.0, false),
        "tiny" => (Family::QwenV1, 64, 2, 4, 4, 16, 128, 151936, 10000.0, false),
        other => bail!("unknown shape `{other}`: {SHAPES}"),
    };
    Ok(ModelConfig {
        family,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        mlp_width: mlp,
        vocab_size: vocab,
        eps: 1e-6,
        rope_base,
        rope_scaling: RopeScaling::None,
        seq_length: 4096,
        tie_word_embeddings: tied,
        qkv_bias: matches!(family, Family::QwenV1 | Family::Qwen2),
        qk_norm: family == Family::Qwen3,
    })
}

pub struct Options {
    pub shape: String,
    pub device: Device,
    pub dtype: DType,
    pub micro_batch: usize,
    pub seq: usize,
    pub recompute: bool,
    pub warmup: usize,
    pub steps: usize,
    pub fusion: Fusion,
    /// Train on this manifest's token stream with its `[train]` schedule (micro_batch, grad_accum, packing:
    /// the steps `lorahost run` takes) instead of records of `seq` random tokens, `micro_batch` per step.
    pub manifest: Option<PathBuf>,
    /// Overrides the manifest's `packing` (or packs the random records).
    pub packing: Option<Packing>,
    pub lr: f64,
}

/// Random weights at the named shape on the device, in the bench's model.
pub fn model(o: &Options) -> anyhow::Result<Model> {
    let config = shape(&o.shape)?;
    if o.seq > config.seq_length {
        bail!("--seq {} is longer than the shape's {}", o.seq, config.seq_length);
    }
    let weights = Weights::random(&config, 0.02, o.dtype, &o.device)?;
    let mut model = Model::new(config, weights, o.dtype, &o.device);
    model.fusion = o.fusion;
    if o.recompute {
        crate::train::run::offload_for_recompute(&mut model); // as `lorahost run` does
    }
    Ok(model)
}

pub fn run(o: &Options) -> anyhow::Result<TrainBench> {
    run_on(&model(o)?, o, &Single)
}

/// This process's rank of `bench train --gpus N` (`env`: the spawner's environment, or a launcher's): the
/// device becomes `cuda:LOCAL_RANK`; the report (whole-step tokens/s, as rank 0 sees it) on rank 0.
pub fn run_process(o: &Options, env: &LaunchEnv) -> anyhow::Result<Option<TrainBench>> {
    let master = env.master.as_deref().context("bench train under a launcher needs MASTER_ADDR and MASTER_PORT")?;
    let device = if o.device.is_cuda() { format!("cuda:{}", env.local_rank) } else { "cpu".into() };
    let comm = launch::join(env, master, &device, dist::DEFAULT_TIMEOUT)?;
    let run = || -> anyhow::Result<TrainBench> {
        let o = Options { device: crate::model::device::open(&device)?, manifest: o.manifest.clone(), shape: o.shape.clone(), ..*o };
        run_on(&model(&o)?, &o, &*comm)
    };
    match run() {
        Ok(report) => {
            comm.finish();
            Ok(comm.is_root().then_some(report))
        }
        Err(e) => Err(launch::failed(&*comm, e)),
    }
}

/// `--levers`: the same steps with the fused kernels switched on one at a time, on one model (the
/// weights are made once). The first row has none of them; each next row adds one.
pub fn run_levers(o: &Options) -> anyhow::Result<Vec<TrainBench>> {
    let mut model = model(o)?;
    let mut fusion = Fusion::NONE;
    let mut rows = Vec::new();
    model.fusion = fusion;
    rows.push(run_on(&model, o, &Single)?);
    for (_, switch) in Fusion::LEVERS {
        *switch(&mut fusion) = true;
        model.fusion = fusion;
        rows.push(run_on(&model, o, &Single)?);
    }
    Ok(rows)
}

fn run_on(model: &Model, o: &Options, comm: &dyn Collective) -> anyhow::Result<TrainBench> {
    let config = model.config.clone();
    let lora_cfg = LoraConfig {
        r: 8,
        alpha: 32.0,
        dropout: 0.1,
        targets: recipe_targets(config.family),
        base_model_name_or_path: o.shape.clone(),
    };
    let mut lora = Lora::new(lora_cfg, &config, 42, &o.device)?;
    let mut opt = AdamW::new(AdamWConfig::default(), lora.param_names(), &lora.params())?;
    opt.fused = model.fusion.optimizer;
    let total = o.warmup + o.steps;
    let (stream, schedule, seq) = match &o.manifest {
        Some(path) => manifest_data(path, o.packing, o.device.is_cuda())?,
        None => random_data(o, total, comm.world_size()),
    };
    let step_config = StepConfig { seed: 42, recompute: o.recompute, clip: Some(1.0) };
    reset_peak(&o.device)?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut tokens_timed = 0usize;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let upcoming = batches::prefetch(scope, &stream, schedule.clone(), 0..total as u64, 2);
        for step in 0..total {
            let out = train_step(model, &mut lora, &mut opt, &upcoming.recv()?, o.lr, &step_config, comm)?;
            losses.push(out.loss);
            if step >= o.warmup {
                times.push(out.seconds);
                tokens_timed += out.tokens;
            }
        }
        Ok(())
    })?;
    let peak_gib = peak(&o.device)?.map(|b| b as f64 / (1u64 << 30) as f64);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let step_s = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let total_s: f64 = times.iter().sum();
    Ok(TrainBench {
        shape: o.shape.clone(),
        device: format!("{:?}", o.device),
        dtype: format!("{:?}", o.dtype),
        micro_batch: schedule.layout.micro_batch,
        grad_accum: schedule.grad_accum,
        packing: schedule.layout.packing.name().into(),
        seq,
        recompute: o.recompute,
        fusion: model.fusion,
        data: o.manifest.as_ref().map_or("random tokens".into(), |p| p.display().to_string()),
        lora_params: lora.num_params(),
        ranks: comm.world_size(),
        timed_steps: times.len(),
        step_ms: step_s * 1e3,
        tokens_per_s: tokens_timed as f64 / total_s,
        peak_gib,
        losses,
    })
}

/// Records of `seq` random tokens, every position trained (the worst case for the loss over the
/// vocabulary), `micro_batch` of them per pass and one pass per rank each step; the schedule never
/// reshuffles them (one epoch).
fn random_data(o: &Options, steps: usize, ranks: usize) -> (TokenStream, Schedule, usize) {
    let records = o.micro_batch * steps * ranks;
    let n = records * o.seq;
    let mut rng = SplitMix::new(7);
    let stream = TokenStream {
        lengths: vec![o.seq as u32; records],
        ids: (0..n).map(|_| (rng.next_u64() % 151_000) as u32).collect(),
        trained: vec![1; n],
        dataset: vec![0; records],
        n_train: records,
    };
    let packing = o.packing.unwrap_or_default();
    let layout = Layout { packing, micro_batch: o.micro_batch, tokens_per_pass: o.micro_batch * o.seq, pad: 0 };
    (stream, Schedule { n_train: records, grad_accum: ranks, seed: 42, layout }, o.seq)
}

/// A manifest's training stream and the schedule `lorahost run` would take over it, laid out as `packing`
/// says, else as the manifest says, else as is faster on the benchmark's device.
fn manifest_data(path: &std::path::Path, packing: Option<Packing>, cuda: bool) -> anyhow::Result<(TokenStream, Schedule, usize)> {
    let mut m = Manifest::load(path)?;
    m.train.packing = Some(packing.or(m.train.packing).unwrap_or(Packing::default_on(cuda)));
    let plan = data::Plan::new(&m)?;
    let stream = data::prepare_plan(&plan)?.stream;
    let pad = plan.tokenizer.special_id("<|endoftext|>").unwrap_or(0);
    let schedule = Schedule::of(&m, stream.n_train, pad);
    Ok((stream, schedule, m.train.max_seq_len))
}

pub(crate) fn reset_peak(device: &Device) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        crate::model::cuda::reset_peak_memory(d)?;
    }
    let _ = device;
    Ok(())
}

/// Peak bytes in use on the GPU since [`reset_peak`]; None on the CPU.
pub(crate) fn peak(device: &Device) -> anyhow::Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return Ok(Some(crate::model::cuda::peak_memory(d)?));
    }
    let _ = device;
    Ok(None)
}
