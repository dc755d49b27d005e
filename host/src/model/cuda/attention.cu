// Causal attention: the softmax over GEMM-made scores (and its backward), and flash attention.
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

// [N, C] (heads side by side) -> [B, H, T, D]: the backward of merging the heads (c_proj's input gradient
// back to the attention output's layout). One thread per element.
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
    // The last query blocks see the most keys: they get the first block indices, so the long blocks start
    // first and the short ones fill the tail.
    const int qblock = gridDim.x - 1 - blockIdx.x;
    const int q0 = qblock * FA_B;
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

    const int n_blocks = qblock + 1;  // causal: key blocks up to the diagonal
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

// dQ for one 64-query block (the last ones first, as in flash_fwd), walking the key blocks up to the
// diagonal.
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
    const int qblock = gridDim.x - 1 - blockIdx.x;
    const int q0 = qblock * FA_B;
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
    for (int kb = 0; kb <= qblock; ++kb) {
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

