// Fused kernels of the bf16 training step. Each one replaces a chain of candle's one-op-per-kernel
// composites (see ops.rs, attention.rs, loss.rs for the same math written with tensors, which is also
// the CPU path and the reference these kernels are checked against by `lorahost bench kernels`).
//
// Conventions: activations are bf16 and row-major contiguous; all arithmetic is f32; a value is rounded
// to bf16 once, when it is stored. Thread indices are decomposed in 32-bit arithmetic (64-bit division is
// many instructions on a GPU); the launcher checks that the index space fits. Row kernels run one block per row; elementwise kernels one thread per
// element (or per rotated pair).
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define NEG_INF __int_as_float(0xff800000)

static __device__ __forceinline__ float ld(bf16 v) { return __bfloat162float(v); }
static __device__ __forceinline__ bf16 st(float v) { return __float2bfloat16_rn(v); }

// sum_k a[k] * b[k] over the LoRA rank r; 16-byte loads when r is a multiple of 8 (the caller keeps both
// rows 16-byte aligned then).
union Bf16x8 {
    uint4 v;
    bf16 h[8];
};

static __device__ __forceinline__ float dot_rank(const bf16* __restrict__ a, const bf16* __restrict__ b, int r) {
    float acc = 0.f;
    if ((r & 7) == 0) {
        for (int k0 = 0; k0 < r; k0 += 8) {
            Bf16x8 av, bv;
            av.v = *reinterpret_cast<const uint4*>(a + k0);
            bv.v = *reinterpret_cast<const uint4*>(b + k0);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc += ld(av.h[k]) * ld(bv.h[k]);
        }
    } else {
        for (int k = 0; k < r; ++k) acc += ld(a[k]) * ld(b[k]);
    }
    return acc;
}

// The rank-r weights of one column (a row of B [out, r], or of A^T [in, r]), which a thread multiplies with
// the rank-r activation of every row it walks: held in registers when r is 8 or 16 (R), else read through
// dot_rank each time (R = 0).
template <int R>
struct RankRow {
    float w[R];
    __device__ __forceinline__ void load(const bf16* __restrict__ p, int) {
#pragma unroll
        for (int k0 = 0; k0 < R; k0 += 8) {
            Bf16x8 v;
            v.v = *reinterpret_cast<const uint4*>(p + k0);
#pragma unroll
            for (int k = 0; k < 8; ++k) w[k0 + k] = ld(v.h[k]);
        }
    }
    __device__ __forceinline__ float dot(const bf16* __restrict__ u, int) const {
        float acc = 0.f;
#pragma unroll
        for (int k0 = 0; k0 < R; k0 += 8) {
            Bf16x8 v;
            v.v = *reinterpret_cast<const uint4*>(u + k0);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc += ld(v.h[k]) * w[k0 + k];
        }
        return acc;
    }
};

template <>
struct RankRow<0> {
    const bf16* p;
    __device__ __forceinline__ void load(const bf16* q, int) { p = q; }
    __device__ __forceinline__ float dot(const bf16* __restrict__ u, int r) const { return dot_rank(u, p, r); }
};

// Sum (or max) over the block; every thread gets the result. blockDim.x must be a multiple of 32.
static __device__ float block_reduce(float v, bool is_max) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) {
        float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();  // readers of the previous call are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < nwarps ? partial[lane] : (is_max ? NEG_INF : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
        float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    return v;  // every warp reduced the same partials
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm (Qwen v1): y = w * bf16(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps). Saves rstd [rows] (f32).

extern "C" __global__ void rmsnorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       bf16* __restrict__ y, float* __restrict__ rstd, int cols, float eps) {
    const size_t row = blockIdx.x;
    const bf16* xr = x + row * cols;
    bf16* yr = y + row * cols;
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = ld(xr[i]);
        ss += v * v;
    }
    const float r = rsqrtf(block_reduce(ss, false) / cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = st(ld(st(ld(xr[i]) * r)) * ld(w[i]));
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd; plus `dres` (the residual
// branch's gradient) when has_res, which saves the separate add of the block's backward.
extern "C" __global__ void rmsnorm_bwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       const float* __restrict__ rstd, const bf16* __restrict__ dy,
                                       const bf16* __restrict__ dres, bf16* __restrict__ dx, int cols,
                                       int has_res) {
    const size_t row = blockIdx.x;
    const size_t off = row * cols;
    const float r = rstd[row];
    float dot = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) dot += ld(dy[off + i]) * ld(w[i]) * ld(x[off + i]) * r;
    const float mean = block_reduce(dot, false) / cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float g = ld(dy[off + i]) * ld(w[i]);
        float v = r * (g - ld(x[off + i]) * r * mean);
        if (has_res) v += ld(dres[off + i]);
        dx[off + i] = st(v);
    }
}

