//! `raw`: the turns' contents joined by a separator, with no markup, then the end-of-sequence token. For
//! continued pretraining on plain text (the `text` record format gives one assistant turn per record).
//!
//! ```toml
//! [template]
//! plugin = "raw"
//! separator = "\n\n"   # between turns, "\n" by default
//! train = "assistant"  # train only the assistant turns; "all" (the default) trains everything
//! eos = "</s>"         # the end-of-sequence special token (always trained), "<|endoftext|>" by default
//! ```
//!
//! Adjacent text with the same `trained` flag is one segment, so with `train = "all"` the whole text is
//! tokenized at once.
use lorahost_sdk::{Example, Segment, Template};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    separator: Option<String>,
    train: Option<String>,
    eos: Option<String>,
}

struct Raw {
    separator: String,
    assistant_only: bool,
    eos: String,
}

/// Appends text, joined to the previous segment when that is text with the same `trained` flag.
fn push_text(segments: &mut Vec<Segment>, text: &str, trained: bool) {
    match segments.last_mut() {
        Some(last) if !last.special && last.trained == trained => last.text.push_str(text),
        _ => segments.push(Segment { text: text.to_string(), trained, special: false }),
    }
}

impl Template for Raw {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let assistant_only = match config.train.as_deref().unwrap_or("all") {
            "all" => false,
            "assistant" => true,
            other => return Err(format!("train = {other:?} is not a choice; use \"all\" or \"assistant\"")),
        };
        let eos = config.eos.unwrap_or_else(|| "<|endoftext|>".into());
        if eos.is_empty() {
            return Err("eos is empty; name the tokenizer's end-of-sequence token, e.g. \"<|endoftext|>\"".into());
        }
        Ok(Raw { separator: config.separator.unwrap_or_else(|| "\n".into()), assistant_only, eos })
    }

    fn eos(&self) -> String {
        self.eos.clone()
    }

    fn render(&self, example: &Example) -> Result<Vec<Segment>, String> {
        if example.turns.is_empty() {
            return Err("no turns to render".into());
        }
        let mut segments = Vec::new();
        for (i, turn) in example.turns.iter().enumerate() {
            if i > 0 {
                push_text(&mut segments, &self.separator, !self.assistant_only);
            }
            push_text(&mut segments, &turn.content, !self.assistant_only || turn.role == "assistant");
        }
        segments.push(Segment::special(self.eos.as_str(), true));
        Ok(segments)
    }
}

lorahost_sdk::export_template!(Raw);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    fn template(config: &str) -> Raw {
        Raw::new(parse_config(config).unwrap()).unwrap()
    }

    fn conversation(turns: &[(&str, &str)]) -> Example {
        Example::new("t:1", "d", turns.iter().map(|(r, c)| Turn::new(*r, *c)).collect())
    }

    #[test]
    fn text_record_is_trained_whole() {
        let t = template("");
        assert_eq!(t.eos(), "<|endoftext|>");
        assert_eq!(
            t.render(&conversation(&[("assistant", "Once upon a time.")])).unwrap(),
            vec![Segment::trained("Once upon a time."), Segment::special("<|endoftext|>", true)]
        );
        assert_eq!(
            t.render(&conversation(&[("user", "Q"), ("assistant", "A")])).unwrap(),
            vec![Segment::trained("Q\nA"), Segment::special("<|endoftext|>", true)]
        );
    }

    #[test]
    fn assistant_only_multi_turn() {
        let t = template("train = \"assistant\"\nseparator = \" | \"\neos = \"</s>\"");
        let turns = [("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")];
        assert_eq!(
            t.render(&conversation(&turns)).unwrap(),
            vec![
                Segment::prompt("S | Q1 | "),
                Segment::trained("A1"),
                Segment::prompt(" | Q2 | "),
                Segment::trained("A2"),
                Segment::special("</s>", true),
            ]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(template("").render(&conversation(&[])).unwrap_err(), "no turns to render");
        assert_eq!(
            Raw::new(parse_config("train = \"user\"").unwrap()).err().unwrap(),
            "train = \"user\" is not a choice; use \"all\" or \"assistant\""
        );
    }
}
