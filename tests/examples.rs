//! The example manifests under examples/ work as their comments say.
mod common;

use common::{cargo, repo_root, test_target_dir};
use lorahost::data;
use lorahost::manifest::Manifest;

#[test]
fn the_custom_filter_example_drops_records_that_overlap_the_eval_set() {
    let root = repo_root();
    let crate_dir = root.join("examples/plugins/decontaminate");
    let out = cargo()
        .args(["build", "--release"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", test_target_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let wasm = test_target_dir().join("wasm32-wasip2/release/decontaminate.wasm");

    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("examples/custom-filter.toml"))
        .unwrap()
        .replace("plugins/decontaminate/target/wasm32-wasip2/release/decontaminate.wasm", wasm.to_str().unwrap())
        .replace("\"data/", &format!("\"{}/examples/data/", root.display()))
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace(&format!("output = \"{}/runs/custom-filter\"", root.display()), "output = \"out\"\ncache = \"cache\"");
    let path = dir.path().join("custom.toml");
    std::fs::write(&path, text).unwrap();
    let report = data::prepare(&Manifest::load(&path).unwrap()).unwrap().report;
    let decontam = &report.global_filters[0];
    assert_eq!(decontam.plugin, "decontaminate");
    assert_eq!(decontam.dropped.get("shares a 8-gram with the eval set"), Some(&3));
    assert_eq!(report.datasets[0].kept, 197);
    assert!(report.plugins.iter().any(|p| p.name == "decontaminate" && !p.pinned));
}
