// Causal attention: the softmax over GEMM-made scores (and its backward). Flash attention is in flash.cu.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// Causal softmax over keys. Rows r of [B*H*T, T] are queries (t = r % T); keys j > t are masked and never
// read. The scores come in f32, already scaled by 1/sqrt(D) in the GEMM; probabilities go out in bf16.
// One warp per row (shuffle reductions only, no block barriers: rows are short and many); the row is read
// again from cache for each pass.

extern "C" __global__ void causal_softmax_fwd(const float* __restrict__ s, bf16* __restrict__ p, int T,
                                              unsigned long long rows) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const size_t off = row * T;
    const int n = (int)((unsigned)row % (unsigned)T) + 1;  // keys 0..=t (rows < 2^32)
    float m = NEG_INF;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, s[off + j]);
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < n; j += 32) sum += expf(s[off + j] - m);
    const float inv = 1.f / warp_sum(sum);
    for (int j = lane; j < T; j += 32) p[off + j] = st(j < n ? expf(s[off + j] - m) * inv : 0.f);
}

// ds = scale * p * (dp - sum_keys(p * dp)); zero for masked keys (p = 0 there, not read).
extern "C" __global__ void causal_softmax_bwd(const bf16* __restrict__ p, const bf16* __restrict__ dp,
                                              bf16* __restrict__ ds, int T, float scale, unsigned long long rows) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const size_t off = row * T;
    const int n = (int)((unsigned)row % (unsigned)T) + 1;
    float dot = 0.f;
    for (int j = lane; j < n; j += 32) dot += ld(p[off + j]) * ld(dp[off + j]);
    dot = warp_sum(dot);
    for (int j = lane; j < T; j += 32) ds[off + j] = st(j < n ? scale * ld(p[off + j]) * (ld(dp[off + j]) - dot) : 0.f);
}
