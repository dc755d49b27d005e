//! # lorahost-sdk: write a lorahost plugin in a few lines
//!
//! A plugin is a Rust crate built for `wasm32-wasip2`. Implement one of the five traits and export it with
//! the matching macro, at the crate root:
//!
//! ```ignore
//! use lorahost_sdk::{Example, Filter, Verdict};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { max_chars: usize }
//!
//! struct NoLongRecords(Config);
//!
//! impl Filter for NoLongRecords {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> { Ok(Self(config)) }
//!     fn filter(&mut self, example: &Example) -> Verdict {
//!         if example.chars() > self.0.max_chars { Verdict::Drop("too long".into()) } else { Verdict::Keep }
//!     }
//! }
//!
//! lorahost_sdk::export_filter!(NoLongRecords);
//! ```
//!
//! `lorahost plugin new filter <name>` writes such a crate for you. The configuration is the plugin's table
//! from the run manifest, deserialized into `Config` with serde (unknown keys are yours to reject with
//! `#[serde(deny_unknown_fields)]`).
//!
//! The same trait implementations can also be compiled natively for the `trusted = true` escape hatch
//! (see [`native`]), for code that needs a C library or a large model.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "sdk-types",
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
    });
}

pub mod native;
mod record;

/// The record types shared by every plugin, generated from `wit/lorahost.wit`.
pub use bindings::lorahost::plugin::types;
pub use types::{Batch, Example, Segment, TemplateInfo, Turn, Verdict};
pub use record::TrainOn;

use serde::de::DeserializeOwned;

include!(concat!(env!("OUT_DIR"), "/generate.rs"));

/// The size a source's batch should stop growing at (bytes of [`Example::bytes`]): the host asks for
/// fewer records when they are long, and a source returns fewer than asked once a batch holds this much,
/// so one reply stays far below what a call may copy into the host (`limits.reply_mb`). The host sizes
/// its requests by the same number (`host/src/data/read.rs`, `BATCH_BYTES`).
pub const REPLY_BYTES: usize = 16 << 20;

/// Reads records. One value per `open` call; the host asks for batches until `None`.
pub trait Source: Sized + 'static {
    type Config: DeserializeOwned;
    fn open(config: Self::Config) -> Result<Self, String>;
    /// At most `max` records (fewer once the batch holds [`REPLY_BYTES`]), or `None` once the input is
    /// exhausted. Records that cannot be read go into
    /// `Batch::malformed` (naming file and line) rather than failing the call: the manifest decides whether
    /// they stop the run. Return `Err` only when the input cannot be read at all.
    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String>;
}

/// Keeps, drops or rewrites records. The same value sees every batch of a dataset, so it may keep state
/// (for example the hashes a de-duplicator has seen).
pub trait Filter: Sized + 'static {
    type Config: DeserializeOwned;
    fn new(config: Self::Config) -> Result<Self, String>;
    fn filter(&mut self, example: &Example) -> Verdict;
    /// One verdict per record. Override to work on the whole batch at once, or to stop the run with an
    /// error (the message is shown with the plugin's name).
    fn filter_batch(&mut self, batch: &[Example]) -> Result<Vec<Verdict>, String> {
        Ok(batch.iter().map(|e| self.filter(e)).collect())
    }
}

/// Renders a conversation as segments; trained segments are what the loss is computed on.
pub trait Template: Sized + 'static {
    type Config: DeserializeOwned;
    fn new(config: Self::Config) -> Result<Self, String>;
    /// The special token that ends a response (appended in training, where generation stops).
    fn eos(&self) -> String;
    fn render(&self, example: &Example) -> Result<Vec<Segment>, String>;
}

/// The learning rate at each optimizer step.
pub trait Scheduler: Sized + 'static {
    type Config: DeserializeOwned;
    fn new(config: Self::Config) -> Result<Self, String>;
    /// Learning rate at 0-based `step` of `total`, given the manifest's `base` rate.
    fn lr(&self, step: u64, total: u64, base: f64) -> f64;
}

/// Scores one generation of `lorahost eval` against the record's references.
pub trait Scorer: Sized + 'static {
    type Config: DeserializeOwned;
    fn new(config: Self::Config) -> Result<Self, String>;
    /// `generation` is the model's output cut at the task's stop strings; `example` the evaluation record;
    /// `references` the answers the task names for it. An error stops the evaluation and names the plugin.
    fn score(&mut self, generation: &str, example: &Example, references: &[String]) -> Result<Score, String>;
}

