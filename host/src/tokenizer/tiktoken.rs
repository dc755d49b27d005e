//! Qwen (v1)'s byte-level BPE, straight from `qwen.tiktoken` (lines `base64(bytes) rank`, rank = id).
//!
//! Encoding follows tiktoken: NFC, split with Qwen's pattern ([`super::split`]), then for each piece either its
//! own id (when the whole piece is a token) or BPE that repeatedly merges the adjacent pair whose concatenation
//! has the lowest rank (leftmost on ties). A per-thread cache keeps the ids of recent multi-token pieces.
use super::split::Splitter;
use super::{nfc, qwen_special_names, sha256_hex, Tokenizer};
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Pieces up to this many bytes use tiktoken's quadratic scan; longer ones a heap (same result, n log n).
const SCAN_MAX: usize = 128;
/// The per-thread cache is emptied when it holds this many pieces, or this many ids.
const CACHE_MAX_PIECES: usize = 1 << 15;
const CACHE_MAX_IDS: usize = 1 << 20;
/// Scratch buffers grown past this many entries (by a very long piece) are freed after the call.
const SCRATCH_KEEP: usize = 1 << 16;
/// Pieces longer than this are not cached.
const CACHE_MAX_PIECE_LEN: usize = 256;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// Qwen (v1)'s tokenizer from its tiktoken ranks file.
pub struct QwenTiktoken {
    /// token bytes -> rank (= id)
    ranks: FxHashMap<Box<[u8]>, u32>,
    /// rank of each single byte
    byte_ranks: [u32; 256],
    /// id -> bytes: `bytes[offsets[id]..offsets[id + 1]]`
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// Special tokens (names and ids), ids from `n_ranks` on.
    specials: Vec<String>,
    special_ids: FxHashMap<String, u32>,
    digest: String,
    /// Identifies this instance to the per-thread piece cache.
    instance: u64,
}

/// Per-thread state: the ids of recent multi-token pieces (of one instance), and BPE scratch buffers.
#[derive(Default)]
struct PieceCache {
    instance: u64,
    /// piece -> (start, len) in `ids`
    map: FxHashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
    scratch: Scratch,
}

thread_local! {
    static CACHE: RefCell<PieceCache> = RefCell::new(PieceCache::default());
}

/// Scratch space for the merge loops.
#[derive(Default)]
struct Scratch {
    /// (start offset in the piece, rank of this part merged with the next, id of this part)
    parts: Vec<(u32, u32, u32)>,
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
    /// Linked list of parts for the heap path, indexed by a part's start offset: start of the next part,
    /// start of the previous part (u32::MAX for none), id of the part, whether a part starts there.
    next: Vec<u32>,
    prev: Vec<u32>,
    tok: Vec<u32>,
    alive: Vec<bool>,
}

impl QwenTiktoken {
    /// Loads a `*.tiktoken` ranks file; Qwen's 208 special tokens get the ids after the last rank.
    pub fn from_file(path: &Path) -> Result<QwenTiktoken> {
        let data = std::fs::read(path).with_context(|| format!("cannot read tokenizer file {}", path.display()))?;
        QwenTiktoken::from_bytes(&data).with_context(|| format!("invalid tiktoken file {}", path.display()))
    }

