//! Keeps records until it has seen `after` of them, then fails the batch with an error.
use lorahost_sdk::{Example, Filter, Verdict};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    after: usize,
}

struct Midway {
    after: usize,
    seen: usize,
}

impl Filter for Midway {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        Ok(Midway { after: c.after, seen: 0 })
    }
    fn filter(&mut self, _: &Example) -> Verdict {
        Verdict::Keep
    }
    fn filter_batch(&mut self, batch: &[Example]) -> Result<Vec<Verdict>, String> {
        for e in batch {
            self.seen += 1;
            if self.seen > self.after {
                return Err(format!("gave up at record {}", e.id));
            }
        }
        Ok(batch.iter().map(|_| Verdict::Keep).collect())
    }
}

lorahost_sdk::export_filter!(Midway);
