//! Hostile plugins: each must end in a clear error naming the plugin, with the host still healthy and a
//! following valid run succeeding.
mod common;

use common::{examples, hostile_wasm};
use lorahost::plugins::{
    standard, Failure, Grants, Limits, LoadedPlugin, PluginEngine, PluginError, PluginKind, RecordFilter, Verdict,
    WasmFilter,
};
use std::time::{Duration, Instant};

fn engine() -> PluginEngine {
    PluginEngine::new(None).unwrap()
}

fn load(engine: &PluginEngine, name: &str) -> LoadedPlugin {
    engine.load_file(name, &hostile_wasm(name)).unwrap()
}

fn grants(limits: Limits) -> Grants {
    Grants { limits, ..Grants::default() }
}

/// After any failure, a well-behaved plugin must still work in the same process.
fn assert_host_healthy(engine: &PluginEngine) {
    let noop = engine.load("noop", standard::find(PluginKind::Filter, "noop").unwrap().wasm).unwrap();
    let mut f = WasmFilter::new(engine, &noop, &Grants::default(), "").unwrap();
    let batch = examples(8);
    assert_eq!(f.filter_batch(&batch).unwrap(), vec![Verdict::Keep; 8]);
}

/// Checks the error names the plugin and its digest, and returns the failure.
fn failure(err: PluginError, plugin: &LoadedPlugin) -> Failure {
    let text = err.to_string();
    assert!(text.contains(&format!("plugin `{}`", plugin.name)), "error does not name the plugin: {text}");
    assert!(text.contains(&plugin.digest[..12]), "error does not name the digest: {text}");
    err.failure
}

#[test]
fn infinite_loop_hits_the_deadline() {
    let engine = engine();
    let plugin = load(&engine, "infinite-loop");
    let limits = Limits { timeout_ms: 300, ..Limits::default() };
    let mut f = WasmFilter::new(&engine, &plugin, &grants(limits), "").unwrap();
    let start = Instant::now();
    let err = f.filter_batch(&examples(2)).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "the deadline took {:?}", start.elapsed());
    assert_eq!(err.call, "filter-batch");
    assert_eq!(failure(err, &plugin), Failure::Timeout(Duration::from_millis(300)));
    // A trapped instance is never re-entered.
    assert_eq!(f.filter_batch(&examples(1)).unwrap_err().failure, Failure::Poisoned);
    assert_host_healthy(&engine);
}

#[test]
fn infinite_loop_runs_out_of_fuel_deterministically() {
    let engine = engine();
    let plugin = load(&engine, "infinite-loop");
    let limits = Limits { fuel: Some(5_000_000), ..Limits::default() };
    let mut f = WasmFilter::new(&engine, &plugin, &grants(limits), "").unwrap();
    let err = f.filter_batch(&examples(2)).unwrap_err();
    assert_eq!(failure(err, &plugin), Failure::OutOfFuel(5_000_000));
    assert_host_healthy(&engine);
}

#[test]
fn memory_bomb_hits_the_cap() {
    let engine = engine();
    let plugin = load(&engine, "memory-bomb");
    let limits = Limits { memory_mb: 64, ..Limits::default() };
    let mut f = WasmFilter::new(&engine, &plugin, &grants(limits), "").unwrap();
    let err = f.filter_batch(&examples(1)).unwrap_err();
    let text = err.to_string();
    assert_eq!(failure(err, &plugin), Failure::MemoryCap(64 << 20));
    assert!(text.contains("memory cap of 64 MiB"), "{text}");
    assert_host_healthy(&engine);
}

