//! `length`: keeps records whose total length (all turns) lies in `[min, max]`.
//!
//! ```toml
//! [[filter]]
//! plugin = "length"
//! unit = "words"   # or "chars" (the default)
//! min = 3
//! max = 2000
//! ```
use lorahost_sdk::{Example, Filter, Verdict};

#[derive(serde::Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Unit {
    Chars,
    Words,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "chars")]
    unit: Unit,
    #[serde(default)]
    min: usize,
    #[serde(default = "unbounded")]
    max: usize,
}

fn chars() -> Unit {
    Unit::Chars
}
fn unbounded() -> usize {
    usize::MAX
}

struct Length(Config);

impl Filter for Length {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.min > config.max {
            return Err(format!("min ({}) is greater than max ({})", config.min, config.max));
        }
        Ok(Length(config))
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        let (n, unit) = match self.0.unit {
            Unit::Chars => (example.chars(), "chars"),
            Unit::Words => (example.words(), "words"),
        };
        if n < self.0.min {
            Verdict::Drop(format!("shorter than {} {unit}", self.0.min))
        } else if n > self.0.max {
            Verdict::Drop(format!("longer than {} {unit}", self.0.max))
        } else {
            Verdict::Keep
        }
    }
}

lorahost_sdk::export_filter!(Length);
