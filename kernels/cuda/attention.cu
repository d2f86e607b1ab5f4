// Causal self-attention with grouped key/value heads, flash-style: the forward streams key/value
// tiles through shared memory with an online softmax and saves only each row's log-sum-exp; the
// backward recomputes the probabilities from it. Nothing of size seq x seq is ever stored.
//
// Layout (as on CPU): one fused buffer `qkv` of `[batch*seq, (heads + 2*kv_heads) * dim]` holding,
// per row, the query heads, then the key heads, then the value heads; `out` and `dout` are
// `[batch*seq, heads*dim]`; `lse` and `delta` are `[batch*seq, heads]` (f32). Query head h reads
// key/value head h / (heads / kv_heads).
//
// Work split: a warp owns whole query rows (forward, dq) or whole key rows (dk, dv); its lanes
// take one key (or query) of the staged tile each for the dot products, and own head dimensions
// d = lane + 32*t for the accumulators. The backward is two kernels, one parallel over queries
// (dq) and one over keys (dk, dv, summed over the query heads of the group), so every gradient is
// written by one thread in a fixed order: no atomics, the same bits on every run.
//
// `dim` is at most MAX_DIM (every GPT-2 and LLaMA configuration we know of: 64 or 128).

#define MAX_DIM 128
#define DSLOTS (MAX_DIM / 32)
#define TILE 32            // keys (forward, dq) or queries (dk/dv) staged per step
#define Q_ROWS 16          // query rows per block (4 warps x 4 rows)
#define K_ROWS 8           // key rows per block in the dk/dv kernel (4 warps x 2 rows)
#define WARPS 4

struct AttnDims {
    u32 batch, seq, heads, kv_heads, dim;
    __device__ u32 width() const { return (heads + 2 * kv_heads) * dim; }
    __device__ u32 out_width() const { return heads * dim; }
    __device__ u32 k_col(u32 kvh) const { return (heads + kvh) * dim; }
    __device__ u32 v_col(u32 kvh) const { return (heads + kv_heads + kvh) * dim; }
};

// Loads `rows` rows of `dim` values (global row stride `stride`, starting at row `r0`, column
// `col`) into shared `dst` with row pitch dim+1 (the pad keeps lane-per-row reads conflict-free).
// Rows at or past `limit` are zero-filled.
template <typename T>
__device__ void stage(float* dst, const T* src, u64 r0, u32 rows, u32 limit_rows, u64 stride, u32 col, u32 dim) {
    for (u32 idx = threadIdx.x; idx < rows * dim; idx += blockDim.x) {
        u32 r = idx / dim, d = idx % dim;
        dst[r * (dim + 1) + d] = r < limit_rows ? load(src[(r0 + r) * stride + col + d]) : 0.0f;
    }
}