// Kernels that add a rank-r product (LoRA) walk ROWS_PER_THREAD rows per thread with the column fixed, so
// the column's rank-r weights come from L1 after the first row instead of from L2 for every row. They
// load all their rows first and compute after, so the loads are in flight together (a loop that loads,
// computes and stores row by row waits out the memory latency once per row).
#define ROWS_PER_THREAD 8

// ---------------------------------------------------------------------------------------------------------
// c_attn output -> q, k, v. Input rows n = b*T + t of [N, 3C] (q | k | v, head h at h*D..(h+1)*D), plus the
// bias [3C] and the LoRA delta u B^T (u [N, r], B [3C, r]) when present; q and k are rotated (RoPE,
// rotate_half over the full head dim, tables cos/sin [T, D]); outputs [B, H, T, D]. One thread per
// (ROWS_PER_THREAD rows, part, h, j < D/2).
template <int R>
static __device__ __forceinline__ void qkv_split_rope_body(const bf16* __restrict__ base, const bf16* __restrict__ lora_u,
                                          const bf16* __restrict__ lora_b, const bf16* __restrict__ bias,
                                          const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                          bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v,
                                          int n_rows, int T, int H, int D, int r, int has_bias) {
    const unsigned half = D / 2;
    const unsigned row_blocks = (n_rows + ROWS_PER_THREAD - 1) / ROWS_PER_THREAD;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;  // 32-bit: 64-bit division is slow
    if (idx >= row_blocks * 3 * H * half) return;
    const unsigned j = idx % half;
    unsigned rest = idx / half;
    const unsigned h = rest % H;
    rest /= H;
    const unsigned part = rest % 3;
    const unsigned row0 = (rest / 3) * ROWS_PER_THREAD;
    const int C = H * D;
    const int col1 = part * C + h * D + j, col2 = col1 + half;
    const float bias1 = has_bias ? ld(bias[col1]) : 0.f, bias2 = has_bias ? ld(bias[col2]) : 0.f;
    bf16* out = part == 0 ? q : (part == 1 ? k : v);
    RankRow<R> w1, w2;
    if (r > 0) {
        w1.load(lora_b + (size_t)col1 * r, r);
        w2.load(lora_b + (size_t)col2 * r, r);
    }
    float x1s[ROWS_PER_THREAD], x2s[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        const size_t in = (size_t)n * 3 * C;
        x1s[k] = n < (unsigned)n_rows ? ld(base[in + col1]) : 0.f;
        x2s[k] = n < (unsigned)n_rows ? ld(base[in + col2]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n >= (unsigned)n_rows) break;
        float x1 = x1s[k] + bias1, x2 = x2s[k] + bias2;
        // LoRA delta (u B^T)[n, col] = sum_k u[n, k] B[col, k]; r = 0 when the site has no adapter.
        if (r > 0) {
            x1 += w1.dot(lora_u + (size_t)n * r, r);
            x2 += w2.dot(lora_u + (size_t)n * r, r);
        }
        const unsigned b = n / T, t = n % T;
        const size_t o = ((size_t)(b * H + h) * T + t) * D + j;
        if (part < 2) {
            const float c1 = cos_t[t * D + j], s1 = sin_t[t * D + j];
            const float c2 = cos_t[t * D + j + half], s2 = sin_t[t * D + j + half];
            out[o] = st(x1 * c1 - x2 * s1);
            out[o + half] = st(x2 * c2 + x1 * s2);
        } else {
            out[o] = st(x1);
            out[o + half] = st(x2);
        }
    }
}

extern "C" __global__ void qkv_split_rope(const bf16* __restrict__ base, const bf16* __restrict__ lora_u,
                                          const bf16* __restrict__ lora_b, const bf16* __restrict__ bias,
                                          const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                          bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v,
                                          int n_rows, int T, int H, int D, int r, int has_bias) {
    if (r == 8)
        qkv_split_rope_body<8>(base, lora_u, lora_b, bias, cos_t, sin_t, q, k, v, n_rows, T, H, D, r, has_bias);
    else if (r == 16)
        qkv_split_rope_body<16>(base, lora_u, lora_b, bias, cos_t, sin_t, q, k, v, n_rows, T, H, D, r, has_bias);
    else
        qkv_split_rope_body<0>(base, lora_u, lora_b, bias, cos_t, sin_t, q, k, v, n_rows, T, H, D, r, has_bias);
}

