//! `cosine`: linear warmup from 0, then half a cosine from the base rate (at the end of warmup) down to
//! `min_ratio * base` (at the last step + 1). With `min_ratio = 0` this is Hugging Face's
//! `get_cosine_schedule_with_warmup`.
//!
//! ```toml
//! [scheduler]
//! plugin = "cosine"
//! warmup_steps = 100   # or warmup_ratio = 0.03; no warmup by default
//! min_ratio = 0.1      # the floor, as a fraction of the base rate; 0 by default
//! ```
use lorahost_sdk::Scheduler;
use lorahost_warmup::{fraction, Warmup};
use std::f64::consts::PI;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    warmup_steps: Option<u64>,
    warmup_ratio: Option<f64>,
    #[serde(default)]
    min_ratio: f64,
}

struct Cosine {
    warmup: Warmup,
    min: f64,
}

impl Scheduler for Cosine {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let warmup = Warmup::new(config.warmup_steps, config.warmup_ratio)?;
        Ok(Cosine { warmup, min: fraction("min_ratio", config.min_ratio)? })
    }

    fn lr(&self, step: u64, total: u64, base: f64) -> f64 {
        if let Some(factor) = self.warmup.factor(step, total) {
            return base * factor;
        }
        let warmup = self.warmup.steps(total);
        let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        let cosine = 0.5 * (1.0 + (PI * progress.clamp(0.0, 1.0)).cos());
        base * (self.min + (1.0 - self.min) * cosine)
    }
}

lorahost_sdk::export_scheduler!(Cosine);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    fn scheduler(config: &str) -> Result<Cosine, String> {
        Cosine::new(parse_config(config)?)
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-15, "{a} != {b}");
    }

    #[test]
    fn without_warmup() {
        let s = scheduler("").unwrap();
        close(s.lr(0, 100, 2e-4), 2e-4);
        close(s.lr(25, 100, 2e-4), 2e-4 * 0.8535533905932737);
        close(s.lr(50, 100, 2e-4), 1e-4);
        close(s.lr(99, 100, 2e-4), 2e-4 * 0.0002467198171342);
        close(s.lr(100, 100, 2e-4), 0.0);
    }

    #[test]
    fn with_warmup_like_transformers() {
        let s = scheduler("warmup_steps = 10").unwrap();
        assert_eq!((s.lr(0, 110, 1.0), s.lr(5, 110, 1.0), s.lr(10, 110, 1.0)), (0.0, 0.5, 1.0));
        close(s.lr(60, 110, 1.0), 0.5);
        close(s.lr(109, 110, 1.0), 0.0002467198171342);
        // A warmup ratio of 0.1 over 100 steps is 10 steps.
        let s = scheduler("warmup_ratio = 0.1").unwrap();
        assert_eq!((s.lr(9, 100, 1.0), s.lr(10, 100, 1.0)), (0.9, 1.0));
        close(s.lr(55, 100, 1.0), 0.5);
    }

    #[test]
    fn min_ratio_is_the_floor() {
        let s = scheduler("min_ratio = 0.1").unwrap();
        close(s.lr(0, 100, 1.0), 1.0);
        close(s.lr(50, 100, 1.0), 0.55);
        close(s.lr(100, 100, 1.0), 0.1);
        close(s.lr(150, 100, 1.0), 0.1);
    }

    #[test]
    fn rejects_bad_configuration() {
        assert!(scheduler("min_ratio = -1.0").err().unwrap().starts_with("min_ratio = -1 is out of range"));
        assert!(scheduler("warmup_steps = 5\nwarmup_ratio = 0.5").err().unwrap().contains("keep one of them"));
    }
}
