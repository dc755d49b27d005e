//! Which fused GPU kernels (model/cuda/) the model uses in place of the composite candle ops. A kernel is
//! used only when its switch is on, the crate is built with the `cuda` feature and the tensors are bf16 on
//! a GPU; everywhere else (the CPU, f32, tests) the composite ops of ops.rs / attention.rs / loss.rs run.
//! All switches are on by default; `lorahost bench train --levers` turns them on one at a time to measure
//! what each one buys (the levers table of BENCHMARKS.md).
//!
//! A padding-free batch (several sequences per row, `cu_seqlens`) takes the flash kernels, which walk a list
//! of sequences, and RoPE tables gathered per token; where flash cannot run (switched off, another head
//! dim), its attention is the composite one with a block-diagonal mask (`Model::context`).

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Fusion {
    /// LoRA dropout from a counter-based hash inside the kernel: no mask built on the host, uploaded or kept.
    pub dropout: bool,
    /// RMSNorm forward/backward in one kernel each (backward also adds the residual gradient); the residual
    /// adds with 16-byte accesses.
    pub norm: bool,
    /// c_attn output (LoRA delta included) + bias -> rotated q, k and v in one kernel; heads merged (and
    /// un-rotated in backward) in one kernel.
    pub rope: bool,
    /// f32 scores from one cuBLAS GEMM, causal softmax and its backward in one kernel each; bf16 probabilities.
    pub attention: bool,
    /// SwiGLU forward and backward in one kernel each; the gate's input gradient added into the up's by
    /// its GEMM (cuBLAS beta = 1), not by an add.
    pub swiglu: bool,
    /// Cross-entropy (logsumexp, loss and softmax - onehot) in one kernel per chunk of logits.
    pub loss: bool,
    /// LoRA's up-projection written first by a tensor-core kernel with the frozen linear's GEMM adding its
    /// product into it (cuBLAS beta = 1), and the same for its input gradient; where the linear's product is
    /// already formed, added into it in place (no separate [N, out] delta or [N, in] branch gradient).
    pub lora: bool,
    /// The optimizer step (and the gradient norm) over all adapter tensors in one kernel launch each, instead
    /// of a dozen small ops per tensor.
    pub optimizer: bool,
    /// With `attention`: flash attention (tensor-core kernels, online softmax, no [T, T] scores in memory,
    /// backward from the saved log-sum-exp, variable-length sequences, GQA) for head dims 64 and 128, at
    /// every length (without it, the scores path above). Not for KV-cached decoding steps.
    pub flash: bool,
    /// With `flash`: its backward stores the dS tiles it computes for dK/dV, so dQ is one product per tile
    /// (without it, dQ recomputes S and dP: three).
    pub ds_tiles: bool,
}

impl Fusion {
    pub const ALL: Fusion = Fusion {
        dropout: true,
        norm: true,
        rope: true,
        attention: true,
        swiglu: true,
        loss: true,
        lora: true,
        optimizer: true,
        flash: true,
        ds_tiles: true,
    };
    pub const NONE: Fusion = Fusion {
        dropout: false,
        norm: false,
        rope: false,
        attention: false,
        swiglu: false,
        loss: false,
        lora: false,
        optimizer: false,
        flash: false,
        ds_tiles: false,
    };

    /// The levers in the order the benchmark adds them, each with its switch.
    pub const LEVERS: [(&'static str, fn(&mut Fusion) -> &mut bool); 10] = [
        ("dropout", |f| &mut f.dropout),
        ("norm", |f| &mut f.norm),
        ("rope", |f| &mut f.rope),
        ("attention", |f| &mut f.attention),
        ("flash", |f| &mut f.flash),
        ("ds-tiles", |f| &mut f.ds_tiles),
        ("swiglu", |f| &mut f.swiglu),
        ("loss", |f| &mut f.loss),
        ("lora", |f| &mut f.lora),
        ("optimizer", |f| &mut f.optimizer),
    ];

    /// `all`, `none`, or `no-<lever>` (every kernel but that lever's, e.g. `no-flash`).
    pub fn parse(s: &str) -> Option<Fusion> {
        match s {
            "all" => Some(Fusion::ALL),
            "none" => Some(Fusion::NONE),
            _ => {
                let name = s.strip_prefix("no-")?;
                let (_, switch) = Self::LEVERS.iter().find(|(n, _)| *n == name)?;
                let mut f = Fusion::ALL;
                *switch(&mut f) = false;
                Some(f)
            }
        }
    }
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion::ALL
    }
}

/// True when a switched-on kernel can run on `t` (built with `cuda`, bf16 on a GPU).
#[inline]
pub fn on(switch: bool, t: &candle_core::Tensor) -> bool {
    on_for(switch, t.dtype(), t.device())
}

/// [`on`] for tensors of `dtype` on `device`.
#[inline]
pub fn on_for(switch: bool, dtype: candle_core::DType, device: &candle_core::Device) -> bool {
    switch && cfg!(feature = "cuda") && device.is_cuda() && dtype == candle_core::DType::BF16
}
