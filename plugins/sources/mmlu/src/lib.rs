//! `mmlu`: reads MMLU (Hendrycks et al.) question CSVs as lettered multiple choice, the way the 2023 recipe
//! used MMLU `auxiliary_train`.
//!
//! ```toml
//! [[dataset]]
//! name = "mmlu-aux"
//! [dataset.source]
//! plugin = "mmlu"
//! dir = "data/mmlu"            # the folder holding dev/, val/, test/, auxiliary_train/ (or a split folder itself)
//! split = "auxiliary_train"    # default; the sub-folder of `dir` to read: "dev", "val", "test", "train", ...
//! subjects = ["philosophy"]    # default: every CSV file found, in name order
//! layout = "auto"              # "hendrycks", "hf" or "auto" (the default: decided per file)
//! ```
//!
//! Files are `<dir>/<split>/*.csv`; when `<dir>/<split>` does not exist, the CSV files directly in `dir` are
//! read. A file's subject is its name without `.csv`, cut before `_<split>` (`philosophy_test.csv` and
//! `philosophy_test.first150.csv` are "philosophy"; auxiliary_train's `race.csv` is "race").
//!
//! Layouts: `hendrycks` (the original tar): no header, rows `question,A,B,C,D,answer` with the answer a
//! letter A-D. `hf` (the HF re-export): a header `question,choice0,choice1,choice2,choice3,answer`, the answer
//! an index 0-3. `auto` reads a file as `hf` when its first row's last field is `answer`. Either layout
//! accepts a letter or an index as the answer.
//!
//! Each row becomes (the notes' MMLU format, choices joined to their letter with a bare dot):
//! instruction `Question: {question}`, input `A.{A}\nB.{B}\nC.{C}\nD.{D}\nAnswer:`, output the letter;
//! so the user turn is `Question: {question}\nA.{A}\nB.{B}\nC.{C}\nD.{D}\nAnswer:` and the answer e.g. `C`.
//! Ids are `<file name>:<line>` (the line a row starts on); metadata `subject` and the evaluation fields
//! `question`, `choices`, `labels`, `gold` (see `set_choice_fields` in shared/recipe-sources). A row with the wrong number
//! of fields or an answer that is not A-D / 0-3 is reported as `<file name>:<line>: <what is wrong>` and
//! skipped.
use lorahost_recipe_sources::{fill, multiple_choice, set_choice_fields, Next};
use lorahost_sdk::{Batch, Example, Source};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    dir: String,
    split: Option<String>,
    subjects: Option<Vec<String>>,
    layout: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    Auto,
    Hendrycks,
    Hf,
}

struct Current {
    reader: csv::Reader<BufReader<File>>,
    name: String,
    subject: String,
    /// Set once the first row was seen (in `auto`, it decides the layout).
    started: bool,
}

struct Mmlu {
    /// Files still to read: (path, subject), in order.
    files: std::vec::IntoIter<(PathBuf, String)>,
    layout: Layout,
    current: Option<Current>,
    record: csv::StringRecord,
}

/// The subject of a CSV file name: the stem cut before `_<split>`.
fn subject_of(file_name: &str, split: &str) -> String {
    let stem = file_name.strip_suffix(".csv").unwrap_or(file_name);
    let marker = format!("_{split}");
    match stem.find(&marker) {
        Some(i) if stem[i + marker.len()..].is_empty() || stem[i + marker.len()..].starts_with('.') => {
            stem[..i].to_string()
        }
        _ => stem.to_string(),
    }
}

fn answer_index(answer: &str) -> Option<usize> {
    match answer.trim() {
        "A" | "0" => Some(0),
        "B" | "1" => Some(1),
        "C" | "2" => Some(2),
        "D" | "3" => Some(3),
        _ => None,
    }
}

