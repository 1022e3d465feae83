//! Finding non-finite values (NaN, ±inf) in tensors and payloads, and per-key counters.
//!
//! The roles check every value that enters a sum or a step (docs/algorithms.md, "Non-finite
//! values"); these are the scans they use, and [`KeyCounts`] is how a process tallies events per
//! key for its report.

use std::collections::BTreeMap;
use std::sync::Mutex;

use geomx_kernels::{Layout, PayloadHeader, ValueType, HEADER_LEN};
use geomx_net::PayloadCodec;

/// Number of NaN or ±inf values in `x`.
pub fn count_nonfinite(x: &[f32]) -> usize {
    x.iter().filter(|v| !v.is_finite()).count()
}

/// Number of NaN or ±inf values in a dense or sparse payload of a key of `n` elements, read from
/// the encoded bytes (no decode): raw f32 (`DenseF32`) or a codec payload (`Raw`). A payload that
/// does not parse counts 0 (its decoder rejects it).
pub fn payload_nonfinite(codec: PayloadCodec, bytes: &[u8], n: usize) -> usize {
    match codec {
        PayloadCodec::DenseF32 => count_f32_bytes(bytes),
        PayloadCodec::Raw => {
            let Ok(h) = PayloadHeader::parse(bytes, 0, n) else {
                return 0;
            };
            let body = &bytes[HEADER_LEN..];
            let values = match h.layout {
                Layout::Dense => body,
                Layout::Sparse => body.get(4 * h.count as usize..).unwrap_or_default(),
            };
            match h.value_type {
                ValueType::F32 => count_f32_bytes(values),
                ValueType::F16 => count_16(values, 0x7C00),
                ValueType::Bf16 => count_16(values, 0x7F80),
            }
        }
        _ => 0,
    }
}

fn count_f32_bytes(b: &[u8]) -> usize {
    b.chunks_exact(4)
        .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000)
        .count()
}

/// Counts 16-bit values whose exponent field (`mask`) is all ones.
fn count_16(b: &[u8], mask: u16) -> usize {
    b.chunks_exact(2)
        .filter(|c| u16::from_le_bytes([c[0], c[1]]) & mask == mask)
        .count()
}

/// Replaces the first value of a payload (raw f32, or a dense or sparse codec payload) with
/// NaN: the fault `train.inject_nan` injects. Payloads without values are left alone.
pub fn poison_first(codec: PayloadCodec, bytes: &mut [u8]) {
    let (values, nan): (usize, &[u8]) = match (codec, bytes.get(1).copied()) {
        (PayloadCodec::DenseF32, _) => (0, &[0x00, 0x00, 0xC0, 0x7F]),
        (PayloadCodec::Raw, Some(vt)) => match ValueType::from_u8(vt) {
            Some(ValueType::F32) => (HEADER_LEN, &[0x00, 0x00, 0xC0, 0x7F]),
            Some(ValueType::F16) => (HEADER_LEN, &[0x00, 0x7E]),
            Some(ValueType::Bf16) => (HEADER_LEN, &[0xC0, 0x7F]),
            None => return,
        },
        _ => return,
    };
    // A sparse payload's values follow its `count` u32 indices (header bytes 8..12).
    let at = match (codec, bytes.first(), bytes.get(8..12)) {
        (PayloadCodec::Raw, Some(&l), Some(c)) if l == Layout::Sparse as u8 => {
            let count = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
            if count == 0 {
                return;
            }
            values + 4 * count
        }
        _ => values,
    };
    if let Some(dst) = bytes.get_mut(at..at + nan.len()) {
        dst.copy_from_slice(nan);
    }
}

/// Event counts per key, shared by a process's threads (e.g. FP16 / BF16 overflows).
#[derive(Debug, Default)]
pub struct KeyCounts(Mutex<BTreeMap<u64, u64>>);

