//! `dolly`: reads databricks-dolly-15k (`databricks-dolly-15k.jsonl`): one JSON object a line with
//! `instruction`, `context`, `response` and `category`.
//!
//! ```toml
//! [[dataset]]
//! name = "dolly"
//! [dataset.source]
//! plugin = "dolly"
//! path = "data/databricks-dolly-15k.jsonl"
//! categories = ["closed_qa", "open_qa"]   # default: every category
//! ```
//!
//! Each line becomes an instruction record (the recipe's column mapping): instruction = `instruction`,
//! input = `context` (often empty), output = `response`; so the user turn is `{instruction}\n{context}`, or
//! just `{instruction}` when the context is empty. E.g. user `Which is a species of fish? Tope or Rope`,
//! assistant `Tope`. Ids are `<file name>:<line>`; the metadata has `category`. A line that is not JSON or
//! lacks `instruction` or `response` is reported as `<file name>:<line>: <what is wrong>` and skipped; lines of
//! other categories are skipped silently.
use lorahost_recipe_sources::{field, fill, object, opt_field, JsonLines};
use lorahost_sdk::{Batch, Example, Source};
use serde_json::Value;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    categories: Option<Vec<String>>,
}

struct Dolly {
    lines: JsonLines,
    categories: Option<Vec<String>>,
}

/// The record of one line; `Ok(None)` when its category is not wanted.
fn convert(value: &Value, at: &str, categories: Option<&[String]>) -> Result<Option<Example>, String> {
    let record = object(value)?;
    let instruction = field(record, "instruction")?;
    let context = opt_field(record, "context")?.unwrap_or_default();
    let response = field(record, "response")?;
    let category = opt_field(record, "category")?;
    if let Some(wanted) = categories {
        if !category.as_ref().is_some_and(|c| wanted.contains(c)) {
            return Ok(None);
        }
    }
    let mut example = Example::instruction(at, "", &instruction, &context, response);
    if let Some(category) = category {
        example.set_meta("category", category);
    }
    Ok(Some(example))
}

impl Source for Dolly {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        if c.categories.as_ref().is_some_and(|c| c.is_empty()) {
            return Err("categories is empty; list the categories to keep, or leave it out for all".into());
        }
        Ok(Dolly { lines: JsonLines::open(&c.path)?, categories: c.categories })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        let Dolly { lines, categories } = self;
        fill(max, || loop {
            let Some(value) = lines.next_value()? else { return Ok(None) };
            let at = lines.at();
            match value.and_then(|v| convert(&v, &at, categories.as_deref()).map_err(|e| format!("{at}: {e}"))) {
                Ok(None) => continue,
                Ok(Some(example)) => return Ok(Some(Ok(example))),
                Err(message) => return Ok(Some(Err(message))),
            }
        })
    }
}

lorahost_sdk::export_source!(Dolly);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    const SAMPLE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../tests/fixtures/samples/dolly/databricks-dolly-15k.lines1-34.jsonl"
    );

    fn read_all(config: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = parse_config::<Config>(config).and_then(Dolly::open).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 8)
    }

    #[test]
    fn real_lines() {
        let (records, malformed) = read_all(&format!("path = {SAMPLE:?}"));
        assert!(malformed.is_empty());
        assert_eq!(records.len(), 34);
        let first = &records[0];
        assert_eq!(first.id, "databricks-dolly-15k.lines1-34.jsonl:1");
        assert_eq!(
            first.turns[0].content,
            "When did Virgin Australia start operating?\nVirgin Australia, the trading name of Virgin Australia \
             Airlines Pty Ltd, is an Australian-based airline. It is the largest airline by fleet size to use the \
             Virgin brand. It commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single \
             route.[3] It suddenly found itself as a major airline in Australia's domestic market after the collapse \
             of Ansett Australia in September 2001. The airline has since grown to directly serve 32 cities in \
             Australia, from hubs in Brisbane, Melbourne and Sydney.[4]"
        );
        assert_eq!(
            first.turns[1].content,
            "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single route."
        );
        assert_eq!(first.meta("category"), Some("closed_qa"));
        let second = &records[1];
        assert_eq!(second.id, "databricks-dolly-15k.lines1-34.jsonl:2");
        assert_eq!(second.turns[0].content, "Which is a species of fish? Tope or Rope");
        assert_eq!(second.turns[1].content, "Tope");
        assert_eq!(second.meta("category"), Some("classification"));
    }

    #[test]
    fn category_filter() {
        let (records, _) = read_all(&format!("path = {SAMPLE:?}\ncategories = [\"classification\"]"));
        assert!(!records.is_empty() && records.len() < 34);
        assert!(records.iter().all(|r| r.meta("category") == Some("classification")));
        assert_eq!(records[0].id, "databricks-dolly-15k.lines1-34.jsonl:2");
        let empty = parse_config::<Config>(&format!("path = {SAMPLE:?}\ncategories = []")).unwrap();
        assert!(Dolly::open(empty).err().unwrap().starts_with("categories is empty"));
    }

    #[test]
    fn malformed_lines() {
        let dir = std::env::temp_dir().join(format!("lorahost-dolly-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.jsonl");
        std::fs::write(
            &path,
            "{\"instruction\": \"Hi\", \"context\": \"\", \"response\": \"Hello\", \"category\": \"open_qa\"}\n\
             {\"instruction\": \"Hi\", \"context\": \"\"}\n{\"instruction\": [\"x\"], \"response\": \"y\"}\n{oops\n",
        )
        .unwrap();
        let (records, malformed) = read_all(&format!("path = {:?}", path.to_str().unwrap()));
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].turns[0].content, "Hi");
        assert_eq!(
            malformed,
            [
                "d.jsonl:2: missing field `response`",
                "d.jsonl:3: field `instruction` should be text, found a list",
                "d.jsonl:4: not valid JSON: key must be a string (column 2)",
            ]
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
