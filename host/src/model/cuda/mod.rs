//! The fused CUDA kernels of the bf16 training step (`kernels.cu` and the files it includes, compiled to PTX
//! by build.rs) and the glue that launches them on candle's stream. Each function is the GPU twin of a
//! composite op of ops.rs / attention.rs / loss.rs / train/optim.rs (which stay the CPU path and the
//! reference); `lorahost bench numerics` checks every pair against each other on the card.
//!
//! Inputs must be contiguous bf16 unless stated otherwise.
mod attention;
mod gemm;
mod host_table;
mod launch;
mod layers;
mod lora;
mod memory;
mod optim;

pub use gemm::{linear_add_, matmul_add_};
pub use host_table::HostTable;
pub use attention::{attention_scores, causal_softmax, causal_softmax_backward, flash_backward, flash_backward_within, flash_forward};
pub use layers::{cross_entropy_rows, dropout, merge_heads, qkv_merge_unrope, qkv_split_rope, residual_add, rmsnorm_backward, rmsnorm_forward, scatter_rows_, split_heads, swiglu_backward, swiglu_forward};
pub use lora::{lora_a, lora_down, lora_down_add_, lora_up, lora_up_add_};
pub use memory::{keep_pool_memory, peak_memory, reset_peak_memory};
pub use optim::{adamw_multi, cast_multi, cast_multi_scaled, grad_scale, sum_squares_multi, AdamWStep};
