//! Allocates without bound: the memory cap must stop it.
use lorahost_sdk::{Example, Filter, NoConfig, Verdict};

struct Hoard(Vec<Vec<u8>>);

impl Filter for Hoard {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Hoard(Vec::new()))
    }
    fn filter(&mut self, _: &Example) -> Verdict {
        loop {
            // Touch the memory so nothing is optimised away.
            self.0.push(vec![7u8; 16 << 20]);
        }
    }
}

lorahost_sdk::export_filter!(Hoard);
