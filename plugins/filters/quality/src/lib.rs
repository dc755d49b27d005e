//! `quality`: the Gopher (Rae et al. 2021) and C4-style heuristics, each rule an option with its threshold and
//! its own drop reason. The defaults are Gopher's published values; set a minimum to 0 or a maximum share to 1
//! to turn a rule off. Rules read the text of the selected turns, joined by newlines.
//!
//! ```toml
//! [[filter]]
//! plugin = "quality"
//! roles = ["assistant"]          # the turns judged (default: all)
//! min_words = 50                 # whitespace-separated words
//! max_words = 100000
//! min_mean_word_length = 3.0     # characters per word
//! max_mean_word_length = 10.0
//! max_symbol_word_ratio = 0.1    # ('#' + '...' + '…') per word
//! max_ellipsis_lines = 0.3       # share of lines ending in '...' or '…'
//! max_bullet_lines = 0.9         # share of lines starting with a bullet (• ‣ ◦ ▪ ● - *)
//! min_alphabetic_words = 0.8     # share of words with at least one letter
//! min_stop_words = 2             # of: the, be, to, of, and, that, have, with
//! max_duplicate_lines = 0.3      # share of lines that repeat an earlier line
//! max_top_2gram = 0.2            # share of word characters in the most frequent 2-gram (when it repeats)
//! max_top_3gram = 0.18
//! max_top_4gram = 0.16
//! ```
//!
//! Bounds are inclusive: a record exactly at a threshold is kept. Share-of-lines rules count non-blank lines
//! and skip records without any; ratio rules skip records without words (`min_words` catches those).
use lorahost_sdk::{Example, Filter, Verdict};
use lorahost_text::{ngram_hashes, word_hash, KeyMap, Roles};
use std::collections::HashSet;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    roles: Option<Vec<String>>,
    min_words: usize,
    max_words: usize,
    min_mean_word_length: f64,
    max_mean_word_length: f64,
    max_symbol_word_ratio: f64,
    max_ellipsis_lines: f64,
    max_bullet_lines: f64,
    min_alphabetic_words: f64,
    min_stop_words: usize,
    max_duplicate_lines: f64,
    max_top_2gram: f64,
    max_top_3gram: f64,
    max_top_4gram: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            roles: None,
            min_words: 50,
            max_words: 100_000,
            min_mean_word_length: 3.0,
            max_mean_word_length: 10.0,
            max_symbol_word_ratio: 0.1,
            max_ellipsis_lines: 0.3,
            max_bullet_lines: 0.9,
            min_alphabetic_words: 0.8,
            min_stop_words: 2,
            max_duplicate_lines: 0.3,
            max_top_2gram: 0.2,
            max_top_3gram: 0.18,
            max_top_4gram: 0.16,
        }
    }
}

const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];
const BULLETS: [char; 7] = ['•', '‣', '◦', '▪', '●', '-', '*'];

struct Quality {
    c: Config,
    roles: Roles,
}

/// What the rules measure of one text.
struct Stats<'t> {
    words: Vec<&'t str>,
    lines: Vec<&'t str>,
    /// Per word: its hash (lowercased) and its length in characters, for the n-gram rules.
    hashes: Vec<u64>,
    lengths: Vec<usize>,
}

impl<'t> Stats<'t> {
    fn new(text: &'t str) -> Self {
        let words: Vec<&str> = text.split_whitespace().collect();
        Stats {
            hashes: words.iter().map(|w| word_hash(w)).collect(),
            lengths: words.iter().map(|w| w.chars().count()).collect(),
            words,
            lines: text.lines().map(str::trim).filter(|l| !l.is_empty()).collect(),
        }
    }

    fn mean_word_length(&self) -> f64 {
        self.lengths.iter().sum::<usize>() as f64 / self.words.len() as f64
    }

