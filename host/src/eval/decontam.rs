//! The decontamination report of `lorahost check`: which evaluation records share a 13-gram of words with
//! the training stream, so a mix can be cleaned before training (the n-gram test GPT-3 and the harness use).
//!
//! Words: lowercase runs of letters and digits. Memory is bounded by the evaluation side: its n-grams are
//! held in a set, the training stream is read record by record and only looked up.
use crate::plugins::Example;
use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Words per n-gram.
pub const N: usize = 13;

/// Hashes of a text's word 13-grams (none for a text of fewer than 13 words).
pub fn ngrams(text: &str) -> Vec<u64> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect();
    words
        .windows(N)
        .map(|w| {
            let mut h = DefaultHasher::new();
            w.hash(&mut h);
            h.finish()
        })
        .collect()
}

/// One task's line of the report.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TaskOverlap {
    pub task: String,
    pub records: usize,
    /// Ids of the records with a 13-gram in the training stream, in record order.
    pub contaminated: Vec<String>,
}

/// The text of an evaluation record that is checked: all its turns.
fn record_text(e: &Example) -> String {
    e.turns.iter().map(|t| t.content.as_str()).collect::<Vec<_>>().join("\n")
}

/// Which records of each task share a 13-gram with any of the `training` texts.
pub fn overlaps(tasks: &[(String, Vec<Example>)], training: impl Iterator<Item = String>) -> Vec<TaskOverlap> {
    let mut index: HashMap<u64, Vec<(usize, usize)>> = HashMap::new();
    for (t, (_, records)) in tasks.iter().enumerate() {
        for (r, e) in records.iter().enumerate() {
            for g in ngrams(&record_text(e)) {
                let owners = index.entry(g).or_default();
                if owners.last() != Some(&(t, r)) {
                    owners.push((t, r));
                }
            }
        }
    }
    let mut hit: HashSet<(usize, usize)> = HashSet::new();
    for text in training {
        for g in ngrams(&text) {
            if let Some(owners) = index.get(&g) {
                hit.extend(owners.iter().copied());
            }
        }
    }
    tasks
        .iter()
        .enumerate()
        .map(|(t, (name, records))| TaskOverlap {
            task: name.clone(),
            records: records.len(),
            contaminated: (0..records.len()).filter(|r| hit.contains(&(t, *r))).map(|r| records[r].id.clone()).collect(),
        })
        .collect()
}

/// The report as text; at most `show` ids per task.
pub fn text(report: &[TaskOverlap], show: usize) -> String {
    let mut s = format!("decontamination ({N}-gram overlap of eval records with the training stream)\n");
    for t in report {
        s.push_str(&format!("  {:<20} {} of {} records", t.task, t.contaminated.len(), t.records));
        if !t.contaminated.is_empty() {
            let more = t.contaminated.len().saturating_sub(show);
            s.push_str(&format!(": {}", t.contaminated.iter().take(show).cloned().collect::<Vec<_>>().join(", ")));
            if more > 0 {
                s.push_str(&format!(" and {more} more (--json lists all)"));
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, text: &str) -> Example {
        Example { id: id.into(), dataset: "t".into(), turns: vec![crate::plugins::Turn { role: "user".into(), content: text.into() }], meta: vec![] }
    }

    #[test]
    fn finds_shared_13_grams_only() {
        let words: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
        let long = words.join(" ");
        let twelve = words[..12].join(" ");
        let tasks = vec![("t".to_string(), vec![rec("a", &long), rec("b", &twelve), rec("c", "other words entirely")])];
        // The training text holds words 3..16 of `a` (14 words), differently cased and punctuated.
        let train = format!("Intro. {}!", words[3..17].join(", ").to_uppercase());
        let r = overlaps(&tasks, std::iter::once(train));
        assert_eq!(r[0].contaminated, vec!["a".to_string()]);
        assert_eq!(r[0].records, 3);
        // 12 shared words are not enough.
        let r = overlaps(&tasks, std::iter::once(twelve));
        assert!(r[0].contaminated.is_empty());
        assert!(text(&r, 5).contains("0 of 3 records"));
    }
}
