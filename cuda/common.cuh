// Shared definitions for every geomx kernel family. The host prepends this file to each .cu source
// before compiling it with NVRTC (no include paths are needed at run time).
//
// Conventions: element counts and indices are 64-bit (`u64`) everywhere, and every elementwise
// kernel is a grid-stride loop, so tensors above 2^32 elements work with any grid size.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define GRID_STRIDE(i, n)                                                                 \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (u64)(n);                 \
         i += (u64)blockDim.x * gridDim.x)

// Sort key of |x| under the spec's total order (f32 `total_cmp` of the absolute value): the bits
// of |x| compare as unsigned integers in value order, NaN (any payload) above +inf; +-0 is key 0.
__device__ __forceinline__ u32 abs_key(float x) {
    return __float_as_uint(x) & 0x7FFFFFFFu;
}

// Sum of `v` over the block; the result is valid in thread 0. `scratch` needs 32 entries.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_down_sync(0xFFFFFFFFu, v, off);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : (T)0;
    if (warp == 0) {
        for (int off = 16; off > 0; off >>= 1) {
            v += __shfl_down_sync(0xFFFFFFFFu, v, off);
        }
    }
    return v;
}
