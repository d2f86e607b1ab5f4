// Fused AdamW over a whole chunk of the flat parameter buffer, in PyTorch's formulation (decoupled
// decay first, then the bias-corrected step): parameter, gradient and both moments are read once
// and written once. The host computes the step's scalars in f64 exactly as the CPU kernel does:
// shrink = 1 - lr*wd, step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
//
// The `_copy_*` variants also write the updated parameter into a 16-bit working copy, which the
// next forward pass reads (mixed precision keeps f32 masters and optimizer state).

__device__ __forceinline__ float adamw_one(float* p, float g, float* m, float* v, float beta1, float beta2, float eps, float shrink, float step_size, float bc2_sqrt) {
    float mi = *m + (1.0f - beta1) * (g - *m);
    float vi = *v * beta2 + (1.0f - beta2) * g * g;
    *m = mi;
    *v = vi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    float pi = *p * shrink - step_size * mi / denom;
    *p = pi;
    return pi;
}

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, u64 n, float beta1, float beta2, float eps, float shrink, float step_size, float bc2_sqrt) {
    FOR_EACH(i, n) adamw_one(p + i, g[i], m + i, v + i, beta1, beta2, eps, shrink, step_size, bc2_sqrt);
}

#define ADAMW_COPY(T, S) \
    extern "C" __global__ void adamw_copy_##S(float* p, T* p_copy, const float* g, float* m, float* v, u64 n, float beta1, float beta2, float eps, float shrink, float step_size, float bc2_sqrt) { \
        FOR_EACH(i, n) p_copy[i] = store<T>(adamw_one(p + i, g[i], m + i, v + i, beta1, beta2, eps, shrink, step_size, bc2_sqrt)); \
    }
ADAMW_COPY(bf16, bf16)
ADAMW_COPY(f16, f16)
