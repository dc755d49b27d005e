//! A source that never ends: every call returns as many records as asked, each `record_kb` KiB long.
use lorahost_sdk::{Batch, Example, Source, Turn};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    record_kb: usize,
}

struct Endless {
    text: String,
    n: u64,
}

impl Source for Endless {
    type Config = Config;
    fn open(c: Config) -> Result<Self, String> {
        Ok(Endless { text: "x".repeat(c.record_kb * 1024), n: 0 })
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        let records = (0..max)
            .map(|_| {
                self.n += 1;
                Example {
                    id: format!("endless:{}", self.n),
                    dataset: String::new(),
                    turns: vec![Turn::new("user", "more"), Turn::new("assistant", &self.text)],
                    meta: vec![],
                }
            })
            .collect();
        Ok(Some(Batch { records, malformed: vec![] }))
    }
}

lorahost_sdk::export_source!(Endless);
