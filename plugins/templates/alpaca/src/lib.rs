//! `alpaca`: the Stanford Alpaca prompt. A conversation is an optional system turn (which replaces the
//! preamble) followed by user/assistant pairs; each pair renders as
//! `### Instruction:\n{user}\n\n### Response:\n{assistant}` followed by the end-of-sequence token, with the
//! preamble and a blank line before the first pair and a blank line before each later one. The answers and
//! their end-of-sequence tokens are trained.
//!
//! ```toml
//! [template]
//! plugin = "alpaca"
//! preamble = "Answer the question."  # default: "Below is an instruction that describes a task. ..."
//! eos = "</s>"                        # the end-of-sequence special token, "<|endoftext|>" by default
//! ```
use lorahost_sdk::{Example, Segment, Template};

const PREAMBLE: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    preamble: Option<String>,
    eos: Option<String>,
}

struct Alpaca {
    preamble: String,
    eos: String,
}

impl Template for Alpaca {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let eos = config.eos.unwrap_or_else(|| "<|endoftext|>".into());
        if eos.is_empty() {
            return Err("eos is empty; name the tokenizer's end-of-sequence token, e.g. \"<|endoftext|>\"".into());
        }
        Ok(Alpaca { preamble: config.preamble.unwrap_or_else(|| PREAMBLE.into()), eos })
    }

    fn eos(&self) -> String {
        self.eos.clone()
    }

    fn render(&self, example: &Example) -> Result<Vec<Segment>, String> {
        let (preamble, turns) = match example.turns.split_first() {
            Some((first, rest)) if first.role == "system" => (first.content.as_str(), rest),
            _ => (self.preamble.as_str(), &example.turns[..]),
        };
        if turns.is_empty() {
            return Err("no assistant turn to train on".into());
        }
        let offset = example.turns.len() - turns.len();
        let mut segments = Vec::new();
        for (pair, chunk) in turns.chunks(2).enumerate() {
            for (i, turn) in chunk.iter().enumerate() {
                let expected = ["user", "assistant"][i];
                if turn.role != expected {
                    return Err(format!(
                        "turn {} is {:?} where {expected:?} was expected; after an optional system turn, \
                         roles must alternate user, assistant",
                        offset + 2 * pair + i + 1,
                        turn.role
                    ));
                }
            }
            let [user, assistant] = chunk else {
                return Err("the conversation ends with a user turn; the last user turn needs an answer".into());
            };
            let lead = match (pair, preamble.is_empty()) {
                (0, true) => String::new(),
                (0, false) => format!("{preamble}\n\n"),
                _ => "\n\n".to_string(),
            };
            segments.push(Segment::prompt(format!("{lead}### Instruction:\n{}\n\n### Response:\n", user.content)));
            segments.push(Segment::trained(assistant.content.as_str()));
            segments.push(Segment::special(self.eos.as_str(), true));
        }
        Ok(segments)
    }
}

lorahost_sdk::export_template!(Alpaca);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    fn template(config: &str) -> Alpaca {
        Alpaca::new(parse_config(config).unwrap()).unwrap()
    }

    fn conversation(turns: &[(&str, &str)]) -> Example {
        Example::new("t:1", "d", turns.iter().map(|(r, c)| Turn::new(*r, *c)).collect())
    }

    #[test]
    fn two_turns() {
        let t = template("");
        assert_eq!(t.eos(), "<|endoftext|>");
        let segments = t.render(&Example::instruction("a", "d", "Add", "1 2", "3")).unwrap();
        assert_eq!(
            segments,
            vec![
                Segment::prompt(format!("{PREAMBLE}\n\n### Instruction:\nAdd\n1 2\n\n### Response:\n")),
                Segment::trained("3"),
                Segment::special("<|endoftext|>", true),
            ]
        );
    }

    #[test]
    fn multi_turn_with_system() {
        let t = template("eos = \"</s>\"");
        let turns = [("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")];
        assert_eq!(
            t.render(&conversation(&turns)).unwrap(),
            vec![
                Segment::prompt("Be brief.\n\n### Instruction:\nQ1\n\n### Response:\n"),
                Segment::trained("A1"),
                Segment::special("</s>", true),
                Segment::prompt("\n\n### Instruction:\nQ2\n\n### Response:\n"),
                Segment::trained("A2"),
                Segment::special("</s>", true),
            ]
        );
        let t = template("preamble = \"\"");
        assert_eq!(
            t.render(&conversation(&turns[1..3])).unwrap()[0],
            Segment::prompt("### Instruction:\nQ1\n\n### Response:\n")
        );
    }

    #[test]
    fn roles_must_alternate() {
        let t = template("");
        assert_eq!(
            t.render(&conversation(&[("system", "S"), ("user", "Q"), ("user", "Q again")])).unwrap_err(),
            "turn 3 is \"user\" where \"assistant\" was expected; after an optional system turn, \
             roles must alternate user, assistant"
        );
        assert!(t.render(&conversation(&[("assistant", "A")])).unwrap_err().starts_with("turn 1 is \"assistant\""));
        assert!(t
            .render(&conversation(&[("user", "Q"), ("assistant", "A"), ("user", "Q2")]))
            .unwrap_err()
            .starts_with("the conversation ends with a user turn"));
        assert_eq!(t.render(&conversation(&[("system", "S")])).unwrap_err(), "no assistant turn to train on");
        assert!(Alpaca::new(parse_config("eos = \"\"").unwrap()).err().unwrap().starts_with("eos is empty"));
    }
}
