//! Reports what the sandbox shows it: environment, arguments, wall clock, and a value derived from its
//! random seed, as metadata of a rewritten first record.
use lorahost_sdk::{Example, Filter, NoConfig, Verdict};
use std::hash::{BuildHasher, Hasher};

struct Look;

impl Filter for Look {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Look)
    }
    fn filter(&mut self, e: &Example) -> Verdict {
        let mut e = e.clone();
        e.set_meta("env", std::env::vars().count().to_string());
        e.set_meta("args", std::env::args().count().to_string());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        e.set_meta("wall_secs", now.as_secs().to_string());
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(42);
        e.set_meta("random", h.finish().to_string());
        e.set_meta("cwd_entries", std::fs::read_dir(".").map(|d| d.count()).unwrap_or(0).to_string());
        Verdict::Rewrite(e)
    }
}

lorahost_sdk::export_filter!(Look);
