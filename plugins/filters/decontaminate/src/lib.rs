//! `decontaminate`: drops training records that share a word n-gram with evaluation files, so a model is not
//! trained on the questions it will be scored on (the GPT-3 / LLaMA 13-gram check).
//!
//! ```toml
//! [[filter]]
//! plugin = "decontaminate"
//! files = ["eval/mmlu_test.csv", "eval/gsm8k_test.jsonl"]   # evaluation files (granted read-only)
//! n = 13              # words per n-gram
//! mode = "drop"       # or "report": keep the record and mark it (meta `contaminated` = the file), counted as rewritten
//! roles = ["user"]    # the turns checked (default: all)
//! ```
//!
//! Evaluation sets in any format a source plugin reads (MMLU's folder, Parquet, TruthfulQA's CSV) are named
//! with two keys the host takes before the plugin starts (host/src/data/eval_sets.rs):
//!
//! ```toml
//! eval_tasks = ["mmlu", "gsm8k"]     # eval task names or .toml files, found as `lorahost eval --tasks` finds them
//! eval_sources = [{ plugin = "truthfulqa", path = "data/TruthfulQA.csv" }]   # source uses, as a dataset's `source`
//! ```
//!
//! The host reads each set through its source plugin (a task's `[source]`: the records it scores), writes
//! one JSON Lines file per set into the run's cache (each record's turn contents as a list of strings, the
//! file named after the task, or the source's plugin and file) and appends it to `files`, granted
//! read-only; so the plugin reads nothing but files, and drop reasons name the set: "shares a 13-gram with
//! mmlu.jsonl". `files`, `eval_tasks` and `eval_sources` may be combined.
//!
//! How files are read: `.jsonl` line by line, every string of each JSON value a text; `.json` every string of
//! the document; any other file (CSV, TSV, plain text) one text per line. Words are runs of letters and digits,
//! lowercased, so case, punctuation and layout do not hide an overlap. Evaluation texts shorter than `n` words
//! (answer letters, numbers) are skipped: matching them would drop every training record that says "A" or "72".
//! The drop reason names the first evaluation file that shares an n-gram: "shares a 13-gram with
//! gsm8k_test.jsonl".
//!
//! Memory: one 8-byte hash and a 2-byte file number per distinct evaluation n-gram (about 20 to 40 bytes per
//! evaluation word with the hash table's growth); nothing per training record. Each n-gram is hashed once from
//! its words' hashes, without building strings.
use lorahost_sdk::{Example, Filter, Verdict};
use lorahost_text::{ngram_hashes, word_hashes, KeyMap, Roles};
use std::path::Path;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    files: Vec<String>,
    #[serde(default = "thirteen")]
    n: usize,
    #[serde(default)]
    mode: Mode,
    roles: Option<Vec<String>>,
}

fn thirteen() -> usize {
    13
}

#[derive(serde::Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Drop,
    Report,
}

struct Decontaminate {
    n: usize,
    mode: Mode,
    roles: Roles,
    /// Evaluation n-gram hash -> number of the first file that has it.
    grams: KeyMap<u16>,
    /// File names (without folders), for reasons.
    names: Vec<String>,
    words: Vec<u64>,
    hashes: Vec<u64>,
}

/// Every string inside a JSON value.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The texts of one evaluation file, as the header says.
fn texts(path: &str) -> Result<Vec<String>, String> {
    let data = std::fs::read_to_string(path).map_err(|e| format!("files: cannot read {path}: {e}"))?;
    let ext = Path::new(path).extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut out = Vec::new();
    match ext.as_str() {
        "jsonl" => {
            for (i, line) in data.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| format!("{path}:{}: not JSON ({e}); each line must be one JSON value", i + 1))?;
                strings(&v, &mut out);
            }
        }
        "json" => {
            let v: serde_json::Value = serde_json::from_str(&data).map_err(|e| format!("{path}: not JSON ({e})"))?;
            strings(&v, &mut out);
        }
        "parquet" | "arrow" | "gz" | "zst" => {
            return Err(format!(
                "{path}: a .{ext} file cannot be read here; name it in `eval_sources` with a source plugin that reads \
                 it (e.g. {{ plugin = \"parquet\", path = ... }}), or convert it to JSON Lines or CSV"
            ))
        }
        _ => out.extend(data.lines().map(str::to_string)),
    }
    Ok(out)
}

