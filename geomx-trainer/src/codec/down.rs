//! The down path: how the global tier's answer for a range reaches the workers so that every
//! replica applies, bit for bit, what the global tier applied (docs/architecture.md, "One source
//! of truth per round").
//!
//! Each hop decodes what it received and re-encodes it, per range, with its own tier's codec; the
//! global server runs the same two encode–decode steps ([`dense_step`], [`sparse_mean`]) before it
//! applies anything, so it applies exactly the values the workers will decode. Because the
//! re-encoding is per range (a `pow2` scale is chosen per range, never per key), the global server
//! owning one range of a split key can reproduce it.
//!
//! A key of R > 1 ranges travels to the workers as R segments ([`join_segments`]).

use geomx_kernels::{topk_exact, SparseVec, TopkScratch, ValueType};
use geomx_net::PayloadCodec;

use super::{Encoded, TierCodec, Update};
use crate::config::SyncAlgorithm;

/// What the global tier answers for a range, and what a worker does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Both tiers carry f32 losslessly: the reply is θ_{r+1}, which replaces the replica's range
    /// (FSA and MixedSync with codec `none` on both tiers, and dense keys of `bisparse`).
    Theta,
    /// A tier is lossy (FP16, BF16, MPQ's small keys), or the algorithm moves a milestone (HFA,
    /// ESync): the reply is an increment, quantized through both tiers' codecs, that every holder
    /// (the global server included) adds to its copy.
    Delta,
    /// Bi-Sparse / MPQ keys of N ≥ T (FSA): the reply is the sparse global sum; every holder runs
    /// the same optimizer on the same quantized mean.
    Sparse,
}

impl ReplyMode {
    /// The mode of a key of `key_len` elements under `sync` with these tier codecs.
    pub fn of(sync: SyncAlgorithm, inter: &TierCodec, intra: &TierCodec, key_len: usize) -> Self {
        match sync {
            SyncAlgorithm::Hfa | SyncAlgorithm::Esync => ReplyMode::Delta,
            SyncAlgorithm::Fsa | SyncAlgorithm::Mixed => {
                if inter.is_sparse_key(key_len) {
                    ReplyMode::Sparse
                } else if inter.dense_type() == ValueType::F32
                    && intra.dense_type() == ValueType::F32
                {
                    ReplyMode::Theta
                } else {
                    ReplyMode::Delta
                }
            }
        }
    }
}

/// Joins per-range segments into one payload: a single segment as it is, several as
/// `u32 LE length` + segment each, in range order.
pub fn join_segments(segs: Vec<Vec<u8>>) -> Vec<u8> {
    if segs.len() == 1 {
        return segs.into_iter().next().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(segs.iter().map(|s| 4 + s.len()).sum());
    for s in segs {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(&s);
    }
    out
}

/// Splits a payload written by [`join_segments`] for `n` ranges of key `key`; the lengths must
/// cover the payload exactly.
pub fn split_segments(b: &[u8], n: usize, key: usize) -> Result<Vec<&[u8]>, String> {
    if n == 1 {
        return Ok(vec![b]);
    }
    let mut out = Vec::with_capacity(n);
    let mut rest = b;
    for i in 0..n {
        let bad = || {
            format!(
                "key {key}: segment {i} of {n} truncated ({} bytes)",
                b.len()
            )
        };
        let len = rest
            .get(..4)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .ok_or_else(bad)?;
        let seg = rest.get(4..4 + len).ok_or_else(bad)?;
        out.push(seg);
        rest = &rest[4 + len..];
    }
    if !rest.is_empty() {
        return Err(format!(
            "key {key}: {} bytes after {n} segments",
            rest.len()
        ));
    }
    Ok(out)
}

/// The dense values of a key of `key_len` elements from its segments ([`join_segments`]), one
/// per part (range id, offset, length) in offset order, each decoded with
/// `decode(segment, range id, length)`.
pub fn decode_dense_segments(
    bytes: &[u8],
    key: usize,
    key_len: usize,
    parts: &[(usize, usize, usize)],
    mut decode: impl FnMut(&[u8], usize, usize) -> Result<Vec<f32>, String>,
) -> Result<Vec<f32>, String> {
    let _codec = crate::clock::span();
    let segs = split_segments(bytes, parts.len(), key)?;
    let mut out = vec![0.0f32; key_len];
    for (seg, &(id, offset, len)) in segs.into_iter().zip(parts) {
        let dst = out
            .get_mut(offset..offset + len)
            .ok_or_else(|| format!("key {key}: range {id} outside the key"))?;
        dst.copy_from_slice(&decode(seg, id, len)?);
    }
    Ok(out)
}

/// An increment of one range on its way down: the inter-tier reply and what every holder adds.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseStep {
    /// The global server's reply (the increment in the inter codec).
    pub reply: Encoded,
    /// What the workers decode after the local server's re-encoding: the increment everyone adds.
    pub applied: Vec<f32>,
    /// Finite values that overflowed to ±inf in the two encodings.
    pub overflow: usize,
}

