// Flash attention (causal, head dim 64 or 128, variable-length sequences, GQA) and its backward, on tensor
// cores through mma.sync (bf16 in, f32 accumulate), the scores and probabilities kept in registers: the [T, T]
// scores never reach memory, shared or global. The forward walks key blocks with an online softmax and keeps
// each row's log-sum-exp; the backward recomputes the probabilities from it.
//
// Layouts: q [B, H, T, D], k and v [B, Hkv, T, D] (query head h reads kv head h / (H / Hkv)), lse [B, H, T].
// The output O and its gradient dO are token-major, [B T, H D] (what c_proj takes and gives: no head merge or
// split around the kernels), and the backward writes dq, dk, dv token-major side by side into d(qkv)
// [B T, (H + 2 Hkv) D], RoPE undone on dq and dk as they are stored (what c_attn's backward takes).
// A row of the batch holds one sequence or, padding-free, several laid end to end; each sequence attends
// causally within itself. The work is a block table (model/attention.rs, FlashBlocks): one entry
// (b, first, len, blk) per 64-token block of every sequence (row b, tokens first..first+len of that row), the
// entries with the most forward work first, and the same per 128-token block. Grid: (table entries, heads).
// dK/dV (and the forward of short sequences): 64 keys (queries) a block, 4 warps of 16 rows. The forward of
// long sequences and dQ: 128 queries a block, 4 warps of 32 rows (two m16 tiles, so each K or V fragment read
// from shared memory feeds twice the products). The dK/dV kernel and the dQ kernel each own their outputs (no
// atomics), so results are deterministic. The dK/dV kernel also writes the dS tiles it computes (bf16, 8 KB per
// 64 x 64 tile of the causal triangle) so that dQ = dS K is one product per tile instead of three (recomputing S
// and dP); where those tiles would not fit the caller's budget, the dQ kernel that recomputes them runs instead.
//
// Tensor-core fragments (PTX ISA, mma.m16n8k16 with bf16): lane = 4 g + t. A (16 x 16, row-major): rows g and
// g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9, four 32-bit registers of two bf16 each. B (16 x 8): column g,
// rows 2t, 2t + 1 and 2t + 8, 2t + 9. C (16 x 8, f32): rows g (c0, c1) and g + 8 (c2, c3), columns 2t, 2t + 1.
// Two C tiles side by side are exactly one A operand (rounded to bf16), which is how P = softmax(S) goes from
// one product (S = Q K^T) into the next (O += P V) without leaving registers. Tiles reach registers from
// shared memory with ldmatrix (8 x 8 blocks, one row address per lane; `.trans` for operands stored
// k-major, such as V in P V), whose rows are padded to D + 8 elements so the 8 rows of a block fall in
// different banks. Global tiles arrive by cp.async, the next key block's while this one is computed.
#include "common.cuh"

