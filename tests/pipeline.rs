//! The run manifest and the data pipeline: reproducible token streams, the cache, the lock, and a clear
//! message for every kind of bad input.
mod common;

use lorahost::data::{self, lock::Lock};
use lorahost::manifest::Manifest;
use std::path::{Path, PathBuf};

/// A scratch project: a manifest plus data files in a temporary folder.
struct Project {
    dir: tempfile::TempDir,
}

const ALPACA: &str = r#"{"instruction": "Say hi", "input": "", "output": "Hi!"}
{"instruction": "Add", "input": "2 and 3", "output": "5"}
{"instruction": "Name a colour", "input": "", "output": "Blue"}
{"instruction": "Capital of France?", "input": "", "output": "Paris"}
{"instruction": "Reverse", "input": "abc", "output": "cba"}
{"instruction": "Say hi", "input": "", "output": "Hi!"}
"#;

impl Project {
    fn new() -> Project {
        let p = Project { dir: tempfile::tempdir().unwrap() };
        p.write("data/alpaca.jsonl", ALPACA);
        p.write("data/more.csv", "question,answer\nWhat is 1+1?,2\nWhat is 2+2?,4\nWhat is 3+3?,6\n");
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A manifest with two datasets, a per-dataset and a global filter; `extra` is appended.
    fn manifest(&self, seed: u64, extra: &str) -> PathBuf {
        let tok = common::repo_root().join("tests/fixtures/tokenizer/qwen.tiktoken");
        let text = format!(
            r#"[run]
name = "t"
seed = {seed}
output = "out"
cache = "cache"

[model]
path = "model"
tokenizer = {tok:?}

[train]
micro_batch = 2
grad_accum = 2
max_seq_len = 64

[template]
plugin = "chatml"

[[dataset]]
name = "alpaca"
source = {{ plugin = "jsonl", path = "data/alpaca.jsonl" }}
repeat = 3
filters = [{{ plugin = "length", min = 2 }}]

[[dataset]]
name = "csv"
source = {{ plugin = "csv", path = "data/more.csv", fields = {{ instruction = "question", output = "answer" }} }}

[[filter]]
plugin = "dedup-exact"
{extra}"#
        );
        self.write("manifest.toml", &text);
        self.path("manifest.toml")
    }

    fn load(&self, seed: u64, extra: &str) -> Manifest {
        Manifest::load(&self.manifest(seed, extra)).unwrap()
    }

    fn error(&self, manifest_text: &str) -> String {
        self.write("bad.toml", manifest_text);
        match Manifest::load(&self.path("bad.toml")) {
            Ok(m) => format!("{:#}", data::prepare(&m).err().expect("expected an error")),
            Err(e) => e.to_string(),
        }
    }
}

#[test]
fn same_manifest_same_stream_other_seed_other_stream() {
    let p = Project::new();
    let a = data::prepare(&p.load(1, "")).unwrap();
    assert!(!a.from_cache);
    // Twice: from the cache, and recomputed without it; both agree.
    let b = data::prepare(&p.load(1, "")).unwrap();
    assert!(b.from_cache);
    let m = p.load(1, "");
    let plan = data::Plan::new(&m).unwrap();
    let (fresh, _) = data::run_pipeline(&plan).unwrap();
    assert_eq!(a.report.token_stream_sha256, b.report.token_stream_sha256);
    assert_eq!(fresh.digest(), a.report.token_stream_sha256);
    assert_eq!(fresh, a.stream);
    let c = data::prepare(&p.load(2, "")).unwrap();
    assert_ne!(c.report.token_stream_sha256, a.report.token_stream_sha256);
    // Same records, another order: the multiset of lengths is the same.
    let mut la = a.stream.lengths.clone();
    let mut lc = c.stream.lengths.clone();
    la.sort();
    lc.sort();
    assert_eq!(la, lc);
}

#[test]
fn counts_follow_filters_and_mix() {
    let p = Project::new();
    let r = data::prepare(&p.load(1, "")).unwrap().report;
    let alpaca = &r.datasets[0];
    assert_eq!((alpaca.read, alpaca.kept), (6, 5), "dedup drops the repeated `Say hi`");
    assert_eq!(r.global_filters[0].dropped.get("exact duplicate"), Some(&1));
    assert_eq!(alpaca.in_mix, 15, "repeat = 3");
    assert_eq!(r.datasets[1].in_mix, 3);
    assert_eq!(r.train_records, 18);
    assert_eq!(r.steps_per_epoch, 5, "18 records / (2 x 2) per step, rounded up");
    assert!(r.trained_tokens > 0 && r.trained_tokens < r.total_tokens);
}

#[test]
fn any_input_change_invalidates_the_cache() {
    let p = Project::new();
    let first = data::prepare(&p.load(1, "")).unwrap();
    p.write("data/more.csv", "question,answer\nWhat is 1+1?,2\nWhat is 2+2?,4\nWhat is 3+3?,six\n");
    let second = data::prepare(&p.load(1, "")).unwrap();
    assert!(!second.from_cache, "a changed data file must not hit the cache");
    assert_ne!(first.report.token_stream_sha256, second.report.token_stream_sha256);
    // A changed plugin option too.
    let third = data::prepare(&p.load(1, "[mix]\nfraction = 0.5\n")).unwrap();
    assert!(!third.from_cache);
    assert_eq!(third.report.train_records, 9);
}

#[test]
fn the_lock_names_what_changed() {
    let p = Project::new();
    let m = p.load(1, "");
    let locked = data::prepare(&m).unwrap().lock;
    assert!(locked.token_stream.is_some());
    let path = p.path("out/run.lock");
    locked.write(&path).unwrap();
    let reread = Lock::read(&path).unwrap();
    assert_eq!(reread, locked);
    assert!(data::Plan::new(&m).unwrap().lock.diff(&reread).is_empty());

    p.write("data/alpaca.jsonl", &ALPACA.replace("Paris", "Lyon"));
    let m2 = p.load(2, "");
    let changes = data::Plan::new(&m2).unwrap().lock.diff(&reread);
    assert!(changes.iter().any(|c| c.starts_with("data file `data/alpaca.jsonl`")), "{changes:?}");
    assert!(changes.iter().any(|c| c.starts_with("setting `seed`: 2")), "{changes:?}");
    assert_eq!(changes.len(), 3, "file, the options pointing at it, and the seed: {changes:?}");
}

#[test]
fn malformed_toml_names_the_line() {
    let p = Project::new();
    let e = p.error("[run]\nname = \"x\"\nseed = = 3\n");
    assert!(e.contains("bad.toml:3") && e.contains("malformed TOML"), "{e}");
}

#[test]
fn an_unknown_key_names_its_path_and_line() {
    let p = Project::new();
    let text = std::fs::read_to_string(p.manifest(1, "")).unwrap().replace("micro_batch = 2", "micro_bacth = 2");
    let e = p.error(&text);
    assert!(e.contains("`train.micro_bacth`") || e.contains("`train`"), "{e}");
    assert!(e.contains("unknown field `micro_bacth`") && e.contains("fix its spelling"), "{e}");
    let line = text.lines().position(|l| l.starts_with("micro_bacth")).unwrap() + 1;
    assert!(e.contains(&format!("bad.toml:{line}")), "{e}");
}

#[test]
fn a_missing_file_is_named() {
    let p = Project::new();
    let text = std::fs::read_to_string(p.manifest(1, "")).unwrap().replace("data/more.csv", "data/nope.csv");
    let e = p.error(&text);
    assert!(e.contains("dataset[1].source.path") && e.contains("nope.csv") && e.contains("does not exist"), "{e}");
}

#[test]
fn a_malformed_jsonl_line_fails_or_is_skipped_and_counted() {
    let p = Project::new();
    p.write("data/alpaca.jsonl", &format!("{ALPACA}{{\"instruction\": \"broken\",\n{{\"output\": \"no instruction\"}}\n"));
    let e = format!("{:#}", data::prepare(&p.load(1, "")).err().unwrap());
    assert!(e.contains("alpaca.jsonl:7") && e.contains("on_malformed = \"skip\""), "{e}");
    let text = std::fs::read_to_string(p.manifest(1, "")).unwrap().replace("repeat = 3", "repeat = 3\non_malformed = \"skip\"");
    p.write("skip.toml", &text);
    let r = data::prepare(&Manifest::load(&p.path("skip.toml")).unwrap()).unwrap().report;
    assert_eq!(r.datasets[0].malformed, 2);
    assert!(r.datasets[0].malformed_examples[1].contains("alpaca.jsonl:8"), "{:?}", r.datasets[0].malformed_examples);
    assert_eq!(r.datasets[0].read, 6);
}

#[test]
fn a_malformed_csv_row_names_file_and_line() {
    let p = Project::new();
    p.write("data/more.csv", "question,answer\nWhat is 1+1?,2\nWhat is 2+2?,4,extra\n");
    let e = format!("{:#}", data::prepare(&p.load(1, "")).err().unwrap());
    assert!(e.contains("more.csv:3"), "{e}");
}

#[test]
fn a_plugin_with_another_digest_is_refused() {
    let p = Project::new();
    let wasm = common::hostile_wasm("fail-midway");
    let extra = format!("[plugins]\nmidway = {{ path = {:?}, sha256 = \"{}\" }}\n", wasm, "0".repeat(64));
    let e = format!("{:#}", data::prepare(&p.load(1, &extra)).err().unwrap());
    assert!(e.contains("plugins.midway.sha256") && e.contains("set sha256 = \""), "{e}");
}

#[test]
fn a_dataset_emptied_by_filters_is_an_error() {
    let p = Project::new();
    let text = std::fs::read_to_string(p.manifest(1, "")).unwrap().replace("min = 2", "min = 100000");
    let e = p.error(&text);
    assert!(e.contains("dataset `alpaca` is empty after filtering"), "{e}");
}

#[test]
fn a_plugin_error_in_the_middle_of_a_dataset_names_the_plugin() {
    let p = Project::new();
    let wasm = common::hostile_wasm("fail-midway");
    let digest = lorahost::plugins::engine::sha256_hex(&std::fs::read(&wasm).unwrap());
    let extra = format!("[plugins]\nmidway = {{ path = {:?}, sha256 = \"{digest}\" }}\n", wasm);
    let text = std::fs::read_to_string(p.manifest(1, &extra))
        .unwrap()
        .replace("[{ plugin = \"length\", min = 2 }]", "[{ plugin = \"midway\", after = 3 }]");
    let e = p.error(&text);
    assert!(e.contains("plugin `midway`") && e.contains("gave up at record alpaca.jsonl:4"), "{e}");
}

#[test]
fn relative_paths_resolve_against_the_manifest_folder() {
    let p = Project::new();
    let m = p.load(1, "");
    assert_eq!(m.run.output, p.dir.path().canonicalize().unwrap().join("out"));
    let path = m.datasets[0].source.config["path"].as_str().unwrap();
    assert!(Path::new(path).is_absolute() && path.ends_with("data/alpaca.jsonl"));
}
