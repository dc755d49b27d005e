//! The standard filter library through the host: each plugin built into the binary, loaded into its sandbox
//! and run on hand-made records; `minhash-dedup` and `decontaminate` also through a manifest.
mod common;

use lorahost::data;
use lorahost::manifest::Manifest;
use lorahost::plugins::{standard, Example, Grants, PluginEngine, PluginKind, RecordFilter, Turn, Verdict, WasmFilter};
use std::path::PathBuf;

fn filter(name: &str, config: &str, read_dirs: Vec<PathBuf>) -> WasmFilter {
    let engine = PluginEngine::new(None).unwrap();
    let sp = standard::find(PluginKind::Filter, name).unwrap_or_else(|| panic!("`{name}` is not a standard filter"));
    let plugin = engine.load(name, sp.wasm).unwrap();
    WasmFilter::new(&engine, &plugin, &Grants { read_dirs, ..Default::default() }, config).unwrap()
}

fn qa(id: &str, q: &str, a: &str) -> Example {
    Example {
        id: id.into(),
        dataset: "d".into(),
        turns: vec![Turn { role: "user".into(), content: q.into() }, Turn { role: "assistant".into(), content: a.into() }],
        meta: vec![],
    }
}

const PROSE: &str = "The committee met on Tuesday to review the proposal, and members agreed that the plan should go \
    ahead with a smaller budget. Several of them noted that the timeline was tight, but the chair said the team \
    would have enough time to deliver the first phase before the end of the year.";

#[test]
fn minhash_dedup_drops_near_copies_naming_the_kept_record() {
    let mut f = filter("minhash-dedup", "", vec![]);
    let batch = [qa("a:1", "Summarize.", PROSE), qa("a:2", "Summarize.", &PROSE.replace("year.", "decade.")), qa("a:3", "Other", "Text")];
    let v = f.filter_batch(&batch).unwrap();
    assert_eq!(v, [Verdict::Keep, Verdict::Drop("near-duplicate of a:1 in d".into()), Verdict::Keep]);
    // State lives across calls.
    assert_eq!(f.filter_batch(&batch[..1]).unwrap(), [Verdict::Drop("near-duplicate of a:1 in d".into())]);
}

#[test]
fn quality_language_pii_and_regex_in_the_sandbox() {
    let mut q = filter("quality", "min_words = 20", vec![]);
    let v = q.filter_batch(&[qa("1", "Summarize.", PROSE), qa("2", "Hi", "Hello there")]).unwrap();
    assert_eq!(v, [Verdict::Keep, Verdict::Drop("fewer than 20 words".into())]);

    let mut l = filter("language", "keep = [\"eng\"]", vec![]);
    let fr = "Il faisait beau hier, alors nous avons marché le long de la rivière en parlant de nos projets.";
    assert_eq!(l.filter_batch(&[qa("1", PROSE, PROSE), qa("2", fr, fr)]).unwrap(), [Verdict::Keep, Verdict::Drop("language fra not kept".into())]);

    let mut p = filter("pii", "", vec![]);
    let v = p.filter_batch(&[qa("1", "Mail me at jo@example.com", "Sure."), qa("2", "no data", "none")]).unwrap();
    let Verdict::Rewrite(e) = &v[0] else { panic!("expected a rewrite: {v:?}") };
    assert_eq!((e.id.as_str(), e.turns[0].content.as_str(), e.turns[1].content.as_str()), ("1", "Mail me at <EMAIL>", "Sure."));
    assert_eq!(v[1], Verdict::Keep);

    let mut r = filter("regex", "drop = ['(?i)as an ai']\nroles = [\"assistant\"]", vec![]);
    let v = r.filter_batch(&[qa("1", "as an AI?", "fine"), qa("2", "q", "As an AI, no.")]).unwrap();
    assert_eq!(v, [Verdict::Keep, Verdict::Drop("matches drop pattern `(?i)as an ai`".into())]);
}

