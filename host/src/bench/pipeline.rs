//! End-to-end data pipeline speed: alpaca JSONL -> the 2023 template -> tokens with the prompt masked,
//! on a generated file of synthetic records, cold (no cache) and as a cache hit. The Python baseline
//! (`py_pipeline_baseline.py run FILE tokenizer.json`) reads the same file.
use crate::data;
use crate::manifest::Manifest;
use crate::rng::Rng;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, serde::Serialize)]
pub struct PipelineBench {
    pub records: usize,
    pub tokens: usize,
    pub threads: usize,
    pub cold_seconds: f64,
    pub tokens_per_s: f64,
    pub cache_hit_seconds: f64,
    pub tokenizer: String,
}

/// Writes `n` synthetic alpaca records (instruction 5-40 words, an input of 0-120 words 40% of the time,
/// an output of 10-250 words) drawn from a made-up vocabulary; the same seed gives the same file.
pub fn generate(n: usize, path: &Path, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed);
    let letters: Vec<char> = "etaoinshrdlucmfwypvbgkjqxz".chars().collect();
    let words: Vec<String> = (0..20_000)
        .map(|_| {
            let len = 2 + rng.below(8) as usize;
            (0..len).map(|_| letters[rng.below(letters.len() as u64) as usize]).collect()
        })
        .collect();
    let sentence = |rng: &mut Rng, k: usize| {
        let s: Vec<&str> = (0..k).map(|_| words[rng.below(words.len() as u64) as usize].as_str()).collect();
        let mut text = s.join(" ");
        text.push_str([".", "?", "!", ""][rng.below(4) as usize]);
        text
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for _ in 0..n {
        let k = 5 + rng.below(36) as usize;
        let instruction = sentence(&mut rng, k);
        let input = if rng.next_f64() < 0.4 {
            let k = rng.below(121) as usize;
            sentence(&mut rng, k)
        } else {
            String::new()
        };
        let k = 10 + rng.below(241) as usize;
        let output = sentence(&mut rng, k);
        let line = serde_json::json!({ "instruction": instruction, "input": input, "output": output });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// Runs the pipeline over `data` (cold, then from the cache) with the tokenizer at `tokenizer`.
pub fn run(data: &Path, tokenizer: &Path) -> anyhow::Result<PipelineBench> {
    let dir = tempfile::tempdir()?;
    // The manifest lives in a temporary folder: give it absolute paths.
    let (data, tokenizer) = (std::path::absolute(data)?, std::path::absolute(tokenizer)?);
    let manifest = dir.path().join("bench.toml");
    let text = format!(
        r#"[run]
name = "bench"
output = "out"
cache = "cache"
[model]
path = "."
tokenizer = {tokenizer:?}
[train]
max_seq_len = 1024
[template]
plugin = "default-2023"
[[dataset]]
name = "alpaca"
source = {{ plugin = "jsonl", path = {data:?} }}
[mix]
shuffle = false
"#
    );
    std::fs::write(&manifest, text)?;
    let m = Manifest::load(&manifest)?;
    let start = Instant::now();
    let cold = data::prepare(&m)?;
    let cold_seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(!cold.from_cache);
    let start = Instant::now();
    let hit = data::prepare(&m)?;
    let cache_hit_seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(hit.from_cache && hit.stream == cold.stream, "the cache must return the same stream");
    Ok(PipelineBench {
        records: cold.stream.len(),
        tokens: cold.stream.ids.len(),
        threads: rayon::current_num_threads(),
        cold_seconds,
        tokens_per_s: cold.stream.ids.len() as f64 / cold_seconds,
        cache_hit_seconds,
        tokenizer: tokenizer.display().to_string(),
    })
}

impl std::fmt::Display for PipelineBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} records, {} tokens, {} threads, tokenizer {}\ncold: {:.2} s = {:.0} tokens/s; cache hit: {:.3} s",
            self.records, self.tokens, self.threads, self.tokenizer, self.cold_seconds, self.tokens_per_s, self.cache_hit_seconds
        )
    }
}
