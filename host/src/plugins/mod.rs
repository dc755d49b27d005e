//! Sandboxed WebAssembly plugins: sources, filters, templates, schedulers and scorers.
//!
//! The contract is `wit/lorahost.wit`. This module drives it, like ripgrep's `searcher` drives a `matcher`:
//!
//! - [`engine`]: one wasmtime engine, the compile cache, reading a component's kind and version;
//! - [`sandbox`]: what an instance may touch (WASI grants) and the limits on each call;
//! - [`instance`]: one running plugin and the guard around every call into it;
//! - [`filter`], [`template`], [`scheduler`], [`source`], [`scorer`]: typed wrappers, one per world;
//! - [`native`]: the `trusted = true` escape hatch for native libraries;
//! - [`standard`]: the plugins embedded in the binary; [`inspect`] and [`scaffold`]: the `plugin` commands.
pub mod bindings;
pub mod engine;
pub mod error;
pub mod filter;
pub mod inspect;
mod instance;
pub mod kind;
pub mod native;
pub mod sandbox;
pub mod scaffold;
pub mod scheduler;
pub mod scorer;
pub mod source;
pub mod standard;
pub mod template;

pub use bindings::types::{Batch, Example, Segment, TemplateInfo, Turn, Verdict};
pub use engine::{ComponentInfo, LoadedPlugin, PluginEngine};
pub use error::{Failure, PluginError};
pub use filter::{RecordFilter, WasmFilter};
pub use kind::PluginKind;
pub use native::NativePlugin;
pub use sandbox::{Grants, Limits};
pub use scheduler::WasmScheduler;
pub use scorer::WasmScorer;
pub use source::{RecordSource, WasmSource};
pub use template::WasmTemplate;
