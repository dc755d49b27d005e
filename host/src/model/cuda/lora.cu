// LoRA folded into the frozen linear (see lora.rs).
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// LoRA, folded into the frozen linear's output. Forward: y += u B^T (u = scale * dropout(x) A^T [N, r],
// B [out, r]); backward: dx += dropout_mask * (du A) (du = scale * dy B [N, r], A [r, in]). Both update
// a fresh GEMM output in place, so the [N, out] delta and the [N, in] LoRA input gradient never exist.

template <int R>
static __device__ __forceinline__ void lora_up_add_body(bf16* __restrict__ y, const bf16* __restrict__ u,
                                                        const bf16* __restrict__ b, int n_rows, int cols, int r) {
    const unsigned row_blocks = (n_rows + ROWS_PER_THREAD - 1) / ROWS_PER_THREAD;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= row_blocks * cols) return;
    const unsigned j = idx % cols, row0 = (idx / cols) * ROWS_PER_THREAD;
    RankRow<R> w;
    w.load(b + (size_t)j * r, r);
    float ys[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        ys[k] = n < (unsigned)n_rows ? ld(y[(size_t)n * cols + j]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n >= (unsigned)n_rows) break;
        y[(size_t)n * cols + j] = st(ys[k] + w.dot(u + (size_t)n * r, r));
    }
}

extern "C" __global__ void lora_up_add(bf16* __restrict__ y, const bf16* __restrict__ u, const bf16* __restrict__ b,
                                       int n_rows, int cols, int r) {
    if (r == 8)
        lora_up_add_body<8>(y, u, b, n_rows, cols, r);
    else if (r == 16)
        lora_up_add_body<16>(y, u, b, n_rows, cols, r);
    else
        lora_up_add_body<0>(y, u, b, n_rows, cols, r);
}

// `a_t` is A transposed, [in, r], so each element's rank-r dot product reads one contiguous row.
template <int R>
static __device__ __forceinline__ void lora_down_add_body(bf16* __restrict__ dx, const bf16* __restrict__ du,
                                                          const bf16* __restrict__ a_t, int n_rows, int cols, int r,
                                                          uint64_t key, float p, float keep_scale, int has_dropout) {
    const unsigned row_blocks = (n_rows + ROWS_PER_THREAD - 1) / ROWS_PER_THREAD;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= row_blocks * cols) return;
    const unsigned i = idx % cols, row0 = (idx / cols) * ROWS_PER_THREAD;
    RankRow<R> w;
    w.load(a_t + (size_t)i * r, r);
    float xs[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        xs[k] = n < (unsigned)n_rows ? ld(dx[(size_t)n * cols + i]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n >= (unsigned)n_rows) break;
        const size_t e = (size_t)n * cols + i;
        float g = w.dot(du + (size_t)n * r, r);
        if (has_dropout) g = dropped(key, e, p) ? 0.f : g * keep_scale;
        dx[e] = st(xs[k] + g);
    }
}

extern "C" __global__ void lora_down_add(bf16* __restrict__ dx, const bf16* __restrict__ du,
                                         const bf16* __restrict__ a_t, int n_rows, int cols, int r, uint64_t key,
                                         float p, float keep_scale, int has_dropout) {
    if (r == 8)
        lora_down_add_body<8>(dx, du, a_t, n_rows, cols, r, key, p, keep_scale, has_dropout);
    else if (r == 16)
        lora_down_add_body<16>(dx, du, a_t, n_rows, cols, r, key, p, keep_scale, has_dropout);
    else
        lora_down_add_body<0>(dx, du, a_t, n_rows, cols, r, key, p, keep_scale, has_dropout);
}

