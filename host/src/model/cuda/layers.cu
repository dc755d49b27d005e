// The block's pointwise and row-wise ops: RMSNorm, the attention layout (qkv split + bias + LoRA delta +
// RoPE, head merges), SwiGLU, dropout, the cross-entropy rows.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// RMSNorm (Qwen v1): y = w * bf16(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps). Saves rstd [rows] (f32).

// STEP elements per access: 8 (one 16-byte load or store; rows of a multiple of 8, 16-byte aligned) or 1.
template <int STEP>
static __device__ __forceinline__ void rmsnorm_fwd_body(const bf16* __restrict__ xr, const bf16* __restrict__ w,
                                                        bf16* __restrict__ yr, float* __restrict__ rstd, int cols,
                                                        float eps) {
    const bool vec = STEP == EW_PER_THREAD;
    float ss = 0.f;
    for (int i = threadIdx.x * STEP; i < cols; i += blockDim.x * STEP) {
        float v[EW_PER_THREAD];
        load8(xr, i, i + STEP, vec, v);
#pragma unroll
        for (int k = 0; k < STEP; ++k) ss += v[k] * v[k];
    }
    const float r = rsqrtf(block_reduce(ss, false) / cols + eps);
    if (threadIdx.x == 0) *rstd = r;
    for (int i = threadIdx.x * STEP; i < cols; i += blockDim.x * STEP) {
        float v[EW_PER_THREAD], g[EW_PER_THREAD];
        load8(xr, i, i + STEP, vec, v);
        load8(w, i, i + STEP, vec, g);
#pragma unroll
        for (int k = 0; k < STEP; ++k) v[k] = ld(st(v[k] * r)) * g[k];
        store8(yr, i, i + STEP, vec, v);
    }
}

