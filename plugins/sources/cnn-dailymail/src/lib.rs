//! `cnn-dailymail`: reads CNN/DailyMail (3.0.0) summarization records, `article`, `highlights` and `id`,
//! from a CSV file with a header (`id,article,highlights` in any column order, the common export) or from
//! JSON Lines (one object a line, the HF layout). A path ending in `.csv` is CSV; anything else JSON Lines.
//!
//! ```toml
//! [[dataset]]
//! name = "cnn-dm"
//! [dataset.source]
//! plugin = "cnn-dailymail"
//! path = "data/cnn_dailymail/train.csv"
//! ```
//!
//! Each article becomes the 2023 recipe's format: instruction = the article, input =
//! `Summarize the above article in 3 sentences.`, output = the highlights unchanged (their sentences joined by
//! `\n`, as in the data); so the user turn is `{article}\nSummarize the above article in 3 sentences.` and the
//! answer e.g. `City council votes 7-2 to turn a disused rail line into a park .\nThe three-year project ...`.
//!
//! Ids are `<file name>:<line>` (the line a CSV row starts on); the record's own `id` goes into the metadata
//! as `id`, the article and highlights as `article` and `highlights` (what `lorahost eval` prompts from). A row or line without an article or highlights (or, in CSV, with a short row) is reported as
//! `<file name>:<line>: <what is wrong>` and skipped.
use lorahost_recipe_sources::{field, fill, object, open_buffered, opt_field, JsonLines, Next};
use lorahost_sdk::{Batch, Example, Source};
use std::fs::File;
use std::io::BufReader;

/// What follows every article in the user turn.
pub const INSTRUCTION: &str = "Summarize the above article in 3 sentences.";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
}

enum Input {
    Csv {
        reader: csv::Reader<BufReader<File>>,
        name: String,
        /// Column indices of article, highlights and id.
        columns: [usize; 2],
        id: Option<usize>,
        row: csv::StringRecord,
    },
    Jsonl(JsonLines),
}

struct CnnDailymail(Input);

fn record(at: String, article: &str, highlights: String, id: Option<String>) -> Result<Example, String> {
    if article.trim().is_empty() {
        return Err("the article is empty".into());
    }
    if highlights.trim().is_empty() {
        return Err("the highlights are empty".into());
    }
    let mut example = Example::instruction(at, "", article, INSTRUCTION, highlights.as_str());
    example.set_meta("article", article);
    example.set_meta("highlights", highlights);
    if let Some(id) = id.filter(|i| !i.is_empty()) {
        example.set_meta("id", id);
    }
    Ok(example)
}

impl CnnDailymail {
    fn next_record(&mut self) -> Result<Next, String> {
        match &mut self.0 {
            Input::Jsonl(lines) => lines.next_with(|value, at| {
                let r = object(value)?;
                record(at.to_string(), &field(r, "article")?, field(r, "highlights")?, opt_field(r, "id")?)
            }),
            Input::Csv { reader, name, columns, id, row } => {
                match reader.read_record(row) {
                    Ok(false) => return Ok(None),
                    Ok(true) => {}
                    Err(e) => {
                        let line = e.position().map_or(0, |p| p.line());
                        return match e.kind() {
                            csv::ErrorKind::Io(_) => Err(format!("{name}: cannot read: {e}")),
                            csv::ErrorKind::Utf8 { .. } => Ok(Some(Err(format!("{name}:{line}: not valid UTF-8")))),
                            _ => Ok(Some(Err(format!("{name}:{line}: {e}")))),
                        };
                    }
                }
                let at = format!("{name}:{}", row.position().map_or(0, |p| p.line()));
                let needed = columns.iter().chain(id.iter()).max().copied().unwrap_or(0) + 1;
                if row.len() < needed {
                    return Ok(Some(Err(format!("{at}: expected {needed} fields, found {}", row.len()))));
                }
                let result =
                    record(at.clone(), &row[columns[0]], row[columns[1]].to_string(), id.map(|i| row[i].to_string()));
                Ok(Some(result.map_err(|e| format!("{at}: {e}"))))
            }
        }
    }
}

