//! `lorahost bench eval`: evaluation throughput at a model shape with random weights made on the device (as
//! `bench train`), through the code `lorahost eval` runs ([`ModelLm`]): (a) log-likelihood tokens/s over
//! MMLU-like records (a prompt, choices of 1-3 tokens, the prompt shared by the choices), (b) generated
//! tokens/s of greedy batched decoding. `scripts/hf-eval-throughput.py` measures HF transformers on the same
//! records and prints the same keys; BENCHMARKS.md has both.
use crate::eval::lm::{GenerateRequest, LanguageModel, LoglikRequest};
use crate::eval::ModelLm;
use crate::model::transformer::Model;
use crate::model::weights::Weights;
use crate::rng::SplitMix;
use anyhow::bail;
use candle_core::{DType, Device};
use std::time::Instant;

pub struct Options {
    pub shape: String,
    pub device: Device,
    pub dtype: DType,
    /// MMLU-like records scored.
    pub records: usize,
    pub choices: usize,
    /// The longest prompt; record i's is `prompt_length(prompt_tokens, i)`.
    pub prompt_tokens: usize,
    /// [`ModelLm::batch_tokens`].
    pub batch_tokens: usize,
    /// Prompts decoded together, of the records' prompt lengths.
    pub batch: usize,
    pub new_tokens: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalBench {
    /// "lorahost" (the HF script writes "hf-transformers").
    pub implementation: String,
    pub shape: String,
    pub device: String,
    pub dtype: String,
    pub records: usize,
    pub choices: usize,
    pub prompt_tokens: usize,
    pub batch_tokens: usize,
    /// What the log-likelihood part scored: each record's prompt once plus its choices' tokens.
    pub loglik_tokens: usize,
    pub loglik_s: f64,
    pub loglik_tokens_per_s: f64,
    pub batch: usize,
    pub new_tokens: usize,
    /// `batch` x `new_tokens`: every row runs to its budget (no stop token).
    pub generated_tokens: usize,
    pub generate_s: f64,
    pub generated_tokens_per_s: f64,
    /// Peak GPU memory in use by tensors, GiB; None on the CPU.
    pub peak_gib: Option<f64>,
}

/// Record i's prompt length: from `longest` down to about three quarters of it, so batches are ragged as
/// real prompts are (the HF script uses the same lengths). 7919 is a prime above any `longest / 4 + 1` of a
/// 4096-position shape, so consecutive records differ.
pub fn prompt_length(longest: usize, i: usize) -> usize {
    longest - (i * 7919) % (longest / 4 + 1)
}

/// Choice k of record i: 1 to 3 tokens (the HF script uses the same lengths).
pub fn choice_length(i: usize, k: usize) -> usize {
    1 + (i + k) % 3
}

fn random_ids(rng: &mut SplitMix, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

/// The records as log-likelihood requests, one per choice, random token ids below `vocab`.
pub fn records(o: &Options, vocab: usize) -> Vec<LoglikRequest> {
    let mut rng = SplitMix::new(11);
    let mut out = Vec::with_capacity(o.records * o.choices);
    for i in 0..o.records {
        let context = random_ids(&mut rng, prompt_length(o.prompt_tokens, i), vocab);
        for k in 0..o.choices {
            out.push(LoglikRequest { context: context.clone(), continuation: random_ids(&mut rng, choice_length(i, k), vocab) });
        }
    }
    out
}

pub fn run(o: &Options) -> anyhow::Result<EvalBench> {
    if o.records == 0 || o.choices == 0 || o.prompt_tokens == 0 || o.batch == 0 || o.new_tokens == 0 {
        bail!("bench eval: --records, --choices, --prompt-tokens, --batch and --new-tokens must be at least 1");
    }
    let config = super::train::shape(&o.shape)?;
    if o.prompt_tokens + o.new_tokens > config.seq_length {
        bail!("--prompt-tokens + --new-tokens ({}) are more than the shape's {}", o.prompt_tokens + o.new_tokens, config.seq_length);
    }
    let vocab = config.vocab_size;
    let weights = Weights::random(&config, 0.02, o.dtype, &o.device)?;
    let model = Model::new(config, weights, o.dtype, &o.device);
    let lm = ModelLm { model: &model, lora: None, batch_tokens: o.batch_tokens, pad: 0 };

    let requests = records(o, vocab);
    let loglik_tokens: usize = (0..o.records).map(|i| prompt_length(o.prompt_tokens, i)).sum::<usize>()
        + requests.iter().map(|r| r.continuation.len()).sum::<usize>();
    let mut rng = SplitMix::new(12);
    let prompts: Vec<Vec<u32>> = (0..o.batch).map(|i| random_ids(&mut rng, prompt_length(o.prompt_tokens, i), vocab)).collect();
    let rows: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let greedy = |max_new| GenerateRequest { max_new, stop_token: None, temperature: 0.0, seed: 0 };

    // Warm-up (kernels, the allocator's pool): one record, two tokens.
    lm.loglikelihoods(&requests[..o.choices])?;
    lm.generate_batch(&rows, &greedy(2), &mut |_, _| false)?;
    super::train::reset_peak(&o.device)?;

    let start = Instant::now();
    lm.loglikelihoods(&requests)?; // its results are on the host: the device is done
    let loglik_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let out = lm.generate_batch(&rows, &greedy(o.new_tokens), &mut |_, _| false)?;
    let generate_s = start.elapsed().as_secs_f64();
    let generated_tokens: usize = out.iter().map(|r| r.len()).sum();
    let peak_gib = super::train::peak(&o.device)?.map(|b| b as f64 / (1u64 << 30) as f64);
    Ok(EvalBench {
        implementation: "lorahost".into(),
        shape: o.shape.clone(),
        device: format!("{:?}", o.device),
        dtype: format!("{:?}", o.dtype),
        records: o.records,
        choices: o.choices,
        prompt_tokens: o.prompt_tokens,
        batch_tokens: o.batch_tokens,
        loglik_tokens,
        loglik_s,
        loglik_tokens_per_s: loglik_tokens as f64 / loglik_s,
        batch: o.batch,
        new_tokens: o.new_tokens,
        generated_tokens,
        generate_s,
        generated_tokens_per_s: generated_tokens as f64 / generate_s,
        peak_gib,
    })
}
