//! Training: for now the optimizer (AdamW, gradient clipping). The loop, schedules, accumulation and
//! checkpoints will join here.
pub mod checkpoint;
pub mod optim;
pub mod plot;
pub mod run;
