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

/// The quickstart manifest up to its datasets, for a manifest in a temporary folder: no hold-out, `out/`
/// for the run; `run_extra` goes into [run].
fn quickstart_head(run_extra: &str) -> String {
    let root = common::repo_root();
    std::fs::read_to_string(root.join("examples/quickstart.toml"))
        .unwrap()
        .split("[[dataset]]")
        .next()
        .unwrap()
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace(&format!("output = \"{}/runs/quickstart\"", root.display()), &format!("output = \"out\"\n{run_extra}"))
        .replace("eval_fraction = 0.05", "eval_fraction = 0.0")
}

/// A global `minhash-dedup` sees every dataset in manifest order: the later dataset's near-copies go, and
/// the reason names the record of the first dataset that was kept. `decontaminate` reads its files through
/// the manifest's path grants.
#[test]
fn global_minhash_dedup_and_decontaminate_through_a_manifest() {
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
    let manifest = quickstart_head("")
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

/// `eval_tasks` and `eval_sources`: the host reads GSM8K through the shipped task file and an MMLU folder
/// through the `mmlu` source (a folder of CSVs, which the plugin could not read itself), writes their texts
/// into the cache and hands them to `decontaminate` in `files`, beside the user's own; the plugin is granted
/// those folders only, and the lock and the token cache follow the evaluation data.
#[test]
fn decontaminate_reads_eval_sets_through_source_plugins() {
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let gsm8k: Vec<serde_json::Value> = std::fs::read_to_string(root.join("tests/fixtures/samples/gsm8k/train.first200.jsonl"))
        .unwrap()
        .lines()
        .take(2)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let question = |i: usize| gsm8k[i]["question"].as_str().unwrap().to_string();
    let planet = "Which planet in the solar system has the longest day, measured as one full rotation on its axis?";
    let line = |q: &str, a: &str| serde_json::json!({"instruction": q, "input": "", "output": a}).to_string();
    let training = [
        line(&question(0), "72"),
        line(&format!("Help me with this one. {}", question(1)), "10"),
        line(&planet.to_uppercase(), "Venus"),
        line("Natalia sold clips to her friends.", "Twelve words of a question are not thirteen."),
        line("Summarize the passage.", PROSE),
        line("Write a haiku about autumn leaves falling slowly.", "Red leaves drift and turn, the cold wind carries them home."),
    ];
    std::fs::write(dir.path().join("train.jsonl"), training.join("\n")).unwrap();
    std::fs::write(dir.path().join("extra.txt"), format!("{PROSE}\n")).unwrap();
    let mmlu_csv = dir.path().join("mmlu/test/astronomy_test.csv");
    std::fs::create_dir_all(mmlu_csv.parent().unwrap()).unwrap();
    let black_hole = "\"What is the boundary around a black hole beyond which nothing, not even light, escapes called?\",Photon sphere,Event horizon,Ergosphere,Singularity,B\n";
    std::fs::write(&mmlu_csv, format!("\"{planet}\",Mercury,Venus,Earth,Mars,B\n{black_hole}")).unwrap();
    let manifest = quickstart_head("cache = \"cache\"")
        + r#"
[[dataset]]
name = "train"
source = { plugin = "jsonl", path = "train.jsonl" }

[[filter]]
plugin = "decontaminate"
files = ["extra.txt"]
eval_tasks = ["gsm8k"]
eval_sources = [{ plugin = "mmlu", dir = "mmlu", split = "test" }]
"#;
    let path = dir.path().join("m.toml");
    std::fs::write(&path, &manifest).unwrap();
    let m = Manifest::load(&path).unwrap();

    // The plugin reads its own file and the two sets the host wrote, each in its own folder of the cache.
    let plan = data::Plan::new(&m).unwrap();
    let sets = dir.path().join("cache/eval-sets").canonicalize().unwrap();
    let grants = &plan.resolved.iter().find(|(k, _)| k == "filter[0]").unwrap().1.grants.read_dirs;
    assert_eq!(grants.len(), 3, "{grants:?}");
    assert_eq!(grants.iter().filter(|d| d.parent() == Some(sets.as_path())).count(), 2, "{grants:?}");
    assert!(grants.contains(&dir.path().canonicalize().unwrap()));
    let locked: Vec<&String> = plan.lock.files.keys().filter(|k| k.starts_with("<cache>/eval-sets/")).collect();
    assert_eq!(locked.len(), 2, "{:?}", plan.lock.files);
    assert!(locked.iter().any(|k| k.ends_with("/gsm8k.jsonl")) && locked.iter().any(|k| k.ends_with("/mmlu.jsonl")));
    drop(plan);

    let first = data::prepare(&m).unwrap();
    assert!(!first.from_cache);
    let f = &first.report.global_filters[0];
    let want: std::collections::BTreeMap<String, usize> = [
        ("shares a 13-gram with extra.txt".to_string(), 1),
        ("shares a 13-gram with gsm8k.jsonl".to_string(), 2),
        ("shares a 13-gram with mmlu.jsonl".to_string(), 1),
    ]
    .into();
    assert_eq!((f.plugin.as_str(), f.seen, f.kept), ("decontaminate", 6, 2));
    assert_eq!(f.dropped, want);
    assert!(data::prepare(&m).unwrap().from_cache, "the same eval sets give the same cache key");

    // Another wording of the MMLU question: a new eval set, a new key, and the training record stays.
    std::fs::write(&mmlu_csv, format!("\"Which planet spins slowest of all?\",Mercury,Venus,Earth,Mars,B\n{black_hole}")).unwrap();
    let second = data::prepare(&Manifest::load(&path).unwrap()).unwrap();
    assert!(!second.from_cache, "a changed eval set must not hit the cache");
    assert_ne!(second.report.token_stream_sha256, first.report.token_stream_sha256);
    assert_eq!(second.report.global_filters[0].kept, 3);
    assert!(!second.report.global_filters[0].dropped.contains_key("shares a 13-gram with mmlu.jsonl"));
    let changes = second.lock.diff(&first.lock).join("\n");
    assert!(changes.contains("/mmlu.jsonl`: new") && changes.contains("/mmlu.jsonl`: gone"), "{changes}");
    assert!(!changes.contains("gsm8k.jsonl"), "{changes}");
}

/// A wrong eval set is named by its key in the manifest, with what to do.
#[test]
fn eval_set_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.jsonl"), "{\"instruction\": \"q\", \"output\": \"a\"}\n").unwrap();
    let err = |filter: &str| {
        let text = quickstart_head("cache = \"cache\"")
            + "[[dataset]]\nname = \"train\"\nsource = { plugin = \"jsonl\", path = \"train.jsonl\" }\n\n[[filter]]\nplugin = \"decontaminate\"\n"
            + filter;
        let path = dir.path().join("m.toml");
        std::fs::write(&path, text).unwrap();
        format!("{:#}", data::Plan::new(&Manifest::load(&path).unwrap()).err().expect("expected an error"))
    };
    let e = err("eval_tasks = [\"gsm8k\", \"no-such-task\"]");
    assert!(e.contains("`filter[0].eval_tasks[1]`") && e.contains("no eval task `no-such-task`"), "{e}");
    let e = err("eval_tasks = \"gsm8k\"");
    assert!(e.contains("`filter[0].eval_tasks`: must be a list"), "{e}");
    let e = err("eval_sources = [{ plugin = \"csv\", path = \"missing.csv\" }]");
    assert!(e.contains("filter[0].eval_sources[0]") && e.contains("missing.csv"), "{e}");
    let e = err("eval_sources = [\"eval.csv\"]");
    assert!(e.contains("`filter[0].eval_sources[0]`") && e.contains("source use"), "{e}");
    let e = err("eval_sources = [{ plugin = \"no-such-source\", path = \"train.jsonl\" }]");
    assert!(e.contains("filter[0].eval_sources[0].plugin") && e.contains("no source plugin named"), "{e}");
}
