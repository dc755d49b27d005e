//! Training: the loop (run.rs), one optimizer step (step.rs, also what `bench train` times), its batches
//! (prefetched on a host thread), the optimizer, checkpoints and the loss curve; for several ranks, the
//! collective seam (dist.rs), the split of a step's passes (split.rs), rank 0's start (handoff.rs), ranks as
//! processes (launch.rs) over TCP (tcp.rs) or NCCL (nccl.rs, `cuda` feature).
pub mod batches;
pub mod checkpoint;
pub mod dist;
pub mod handoff;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod plot;
pub mod run;
pub mod split;
pub mod step;
pub mod tcp;
