//! `bigbench`: reads one BIG-bench task: the original `task.json` (google/BIG-bench) or a BIG-Bench-Hard
//! file (`bbh/<task>.json`). Both hold `examples`; `task.json` may add `task_prefix` (text for every example).
//!
//! ```toml
//! [[dataset]]
//! name = "snarks"
//! [dataset.source]
//! plugin = "bigbench"
//! path = "data/bigbench/snarks/task.json"
//! ```
//!
//! An example with `target_scores` (an object choice -> score, in file order) becomes lettered multiple
//! choice, as the 2023 recipe used BIG-bench: instruction `Question: {input}`, input
//! `A.{choice}\nB.{choice}\n...\nAnswer:`, output the letter of the best-scored choice (the first on a tie).
//! E.g. user `Question: Is it raining?\nA.Yes\nB.No\nAnswer:`, assistant `A`.
//!
//! An example with only `target` (BIG-Bench-Hard, or generative tasks) is a question/answer pair: user turn
//! the `input` as it is, assistant turn the `target` (the first one when it is a list). BIG-Bench-Hard inputs
//! already list their options, so e.g. user `Which statement is sarcastic?\nOptions:\n(A) ...\n(B) ...` and
//! assistant `(B)`.
//!
//! A non-empty `task_prefix` goes before the question on its own line(s): the user turn starts with
//! `{task_prefix without trailing whitespace}\n`. The example prefixes of `task.json`
//! (`example_input_prefix` ...) are not used.
//!
//! Ids are `<file name>#<0-based index>`; the metadata holds `task` (the file's `name`, else the folder name
//! for `task.json`, else the file name without `.json`) and the evaluation fields: `question` (the prefixed
//! input) and, for `target_scores`, `choices`, `labels`, `gold` (see `set_choice_fields` in
//! shared/recipe-sources), else `target`. An example without `input`, or with neither usable
//! `target_scores` nor `target`, is reported as `<file name>#<index>: <what is wrong>` and skipped. A file that
//! is not JSON or has no `examples` list cannot be read at all.
use lorahost_recipe_sources::{fill, letter, multiple_choice, set_choice_fields, Next, Ordered, Queue};
use lorahost_sdk::{Batch, Example, Source};
use std::path::Path;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
}

struct BigBench {
    queue: Queue,
}

fn convert(example: &Ordered, id: String, prefix: &str) -> Result<Example, String> {
    if !matches!(example, Ordered::Object(_)) {
        return Err(format!("expected a JSON object, found {}", example.kind()));
    }
    let input = example.field("input")?;
    let lead = if prefix.trim().is_empty() { String::new() } else { format!("{}\n", prefix.trim_end()) };
    match example.get("target_scores") {
        None | Some(Ordered::Null) => {}
        Some(Ordered::Object(scores)) if !scores.is_empty() => {
            let mut choices = Vec::with_capacity(scores.len());
            let mut best: Option<(usize, f64)> = None;
            for (i, (choice, score)) in scores.iter().enumerate() {
                let Some(score) = score.number() else {
                    return Err(format!(
                        "target_scores: the score of {choice:?} should be a number, found {}",
                        score.kind()
                    ));
                };
                if best.is_none_or(|(_, b)| score > b) {
                    best = Some((i, score));
                }
                choices.push(choice.as_str());
            }
            let question = format!("{lead}{input}");
            let (instruction, input) = multiple_choice(&input, &choices);
            let gold = best.map_or(0, |(i, _)| i);
            let answer = letter(gold);
            let mut e = Example::instruction(id, "", &format!("{lead}{instruction}"), &input, answer);
            let right: Vec<bool> = (0..choices.len()).map(|i| i == gold).collect();
            set_choice_fields(&mut e, &question, &choices, &right);
            return Ok(e);
        }
        Some(other) => {
            return Err(format!(
                "target_scores should be a non-empty object of choice -> score, found {}",
                match other {
                    Ordered::Object(_) => "an empty object",
                    o => o.kind(),
                }
            ))
        }
    }
    let target = match example.get("target") {
        None | Some(Ordered::Null) => return Err("missing field `target` (or `target_scores`)".into()),
        Some(Ordered::Array(targets)) => match targets.first().and_then(Ordered::text) {
            Some(t) => t,
            None => return Err("target should be text or a non-empty list of texts".into()),
        },
        Some(t) => t.text().ok_or_else(|| format!("target should be text, found {}", t.kind()))?,
    };
    let mut e = Example::instruction(id, "", &format!("{lead}{input}"), "", &target);
    e.set_meta("question", format!("{lead}{input}"));
    e.set_meta("target", target);
    Ok(e)
}

impl Source for BigBench {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        let (task, name) = Ordered::read(&c.path)?;
        let Some(Ordered::Array(examples)) = task.get("examples") else {
            return Err(format!(
                "{name} has no `examples` list; is it a BIG-bench task.json or a BIG-Bench-Hard file?"
            ));
        };
        let prefix = task.opt_field("task_prefix").map_err(|e| format!("{name}: {e}"))?.unwrap_or_default();
        let path = Path::new(&c.path);
        let task_name = match task.opt_field("name") {
            Ok(Some(n)) if !n.is_empty() => n,
            _ if name == "task.json" => path
                .parent()
                .and_then(Path::file_name)
                .map_or_else(|| "task".into(), |n| n.to_string_lossy().into_owned()),
            _ => name.strip_suffix(".json").unwrap_or(&name).to_string(),
        };
        let mut queue = Queue::default();
        for (i, example) in examples.iter().enumerate() {
            let id = format!("{name}#{i}");
            let record = convert(example, id.clone(), &prefix).map(|mut e| {
                e.set_meta("task", task_name.as_str());
                e
            });
            queue.push(record.map_err(|e| format!("{id}: {e}")));
        }
        Ok(BigBench { queue })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        fill(max, || -> Result<Next, String> { Ok(self.queue.pop()) })
    }
}