// grid (ceil(seq / Q_ROWS), heads, batch), block WARPS*32, dynamic shared memory
// (Q_ROWS + 2*TILE) * (dim+1) floats.
template <typename T>
__device__ void attention_fwd_impl(T* out, float* lse, const T* qkv, AttnDims s, float scale) {
    extern __shared__ float smem[];
    const u32 pitch = s.dim + 1;
    float* qs = smem;
    float* ks = qs + Q_ROWS * pitch;
    float* vs = ks + TILE * pitch;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 h = blockIdx.y, b = blockIdx.z, i0 = blockIdx.x * Q_ROWS;
    const u32 kvh = h / (s.heads / s.kv_heads);
    const u64 row0 = (u64)b * s.seq;
    const u32 w = s.width();
    const u32 q_rows = min(Q_ROWS, s.seq - i0);
    stage(qs, qkv, row0 + i0, Q_ROWS, q_rows, w, h * s.dim, s.dim);

    float m[Q_ROWS / WARPS], l[Q_ROWS / WARPS], acc[Q_ROWS / WARPS][DSLOTS];
    #pragma unroll
    for (int r = 0; r < Q_ROWS / WARPS; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
        #pragma unroll
        for (int t = 0; t < DSLOTS; t++) acc[r][t] = 0.0f;
    }
    const u32 key_end = min(s.seq, i0 + Q_ROWS);  // causal: no row of this block sees past it
    for (u32 k0 = 0; k0 < key_end; k0 += TILE) {
        u32 keys = min(TILE, key_end - k0);
        __syncthreads();
        stage(ks, qkv, row0 + k0, TILE, keys, w, s.k_col(kvh), s.dim);
        stage(vs, qkv, row0 + k0, TILE, keys, w, s.v_col(kvh), s.dim);
        __syncthreads();
        #pragma unroll
        for (int r = 0; r < Q_ROWS / WARPS; r++) {
            u32 qr = warp * (Q_ROWS / WARPS) + r;
            u32 i = i0 + qr;
            if (qr >= q_rows) break;
            u32 j = k0 + lane;
            float sc = NEG_INF;
            if (lane < keys && j <= i) {
                float dot = 0.0f;
                for (u32 d = 0; d < s.dim; d++) dot += qs[qr * pitch + d] * ks[lane * pitch + d];
                sc = dot * scale;
            }
            float new_m = fmaxf(m[r], warp_max(sc));
            if (new_m == NEG_INF) continue;  // every key of this tile is masked for this row
            float p = sc == NEG_INF ? 0.0f : expf(sc - new_m);
            float corr = m[r] == NEG_INF ? 0.0f : expf(m[r] - new_m);
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = new_m;
            #pragma unroll
            for (int t = 0; t < DSLOTS; t++) acc[r][t] *= corr;
            for (u32 jj = 0; jj < keys; jj++) {
                float pj = __shfl_sync(0xffffffffu, p, jj);
                #pragma unroll
                for (int t = 0; t < DSLOTS; t++) {
                    u32 d = lane + 32 * t;
                    if (d < s.dim) acc[r][t] += pj * vs[jj * pitch + d];
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < Q_ROWS / WARPS; r++) {
        u32 qr = warp * (Q_ROWS / WARPS) + r;
        if (qr >= q_rows) break;
        u64 row = row0 + i0 + qr;
        float inv = 1.0f / l[r];
        #pragma unroll
        for (int t = 0; t < DSLOTS; t++) {
            u32 d = lane + 32 * t;
            if (d < s.dim) out[row * s.out_width() + h * s.dim + d] = store<T>(acc[r][t] * inv);
        }
        if (lane == 0) lse[row * s.heads + h] = m[r] + logf(l[r]);
    }
}

#define ATTENTION_FWD(T, S) \
    extern "C" __global__ void attention_fwd_##S(T* out, float* lse, const T* qkv, u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 dim, float scale) { \
        AttnDims s = {batch, seq, heads, kv_heads, dim}; \
        attention_fwd_impl<T>(out, lse, qkv, s, scale); \
    }
FOR_TYPES(ATTENTION_FWD)

// delta[r, h] = dout[r, h, :] . out[r, h, :]   (one warp per (row, head))
template <typename T>
__device__ void attention_bwd_delta_impl(float* delta, const T* out, const T* dout, u32 rows, u32 heads, u32 dim) {
    u64 wid = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u32 lane = threadIdx.x & 31;
    if (wid >= (u64)rows * heads) return;
    u64 base = wid * dim;  // rows of out are heads*dim wide, so (row, head) is at wid*dim
    float acc = 0.0f;
    for (u32 d = lane; d < dim; d += 32) acc += load(dout[base + d]) * load(out[base + d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[wid] = acc;
}

#define ATTENTION_BWD_DELTA(T, S) \
    extern "C" __global__ void attention_bwd_delta_##S(float* delta, const T* out, const T* dout, u32 rows, u32 heads, u32 dim) { \
        attention_bwd_delta_impl<T>(delta, out, dout, rows, heads, dim); \
    }
FOR_TYPES(ATTENTION_BWD_DELTA)

// dq_i = sum_j dS_ij k_j with dS_ij = P_ij (dout_i . v_j - delta_i) * scale. Same grid and tiling
// as the forward; dynamic shared memory (2*Q_ROWS + 2*TILE) * (dim+1) floats. Overwrites the query
// columns of dqkv.
template <typename T>
__device__ void attention_bwd_dq_impl(T* dqkv, const T* qkv, const T* dout, const float* lse, const float* delta, AttnDims s, float scale) {
    extern __shared__ float smem[];
    const u32 pitch = s.dim + 1;
    float* qs = smem;
    float* dos = qs + Q_ROWS * pitch;
    float* ks = dos + Q_ROWS * pitch;
    float* vs = ks + TILE * pitch;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 h = blockIdx.y, b = blockIdx.z, i0 = blockIdx.x * Q_ROWS;
    const u32 kvh = h / (s.heads / s.kv_heads);
    const u64 row0 = (u64)b * s.seq;
    const u32 w = s.width(), ow = s.out_width();
    const u32 q_rows = min(Q_ROWS, s.seq - i0);
    stage(qs, qkv, row0 + i0, Q_ROWS, q_rows, w, h * s.dim, s.dim);
    stage(dos, dout, row0 + i0, Q_ROWS, q_rows, ow, h * s.dim, s.dim);

    float acc[Q_ROWS / WARPS][DSLOTS];
    float row_lse[Q_ROWS / WARPS], row_delta[Q_ROWS / WARPS];
    #pragma unroll
    for (int r = 0; r < Q_ROWS / WARPS; r++) {
        u32 qr = warp * (Q_ROWS / WARPS) + r;
        u64 row = row0 + i0 + min(qr, q_rows - 1);
        row_lse[r] = lse[row * s.heads + h];
        row_delta[r] = delta[row * s.heads + h];
        #pragma unroll
        for (int t = 0; t < DSLOTS; t++) acc[r][t] = 0.0f;
    }
    const u32 key_end = min(s.seq, i0 + Q_ROWS);
    for (u32 k0 = 0; k0 < key_end; k0 += TILE) {
        u32 keys = min(TILE, key_end - k0);
        __syncthreads();
        stage(ks, qkv, row0 + k0, TILE, keys, w, s.k_col(kvh), s.dim);
        stage(vs, qkv, row0 + k0, TILE, keys, w, s.v_col(kvh), s.dim);
        __syncthreads();
        #pragma unroll
        for (int r = 0; r < Q_ROWS / WARPS; r++) {
            u32 qr = warp * (Q_ROWS / WARPS) + r;
            u32 i = i0 + qr;
            if (qr >= q_rows) break;
            u32 j = k0 + lane;
            float ds = 0.0f;
            if (lane < keys && j <= i) {
                float qk = 0.0f, dv = 0.0f;
                for (u32 d = 0; d < s.dim; d++) {
                    qk += qs[qr * pitch + d] * ks[lane * pitch + d];
                    dv += dos[qr * pitch + d] * vs[lane * pitch + d];
                }
                float p = expf(qk * scale - row_lse[r]);
                ds = p * (dv - row_delta[r]) * scale;
            }
            for (u32 jj = 0; jj < keys; jj++) {
                float dsj = __shfl_sync(0xffffffffu, ds, jj);
                #pragma unroll
                for (int t = 0; t < DSLOTS; t++) {
                    u32 d = lane + 32 * t;
                    if (d < s.dim) acc[r][t] += dsj * ks[jj * pitch + d];
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < Q_ROWS / WARPS; r++) {
        u32 qr = warp * (Q_ROWS / WARPS) + r;
        if (qr >= q_rows) break;
        u64 row = row0 + i0 + qr;
        #pragma unroll
        for (int t = 0; t < DSLOTS; t++) {
            u32 d = lane + 32 * t;
            if (d < s.dim) dqkv[row * w + h * s.dim + d] = store<T>(acc[r][t]);
        }
    }
}

#define ATTENTION_BWD_DQ(T, S) \
    extern "C" __global__ void attention_bwd_dq_##S(T* dqkv, const T* qkv, const T* dout, const float* lse, const float* delta, u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 dim, float scale) { \
        AttnDims s = {batch, seq, heads, kv_heads, dim}; \
        attention_bwd_dq_impl<T>(dqkv, qkv, dout, lse, delta, s, scale); \
    }
FOR_TYPES(ATTENTION_BWD_DQ)

// dv_j = sum over the group's query heads and rows i >= j of P_ij dout_i, and
// dk_j = sum of dS_ij q_i. grid (ceil(seq / K_ROWS), kv_heads, batch), block WARPS*32, dynamic
// shared memory (2*K_ROWS + 2*TILE) * (dim+1) + 2*TILE floats. Overwrites the key and value
// columns of dqkv.
template <typename T>
__device__ void attention_bwd_dkv_impl(T* dqkv, const T* qkv, const T* dout, const float* lse, const float* delta, AttnDims s, float scale) {
    extern __shared__ float smem[];
    const u32 pitch = s.dim + 1;
    float* ks = smem;
    float* vs = ks + K_ROWS * pitch;
    float* qs = vs + K_ROWS * pitch;
    float* dos = qs + TILE * pitch;
    float* tile_lse = dos + TILE * pitch;
    float* tile_delta = tile_lse + TILE;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 kvh = blockIdx.y, b = blockIdx.z, j0 = blockIdx.x * K_ROWS;
    const u32 group = s.heads / s.kv_heads;
    const u64 row0 = (u64)b * s.seq;
    const u32 w = s.width(), ow = s.out_width();
    const u32 k_rows = min(K_ROWS, s.seq - j0);
    stage(ks, qkv, row0 + j0, K_ROWS, k_rows, w, s.k_col(kvh), s.dim);
    stage(vs, qkv, row0 + j0, K_ROWS, k_rows, w, s.v_col(kvh), s.dim);

    float dk[K_ROWS / WARPS][DSLOTS], dv[K_ROWS / WARPS][DSLOTS];
    #pragma unroll
    for (int r = 0; r < K_ROWS / WARPS; r++) {
        #pragma unroll
        for (int t = 0; t < DSLOTS; t++) dk[r][t] = dv[r][t] = 0.0f;
    }
    for (u32 g = 0; g < group; g++) {
        u32 h = kvh * group + g;
        for (u32 q0 = j0; q0 < s.seq; q0 += TILE) {  // causal: queries before j0 see none of these keys
            u32 queries = min(TILE, s.seq - q0);
            __syncthreads();
            stage(qs, qkv, row0 + q0, TILE, queries, w, h * s.dim, s.dim);
            stage(dos, dout, row0 + q0, TILE, queries, ow, h * s.dim, s.dim);
            for (u32 r = threadIdx.x; r < TILE; r += blockDim.x) {
                tile_lse[r] = r < queries ? lse[(row0 + q0 + r) * s.heads + h] : 0.0f;
                tile_delta[r] = r < queries ? delta[(row0 + q0 + r) * s.heads + h] : 0.0f;
            }
            __syncthreads();
            #pragma unroll
            for (int r = 0; r < K_ROWS / WARPS; r++) {
                u32 kr = warp * (K_ROWS / WARPS) + r;
                u32 j = j0 + kr;
                if (kr >= k_rows) break;
                u32 i = q0 + lane;
                float p = 0.0f, ds = 0.0f;
                if (lane < queries && i >= j) {
                    float qk = 0.0f, dov = 0.0f;
                    for (u32 d = 0; d < s.dim; d++) {
                        qk += qs[lane * pitch + d] * ks[kr * pitch + d];
                        dov += dos[lane * pitch + d] * vs[kr * pitch + d];
                    }
                    p = expf(qk * scale - tile_lse[lane]);
                    ds = p * (dov - tile_delta[lane]) * scale;
                }
                for (u32 ii = 0; ii < queries; ii++) {
                    float pi = __shfl_sync(0xffffffffu, p, ii);
                    float dsi = __shfl_sync(0xffffffffu, ds, ii);
                    #pragma unroll
                    for (int t = 0; t < DSLOTS; t++) {
                        u32 d = lane + 32 * t;
                        if (d < s.dim) {
                            dv[r][t] += pi * dos[ii * pitch + d];
                            dk[r][t] += dsi * qs[ii * pitch + d];
                        }
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < K_ROWS / WARPS; r++) {
        u32 kr = warp * (K_ROWS / WARPS) + r;
        if (kr >= k_rows) break;
        u64 row = row0 + j0 + kr;
        #pragma unroll
        for (int t = 0; t < DSLOTS; t++) {
            u32 d = lane + 32 * t;
            if (d < s.dim) {
                dqkv[row * w + s.k_col(kvh) + d] = store<T>(dk[r][t]);
                dqkv[row * w + s.v_col(kvh) + d] = store<T>(dv[r][t]);
            }
        }
    }
}

#define ATTENTION_BWD_DKV(T, S) \
    extern "C" __global__ void attention_bwd_dkv_##S(T* dqkv, const T* qkv, const T* dout, const float* lse, const float* delta, u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 dim, float scale) { \
        AttnDims s = {batch, seq, heads, kv_heads, dim}; \
        attention_bwd_dkv_impl<T>(dqkv, qkv, dout, lse, delta, s, scale); \
    }
FOR_TYPES(ATTENTION_BWD_DKV)