// [B, H, T, D] -> columns col0.. of a [N, stride] matrix (heads side by side), optionally applying the
// inverse rotation (the backward of RoPE). Forward: attention output -> c_proj input (no rope).
// Backward: dq, dk (inverse rope) and dv -> d(c_attn output), one call per part.
extern "C" __global__ void heads_merge(const bf16* __restrict__ src, const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, bf16* __restrict__ dst, int stride,
                                       int col0, int n_rows, int T, int H, int D, int inverse_rope) {
    const unsigned half = D / 2;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned)n_rows * H * half) return;
    const unsigned j = idx % half;
    const unsigned rest = idx / half;
    const unsigned h = rest % H;
    const unsigned n = rest / H;
    const unsigned b = n / T, t = n % T;
    const size_t s = ((size_t)(b * H + h) * T + t) * D + j;
    const float g1 = ld(src[s]), g2 = ld(src[s + half]);
    float y1 = g1, y2 = g2;
    if (inverse_rope) {
        // y = x cos + rotate_half(x) sin is a rotation per pair (j, j + D/2); its transpose:
        const float c1 = cos_t[t * D + j], s1 = sin_t[t * D + j];
        const float c2 = cos_t[t * D + j + half], s2 = sin_t[t * D + j + half];
        y1 = g1 * c1 + g2 * s2;
        y2 = g2 * c2 - g1 * s1;
    }
    const size_t d = (size_t)n * stride + col0 + h * D + j;
    dst[d] = st(y1);
    dst[d + half] = st(y2);
}

// ---------------------------------------------------------------------------------------------------------
// Causal softmax over keys. Rows r of [B*H*T, T] are queries (t = r % T); keys j > t are masked and never
// read. The scores come in f32, already scaled by 1/sqrt(D) in the GEMM; probabilities go out in bf16.
// One warp per row (shuffle reductions only, no block barriers: rows are short and many); the row is read
// again from cache for each pass.

static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

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

// [N, C] (heads side by side) -> [B, H, T, D]: the backward of merging the heads (c_proj's input gradient
// back to the attention output's layout). One thread per element.
extern "C" __global__ void heads_split(const bf16* __restrict__ src, bf16* __restrict__ dst, int n_rows, int T,
                                       int H, int D) {
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned)n_rows * H * D) return;
    const unsigned j = idx % D;
    const unsigned rest = idx / D;
    const unsigned h = rest % H;
    const unsigned n = rest / H;
    const unsigned b = n / T, t = n % T;
    dst[((size_t)(b * H + h) * T + t) * D + j] = src[idx];
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise kernels take 8 consecutive elements per thread: one 16-byte load or store per tensor when
// the 8 are in range and the buffers 16-byte aligned (`vec`, checked by the caller), else one by one.

#define EW_PER_THREAD 8

static __device__ __forceinline__ void load8(const bf16* p, size_t i, size_t n, bool vec, float* out) {
    if (vec && i + EW_PER_THREAD <= n) {
        Bf16x8 v;
        v.v = *reinterpret_cast<const uint4*>(p + i);
#pragma unroll
        for (int k = 0; k < EW_PER_THREAD; ++k) out[k] = ld(v.h[k]);
    } else {
        for (int k = 0; k < EW_PER_THREAD; ++k) out[k] = i + k < n ? ld(p[i + k]) : 0.f;
    }
}

static __device__ __forceinline__ void store8(bf16* p, size_t i, size_t n, bool vec, const float* in) {
    if (vec && i + EW_PER_THREAD <= n) {
        Bf16x8 v;
#pragma unroll
        for (int k = 0; k < EW_PER_THREAD; ++k) v.h[k] = st(in[k]);
        *reinterpret_cast<uint4*>(p + i) = v.v;
    } else {
        for (int k = 0; k < EW_PER_THREAD && i + k < n; ++k) p[i + k] = st(in[k]);
    }
}

// SwiGLU: h = a * silu(g); da = dh * silu(g), dg = dh * a * s * (1 + g (1 - s)), s = sigmoid(g).