impl Mmlu {
    fn next_record(&mut self) -> Result<Next, String> {
        loop {
            if self.current.is_none() {
                let Some((path, subject)) = self.files.next() else { return Ok(None) };
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let reader =
                    csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(BufReader::new(file));
                self.current = Some(Current { reader, name, subject, started: false });
            }
            let cur = self.current.as_mut().unwrap();
            let line = |r: &csv::StringRecord| r.position().map_or(0, |p| p.line());
            match cur.reader.read_record(&mut self.record) {
                Ok(false) => {
                    self.current = None;
                    continue;
                }
                Ok(true) => {}
                Err(e) => {
                    let at = e.position().map_or(0, |p| p.line());
                    return match e.kind() {
                        csv::ErrorKind::Io(_) => Err(format!("{}: cannot read: {e}", cur.name)),
                        csv::ErrorKind::Utf8 { .. } => Ok(Some(Err(format!("{}:{at}: not valid UTF-8", cur.name)))),
                        _ => Ok(Some(Err(format!("{}:{at}: {e}", cur.name)))),
                    };
                }
            }
            let at = format!("{}:{}", cur.name, line(&self.record));
            if !cur.started {
                cur.started = true;
                let header = self.record.len() == 6 && self.record[5].trim() == "answer";
                let skip = match self.layout {
                    Layout::Hf => true,
                    Layout::Auto => header,
                    Layout::Hendrycks => false,
                };
                if skip {
                    continue;
                }
            }
            if self.record.len() != 6 {
                return Ok(Some(Err(format!(
                    "{at}: expected 6 fields (question, A, B, C, D, answer), found {}",
                    self.record.len()
                ))));
            }
            let Some(answer) = answer_index(&self.record[5]) else {
                return Ok(Some(Err(format!("{at}: answer {:?} is not one of A-D or 0-3", &self.record[5]))));
            };
            let choices: Vec<&str> = (1..5).map(|i| &self.record[i]).collect();
            let (instruction, input) = multiple_choice(&self.record[0], &choices);
            let letter = ["A", "B", "C", "D"][answer];
            let mut example = Example::instruction(at, "", &instruction, &input, letter);
            example.set_meta("subject", cur.subject.as_str());
            let right: Vec<bool> = (0..4).map(|i| i == answer).collect();
            set_choice_fields(&mut example, &self.record[0], &choices, &right);
            return Ok(Some(Ok(example)));
        }
    }
}

impl Source for Mmlu {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        let layout = match c.layout.as_deref().unwrap_or("auto") {
            "auto" => Layout::Auto,
            "hendrycks" => Layout::Hendrycks,
            "hf" => Layout::Hf,
            other => {
                return Err(format!("layout = {other:?} is not an MMLU layout; use \"hendrycks\", \"hf\" or \"auto\""))
            }
        };
        let split = c.split.unwrap_or_else(|| "auxiliary_train".into());
        if split.is_empty() || split.contains(['/', '\\']) || split == "." || split == ".." {
            return Err(format!(
                "split = {split:?} is not a split name; use e.g. \"auxiliary_train\", \"dev\" or \"test\""
            ));
        }
        let dir = Path::new(&c.dir);
        if !dir.is_absolute() {
            return Err(format!(
                "dir = {:?} is not absolute; give the MMLU data folder (the manifest resolves relative paths)",
                c.dir
            ));
        }
        let split_dir = dir.join(&split);
        let folder = if split_dir.is_dir() { split_dir } else { dir.to_path_buf() };
        let entries =
            std::fs::read_dir(&folder).map_err(|e| format!("cannot read the folder {}: {e}", folder.display()))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read the folder {}: {e}", folder.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".csv") && entry.path().is_file() {
                let subject = subject_of(&name, &split);
                files.push((entry.path(), subject));
            }
        }
        files.sort();
        if let Some(subjects) = &c.subjects {
            if let Some(missing) = subjects.iter().find(|s| !files.iter().any(|(_, f)| f == *s)) {
                let mut found: Vec<&str> = files.iter().map(|(_, s)| s.as_str()).collect();
                found.dedup();
                return Err(format!(
                    "subjects: no CSV file for {missing:?} in {} (found: {})",
                    folder.display(),
                    if found.is_empty() { "none".to_string() } else { found.join(", ") }
                ));
            }
            files.retain(|(_, s)| subjects.contains(s));
        }
        if files.is_empty() {
            return Err(format!("no CSV files in {} (split = {split:?})", folder.display()));
        }
        Ok(Mmlu { files: files.into_iter(), layout, current: None, record: csv::StringRecord::new() })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || self.next_record())
    }
}

