//! The random numbers of lorahost, written out here (rather than taken from a crate whose stream may change
//! between versions) because the token stream and the loss curve must be the same for the same seed on every
//! machine, forever. Two generators, each for its own job, and counter-based values:
//! - [`Rng`], xoshiro256++ seeded through splitmix64: the data pipeline's shuffles and samples (one stream per
//!   named purpose, [`Rng::derive`]).
//! - [`SplitMix`], SplitMix64: the model's (weight and LoRA init, dropout seeds, sampling); one u64 of state.
//! - [`stream_key`] / [`uniform_at`] / [`dropout_uniform`]: the value for element `i` of stream `key` depends only
//!   on `(key, i)`.
//!   Dropout masks use them, so a mask is regenerated exactly when a layer is recomputed during backward, and
//!   the GPU kernel produces the same mask with the same formula.

/// The SplitMix64 finaliser: a bijective 64-bit mix with good avalanche (the counter-based streams below build
/// on it too).
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: turns any u64 into a well-mixed one; used for seeding and for hashing labels into seeds.
pub fn splitmix64(x: u64) -> u64 {
    mix(x.wrapping_add(0x9E37_79B9_7F4A_7C15))
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            x = splitmix64(x);
            *v = x;
        }
        Rng { s }
    }

    /// An independent stream for a named purpose ("mix/lima", "dropout"): changing one stage's use of
    /// randomness does not shift any other stage's.
    pub fn derive(seed: u64, label: &str) -> Rng {
        // FNV-1a over the label, then mixed with the seed.
        let h = label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Rng::new(splitmix64(seed) ^ h)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n) without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `k` distinct indices of `0..n`, in increasing order (a seeded sample without replacement).
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Vec<usize> {
        let k = k.min(n);
        let mut idx: Vec<usize> = (0..n).collect();
        // Partial Fisher-Yates: the first k slots become the sample.
        for i in 0..k {
            let j = i + self.below((n - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx.sort_unstable();
        idx
    }
}

// ---------------------------------------------------------------------------------------------------------
// Counter-based streams and the model's sequential generator.

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// A key for an independent stream derived from a seed and a few small integers (e.g. layer, module).
pub fn stream_key(seed: u64, parts: &[u64]) -> u64 {
    let mut k = mix(seed ^ GOLDEN);
    for &p in parts {
        k = mix(k ^ mix(p.wrapping_add(GOLDEN)));
    }
    k
}

/// A uniform number in [0, 1) with 24 bits (exact in f32) for element `i` of stream `key`.
#[inline]
pub fn uniform_at(key: u64, i: u64) -> f32 {
    let bits = mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)));
    (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// The dropout draw of element `i` of stream `key`: a uniform number in [0, 1) with 16 bits (exact in f32).
/// One hash serves four consecutive elements (`i / 4`), 16 bits each, the highest for the first: the GPU
/// kernels hash once per four elements, which is what keeps dropout at the memory's speed rather than the
/// integer units' (a hash per element cost more than reading and writing the tensor). p is thereby resolved
/// to 1/65536 (0.1 drops 6554/65536 = 0.100006). (Builds before 2026-11-29 hashed each element: a run with
/// dropout resumed across that change draws other masks from the resume on.)
#[inline]
pub fn dropout_uniform(key: u64, i: u64) -> f32 {
    let bits = mix(key.wrapping_add((i / 4).wrapping_add(1).wrapping_mul(GOLDEN)));
    ((bits >> (48 - 16 * (i % 4))) & 0xFFFF) as f32 * (1.0 / 65536.0)
}

/// SplitMix64: one u64 of state, so it is trivially saved in a checkpoint. The model's generator: weight and
/// LoRA init, each step's dropout seed, sampling in `generate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix {
    state: u64,
}

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix { state: seed }
    }

    /// A generator for the stream `(seed, parts...)`, independent of other streams.
    pub fn for_stream(seed: u64, parts: &[u64]) -> Self {
        SplitMix { state: stream_key(seed, parts) }
    }

    /// The whole state (to save); `SplitMix::new(state)` restores it.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box-Muller (one value per call; simple over fast).
    pub fn normal(&mut self) -> f64 {
        // 1 - u is in (0, 1], so the log is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_fixed_forever() {
        // Pinned values (computed independently from the xoshiro256++ and splitmix64 definitions): if these
        // change, every manifest's token stream changes.
        let mut r = Rng::new(42);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(first, vec![14364114511653964483, 5454468825661541484, 330174794094209790]);
        assert_ne!(Rng::derive(42, "a").next_u64(), Rng::derive(42, "b").next_u64());
    }

    #[test]
    fn below_is_in_range_and_sample_is_distinct() {
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(7) < 7));
        let s = r.sample_indices(100, 30);
        assert_eq!(s.len(), 30);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(r.sample_indices(5, 10), vec![0, 1, 2, 3, 4]);
    }
}
