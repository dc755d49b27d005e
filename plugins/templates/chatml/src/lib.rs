//! `chatml`: the ChatML template of Qwen and others. Each turn renders as
//! `<|im_start|>{role}\n{content}<|im_end|>\n`, with `<|im_start|>` and `<|im_end|>` as special tokens; the
//! assistant turns' contents and their `<|im_end|>` are trained. The end-of-sequence token is `<|im_end|>`.
//!
//! ```toml
//! [template]
//! plugin = "chatml"
//! default_system = "You are a helpful assistant."  # prepended when a conversation has no system turn
//! train_on = "last"   # train only the last assistant turn; "all" (the default) trains every one
//! ```
//!
//! Adjacent text of the same kind is joined into one segment, so `user\n` and the user's words tokenize
//! together as they would in the whole rendered text.
use lorahost_sdk::{Example, Segment, Template, TrainOn};

const START: &str = "<|im_start|>";
const END: &str = "<|im_end|>";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    default_system: Option<String>,
    train_on: Option<String>,
}

struct ChatMl {
    default_system: Option<String>,
    train_on: TrainOn,
}

/// Appends text, joined to the previous segment when that is text with the same `trained` flag.
fn push_text(segments: &mut Vec<Segment>, text: &str, trained: bool) {
    match segments.last_mut() {
        Some(last) if !last.special && last.trained == trained => last.text.push_str(text),
        _ => segments.push(Segment { text: text.to_string(), trained, special: false }),
    }
}

impl Template for ChatMl {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let train_on = TrainOn::parse(config.train_on.as_deref())?;
        Ok(ChatMl { default_system: config.default_system, train_on })
    }

    fn eos(&self) -> String {
        END.to_string()
    }

    fn render(&self, example: &Example) -> Result<Vec<Segment>, String> {
        let trained_turns = self.train_on.flags(example)?;
        let mut segments = Vec::new();
        if let Some(system) = &self.default_system {
            if !example.turns.iter().any(|t| t.role == "system") {
                segments.push(Segment::special(START, false));
                push_text(&mut segments, &format!("system\n{system}"), false);
                segments.push(Segment::special(END, false));
                push_text(&mut segments, "\n", false);
            }
        }
        for (turn, &trained) in example.turns.iter().zip(&trained_turns) {
            segments.push(Segment::special(START, false));
            push_text(&mut segments, &format!("{}\n", turn.role), false);
            push_text(&mut segments, &turn.content, trained);
            segments.push(Segment::special(END, trained));
            push_text(&mut segments, "\n", false);
        }
        Ok(segments)
    }
}

lorahost_sdk::export_template!(ChatMl);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    fn template(config: &str) -> ChatMl {
        ChatMl::new(parse_config(config).unwrap()).unwrap()
    }

    fn conversation(turns: &[(&str, &str)]) -> Example {
        Example::new("t:1", "d", turns.iter().map(|(r, c)| Turn::new(*r, *c)).collect())
    }

    fn special(name: &str, trained: bool) -> Segment {
        Segment::special(name, trained)
    }

    #[test]
    fn two_turns() {
        let t = template("");
        assert_eq!(t.eos(), "<|im_end|>");
        let segments = t.render(&conversation(&[("user", "Hi"), ("assistant", "Hello!")])).unwrap();
        assert_eq!(
            segments,
            vec![
                special(START, false),
                Segment::prompt("user\nHi"),
                special(END, false),
                Segment::prompt("\n"),
                special(START, false),
                Segment::prompt("assistant\n"),
                Segment::trained("Hello!"),
                special(END, true),
                Segment::prompt("\n"),
            ]
        );
    }

    #[test]
    fn multi_turn_with_default_system_and_last_only() {
        let turns = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")];
        let t = template("default_system = \"Be kind.\"\ntrain_on = \"last\"");
        let segments = t.render(&conversation(&turns)).unwrap();
        assert_eq!(
            segments,
            vec![
                special(START, false),
                Segment::prompt("system\nBe kind."),
                special(END, false),
                Segment::prompt("\n"),
                special(START, false),
                Segment::prompt("user\nQ1"),
                special(END, false),
                Segment::prompt("\n"),
                special(START, false),
                Segment::prompt("assistant\nA1"),
                special(END, false),
                Segment::prompt("\n"),
                special(START, false),
                Segment::prompt("user\nQ2"),
                special(END, false),
                Segment::prompt("\n"),
                special(START, false),
                Segment::prompt("assistant\n"),
                Segment::trained("A2"),
                special(END, true),
                Segment::prompt("\n"),
            ]
        );
        // With train_on = "all" both answers are trained; a system turn of its own replaces the default.
        let t = template("default_system = \"Be kind.\"");
        let with_system = [("system", "S"), turns[0], turns[1], turns[2], turns[3]];
        let segments = t.render(&conversation(&with_system)).unwrap();
        let trained: Vec<_> = segments.iter().filter(|s| s.trained).map(|s| s.text.as_str()).collect();
        assert_eq!(trained, ["A1", END, "A2", END]);
        assert_eq!(segments[1], Segment::prompt("system\nS"));
        let text: String = segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            text,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n\
             <|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"
        );
    }

    #[test]
    fn errors() {
        let t = template("");
        assert_eq!(t.render(&conversation(&[("user", "Q")])).unwrap_err(), "no assistant turn to train on");
        assert_eq!(
            ChatMl::new(parse_config("train_on = \"first\"").unwrap()).err().unwrap(),
            "train_on = \"first\" is not a choice; use \"all\" or \"last\""
        );
        assert!(parse_config::<Config>("system = \"x\"").err().unwrap().contains("unknown field `system`"));
    }
}
