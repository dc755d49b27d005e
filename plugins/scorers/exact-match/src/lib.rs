//! `exact-match`: a generation is right (1) when it equals one of the references after
//! lm-evaluation-harness's `exact_match` normalisation, else 0. Metric: `exact_match`.
//!
//! ```toml
//! [scorer]
//! plugin = "exact-match"
//! ignore_case = false          # default; lowercase both sides
//! ignore_punctuation = false   # default; remove ASCII punctuation from both sides
//! regexes_to_ignore = []       # default; every match of each pattern is removed from both sides, in order
//! extract = "\\(([A-Z])\\)"    # optional: compare only what this pattern picks out of the generation (its
//!                              # first non-empty group, else the whole match; no match: the empty answer)
//! extract_last = false         # default; with `extract`: take the last match instead of the first
//! trim = true                  # default; trim whitespace after normalising (the harness does not; a
//!                              # generation after "A:" starts with a space)
//! ```
//!
//! The extracted answer in the results is the normalised generation.
use lorahost_answer_match::{compile, extract, Normalizer, Regex};
use lorahost_sdk::{Example, Score, Scorer};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    ignore_case: bool,
    #[serde(default)]
    ignore_punctuation: bool,
    #[serde(default)]
    regexes_to_ignore: Vec<String>,
    extract: Option<String>,
    #[serde(default)]
    extract_last: bool,
    #[serde(default = "yes")]
    trim: bool,
}

fn yes() -> bool {
    true
}

struct ExactMatch {
    normalizer: Normalizer,
    extract: Option<(Regex, bool)>,
}

impl Scorer for ExactMatch {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        let extract = c.extract.as_deref().map(|p| compile(p, "extract")).transpose()?.map(|re| (re, c.extract_last));
        Ok(ExactMatch { normalizer: Normalizer::new(c.ignore_case, c.ignore_punctuation, &c.regexes_to_ignore, c.trim)?, extract })
    }

    fn score(&mut self, generation: &str, _example: &Example, references: &[String]) -> Result<Score, String> {
        let answer = match &self.extract {
            Some((re, last)) => extract(re, generation, *last).unwrap_or_default(),
            None => generation.to_string(),
        };
        let value = self.normalizer.score(&answer, references);
        Ok(Score::new(self.normalizer.apply(&answer), [("exact_match", value)]))
    }
}

lorahost_sdk::export_scorer!(ExactMatch);

#[cfg(test)]
mod tests {
    use super::*;

    fn scorer(toml: &str) -> ExactMatch {
        ExactMatch::new(lorahost_sdk::parse_config(toml).unwrap()).unwrap()
    }

    fn score(s: &mut ExactMatch, g: &str, refs: &[&str]) -> f64 {
        let refs: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
        let e = Example { id: "t".into(), dataset: "t".into(), turns: vec![], meta: vec![] };
        s.score(g, &e, &refs).unwrap().metrics[0].1
    }

    #[test]
    fn edge_cases() {
        let mut plain = scorer("");
        assert_eq!(score(&mut plain, " (B)", &["(B)"]), 1.0, "trimmed by default");
        assert_eq!(score(&mut plain, "(b)", &["(B)"]), 0.0, "case counts by default");
        assert_eq!(score(&mut plain, "", &["(B)"]), 0.0);
        assert_eq!(score(&mut plain, "", &[""]), 1.0, "an empty reference matches an empty answer");
        assert_eq!(score(&mut plain, "x", &[]), 0.0, "no reference: never right");
        let mut loose = scorer("ignore_case = true\nignore_punctuation = true");
        assert_eq!(score(&mut loose, "(b).", &["(B)"]), 1.0);
        let mut ex = scorer("extract = '\\(([A-Z])\\)'\nextract_last = true");
        assert_eq!(score(&mut ex, "Either (A) or... the answer is (C)", &["C"]), 1.0);
        assert_eq!(score(&mut ex, "no letter", &["C"]), 0.0);
        let mut notrim = scorer("trim = false");
        assert_eq!(score(&mut notrim, " (B)", &["(B)"]), 0.0);
        assert!(ExactMatch::new(lorahost_sdk::parse_config("extract = '('").unwrap()).err().unwrap().contains("extract"));
        assert!(lorahost_sdk::parse_config::<Config>("ignore_cas = true").is_err());
    }
}