/// A scorer's verdict on one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// Metric name and value; every score of one scorer names the same metrics in the same order, the first
    /// being the task's main metric.
    pub metrics: Vec<(String, f64)>,
    /// The answer read out of the generation, shown in the per-record results.
    pub extracted: String,
}

impl Score {
    pub fn new<'a>(extracted: impl Into<String>, metrics: impl IntoIterator<Item = (&'a str, f64)>) -> Score {
        Score { extracted: extracted.into(), metrics: metrics.into_iter().map(|(k, v)| (k.to_string(), v)).collect() }
    }
}

/// Parses a plugin's configuration (its manifest table as TOML text).
pub fn parse_config<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| format!("invalid configuration: {}", e.message().trim_end()))
}

/// A configuration for plugins that take no options: any key in it is an error.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Used by the export macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    use super::*;
    use std::cell::RefCell;

    pub fn init<T: Filter>(slot: &RefCell<Option<T>>, config: &str) -> Result<(), String> {
        *slot.borrow_mut() = Some(T::new(parse_config(config)?)?);
        Ok(())
    }

    pub fn filter_batch<T: Filter>(
        slot: &RefCell<Option<T>>,
        batch: Vec<Example>,
    ) -> Result<Vec<Verdict>, String> {
        let mut slot = slot.borrow_mut();
        let filter = slot.as_mut().ok_or("filter-batch called before init")?;
        filter.filter_batch(&batch)
    }

    pub fn template_init<T: Template>(
        slot: &RefCell<Option<T>>,
        config: &str,
    ) -> Result<TemplateInfo, String> {
        let template = T::new(parse_config(config)?)?;
        let info = TemplateInfo { eos: template.eos() };
        *slot.borrow_mut() = Some(template);
        Ok(info)
    }

    pub fn render_batch<T: Template>(
        slot: &RefCell<Option<T>>,
        batch: Vec<Example>,
    ) -> Vec<Result<Vec<Segment>, String>> {
        let slot = slot.borrow();
        match slot.as_ref() {
            Some(t) => batch.iter().map(|e| t.render(e)).collect(),
            None => batch.iter().map(|_| Err("render-batch called before init".into())).collect(),
        }
    }

    pub fn scheduler_init<T: Scheduler>(slot: &RefCell<Option<T>>, config: &str) -> Result<(), String> {
        *slot.borrow_mut() = Some(T::new(parse_config(config)?)?);
        Ok(())
    }

    pub fn lr<T: Scheduler>(slot: &RefCell<Option<T>>, step: u64, total: u64, base: f64) -> f64 {
        // The host always calls init first; NaN makes a broken call impossible to miss.
        slot.borrow().as_ref().map_or(f64::NAN, |s| s.lr(step, total, base))
    }

    pub fn scorer_init<T: Scorer>(slot: &RefCell<Option<T>>, config: &str) -> Result<(), String> {
        *slot.borrow_mut() = Some(T::new(parse_config(config)?)?);
        Ok(())
    }

    /// Scores a batch; the plugin crate converts its generated request type into these parts.
    pub fn score_batch<T: Scorer, R>(
        slot: &RefCell<Option<T>>,
        batch: Vec<R>,
        parts: impl Fn(R) -> (String, Example, Vec<String>),
    ) -> Result<Vec<Score>, String> {
        let mut slot = slot.borrow_mut();
        let scorer = slot.as_mut().ok_or("score-batch called before init")?;
        batch.into_iter().map(parts).map(|(g, e, r)| scorer.score(&g, &e, &r)).collect()
    }

    pub fn open<T: Source>(config: &str) -> Result<RefCell<T>, String> {
        Ok(RefCell::new(T::open(parse_config(config)?)?))
    }

    pub fn next_batch<T: Source>(
        reader: &RefCell<T>,
        max: u32,
    ) -> Result<Option<Batch>, String> {
        reader.borrow_mut().next_batch(max as usize)
    }
}

/// Exports a [`Filter`] as this crate's plugin. Call once, at the crate root.
#[macro_export]
macro_rules! export_filter {
    ($plugin:ty) => {
        $crate::__lorahost_generate!("filter");
        ::std::thread_local! {
            static __LORAHOST_FILTER: ::std::cell::RefCell<Option<$plugin>> = const { ::std::cell::RefCell::new(None) };
        }
        struct __LorahostExport;
        impl exports::lorahost::plugin::filter_api::Guest for __LorahostExport {
            fn init(config: String) -> Result<(), String> {
                __LORAHOST_FILTER.with(|s| $crate::__private::init(s, &config))
            }
            fn filter_batch(batch: Vec<$crate::Example>) -> Result<Vec<$crate::Verdict>, String> {
                __LORAHOST_FILTER.with(|s| $crate::__private::filter_batch(s, batch))
            }
        }
        export!(__LorahostExport);
    };
}

