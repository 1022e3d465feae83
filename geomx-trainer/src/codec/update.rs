//! The sparse update message of a Bi-Sparse range: the non-zero entries of a gradient (the global
//! sum G on the inter tier, the mean ḡ on the intra tier), dense θ on resynchronisation rounds,
//! and whether the global tier dropped the round (non-finite values under `nonfinite = "skip"`).
//!
//! Layout: `flags u8` (bit 0: θ present, bit 1: skipped; other bits zero), `len u32` of the
//! sparse payload, the sparse codec payload, then (if present) θ as a dense f32 codec payload. A
//! skipped update carries no entries.

use geomx_kernels::{decode_dense, encode_dense, Scaling, SparseVec, ValueType};

/// Flag bit: dense θ follows the sparse payload.
const HAS_THETA: u8 = 1;
/// Flag bit: the round was dropped; no optimizer step.
const SKIPPED: u8 = 2;

/// An update's parts, unvalidated: flags, the sparse payload and the optional θ payload.
type Parts<'a> = (u8, &'a [u8], Option<&'a [u8]>);

/// A decoded sparse update.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Sparse gradient (empty when skipped).
    pub grad: SparseVec,
    /// Dense θ_{r+1} (resynchronisation rounds).
    pub theta: Option<Vec<f32>>,
    /// The round was dropped everywhere: replicas do not step.
    pub skipped: bool,
}

impl Update {
    /// Encodes an update from an already encoded sparse payload, optional θ and the skip flag.
    pub fn encode_parts(sparse: &[u8], theta: Option<&[f32]>, skipped: bool) -> Vec<u8> {
        let _codec = crate::clock::span();
        let mut out = Vec::with_capacity(5 + sparse.len());
        let flags = if theta.is_some() { HAS_THETA } else { 0 } | if skipped { SKIPPED } else { 0 };
        out.push(flags);
        out.extend_from_slice(&(sparse.len() as u32).to_le_bytes());
        out.extend_from_slice(sparse);
        if let Some(t) = theta {
            let mut dense = Vec::new();
            if let Err(e) = encode_dense(t, ValueType::F32, Scaling::None, &mut dense) {
                tracing::error!(error = %e, "dense encode refused");
            }
            out.extend_from_slice(&dense);
        }
        out
    }

    /// Encodes `grad` with values of `vt` (and `scaling`), θ if given, and the skip flag.
    pub fn encode(
        grad: &SparseVec,
        vt: ValueType,
        scaling: Scaling,
        theta: Option<&[f32]>,
        skipped: bool,
    ) -> Vec<u8> {
        let _codec = crate::clock::span();
        let mut sparse = Vec::new();
        grad.encode(vt, scaling, &mut sparse);
        Self::encode_parts(&sparse, theta, skipped)
    }

    /// Splits an update into its sparse payload and optional dense θ payload, unvalidated.
    pub(crate) fn split(b: &[u8], key: usize) -> Result<(&[u8], Option<&[u8]>), String> {
        let (_, sparse, theta) = Self::split_flags(b, key)?;
        Ok((sparse, theta))
    }

    fn split_flags(b: &[u8], key: usize) -> Result<Parts<'_>, String> {
        let bad = || format!("key {key}: malformed update of {} bytes", b.len());
        if b.len() < 5 || b[0] & !(HAS_THETA | SKIPPED) != 0 {
            return Err(bad());
        }
        let len = u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize;
        let rest = &b[5..];
        if len > rest.len() {
            return Err(bad());
        }
        let (sparse, theta) = rest.split_at(len);
        match (b[0] & HAS_THETA != 0, theta.is_empty()) {
            (false, true) => Ok((b[0], sparse, None)),
            (true, false) => Ok((b[0], sparse, Some(theta))),
            _ => Err(bad()),
        }
    }

    /// Decodes an update for a key (or range) of `n` elements; every part is validated.
    pub fn decode(b: &[u8], key: usize, n: usize) -> Result<Self, String> {
        let _codec = crate::clock::span();
        let (flags, sparse, theta) = Self::split_flags(b, key)?;
        let grad = SparseVec::decode(sparse, key as u64, n).map_err(|e| e.to_string())?;
        let skipped = flags & SKIPPED != 0;
        if skipped && !grad.is_empty() {
            return Err(format!(
                "key {key}: a skipped update with {} entries",
                grad.count()
            ));
        }
        let theta = theta
            .map(|t| decode_dense(t, key as u64, n).map_err(|e| e.to_string()))
            .transpose()?;
        Ok(Self {
            grad,
            theta,
            skipped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_round_trip_and_rejects_malformed() {
        let g = SparseVec::new(10, vec![1, 7], vec![0.5, -2.0]).unwrap();
        let theta: Vec<f32> = (0..10).map(|i| i as f32).collect();
        for t in [None, Some(&theta[..])] {
            let b = Update::encode(&g, ValueType::F32, Scaling::None, t, false);
            let u = Update::decode(&b, 4, 10).unwrap();
            assert_eq!(u.grad, g);
            assert_eq!(u.theta.as_deref(), t);
            assert!(!u.skipped);
            assert!(Update::decode(&b, 4, 11).is_err());
            assert!(Update::decode(&b[..b.len() - 1], 4, 10).is_err());
        }
        let mut flipped = Update::encode(&g, ValueType::F32, Scaling::None, None, false);
        flipped[0] = 1;
        assert!(Update::decode(&flipped, 4, 10).is_err());
        flipped[0] = 4;
        assert!(Update::decode(&flipped, 4, 10).is_err());
        assert!(Update::decode(&[7, 0, 0, 0, 0], 4, 10).is_err());
    }

    #[test]
    fn skipped_updates_carry_no_entries() {
        let empty = SparseVec::new(10, vec![], vec![]).unwrap();
        let theta = vec![1.0f32; 10];
        let b = Update::encode(&empty, ValueType::F16, Scaling::Pow2, Some(&theta), true);
        let u = Update::decode(&b, 0, 10).unwrap();
        assert!(u.skipped && u.grad.is_empty());
        assert_eq!(u.theta.as_deref(), Some(&theta[..]));
        let g = SparseVec::new(10, vec![3], vec![1.0]).unwrap();
        let bad = Update::encode(&g, ValueType::F32, Scaling::None, None, true);
        assert!(Update::decode(&bad, 0, 10).is_err());
    }
}