namespace fa {

constexpr int BLOCK = 64;  // queries (or keys) per block
constexpr int BLOCK_LONG = 128;  // queries a block of forward128 and dQ from the tiles (attention.rs FLASH_BLOCK_LONG)
constexpr int THREADS = 128;

// One table entry: a sequence (row b, first token in the row, length) and one 64-token block of it.
struct Block {
    int b, first, len, blk;
};
__device__ __forceinline__ Block block_at(const int4* __restrict__ table, int i) {
    const int4 e = table[i];
    return Block{e.x, e.y, e.z, e.w};
}

// Offsets of a sequence's first token in a [B, heads, T, D] tensor (times D) and in a [B, heads, T] one.
__device__ __forceinline__ size_t rows_at(const Block& e, int heads, int h, int T) {
    return ((size_t)e.b * heads + h) * T + e.first;
}

// Offset of a sequence's first token, head h (columns h D ..), in a token-major [B T, ld] matrix.
__device__ __forceinline__ size_t tokens_at(const Block& e, int T, int ld, int h, int D) {
    return ((size_t)e.b * T + e.first) * ld + (size_t)h * D;
}

// RoPE's backward applied as rows are stored (dq, dk): the tables cos, sin [rows, D] (f32) and the table row of
// the sequence's first token (its position 0: the row b T + first of per-token tables, else row first). cos
// null: stored as they are.
struct Unrope {
    const float* cos;
    const float* sin;
    size_t row0;
};
__device__ __forceinline__ Unrope unrope_at(const float* cos, const float* sin, int per_token, const Block& e, int T) {
    return Unrope{cos, sin, per_token ? (size_t)e.b * T + e.first : (size_t)e.first};
}

// The block of QB queries (BLOCK or BLOCK_LONG) a forward or dQ block computes: table entry blockIdx.x, query
// head h (kv head kvh), the sequence's length L and first query q0 of the block, and the offsets of the
// sequence's first token in the q-shaped and the k/v-shaped tensors (rows_at).
struct QueryBlock {
    Block e;
    int h, kvh, L, q0;
    size_t qrows, kvrows;
};
template <int QB = BLOCK>
__device__ __forceinline__ QueryBlock query_block(const int4* __restrict__ table, int h, int T, int H, int Hkv) {
    const Block e = block_at(table, blockIdx.x);
    const int kvh = h / (H / Hkv);
    return QueryBlock{e, h, kvh, e.len, e.blk * QB, rows_at(e, H, h, T), rows_at(e, Hkv, kvh, T)};
}

// ----- PTX wrappers -----

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm(uint32_t* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_t(uint32_t* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// The A operand (16 rows x 16 columns) made of C tiles j and j + 1 (columns 8j .. 8j + 15).
__device__ __forceinline__ void c_to_a(uint32_t* a, const float* c0, const float* c1) {
    a[0] = pack(c0[0], c0[1]);
    a[1] = pack(c0[2], c0[3]);
    a[2] = pack(c1[0], c1[1]);
    a[3] = pack(c1[2], c1[3]);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src));
}
// 16 bytes, or 16 zeros where !valid (src is then not read).
__device__ __forceinline__ void cp_async16_or_zero(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ----- tiles -----

template <int D>
struct Dims {
    static constexpr int LD = D + 8;                // bf16 row stride of a [64, D] tile in shared memory
    static constexpr int TILE = BLOCK * LD;         // elements of one tile
    static constexpr int KD = D / 16;               // 16-wide steps over the head dim (as a reduction)
    static constexpr int ND = D / 8;                // 8-wide C tiles over the head dim (as an output)
};

// Rows r0 .. r0 + 64 of a sequence's [L, D] matrix (rows `stride` elements apart: D head-major, wider
// token-major) into a tile, asynchronously; rows at or past L are zero. Each thread copies the same 16-byte
// column of every (THREADS / (D / 8))-th row: its offsets are computed once and the copies of a whole block
// need no bounds check (a loop working out each copy's row, column, address and bounds left the kernels
// issuing ~1.5x the instructions: ncu, BENCHMARKS.md).
template <int D>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* __restrict__ src, int r0, int L, int stride = D) {
    constexpr int CH = D / 8, STEP = THREADS / CH, LD = Dims<D>::LD;
    const int r = threadIdx.x / CH, c = (threadIdx.x % CH) * 8;
    bf16* d = dst + r * LD + c;
    const bf16* s = src + (size_t)(r0 + r) * stride + c;
    if (r0 + BLOCK <= L) {
#pragma unroll
        for (int j = 0; j < BLOCK / STEP; ++j) cp_async16(d + j * STEP * LD, s + (size_t)j * STEP * stride);
    } else {
#pragma unroll
        for (int j = 0; j < BLOCK / STEP; ++j) {
            const bool in = r0 + r + j * STEP < L;
            cp_async16_or_zero(d + j * STEP * LD, in ? s + (size_t)j * STEP * stride : src, in);
        }
    }
}

// 64 f32 per-row values (lse or the row dot) of rows r0.. of a sequence, asynchronously; 0 past L.
__device__ __forceinline__ void load_row_values(float* dst, const float* __restrict__ src, int r0, int L) {
    for (int i = threadIdx.x; i < BLOCK; i += THREADS) cp_async4(dst + i, r0 + i < L ? src + r0 + i : src, r0 + i < L);
}

// A operand: the 16 rows at `rows` (a warp's rows of a tile), columns 16 kk .. 16 kk + 15.
template <int D>
__device__ __forceinline__ void load_a(uint32_t* a, const bf16* rows, int kk) {
    const int lane = threadIdx.x & 31;
    ldsm(a, rows + (lane & 15) * Dims<D>::LD + kk * 16 + (lane >> 4) * 8);
}

// The A operands of a warp's 16 rows over the whole head dim (KD steps of 16 columns), kept in registers.
template <int D>
__device__ __forceinline__ void load_a_rows(uint32_t (*a)[4], const bf16* rows) {
#pragma unroll
    for (int kk = 0; kk < Dims<D>::KD; ++kk) load_a<D>(a[kk], rows, kk);
}

// B operands of two C tiles (n = 16 np .. 16 np + 15) for a product with a tile's transpose (S = Q K^T:
// n = the tile's row, k = its column 16 kk ..): b[0], b[1] for tile 2 np, b[2], b[3] for tile 2 np + 1.
template <int D>
__device__ __forceinline__ void load_b_rows(uint32_t* b, const bf16* tile, int np, int kk) {
    const int lane = threadIdx.x & 31;
    ldsm(b, tile + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * Dims<D>::LD + kk * 16 + ((lane >> 3) & 1) * 8);
}

// B operands of two C tiles (n = head-dim columns 16 dp ..) for a product with the tile itself (O = P V:
// k = the tile's rows 16 kk .., n = its columns).
template <int D>
__device__ __forceinline__ void load_b_cols(uint32_t* b, const bf16* tile, int kk, int dp) {
    const int lane = threadIdx.x & 31;
    ldsm_t(b, tile + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * Dims<D>::LD + dp * 16 + (lane >> 4) * 8);
}

// acc (16 x 64 as 8 C tiles) = A-rows (16 x D) . tile^T, the A operand read from shared memory.
template <int D>
__device__ __forceinline__ void rows_times_tile_t(float (*acc)[4], const bf16* a_rows, const bf16* tile) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Dims<D>::KD; ++kk) {
        uint32_t a[4];
        load_a<D>(a, a_rows, kk);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t b[4];
            load_b_rows<D>(b, tile, np, kk);
            mma(acc[2 * np], a, b[0], b[1]);
            mma(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// acc (16 x 64 as 8 C tiles) = A (16 x D, held in registers as KD operands) . tile^T.
template <int D>
__device__ __forceinline__ void regs_times_tile_t(float (*acc)[4], const uint32_t (*a)[4], const bf16* tile) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Dims<D>::KD; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t b[4];
            load_b_rows<D>(b, tile, np, kk);
            mma(acc[2 * np], a[kk], b[0], b[1]);
            mma(acc[2 * np + 1], a[kk], b[2], b[3]);
        }
    }
}

// Key block kb's K and V tiles (buffer kb & 1) are in shared memory when this returns; block kb + 1's are
// on their way into the other buffer (up to key block `last`), loaded while kb is computed.
template <int D>
__device__ __forceinline__ void next_key_block(bf16* Ks, bf16* Vs, const bf16* kp, const bf16* vp, int kb, int last, int L) {
    if (kb < last) {
        load_tile<D>(Ks + ((kb + 1) & 1) * Dims<D>::TILE, kp, (kb + 1) * BLOCK, L);
        load_tile<D>(Vs + ((kb + 1) & 1) * Dims<D>::TILE, vp, (kb + 1) * BLOCK, L);
    }
    cp_commit();
    cp_wait<1>();
    __syncthreads();
}

