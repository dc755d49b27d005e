// Standalone check of host/src/model/cuda/flash.cu against a naive f32 reference, and its speed (the
// "standalone" flash numbers of BENCHMARKS.md): each case's relative errors, then forward / backward times and
// TFLOP/s, dQ from the stored dS tiles and recomputed. Build with nvcc for sm_90 (on a machine without a GPU:
// `source ../shared/tools/cuda-env.sh`), run on the GPU machine:
//   nvcc -O3 -arch=sm_90 -o flash-bench scripts/flash-bench.cu && ./flash-bench [case name part]
#include "../host/src/model/cuda/flash.cu"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <cmath>
#include <array>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

// start[n]: first token (within its row) of token n's sequence; end[n]: one past its last.
__global__ void ref_fwd(const bf16* q, const bf16* k, const bf16* v, float* o, float* lse, const int* start, const int* end,
                        int B, int T, int H, int Hkv, int D, float scale) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * H * T) return;
    int i = idx % T, h = (idx / T) % H, b = idx / (T * H), kvh = h / (H / Hkv);
    const bf16* qi = q + ((size_t)(b * H + h) * T + i) * D;
    int s0 = start[b * T + i];
    float m = -1e30f;
    for (int j = s0; j <= i; ++j) {
        const bf16* kj = k + ((size_t)(b * Hkv + kvh) * T + j) * D;
        float acc = 0; for (int d = 0; d < D; ++d) acc += ld(qi[d]) * ld(kj[d]);
        m = fmaxf(m, acc * scale);
    }
    float l = 0; float* oi = o + ((size_t)(b * H + h) * T + i) * D;
    for (int d = 0; d < D; ++d) oi[d] = 0;
    for (int j = s0; j <= i; ++j) {
        const bf16* kj = k + ((size_t)(b * Hkv + kvh) * T + j) * D;
        const bf16* vj = v + ((size_t)(b * Hkv + kvh) * T + j) * D;
        float acc = 0; for (int d = 0; d < D; ++d) acc += ld(qi[d]) * ld(kj[d]);
        float p = expf(acc * scale - m); l += p;
        for (int d = 0; d < D; ++d) oi[d] += p * ld(vj[d]);
    }
    for (int d = 0; d < D; ++d) oi[d] /= l;
    lse[(size_t)(b * H + h) * T + i] = m + logf(l);
}
// Row term with the reference O: Dr[row] = dO . O.
__global__ void ref_dot(const bf16* d_o, const float* o, float* dr, int rows, int D) {
    int r = blockIdx.x * blockDim.x + threadIdx.x; if (r >= rows) return;
    float a = 0; for (int d = 0; d < D; ++d) a += ld(d_o[(size_t)r * D + d]) * o[(size_t)r * D + d]; dr[r] = a;
}
__device__ float ref_p(const bf16* q, const bf16* k, const float* lse, int b, int h, int kvh, int i, int j, int T, int H, int Hkv, int D, float scale) {
    const bf16* qi = q + ((size_t)(b * H + h) * T + i) * D; const bf16* kj = k + ((size_t)(b * Hkv + kvh) * T + j) * D;
    float acc = 0; for (int d = 0; d < D; ++d) acc += ld(qi[d]) * ld(kj[d]);
    return expf(acc * scale - lse[(size_t)(b * H + h) * T + i]);
}
__device__ float ref_dp(const bf16* d_o, const bf16* v, int b, int h, int kvh, int i, int j, int T, int H, int Hkv, int D) {
    const bf16* g = d_o + ((size_t)(b * H + h) * T + i) * D; const bf16* vj = v + ((size_t)(b * Hkv + kvh) * T + j) * D;
    float acc = 0; for (int d = 0; d < D; ++d) acc += ld(g[d]) * ld(vj[d]); return acc;
}
__global__ void ref_dq(const bf16* q, const bf16* k, const bf16* v, const bf16* d_o, const float* lse, const float* dr, float* dq,
                       const int* start, int B, int T, int H, int Hkv, int D, float scale) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x; if (idx >= B * H * T) return;
    int i = idx % T, h = (idx / T) % H, b = idx / (T * H), kvh = h / (H / Hkv);
    float* out = dq + ((size_t)(b * H + h) * T + i) * D; for (int d = 0; d < D; ++d) out[d] = 0;
    for (int j = start[b * T + i]; j <= i; ++j) {
        float p = ref_p(q, k, lse, b, h, kvh, i, j, T, H, Hkv, D, scale);
        float ds = p * (ref_dp(d_o, v, b, h, kvh, i, j, T, H, Hkv, D) - dr[(size_t)(b * H + h) * T + i]);
        const bf16* kj = k + ((size_t)(b * Hkv + kvh) * T + j) * D;
        for (int d = 0; d < D; ++d) out[d] += scale * ds * ld(kj[d]);
    }
}
__global__ void ref_dkdv(const bf16* q, const bf16* k, const bf16* v, const bf16* d_o, const float* lse, const float* dr, float* dk, float* dv,
                         const int* end, int B, int T, int H, int Hkv, int D, float scale) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x; if (idx >= B * Hkv * T) return;
    int j = idx % T, kvh = (idx / T) % Hkv, b = idx / (T * Hkv), G = H / Hkv;
    float* ok = dk + ((size_t)(b * Hkv + kvh) * T + j) * D; float* ov = dv + ((size_t)(b * Hkv + kvh) * T + j) * D;
    for (int d = 0; d < D; ++d) ok[d] = ov[d] = 0;
    for (int h = kvh * G; h < kvh * G + G; ++h)
        for (int i = j; i < end[b * T + j]; ++i) {
            float p = ref_p(q, k, lse, b, h, kvh, i, j, T, H, Hkv, D, scale);
            float ds = p * (ref_dp(d_o, v, b, h, kvh, i, j, T, H, Hkv, D) - dr[(size_t)(b * H + h) * T + i]);
            const bf16* qi = q + ((size_t)(b * H + h) * T + i) * D; const bf16* gi = d_o + ((size_t)(b * H + h) * T + i) * D;
            for (int d = 0; d < D; ++d) { ok[d] += scale * ds * ld(qi[d]); ov[d] += p * ld(gi[d]); }
        }
}

