//! Host-side bindings for the four plugin worlds, generated from `wit/lorahost.wit`.
//!
//! The record types are generated once (with the filter world) and shared by the other worlds, so an
//! `Example` read by a source is the same Rust type a filter and a template receive.

pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter",
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
    });
}

pub mod template {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "template",
        with: { "lorahost:plugin/types": super::filter::lorahost::plugin::types },
    });
}

pub mod scheduler {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "scheduler",
    });
}

pub mod source {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "source",
        with: { "lorahost:plugin/types": super::filter::lorahost::plugin::types },
    });
}

pub use filter::lorahost::plugin::types;

/// The WIT package version this host speaks; a plugin must export its interface at exactly this version.
pub const WIT_VERSION: &str = "0.1.0";
/// The WIT package name.
pub const WIT_PACKAGE: &str = "lorahost:plugin";