// acc (16 x D as ND C tiles) += P (16 x 64, given as 8 C tiles, rounded to bf16) . tile (64 x D).
template <int D>
__device__ __forceinline__ void probs_times_tile(float (*acc)[4], float (*p)[4], const bf16* tile) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        c_to_a(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < Dims<D>::ND / 2; ++dp) {
            uint32_t b[4];
            load_b_cols<D>(b, tile, kk, dp);
            mma(acc[2 * dp], a, b[0], b[1]);
            mma(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// A warp's 16 x D accumulator (times `scale`) -> rows row0 .. row0 + 16 of a sequence's [L, D] bf16 matrix
// (rows `stride` elements apart), staged through the warp's 16 rows of a free shared tile so global stores are 16
// bytes wide; RoPE undone on the way when `u.cos` is set (on the bf16 values, as the head-merge kernel did:
// the same bits).
template <int D>
__device__ __forceinline__ void store_rows(float (*acc)[4], float scale, bf16* stage, bf16* __restrict__ dst, int row0,
                                           int L, int stride, const Unrope& u = Unrope{nullptr, nullptr, 0}) {
    constexpr int LD = Dims<D>::LD;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < Dims<D>::ND; ++n) {
        *reinterpret_cast<uint32_t*>(stage + g * LD + n * 8 + 2 * t) = pack(acc[n][0] * scale, acc[n][1] * scale);
        *reinterpret_cast<uint32_t*>(stage + (g + 8) * LD + n * 8 + 2 * t) = pack(acc[n][2] * scale, acc[n][3] * scale);
    }
    __syncwarp();
    if (!u.cos) {
        constexpr int CH = D / 8;
        for (int i = lane; i < 16 * CH; i += 32) {
            const int r = i / CH, c = (i % CH) * 8;
            if (row0 + r < L) *reinterpret_cast<uint4*>(dst + (size_t)(row0 + r) * stride + c) = *reinterpret_cast<const uint4*>(stage + r * LD + c);
        }
        return;
    }
    // y = x cos + rotate_half(x) sin rotates each pair (j, j + D/2); its transpose, 8 pairs per step.
    constexpr int HALF = D / 2, HC = HALF / 8;
    for (int i = lane; i < 16 * HC; i += 32) {
        const int r = i / HC, c = (i % HC) * 8;
        if (row0 + r >= L) continue;
        // The tables repeat each pair's angle in both halves (model/attention.rs, Rope::new; a test holds it
        // to that): the first half is read, 16 bytes at a time, the 8 lanes of a row sweeping its 64 angles in
        // one coalesced read (one float at a time over both halves, the sectors touched were 16x the bytes
        // used, and dK/dV ran 8% slower in a step).
        const size_t p = (u.row0 + row0 + r) * D + c;
        float cs[8], sn[8];
#pragma unroll
        for (int h4 = 0; h4 < 8; h4 += 4) {
            *reinterpret_cast<float4*>(cs + h4) = *reinterpret_cast<const float4*>(u.cos + p + h4);
            *reinterpret_cast<float4*>(sn + h4) = *reinterpret_cast<const float4*>(u.sin + p + h4);
        }
        Bf16x8 g1, g2, y1, y2;
        g1.v = *reinterpret_cast<const uint4*>(stage + r * LD + c);
        g2.v = *reinterpret_cast<const uint4*>(stage + r * LD + c + HALF);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float a = ld(g1.h[e]), b = ld(g2.h[e]);
            y1.h[e] = st(a * cs[e] + b * sn[e]);
            y2.h[e] = st(b * cs[e] - a * sn[e]);
        }
        bf16* out = dst + (size_t)(row0 + r) * stride + c;
        *reinterpret_cast<uint4*>(out) = y1.v;
        *reinterpret_cast<uint4*>(out + HALF) = y2.v;
    }
}

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// ----- forward -----

template <int D>
__device__ __forceinline__ void forward64(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                        bf16* __restrict__ o, float* __restrict__ lse, const int4* __restrict__ table,
                                        int T, int H, int Hkv, float scale) {
    constexpr int TILE = Dims<D>::TILE, LD = Dims<D>::LD, KD = Dims<D>::KD, ND = Dims<D>::ND;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);  // two buffers
    bf16* Vs = Ks + 2 * TILE;                  // two buffers
    // Q passes through V's second buffer on its way to registers: four tiles, not five, let three blocks
    // share an SM (their registers fit too: launch bounds of 3 blocks).
    bf16* Qs = Vs + TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const auto [e, h, kvh, L, q0, qrows, kvrows] = query_block(table, blockIdx.y, T, H, Hkv);
    const bf16* kp = k + kvrows * D;
    const bf16* vp = v + kvrows * D;
    const float sl2 = scale * LOG2E;  // scores in log2 units: exp2 is one instruction

    load_tile<D>(Qs, q + qrows * D, q0, L);
    load_tile<D>(Ks, kp, 0, L);
    load_tile<D>(Vs, vp, 0, L);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    uint32_t qf[KD][4];
    load_a_rows<D>(qf, Qs + warp * 16 * LD);
    __syncthreads();  // every warp holds its Q before key block 1 is loaded over it

    float oacc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.f;
    float m_r[2] = {NEG_INF, NEG_INF}, l_r[2] = {0.f, 0.f};  // rows g and g + 8 (l: this lane's part)
    const int qi0 = q0 + warp * 16 + g;

    for (int kb = 0; kb <= e.blk; ++kb) {  // causal: key blocks up to the diagonal
        const bf16* Kb = Ks + (kb & 1) * TILE;
        const bf16* Vb = Vs + (kb & 1) * TILE;
        next_key_block<D>(Ks, Vs, kp, vp, kb, e.blk, L);

        // S = Q K^T (16 x 64 per warp), Q from registers.
        float s[8][4];
        regs_times_tile_t<D>(s, qf, Kb);
        // Online softmax: mask (only the diagonal block holds keys after a query or past L), row max over
        // the 4 lanes of a row, rescale, exponentiate.
        const bool diagonal = kb == e.blk;
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float x = s[j][c] * sl2;
                if (diagonal) {
                    const int key = kb * BLOCK + j * 8 + 2 * t + (c & 1);
                    const int qi = qi0 + (c >> 1) * 8;
                    if (key > qi || key >= L) x = NEG_INF;
                }
                s[j][c] = x;
                mx[c >> 1] = fmaxf(mx[c >> 1], x);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m_r[r], mx[r]);
            const float m_use = m_new == NEG_INF ? 0.f : m_new;  // a row with no key yet stays empty
            alpha[r] = exp2f(m_r[r] - m_use);
            m_r[r] = m_new;
            mx[r] = m_use;
        }
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float p = exp2f(s[j][c] - mx[c >> 1]);
                s[j][c] = p;
                rs[c >> 1] += p;
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) l_r[r] = l_r[r] * alpha[r] + rs[r];
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            oacc[n][0] *= alpha[0];
            oacc[n][1] *= alpha[0];
            oacc[n][2] *= alpha[1];
            oacc[n][3] *= alpha[1];
        }
        // O += P V, P straight from the registers of S.
        probs_times_tile<D>(oacc, s, Vb);
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    // O / l (l summed over the row's 4 lanes), staged through the warp's rows of the first K buffer.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
    }
    const float inv0 = 1.f / l_r[0], inv1 = 1.f / l_r[1];
