//! `lorahost eval`: score a model (with or without an adapter) on benchmark tasks, compare runs, and check an
//! evaluation set against the training data.
//!
//! - [`task`]: a task as data (TOML): source plugin, prompt templates, few-shot, kind;
//! - [`prompt`]: a record to the text the model sees, as lm-evaluation-harness builds it;
//! - [`lm`]: the [`lm::LanguageModel`] seam (log-likelihoods, per-token log-probabilities, generation) and
//!   its implementation over the model's public API;
//! - [`run`]: one task end to end; [`results`]: the `eval/<task>.json` files; [`stats`]: standard errors
//!   and the paired bootstrap; [`compare`]: runs side by side; [`decontam`]: 13-gram overlap with training.
pub mod compare;
pub mod decontam;
pub mod lm;
pub mod prompt;
pub mod results;
pub mod run;
pub mod stats;
pub mod task;

pub use lm::{LanguageModel, ModelLm};
pub use results::TaskResult;
pub use task::Task;
