//! `lima`: reads LIMA (`GAIR/lima` `train.jsonl`): one JSON object a line, `conversations` a list of
//! strings alternating user, assistant (starting with the user), plus `source`.
//!
//! ```toml
//! [[dataset]]
//! name = "lima"
//! [dataset.source]
//! plugin = "lima"
//! path = "data/lima/train.jsonl"
//! split_pairs = true   # default: each user/assistant pair is its own record, as the 2023 recipe did
//! ```
//!
//! With `split_pairs = true` (the recipe) every pair becomes an instruction record: instruction = the user
//! message, input empty, output = the assistant message, so the user turn is the message exactly as written.
//! A one-pair line has the id `train.jsonl:<line>`; the pairs of a multi-turn line are
//! `train.jsonl:<line>/1`, `/2`, ... With `split_pairs = false` a line is one record holding the whole
//! conversation (user, assistant, user, assistant, ...), id `train.jsonl:<line>`.
//!
//! The `source` field (e.g. "stackexchange", "multi_turn") goes into the metadata as `source`.
//! A line that is not JSON, lacks `conversations`, holds a non-string message, or has an odd number of
//! messages (a question without an answer) is reported as `train.jsonl:<line>: <what is wrong>` and skipped.
use lorahost_recipe_sources::{fill, kind, object, opt_field, JsonLines, Next, Queue};
use lorahost_sdk::{Batch, Example, Source, Turn};
use serde_json::Value;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    #[serde(default = "yes")]
    split_pairs: bool,
}

fn yes() -> bool {
    true
}

struct Lima {
    lines: JsonLines,
    split_pairs: bool,
    pending: Queue,
}

impl Lima {
    /// The records of one line (several when pairs are split), or what is wrong with it.
    fn convert(&self, value: &Value, at: &str) -> Result<Vec<Example>, String> {
        let record = object(value)?;
        let messages = match record.get("conversations") {
            None | Some(Value::Null) => return Err("missing field `conversations`".into()),
            Some(Value::Array(m)) => m,
            Some(other) => {
                return Err(format!("field `conversations` should be a list of strings, found {}", kind(other)))
            }
        };
        let mut texts = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            match m {
                Value::String(s) => texts.push(s.as_str()),
                other => return Err(format!("conversations[{i}] should be a string, found {}", kind(other))),
            }
        }
        if texts.is_empty() {
            return Err("field `conversations` is empty".into());
        }
        if texts.len() % 2 == 1 {
            return Err(format!(
                "conversations has {} messages; expected user/assistant pairs (the last message has no answer)",
                texts.len()
            ));
        }
        let source = opt_field(record, "source")?;
        let with_meta = |mut e: Example| {
            if let Some(s) = &source {
                e.set_meta("source", s.as_str());
            }
            e
        };
        if !self.split_pairs {
            let turns = texts
                .iter()
                .enumerate()
                .map(|(i, t)| Turn::new(if i % 2 == 0 { "user" } else { "assistant" }, *t))
                .collect();
            return Ok(vec![with_meta(Example::new(at, "", turns))]);
        }
        let pairs = texts.len() / 2;
        Ok(texts
            .chunks(2)
            .enumerate()
            .map(|(k, pair)| {
                let id = if pairs == 1 { at.to_string() } else { format!("{at}/{}", k + 1) };
                with_meta(Example::instruction(id, "", pair[0], "", pair[1]))
            })
            .collect())
    }

    fn next_record(&mut self) -> Result<Next, String> {
        loop {
            if let Some(item) = self.pending.pop() {
                return Ok(Some(item));
            }
            let Some(value) = self.lines.next_value()? else { return Ok(None) };
            let at = self.lines.at();
            match value.and_then(|v| self.convert(&v, &at).map_err(|e| format!("{at}: {e}"))) {
                Ok(examples) => examples.into_iter().for_each(|e| self.pending.push(Ok(e))),
                Err(message) => self.pending.push(Err(message)),
            }
        }
    }
}