#[test]
fn reads_outside_the_grant_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("inside.txt"), "fine").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "TOP SECRET").unwrap();
    let data = data.canonicalize().unwrap();
    let config = format!(
        "allowed = {:?}\nforbidden = [\"/etc/passwd\", {:?}, {:?}, \"../secret.txt\"]\n",
        data.join("inside.txt").to_str().unwrap(),
        data.join("../secret.txt").to_str().unwrap(),
        dir.path().join("secret.txt").canonicalize().unwrap().to_str().unwrap(),
    );
    let engine = engine();
    let plugin = load(&engine, "read-outside");
    let g = Grants { read_dirs: vec![data.clone()], ..Grants::default() };
    let err = WasmFilter::new(&engine, &plugin, &g, &config).err().expect("a forbidden read succeeded");
    assert_eq!(err.call, "init");
    let Failure::Refused(msg) = failure(err, &plugin) else { panic!("expected the plugin's own refusal") };
    assert!(msg.starts_with("sandbox held:"), "{msg}");
    assert!(msg.contains("/etc/passwd") && msg.contains("../secret.txt"), "{msg}");
    assert!(!msg.contains("TOP SECRET"));
    assert_host_healthy(&engine);
}

#[test]
fn sockets_are_not_even_linked() {
    let engine = engine();
    let plugin = load(&engine, "socket");
    let err = WasmFilter::new(&engine, &plugin, &Grants::default(), "").err().expect("a socket plugin started");
    assert_eq!(err.call, "instantiate");
    let Failure::Link(msg) = failure(err, &plugin) else { panic!("expected a link failure") };
    assert!(msg.contains("wasi:sockets"), "{msg}");
    assert_host_healthy(&engine);
}

#[test]
fn a_panic_is_reported_with_its_message() {
    let engine = engine();
    let plugin = load(&engine, "panic");
    let mut f = WasmFilter::new(&engine, &plugin, &Grants::default(), "").unwrap();
    let err = f.filter_batch(&examples(3)).unwrap_err();
    let Failure::Panic(msg) = failure(err, &plugin) else { panic!("expected a panic") };
    assert!(msg.contains("hostile panic on record t:0"), "{msg}");
    assert_host_healthy(&engine);
}

#[test]
fn a_reply_of_the_wrong_length_is_malformed() {
    let engine = engine();
    let plugin = load(&engine, "wrong-length");
    let mut f = WasmFilter::new(&engine, &plugin, &Grants::default(), "").unwrap();
    let err = f.filter_batch(&examples(4)).unwrap_err();
    assert_eq!(failure(err, &plugin), Failure::Malformed("3 verdicts for a batch of 4 records".into()));
    assert_host_healthy(&engine);
}

#[test]
fn a_component_of_another_world_is_refused() {
    let engine = engine();
    let chatml = engine.load("chatml", standard::find(PluginKind::Template, "chatml").unwrap().wasm).unwrap();
    let err = WasmFilter::new(&engine, &chatml, &Grants::default(), "").err().unwrap();
    assert_eq!(
        failure(err, &chatml),
        Failure::WrongKind { expected: "filter".into(), found: "template".into() }
    );
    assert_host_healthy(&engine);
}

#[test]
fn a_component_of_another_wit_version_is_refused() {
    let engine = engine();
    let plugin = load(&engine, "old-wit");
    assert_eq!(plugin.info.wit_version.as_deref(), Some("0.0.1"));
    let err = WasmFilter::new(&engine, &plugin, &Grants::default(), "").err().unwrap();
    let text = err.to_string();
    assert_eq!(
        failure(err, &plugin),
        Failure::WrongVersion { expected: "lorahost:plugin@0.1.1".into(), found: "lorahost:plugin@0.0.1".into() }
    );
    assert!(text.contains("rebuild it against the matching lorahost-sdk"), "{text}");
    assert_host_healthy(&engine);
}

