//! `jsonl`: reads records from a JSON Lines file, one JSON object a line, streaming.
//!
//! ```toml
//! [[dataset]]
//! name = "chat"
//! source = "jsonl"
//! path = "data/train.jsonl"
//! format = "sharegpt"           # "alpaca" (the default), "sharegpt", "messages" or "text"
//! fields = { conversations = "turns" }  # field names, where they differ from the format's defaults
//! roles = { bot = "assistant" } # source role names -> "system", "user" or "assistant"
//! id = "uid"                    # the field holding each record's id (default: "train.jsonl:<line>")
//! meta = ["lang", "score"]      # fields copied into the record's metadata, as text (if present)
//! ```
//!
//! A line that cannot be read (bad JSON, a missing field, an unknown role) is reported as malformed, as
//! `train.jsonl:17: <what is wrong>`, and skipped; blank lines are skipped silently.
use lorahost_record_shapes::{fill, JsonLines, Shape};
use lorahost_sdk::{Batch, Source};
use std::collections::BTreeMap;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    format: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
    id: Option<String>,
    #[serde(default)]
    meta: Vec<String>,
}

struct Jsonl {
    lines: JsonLines,
    shape: Shape,
}

impl Source for Jsonl {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        let shape = Shape::new(c.format, c.fields, c.roles, c.id, c.meta)?;
        Ok(Jsonl { lines: JsonLines::open(&c.path)?, shape })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        let Jsonl { lines, shape } = self;
        fill(max, || lines.next_with(|value, at| shape.convert(value, at)))
    }
}

lorahost_sdk::export_source!(Jsonl);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};
    use std::path::PathBuf;

    /// Writes `contents` to a fresh temporary folder and opens a reader on it with `extra` config.
    fn open_file(name: &str, contents: impl AsRef<[u8]>, extra: &str) -> (Result<Jsonl, String>, PathBuf) {
        let (dir, path_line) = lorahost_record_shapes::scratch_file("jsonl", name, contents);
        (parse_config::<Config>(&format!("{path_line}{extra}")).and_then(Jsonl::open), dir)
    }

    #[test]
    fn reads_alpaca_lines_and_reports_bad_ones() {
        let text = concat!(
            "{\"instruction\": \"Say hi\", \"output\": \"Hi\"}\n",
            "\n",
            "{\"instruction\": \"Add\", \"input\": \"1 1\", \"output\": 2}\n",
            "{\"instruction\": \"broken\"\n",
            "{\"instruction\": \"no output\"}\n",
            "  \r\n",
            "{\"instruction\": \"Last\", \"output\": \"done\", \"input\": null}\r\n",
        );
        let (source, dir) = open_file("train.jsonl", text, "");
        let mut source = source.unwrap();
        let first = source.next_batch(3).unwrap().unwrap();
        assert_eq!(first.records.len(), 2);
        assert_eq!(first.records[0].id, "train.jsonl:1");
        assert_eq!(first.records[0].turns, vec![Turn::new("user", "Say hi"), Turn::new("assistant", "Hi")]);
        assert_eq!(first.records[1].id, "train.jsonl:3");
        assert_eq!(first.records[1].turns, vec![Turn::new("user", "Add\n1 1"), Turn::new("assistant", "2")]);
        assert_eq!(first.malformed, ["train.jsonl:4: not valid JSON: EOF while parsing an object (column 24)"]);
        let second = source.next_batch(3).unwrap().unwrap();
        assert_eq!(second.malformed, ["train.jsonl:5: missing field `output`"]);
        assert_eq!(second.records.len(), 1);
        assert_eq!(second.records[0].id, "train.jsonl:7");
        assert_eq!(second.records[0].turns[0].content, "Last");
        assert!(source.next_batch(3).unwrap().is_none());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn reads_messages_with_ids_and_meta() {
        let text = concat!(
            "{\"uid\": \"a\", \"lang\": \"en\", \"turns\": [{\"role\": \"user\", \"content\": \"Q\"}, ",
            "{\"role\": \"bot\", \"content\": \"A\"}]}\n",
            "{\"uid\": \"b\", \"turns\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n",
        );
        let extra = "format = \"messages\"\nfields = { conversations = \"turns\" }\nroles = { bot = \"assistant\" }\n\
                     id = \"uid\"\nmeta = [\"lang\"]";
        let (source, dir) = open_file("chat.jsonl", text, extra);
        let batch = source.unwrap().next_batch(10).unwrap().unwrap();
        assert_eq!(batch.records.len(), 1);
        let record = &batch.records[0];
        assert_eq!((record.id.as_str(), record.meta("lang")), ("a", Some("en")));
        assert_eq!(record.turns, vec![Turn::new("user", "Q"), Turn::new("assistant", "A")]);
        assert_eq!(batch.malformed.len(), 1);
        assert!(batch.malformed[0].starts_with("chat.jsonl:2: turns[0]: unknown role \"tool\""), "{batch:?}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn configuration_errors() {
        let (source, dir) = open_file("x.jsonl", "", "format = \"chat\"");
        assert!(source.err().unwrap().starts_with("format = \"chat\" is not a record format"));
        std::fs::remove_dir_all(dir).ok();
        let (source, dir) = open_file("x.jsonl", "", "records = \"x\"");
        assert!(source.err().unwrap().contains("unknown field `records`"));
        std::fs::remove_dir_all(dir).ok();
        let missing = parse_config::<Config>("path = \"/nonexistent/lorahost/x.jsonl\"").unwrap();
        assert!(Jsonl::open(missing).err().unwrap().starts_with("cannot open /nonexistent/lorahost/x.jsonl"));
        let relative = parse_config::<Config>("path = \"x.jsonl\"").unwrap();
        assert!(Jsonl::open(relative).err().unwrap().contains("is not absolute"));
    }

    #[test]
    fn invalid_utf8_is_one_malformed_line() {
        let bytes = b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n{\"text\": \"c\"}\n";
        let (source, dir) = open_file("bytes.jsonl", bytes, "format = \"text\"");
        let batch = source.unwrap().next_batch(10).unwrap().unwrap();
        let ids: Vec<_> = batch.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["bytes.jsonl:1", "bytes.jsonl:3"]);
        assert_eq!(batch.malformed, ["bytes.jsonl:2: not valid UTF-8"]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn empty_file_has_no_batch() {
        let (source, dir) = open_file("empty.jsonl", "\n\n", "format = \"text\"");
        assert!(source.unwrap().next_batch(5).unwrap().is_none());
        std::fs::remove_dir_all(dir).ok();
    }
}
