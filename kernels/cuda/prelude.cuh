// Prepended to every Gantry kernel source before NVRTC compiles it (kernels/src/cuda/sources.rs).
// NVRTC is given no include paths, so nothing here includes a CUDA header: half and bfloat16
// storage are plain 16-bit words converted with PTX instructions, which keeps every source
// compilable by the NVRTC wheel from PyPI alone.
//
// Storage types: `float`, `bf16` and `f16`. Arithmetic is always f32: `load` widens and `store`
// rounds to nearest even.

typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }
__device__ __forceinline__ float load(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 store<bf16>(float v) {
    u32 u = __float_as_uint(v);
    bf16 r;
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
        r.bits = (unsigned short)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
        r.bits = (unsigned short)(u >> 16);
    }
    return r;
}
template <> __device__ __forceinline__ f16 store<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). Every thread gets the result.
// `scratch` holds 32 floats of shared memory; the trailing barrier lets the caller reuse it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : NEG_INF;
    v = warp_max(v);
    __syncthreads();
    return v;
}

// Grid-stride loop over `n` elements.
#define FOR_EACH(i, n) for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (u64)(n); i += (u64)gridDim.x * blockDim.x)

// Instantiates a kernel once per storage type: `FOR_TYPES(M)` expands `M(float, f32)`,
// `M(bf16, bf16)` and `M(f16, f16)`, where `M` defines an `extern "C"` kernel named with the
// suffix, so the host looks each one up by a plain name.
#define FOR_TYPES(M) M(float, f32) M(bf16, bf16) M(f16, f16)
