//! Tier codecs (docs/algorithms.md, "Compression"): which payload each key travels in, the dense
//! 16-bit payloads, the Bi-Sparse push state of a local server, the sparse update message, the
//! down path that makes every replica apply exactly what the global tier applied, and the
//! per-codec byte and overflow counters of the report.
//!
//! This module sits below both the model engines and the HiPS roles: it knows values and bytes,
//! not processes.
//!
//! | Tier / key | Push | Reply |
//! |---|---|---|
//! | `none` | dense f32 (`DenseF32`) | see [`down::ReplyMode`] |
//! | `fp16` / `bf16` | dense 16-bit codec payload (`Raw`) | see [`down::ReplyMode`] |
//! | `bisparse`/`mpq`, N < T | dense f32 (`bisparse`) or FP16 (`mpq`) | see [`down::ReplyMode`] |
//! | `bisparse`/`mpq`, N ≥ T | count + sparse top-k payload | [`Update`]: sparse sum (+ dense θ every R rounds) |
//! | intra `bisparse`, N ≥ T | the worker's own top-k ([`WorkerSparse`]) | as `none` |
//!
//! Pulls (start-up, the end of a run) always carry exact f32 θ.

pub mod bytes;
pub mod compressor;
pub mod down;
pub mod nonfinite;
pub mod update;
pub mod worker_sparse;

use geomx_kernels::{
    decode_dense, encode_dense, is_large, BiSparseConfig, Layout, SampledParams, Scaling,
    Selection, SparseVec, ValueType,
};
use geomx_net::PayloadCodec;

use crate::config::{
    Codec, DgtTransportConfig, ScalingKind, SelectionKind, SparseCodec, SparseValues,
    TransportConfig, TransportKind,
};

pub use bytes::{count_dense, count_payload, count_update, CodecBytes};
pub use compressor::RangeCompressor;
pub use nonfinite::{count_nonfinite, payload_nonfinite, poison_first, KeyCounts};
pub use update::Update;
pub use worker_sparse::WorkerSparse;

/// Little-endian f32 bytes of `v`: borrowed without a copy on little-endian machines.
pub fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(zerocopy::IntoBytes::as_bytes(v))
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
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

/// Sparse (Bi-Sparse / MPQ) settings of the inter tier.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseSpec {
    /// Push state configuration (density, warm-up in rounds, momentum, clipping, selection and
    /// the value type of sparse payloads).
    pub bisparse: BiSparseConfig,
    /// Keys of N ≥ `min_size` elements go sparse.
    pub min_size: usize,
    /// Dense type of the keys below `min_size`.
    pub small: ValueType,
    /// Dense θ resynchronisation every this many rounds (0: off).
    pub resync_every: u64,
}

/// The resolved codec of one tier.
#[derive(Debug, Clone, PartialEq)]
pub struct TierCodec {
    dense: ValueType,
    scaling: Scaling,
    sparse: Option<SparseSpec>,
    /// DGT settings when the tier's pushes travel by DGT (`transport.inter = "dgt"`).
    dgt: Option<DgtTransportConfig>,
}

impl Default for TierCodec {
    fn default() -> Self {
        Self {
            dense: ValueType::F32,
            scaling: Scaling::Pow2,
            sparse: None,
            dgt: None,
        }
    }
}

/// A dense payload and what its encoding did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The frame's payload codec: `DenseF32` (raw f32 bytes) or `Raw` (a codec payload).
    pub codec: PayloadCodec,
    /// The payload.
    pub bytes: Vec<u8>,
    /// Finite values that became ±inf on the wire (FP16 / BF16 overflow).
    pub overflow: usize,
}

impl TierCodec {
    /// Attaches the DGT settings when `transport.inter = "dgt"` (this is the inter tier's codec).
    pub fn with_transport(mut self, t: &TransportConfig) -> Self {
        self.dgt = (t.inter == TransportKind::Dgt).then(|| t.dgt.clone());
        self
    }