static unsigned long long rs = 88172645463325252ull;
static float urand() { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (float)((rs >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f; }
template <class T> T* dalloc(size_t n) { T* p; CK(cudaMalloc(&p, n * sizeof(T))); return p; }
static bf16* drand(size_t n, float amp) { std::vector<bf16> h(n); for (auto& x : h) x = __float2bfloat16(urand() * amp); bf16* d = dalloc<bf16>(n); CK(cudaMemcpy(d, h.data(), n * 2, cudaMemcpyHostToDevice)); return d; }
static std::vector<float> tof(const bf16* d, size_t n) { std::vector<bf16> h(n); CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost)); std::vector<float> f(n); for (size_t i = 0; i < n; ++i) f[i] = __bfloat162float(h[i]); return f; }
static std::vector<float> getf(const float* d, size_t n) { std::vector<float> h(n); CK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost)); return h; }
// A token-major [B T, W] matrix's columns col0 .. col0 + heads D as head-major [B, heads, T, D] (the kernels write
// O and d(qkv) token-major; the reference is head-major).
static std::vector<float> heads_of(const std::vector<float>& tm, int B, int T, int heads, int D, int W, int col0) {
    std::vector<float> out((size_t)B * heads * T * D);
    for (int b = 0; b < B; ++b) for (int h = 0; h < heads; ++h) for (int t = 0; t < T; ++t) for (int d = 0; d < D; ++d)
        out[(((size_t)b * heads + h) * T + t) * D + d] = tm[((size_t)b * T + t) * W + col0 + h * D + d];
    return out;
}
// The reverse, for dO: head-major [B, H, T, D] bf16 on the device -> a token-major copy.
static bf16* tokens_of(const bf16* hm, int B, int T, int H, int D) {
    size_t n = (size_t)B * H * T * D; std::vector<bf16> h(n), t(n); CK(cudaMemcpy(h.data(), hm, n * 2, cudaMemcpyDeviceToHost));
    for (int b = 0; b < B; ++b) for (int hh = 0; hh < H; ++hh) for (int tt = 0; tt < T; ++tt) for (int d = 0; d < D; ++d)
        t[((size_t)b * T + tt) * H * D + hh * D + d] = h[(((size_t)b * H + hh) * T + tt) * D + d];
    bf16* out; CK(cudaMalloc(&out, n * 2)); CK(cudaMemcpy(out, t.data(), n * 2, cudaMemcpyHostToDevice)); return out;
}
static double relerr(const std::vector<float>& a, const std::vector<float>& b) { double n = 0, e = 0; for (size_t i = 0; i < a.size(); ++i) { e += (a[i] - b[i]) * (double)(a[i] - b[i]); n += b[i] * (double)b[i]; } return std::sqrt(e / std::max(n, 1e-30)); }

