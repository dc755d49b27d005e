//! Writes the `__lorahost_generate!` macro with the absolute path of the WIT package baked in.
//!
//! `wit_bindgen::generate!` only takes a string literal as its path and resolves a relative one against the
//! *plugin* crate's folder, so a macro exported from this crate cannot name the WIT folder relatively.
//! Generating the macro here lets plugin crates live anywhere, inside this repository or out of it.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    // A published copy of the SDK carries the WIT inside itself; in this repository it is two folders up.
    let wit = [manifest_dir.join("wit"), manifest_dir.join("../../wit")]
        .into_iter()
        .find(|p| p.join("lorahost.wit").exists())
        .expect("lorahost-sdk: cannot find the WIT package (wit/lorahost.wit)")
        .canonicalize()
        .unwrap();
    println!("cargo:rerun-if-changed={}", wit.display());
    let wit = wit.to_str().expect("the WIT path must be UTF-8").replace('\\', "/");
    let code = format!(
        r#"/// Generates a plugin crate's bindings for `world`, sharing the SDK's record types. Used by the
/// `export_*!` macros; call those instead.
#[doc(hidden)]
#[macro_export]
macro_rules! __lorahost_generate {{
    // The scheduler world uses no record types, and wit-bindgen rejects a `with` entry it does not use.
    ("scheduler") => {{
        ::lorahost_sdk::__private::wit_bindgen::generate!({{
            path: "{wit}",
            world: "scheduler",
            runtime_path: "::lorahost_sdk::__private::wit_bindgen::rt",
        }});
    }};
    ($world:literal) => {{
        ::lorahost_sdk::__private::wit_bindgen::generate!({{
            path: "{wit}",
            world: $world,
            runtime_path: "::lorahost_sdk::__private::wit_bindgen::rt",
            with: {{ "lorahost:plugin/types@0.1.1": ::lorahost_sdk::types }},
        }});
    }};
}}

/// The folder of the WIT package this SDK was built against.
pub const WIT_DIR: &str = "{wit}";
"#
    );
    fs::write(PathBuf::from(env::var("OUT_DIR").unwrap()).join("generate.rs"), code).unwrap();
}
