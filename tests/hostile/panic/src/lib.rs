//! Panics on the first record.
use lorahost_sdk::{Example, Filter, NoConfig, Verdict};

struct Boom;

impl Filter for Boom {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Boom)
    }
    fn filter(&mut self, e: &Example) -> Verdict {
        panic!("hostile panic on record {}", e.id)
    }
}

lorahost_sdk::export_filter!(Boom);
