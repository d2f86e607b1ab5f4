// Pointwise kernels: activations (GELU, SwiGLU) and their backward, precision casts, scaling, the
// squared norm of a gradient chunk, and the overflow check of fp16 loss scaling.

// GELU, tanh approximation (GPT-2's `gelu_new`).
__device__ __forceinline__ float gelu(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float k = 0.7978845608028654f;
    float u = k * (x + 0.044715f * x * x * x);
    float t = tanhf(u);
    float du = k * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// out = gelu(x)
#define GELU_FWD(T, S) \
    extern "C" __global__ void gelu_fwd_##S(T* out, const T* x, u64 n) { \
        FOR_EACH(i, n) out[i] = store<T>(gelu(load(x[i]))); \
    }
FOR_TYPES(GELU_FWD)

// d = d * gelu'(x), in place
#define GELU_BWD(T, S) \
    extern "C" __global__ void gelu_bwd_##S(T* d, const T* x, u64 n) { \
        FOR_EACH(i, n) d[i] = store<T>(load(d[i]) * gelu_grad(load(x[i]))); \
    }
FOR_TYPES(GELU_BWD)

// out = silu(gate) * up
#define SWIGLU_FWD(T, S) \
    extern "C" __global__ void swiglu_fwd_##S(T* out, const T* gate, const T* up, u64 n) { \
        FOR_EACH(i, n) { \
            float g = load(gate[i]); \
            out[i] = store<T>(g * sigmoid(g) * load(up[i])); \
        } \
    }
FOR_TYPES(SWIGLU_FWD)

// Given d_out in d_gate, writes the gate gradient there and the up gradient into d_up.
#define SWIGLU_BWD(T, S) \
    extern "C" __global__ void swiglu_bwd_##S(T* d_gate, T* d_up, const T* gate, const T* up, u64 n) { \
        FOR_EACH(i, n) { \
            float d = load(d_gate[i]), g = load(gate[i]), u = load(up[i]); \
            float s = sigmoid(g); \
            d_up[i] = store<T>(d * g * s); \
            d_gate[i] = store<T>(d * u * s * (1.0f + g * (1.0f - s))); \
        } \
    }
FOR_TYPES(SWIGLU_BWD)

// Precision casts between f32 masters and 16-bit working copies.
#define CAST(T, S) \
    extern "C" __global__ void cast_f32_to_##S(T* out, const float* x, u64 n) { FOR_EACH(i, n) out[i] = store<T>(x[i]); } \
    extern "C" __global__ void cast_##S##_to_f32(float* out, const T* x, u64 n) { FOR_EACH(i, n) out[i] = load(x[i]); }
CAST(bf16, bf16)
CAST(f16, f16)

// x *= s
extern "C" __global__ void scale_f32(float* x, float s, u64 n) {
    FOR_EACH(i, n) x[i] *= s;
}

// y += x
extern "C" __global__ void add_f32(float* y, const float* x, u64 n) {
    FOR_EACH(i, n) y[i] += x[i];
}

// partial[blockIdx.x] = sum of x[i]^2 over this block's grid-stride share. The host (or
// `sum_f32`) adds the partials in a fixed order, so the norm has the same bits every run.
extern "C" __global__ void sum_squares_partial_f32(float* partial, const float* x, u64 n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    FOR_EACH(i, n) acc += x[i] * x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Loss scaling: g *= inv_scale, and *found_inf = 1 when any element is not finite (the step is
// then skipped and the scale backed off).
extern "C" __global__ void unscale_check_f32(float* g, float inv_scale, int* found_inf, u64 n) {
    FOR_EACH(i, n) {
        float v = g[i] * inv_scale;
        if (!isfinite(v)) *found_inf = 1;
        g[i] = v;
    }
}

// y[r, j] = bias[j] (overwrite) or y[r, j] + bias[j], over `rows` rows of `cols` columns with row
// stride `stride` (a column block of a wider buffer). Bias is an f32 master parameter.
#define ADD_BIAS(T, S) \
    extern "C" __global__ void add_bias_##S(T* y, const float* bias, u32 rows, u32 cols, u32 stride, int overwrite) { \
        FOR_EACH(i, (u64)rows * cols) { \
            u64 r = i / cols; \
            u32 j = (u32)(i % cols); \
            T* p = y + r * stride + j; \
            *p = store<T>((overwrite ? 0.0f : load(*p)) + bias[j]); \
        } \
    }
FOR_TYPES(ADD_BIAS)

// y += f32(x): folds a 16-bit weight gradient into the f32 gradient buffer (PyTorch's autocast
// does the same: the matmul's output is 16-bit, the accumulation f32).
#define ACCUMULATE(T, S) \
    extern "C" __global__ void accumulate_##S(float* y, const T* x, u64 n) { FOR_EACH(i, n) y[i] += load(x[i]); }
FOR_TYPES(ACCUMULATE)
