// Fused softmax cross-entropy over rows of logits, in place: with `write_grad`, the row becomes
// `grad_scale * (softmax - onehot(target))`, so the vocabulary-wide buffer is written once and never
// copied. `losses[r]` receives the row's loss in nats; the host adds them in order. One block per
// row; the row (up to a few hundred KiB) is read three times and stays in L2 between passes.

template <typename T>
__device__ void softmax_xent_impl(T* logits, float* losses, const u32* targets, u32 vocab, float grad_scale, int write_grad) {
    __shared__ float scratch[32];
    T* row = logits + (u64)blockIdx.x * vocab;
    u32 t = targets[blockIdx.x];
    float m = NEG_INF;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, load(row[i]));
    m = block_max(m, scratch);
    float z = 0.0f;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) z += expf(load(row[i]) - m);
    z = block_sum(z, scratch);
    float target_logit = load(row[t]);
    // Every thread has read row[t] before any thread overwrites it.
    __syncthreads();
    if (threadIdx.x == 0) losses[blockIdx.x] = logf(z) + m - target_logit;
    if (write_grad) {
        float k = grad_scale / z;
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
            float g = expf(load(row[i]) - m) * k;
            if (i == t) g -= grad_scale;
            row[i] = store<T>(g);
        }
    }
}

#define SOFTMAX_XENT(T, S) \
    extern "C" __global__ void softmax_xent_##S(T* logits, float* losses, const u32* targets, u32 vocab, float grad_scale, int write_grad) { \
        softmax_xent_impl<T>(logits, losses, targets, vocab, grad_scale, write_grad); \
    }
FOR_TYPES(SOFTMAX_XENT)