extern "C" __global__ void swiglu_fwd(const bf16* __restrict__ a, const bf16* __restrict__ g,
                                      bf16* __restrict__ h, size_t n, int vec) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * EW_PER_THREAD;
    if (i >= n) return;
    float av[EW_PER_THREAD], gv[EW_PER_THREAD], hv[EW_PER_THREAD];
    load8(a, i, n, vec, av);
    load8(g, i, n, vec, gv);
#pragma unroll
    for (int k = 0; k < EW_PER_THREAD; ++k) hv[k] = av[k] * gv[k] / (1.f + expf(-gv[k]));
    store8(h, i, n, vec, hv);
}

extern "C" __global__ void swiglu_bwd(const bf16* __restrict__ a, const bf16* __restrict__ g,
                                      const bf16* __restrict__ dh, bf16* __restrict__ da,
                                      bf16* __restrict__ dg, size_t n, int vec) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * EW_PER_THREAD;
    if (i >= n) return;
    float av[EW_PER_THREAD], gv[EW_PER_THREAD], dv[EW_PER_THREAD], dav[EW_PER_THREAD], dgv[EW_PER_THREAD];
    load8(a, i, n, vec, av);
    load8(g, i, n, vec, gv);
    load8(dh, i, n, vec, dv);
#pragma unroll
    for (int k = 0; k < EW_PER_THREAD; ++k) {
        const float s = 1.f / (1.f + expf(-gv[k]));
        dav[k] = dv[k] * gv[k] * s;
        dgv[k] = dv[k] * av[k] * s * (1.f + gv[k] * (1.f - s));
    }
    store8(da, i, n, vec, dav);
    store8(dg, i, n, vec, dgv);
}

// ---------------------------------------------------------------------------------------------------------
// Dropout with a counter-based mask: element i of stream `key` is dropped when
// uniform(key, i) < p, exactly as model/rng.rs computes it on the CPU, so the mask is never stored: the
// backward (and a recomputed forward) regenerate it. Kept elements are scaled by 1 / (1 - p).

static __device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static __device__ __forceinline__ bool dropped(uint64_t key, uint64_t i, float p) {
    const uint64_t bits = mix64(key + (i + 1) * 0x9E3779B97F4A7C15ull);
    return (float)(bits >> 40) * (1.f / 16777216.f) < p;
}

extern "C" __global__ void dropout(const bf16* __restrict__ x, bf16* __restrict__ y, size_t n, uint64_t key,
                                   float p, float keep_scale, int vec) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * EW_PER_THREAD;
    if (i >= n) return;
    float v[EW_PER_THREAD];
    load8(x, i, n, vec, v);
#pragma unroll
    for (int k = 0; k < EW_PER_THREAD; ++k) v[k] = dropped(key, i + k, p) ? 0.f : v[k] * keep_scale;
    store8(y, i, n, vec, v);
}

// ---------------------------------------------------------------------------------------------------------
// Cross-entropy of one logits row z [V] against its target y: loss = logsumexp(z) - z[y] (f32 out) and,
// when want_grad, dz = softmax(z) - onehot(y) (bf16 out).

extern "C" __global__ void cross_entropy_rows(const bf16* __restrict__ z, const uint32_t* __restrict__ y,
                                              float* __restrict__ loss, bf16* __restrict__ dz, int V,
                                              int want_grad) {
    const size_t row = blockIdx.x;
    const size_t off = row * V;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, ld(z[off + j]));
    m = block_reduce(m, true);
    float sum = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) sum += expf(ld(z[off + j]) - m);
    const float lse = m + logf(block_reduce(sum, false));
    const uint32_t target = y[row];
    if (threadIdx.x == 0) loss[row] = lse - ld(z[off + target]);
    if (!want_grad) return;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        dz[off + j] = st(expf(ld(z[off + j]) - lse) - (j == (int)target ? 1.f : 0.f));
}

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

// ---------------------------------------------------------------------------------------------------------
// The optimizer over every adapter tensor in one launch. `table` holds, per tensor (blockIdx.y), eight
// 64-bit words: p, g, m, v (inputs), p', m', v' (outputs) as device pointers, and n. f32 throughout.