extern "C" __global__ void rmsnorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       bf16* __restrict__ y, float* __restrict__ rstd, int cols, float eps, int vec) {
    const size_t off = (size_t)blockIdx.x * cols;
    if (vec)
        rmsnorm_fwd_body<EW_PER_THREAD>(x + off, w, y + off, rstd + blockIdx.x, cols, eps);
    else
        rmsnorm_fwd_body<1>(x + off, w, y + off, rstd + blockIdx.x, cols, eps);
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd; plus `dres` (the residual
// branch's gradient) when has_res, which saves the separate add of the block's backward.
template <int STEP>
static __device__ __forceinline__ void rmsnorm_bwd_body(const bf16* __restrict__ x, const bf16* __restrict__ w, float r,
                                                        const bf16* __restrict__ dy, const bf16* __restrict__ dres,
                                                        bf16* __restrict__ dx, int cols, int has_res) {
    const bool vec = STEP == EW_PER_THREAD;
    float dot = 0.f;
    for (int i = threadIdx.x * STEP; i < cols; i += blockDim.x * STEP) {
        float d[EW_PER_THREAD], g[EW_PER_THREAD], v[EW_PER_THREAD];
        load8(dy, i, i + STEP, vec, d);
        load8(w, i, i + STEP, vec, g);
        load8(x, i, i + STEP, vec, v);
#pragma unroll
        for (int k = 0; k < STEP; ++k) dot += d[k] * g[k] * v[k] * r;
    }
    const float mean = block_reduce(dot, false) / cols;
    for (int i = threadIdx.x * STEP; i < cols; i += blockDim.x * STEP) {
        float d[EW_PER_THREAD], g[EW_PER_THREAD], v[EW_PER_THREAD], res[EW_PER_THREAD];
        load8(dy, i, i + STEP, vec, d);
        load8(w, i, i + STEP, vec, g);
        load8(x, i, i + STEP, vec, v);
        if (has_res) load8(dres, i, i + STEP, vec, res);
#pragma unroll
        for (int k = 0; k < STEP; ++k) v[k] = r * (d[k] * g[k] - v[k] * r * mean) + (has_res ? res[k] : 0.f);
        store8(dx, i, i + STEP, vec, v);
    }
}

extern "C" __global__ void rmsnorm_bwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       const float* __restrict__ rstd, const bf16* __restrict__ dy,
                                       const bf16* __restrict__ dres, bf16* __restrict__ dx, int cols,
                                       int has_res, int vec) {
    const size_t off = (size_t)blockIdx.x * cols;
    const float r = rstd[blockIdx.x];
    if (vec)
        rmsnorm_bwd_body<EW_PER_THREAD>(x + off, w, r, dy + off, dres + off, dx + off, cols, has_res);
    else
        rmsnorm_bwd_body<1>(x + off, w, r, dy + off, dres + off, dx + off, cols, has_res);
}

// Kernels that add a rank-r product (LoRA) walk ROWS_PER_THREAD rows per thread with the column fixed, so
// the column's rank-r weights come from L1 after the first row instead of from L2 for every row. They
// load all their rows first and compute after, so the loads are in flight together (a loop that loads,
// computes and stores row by row waits out the memory latency once per row).
// ---------------------------------------------------------------------------------------------------------
// The attention input -> q, k, v. Input rows n = b*T + t of [N, W], W = (H + 2 Hkv) D (q | k | v: H query
// heads, then Hkv key heads, then Hkv value heads, head h of a part at h*D..(h+1)*D), plus the bias [W] (the
// LoRA delta is in the input already: ops::linear_forward_delta); q and k are rotated (RoPE, rotate_half over the
// full head dim, tables cos/sin [T, D] by position t, or [N, D] by row when `per_token`: a padding-free
// batch, whose positions restart at every sequence); outputs q [B, H, T, D], k and v [B, Hkv, T, D]. One
// thread per (ROWS_PER_THREAD rows, head slot s < H + 2 Hkv, j < D/2).
extern "C" __global__ void qkv_split_rope(const bf16* __restrict__ base, const bf16* __restrict__ bias,
                                          const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                          bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v,
                                          int n_rows, int T, int H, int Hkv, int D, int has_bias, int per_token) {
    const unsigned half = D / 2;
    const unsigned slots = H + 2 * Hkv;
    const unsigned row_blocks = (n_rows + ROWS_PER_THREAD - 1) / ROWS_PER_THREAD;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;  // 32-bit: 64-bit division is slow
    if (idx >= row_blocks * slots * half) return;
    const unsigned j = idx % half;
    unsigned rest = idx / half;
    const unsigned slot = rest % slots;
    const unsigned row0 = (rest / slots) * ROWS_PER_THREAD;
    const unsigned part = slot < (unsigned)H ? 0 : (slot < (unsigned)(H + Hkv) ? 1 : 2);
    const unsigned h = part == 0 ? slot : (part == 1 ? slot - H : slot - H - Hkv);
    const unsigned heads = part == 0 ? H : Hkv;
    const int W = slots * D;
    const int col1 = slot * D + j, col2 = col1 + half;
    const float bias1 = has_bias ? ld(bias[col1]) : 0.f, bias2 = has_bias ? ld(bias[col2]) : 0.f;
    bf16* out = part == 0 ? q : (part == 1 ? k : v);
    float x1s[ROWS_PER_THREAD], x2s[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        const size_t in = (size_t)n * W;
        x1s[k] = n < (unsigned)n_rows ? ld(base[in + col1]) : 0.f;
        x2s[k] = n < (unsigned)n_rows ? ld(base[in + col2]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n >= (unsigned)n_rows) break;
        const float x1 = x1s[k] + bias1, x2 = x2s[k] + bias2;
        const unsigned b = n / T, t = n % T;
        const size_t o = ((size_t)(b * heads + h) * T + t) * D + j;
        if (part < 2) {
            const unsigned p = per_token ? n : t;
            const float c1 = cos_t[p * D + j], s1 = sin_t[p * D + j];
            const float c2 = cos_t[p * D + j + half], s2 = sin_t[p * D + j + half];
            out[o] = st(x1 * c1 - x2 * s1);
            out[o + half] = st(x2 * c2 + x1 * s2);
        } else {
            out[o] = st(x1);
            out[o + half] = st(x2);
        }
    }
}

// The same split with 8 consecutive j per thread (16-byte loads and stores; the RoPE tables as float4) over
// SPLIT8_ROWS rows. Needs D % 16 == 0 and 16-byte aligned rows. Per element the same operations as
// qkv_split_rope.
#define SPLIT8_ROWS 4
static __device__ __forceinline__ void load_f32x8(float* out, const float* __restrict__ p) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// The RoPE tables' entries at row p for 8 consecutive j (c1, s1) and for their partners j + D/2 (c2, s2).
static __device__ __forceinline__ void load_rope8(float* c1, float* s1, float* c2, float* s2, const float* __restrict__ cos_t,
                                                  const float* __restrict__ sin_t, unsigned p, int D, unsigned j0) {
    const float* c = cos_t + (size_t)p * D + j0;
    const float* s = sin_t + (size_t)p * D + j0;
    load_f32x8(c1, c);
    load_f32x8(s1, s);
    load_f32x8(c2, c + D / 2);
    load_f32x8(s2, s + D / 2);
}

extern "C" __global__ void qkv_split_rope8(const bf16* __restrict__ base, const bf16* __restrict__ bias,
                                           const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                           bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v,
                                           int n_rows, int T, int H, int Hkv, int D, int has_bias, int per_token) {
    const unsigned half = D / 2, groups = half / 8;
    const unsigned slots = H + 2 * Hkv;
    const unsigned row_blocks = (n_rows + SPLIT8_ROWS - 1) / SPLIT8_ROWS;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= row_blocks * slots * groups) return;
    const unsigned j0 = (idx % groups) * 8;
    const unsigned rest = idx / groups;
    const unsigned slot = rest % slots;
    const unsigned row0 = (rest / slots) * SPLIT8_ROWS;
    const unsigned part = slot < (unsigned)H ? 0 : (slot < (unsigned)(H + Hkv) ? 1 : 2);
    const unsigned h = part == 0 ? slot : (part == 1 ? slot - H : slot - H - Hkv);
    const unsigned heads = part == 0 ? H : Hkv;
    const size_t W = (size_t)slots * D;
    const unsigned col1 = slot * D + j0, col2 = col1 + half;
    float b1[8], b2[8];
    load8(bias, col1, col1 + 8, has_bias, b1);
    load8(bias, col2, col2 + 8, has_bias, b2);
    if (!has_bias)
        for (int e = 0; e < 8; ++e) b1[e] = b2[e] = 0.f;
    bf16* out = part == 0 ? q : (part == 1 ? k : v);
    Bf16x8 x1s[SPLIT8_ROWS], x2s[SPLIT8_ROWS];
#pragma unroll
    for (int r = 0; r < SPLIT8_ROWS; ++r) {
        const unsigned n = row0 + r;
        if (n < (unsigned)n_rows) {
            x1s[r].v = *reinterpret_cast<const uint4*>(base + n * W + col1);
            x2s[r].v = *reinterpret_cast<const uint4*>(base + n * W + col2);
        }
    }
#pragma unroll
    for (int r = 0; r < SPLIT8_ROWS; ++r) {
        const unsigned n = row0 + r;
        if (n >= (unsigned)n_rows) break;
        const unsigned b = n / T, t = n % T;
        const size_t o = ((size_t)(b * heads + h) * T + t) * D + j0;
        Bf16x8 y1, y2;
        if (part < 2) {
            const unsigned p = per_token ? n : t;
            float c1[8], s1[8], c2[8], s2[8];
            load_rope8(c1, s1, c2, s2, cos_t, sin_t, p, D, j0);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float x1 = ld(x1s[r].h[e]) + b1[e], x2 = ld(x2s[r].h[e]) + b2[e];
                y1.h[e] = st(x1 * c1[e] - x2 * s1[e]);
                y2.h[e] = st(x2 * c2[e] + x1 * s2[e]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                y1.h[e] = st(ld(x1s[r].h[e]) + b1[e]);
                y2.h[e] = st(ld(x2s[r].h[e]) + b2[e]);
            }
        }
        *reinterpret_cast<uint4*>(out + o) = y1.v;
        *reinterpret_cast<uint4*>(out + o + half) = y2.v;
    }
}

