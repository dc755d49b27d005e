//! `csv`: reads records from a CSV file, one row a record, streaming. Each row becomes a JSON object of
//! strings keyed by column name and is then read like a JSON record; in the `sharegpt` and `messages`
//! formats the conversation column holds the conversation as JSON text.
//!
//! ```toml
//! [[dataset]]
//! name = "support"
//! source = "csv"
//! path = "data/support.csv"
//! header = true            # the first row names the columns (the default)
//! # columns = ["instruction", "output"]   # the column names, required when header = false
//! delimiter = ";"          # one character, "," by default ("\t" for TSV)
//! format = "alpaca"        # or "sharegpt", "messages", "text"
//! fields = { instruction = "question", output = "answer" }
//! id = "ticket"            # default: "support.csv:<line>", the row's first physical line
//! meta = ["product"]
//! ```
//!
//! A row that cannot be read (the wrong number of fields, bad JSON in a conversation column, an unknown
//! role) is reported as malformed, as `support.csv:12: <what is wrong>`, and skipped. A malformed row
//! that runs over several lines (an unclosed quote swallows the rows after it) counts once per line, so
//! rows read plus rows malformed add up to the rows in the file.
use lorahost_record_shapes::{fill, json_error, open, Next, Shape};
use lorahost_sdk::{Batch, Source};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    #[serde(default = "yes")]
    header: bool,
    columns: Option<Vec<String>>,
    delimiter: Option<String>,
    format: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
    id: Option<String>,
    #[serde(default)]
    meta: Vec<String>,
}

fn yes() -> bool {
    true
}

struct Csv<R> {
    reader: csv::Reader<R>,
    columns: Vec<String>,
    /// The file's base name, which starts ids and messages.
    name: String,
    shape: Shape,
    row: csv::StringRecord,
    /// Malformed-row messages still to hand out: the further lines of a malformed row that ran over several.
    pending: std::collections::VecDeque<String>,
    /// A second handle on the file, to look at a multi-line row's raw text for an unclosed quote.
    raw: Option<File>,
}

