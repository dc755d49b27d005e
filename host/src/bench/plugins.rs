//! Records per second through filter plugins at several batch sizes, beside the same work done natively,
//! and the time to load a plugin from the compile cache.
use crate::plugins::{standard, Example, Grants, PluginEngine, PluginKind, RecordFilter, Turn, Verdict, WasmFilter};
use std::time::{Duration, Instant};

#[derive(Debug, serde::Serialize)]
pub struct FilterRow {
    pub filter: String,
    pub batch: usize,
    /// Records per second through the sandboxed plugin.
    pub wasm_rps: f64,
    /// Records per second for the same decision made by native Rust in the host.
    pub native_rps: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct PluginBench {
    pub record_bytes: usize,
    pub rows: Vec<FilterRow>,
    /// Compile of the `length` plugin with an empty cache, in ms.
    pub cold_load_ms: f64,
    /// Load of the same plugin from the compile cache, in ms (median of 5).
    pub cached_load_ms: f64,
}

/// A record of about `bytes` bytes: a user turn and an assistant turn of ordinary words.
pub fn record(i: usize, bytes: usize) -> Example {
    let words = ["alpha ", "bravo ", "charlie ", "delta ", "echo ", "foxtrot ", "golf ", "hotel "];
    let mut text = String::with_capacity(bytes);
    let mut k = i;
    while text.len() < bytes {
        text.push_str(words[k % words.len()]);
        k = k.wrapping_mul(31).wrapping_add(7);
    }
    text.truncate(bytes);
    let half = bytes / 2;
    Example {
        id: format!("bench:{i}"),
        dataset: "bench".into(),
        turns: vec![
            Turn { role: "user".into(), content: text[..half].to_string() },
            Turn { role: "assistant".into(), content: text[half..].to_string() },
        ],
        meta: vec![],
    }
}

fn native_length(e: &Example, min: usize, max: usize) -> Verdict {
    let n: usize = e.turns.iter().map(|t| t.content.chars().count()).sum();
    if n < min {
        Verdict::Drop(format!("shorter than {min} chars"))
    } else if n > max {
        Verdict::Drop(format!("longer than {max} chars"))
    } else {
        Verdict::Keep
    }
}

/// Runs `f` over `records` in batches of `batch` until at least `min_time` has passed; returns records/s.
fn throughput(records: &[Example], batch: usize, min_time: Duration, mut f: impl FnMut(&[Example]) -> usize) -> f64 {
    let mut done = 0usize;
    let start = Instant::now();
    loop {
        for chunk in records.chunks(batch) {
            done += f(chunk);
        }
        if start.elapsed() >= min_time {
            return done as f64 / start.elapsed().as_secs_f64();
        }
    }
}

pub fn run(record_bytes: usize, min_time: Duration) -> anyhow::Result<PluginBench> {
    let cache = tempfile::tempdir()?;
    let engine = PluginEngine::new(Some(cache.path().to_path_buf()))?;
    let records: Vec<Example> = (0..4096).map(|i| record(i, record_bytes)).collect();
    let grants = Grants::default();
    let mut rows = Vec::new();
    let (min, max) = (100, 100_000);
    for name in ["noop", "length"] {
        let sp = standard::find(PluginKind::Filter, name).expect("standard filter");
        let plugin = engine.load(name, sp.wasm)?;
        let config = if name == "length" { format!("min = {min}\nmax = {max}\n") } else { String::new() };
        let mut filter = WasmFilter::new(&engine, &plugin, &grants, &config)?;
        for batch in [1usize, 64, 1024] {
            let wasm_rps = throughput(&records, batch, min_time, |chunk| {
                filter.filter_batch(chunk).expect("filter failed").len()
            });
            let native_rps = throughput(&records, batch, min_time, |chunk| {
                let v: Vec<Verdict> = if name == "length" {
                    chunk.iter().map(|e| native_length(e, min, max)).collect()
                } else {
                    chunk.iter().map(|_| Verdict::Keep).collect()
                };
                std::hint::black_box(v).len()
            });
            rows.push(FilterRow { filter: name.into(), batch, wasm_rps, native_rps });
        }
    }
    // Load times: a fresh cache folder, one cold compile, then cached loads.
    let cache2 = tempfile::tempdir()?;
    let engine2 = PluginEngine::new(Some(cache2.path().to_path_buf()))?;
    let wasm = standard::find(PluginKind::Filter, "length").unwrap().wasm;
    let cold = engine2.load("length", wasm)?;
    anyhow::ensure!(!cold.from_cache, "the first load should compile");
    let mut cached: Vec<f64> = (0..5)
        .map(|_| {
            let p = engine2.load("length", wasm).expect("cached load");
            assert!(p.from_cache, "a second load must come from the cache");
            p.load_time.as_secs_f64() * 1e3
        })
        .collect();
    cached.sort_by(f64::total_cmp);
    Ok(PluginBench {
        record_bytes,
        rows,
        cold_load_ms: cold.load_time.as_secs_f64() * 1e3,
        cached_load_ms: cached[2],
    })
}

impl std::fmt::Display for PluginBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "records of {} bytes, one core", self.record_bytes)?;
        writeln!(f, "| filter | batch | wasm records/s | native records/s |")?;
        writeln!(f, "|---|---|---|---|")?;
        for r in &self.rows {
            writeln!(f, "| {} | {} | {:.0} | {:.0} |", r.filter, r.batch, r.wasm_rps, r.native_rps)?;
        }
        writeln!(f, "cold compile {:.1} ms, cached load {:.2} ms", self.cold_load_ms, self.cached_load_ms)
    }
}
