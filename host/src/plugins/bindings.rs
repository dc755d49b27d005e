//! Host-side bindings for the five plugin worlds, generated from `wit/lorahost.wit`.
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

pub mod scorer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "scorer",
        with: { "lorahost:plugin/types": super::filter::lorahost::plugin::types },
    });
}

pub use filter::lorahost::plugin::types;

/// The WIT package version this host speaks. A plugin built for this version or an earlier one of the same
/// 0.MINOR line loads (wasmtime matches `@0.1.0` exports to `@0.1.1` lookups); see [`compatible`].
pub const WIT_VERSION: &str = "0.1.1";

/// Whether a plugin built for contract `version` runs on this host: the same `0.MINOR` line, and not newer
/// than [`WIT_VERSION`] (a newer plugin may use what this host does not have).
pub fn compatible(version: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
        let t = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(t)
    };
    match (parse(version), parse(WIT_VERSION)) {
        (Some((0, minor, patch)), Some((0, host_minor, host_patch))) => minor == host_minor && patch <= host_patch,
        _ => false,
    }
}
/// The WIT package name.
pub const WIT_PACKAGE: &str = "lorahost:plugin";
