// LayerNorm and RMSNorm over the last dimension of `[rows, c]`, forward and backward.
//
// One block per row. The forward saves `mean` and `rstd` per row (f32) and the backward recomputes
// the normalised input from them. The weight and bias gradients are column sums over rows: the
// backward writes per-row-group partials and `col_sum_parts_f32` adds them in a fixed order, so
// the result has the same bits on every run (no atomics).
//
// Semantics match the CPU kernels: the forward overwrites `out`; the backward accumulates into
// `dx` (a residual stream's gradient arrives there already).

template <typename T>
__device__ void layernorm_fwd_impl(T* out, float* mean, float* rstd, const T* x, const float* w, const float* b, u32 c, float eps) {
    __shared__ float scratch[32];
    const T* row = x + (u64)blockIdx.x * c;
    T* o = out + (u64)blockIdx.x * c;
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) s += load(row[i]);
    float m = block_sum(s, scratch) / c;
    float sq = 0.0f;
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) {
        float d = load(row[i]) - m;
        sq += d * d;
    }
    float r = rsqrtf(block_sum(sq, scratch) / c + eps);
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) o[i] = store<T>((load(row[i]) - m) * r * w[i] + b[i]);
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = m;
        rstd[blockIdx.x] = r;
    }
}

#define LAYERNORM_FWD(T, S) \
    extern "C" __global__ void layernorm_fwd_##S(T* out, float* mean, float* rstd, const T* x, const float* w, const float* b, u32 c, float eps) { \
        layernorm_fwd_impl<T>(out, mean, rstd, x, w, b, c, eps); \
    }
FOR_TYPES(LAYERNORM_FWD)

// dx += rstd * (dn - mean(dn) - xhat * mean(dn * xhat)) with dn = dout * w.
template <typename T>
__device__ void layernorm_bwd_dx_impl(T* dx, const T* dout, const T* x, const float* mean, const float* rstd, const float* w, u32 c) {
    __shared__ float scratch[32];
    u64 base = (u64)blockIdx.x * c;
    float m = mean[blockIdx.x], r = rstd[blockIdx.x];
    float s_dn = 0.0f, s_dnx = 0.0f;
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) {
        float dn = load(dout[base + i]) * w[i];
        s_dn += dn;
        s_dnx += dn * (load(x[base + i]) - m) * r;
    }
    float mean_dn = block_sum(s_dn, scratch) / c;
    float mean_dnx = block_sum(s_dnx, scratch) / c;
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) {
        float xhat = (load(x[base + i]) - m) * r;
        float dn = load(dout[base + i]) * w[i];
        dx[base + i] = store<T>(load(dx[base + i]) + r * (dn - mean_dn - xhat * mean_dnx));
    }
}

#define LAYERNORM_BWD_DX(T, S) \
    extern "C" __global__ void layernorm_bwd_dx_##S(T* dx, const T* dout, const T* x, const float* mean, const float* rstd, const float* w, u32 c) { \
        layernorm_bwd_dx_impl<T>(dx, dout, x, mean, rstd, w, c); \
    }
FOR_TYPES(LAYERNORM_BWD_DX)

// Partial weight/bias gradients: grid (ceil(c / blockDim.x), parts); part p sums rows
// [p*rows_per_part, (p+1)*rows_per_part) of dout*xhat into part_dw[p, :] and of dout into
// part_db[p, :]. Adjacent threads read adjacent columns, so every load is coalesced.
template <typename T>
__device__ void layernorm_bwd_dwdb_impl(float* part_dw, float* part_db, const T* dout, const T* x, const float* mean, const float* rstd, u32 rows, u32 c, u32 rows_per_part) {
    u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    u32 r0 = blockIdx.y * rows_per_part, r1 = min(rows, r0 + rows_per_part);
    float dw = 0.0f, db = 0.0f;
    for (u32 r = r0; r < r1; r++) {
        float d = load(dout[(u64)r * c + col]);
        dw += d * (load(x[(u64)r * c + col]) - mean[r]) * rstd[r];
        db += d;
    }
    part_dw[(u64)blockIdx.y * c + col] = dw;
    part_db[(u64)blockIdx.y * c + col] = db;
}

#define LAYERNORM_BWD_DWDB(T, S) \
    extern "C" __global__ void layernorm_bwd_dwdb_##S(float* part_dw, float* part_db, const T* dout, const T* x, const float* mean, const float* rstd, u32 rows, u32 c, u32 rows_per_part) { \
        layernorm_bwd_dwdb_impl<T>(part_dw, part_db, dout, x, mean, rstd, rows, c, rows_per_part); \
    }