// Where thread `idx` of a [B, H, T, D] <-> [N, H D] layout kernel works: `groups` threads per head row (each
// `per` consecutive j from j0), rows n = b T + t in order, heads inside a row.
struct HeadPos {
    unsigned j0, h, n, b, t;
    size_t bhtd;  // element (b, h, t, j0) of the [B, H, T, D] side
};
static __device__ __forceinline__ HeadPos head_pos(unsigned idx, unsigned groups, unsigned per, int T, int H, int D) {
    HeadPos p;
    p.j0 = (idx % groups) * per;
    const unsigned rest = idx / groups;
    p.h = rest % H;
    p.n = rest / H;
    p.b = p.n / T;
    p.t = p.n % T;
    p.bhtd = ((size_t)(p.b * H + p.h) * T + p.t) * D + p.j0;
    return p;
}

// [B, H, T, D] -> columns col0.. of a [N, stride] matrix (heads side by side), optionally applying the
// inverse rotation (the backward of RoPE). Forward: attention output -> c_proj input (no rope).
// Backward: dq, dk (inverse rope) and dv -> d(c_attn output), one call per part. Tables as in
// qkv_split_rope (`per_token`: by row).
extern "C" __global__ void heads_merge(const bf16* __restrict__ src, const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, bf16* __restrict__ dst, int stride,
                                       int col0, int n_rows, int T, int H, int D, int inverse_rope, int per_token) {
    const unsigned half = D / 2;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned)n_rows * H * half) return;
    const HeadPos q = head_pos(idx, half, 1, T, H, D);
    const unsigned j = q.j0, n = q.n, h = q.h, t = q.t;
    const size_t s = q.bhtd;
    const float g1 = ld(src[s]), g2 = ld(src[s + half]);
    float y1 = g1, y2 = g2;
    if (inverse_rope) {
        // y = x cos + rotate_half(x) sin is a rotation per pair (j, j + D/2); its transpose:
        const unsigned p = per_token ? n : t;
        const float c1 = cos_t[p * D + j], s1 = sin_t[p * D + j];
        const float c2 = cos_t[p * D + j + half], s2 = sin_t[p * D + j + half];
        y1 = g1 * c1 + g2 * s2;
        y2 = g2 * c2 - g1 * s1;
    }
    const size_t d = (size_t)n * stride + col0 + h * D + j;
    dst[d] = st(y1);
    dst[d + half] = st(y2);
}

