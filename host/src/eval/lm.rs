//! The model as evaluation sees it: log-likelihoods of continuations, per-token log-probabilities, and
//! generation. [`LanguageModel`] is the seam between the tasks, `eval` and `serve` and the model: [`ModelLm`]
//! implements it with the model's batched `forward` and its KV-cached `generate_with` (stop strings checked
//! after every token).
use crate::model::lora::Lora;
use crate::model::transformer::{argmax, GenerateOptions, Model, Sampling};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// One log-likelihood request, in tokens: score `continuation` after `context`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoglikRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// The answer to a [`LoglikRequest`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Loglik {
    /// Sum of the continuation tokens' log-probabilities (natural log).
    pub logprob: f64,
    /// Whether greedy decoding from the context would produce exactly the continuation.
    pub greedy: bool,
}

/// One token's log-probability given everything before it, with the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f64,
    /// The `top` most likely tokens at this position, most likely first.
    pub top: Vec<(u32, f64)>,
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub max_new: usize,
    /// A token that ends the generation (kept in the output).
    pub stop_token: Option<u32>,
    /// 0: greedy; else seeded sampling.
    pub temperature: f64,
    pub seed: u64,
}

pub trait LanguageModel {
    /// The longest sequence the model takes; longer inputs keep their last tokens.
    fn max_length(&self) -> usize;
    /// One answer per request, in order; batching is the implementation's business.
    fn loglikelihoods(&self, requests: &[LoglikRequest]) -> Result<Vec<Loglik>>;
    /// For `ids[1..]`: each token's log-probability given the tokens before it, with `top` alternatives.
    fn token_logprobs(&self, ids: &[u32], top: usize) -> Result<Vec<TokenLogprob>>;
    /// New tokens after `prompt`; `stop` sees the tokens so far and ends the generation when it says so (the
    /// caller cuts the text; a few tokens past the stop point may be returned).
    fn generate(&self, prompt: &[u32], req: &GenerateRequest, stop: &mut dyn FnMut(&[u32]) -> bool) -> Result<Vec<u32>>;
}

/// [`LanguageModel`] over [`Model`]: right-padded batched `forward` for log-likelihoods, KV-cached
/// generation.
pub struct ModelLm<'a> {
    pub model: &'a Model,
    pub lora: Option<&'a Lora>,
    /// Rows x padded length per forward: bounds the [rows, length, vocab] logits.
    pub batch_tokens: usize,
    /// Filler after a row's end; right padding never changes the logits before it (causal attention).
    pub pad: u32,
}

/// `logits` (one position) as f64 log-probabilities: x - logsumexp(x).
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// The `k` largest entries of `v`, largest first (ties: the lower id first).
fn top_k(v: &[f64], k: usize) -> Vec<(u32, f64)> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let k = k.min(v.len());
    if k == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i as u32, v[i])).collect()
}

/// A request as one model row: the input tokens and where the continuation's predictions start.
struct Row {
    input: Vec<u32>,
    /// Positions `start..input.len()` predict `targets`.
    start: usize,
    targets: Vec<u32>,
}

impl Row {
    /// As the harness does: context + continuation, keep the last `max_len + 1` tokens, drop the last (it
    /// is only predicted). An empty context is not allowed here (the caller puts a token there).
    fn new(r: &LoglikRequest, max_len: usize) -> Result<Row> {
        if r.continuation.is_empty() {
            bail!("a log-likelihood request with an empty continuation");
        }
        if r.context.is_empty() {
            bail!("a log-likelihood request with an empty context (start it with the end-of-text token)");
        }
        let mut all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        if all.len() > max_len + 1 {
            all.drain(..all.len() - (max_len + 1));
        }
        let n = r.continuation.len().min(all.len() - 1);
        let targets = all[all.len() - n..].to_vec();
        all.pop();
        Ok(Row { start: all.len() - n, input: all, targets })
    }
}

impl ModelLm<'_> {
    /// Log-probabilities [len, vocab] at positions `start..start+len` of `row` of a forward's logits.
    fn position_logprobs(logits: &Tensor, row: usize, start: usize, len: usize) -> Result<Vec<Vec<f64>>> {
        let rows: Vec<Vec<f32>> = logits.get(row)?.narrow(0, start, len)?.to_dtype(DType::F32)?.to_vec2()?;
        Ok(rows.iter().map(|r| log_softmax(r)).collect())
    }

    fn forward(&self, inputs: &[&[u32]]) -> Result<Tensor> {
        let t = inputs.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(inputs.len() * t);
        for r in inputs {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.pad, t - r.len()));
        }
        let ids = Tensor::from_vec(ids, (inputs.len(), t), &self.model.device)?;
        self.model.forward(&ids, self.lora)
    }
}

