//! Payload layouts of the HiPS messages carried by geomx-net frames.
//!
//! | Message | key | version | offset / total | codec | payload |
//! |---|---|---|---|---|---|
//! | worker → local `Push` | key | round r | 0 / key length | DenseF32 | mean gradient g_i |
//! | local → worker reply | key | r + 1 | | DenseF32 | θ_{r+1} of the key |
//! | local → global `Push` | range id | round r | range offset / key length | Raw | [`UpPush`] |
//! | global → local reply | range id | r + 1 | | DenseF32 | θ_{r+1} of the range |
//! | `Pull` (both tiers) | key or range id | min version | | — | empty |

use super::AggError;

/// Little-endian f32 bytes of `v`.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
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
    /// Encodes as `count` (u32 LE) followed by the f32 values.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.sum.len() * 4);
        out.extend_from_slice(&self.count.to_le_bytes());
        for x in &self.sum {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
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
        let b = p.encode();
        assert_eq!(UpPush::decode(&b, 7, 2).unwrap(), p);
        assert!(UpPush::decode(&b, 7, 3).is_err());
        assert!(UpPush::decode(&b[..3], 7, 2).is_err());
        assert!(UpPush::decode(&b[..9], 7, 2).is_err());
    }
}
