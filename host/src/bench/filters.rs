//! `lorahost bench filters`: records per second through the text filters (`minhash-dedup`, `quality`,
//! `language`) on the same records: the sample data sets' records, scaled up by copies with edited words, so
//! the deduplicator has near-duplicates to find. `--export` writes those records (with our language label)
//! as JSON Lines for `scripts/filter-baselines.py`, which runs datasketch and lingua on the same ones.
use crate::plugins::{standard, Example, Grants, PluginEngine, PluginKind, RecordFilter, Turn, Verdict, WasmFilter};
use crate::rng::Rng;
use std::path::Path;
use std::time::Instant;

/// The sample files read (JSON Lines), relative to the samples folder.
const SAMPLES: [&str; 4] = [
    "dolly/databricks-dolly-15k.lines1-34.jsonl",
    "gsm8k/train.first200.jsonl",
    "lima/train.lines1-12.jsonl",
    "oasst1/en_100_tree.lines1-25.jsonl",
];

/// Fields whose strings are a record's text in those files (the others are ids, labels and dates).
const TEXT_FIELDS: [&str; 7] = ["instruction", "context", "response", "question", "answer", "conversations", "text"];

#[derive(Debug, serde::Serialize)]
pub struct FilterRow {
    pub filter: String,
    pub config: String,
    pub records_per_s: f64,
    pub dropped: usize,
    pub rewritten: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct FiltersBench {
    pub records: usize,
    pub mean_bytes: usize,
    pub rows: Vec<FilterRow>,
}

fn texts(v: &serde_json::Value, wanted: bool, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if wanted && !s.trim().is_empty() => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| texts(x, wanted, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| texts(x, wanted || TEXT_FIELDS.contains(&k.as_str()), out)),
        _ => {}
    }
}

/// The sample records as two-turn examples: the first text is the user's, the rest the assistant's.
pub fn sample_records(dir: &Path) -> anyhow::Result<Vec<Example>> {
    let mut out = Vec::new();
    for file in SAMPLES {
        let path = dir.join(file);
        let data = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (i, line) in data.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            let mut t = Vec::new();
            texts(&v, false, &mut t);
            if t.len() < 2 {
                continue;
            }
            let user = t.remove(0);
            out.push(Example {
                id: format!("{file}:{}", i + 1),
                dataset: "samples".into(),
                turns: vec![Turn { role: "user".into(), content: user }, Turn { role: "assistant".into(), content: t.join("\n") }],
                meta: vec![],
            });
        }
    }
    anyhow::ensure!(!out.is_empty(), "no records in {}", dir.display());
    Ok(out)
}

/// `n` records: the samples in turn, each copy after the first with words replaced by words of other records;
/// every other copy is a near-duplicate (1 to 3% of words edited), the rest distinct (30%).
pub fn scaled(base: &[Example], n: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::derive(seed, "bench filters");
    let vocab: Vec<&str> = base.iter().flat_map(|e| e.turns[1].content.split_whitespace()).collect();
    (0..n)
        .map(|i| {
            let mut e = base[i % base.len()].clone();
            let copy = i / base.len();
            e.id = format!("{}#{copy}", e.id);
            if copy > 0 {
                let share = if copy % 2 == 1 { 0.01 + 0.02 * rng.next_f64() } else { 0.3 };
                for turn in &mut e.turns {
                    let words: Vec<String> = turn
                        .content
                        .split_whitespace()
                        .map(|w| if rng.next_f64() < share { vocab[(rng.next_u64() % vocab.len() as u64) as usize].to_string() } else { w.to_string() })
                        .collect();
                    turn.content = words.join(" ");
                }
            }
            e
        })
        .collect()
}

/// One pass of `records` through the standard filter `name`, in batches of 1024.
fn measure(engine: &PluginEngine, name: &str, config: &str, records: &[Example]) -> anyhow::Result<(FilterRow, Vec<Verdict>)> {
    let plugin = engine.load(name, standard::find(PluginKind::Filter, name).expect("standard filter").wasm)?;
    let mut filter = WasmFilter::new(engine, &plugin, &Grants::default(), config)?;
    let start = Instant::now();
    let mut verdicts = Vec::with_capacity(records.len());
    for chunk in records.chunks(crate::data::filter::FILTER_BATCH) {
        verdicts.extend(filter.filter_batch(chunk)?);
    }
    let secs = start.elapsed().as_secs_f64();
    let row = FilterRow {
        filter: name.into(),
        config: config.replace('\n', "; "),
        records_per_s: records.len() as f64 / secs,
        dropped: verdicts.iter().filter(|v| matches!(v, Verdict::Drop(_))).count(),
        rewritten: verdicts.iter().filter(|v| matches!(v, Verdict::Rewrite(_))).count(),
    };
    Ok((row, verdicts))
}

/// Runs the three filters on `n` records made from the samples in `samples`; with `export`, writes the
/// records and the language plugin's label of each as JSON Lines.
pub fn run(samples: &Path, n: usize, export: Option<&Path>) -> anyhow::Result<FiltersBench> {
    let records = scaled(&sample_records(samples)?, n, 7);
    let cache = tempfile::tempdir()?;
    let engine = PluginEngine::new(Some(cache.path().to_path_buf()))?;
    let mut rows = Vec::new();
    for (name, config) in [("minhash-dedup", ""), ("quality", "")] {
        rows.push(measure(&engine, name, config, &records)?.0);
    }
    // Every record labelled (none dropped), so the labels can be compared with another detector's.
    let (row, labels) = measure(&engine, "language", "keep = [\"*\"]\nmin_confidence = 0.0\nannotate = true", &records)?;
    rows.push(row);
    if let Some(path) = export {
        let mut out = String::new();
        for (e, v) in records.iter().zip(&labels) {
            let lang = match v {
                Verdict::Rewrite(l) => l.meta.iter().find(|(k, _)| k == "language").map(|(_, v)| v.clone()),
                _ => None,
            };
            let text: Vec<&str> = e.turns.iter().map(|t| t.content.as_str()).collect();
            out.push_str(&serde_json::json!({ "id": e.id, "text": text.join("\n"), "lang": lang }).to_string());
            out.push('\n');
        }
        crate::fsutil::write_atomic(path, out.as_bytes())?;
    }
    let bytes: usize = records.iter().flat_map(|e| &e.turns).map(|t| t.content.len()).sum();
    Ok(FiltersBench { records: records.len(), mean_bytes: bytes / records.len(), rows })
}

impl std::fmt::Display for FiltersBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} records of {} bytes on average, one pass, one core", self.records, self.mean_bytes)?;
        writeln!(f, "| filter | options | records/s | dropped | rewritten |")?;
        writeln!(f, "|---|---|---|---|---|")?;
        for r in &self.rows {
            writeln!(f, "| {} | {} | {:.0} | {} | {} |", r.filter, r.config, r.records_per_s, r.dropped, r.rewritten)?;
        }
        Ok(())
    }
}