impl<R: Read> Csv<R> {
    /// Reads the header (when `columns` is `None`) and checks the columns against what the format needs.
    fn new(input: R, name: String, columns: Option<Vec<String>>, delimiter: u8, shape: Shape) -> Result<Self, String> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(columns.is_none())
            .delimiter(delimiter)
            .flexible(true)
            .from_reader(input);
        let columns = match columns {
            Some(columns) => columns,
            None => {
                let header = reader.headers().map_err(|e| format!("cannot read the header row of {name}: {e}"))?;
                header.iter().map(str::to_string).collect()
            }
        };
        let origin = if reader.has_headers() { format!("the header row of {name}") } else { "the columns list".into() };
        if columns.is_empty() || columns.iter().all(String::is_empty) {
            return Err(format!("{origin} names no columns"));
        }
        for (i, column) in columns.iter().enumerate() {
            if columns[..i].contains(column) {
                return Err(format!("{origin} names column {column:?} twice; column names must be unique"));
            }
        }
        for field in shape.required_fields() {
            if !columns.iter().any(|c| c == field) {
                return Err(format!(
                    "{origin} has no column {field:?} (columns: {}); name the right column in the fields table or id",
                    columns.join(", ")
                ));
            }
        }
        Ok(Csv { reader, columns, name, shape, row: csv::StringRecord::new(), pending: Default::default(), raw: None })
    }

    fn next_record(&mut self) -> Result<Next, String> {
        if let Some(message) = self.pending.pop_front() {
            return Ok(Some(Err(message)));
        }
        match self.reader.read_record(&mut self.row) {
            Ok(false) => Ok(None),
            Ok(true) => {
                let line = self.row.position().map_or(0, |p| p.line());
                let at = format!("{}:{line}", self.name);
                let start = self.row.position().map_or(0, |p| p.byte());
                let multi_line = self.reader.position().line() > line + 1 || self.reader.is_done();
                let record = if multi_line && self.unclosed_quote(start, self.reader.position().byte()) {
                    Err(format!("{at}: a quote opened in this row is never closed, so the rest of the file is one broken row"))
                } else {
                    self.convert(&at).map_err(|e| format!("{at}: {e}"))
                };
                if record.is_err() {
                    self.count_swallowed_lines(line);
                }
                Ok(Some(record))
            }
            Err(e) => match e.kind() {
                csv::ErrorKind::Utf8 { pos, .. } => {
                    let line = pos.as_ref().map_or(0, |p| p.line());
                    Ok(Some(Err(format!("{}:{line}: not valid UTF-8", self.name))))
                }
                _ => Err(format!("cannot read {}: {e}", self.name)),
            },
        }
    }

    /// Whether the raw bytes `start..end` of the file hold an odd number of quotes: a quoted field the
    /// parser ran to the end of the file (it does not report that itself).
    fn unclosed_quote(&mut self, start: u64, end: u64) -> bool {
        use std::io::{Seek, SeekFrom};
        let Some(raw) = self.raw.as_mut() else { return false };
        let mut bytes = Vec::new();
        let read = raw.seek(SeekFrom::Start(start)).and_then(|_| raw.by_ref().take(end.saturating_sub(start)).read_to_end(&mut bytes));
        read.is_ok() && bytes.iter().filter(|&&b| b == b'"').count() % 2 == 1
    }

    /// A malformed row from `first` that ran over several lines: each further line counts as a malformed
    /// row of its own (most likely rows an unclosed quote swallowed).
    fn count_swallowed_lines(&mut self, first: u64) {
        let next = self.reader.position().line();
        // The line count advances at each newline: at the end of a file without a final one, the line the
        // reader is on was read too.
        let last = if self.reader.is_done() && !self.ends_with_newline() { next } else { next - 1 };
        for line in first + 1..=last {
            self.pending.push_back(format!(
                "{}:{line}: inside the row that starts on line {first}, which runs over {} lines (an unclosed quote?)",
                self.name,
                last - first + 1
            ));
        }
    }

    fn ends_with_newline(&mut self) -> bool {
        use std::io::{Seek, SeekFrom};
        let Some(raw) = self.raw.as_mut() else { return true };
        let mut last = [0u8];
        raw.seek(SeekFrom::End(-1)).and_then(|_| raw.read_exact(&mut last)).map_or(true, |_| last[0] == b'\n')
    }

    fn convert(&self, at: &str) -> Result<lorahost_sdk::Example, String> {
        if self.row.len() != self.columns.len() {
            return Err(format!("{} fields, expected {} (one per column)", self.row.len(), self.columns.len()));
        }
        let conversations = self.shape.conversations_field();
        let mut record = Map::new();
        for (column, cell) in self.columns.iter().zip(self.row.iter()) {
            let value = if Some(column.as_str()) == conversations {
                serde_json::from_str(cell).map_err(|e| format!("column {column:?}: {}", json_error(&e)))?
            } else {
                Value::String(cell.to_string())
            };
            record.insert(column.clone(), value);
        }
        self.shape.convert(&Value::Object(record), at)
    }
}

impl Source for Csv<File> {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        let shape = Shape::new(c.format, c.fields, c.roles, c.id, c.meta)?;
        let columns = match (c.header, c.columns) {
            (true, Some(_)) => {
                return Err("columns is set but header = true; the header row names the columns \
                            (set header = false when the file has none)"
                    .into())
            }
            (false, None) => {
                return Err("header = false needs columns, the list of column names, e.g. \
                            columns = [\"instruction\", \"output\"]"
                    .into())
            }
            (_, columns) => columns,
        };
        let delimiter = match c.delimiter.as_deref().unwrap_or(",").as_bytes() {
            &[byte] => byte,
            _ => {
                return Err(format!(
                    "delimiter = {:?} is not one ASCII character; use e.g. \",\", \";\" or \"\\t\"",
                    c.delimiter.unwrap_or_default()
                ))
            }
        };
        let (file, name) = open(&c.path)?;
        // Its own handle (a clone would share the reader's file offset).
        let raw = File::open(&c.path).ok();
        let mut csv = Csv::new(file, name, columns, delimiter, shape)?;
        csv.raw = raw;
        Ok(csv)
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || self.next_record())
    }
}

