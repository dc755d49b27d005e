//! `decontaminate`: drops training records that share a word n-gram with an evaluation set, so a model is
//! not trained on the questions it will be scored on.
//!
//! This is the short version, as a user would write it; the standard `decontaminate` filter
//! (plugins/filters/decontaminate) does the same faster, over several JSON Lines, JSON, CSV or text files, and
//! can mark records instead of dropping them. A `[plugins]` entry of the same name takes the standard one's place.
//!
//! ```toml
//! [plugins]
//! decontaminate = { path = "plugins/decontaminate/target/wasm32-wasip2/release/decontaminate.wasm" }
//!
//! [[filter]]
//! plugin = "decontaminate"
//! eval_path = "data/eval_questions.txt"   # one evaluation text per line (granted read-only)
//! n = 8                                   # words per n-gram
//! ```
use lorahost_sdk::{Example, Filter, Verdict};
use std::collections::HashSet;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    eval_path: String,
    #[serde(default = "eight")]
    n: usize,
}

fn eight() -> usize {
    8
}

struct Decontaminate {
    n: usize,
    seen: HashSet<u64>,
}

/// Lowercased words without punctuation, so formatting differences do not hide an overlap.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// FNV-1a over the n words: a stable key per n-gram.
fn key(gram: &[String]) -> u64 {
    gram.iter().flat_map(|w| w.bytes().chain([0])).fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

impl Filter for Decontaminate {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.n == 0 {
            return Err("`n` must be at least 1".into());
        }
        let text = std::fs::read_to_string(&c.eval_path).map_err(|e| format!("eval_path {}: {e}", c.eval_path))?;
        let mut seen = HashSet::new();
        for line in text.lines() {
            seen.extend(words(line).windows(c.n).map(key));
        }
        if seen.is_empty() {
            return Err(format!("eval_path {} has no line of {} words or more", c.eval_path, c.n));
        }
        Ok(Decontaminate { n: c.n, seen })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        let hit = example.contents().any(|c| words(c).windows(self.n).any(|g| self.seen.contains(&key(g))));
        if hit {
            Verdict::Drop(format!("shares a {}-gram with the eval set", self.n))
        } else {
            Verdict::Keep
        }
    }
}

lorahost_sdk::export_filter!(Decontaminate);