extern "C" __global__ void adamw_multi(const unsigned long long* __restrict__ table, float lr, float beta1,
                                       float beta2, float eps, float weight_decay, float step_size,
                                       float bc2_sqrt, float grad_scale) {
    const unsigned long long* t = table + 8 * (size_t)blockIdx.y;
    const float* p = (const float*)t[0];
    const float* g = (const float*)t[1];
    const float* m = (const float*)t[2];
    const float* v = (const float*)t[3];
    float* p_out = (float*)t[4];
    float* m_out = (float*)t[5];
    float* v_out = (float*)t[6];
    const size_t n = (size_t)t[7];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        p_out[i] = p[i] * (1.f - lr * weight_decay) - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        m_out[i] = mi;
        v_out[i] = vi;
    }
}

// Sums of squares: table holds (pointer, n) pairs; block (x, y) writes the partial sum of its slice of
// tensor y to out[y * gridDim.x + x] (no atomics: the same gradients give the same norm, bit for bit).
extern "C" __global__ void sum_squares_multi(const unsigned long long* __restrict__ table, float* __restrict__ out) {
    const unsigned long long* t = table + 2 * (size_t)blockIdx.y;
    const float* x = (const float*)t[0];
    const size_t n = (size_t)t[1];
    float acc = 0.f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_reduce(acc, false);
    if (threadIdx.x == 0) out[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

// ---------------------------------------------------------------------------------------------------------
// Flash attention (causal, head dim 128) with its backward, on tensor cores through WMMA (bf16 in, f32
// accumulate). The [T, T] scores never reach global memory: the forward walks key blocks with an online
// softmax and keeps each row's log-sum-exp; the backward recomputes the probabilities from it. Layouts are
// [B*H, T, 128] (bh = blockIdx.y). Blocks are 64 queries (or keys) x 4 warps of 16 rows. Shared-memory rows
// are padded (LDK, LDP, LDS, LDO) against bank conflicts; every WMMA tile starts on a 32-byte boundary.
// The dK/dV kernel and the dQ kernel each own their outputs (no atomics), so results are deterministic.

#define FA_D 128
#define FA_B 64
#define LDK 136  // bf16 stride of [64, 128] tiles
#define LDP 72   // bf16 stride of [*, 64] tiles
#define LDS 68   // f32 stride of a warp's [16, 64] tile
#define LDO 132  // f32 stride of a warp's [16, 128] tile

namespace fa {
using namespace nvcuda;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> FragAT;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBT;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// Rows r0..r0+64 of a [T, 128] matrix into a [64, LDK] tile; rows at or past T are zero.
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* __restrict__ src, int r0, int T) {
    for (int i = threadIdx.x; i < FA_B * 16; i += blockDim.x) {
        const int r = i / 16, c = (i % 16) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < T) v = *reinterpret_cast<const uint4*>(src + (size_t)(r0 + r) * FA_D + c);
        *reinterpret_cast<uint4*>(dst + r * LDK + c) = v;
    }
}

// acc[16 x 64] = A[16 x 128] (row-major tile, stride LDK) . B^T where B is a [64, 128] tile (stride LDK),
// stored to out (f32, stride LDS).
// The k loop is outermost so the four output fragments are independent chains the GPU can overlap.
__device__ __forceinline__ void rows_times_tile_t(const bf16* a, const bf16* b, float* out) {
    FragC acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        FragA fa;
        wmma::load_matrix_sync(fa, a + kk * 16, LDK);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            FragBT fb;
            wmma::load_matrix_sync(fb, b + j * 16 * LDK + kk * 16, LDK);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::store_matrix_sync(out + j * 16, acc[j], LDS, wmma::mem_row_major);
}

// acc[j] (16 x 128 as 8 fragments) += A[16 x 64] . B[64 x 128]; A given as 4 fragments.
template <typename FA>
__device__ __forceinline__ void accumulate_times_tile(FragC* acc, const FA* a, const bf16* b) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            FragB fb;
            wmma::load_matrix_sync(fb, b + kk * 16 * LDK + j * 16, LDK);
            wmma::mma_sync(acc[j], a[kk], fb, acc[j]);
        }
    }
}

// 8 accumulator fragments (16 x 128) -> rows row0.. of a [T, 128] bf16 matrix, through a warp's f32
// scratch (stride LDO); rows at or past T are skipped.
__device__ __forceinline__ void store_rows(FragC* acc, float* scratch, bf16* dst, int row0, int T) {
#pragma unroll
    for (int j = 0; j < 8; ++j) wmma::store_matrix_sync(scratch + j * 16, acc[j], LDO, wmma::mem_row_major);
    __syncwarp();
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * FA_D; i += 32) {
        const int r = i / FA_D, c = i % FA_D;
        if (row0 + r < T) dst[(size_t)(row0 + r) * FA_D + c] = st(scratch[r * LDO + c]);
    }
}
}  // namespace fa

