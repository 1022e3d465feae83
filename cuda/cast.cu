// fp32 <-> fp16 / bf16 casts, bit-exact with /work/shared/specs/compression.md
// ("FP16 and BF16 transmission") and with geomx-kernels' CPU casts.
//
// Everything is integer arithmetic on the bit patterns: no hardware conversion instruction, so the
// NaN rules (quiet NaN with the same sign and the top mantissa bits kept) and the overflow rule
// (>= 65520 becomes inf, never saturates) hold on every architecture.
//
// Launch: 1-D grid, any size; every kernel is a grid-stride loop with 64-bit indices, so element
// counts above 2^32 work. The kernels need 16-byte aligned f32 and 8-byte aligned u16 buffers,
// which whole cudarc allocations are (the host API only takes whole allocations).

__device__ __forceinline__ u16 f32_bits_to_f16_bits(u32 x) {
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 a = x & 0x7FFFFFFFu;
    // Fast path, one unsigned compare: 2^-14 <= |x| < 65520 gives a normal half. Rebias the
    // exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    if (a - 0x38800000u < 0x477FF000u - 0x38800000u) {
        const u32 m = a - 0x38000000u;
        return (u16)(sign | ((m + 0x0FFFu + ((m >> 13) & 1u)) >> 13));
    }
    if (a > 0x7F800000u) {
        // NaN: quiet, same sign, top 10 mantissa bits kept.
        return (u16)(sign | 0x7C00u | 0x0200u | ((x & 0x007FFFFFu) >> 13));
    }
    if (a >= 0x477FF000u) {
        // |x| >= 65520 (or inf): IEEE overflow to inf.
        return (u16)(sign | 0x7C00u);
    }
    if (a <= 0x33000000u) {
        // |x| <= 2^-25 (f32 subnormals included): +-0; exactly 2^-25 is a tie that goes to even 0.
        return (u16)sign;
    }
    // 2^-25 < |x| < 2^-14: subnormal half, unit 2^-24. value = sig * 2^(e - 150).
    const u32 e = a >> 23;                       // 102..112
    const u32 sig = (a & 0x007FFFFFu) | 0x00800000u;
    const u32 shift = 126u - e;                  // 14..24
    u32 q = sig >> shift;
    const u32 rem = sig & ((1u << shift) - 1u);
    const u32 halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) {
        q += 1u;                                 // may carry into 0x400 = 2^-14, which is right
    }
    return (u16)(sign | q);
}

__device__ __forceinline__ u32 f16_bits_to_f32_bits(u16 hbits) {
    const u32 h = (u32)hbits;
    const u32 sign = (h & 0x8000u) << 16;
    const u32 exp = (h >> 10) & 0x1Fu;
    const u32 man = h & 0x03FFu;
    if (exp == 0x1Fu) {
        // inf stays inf; NaN widens quiet with its payload (as the `half` crate and F16C do).
        return man == 0u ? (sign | 0x7F800000u) : (sign | 0x7FC00000u | (man << 13));
    }
    if (exp == 0u) {
        if (man == 0u) {
            return sign;
        }
        // Subnormal half man * 2^-24: normalise. p = index of the leading one (0..9).
        const u32 p = 31u - (u32)__clz(man);
        return sign | ((p + 103u) << 23) | ((man << (23u - p)) & 0x007FFFFFu);
    }
    return sign | ((exp + 112u) << 23) | (man << 13);
}

__device__ __forceinline__ u16 f32_bits_to_bf16_bits(u32 x) {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return (u16)((x >> 16) | 0x0040u);
    }
    return (u16)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ u32 bf16_bits_to_f32_bits(u16 b) {
    return ((u32)b) << 16;
}


// ---- kernels: 4 elements per step (16-byte f32 loads, 8-byte u16 stores), then the tail ----

__device__ __forceinline__ uint2 pack4(u16 a, u16 b, u16 c, u16 d) {
    return make_uint2((u32)a | ((u32)b << 16), (u32)c | ((u32)d << 16));
}

