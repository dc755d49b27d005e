//! `llama3`: the chat template of Llama 3 (3, 3.1, 3.2, 3.3). A conversation renders as
//! `<|begin_of_text|>` then, per turn, `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`,
//! with those four markers as special tokens; the assistant turns' contents and their `<|eot_id|>` are
//! trained. The end-of-sequence token is `<|eot_id|>`.
//!
//! ```toml
//! [template]
//! plugin = "llama3"
//! default_system = "You are a helpful assistant."  # prepended when a conversation has no system turn
//! train_on = "last"   # train only the last assistant turn; "all" (the default) trains every one
//! bos = false         # leave out <|begin_of_text|> (default: true, as the model's own template)
//! ```
use lorahost_sdk::{Example, Segment, Template, TrainOn};

const BOS: &str = "<|begin_of_text|>";
const HEADER_START: &str = "<|start_header_id|>";
const HEADER_END: &str = "<|end_header_id|>";
const EOT: &str = "<|eot_id|>";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    default_system: Option<String>,
    train_on: Option<String>,
    bos: Option<bool>,
}

struct Llama3 {
    default_system: Option<String>,
    train_on: TrainOn,
    bos: bool,
}

impl Llama3 {
    fn turn(segments: &mut Vec<Segment>, role: &str, content: &str, trained: bool) {
        segments.push(Segment::special(HEADER_START, false));
        segments.push(Segment::prompt(role));
        segments.push(Segment::special(HEADER_END, false));
        // "\n\n" is a segment apart from the content (which may be trained): Llama 3's pre-tokenizer splits a
        // run of newlines from the word after it anyway, so the ids equal those of the joined text.
        segments.push(Segment::prompt("\n\n"));
        if !content.is_empty() {
            segments.push(Segment { text: content.to_string(), trained, special: false });
        }
        segments.push(Segment::special(EOT, trained));
    }
}

impl Template for Llama3 {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let train_on = TrainOn::parse(config.train_on.as_deref())?;
        Ok(Llama3 { default_system: config.default_system, train_on, bos: config.bos.unwrap_or(true) })
    }

    fn eos(&self) -> String {
        EOT.to_string()
    }

    fn render(&self, example: &Example) -> Result<Vec<Segment>, String> {
        let trained_turns = self.train_on.flags(example)?;
        let mut segments = Vec::new();
        if self.bos {
            segments.push(Segment::special(BOS, false));
        }
        if let Some(system) = &self.default_system {
            if !example.turns.iter().any(|t| t.role == "system") {
                Self::turn(&mut segments, "system", system, false);
            }
        }
        for (turn, &trained) in example.turns.iter().zip(&trained_turns) {
            Self::turn(&mut segments, &turn.role, &turn.content, trained);
        }
        Ok(segments)
    }
}

lorahost_sdk::export_template!(Llama3);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    fn template(config: &str) -> Llama3 {
        Llama3::new(parse_config(config).unwrap()).unwrap()
    }

    fn conversation(turns: &[(&str, &str)]) -> Example {
        Example::new("t:1", "d", turns.iter().map(|(r, c)| Turn::new(*r, *c)).collect())
    }

    /// The rendered text with specials spelled out and trained text in [brackets].
    fn text(segments: &[Segment]) -> String {
        segments.iter().map(|s| if s.trained { format!("[{}]", s.text) } else { s.text.clone() }).collect()
    }

    #[test]
    fn renders_the_model_template_and_trains_the_answers() {
        let t = template("");
        assert_eq!(t.eos(), "<|eot_id|>");
        let s = t.render(&conversation(&[("user", "Hi"), ("assistant", "Hello!")])).unwrap();
        assert_eq!(
            text(&s),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n[Hello!][<|eot_id|>]"
        );
        assert!(s.iter().filter(|x| x.special).all(|x| [BOS, HEADER_START, HEADER_END, EOT].contains(&x.text.as_str())));
    }

    #[test]
    fn default_system_last_only_and_no_bos() {
        let t = template("default_system = \"Be brief.\"\ntrain_on = \"last\"\nbos = false");
        let s = t.render(&conversation(&[("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")])).unwrap();
        let rendered = text(&s);
        assert!(rendered.starts_with("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"), "{rendered}");
        assert!(rendered.contains("\n\nb<|eot_id|>") && rendered.ends_with("\n\n[d][<|eot_id|>]"), "{rendered}");
        // A conversation with its own system turn gets no default one.
        let s = t.render(&conversation(&[("system", "S"), ("user", "a"), ("assistant", "b")])).unwrap();
        assert_eq!(text(&s).matches("system").count(), 1);
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(Llama3::new(parse_config("train_on = \"some\"").unwrap()).err().unwrap().contains("train_on"));
        let e = template("").render(&conversation(&[("user", "only a question")])).unwrap_err();
        assert!(e.contains("assistant"), "{e}");
    }
}
