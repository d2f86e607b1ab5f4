// Token and learned-position embeddings. Tables are f32 (the master parameters); activations are
// the storage type.
//
// The backward is deterministic without atomics: the host buckets the rows by token (a counting
// sort, `order` and `starts`), and each vocabulary row's gradient is summed by one thread per
// column in row order.

// out[r, :] = wte[tokens[r], :] (+ wpe[r % seq, :])
template <typename T>
__device__ void embedding_fwd_impl(T* out, const u32* tokens, const float* wte, const float* wpe, u32 rows, u32 seq, u32 c) {
    FOR_EACH(idx, (u64)rows * c) {
        u64 r = idx / c;
        u32 col = (u32)(idx % c);
        float v = wte[(u64)tokens[r] * c + col];
        if (wpe) v += wpe[(u64)(r % seq) * c + col];
        out[idx] = store<T>(v);
    }
}

#define EMBEDDING_FWD(T, S) \
    extern "C" __global__ void embedding_fwd_##S(T* out, const u32* tokens, const float* wte, const float* wpe, u32 rows, u32 seq, u32 c) { \
        embedding_fwd_impl<T>(out, tokens, wte, wpe, rows, seq, c); \
    }
FOR_TYPES(EMBEDDING_FWD)

// A slice of the token table (vocabulary rows first..first + table_rows, split across chunks under
// ZeRO-3): out[r, :] = table[tokens[r] - first, :] for the rows whose token it holds; the other rows
// are left alone (another slice writes them).
template <typename T>
__device__ void embedding_rows_impl(T* out, const u32* tokens, const float* table, u32 first, u32 table_rows, u32 rows, u32 c) {
    FOR_EACH(idx, (u64)rows * c) {
        u64 r = idx / c;
        u32 col = (u32)(idx % c);
        u32 t = tokens[r];
        if (t >= first && t - first < table_rows) out[idx] = store<T>(table[(u64)(t - first) * c + col]);
    }
}

#define EMBEDDING_ROWS(T, S) \
    extern "C" __global__ void embedding_rows_##S(T* out, const u32* tokens, const float* table, u32 first, u32 table_rows, u32 rows, u32 c) { \
        embedding_rows_impl<T>(out, tokens, table, first, table_rows, rows, c); \
    }
FOR_TYPES(EMBEDDING_ROWS)

// out[r, :] += wpe[r % seq, :]: the positions added after a sliced token embedding (the sum rounds
// once, as the whole-table kernel's does).
template <typename T>
__device__ void add_positions_impl(T* out, const float* wpe, u32 rows, u32 seq, u32 c) {
    FOR_EACH(idx, (u64)rows * c) {
        u64 r = idx / c;
        u32 col = (u32)(idx % c);
        out[idx] = store<T>(load(out[idx]) + wpe[(u64)(r % seq) * c + col]);
    }
}

#define ADD_POSITIONS(T, S) \
    extern "C" __global__ void add_positions_##S(T* out, const float* wpe, u32 rows, u32 seq, u32 c) { \
        add_positions_impl<T>(out, wpe, rows, seq, c); \
    }
FOR_TYPES(ADD_POSITIONS)

// dwte[v, :] += sum of dout[r, :] over the rows r with token v. Grid (vocab, ceil(c / blockDim.x)):
// the vocabulary goes on x, since grid y stops at 65535 (LLaMA 3's vocabulary is 128256).
template <typename T>
__device__ void embedding_bwd_wte_impl(float* dwte, const T* dout, const u32* order, const u32* starts, u32 c) {
    u32 v = blockIdx.x;
    u32 col = blockIdx.y * blockDim.x + threadIdx.x;
    u32 s0 = starts[v], s1 = starts[v + 1];
    if (col >= c || s0 == s1) return;
    float acc = 0.0f;
    for (u32 k = s0; k < s1; k++) acc += load(dout[(u64)order[k] * c + col]);
    dwte[(u64)v * c + col] += acc;
}

#define EMBEDDING_BWD_WTE(T, S) \
    extern "C" __global__ void embedding_bwd_wte_##S(float* dwte, const T* dout, const u32* order, const u32* starts, u32 c) { \
        embedding_bwd_wte_impl<T>(dwte, dout, order, starts, c); \
    }
FOR_TYPES(EMBEDDING_BWD_WTE)

// dwpe[p, :] += sum of dout[r, :] over the rows r = p, p + seq, ... below `rows` (as on CPU, a
// trailing partial sequence counts too)
template <typename T>
__device__ void embedding_bwd_wpe_impl(float* dwpe, const T* dout, u32 rows, u32 seq, u32 c) {
    FOR_EACH(idx, (u64)seq * c) {
        u64 p = idx / c;
        u32 col = (u32)(idx % c);
        float acc = 0.0f;
        for (u64 r = p; r < rows; r += seq) acc += load(dout[r * c + col]);
        dwpe[idx] += acc;
    }
}

#define EMBEDDING_BWD_WPE(T, S) \
    extern "C" __global__ void embedding_bwd_wpe_##S(float* dwpe, const T* dout, u32 rows, u32 seq, u32 c) { \
        embedding_bwd_wpe_impl<T>(dwpe, dout, rows, seq, c); \
    }
FOR_TYPES(EMBEDDING_BWD_WPE)