extern "C" __global__ void cast_f32_to_f16(const float* __restrict__ src, u16* __restrict__ dst, u64 n) {
    const u64 n4 = n / 4;
    const uint4* s4 = (const uint4*)src;
    uint2* d4 = (uint2*)dst;
    GRID_STRIDE(i, n4) {
        const uint4 v = s4[i];
        d4[i] = pack4(f32_bits_to_f16_bits(v.x), f32_bits_to_f16_bits(v.y),
                      f32_bits_to_f16_bits(v.z), f32_bits_to_f16_bits(v.w));
    }
    GRID_STRIDE(j, n - n4 * 4) {
        const u64 i = n4 * 4 + j;
        dst[i] = f32_bits_to_f16_bits(__float_as_uint(src[i]));
    }
}

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ src, u16* __restrict__ dst, u64 n) {
    const u64 n4 = n / 4;
    const uint4* s4 = (const uint4*)src;
    uint2* d4 = (uint2*)dst;
    GRID_STRIDE(i, n4) {
        const uint4 v = s4[i];
        d4[i] = pack4(f32_bits_to_bf16_bits(v.x), f32_bits_to_bf16_bits(v.y),
                      f32_bits_to_bf16_bits(v.z), f32_bits_to_bf16_bits(v.w));
    }
    GRID_STRIDE(j, n - n4 * 4) {
        const u64 i = n4 * 4 + j;
        dst[i] = f32_bits_to_bf16_bits(__float_as_uint(src[i]));
    }
}

extern "C" __global__ void cast_f16_to_f32(const u16* __restrict__ src, float* __restrict__ dst, u64 n) {
    const u64 n4 = n / 4;
    const uint2* s4 = (const uint2*)src;
    uint4* d4 = (uint4*)dst;
    GRID_STRIDE(i, n4) {
        const uint2 v = s4[i];
        d4[i] = make_uint4(f16_bits_to_f32_bits((u16)(v.x & 0xFFFFu)), f16_bits_to_f32_bits((u16)(v.x >> 16)),
                           f16_bits_to_f32_bits((u16)(v.y & 0xFFFFu)), f16_bits_to_f32_bits((u16)(v.y >> 16)));
    }
    GRID_STRIDE(j, n - n4 * 4) {
        const u64 i = n4 * 4 + j;
        dst[i] = __uint_as_float(f16_bits_to_f32_bits(src[i]));
    }
}

extern "C" __global__ void cast_bf16_to_f32(const u16* __restrict__ src, float* __restrict__ dst, u64 n) {
    const u64 n4 = n / 4;
    const uint2* s4 = (const uint2*)src;
    uint4* d4 = (uint4*)dst;
    GRID_STRIDE(i, n4) {
        const uint2 v = s4[i];
        d4[i] = make_uint4(v.x << 16, v.x & 0xFFFF0000u, v.y << 16, v.y & 0xFFFF0000u);
    }
    GRID_STRIDE(j, n - n4 * 4) {
        const u64 i = n4 * 4 + j;
        dst[i] = __uint_as_float(bf16_bits_to_f32_bits(src[i]));
    }
}

// ---- segmented kernels: one launch for every key of a model ----------------------------------
//
// A flat buffer holds several tensors back to back; segment s is [offsets[s], offsets[s + 1]).
// Grid: x blocks stride over a segment, y = the segment (base + blockIdx.y, so more than 65,535
// segments take several launches).

// Per segment, the largest abs_key (|x| bits; NaN above inf), as the CPU's max_abs_key. `out`
// must hold zeros before the launch.
extern "C" __global__ void max_abs_key_segments(const float* __restrict__ x, const u64* __restrict__ offsets,
                                                u32* __restrict__ out, u32 base) {
    const u32 s = base + blockIdx.y;
    const u64 lo = offsets[s];
    const u64 hi = offsets[s + 1];
    u32 m = 0u;
    for (u64 i = lo + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < hi; i += (u64)blockDim.x * gridDim.x) {
        m = max(m, abs_key(x[i]));
    }
    for (int off = 16; off > 0; off >>= 1) {
        m = max(m, __shfl_down_sync(0xFFFFFFFFu, m, off));
    }
    if ((threadIdx.x & 31) == 0 && m != 0u) {
        atomicMax(&out[s], m);
    }
}

// Per segment, FP16 bits of (x * a) * b with a = factors[2s], b = factors[2s + 1] (the CPU's pow2
// scaling: two exact powers of two, each product rounded as on the host), or of x itself when
// a = b = 1 (no multiplication, so NaN payloads are kept as the unscaled CPU cast keeps them).
extern "C" __global__ void cast_f32_to_f16_scaled_segments(const float* __restrict__ x, u16* __restrict__ dst,
                                                           const u64* __restrict__ offsets,
                                                           const float* __restrict__ factors, u32 base) {
    const u32 s = base + blockIdx.y;
    const u64 lo = offsets[s];
    const u64 hi = offsets[s + 1];
    const float a = factors[2 * (u64)s];
    const float b = factors[2 * (u64)s + 1];
    const bool scaled = a != 1.0f || b != 1.0f;
    for (u64 i = lo + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < hi; i += (u64)blockDim.x * gridDim.x) {
        const float v = scaled ? __fmul_rn(__fmul_rn(x[i], a), b) : x[i];
        dst[i] = f32_bits_to_f16_bits(__float_as_uint(v));
    }
}
