//! Payload layouts of the HiPS messages carried by geomx-net frames.
//!
//! | Message | key | version | offset / total | codec | payload |
//! |---|---|---|---|---|---|
//! | worker → local `Push` | key | round r | 0 / key length | DenseF32 | mean gradient g_i |
//! | local → worker reply | key | r + 1 | | DenseF32 | θ_{r+1} of the key |
//! | local → global `Push` | range id | round r | range offset / key length | Raw | [`UpPush`] |
//! | global → local reply | range id | r + 1 | | DenseF32 | θ_{r+1} of the range |
//! | `Pull` (both tiers) | key or range id | min version | | — | empty |

use std::borrow::Cow;

use super::AggError;

/// Little-endian f32 bytes of `v`: borrowed without a copy on little-endian machines.
pub fn f32_bytes(v: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(zerocopy::IntoBytes::as_bytes(v))
    } else {
        Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// Decodes little-endian f32 values; `None` if the length is not a multiple of 4.
pub fn f32_from_bytes(b: &[u8]) -> Option<Vec<f32>> {
    if b.len() % 4 != 0 {
        return None;
    }
    Some(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Upper-tier push: a DC's sum over `count` workers for one range.
#[derive(Debug, Clone, PartialEq)]
pub struct UpPush {
    /// Workers whose gradients the sum holds (n_d in FSA).
    pub count: u32,
    /// s_d for the range.
    pub sum: Vec<f32>,
}

impl UpPush {
    /// Encodes `count` (u32 LE) followed by the f32 values of `sum`, in one allocation.
    pub fn encode(count: u32, sum: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + sum.len() * 4);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&f32_bytes(sum));
        out
    }

    /// Encodes `count` (u32 LE) followed by a codec payload (compressed tiers).
    pub fn encode_coded(count: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Decodes a payload written by [`UpPush::encode_coded`] (dense or sparse codec payload) into
    /// dense values of a range of `expected` elements.
    pub fn decode_coded(b: &[u8], range: usize, expected: usize) -> Result<Self, String> {
        if b.len() < 4 {
            return Err(format!("range {range}: push of {} bytes", b.len()));
        }
        let count = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let sum = super::codec::decode_any(&b[4..], range, expected)?;
        Ok(Self { count, sum })
    }

    /// Decodes a payload written by [`UpPush::encode`] for a range of `expected` elements.
    pub fn decode(b: &[u8], range: usize, expected: usize) -> Result<Self, AggError> {
        let bad = |got| AggError::LengthMismatch {
            key: range,
            expected,
            got,
        };
        if b.len() < 4 {
            return Err(bad(0));
        }
        let count = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let sum = f32_from_bytes(&b[4..]).ok_or(bad((b.len() - 4) / 4))?;
        if sum.len() != expected {
            return Err(bad(sum.len()));
        }
        Ok(Self { count, sum })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_roundtrip_keeps_bits() {
        let v = vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e38];
        let back = f32_from_bytes(&f32_bytes(&v)).unwrap();
        let manual: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(&*f32_bytes(&v), &manual[..]);
        assert_eq!(
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(f32_from_bytes(&[0; 5]), None);
    }

    #[test]
    fn up_push_roundtrip_and_rejects_bad_lengths() {
        let p = UpPush {
            count: 3,
            sum: vec![1.0, 2.0],
        };
        let b = UpPush::encode(p.count, &p.sum);
        assert_eq!(UpPush::decode(&b, 7, 2).unwrap(), p);
        assert!(UpPush::decode(&b, 7, 3).is_err());
        assert!(UpPush::decode(&b[..3], 7, 2).is_err());
        assert!(UpPush::decode(&b[..9], 7, 2).is_err());
    }
}
