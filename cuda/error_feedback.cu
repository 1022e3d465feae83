// Error feedback / momentum correction (DGC), spec compression.md "Push at the local server" step 2:
// u <- m*u + g (u <- g when m == 0), v <- v + u, in f32 without FMA contraction (bit-equal to the
// CPU). The fused variant with the first radix-select pass lives in topk.cu (`ef_update_hist`);
// `ef_update_count_ge` fuses the update with the sampled mode's threshold test
// (count of i with v_i != 0 and |v_i| >= t, under the total order of |v|).

extern "C" __global__ void ef_update(float* __restrict__ u, float* __restrict__ v, const float* __restrict__ g,
                                     float m, u64 n) {
    GRID_STRIDE(i, n) {
        const float un = (m == 0.0f) ? g[i] : __fadd_rn(__fmul_rn(m, u[i]), g[i]);
        u[i] = un;
        v[i] = __fadd_rn(v[i], un);
    }
}

extern "C" __global__ void ef_update_count_ge(float* __restrict__ u, float* __restrict__ v,
                                              const float* __restrict__ g, float m, u64 n, u32 t_key,
                                              u64* __restrict__ count) {
    __shared__ u64 scratch[32];
    u64 c = 0ull;
    GRID_STRIDE(i, n) {
        const float un = (m == 0.0f) ? g[i] : __fadd_rn(__fmul_rn(m, u[i]), g[i]);
        u[i] = un;
        const float vn = __fadd_rn(v[i], un);
        v[i] = vn;
        const u32 key = abs_key(vn);
        c += (key != 0u && key >= t_key) ? 1ull : 0ull;
    }
    c = block_sum(c, scratch);
    if (threadIdx.x == 0 && c != 0ull) {
        atomicAdd(count, c);
    }
}