/// The global server's side of an increment `delta` of range `range`: encodes it with `inter`,
/// decodes it as the local server will, re-encodes that with `intra` ([`forward_dense`]) and
/// decodes it as the workers will.
pub fn dense_step(
    delta: &[f32],
    inter: &TierCodec,
    intra: &TierCodec,
    range: usize,
) -> Result<DenseStep, String> {
    let _codec = crate::clock::span();
    let reply = inter.encode_dense(delta);
    let at_local = inter.decode_dense(&reply.bytes, range, delta.len())?;
    to_workers(reply, &at_local, intra, range)
}

/// The rest of an increment's way down, shared by [`dense_step`] and [`sparse_step`]: the local
/// server re-encodes what it decoded (`at_local`) with the intra codec, and `applied` is what
/// the workers decode from that.
fn to_workers(
    reply: Encoded,
    at_local: &[f32],
    intra: &TierCodec,
    range: usize,
) -> Result<DenseStep, String> {
    let seg = forward_dense(at_local, intra);
    let applied = intra.decode_dense(&seg.bytes, range, at_local.len())?;
    let overflow = reply.overflow + seg.overflow;
    Ok(DenseStep {
        reply,
        applied,
        overflow,
    })
}

/// The global server's side of an increment `delta` of a range of a sparse key under a
/// milestone algorithm (HFA with Bi-Sparse or MPQ's large keys): the `k` entries largest in
/// magnitude (exact top-k; zeros are never sent) as a sparse codec payload in the inter tier's
/// sparse value type. The local server decodes it densely and forwards it like any dense
/// increment ([`forward_dense`]); `applied` is what the workers decode. The caller carries
/// `delta − applied` into the next increment: the down direction's error feedback.
pub fn sparse_step(
    delta: &[f32],
    k: usize,
    inter: &TierCodec,
    intra: &TierCodec,
    range: usize,
) -> Result<DenseStep, String> {
    let _codec = crate::clock::span();
    let mut idx = Vec::new();
    topk_exact(delta, k, &mut TopkScratch::default(), &mut idx).map_err(|e| e.to_string())?;
    let values = idx.iter().map(|&i| delta[i as usize]).collect();
    let sparse = SparseVec::new(delta.len() as u32, idx, values)
        .map_err(|e| format!("range {range}: {e}"))?;
    let mut bytes = Vec::new();
    let nonfinite = sparse.encode(inter.sparse_values(), inter.scaling(), &mut bytes);
    let up_overflow = nonfinite.saturating_sub(super::count_nonfinite(sparse.values()));
    let at_local = super::decode_any(&bytes, range, delta.len())?;
    let reply = Encoded {
        codec: PayloadCodec::Raw,
        bytes,
        overflow: up_overflow,
    };
    to_workers(reply, &at_local, intra, range)
}

/// The local server's segment for a dense range it decoded (`y`): `y` in the intra codec.
pub fn forward_dense(y: &[f32], intra: &TierCodec) -> Encoded {
    let _codec = crate::clock::span();
    intra.encode_dense(y)
}

