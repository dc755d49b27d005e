// LoRA folded into the frozen linear (see lora.rs).
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// LoRA, folded into the frozen linear's output. Forward: y += u B^T (u = scale * dropout(x) A^T [N, r],
// B [out, r]); backward: dx += dropout_mask * (du A) (du = scale * dy B [N, r], A [r, in]). Both update
// a fresh GEMM output in place, so the [N, out] delta and the [N, in] LoRA input gradient never exist.

// out[n, j] += f(n * cols + j, v[n] . w[j]) in place, a thread taking ROWS_PER_THREAD rows of column j (w [cols, r],
// its row j kept in registers): the shared body of the forward's up-projection (f the identity) and the backward's
// input gradient (f the dropout).
template <int R, typename F>
static __device__ __forceinline__ void rank_add_body(bf16* __restrict__ out, const bf16* __restrict__ v,
                                                     const bf16* __restrict__ w_rows, int n_rows, int cols, int r, F f) {
    const unsigned row_blocks = (n_rows + ROWS_PER_THREAD - 1) / ROWS_PER_THREAD;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= row_blocks * cols) return;
    const unsigned j = idx % cols, row0 = (idx / cols) * ROWS_PER_THREAD;
    RankRow<R> w;
    w.load(w_rows + (size_t)j * r, r);
    float xs[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        xs[k] = n < (unsigned)n_rows ? ld(out[(size_t)n * cols + j]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n >= (unsigned)n_rows) break;
        const size_t e = (size_t)n * cols + j;
        out[e] = st(xs[k] + f(e, w.dot(v + (size_t)n * r, r)));
    }
}

template <int R>
static __device__ __forceinline__ void lora_up_add_body(bf16* __restrict__ y, const bf16* __restrict__ u,
                                                        const bf16* __restrict__ b, int n_rows, int cols, int r) {
    rank_add_body<R>(y, u, b, n_rows, cols, r, [](size_t, float g) { return g; });
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
    rank_add_body<R>(dx, du, a_t, n_rows, cols, r, [=](size_t e, float g) {
        return has_dropout ? (dropped(key, e, p) ? 0.f : g * keep_scale) : g;
    });
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
// The same two at rank 8 with 8 consecutive columns per thread: one 16-byte load and store of y (dx) per
// row instead of eight 2-byte ones, which is what keeps these passes near the memory's bandwidth. The 8
// columns' rank-8 rows of B (A^T) sit in registers; each output is summed in the same order as the kernels
// above, so both give the same bits. The caller checks cols % 8 == 0 and 16-byte alignment.

// The rank-8 rows `rows[c * 8 ..]` of 8 consecutive columns as floats.
static __device__ __forceinline__ void load_rank8_rows(float (*w)[8], const bf16* __restrict__ rows) {
#pragma unroll
    for (int c = 0; c < 8; ++c) load8(rows, c * 8, c * 8 + 8, true, w[c]);
}

static __device__ __forceinline__ float dot8(const float* w, const float* u) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) acc += u[k] * w[k];
    return acc;
}

// Columns col0 .. col0 + 8 of rows row0 .. row0 + ROWS_PER_THREAD (those below n_rows) of an [n_rows, cols]
// matrix, all loads issued before any is used.
static __device__ __forceinline__ void load_row_groups(Bf16x8* dst, const bf16* __restrict__ m, unsigned row0, int n_rows,
                                                       int cols, unsigned col0) {
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n < (unsigned)n_rows) dst[k].v = *reinterpret_cast<const uint4*>(m + (size_t)n * cols + col0);
    }
}

