//! A template that renders nothing for every record: no segment, so no trained token.
use lorahost_sdk::{Example, NoConfig, Segment, Template};

struct Silent;

impl Template for Silent {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Silent)
    }
    fn eos(&self) -> String {
        "<|endoftext|>".into()
    }
    fn render(&self, _: &Example) -> Result<Vec<Segment>, String> {
        Ok(vec![])
    }
}

lorahost_sdk::export_template!(Silent);