    fn symbol_ratio(&self) -> f64 {
        let symbols: usize = self.words.iter().map(|w| w.matches('#').count() + w.matches("...").count() + w.matches('…').count()).sum();
        symbols as f64 / self.words.len() as f64
    }

    fn share_of_lines(&self, test: impl Fn(&str) -> bool) -> f64 {
        self.lines.iter().filter(|l| test(l)).count() as f64 / self.lines.len() as f64
    }

    fn alphabetic_share(&self) -> f64 {
        self.words.iter().filter(|w| w.chars().any(char::is_alphabetic)).count() as f64 / self.words.len() as f64
    }

    fn stop_words(&self) -> usize {
        self.words
            .iter()
            .filter(|w| {
                let w = w.trim_matches(|c: char| !c.is_alphanumeric());
                STOP_WORDS.iter().any(|s| s.eq_ignore_ascii_case(w))
            })
            .count()
    }

    fn duplicate_lines(&self) -> f64 {
        let mut seen = HashSet::new();
        self.lines.iter().filter(|l| !seen.insert(**l)).count() as f64 / self.lines.len() as f64
    }

    /// Share of all word characters covered by the most frequent n-gram (Gopher: only when it occurs twice or
    /// more), counting its characters once per occurrence. N-grams are compared by the hash of their
    /// lowercased words.
    fn top_ngram(&self, n: usize) -> f64 {
        if self.words.len() < n {
            return 0.0;
        }
        let mut grams = Vec::with_capacity(self.words.len());
        ngram_hashes(&self.hashes, n, &mut grams);
        // Hash -> (occurrences, characters of one occurrence).
        let mut counts: KeyMap<(usize, usize)> = KeyMap::default();
        for (i, g) in grams.into_iter().enumerate() {
            counts.entry(g).or_insert_with(|| (0, self.lengths[i..i + n].iter().sum())).0 += 1;
        }
        let best = counts.values().filter(|(c, _)| *c >= 2).map(|(c, chars)| c * chars).max().unwrap_or(0);
        best as f64 / self.lengths.iter().sum::<usize>().max(1) as f64
    }
}

fn percent(x: f64) -> String {
    format!("{}%", (x * 100.0 * 100.0).round() / 100.0)
}

impl Quality {
    /// The first rule the text breaks, as its drop reason.
    fn judge(&self, text: &str) -> Option<String> {
        let c = &self.c;
        let s = Stats::new(text);
        let n = s.words.len();
        if n < c.min_words {
            return Some(format!("fewer than {} words", c.min_words));
        }
        if n > c.max_words {
            return Some(format!("more than {} words", c.max_words));
        }
        if n > 0 {
            let mean = s.mean_word_length();
            if mean < c.min_mean_word_length {
                return Some(format!("mean word length under {}", c.min_mean_word_length));
            }
            if mean > c.max_mean_word_length {
                return Some(format!("mean word length over {}", c.max_mean_word_length));
            }
            if s.symbol_ratio() > c.max_symbol_word_ratio {
                return Some(format!("symbol-to-word ratio over {}", c.max_symbol_word_ratio));
            }
            if s.alphabetic_share() < c.min_alphabetic_words {
                return Some(format!("under {} of words alphabetic", percent(c.min_alphabetic_words)));
            }
        }
        if s.stop_words() < c.min_stop_words {
            return Some(format!("fewer than {} stop words", c.min_stop_words));
        }
        if !s.lines.is_empty() {
            if s.share_of_lines(|l| l.ends_with("...") || l.ends_with('…')) > c.max_ellipsis_lines {
                return Some(format!("over {} of lines end in an ellipsis", percent(c.max_ellipsis_lines)));
            }
            if s.share_of_lines(|l| l.starts_with(BULLETS)) > c.max_bullet_lines {
                return Some(format!("over {} of lines start with a bullet", percent(c.max_bullet_lines)));
            }
            if s.duplicate_lines() > c.max_duplicate_lines {
                return Some(format!("over {} of lines repeated", percent(c.max_duplicate_lines)));
            }
        }
        for (gram, max) in [(2, c.max_top_2gram), (3, c.max_top_3gram), (4, c.max_top_4gram)] {
            if max < 1.0 && s.top_ngram(gram) > max {
                return Some(format!("top {gram}-gram over {} of characters", percent(max)));
            }
        }
        None
    }
}