// A thread of the 8-wide kernels: columns col0 .. col0 + 7 of rows row0 .. row0 + ROWS_PER_THREAD - 1 of `out`
// [n_rows, cols] (false for a thread past the end), with those columns' rows of `w_rows` ([cols, 8]) and the rows'
// current values loaded.
static __device__ __forceinline__ bool rank8_tile(const bf16* __restrict__ out, const bf16* __restrict__ w_rows, int n_rows,
                                                  int cols, unsigned& col0, unsigned& row0, float (&w)[8][8],
                                                  Bf16x8 (&xs)[ROWS_PER_THREAD]) {
    const unsigned groups = cols / 8;
    const unsigned row_blocks = (n_rows + ROWS_PER_THREAD - 1) / ROWS_PER_THREAD;
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= row_blocks * groups) return false;
    col0 = (idx % groups) * 8;
    row0 = (idx / groups) * ROWS_PER_THREAD;
    load_rank8_rows(w, w_rows + (size_t)col0 * 8);
    load_row_groups(xs, out, row0, n_rows, cols, col0);
    return true;
}

extern "C" __global__ void lora_up_add8(bf16* __restrict__ y, const bf16* __restrict__ u, const bf16* __restrict__ b,
                                        int n_rows, int cols) {
    unsigned j0, row0;
    float w[8][8];
    Bf16x8 ys[ROWS_PER_THREAD];
    if (!rank8_tile(y, b, n_rows, cols, j0, row0, w, ys)) return;
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n >= (unsigned)n_rows) break;
        float uf[8];
        load8(u, (size_t)n * 8, (size_t)n * 8 + 8, true, uf);
#pragma unroll
        for (int c = 0; c < 8; ++c) ys[k].h[c] = st(ld(ys[k].h[c]) + dot8(w[c], uf));
        *reinterpret_cast<uint4*>(y + (size_t)n * cols + j0) = ys[k].v;
    }
}

// `bits` (or null): the forward's dropout mask as bits (dropout in layers.cu), read instead of hashing again.
extern "C" __global__ void lora_down_add8(bf16* __restrict__ dx, const bf16* __restrict__ du, const bf16* __restrict__ a_t,
                                          int n_rows, int cols, uint64_t key, float p, float keep_scale, int has_dropout,
                                          const uint8_t* __restrict__ bits) {
    unsigned i0, row0;
    float w[8][8];
    Bf16x8 xs[ROWS_PER_THREAD];
    if (!rank8_tile(dx, a_t, n_rows, cols, i0, row0, w, xs)) return;
#pragma unroll 1  // the dropout hash is register-hungry: one row at a time
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const unsigned n = row0 + k;
        if (n >= (unsigned)n_rows) break;
        float uf[8];
        load8(du, (size_t)n * 8, (size_t)n * 8 + 8, true, uf);
        const size_t e0 = (size_t)n * cols + i0;
        const unsigned mask = !has_dropout ? 0u : bits ? bits[e0 / 8] : dropped8(key, e0, p);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            float g = dot8(w[c], uf);
            if (has_dropout) g = (mask >> c) & 1u ? 0.f : g * keep_scale;
            xs[k].h[c] = st(ld(xs[k].h[c]) + g);
        }
        *reinterpret_cast<uint4*>(dx + (size_t)n * cols + i0) = xs[k].v;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Low-rank products written into a fresh tensor (no read of it), on tensor cores: out[n, j] = f(u[n, :] . w[j, :])
// for u [N, r] and w [cols, r], r even and at most 32 (the forward's B; or the backward's A^T, read from A [r, cols]
// as it is stored when `w_t`; r = 24 is q, k and v adapters side by side), f the dropout (mask from the forward's
// bits, or hashed) or nothing; plus base[n, j] when given (the residual stream that attention's o and the MLP's
// down go onto: the residual add's own pass is saved). The frozen linear's GEMM then adds its product into `out`
// (cuBLAS beta = 1). The kernels above keep 64 weights a thread in
// registers and walk 8 rows: bound by neither the memory nor the arithmetic but by their latency (ncu: 25%
// occupancy, ~1.5 TB/s). Here mma.m16n8k16 takes the rank as k (in KS steps of 16, zero past r): a warp owns 64
// columns (8 tiles of 8) and walks 16-row tiles, its B fragments loaded once. Column n of tile j is strip column
// 16 (n / 2) + 2 j + n % 2, an order that leaves lane (g, t) the 16 consecutive columns 16t .. 16t + 15 of rows g
// and g + 8: two 16-byte stores a row. Grid (ceil(cols / 256), ceil(N / TC_ROWS)), 128 threads; cols % 16 == 0,
// 16-byte aligned rows.