#pragma unroll
    for (int n = 0; n < ND; ++n) {
        oacc[n][0] *= inv0;
        oacc[n][1] *= inv0;
        oacc[n][2] *= inv1;
        oacc[n][3] *= inv1;
    }
    store_rows<D>(oacc, 1.f, Ks + warp * 16 * LD, o + tokens_at(e, T, H * D, h, D), q0 + warp * 16, L, H * D);
    if (t == 0) {
        if (qi0 < L) lse[qrows + qi0] = (m_r[0] + log2f(l_r[0])) * LN2;
        if (qi0 + 8 < L) lse[qrows + qi0 + 8] = (m_r[1] + log2f(l_r[1])) * LN2;
    }
}

// C tiles n and n + 1 of two m tiles (acc0, acc1: a warp's 32 rows) += a0, a1 times one ldmatrix.x4 B fragment b
// (two 8-column tiles): the fragment read from shared memory feeds four products.
__device__ __forceinline__ void mma_2x2(float (*acc0)[4], float (*acc1)[4], int n, const uint32_t* a0, const uint32_t* a1,
                                        const uint32_t* b) {
    mma(acc0[n], a0, b[0], b[1]);
    mma(acc0[n + 1], a0, b[2], b[3]);
    mma(acc1[n], a1, b[0], b[1]);
    mma(acc1[n + 1], a1, b[2], b[3]);
}

// acc[m] (16 x D as ND C tiles, m = 0, 1: a warp's 32 rows) += a_m (16 x 16) . rows 16 kk .. 16 kk + 15 of a tile
// (16 x D) (forward128's P V, dQ from the dS tiles).
template <int D>
__device__ __forceinline__ void pair_times_tile_rows(float (*acc)[Dims<D>::ND][4], const uint32_t* a0, const uint32_t* a1,
                                                     const bf16* tile, int kk) {
#pragma unroll
    for (int dp = 0; dp < Dims<D>::ND / 2; ++dp) {
        uint32_t b[4];
        load_b_cols<D>(b, tile, kk, dp);
        mma_2x2(acc[0], acc[1], 2 * dp, a0, a1, b);
    }
}

// ----- forward, 128 queries a block -----
// Four warps of 32 query rows (two m16 tiles each): every K and V fragment read from shared memory feeds
// twice the products of 16 rows a warp, and each warp carries two independent chains of work. The scale is
// folded into the exponent (one FFMA an element; the row max is taken over the raw scores).

