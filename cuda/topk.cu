// Exact top-k of |v| by radix select, with ordered compaction.
// Spec: /work/shared/specs/compression.md, "Selection" (exact mode): order |v| descending under the
// total order of f32 (NaN above +inf), ties by ascending index, zeros never selected; if fewer than
// k non-zeros exist, all of them. Output in ascending index order, values moved (v_i <- 0, u_i <- 0).
//
// Pipeline (all on one stream, no host round trip until the final count):
//   1. topk_hist pass 0/1/2: histograms of 11/11/10-bit digits of abs_key(v) among non-zero keys
//      whose higher digits match the prefix found so far (ef_update_hist fuses pass 0 with the
//      error-feedback update);
//   2. topk_select after each pass: one block picks the digit holding the k-th largest key, so
//      after pass 2 the state holds T (the k-th key) and need = how many keys equal to T to take;
//   3. topk_chunk_counts: per chunk of CHUNK elements, #(key > T) and #(key == T);
//   4. topk_scan_counts: exclusive prefix sums of those (one block);
//   5. topk_compact: each chunk re-scans its elements in index order; an element is selected if
//      key > T, or key == T and fewer than `need` equal keys precede it (lower indices win). Its
//      output slot is (#greater before it) + min(#equal before it, need): ascending index order.
//
// State (u64[8]): 0 k, 1 k_rem, 2 prefix, 3 nnz, 4 T, 5 need, 6 count, 7 done.

#define HIST_BINS 2048
#define CHUNK_TILES 16
#define TILE 256
#define CHUNK (CHUNK_TILES * TILE)

__device__ __forceinline__ void pass_params(u32 pass, u32* shift, u32* digit_mask, u32* hi_mask) {
    if (pass == 0u) {
        *shift = 21u; *digit_mask = 0x7FFu; *hi_mask = 0u;
    } else if (pass == 1u) {
        *shift = 10u; *digit_mask = 0x7FFu; *hi_mask = 0xFFE00000u;
    } else {
        *shift = 0u; *digit_mask = 0x3FFu; *hi_mask = 0xFFFFFC00u;
    }
}

// Per-thread run-length counter in front of the shared histogram: consecutive keys of a thread
// that fall into the same bin cost one shared atomic, so constant or clustered data does not
// serialise on a single bin. `flush` must be called once at the end.
struct BinRun {
    u32 bin;
    u32 count;
    __device__ __forceinline__ void add(u32* sh, u32 b) {
        if (b == bin) {
            ++count;
        } else {
            if (count != 0u) atomicAdd(&sh[bin], count);
            bin = b;
            count = 1u;
        }
    }
    __device__ __forceinline__ void flush(u32* sh) {
        if (count != 0u) atomicAdd(&sh[bin], count);
        count = 0u;
    }
};

__device__ __forceinline__ void hist_add(BinRun& run, u32* sh, u32 key, u32 shift, u32 digit_mask, u32 hi_mask,
                                         u32 prefix) {
    if (key != 0u && (key & hi_mask) == prefix) {
        run.add(sh, (key >> shift) & digit_mask);
    }
}

__device__ __forceinline__ void hist_flush(u32* sh, u64* hist) {
    __syncthreads();
    for (u32 b = threadIdx.x; b < HIST_BINS; b += blockDim.x) {
        if (sh[b] != 0u) {
            atomicAdd(&hist[b], (u64)sh[b]);
        }
    }
}

__device__ __forceinline__ void hist_clear(u32* sh) {
    for (u32 b = threadIdx.x; b < HIST_BINS; b += blockDim.x) {
        sh[b] = 0u;
    }
    __syncthreads();
}

// The host sizes the grid so that no block sees 2^32 elements (the shared counters are u32).
extern "C" __global__ void topk_hist(const float* __restrict__ v, u64 n, const u64* __restrict__ state,
                                     u64* __restrict__ hist, u32 pass) {
    __shared__ u32 sh[HIST_BINS];
    if (pass > 0u && state[7] != 0u) {
        return;  // fewer than k non-zeros: everything non-zero is selected, no more passes
    }
    u32 shift, digit_mask, hi_mask;
    pass_params(pass, &shift, &digit_mask, &hi_mask);
    const u32 prefix = (u32)state[2];
    hist_clear(sh);
    const u64 n4 = n / 4;
    const uint4* v4 = (const uint4*)v;
    BinRun run = {0u, 0u};
    GRID_STRIDE(i, n4) {
        const uint4 x = v4[i];
        hist_add(run, sh, x.x & 0x7FFFFFFFu, shift, digit_mask, hi_mask, prefix);
        hist_add(run, sh, x.y & 0x7FFFFFFFu, shift, digit_mask, hi_mask, prefix);
        hist_add(run, sh, x.z & 0x7FFFFFFFu, shift, digit_mask, hi_mask, prefix);
        hist_add(run, sh, x.w & 0x7FFFFFFFu, shift, digit_mask, hi_mask, prefix);
    }
    GRID_STRIDE(j, n - n4 * 4) {
        hist_add(run, sh, abs_key(v[n4 * 4 + j]), shift, digit_mask, hi_mask, prefix);
    }
    run.flush(sh);
    hist_flush(sh, hist);
}

