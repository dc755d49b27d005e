//! A filter built against version 0.0.1 of the contract.
wit_bindgen::generate!({ path: "wit", world: "filter" });

use exports::lorahost::plugin::filter_api::{Example, Guest, Verdict};

struct Old;

impl Guest for Old {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
    fn filter_batch(batch: Vec<Example>) -> Result<Vec<Verdict>, String> {
        Ok(batch.iter().map(|_| Verdict::Keep).collect())
    }
}

export!(Old);
