// Rotary position embedding, Hugging Face convention (`rotate_half`: dimension i pairs with
// i + dim/2), applied in place to the first `heads` heads of every row of a `[rows, row_stride]`
// buffer whose row r holds position pos0 + r % seq (pos0: where a part of a sequence starts, under
// sequence parallelism). `cos`/`sin` are `[positions, half]` tables computed
// on the host exactly as the CPU path computes them. `inverse` rotates by the negative angle,
// which is the backward pass (the rotation is orthogonal).

template <typename T>
__device__ void rope_impl(T* x, const float* cos_t, const float* sin_t, u32 rows, u32 row_stride, u32 heads, u32 seq, u32 pos0, u32 half, int inverse) {
    u64 total = (u64)rows * heads * half;
    float sign = inverse ? -1.0f : 1.0f;
    FOR_EACH(idx, total) {
        u32 i = (u32)(idx % half);
        u64 rh = idx / half;
        u32 h = (u32)(rh % heads);
        u64 r = rh / heads;
        u32 pos = pos0 + (u32)(r % seq);
        T* a = x + r * row_stride + (u64)h * 2 * half;
        float c = cos_t[(u64)pos * half + i], s = sign * sin_t[(u64)pos * half + i];
        float x1 = load(a[i]), x2 = load(a[i + half]);
        a[i] = store<T>(x1 * c - x2 * s);
        a[i + half] = store<T>(x2 * c + x1 * s);
    }
}

#define ROPE(T, S) \
    extern "C" __global__ void rope_##S(T* x, const float* cos_t, const float* sin_t, u32 rows, u32 row_stride, u32 heads, u32 seq, u32 pos0, u32 half, int inverse) { \
        rope_impl<T>(x, cos_t, sin_t, rows, row_stride, heads, seq, pos0, half, inverse); \
    }
FOR_TYPES(ROPE)