// Error feedback fused with radix pass 0: u <- m*u + g (u <- g when m == 0), v <- v + u, and the
// pass-0 histogram of the new v. No FMA contraction, so results equal the CPU's f32 arithmetic.
extern "C" __global__ void ef_update_hist(float* __restrict__ u, float* __restrict__ v, const float* __restrict__ g,
                                          float m, u64 n, u64* __restrict__ hist) {
    __shared__ u32 sh[HIST_BINS];
    hist_clear(sh);
    BinRun run = {0u, 0u};
    GRID_STRIDE(i, n) {
        const float un = (m == 0.0f) ? g[i] : __fadd_rn(__fmul_rn(m, u[i]), g[i]);
        u[i] = un;
        const float vn = __fadd_rn(v[i], un);
        v[i] = vn;
        hist_add(run, sh, abs_key(vn), 21u, 0x7FFu, 0u, 0u);
    }
    run.flush(sh);
    hist_flush(sh, hist);
}

// One block of 1024 threads. Reads the pass histogram, updates the state, clears the histogram.
extern "C" __global__ void topk_select(u64* __restrict__ hist, u64* __restrict__ state, u32 pass) {
    __shared__ u64 suffix[1024];
    __shared__ u64 st[8];
    const u32 t = threadIdx.x;
    if (t < 8u) {
        st[t] = state[t];
    }
    __syncthreads();
    const u32 nbins = (pass == 2u) ? 1024u : 2048u;
    const u32 per = nbins / 1024u;
    const u32 lo = t * per;
    if (pass > 0u && st[7] != 0u) {
        for (u32 b = lo; b < lo + per; ++b) hist[b] = 0ull;
        return;
    }
    u32 shift, digit_mask, hi_mask;
    pass_params(pass, &shift, &digit_mask, &hi_mask);
    u64 local = 0ull;
    for (u32 b = lo; b < lo + per; ++b) local += hist[b];
    suffix[t] = local;
    // Inclusive suffix sum over threads: suffix[t] = sum of bins owned by threads >= t.
    for (u32 off = 1u; off < 1024u; off <<= 1) {
        __syncthreads();
        const u64 add = (t + off < 1024u) ? suffix[t + off] : 0ull;
        __syncthreads();
        suffix[t] += add;
    }
    __syncthreads();
    const u64 total = suffix[0];
    const u64 k = st[0];
    if (pass == 0u && total <= k) {
        // At most k non-zeros: select all of them (T = 0, need = 0 selects exactly key > 0).
        if (t == 0u) {
            state[3] = total; state[4] = 0ull; state[5] = 0ull; state[6] = total; state[7] = 1ull;
        }
    } else {
        const u64 k_rem = (pass == 0u) ? k : st[1];
        const u64 incl = suffix[t];
        const u64 above = incl - local;
        if (above < k_rem && k_rem <= incl) {
            u64 c = above;
            for (int b = (int)(lo + per) - 1; b >= (int)lo; --b) {
                const u64 h = hist[b];
                if (c + h >= k_rem) {
                    const u64 rem = k_rem - c;
                    const u64 prefix = (pass == 0u ? 0ull : st[2]) | ((u64)b << shift);
                    state[1] = rem;
                    state[2] = prefix;
                    if (pass == 0u) state[3] = total;
                    if (pass == 2u) {
                        state[4] = prefix; state[5] = rem; state[6] = k;
                    }
                    break;
                }
                c += h;
            }
        }
    }
    __syncthreads();
    for (u32 b = lo; b < lo + per; ++b) hist[b] = 0ull;
}

// counts[2c] = #(key > T), counts[2c + 1] = #(key == T) in chunk c. Block size TILE.
extern "C" __global__ void topk_chunk_counts(const float* __restrict__ v, u64 n, const u64* __restrict__ state,
                                             u64* __restrict__ counts, u64 nchunks) {
    __shared__ u64 scratch[32];
    const u32 T = (u32)state[4];
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        u64 gt = 0ull, eq = 0ull;
        const u64 base = c * (u64)CHUNK;
#pragma unroll
        for (u32 t = 0; t < CHUNK_TILES; ++t) {
            const u64 i = base + (u64)t * TILE + threadIdx.x;
            if (i < n) {
                const u32 key = abs_key(v[i]);
                gt += (key > T) ? 1ull : 0ull;
                eq += (key == T) ? 1ull : 0ull;
            }
        }
        gt = block_sum(gt, scratch);
        eq = block_sum(eq, scratch);
        if (threadIdx.x == 0) {
            counts[2 * c] = gt;
            counts[2 * c + 1] = eq;
        }
    }
}

