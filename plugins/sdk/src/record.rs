//! Conveniences on the shared record types, so plugins read as what they do.
use crate::types::{Example, Segment, Turn};

impl Turn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Turn { role: role.into(), content: content.into() }
    }
}

impl Example {
    /// A conversation with no metadata.
    pub fn new(id: impl Into<String>, dataset: impl Into<String>, turns: Vec<Turn>) -> Self {
        Example { id: id.into(), dataset: dataset.into(), turns, meta: Vec::new() }
    }

    /// An instruction record (alpaca style) as a two-turn conversation: the user says the instruction,
    /// followed by a newline and the input when there is one (as the 2023 recipe joined them), and the
    /// assistant answers with the output.
    pub fn instruction(
        id: impl Into<String>,
        dataset: impl Into<String>,
        instruction: &str,
        input: &str,
        output: impl Into<String>,
    ) -> Self {
        let query = if input.is_empty() { instruction.to_string() } else { format!("{instruction}\n{input}") };
        Self::new(id, dataset, vec![Turn::new("user", query), Turn::new("assistant", output)])
    }

    /// The value of a metadata key, if present.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Adds (or replaces) a metadata key.
    pub fn set_meta(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        match self.meta.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value.into(),
            None => self.meta.push((key, value.into())),
        }
    }

    /// All turn contents, in order.
    pub fn contents(&self) -> impl Iterator<Item = &str> {
        self.turns.iter().map(|t| t.content.as_str())
    }

    /// Characters (Unicode scalar values) over all turns.
    pub fn chars(&self) -> usize {
        self.contents().map(|c| c.chars().count()).sum()
    }

    /// Bytes of text the record holds (id, roles, contents, metadata): what batch sizes and the host's
    /// dataset budgets count.
    pub fn bytes(&self) -> usize {
        let turns: usize = self.turns.iter().map(|t| t.role.len() + t.content.len()).sum();
        let meta: usize = self.meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.id.len() + turns + meta
    }

    /// Whitespace-separated words over all turns.
    pub fn words(&self) -> usize {
        self.contents().map(|c| c.split_whitespace().count()).sum()
    }
}

impl Segment {
    /// Context the model reads but is not trained on (a prompt).
    pub fn prompt(text: impl Into<String>) -> Self {
        Segment { text: text.into(), trained: false, special: false }
    }

    /// Text the loss is computed on (a response).
    pub fn trained(text: impl Into<String>) -> Self {
        Segment { text: text.into(), trained: true, special: false }
    }

    /// One special token by name, e.g. `<|endoftext|>`.
    pub fn special(name: impl Into<String>, trained: bool) -> Self {
        Segment { text: name.into(), trained, special: true }
    }
}

/// Which assistant turns a chat template trains: the `train_on` option of the chat templates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainOn {
    /// Every assistant turn (the default).
    All,
    /// Only the last assistant turn.
    Last,
}

impl TrainOn {
    /// `train_on = "all" | "last"`; absent means all.
    pub fn parse(value: Option<&str>) -> Result<TrainOn, String> {
        match value.unwrap_or("all") {
            "all" => Ok(TrainOn::All),
            "last" => Ok(TrainOn::Last),
            other => Err(format!("train_on = {other:?} is not a choice; use \"all\" or \"last\"")),
        }
    }

    /// For each turn of `example`, whether its content is trained; an error when there is no assistant turn.
    pub fn flags(self, example: &Example) -> Result<Vec<bool>, String> {
        let Some(last) = example.turns.iter().rposition(|t| t.role == "assistant") else {
            return Err("no assistant turn to train on".into());
        };
        Ok(example.turns.iter().enumerate().map(|(i, t)| t.role == "assistant" && (self == TrainOn::All || i == last)).collect())
    }
}