/// Exports a [`Template`] as this crate's plugin. Call once, at the crate root.
#[macro_export]
macro_rules! export_template {
    ($plugin:ty) => {
        $crate::__lorahost_generate!("template");
        ::std::thread_local! {
            static __LORAHOST_TEMPLATE: ::std::cell::RefCell<Option<$plugin>> = const { ::std::cell::RefCell::new(None) };
        }
        struct __LorahostExport;
        impl exports::lorahost::plugin::template_api::Guest for __LorahostExport {
            fn init(config: String) -> Result<$crate::TemplateInfo, String> {
                __LORAHOST_TEMPLATE.with(|s| $crate::__private::template_init(s, &config))
            }
            fn render_batch(
                batch: Vec<$crate::Example>,
            ) -> Vec<Result<Vec<$crate::Segment>, String>> {
                __LORAHOST_TEMPLATE.with(|s| $crate::__private::render_batch(s, batch))
            }
        }
        export!(__LorahostExport);
    };
}

/// Exports a [`Scheduler`] as this crate's plugin. Call once, at the crate root.
#[macro_export]
macro_rules! export_scheduler {
    ($plugin:ty) => {
        $crate::__lorahost_generate!("scheduler");
        ::std::thread_local! {
            static __LORAHOST_SCHEDULER: ::std::cell::RefCell<Option<$plugin>> = const { ::std::cell::RefCell::new(None) };
        }
        struct __LorahostExport;
        impl exports::lorahost::plugin::scheduler_api::Guest for __LorahostExport {
            fn init(config: String) -> Result<(), String> {
                __LORAHOST_SCHEDULER.with(|s| $crate::__private::scheduler_init(s, &config))
            }
            fn lr(step: u64, total: u64, base: f64) -> f64 {
                __LORAHOST_SCHEDULER.with(|s| $crate::__private::lr(s, step, total, base))
            }
        }
        export!(__LorahostExport);
    };
}

/// Exports a [`Source`] as this crate's plugin. Call once, at the crate root.
#[macro_export]
macro_rules! export_source {
    ($plugin:ty) => {
        $crate::__lorahost_generate!("source");
        struct __LorahostReader(::std::cell::RefCell<$plugin>);
        impl exports::lorahost::plugin::source_api::GuestReader for __LorahostReader {
            fn next_batch(&self, max: u32) -> Result<Option<$crate::Batch>, String> {
                $crate::__private::next_batch(&self.0, max)
            }
        }
        struct __LorahostExport;
        impl exports::lorahost::plugin::source_api::Guest for __LorahostExport {
            type Reader = __LorahostReader;
            fn open(config: String) -> Result<exports::lorahost::plugin::source_api::Reader, String> {
                let reader = $crate::__private::open::<$plugin>(&config)?;
                Ok(exports::lorahost::plugin::source_api::Reader::new(__LorahostReader(reader)))
            }
        }
        export!(__LorahostExport);
    };
}

/// Exports a [`Scorer`] as this crate's plugin. Call once, at the crate root.
#[macro_export]
macro_rules! export_scorer {
    ($plugin:ty) => {
        $crate::__lorahost_generate!("scorer");
        ::std::thread_local! {
            static __LORAHOST_SCORER: ::std::cell::RefCell<Option<$plugin>> = const { ::std::cell::RefCell::new(None) };
        }
        struct __LorahostExport;
        impl exports::lorahost::plugin::scorer_api::Guest for __LorahostExport {
            fn init(config: String) -> Result<(), String> {
                __LORAHOST_SCORER.with(|s| $crate::__private::scorer_init(s, &config))
            }
            fn score_batch(
                batch: Vec<exports::lorahost::plugin::scorer_api::ScoringRequest>,
            ) -> Result<Vec<exports::lorahost::plugin::scorer_api::Scored>, String> {
                let scores = __LORAHOST_SCORER.with(|s| {
                    $crate::__private::score_batch(s, batch, |r| (r.generation, r.example, r.references))
                })?;
                Ok(scores
                    .into_iter()
                    .map(|s| exports::lorahost::plugin::scorer_api::Scored { metrics: s.metrics, extracted: s.extracted })
                    .collect())
            }
        }
        export!(__LorahostExport);
    };
}