template <int D>
__device__ __forceinline__ void forward128(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                           bf16* __restrict__ o, float* __restrict__ lse, const int4* __restrict__ table,
                                           int T, int H, int Hkv, float scale) {
    constexpr int TILE = Dims<D>::TILE, LD = Dims<D>::LD, KD = Dims<D>::KD, ND = Dims<D>::ND;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);  // [128, LD]
    bf16* Ks = Qs + 2 * TILE;                  // two buffers
    bf16* Vs = Ks + 2 * TILE;                  // two buffers
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const auto [e, h, kvh, L, q0, qrows, kvrows] = query_block<BLOCK_LONG>(table, blockIdx.y, T, H, Hkv);
    const bf16* kp = k + kvrows * D;
    const bf16* vp = v + kvrows * D;
    const float sl2 = scale * LOG2E;
    const int last = min((q0 + BLOCK_LONG - 1) / BLOCK, (L - 1) / BLOCK);  // the block's last key block
    const int r0 = q0 + warp * 32;                                     // this warp's first query

    load_tile<D>(Qs, q + qrows * D, q0, L);
    load_tile<D>(Qs + TILE, q + qrows * D, q0 + BLOCK, L);
    load_tile<D>(Ks, kp, 0, L);
    load_tile<D>(Vs, vp, 0, L);
    cp_commit();
    const bf16* Qw = Qs + warp * 32 * LD;

    float oacc[2][ND][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < ND; ++n) oacc[m][n][0] = oacc[m][n][1] = oacc[m][n][2] = oacc[m][n][3] = 0.f;
    // Rows g, g + 8, g + 16, g + 24 of the warp: running max (log2 units) and this lane's part of the sum.
    float m_r[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF}, l_r[4] = {0.f, 0.f, 0.f, 0.f};

    for (int kb = 0; kb <= last; ++kb) {
        const bf16* Kb = Ks + (kb & 1) * TILE;
        const bf16* Vb = Vs + (kb & 1) * TILE;
        next_key_block<D>(Ks, Vs, kp, vp, kb, last, L);
        if (kb * BLOCK <= r0 + 31 && r0 < L) {  // else no query of the warp sees a key of the block
            float s[2][8][4];
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < 8; ++j) s[m][j][0] = s[m][j][1] = s[m][j][2] = s[m][j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                uint32_t a0[4], a1[4];
                load_a<D>(a0, Qw, kk);
                load_a<D>(a1, Qw + 16 * LD, kk);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t b[4];
                    load_b_rows<D>(b, Kb, np, kk);
                    mma_2x2(s[0], s[1], 2 * np, a0, a1, b);
                }
            }
            // Masks only where the block reaches past the warp's first query or the sequence's end.
            if (kb * BLOCK + BLOCK - 1 > r0 || kb * BLOCK + BLOCK > L) {
#pragma unroll
                for (int m = 0; m < 2; ++m)
#pragma unroll
                    for (int j = 0; j < 8; ++j)
#pragma unroll
                        for (int c = 0; c < 4; ++c) {
                            const int key = kb * BLOCK + j * 8 + 2 * t + (c & 1);
                            const int qi = r0 + m * 16 + g + (c >> 1) * 8;
                            if (key > qi || key >= L) s[m][j][c] = NEG_INF;
                        }
            }
            float mx[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF};
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) mx[2 * m + (c >> 1)] = fmaxf(mx[2 * m + (c >> 1)], s[m][j][c]);
            float alpha[4];  // mx becomes minus each row's max in use
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float m_new = fmaxf(m_r[r], mx[r] * sl2);
                const float m_use = m_new == NEG_INF ? 0.f : m_new;  // a row with no key yet stays empty
                alpha[r] = exp2f(m_r[r] - m_use);
                m_r[r] = m_new;
                mx[r] = -m_use;
                l_r[r] *= alpha[r];
            }
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        const float p = exp2f(fmaf(s[m][j][c], sl2, mx[2 * m + (c >> 1)]));
                        s[m][j][c] = p;
                        l_r[2 * m + (c >> 1)] += p;
                    }
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    oacc[m][n][0] *= alpha[2 * m];
                    oacc[m][n][1] *= alpha[2 * m];
                    oacc[m][n][2] *= alpha[2 * m + 1];
                    oacc[m][n][3] *= alpha[2 * m + 1];
                }
            // O += P V: each V fragment feeds both m tiles.
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                uint32_t a0[4], a1[4];
                c_to_a(a0, s[0][2 * kk], s[0][2 * kk + 1]);
                c_to_a(a1, s[1][2 * kk], s[1][2 * kk + 1]);
                pair_times_tile_rows<D>(oacc, a0, a1, Vb, kk);
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    cp_wait<0>();
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_r[2 * m + r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            l_r[2 * m + r] = l;
            inv[r] = 1.f / l;
        }
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            oacc[m][n][0] *= inv[0];
            oacc[m][n][1] *= inv[0];
            oacc[m][n][2] *= inv[1];
            oacc[m][n][3] *= inv[1];
        }
        // Staged through the warp's own rows of the (now free) K buffers.
        store_rows<D>(oacc[m], 1.f, Ks + (warp * 32 + m * 16) * LD, o + tokens_at(e, T, H * D, h, D), r0 + m * 16, L, H * D);
        if (t == 0) {
            const int qi = r0 + m * 16 + g;
            if (qi < L) lse[qrows + qi] = (m_r[2 * m] + log2f(l_r[2 * m])) * LN2;
            if (qi + 8 < L) lse[qrows + qi + 8] = (m_r[2 * m + 1] + log2f(l_r[2 * m + 1])) * LN2;
        }
    }
}

// ----- backward -----
// P = exp(scale S - lse), dP = dO V^T, dS = P * (dP - rowdot(dO, O)); dQ = scale dS K, dK = scale dS^T Q,
// dV = P^T dO.

// dQ for one 64-query block of one head, walking the key blocks up to the diagonal.
template <int D>
__device__ __forceinline__ void backward_dq(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const bf16* __restrict__ d_o,
                                            const float* __restrict__ lse, const float* __restrict__ dot,
                                            bf16* __restrict__ dqkv, const float* __restrict__ cos,
                                            const float* __restrict__ sin, int per_token,
                                            const int4* __restrict__ table, int T, int H, int Hkv, float scale) {
    constexpr int TILE = Dims<D>::TILE, LD = Dims<D>::LD, KD = Dims<D>::KD, ND = Dims<D>::ND;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* dOs = Qs + TILE;
    bf16* Ks = dOs + TILE;     // two buffers
    bf16* Vs = Ks + 2 * TILE;  // two buffers
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const auto [e, h, kvh, L, q0, qrows, kvrows] = query_block(table, blockIdx.y, T, H, Hkv);
    const bf16* kp = k + kvrows * D;
    const bf16* vp = v + kvrows * D;
    const float sl2 = scale * LOG2E;
    const int qi0 = q0 + warp * 16 + g;
    // Each lane's two rows: lse (log2 units) and the row dot.
    float lse2[2], dd[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = qi0 + 8 * r;
        lse2[r] = qi < L ? lse[qrows + qi] * LOG2E : 0.f;
        dd[r] = qi < L ? dot[qrows + qi] : 0.f;
    }

    load_tile<D>(Qs, q + qrows * D, q0, L);
    load_tile<D>(dOs, d_o + tokens_at(e, T, H * D, h, D), q0, L, H * D);
    load_tile<D>(Ks, kp, 0, L);
    load_tile<D>(Vs, vp, 0, L);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    const bf16* dOw = dOs + warp * 16 * LD;
    uint32_t qf[KD][4];
    load_a_rows<D>(qf, Qs + warp * 16 * LD);

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    for (int kb = 0; kb <= e.blk; ++kb) {
        const bf16* Kb = Ks + (kb & 1) * TILE;
        const bf16* Vb = Vs + (kb & 1) * TILE;
        next_key_block<D>(Ks, Vs, kp, vp, kb, e.blk, L);

        float s[8][4];
        regs_times_tile_t<D>(s, qf, Kb);
        float dp[8][4];
        rows_times_tile_t<D>(dp, dOw, Vb);
        // dS = P (dP - D), P recomputed (0 where masked).
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int key = kb * BLOCK + j * 8 + 2 * t + (c & 1);
                const int qi = qi0 + (c >> 1) * 8;
                const float p = (key > qi || key >= L || qi >= L) ? 0.f : exp2f(s[j][c] * sl2 - lse2[c >> 1]);
                s[j][c] = p * (dp[j][c] - dd[c >> 1]);
            }
        // dQ += dS K (scaled once at the end).
        probs_times_tile<D>(acc, s, Kb);
        __syncthreads();
    }
    store_rows<D>(acc, scale, Qs + warp * 16 * LD, dqkv + tokens_at(e, T, (H + 2 * Hkv) * D, h, D), q0 + warp * 16, L,
                  (H + 2 * Hkv) * D, unrope_at(cos, sin, per_token, e, T));
}

