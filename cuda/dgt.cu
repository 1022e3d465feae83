// DGT block scoring (spec dgt.md, sender step 2): mean |x| per block of `block_elems` elements,
// summed in f64. Block b covers [b*block_elems, min(n, (b+1)*block_elems)). One CUDA block per DGT
// block (grid-stride over DGT blocks). The f64 tree sum differs from a sequential CPU sum only in
// rounding (relative error ~ 1e-16 * log2(block_elems)).

template <typename Load>
__device__ __forceinline__ void block_mean_abs(Load load, u64 n, u64 block_elems, u64 nblocks, double* out) {
    __shared__ double scratch[32];
    for (u64 b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const u64 lo = b * block_elems;
        const u64 hi = (lo + block_elems < n) ? lo + block_elems : n;
        double s = 0.0;
        for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            s += fabs((double)load(i));
        }
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) {
            out[b] = s / (double)(hi - lo);
        }
        __syncthreads();
    }
}

struct LoadF32 {
    const float* x;
    __device__ float operator()(u64 i) const { return x[i]; }
};

extern "C" __global__ void dgt_block_mean_abs_f32(const float* __restrict__ x, u64 n, u64 block_elems,
                                                  u64 nblocks, double* __restrict__ out) {
    block_mean_abs(LoadF32{x}, n, block_elems, nblocks, out);
}
