//! `gsm8k`: reads GSM8K (`openai/grade-school-math` `train.jsonl` / `test.jsonl`): one JSON object a line
//! with `question` and `answer`, the answer a worked solution ending in a line `#### <final answer>`.
//!
//! ```toml
//! [[dataset]]
//! name = "gsm8k"
//! [dataset.source]
//! plugin = "gsm8k"
//! path = "data/gsm8k/train.jsonl"
//! calculations = true   # default: keep the `<<48/2=24>>` calculator annotations, as the raw data has them
//! ```
//!
//! Each line becomes the 2023 recipe's `Q: ` / `A: ` format: instruction `Q: {question}`, input empty,
//! output `A: {answer}` with the worked answer unchanged (final answer after `####`), e.g. user
//! `Q: Natalia sold clips to 48 of her friends ...` and assistant
//! `A: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n...\n#### 72`. With `calculations = false` the
//! `<<...>>` annotations are removed (`A: Natalia sold 48/2 = 24 clips in May. ...`).
//!
//! Ids are `<file name>:<line>`; the final answer goes into the metadata as `final_answer`, the question and
//! the worked answer (as the output has it) as `question` and `answer` (what `lorahost eval` prompts from). A line that is not
//! JSON, lacks `question` or `answer`, or whose answer has no `####` line is reported as
//! `<file name>:<line>: <what is wrong>` and skipped.
use lorahost_recipe_sources::{field, fill, object, JsonLines};
use lorahost_sdk::{Batch, Example, Source};
use serde_json::Value;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    #[serde(default = "yes")]
    calculations: bool,
}

fn yes() -> bool {
    true
}

struct Gsm8k {
    lines: JsonLines,
    calculations: bool,
}

/// `text` without its `<<...>>` calculator annotations.
fn strip_calculations(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<<") {
        let Some(len) = rest[start..].find(">>") else { break };
        out.push_str(&rest[..start]);
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn convert(value: &Value, at: &str, calculations: bool) -> Result<Example, String> {
    let record = object(value)?;
    let question = field(record, "question")?;
    let answer = field(record, "answer")?;
    let Some((_, final_answer)) = answer.rsplit_once("####") else {
        return Err("answer has no final answer after `####`".into());
    };
    let final_answer = final_answer.trim().to_string();
    let answer = if calculations { answer } else { strip_calculations(&answer) };
    let mut example = Example::instruction(at, "", &format!("Q: {question}"), "", format!("A: {answer}"));
    example.set_meta("final_answer", final_answer);
    example.set_meta("question", question);
    example.set_meta("answer", answer);
    Ok(example)
}

impl Source for Gsm8k {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        Ok(Gsm8k { lines: JsonLines::open(&c.path)?, calculations: c.calculations })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        let calculations = self.calculations;
        fill(max, || self.lines.next_with(|v, at| convert(v, at, calculations)))
    }
}

lorahost_sdk::export_source!(Gsm8k);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    const SAMPLE: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/samples/gsm8k/train.first200.jsonl");

    fn read_all(config: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = parse_config::<Config>(config).and_then(Gsm8k::open).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 64)
    }

    #[test]
    fn real_train_lines() {
        let (records, malformed) = read_all(&format!("path = {SAMPLE:?}"));
        assert!(malformed.is_empty());
        assert_eq!(records.len(), 200);
        let first = &records[0];
        assert_eq!(first.id, "train.first200.jsonl:1");
        assert_eq!(
            first.turns[0].content,
            "Q: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. \
             How many clips did Natalia sell altogether in April and May?"
        );
        assert_eq!(
            first.turns[1].content,
            "A: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips \
             altogether in April and May.\n#### 72"
        );
        assert_eq!(first.meta("final_answer"), Some("72"));
        let last = &records[199];
        assert_eq!(last.id, "train.first200.jsonl:200");
        assert!(last.turns[0].content.starts_with("Q: Gary bought his first used car for $6,000."));
        assert!(last.turns[1]
            .content
            .ends_with("Gary is paying 250-100 = $<<250-100=150>>150 more per month\n#### 150"));
        assert_eq!(last.meta("final_answer"), Some("150"));
    }

    #[test]
    fn without_calculations() {
        let (records, _) = read_all(&format!("path = {SAMPLE:?}\ncalculations = false"));
        assert_eq!(
            records[1].turns[1].content,
            "A: Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"
        );
        assert_eq!(strip_calculations("a <<x>>b <<open"), "a b <<open");
    }

    #[test]
    fn malformed_lines() {
        let dir = std::env::temp_dir().join(format!("lorahost-gsm8k-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.jsonl");
        std::fs::write(
            &path,
            "{\"question\": \"1+1?\", \"answer\": \"2\"}\n{\"question\": \"q\"}\n[1]\n\
             {\"question\": \"2+2?\", \"answer\": \"2+2=4\\n#### 4\"}\n",
        )
        .unwrap();
        let (records, malformed) = read_all(&format!("path = {:?}", path.to_str().unwrap()));
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].id.as_str(), records[0].turns[1].content.as_str()),
            ("train.jsonl:4", "A: 2+2=4\n#### 4")
        );
        assert_eq!(
            malformed,
            [
                "train.jsonl:1: answer has no final answer after `####`",
                "train.jsonl:2: missing field `answer`",
                "train.jsonl:3: expected a JSON object, found a list",
            ]
        );
        std::fs::remove_dir_all(dir).ok();
        assert!(parse_config::<Config>("path = \"/x\"\nformat = \"a\"").err().unwrap().contains("unknown field"));
    }
}