impl Filter for Quality {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.min_words > c.max_words {
            return Err(format!("min_words ({}) is greater than max_words ({})", c.min_words, c.max_words));
        }
        if c.min_mean_word_length > c.max_mean_word_length {
            return Err(format!(
                "min_mean_word_length ({}) is greater than max_mean_word_length ({})",
                c.min_mean_word_length, c.max_mean_word_length
            ));
        }
        let shares = [
            ("max_ellipsis_lines", c.max_ellipsis_lines),
            ("max_bullet_lines", c.max_bullet_lines),
            ("min_alphabetic_words", c.min_alphabetic_words),
            ("max_duplicate_lines", c.max_duplicate_lines),
            ("max_top_2gram", c.max_top_2gram),
            ("max_top_3gram", c.max_top_3gram),
            ("max_top_4gram", c.max_top_4gram),
        ];
        if let Some((key, v)) = shares.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
            return Err(format!("{key} = {v} is a share: use a value from 0 to 1"));
        }
        let roles = Roles::new(c.roles.clone())?;
        Ok(Quality { c, roles })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        let text: Vec<&str> = self.roles.turns(example).map(|t| t.content.as_str()).collect();
        match self.judge(&text.join("\n")) {
            Some(reason) => Verdict::Drop(reason),
            None => Verdict::Keep,
        }
    }
}

