//! f32 ↔ FP16 (IEEE binary16) and f32 ↔ BF16 conversions, round to nearest, ties to even.
//!
//! Scalar functions ([`f32_to_f16`], [`f16_to_f32`], [`f32_to_bf16`], [`bf16_to_f32`]) are the
//! bit-level definitions of `specs/compression.md`:
//!
//! - f32 → f16: RNE; magnitudes ≥ 65520 and ±inf give ±inf; magnitudes ≤ 2^-25 give ±0;
//!   NaN gives `sign | 0x7C00 | 0x0200 | (mantissa >> 13)` (a quiet NaN of the same sign).
//! - f16 → f32: exact; a NaN keeps sign and payload and is made quiet (bit 22 set), as the x86
//!   F16C instruction does.
//! - f32 → bf16: NaN gives `(bits >> 16) | 0x0040`; otherwise `(bits + 0x7FFF + lsb) >> 16`.
//! - bf16 → f32: `bits << 16` (exact, payload and signalling bit kept).
//!
//! The slice kernels use F16C when the CPU has it (detected at run time) and the
//! scalar definitions otherwise; both give identical bits. 16-bit slices are little-endian byte
//! buffers, the wire format.

/// Largest f32 bit pattern (magnitude) that still rounds to a finite half: just below 65520.
const F16_OVERFLOW: u32 = 0x477F_F000; // 65520.0
/// Smallest magnitude of a normal half (2^-14).
const F16_MIN_NORMAL: u32 = 0x3880_0000;
/// 2^-25: this magnitude and anything below rounds to zero.
const F16_HALF_MIN_SUB: u32 = 0x3300_0000;

/// Converts an f32 to FP16 bits (round to nearest, ties to even; spec NaN/overflow rules).
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = bits & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return sign | 0x7E00 | ((a >> 13) & 0x03FF) as u16;
    }
    if a >= F16_OVERFLOW {
        return sign | 0x7C00;
    }
    if a >= F16_MIN_NORMAL {
        // Rebias the exponent (127 → 15) and round the 13 dropped mantissa bits.
        let rebased = a - ((127 - 15) << 23);
        let rounded = rebased + 0x0FFF + ((rebased >> 13) & 1);
        return sign | (rounded >> 13) as u16;
    }
    if a <= F16_HALF_MIN_SUB {
        return sign;
    }
    // Subnormal half: value = m · 2^(e - 150), unit 2^-24, so shift m right by 126 - e.
    let e = a >> 23;
    let m = (a & 0x007F_FFFF) | 0x0080_0000;
    let shift = 126 - e; // 14..=24
    let q = m >> shift;
    let rem = m & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let q = if rem > half || (rem == half && (q & 1) == 1) {
        q + 1
    } else {
        q
    };
    sign | q as u16
}

/// Widens FP16 bits to f32 exactly (NaN: same sign and payload, made quiet).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x03FF) as u32;
    let bits = if exp == 0x1F {
        if man == 0 {
            sign | 0x7F80_0000
        } else {
            sign | 0x7FC0_0000 | (man << 13)
        }
    } else if exp != 0 {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    } else if man == 0 {
        sign
    } else {
        // Subnormal: man · 2^-24, normalise.
        let lz = man.leading_zeros() - 21; // leading zeros within the 10-bit field, + 1
        let man = (man << lz) & 0x03FF;
        let exp = 127 - 15 + 1 - lz;
        sign | (exp << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// Converts an f32 to BF16 bits (round to nearest, ties to even; NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        ((bits >> 16) | 0x0040) as u16
    } else {
        ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
    }
}

/// Widens BF16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A power-of-two factor applied before narrowing or after widening.
///
/// Stored as two factors so that every exponent the `pow2` scaling can produce is exact in f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Pow2 {
    a: f32,
    b: f32,
}