    /// The DGT settings of the tier's pushes, if they travel by DGT.
    pub fn dgt(&self) -> Option<&DgtTransportConfig> {
        self.dgt.as_ref()
    }

    /// Resolves `codec`; `batches_per_epoch` converts a sparse codec's warm-up epochs to rounds.
    pub fn from_config(codec: &Codec, batches_per_epoch: usize) -> Self {
        let sparse = |s: &SparseCodec, small: ValueType| SparseSpec {
            bisparse: BiSparseConfig {
                density: s.density,
                warmup_density: s.warmup_density,
                warmup_rounds: s.warmup_rounds(batches_per_epoch),
                momentum: s.momentum,
                clip_norm: s.clip,
                selection: match s.selection {
                    SelectionKind::Sampled => Selection::Sampled(SampledParams::default()),
                    SelectionKind::Exact => Selection::Exact,
                },
                value_type: match s.values {
                    SparseValues::F32 => ValueType::F32,
                    SparseValues::Fp16 => ValueType::F16,
                },
            },
            min_size: s.min_size,
            small,
            resync_every: s.resync_every,
        };
        let mut t = Self::default();
        match codec {
            Codec::Fp16(c) => {
                t.dense = ValueType::F16;
                t.scaling = match c.scaling {
                    ScalingKind::Pow2 => Scaling::Pow2,
                    ScalingKind::None => Scaling::None,
                };
            }
            Codec::Bf16 => t.dense = ValueType::Bf16,
            Codec::Bisparse(s) => t.sparse = Some(sparse(s, ValueType::F32)),
            Codec::Mpq(s) => t.sparse = Some(sparse(s, ValueType::F16)),
            _ => {}
        }
        t
    }

    /// Splits a worker tier's codec into what its replies travel in (this codec without its
    /// sparse part: exact f32 for `bisparse`) and the sparse settings of the workers' own pushes
    /// ([`WorkerSparse`]), if any.
    pub fn split_pushes(mut self) -> (TierCodec, Option<SparseSpec>) {
        let sparse = self.sparse.take();
        if let Some(s) = &sparse {
            self.dense = s.small;
        }
        (self, sparse)
    }

    /// True for plain dense f32 (the uncompressed wire).
    pub fn is_plain(&self) -> bool {
        self.dense == ValueType::F32 && self.sparse.is_none()
    }

    /// The sparse settings, if this tier is Bi-Sparse or MPQ.
    pub fn sparse(&self) -> Option<&SparseSpec> {
        self.sparse.as_ref()
    }

    /// Whether a key of `key_len` elements travels sparse (N ≥ T, MPQ's one boundary).
    pub fn is_sparse_key(&self, key_len: usize) -> bool {
        self.sparse
            .as_ref()
            .is_some_and(|s| is_large(key_len, s.min_size))
    }

    /// Value type of the keys this tier sends densely (for sparse codecs: those below T).
    pub fn dense_type(&self) -> ValueType {
        self.sparse.as_ref().map_or(self.dense, |s| s.small)
    }

    /// The frame codec of this tier's dense payloads: `DenseF32` for f32, else `Raw`.
    pub fn dense_codec(&self) -> PayloadCodec {
        if self.dense_type() == ValueType::F32 {
            PayloadCodec::DenseF32
        } else {
            PayloadCodec::Raw
        }
    }

    /// FP16 scaling of this tier's payloads.
    pub fn scaling(&self) -> Scaling {
        self.scaling
    }

    /// Value type of this tier's sparse values (f32 without a sparse codec).
    pub fn sparse_values(&self) -> ValueType {
        self.sparse
            .as_ref()
            .map_or(self.dense, |s| s.bisparse.value_type)
    }

    /// Whether the reply of `round` (θ_{round+1}) carries dense θ for resynchronisation.
    pub fn resync_due(&self, round: u64) -> bool {
        self.sparse
            .as_ref()
            .is_some_and(|s| s.resync_every > 0 && (round + 1) % s.resync_every == 0)
    }

