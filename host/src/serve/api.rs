//! The endpoints: OpenAI-style `/v1/completions` (what lm-evaluation-harness's `local-completions` model
//! calls, `echo` + `logprobs` for log-likelihoods) and the 2023 challenge's `/process`, `/tokenize`,
//! `/decode` (what HELM called). Each takes the JSON body and answers JSON or an [`HttpError`].
use super::http::HttpError;
use crate::eval::lm::{GenerateRequest, LanguageModel, TokenLogprob};
use crate::eval::run::cut_at_stop;
use crate::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Bounds on what one request may ask for.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    pub max_prompts: usize,
    pub max_new_tokens: usize,
    pub max_logprobs: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits { max_prompts: 64, max_new_tokens: 1024, max_logprobs: 20 }
    }
}

/// What the endpoints share: the model (one request at a time), its tokenizer, the limits.
pub struct Api<'a> {
    pub lm: &'a (dyn LanguageModel + Sync),
    pub tok: &'a dyn Tokenizer,
    pub model_name: String,
    pub limits: ApiLimits,
    /// The model answers one request at a time (its own kernels use every core).
    pub busy: Mutex<()>,
}

fn bad(message: impl Into<String>) -> HttpError {
    HttpError::new(400, message)
}

/// The body as `T`, or a 400 naming the field that is wrong.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." { String::new() } else { format!("`{path}`: ") };
        bad(format!("invalid JSON body: {at}{}", e.into_inner()))
    })
}

/// `prompt` of a completion request: a text, a list of texts, token ids, or a list of token-id lists.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    model: Option<String>,
    #[serde(default = "sixteen")]
    max_tokens: usize,
    #[serde(default = "one_f64")]
    temperature: f64,
    #[serde(default = "one_f64")]
    top_p: f64,
    #[serde(default = "one_usize")]
    n: usize,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    echo: bool,
    /// How many alternatives per position; null/absent: no logprobs.
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    user: Option<String>,
}

fn sixteen() -> usize {
    16
}
fn one_f64() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}

/// The completion of one prompt: prompt and new tokens with their log-probabilities (the first prompt
/// token has none).
struct Completed {
    prompt: Vec<u32>,
    new: Vec<u32>,
    /// For `prompt[1..] ++ new`, in order; empty unless scored.
    logprobs: Vec<TokenLogprob>,
    finish: &'static str,
}

