//! `oasst1`: reads OpenAssistant Conversations (oasst1) message trees, one tree a line: `message_tree_id`,
//! `tree_state` and `prompt`, a message (`text`, `role` "prompter" or "assistant", `lang`, `rank`, `deleted`,
//! `review_result`, ...) whose `replies` are messages in turn (the `*_trees.jsonl` export).
//!
//! ```toml
//! [[dataset]]
//! name = "oasst1-en"
//! [dataset.source]
//! plugin = "oasst1"
//! path = "data/oasst1/2023-04-12_oasst_ready.trees.jsonl"
//! lang = "en"        # default: only messages in this language; "all" keeps every language
//! mode = "pairs"     # default; or "threads"
//! ```
//!
//! Each tree gives at most one record (id `<file name>:<line>`, metadata `message_tree_id` and `lang`):
//!
//! - `pairs` (the 2023 recipe's two-message conversations): the tree's initial prompt and its best reply, as
//!   an instruction record: instruction = the prompt's text, input empty, output = the reply's text, e.g. user
//!   `How can I find the best 401k plan for my needs?`, assistant `The first step is to research ...`.
//! - `threads`: the whole conversation along the best replies: prompt, best assistant reply, best prompter
//!   reply to it, and so on, as alternating user and assistant turns, ending at the last assistant message.
//!
//! The best reply is the one with the lowest `rank` (0 is best); replies without a rank come after the ranked
//! ones, in file order. Messages that are deleted, failed review (`review_result` false) or are in another
//! language are never used, nor anything below them. Trees with no usable reply, or whose prompt is in another
//! language, give no record (silently). A line that is not JSON or whose prompt lacks text, or a message with a
//! role other than "prompter"/"assistant" in the chosen thread, is reported as `<file name>:<line>: <what is
//! wrong>` and skipped.
use lorahost_recipe_sources::{field, fill, kind, object, opt_field, JsonLines};
use lorahost_sdk::{Batch, Example, Source, Turn};
use serde_json::{Map, Value};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    lang: Option<String>,
    mode: Option<String>,
}

struct Oasst1 {
    lines: JsonLines,
    /// `None`: every language.
    lang: Option<String>,
    threads: bool,
}

impl Oasst1 {
    /// Whether a message may be used: not deleted, not rejected in review, in the wanted language.
    fn usable(&self, message: &Map<String, Value>) -> bool {
        let deleted = message.get("deleted").and_then(Value::as_bool).unwrap_or(false);
        let rejected = message.get("review_result").and_then(Value::as_bool) == Some(false);
        let lang_ok = match &self.lang {
            None => true,
            Some(lang) => message.get("lang").and_then(Value::as_str) == Some(lang.as_str()),
        };
        !deleted && !rejected && lang_ok
    }

    /// The best usable reply of `message` (lowest rank; unranked ones after the ranked, in file order).
    fn best_reply<'a>(&self, message: &'a Map<String, Value>) -> Result<Option<&'a Map<String, Value>>, String> {
        let replies = match message.get("replies") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(r)) => r,
            Some(other) => return Err(format!("`replies` should be a list, found {}", kind(other))),
        };
        let mut best: Option<(f64, &Map<String, Value>)> = None;
        for reply in replies {
            let reply = object(reply).map_err(|e| format!("a reply: {e}"))?;
            if !self.usable(reply) {
                continue;
            }
            let rank = reply.get("rank").and_then(Value::as_f64).unwrap_or(f64::INFINITY);
            if best.is_none_or(|(b, _)| rank < b) {
                best = Some((rank, reply));
            }
        }
        Ok(best.map(|(_, r)| r))
    }

    fn convert(&self, value: &Value, at: &str) -> Result<Option<Example>, String> {
        let tree = object(value)?;
        let prompt = match tree.get("prompt") {
            None | Some(Value::Null) => return Err("missing field `prompt`".into()),
            Some(p) => object(p).map_err(|e| format!("prompt: {e}"))?,
        };
        let text = field(prompt, "text").map_err(|e| format!("prompt: {e}"))?;
        if !self.usable(prompt) {
            return Ok(None);
        }
        let mut turns = vec![Turn::new("user", text)];
        let mut current = prompt;
        while let Some(reply) = self.best_reply(current)? {
            let expected = if turns.len() % 2 == 1 { "assistant" } else { "prompter" };
            let role = opt_field(reply, "role")?.unwrap_or_default();
            if role != expected {
                return Err(format!(
                    "message {} of the thread has role {role:?}, expected {expected:?}",
                    turns.len() + 1
                ));
            }
            let role = if expected == "assistant" { "assistant" } else { "user" };
            turns.push(Turn::new(role, field(reply, "text").map_err(|e| format!("message {}: {e}", turns.len() + 1))?));
            if !self.threads {
                break;
            }
            current = reply;
        }
        if turns.len() % 2 == 1 {
            turns.pop();
        }
        if turns.is_empty() {
            return Ok(None);
        }
        let mut example = if self.threads {
            Example::new(at, "", turns)
        } else {
            Example::instruction(at, "", &turns[0].content, "", turns[1].content.clone())
        };
        if let Some(id) = opt_field(tree, "message_tree_id")? {
            example.set_meta("message_tree_id", id);
        }
        if let Some(lang) = opt_field(prompt, "lang")? {
            example.set_meta("lang", lang);
        }
        Ok(Some(example))
    }
}