impl Pow2 {
    /// 2^e as two f32 factors, or `None` when e ∉ [-252, 254] (outside the representable range).
    pub(crate) fn new(e: i32) -> Option<Pow2> {
        if !(-252..=254).contains(&e) {
            return None;
        }
        let e1 = e.clamp(-126, 127);
        let e2 = e - e1;
        Some(Pow2 {
            a: pow2_f32(e1),
            b: pow2_f32(e2),
        })
    }

    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        x * self.a * self.b
    }

    /// The two factors, applied as `(x·a)·b` (the CUDA encoder takes them as arguments).
    #[cfg(feature = "cuda")]
    pub(crate) fn factors(self) -> (f32, f32) {
        (self.a, self.b)
    }
}

/// 2^e for e in [-126, 127].
fn pow2_f32(e: i32) -> f32 {
    debug_assert!((-126..=127).contains(&e));
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Narrows `src` into FP16, writing 2 bytes per element (little-endian) into `dst`.
///
/// Returns the number of non-finite halves written.
///
/// # Panics
/// If `dst.len() != 2 * src.len()`.
pub fn f32_to_f16_bytes(src: &[f32], dst: &mut [u8]) -> usize {
    assert_eq!(dst.len(), 2 * src.len(), "f16 destination length");
    narrow_f16(src, None, dst)
}

/// Narrows `src` into FP16 bits in `dst`. Returns the number of non-finite halves written.
///
/// # Panics
/// If the lengths differ.
pub fn f32_to_f16_slice(src: &[f32], dst: &mut [u16]) -> usize {
    assert_eq!(dst.len(), src.len(), "f16 destination length");
    #[cfg(target_endian = "little")]
    {
        // SAFETY: u8 has alignment 1 and the u16 slice covers exactly 2·len initialised bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), 2 * dst.len()) };
        narrow_f16(src, None, bytes)
    }
    #[cfg(not(target_endian = "little"))]
    {
        let mut nonfinite = 0;
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32_to_f16(s);
            nonfinite += (*d & 0x7C00 == 0x7C00) as usize;
        }
        nonfinite
    }
}

/// Widens FP16 bits in `src` into `dst`.
///
/// # Panics
/// If the lengths differ.
pub fn f16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len(), "f16 source length");
    #[cfg(target_endian = "little")]
    {
        // SAFETY: u8 has alignment 1 and the u16 slice covers exactly 2·len initialised bytes.
        let bytes = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), 2 * src.len()) };
        widen_f16(bytes, None, dst);
    }
    #[cfg(not(target_endian = "little"))]
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16_to_f32(s);
    }
}

/// Widens little-endian FP16 bytes into `dst`.
///
/// # Panics
/// If `src.len() != 2 * dst.len()`.
pub fn f16_bytes_to_f32(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len(), "f16 source length");
    widen_f16(src, None, dst);
}

/// Narrows `src` into little-endian BF16 bytes. Returns the number of non-finite outputs.
///
/// # Panics
/// If `dst.len() != 2 * src.len()`.
pub fn f32_to_bf16_bytes(src: &[f32], dst: &mut [u8]) -> usize {
    assert_eq!(dst.len(), 2 * src.len(), "bf16 destination length");
    // Convert in blocks through a u16 buffer so the vectorised slice kernel does the work.
    let mut buf = [0u16; 1024];
    let mut nonfinite = 0;
    for (s, d) in src.chunks(1024).zip(dst.chunks_mut(2048)) {
        let b = &mut buf[..s.len()];
        nonfinite += f32_to_bf16_slice(s, b);
        for (o, h) in d.chunks_exact_mut(2).zip(b.iter()) {
            o.copy_from_slice(&h.to_le_bytes());
        }
    }
    nonfinite
}

/// Narrows `src` into BF16 bits. Returns the number of non-finite outputs.
///
/// # Panics
/// If the lengths differ.
pub fn f32_to_bf16_slice(src: &[f32], dst: &mut [u16]) -> usize {
    assert_eq!(dst.len(), src.len(), "bf16 destination length");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { bf16_narrow_avx2(src, dst) };
    }
    bf16_narrow_body(src, dst)
}