impl Source for CnnDailymail {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        if !c.path.to_ascii_lowercase().ends_with(".csv") {
            return Ok(CnnDailymail(Input::Jsonl(JsonLines::open(&c.path)?)));
        }
        let (file, name) = open_buffered(&c.path)?;
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
        let headers = reader.headers().map_err(|e| format!("{name}: cannot read the header: {e}"))?.clone();
        let find = |n: &str| headers.iter().position(|h| h.trim().trim_start_matches('\u{feff}') == n);
        let (Some(article), Some(highlights)) = (find("article"), find("highlights")) else {
            return Err(format!("{name} has no `article` and `highlights` columns in its header"));
        };
        Ok(CnnDailymail(Input::Csv {
            reader,
            name,
            columns: [article, highlights],
            id: find("id"),
            row: csv::StringRecord::new(),
        }))
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || self.next_record())
    }
}

lorahost_sdk::export_source!(CnnDailymail);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    /// Made-up records with the real layout (see tests/fixtures/samples/SOURCES.md).
    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/samples/cnn_dailymail/");

    fn open(path: &str) -> Result<CnnDailymail, String> {
        parse_config::<Config>(&format!("path = {path:?}")).and_then(CnnDailymail::open)
    }

    fn read_all(path: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = open(path).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 2)
    }

    #[test]
    fn csv_and_jsonl_give_the_same_records() {
        let (csv, m1) = read_all(&format!("{SAMPLES}train.sample.csv"));
        let (jsonl, m2) = read_all(&format!("{SAMPLES}train.sample.jsonl"));
        assert!(m1.is_empty() && m2.is_empty());
        assert_eq!((csv.len(), jsonl.len()), (3, 3));
        for (a, b) in csv.iter().zip(&jsonl) {
            assert_eq!((&a.turns, &a.meta), (&b.turns, &b.meta));
        }
        let ids: Vec<_> = csv.iter().map(|r| r.id.as_str()).collect();
        // Rows start where their quoted multi-line fields put them.
        assert_eq!(ids, ["train.sample.csv:2", "train.sample.csv:5", "train.sample.csv:8"]);
        assert_eq!(jsonl[2].id, "train.sample.jsonl:3");
        let last = &csv[2];
        assert_eq!(
            last.turns[0].content,
            "(CNN) -- A city council voted 7-2 on Monday to turn a disused rail line into a public park.\n\n\
             The project, expected to take three years, will add about 4 kilometers of walking and cycling paths.\n\
             Summarize the above article in 3 sentences."
        );
        assert_eq!(
            last.turns[1].content,
            "City council votes 7-2 to turn a disused rail line into a park .\nThe three-year project adds about 4 km of paths ."
        );
        assert_eq!(last.meta("id"), Some("00027e965c8264c35cc1bc55556db388da82b07f"));
        assert!(csv[0].turns[0].content.contains("\"We counted more than 900 before lunch,\""));
    }

    #[test]
    fn malformed_rows_and_lines() {
        let dir = std::env::temp_dir().join(format!("lorahost-cnndm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("t.csv");
        std::fs::write(&csv, "article,highlights,id\n\"A\nB\",H,1\n,H,2\nA\nA,H,4\n").unwrap();
        let (records, malformed) = read_all(csv.to_str().unwrap());
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].turns[0].content, "A\nB\nSummarize the above article in 3 sentences.");
        assert_eq!(records[1].id, "t.csv:6");
        assert_eq!(malformed, ["t.csv:4: the article is empty", "t.csv:5: expected 3 fields, found 1"]);
        let jsonl = dir.join("t.jsonl");
        std::fs::write(&jsonl, "{\"article\": \"A\"}\n{\"article\": \"A\", \"highlights\": \"H\"}\n").unwrap();
        let (records, malformed) = read_all(jsonl.to_str().unwrap());
        assert_eq!((records.len(), records[0].meta("id")), (1, None));
        assert_eq!(malformed, ["t.jsonl:1: missing field `highlights`"]);
        std::fs::write(&csv, "text,summary\nx,y\n").unwrap();
        assert!(open(csv.to_str().unwrap()).err().unwrap().starts_with("t.csv has no `article` and `highlights`"));
        std::fs::remove_dir_all(dir).ok();
    }
}