// dK, dV for one 64-key block of one kv head, walking the query blocks at or after it of every query head
// that reads this kv head (GQA sums their contributions here, in a fixed order). Each warp owns 16 keys and
// computes the transposed products (S^T = K Q^T, dP^T = V dO^T), so P^T and dS^T are A operands in registers.
template <int D>
__device__ __forceinline__ void backward_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                              const bf16* __restrict__ v, const bf16* __restrict__ d_o,
                                              const float* __restrict__ lse, const float* __restrict__ dot,
                                              bf16* __restrict__ dqkv, const float* __restrict__ cos,
                                              const float* __restrict__ sin, int per_token, bf16* __restrict__ ds,
                                              const int* __restrict__ tiles, int n_tiles,
                                              const int4* __restrict__ table, int kvh0, int T, int H, int Hkv, float scale) {
    constexpr int TILE = Dims<D>::TILE, LD = Dims<D>::LD, ND = Dims<D>::ND;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + TILE;
    bf16* Qs = Vs + TILE;       // two buffers
    bf16* dOs = Qs + 2 * TILE;  // two buffers
    float* lse_s = reinterpret_cast<float*>(dOs + 2 * TILE);  // two buffers of 64
    float* dot_s = lse_s + 2 * BLOCK;                         // two buffers of 64
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // The table lists the most forward work first; a key block's work is the most at the start of its
    // sequence, so this kernel walks the table from the end.
    const int entry = gridDim.x - 1 - blockIdx.x;
    const Block e = block_at(table, entry);
    const int kvh = kvh0 + blockIdx.y, groups = H / Hkv;
    const int L = e.len, k0 = e.blk * BLOCK;
    const size_t kvrows = rows_at(e, Hkv, kvh, T);
    const float sl2 = scale * LOG2E;
    const int n_qb = (L + BLOCK - 1) / BLOCK - e.blk;  // query blocks per head
    const int n_iter = groups * n_qb;
    const int key0 = k0 + warp * 16 + g;  // this lane's keys: key0 and key0 + 8

    // Iteration i: query head kvh * groups + i / n_qb, query block e.blk + i % n_qb.
    auto load_iter = [&](int i, int buf) {
        const size_t qrows = rows_at(e, H, kvh * groups + i / n_qb, T);
        const int q0 = (e.blk + i % n_qb) * BLOCK;
        load_tile<D>(Qs + buf * TILE, q + qrows * D, q0, L);
        load_tile<D>(dOs + buf * TILE, d_o + tokens_at(e, T, H * D, kvh * groups + i / n_qb, D), q0, L, H * D);
        load_row_values(lse_s + buf * BLOCK, lse + qrows, q0, L);
        load_row_values(dot_s + buf * BLOCK, dot + qrows, q0, L);
    };
    load_tile<D>(Ks, k + kvrows * D, k0, L);
    load_tile<D>(Vs, v + kvrows * D, k0, L);
    load_iter(0, 0);
    cp_commit();
    const bf16* Kw = Ks + warp * 16 * LD;
    const bf16* Vw = Vs + warp * 16 * LD;

    float dk_acc[ND][4], dv_acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) dk_acc[n][c] = dv_acc[n][c] = 0.f;

    for (int i = 0; i < n_iter; ++i) {
        const int buf = i & 1;
        if (i + 1 < n_iter) load_iter(i + 1, buf ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        const bf16* Qb = Qs + buf * TILE;
        const bf16* dOb = dOs + buf * TILE;
        const float* lse_b = lse_s + buf * BLOCK;
        const float* dot_b = dot_s + buf * BLOCK;
        const int q0 = (e.blk + i % n_qb) * BLOCK;

        // S^T = K Q^T and dP^T = V dO^T (16 keys x 64 queries per warp).
        float st[8][4], dpt[8][4];
        rows_times_tile_t<D>(st, Kw, Qb);
        rows_times_tile_t<D>(dpt, Vw, dOb);
        // P^T (0 where masked) and dS^T = P^T (dP^T - D[query]). Only the diagonal block and a sequence's last
        // (partial) query block hold masked pairs: the others skip the tests.
        const bool edge = q0 == k0 || q0 + BLOCK > L;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int col = j * 8 + 2 * t + (c & 1);
                const int qi = q0 + col;
                const int key = key0 + (c >> 1) * 8;
                const bool masked = edge && (qi < key || qi >= L || key >= L);
                const float p = masked ? 0.f : exp2f(st[j][c] * sl2 - lse_b[col] * LOG2E);
                st[j][c] = p;
                dpt[j][c] = p * (dpt[j][c] - dot_b[col]);
            }
        if (ds) {  // dS^T of (query block, this key block), as the bf16 the dK product below consumes
            const int qb = e.blk + i % n_qb;
            bf16* tile = ds + ((size_t)(blockIdx.y * groups + i / n_qb) * n_tiles + tiles[entry] + qb * (qb + 1) / 2 + e.blk) * (BLOCK * BLOCK);
            // In fragment order (see ds_unit), so each store instruction of the warp fills one 128-byte line.
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                *reinterpret_cast<uint32_t*>(tile + ((warp * 2 * 8 + j) * 8 + g) * 8 + 2 * t) = pack(dpt[j][0], dpt[j][1]);
                *reinterpret_cast<uint32_t*>(tile + (((warp * 2 + 1) * 8 + j) * 8 + g) * 8 + 2 * t) = pack(dpt[j][2], dpt[j][3]);
            }
        }
        // dV += P^T dO, dK += dS^T Q.
        probs_times_tile<D>(dv_acc, st, dOb);
        probs_times_tile<D>(dk_acc, dpt, Qb);
        __syncthreads();
    }
    cp_wait<0>();
    // Stage through the first query buffer (free now; Ks and Vs too, but each warp reads only its own rows).
    const int W = (H + 2 * Hkv) * D;
    store_rows<D>(dk_acc, scale, Qs + warp * 16 * LD, dqkv + tokens_at(e, T, W, H + kvh, D), k0 + warp * 16, L, W,
                  unrope_at(cos, sin, per_token, e, T));
    __syncwarp();
    store_rows<D>(dv_acc, 1.f, Qs + warp * 16 * LD, dqkv + tokens_at(e, T, W, H + Hkv + kvh, D), k0 + warp * 16, L, W);
}