/// Branch-free form of [`f32_to_bf16`] over a slice (auto-vectorised).
#[inline(always)]
fn bf16_narrow_body(src: &[f32], dst: &mut [u16]) -> usize {
    let mut nonfinite = 0u32;
    for (d, &s) in dst.iter_mut().zip(src) {
        let bits = s.to_bits();
        let nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000;
        let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
        let quiet = (bits >> 16) | 0x0040;
        let h = if nan { quiet } else { rounded } as u16;
        nonfinite += u32::from(h & 0x7F80 == 0x7F80);
        *d = h;
    }
    nonfinite as usize
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bf16_narrow_avx2(src: &[f32], dst: &mut [u16]) -> usize {
    bf16_narrow_body(src, dst)
}

/// Widens little-endian BF16 bytes into `dst`.
///
/// # Panics
/// If `src.len() != 2 * dst.len()`.
pub fn bf16_bytes_to_f32(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len(), "bf16 source length");
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16_to_f32(u16::from_le_bytes([s[0], s[1]]));
    }
}

/// Widens BF16 bits into `dst`.
///
/// # Panics
/// If the lengths differ.
pub fn bf16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len(), "bf16 source length");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(s);
    }
}

/// Narrows `src·scale` into FP16 little-endian bytes; returns the count of non-finite halves.
///
/// # Panics
/// If `dst.len() != 2 * src.len()` (checked in every build: the F16C loop indexes by `src`).
pub(crate) fn narrow_f16(src: &[f32], scale: Option<Pow2>, dst: &mut [u8]) -> usize {
    assert_eq!(dst.len(), 2 * src.len(), "f16 destination length");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU supports F16C and AVX2 (checked above).
            return unsafe { x86::narrow_f16_f16c(src, scale, dst) };
        }
    }
    narrow_f16_portable(src, scale, dst)
}

/// Portable narrowing (the scalar definition applied per element).
pub(crate) fn narrow_f16_portable(src: &[f32], scale: Option<Pow2>, dst: &mut [u8]) -> usize {
    let mut nonfinite = 0usize;
    for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
        let x = match scale {
            Some(p) => p.apply(s),
            None => s,
        };
        let h = f32_to_f16(x);
        nonfinite += (h & 0x7C00 == 0x7C00) as usize;
        d.copy_from_slice(&h.to_le_bytes());
    }
    nonfinite
}

/// Widens FP16 little-endian bytes into `dst`, multiplying by `scale` if given.
///
/// # Panics
/// If `src.len() != 2 * dst.len()` (checked in every build: the F16C loop indexes by `dst`).
pub(crate) fn widen_f16(src: &[u8], scale: Option<Pow2>, dst: &mut [f32]) {
    assert_eq!(src.len(), 2 * dst.len(), "f16 source length");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU supports F16C and AVX2 (checked above).
            return unsafe { x86::widen_f16_f16c(src, scale, dst) };
        }
    }
    widen_f16_portable(src, scale, dst)
}

