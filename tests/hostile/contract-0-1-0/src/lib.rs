//! A filter built against contract 0.1.0 (wit/ holds the WIT of that release, before the scorer world): it
//! must still load on a 0.1.x host. Drops records whose id ends in "drop".
wit_bindgen::generate!({ path: "wit", world: "filter" });

use exports::lorahost::plugin::filter_api::{Example, Guest, Verdict};

struct Old;

impl Guest for Old {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
    fn filter_batch(batch: Vec<Example>) -> Result<Vec<Verdict>, String> {
        Ok(batch.iter().map(|e| if e.id.ends_with("drop") { Verdict::Drop("old".into()) } else { Verdict::Keep }).collect())
    }
}

export!(Old);
