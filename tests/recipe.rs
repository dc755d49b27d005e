//! The 2023 reference recipe (examples/neurips-qwen14b.toml) against the real samples in the repository:
//! every source loads in the sandbox, the mix gives exact counts for its seed, and the token stream is the
//! same run after run.
mod common;

use lorahost::data::{self, mix};
use lorahost::manifest::Manifest;

/// The recipe with its outputs and caches in a temporary folder; `seed` replaces the manifest's.
fn recipe(dir: &std::path::Path, seed: u64) -> Manifest {
    let root = common::repo_root();
    let text = std::fs::read_to_string(root.join("examples/neurips-qwen14b.toml"))
        .unwrap()
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace("seed = 42 ", &format!("seed = {seed} "))
        .replace(&format!("output = \"{}/runs/neurips-qwen14b\"", root.display()), "output = \"out\"\ncache = \"cache\"");
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    Manifest::load(&path).unwrap()
}

#[test]
fn the_recipe_mixes_exact_counts_and_the_same_stream_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let m = recipe(dir.path(), 42);
    assert_eq!(m.run.seed, 42);
    let plan = data::Plan::new(&m).unwrap();
    let (stream, report) = data::run_pipeline(&plan).unwrap();

    // Every dataset of the recipe read something from its real sample, with nothing malformed.
    for d in &report.datasets {
        assert!(d.read > 0 && d.malformed == 0, "{}: read {} malformed {}", d.name, d.read, d.malformed);
    }
    // Per dataset: repeat, then the fraction; then 67% of everything (rounded to nearest).
    let sampled: usize = m
        .datasets
        .iter()
        .zip(&report.datasets)
        .map(|(d, r)| {
            let n = r.kept * d.repeat as usize;
            d.fraction.map_or(n, |f| mix::fraction_count(n, f))
        })
        .sum();
    let mmlu = &report.datasets[0];
    assert_eq!(mmlu.read, 311, "philosophy_test.csv has 311 questions");
    assert_eq!(mix::fraction_count(311 * 17, 0.1), 529);
    assert_eq!(report.train_records + report.eval_records, mix::fraction_count(sampled, 0.67));
    assert_eq!(report.datasets.iter().map(|d| d.in_mix).sum::<usize>(), report.train_records);
    assert_eq!(report.template_rejected.len(), 0);

    // The same digest from a second, independent run (no cache), another with another seed.
    let again = data::run_pipeline(&data::Plan::new(&m).unwrap()).unwrap().0;
    assert_eq!(again.digest(), stream.digest());
    let other_dir = tempfile::tempdir().unwrap();
    let other = recipe(other_dir.path(), 43);
    let (other_stream, other_report) = data::run_pipeline(&data::Plan::new(&other).unwrap()).unwrap();
    assert_ne!(other_stream.digest(), stream.digest());
    assert_eq!(other_report.train_records, report.train_records, "the counts do not depend on the seed");
}

#[test]
fn the_recipe_renders_the_2023_template_piece_by_piece() {
    let dir = tempfile::tempdir().unwrap();
    let m = recipe(dir.path(), 42);
    let plan = data::Plan::new(&m).unwrap();
    let (stream, _) = data::run_pipeline(&plan).unwrap();
    let tok = &plan.tokenizer;
    let system = "A chat between a curious user and an artificial intelligence assistant. The assistant gives \
                  helpful, detailed, and polite answers to the user's questions.";
    let offsets = stream.offsets();
    let eot = tok.special_id("<|endoftext|>").unwrap();
    for i in 0..stream.len().min(50) {
        let (ids, mask) = stream.record(&offsets, i);
        // Every record starts with the system text tokenized on its own, then "\n" on its own.
        let mut head = Vec::new();
        tok.encode_ordinary(system, &mut head);
        tok.encode_ordinary("\n", &mut head);
        assert_eq!(&ids[..head.len()], &head[..], "record {i}");
        assert!(mask[..head.len()].iter().all(|&t| t == 0));
        // Untruncated records end with a trained <|endoftext|>.
        if ids.len() < 1024 {
            assert_eq!((*ids.last().unwrap(), *mask.last().unwrap()), (eot, 1), "record {i}");
        }
    }
}

#[test]
fn the_published_mix_format_reads_through_the_parquet_source() {
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[run]
name = "parquet"
output = "out"
cache = "cache"
[model]
path = "."
tokenizer = "{root}/tests/fixtures/tokenizer/qwen.tiktoken"
[template]
plugin = "default-2023"
[[dataset]]
name = "mix"
source = {{ plugin = "parquet", path = "{root}/tests/fixtures/samples/parquet/mix.sample.parquet", meta = ["data_source"] }}
on_malformed = "skip"
"#,
        root = root.display()
    );
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let report = data::prepare(&Manifest::load(&path).unwrap()).unwrap().report;
    let d = &report.datasets[0];
    assert_eq!((d.read, d.malformed), (5, 2));
    assert!(d.malformed_examples[0].starts_with("mix.sample.parquet#3: output"), "{:?}", d.malformed_examples);
    // The zstd variant is refused with a message that says why and what to do.
    let zstd = std::fs::read_to_string(&path).unwrap().replace("mix.sample.parquet", "mix.zstd.parquet");
    std::fs::write(&path, zstd).unwrap();
    let err = format!("{:#}", data::prepare(&Manifest::load(&path).unwrap()).err().unwrap());
    assert!(err.contains("plugin `parquet`") && err.contains("zstd"), "{err}");
}