template <int D> int smem_fwd() { return 4 * fa::Dims<D>::TILE * 2; }
template <int D> int smem_fwd2() { return 6 * fa::Dims<D>::TILE * 2; }
template <int D> int smem_dq() { return 6 * fa::Dims<D>::TILE * 2; }
template <int D> int smem_dkdv() { return 6 * fa::Dims<D>::TILE * 2 + 4 * 64 * 4; }
template <int D> int smem_dqt() { return 2 * fa::Dims<D>::TILE * 2 + 2 * 64 * 136 * 2; }

static const char* only = nullptr;  // argv[1]: run only the cases whose name contains it

template <int D>
void run(const char* name, int B, int T, int H, int Hkv, std::vector<std::vector<int>> seqlens, bool check, int reps, bool use_tiles) {
    if (only && !strstr(name, only)) return;
    void (*fwd)(const bf16*, const bf16*, const bf16*, bf16*, float*, const int4*, int, int, int, float) = D == 128 ? flash_fwd64_128 : flash_fwd64_64;
    auto dkdv = D == 128 ? flash_bwd_dkdv_128 : flash_bwd_dkdv_64;
    auto dqt = D == 128 ? flash_bwd_dq_tiles_128 : flash_bwd_dq_tiles_64;
    CK(cudaFuncSetAttribute(dqt, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dqt<D>()));
    auto dqk = D == 128 ? flash_bwd_dq_128 : flash_bwd_dq_64;
    CK(cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_fwd<D>()));
    void (*fwd2)(const bf16*, const bf16*, const bf16*, bf16*, float*, const int4*, int, int, int, float) = D == 128 ? flash_fwd128_128 : flash_fwd128_64;
    CK(cudaFuncSetAttribute(fwd2, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_fwd2<D>()));
    CK(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dkdv<D>()));
    CK(cudaFuncSetAttribute(dqk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dq<D>()));
    size_t nq = (size_t)B * H * T * D, nk = (size_t)B * Hkv * T * D;
    bf16 *q = drand(nq, 1.5f), *k = drand(nk, 1.5f), *v = drand(nk, 1.f), *g = drand(nq, 1.f);
    std::vector<int> start(B * T), end(B * T); std::vector<int> tab; double causal_pairs = 0;
    std::vector<std::array<int, 5>> entries; int n_tiles = 0;
    for (int b = 0; b < B; ++b) { int f = 0; for (int L : seqlens[b]) { for (int i = 0; i < L; ++i) { start[b * T + f + i] = f; end[b * T + f + i] = f + L; } int nb = (L + 63) / 64; for (int blk = 0; blk < nb; ++blk) entries.push_back({b, f, L, blk, n_tiles}); n_tiles += nb * (nb + 1) / 2; causal_pairs += L * (L + 1.0) / 2; f += L; } if (f != T) { printf("bad seqlens\n"); exit(1);} }
    std::stable_sort(entries.begin(), entries.end(), [](auto& a, auto& b) { return a[3] > b[3]; });
    std::vector<std::array<int, 5>> e2;  // the forward's 128-query blocks
    { int nt = 0; for (int b = 0; b < B; ++b) { int f = 0; for (int L : seqlens[b]) { for (int blk = 0; blk < (L + 127) / 128; ++blk) e2.push_back({b, f, L, blk, nt}); int nb = (L + 63) / 64; nt += nb * (nb + 1) / 2; f += L; } } }
    std::stable_sort(e2.begin(), e2.end(), [](auto& a, auto& b) { return a[3] > b[3]; });
    std::vector<int> tab2, tl2; for (auto& e : e2) { for (int x = 0; x < 4; ++x) tab2.push_back(e[x]); tl2.push_back(e[4]); }
    int* dtab2 = dalloc<int>(tab2.size()); CK(cudaMemcpy(dtab2, tab2.data(), tab2.size() * 4, cudaMemcpyHostToDevice));
    int* dtiles2 = dalloc<int>(tl2.size()); CK(cudaMemcpy(dtiles2, tl2.data(), tl2.size() * 4, cudaMemcpyHostToDevice));

    int n2 = e2.size();
    std::vector<int> tl;
    for (auto& e : entries) { for (int x = 0; x < 4; ++x) tab.push_back(e[x]); tl.push_back(e[4]); }
    int* dtiles = dalloc<int>(tl.size()); CK(cudaMemcpy(dtiles, tl.data(), tl.size() * 4, cudaMemcpyHostToDevice));
    bf16* ds = use_tiles ? dalloc<bf16>((size_t)H * n_tiles * 4096) : nullptr;
    int* dtab = dalloc<int>(tab.size()); CK(cudaMemcpy(dtab, tab.data(), tab.size() * 4, cudaMemcpyHostToDevice));
    int n = entries.size(); float scale = 1.f / sqrtf(D);
    // O and dO token-major [B T, H D]; dq, dk, dv side by side in d(qkv) [B T, (H + 2 Hkv) D], no RoPE here.
    const int W = (H + 2 * Hkv) * D;
    bf16 *o = dalloc<bf16>(nq), *dqkv = dalloc<bf16>((size_t)B * T * W), *gt = tokens_of(g, B, T, H, D);
    float *lse = dalloc<float>((size_t)B * H * T), *dot = dalloc<float>((size_t)B * H * T);
    auto forward = [&] { fwd<<<dim3(n, H), 128, smem_fwd<D>()>>>(q, k, v, o, lse, (const int4*)dtab, T, H, Hkv, scale); };
    bf16* o2 = dalloc<bf16>(nq); float* lse2 = dalloc<float>((size_t)B * H * T);
    auto forward2 = [&] { fwd2<<<dim3(n2, H), 128, smem_fwd2<D>()>>>(q, k, v, o2, lse2, (const int4*)dtab2, T, H, Hkv, scale); };
    auto backward = [&] {
        flash_bwd_dot<<<(B * T + 7) / 8, 256>>>(o, gt, dot, T, H, D, (size_t)B * T);
        dkdv<<<dim3(n, Hkv), 128, smem_dkdv<D>()>>>(q, k, v, gt, lse, dot, dqkv, nullptr, nullptr, 0, ds, dtiles, n_tiles, (const int4*)dtab, 0, T, H, Hkv, scale);
        if (use_tiles) dqt<<<dim3(n2, H), 128, smem_dqt<D>()>>>(k, ds, dqkv, nullptr, nullptr, 0, dtiles2, n_tiles, (const int4*)dtab2, 0, T, H, Hkv, scale);
        else dqk<<<dim3(n, H), 128, smem_dq<D>()>>>(q, k, v, gt, lse, dot, dqkv, nullptr, nullptr, 0, (const int4*)dtab, T, H, Hkv, scale);
    };
    forward(); backward(); forward2(); CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    printf("%s: D %d B %d T %d H %d Hkv %d, %d blocks, dq %s\n", name, D, B, T, H, Hkv, n, use_tiles ? "from dS tiles" : "recomputed");
    if (check) {
        int *ds, *de; ds = dalloc<int>(B * T); de = dalloc<int>(B * T);
        CK(cudaMemcpy(ds, start.data(), B * T * 4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(de, end.data(), B * T * 4, cudaMemcpyHostToDevice));
        float *ro = dalloc<float>(nq), *rl = dalloc<float>((size_t)B * H * T), *rd = dalloc<float>((size_t)B * H * T), *rq = dalloc<float>(nq), *rk = dalloc<float>(nk), *rv = dalloc<float>(nk);
        int rows = B * H * T;
        ref_fwd<<<(rows + 127) / 128, 128>>>(q, k, v, ro, rl, ds, de, B, T, H, Hkv, D, scale);
        ref_dot<<<(rows + 127) / 128, 128>>>(g, ro, rd, rows, D);
        ref_dq<<<(rows + 127) / 128, 128>>>(q, k, v, g, rl, rd, rq, ds, B, T, H, Hkv, D, scale);
        ref_dkdv<<<(B * Hkv * T + 127) / 128, 128>>>(q, k, v, g, rl, rd, rk, rv, de, B, T, H, Hkv, D, scale);
        CK(cudaDeviceSynchronize());
        const auto g_all = tof(dqkv, (size_t)B * T * W);
        printf("  rel err: o %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", relerr(heads_of(tof(o, nq), B, T, H, D, H * D, 0), getf(ro, nq)),
               relerr(getf(lse, rows), getf(rl, rows)), relerr(heads_of(g_all, B, T, H, D, W, 0), getf(rq, nq)),
               relerr(heads_of(g_all, B, T, Hkv, D, W, H * D), getf(rk, nk)), relerr(heads_of(g_all, B, T, Hkv, D, W, (H + Hkv) * D), getf(rv, nk)));
        printf("  forward of 128-query blocks, rel err: o %.2e lse %.2e\n", relerr(heads_of(tof(o2, nq), B, T, H, D, H * D, 0), getf(ro, nq)), relerr(getf(lse2, rows), getf(rl, rows)));
    }
    if (reps > 0) {
        cudaEvent_t a, b2, c; cudaEventCreate(&a); cudaEventCreate(&b2); cudaEventCreate(&c);
        cudaEventRecord(a); for (int r = 0; r < reps; ++r) forward(); cudaEventRecord(b2); for (int r = 0; r < reps; ++r) backward(); cudaEventRecord(c);
        CK(cudaEventSynchronize(c)); float tf, tb; cudaEventElapsedTime(&tf, a, b2); cudaEventElapsedTime(&tb, b2, c);
        double flop = 4.0 * causal_pairs * H * D;  // QK^T and PV over the causal pairs
        printf("  forward of 64-query blocks %.3f ms %.0f TFLOP/s, backward %.3f ms %.0f TFLOP/s (2.5x forward flops)\n", tf / reps, flop / (tf / reps * 1e-3) / 1e12, tb / reps, 2.5 * flop / (tb / reps * 1e-3) / 1e12);
        cudaEventRecord(a); for (int r = 0; r < reps; ++r) forward2(); cudaEventRecord(b2); CK(cudaEventSynchronize(b2)); cudaEventElapsedTime(&tf, a, b2);
        printf("  forward of 128-query blocks %.3f ms %.0f TFLOP/s\n", tf / reps, flop / (tf / reps * 1e-3) / 1e12);
        cudaEvent_t e0, e1, e2; cudaEventCreate(&e0); cudaEventCreate(&e1); cudaEventCreate(&e2);
        float t1 = 0, t2 = 0;
        for (int r = 0; r < reps; ++r) {
            flash_bwd_dot<<<(B * T + 7) / 8, 256>>>(o, gt, dot, T, H, D, (size_t)B * T);
            cudaEventRecord(e0);
            dkdv<<<dim3(n, Hkv), 128, smem_dkdv<D>()>>>(q, k, v, gt, lse, dot, dqkv, nullptr, nullptr, 0, ds, dtiles, n_tiles, (const int4*)dtab, 0, T, H, Hkv, scale);
            cudaEventRecord(e1);
            if (use_tiles) dqt<<<dim3(n2, H), 128, smem_dqt<D>()>>>(k, ds, dqkv, nullptr, nullptr, 0, dtiles2, n_tiles, (const int4*)dtab2, 0, T, H, Hkv, scale);
            else dqk<<<dim3(n, H), 128, smem_dq<D>()>>>(q, k, v, gt, lse, dot, dqkv, nullptr, nullptr, 0, (const int4*)dtab, T, H, Hkv, scale);
            cudaEventRecord(e2); CK(cudaEventSynchronize(e2));
            float x, y; cudaEventElapsedTime(&x, e0, e1); cudaEventElapsedTime(&y, e1, e2); t1 += x; t2 += y;
        }
        printf("  dkdv %.3f ms, dq %.3f ms\n", t1 / reps, t2 / reps);
    }
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(g); cudaFree(o); cudaFree(dqkv); cudaFree(gt); cudaFree(lse); cudaFree(dot); cudaFree(dtab); cudaFree(dtab2); cudaFree(dtiles2); cudaFree(o2); cudaFree(lse2); cudaFree(dtiles); if (ds) cudaFree(ds);
}

