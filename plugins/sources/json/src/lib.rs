//! `json`: reads records from a JSON file holding an array of objects, or an object with that array under
//! the key `records` names. The file is read once, at open.
//!
//! ```toml
//! [[dataset]]
//! name = "alpaca"
//! source = "json"
//! path = "data/alpaca_data.json"
//! records = "examples"     # only when the array is under a key of a top-level object
//! format = "alpaca"        # or "sharegpt", "messages", "text"
//! fields = { output = "response" }
//! id = "uid"               # default: "alpaca_data.json#<0-based index>"
//! meta = ["category"]
//! ```
//!
//! A record that cannot be read is reported as malformed, as `alpaca_data.json#12: <what is wrong>`, and
//! skipped; a file that is not valid JSON is an error.
use lorahost_record_shapes::{fill, open, Next, Shape};
use lorahost_sdk::{Batch, Source};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    records: Option<String>,
    format: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
    id: Option<String>,
    #[serde(default)]
    meta: Vec<String>,
}

struct Json {
    records: std::vec::IntoIter<Value>,
    /// The file's base name, which starts ids and messages.
    name: String,
    shape: Shape,
    /// 0-based index of the next record.
    index: usize,
}

impl Json {
    /// Parses the whole file's text; `records` names the key of the array when the top level is an object.
    fn parse(text: &str, name: String, records: Option<&str>, shape: Shape) -> Result<Json, String> {
        let text = text.trim_start_matches('\u{feff}');
        let top: Value = serde_json::from_str(text).map_err(|e| format!("{name} is not valid JSON: {e}"))?;
        let records = match (top, records) {
            (Value::Array(records), None) => records,
            (Value::Array(_), Some(key)) => {
                return Err(format!(
                    "records = {key:?}, but the top level of {name} is already an array; leave records out"
                ))
            }
            (Value::Object(mut top), Some(key)) => match top.remove(key) {
                Some(Value::Array(records)) => records,
                Some(_) => return Err(format!("records = {key:?}: the value under {key:?} in {name} is not an array")),
                None => {
                    let keys: Vec<_> = top.keys().map(String::as_str).collect();
                    return Err(format!(
                        "records = {key:?}: {name} has no key {key:?} at its top level (it has: {}); \
                         set records to the key of the array of records",
                        keys.join(", ")
                    ));
                }
            },
            (Value::Object(_), None) => {
                return Err(format!(
                    "the top level of {name} is an object; set records to the key of its array of records"
                ))
            }
            (_, _) => return Err(format!("{name} holds neither an array nor an object of records")),
        };
        Ok(Json { records: records.into_iter(), name, shape, index: 0 })
    }

    fn next_record(&mut self) -> Next {
        let value = self.records.next()?;
        let at = format!("{}#{}", self.name, self.index);
        self.index += 1;
        Some(self.shape.convert(&value, &at).map_err(|e| format!("{at}: {e}")))
    }
}

impl Source for Json {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        let shape = Shape::new(c.format, c.fields, c.roles, c.id, c.meta)?;
        if c.records.as_deref() == Some("") {
            return Err("records is empty; give the key of the array of records, or leave records out".into());
        }
        let (mut file, name) = open(&c.path)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| format!("cannot read {}: {e}", c.path))?;
        Json::parse(&text, name, c.records.as_deref(), shape)
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || Ok(self.next_record()))
    }
}

lorahost_sdk::export_source!(Json);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};
    use std::path::PathBuf;

    /// Writes `contents` to a fresh temporary folder and opens a reader on it with `extra` config.
    fn open_file(name: &str, contents: &str, extra: &str) -> (Result<Json, String>, PathBuf) {
        let (dir, path_line) = lorahost_record_shapes::scratch_file("json", name, contents);
        (parse_config::<Config>(&format!("{path_line}{extra}")).and_then(Json::open), dir)
    }

    #[test]
    fn reads_an_array_in_batches() {
        let text = r#"[
            {"instruction": "A", "output": "a", "system": "S"},
            {"instruction": "B"},
            {"instruction": "C", "input": "c", "output": "cc"},
            "not an object"
        ]"#;
        let (source, dir) = open_file("data.json", text, "");
        let mut source = source.unwrap();
        let first = source.next_batch(2).unwrap().unwrap();
        assert_eq!(first.records[0].id, "data.json#0");
        assert_eq!(
            first.records[0].turns,
            vec![Turn::new("system", "S"), Turn::new("user", "A"), Turn::new("assistant", "a")]
        );
        assert_eq!(first.malformed, ["data.json#1: missing field `output`"]);
        let second = source.next_batch(2).unwrap().unwrap();
        assert_eq!(second.records[0].id, "data.json#2");
        assert_eq!(second.records[0].turns[0].content, "C\nc");
        assert_eq!(second.malformed, ["data.json#3: expected a JSON object, found a string"]);
        assert!(source.next_batch(2).unwrap().is_none());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn reads_sharegpt_under_a_key() {
        let text = r#"{"version": 2, "examples": [
            {"id": 10, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
        ]}"#;
        let (source, dir) = open_file("chat.json", text, "records = \"examples\"\nformat = \"sharegpt\"\nid = \"id\"");
        let batch = source.unwrap().next_batch(8).unwrap().unwrap();
        assert_eq!(batch.records[0].id, "10");
        assert_eq!(batch.records[0].turns, vec![Turn::new("user", "Q"), Turn::new("assistant", "A")]);
        assert!(batch.malformed.is_empty());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn whole_file_errors() {
        let (source, dir) = open_file("bad.json", "[{\"instruction\": ", "");
        assert!(source.err().unwrap().starts_with("bad.json is not valid JSON"));
        std::fs::remove_dir_all(dir).ok();
        let (source, dir) = open_file("obj.json", "{\"data\": []}", "");
        assert!(source.err().unwrap().contains("set records to the key"));
        std::fs::remove_dir_all(dir).ok();
        let (source, dir) = open_file("obj.json", "{\"data\": []}", "records = \"examples\"");
        assert_eq!(
            source.err().unwrap(),
            "records = \"examples\": obj.json has no key \"examples\" at its top level (it has: data); \
             set records to the key of the array of records"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