#[test]
fn decontaminate_reads_granted_eval_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let eval = dir.path().join("eval.jsonl");
    std::fs::write(&eval, "{\"question\": \"Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.\"}\n").unwrap();
    let config = format!("files = [{:?}]\nn = 8", eval.display().to_string());
    let mut f = filter("decontaminate", &config, vec![dir.path().to_path_buf()]);
    let v = f.filter_batch(&[qa("1", "natalia sold clips to 48 of her friends in april?", "72"), qa("2", "A new question", "x")]).unwrap();
    assert_eq!(v, [Verdict::Drop("shares a 8-gram with eval.jsonl".into()), Verdict::Keep]);
    // Without the grant the file cannot be read: the configuration is refused, naming the file.
    let engine = PluginEngine::new(None).unwrap();
    let plugin = engine.load("decontaminate", standard::find(PluginKind::Filter, "decontaminate").unwrap().wasm).unwrap();
    let err = WasmFilter::new(&engine, &plugin, &Grants::default(), &config).err().unwrap();
    assert!(format!("{err}").contains("eval.jsonl"), "{err}");
}

/// A global `minhash-dedup` sees every dataset in manifest order: the later dataset's near-copies go, and
/// the reason names the record of the first dataset that was kept. `decontaminate` reads its files through
/// the manifest's path grants.
#[test]
fn global_minhash_dedup_and_decontaminate_through_a_manifest() {
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let line = |q: &str, a: &str| serde_json::json!({"instruction": q, "input": "", "output": a}).to_string();
    let stories = [
        PROSE.to_string(),
        "Rain fell across the northern valleys for three days, swelling the rivers until the old wooden bridge near the mill finally gave way and the villagers had to cross by boat.".to_string(),
        "The library opened a new reading room on the second floor, with tall windows facing the park, long oak tables and quiet lamps for students who stay late into the evening.".to_string(),
    ];
    let first: Vec<String> = stories.iter().map(|s| line("Summarize the passage.", s)).collect();
    let mut second: Vec<String> = vec![line("Summarize the passage.", &format!("{} Again.", stories[1]))];
    second.push(line("Natalia sold clips to 48 of her friends in April, how many?", "72"));
    second.push(line("Write a haiku about autumn leaves falling slowly.", "Red leaves drift and turn, the cold wind carries them home, the branches stand bare."));
    std::fs::write(dir.path().join("a.jsonl"), first.join("\n")).unwrap();
    std::fs::write(dir.path().join("b.jsonl"), second.join("\n")).unwrap();
    std::fs::write(dir.path().join("eval.txt"), "Natalia sold clips to 48 of her friends in April, and then she sold half as many\n").unwrap();
    let manifest = std::fs::read_to_string(root.join("examples/quickstart.toml"))
        .unwrap()
        .split("[[dataset]]")
        .next()
        .unwrap()
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace(&format!("output = \"{}/runs/quickstart\"", root.display()), "output = \"out\"")
        .replace("eval_fraction = 0.05", "eval_fraction = 0.0")
        + r#"
[[dataset]]
name = "first"
source = { plugin = "jsonl", path = "a.jsonl" }

[[dataset]]
name = "second"
source = { plugin = "jsonl", path = "b.jsonl" }

[[filter]]
plugin = "minhash-dedup"

[[filter]]
plugin = "decontaminate"
files = ["eval.txt"]
n = 8
"#;
    let path = dir.path().join("m.toml");
    std::fs::write(&path, manifest).unwrap();
    let report = data::prepare(&Manifest::load(&path).unwrap()).unwrap().report;
    let (dedup, decontam) = (&report.global_filters[0], &report.global_filters[1]);
    assert_eq!((dedup.plugin.as_str(), dedup.seen, dedup.kept), ("minhash-dedup", 6, 5));
    assert_eq!(dedup.dropped.keys().collect::<Vec<_>>(), ["near-duplicate of a.jsonl:2 in first"]);
    assert_eq!(decontam.dropped.get("shares a 8-gram with eval.txt"), Some(&1));
    assert_eq!((report.datasets[0].kept, report.datasets[1].kept), (3, 1));
}
