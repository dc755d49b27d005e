//! The `length` rule as a native library for the `trusted = true` escape hatch: same SDK trait, other ABI.
use lorahost_sdk::{Example, Filter, Verdict};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    max_chars: usize,
}

struct MaxChars(usize);

impl Filter for MaxChars {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        if c.max_chars == 0 {
            return Err("max_chars must be at least 1".into());
        }
        Ok(MaxChars(c.max_chars))
    }
    fn filter(&mut self, e: &Example) -> Verdict {
        if e.chars() > self.0 {
            Verdict::Drop("too long".into())
        } else {
            Verdict::Keep
        }
    }
}


lorahost_sdk::export_native!(filter MaxChars);
