//! What the `jsonl`, `json` and `csv` sources (and the recipe's sources) share: turning one record (a JSON
//! object) into an [`Example`] following the manifest's `format`, `fields`, `roles`, `id` and `meta` keys
//! ([`Shape`]), opening the file ([`open`]), reading JSON Lines with line numbers ([`JsonLines`]) and filling
//! batches ([`fill`]).
use lorahost_sdk::{Batch, Example, Turn};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// How records are laid out, with each format's field keys and their default names.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Alpaca,
    ShareGpt,
    Messages,
    Text,
}

impl Format {
    fn parse(name: &str) -> Result<Format, String> {
        match name {
            "alpaca" => Ok(Format::Alpaca),
            "sharegpt" => Ok(Format::ShareGpt),
            "messages" => Ok(Format::Messages),
            "text" => Ok(Format::Text),
            other => Err(format!(
                "format = {other:?} is not a record format; use \"alpaca\", \"sharegpt\", \"messages\" or \"text\""
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
            Format::Messages => "messages",
            Format::Text => "text",
        }
    }

    /// The keys of the `fields` table for this format, with their default field names.
    fn fields(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Format::Alpaca => {
                &[("instruction", "instruction"), ("input", "input"), ("output", "output"), ("system", "system")]
            }
            Format::ShareGpt => &[("conversations", "conversations"), ("role", "from"), ("content", "value")],
            Format::Messages => &[("conversations", "messages"), ("role", "role"), ("content", "content")],
            Format::Text => &[("text", "text")],
        }
    }
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// The part of a source's configuration that says how a record becomes an [`Example`].
#[derive(Debug)]
pub struct Shape {
    format: Format,
    /// Every field key of the format, with the name it has in the records.
    fields: BTreeMap<&'static str, String>,
    /// Source role name -> "system", "user" or "assistant" (conversation formats only).
    roles: BTreeMap<String, String>,
    id: Option<String>,
    meta: Vec<String>,
}

impl Shape {
    /// Checks the manifest's `format`, `fields`, `roles`, `id` and `meta` values.
    pub fn new(
        format: Option<String>,
        fields: BTreeMap<String, String>,
        roles: BTreeMap<String, String>,
        id: Option<String>,
        meta: Vec<String>,
    ) -> Result<Shape, String> {
        let format = Format::parse(format.as_deref().unwrap_or("alpaca"))?;
        let known = format.fields();
        let mut names: BTreeMap<&'static str, String> = known.iter().map(|&(k, v)| (k, v.to_string())).collect();
        for (key, name) in fields {
            let Some(&(key, _)) = known.iter().find(|(k, _)| *k == key) else {
                let keys: Vec<_> = known.iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "fields.{key} does not apply to format \"{}\"; its fields are {}",
                    format.name(),
                    keys.join(", ")
                ));
            };
            if name.is_empty() {
                return Err(format!("fields.{key} is empty; give the name of the field in the records"));
            }
            names.insert(key, name);
        }

        let conversational = matches!(format, Format::ShareGpt | Format::Messages);
        if !roles.is_empty() && !conversational {
            return Err(format!(
                "roles does not apply to format \"{}\"; it maps role names in \"sharegpt\" and \"messages\" records",
                format.name()
            ));
        }
        let mut role_map = BTreeMap::new();
        if conversational {
            for role in ROLES {
                role_map.insert(role.to_string(), role.to_string());
            }
            role_map.insert("human".to_string(), "user".to_string());
            role_map.insert("gpt".to_string(), "assistant".to_string());
        }
        for (from, to) in roles {
            if !ROLES.contains(&to.as_str()) {
                return Err(format!(
                    "roles.{from} = {to:?} is not a role; map it to \"system\", \"user\" or \"assistant\""
                ));
            }
            role_map.insert(from, to);
        }

        if id.as_deref() == Some("") {
            return Err("id is empty; give the name of the field that holds each record's id, or leave id out".into());
        }
        if meta.iter().any(|m| m.is_empty()) {
            return Err("meta lists an empty field name; list the names of fields to copy into the metadata".into());
        }
        Ok(Shape { format, fields: names, roles: role_map, id, meta })
    }

