//! What the `exact-match` and `gsm8k` scorers share: lm-evaluation-harness's `exact_match` normalisation.
//!
//! The harness compares a prediction and a reference after, in this order: removing every match of each
//! `regexes_to_ignore` pattern, lowercasing (`ignore_case`), and removing ASCII punctuation
//! (`ignore_punctuation`, Python's `string.punctuation`). [`Normalizer`] does the same to both sides.
pub use regex::Regex;

/// The harness's exact-match normalisation options.
#[derive(Debug, Default)]
pub struct Normalizer {
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
    pub ignore: Vec<Regex>,
    /// Trim surrounding whitespace after the rest (the harness does not; generations usually start with a
    /// space after "Answer:", so the scorers default to trimming).
    pub trim: bool,
}

impl Normalizer {
    /// Compiles `regexes_to_ignore`; a pattern that does not compile is an error naming it.
    pub fn new(ignore_case: bool, ignore_punctuation: bool, regexes: &[String], trim: bool) -> Result<Self, String> {
        let ignore = regexes.iter().map(|r| compile(r, "regexes_to_ignore")).collect::<Result<_, _>>()?;
        Ok(Normalizer { ignore_case, ignore_punctuation, ignore, trim })
    }

    pub fn apply(&self, text: &str) -> String {
        let mut s = text.to_string();
        for re in &self.ignore {
            s = re.replace_all(&s, "").into_owned();
        }
        if self.ignore_case {
            s = s.to_lowercase();
        }
        if self.ignore_punctuation {
            s.retain(|c| !c.is_ascii_punctuation());
        }
        if self.trim {
            s = s.trim().to_string();
        }
        s
    }

    /// 1.0 when the normalised `prediction` equals any normalised reference, else 0.0.
    pub fn score(&self, prediction: &str, references: &[String]) -> f64 {
        let p = self.apply(prediction);
        f64::from(u8::from(references.iter().any(|r| self.apply(r) == p)))
    }
}

/// Compiles a pattern, naming the option it came from when it does not compile.
pub fn compile(pattern: &str, option: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("`{option}`: the pattern {pattern:?} does not compile: {e}"))
}

/// The text a pattern picks out of `text`: of the first match (`last = false`) or the last, its first
/// non-empty capture group, or the whole match when the pattern has no groups. `None` when nothing matches.
pub fn extract(re: &Regex, text: &str, last: bool) -> Option<String> {
    let mut matches = re.captures_iter(text);
    let caps = if last { matches.last()? } else { matches.next()? };
    let groups = (1..caps.len()).filter_map(|i| caps.get(i)).find(|m| !m.as_str().is_empty());
    Some(groups.or_else(|| caps.get(0)).map_or(String::new(), |m| m.as_str().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_the_harness() {
        let n = Normalizer::new(true, true, &[",".into(), "\\$".into()], true).unwrap();
        assert_eq!(n.apply(" The Answer: $1,000! "), "the answer 1000");
        assert_eq!(n.score("$1,000", &["1000".into()]), 1.0);
        assert_eq!(n.score("1001", &["1000".into(), "999".into()]), 0.0);
        let plain = Normalizer::new(false, false, &[], false).unwrap();
        assert_eq!(plain.score(" A", &["A".into()]), 0.0);
        assert!(Normalizer::new(false, false, &["(".into()], false).unwrap_err().contains("regexes_to_ignore"));
    }

    #[test]
    fn extracts_first_last_and_groups() {
        let re = Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").unwrap();
        assert_eq!(extract(&re, "I have 3 apples and 12 pears, so 15.", true).as_deref(), Some("15."));
        assert_eq!(extract(&re, "I have 3 apples", false).as_deref(), Some("3"));
        assert_eq!(extract(&re, "no numbers", false), None);
        assert_eq!(extract(&Regex::new("x+").unwrap(), "axxb", false).as_deref(), Some("xx"));
    }
}