impl Decontaminate {
    /// The file number of the first evaluation n-gram in the selected turns, if any.
    fn first_hit(&mut self, example: &Example) -> Option<u16> {
        for turn in self.roles.turns(example) {
            self.words.clear();
            self.hashes.clear();
            word_hashes(&turn.content, &mut self.words);
            if self.words.len() < self.n {
                continue;
            }
            ngram_hashes(&self.words, self.n, &mut self.hashes);
            if let Some(&f) = self.hashes.iter().find_map(|h| self.grams.get(h)) {
                return Some(f);
            }
        }
        None
    }
}

impl Filter for Decontaminate {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.n == 0 {
            return Err("n = 0: an n-gram needs at least one word".into());
        }
        if c.files.is_empty() {
            return Err("files = [] names no evaluation file".into());
        }
        if c.files.len() > u16::MAX as usize {
            return Err(format!("files names {} files; at most {}", c.files.len(), u16::MAX));
        }
        let mut grams = KeyMap::default();
        let mut names = Vec::new();
        let (mut words, mut hashes) = (Vec::new(), Vec::new());
        for (f, path) in c.files.iter().enumerate() {
            let mut any = false;
            for text in texts(path)? {
                words.clear();
                hashes.clear();
                word_hashes(&text, &mut words);
                if words.len() < c.n {
                    continue;
                }
                ngram_hashes(&words, c.n, &mut hashes);
                any = true;
                for &h in &hashes {
                    grams.entry(h).or_insert(f as u16);
                }
            }
            if !any {
                return Err(format!("{path} has no text of {} words or more: is it the right file (or `n` too large)?", c.n));
            }
            names.push(Path::new(path).file_name().map_or(path.clone(), |n| n.to_string_lossy().into_owned()));
        }
        Ok(Decontaminate { n: c.n, mode: c.mode, roles: Roles::new(c.roles)?, grams, names, words, hashes })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        let Some(f) = self.first_hit(example) else {
            return Verdict::Keep;
        };
        let file = &self.names[f as usize];
        match self.mode {
            Mode::Drop => Verdict::Drop(format!("shares a {}-gram with {file}", self.n)),
            Mode::Report => {
                let mut marked = example.clone();
                marked.set_meta("contaminated", file.as_str());
                Verdict::Rewrite(marked)
            }
        }
    }
}

