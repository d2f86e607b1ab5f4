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

// Vocabulary-parallel cross-entropy (tensor parallelism), first half: a row holds this rank's
// vocabulary entries first..first+vocab. stats[3r..3r+3] receives the row's max, the sum of
// exp(logit - max) and the target's logit (0 when another rank holds the target); the row becomes
// exp(logit - max), which xent_finish scales into the gradient once the group's statistics are
// combined. One block per row.
template <typename T>
__device__ void xent_stats_impl(T* logits, float* stats, const u32* targets, u32 vocab, u32 first) {
    __shared__ float scratch[32];
    T* row = logits + (u64)blockIdx.x * vocab;
    u32 t = targets[blockIdx.x];
    float m = NEG_INF;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, load(row[i]));
    m = block_max(m, scratch);
    float target_logit = (t >= first && t - first < vocab) ? load(row[t - first]) : 0.0f;
    // Every thread has read the target's logit before any thread overwrites it.
    __syncthreads();
    float z = 0.0f;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        float e = expf(load(row[i]) - m);
        row[i] = store<T>(e);
        z += e;
    }
    z = block_sum(z, scratch);
    if (threadIdx.x == 0) {
        float* s = stats + 3 * (u64)blockIdx.x;
        s[0] = m;
        s[1] = z;
        s[2] = target_logit;
    }
}

// Second half: `local` is this rank's statistics, `global` the group's (max, sum of
// exp(logit - max) over the whole vocabulary, target logit). losses[r] gets the row's loss (the
// same on every rank); with write_grad the row becomes this rank's part of
// grad_scale * (softmax - onehot(target)).
template <typename T>
__device__ void xent_finish_impl(T* rows, float* losses, const u32* targets, const float* local, const float* global, u32 vocab, u32 first, float grad_scale, int write_grad) {
    u64 r = blockIdx.x;
    T* row = rows + r * vocab;
    u32 t = targets[r];
    float lm = local[3 * r], gm = global[3 * r], z = global[3 * r + 1], gt = global[3 * r + 2];
    if (threadIdx.x == 0) losses[r] = logf(z) + gm - gt;
    if (write_grad) {
        float k = grad_scale * expf(lm - gm) / z;
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
            float g = load(row[i]) * k;
            if (t >= first && i == t - first) g -= grad_scale;
            row[i] = store<T>(g);
        }
    }
}

#define XENT_STATS(T, S) \
    extern "C" __global__ void xent_stats_##S(T* logits, float* stats, const u32* targets, u32 vocab, u32 first) { \
        xent_stats_impl<T>(logits, stats, targets, vocab, first); \
    }
FOR_TYPES(XENT_STATS)

#define XENT_FINISH(T, S) \
    extern "C" __global__ void xent_finish_##S(T* rows, float* losses, const u32* targets, const float* local, const float* global, u32 vocab, u32 first, float grad_scale, int write_grad) { \
        xent_finish_impl<T>(rows, losses, targets, local, global, vocab, first, grad_scale, write_grad); \
    }
FOR_TYPES(XENT_FINISH)