    /// Parses the contents of a `*.tiktoken` ranks file (see [`QwenTiktoken::from_file`]).
    pub fn from_bytes(data: &[u8]) -> Result<QwenTiktoken> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut by_rank: Vec<Option<Box<[u8]>>> = Vec::new();
        let mut ranks: FxHashMap<Box<[u8]>, u32> = FxHashMap::default();
        ranks.reserve(160_000);
        let mut buf = Vec::new();
        for (n, line) in data.split(|&b| b == b'\n').enumerate() {
            let line_no = n + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let text = std::str::from_utf8(line).map_err(|_| anyhow::anyhow!("line {line_no}: not UTF-8 text"))?;
            let mut fields = text.split(' ');
            let (Some(tok), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
                bail!("line {line_no}: expected `<base64 token> <rank>`, found {:?}", truncate(text));
            };
            buf.clear();
            b64.decode_vec(tok, &mut buf)
                .map_err(|e| anyhow::anyhow!("line {line_no}: invalid base64 token {:?}: {e}", truncate(tok)))?;
            if buf.is_empty() {
                bail!("line {line_no}: empty token");
            }
            let rank: u32 = rank
                .parse()
                .ok()
                .filter(|&r| r < u32::MAX / 2)
                .ok_or_else(|| anyhow::anyhow!("line {line_no}: invalid rank {:?}", truncate(rank)))?;
            let r = rank as usize;
            if r >= by_rank.len() {
                by_rank.resize(r + 1, None);
            }
            if by_rank[r].is_some() {
                bail!("line {line_no}: rank {rank} appears twice");
            }
            let token: Box<[u8]> = buf.as_slice().into();
            if let Some(prev) = ranks.insert(token.clone(), rank) {
                bail!(
                    "line {line_no}: token {:?} appears twice (ranks {prev} and {rank})",
                    String::from_utf8_lossy(&buf)
                );
            }
            by_rank[r] = Some(token);
        }
        if by_rank.is_empty() {
            bail!("no tokens");
        }
        if let Some(missing) = by_rank.iter().position(|t| t.is_none()) {
            bail!("ranks are not contiguous: rank {missing} is missing (ranks run up to {})", by_rank.len() - 1);
        }
        let mut byte_ranks = [0u32; 256];
        for b in 0..=255u8 {
            byte_ranks[b as usize] =
                *ranks.get(&[b][..]).with_context(|| format!("byte 0x{b:02x} has no token of its own"))?;
        }
        let n_ranks = by_rank.len();
        let mut bytes = Vec::with_capacity(data.len());
        let mut offsets = Vec::with_capacity(n_ranks + 1);
        offsets.push(0u32);
        for t in &by_rank {
            bytes.extend_from_slice(t.as_deref().unwrap());
            offsets.push(u32::try_from(bytes.len()).context("vocabulary too large")?);
        }
        let specials = qwen_special_names();
        let special_ids = specials.iter().enumerate().map(|(i, s)| (s.clone(), (n_ranks + i) as u32)).collect();
        Ok(QwenTiktoken {
            ranks,
            byte_ranks,
            bytes,
            offsets,
            specials,
            special_ids,
            digest: sha256_hex(data),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        })
    }

    fn n_ranks(&self) -> usize {
        self.offsets.len() - 1
    }

    #[inline]
    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes).copied().unwrap_or(u32::MAX)
    }

    /// Appends the ids of one piece that is not a token itself (at least 2 bytes).
    fn bpe(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if piece.len() <= SCAN_MAX {
            self.bpe_scan(piece, scratch, out)
        } else {
            self.bpe_heap(piece, scratch, out)
        }
    }

    /// tiktoken's merge loop: find the lowest-ranked adjacent pair (leftmost on ties), merge, repeat.
    fn bpe_scan(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let parts = &mut scratch.parts;
        parts.clear();
        let n = piece.len();
        for i in 0..n {
            let pair = if i + 1 < n { self.rank(&piece[i..i + 2]) } else { u32::MAX };
            parts.push((i as u32, pair, self.byte_ranks[piece[i] as usize]));
        }
        parts.push((n as u32, u32::MAX, u32::MAX)); // sentinel: end of the last part
        loop {
            // parts has len - 1 real parts; find the min pair rank among all but the last real part.
            let mut min = (u32::MAX, 0usize);
            for (i, p) in parts[..parts.len() - 1].iter().enumerate() {
                if p.1 < min.0 {
                    min = (p.1, i);
                }
            }
            let (rank, i) = min;
            if rank == u32::MAX {
                break;
            }
            parts[i].2 = rank;
            parts.remove(i + 1);
            // Now parts[i] spans [parts[i].0, parts[i+1].0).
            let real = parts.len() - 1;
            parts[i].1 =
                if i + 1 < real { self.rank(&piece[parts[i].0 as usize..parts[i + 2].0 as usize]) } else { u32::MAX };
            if i > 0 {
                parts[i - 1].1 = self.rank(&piece[parts[i - 1].0 as usize..parts[i + 1].0 as usize]);
            }
        }
        out.extend(parts[..parts.len() - 1].iter().map(|p| p.2));
    }

    /// The same merges as [`Self::bpe_scan`], with a heap of (rank, start, end) pairs over a linked list.
    fn bpe_heap(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let n = piece.len();
        let Scratch { heap, next, prev, tok, alive, .. } = scratch;
        heap.clear();
        next.clear();
        prev.clear();
        tok.clear();
        alive.clear();
        for i in 0..n {
            next.push(i as u32 + 1);
            prev.push(if i == 0 { u32::MAX } else { i as u32 - 1 });
            tok.push(self.byte_ranks[piece[i] as usize]);
            alive.push(true);
            if i + 1 < n {
                let r = self.rank(&piece[i..i + 2]);
                if r != u32::MAX {
                    heap.push(Reverse((r, i as u32, i as u32 + 2)));
                }
            }
        }
        let end_of = |next: &Vec<u32>, k: u32| -> u32 {
            // end of the part after part k (k's next must exist)
            let m = next[k as usize];
            if m as usize >= n {
                u32::MAX
            } else {
                next[m as usize]
            }
        };
        while let Some(Reverse((rank, k, end))) = heap.pop() {
            let ku = k as usize;
            if !alive[ku] || next[ku] as usize >= n || end_of(next, k) != end {
                continue; // stale
            }
            // Merge part k with its next part m.
            let m = next[ku] as usize;
            alive[m] = false;
            tok[ku] = rank;
            next[ku] = next[m];
            if (next[ku] as usize) < n {
                prev[next[ku] as usize] = k;
            }
            // New pair (k, next).
            if (next[ku] as usize) < n {
                let e = end_of(next, k);
                let r = self.rank(&piece[ku..e as usize]);
                if r != u32::MAX {
                    heap.push(Reverse((r, k, e)));
                }
            }
            // New pair (prev, k).
            let p = prev[ku];
            if p != u32::MAX {
                let e = next[ku];
                let r = self.rank(&piece[p as usize..e as usize]);
                if r != u32::MAX {
                    heap.push(Reverse((r, p, e)));
                }
            }
        }
        let mut k = 0usize;
        while k < n {
            out.push(tok[k]);
            k = next[k] as usize;
        }
    }

    fn encode_nfc(&self, text: &str, out: &mut Vec<u32>) {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            let PieceCache { instance, map, ids, scratch } = &mut *cache;
            if *instance != self.instance {
                *instance = self.instance;
                map.clear();
                ids.clear();
            }
            Splitter::new(text).for_each(|piece| {
                if piece.len() == 1 {
                    out.push(self.byte_ranks[piece[0] as usize]);
                    return;
                }
                if let Some(&id) = self.ranks.get(piece) {
                    out.push(id);
                    return;
                }
                if let Some(&(start, len)) = map.get(piece) {
                    out.extend_from_slice(&ids[start as usize..(start + len) as usize]);
                    return;
                }
                let before = out.len();
                self.bpe(piece, scratch, out);
                if piece.len() <= CACHE_MAX_PIECE_LEN {
                    if map.len() >= CACHE_MAX_PIECES || ids.len() >= CACHE_MAX_IDS {
                        map.clear();
                        ids.clear();
                    }
                    let start = ids.len() as u32;
                    ids.extend_from_slice(&out[before..]);
                    map.insert(piece.into(), (start, (out.len() - before) as u32));
                }
            });
            if scratch.next.capacity() > SCRATCH_KEEP || scratch.parts.capacity() > SCRATCH_KEEP {
                *scratch = Scratch::default();
            }
        });
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Tokenizer for QwenTiktoken {
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) {
        let text = nfc(text);
        self.encode_nfc(&text, out)
    }

    fn special_id(&self, name: &str) -> Option<u32> {
        self.special_ids.get(name).copied()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let n = self.n_ranks();
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let i = id as usize;
            if i < n {
                bytes.extend_from_slice(&self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]);
            } else if let Some(name) = self.specials.get(i - n) {
                bytes.extend_from_slice(name.as_bytes());
            } else {
                bytes.extend_from_slice("\u{FFFD}".as_bytes());
            }
        }
        String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    fn vocab_size(&self) -> usize {
        self.n_ranks() + self.specials.len()
    }

    fn digest(&self) -> &str {
        &self.digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: all bytes, plus a few merges, to compare the scan and heap merge loops.
    #[test]
    fn scan_and_heap_agree() {
        let mut lines = String::new();
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut rank = 0;
        for b in 0..=255u8 {
            lines.push_str(&format!("{} {rank}\n", b64.encode([b])));
            rank += 1;
        }
        for tok in ["aa", "ab", "ba", "aaaa", "abab", "aab", "bab", "aaaaaaaa", "bb", "abba"] {
            lines.push_str(&format!("{} {rank}\n", b64.encode(tok)));
            rank += 1;
        }
        let t = QwenTiktoken::from_bytes(lines.as_bytes()).unwrap();
        let mut seed = 12345u64;
        let mut scratch = Scratch::default();
        for len in 2..300 {
            let piece: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    if (seed >> 33).is_multiple_of(3) {
                        b'b'
                    } else {
                        b'a'
                    }
                })
                .collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            t.bpe_scan(&piece, &mut scratch, &mut a);
            t.bpe_heap(&piece, &mut scratch, &mut b);
            assert_eq!(a, b, "piece {:?}", String::from_utf8_lossy(&piece));
            assert_eq!(t.decode(&a).as_bytes(), &piece[..]);
        }
    }
}
