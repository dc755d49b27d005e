//! `tldr`: reads OpenAI summarize_from_feedback `tldr_3_filtered` (`train.jsonl`, `valid.jsonl`, `test.jsonl`):
//! one JSON object a line with `id`, `subreddit`, `title`, `post` and `summary`.
//!
//! ```toml
//! [[dataset]]
//! name = "tldr"
//! [dataset.source]
//! plugin = "tldr"
//! path = "data/tldr_3_filtered/train.jsonl"
//! ```
//!
//! Each post becomes the 2023 recipe's `Summarize: ` format: instruction `Summarize: {post}`, input empty,
//! output the summary exactly as in the file (it usually starts with the space that followed `TL;DR:`). E.g.
//! user `Summarize: I have $8,000 left on a car loan at 3.9%. ...`, assistant ` got a $9k bonus, should I ...`.
//! The title and subreddit are not part of the prompt (the recipe used the post alone); they go into the
//! metadata with the record's `id` as `title`, `subreddit` and `id`. Ids are `<file name>:<line>`. A line that
//! is not JSON or lacks `post` or `summary` is reported as `<file name>:<line>: <what is wrong>` and skipped.
use lorahost_recipe_sources::{field, fill, object, opt_field, JsonLines};
use lorahost_sdk::{Batch, Example, Source};
use serde_json::Value;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
}

struct Tldr(JsonLines);

fn convert(value: &Value, at: &str) -> Result<Example, String> {
    let record = object(value)?;
    let post = field(record, "post")?;
    let summary = field(record, "summary")?;
    if summary.trim().is_empty() {
        return Err("the summary is empty".into());
    }
    let mut example = Example::instruction(at, "", &format!("Summarize: {post}"), "", summary);
    for key in ["id", "subreddit", "title"] {
        if let Some(v) = opt_field(record, key)? {
            example.set_meta(key, v);
        }
    }
    Ok(example)
}

impl Source for Tldr {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        Ok(Tldr(JsonLines::open(&c.path)?))
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || self.0.next_with(convert))
    }
}

lorahost_sdk::export_source!(Tldr);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    /// Made-up records with the real layout (see tests/fixtures/samples/SOURCES.md).
    const SAMPLE: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/samples/tldr/tldr_3_filtered.train.sample.jsonl");

    fn read_all(path: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = parse_config::<Config>(&format!("path = {path:?}")).and_then(Tldr::open).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 2)
    }

    #[test]
    fn sample_posts() {
        let (records, malformed) = read_all(SAMPLE);
        assert!(malformed.is_empty());
        assert_eq!(records.len(), 3);
        let second = &records[1];
        assert_eq!(second.id, "tldr_3_filtered.train.sample.jsonl:2");
        assert_eq!(
            second.turns[0].content,
            "Summarize: I have $8,000 left on a car loan at 3.9%. I just got a bonus of $9,000. My employer matches \
             401k up to 4% and I'm already contributing that much. Is it better to pay off the loan or put the money \
             in an index fund?"
        );
        assert_eq!(
            second.turns[1].content,
            " got a $9k bonus, should I pay off an $8k car loan at 3.9% or invest it in an index fund?"
        );
        assert_eq!(second.meta("subreddit"), Some("personalfinance"));
        assert_eq!(second.meta("id"), Some("t3_2bq9zm"));
        assert_eq!(second.meta("title"), Some("Should I pay off my car loan early or invest?"));
        assert!(records[2].turns[0].content.starts_with("Summarize: I learned to cook properly at 30"));
        assert!(records[2].turns[0].content.contains(".\nCurious what others picked up late."));
    }

    #[test]
    fn malformed_lines() {
        let dir = std::env::temp_dir().join(format!("lorahost-tldr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.jsonl");
        std::fs::write(
            &path,
            "{\"post\": \"p\", \"summary\": \" s\"}\n{\"post\": \"p\"}\n{\"post\": \"p\", \"summary\": \"  \"}\n{\"post\": 1, \"summary\": {}}\n",
        )
        .unwrap();
        let (records, malformed) = read_all(path.to_str().unwrap());
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].turns[0].content, "Summarize: p");
        assert_eq!(
            malformed,
            [
                "train.jsonl:2: missing field `summary`",
                "train.jsonl:3: the summary is empty",
                "train.jsonl:4: field `summary` should be text, found an object",
            ]
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