// A stored dS^T tile (64 keys x 64 queries) is 512 units of 8 consecutive queries of one key, in the order the
// dK/dV kernel's warps hold them: unit u = ((warp * 2 + half) * 8 + j) * 8 + g is key 16 warp + 8 half + g,
// queries 8 j .. 8 j + 7. Returns (key, first query) of unit u.
__device__ __forceinline__ int2 ds_unit(int u) { return make_int2((u >> 7) * 16 + ((u >> 6) & 1) * 8 + (u & 7), ((u >> 3) & 7) * 8); }


// dQ from the dS tiles the dK/dV kernel stored: dQ = scale sum_kb dS K, for one 128-query block (64-query blocks
// 2 blk and 2 blk + 1 of the tiles; the table of 128-token blocks) of one head, each warp's 32 rows as two m
// tiles (as forward128), so each K tile feeds 128 queries. A tile lands key-major in shared memory (dS^T,
// [64 keys][64 queries], the block's two side by side), so its A operand comes through ldmatrix.trans.
template <int D>
__device__ __forceinline__ void backward_dq_tiles(const bf16* __restrict__ k, const bf16* __restrict__ ds,
                                                  bf16* __restrict__ dqkv, const float* __restrict__ cos,
                                                  const float* __restrict__ sin, int per_token,
                                                  const int* __restrict__ tiles, int n_tiles,
                                                  const int4* __restrict__ table, int h0, int T, int H, int Hkv,
                                                  float scale) {
    constexpr int TILE = Dims<D>::TILE, LD = Dims<D>::LD, ND = Dims<D>::ND;
    constexpr int SLD = BLOCK_LONG + 8, STILE = BLOCK * SLD;  // [64 keys][128 queries], rows padded
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);  // two buffers
    bf16* Ss = Ks + 2 * TILE;                  // two buffers
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const QueryBlock qb = query_block<BLOCK_LONG>(table, h0 + blockIdx.y, T, H, Hkv);
    const Block e = qb.e;
    const int h = qb.h, L = qb.L;  // named, not bound: the loader below captures L (C++17)
    const int qb0 = 2 * e.blk, halves = qb0 * BLOCK + BLOCK < L ? 2 : 1;  // 64-query blocks present
    const int last = qb0 + halves - 1;                                  // the last key block
    const bf16* kp = k + qb.kvrows * D;
    // This head's dS tiles of the sequence; query block qb's row of the triangle starts at qb (qb + 1) / 2.
    const bf16* sp = ds + ((size_t)blockIdx.y * n_tiles + tiles[blockIdx.x]) * (BLOCK * BLOCK);
    auto load = [&](int kb) {
        load_tile<D>(Ks + (kb & 1) * TILE, kp, kb * BLOCK, L);
        bf16* dst = Ss + (kb & 1) * STILE;
        for (int half = 0; half < halves; ++half) {
            const int qb = qb0 + half;
            if (kb > qb) continue;  // query block qb0 sees no key of key block qb0 + 1
            const bf16* src = sp + ((size_t)qb * (qb + 1) / 2 + kb) * (BLOCK * BLOCK);
            for (int u = threadIdx.x; u < BLOCK * BLOCK / 8; u += THREADS) {
                const int2 kq = ds_unit(u);
                cp_async16(dst + kq.x * SLD + half * BLOCK + kq.y, src + u * 8);
            }
        }
    };
    load(0);
    cp_commit();

    const int r0 = qb0 * BLOCK + warp * 32, half = warp >> 1;  // this warp's first query and its 64-block
    float acc[2][ND][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < ND; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
    for (int kb = 0; kb <= last; ++kb) {
        if (kb < last) load(kb + 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        if (kb <= qb0 + half && r0 < L) {
            const bf16* Kb = Ks + (kb & 1) * TILE;
            const bf16* Sb = Ss + (kb & 1) * STILE + warp * 32;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                uint32_t a0[4], a1[4];  // dS rows = the warp's queries (two m tiles), columns = keys 16 kk ..
                const bf16* row = Sb + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * SLD + ((lane >> 3) & 1) * 8;
                ldsm_t(a0, row);
                ldsm_t(a1, row + 16);
                pair_times_tile_rows<D>(acc, a0, a1, Kb, kk);
            }
        }
        __syncthreads();
    }
    cp_wait<0>();
    const Unrope u = unrope_at(cos, sin, per_token, e, T);
    const int W = (H + 2 * Hkv) * D;
#pragma unroll
    for (int m = 0; m < 2; ++m) store_rows<D>(acc[m], scale, Ks + (warp * 32 + m * 16) * LD, dqkv + tokens_at(e, T, W, h, D), r0 + m * 16, L, W, u);
}
}  // namespace fa

