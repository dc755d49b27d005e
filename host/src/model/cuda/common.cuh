// Shared by every kernel file: bf16 load/store, reductions, the rank-r dot products of LoRA, 8-wide
// elementwise loads, and the counter-based dropout hash (the same formula as model/rng.rs).
#pragma once
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


static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#define ROWS_PER_THREAD 8

// c (16 x 8, f32) += a (16 x 16) b (16 x 8), bf16 operands on tensor cores (mma.m16n8k16; the fragment layouts
// are spelled out at the top of flash.cu).
static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 -> one register of two bf16 (the first in the low half: the lower column).
static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
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

// ---------------------------------------------------------------------------------------------------------
// Dropout with a counter-based mask, exactly as model/rng.rs (dropout_uniform) computes it on the CPU, so the
// mask never has to be stored: the backward (and a recomputed forward) regenerate it. One 64-bit hash of
// (key, i / 4) gives elements i .. i + 3 16 bits each (the highest for the first); an element is dropped when
// its 16 bits / 65536 < p. Kept elements are scaled by 1 / (1 - p). (A hash per element made dropout bound by
// the integer units: ~20 instructions an element against two bytes read and written.)

static __device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define GOLDEN64 0x9E3779B97F4A7C15ull

// The hash input of the quad holding element i; the next quad's is this + GOLDEN64, so a thread walking
// consecutive elements adds instead of multiplying.
static __device__ __forceinline__ uint64_t drop_z(uint64_t key, uint64_t i) { return key + ((i >> 2) + 1) * GOLDEN64; }

// Element dropped when its 16 bits are below ceil(p * 65536): the same test as 16 bits / 65536 < p (p * 65536 is
// exact in f32), without converting each draw to a float.
static __device__ __forceinline__ unsigned drop_threshold(float p) { return (unsigned)ceilf(p * 65536.f); }

// The 4 lanes of hash h as mask bits (bit k: lane k dropped).
static __device__ __forceinline__ unsigned drop_mask4(uint64_t h, unsigned thr) {
    unsigned m = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) m |= (unsigned)(((h >> (48 - 16 * k)) & 0xFFFFu) < thr) << k;
    return m;
}

static __device__ __forceinline__ bool dropped(uint64_t key, uint64_t i, float p) {
    return (drop_mask4(mix64(drop_z(key, i)), drop_threshold(p)) >> (i & 3)) & 1u;
}

// The mask of the 8 elements from the one whose quad has hash input z (a multiple of 8) as bits: bit k set
// when element k is dropped.
static __device__ __forceinline__ unsigned dropped8_z(uint64_t z, unsigned thr) {
    return drop_mask4(mix64(z), thr) | drop_mask4(mix64(z + GOLDEN64), thr) << 4;
}

// The same for elements i .. i + 7 of stream `key` (i a multiple of 8).
static __device__ __forceinline__ unsigned dropped8(uint64_t key, uint64_t i, float p) {
    return dropped8_z(drop_z(key, i), drop_threshold(p));
}