extern "C" __global__ void __launch_bounds__(128) flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                            const bf16* __restrict__ v, bf16* __restrict__ o,
                                                            float* __restrict__ lse, int T, float scale) {
    using namespace fa;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + FA_B * LDK;
    float* Ss = reinterpret_cast<float*>(Vs + FA_B * LDK);
    bf16* Ps = reinterpret_cast<bf16*>(Ss + 4 * 16 * LDS);
    float* row_scale = reinterpret_cast<float*>(Ps + 4 * 16 * LDP);  // 4 warps x 16 rows
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const size_t base = (size_t)blockIdx.y * T * FA_D;
    const int q0 = blockIdx.x * FA_B;
    float* Sw = Ss + warp * 16 * LDS;
    bf16* Pw = Ps + warp * 16 * LDP;
    float* scale_w = row_scale + warp * 16;
    // Each lane owns half a row of scores: row r, columns c0..
    const int r = lane >> 1, c0 = (lane & 1) * 32;
    const int qi = q0 + warp * 16 + r;

    // The output stays in registers (8 accumulator fragments). Rescaling a row needs the row of each
    // fragment element, which WMMA does not specify: read it from a tile of row numbers.
    for (int i = lane; i < 256; i += 32) Sw[(i / 16) * LDS + i % 16] = (float)(i / 16);
    __syncwarp();
    FragC rowf;
    wmma::load_matrix_sync(rowf, Sw, LDS, wmma::mem_row_major);
    int rows[FragC::num_elements];
#pragma unroll
    for (int e = 0; e < FragC::num_elements; ++e) rows[e] = (int)rowf.x[e];
    FragC oacc[8];
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) wmma::fill_fragment(oacc[jj], 0.f);

    // The warp's 16 query rows, staged through shared memory (zero past T).
    load_tile(Ks, q + base, q0, T);
    __syncthreads();
    FragA qf[8];
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wmma::load_matrix_sync(qf[kk], Ks + warp * 16 * LDK + kk * 16, LDK);
    float m_i = NEG_INF, l_i = 0.f;
    __syncthreads();

    const int n_blocks = blockIdx.x + 1;  // causal: key blocks up to the diagonal
    for (int kb = 0; kb < n_blocks; ++kb) {
        const int k0 = kb * FA_B;
        load_tile(Ks, k + base, k0, T);
        load_tile(Vs, v + base, k0, T);
        __syncthreads();
        // S = Q K^T for the warp's rows (independent chains per output fragment).
        {
            FragC acc[4];
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) wmma::fill_fragment(acc[jj], 0.f);
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    FragBT fb;
                    wmma::load_matrix_sync(fb, Ks + jj * 16 * LDK + kk * 16, LDK);
                    wmma::mma_sync(acc[jj], qf[kk], fb, acc[jj]);
                }
            }
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) wmma::store_matrix_sync(Sw + jj * 16, acc[jj], LDS, wmma::mem_row_major);
        }
        __syncwarp();
        // Online softmax over this block's keys.
        float sv[32];
        float mx = NEG_INF;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const int key = k0 + c0 + c;
            const float x = (key > qi || key >= T) ? NEG_INF : Sw[r * LDS + c0 + c] * scale;
            sv[c] = x;
            mx = fmaxf(mx, x);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_new = fmaxf(m_i, mx);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;  // a row with no key yet stays empty
        const float alpha = expf(m_i - m_use);
        float rs = 0.f;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const float pv = expf(sv[c] - m_use);
            rs += pv;
            Pw[r * LDP + c0 + c] = st(pv);
        }
        rs += __shfl_xor_sync(0xffffffffu, rs, 1);
        l_i = l_i * alpha + rs;
        m_i = m_new;
        if ((lane & 1) == 0) scale_w[r] = alpha;
        __syncwarp();
        // O = alpha O + P V.
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
            for (int e = 0; e < FragC::num_elements; ++e) oacc[jj].x[e] *= scale_w[rows[e]];
        FragA pf[4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wmma::load_matrix_sync(pf[kk], Pw + kk * 16, LDP);
        accumulate_times_tile(oacc, pf, Vs);
        __syncthreads();  // Ks and Vs are reloaded next
    }
    // O / l, through shared memory (Ks + Vs are free now) to the [T, 128] output.
    if ((lane & 1) == 0) scale_w[r] = 1.f / l_i;
    __syncwarp();