lorahost_sdk::export_filter!(Decontaminate);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};
    use std::io::Write;

    fn qa(q: &str, a: &str) -> Example {
        Example::new("t:1", "train", vec![Turn::new("user", q), Turn::new("assistant", a)])
    }

    /// An evaluation folder with a JSON Lines file and a CSV file.
    fn eval_dir() -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("gsm8k.jsonl");
        let mut f = std::fs::File::create(&jsonl).unwrap();
        writeln!(f, r#"{{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.", "answer": "72"}}"#).unwrap();
        writeln!(f).unwrap();
        writeln!(f, r#"{{"question": "Tiny?", "answer": ["nested list of words that is long enough"]}}"#).unwrap();
        let csv = dir.path().join("mmlu.csv");
        std::fs::write(&csv, "Which planet is known as the red planet in our solar system,Mars,Venus\n").unwrap();
        (dir, jsonl.display().to_string(), csv.display().to_string())
    }

    fn filter(files: &[&str], extra: &str) -> Decontaminate {
        let list = files.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ");
        Decontaminate::new(parse_config(&format!("files = [{list}]\n{extra}")).unwrap()).unwrap()
    }

    #[test]
    fn drops_on_a_shared_ngram_whatever_the_case_and_punctuation() {
        let (_d, jsonl, csv) = eval_dir();
        let mut f = filter(&[&jsonl, &csv], "n = 8");
        // 8 words of the GSM8K question inside a longer prompt, different case and punctuation.
        let hit = qa("Solve: NATALIA sold clips to 48 of her friends in april -- then what?", "72");
        assert_eq!(f.filter(&hit), Verdict::Drop("shares a 8-gram with gsm8k.jsonl".into()));
        // 7 shared words are not 8.
        assert_eq!(f.filter(&qa("Natalia sold clips to 48 of her cousins", "")), Verdict::Keep);
        // A CSV row is one text: its first 8 words match.
        assert_eq!(f.filter(&qa("", "which planet is known as the red planet, asked Tom")), Verdict::Drop("shares a 8-gram with mmlu.csv".into()));
        // Strings nested in arrays count.
        assert_eq!(f.filter(&qa("a nested list of words that is long enough indeed", "")), Verdict::Drop("shares a 8-gram with gsm8k.jsonl".into()));
        // Evaluation texts shorter than n words are skipped: an answer "72" contaminates nothing.
        assert_eq!(f.filter(&qa("tiny", "72")), Verdict::Keep);
    }

    #[test]
    fn the_default_is_13_words_and_roles_limit_the_check() {
        let (_d, jsonl, _) = eval_dir();
        let q = "Natalia sold clips to 48 of her friends in April, and then she sold";
        let mut f = filter(&[&jsonl], "");
        assert_eq!(f.filter(&qa(q, "")), Verdict::Drop("shares a 13-gram with gsm8k.jsonl".into()));
        let q12 = "Natalia sold clips to 48 of her friends in April, and then";
        assert_eq!(f.filter(&qa(q12, "")), Verdict::Keep);
        let mut answers_only = filter(&[&jsonl], "roles = [\"assistant\"]");
        assert_eq!(answers_only.filter(&qa(q, "")), Verdict::Keep);
        assert_eq!(answers_only.filter(&qa("", q)), Verdict::Drop("shares a 13-gram with gsm8k.jsonl".into()));
    }

    #[test]
    fn report_mode_marks_and_keeps_everything_else() {
        let (_d, jsonl, _) = eval_dir();
        let mut f = filter(&[&jsonl], "mode = \"report\"\nn = 5");
        let mut e = qa("natalia sold clips to 48", "answer");
        e.set_meta("source", "web");
        let Verdict::Rewrite(marked) = f.filter(&e) else { panic!("expected a rewrite") };
        assert_eq!(marked.meta("contaminated"), Some("gsm8k.jsonl"));
        assert_eq!(marked.meta("source"), Some("web"));
        assert_eq!((marked.id.as_str(), &marked.turns), (e.id.as_str(), &e.turns));
    }

    #[test]
    fn bad_files_and_options_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"q\": \"fine\"}\n{broken\n").unwrap();
        let err = |c: String| Decontaminate::new(parse_config(&c).unwrap()).err().unwrap();
        let e = err(format!("files = [{:?}]", bad.display().to_string()));
        assert!(e.contains("bad.jsonl:2: not JSON"), "{e}");
        let e = err(format!("files = [{:?}]", dir.path().join("missing.txt").display().to_string()));
        assert!(e.contains("cannot read") && e.contains("missing.txt"), "{e}");
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "\n\n").unwrap();
        assert!(err(format!("files = [{:?}]", empty.display().to_string())).contains("has no text of 13 words or more"));
        let pq = dir.path().join("x.parquet");
        std::fs::write(&pq, "PAR1").unwrap();
        assert!(err(format!("files = [{:?}]", pq.display().to_string())).contains("convert it to JSON Lines"));
        assert!(err("files = []".into()).contains("no evaluation file"));
        assert!(err("files = [\"x\"]\nn = 0".into()).contains("n = 0"));
        assert!(parse_config::<Config>("files = [\"x\"]\nmode = \"warn\"").is_err());
    }
}