#define TC_ROWS 64  // rows per warp

template <int KS>
static __device__ __forceinline__ void rank_tc_body(bf16* __restrict__ out, const bf16* __restrict__ u,
                                                    const bf16* __restrict__ w, int n_rows, int cols, int r,
                                                    uint64_t key, float p, float keep_scale, int has_dropout,
                                                    const uint8_t* __restrict__ bits, int w_t,
                                                    const bf16* __restrict__ base) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int strip = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 64;
    // w given transposed ([r, cols], A as stored): the block's 256 columns of it staged in shared memory with
    // 16-byte loads (read straight from A, 2-byte loads a stride apart, the kernel ran 5% slower).
    __shared__ __align__(16) bf16 wt_s[32][256 + 8];
    if (w_t) {
        const int base = blockIdx.x * 256;
        for (int i = threadIdx.x; i < r * 32; i += blockDim.x) {
            const int k = i / 32, c8 = (i % 32) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (base + c8 < cols) v = *reinterpret_cast<const uint4*>(w + (size_t)k * cols + base + c8);
            *reinterpret_cast<uint4*>(&wt_s[k][c8]) = v;
        }
        __syncthreads();
    }
    if (strip >= cols) return;  // the whole warp
    // A pair of ranks (k, k + 1) of row `row` of an [rows, r] matrix, zero past its end.
    auto pair = [r](const bf16* __restrict__ m, int row, bool ok, int k) -> uint32_t {
        return ok && k < r ? *reinterpret_cast<const uint32_t*>(m + (size_t)row * r + k) : 0u;
    };
    // The same pair from the staged transpose (r even: k + 1 < r whenever k < r).
    auto pair_t = [&](int col, bool ok, int k) -> uint32_t {
        if (!ok || k >= r) return 0u;
        const int c = col - blockIdx.x * 256;
        return (uint32_t)__bfloat16_as_ushort(wt_s[k][c]) | (uint32_t)__bfloat16_as_ushort(wt_s[k + 1][c]) << 16;
    };
    uint32_t b[KS][8][2];  // step s, tile j: w[column of (j, n = g)][16 s + 2t (+ 8), + 1]
