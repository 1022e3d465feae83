// Sparse scatter-add into a dense f32 buffer (spec compression.md "Pull at the global server").
// One launch per sparse vector, in DC order: indices inside one vector are strictly ascending (the
// decoder checks it), so no two threads touch the same element and the result is bit-equal to the
// CPU's sequential `dense[base + idx] += val`. `base` places a u32-indexed range of a tensor above
// 2^32 elements. Out-of-range indices are skipped and counted in `bad` (never written).

extern "C" __global__ void scatter_add_f32(float* __restrict__ dense, u64 n, u64 base,
                                           const u32* __restrict__ idx, const float* __restrict__ val,
                                           u64 count, u64* __restrict__ bad) {
    GRID_STRIDE(j, count) {
        const u64 i = base + (u64)idx[j];
        if (i < n) {
            dense[i] = __fadd_rn(dense[i], val[j]);
        } else {
            atomicAdd(bad, 1ull);
        }
    }
}
