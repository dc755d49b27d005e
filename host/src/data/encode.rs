//! Stages 4-5: template segments become token ids and a loss mask, truncated to the cutoff.
//!
//! Each segment is tokenized on its own and the ids concatenated, as the 2023 recipe did; a segment's
//! `trained` flag marks its tokens for the loss. Segments group into prompt/answer pairs (untrained
//! segments, then trained ones), and truncation works per pair:
//! - `proportional` (LLaMA-Efficient-Tuning >= 0.2.1, the recipe): each pair keeps
//!   `floor(cutoff * len/total)` of its prompt and of its answer, then the whole is cut at the cutoff;
//! - `halves` (its 0.2.0, "512/512"): prompt and answer each keep at most cutoff/2, and pairs stop being
//!   added once the next would overflow.
//!
//! The end-of-sequence token is part of the answer, so a long answer can lose it, as in the original.
use crate::manifest::Truncation;
use crate::plugins::{Example, Segment, WasmTemplate};
use crate::tokenizer::Tokenizer;
use rayon::prelude::*;
use std::sync::Mutex;

/// One record as tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// Whether truncation removed anything.
    pub truncated: bool,
}

/// Tokenizes `segments`, each on its own; a special segment must name a special token of the tokenizer.
pub fn tokenize_segments(tok: &dyn Tokenizer, segments: &[Segment]) -> Result<Vec<(Vec<u32>, bool)>, String> {
    segments
        .iter()
        .map(|s| {
            if s.special {
                let id = tok.special_id(&s.text).ok_or_else(|| {
                    format!("the template asks for special token `{}`, which this tokenizer does not have", s.text)
                })?;
                Ok((vec![id], s.trained))
            } else {
                let mut ids = Vec::new();
                tok.encode_ordinary(&s.text, &mut ids);
                Ok((ids, s.trained))
            }
        })
        .collect()
}

/// Groups tokenized segments into (prompt ids, answer ids) pairs.
fn pairs(pieces: Vec<(Vec<u32>, bool)>) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut out: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    for (ids, trained) in pieces {
        // An untrained piece after an answer starts the next pair.
        let starts_pair = match out.last() {
            None => true,
            Some((_, answer)) => !trained && !answer.is_empty(),
        };
        if starts_pair {
            out.push((Vec::new(), Vec::new()));
        }
        let (prompt, answer) = out.last_mut().expect("pushed above");
        if trained {
            answer.extend(ids);
        } else {
            prompt.extend(ids);
        }
    }
    out
}

/// Concatenates the pairs under `cutoff` tokens by the chosen policy.
pub fn truncate(pieces: Vec<(Vec<u32>, bool)>, cutoff: usize, policy: Truncation) -> Encoded {
    let mut enc = Encoded { ids: Vec::new(), trained: Vec::new(), truncated: false };
    for (mut prompt, mut answer) in pairs(pieces) {
        let (keep_p, keep_a) = match policy {
            Truncation::Proportional => {
                let total = prompt.len() + answer.len();
                if total == 0 {
                    continue;
                }
                (cutoff * prompt.len() / total, cutoff * answer.len() / total)
            }
            Truncation::Halves => (cutoff / 2, cutoff / 2),
        };
        if prompt.len() > keep_p || answer.len() > keep_a {
            enc.truncated = true;
            prompt.truncate(keep_p);
            answer.truncate(keep_a);
        }
        if policy == Truncation::Halves && enc.ids.len() + prompt.len() + answer.len() > cutoff {
            enc.truncated = true;
            break;
        }
        enc.trained.extend(std::iter::repeat_n(false, prompt.len()));
        enc.trained.extend(std::iter::repeat_n(true, answer.len()));
        enc.ids.extend(prompt);
        enc.ids.extend(answer);
    }
    if enc.ids.len() > cutoff {
        enc.truncated = true;
        enc.ids.truncate(cutoff);
        enc.trained.truncate(cutoff);
    }
    enc
}

