//! `wsd`: warmup-stable-decay. Linear warmup from 0, the base rate until the final `decay_ratio` of the
//! run, then a decay to `min_ratio * base` at the last step + 1 (as Hugging Face's `get_wsd_schedule`).
//!
//! ```toml
//! [scheduler]
//! plugin = "wsd"
//! warmup_steps = 100     # or warmup_ratio = 0.03; no warmup by default
//! decay_ratio = 0.2      # the fraction of all steps spent decaying, rounded up; 0.1 by default
//! decay_shape = "sqrt"   # "linear" (the default), "cosine", or "sqrt" (1 - sqrt(progress))
//! min_ratio = 0.0        # the floor, as a fraction of the base rate; 0 by default
//! ```
//!
//! When warmup runs into the decay phase, the decay starts at the end of warmup instead.
use lorahost_sdk::Scheduler;
use lorahost_warmup::{ceil_fraction, fraction, Warmup};
use std::f64::consts::PI;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    warmup_steps: Option<u64>,
    warmup_ratio: Option<f64>,
    #[serde(default = "tenth")]
    decay_ratio: f64,
    decay_shape: Option<String>,
    #[serde(default)]
    min_ratio: f64,
}

fn tenth() -> f64 {
    0.1
}

#[derive(Clone, Copy)]
enum Shape {
    Linear,
    Cosine,
    Sqrt,
}

struct Wsd {
    warmup: Warmup,
    decay_ratio: f64,
    shape: Shape,
    min: f64,
}

impl Scheduler for Wsd {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let warmup = Warmup::new(config.warmup_steps, config.warmup_ratio)?;
        let decay_ratio = fraction("decay_ratio", config.decay_ratio)?;
        if let Warmup::Ratio(ratio) = warmup {
            if ratio + decay_ratio > 1.0 {
                return Err(format!(
                    "warmup_ratio ({ratio}) + decay_ratio ({decay_ratio}) is more than the whole run; \
                     make their sum at most 1"
                ));
            }
        }
        let shape = match config.decay_shape.as_deref().unwrap_or("linear") {
            "linear" => Shape::Linear,
            "cosine" => Shape::Cosine,
            "sqrt" => Shape::Sqrt,
            other => {
                return Err(format!("decay_shape = {other:?} is not a shape; use \"linear\", \"cosine\" or \"sqrt\""))
            }
        };
        Ok(Wsd { warmup, decay_ratio, shape, min: fraction("min_ratio", config.min_ratio)? })
    }

    fn lr(&self, step: u64, total: u64, base: f64) -> f64 {
        if let Some(factor) = self.warmup.factor(step, total) {
            return base * factor;
        }
        let start = total.saturating_sub(ceil_fraction(self.decay_ratio, total)).max(self.warmup.steps(total));
        if step < start {
            return base;
        }
        let progress = ((step - start) as f64 / total.saturating_sub(start).max(1) as f64).min(1.0);
        let factor = match self.shape {
            Shape::Linear => 1.0 - progress,
            Shape::Cosine => 0.5 * (1.0 + (PI * progress).cos()),
            Shape::Sqrt => 1.0 - progress.sqrt(),
        };
        base * (self.min + (1.0 - self.min) * factor)
    }
}

lorahost_sdk::export_scheduler!(Wsd);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    fn scheduler(config: &str) -> Result<Wsd, String> {
        Wsd::new(parse_config(config)?)
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-15, "{a} != {b}");
    }

    #[test]
    fn warmup_stable_linear_decay() {
        // 100 steps: warmup 0..10, stable 10..80, decay 80..100.
        let s = scheduler("warmup_steps = 10\ndecay_ratio = 0.2").unwrap();
        assert_eq!((s.lr(0, 100, 1.0), s.lr(5, 100, 1.0)), (0.0, 0.5));
        assert_eq!((s.lr(10, 100, 1.0), s.lr(79, 100, 1.0), s.lr(80, 100, 1.0)), (1.0, 1.0, 1.0));
        close(s.lr(90, 100, 1.0), 0.5);
        close(s.lr(99, 100, 1.0), 0.05);
        close(s.lr(100, 100, 1.0), 0.0);
    }

    #[test]
    fn default_decay_is_the_last_tenth() {
        let s = scheduler("").unwrap();
        assert_eq!((s.lr(0, 50, 1.0), s.lr(44, 50, 1.0), s.lr(45, 50, 1.0)), (1.0, 1.0, 1.0));
        close(s.lr(47, 50, 1.0), 0.6);
    }

    #[test]
    fn cosine_and_sqrt_shapes_with_a_floor() {
        let s = scheduler("decay_ratio = 0.5\ndecay_shape = \"cosine\"\nmin_ratio = 0.2").unwrap();
        close(s.lr(75, 100, 1.0), 0.2 + 0.8 * 0.5);
        close(s.lr(100, 100, 1.0), 0.2);
        let s = scheduler("decay_ratio = 0.5\ndecay_shape = \"sqrt\"").unwrap();
        close(s.lr(50, 100, 1.0), 1.0);
        close(s.lr(75, 100, 1.0), 1.0 - 0.5f64.sqrt());
        close(s.lr(100, 100, 1.0), 0.0);
    }

    #[test]
    fn warmup_into_the_decay_starts_it_later() {
        let s = scheduler("warmup_steps = 95\ndecay_ratio = 0.1").unwrap();
        assert_eq!((s.lr(94, 100, 1.0), s.lr(95, 100, 1.0)), (94.0 / 95.0, 1.0));
        close(s.lr(96, 100, 1.0), 0.8);
    }

    #[test]
    fn rejects_bad_configuration() {
        assert!(scheduler("decay_shape = \"step\"")
            .err()
            .unwrap()
            .starts_with("decay_shape = \"step\" is not a shape"));
        assert!(scheduler("decay_ratio = 2.0").err().unwrap().starts_with("decay_ratio = 2 is out of range"));
        assert!(scheduler("warmup_ratio = 0.5\ndecay_ratio = 0.6").err().unwrap().contains("make their sum at most 1"));
    }
}
