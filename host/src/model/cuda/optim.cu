// The optimizer and the gradient norm over all adapter tensors (see optim.rs).
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// The optimizer over every adapter tensor in one launch. `table` holds, per tensor (blockIdx.y), eight
// 64-bit words: p, g, m, v (inputs), p', m', v' (outputs) as device pointers, and n. f32 throughout. The
// moments are updated in place (m' = m, v' = v): each element is read, then written, by one thread.

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
// Casts of many small tensors in one launch (the adapter's parameters to bf16 for a step, its gradients back to
// f32). `table` holds (in, out, n) per tensor (blockIdx.y); `to_bf16`: f32 -> bf16, else bf16 -> f32.
extern "C" __global__ void cast_multi(const unsigned long long* __restrict__ table, int to_bf16) {
    const unsigned long long* t = table + 3 * (size_t)blockIdx.y;
    const size_t n = (size_t)t[2];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        if (to_bf16)
            ((bf16*)t[1])[i] = st(((const float*)t[0])[i]);
        else
            ((float*)t[1])[i] = ld(((const bf16*)t[0])[i]);
    }
}
