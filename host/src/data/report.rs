//! What `lorahost check` prints: per dataset, records read, kept and dropped by each filter with reasons;
//! the final mix; a token-length histogram; truncation; trained tokens; steps per epoch.
use super::filter::FilterStats;
use super::plugins::PluginOrigin;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DatasetReport {
    pub name: String,
    pub read: usize,
    /// Bytes of text read, and the budget they were read under.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub budget: crate::manifest::Budget,
    pub malformed: usize,
    pub malformed_examples: Vec<String>,
    pub filters: Vec<FilterStats>,
    /// Records left after this dataset's filters and the global ones.
    pub kept: usize,
    /// Records of this dataset in the final mix (after repeat, sampling and the global fraction).
    pub in_mix: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub datasets: Vec<DatasetReport>,
    /// Global filters (`[[filter]]`), over all datasets.
    pub global_filters: Vec<FilterStats>,
    /// Records the template rejected, by reason.
    pub template_rejected: BTreeMap<String, usize>,
    /// Records dropped because truncation left no trained token.
    pub no_trained_tokens: usize,
    /// Records dropped because the template rendered no trained segment for them.
    #[serde(default)]
    pub template_untrained: usize,
    pub train_records: usize,
    pub eval_records: usize,
    pub truncated: usize,
    pub total_tokens: usize,
    pub trained_tokens: usize,
    /// (upper bound of the bucket, records): lengths <= bound and > the previous bound.
    pub length_histogram: Vec<(usize, usize)>,
    pub max_seq_len: usize,
    pub sequences_per_step: usize,
    pub steps_per_epoch: usize,
    pub token_stream_sha256: String,
    /// Filled in when printed (not part of the cached report).
    #[serde(skip)]
    pub plugins: Vec<PluginOrigin>,
    #[serde(skip)]
    pub from_cache: bool,
}

/// Buckets at powers of two up to the cutoff.
pub fn histogram(lengths: impl Iterator<Item = usize>, max: usize) -> Vec<(usize, usize)> {
    let mut bounds = vec![];
    let mut b = 16;
    while b < max {
        bounds.push(b);
        b *= 2;
    }
    bounds.push(max.max(1));
    let mut counts = vec![0usize; bounds.len()];
    for l in lengths {
        let i = bounds.iter().position(|&b| l <= b).unwrap_or(bounds.len() - 1);
        counts[i] += 1;
    }
    bounds.into_iter().zip(counts).collect()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.plugins {
            if p.native {
                writeln!(f, "WARNING: plugin `{}` ({}) is a native library and runs UNSANDBOXED (trusted = true)", p.name, p.from)?;
            } else if !p.pinned {
                writeln!(f, "note: plugin `{}` ({}) is not pinned; add sha256 = \"{}\" to pin it", p.name, p.from, p.sha256)?;
            }
        }
        writeln!(f, "datasets")?;
        for d in &self.datasets {
            write!(f, "  {:<28} read {:>8}", d.name, d.read)?;
            if d.malformed > 0 {
                write!(f, "  malformed (skipped) {}", d.malformed)?;
            }
            writeln!(f, "  kept {:>8}  in mix {:>8}", d.kept, d.in_mix)?;
            writeln!(
                f,
                "      {:.1} MiB of text; budget {} records, {} MiB (`budget` in its [[dataset]])",
                d.bytes as f64 / (1u64 << 20) as f64,
                d.budget.records,
                d.budget.mb
            )?;
            for m in &d.malformed_examples {
                writeln!(f, "      malformed: {m}")?;
            }
            for s in &d.filters {
                write_filter(f, s, "    ")?;
            }
        }
        if !self.global_filters.is_empty() {
            writeln!(f, "global filters")?;
            for s in &self.global_filters {
                write_filter(f, s, "  ")?;
            }
        }
        for (reason, n) in &self.template_rejected {
            writeln!(f, "template rejected {n}: {reason}")?;
        }
        if self.template_untrained > 0 {
            writeln!(f, "template rendered {} with no trained segment (dropped)", self.template_untrained)?;
        }
        if self.no_trained_tokens > 0 {
            writeln!(f, "dropped {} with no trained token left after truncation", self.no_trained_tokens)?;
        }
        writeln!(f, "mix      {} train + {} eval records", self.train_records, self.eval_records)?;
        writeln!(
            f,
            "tokens   {} in all, {} trained; {} of {} records truncated at {}",
            self.total_tokens,
            self.trained_tokens,
            self.truncated,
            self.train_records + self.eval_records,
            self.max_seq_len
        )?;
        writeln!(f, "lengths")?;
        let most = self.length_histogram.iter().map(|&(_, n)| n).max().unwrap_or(1).max(1);
        let mut lo = 0;
        for &(hi, n) in &self.length_histogram {
            let bar = "#".repeat((n * 40).div_ceil(most).min(40));
            writeln!(f, "  {:>5}..{:<5} {:>8} {bar}", lo + 1, hi, n)?;
            lo = hi;
        }
        writeln!(f, "steps    {} per epoch ({} sequences per optimizer step)", self.steps_per_epoch, self.sequences_per_step)?;
        writeln!(f, "stream   sha256:{}{}", self.token_stream_sha256, if self.from_cache { " (from cache)" } else { "" })
    }
}

fn write_filter(f: &mut fmt::Formatter<'_>, s: &FilterStats, indent: &str) -> fmt::Result {
    write!(f, "{indent}filter {} ({}): kept {} of {}", s.plugin, s.key, s.kept, s.seen)?;
    if s.rewritten > 0 {
        write!(f, ", rewrote {}", s.rewritten)?;
    }
    writeln!(f)?;
    for (reason, n) in &s.dropped {
        writeln!(f, "{indent}  dropped {n:>8}: {reason}")?;
        for example in s.examples.get(reason).into_iter().flatten() {
            let mut lines = example.lines();
            writeln!(f, "{indent}      e.g. {}", lines.next().unwrap_or(""))?;
            for line in lines {
                writeln!(f, "{indent}        {line}")?;
            }
        }
    }
    Ok(())
}
