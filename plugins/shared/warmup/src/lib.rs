//! What the standard schedulers share: the linear warmup (`warmup_steps` or `warmup_ratio`) and checks of
//! fractions such as `min_ratio`.
//!
//! Warmup follows Hugging Face transformers' schedules: for `step < warmup` the rate is
//! `base * step / max(1, warmup)`, so the very first step has rate 0.

/// Warmup length, in steps or as a fraction of the run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    Steps(u64),
    Ratio(f64),
}

impl Warmup {
    /// From the manifest's `warmup_steps` and `warmup_ratio` (at most one; neither means no warmup).
    pub fn new(steps: Option<u64>, ratio: Option<f64>) -> Result<Warmup, String> {
        match (steps, ratio) {
            (Some(_), Some(_)) => Err("warmup_steps and warmup_ratio are both set; keep one of them".into()),
            (Some(steps), None) => Ok(Warmup::Steps(steps)),
            (None, Some(ratio)) => Ok(Warmup::Ratio(fraction("warmup_ratio", ratio)?)),
            (None, None) => Ok(Warmup::Steps(0)),
        }
    }

    /// Warmup steps in a run of `total` steps (a ratio is rounded up).
    pub fn steps(self, total: u64) -> u64 {
        match self {
            Warmup::Steps(steps) => steps,
            Warmup::Ratio(ratio) => ceil_fraction(ratio, total),
        }
    }

    /// The warmup factor at `step` (in `[0, 1)`), or `None` once warmup is over.
    pub fn factor(self, step: u64, total: u64) -> Option<f64> {
        let warmup = self.steps(total);
        (step < warmup).then(|| step as f64 / warmup.max(1) as f64)
    }
}

/// `ceil(ratio * total)`, except that a product within rounding error of a whole number counts as that
/// number (so 7% of 100 steps is 7, not the 8 that `0.07 * 100.0 = 7.000000000000001` would give).
pub fn ceil_fraction(ratio: f64, total: u64) -> u64 {
    let exact = ratio * total as f64;
    let nearest = exact.round();
    if (exact - nearest).abs() <= 1e-9 * nearest.max(1.0) {
        nearest as u64
    } else {
        exact.ceil() as u64
    }
}

/// Checks that the value of `key` lies in `[0, 1]`.
pub fn fraction(key: &str, value: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{key} = {value} is out of range; give a fraction between 0 and 1, e.g. 0.1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_linear_from_zero() {
        let w = Warmup::new(Some(4), None).unwrap();
        let factors: Vec<_> = (0..5).map(|s| w.factor(s, 100)).collect();
        assert_eq!(factors, [Some(0.0), Some(0.25), Some(0.5), Some(0.75), None]);
        assert_eq!(Warmup::new(None, None).unwrap().factor(0, 10), None);
    }

    #[test]
    fn ratio_rounds_up() {
        assert_eq!(Warmup::new(None, Some(0.07)).unwrap().steps(100), 7);
        assert_eq!(Warmup::new(None, Some(0.1)).unwrap().steps(95), 10);
        assert_eq!(Warmup::new(None, Some(0.0)).unwrap().steps(95), 0);
        assert_eq!(Warmup::new(None, Some(1.0)).unwrap().steps(95), 95);
    }

    #[test]
    fn bad_values() {
        assert!(Warmup::new(Some(1), Some(0.1)).unwrap_err().contains("both set"));
        assert_eq!(
            Warmup::new(None, Some(1.5)).unwrap_err(),
            "warmup_ratio = 1.5 is out of range; give a fraction between 0 and 1, e.g. 0.1"
        );
        assert!(fraction("min_ratio", f64::NAN).is_err());
    }
}
