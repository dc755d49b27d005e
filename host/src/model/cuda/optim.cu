// The optimizer and the gradient norm over all adapter tensors (see optim.rs).
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// The optimizer over every adapter tensor in one launch. `table` holds, per tensor (blockIdx.y), eight
// 64-bit words: p, g, m, v (inputs), p', m', v' (outputs) as device pointers, and n. f32 throughout. The
// moments are updated in place (m' = m, v' = v): each element is read, then written, by one thread.

// Every gradient is multiplied by scale[1] (grad_scale below); when that is not finite (the step's norm or loss
// was not), the parameters are copied as they are and the moments left alone: the step is skipped.
extern "C" __global__ void adamw_multi(const unsigned long long* __restrict__ table, float lr, float beta1,
                                       float beta2, float eps, float weight_decay, float step_size,
                                       float bc2_sqrt, const float* __restrict__ scale) {
    const unsigned long long* t = table + 8 * (size_t)blockIdx.y;
    const float* p = (const float*)t[0];
    const float* g = (const float*)t[1];
    const float* m = (const float*)t[2];
    const float* v = (const float*)t[3];
    float* p_out = (float*)t[4];
    float* m_out = (float*)t[5];
    float* v_out = (float*)t[6];
    const size_t n = (size_t)t[7];
    const float grad_scale = scale[1];
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if (!isfinite(grad_scale)) {
        for (size_t i = first; i < n; i += stride) p_out[i] = p[i];
        return;
    }
    for (size_t i = first; i < n; i += stride) {
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


// The factor the update multiplies every gradient by, worked out on the device so that the host does not wait
// for the norm between the backward and the update. From the n partial sums of sum_squares_multi: out[0] = the
// global norm times per_token (the loss normalisation), out[1] = per_token times PyTorch's clip coefficient
// (max_norm / (norm + 1e-6) when below 1; max_norm <= 0: no clipping), or NaN when the norm or the loss sum
// (f64, may be null) is not finite. One block; the partials are summed in a fixed order (deterministic).
extern "C" __global__ void grad_scale(const float* __restrict__ partials, int n, const double* __restrict__ loss_sum,
                                      double per_token, double max_norm, float* __restrict__ out) {
    float acc = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
    acc = block_reduce(acc, false);
    if (threadIdx.x == 0) {
        const double norm = sqrt((double)acc) * per_token;
        const double coef = max_norm > 0.0 ? max_norm / (norm + 1e-6) : 1.0;
        const bool finite = isfinite(norm) && (loss_sum == nullptr || isfinite(*loss_sum));
        out[0] = (float)norm;
        out[1] = finite ? (float)(per_token * (coef < 1.0 ? coef : 1.0)) : __int_as_float(0x7fc00000);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Casts of many small tensors in one launch (the adapter's parameters to bf16 for a step, its gradients back to
// f32), each multiplied by its own factor on the way (the LoRA scale folded into A: Model::loss_and_grads).
// `table` holds (in, out, n, factor as f32 bits) per tensor (blockIdx.y); `to_bf16`: f32 -> bf16, else back.
extern "C" __global__ void cast_multi(const unsigned long long* __restrict__ table, int to_bf16) {
    const unsigned long long* t = table + 4 * (size_t)blockIdx.y;
    const size_t n = (size_t)t[2];
    const float f = __uint_as_float((unsigned)t[3]);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        if (to_bf16)
            ((bf16*)t[1])[i] = st(((const float*)t[0])[i] * f);
        else
            ((float*)t[1])[i] = ld(((const bf16*)t[0])[i]) * f;
    }
}