    /// Encodes dense values: plain f32 as `DenseF32`, anything else as a codec payload (`Raw`).
    pub fn encode_dense(&self, x: &[f32]) -> Encoded {
        encode_values(x, self.dense_type(), self.scaling)
    }

    /// Decodes what [`TierCodec::encode_dense`] wrote for a key or range `key` of `n` elements.
    pub fn decode_dense(&self, bytes: &[u8], key: usize, n: usize) -> Result<Vec<f32>, String> {
        decode_values(self.dense_codec(), bytes, key, n)
    }
}

/// Encodes `x` densely as `vt`: f32 as raw `DenseF32` bytes, 16-bit as a codec payload (`Raw`).
pub fn encode_values(x: &[f32], vt: ValueType, scaling: Scaling) -> Encoded {
    let _codec = crate::clock::span();
    if vt == ValueType::F32 {
        return Encoded {
            codec: PayloadCodec::DenseF32,
            bytes: f32_bytes(x).into_owned(),
            overflow: 0,
        };
    }
    let mut out = Vec::new();
    // Lengths are bounded by the placement (ranges fit u32), so this cannot fail.
    let overflow = match encode_dense(x, vt, scaling, &mut out) {
        Ok(st) if st.nonfinite > 0 => st.nonfinite.saturating_sub(count_nonfinite(x)),
        Ok(_) => 0,
        Err(e) => {
            tracing::error!(error = %e, "dense encode refused");
            0
        }
    };
    Encoded {
        codec: PayloadCodec::Raw,
        bytes: out,
        overflow,
    }
}

/// Decodes dense values written by [`encode_values`] (or [`TierCodec::encode_dense`]).
pub fn decode_values(
    codec: PayloadCodec,
    bytes: &[u8],
    key: usize,
    n: usize,
) -> Result<Vec<f32>, String> {
    let _codec = crate::clock::span();
    match codec {
        PayloadCodec::DenseF32 => f32_from_bytes(bytes)
            .filter(|v| v.len() == n)
            .ok_or_else(|| format!("key {key}: f32 payload of {} bytes", bytes.len())),
        PayloadCodec::Raw => decode_dense(bytes, key as u64, n).map_err(|e| e.to_string()),
        other => Err(format!("key {key}: unexpected payload codec {other:?}")),
    }
}

/// Decodes a worker's push of a key of `n` elements: raw f32 or a dense codec payload, and where
/// `sparse` (worker-side Bi-Sparse, [`WorkerSparse`]) a sparse codec payload too.
pub fn decode_push(
    codec: PayloadCodec,
    bytes: &[u8],
    key: usize,
    n: usize,
    sparse: bool,
) -> Result<Vec<f32>, String> {
    match codec {
        PayloadCodec::Raw if sparse => decode_any(bytes, key, n),
        codec => decode_values(codec, bytes, key, n),
    }
}

