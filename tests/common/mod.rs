//! Shared helpers for the integration tests: building test plugins, small records.
#![allow(dead_code)]
use lorahost::plugins::{Example, Turn};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `[run]` and `[model]` tables of a test manifest: the tiny model on the CPU in f32, the fixture
/// tokenizer; paths as given (relative ones resolve against the manifest's folder). The caller appends the
/// rest (`[model.tiny]`, `[lora]`, `[train]`, data).
pub fn manifest_head(name: &str, seed: Option<u64>, output: &str, cache: &str, model: &str) -> String {
    let seed = seed.map(|s| format!("seed = {s}\n")).unwrap_or_default();
    let tok = repo_root().join("tests/fixtures/tokenizer/qwen.tiktoken").display().to_string();
    format!(
        "[run]\nname = {name:?}\n{seed}output = {output:?}\ncache = {cache:?}\n\n[model]\npath = {model:?}\ndtype = \"f32\"\ndevice = \"cpu\"\ntokenizer = {tok:?}\n"
    )
}

/// Where test plugins are built; shared by every test binary (cargo's own lock serialises builds).
pub fn test_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("wasm-tests")
}

/// `cargo` with the host build's flags removed, so nested builds behave as on a developer's shell.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs the `lorahost` binary of this build with `args` in `cwd`.
pub fn lorahost(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lorahost")).args(args).current_dir(cwd).output().unwrap()
}

/// Everything a command printed, stdout then stderr.
pub fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run cargo for {what}: {e}"));
    assert!(out.status.success(), "building {what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The hostile test plugins (tests/hostile), built once per test binary; returns the path of `name`.
pub fn hostile_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = cargo();
        cmd.args(["build", "--release", "--target", "wasm32-wasip2", "--workspace", "--exclude", "native-length"])
            .arg("--manifest-path")
            .arg(repo_root().join("tests/hostile/Cargo.toml"))
            .arg("--target-dir")
            .arg(test_target_dir());
        run(cmd, "the hostile test plugins");
    });
    test_target_dir().join("wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")))
}

/// The native test plugin (a shared library for this machine).
pub fn native_lib(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = cargo();
        cmd.args(["build", "--release", "-p", name])
            .arg("--manifest-path")
            .arg(repo_root().join("tests/hostile/Cargo.toml"))
            .arg("--target-dir")
            .arg(test_target_dir().join("native"));
        run(cmd, "the native test plugin");
    });
    let file = format!("{}{}{}", std::env::consts::DLL_PREFIX, name.replace('-', "_"), std::env::consts::DLL_SUFFIX);
    test_target_dir().join("native/release").join(file)
}

/// A two-turn record with the given id and answer.
pub fn example(id: &str, question: &str, answer: &str) -> Example {
    Example {
        id: id.into(),
        dataset: "test".into(),
        turns: vec![
            Turn { role: "user".into(), content: question.into() },
            Turn { role: "assistant".into(), content: answer.into() },
        ],
        meta: vec![],
    }
}

pub fn examples(n: usize) -> Vec<Example> {
    (0..n).map(|i| example(&format!("t:{i}"), &format!("question {i}"), &"answer ".repeat(i + 1))).collect()
}
