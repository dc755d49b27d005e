//! The model: decoder-only transformers of four families (Qwen v1, Qwen2/2.5, Qwen3, Llama) with an explicit
//! backward, and the LoRA adapters trained on them.
//!
//! Read in this order:
//! - [`config`]: the architecture description read from `config.json`: what differs between families is
//!   data there (tensor names, GQA, biases, q/k norms, rope scaling), not code paths.
//! - [`weights`]: frozen weights from safetensors (one file or shards via `model.safetensors.index.json`).
//! - [`ops`], [`attention`], [`loss`]: every op as a forward and a backward written next to each other
//!   (llm.c style). No candle autograd anywhere: frozen weights are plain tensors and their gradients are
//!   never computed; only the input gradient flows down and LoRA parameters get gradients.
//! - [`lora`]: adapters with PEFT semantics (init, PEFT files, merge).
//! - [`transformer`]: the model: inference forward, `generate`, and the training step `loss_and_grads`.
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
pub mod lora;
pub mod loss;
pub mod ops;
pub mod tiny;
pub mod transformer;
pub mod weights;

pub use config::{Family, ModelConfig, Site};
pub use lora::{Lora, LoraConfig, LoraGrads};
pub use transformer::{GenerateOptions, KvCache, LossAndGrads, Model, Sampling};
pub use weights::{ModelFiles, Weights};
