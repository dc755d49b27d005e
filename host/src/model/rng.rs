//! Small, self-contained random numbers: reproducible bit for bit across machines and crate versions.
//!
//! - [`Rng`] is SplitMix64: a sequential generator for weight init, LoRA init and sampling.
//! - [`mix`] / [`stream_key`] / [`uniform_at`] are counter-based: the value for element `i` of stream `key`
//!   depends only on `(key, i)`. Dropout masks use them, so a mask can be regenerated exactly when a layer
//!   is recomputed during backward, and a GPU kernel can later produce the same mask with the same formula.

pub use crate::rng::mix;

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

/// SplitMix64: one u64 of state, so it is trivially saved in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// A generator for the stream `(seed, parts...)`, independent of other streams.
    pub fn for_stream(seed: u64, parts: &[u64]) -> Self {
        Rng { state: stream_key(seed, parts) }
    }

    /// The whole state (to save); `Rng::new(state)` restores it.
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
