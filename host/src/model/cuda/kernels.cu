// Fused kernels of the bf16 training step: one PTX module, built by host/build.rs from the files included
// below. Each kernel replaces a chain of candle's one-op-per-kernel composites (ops.rs, attention.rs,
// loss.rs and train/optim.rs hold the same math written with tensors: the CPU path, and the reference
// `lorahost bench numerics` checks these kernels against).
//
// Conventions: activations are bf16 and row-major contiguous; all arithmetic is f32; a value is rounded to
// bf16 once, when it is stored. Thread indices are decomposed in 32-bit arithmetic (64-bit division costs
// many instructions on a GPU); the launcher checks that the index space fits. Row kernels run one block
// (or one warp) per row, elementwise kernels a few elements per thread.
#include "layers.cu"
#include "attention.cu"
#include "flash.cu"
#include "lora.cu"
#include "optim.cu"
