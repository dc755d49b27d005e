//! Never returns from filter-batch: the per-call deadline (or fuel) must stop it.
use lorahost_sdk::{Example, Filter, NoConfig, Verdict};

struct Spin;

impl Filter for Spin {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Spin)
    }
    fn filter(&mut self, e: &Example) -> Verdict {
        let mut x = e.id.len() as u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

lorahost_sdk::export_filter!(Spin);