// heads_merge with 8 consecutive j per thread (16-byte loads and stores; D % 16 == 0, col0 and stride
// multiples of 8, 16-byte aligned buffers); per element the same operations.
extern "C" __global__ void heads_merge8(const bf16* __restrict__ src, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, bf16* __restrict__ dst, int stride,
                                        int col0, int n_rows, int T, int H, int D, int inverse_rope, int per_token) {
    const unsigned half = D / 2, groups = half / 8;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned)n_rows * H * groups) return;
    const HeadPos q = head_pos(idx, groups, 8, T, H, D);
    const unsigned j0 = q.j0, n = q.n, h = q.h, t = q.t;
    const size_t s = q.bhtd;
    Bf16x8 g1, g2, y1, y2;
    g1.v = *reinterpret_cast<const uint4*>(src + s);
    g2.v = *reinterpret_cast<const uint4*>(src + s + half);
    if (inverse_rope) {
        const unsigned p = per_token ? n : t;
        float c1[8], s1[8], c2[8], s2[8];
        load_rope8(c1, s1, c2, s2, cos_t, sin_t, p, D, j0);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float a = ld(g1.h[e]), c = ld(g2.h[e]);
            y1.h[e] = st(a * c1[e] + c * s2[e]);
            y2.h[e] = st(c * c2[e] - a * s1[e]);
        }
    } else {
        y1 = g1;
        y2 = g2;
    }
    const size_t d = (size_t)n * stride + col0 + h * D + j0;
    *reinterpret_cast<uint4*>(dst + d) = y1.v;
    *reinterpret_cast<uint4*>(dst + d + half) = y2.v;
}

// [N, H D] -> [B, H, T, D] (the backward of the forward's head merge); `vec`: 8 consecutive j per thread with
// 16-byte accesses (D % 8 == 0, 16-byte aligned buffers), else one.
extern "C" __global__ void heads_split(const bf16* __restrict__ src, bf16* __restrict__ dst, int n_rows, int T,
                                       int H, int D, int vec) {
    const unsigned per = vec ? 8 : 1, groups = D / per;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned)n_rows * H * groups) return;
    const HeadPos q = head_pos(idx, groups, per, T, H, D);
    if (vec)
        *reinterpret_cast<uint4*>(dst + q.bhtd) = *reinterpret_cast<const uint4*>(src + (size_t)idx * 8);
    else
        dst[q.bhtd] = src[idx];
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
// The residual add, out = a + b (one rounding, as candle's add), 8 elements per thread.
extern "C" __global__ void residual_add(const bf16* __restrict__ a, const bf16* __restrict__ b, bf16* __restrict__ out,
                                        size_t n, int vec) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * EW_PER_THREAD;
    if (i >= n) return;
    float av[EW_PER_THREAD], bv[EW_PER_THREAD];
    load8(a, i, n, vec, av);
    load8(b, i, n, vec, bv);
#pragma unroll
    for (int k = 0; k < EW_PER_THREAD; ++k) av[k] += bv[k];
    store8(out, i, n, vec, av);
}

// With `bits` (or null), also the mask as bits: bit k of byte i / 8 is set when element i + k is dropped, so
// the backward reads a byte where it would hash eight elements again.
extern "C" __global__ void dropout(const bf16* __restrict__ x, bf16* __restrict__ y, size_t n, uint64_t key,
                                   float p, float keep_scale, int vec, uint8_t* __restrict__ bits) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * EW_PER_THREAD;
    if (i >= n) return;
    float v[EW_PER_THREAD];
    load8(x, i, n, vec, v);
    const unsigned mask = dropped8(key, i, p);  // i is a multiple of 8