impl Source for Oasst1 {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        let threads = match c.mode.as_deref().unwrap_or("pairs") {
            "pairs" => false,
            "threads" => true,
            other => return Err(format!("mode = {other:?} is not an oasst1 mode; use \"pairs\" or \"threads\"")),
        };
        let lang = match c.lang.as_deref().unwrap_or("en") {
            "" => return Err("lang is empty; give a language code such as \"en\", or \"all\"".into()),
            "all" => None,
            l => Some(l.to_string()),
        };
        Ok(Oasst1 { lines: JsonLines::open(&c.path)?, lang, threads })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || loop {
            let Some(value) = self.lines.next_value()? else { return Ok(None) };
            let at = self.lines.at();
            match value.and_then(|v| self.convert(&v, &at).map_err(|e| format!("{at}: {e}"))) {
                Ok(None) => continue,
                Ok(Some(example)) => return Ok(Some(Ok(example))),
                Err(message) => return Ok(Some(Err(message))),
            }
        })
    }
}

lorahost_sdk::export_source!(Oasst1);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    const SAMPLE: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/samples/oasst1/en_100_tree.lines1-25.jsonl");

    fn open(config: &str) -> Result<Oasst1, String> {
        parse_config::<Config>(config).and_then(Oasst1::open)
    }

    fn read_all(config: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = open(config).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 7)
    }

    #[test]
    fn real_trees_as_pairs() {
        let (records, malformed) = read_all(&format!("path = {SAMPLE:?}"));
        assert!(malformed.is_empty(), "{malformed:?}");
        assert_eq!(records.len(), 25);
        let first = &records[0];
        assert_eq!(first.id, "en_100_tree.lines1-25.jsonl:1");
        assert_eq!(first.turns.len(), 2);
        assert_eq!(first.turns[0].content, "How can I find the best 401k plan for my needs?");
        assert!(first.turns[1].content.starts_with("The first step is to research your options. You should look "));
        assert_eq!(first.meta("message_tree_id"), Some("054e1df3-35e0-4bb8-a585-607dbdcd24e0"));
        assert_eq!(first.meta("lang"), Some("en"));
        assert_eq!(records[2].turns[0].content, "What differences are there between ChatGPT and Instructional GPT?");
        assert!(records[2].turns[1].content.starts_with("Both ChatGPT and InstructGPT are auto-regressive l"));
        assert_eq!(records[24].id, "en_100_tree.lines1-25.jsonl:25");
    }

    #[test]
    fn real_trees_as_threads() {
        let (threads, malformed) = read_all(&format!("path = {SAMPLE:?}\nmode = \"threads\"\nlang = \"all\""));
        assert!(malformed.is_empty());
        assert_eq!(threads.len(), 25);
        let (pairs, _) = read_all(&format!("path = {SAMPLE:?}"));
        for (t, p) in threads.iter().zip(&pairs) {
            assert_eq!(t.turns[..2], p.turns[..]);
            assert!(t.turns.len() % 2 == 0);
            for (i, turn) in t.turns.iter().enumerate() {
                assert_eq!(turn.role, if i % 2 == 0 { "user" } else { "assistant" });
            }
        }
        assert!(threads.iter().any(|t| t.turns.len() >= 4));
        let (none, _) = read_all(&format!("path = {SAMPLE:?}\nlang = \"de\""));
        assert!(none.is_empty());
    }

    #[test]
    fn ranks_filters_and_malformed_trees() {
        let dir = std::env::temp_dir().join(format!("lorahost-oasst1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trees.jsonl");
        let lines = [
            // best rank wins over file order; deleted and other-language replies are never used
            r#"{"message_tree_id": "t1", "prompt": {"text": "Q", "role": "prompter", "lang": "en", "replies": [
                {"text": "second", "role": "assistant", "lang": "en", "rank": 1},
                {"text": "deleted", "role": "assistant", "lang": "en", "rank": 0, "deleted": true},
                {"text": "german", "role": "assistant", "lang": "de", "rank": 0},
                {"text": "best", "role": "assistant", "lang": "en", "rank": 0, "replies": [
                    {"text": "follow-up", "role": "prompter", "lang": "en", "replies": [
                        {"text": "answer 2", "role": "assistant", "lang": "en"}]}]}]}}"#,
            r#"{"prompt": {"text": "no replies", "role": "prompter", "lang": "en"}}"#,
            r#"{"prompt": {"role": "prompter", "lang": "en"}}"#,
            r#"{"tree_state": "x"}"#,
            r#"{"prompt": {"text": "Q", "lang": "en", "replies": [{"text": "A", "role": "prompter", "lang": "en"}]}}"#,
        ];
        std::fs::write(&path, lines.map(|l| l.replace('\n', " ")).join("\n")).unwrap();
        let p = path.to_str().unwrap();
        let (pairs, malformed) = read_all(&format!("path = {p:?}"));
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].turns, vec![Turn::new("user", "Q"), Turn::new("assistant", "best")]);
        assert_eq!(
            malformed,
            [
                "trees.jsonl:3: prompt: missing field `text`",
                "trees.jsonl:4: missing field `prompt`",
                "trees.jsonl:5: message 2 of the thread has role \"prompter\", expected \"assistant\"",
            ]
        );
        let (threads, _) = read_all(&format!("path = {p:?}\nmode = \"threads\""));
        let contents: Vec<_> = threads[0].contents().collect();
        assert_eq!(contents, ["Q", "best", "follow-up", "answer 2"]);
        assert_eq!(threads[0].meta("message_tree_id"), Some("t1"));
        std::fs::remove_dir_all(dir).ok();
        assert!(open(&format!("path = {SAMPLE:?}\nmode = \"trees\"")).err().unwrap().starts_with("mode = \"trees\""));
        assert!(open(&format!("path = {SAMPLE:?}\nlang = \"\"")).err().unwrap().starts_with("lang is empty"));
    }
}