FOR_TYPES(LAYERNORM_BWD_DWDB)

// out[i] += sum over p of parts[p, i], in order p = 0, 1, ...
extern "C" __global__ void col_sum_parts_f32(float* out, const float* parts, u32 nparts, u32 c) {
    u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    float s = 0.0f;
    for (u32 p = 0; p < nparts; p++) s += parts[(u64)p * c + col];
    out[col] += s;
}

// Column sums of a strided `[rows, c]` matrix into parts (a bias gradient): part p sums rows
// [p*rows_per_part, ...) of x[r * row_stride + col].
template <typename T>
__device__ void col_sums_partial_impl(float* parts, const T* x, u32 rows, u32 c, u32 row_stride, u32 rows_per_part) {
    u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    u32 r0 = blockIdx.y * rows_per_part, r1 = min(rows, r0 + rows_per_part);
    float s = 0.0f;
    for (u32 r = r0; r < r1; r++) s += load(x[(u64)r * row_stride + col]);
    parts[(u64)blockIdx.y * c + col] = s;
}

#define COL_SUMS_PARTIAL(T, S) \
    extern "C" __global__ void col_sums_partial_##S(float* parts, const T* x, u32 rows, u32 c, u32 row_stride, u32 rows_per_part) { \
        col_sums_partial_impl<T>(parts, x, rows, c, row_stride, rows_per_part); \
    }
FOR_TYPES(COL_SUMS_PARTIAL)

template <typename T>
__device__ void rmsnorm_fwd_impl(T* out, float* rstd, const T* x, const float* w, u32 c, float eps) {
    __shared__ float scratch[32];
    const T* row = x + (u64)blockIdx.x * c;
    T* o = out + (u64)blockIdx.x * c;
    float sq = 0.0f;
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) {
        float v = load(row[i]);
        sq += v * v;
    }
    float r = rsqrtf(block_sum(sq, scratch) / c + eps);
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) o[i] = store<T>(load(row[i]) * r * w[i]);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

#define RMSNORM_FWD(T, S) \
    extern "C" __global__ void rmsnorm_fwd_##S(T* out, float* rstd, const T* x, const float* w, u32 c, float eps) { \
        rmsnorm_fwd_impl<T>(out, rstd, x, w, c, eps); \
    }
FOR_TYPES(RMSNORM_FWD)

// dx += rstd * (dout * w - xhat * mean(dout * w * xhat)) with xhat = x * rstd.
template <typename T>
__device__ void rmsnorm_bwd_dx_impl(T* dx, const T* dout, const T* x, const float* rstd, const float* w, u32 c) {
    __shared__ float scratch[32];
    u64 base = (u64)blockIdx.x * c;
    float r = rstd[blockIdx.x];
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) s += load(dout[base + i]) * w[i] * load(x[base + i]) * r;
    float mean_dnx = block_sum(s, scratch) / c;
    for (u32 i = threadIdx.x; i < c; i += blockDim.x) {
        float xv = load(x[base + i]);
        dx[base + i] = store<T>(load(dx[base + i]) + r * (load(dout[base + i]) * w[i] - xv * r * mean_dnx));
    }
}

#define RMSNORM_BWD_DX(T, S) \
    extern "C" __global__ void rmsnorm_bwd_dx_##S(T* dx, const T* dout, const T* x, const float* rstd, const float* w, u32 c) { \
        rmsnorm_bwd_dx_impl<T>(dx, dout, x, rstd, w, c); \
    }
FOR_TYPES(RMSNORM_BWD_DX)

template <typename T>
__device__ void rmsnorm_bwd_dw_impl(float* part_dw, const T* dout, const T* x, const float* rstd, u32 rows, u32 c, u32 rows_per_part) {
    u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    u32 r0 = blockIdx.y * rows_per_part, r1 = min(rows, r0 + rows_per_part);
    float dw = 0.0f;
    for (u32 r = r0; r < r1; r++) dw += load(dout[(u64)r * c + col]) * load(x[(u64)r * c + col]) * rstd[r];
    part_dw[(u64)blockIdx.y * c + col] = dw;
}

#define RMSNORM_BWD_DW(T, S) \
    extern "C" __global__ void rmsnorm_bwd_dw_##S(float* part_dw, const T* dout, const T* x, const float* rstd, u32 rows, u32 c, u32 rows_per_part) { \
        rmsnorm_bwd_dw_impl<T>(part_dw, dout, x, rstd, rows, c, rows_per_part); \
    }
FOR_TYPES(RMSNORM_BWD_DW)