lorahost_sdk::export_source!(BigBench);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    const SAMPLES: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../../tests/fixtures/samples/bigbench_hard_derived/");

    fn open(path: &str) -> Result<BigBench, String> {
        parse_config::<Config>(&format!("path = {path:?}")).and_then(BigBench::open)
    }

    fn read_all(path: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = open(path).unwrap();
        lorahost_recipe_sources::read_all(&mut source, 50)
    }

    #[test]
    fn real_bbh_snarks() {
        let (records, malformed) = read_all(&format!("{SAMPLES}snarks.json"));
        assert!(malformed.is_empty());
        assert_eq!(records.len(), 178);
        let first = &records[0];
        assert_eq!(first.id, "snarks.json#0");
        assert_eq!(
            first.turns[0].content,
            "Which statement is sarcastic?\nOptions:\n(A) He's a generous person, trying to promote a charity stream \
             that has raised millions to help kids in need\n(B) He's a terrible person, trying to promote a charity \
             stream that has raised millions to help kids in need"
        );
        assert_eq!(first.turns[1].content, "(B)");
        assert_eq!(first.meta("task"), Some("snarks"));
        assert_eq!(records[177].id, "snarks.json#177");
    }

    #[test]
    fn real_bbh_logical_deduction() {
        let (records, malformed) = read_all(&format!("{SAMPLES}logical_deduction_three_objects.json"));
        assert!(malformed.is_empty());
        assert_eq!(records.len(), 250);
        assert!(records[0].turns[0]
            .content
            .starts_with("The following paragraphs each describe a set of three objects arranged in a fixed order."));
        assert!(records[0].turns[0].content.ends_with("\n(C) The falcon is the second from the left"));
        assert_eq!(records[0].turns[1].content, "(A)");
        assert_eq!(records[0].meta("task"), Some("logical_deduction_three_objects"));
    }

    #[test]
    fn task_json_with_scores_prefix_and_bad_examples() {
        let dir = std::env::temp_dir().join(format!("lorahost-bigbench-{}/causal_judgment", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("task.json");
        std::fs::write(
            &path,
            r#"{"canary": "c", "description": "d", "task_prefix": "Answer the question.\n",
  "examples": [
    {"input": "Did the fire cause the smoke?", "target_scores": {"Yes": 1, "No": 0}},
    {"input": "Pick one", "target_scores": {"z": 0, "a": 0.5, "m": 0.5}},
    {"input": "Say hi", "target": ["hi", "hello"]},
    {"target": "x"},
    {"input": "q", "target_scores": {"a": "high"}},
    {"input": "q"},
    {"input": "q", "target_scores": {}}
  ]}"#,
        )
        .unwrap();
        let (records, malformed) = read_all(path.to_str().unwrap());
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].id, "task.json#0");
        assert_eq!(
            records[0].turns[0].content,
            "Answer the question.\nQuestion: Did the fire cause the smoke?\nA.Yes\nB.No\nAnswer:"
        );
        assert_eq!(records[0].turns[1].content, "A");
        assert_eq!(records[0].meta("task"), Some("causal_judgment"));
        // The evaluation fields: the prefixed question, the choices, which is right.
        assert_eq!(records[0].meta("question"), Some("Answer the question.\nDid the fire cause the smoke?"));
        assert_eq!((records[1].meta("choices"), records[1].meta("gold")), (Some(r#"["z","a","m"]"#), Some("1")));
        assert_eq!((records[2].meta("question"), records[2].meta("target")), (Some("Answer the question.\nSay hi"), Some("hi")));
        assert_eq!(records[1].turns[0].content, "Answer the question.\nQuestion: Pick one\nA.z\nB.a\nC.m\nAnswer:");
        assert_eq!(records[1].turns[1].content, "B");
        assert_eq!(records[2].turns[0].content, "Answer the question.\nSay hi");
        assert_eq!(records[2].turns[1].content, "hi");
        assert_eq!(
            malformed,
            [
                "task.json#3: missing field `input`",
                "task.json#4: target_scores: the score of \"a\" should be a number, found a string",
                "task.json#5: missing field `target` (or `target_scores`)",
                "task.json#6: target_scores should be a non-empty object of choice -> score, found an empty object",
            ]
        );
        std::fs::write(&path, "{\"name\": \"x\"}").unwrap();
        assert!(open(path.to_str().unwrap()).err().unwrap().starts_with("task.json has no `examples` list"));
        std::fs::write(&path, "{\"examples\": [").unwrap();
        assert!(open(path.to_str().unwrap()).err().unwrap().starts_with("task.json: not valid JSON"));
        std::fs::remove_dir_all(dir.parent().unwrap()).ok();
        assert!(parse_config::<Config>("path = \"/x\"\nshuffle = true").err().unwrap().contains("unknown field"));
    }
}