/// Decodes a codec payload (dense or sparse) of `n` elements into dense values.
pub fn decode_any(bytes: &[u8], key: usize, n: usize) -> Result<Vec<f32>, String> {
    let _codec = crate::clock::span();
    match bytes.first() {
        Some(&b) if b == Layout::Sparse as u8 => SparseVec::decode(bytes, key as u64, n)
            .map(|s| s.to_dense())
            .map_err(|e| e.to_string()),
        _ => decode_dense(bytes, key as u64, n).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Fp16Codec;

    #[test]
    fn resolves_codecs_and_key_modes() {
        let none = TierCodec::from_config(&Codec::None, 10);
        assert!(none.is_plain() && !none.is_sparse_key(1 << 30));
        assert_eq!(none.dense_codec(), PayloadCodec::DenseF32);
        let fp16 = TierCodec::from_config(&Codec::Fp16(Fp16Codec::default()), 10);
        assert_eq!(fp16.dense_type(), ValueType::F16);
        assert_eq!(fp16.dense_codec(), PayloadCodec::Raw);
        assert!(!fp16.is_plain());
        let mpq = TierCodec::from_config(
            &Codec::Mpq(SparseCodec {
                min_size: 100,
                ..SparseCodec::default()
            }),
            10,
        );
        assert!(!mpq.is_sparse_key(99));
        assert!(mpq.is_sparse_key(100));
        assert_eq!(mpq.dense_type(), ValueType::F16);
        // Default warm-up: 4 epochs of 10 rounds.
        assert_eq!(mpq.sparse().unwrap().bisparse.warmup_rounds, 40);
        let bs = TierCodec::from_config(&Codec::Bisparse(SparseCodec::default()), 10);
        assert_eq!(bs.dense_type(), ValueType::F32);
    }

    #[test]
    fn dense_values_round_trip_per_type() {
        let x: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 8.0).collect();
        for vt in [ValueType::F32, ValueType::F16, ValueType::Bf16] {
            let e = encode_values(&x, vt, Scaling::Pow2);
            // Multiples of 1/8 below 8 are exact in every type.
            assert_eq!(
                decode_values(e.codec, &e.bytes, 3, 100).unwrap(),
                x,
                "{vt:?}"
            );
            assert!(decode_values(e.codec, &e.bytes, 3, 99).is_err());
            assert_eq!(e.overflow, 0);
        }
        let e = encode_values(&x, ValueType::F16, Scaling::Pow2);
        assert_eq!(e.bytes.len(), 12 + 200);
    }

    /// Overflow counts only finite inputs that became ±inf: FP16 without scaling overflows at
    /// 65520, BF16 only near f32::MAX, and inputs that were already non-finite do not count.
    #[test]
    fn encoding_counts_overflow_to_inf_only() {
        let x = [1.0f32, 70_000.0, -1.0e6, f32::INFINITY, f32::NAN, 65_504.0];
        let e = encode_values(&x, ValueType::F16, Scaling::None);
        assert_eq!(e.overflow, 2);
        let back = decode_values(e.codec, &e.bytes, 0, x.len()).unwrap();
        assert_eq!(count_nonfinite(&back), 4);
        // Scaled into [2^14, 2^15) by the maximum, nothing overflows (the inf/NaN inputs turn
        // the scaling off, so use finite inputs here).
        let finite = [1.0f32, 70_000.0, -1.0e6];
        assert_eq!(
            encode_values(&finite, ValueType::F16, Scaling::Pow2).overflow,
            0
        );
        let big = [f32::MAX, 1.0, f32::NEG_INFINITY];
        assert_eq!(
            encode_values(&big, ValueType::Bf16, Scaling::None).overflow,
            1
        );
        assert_eq!(
            encode_values(&big, ValueType::F32, Scaling::None).overflow,
            0
        );
    }

    #[test]
    fn a_tier_decodes_what_it_encodes() {
        let x = [0.25f32, -3.5, 1.0e-3];
        for codec in [Codec::None, Codec::Bf16, Codec::Fp16(Fp16Codec::default())] {
            let t = TierCodec::from_config(&codec, 1);
            let e = t.encode_dense(&x);
            assert_eq!(e.codec, t.dense_codec());
            let back = t.decode_dense(&e.bytes, 1, 3).unwrap();
            assert_eq!(back, decode_values(e.codec, &e.bytes, 1, 3).unwrap());
        }
    }

    #[test]
    fn resync_schedule() {
        let mut s = SparseCodec {
            resync_every: 5,
            ..SparseCodec::default()
        };
        let t = TierCodec::from_config(&Codec::Bisparse(s.clone()), 1);
        let due: Vec<u64> = (0..12).filter(|&r| t.resync_due(r)).collect();
        assert_eq!(due, vec![4, 9]);
        s.resync_every = 0;
        let off = TierCodec::from_config(&Codec::Bisparse(s), 1);
        assert!((0..100).all(|r| !off.resync_due(r)));
    }

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
}
