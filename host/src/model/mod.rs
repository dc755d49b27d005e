//! The model: Qwen v1 (Qwen-7B/14B/72B, HF class `QWenLMHeadModel`) with an explicit backward.
//!
//! Read in this order:
//! - [`config`]: the architecture description (one place; a Qwen2 family can join later) read from `config.json`.
//! - [`weights`]: frozen weights from safetensors (one file or shards via `model.safetensors.index.json`).
//! - [`ops`], [`attention`], [`loss`]: every op as a forward and a backward written next to each other
//!   (llm.c style). No candle autograd anywhere: frozen weights are plain tensors and their gradients are
//!   never computed; only the input gradient flows down and LoRA parameters get gradients.
//! - [`qwen`]: the model: inference forward, `generate`, and the training step `loss_and_grads`.
//! - [`tiny`]: deterministic tiny checkpoints with random weights, for tests and CPU quickstarts.
//!
//! Dtypes: the frozen model runs in one dtype (f32 or f64 on CPU, bf16 on GPU; candle's CPU matmul has no
//! bf16). Norms, RoPE, softmax and the loss always run in at least f32 ([`ops::acc_dtype`]). LoRA parameters
//! and their gradients are f32 (f64 in gradient-check tests).
pub mod attention;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod fusion;
pub mod loss;
pub mod ops;
pub mod qwen;
pub mod rng;
pub mod tiny;
pub mod weights;

pub use config::{Family, QwenConfig, Site};
pub use qwen::{GenerateOptions, LossAndGrads, QwenModel, Sampling};
pub use rng::Rng;
pub use weights::{Checkpoint, QwenWeights};
