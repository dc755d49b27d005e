//! `minhash-dedup`: drops near-duplicates, keeping the first record of each cluster. Used as a global
//! `[[filter]]` it sees every dataset in manifest order, so it also removes duplicates across datasets and keeps
//! the copy of the earlier dataset; under a dataset's `filters` it compares that dataset's records only.
//!
//! ```toml
//! [[filter]]
//! plugin = "minhash-dedup"
//! shingle = "words"   # or "chars": shingles are n consecutive words (lowercased, punctuation ignored) or characters
//! n = 5               # words (or characters) per shingle
//! bands = 20          # LSH bands ...
//! rows = 10           # ... of this many MinHash values each: bands x rows hash permutations per record
//! seed = 1            # seeds the permutations; the same options give the same verdicts anywhere
//! roles = ["user", "assistant"]   # the turns compared (default: all)
//! ```
//!
//! Two records are candidates when all `rows` values of one band agree; at Jaccard similarity s (of their
//! shingle sets) that happens with probability 1 - (1 - s^rows)^bands. With the defaults: s = 0.8 is caught
//! with probability 0.90 (the documented threshold), 0.9 with 0.9997, 0.7 with 0.44, 0.6 with 0.11, 0.5 with
//! 0.02. A candidate is dropped with the reason "near-duplicate of <id> in <dataset>" (the kept record), so
//! `lorahost check` lists one reason per cluster, with its count of dropped copies.
//! With word 5-gram shingles, editing 1% of a text's words leaves s near 0.9, 2% near 0.8, 5% near 0.6.
//!
//! State across batches: only the kept records' band keys (8 bytes each, plus the number of the kept record)
//! and their ids; no shingles and no signatures are stored. That is bands x (8 + 4) bytes in a hash table
//! (18 to 37 bytes per entry with its growth), so 360 to 740 bytes per kept record at the defaults, about
//! 0.6 GB for a million, plus the ids' bytes. Fewer bands use less (and catch less); the plugin's memory cap
//! (`limits.memory_mb`, default 1 GiB) bounds it either way.
use lorahost_sdk::{Example, Filter, Verdict};
use lorahost_text::{mix, ngram_hashes, word_hash, word_hashes, KeyMap, Roles, SplitMix64};

#[derive(serde::Deserialize, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum Shingle {
    Words,
    Chars,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "words")]
    shingle: Shingle,
    #[serde(default = "five")]
    n: usize,
    #[serde(default = "twenty")]
    bands: usize,
    #[serde(default = "ten")]
    rows: usize,
    #[serde(default = "one")]
    seed: u64,
    roles: Option<Vec<String>>,
}

fn words() -> Shingle {
    Shingle::Words
}
fn five() -> usize {
    5
}
fn twenty() -> usize {
    20
}
fn ten() -> usize {
    10
}
fn one() -> u64 {
    1
}

struct MinHashDedup {
    shingle: Shingle,
    n: usize,
    bands: usize,
    rows: usize,
    roles: Roles,
    /// Permutation i maps a shingle hash x to the high 32 bits of a[i] * x + b[i] (multiply-add-shift).
    a: Vec<u64>,
    b: Vec<u64>,
    /// Band key -> number of the kept record that has it.
    table: KeyMap<u32>,
    /// The kept records' names ("<id> in <dataset>"), one after another; `ends[k]` is where name k ends.
    names: String,
    ends: Vec<usize>,
    // Scratch buffers, reused for every record.
    tokens: Vec<u64>,
    shingles: Vec<u64>,
    signature: Vec<u32>,
}

impl MinHashDedup {
    /// Shingle hashes of the selected turns. A turn's role goes in as a token before its words, so no shingle
    /// runs from one turn into the next unmarked.
    fn shingle(&mut self, example: &Example) {
        self.tokens.clear();
        self.shingles.clear();
        for turn in self.roles.turns(example) {
            self.tokens.push(word_hash(&turn.role) ^ 0x5bd1_e995);
            match self.shingle {
                Shingle::Words => word_hashes(&turn.content, &mut self.tokens),
                // Characters lowercased, runs of whitespace as one space: layout does not count.
                Shingle::Chars => {
                    let mut last_space = true;
                    for c in turn.content.chars().flat_map(char::to_lowercase) {
                        let space = c.is_whitespace();
                        if !(space && last_space) {
                            self.tokens.push(if space { ' ' as u64 } else { c as u64 });
                        }
                        last_space = space;
                    }
                }
            }
        }
        ngram_hashes(&self.tokens, self.n, &mut self.shingles);
    }

