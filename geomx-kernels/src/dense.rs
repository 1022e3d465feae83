//! Dense payloads: f32, FP16 or BF16 values after the codec header, with optional `pow2` scaling.
//!
//! `pow2` (FP16 only): the sender picks e with max|x|·2^e ∈ [2^14, 2^15) (e = 0 when the maximum is
//! 0 or non-finite), sends FP16(x·2^e) and e; the receiver multiplies the widened values by 2^-e.
//! Scaling by a power of two is exact in the f32 normal range, so it adds no rounding of its own.

use crate::cast::{self, Pow2};
use crate::error::{check_u32_len, DecodeError, KernelError};
use crate::wire::{Layout, PayloadHeader, ValueType, HEADER_LEN};

/// Scaling applied to 16-bit payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scaling {
    /// Values are sent as they are.
    None,
    /// Power-of-two scaling into [2^14, 2^15) (applies to FP16; BF16 and f32 are never scaled).
    #[default]
    Pow2,
}

/// What a dense encode did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseStats {
    /// The scale exponent written into the header.
    pub scale_exp: i16,
    /// Number of non-finite values on the wire (overflow to ±inf or NaN inputs).
    pub nonfinite: usize,
}

/// Magnitude key of an f32: its bits with the sign cleared. Ordering keys as integers is the total
/// order on |x| (`total_cmp`), with NaN above +inf.
#[inline(always)]
pub(crate) fn abs_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

#[inline(always)]
fn max_key_body(x: &[f32]) -> u32 {
    let mut lanes = [0i32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            lanes[j] = lanes[j].max(abs_key(c[j]) as i32);
        }
    }
    let mut m = lanes.iter().copied().max().unwrap_or(0) as u32;
    for &v in chunks.remainder() {
        m = m.max(abs_key(v));
    }
    m
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_key_avx2(x: &[f32]) -> u32 {
    max_key_body(x)
}

/// Largest magnitude key in `x` (0 for an empty slice).
pub fn max_abs_key(x: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { max_key_avx2(x) };
    }
    max_key_body(x)
}

/// The `pow2` exponent for a maximum magnitude key: max·2^e ∈ [2^14, 2^15), or 0 when the maximum
/// is zero or non-finite.
pub fn pow2_exponent(max_key: u32) -> i16 {
    if max_key == 0 || max_key >= 0x7F80_0000 {
        return 0;
    }
    let floor_log2 = if max_key >= 0x0080_0000 {
        (max_key >> 23) as i32 - 127
    } else {
        (31 - max_key.leading_zeros() as i32) - 149
    };
    (14 - floor_log2) as i16
}

/// Encodes `x` as a dense payload of `value_type`, replacing the contents of `out`.
///
/// `scaling` applies to FP16 only. Fails only if `x` has more than `u32::MAX` elements.
pub fn encode_dense(
    x: &[f32],
    value_type: ValueType,
    scaling: Scaling,
    out: &mut Vec<u8>,
) -> Result<DenseStats, KernelError> {
    let n = check_u32_len(x.len())?;
    let scale_exp = match (value_type, scaling) {
        (ValueType::F16, Scaling::Pow2) => pow2_exponent(max_abs_key(x)),
        _ => 0,
    };
    let header = PayloadHeader {
        layout: Layout::Dense,
        value_type,
        scale_exp,
        n_total: n,
        count: n,
    };
    out.clear();
    out.resize(header.payload_len(), 0);
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    let body = &mut out[HEADER_LEN..];
    let nonfinite = match value_type {
        ValueType::F32 => {
            for (d, &v) in body.chunks_exact_mut(4).zip(x) {
                d.copy_from_slice(&v.to_le_bytes());
            }
            x.iter().filter(|v| !v.is_finite()).count()
        }
        ValueType::F16 => cast::narrow_f16(
            x,
            Pow2::new(i32::from(scale_exp)).filter(|_| scale_exp != 0),
            body,
        ),
        ValueType::Bf16 => cast::f32_to_bf16_bytes(x, body),
    };
    Ok(DenseStats {
        scale_exp,
        nonfinite,
    })
}

/// Decodes a dense payload for key `key` into `out` (whose length is the key's length).
pub fn decode_dense_into(
    bytes: &[u8],
    key: u64,
    out: &mut [f32],
) -> Result<PayloadHeader, DecodeError> {
    let h = PayloadHeader::parse(bytes, key, out.len())?;
    if h.layout != Layout::Dense {
        return Err(DecodeError::WrongLayout {
            key,
            expected: Layout::Dense.name(),
            got: h.layout.name(),
        });
    }
    let body = &bytes[HEADER_LEN..];
    match h.value_type {
        ValueType::F32 => {
            for (d, s) in out.iter_mut().zip(body.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        ValueType::F16 => widen_scaled(body, h.scale_exp, out),
        ValueType::Bf16 => {
            cast::bf16_bytes_to_f32(body, out);
            unscale_slow(h.scale_exp, out);
        }
    }
    Ok(h)
}

/// Decodes a dense payload into a new vector of length `expected_n`.
pub fn decode_dense(bytes: &[u8], key: u64, expected_n: usize) -> Result<Vec<f32>, DecodeError> {
    // Validate before allocating: a hostile header must not make us allocate.
    PayloadHeader::parse(bytes, key, expected_n)?;
    let mut out = vec![0.0; expected_n];
    decode_dense_into(bytes, key, &mut out)?;
    Ok(out)
}

/// Widens FP16 bytes and multiplies by 2^-scale_exp.
pub(crate) fn widen_scaled(body: &[u8], scale_exp: i16, out: &mut [f32]) {
    let e = -i32::from(scale_exp);
    if e == 0 {
        cast::widen_f16(body, None, out);
    } else if (-126..=127).contains(&e) {
        // One exact multiplication in the normal range (rounded only if the result is subnormal).
        cast::widen_f16(body, Pow2::new(e), out);
    } else {
        cast::widen_f16(body, None, out);
        unscale_slow(scale_exp, out);
    }
}

/// Multiplies by 2^-scale_exp with a single rounding (through f64), for rare extreme exponents.
pub(crate) fn unscale_slow(scale_exp: i16, out: &mut [f32]) {
    if scale_exp == 0 {
        return;
    }
    let f = 2f64.powi(-i32::from(scale_exp));
    for v in out.iter_mut() {
        *v = (f64::from(*v) * f) as f32;
    }
}

/// Scales a single widened value by 2^-scale_exp (exactly as [`decode_dense_into`] does).
pub(crate) fn unscale_one(x: f32, scale_exp: i16) -> f32 {
    let e = -i32::from(scale_exp);
    if e == 0 {
        x
    } else if (-126..=127).contains(&e) {
        x * f32::from_bits(((e + 127) as u32) << 23)
    } else {
        (f64::from(x) * 2f64.powi(e)) as f32
    }
}
