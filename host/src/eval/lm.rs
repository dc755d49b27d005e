//! The model as evaluation sees it: log-likelihoods of continuations, per-token log-probabilities, and
//! generation. [`LanguageModel`] is the seam between the tasks, `eval` and `serve` and the model: [`ModelLm`]
//! implements it over the model's KV cache: a record's choices share one run of the prompt (their
//! continuations run as one batch against its cache), and generation runs batched
//! (`Model::generate_batch`, stop strings checked after every token).
use crate::model::lora::Lora;
use crate::model::transformer::{argmax, right_padded, GenerateOptions, Model, Sampling};
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
    /// New tokens after each prompt, generated together; `stop` sees a row's index and its tokens so far and
    /// ends that row when it says so (the caller cuts the text; a few tokens past the stop point may be
    /// returned). Each row gets what [`LanguageModel::generate`] gives it alone.
    fn generate_batch(&self, prompts: &[&[u32]], req: &GenerateRequest, stop: &mut dyn FnMut(usize, &[u32]) -> bool) -> Result<Vec<Vec<u32>>>;

    /// [`LanguageModel::generate_batch`] for one prompt.
    fn generate(&self, prompt: &[u32], req: &GenerateRequest, stop: &mut dyn FnMut(&[u32]) -> bool) -> Result<Vec<u32>> {
        let mut out = self.generate_batch(&[prompt], req, &mut |_, so_far| stop(so_far))?;
        Ok(out.pop().expect("one answer per prompt"))
    }
}

/// The default of `batch_tokens` ([`ModelLm`]; `lorahost eval --batch-tokens`).
pub const BATCH_TOKENS: usize = 4096;

/// [`LanguageModel`] over [`Model`]: shared-prompt log-likelihoods and batched generation, both KV-cached.
pub struct ModelLm<'a> {
    pub model: &'a Model,
    pub lora: Option<&'a Lora>,
    /// Rows x padded length per forward ([`BATCH_TOKENS`] by default): bounds the activations, the cache
    /// copies and the [rows, length, vocab] logits.
    pub batch_tokens: usize,
    /// Filler after a row's end; right padding never changes the logits before it (causal attention).
    pub pad: u32,
}

/// logsumexp of `logits` (one position), in f64.
fn logsumexp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln()
}

/// `logits` (one position) as f64 log-probabilities: x - logsumexp(x).
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let lse = logsumexp(logits);
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// Adds one position to a [`Loglik`]: the target's log-probability under `logits`, and whether it is the
/// most likely token (argmax of the logits: the same order as of the log-probabilities).
fn add_position(acc: &mut Loglik, logits: &[f32], target: u32) {
    acc.logprob += logits[target as usize] as f64 - logsumexp(logits);
    acc.greedy &= argmax(logits.iter().copied()) == target as usize;
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
    /// Positions `start..input.len()` predict `targets`; `input[..=start]` is the context the continuation
    /// is scored after (shared by a record's choices).
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

    /// The tokens run once for every row that has the same.
    fn prefix(&self) -> &[u32] {
        &self.input[..=self.start]
    }

    /// The tokens run after the prefix: the continuation but its last.
    fn rest(&self) -> &[u32] {
        &self.input[self.start + 1..]
    }
}

/// Consecutive rows with the same prefix (a record's choices), as index ranges.
fn shared_prefixes(rows: &[Row]) -> Vec<std::ops::Range<usize>> {
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if rows[g.start].prefix() == r.prefix() => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    groups
}

