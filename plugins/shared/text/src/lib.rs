//! What the text filters (`minhash-dedup`, `decontaminate`, `quality`, `language`, `pii`, `regex`) share:
//! words and their hashes (lowercased on the fly, no allocation per word), word n-gram hashes, a set keyed by
//! hashes that are already hashes, a seeded generator, and the `roles` option that picks which turns count.
use lorahost_sdk::{Example, Turn};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x100_0000_01b3;

/// The splitmix64 finalizer: spreads every input bit over the whole output, so FNV's weak low bits do not
/// decide a hash table's buckets or a MinHash minimum.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over bytes, mixed.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    mix(bytes.iter().fold(FNV_OFFSET, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME)))
}

/// Words: maximal runs of letters and digits, so punctuation and spacing never hide an overlap.
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty())
}

/// The hash of a word, lowercased: "The" and "the" hash alike.
pub fn word_hash(word: &str) -> u64 {
    let mut h = FNV_OFFSET;
    let mut feed = |b: u8| h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
    for c in word.chars() {
        if c.is_ascii() {
            feed(c.to_ascii_lowercase() as u8);
        } else {
            let mut buf = [0u8; 4];
            for l in c.to_lowercase() {
                l.encode_utf8(&mut buf).bytes().for_each(&mut feed);
            }
        }
    }
    mix(h)
}

/// Appends the hash of every word of `text` to `out`.
pub fn word_hashes(text: &str, out: &mut Vec<u64>) {
    out.extend(words(text).map(word_hash));
}

/// Appends the hash of every window of `n` consecutive items to `out`; a sequence shorter than `n` (but not
/// empty) gives one hash of all of it, so short texts still have a fingerprint.
pub fn ngram_hashes(items: &[u64], n: usize, out: &mut Vec<u64>) {
    let gram = |g: &[u64]| mix(g.iter().fold(FNV_OFFSET, |h, &w| (h ^ w).wrapping_mul(FNV_PRIME)));
    if items.len() < n {
        if !items.is_empty() {
            out.push(gram(items));
        }
        return;
    }
    out.extend(items.windows(n).map(gram));
}

/// A `Hasher` for keys that are already well-mixed 64-bit hashes: it passes them through.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are meant; anything else still hashes correctly, just slower.
        self.0 ^= hash_bytes(bytes);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub type KeySet = HashSet<u64, BuildHasherDefault<KeyHasher>>;
pub type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

/// splitmix64: a seeded stream of 64-bit values. Filters that need randomness (MinHash permutations) take a
/// `seed` option, so the same options give the same verdicts on every machine.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// The `roles` option: which turns a filter reads (all of them when absent).
#[derive(Debug, Clone, Default)]
pub struct Roles(Option<Vec<String>>);

impl Roles {
    /// Checks a `roles` list: known role names, not empty.
    pub fn new(list: Option<Vec<String>>) -> Result<Roles, String> {
        if let Some(list) = &list {
            if list.is_empty() {
                return Err("roles = [] selects no turn; leave it out to read every turn".into());
            }
            if let Some(bad) = list.iter().find(|r| !ROLES.contains(&r.as_str())) {
                return Err(format!("roles: {bad:?} is not a role; use \"system\", \"user\" or \"assistant\""));
            }
        }
        Ok(Roles(list))
    }

    pub fn reads(&self, role: &str) -> bool {
        self.0.as_ref().is_none_or(|l| l.iter().any(|r| r == role))
    }

    /// The turns of `example` these roles select, in order.
    pub fn turns<'a>(&'a self, example: &'a Example) -> impl Iterator<Item = &'a Turn> + 'a {
        example.turns.iter().filter(|t| self.reads(&t.role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_ignore_case_and_punctuation() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        word_hashes("The cat, sat!", &mut a);
        word_hashes("the  CAT sat", &mut b);
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        assert_eq!(word_hash("Ärger"), word_hash("ärger"));
        assert_ne!(word_hash("cat"), word_hash("cab"));
    }

    #[test]
    fn ngrams_are_windows_and_short_texts_get_one() {
        let items = [1, 2, 3, 4];
        let mut out = Vec::new();
        ngram_hashes(&items, 2, &mut out);
        assert_eq!(out.len(), 3);
        let mut again = Vec::new();
        ngram_hashes(&items[1..3], 2, &mut again);
        assert_eq!(again[0], out[1]);
        let mut short = Vec::new();
        ngram_hashes(&items, 5, &mut short);
        assert_eq!(short.len(), 1);
        let mut none = Vec::new();
        ngram_hashes(&[], 5, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn roles_check_their_names() {
        assert!(Roles::new(None).unwrap().reads("system"));
        let r = Roles::new(Some(vec!["assistant".into()])).unwrap();
        assert!(r.reads("assistant") && !r.reads("user"));
        assert!(Roles::new(Some(vec!["bot".into()])).unwrap_err().contains("\"bot\" is not a role"));
        assert!(Roles::new(Some(vec![])).is_err());
    }

    #[test]
    fn splitmix_is_seeded() {
        let (mut a, mut b, mut c) = (SplitMix64(1), SplitMix64(1), SplitMix64(2));
        let x = a.next_u64();
        assert_eq!(x, b.next_u64());
        assert_ne!(x, c.next_u64());
    }
}