impl KeyCounts {
    /// Adds `n` events to `key` (nothing for 0).
    pub fn add(&self, key: usize, n: usize) {
        if n > 0 {
            *crate::lock(&self.0).entry(key as u64).or_default() += n as u64;
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<u64, u64> {
        crate::lock(&self.0).clone()
    }

    /// The sum of all counts.
    pub fn total(&self) -> u64 {
        crate::lock(&self.0).values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_values;
    use geomx_kernels::{Scaling, SparseVec};

    /// The byte-level scan agrees with decoding and counting, for every layout and value type.
    #[test]
    fn payload_scans_agree_with_decoded_values() {
        let x = [
            1.0f32,
            f32::NAN,
            -3.0,
            f32::INFINITY,
            1.0e6,
            -0.0,
            f32::NEG_INFINITY,
        ];
        for (vt, scaling) in [
            (ValueType::F32, Scaling::None),
            (ValueType::F16, Scaling::None),
            (ValueType::F16, Scaling::Pow2),
            (ValueType::Bf16, Scaling::None),
        ] {
            let e = encode_values(&x, vt, scaling);
            let back = crate::codec::decode_values(e.codec, &e.bytes, 0, x.len()).unwrap();
            assert_eq!(
                payload_nonfinite(e.codec, &e.bytes, x.len()),
                count_nonfinite(&back),
                "{vt:?} {scaling:?}"
            );
        }
        let s = SparseVec::new(10, vec![2, 5, 9], vec![f32::NAN, 1.0, f32::INFINITY]).unwrap();
        for vt in [ValueType::F32, ValueType::F16, ValueType::Bf16] {
            let mut b = Vec::new();
            s.encode(vt, Scaling::Pow2, &mut b);
            assert_eq!(payload_nonfinite(PayloadCodec::Raw, &b, 10), 2, "{vt:?}");
        }
        assert_eq!(payload_nonfinite(PayloadCodec::Raw, &[1, 2, 3], 10), 0);
        assert_eq!(
            count_nonfinite(&[0.0, -0.0, f32::MAX, f32::MIN_POSITIVE]),
            0
        );
    }

    #[test]
    fn poisoning_makes_exactly_the_first_value_nan() {
        let x = [1.0f32, 2.0, 3.0];
        for (vt, scaling) in [
            (ValueType::F32, Scaling::None),
            (ValueType::F16, Scaling::Pow2),
            (ValueType::Bf16, Scaling::None),
        ] {
            let mut e = encode_values(&x, vt, scaling);
            poison_first(e.codec, &mut e.bytes);
            let back = crate::codec::decode_values(e.codec, &e.bytes, 0, 3).unwrap();
            assert!(back[0].is_nan(), "{vt:?}");
            assert_eq!(&back[1..], &x[1..], "{vt:?}");
        }
        let mut short = vec![0u8; 2];
        poison_first(PayloadCodec::DenseF32, &mut short);
        assert_eq!(short, vec![0, 0]);
        // Sparse payloads: the first value, not an index; an empty one stays as it is.
        for (vt, values) in [
            (ValueType::F32, vec![2.0f32, -5.0]),
            (ValueType::F16, vec![2.0, -5.0]),
        ] {
            let s = geomx_kernels::SparseVec::new(8, vec![1, 6], values).unwrap();
            let mut bytes = Vec::new();
            s.encode(vt, Scaling::None, &mut bytes);
            poison_first(PayloadCodec::Raw, &mut bytes);
            let back = crate::codec::decode_any(&bytes, 0, 8).unwrap();
            assert!(back[1].is_nan(), "{vt:?}");
            assert_eq!(back[6], -5.0, "{vt:?}");
            assert_eq!(back.iter().filter(|v| **v == 0.0).count(), 6, "{vt:?}");
        }
        let empty = geomx_kernels::SparseVec::new(8, vec![], vec![]).unwrap();
        let mut bytes = Vec::new();
        empty.encode(ValueType::F32, Scaling::None, &mut bytes);
        let before = bytes.clone();
        poison_first(PayloadCodec::Raw, &mut bytes);
        assert_eq!(bytes, before);
    }

    #[test]
    fn key_counts_add_up() {
        let c = KeyCounts::default();
        c.add(3, 2);
        c.add(3, 1);
        c.add(1, 0);
        c.add(0, 5);
        assert_eq!(
            c.snapshot().into_iter().collect::<Vec<_>>(),
            vec![(0, 5), (3, 3)]
        );
        assert_eq!(c.total(), 8);
    }
}