lorahost_sdk::export_filter!(Quality);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    /// Only the named rules on (the others at their off values), so each test sees one rule at work.
    fn only(rules: &str) -> Quality {
        let off = "min_words = 0\nmax_words = 1000000\nmin_mean_word_length = 0.0\nmax_mean_word_length = 1000.0\n\
                   max_symbol_word_ratio = 1000.0\nmax_ellipsis_lines = 1.0\nmax_bullet_lines = 1.0\n\
                   min_alphabetic_words = 0.0\nmin_stop_words = 0\nmax_duplicate_lines = 1.0\nmax_top_2gram = 1.0\n\
                   max_top_3gram = 1.0\nmax_top_4gram = 1.0\n";
        let mut table: toml::Table = off.parse().unwrap();
        table.extend(rules.parse::<toml::Table>().unwrap());
        Quality::new(parse_config(&toml::to_string(&table).unwrap()).unwrap()).unwrap()
    }

    fn judge(q: &mut Quality, text: &str) -> Verdict {
        q.filter(&Example::new("1", "d", vec![Turn::new("user", "q"), Turn::new("assistant", text)]))
    }

    fn drop(reason: &str) -> Verdict {
        Verdict::Drop(reason.into())
    }

    #[test]
    fn word_count_edges() {
        let mut q = only("min_words = 3\nmax_words = 4\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "one two"), drop("fewer than 3 words"));
        assert_eq!(judge(&mut q, "one two three"), Verdict::Keep);
        assert_eq!(judge(&mut q, "one two three four"), Verdict::Keep);
        assert_eq!(judge(&mut q, "one two three four five"), drop("more than 4 words"));
        // Without roles the user turn counts too.
        let mut all = only("min_words = 3");
        assert_eq!(judge(&mut all, "two words"), Verdict::Keep);
    }

    #[test]
    fn mean_word_length_edges() {
        let mut q = only("min_mean_word_length = 3.0\nmax_mean_word_length = 5.0\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "ab cd"), drop("mean word length under 3"));
        assert_eq!(judge(&mut q, "abc def"), Verdict::Keep);
        assert_eq!(judge(&mut q, "abcde fghij"), Verdict::Keep);
        assert_eq!(judge(&mut q, "abcdef ghijkl"), drop("mean word length over 5"));
    }

    #[test]
    fn symbols_alphabetic_and_stop_words() {
        let mut q = only("max_symbol_word_ratio = 0.25\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "#tag one two three"), Verdict::Keep); // 1 per 4 words: at the edge
        assert_eq!(judge(&mut q, "#tag one two and…"), drop("symbol-to-word ratio over 0.25"));
        let mut q = only("min_alphabetic_words = 0.5\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "12 ab"), Verdict::Keep);
        assert_eq!(judge(&mut q, "12 34 ab"), drop("under 50% of words alphabetic"));
        let mut q = only("min_stop_words = 2\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "the cat"), drop("fewer than 2 stop words"));
        assert_eq!(judge(&mut q, "The, cat THE."), Verdict::Keep);
    }

    #[test]
    fn lines_rules() {
        let mut q = only("max_ellipsis_lines = 0.5\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "one...\ntwo\n\n"), Verdict::Keep);
        assert_eq!(judge(&mut q, "one...\ntwo…\nthree"), drop("over 50% of lines end in an ellipsis"));
        let mut q = only("max_bullet_lines = 0.5\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "Items:\n- a"), Verdict::Keep);
        assert_eq!(judge(&mut q, "Items:\n- a\n• b"), drop("over 50% of lines start with a bullet"));
        let mut q = only("max_duplicate_lines = 0.25\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "a\nb\nc\na"), Verdict::Keep);
        assert_eq!(judge(&mut q, "a\nb\na\na"), drop("over 25% of lines repeated"));
    }

    #[test]
    fn top_ngram_repetition() {
        let mut q = only("max_top_2gram = 0.5\nroles = [\"assistant\"]");
        // "ab cd" twice: 8 of 16 characters = 0.5, kept at the edge.
        assert_eq!(judge(&mut q, "ab cd ab cd ef gh ij kl"), Verdict::Keep);
        assert_eq!(judge(&mut q, "ab cd ab cd ab cd ef gh"), drop("top 2-gram over 50% of characters"));
        // A 2-gram seen once never counts, however long.
        assert_eq!(judge(&mut q, "abcdefghijklmnop qr"), Verdict::Keep);
        let mut q = only("max_top_4gram = 0.16\nroles = [\"assistant\"]");
        assert_eq!(judge(&mut q, "one two three four one two three four x"), drop("top 4-gram over 16% of characters"));
    }

    #[test]
    fn gopher_defaults_keep_prose_and_drop_junk() {
        let mut q = Quality::new(parse_config("").unwrap()).unwrap();
        let prose = "The committee met on Tuesday to review the proposal, and members agreed that the plan should \
            go ahead with a smaller budget. Several of them noted that the timeline was tight, but the chair said \
            the team would have enough time to deliver the first phase before the end of the year. A final vote \
            is expected next month after the financial review has been completed by the auditors.";
        assert_eq!(judge(&mut q, prose), Verdict::Keep);
        assert_eq!(judge(&mut q, "Too short to be a document."), drop("fewer than 50 words"));
        let spam = "buy now ".repeat(40);
        assert!(matches!(judge(&mut q, &spam), Verdict::Drop(_)));
    }

    #[test]
    fn rejects_bad_options() {
        let err = |c: &str| Quality::new(parse_config(c).unwrap()).err().unwrap();
        assert!(err("min_words = 10\nmax_words = 5").contains("min_words (10) is greater than max_words (5)"));
        assert!(err("max_bullet_lines = 90").contains("max_bullet_lines = 90 is a share"));
        assert!(err("min_mean_word_length = 9.0\nmax_mean_word_length = 4.0").contains("greater than"));
        assert!(parse_config::<Config>("min_word = 3").err().unwrap().contains("unknown field `min_word`"));
    }
}