impl Source for Lima {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        Ok(Lima { lines: JsonLines::open(&c.path)?, split_pairs: c.split_pairs, pending: Queue::default() })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || self.next_record())
    }
}

lorahost_sdk::export_source!(Lima);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/samples/lima/");

    fn read_all(config: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = parse_config::<Config>(config).and_then(Lima::open).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 5)
    }

    fn user(e: &Example) -> &str {
        &e.turns[0].content
    }

    #[test]
    fn real_single_turn_lines() {
        let (records, malformed) = read_all(&format!("path = \"{SAMPLES}train.lines1-12.jsonl\""));
        assert!(malformed.is_empty(), "{malformed:?}");
        assert_eq!(records.len(), 12);
        let first = &records[0];
        assert_eq!(first.id, "train.lines1-12.jsonl:1");
        assert_eq!(first.turns.len(), 2);
        assert_eq!(
            user(first),
            "Can brain cells move? By movement I mean long distance migration (preferably within the brain only)."
        );
        assert!(first.turns[1].content.starts_with(
            "The question is relatively broad and one should take into account that the brain not only consists \
             of neurons, but also glial cells"
        ));
        assert_eq!(first.turns[1].role, "assistant");
        assert_eq!(first.meta("source"), Some("stackexchange"));
        assert_eq!(records[11].id, "train.lines1-12.jsonl:12");
    }

    #[test]
    fn real_multi_turn_line_split_and_whole() {
        let path = format!("path = \"{SAMPLES}train.6th-from-last-line.multi_turn.jsonl\"");
        let (pairs, malformed) = read_all(&path);
        assert!(malformed.is_empty());
        let ids: Vec<_> = pairs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["train.6th-from-last-line.multi_turn.jsonl:1/1", "train.6th-from-last-line.multi_turn.jsonl:1/2"]
        );
        assert_eq!(
            user(&pairs[0]),
            "Temperature conversion:\n$$273 + \\text{degree Celsius} = \\text{Kelvin}$$\nActually why is that $273$? \
             How does one come up with this?"
        );
        assert_eq!(
            user(&pairs[1]),
            "Why people don't go to a logarithmic scale (kind of like decibels), at least for low temperatures. \
             Then there would be no lower limit."
        );
        assert!(pairs[1].turns[1].content.starts_with("Exponential notation adequately handles temperatures"));
        assert_eq!(pairs[1].meta("source"), Some("multi_turn"));

        let (whole, _) = read_all(&format!("{path}\nsplit_pairs = false"));
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].id, "train.6th-from-last-line.multi_turn.jsonl:1");
        let roles: Vec<_> = whole[0].turns.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
        assert_eq!(whole[0].turns[2].content, user(&pairs[1]));
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let dir = std::env::temp_dir().join(format!("lorahost-lima-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.jsonl");
        std::fs::write(
            &path,
            "{\"conversations\": [\"Q\", \"A\"]}\n{\"conversations\": [\"Q\"]}\n{\"source\": \"x\"}\n\
             {\"conversations\": [\"Q\", 3]}\nnot json\n{\"conversations\": []}\n",
        )
        .unwrap();
        let (records, malformed) = read_all(&format!("path = {:?}", path.to_str().unwrap()));
        assert_eq!(records.len(), 1);
        assert_eq!(
            malformed,
            [
                "bad.jsonl:2: conversations has 1 messages; expected user/assistant pairs (the last message has no answer)",
                "bad.jsonl:3: missing field `conversations`",
                "bad.jsonl:4: conversations[1] should be a string, found a number",
                "bad.jsonl:5: not valid JSON: expected ident (column 2)",
                "bad.jsonl:6: field `conversations` is empty",
            ]
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn configuration_errors() {
        assert!(parse_config::<Config>("path = \"/x\"\nsplit = true").err().unwrap().contains("unknown field `split`"));
        let missing = parse_config::<Config>("path = \"/nonexistent/lima.jsonl\"").unwrap();
        assert!(Lima::open(missing).err().unwrap().starts_with("cannot open /nonexistent/lima.jsonl"));
    }
}
