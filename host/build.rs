//! Builds the standard plugins (`plugins/`) for wasm32-wasip2 and embeds them in the binary, so that a
//! manifest can name `length` or `cosine` without a path and a fresh clone needs no manual step.
//!
//! The plugins are their own cargo workspace, built by a nested `cargo build` into `target/wasm-plugins`.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const KINDS: [(&str, &str); 5] = [
    ("sources", "Source"),
    ("filters", "Filter"),
    ("templates", "Template"),
    ("schedulers", "Scheduler"),
    ("scorers", "Scorer"),
];
const TARGET: &str = "wasm32-wasip2";

fn main() {
    let host_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = host_dir.parent().unwrap().to_path_buf();
    let plugins = root.join("plugins");
    for p in ["sdk", "shared", "sources", "filters", "templates", "schedulers", "scorers", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", plugins.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let target_dir = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let target_dir = target_dir.join("wasm-plugins");
    ensure_wasm_target();

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build must not leak into the guest build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_PROFILE_RELEASE_DEBUG")
        .status()
        .expect("cannot run cargo to build the standard plugins");
    if !status.success() {
        panic!("building the standard plugins (plugins/) for {TARGET} failed; see the errors above");
    }

    let wasm_dir = target_dir.join(TARGET).join("release");
    let mut table = String::from("/// The standard plugins, built from `plugins/` and embedded at compile time.\n");
    table.push_str("pub static STANDARD: &[StandardPlugin] = &[\n");
    for (folder, kind) in KINDS {
        for name in plugin_names(&plugins.join(folder)) {
            let singular = folder.trim_end_matches('s');
            let file = format!("lorahost_{singular}_{}.wasm", name.replace('-', "_"));
            let path = wasm_dir.join(&file);
            assert!(path.exists(), "expected {} after building the plugins", path.display());
            writeln!(
                table,
                "    StandardPlugin {{ name: {name:?}, kind: PluginKind::{kind}, wasm: include_bytes!({:?}) }},",
                path.display().to_string()
            )
            .unwrap();
        }
    }
    table.push_str("];\n");
    fs::write(PathBuf::from(env::var("OUT_DIR").unwrap()).join("standard_plugins.rs"), table).unwrap();

    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda_kernels(&host_dir);
    }
}

/// With the `cuda` feature: compiles the fused training kernels (src/model/cuda/kernels.cu and what it
/// includes) to PTX with
/// the same nvcc candle uses, for `CUDA_COMPUTE_CAP` (default 90: H100/H200). Loaded at run time by
/// src/model/cuda/mod.rs.
fn build_cuda_kernels(host_dir: &Path) {
    let src = host_dir.join("src/model/cuda/kernels.cu");
    // kernels.cu includes the other .cu / .cuh files of its folder.
    println!("cargo:rerun-if-changed={}", host_dir.join("src/model/cuda").display());
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lorahost_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=sm_{cap}"), "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{nvcc}` to build the CUDA kernels ({e}); put nvcc on PATH or set NVCC"));
    if !status.success() {
        panic!("nvcc failed on {}; see the errors above", src.display());
    }
}

/// Plugin folder names under `dir`, sorted (each holds a Cargo.toml).
fn plugin_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("Cargo.toml").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `rust-toolchain.toml` names the target, but rustup installs it only with the toolchain itself; when the
/// toolchain was already there, add the target now.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().expect("cannot run rustc");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).exists() {
        return;
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", TARGET]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        cmd.args(["--toolchain", &toolchain]);
    }
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        panic!("the {TARGET} target is missing and `rustup target add {TARGET}` failed: install it, then build again");
    }
}