    fn field(&self, key: &str) -> &str {
        &self.fields[key]
    }

    /// The fields every record must have (the CSV source checks its columns against them at open).
    pub fn required_fields(&self) -> Vec<&str> {
        let keys: &[&str] = match self.format {
            Format::Alpaca => &["instruction", "output"],
            Format::ShareGpt | Format::Messages => &["conversations"],
            Format::Text => &["text"],
        };
        let mut required: Vec<&str> = keys.iter().map(|k| self.field(k)).collect();
        required.extend(self.id.as_deref());
        required
    }

    /// The field holding a conversation's list of messages, in the sharegpt and messages formats.
    pub fn conversations_field(&self) -> Option<&str> {
        self.fields.get("conversations").map(String::as_str)
    }

    /// Turns one record into an example. `location` (e.g. `train.jsonl:17`) is its id unless the `id` key
    /// names a field. The error says what is wrong with the record, without the location.
    pub fn convert(&self, record: &Value, location: &str) -> Result<Example, String> {
        let Value::Object(record) = record else {
            return Err(format!("expected a JSON object, found {}", kind(record)));
        };
        let id = match &self.id {
            Some(field) => required(record, field)?,
            None => location.to_string(),
        };
        let mut example = match self.format {
            Format::Alpaca => {
                let instruction = required(record, self.field("instruction"))?;
                let input = text(record, self.field("input"))?.unwrap_or_default();
                let output = required(record, self.field("output"))?;
                let mut example = Example::instruction(id, "", &instruction, &input, output);
                match text(record, self.field("system"))? {
                    Some(system) if !system.is_empty() => example.turns.insert(0, Turn::new("system", system)),
                    _ => {}
                }
                example
            }
            Format::ShareGpt | Format::Messages => Example::new(id, "", self.conversation(record)?),
            Format::Text => Example::new(id, "", vec![Turn::new("assistant", required(record, self.field("text"))?)]),
        };
        for key in &self.meta {
            match record.get(key) {
                Some(Value::String(s)) => example.set_meta(key, s.as_str()),
                Some(other) => example.set_meta(key, other.to_string()),
                None => {}
            }
        }
        Ok(example)
    }

    fn conversation(&self, record: &Map<String, Value>) -> Result<Vec<Turn>, String> {
        let field = self.field("conversations");
        let messages = match record.get(field) {
            None | Some(Value::Null) => return Err(format!("missing field `{field}`")),
            Some(Value::Array(messages)) => messages,
            Some(other) => return Err(format!("field `{field}` should be a list of messages, found {}", kind(other))),
        };
        if messages.is_empty() {
            return Err(format!("field `{field}` is an empty conversation"));
        }
        let (role_field, content_field) = (self.field("role"), self.field("content"));
        let mut turns = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let Value::Object(message) = message else {
                return Err(format!("{at} should be an object, found {}", kind(message)));
            };
            let role = required(message, role_field).map_err(|e| format!("{at}: {e}"))?;
            let Some(role) = self.roles.get(&role) else {
                let known: Vec<_> = self.roles.keys().map(String::as_str).collect();
                return Err(format!(
                    "{at}: unknown role {role:?} (known: {}); map it with the roles table",
                    known.join(", ")
                ));
            };
            let content = required(message, content_field).map_err(|e| format!("{at}: {e}"))?;
            turns.push(Turn::new(role.as_str(), content));
        }
        Ok(turns)
    }
}

/// A field's text: `None` when missing or null; numbers become their text; anything else is an error.
fn text(record: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match record.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!("field `{field}` should be text, found {}", kind(other))),
    }
}