    /// The MinHash signature of the current shingles: per permutation, the least permuted value.
    fn sign(&mut self) {
        self.signature.clear();
        self.signature.resize(self.a.len(), u32::MAX);
        for &x in &self.shingles {
            for ((s, &a), &b) in self.signature.iter_mut().zip(&self.a).zip(&self.b) {
                let v = (a.wrapping_mul(x).wrapping_add(b) >> 32) as u32;
                if v < *s {
                    *s = v;
                }
            }
        }
    }

    /// One key per band: a hash of the band's number and its `rows` values.
    fn band_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.signature
            .chunks(self.rows)
            .enumerate()
            .map(|(band, values)| values.iter().fold(mix(band as u64 + 1), |h, &v| mix(h ^ v as u64)))
    }

    fn name(&self, k: u32) -> &str {
        let k = k as usize;
        let start = if k == 0 { 0 } else { self.ends[k - 1] };
        &self.names[start..self.ends[k]]
    }
}

impl Filter for MinHashDedup {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.n == 0 {
            return Err("n = 0: a shingle needs at least one word or character".into());
        }
        if c.bands == 0 || c.rows == 0 {
            return Err(format!("bands = {} and rows = {} must both be at least 1", c.bands, c.rows));
        }
        if c.bands * c.rows > 4096 {
            return Err(format!("bands x rows = {} permutations; at most 4096", c.bands * c.rows));
        }
        let mut rng = SplitMix64(c.seed);
        let k = c.bands * c.rows;
        // An odd multiplier keeps each permutation a bijection on 64-bit values.
        let a = (0..k).map(|_| rng.next_u64() | 1).collect();
        let b = (0..k).map(|_| rng.next_u64()).collect();
        Ok(MinHashDedup {
            shingle: c.shingle,
            n: c.n,
            bands: c.bands,
            rows: c.rows,
            roles: Roles::new(c.roles)?,
            a,
            b,
            table: KeyMap::default(),
            names: String::new(),
            ends: Vec::new(),
            tokens: Vec::new(),
            shingles: Vec::new(),
            signature: Vec::new(),
        })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        self.shingle(example);
        if self.shingles.is_empty() {
            return Verdict::Keep;
        }
        self.sign();
        let keys: Vec<u64> = self.band_keys().collect();
        debug_assert_eq!(keys.len(), self.bands);
        if let Some(&k) = keys.iter().find_map(|key| self.table.get(key)) {
            return Verdict::Drop(format!("near-duplicate of {}", self.name(k)));
        }
        let k = self.ends.len() as u32;
        self.names.push_str(&format!("{} in {}", example.id, example.dataset));
        self.ends.push(self.names.len());
        for key in keys {
            self.table.entry(key).or_insert(k);
        }
        Verdict::Keep
    }
}

