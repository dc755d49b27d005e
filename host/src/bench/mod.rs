//! `lorahost bench`: measured numbers for BENCHMARKS.md. Each bench reports its baseline from the same run.
pub mod eval;
pub mod filters;
pub mod merge;
pub mod numerics;
pub mod ops;
pub mod pipeline;
pub mod plugins;
pub mod train;