impl LanguageModel for ModelLm<'_> {
    fn max_length(&self) -> usize {
        self.model.config.seq_length
    }

    fn loglikelihoods(&self, requests: &[LoglikRequest]) -> Result<Vec<Loglik>> {
        let rows: Vec<Row> = requests.iter().map(|r| Row::new(r, self.max_length())).collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(rows.len());
        let mut i = 0;
        while i < rows.len() {
            // Consecutive rows (a record's choices share the context) fill one forward up to the budget.
            let mut j = i + 1;
            let mut longest = rows[i].input.len();
            while j < rows.len() {
                let l = longest.max(rows[j].input.len());
                if l * (j + 1 - i) > self.batch_tokens.max(1) {
                    break;
                }
                longest = l;
                j += 1;
            }
            let inputs: Vec<&[u32]> = rows[i..j].iter().map(|r| r.input.as_slice()).collect();
            let logits = self.forward(&inputs)?;
            for (k, row) in rows[i..j].iter().enumerate() {
                let lp = Self::position_logprobs(&logits, k, row.start, row.targets.len())?;
                let logprob = lp.iter().zip(&row.targets).map(|(p, &t)| p[t as usize]).sum();
                let greedy = lp.iter().zip(&row.targets).all(|(p, &t)| argmax(p.iter().copied()) == t as usize);
                out.push(Loglik { logprob, greedy });
            }
            i = j;
        }
        Ok(out)
    }

    fn token_logprobs(&self, ids: &[u32], top: usize) -> Result<Vec<TokenLogprob>> {
        if ids.len() < 2 {
            return Ok(vec![]);
        }
        if ids.len() > self.max_length() {
            bail!("{} tokens, more than the model's {}", ids.len(), self.max_length());
        }
        let input = &ids[..ids.len() - 1];
        let logits = self.forward(&[input])?;
        let lp = Self::position_logprobs(&logits, 0, 0, input.len())?;
        Ok(lp.iter().zip(&ids[1..]).map(|(p, &id)| TokenLogprob { id, logprob: p[id as usize], top: top_k(p, top) }).collect())
    }

    fn generate(&self, prompt: &[u32], req: &GenerateRequest, stop: &mut dyn FnMut(&[u32]) -> bool) -> Result<Vec<u32>> {
        let mut prompt = prompt;
        if prompt.len() >= self.max_length() {
            prompt = &prompt[prompt.len() + 1 - self.max_length()..]; // keep the last tokens, leave room for one
        }
        let sampling = match req.temperature > 0.0 {
            true => Sampling::Temperature { temperature: req.temperature, seed: req.seed },
            false => Sampling::Greedy,
        };
        let opts = GenerateOptions { max_new: req.max_new, stop_token: req.stop_token, sampling };
        self.model.generate_with(prompt, self.lora, &opts, stop)
    }
}

/// The harness's split of a (context, continuation) text pair into tokens: trailing whitespace of the context
/// moves to the continuation; then `context + continuation` is tokenized whole and split at the length of the
/// context's own tokens (which are the request's context), so the continuation's tokens are those the model
/// would see in the joined text. An empty context becomes `[bos]`.
pub fn encode_pair(tok: &dyn crate::tokenizer::Tokenizer, context: &str, continuation: &str, bos: u32) -> LoglikRequest {
    let trimmed = context.trim_end_matches(|c: char| c.is_whitespace());
    let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    let mut whole = Vec::new();
    tok.encode_ordinary(&format!("{context}{continuation}"), &mut whole);
    let mut ctx = Vec::new();
    tok.encode_ordinary(context, &mut ctx);
    let cont = whole.split_off(ctx.len().min(whole.len()));
    LoglikRequest { context: if ctx.is_empty() { vec![bos] } else { ctx }, continuation: cont }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_top_and_rows() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f64 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(argmax(lp.iter().copied()), 2);
        assert_eq!(top_k(&lp, 2).iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(top_k(&[0.5, 0.5, 0.1], 2).iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        let r = Row::new(&LoglikRequest { context: vec![1, 2, 3], continuation: vec![4, 5] }, 100).unwrap();
        assert_eq!((r.input, r.start, r.targets), (vec![1, 2, 3, 4], 2, vec![4, 5]));
        // Too long: the last max_len + 1 tokens are kept.
        let r = Row::new(&LoglikRequest { context: vec![1, 2, 3], continuation: vec![4, 5] }, 3).unwrap();
        assert_eq!((r.input, r.start, r.targets), (vec![2, 3, 4], 1, vec![4, 5]));
        assert!(Row::new(&LoglikRequest { context: vec![], continuation: vec![1] }, 3).is_err());
    }
}
