//! `rouge`: ROUGE-1, ROUGE-2 and ROUGE-L F1 of a generation against its references (the best over the
//! references), for summarisation (CNN/DailyMail). Metrics `rouge1`, `rouge2`, `rougeL`, each in [0, 1].
//!
//! Tokens as Google's `rouge_score` makes them without a stemmer: lowercase, every character that is not
//! `a-z` or `0-9` becomes a space, split on whitespace. ROUGE-N counts clipped n-gram overlaps; ROUGE-L is the
//! longest common subsequence over the whole text (not the per-sentence `rougeLsum`). F1 of empty text is 0.
//!
//! ```toml
//! [scorer]
//! plugin = "rouge"     # no options
//! ```
use lorahost_sdk::{Example, NoConfig, Score, Scorer};
use std::collections::HashMap;

struct Rouge;

/// Bounds the LCS table (tokens x tokens) so a runaway generation cannot take unbounded memory.
const MAX_TOKENS: usize = 4096;

fn tokens(text: &str) -> Vec<String> {
    let cleaned: String =
        text.to_lowercase().chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { ' ' }).collect();
    cleaned.split_whitespace().take(MAX_TOKENS).map(str::to_string).collect()
}

fn f1(overlap: usize, pred: usize, reference: usize) -> f64 {
    if overlap == 0 || pred == 0 || reference == 0 {
        return 0.0;
    }
    let (p, r) = (overlap as f64 / pred as f64, overlap as f64 / reference as f64);
    2.0 * p * r / (p + r)
}

fn ngrams(t: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    for w in t.windows(n) {
        *m.entry(w).or_insert(0) += 1;
    }
    m
}

fn rouge_n(pred: &[String], reference: &[String], n: usize) -> f64 {
    let (p, r) = (ngrams(pred, n), ngrams(reference, n));
    let overlap: usize = p.iter().map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0))).sum();
    f1(overlap, pred.len().saturating_sub(n - 1), reference.len().saturating_sub(n - 1))
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diag = 0;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[b.len()]
}

impl Scorer for Rouge {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Rouge)
    }

    fn score(&mut self, generation: &str, _example: &Example, references: &[String]) -> Result<Score, String> {
        let pred = tokens(generation);
        let mut best = [0.0f64; 3];
        for r in references {
            let r = tokens(r);
            let s = [rouge_n(&pred, &r, 1), rouge_n(&pred, &r, 2), f1(lcs(&pred, &r), pred.len(), r.len())];
            for (b, v) in best.iter_mut().zip(s) {
                *b = b.max(v);
            }
        }
        Ok(Score::new(generation.trim(), [("rouge1", best[0]), ("rouge2", best[1]), ("rougeL", best[2])]))
    }
}

lorahost_sdk::export_scorer!(Rouge);

#[cfg(test)]
mod tests {
    use super::*;

    fn score(g: &str, refs: &[&str]) -> Vec<f64> {
        let e = Example { id: "t".into(), dataset: "t".into(), turns: vec![], meta: vec![] };
        let refs: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
        Rouge.score(g, &e, &refs).unwrap().metrics.into_iter().map(|(_, v)| v).collect()
    }

    #[test]
    fn identical_disjoint_and_partial() {
        assert_eq!(score("The cat sat.", &["the cat sat"]), vec![1.0, 1.0, 1.0]);
        assert_eq!(score("dogs bark", &["the cat sat"]), vec![0.0, 0.0, 0.0]);
        assert_eq!(score("", &["the cat sat"]), vec![0.0, 0.0, 0.0]);
        assert_eq!(score("anything", &[]), vec![0.0, 0.0, 0.0]);
        // pred "the cat sat on the mat" (6), ref "the cat lay on the mat" (6): unigrams 5/6 each way;
        // bigrams "the cat", "on the", "the mat" = 3 of 5; LCS "the cat on the mat" = 5.
        let s = score("the cat sat on the mat", &["the cat lay on the mat"]);
        assert!((s[0] - 5.0 / 6.0).abs() < 1e-12 && (s[1] - 0.6).abs() < 1e-12 && (s[2] - 5.0 / 6.0).abs() < 1e-12, "{s:?}");
        // Repeated words are clipped: "the the the" vs "the cat": overlap 1, P 1/3, R 1/2.
        assert!((score("the the the", &["the cat"])[0] - 0.4).abs() < 1e-12);
        // The best reference counts.
        assert_eq!(score("a b", &["x y", "a b"])[0], 1.0);
    }
}
