//! `noop`: keeps every record. Measures what the sandbox boundary costs, and is the smallest filter.
use lorahost_sdk::{Example, Filter, NoConfig, Verdict};

struct Noop;

impl Filter for Noop {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Noop)
    }
    fn filter(&mut self, _: &Example) -> Verdict {
        Verdict::Keep
    }
}

lorahost_sdk::export_filter!(Noop);
