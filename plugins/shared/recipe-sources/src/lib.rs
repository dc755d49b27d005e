//! What the sources of the reference recipe (`lima`, `mmlu`, `gsm8k`, `dolly`, `truthfulqa`, `bigbench`,
//! `oasst1`, `cnn-dailymail`, `tldr`) share: streaming JSON Lines with line numbers ([`JsonLines`]), whole JSON
//! files ([`read_json`]), typed field access with messages that say what is wrong ([`field`], [`opt_field`]),
//! the lettered multiple-choice layout ([`multiple_choice`]) and a seeded, per-record choice order
//! ([`permutation`]).

use lorahost_sdk::Example;
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};

pub use lorahost_record_shapes::{fill, json_error, open, read_all, JsonLines, Next};

/// Reads a whole JSON file: its value and base name. Unreadable or invalid files are errors (a JSON file that
/// does not parse has no records to skip to).
pub fn read_json(path: &str) -> Result<(Value, String), String> {
    parse_json_file(path)
}

/// A whole JSON file parsed into any serde type, with its base name; a leading byte-order mark is skipped.
fn parse_json_file<T: serde::de::DeserializeOwned>(path: &str) -> Result<(T, String), String> {
    let (mut file, name) = open(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| format!("cannot read {path}: {e}"))?;
    let value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| format!("{name}: {} (line {})", json_error(&e), e.line()))?;
    Ok((value, name))
}

pub use lorahost_record_shapes::kind;

/// The value as a JSON object, or a message saying what it is instead.
pub fn object(value: &Value) -> Result<&Map<String, Value>, String> {
    value.as_object().ok_or_else(|| format!("expected a JSON object, found {}", kind(value)))
}

/// A text field: `None` when missing or null; numbers become their text; anything else is an error.
pub fn opt_field(record: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match record.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!("field `{name}` should be text, found {}", kind(other))),
    }
}

/// A text field that must be present.
pub fn field(record: &Map<String, Value>, name: &str) -> Result<String, String> {
    opt_field(record, name)?.ok_or_else(|| format!("missing field `{name}`"))
}

/// The letter of choice `i` (0-based): A, B, ... Z, then AA, AB, ... (never needed by the recipe's data).
pub fn letter(i: usize) -> String {
    if i < 26 {
        char::from(b'A' + i as u8).to_string()
    } else {
        format!("{}{}", letter(i / 26 - 1), letter(i % 26))
    }
}

/// The recipe's lettered multiple choice: instruction `Question: {question}` and input
/// `A.{c1}\nB.{c2}\n...\nAnswer:`, so the user turn reads `Question: {question}\nA.{c1}\n...\nAnswer:`.
pub fn multiple_choice<S: AsRef<str>>(question: &str, choices: &[S]) -> (String, String) {
    let mut input = String::new();
    for (i, choice) in choices.iter().enumerate() {
        input.push_str(&letter(i));
        input.push('.');
        input.push_str(choice.as_ref());
        input.push('\n');
    }
    input.push_str("Answer:");
    (format!("Question: {question}"), input)
}

/// The evaluation fields of a multiple-choice record (what `lorahost eval` builds prompts from), in its
/// metadata: `question`, `choices` (a JSON list of the choice texts, in the record's order), `labels` (a JSON
/// list of 1 for a right choice and 0 for a wrong one) and `gold` (the index of the first right choice).
pub fn set_choice_fields<S: AsRef<str>>(example: &mut Example, question: &str, choices: &[S], right: &[bool]) {
    let texts: Vec<&str> = choices.iter().map(AsRef::as_ref).collect();
    let labels: Vec<u8> = right.iter().map(|&r| u8::from(r)).collect();
    example.set_meta("question", question);
    example.set_meta("choices", serde_json::to_string(&texts).expect("strings serialize"));
    example.set_meta("labels", serde_json::to_string(&labels).expect("numbers serialize"));
    example.set_meta("gold", right.iter().position(|&r| r).unwrap_or(0).to_string());
}

/// A permutation of `0..n` that depends only on `seed` and `key` (e.g. the question text), so the order of
/// a record's choices is the same on every run and machine. FNV-1a seeds a xorshift generator; Fisher-Yates.
pub fn permutation(n: usize, seed: u64, key: &str) -> Vec<usize> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut state = h | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Records prepared up front (from a whole JSON file, or a record that yields several), served in batches.
#[derive(Default)]
pub struct Queue(pub VecDeque<Result<Example, String>>);

impl Queue {
    pub fn push(&mut self, item: Result<Example, String>) {
        self.0.push_back(item);
    }

    /// The next queued record or message, if any.
    pub fn pop(&mut self) -> Next {
        self.0.pop_front()
    }
}