/// Portable widening.
pub(crate) fn widen_f16_portable(src: &[u8], scale: Option<Pow2>, dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        let x = f16_to_f32(u16::from_le_bytes([s[0], s[1]]));
        *d = match scale {
            Some(p) => p.apply(x),
            None => x,
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! F16C conversion loops, 8 lanes (AVX-512 intrinsics need Rust 1.89, above the MSRV; the
    //! loops are memory-bound anyway). Rounding is fixed to nearest-even by the immediate,
    //! independent of MXCSR; tails use the scalar definition.
    use super::{f16_to_f32, Pow2};
    use std::arch::x86_64::*;

    /// Round-to-nearest-even immediate (independent of MXCSR).
    const RNE_F16C: i32 = _MM_FROUND_TO_NEAREST_INT;

    /// Counts halves with an all-ones exponent (inf or NaN) among 8.
    #[inline]
    #[target_feature(enable = "sse2")]
    unsafe fn count_nonfinite_128(h: __m128i) -> u32 {
        let exp = _mm_set1_epi16(0x7C00);
        let eq = _mm_cmpeq_epi16(_mm_and_si128(h, exp), exp);
        (_mm_movemask_epi8(eq) as u32).count_ones() / 2
    }

    fn tail_narrow(src: &[f32], scale: Option<Pow2>, dst: &mut [u8]) -> usize {
        super::narrow_f16_portable(src, scale, dst)
    }

    fn tail_widen(src: &[u8], scale: Option<Pow2>, dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
            let x = f16_to_f32(u16::from_le_bytes([s[0], s[1]]));
            *d = match scale {
                Some(p) => p.apply(x),
                None => x,
            };
        }
    }

    /// # Safety
    /// The CPU must support F16C and AVX2; `dst.len() == 2 * src.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn narrow_f16_f16c(
        src: &[f32],
        scale: Option<Pow2>,
        dst: &mut [u8],
    ) -> usize {
        let n = src.len();
        let body = n - n % 8;
        let sp = src.as_ptr();
        let dp = dst.as_mut_ptr();
        let mut nonfinite = 0usize;
        let (a, b) = match scale {
            Some(p) => (p.a, p.b),
            None => (1.0, 1.0),
        };
        let va = _mm256_set1_ps(a);
        let vb = _mm256_set1_ps(b);
        let mut i = 0;
        while i < body {
            // SAFETY: i + 8 <= n, dst has 2n bytes.
            let mut x = unsafe { _mm256_loadu_ps(sp.add(i)) };
            if scale.is_some() {
                x = _mm256_mul_ps(_mm256_mul_ps(x, va), vb);
            }
            let h = _mm256_cvtps_ph::<RNE_F16C>(x);
            nonfinite += count_nonfinite_128(h) as usize;
            unsafe { _mm_storeu_si128(dp.add(2 * i).cast(), h) };
            i += 8;
        }
        nonfinite + tail_narrow(&src[body..], scale, &mut dst[2 * body..])
    }

    /// # Safety
    /// The CPU must support F16C and AVX2; `src.len() == 2 * dst.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen_f16_f16c(src: &[u8], scale: Option<Pow2>, dst: &mut [f32]) {
        let n = dst.len();
        let body = n - n % 8;
        let sp = src.as_ptr();
        let dp = dst.as_mut_ptr();
        let (a, b) = match scale {
            Some(p) => (p.a, p.b),
            None => (1.0, 1.0),
        };
        let va = _mm256_set1_ps(a);
        let vb = _mm256_set1_ps(b);
        let mut i = 0;
        while i < body {
            // SAFETY: i + 8 <= n, src has 2n bytes.
            let h = unsafe { _mm_loadu_si128(sp.add(2 * i).cast()) };
            let mut x = _mm256_cvtph_ps(h);
            if scale.is_some() {
                x = _mm256_mul_ps(_mm256_mul_ps(x, va), vb);
            }
            unsafe { _mm256_storeu_ps(dp.add(i), x) };
            i += 8;
        }
        tail_widen(&src[2 * body..], scale, &mut dst[body..]);
    }
}

/// Test hooks: run a specific implementation regardless of CPU detection.
#[cfg(test)]
pub(crate) mod paths {
    /// Portable f32 → f16 bytes.
    pub fn narrow_portable(src: &[f32], dst: &mut [u8]) -> usize {
        super::narrow_f16_portable(src, None, dst)
    }
    /// Portable f16 bytes → f32.
    pub fn widen_portable(src: &[u8], dst: &mut [f32]) {
        super::widen_f16_portable(src, None, dst)
    }
    /// F16C path, or `None` if the CPU lacks it.
    pub fn narrow_f16c(src: &[f32], dst: &mut [u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: features checked above.
            return Some(unsafe { super::x86::narrow_f16_f16c(src, None, dst) });
        }
        let _ = (src, dst);
        None
    }
    /// F16C widening path, or `None` if the CPU lacks it.
    pub fn widen_f16c(src: &[u8], dst: &mut [f32]) -> Option<()> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: features checked above.
            unsafe { super::x86::widen_f16_f16c(src, None, dst) };
            return Some(());
        }
        let _ = (src, dst);
        None
    }
}

#[cfg(test)]
#[path = "cast_tests.rs"]
pub(crate) mod tests;