fn required(record: &Map<String, Value>, field: &str) -> Result<String, String> {
    text(record, field)?.ok_or_else(|| format!("missing field `{field}`"))
}

/// What a JSON value is, for messages ("found a list").
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A JSON parse error for a message that already names the line: the message and the column only.
pub fn json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = message.split(" at line ").next().unwrap_or(&message);
    format!("not valid JSON: {message} (column {})", e.column())
}

/// Opens the file a source reads, returning it with its base name (the prefix of ids and messages: never
/// the absolute path, so ids are the same on every machine).
pub fn open(path: &str) -> Result<(File, String), String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!(
            "path = {path:?} is not absolute; give the data file's path (the manifest resolves relative paths)"
        ));
    }
    let name = match p.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => return Err(format!("path = {path:?} names no file; give the path of the data file")),
    };
    let file = File::open(p).map_err(|e| format!("cannot open {path}: {e}"))?;
    Ok((file, name))
}

/// What a source read next: a record, the message for a record it could not read, or `None` at the end.
pub type Next = Option<Result<Example, String>>;

/// Fills one batch of at most `max` entries (records and malformed messages together, so a file of bad lines
/// still comes in bounded batches) by calling `next`, stopping early once the records hold
/// [`lorahost_sdk::REPLY_BYTES`]; `None` once nothing is left.
pub fn fill(max: usize, mut next: impl FnMut() -> Result<Next, String>) -> Result<Option<Batch>, String> {
    let mut batch = Batch { records: Vec::new(), malformed: Vec::new() };
    let mut bytes = 0;
    while batch.records.len() + batch.malformed.len() < max.max(1) && bytes < lorahost_sdk::REPLY_BYTES {
        match next()? {
            Some(Ok(example)) => {
                bytes += example.bytes();
                batch.records.push(example)
            }
            Some(Err(message)) => batch.malformed.push(message),
            None => break,
        }
    }
    Ok((!batch.records.is_empty() || !batch.malformed.is_empty()).then_some(batch))
}

/// A JSON Lines file read one line at a time.
pub struct JsonLines {
    reader: Box<dyn BufRead>,
    /// The file's base name, which starts ids and messages.
    pub name: String,
    /// 1-based number of the last line read.
    pub line: usize,
    buf: Vec<u8>,
}

impl JsonLines {
    /// Opens the file at the absolute `path`; an error means it cannot be read at all.
    pub fn open(path: &str) -> Result<JsonLines, String> {
        let (file, name) = open(path)?;
        Ok(JsonLines::new(Box::new(BufReader::new(file)), name))
    }

    pub fn new(reader: Box<dyn BufRead>, name: String) -> JsonLines {
        JsonLines { reader, name, line: 0, buf: Vec::new() }
    }

    /// The location of the last line read, `<name>:<line>`: the id of its record and the start of messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.name, self.line)
    }

    /// The next non-blank line's JSON value, or the message for a line that is not JSON (already naming
    /// file and line); `None` at the end. An error means the file cannot be read.
    pub fn next_value(&mut self) -> Result<Option<Result<Value, String>>, String> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| format!("{}: cannot read line {}: {e}", self.name, self.line + 1))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let Ok(text) = std::str::from_utf8(&self.buf) else {
                return Ok(Some(Err(format!("{}: not valid UTF-8", self.at()))));
            };
            let text = if self.line == 1 { text.trim_start_matches('\u{feff}') } else { text };
            if text.trim().is_empty() {
                continue;
            }
            return Ok(Some(
                serde_json::from_str(text.trim_end()).map_err(|e| format!("{}: {}", self.at(), json_error(&e))),
            ));
        }
    }
}

