//! Payload layouts of the HiPS messages carried by geomx-net frames (docs/wire-format.md, "HiPS
//! payloads").
//!
//! | Message | key | version | offset / total | codec | payload |
//! |---|---|---|---|---|---|
//! | worker → local `Push` | key | round r | 0 / key length | intra | gradient g_i (HFA: model) |
//! | local → worker reply | key | r + 1 | | see [`crate::codec::down`] | θ, segments or updates |
//! | local → global `Push` | range id | round r | range offset / key length | Raw | [`UpPush`] |
//! | global → local reply | range id | r + 1 | | see [`crate::codec::down`] | θ, increment or update |
//! | `Pull` (both tiers) | key or range id | min version | | — | empty; answered with f32 θ |

use super::AggError;

pub use crate::codec::{f32_bytes, f32_from_bytes};

/// Version of the HiPS payload layouts (docs/wire-format.md, "HiPS payloads"). It is part of the
/// job's configuration hash, so processes built with other layouts are refused at registration.
pub const PAYLOAD_VERSION: u32 = 2;

/// Pull key with which a restarted process asks its server to count it again: a worker its
/// local server (`resilience.lost_worker = "continue"`), a local server each global server
/// (`resilience.lost_dc = "continue"`, the version proposing a round). The reply's version is
/// the round it counts from; the payload is empty.
pub const REJOIN_KEY: u64 = u64::MAX - 1;

/// Push key with which a worker reports its training loss of round `version` to its local
/// server under `transport.dgt.adaptive_k`: the payload is the loss as one little-endian f64,
/// the reply is empty. The local server's DGT uplink sets its reliable share from the DC's mean.
pub const LOSS_KEY: u64 = u64::MAX - 2;

/// Flag bit of a pull's key at a global server: not θ but the reply of the round that made
/// `version` of range `key & !REPLY_FLAG`, which a restarted HFA global server keeps for the
/// round its checkpoint closed (`resilience.lost_global_server = "continue"`).
pub const REPLY_FLAG: u64 = 1 << 61;

/// Flag bit of a pull's key at a global server: not θ but its digest, [`crate::hash::values_hash`]
/// of range `key & !DIGEST_FLAG` at exactly `version` (8 little-endian bytes; an empty payload
/// when the range is at another version). A local server starting a fresh job makes θ_0 from
/// the model's seed and pulls θ_0 only for the ranges whose digest differs, so that a model's
/// start costs a digest per range across the WAN, not its parameters.
pub const DIGEST_FLAG: u64 = 1 << 60;

/// Flag bit of an up-push's count: the DC dropped this round under `train.nonfinite = "skip"`;
/// no values follow.
pub const SKIP_FLAG: u32 = 1 << 31;

/// Upper-tier push: a DC's sum over `count` workers for one range.
#[derive(Debug, Clone, PartialEq)]
pub struct UpPush {
    /// Workers whose gradients the sum holds (n_d in FSA).
    pub count: u32,
    /// s_d for the range, or `None` when the DC dropped the round.
    pub sum: Option<Vec<f32>>,
}

impl UpPush {
    /// Encodes `count` (u32 LE) followed by the f32 values of `sum`, in one allocation.
    pub fn encode(count: u32, sum: &[f32]) -> Vec<u8> {
        let _codec = crate::clock::span();
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

    /// Encodes a dropped round of a DC of `count` workers: the count with [`SKIP_FLAG`], nothing
    /// else.
    pub fn encode_skip(count: u32) -> Vec<u8> {
        (count | SKIP_FLAG).to_le_bytes().to_vec()
    }

    /// The count and, for a dropped round, `None` (the payload must then end after the count);
    /// otherwise the bytes after the count.
    fn split(b: &[u8], range: usize) -> Result<(u32, Option<&[u8]>), String> {
        let Some(c) = b.get(..4) else {
            return Err(format!("range {range}: push of {} bytes", b.len()));
        };
        let count = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if count & SKIP_FLAG == 0 {
            return Ok((count, Some(&b[4..])));
        }
        if b.len() != 4 {
            return Err(format!(
                "range {range}: dropped-round push with {} value bytes",
                b.len() - 4
            ));
        }
        Ok((count & !SKIP_FLAG, None))
    }

    /// Decodes a payload written by [`UpPush::encode_coded`] (dense or sparse codec payload) or
    /// [`UpPush::encode_skip`] into dense values of a range of `expected` elements.
    pub fn decode_coded(b: &[u8], range: usize, expected: usize) -> Result<Self, String> {
        let (count, body) = Self::split(b, range)?;
        let sum = body
            .map(|v| crate::codec::decode_any(v, range, expected))
            .transpose()?;
        Ok(Self { count, sum })
    }

    /// Decodes a payload written by [`UpPush::encode`] (or [`UpPush::encode_skip`]) for a range
    /// of `expected` elements.
    pub fn decode(b: &[u8], range: usize, expected: usize) -> Result<Self, AggError> {
        let _codec = crate::clock::span();
        let bad = |got| AggError::LengthMismatch {
            key: range,
            expected,
            got,
        };
        let (count, body) =
            Self::split(b, range).map_err(|_| bad(b.len().saturating_sub(4) / 4))?;
        let Some(body) = body else {
            return Ok(Self { count, sum: None });
        };
        let sum = f32_from_bytes(body).ok_or(bad(body.len() / 4))?;
        if sum.len() != expected {
            return Err(bad(sum.len()));
        }
        Ok(Self {
            count,
            sum: Some(sum),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_push_roundtrip_and_rejects_bad_lengths() {
        let p = UpPush {
            count: 3,
            sum: Some(vec![1.0, 2.0]),
        };
        let b = UpPush::encode(p.count, p.sum.as_deref().unwrap());
        assert_eq!(UpPush::decode(&b, 7, 2).unwrap(), p);
        assert!(UpPush::decode(&b, 7, 3).is_err());
        assert!(UpPush::decode(&b[..3], 7, 2).is_err());
        assert!(UpPush::decode(&b[..9], 7, 2).is_err());
    }

    #[test]
    fn dropped_rounds_carry_only_the_count() {
        let b = UpPush::encode_skip(5);
        let want = UpPush {
            count: 5,
            sum: None,
        };
        assert_eq!(UpPush::decode(&b, 1, 9).unwrap(), want);
        assert_eq!(UpPush::decode_coded(&b, 1, 9).unwrap(), want);
        let mut trailing = b.clone();
        trailing.extend_from_slice(&[0; 4]);
        assert!(UpPush::decode(&trailing, 1, 1).is_err());
        assert!(UpPush::decode_coded(&trailing, 1, 1).is_err());
    }
}