// Dynamic shared memory ([64, D + 8] bf16 tiles): forward64 2 K + 2 V tiles (Q passes through the second V);
// forward128 2 Q + 2 K + 2 V; dQ: Q + dO + 2 K + 2 V; dK/dV: K + V + 2 Q + 2 dO tiles + 4 x 64 f32; dQ from
// tiles: 2 K tiles + 2 [64, 136] dS tiles (model/cuda/attention.rs sizes the launches to match).

// The kernels, one per head dim (the Rust side picks by name: flash_fwd128_128, ...).
#define FLASH_KERNELS(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(fa::THREADS, 3)                                                   \
        flash_fwd64_##D(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,        \
                        bf16* __restrict__ o, float* __restrict__ lse, const int4* __restrict__ table, int T,      \
                        int H, int Hkv, float scale) {                                                             \
        fa::forward64<D>(q, k, v, o, lse, table, T, H, Hkv, scale);                                                \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(fa::THREADS, 2)                                                   \
        flash_fwd128_##D(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,       \
                         bf16* __restrict__ o, float* __restrict__ lse, const int4* __restrict__ table, int T,     \
                         int H, int Hkv, float scale) {                                                            \
        fa::forward128<D>(q, k, v, o, lse, table, T, H, Hkv, scale);                                               \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(fa::THREADS)                                                      \
        flash_bwd_dkdv_##D(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,     \
                           const bf16* __restrict__ d_o, const float* __restrict__ lse,                           \
                           const float* __restrict__ dot, bf16* __restrict__ dqkv, const float* __restrict__ cos,  \
                           const float* __restrict__ sin, int per_token, bf16* __restrict__ ds,                   \
                           const int* __restrict__ tiles, int n_tiles, const int4* __restrict__ table, int kvh0,   \
                           int T, int H, int Hkv, float scale) {                                                   \
        fa::backward_dkdv<D>(q, k, v, d_o, lse, dot, dqkv, cos, sin, per_token, ds, tiles, n_tiles, table, kvh0, T, \
                             H, Hkv, scale);                                                                       \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(fa::THREADS, 2)                                                   \
        flash_bwd_dq_tiles_##D(const bf16* __restrict__ k, const bf16* __restrict__ ds, bf16* __restrict__ dqkv,   \
                               const float* __restrict__ cos, const float* __restrict__ sin, int per_token,        \
                               const int* __restrict__ tiles, int n_tiles, const int4* __restrict__ table, int h0, \
                               int T, int H, int Hkv, float scale) {                                               \
        fa::backward_dq_tiles<D>(k, ds, dqkv, cos, sin, per_token, tiles, n_tiles, table, h0, T, H, Hkv, scale);  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(fa::THREADS)                                                      \
        flash_bwd_dq_##D(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,       \
                         const bf16* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ dot, \
                         bf16* __restrict__ dqkv, const float* __restrict__ cos, const float* __restrict__ sin,    \
                         int per_token, const int4* __restrict__ table, int T, int H, int Hkv, float scale) {      \
        fa::backward_dq<D>(q, k, v, d_o, lse, dot, dqkv, cos, sin, per_token, table, T, H, Hkv, scale);            \
    }
FLASH_KERNELS(64)
FLASH_KERNELS(128)

// dot[b, h, t] = sum_d dO[b T + t, h D + d] * O[b T + t, h D + d] (the softmax backward's row term; O and dO
// token-major [B T, H D], dot [B, H, T] as lse). A block of 256 threads takes 8 tokens: 8 elements a thread
// (16-byte loads, a warp reading 512 contiguous bytes), each head row summed over its D / 8 lanes, and each
// head's 8 values written side by side through shared memory (a warp a row, one value at a time, scattered
// the writes across [B, H, T]; a warp a token walking its heads in turn was latency-bound: both slower than the
// head-major kernel this replaced). D % 8 == 0, D <= 256.
#define DOT_TOKENS 8
#define DOT_HEADS 64  // heads a pass through shared memory
extern "C" __global__ void flash_bwd_dot(const bf16* __restrict__ o, const bf16* __restrict__ d_o,
                                         float* __restrict__ dot, int T, int H, int D, unsigned long long tokens) {
    __shared__ float part[DOT_HEADS][DOT_TOKENS + 1];
    const int ch = D / 8;  // lanes a head row
    const size_t n0 = (size_t)blockIdx.x * DOT_TOKENS;
    for (int h0 = 0; h0 < H; h0 += DOT_HEADS) {
        const int heads = min(DOT_HEADS, H - h0);
        const int items = DOT_TOKENS * heads * ch;  // (token, head, chunk), chunk fastest
        for (int base = 0; base < items; base += blockDim.x) {  // every lane of a warp takes part in the shuffles
            const int i = base + threadIdx.x;
            const int c = i % ch, hh = (i / ch) % heads, k = i / (ch * heads);
            const size_t n = n0 + k;
            float acc = 0.f;
            if (i < items && n < tokens) {
                float a[8], b[8];
                const size_t at = (n * H + h0 + hh) * D + c * 8;
                load8(o, at, at + 8, true, a);
                load8(d_o, at, at + 8, true, b);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc += a[e] * b[e];
            }
            for (int off = ch / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
            if (i < items && c == 0) part[hh][k] = acc;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < heads * DOT_TOKENS; i += blockDim.x) {
            const int hh = i / DOT_TOKENS, k = i % DOT_TOKENS;
            const size_t m = n0 + k;
            if (m < tokens) dot[((m / T) * H + h0 + hh) * T + m % T] = part[hh][k];
        }
        __syncthreads();
    }
}