impl JsonLines {
    /// The next line converted by `convert` (given the value and the line's location, `<name>:<line>`, and
    /// saying what is wrong without the location), or its message naming file and line; `None` at the end.
    pub fn next_with(
        &mut self,
        mut convert: impl FnMut(&Value, &str) -> Result<Example, String>,
    ) -> Result<Next, String> {
        let Some(value) = self.next_value()? else { return Ok(None) };
        let at = self.at();
        Ok(Some(value.and_then(|v| convert(&v, &at).map_err(|e| format!("{at}: {e}")))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(format: &str, fields: &[(&str, &str)], roles: &[(&str, &str)]) -> Result<Shape, String> {
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Shape::new(Some(format.into()), map(fields), map(roles), None, Vec::new())
    }

    #[test]
    fn alpaca_with_input_system_and_numbers() {
        let s = shape("alpaca", &[], &[]).unwrap();
        let e =
            s.convert(&json!({"instruction": "Add", "input": 2, "output": 4, "system": "Be brief."}), "a:1").unwrap();
        assert_eq!(e.id, "a:1");
        assert_eq!(e.dataset, "");
        assert_eq!(
            e.turns,
            vec![Turn::new("system", "Be brief."), Turn::new("user", "Add\n2"), Turn::new("assistant", "4")]
        );
        let e =
            s.convert(&json!({"instruction": "Hi", "input": null, "output": "Hello", "system": ""}), "a:2").unwrap();
        assert_eq!(e.turns, vec![Turn::new("user", "Hi"), Turn::new("assistant", "Hello")]);
    }

    #[test]
    fn alpaca_problems() {
        let s = shape("alpaca", &[("output", "answer")], &[]).unwrap();
        assert_eq!(
            s.convert(&json!({"instruction": "x", "output": "y"}), "a:1").unwrap_err(),
            "missing field `answer`"
        );
        assert_eq!(
            s.convert(&json!({"instruction": ["x"], "answer": "y"}), "a:1").unwrap_err(),
            "field `instruction` should be text, found a list"
        );
        assert_eq!(s.convert(&json!([1]), "a:1").unwrap_err(), "expected a JSON object, found a list");
    }

    #[test]
    fn sharegpt_roles() {
        let s = shape("sharegpt", &[], &[("bot", "assistant")]).unwrap();
        let record = json!({"conversations": [
            {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "bot", "value": "A"},
            {"from": "user", "value": "Q2"}, {"from": "gpt", "value": "A2"}]});
        let e = s.convert(&record, "c:1").unwrap();
        let roles: Vec<_> = e.turns.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
        assert_eq!(e.turns[2].content, "A");
        let bad = json!({"conversations": [{"from": "human", "value": "Q"}, {"from": "tool", "value": "A"}]});
        assert_eq!(
            s.convert(&bad, "c:2").unwrap_err(),
            "conversations[1]: unknown role \"tool\" (known: assistant, bot, gpt, human, system, user); \
             map it with the roles table"
        );
    }

    #[test]
    fn messages_meta_and_id() {
        let s = Shape::new(
            Some("messages".into()),
            BTreeMap::new(),
            BTreeMap::new(),
            Some("uid".into()),
            vec!["lang".into(), "score".into(), "absent".into()],
        )
        .unwrap();
        let record = json!({"uid": 7, "lang": "en", "score": [1, 2],
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]});
        let e = s.convert(&record, "m:1").unwrap();
        assert_eq!(e.id, "7");
        assert_eq!(e.meta, vec![("lang".to_string(), "en".to_string()), ("score".to_string(), "[1,2]".to_string())]);
        assert_eq!(s.convert(&json!({"messages": []}), "m:2").unwrap_err(), "missing field `uid`");
        assert_eq!(
            s.convert(&json!({"uid": "u", "messages": []}), "m:2").unwrap_err(),
            "field `messages` is an empty conversation"
        );
        assert_eq!(
            s.convert(&json!({"uid": "u", "messages": [{"role": "user"}]}), "m:2").unwrap_err(),
            "messages[0]: missing field `content`"
        );
    }

    #[test]
    fn text_is_one_assistant_turn() {
        let s = shape("text", &[("text", "body")], &[]).unwrap();
        let e = s.convert(&json!({"body": "raw text"}), "t:1").unwrap();
        assert_eq!(e.turns, vec![Turn::new("assistant", "raw text")]);
    }

    #[test]
    fn bad_configuration() {
        assert!(shape("chat", &[], &[]).unwrap_err().starts_with("format = \"chat\" is not a record format"));
        assert_eq!(
            shape("alpaca", &[("role", "r")], &[]).unwrap_err(),
            "fields.role does not apply to format \"alpaca\"; its fields are instruction, input, output, system"
        );
        assert!(shape("alpaca", &[], &[("human", "user")]).unwrap_err().starts_with("roles does not apply"));
        assert!(shape("sharegpt", &[], &[("bot", "model")]).unwrap_err().starts_with("roles.bot = \"model\""));
        assert!(shape("text", &[("text", "")], &[]).unwrap_err().starts_with("fields.text is empty"));
    }

    #[test]
    fn batches_are_bounded_and_end_with_none() {
        let mut items = vec![
            Some(Ok(Example::new("1", "", vec![]))),
            Some(Err("bad".to_string())),
            Some(Ok(Example::new("2", "", vec![]))),
        ]
        .into_iter();
        let mut next = || Ok(items.next().flatten());
        let first = fill(2, &mut next).unwrap().unwrap();
        assert_eq!((first.records.len(), first.malformed), (1, vec!["bad".to_string()]));
        assert_eq!(fill(2, &mut next).unwrap().unwrap().records[0].id, "2");
        assert!(fill(2, &mut next).unwrap().is_none());
    }

    #[test]
    fn long_records_make_shorter_batches() {
        let mb = "m".repeat(1 << 20);
        let mut next = || Ok(Some(Ok(Example::new("x", "", vec![Turn::new("user", mb.as_str())]))));
        let batch = fill(100, &mut next).unwrap().unwrap();
        assert_eq!(batch.records.len(), 16, "stops once 16 MiB (REPLY_BYTES) are held");
    }

    #[test]
    fn json_lines_report_bad_lines() {
        let text = "{\"a\": 1}\n\n{bad\n\u{0}\n";
        let mut lines = JsonLines::new(Box::new(std::io::Cursor::new(text.as_bytes().to_vec())), "f.jsonl".into());
        assert!(lines.next_value().unwrap().unwrap().is_ok());
        assert_eq!(lines.line, 1);
        let bad = lines.next_value().unwrap().unwrap().unwrap_err();
        assert!(bad.starts_with("f.jsonl:3: not valid JSON: key must be a string"), "{bad}");
        assert!(lines.next_value().unwrap().unwrap().unwrap_err().starts_with("f.jsonl:4: not valid JSON"));
        assert!(lines.next_value().unwrap().is_none());
    }
}

/// For tests of source plugins: every record and malformed-record message a source yields, read in batches
/// of `max`, checking that no batch holds more than `max`.
#[doc(hidden)]
pub fn read_all<S: lorahost_sdk::Source>(source: &mut S, max: usize) -> (Vec<Example>, Vec<String>) {
    let (mut records, mut malformed) = (Vec::new(), Vec::new());
    while let Some(batch) = source.next_batch(max).expect("the source reads") {
        assert!(batch.records.len() + batch.malformed.len() <= max, "a batch of more than {max}");
        records.extend(batch.records);
        malformed.extend(batch.malformed);
    }
    (records, malformed)
}

/// For tests of source plugins: writes `contents` to `<temp>/lorahost-<tag>-<pid>-<n>/<name>` (a fresh
/// folder per call) and returns the folder and the `path = ...` config line for the file.
#[doc(hidden)]
pub fn scratch_file(tag: &str, name: &str, contents: impl AsRef<[u8]>) -> (std::path::PathBuf, String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("lorahost-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("temp folder");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("temp file");
    let line = format!("path = {:?}\n", path.to_str().expect("UTF-8 temp path"));
    (dir, line)
}
