//! Training: the loop (run.rs), one optimizer step (step.rs, also what `bench train` times), its batches
//! (prefetched on a host thread), the optimizer, checkpoints and the loss curve.
pub mod batches;
pub mod checkpoint;
pub mod optim;
pub mod plot;
pub mod run;
pub mod step;