#pragma unroll
    for (int jj = 0; jj < 8; ++jj)
#pragma unroll
        for (int e = 0; e < FragC::num_elements; ++e) oacc[jj].x[e] *= scale_w[rows[e]];
    float* scratch = reinterpret_cast<float*>(Ks) + warp * 16 * LDO;
    store_rows(oacc, scratch, o + base, q0 + warp * 16, T);
    if (qi < T && (lane & 1) == 0) lse[(size_t)blockIdx.y * T + qi] = m_i + logf(l_i);
}

// D[row] = sum_d dO[row, d] * O[row, d] (the softmax backward's row term). One warp per row.
extern "C" __global__ void flash_bwd_dot(const bf16* __restrict__ o, const bf16* __restrict__ d_o,
                                         float* __restrict__ dot, unsigned long long rows) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    float acc = 0.f;
    for (int c = lane; c < FA_D; c += 32) acc += ld(o[row * FA_D + c]) * ld(d_o[row * FA_D + c]);
    acc = warp_sum(acc);
    if (lane == 0) dot[row] = acc;
}

// For the warp's 16 query rows against a 64-key block: P = exp(S * scale - lse) (masked) kept in `pv`
// (the lane's half row), then dS = scale * P * (dO V^T - D) written as bf16 into dSw (stride LDP), and P as
// bf16 into Pw when given.
__device__ __forceinline__ void fa_probs_and_dscores(const bf16* Qw, const bf16* dOw, const bf16* Ks, const bf16* Vs,
                                                     float* Sw, bf16* Pw, bf16* dSw, const float* lse_s,
                                                     const float* dot_s, int qrow0, int k0, int T, float scale) {
    const int lane = threadIdx.x & 31;
    const int r = lane >> 1, c0 = (lane & 1) * 32;
    const int qi = qrow0 + r;
    fa::rows_times_tile_t(Qw, Ks, Sw);
    __syncwarp();
    float pv[32];
    const float l = lse_s[r];
#pragma unroll
    for (int c = 0; c < 32; ++c) {
        const int key = k0 + c0 + c;
        pv[c] = (key > qi || key >= T || qi >= T) ? 0.f : expf(Sw[r * LDS + c0 + c] * scale - l);
        if (Pw) Pw[r * LDP + c0 + c] = st(pv[c]);
    }
    __syncwarp();
    fa::rows_times_tile_t(dOw, Vs, Sw);  // dP
    __syncwarp();
    const float dd = dot_s[r];
#pragma unroll
    for (int c = 0; c < 32; ++c) dSw[r * LDP + c0 + c] = st(scale * pv[c] * (Sw[r * LDS + c0 + c] - dd));
    __syncwarp();
}