impl Api<'_> {
    fn check_vocab(&self, ids: &[u32]) -> Result<(), HttpError> {
        let vocab = self.tok.vocab_size() as u32;
        match ids.iter().find(|&&t| t >= vocab) {
            Some(id) => Err(bad(format!("token id {id} is outside the vocabulary (0..{vocab})"))),
            None => Ok(()),
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), HttpError> {
        if ids.is_empty() {
            return Err(bad("an empty prompt: give at least one token"));
        }
        self.check_vocab(ids)?;
        if ids.len() > self.lm.max_length() {
            return Err(bad(format!("the prompt has {} tokens, more than the model's {}", ids.len(), self.lm.max_length())));
        }
        Ok(())
    }

    /// Generates up to `max_new` tokens after each prompt, all prompts in one batched generation, and, when
    /// `score`, scores each whole sequence (one more forward per sequence: only when log-probabilities are
    /// asked for).
    #[allow(clippy::too_many_arguments)]
    fn complete(&self, prompts: Vec<Vec<u32>>, max_new: usize, temperature: f64, seed: u64, stop: &[String], top: usize, score: bool) -> Result<Vec<Completed>, HttpError> {
        for ids in &prompts {
            self.check_ids(ids)?;
        }
        // Each row stops at the model's length on its own; `max_new` bounds them all.
        let rooms: Vec<usize> = prompts.iter().map(|ids| max_new.min(self.lm.max_length() - ids.len())).collect();
        let _guard = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let req = GenerateRequest { max_new: rooms.iter().copied().max().unwrap_or(0), stop_token: self.tok.special_id("<|endoftext|>"), temperature, seed };
        let tok = self.tok;
        let news = if req.max_new == 0 {
            vec![vec![]; prompts.len()]
        } else {
            let mut stopper = |row: usize, so_far: &[u32]| {
                let text = tok.decode(so_far);
                so_far.len() >= rooms[row] || stop.iter().any(|s| !s.is_empty() && text.contains(s.as_str()))
            };
            let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            self.lm.generate_batch(&rows, &req, &mut stopper).map_err(internal)?
        };
        let mut done = Vec::with_capacity(prompts.len());
        for ((ids, mut new), room) in prompts.into_iter().zip(news).zip(rooms) {
            new.truncate(room);
            let finish = if new.len() < room { "stop" } else { "length" };
            let all: Vec<u32> = ids.iter().chain(&new).copied().collect();
            let logprobs = if score { self.lm.token_logprobs(&all, top).map_err(internal)? } else { Vec::new() };
            done.push(Completed { prompt: ids, new, logprobs, finish });
        }
        Ok(done)
    }

    /// `POST /v1/completions`.
    pub fn completions(&self, body: &[u8]) -> Result<Value, HttpError> {
        let r: CompletionRequest = parse(body)?;
        if r.stream {
            return Err(bad("`stream`: streaming is not supported; send stream = false"));
        }
        if r.n != 1 {
            return Err(bad("`n`: only n = 1 is supported"));
        }
        if r.top_p != 1.0 {
            return Err(bad("`top_p`: only 1.0 is supported"));
        }
        if !(r.temperature >= 0.0 && r.temperature.is_finite()) {
            return Err(bad("`temperature` must be 0 (greedy) or positive"));
        }
        if r.max_tokens > self.limits.max_new_tokens {
            return Err(bad(format!("`max_tokens` {} is over the limit of {}", r.max_tokens, self.limits.max_new_tokens)));
        }
        let top = r.logprobs.unwrap_or(0);
        if top > self.limits.max_logprobs {
            return Err(bad(format!("`logprobs` {top} is over the limit of {}", self.limits.max_logprobs)));
        }
        let _ = (&r.model, &r.user);
        let prompts: Vec<Vec<u32>> = match r.prompt {
            Prompt::Text(t) => vec![self.encode(&t)],
            Prompt::Texts(ts) => ts.iter().map(|t| self.encode(t)).collect(),
            Prompt::Ids(ids) => vec![ids],
            Prompt::IdLists(l) => l,
        };
        if prompts.is_empty() || prompts.len() > self.limits.max_prompts {
            return Err(bad(format!("`prompt`: give 1 to {} prompts, not {}", self.limits.max_prompts, prompts.len())));
        }
        let stop = match r.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        let mut choices = Vec::with_capacity(prompts.len());
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        let completed = self.complete(prompts, r.max_tokens, r.temperature, r.seed.unwrap_or(0), &stop, top, r.logprobs.is_some())?;
        for (index, c) in completed.iter().enumerate() {
            prompt_tokens += c.prompt.len();
            completion_tokens += c.new.len();
            choices.push(self.completion_choice(index, c, r.echo, r.logprobs.is_some(), &stop));
        }
        Ok(json!({
            "id": format!("cmpl-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())),
            "object": "text_completion",
            "created": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "model": self.model_name,
            "choices": choices,
            "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens },
        }))
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.tok.encode_ordinary(text, &mut ids);
        ids
    }

    /// One `choices[i]`: the text (prompt first with `echo`) and, when asked, per-token log-probabilities in
    /// the OpenAI shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
    fn completion_choice(&self, index: usize, c: &Completed, echo: bool, with_logprobs: bool, stop: &[String]) -> Value {
        let new_text = self.tok.decode(&c.new);
        let cut = cut_at_stop(&new_text, stop);
        let prompt_text = if echo { self.tok.decode(&c.prompt) } else { String::new() };
        let text = format!("{prompt_text}{cut}");
        let logprobs = with_logprobs.then(|| {
            // Positions shown: the prompt's (with echo) then the new tokens.
            let skip = if echo { 0 } else { c.prompt.len() };
            let ids: Vec<u32> = c.prompt.iter().chain(&c.new).copied().skip(skip).collect();
            let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
            let mut offset = 0usize;
            for (k, &id) in ids.iter().enumerate() {
                let pos = k + skip;
                let piece = self.tok.decode(&[id]);
                offsets.push(offset);
                offset += piece.chars().count();
                tokens.push(piece);
                if pos == 0 {
                    lps.push(Value::Null);
                    tops.push(Value::Null);
                } else {
                    let lp = &c.logprobs[pos - 1];
                    lps.push(json!(lp.logprob));
                    tops.push(self.top_map(&lp.top));
                }
            }
            json!({ "tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets })
        });
        json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish })
    }

    /// Alternatives as `{token text: logprob}` (the most likely kept where two tokens share a text).
    fn top_map(&self, top: &[(u32, f64)]) -> Value {
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        for &(id, lp) in top {
            m.entry(self.tok.decode(&[id])).or_insert(lp);
        }
        json!(m)
    }

    /// `POST /process` (the 2023 challenge's API).
    pub fn process(&self, body: &[u8]) -> Result<Value, HttpError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ProcessRequest {
            prompt: String,
            #[serde(default = "one_usize")]
            num_samples: usize,
            #[serde(default = "fifty")]
            max_new_tokens: usize,
            /// Validated, but sampling draws from the whole distribution: the model's `generate` has no top-k
            /// yet (docs/eval.md says so). At temperature 0 (how HELM scores) it makes no difference.
            #[serde(default = "default_top_k")]
            top_k: usize,
            #[serde(default = "default_temperature")]
            temperature: f64,
            #[serde(default)]
            seed: Option<u64>,
            #[serde(default)]
            echo_prompt: Option<bool>,
        }
        fn fifty() -> usize {
            50
        }
        fn default_top_k() -> usize {
            200
        }
        fn default_temperature() -> f64 {
            0.8
        }
        let start = Instant::now();
        let r: ProcessRequest = parse(body)?;
        if r.num_samples != 1 {
            return Err(bad("`num_samples`: only 1 is supported"));
        }
        if r.top_k == 0 {
            return Err(bad("`top_k` must be at least 1"));
        }
        if !(r.temperature >= 0.0 && r.temperature.is_finite()) {
            return Err(bad("`temperature` must be 0 (greedy) or positive"));
        }
        if r.max_new_tokens > self.limits.max_new_tokens {
            return Err(bad(format!("`max_new_tokens` {} is over the limit of {}", r.max_new_tokens, self.limits.max_new_tokens)));
        }
        let ids = self.encode(&r.prompt);
        let c = self.complete(vec![ids], r.max_new_tokens, r.temperature, r.seed.unwrap_or(0), &[], 1, true)?.remove(0);
        let skip = c.prompt.len() - 1;
        let mut tokens = Vec::with_capacity(c.new.len());
        let mut total = 0.0;
        for (k, &id) in c.new.iter().enumerate() {
            let lp = &c.logprobs[skip + k];
            total += lp.logprob;
            tokens.push(json!({ "text": self.tok.decode(&[id]), "logprob": lp.logprob, "top_logprob": self.top_map(&lp.top) }));
        }
        let new_text = self.tok.decode(&c.new);
        let text = if r.echo_prompt.unwrap_or(false) { format!("{}{new_text}", r.prompt) } else { new_text };
        Ok(json!({ "text": text, "tokens": tokens, "logprob": total, "request_time": start.elapsed().as_secs_f64() }))
    }

    /// `POST /tokenize`.
    pub fn tokenize(&self, body: &[u8]) -> Result<Value, HttpError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TokenizeRequest {
            text: String,
            #[serde(default = "yes")]
            truncation: bool,
            #[serde(default = "max_length")]
            max_length: usize,
        }
        fn yes() -> bool {
            true
        }
        fn max_length() -> usize {
            2048
        }
        let start = Instant::now();
        let r: TokenizeRequest = parse(body)?;
        let mut ids = self.encode(&r.text);
        if r.truncation {
            ids.truncate(r.max_length);
        }
        Ok(json!({ "tokens": ids, "request_time": start.elapsed().as_secs_f64() }))
    }

    /// `POST /decode`.
    pub fn decode(&self, body: &[u8]) -> Result<Value, HttpError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct DecodeRequest {
            tokens: Vec<u32>,
        }
        let start = Instant::now();
        let r: DecodeRequest = parse(body)?;
        self.check_vocab(&r.tokens)?;
        Ok(json!({ "text": self.tok.decode(&r.tokens), "request_time": start.elapsed().as_secs_f64() }))
    }
}

fn internal(e: anyhow::Error) -> HttpError {
    HttpError::new(500, format!("the model failed: {e:#}"))
}
