//! `gsm8k`: GSM8K's two answer extractions as lm-evaluation-harness's `gsm8k` task defines them, each then
//! compared with the reference by exact match (ignore case; `,`, `$`, everything up to `#### ` and a final
//! `.` removed from both sides, so the reference may be the whole worked answer).
//!
//! - `strict_match`: the number after `#### ` (pattern `#### (\-?[0-9\.\,]+)`, first match); a generation
//!   without one scores 0.
//! - `flexible_extract`: the last number anywhere (pattern `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match).
//!
//! ```toml
//! [scorer]
//! plugin = "gsm8k"     # no options
//! ```
//!
//! The extracted answer in the results reads `strict | flexible` (`[invalid]` where nothing matched).
use lorahost_answer_match::{compile, extract, Normalizer, Regex};
use lorahost_sdk::{Example, NoConfig, Score, Scorer};

const STRICT: &str = r"#### (\-?[0-9\.\,]+)";
const FLEXIBLE: &str = r"(-?[$0-9.,]{2,})|(-?[0-9]+)";
const IGNORE: [&str; 4] = [",", "\\$", "(?s).*#### ", "\\.$"];
/// What the harness puts in place of an answer it could not extract.
const INVALID: &str = "[invalid]";

struct Gsm8k {
    strict: Regex,
    flexible: Regex,
    normalizer: Normalizer,
}

impl Scorer for Gsm8k {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        let ignore: Vec<String> = IGNORE.iter().map(|s| s.to_string()).collect();
        Ok(Gsm8k {
            strict: compile(STRICT, "strict")?,
            flexible: compile(FLEXIBLE, "flexible")?,
            normalizer: Normalizer::new(true, false, &ignore, true)?,
        })
    }

    fn score(&mut self, generation: &str, _example: &Example, references: &[String]) -> Result<Score, String> {
        let strict = extract(&self.strict, generation, false);
        let flexible = extract(&self.flexible, generation, true);
        let value = |a: &Option<String>| a.as_deref().map_or(0.0, |a| self.normalizer.score(a, references));
        let shown = |a: &Option<String>| a.clone().unwrap_or_else(|| INVALID.to_string());
        let extracted = format!("{} | {}", shown(&strict), shown(&flexible));
        Ok(Score::new(extracted, [("strict_match", value(&strict)), ("flexible_extract", value(&flexible))]))
    }
}

lorahost_sdk::export_scorer!(Gsm8k);

#[cfg(test)]
mod tests {
    use super::*;

    fn score(g: &str, reference: &str) -> (f64, f64, String) {
        let mut s = Gsm8k::new(NoConfig {}).unwrap();
        let e = Example { id: "t".into(), dataset: "t".into(), turns: vec![], meta: vec![] };
        let out = s.score(g, &e, &[reference.to_string()]).unwrap();
        (out.metrics[0].1, out.metrics[1].1, out.extracted)
    }

    const WORKED: &str = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72";

    #[test]
    fn strict_and_flexible() {
        assert_eq!(score(" She sold 72 in all.\n#### 72", WORKED), (1.0, 1.0, "72 | 72".into()));
        // No "####": strict fails, flexible reads the last number (its trailing period ignored).
        assert_eq!(score(" 24 in May, so 72.", WORKED), (0.0, 1.0, "[invalid] | 72.".into()));
        // Thousands separators and dollars are ignored on both sides; strict wants a number right after "#### ".
        assert_eq!(score("#### 1,234", "#### 1234"), (1.0, 1.0, "1,234 | 1,234".into()));
        assert_eq!(score("It costs $1,234", "#### 1234"), (0.0, 1.0, "[invalid] | $1,234".into()));
        assert_eq!(score("#### 71", WORKED).0, 0.0);
        assert_eq!(score("", WORKED), (0.0, 0.0, "[invalid] | [invalid]".into()));
        assert_eq!(score("#### -5", "#### -5").0, 1.0, "negative answers");
    }
}
