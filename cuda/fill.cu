// Deterministic test-pattern generators for tests and benchmarks, so that multi-GiB inputs are made
// at memory speed on the device instead of being copied from the host. Each element depends only
// on (seed, index) through splitmix64; geomx-kernels' `cuda::fill` mirrors the formulas on the CPU.

__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// dst[i] = low 32 bits of splitmix64(seed ^ i): every f32 bit pattern (NaNs, subnormals, inf).
extern "C" __global__ void fill_bits(u32* __restrict__ dst, u64 n, u64 seed) {
    GRID_STRIDE(i, n) { dst[i] = (u32)splitmix64(seed ^ i); }
}

// dst[i] = (top 24 bits of splitmix64(seed ^ i)) * 2^-23 - 1: uniform in [-1, 1), exact in f32.
extern "C" __global__ void fill_uniform(float* __restrict__ dst, u64 n, u64 seed) {
    GRID_STRIDE(i, n) {
        dst[i] = (float)(splitmix64(seed ^ i) >> 40) * 1.1920928955078125e-07f - 1.0f;
    }
}