#pragma unroll
    for (int k = 0; k < EW_PER_THREAD; ++k) v[k] = (mask >> k) & 1u ? 0.f : v[k] * keep_scale;
    store8(y, i, n, vec, v);
    if (bits) bits[i / EW_PER_THREAD] = (uint8_t)mask;
}

// ---------------------------------------------------------------------------------------------------------
// Cross-entropy of one logits row z [V] against its target y: loss = logsumexp(z) - z[y] (f32 out) and,
// when want_grad, dz = softmax(z) - onehot(y) (bf16 out).

extern "C" __global__ void cross_entropy_rows(const bf16* __restrict__ z, const uint32_t* __restrict__ y,
                                              float* __restrict__ loss, bf16* __restrict__ dz, int V,
                                              int want_grad) {
    const size_t row = blockIdx.x;
    const size_t off = row * V;
    // One read of the row for the max and the sum of exponentials together (online: the sum is rescaled when
    // the max grows), 8 logits a load where the rows are 16-byte aligned; a second read for dz. A row is
    // 300 KB at Qwen's vocabulary, so the rows in flight do not stay in L2 between passes.
    const bool vec = V % 8 == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0 && reinterpret_cast<uintptr_t>(dz) % 16 == 0;
    float m = NEG_INF, sum = 0.f;
    auto add = [&](const float* x, int k) {
        float mx = m;
        for (int i = 0; i < k; ++i) mx = fmaxf(mx, x[i]);
        if (mx == NEG_INF) return;
        sum *= expf(m - mx);  // 0 while m is still -inf
        for (int i = 0; i < k; ++i) sum += expf(x[i] - mx);
        m = mx;
    };
    if (vec) {
        const uint4* zr = reinterpret_cast<const uint4*>(z + off);
        for (int j = threadIdx.x; j < V / 8; j += blockDim.x) {
            Bf16x8 v;
            v.v = zr[j];
            float x[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = ld(v.h[i]);
            add(x, 8);
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            const float x = ld(z[off + j]);
            add(&x, 1);
        }
    }
    const float row_max = block_reduce(m, true);
    const float lse = row_max + logf(block_reduce(m == NEG_INF ? 0.f : sum * expf(m - row_max), false));
    const uint32_t target = y[row];
    if (threadIdx.x == 0) loss[row] = lse - ld(z[off + target]);
    if (!want_grad) return;
    if (vec) {
        const uint4* zr = reinterpret_cast<const uint4*>(z + off);
        uint4* dr = reinterpret_cast<uint4*>(dz + off);
        for (int j = threadIdx.x; j < V / 8; j += blockDim.x) {
            Bf16x8 v, d;
            v.v = zr[j];
#pragma unroll
            for (int i = 0; i < 8; ++i) d.h[i] = st(expf(ld(v.h[i]) - lse) - (8 * j + i == (int)target ? 1.f : 0.f));
            dr[j] = d.v;
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x)
            dz[off + j] = st(expf(ld(z[off + j]) - lse) - (j == (int)target ? 1.f : 0.f));
    }
}


// out[n, :] = table[ids[n], :] (bf16, cols % 8 == 0), 8 elements per thread; the table may be host memory
// mapped for the GPU (model/cuda/host_table.rs). Ids past the table read row 0 (the caller checked them).
extern "C" __global__ void gather_rows8(const bf16* __restrict__ table, const uint32_t* __restrict__ ids,
                                        bf16* __restrict__ out, int n, int cols, int rows) {
    const unsigned groups = cols / 8;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned)n * groups) return;
    const unsigned r = idx / groups, c = (idx % groups) * 8;
    unsigned id = ids[r];
    if (id >= (unsigned)rows) id = 0;
    *reinterpret_cast<uint4*>(out + (size_t)r * cols + c) = *reinterpret_cast<const uint4*>(table + (size_t)id * cols + c);
}

// out[rows[r], :] = src[r, :] (bf16, cols % 8 == 0), 8 elements per thread: the rows are distinct (the loss's
// counted positions), so this is index_add onto zeros without the adds.
extern "C" __global__ void scatter_rows8(const bf16* __restrict__ src, const uint32_t* __restrict__ rows,
                                         bf16* __restrict__ out, int n, int cols) {
    const unsigned groups = cols / 8;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned)n * groups) return;
    const unsigned r = idx / groups, c = (idx % groups) * 8;
    *reinterpret_cast<uint4*>(out + (size_t)rows[r] * cols + c) = *reinterpret_cast<const uint4*>(src + (size_t)r * cols + c);
}