#[test]
fn a_plugin_of_an_earlier_compatible_contract_still_runs() {
    let engine = engine();
    let plugin = load(&engine, "contract-0-1-0");
    assert_eq!(plugin.info.wit_version.as_deref(), Some("0.1.0"));
    let mut f = WasmFilter::new(&engine, &plugin, &Grants::default(), "").unwrap();
    let batch = vec![common::example("a:keep", "q", "a"), common::example("b:drop", "q", "a")];
    let verdicts = f.filter_batch(&batch).unwrap();
    assert_eq!(verdicts, vec![Verdict::Keep, Verdict::Drop("old".into())]);
    // Newer than this host, or another 0.MINOR line: refused.
    for v in ["0.1.2", "0.2.0", "1.1.0", "0.1"] {
        assert!(!lorahost::plugins::bindings::compatible(v), "{v}");
    }
    assert!(lorahost::plugins::bindings::compatible("0.1.0") && lorahost::plugins::bindings::compatible("0.1.1"));
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let engine = engine();
    let err = engine.load("garbage", b"#!/bin/sh\nrm -rf /\n").err().unwrap();
    assert_eq!(err.call, "load");
    assert!(matches!(err.failure, Failure::Invalid(_)), "{err}");
    assert!(err.to_string().contains("plugin `garbage`"));
    assert_host_healthy(&engine);
}

#[test]
fn the_sandbox_shows_no_environment_clock_or_host_randomness() {
    let engine = engine();
    let plugin = load(&engine, "snoop");
    let look = |seed: u64| {
        let g = Grants { seed, ..Grants::default() };
        let mut f = WasmFilter::new(&engine, &plugin, &g, "").unwrap();
        match f.filter_batch(&examples(1)).unwrap().pop().unwrap() {
            Verdict::Rewrite(e) => e.meta,
            v => panic!("expected a rewrite, got {v:?}"),
        }
    };
    let a = look(7);
    let get = |k: &str| a.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str()).unwrap();
    assert_eq!(get("env"), "0", "the plugin saw environment variables");
    assert_eq!(get("args"), "0");
    assert_eq!(get("wall_secs"), "0", "the plugin saw the host clock");
    assert_eq!(get("cwd_entries"), "0", "the plugin could list a working directory");
    // Randomness comes from the seed: the same seed gives the same hash keys, another seed others.
    assert_eq!(look(7), a);
    assert_ne!(look(8), a);
}

#[test]
fn compiled_plugins_are_cached_by_digest() {
    let cache = tempfile::tempdir().unwrap();
    let wasm = standard::find(PluginKind::Filter, "length").unwrap().wasm;
    let first = PluginEngine::new(Some(cache.path().into())).unwrap().load("length", wasm).unwrap();
    assert!(!first.from_cache);
    // A new engine (a later run) loads the artifact instead of compiling.
    let engine = PluginEngine::new(Some(cache.path().into())).unwrap();
    let second = engine.load("length", wasm).unwrap();
    assert!(second.from_cache, "the second load recompiled");
    assert_eq!(first.digest, second.digest);
    // A corrupt cache entry is recompiled, not trusted.
    for entry in std::fs::read_dir(cache.path().join("plugins")).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let third = engine.load("length", wasm).unwrap();
    assert!(!third.from_cache);
    let mut f = WasmFilter::new(&engine, &third, &Grants::default(), "max = 20").unwrap();
    let v = f.filter_batch(&examples(3)).unwrap();
    assert_eq!(v[0], Verdict::Keep);
    assert_eq!(v[2], Verdict::Drop("longer than 20 chars".into()));
}

#[test]
fn a_rejected_configuration_names_the_problem() {
    let engine = engine();
    let wasm = standard::find(PluginKind::Filter, "length").unwrap().wasm;
    let plugin = engine.load("length", wasm).unwrap();
    let err = WasmFilter::new(&engine, &plugin, &Grants::default(), "min = 10\nmax = 5").err().unwrap();
    assert_eq!(err.call, "init");
    assert_eq!(failure(err, &plugin), Failure::Refused("min (10) is greater than max (5)".into()));
    let err = WasmFilter::new(&engine, &plugin, &Grants::default(), "maximum = 5").err().unwrap();
    let Failure::Refused(msg) = err.failure else { panic!() };
    assert!(msg.contains("maximum"), "{msg}");
}
