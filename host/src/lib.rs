//! lorahost: LoRA fine-tuning on one GPU, with every data and schedule step a sandboxed plugin.
//!
//! The data path reads as a straight line: source -> filters -> mix -> template -> tokens -> batches -> model.
//! [`plugins`] runs the sandboxed stages; the CLI (`src/main.rs`) is a thin layer over this library.
pub mod bench;
pub mod data;
pub mod eval;
pub mod fsutil;
pub mod import;
pub mod manifest;
pub mod model;
pub mod plugins;
pub mod rng;
pub mod run_folder;
pub mod serve;
pub mod tokenizer;
pub mod train;