int main(int argc, char** argv) {
    if (argc > 1) only = argv[1];
    for (int tiles = 1; tiles >= 0; --tiles) {
        run<128>("rows, GQA", 2, 200, 4, 2, {{200}, {200}}, true, 0, tiles);
        run<128>("padding-free", 2, 200, 4, 2, {{70, 130}, {1, 64, 135}}, true, 0, tiles);
        run<64>("rows, GQA", 2, 200, 4, 2, {{200}, {200}}, true, 0, tiles);
        run<64>("padding-free", 2, 200, 4, 2, {{70, 130}, {1, 64, 135}}, true, 0, tiles);
        run<128>("long rows", 1, 700, 2, 1, {{700}}, true, 0, tiles);
    }
    for (int tiles = 1; tiles >= 0; --tiles) {
        run<128>("qwen-14b 1024", 2, 1024, 40, 40, {{1024}, {1024}}, false, 20, tiles);
        run<128>("qwen-14b 2048", 2, 2048, 40, 40, {{2048}, {2048}}, false, 10, tiles);
        run<128>("qwen2.5-14b 2048 (GQA 40/8)", 2, 2048, 40, 8, {{2048}, {2048}}, false, 10, tiles);
        run<128>("recipe-like packed row", 1, 1336, 40, 40, {{167, 150, 200, 120, 180, 160, 190, 169}}, false, 20, tiles);
        run<64>("d64 2048", 2, 2048, 14, 2, {{2048}, {2048}}, false, 10, tiles);
    }
    return 0;
}
