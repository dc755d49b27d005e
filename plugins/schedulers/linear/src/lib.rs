//! `linear`: linear warmup from 0, then a linear decay from the base rate (at the end of warmup) to
//! `min_ratio * base` (at the last step + 1). With `min_ratio = 0` this is Hugging Face's
//! `get_linear_schedule_with_warmup`.
//!
//! ```toml
//! [scheduler]
//! plugin = "linear"
//! warmup_ratio = 0.03   # or warmup_steps = 100; no warmup by default
//! min_ratio = 0.1       # the floor, as a fraction of the base rate; 0 by default
//! ```
use lorahost_sdk::Scheduler;
use lorahost_warmup::{fraction, Warmup};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    warmup_steps: Option<u64>,
    warmup_ratio: Option<f64>,
    #[serde(default)]
    min_ratio: f64,
}

struct Linear {
    warmup: Warmup,
    min: f64,
}

impl Scheduler for Linear {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let warmup = Warmup::new(config.warmup_steps, config.warmup_ratio)?;
        Ok(Linear { warmup, min: fraction("min_ratio", config.min_ratio)? })
    }

    fn lr(&self, step: u64, total: u64, base: f64) -> f64 {
        if let Some(factor) = self.warmup.factor(step, total) {
            return base * factor;
        }
        let decay = total.saturating_sub(self.warmup.steps(total)).max(1);
        let left = total.saturating_sub(step) as f64 / decay as f64;
        base * (self.min + (1.0 - self.min) * left)
    }
}

lorahost_sdk::export_scheduler!(Linear);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    fn scheduler(config: &str) -> Result<Linear, String> {
        Linear::new(parse_config(config)?)
    }

    #[test]
    fn decays_to_zero_like_transformers() {
        let s = scheduler("").unwrap();
        assert_eq!((s.lr(0, 100, 1.0), s.lr(50, 100, 1.0), s.lr(99, 100, 1.0)), (1.0, 0.5, 0.01));
        let s = scheduler("warmup_steps = 10").unwrap();
        let lrs: Vec<_> = [0, 5, 10, 60, 109, 110].iter().map(|&step| s.lr(step, 110, 2.0)).collect();
        assert_eq!(lrs, [0.0, 1.0, 2.0, 1.0, 0.02, 0.0]);
    }

    #[test]
    fn min_ratio_is_the_floor() {
        let s = scheduler("min_ratio = 0.1\nwarmup_ratio = 0.1").unwrap();
        // 10 warmup steps of 100; halfway through the decay the rate is 0.1 + 0.9 * 0.5.
        assert_eq!(s.lr(10, 100, 1.0), 1.0);
        assert!((s.lr(55, 100, 1.0) - 0.55).abs() < 1e-12);
        assert!((s.lr(100, 100, 1.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn warmup_longer_than_the_run() {
        let s = scheduler("warmup_steps = 200").unwrap();
        assert_eq!((s.lr(0, 100, 1.0), s.lr(99, 100, 1.0)), (0.0, 0.495));
    }

    #[test]
    fn rejects_bad_configuration() {
        assert!(scheduler("min_ratio = 1.5").err().unwrap().starts_with("min_ratio = 1.5 is out of range"));
        assert!(scheduler("warmup = 3").err().unwrap().contains("unknown field `warmup`"));
    }
}