/// The sparse payload of the mean ḡ = G / W that workers receive for a sparse range whose global
/// sum (as decoded from the inter tier) is `g`: values in the intra tier's type. Returns the
/// payload and the number of finite values that overflowed.
pub fn sparse_mean(g: &SparseVec, total_workers: u32, intra: &TierCodec) -> (Vec<u8>, usize) {
    let _codec = crate::clock::span();
    let mut mean = g.clone();
    mean.div_values(total_workers as f32);
    let mut out = Vec::new();
    let nonfinite = mean.encode(intra.sparse_values(), intra.scaling(), &mut out);
    let overflow = nonfinite.saturating_sub(super::count_nonfinite(mean.values()));
    (out, overflow)
}

/// The local server's segment for a sparse range: the decoded inter-tier [`Update`] `up` with its
/// sum turned into the intra-tier mean ([`sparse_mean`]), θ and the skip flag kept.
pub fn forward_sparse(up: &Update, total_workers: u32, intra: &TierCodec) -> (Vec<u8>, usize) {
    let _codec = crate::clock::span();
    let (mean, overflow) = sparse_mean(&up.grad, total_workers, intra);
    (
        Update::encode_parts(&mean, up.theta.as_deref(), up.skipped),
        overflow,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Codec, Fp16Codec, ScalingKind};

    fn tiers() -> Vec<TierCodec> {
        [
            Codec::None,
            Codec::Bf16,
            Codec::Fp16(Fp16Codec::default()),
            Codec::Fp16(Fp16Codec {
                scaling: ScalingKind::None,
            }),
        ]
        .iter()
        .map(|c| TierCodec::from_config(c, 1))
        .collect()
    }

    /// "Awkward" values over several binades (not short binary fractions).
    fn awkward(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
                ((h % 20_011) as f32 - 10_005.0) * 1.3e-7 * (1 + h % 97) as f32
            })
            .collect()
    }

    #[test]
    fn segments_round_trip_and_reject_bad_lengths() {
        let segs = vec![vec![1u8, 2, 3], vec![], vec![9u8; 7]];
        let b = join_segments(segs.clone());
        let back = split_segments(&b, 3, 0).unwrap();
        assert_eq!(back, segs.iter().map(|s| &s[..]).collect::<Vec<_>>());
        assert!(split_segments(&b, 2, 0).is_err());
        assert!(split_segments(&b, 4, 0).is_err());
        assert!(split_segments(&b[..b.len() - 1], 3, 0).is_err());
        let one = join_segments(vec![vec![5u8, 6]]);
        assert_eq!(one, vec![5, 6]);
        assert_eq!(split_segments(&one, 1, 0).unwrap(), vec![&[5u8, 6][..]]);
        // A length prefix pointing past the end is refused without panicking.
        let mut huge = (u32::MAX).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(split_segments(&huge, 2, 0).is_err());
    }

    /// The global server's `applied` equals, bit for bit, what a local server and a worker decode
    /// from the reply, for every pair of dense tier codecs; and an independent reference (the two
    /// casts applied element-wise with the `half` crate, FP16 without scaling) agrees.
    #[test]
    fn dense_step_is_what_the_workers_decode() {
        let delta = awkward(301, 7);
        for inter in tiers() {
            for intra in tiers() {
                let s = dense_step(&delta, &inter, &intra, 4).unwrap();
                let y = inter.decode_dense(&s.reply.bytes, 4, delta.len()).unwrap();
                let seg = forward_dense(&y, &intra);
                let z = intra.decode_dense(&seg.bytes, 4, delta.len()).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&z), bits(&s.applied), "{inter:?} {intra:?}");
                assert_eq!(s.overflow, 0);
            }
        }
        let none = TierCodec::default();
        let fp16 = TierCodec::from_config(
            &Codec::Fp16(Fp16Codec {
                scaling: ScalingKind::None,
            }),
            1,
        );
        let bf16 = TierCodec::from_config(&Codec::Bf16, 1);
        let s = dense_step(&delta, &fp16, &bf16, 0).unwrap();
        for (i, &d) in delta.iter().enumerate() {
            let want = half::bf16::from_f32(half::f16::from_f32(d).to_f32()).to_f32();
            assert_eq!(s.applied[i].to_bits(), want.to_bits(), "element {i}");
        }
        let exact = dense_step(&delta, &none, &none, 0).unwrap();
        assert_eq!(exact.applied, delta);
    }

    /// HFA's sparse increment: at most k entries, the largest in magnitude, zeros never sent;
    /// for every LAN codec `applied` is what a local server then a worker decode, and with f32
    /// sparse values the sent entries are δ's own.
    #[test]
    fn sparse_step_sends_the_k_largest_and_is_what_the_workers_decode() {
        let mut delta = awkward(200, 3);
        delta[10] = 0.0;
        delta[11] = -0.0;
        let codec = crate::config::Codec::Bisparse(crate::config::SparseCodec::default());
        let inter = TierCodec::from_config(&codec, 1);
        for intra in tiers() {
            let s = sparse_step(&delta, 12, &inter, &intra, 5).unwrap();
            assert_eq!(s.reply.codec, PayloadCodec::Raw);
            let y = crate::codec::decode_any(&s.reply.bytes, 5, delta.len()).unwrap();
            let sent: Vec<usize> = (0..y.len()).filter(|&i| y[i] != 0.0).collect();
            assert_eq!(sent.len(), 12, "{intra:?}");
            let smallest_sent = sent
                .iter()
                .map(|&i| delta[i].abs())
                .fold(f32::MAX, f32::min);
            for i in 0..delta.len() {
                if sent.contains(&i) {
                    assert_eq!(y[i].to_bits(), delta[i].to_bits());
                } else {
                    assert!(delta[i].abs() <= smallest_sent, "{i}");
                }
            }
            let seg = forward_dense(&y, &intra);
            let z = intra.decode_dense(&seg.bytes, 5, delta.len()).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&z), bits(&s.applied), "{intra:?}");
        }
        // Fewer non-zeros than k: all of them, nothing else.
        let few = [0.0, 2.5, 0.0, -1.0];
        let s = sparse_step(&few, 3, &inter, &TierCodec::default(), 0).unwrap();
        assert_eq!(s.applied, few.to_vec());
    }

    #[test]
    fn sparse_mean_forwarding_matches_the_global_computation() {
        let g = SparseVec::new(50, vec![0, 7, 49], vec![3.0e-3, -1.7, 9.1]).unwrap();
        for intra in tiers() {
            let (global, _) = sparse_mean(&g, 3, &intra);
            let up = Update {
                grad: g.clone(),
                theta: None,
                skipped: false,
            };
            let (seg, _) = forward_sparse(&up, 3, &intra);
            let worker = Update::decode(&seg, 0, 50).unwrap();
            let at_global = SparseVec::decode(&global, 0, 50).unwrap();
            assert_eq!(worker.grad, at_global, "{intra:?}");
        }
    }

    #[test]
    fn reply_modes_follow_the_codecs_and_the_algorithm() {
        let none = TierCodec::default();
        let fp16 = TierCodec::from_config(&Codec::Fp16(Fp16Codec::default()), 1);
        let bs = TierCodec::from_config(
            &Codec::Bisparse(crate::config::SparseCodec {
                min_size: 100,
                ..Default::default()
            }),
            1,
        );
        use SyncAlgorithm::*;
        assert_eq!(ReplyMode::of(Fsa, &none, &none, 10), ReplyMode::Theta);
        assert_eq!(ReplyMode::of(Mixed, &none, &fp16, 10), ReplyMode::Delta);
        assert_eq!(ReplyMode::of(Fsa, &fp16, &none, 10), ReplyMode::Delta);
        assert_eq!(ReplyMode::of(Fsa, &bs, &none, 10), ReplyMode::Theta);
        assert_eq!(ReplyMode::of(Fsa, &bs, &fp16, 100), ReplyMode::Sparse);
        assert_eq!(ReplyMode::of(Hfa, &none, &none, 10), ReplyMode::Delta);
        assert_eq!(ReplyMode::of(Esync, &none, &none, 10), ReplyMode::Delta);
    }
}