/// Opens `path` as a plain buffered file (for sources that read CSV or JSON themselves).
pub fn open_buffered(path: &str) -> Result<(BufReader<File>, String), String> {
    let (file, name) = open(path)?;
    Ok((BufReader::new(file), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_and_choices() {
        assert_eq!([letter(0), letter(3), letter(25), letter(26), letter(27)], ["A", "D", "Z", "AA", "AB"]);
        let (instruction, input) = multiple_choice("Why?", &["x", "y"]);
        assert_eq!(instruction, "Question: Why?");
        assert_eq!(input, "A.x\nB.y\nAnswer:");
    }

    #[test]
    fn choice_fields() {
        let mut e = Example { id: "x".into(), dataset: String::new(), turns: vec![], meta: vec![] };
        set_choice_fields(&mut e, "Why?", &["a \"b\"", "c"], &[false, true]);
        assert_eq!(e.meta("question"), Some("Why?"));
        assert_eq!(e.meta("choices"), Some(r#"["a \"b\"","c"]"#));
        assert_eq!((e.meta("labels"), e.meta("gold")), (Some("[0,1]"), Some("1")));
    }

    #[test]
    fn permutations_are_stable_and_complete() {
        let p = permutation(7, 42, "q");
        assert_eq!(p, permutation(7, 42, "q"));
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        assert!((0..20).any(|s| permutation(7, s, "q") != p));
        assert_eq!(permutation(0, 1, ""), Vec::<usize>::new());
    }

}

/// A JSON value whose objects keep their keys in file order (serde_json's `Value` sorts them), for the
/// formats where an object's order is meaningful: TruthfulQA's `mc1_targets` and BIG-bench's
/// `target_scores` list the answer choices as the keys of an object.
#[derive(Clone, Debug, PartialEq)]
pub enum Ordered {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Ordered>),
    Object(Vec<(String, Ordered)>),
}

impl Ordered {
    /// Reads a whole JSON file (with its base name), keeping the key order of objects.
    pub fn read(path: &str) -> Result<(Ordered, String), String> {
        parse_json_file(path)
    }

    /// The value under `key` of an object (the first, should a key repeat).
    pub fn get(&self, key: &str) -> Option<&Ordered> {
        match self {
            Ordered::Object(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Ordered::Null => "null",
            Ordered::Bool(_) => "a boolean",
            Ordered::Number(_) => "a number",
            Ordered::String(_) => "a string",
            Ordered::Array(_) => "a list",
            Ordered::Object(_) => "an object",
        }
    }

    /// Text: strings as they are, numbers as their text.
    pub fn text(&self) -> Option<String> {
        match self {
            Ordered::String(s) => Some(s.clone()),
            Ordered::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// A number as f64 (booleans count as 0 and 1).
    pub fn number(&self) -> Option<f64> {
        match self {
            Ordered::Number(n) => n.as_f64(),
            Ordered::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }

    /// The text field `key` of an object: `None` when missing or null, an error when not text.
    pub fn opt_field(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None | Some(Ordered::Null) => Ok(None),
            Some(v) => v.text().map(Some).ok_or_else(|| format!("field `{key}` should be text, found {}", v.kind())),
        }
    }

    /// The text field `key` of an object, which must be present.
    pub fn field(&self, key: &str) -> Result<String, String> {
        self.opt_field(key)?.ok_or_else(|| format!("missing field `{key}`"))
    }
}

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_none<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Ordered, E> {
                Ok(Ordered::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Ordered, E> {
                Ok(Ordered::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Ordered, E> {
                Ok(Ordered::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Ordered, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Ordered::Null, Ordered::Number))
            }
            fn visit_str<E>(self, v: &str) -> Result<Ordered, E> {
                Ok(Ordered::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Ordered, E> {
                Ok(Ordered::String(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Ordered, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Ordered::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Ordered>()? {
                    entries.push((k, v));
                }
                Ok(Ordered::Object(entries))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod ordered_tests {
    use super::*;

    #[test]
    fn objects_keep_file_order() {
        let v: Ordered =
            serde_json::from_str(r#"{"z": 1, "a": [true, null, 2.5, "x"], "m": {"b": 0, "a": 1}}"#).unwrap();
        let Ordered::Object(entries) = &v else { panic!() };
        let keys: Vec<_> = entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["z", "a", "m"]);
        assert_eq!(v.get("m").unwrap().get("a").unwrap().number(), Some(1.0));
        assert_eq!(v.field("z").unwrap(), "1");
        assert_eq!(v.field("a").unwrap_err(), "field `a` should be text, found a list");
        assert_eq!(v.field("q").unwrap_err(), "missing field `q`");
    }
}
