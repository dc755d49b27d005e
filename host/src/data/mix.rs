//! Stage 3: the mix. Per dataset: `repeat` copies, then a seeded `fraction`/`count` sample; then all
//! datasets in manifest order, a global `fraction`, a seeded shuffle, and the eval hold-out.
//!
//! Every random choice draws from its own stream (`Rng::derive(seed, "mix/<dataset>")`), so changing one
//! dataset's sampling does not reshuffle another's.
use crate::manifest::{Dataset, Mix};
use crate::rng::Rng;

/// How many of `n` a fraction keeps: rounded to nearest, at least one when n > 0.
pub fn fraction_count(n: usize, fraction: f64) -> usize {
    if n == 0 {
        return 0;
    }
    ((n as f64 * fraction).round() as usize).clamp(1, n)
}

/// Indices (into the dataset's kept records) after repeat and down-sampling, in a stable order.
pub fn sample_dataset(n: usize, dataset: &Dataset, seed: u64) -> Vec<usize> {
    let repeated: Vec<usize> = (0..dataset.repeat as usize).flat_map(|_| 0..n).collect();
    let k = match (dataset.fraction, dataset.count) {
        (Some(f), _) => fraction_count(repeated.len(), f),
        (None, Some(c)) => c.min(repeated.len()),
        (None, None) => return repeated,
    };
    let mut rng = Rng::derive(seed, &format!("mix/{}", dataset.name));
    rng.sample_indices(repeated.len(), k).into_iter().map(|i| repeated[i]).collect()
}

/// Applies the global fraction and shuffle to the concatenated sample; returns positions into it.
pub fn mix_all(total: usize, mix: &Mix, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = if mix.fraction < 1.0 {
        Rng::derive(seed, "mix/global").sample_indices(total, fraction_count(total, mix.fraction))
    } else {
        (0..total).collect()
    };
    if mix.shuffle {
        Rng::derive(seed, "mix/shuffle").shuffle(&mut order);
    }
    order
}

/// Size of the eval hold-out: `eval_count`, else `eval_fraction` of the mix (none when both are unset).
pub fn eval_size(total: usize, eval_fraction: f64, eval_count: Option<usize>) -> usize {
    match eval_count {
        Some(c) => c.min(total.saturating_sub(1)),
        None if eval_fraction > 0.0 => fraction_count(total, eval_fraction).min(total.saturating_sub(1)),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(repeat: u32, fraction: Option<f64>, count: Option<usize>) -> Dataset {
        let source = toml::from_str("plugin = \"jsonl\"").unwrap();
        Dataset { name: "d".into(), source, filters: vec![], repeat, fraction, count, on_malformed: Default::default(), budget: Default::default() }
    }

    #[test]
    fn repeat_then_sample_gives_exact_counts() {
        assert_eq!(sample_dataset(10, &dataset(3, None, None), 1).len(), 30);
        assert_eq!(sample_dataset(10, &dataset(17, Some(0.1), None), 1).len(), 17);
        assert_eq!(sample_dataset(10, &dataset(1, None, Some(4)), 1).len(), 4);
        // Same seed, same sample; another seed, another.
        let a = sample_dataset(1000, &dataset(1, Some(0.5), None), 1);
        assert_eq!(a, sample_dataset(1000, &dataset(1, Some(0.5), None), 1));
        assert_ne!(a, sample_dataset(1000, &dataset(1, Some(0.5), None), 2));
    }

    #[test]
    fn global_fraction_and_eval() {
        let m = Mix { fraction: 0.67, shuffle: true };
        let order = mix_all(1000, &m, 7);
        assert_eq!(order.len(), 670);
        let mut sorted = order.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 670);
        assert_eq!(eval_size(670, 0.1, None), 67);
        assert_eq!(eval_size(670, 0.0, Some(5)), 5);
        assert_eq!(eval_size(1, 0.5, None), 0);
    }
}