// dK, dV for one 64-key block (blockIdx.x), walking the query blocks at or after it.
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                                 const bf16* __restrict__ v, const bf16* __restrict__ d_o,
                                                                 const float* __restrict__ lse, const float* __restrict__ dot,
                                                                 bf16* __restrict__ dk, bf16* __restrict__ dv, int T,
                                                                 float scale) {
    using namespace fa;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + FA_B * LDK;
    bf16* Qs = Vs + FA_B * LDK;
    bf16* dOs = Qs + FA_B * LDK;
    bf16* Ps = dOs + FA_B * LDK;
    bf16* dSs = Ps + FA_B * LDP;
    float* Ss = reinterpret_cast<float*>(dSs + FA_B * LDP);
    float* lse_s = Ss + 4 * 16 * LDS;
    float* dot_s = lse_s + FA_B;
    const int warp = threadIdx.x / 32;
    const size_t base = (size_t)blockIdx.y * T * FA_D;
    const float* lse_bh = lse + (size_t)blockIdx.y * T;
    const float* dot_bh = dot + (size_t)blockIdx.y * T;
    const int k0 = blockIdx.x * FA_B;
    load_tile(Ks, k + base, k0, T);
    load_tile(Vs, v + base, k0, T);
    FragC dk_acc[8], dv_acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        wmma::fill_fragment(dk_acc[j], 0.f);
        wmma::fill_fragment(dv_acc[j], 0.f);
    }
    const int n_q = (T + FA_B - 1) / FA_B;
    for (int qb = blockIdx.x; qb < n_q; ++qb) {
        const int q0 = qb * FA_B;
        load_tile(Qs, q + base, q0, T);
        load_tile(dOs, d_o + base, q0, T);
        for (int i = threadIdx.x; i < FA_B; i += blockDim.x) {
            lse_s[i] = q0 + i < T ? lse_bh[q0 + i] : 0.f;
            dot_s[i] = q0 + i < T ? dot_bh[q0 + i] : 0.f;
        }
        __syncthreads();
        fa_probs_and_dscores(Qs + warp * 16 * LDK, dOs + warp * 16 * LDK, Ks, Vs, Ss + warp * 16 * LDS,
                             Ps + warp * 16 * LDP, dSs + warp * 16 * LDP, lse_s + warp * 16, dot_s + warp * 16,
                             q0 + warp * 16, k0, T, scale);
        __syncthreads();  // P and dS of all 64 query rows are in place
        // The warp's 16 keys: dV += P^T dO, dK += dS^T Q.
        FragAT pt[4], dst_[4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            wmma::load_matrix_sync(pt[kk], Ps + kk * 16 * LDP + warp * 16, LDP);
            wmma::load_matrix_sync(dst_[kk], dSs + kk * 16 * LDP + warp * 16, LDP);
        }
        accumulate_times_tile(dv_acc, pt, dOs);
        accumulate_times_tile(dk_acc, dst_, Qs);
        __syncthreads();  // Qs, dOs, Ps, dSs are reloaded next
    }
    float* scratch = reinterpret_cast<float*>(Qs) + warp * 16 * LDO;  // Qs + dOs hold 4 x 16 x LDO floats
    store_rows(dk_acc, scratch, dk + base, k0 + warp * 16, T);
    __syncwarp();
    store_rows(dv_acc, scratch, dv + base, k0 + warp * 16, T);
}

// dQ for one 64-query block (blockIdx.x), walking the key blocks up to the diagonal.
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                               const bf16* __restrict__ v, const bf16* __restrict__ d_o,
                                                               const float* __restrict__ lse, const float* __restrict__ dot,
                                                               bf16* __restrict__ dq, int T, float scale) {
    using namespace fa;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + FA_B * LDK;
    bf16* Qs = Vs + FA_B * LDK;
    bf16* dOs = Qs + FA_B * LDK;
    bf16* dSs = dOs + FA_B * LDK;
    float* Ss = reinterpret_cast<float*>(dSs + FA_B * LDP);
    float* lse_s = Ss + 4 * 16 * LDS;
    float* dot_s = lse_s + FA_B;
    const int warp = threadIdx.x / 32;
    const size_t base = (size_t)blockIdx.y * T * FA_D;
    const int q0 = blockIdx.x * FA_B;
    load_tile(Qs, q + base, q0, T);
    load_tile(dOs, d_o + base, q0, T);
    for (int i = threadIdx.x; i < FA_B; i += blockDim.x) {
        lse_s[i] = q0 + i < T ? lse[(size_t)blockIdx.y * T + q0 + i] : 0.f;
        dot_s[i] = q0 + i < T ? dot[(size_t)blockIdx.y * T + q0 + i] : 0.f;
    }
    FragC dq_acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) wmma::fill_fragment(dq_acc[j], 0.f);
    bf16* dSw = dSs + warp * 16 * LDP;
    for (int kb = 0; kb <= (int)blockIdx.x; ++kb) {
        const int k0 = kb * FA_B;
        load_tile(Ks, k + base, k0, T);
        load_tile(Vs, v + base, k0, T);
        __syncthreads();
        fa_probs_and_dscores(Qs + warp * 16 * LDK, dOs + warp * 16 * LDK, Ks, Vs, Ss + warp * 16 * LDS, nullptr,
                             dSw, lse_s + warp * 16, dot_s + warp * 16, q0 + warp * 16, k0, T, scale);
        // dQ += dS K for the warp's rows.
        FragA dsf[4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wmma::load_matrix_sync(dsf[kk], dSw + kk * 16, LDP);
        accumulate_times_tile(dq_acc, dsf, Ks);
        __syncthreads();  // Ks and Vs are reloaded next
    }
    float* scratch = reinterpret_cast<float*>(Ks) + warp * 16 * LDO;  // Ks + Vs hold 4 x 16 x LDO floats
    store_rows(dq_acc, scratch, dq + base, q0 + warp * 16, T);
}
