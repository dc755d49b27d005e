//! Plugins as their authors make them: a scaffolded crate outside the workspace, and the native escape
//! hatch.
mod common;

use common::{cargo, examples, native_lib, test_target_dir};
use lorahost::plugins::{
    inspect, scaffold, Failure, Grants, NativePlugin, PluginEngine, PluginKind, RecordFilter, Verdict, WasmFilter,
    WasmScheduler,
};

/// Scaffolds `kind` into a temporary folder outside the repository and builds it as a user would.
fn scaffold_and_build(kind: PluginKind, name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sdk = scaffold::default_sdk_path().expect("the SDK is in the source tree");
    let root = scaffold::scaffold(kind, name, dir.path(), &sdk).unwrap();
    let out = cargo()
        .args(["build", "--release"])
        .current_dir(&root)
        // Reuse the dependencies the hostile plugins already compiled (same profile settings).
        .env("CARGO_TARGET_DIR", test_target_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "the scaffolded {kind} does not build:\n{}", String::from_utf8_lossy(&out.stderr));
    let wasm = test_target_dir().join("wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")));
    (dir, wasm)
}

#[test]
fn a_scaffolded_filter_builds_outside_the_workspace_loads_and_runs() {
    let (_dir, wasm) = scaffold_and_build(PluginKind::Filter, "scaffold-test-filter");
    let engine = PluginEngine::new(None).unwrap();
    let report = inspect::inspect(&engine, &wasm).unwrap();
    assert_eq!(report.kind.as_deref(), Some("filter"));
    assert_eq!(report.wit.as_deref(), Some("lorahost:plugin@0.1.1"));
    assert!(!report.imports.iter().any(|i| i.starts_with("wasi:sockets")));

    let plugin = engine.load_file("scaffold-test-filter", &wasm).unwrap();
    let mut f = WasmFilter::new(&engine, &plugin, &Grants::default(), "banned = \"question 1\"").unwrap();
    let v = f.filter_batch(&examples(3)).unwrap();
    assert_eq!(v, vec![Verdict::Keep, Verdict::Drop("contains \"question 1\"".into()), Verdict::Keep]);
}

#[test]
fn a_scaffolded_scheduler_builds_and_computes() {
    let (_dir, wasm) = scaffold_and_build(PluginKind::Scheduler, "scaffold-test-scheduler");
    let engine = PluginEngine::new(None).unwrap();
    let plugin = engine.load_file("scaffold-test-scheduler", &wasm).unwrap();
    let mut s = WasmScheduler::new(&engine, &plugin, &Grants::default(), "factor = 0.5\nevery = 10").unwrap();
    assert_eq!(s.lr(0, 100, 1e-4).unwrap(), 1e-4);
    assert_eq!(s.lr(25, 100, 1e-4).unwrap(), 0.25e-4);
    let err = WasmScheduler::new(&engine, &plugin, &Grants::default(), "factor = 0.5\nevery = 0").err().unwrap();
    assert_eq!(err.failure, Failure::Refused("`every` must be at least 1".into()));
}

#[test]
fn a_scaffolded_scorer_builds_and_scores() {
    use lorahost::plugins::scorer::ScoringRequest;
    let (_dir, wasm) = scaffold_and_build(PluginKind::Scorer, "scaffold-test-scorer");
    let engine = PluginEngine::new(None).unwrap();
    let plugin = engine.load_file("scaffold-test-scorer", &wasm).unwrap();
    assert_eq!(plugin.info.kind, Some(PluginKind::Scorer));
    let mut s = lorahost::plugins::WasmScorer::new(&engine, &plugin, &Grants::default(), "contains = true").unwrap();
    let e = examples(1).remove(0);
    let req = |g: &str| ScoringRequest { generation: g.into(), example: e.clone(), references: vec!["Paris".into()] };
    let out = s.score_batch(&[req("It is Paris."), req("Lyon")]).unwrap();
    assert_eq!((out[0].metrics.clone(), out[1].metrics[0].1), (vec![("match".to_string(), 1.0)], 0.0));
    assert_eq!(out[0].extracted, "It is Paris.");
}

#[test]
fn scaffolding_refuses_bad_names_and_existing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = scaffold::default_sdk_path().unwrap();
    let err = scaffold::scaffold(PluginKind::Filter, "Bad Name", dir.path(), &sdk).unwrap_err();
    assert!(err.to_string().contains("lowercase"), "{err}");
    scaffold::scaffold(PluginKind::Source, "twice", dir.path(), &sdk).unwrap();
    let err = scaffold::scaffold(PluginKind::Source, "twice", dir.path(), &sdk).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn a_native_filter_loads_only_when_trusted() {
    let lib = native_lib("native-length");
    let err = NativePlugin::open("native-length", &lib, PluginKind::Filter, false, "max_chars = 20").err().unwrap();
    let Failure::Link(msg) = err.failure else { panic!("expected a refusal") };
    assert!(msg.contains("trusted = true") && msg.contains("unsandboxed"), "{msg}");

    let mut f = NativePlugin::open("native-length", &lib, PluginKind::Filter, true, "max_chars = 25").unwrap();
    let v = f.filter_batch(&examples(3)).unwrap();
    assert_eq!(v, vec![Verdict::Keep, Verdict::Keep, Verdict::Drop("too long".into())]);

    // Its own config check and the kind check work as for wasm plugins.
    let err = NativePlugin::open("native-length", &lib, PluginKind::Filter, true, "max_chars = 0").err().unwrap();
    assert_eq!(err.failure, Failure::Refused("max_chars must be at least 1".into()));
    let err = NativePlugin::open("native-length", &lib, PluginKind::Source, true, "max_chars = 5").err().unwrap();
    assert_eq!(err.failure, Failure::WrongKind { expected: "source".into(), found: "filter".into() });

    let engine = PluginEngine::new(None).unwrap();
    assert!(inspect::inspect(&engine, &lib).unwrap().native);
}