lorahost_sdk::export_filter!(MinHashDedup);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};
    use std::collections::HashSet;

    fn filter(config: &str) -> MinHashDedup {
        MinHashDedup::new(parse_config(config).unwrap()).unwrap()
    }

    fn text(id: &str, dataset: &str, content: &str) -> Example {
        Example::new(id, dataset, vec![Turn::new("user", "Summarize."), Turn::new("assistant", content)])
    }

    const STORY: &str = "The harbour town woke slowly under a grey sky while fishermen hauled their nets onto the \
        stone quay and gulls circled above the market stalls where traders set out bread cheese and smoked fish \
        for the first customers of the cold morning";

    #[test]
    fn drops_a_near_copy_naming_the_kept_record_across_batches_and_datasets() {
        let mut f = filter("");
        assert_eq!(f.filter_batch(&[text("a:1", "news", STORY)]).unwrap(), [Verdict::Keep]);
        // The last word changed: one 5-gram of 40 differs.
        let edited = STORY.replace("morning", "day");
        let other = "A completely different record about training small language models on one machine.";
        let second = [text("b:7", "web", &edited), text("b:8", "web", other)];
        assert_eq!(
            f.filter_batch(&second).unwrap(),
            [Verdict::Drop("near-duplicate of a:1 in news".into()), Verdict::Keep]
        );
        // Case and punctuation do not hide a copy.
        assert_eq!(f.filter(&text("c", "web", &other.to_uppercase().replace('.', "!"))), Verdict::Drop("near-duplicate of b:8 in web".into()));
        // Empty records have no shingles and are kept.
        assert_eq!(f.filter(&text("d", "web", "")), Verdict::Keep);
    }

    #[test]
    fn roles_and_char_shingles() {
        let mut f = filter("roles = [\"assistant\"]\nshingle = \"chars\"\nn = 4");
        let a = Example::new("1", "d", vec![Turn::new("user", "Question one?"), Turn::new("assistant", STORY)]);
        let b = Example::new("2", "d", vec![Turn::new("user", "Another question"), Turn::new("assistant", STORY)]);
        assert_eq!(f.filter(&a), Verdict::Keep);
        assert_eq!(f.filter(&b), Verdict::Drop("near-duplicate of 1 in d".into()));
        // When every turn counts, the different questions make b another record.
        let mut all = filter("shingle = \"chars\"\nn = 4");
        let short = |q: &str| Example::new(q, "d", vec![Turn::new("user", q), Turn::new("assistant", "Paris.")]);
        assert_eq!(all.filter(&short("What is the capital of France?")), Verdict::Keep);
        assert_eq!(all.filter(&short("Which city hosts the Louvre museum?")), Verdict::Keep);
    }

    #[test]
    fn rejects_bad_options() {
        let err = |c: &str| MinHashDedup::new(parse_config(c).unwrap()).err().unwrap();
        assert!(err("n = 0").contains("n = 0"));
        assert!(err("bands = 0").contains("at least 1"));
        assert!(err("bands = 100\nrows = 100").contains("at most 4096"));
        assert!(err("roles = [\"bot\"]").contains("not a role"));
        assert!(parse_config::<Config>("shingle = \"lines\"").is_err());
        assert!(parse_config::<Config>("band = 3").err().unwrap().contains("unknown field `band`"));
    }

    /// A stream of words from a vocabulary of random strings.
    fn document(rng: &mut SplitMix64, words: usize, vocab: &[String]) -> Vec<String> {
        (0..words).map(|_| vocab[(rng.next_u64() % vocab.len() as u64) as usize].clone()).collect()
    }

    /// Replaces, deletes or inserts `edits` words at random places.
    fn edit(rng: &mut SplitMix64, doc: &[String], edits: usize, vocab: &[String]) -> Vec<String> {
        let mut out = doc.to_vec();
        for _ in 0..edits {
            let at = (rng.next_u64() % out.len() as u64) as usize;
            let word = vocab[(rng.next_u64() % vocab.len() as u64) as usize].clone();
            match rng.next_u64() % 3 {
                0 => out[at] = word,
                1 => {
                    out.remove(at);
                }
                _ => out.insert(at, word),
            }
        }
        out
    }

    fn jaccard<'a>(a: &'a [String], b: &'a [String], n: usize) -> f64 {
        let grams = |d: &'a [String]| d.windows(n).collect::<HashSet<&[String]>>();
        let (a, b) = (grams(a), grams(b));
        a.intersection(&b).count() as f64 / a.union(&b).count() as f64
    }

    /// Planted near-duplicates (1 to 10% of words edited) among distinct documents: of the copies whose true
    /// Jaccard similarity is at least the documented 0.8, the share found matches the LSH curve's
    /// expectation (>= 0.9) and is at least 0.85; copies under 0.5 are almost never merged; distinct
    /// documents never are.
    #[test]
    fn recall_on_planted_near_duplicates_matches_the_documented_threshold() {
        let mut rng = SplitMix64(42);
        let vocab: Vec<String> = (0..5000).map(|i| format!("w{i}x{}", rng.next_u64() % 1000)).collect();
        let originals: Vec<Vec<String>> = (0..400).map(|_| document(&mut rng, 200, &vocab)).collect();
        let mut f = filter("");
        for (i, d) in originals.iter().enumerate() {
            assert_eq!(f.filter(&text(&format!("orig:{i}"), "d", &d.join(" "))), Verdict::Keep, "distinct doc {i} merged");
        }
        let (mut high, mut high_found, mut expected, mut low, mut low_found) = (0, 0, 0.0, 0, 0);
        for round in 0..4 {
            for (i, d) in originals.iter().enumerate() {
                let edits = 2 + (i + round * 7) % 19; // 1% to 10% of 200 words
                let copy = edit(&mut rng, d, edits, &vocab);
                let s = jaccard(d, &copy, 5);
                let found = match f.filter(&text(&format!("copy:{round}:{i}"), "d", &copy.join(" "))) {
                    Verdict::Drop(reason) => {
                        // The kept record of its cluster: the original, or an earlier copy that was kept.
                        assert!(reason.ends_with(&format!(":{i} in d")), "{reason}");
                        true
                    }
                    _ => false,
                };
                if s >= 0.8 {
                    high += 1;
                    high_found += found as usize;
                    expected += 1.0 - (1.0 - s.powi(10)).powi(20);
                } else if s < 0.5 {
                    low += 1;
                    low_found += found as usize;
                }
            }
        }
        let recall = high_found as f64 / high as f64;
        let expected = expected / high as f64;
        eprintln!("{high} copies at s >= 0.8: recall {recall:.3} (expected {expected:.3}); {low_found} of {low} under 0.5 found");
        assert!(high >= 100, "the test plants too few close copies ({high})");
        assert!(recall >= 0.85 && (recall - expected).abs() < 0.06, "recall {recall} vs expected {expected}");
        assert!(low >= 200 && (low_found as f64) < 0.03 * low as f64, "{low_found} of {low} distant copies merged");
    }
}