/// Consecutive items in runs whose count x longest `len` stays within `budget` (at least one each).
fn runs_within(lens: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let (mut j, mut longest) = (i + 1, lens[i]);
        while j < lens.len() && longest.max(lens[j]) * (j + 1 - i) <= budget.max(1) {
            longest = longest.max(lens[j]);
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

impl ModelLm<'_> {
    /// Log-probabilities [len, vocab] at positions `start..start+len` of `row` of a forward's logits.
    fn position_logprobs(logits: &Tensor, row: usize, start: usize, len: usize) -> Result<Vec<Vec<f64>>> {
        let rows: Vec<Vec<f32>> = logits.get(row)?.narrow(0, start, len)?.to_dtype(DType::F32)?.to_vec2()?;
        Ok(rows.iter().map(|r| log_softmax(r)).collect())
    }

    fn forward(&self, inputs: &[&[u32]]) -> Result<Tensor> {
        self.model.forward(&right_padded(inputs, self.pad, &self.model.device)?, self.lora)
    }

    /// The rows of `groups` (each sharing its prefix): the prefixes run once, right-padded in one batch; the
    /// last prefix position predicts each row's first target; the rows' rests then run against a copy of
    /// their prefix's cache, batched. One answer per row, in order.
    fn shared_logliks(&self, rows: &[Row], groups: &[std::ops::Range<usize>]) -> Result<Vec<Loglik>> {
        let device = &self.model.device;
        let prefixes: Vec<&[u32]> = groups.iter().map(|g| rows[g.start].prefix()).collect();
        let t = prefixes.iter().map(|p| p.len()).max().unwrap_or(0);
        let (cache, last) = self.model.prefill(&prefixes, self.pad, self.lora)?;
        let first: Vec<Vec<f32>> = self.model.logits(&last)?.to_dtype(DType::F32)?.to_vec2()?;

        let offset = groups[0].start;
        let mut out = vec![Loglik { logprob: 0.0, greedy: true }; groups.last().map_or(0, |g| g.end) - offset];
        // (row, its group) for the rows with more than one target; one-token choices are done here.
        let mut longer = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            for i in g.clone() {
                add_position(&mut out[i - offset], &first[gi], rows[i].targets[0]);
                if rows[i].targets.len() > 1 {
                    longer.push((i, gi));
                }
            }
        }
        // A row whose prompt ends near the model's length runs alone: padded to a longer rest, its padding
        // would sit past the last position. The others run in chunks that copy their rows' prefix caches:
        // rows x (prefix + rest) within the budget.
        let widest = longer.iter().map(|&(i, _)| rows[i].rest().len()).max().unwrap_or(0);
        let (mut longer, edge): (Vec<_>, Vec<_>) =
            longer.into_iter().partition(|&(i, _)| rows[i].prefix().len() + widest <= self.max_length());
        let spans: Vec<usize> = longer.iter().map(|&(i, _)| t + rows[i].rest().len()).collect();
        let mut chunks = runs_within(&spans, self.batch_tokens);
        chunks.extend((longer.len()..longer.len() + edge.len()).map(|k| k..k + 1));
        longer.extend(edge);
        for chunk in chunks {
            let part = &longer[chunk];
            let sub = cache.rows(&part.iter().map(|&(_, g)| g).collect::<Vec<_>>())?;
            let rests: Vec<&[u32]> = part.iter().map(|&(i, _)| rows[i].rest()).collect();
            let width = rests.iter().map(|r| r.len()).max().unwrap_or(0);
            let hf = self.model.hidden_states_cached(&right_padded(&rests, self.pad, device)?, self.lora, &sub)?;
            // One transfer per chunk (pad positions included: the rests differ by a token or two).
            let logits: Vec<Vec<Vec<f32>>> =
                self.model.logits(&hf)?.reshape((part.len(), width, self.model.config.vocab_size))?.to_dtype(DType::F32)?.to_vec3()?;
            for (&(i, _), positions) in part.iter().zip(&logits) {
                // zip stops at the row's own targets: its pad positions are never read.
                for (p, &target) in positions.iter().zip(&rows[i].targets[1..]) {
                    add_position(&mut out[i - offset], p, target);
                }
            }
        }
        Ok(out)
    }
}

impl LanguageModel for ModelLm<'_> {
    fn max_length(&self) -> usize {
        self.model.config.seq_length
    }

    fn loglikelihoods(&self, requests: &[LoglikRequest]) -> Result<Vec<Loglik>> {
        let rows: Vec<Row> = requests.iter().map(|r| Row::new(r, self.max_length())).collect::<Result<_>>()?;
        let groups = shared_prefixes(&rows);
        let mut out = Vec::with_capacity(rows.len());
        // Records whose prefixes fill one batched run within the budget.
        let lens: Vec<usize> = groups.iter().map(|g| rows[g.start].prefix().len()).collect();
        for run in runs_within(&lens, self.batch_tokens) {
            out.extend(self.shared_logliks(&rows, &groups[run])?);
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

    fn generate_batch(&self, prompts: &[&[u32]], req: &GenerateRequest, stop: &mut dyn FnMut(usize, &[u32]) -> bool) -> Result<Vec<Vec<u32>>> {
        // Keep each prompt's last tokens, leaving room for one new token.
        let keep = self.max_length() - 1;
        let prompts: Vec<&[u32]> = prompts.iter().map(|p| if p.len() > keep { &p[p.len() - keep..] } else { *p }).collect();
        let sampling = match req.temperature > 0.0 {
            true => Sampling::Temperature { temperature: req.temperature, seed: req.seed },
            false => Sampling::Greedy,
        };
        let opts = GenerateOptions { max_new: req.max_new, stop_token: req.stop_token, sampling };
        self.model.generate_batch(&prompts, self.lora, &opts, stop)
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

    #[test]
    fn shared_prefixes_and_runs() {
        let row = |context: Vec<u32>, continuation: Vec<u32>| Row::new(&LoglikRequest { context, continuation }, 100).unwrap();
        let r = row(vec![1, 2], vec![3, 4, 5]);
        assert_eq!((r.prefix(), r.rest()), (&[1u32, 2][..], &[3u32, 4][..]));
        let rows = [row(vec![1, 2], vec![3]), row(vec![1, 2], vec![4, 5]), row(vec![1], vec![2]), row(vec![1, 2], vec![3])];
        assert_eq!(shared_prefixes(&rows), vec![0..2, 2..3, 3..4]);
        // count x longest within the budget; an item over it runs alone.
        assert_eq!(runs_within(&[3, 3, 5, 1, 9, 2], 10), vec![0..2, 2..4, 4..5, 5..6]);
        assert_eq!(runs_within(&[3, 3], 0), vec![0..1, 1..2]);
    }
}