/// Records rendered and tokenized per parallel task (fewer when they are long).
const ENCODE_CHUNK: usize = 256;

/// Renders and tokenizes `needed` records in parallel; template instances are pooled, one per worker.
pub fn encode_records(
    plan: &super::Plan,
    pools: &[Vec<Example>],
    needed: &[(u16, u32)],
) -> anyhow::Result<Vec<Result<Encoded, String>>> {
    let m = plan.manifest;
    let templates: Mutex<Vec<WasmTemplate>> = Mutex::new(vec![plan.template()?]);
    let tok = plan.tokenizer.as_ref();
    let record = |&(d, r): &(u16, u32)| &pools[d as usize][r as usize];
    let ranges = super::read::byte_batches(needed.iter().map(|k| super::read::record_bytes(record(k))), ENCODE_CHUNK);
    let chunks: Vec<Vec<Result<Encoded, String>>> = ranges
        .into_par_iter()
        .map(|range| -> anyhow::Result<_> {
            let chunk = &needed[range];
            let popped = templates.lock().unwrap().pop();
            let mut template = match popped {
                Some(t) => t,
                None => plan.template()?,
            };
            let batch: Vec<Example> = chunk.iter().map(|k| record(k).clone()).collect();
            let rendered = template.render_batch(&batch);
            templates.lock().unwrap().push(template);
            let rendered = rendered?;
            rendered
                .into_iter()
                .map(|r| match r {
                    // The template rejected this record: counted by reason, not fatal.
                    Err(reason) => Ok(Err(reason)),
                    Ok(segments) => {
                        let pieces = tokenize_segments(tok, &segments).map_err(anyhow::Error::msg)?;
                        Ok(Ok(truncate(pieces, m.train.max_seq_len, m.train.truncation)))
                    }
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(chunks.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: usize, start: u32, trained: bool) -> (Vec<u32>, bool) {
        ((start..start + n as u32).collect(), trained)
    }

    #[test]
    fn short_sequences_are_untouched() {
        let e = truncate(vec![p(3, 0, false), p(2, 10, true)], 16, Truncation::Proportional);
        assert_eq!(e.ids, vec![0, 1, 2, 10, 11]);
        assert_eq!(e.trained, vec![false, false, false, true, true]);
        assert!(!e.truncated);
    }

    #[test]
    fn proportional_keeps_shares() {
        // 30 prompt + 10 answer into 20: floor(20*30/40)=15 and floor(20*10/40)=5.
        let e = truncate(vec![p(30, 0, false), p(10, 100, true)], 20, Truncation::Proportional);
        assert_eq!(e.ids.len(), 20);
        assert_eq!(&e.ids[..15], &(0..15).collect::<Vec<u32>>()[..]);
        assert_eq!(&e.ids[15..], &[100, 101, 102, 103, 104]);
        assert!(e.truncated);
    }

    #[test]
    fn halves_cap_each_side_and_stop_adding_pairs() {
        let e = truncate(vec![p(30, 0, false), p(3, 100, true), p(2, 200, false), p(9, 300, true)], 20, Truncation::Halves);
        // First pair: prompt 10 (capped) + answer 3 = 13; second pair 2 + 9 = 11 would overflow 20.
        assert_eq!(e.ids.len(), 13);
        assert!(e.truncated);
    }

    #[test]
    fn multi_turn_pairs_follow_segment_flags() {
        let e = truncate(
            vec![p(2, 0, false), p(1, 5, false), p(2, 10, true), p(1, 20, true), p(2, 30, false), p(1, 40, true)],
            100,
            Truncation::Proportional,
        );
        assert_eq!(e.ids, vec![0, 1, 5, 10, 11, 20, 30, 31, 40]);
        assert_eq!(e.trained, vec![false, false, false, true, true, true, false, false, true]);
    }
}
