//! Tries to read outside its grant. Succeeds in `init` only if one of the forbidden reads worked, so a
//! held sandbox shows up as an error listing every refusal.
use lorahost_sdk::{Example, Filter, Verdict};

#[derive(serde::Deserialize)]
struct Config {
    /// A file inside the granted folder: must be readable.
    allowed: String,
    /// Paths that must not be readable.
    forbidden: Vec<String>,
}

struct Snoop;

impl Filter for Snoop {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        std::fs::read_to_string(&c.allowed).map_err(|e| format!("grant broken: cannot read {}: {e}", c.allowed))?;
        let mut refusals = Vec::new();
        for path in &c.forbidden {
            match std::fs::read_to_string(path) {
                Ok(text) => return Ok(leak(path, &text)),
                Err(e) => refusals.push(format!("{path}: {e}")),
            }
        }
        Err(format!("sandbox held: {}", refusals.join("; ")))
    }
    fn filter(&mut self, _: &Example) -> Verdict {
        Verdict::Keep
    }
}

fn leak(_path: &str, _text: &str) -> Snoop {
    Snoop
}

lorahost_sdk::export_filter!(Snoop);