lorahost_sdk::export_source!(Csv<File>);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};
    use std::path::PathBuf;

    /// Writes `contents` to a fresh temporary folder and opens a reader on it with `extra` config.
    fn open_file(name: &str, contents: impl AsRef<[u8]>, extra: &str) -> (Result<Csv<File>, String>, PathBuf) {
        let (dir, path_line) = lorahost_record_shapes::scratch_file("csv", name, contents);
        (parse_config::<Config>(&format!("{path_line}{extra}")).and_then(Csv::open), dir)
    }

    #[test]
    fn reads_rows_with_physical_line_numbers() {
        let text = "instruction,input,output,lang\n\
                    Say hi,,Hi,en\n\
                    \"Two\nlines\",x,y,fr\n\
                    short,row\n\
                    Last,,done,de\n";
        let (source, dir) = open_file("qa.csv", text, "meta = [\"lang\"]");
        let mut source = source.unwrap();
        let batch = source.next_batch(10).unwrap().unwrap();
        let ids: Vec<_> = batch.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["qa.csv:2", "qa.csv:3", "qa.csv:6"]);
        assert_eq!(batch.records[0].turns, vec![Turn::new("user", "Say hi"), Turn::new("assistant", "Hi")]);
        assert_eq!(batch.records[1].turns[0].content, "Two\nlines\nx");
        assert_eq!(batch.records[2].meta("lang"), Some("de"));
        assert_eq!(batch.malformed, ["qa.csv:5: 2 fields, expected 4 (one per column)"]);
        assert!(source.next_batch(10).unwrap().is_none());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn headerless_tsv_with_conversations() {
        let text = "7\t[{\"role\":\"user\",\"content\":\"Q\"},{\"role\":\"assistant\",\"content\":\"A\"}]\n\
                    8\tnot json\n";
        let extra = "header = false\ncolumns = [\"id\", \"messages\"]\ndelimiter = \"\\t\"\n\
                     format = \"messages\"\nid = \"id\"";
        let (source, dir) = open_file("chat.tsv", text, extra);
        let batch = source.unwrap().next_batch(10).unwrap().unwrap();
        assert_eq!(batch.records[0].id, "7");
        assert_eq!(batch.records[0].turns, vec![Turn::new("user", "Q"), Turn::new("assistant", "A")]);
        assert_eq!(batch.malformed, ["chat.tsv:2: column \"messages\": not valid JSON: expected ident (column 2)"]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn invalid_utf8_is_one_malformed_row() {
        let bytes = b"text\nfirst\n\xff\nthird\n";
        let (source, dir) = open_file("bytes.csv", bytes, "format = \"text\"");
        let batch = source.unwrap().next_batch(10).unwrap().unwrap();
        let ids: Vec<_> = batch.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["bytes.csv:2", "bytes.csv:4"]);
        assert_eq!(batch.malformed, ["bytes.csv:3: not valid UTF-8"]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn an_unclosed_quote_counts_every_row_it_swallows() {
        let text = "text\nfirst\n\"broken,x\nthird\nfourth\nfifth\n";
        let (source, dir) = open_file("q.csv", text, "format = \"text\"");
        let batch = source.unwrap().next_batch(100).unwrap().unwrap();
        assert_eq!(batch.records.len() + batch.malformed.len(), 5, "{batch:?}");
        assert_eq!(batch.records.len(), 1);
        assert!(batch.malformed[1].starts_with("q.csv:4: inside the row that starts on line 3"), "{:?}", batch.malformed);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn configuration_errors() {
        let (source, dir) = open_file("a.csv", "question,answer\n", "");
        assert_eq!(
            source.err().unwrap(),
            "the header row of a.csv has no column \"instruction\" (columns: question, answer); \
             name the right column in the fields table or id"
        );
        std::fs::remove_dir_all(dir).ok();
        let (source, dir) = open_file("a.csv", "", "header = false");
        assert!(source.err().unwrap().starts_with("header = false needs columns"));
        std::fs::remove_dir_all(dir).ok();
        let (source, dir) = open_file("a.csv", "", "delimiter = \"::\"");
        assert!(source.err().unwrap().starts_with("delimiter = \"::\" is not one ASCII character"));
        std::fs::remove_dir_all(dir).ok();
    }
}
