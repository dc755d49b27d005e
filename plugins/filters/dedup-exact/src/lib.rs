//! `dedup-exact`: drops records identical to an earlier one of the dataset, keeping the first. Records are
//! compared by a 128-bit hash (FNV-1a) of their turns' roles and contents; ids and metadata do not count.
//!
//! ```toml
//! [[filter]]
//! plugin = "dedup-exact"
//! on = "prompt"   # compare the non-assistant turns only; "all" (the default) compares every turn
//! ```
use lorahost_sdk::{Example, Filter, Verdict};
use std::collections::HashSet;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    on: Option<String>,
}

struct DedupExact {
    prompt_only: bool,
    seen: HashSet<u128>,
}

/// FNV-1a, 128-bit.
struct Fnv(u128);

impl Fnv {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u128).wrapping_mul(Self::PRIME);
        }
    }
}

impl DedupExact {
    fn key(&self, example: &Example) -> u128 {
        let mut hash = Fnv(Fnv::OFFSET);
        for turn in &example.turns {
            if self.prompt_only && turn.role == "assistant" {
                continue;
            }
            // 0xfe and 0xff never occur in UTF-8, so they separate fields unambiguously.
            hash.write(turn.role.as_bytes());
            hash.write(&[0xfe]);
            hash.write(turn.content.as_bytes());
            hash.write(&[0xff]);
        }
        hash.0
    }
}

impl Filter for DedupExact {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let prompt_only = match config.on.as_deref().unwrap_or("all") {
            "all" => false,
            "prompt" => true,
            other => return Err(format!("on = {other:?} is not a choice; use \"all\" or \"prompt\"")),
        };
        Ok(DedupExact { prompt_only, seen: HashSet::new() })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        if self.seen.insert(self.key(example)) {
            Verdict::Keep
        } else {
            Verdict::Drop("exact duplicate".into())
        }
    }
}

lorahost_sdk::export_filter!(DedupExact);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    fn qa(id: &str, q: &str, a: &str) -> Example {
        Example::new(id, "d", vec![Turn::new("user", q), Turn::new("assistant", a)])
    }

    fn verdicts(filter: &mut DedupExact, batch: &[Example]) -> Vec<bool> {
        batch.iter().map(|e| matches!(filter.filter(e), Verdict::Keep)).collect()
    }

    #[test]
    fn drops_repeats_across_batches() {
        let mut f = DedupExact::new(parse_config("").unwrap()).unwrap();
        let first = [qa("1", "Q", "A"), qa("2", "Q", "B"), qa("3", "Q", "A")];
        assert_eq!(verdicts(&mut f, &first), [true, true, false]);
        let second = [qa("4", "Q", "B"), qa("5", "QA", ""), qa("6", "Q", "A")];
        assert_eq!(verdicts(&mut f, &second), [false, true, false]);
        assert_eq!(f.filter(&qa("7", "Q", "A")), Verdict::Drop("exact duplicate".into()));
        // The same text under another role is another record.
        let as_system = Example::new("8", "d", vec![Turn::new("system", "Q"), Turn::new("assistant", "A")]);
        assert_eq!(f.filter(&as_system), Verdict::Keep);
    }

    #[test]
    fn prompt_mode_ignores_answers() {
        let mut f = DedupExact::new(parse_config("on = \"prompt\"").unwrap()).unwrap();
        assert_eq!(verdicts(&mut f, &[qa("1", "Q", "A"), qa("2", "Q", "B"), qa("3", "R", "A")]), [true, false, true]);
    }

    #[test]
    fn rejects_bad_configuration() {
        assert_eq!(
            DedupExact::new(parse_config("on = \"answers\"").unwrap()).err().unwrap(),
            "on = \"answers\" is not a choice; use \"all\" or \"prompt\""
        );
        assert!(parse_config::<Config>("by = \"all\"").err().unwrap().contains("unknown field `by`"));
    }

    #[test]
    fn fnv_matches_the_reference_value() {
        // FNV-1a 128 of "a", from the reference implementation's test vectors.
        let mut h = Fnv(Fnv::OFFSET);
        h.write(b"a");
        assert_eq!(h.0, 0xd228cb696f1a8caf78912b704e4a8964);
    }
}
