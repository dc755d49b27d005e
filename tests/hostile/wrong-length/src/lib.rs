//! Answers a batch with one verdict too few, bypassing the SDK's per-record helper.
lorahost_sdk::__lorahost_generate!("filter");

struct Short;

impl exports::lorahost::plugin::filter_api::Guest for Short {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
    fn filter_batch(batch: Vec<lorahost_sdk::Example>) -> Result<Vec<lorahost_sdk::Verdict>, String> {
        Ok(batch.iter().skip(1).map(|_| lorahost_sdk::Verdict::Keep).collect())
    }
}

export!(Short);
