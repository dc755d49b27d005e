//! `constant`: linear warmup from 0, then the base learning rate (Hugging Face's
//! `get_constant_schedule_with_warmup`).
//!
//! ```toml
//! [scheduler]
//! plugin = "constant"
//! warmup_steps = 100   # or warmup_ratio = 0.03 (a fraction of all steps, rounded up); none by default
//! ```
use lorahost_sdk::Scheduler;
use lorahost_warmup::Warmup;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    warmup_steps: Option<u64>,
    warmup_ratio: Option<f64>,
}

struct Constant(Warmup);

impl Scheduler for Constant {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(Constant(Warmup::new(config.warmup_steps, config.warmup_ratio)?))
    }

    fn lr(&self, step: u64, total: u64, base: f64) -> f64 {
        base * self.0.factor(step, total).unwrap_or(1.0)
    }
}

lorahost_sdk::export_scheduler!(Constant);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    fn scheduler(config: &str) -> Result<Constant, String> {
        Constant::new(parse_config(config)?)
    }

    #[test]
    fn warmup_then_constant() {
        let s = scheduler("warmup_steps = 4").unwrap();
        let lrs: Vec<_> = (0..7).map(|step| s.lr(step, 10, 2.0)).collect();
        assert_eq!(lrs, [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]);
        let s = scheduler("warmup_ratio = 0.25").unwrap();
        assert_eq!((s.lr(0, 8, 1.0), s.lr(1, 8, 1.0), s.lr(2, 8, 1.0)), (0.0, 0.5, 1.0));
        let s = scheduler("").unwrap();
        assert_eq!((s.lr(0, 8, 3e-4), s.lr(7, 8, 3e-4)), (3e-4, 3e-4));
    }

    #[test]
    fn rejects_bad_configuration() {
        assert!(scheduler("warmup_steps = 1\nwarmup_ratio = 0.1").err().unwrap().contains("both set"));
        assert!(scheduler("warmup_ratio = -0.1").err().unwrap().starts_with("warmup_ratio = -0.1 is out of range"));
        assert!(scheduler("min_ratio = 0.1").err().unwrap().contains("unknown field `min_ratio`"));
    }
}