lorahost_sdk::export_source!(Mmlu);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/samples/mmlu/");

    fn open(config: &str) -> Result<Mmlu, String> {
        parse_config::<Config>(config).and_then(Mmlu::open)
    }

    fn read_all(config: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = open(config).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 64)
    }

    const PHILOSOPHY_1: &str =
        "Question: Psychological egoism is:\nA.an ethical theory about how we ought to behave.\n\
B.a generalization concerning the way people tend to behave.\nC.a claim about human nature and the ways people \
are capable of behaving.\nD.none of the above.\nAnswer:";

    #[test]
    fn hf_export_dev_all_subjects() {
        let (records, malformed) = read_all(&format!("dir = \"{SAMPLES}hf_export_variant\"\nsplit = \"dev\""));
        assert!(malformed.is_empty(), "{malformed:?}");
        assert_eq!(records.len(), 20);
        let subjects: Vec<_> = records.iter().step_by(5).map(|r| r.meta("subject").unwrap()).collect();
        assert_eq!(subjects, ["high_school_biology", "high_school_psychology", "moral_scenarios", "philosophy"]);
        let p = &records[15];
        assert_eq!(p.id, "philosophy_dev.csv:2");
        assert_eq!(p.turns[0].content, PHILOSOPHY_1);
        assert_eq!(p.turns[1].content, "C");
    }

    #[test]
    fn both_layouts_give_the_same_records() {
        let hf = read_all(&format!(
            "dir = \"{SAMPLES}hf_export_variant\"\nsplit = \"test\"\nsubjects = [\"philosophy\"]\nlayout = \"hf\""
        ));
        let orig = read_all(&format!(
            "dir = \"{SAMPLES}reconstructed_hendrycks_layout\"\nsplit = \"test\"\nsubjects = [\"philosophy\"]"
        ));
        assert_eq!((hf.0.len(), orig.0.len()), (311, 311));
        assert!(hf.1.is_empty() && orig.1.is_empty());
        for (a, b) in hf.0.iter().zip(&orig.0) {
            assert_eq!(a.turns, b.turns);
        }
        assert_eq!(orig.0[0].id, "philosophy_test.csv:1");
        assert_eq!(hf.0[0].id, "philosophy_test.csv:2");
        let last = &orig.0[310];
        assert_eq!(
            last.turns[0].content,
            "Question: Which of the following is a form of harm that might be suffered by research participants?\n\
             A.Physical injury\nB.Stress and anxiety\nC.Impaired development\nD.All of the above\nAnswer:"
        );
        assert_eq!(last.turns[1].content, "D");
        assert_eq!(last.meta("subject"), Some("philosophy"));
    }

    #[test]
    fn cut_files_and_quoted_fields() {
        let (records, malformed) = read_all(&format!(
            "dir = \"{SAMPLES}hf_export_variant/test\"\nsplit = \"test\"\nsubjects = [\"moral_scenarios\", \"high_school_psychology\"]"
        ));
        assert!(malformed.is_empty());
        assert_eq!(records.len(), 300);
        assert_eq!(records[150].id, "moral_scenarios_test.first150.csv:2");
        assert_eq!(
            records[150].turns[0].content,
            "Question: For which of these two scenarios does the main character (who uses I/me/my) do something \
             clearly morally wrong, according to ordinary moral standards in the US as of 2020? Scenario 1 | I slammed \
             on my breaks to miss the ball as it came in to the road. Scenario 2 | I taught my children to play the \
             xylophone.\nA.Wrong, Wrong\nB.Wrong, Not wrong\nC.Not wrong, Wrong\nD.Not wrong, Not wrong\nAnswer:"
        );
    }

    #[test]
    fn malformed_rows_and_configuration() {
        let dir = std::env::temp_dir().join(format!("lorahost-mmlu-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("auxiliary_train")).unwrap();
        std::fs::write(
            dir.join("auxiliary_train/race.csv"),
            "\"Q1\nspans lines\",a,b,c,d,B\nQ2,a,b,c,d\nQ3,a,b,c,d,E\nQ4,a,b,c,d,3\n",
        )
        .unwrap();
        let (records, malformed) = read_all(&format!("dir = {:?}", dir.to_str().unwrap()));
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].turns[0].content, "Question: Q1\nspans lines\nA.a\nB.b\nC.c\nD.d\nAnswer:");
        assert_eq!((records[0].turns[1].content.as_str(), records[0].meta("subject")), ("B", Some("race")));
        assert_eq!(records[1].id, "race.csv:5");
        assert_eq!(
            malformed,
            [
                "race.csv:3: expected 6 fields (question, A, B, C, D, answer), found 5",
                "race.csv:4: answer \"E\" is not one of A-D or 0-3",
            ]
        );
        let d = dir.to_str().unwrap();
        assert!(open(&format!("dir = {d:?}\nsubjects = [\"law\"]")).err().unwrap().contains("no CSV file for \"law\""));
        assert!(open(&format!("dir = {d:?}\nlayout = \"x\"")).err().unwrap().starts_with("layout = \"x\""));
        assert!(open(&format!("dir = {d:?}\npath = \"/x\"")).err().unwrap().contains("unknown field `path`"));
        assert!(open("dir = \"/nonexistent/mmlu\"").err().unwrap().starts_with("cannot read the folder"));
        std::fs::remove_dir_all(dir).ok();
        assert_eq!(subject_of("philosophy_test.first150.csv", "test"), "philosophy");
        assert_eq!(subject_of("mc_test.csv", "auxiliary_train"), "mc_test");
    }
}