#pragma unroll
    for (int s = 0; s < KS; ++s)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int c = strip + 16 * (g >> 1) + 2 * j + (g & 1);
            b[s][j][0] = w_t ? pair_t(c, c < cols, 16 * s + 2 * t) : pair(w, c, c < cols, 16 * s + 2 * t);
            b[s][j][1] = w_t ? pair_t(c, c < cols, 16 * s + 2 * t + 8) : pair(w, c, c < cols, 16 * s + 2 * t + 8);
        }
    const int col0 = strip + 16 * t;  // this lane's 16 output columns
    const int r_end = min(n_rows, (int)(blockIdx.y + 1) * TC_ROWS);
    for (int r0 = blockIdx.y * TC_ROWS; r0 < r_end; r0 += 16) {
        const int rows[2] = {r0 + g, r0 + g + 8};
        float c[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
            const int k = 16 * s + 2 * t;
            const uint32_t a[4] = {pair(u, rows[0], rows[0] < n_rows, k), pair(u, rows[1], rows[1] < n_rows, k),
                                   pair(u, rows[0], rows[0] < n_rows, k + 8), pair(u, rows[1], rows[1] < n_rows, k + 8)};
#pragma unroll
            for (int j = 0; j < 8; ++j) mma(c[j], a, b[s][j][0], b[s][j][1]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (rows[h] >= n_rows || col0 >= cols) continue;
            const size_t e = (size_t)rows[h] * cols + col0;
            unsigned m = 0;
            if (has_dropout) m = bits ? bits[e / 8] | (unsigned)bits[e / 8 + 1] << 8 : dropped8(key, e, p) | dropped8(key, e + 8, p) << 8;
            Bf16x8 add[2] = {};  // base's 16 columns, or zeros
            if (base) {
                add[0].v = reinterpret_cast<const uint4*>(base + e)[0];
                add[1].v = reinterpret_cast<const uint4*>(base + e)[1];
            }
            uint32_t v[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float lo = c[j][2 * h], hi = c[j][2 * h + 1];
                if (has_dropout) {
                    lo = (m >> (2 * j)) & 1u ? 0.f : lo * keep_scale;
                    hi = (m >> (2 * j + 1)) & 1u ? 0.f : hi * keep_scale;
                }
                v[j] = pack(lo + ld(add[j / 4].h[2 * (j % 4)]), hi + ld(add[j / 4].h[2 * (j % 4) + 1]));
            }
            uint4* dst = reinterpret_cast<uint4*>(out + e);
            dst[0] = make_uint4(v[0], v[1], v[2], v[3]);
            dst[1] = make_uint4(v[4], v[5], v[6], v[7]);
        }
    }
}

// One kernel per rank bound (each compiled to what it needs: 82 registers up to rank 16).
#define LORA_RANK_TC(KS, NAME)                                                                                     \
    extern "C" __global__ void NAME(bf16* __restrict__ out, const bf16* __restrict__ u, const bf16* __restrict__ w, \
                                    int n_rows, int cols, int r, uint64_t key, float p, float keep_scale,            \
                                    int has_dropout, const uint8_t* __restrict__ bits, int w_t,                      \
                                    const bf16* __restrict__ base) {                                                 \
        rank_tc_body<KS>(out, u, w, n_rows, cols, r, key, p, keep_scale, has_dropout, bits, w_t, base);               \
    }
LORA_RANK_TC(1, lora_rank16_tc)
LORA_RANK_TC(2, lora_rank32_tc)

// ---------------------------------------------------------------------------------------------------------
// The branch's way in, in one pass over x: h = dropout(x) (stored for the backward's dA), its mask as bits (as
// the dropout kernel writes them, for the backward's input gradient) and u = scale * h A^T [N, r]. It replaces the
// dropout kernel and the u GEMM's second read of h; the hash that makes the mask is most of its work.

// u: a block of LA_WARPS warps per 16 rows, warp w taking columns 32 w, 32 w + 256, ...; mma.m16n8k16 with
// the columns as k. Lane (g, t) loads 8 consecutive columns c .. c + 7 (c = 32 i + 8 t) of rows g and g + 8,
// one 16-byte load each, and uses them as k = 2t, 2t+1 (columns c, c+1) and 2t+8, 2t+9 (c+2, c+3) of one
// product and the same k of a second (c+4 .. c+7); A's rows are read in the same order, so each product sums
// over 16 of the 32 columns. The warps' sums meet in shared memory. cols % 32 == 0, r = 8 NT, 16-byte aligned
// rows; grid ceil(N / 16).
#define LA_WARPS 8
#define LA_STEPS 4  // column steps whose loads are in flight together