// In place: counts (pairs) become exclusive prefix sums over chunks. One block of 1024 threads.
extern "C" __global__ void topk_scan_counts(u64* __restrict__ counts, u64 nchunks) {
    __shared__ u64 sgt[1024];
    __shared__ u64 seq[1024];
    const u32 t = threadIdx.x;
    const u64 per = (nchunks + 1023ull) / 1024ull;
    const u64 lo = (u64)t * per;
    const u64 hi = (lo + per < nchunks) ? lo + per : nchunks;
    u64 gt = 0ull, eq = 0ull;
    for (u64 c = lo; c < hi; ++c) {
        gt += counts[2 * c];
        eq += counts[2 * c + 1];
    }
    sgt[t] = gt;
    seq[t] = eq;
    for (u32 off = 1u; off < 1024u; off <<= 1) {
        __syncthreads();
        const u64 ag = (t >= off) ? sgt[t - off] : 0ull;
        const u64 ae = (t >= off) ? seq[t - off] : 0ull;
        __syncthreads();
        sgt[t] += ag;
        seq[t] += ae;
    }
    __syncthreads();
    u64 rg = sgt[t] - gt, re = seq[t] - eq;  // exclusive
    for (u64 c = lo; c < hi; ++c) {
        const u64 g0 = counts[2 * c], e0 = counts[2 * c + 1];
        counts[2 * c] = rg;
        counts[2 * c + 1] = re;
        rg += g0;
        re += e0;
    }
}

// Block size TILE (8 warps). `move_values` != 0: selected v_i (and u_i when u is not null) become 0.
extern "C" __global__ void topk_compact(float* __restrict__ v, float* __restrict__ u, u64 n,
                                        const u64* __restrict__ state, const u64* __restrict__ prefix,
                                        u64 nchunks, u64* __restrict__ out_idx, float* __restrict__ out_val,
                                        u32 move_values) {
    __shared__ u32 wgt[TILE / 32];
    __shared__ u32 weq[TILE / 32];
    const u32 T = (u32)state[4];
    const u64 need = state[5];
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 lt_mask = (1u << lane) - 1u;
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        u64 gt_base = prefix[2 * c];
        u64 eq_base = prefix[2 * c + 1];
        // Load the whole chunk first (16 independent loads in flight per thread), then scan it.
        float xs[CHUNK_TILES];
#pragma unroll
        for (u32 tile = 0; tile < CHUNK_TILES; ++tile) {
            const u64 i = c * (u64)CHUNK + (u64)tile * TILE + threadIdx.x;
            xs[tile] = (i < n) ? v[i] : 0.0f;
        }
#pragma unroll
        for (u32 tile = 0; tile < CHUNK_TILES; ++tile) {
            const u64 i = c * (u64)CHUNK + (u64)tile * TILE + threadIdx.x;
            const bool in = i < n;
            const float x = xs[tile];
            const u32 key = abs_key(x);
            const bool is_gt = in && key > T;
            const bool is_eq = in && key == T;
            const u32 bgt = __ballot_sync(0xFFFFFFFFu, is_gt);
            const u32 beq = __ballot_sync(0xFFFFFFFFu, is_eq);
            __syncthreads();
            if (lane == 0u) {
                wgt[warp] = __popc(bgt);
                weq[warp] = __popc(beq);
            }
            __syncthreads();
            u32 off_gt = 0u, off_eq = 0u, tile_gt = 0u, tile_eq = 0u;
            for (u32 w = 0; w < TILE / 32; ++w) {
                if (w < warp) {
                    off_gt += wgt[w];
                    off_eq += weq[w];
                }
                tile_gt += wgt[w];
                tile_eq += weq[w];
            }
            const u64 gt_before = gt_base + off_gt + __popc(bgt & lt_mask);
            const u64 eq_before = eq_base + off_eq + __popc(beq & lt_mask);
            if (is_gt || (is_eq && eq_before < need)) {
                const u64 pos = gt_before + (eq_before < need ? eq_before : need);
                out_idx[pos] = i;
                out_val[pos] = x;
                if (move_values) {
                    v[i] = 0.0f;
                    if (u != 0) u[i] = 0.0f;
                }
            }
            gt_base += tile_gt;
            eq_base += tile_eq;
        }
    }
}
