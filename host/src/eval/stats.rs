//! The numbers around a score: its standard error, and whether a difference between two runs is larger
//! than its own (paired bootstrap).
use crate::rng::Rng;

/// Mean and standard error of the mean (sample standard deviation / sqrt(n), as lm-evaluation-harness
/// reports). 0 for fewer than two values.
pub fn mean_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// Resamples in [`paired_bootstrap`].
pub const BOOTSTRAP_RESAMPLES: usize = 1000;

/// The standard error of mean(b - a) over paired scores, by `BOOTSTRAP_RESAMPLES` seeded resamples of the
/// pairs: the spread of the difference the same records would give on another draw of them.
pub fn paired_bootstrap(a: &[f64], b: &[f64], seed: u64) -> f64 {
    assert_eq!(a.len(), b.len(), "paired scores");
    let n = a.len();
    if n < 2 {
        return 0.0;
    }
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let mut rng = Rng::new(seed);
    let means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| (0..n).map(|_| diffs[rng.below(n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    let m = means.iter().sum::<f64>() / means.len() as f64;
    (means.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (means.len() - 1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_and_bootstrap() {
        let (m, se) = mean_stderr(&[1.0, 0.0, 1.0, 0.0]);
        assert_eq!(m, 0.5);
        // sample sd = sqrt(1/3), / sqrt(4)
        assert!((se - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(mean_stderr(&[0.7]), (0.7, 0.0));
        // Identical runs: no spread. A constant shift: no spread either.
        let a = [1.0, 0.0, 1.0, 1.0, 0.0];
        assert_eq!(paired_bootstrap(&a, &a, 1), 0.0);
        assert!(paired_bootstrap(&a, &a.map(|x| x + 0.5), 1) < 1e-12);
        // Seeded: the same number every time; near the analytic stderr of the paired differences.
        let b = [0.0, 0.0, 1.0, 1.0, 1.0];
        assert_eq!(paired_bootstrap(&a, &b, 7), paired_bootstrap(&a, &b, 7));
        let diffs: Vec<f64> = a.iter().zip(&b).map(|(x, y)| y - x).collect();
        let analytic = mean_stderr(&diffs).1 * ((diffs.len() - 1) as f64 / diffs.len() as f64).sqrt();
        assert!((paired_bootstrap(&a, &b, 7) - analytic).abs() < 0.1 * analytic, "{}", analytic);
    }
}
