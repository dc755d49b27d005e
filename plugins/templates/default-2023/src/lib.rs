//! `default-2023`: the `default` template of LLaMA-Efficient-Tuning (2023), which the NeurIPS 2023 LLM
//! Efficiency Challenge recipe of team Percent_bfd used with Qwen-14B. Reproduced piece for piece: the host
//! tokenizes each segment on its own, as the original did, so the ids match byte for byte.
//!
//! First pair:  [system] ["\n"] ["Human: {query}\nAssistant: "] [answer] [<|endoftext|>]
//! Later pairs:          ["\n"] ["Human: {query}\nAssistant: "] [answer] [<|endoftext|>]
//!
//! Answers and their end tokens are trained; everything else is context. A leading system turn replaces the
//! system text.
//!
//! ```toml
//! [template]
//! plugin = "default-2023"
//! system = "..."          # default: the recipe's "A chat between a curious user and ..."
//! eos = "<|endoftext|>"   # default
//! ```
use lorahost_sdk::{Example, Segment, Template};

pub const SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    system: Option<String>,
    eos: Option<String>,
}

struct Default2023 {
    system: String,
    eos: String,
}

impl Template for Default2023 {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let eos = config.eos.unwrap_or_else(|| "<|endoftext|>".into());
        if eos.is_empty() {
            return Err("`eos` is empty: name the tokenizer's end token, e.g. \"<|endoftext|>\"".into());
        }
        Ok(Default2023 { system: config.system.unwrap_or_else(|| SYSTEM.into()), eos })
    }

    fn eos(&self) -> String {
        self.eos.clone()
    }

    fn render(&self, example: &Example) -> Result<Vec<Segment>, String> {
        let (system, turns) = match example.turns.split_first() {
            Some((first, rest)) if first.role == "system" => (first.content.as_str(), rest),
            _ => (self.system.as_str(), &example.turns[..]),
        };
        let mut out = Vec::new();
        for (i, pair) in turns.chunks(2).enumerate() {
            let [query, answer] = pair else {
                return Err("the conversation ends with a user turn: every query needs an answer".into());
            };
            if query.role != "user" || answer.role != "assistant" {
                return Err(format!(
                    "turns must alternate user, assistant (pair {} is {}, {})",
                    i + 1,
                    query.role,
                    answer.role
                ));
            }
            if i == 0 && !system.is_empty() {
                out.push(Segment::prompt(system));
            }
            out.push(Segment::prompt("\n"));
            out.push(Segment::prompt(format!("Human: {}\nAssistant: ", query.content)));
            out.push(Segment::trained(answer.content.as_str()));
            out.push(Segment::special(self.eos.as_str(), true));
        }
        if out.is_empty() {
            return Err("no user/assistant pair to train on".into());
        }
        Ok(out)
    }
}

lorahost_sdk::export_template!(Default2023);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::Turn;

    fn t() -> Default2023 {
        Default2023::new(Config { system: None, eos: None }).unwrap()
    }

    #[test]
    fn one_pair_renders_the_recipe_pieces() {
        let e = Example::instruction("x", "d", "Add", "2 and 3", "5");
        let s = t().render(&e).unwrap();
        let texts: Vec<(&str, bool, bool)> = s.iter().map(|s| (s.text.as_str(), s.trained, s.special)).collect();
        assert_eq!(
            texts,
            vec![
                (SYSTEM, false, false),
                ("\n", false, false),
                ("Human: Add\n2 and 3\nAssistant: ", false, false),
                ("5", true, false),
                ("<|endoftext|>", true, true),
            ]
        );
    }

    #[test]
    fn later_pairs_start_with_the_separator_and_system_turns_override() {
        let e = Example::new(
            "x",
            "d",
            vec![
                Turn::new("system", "Be brief."),
                Turn::new("user", "Hi"),
                Turn::new("assistant", "Hello"),
                Turn::new("user", "Bye"),
                Turn::new("assistant", "Goodbye"),
            ],
        );
        let s = t().render(&e).unwrap();
        let texts: Vec<&str> = s.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            texts,
            vec!["Be brief.", "\n", "Human: Hi\nAssistant: ", "Hello", "<|endoftext|>", "\n", "Human: Bye\nAssistant: ", "Goodbye", "<|endoftext|>"]
        );
        let bad = Example::new("x", "d", vec![Turn::new("user", "Hi")]);
        assert!(t().render(&bad).unwrap_err().contains("needs an answer"));
    }
}