template <int NT>
static __device__ __forceinline__ void lora_a_body(const bf16* __restrict__ x, const bf16* __restrict__ a,
                                                   bf16* __restrict__ hout, bf16* __restrict__ u,
                                                   uint8_t* __restrict__ bits, int n_rows,
                                                   int cols, uint64_t key, float p, float keep_scale, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int rows[2] = {(int)blockIdx.x * 16 + g, (int)blockIdx.x * 16 + g + 8};
    const unsigned thr = drop_threshold(p);
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    // LA_STEPS column steps a round, all loads first: the memory's latency is paid once a round.
    for (int c0 = warp * 32 + t * 8; c0 < cols; c0 += LA_STEPS * LA_WARPS * 32) {
        Bf16x8 xs[LA_STEPS][2], as[LA_STEPS][NT];  // [step][row half], [step][rank tile]
#pragma unroll
        for (int s = 0; s < LA_STEPS; ++s) {
            const int c = c0 + s * LA_WARPS * 32;  // the whole warp agrees on c < cols (cols % 32 == 0)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                xs[s][h].v = c < cols && rows[h] < n_rows ? *reinterpret_cast<const uint4*>(x + (size_t)rows[h] * cols + c)
                                                          : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int j = 0; j < NT; ++j)
                as[s][j].v = c < cols ? *reinterpret_cast<const uint4*>(a + (size_t)(8 * j + g) * cols + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int s = 0; s < LA_STEPS; ++s) {
            const int c = c0 + s * LA_WARPS * 32;
            if (c >= cols) break;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const size_t e = (size_t)rows[h] * cols + c;
                const unsigned m = dropped8_z(drop_z(key, e), thr);
#pragma unroll
                for (int k = 0; k < 8; ++k) xs[s][h].h[k] = (m >> k) & 1u ? st(0.f) : st(ld(xs[s][h].h[k]) * keep_scale);
                if (rows[h] < n_rows) *reinterpret_cast<uint4*>(hout + e) = xs[s][h].v;
                // The quad's four bytes (columns c - 8t .. c - 8t + 31 of the row) as one 4-byte store.
                unsigned word = m << (8 * t);
                word |= __shfl_xor_sync(0xffffffffu, word, 1);
                word |= __shfl_xor_sync(0xffffffffu, word, 2);
                if (t == 0 && rows[h] < n_rows) *reinterpret_cast<uint32_t*>(bits + e / 8) = word;
            }
            const uint32_t* lo = reinterpret_cast<const uint32_t*>(&xs[s][0]);
            const uint32_t* hi = reinterpret_cast<const uint32_t*>(&xs[s][1]);
            const uint32_t fa[2][4] = {{lo[0], hi[0], lo[1], hi[1]}, {lo[2], hi[2], lo[3], hi[3]}};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint32_t* b = reinterpret_cast<const uint32_t*>(&as[s][j]);
                mma(acc[j], fa[0], b[0], b[1]);
                mma(acc[j], fa[1], b[2], b[3]);
            }
        }
    }
    // acc[j]: rows g (0, 1) and g + 8 (2, 3), ranks 8 j + 2t, + 1. Warp 0 adds the others' and stores.
    __shared__ float part[LA_WARPS][NT * 4][32];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) part[warp][4 * j + q][lane] = acc[j][q];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            v[q] = 0.f;
            for (int w = 0; w < LA_WARPS; ++w) v[q] += part[w][4 * j + q][lane];
        }
#pragma unroll
        for (int h = 0; h < 2; ++h)
            if (rows[h] < n_rows)
                *reinterpret_cast<uint32_t*>(u + (size_t)rows[h] * (8 * NT) + 8 * j + 2 * t) = pack(v[2 * h] * scale, v[2 * h + 1] * scale);
    }
}

#define LORA_A(NT, NAME)                                                                                             \
    extern "C" __global__ void NAME(const bf16* __restrict__ x, const bf16* __restrict__ a, bf16* __restrict__ h,   \
                                    bf16* __restrict__ u, uint8_t* __restrict__ bits, int n_rows, int cols,          \
                                    uint64_t key, float p, float keep_scale, float scale) {                          \
        lora_a_body<NT>(x, a, h, u, bits, n_rows, cols, key, p, keep_scale, scale);                                  \
    }
LORA_A(1, lora_a8)
LORA_A(2, lora_a16)
LORA_A(3, lora_a24)
LORA_A(4, lora_a32)
