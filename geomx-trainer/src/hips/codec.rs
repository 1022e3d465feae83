//! Tier codecs at run time (compression.md): which payload each key travels in, the dense 16-bit
//! payloads, the Bi-Sparse push state of a local server, the sparse update message of the pull, and
//! the per-codec byte counters of the report.
//!
//! | Tier / key | Push | Reply |
//! |---|---|---|
//! | `none` | dense f32 (`DenseF32`) | θ dense f32 |
//! | `fp16` / `bf16` | dense 16-bit codec payload (`Raw`) | θ dense 16-bit |
//! | `bisparse`/`mpq`, N < T | dense f32 (`bisparse`) or FP16 (`mpq`) | θ in the same type |
//! | `bisparse`/`mpq`, N ≥ T | count + sparse top-k payload | [`Update`]: sparse sum (+ dense θ every R rounds) |
//!
//! Pulls (start-up) always carry exact f32 θ so replicas start identical.

use std::collections::BTreeMap;

use geomx_kernels::{
    decode_dense, encode_dense, is_large, selection_seed, BiSparse, BiSparseConfig, Layout,
    PushPayload, SampledParams, Scaling, Selection, SparseVec, Tier, ValueType, HEADER_LEN,
};
use geomx_net::PayloadCodec;

use super::msg::{f32_bytes, f32_from_bytes};
use crate::config::{
    Codec, DgtTransportConfig, ScalingKind, SelectionKind, SparseCodec, SparseValues,
    TransportConfig, TransportKind,
};

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
    pub fn encode_dense(&self, x: &[f32]) -> (PayloadCodec, Vec<u8>) {
        encode_values(x, self.dense_type(), self.scaling)
    }
}

/// Encodes `x` densely as `vt`: f32 as raw `DenseF32` bytes, 16-bit as a codec payload (`Raw`).
pub fn encode_values(x: &[f32], vt: ValueType, scaling: Scaling) -> (PayloadCodec, Vec<u8>) {
    if vt == ValueType::F32 {
        return (PayloadCodec::DenseF32, f32_bytes(x).into_owned());
    }
    let mut out = Vec::new();
    // Lengths are bounded by the placement (ranges fit u32), so this cannot fail.
    if let Err(e) = encode_dense(x, vt, scaling, &mut out) {
        tracing::error!(error = %e, "dense encode refused");
    }
    (PayloadCodec::Raw, out)
}

/// Decodes dense values written by [`encode_values`] (or [`TierCodec::encode_dense`]).
pub fn decode_values(
    codec: PayloadCodec,
    bytes: &[u8],
    key: usize,
    n: usize,
) -> Result<Vec<f32>, String> {
    match codec {
        PayloadCodec::DenseF32 => f32_from_bytes(bytes)
            .filter(|v| v.len() == n)
            .ok_or_else(|| format!("key {key}: f32 payload of {} bytes", bytes.len())),
        PayloadCodec::Raw => decode_dense(bytes, key as u64, n).map_err(|e| e.to_string()),
        other => Err(format!("key {key}: unexpected payload codec {other:?}")),
    }
}

/// Decodes a codec payload (dense or sparse) of `n` elements into dense values.
pub fn decode_any(bytes: &[u8], key: usize, n: usize) -> Result<Vec<f32>, String> {
    match bytes.first() {
        Some(&b) if b == Layout::Sparse as u8 => SparseVec::decode(bytes, key as u64, n)
            .map(|s| s.to_dense())
            .map_err(|e| e.to_string()),
        _ => decode_dense(bytes, key as u64, n).map_err(|e| e.to_string()),
    }
}

/// The Bi-Sparse push of one range at a local server: error feedback and momentum state, seeded
/// selection, and the encoded payload.
///
/// With 16-bit values and m = 0 the rounding error of the sent values is fed back too: it is added
/// to the next round's input, so what the global server decodes plus what stays behind is the
/// accumulated input (up to f32 addition rounding). With m > 0 it is dropped (feeding it through the
/// velocity would count it 1/(1 − m) times).
#[derive(Debug)]
pub struct RangeCompressor {
    state: BiSparse,
    scaling: Scaling,
    run_seed: u64,
    dc: u32,
    range: u64,
    /// Rounding error of the last 16-bit push, per element (empty when not fed back).
    carry: Vec<f32>,
    input: Vec<f32>,
}

impl RangeCompressor {
    /// State for range `range` (of `len` elements) of DC `dc`.
    pub fn new(
        spec: &SparseSpec,
        scaling: Scaling,
        run_seed: u64,
        dc: u32,
        range: usize,
        len: usize,
    ) -> Result<Self, String> {
        let b = &spec.bisparse;
        let feed_back = b.value_type != ValueType::F32 && b.momentum == 0.0;
        Ok(Self {
            state: BiSparse::new(*b, len).map_err(|e| e.to_string())?,
            scaling,
            run_seed,
            dc,
            range: range as u64,
            carry: if feed_back {
                vec![0.0; len]
            } else {
                Vec::new()
            },
            input: Vec::new(),
        })
    }

    /// Accumulates the DC's sum `g` of round `round` and returns the codec payload to push (sparse
    /// top-k, or dense f32 where the sparse form would not be smaller).
    pub fn push(&mut self, g: &[f32], round: u64) -> Result<Vec<u8>, String> {
        let seed = selection_seed(self.run_seed, Tier::Inter, self.dc, self.range, round);
        let g = if self.carry.is_empty() {
            g
        } else {
            self.input.clear();
            self.input
                .extend(g.iter().zip(&self.carry).map(|(&x, &c)| x + c));
            self.carry.fill(0.0);
            &self.input[..]
        };
        let out = self
            .state
            .push(g, round, seed)
            .map_err(|e| format!("range {}: {e}", self.range))?;
        let mut bytes = Vec::new();
        match out.payload {
            PushPayload::Sparse(s) => {
                s.encode(self.state.config().value_type, self.scaling, &mut bytes);
                if !self.carry.is_empty() {
                    let n = self.carry.len();
                    let sent = SparseVec::decode(&bytes, self.range, n)
                        .map_err(|e| format!("range {}: {e}", self.range))?;
                    for ((&i, &v), &d) in s.indices().iter().zip(s.values()).zip(sent.values()) {
                        self.carry[i as usize] = v - d;
                    }
                }
            }
            PushPayload::Dense(d) => {
                encode_dense(&d, ValueType::F32, Scaling::None, &mut bytes)
                    .map_err(|e| format!("range {}: {e}", self.range))?;
            }
        }
        Ok(bytes)
    }

    /// The error-feedback residual v.
    pub fn residual(&self) -> &[f32] {
        self.state.residual()
    }

    /// Exact-top-k fallbacks of sampled selection so far.
    pub fn fallbacks(&self) -> u64 {
        self.state.fallbacks()
    }

    /// The 16-bit rounding error carried into the next push (empty when not fed back).
    pub fn carry(&self) -> &[f32] {
        &self.carry
    }
}

/// The reply for a sparse key: the non-zero entries of a gradient (the global sum G on the inter
/// tier, the mean ḡ on the intra tier) and, on resynchronisation rounds, dense θ.
///
/// Layout: `flags u8` (bit 0: θ present), `len u32` of the sparse payload, the sparse codec
/// payload, then (if present) θ as a dense f32 codec payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Sparse gradient.
    pub grad: SparseVec,
    /// Dense θ_{r+1} (resynchronisation rounds).
    pub theta: Option<Vec<f32>>,
}

impl Update {
    /// Encodes an update from an already encoded sparse payload and optional θ.
    pub fn encode_parts(sparse: &[u8], theta: Option<&[f32]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + sparse.len());
        out.push(u8::from(theta.is_some()));
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

    /// Encodes `grad` with values of `vt` (and `scaling`) and θ if given.
    pub fn encode(
        grad: &SparseVec,
        vt: ValueType,
        scaling: Scaling,
        theta: Option<&[f32]>,
    ) -> Vec<u8> {
        let mut sparse = Vec::new();
        grad.encode(vt, scaling, &mut sparse);
        Self::encode_parts(&sparse, theta)
    }

    /// Splits an update into its sparse payload and optional dense θ payload, unvalidated.
    fn split(b: &[u8], key: usize) -> Result<(&[u8], Option<&[u8]>), String> {
        let bad = || format!("key {key}: malformed update of {} bytes", b.len());
        if b.len() < 5 || b[0] > 1 {
            return Err(bad());
        }
        let len = u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize;
        let rest = &b[5..];
        if len > rest.len() {
            return Err(bad());
        }
        let (sparse, theta) = rest.split_at(len);
        match (b[0], theta.is_empty()) {
            (0, true) => Ok((sparse, None)),
            (1, false) => Ok((sparse, Some(theta))),
            _ => Err(bad()),
        }
    }

    /// Decodes an update for a key (or range) of `n` elements; every part is validated.
    pub fn decode(b: &[u8], key: usize, n: usize) -> Result<Self, String> {
        let (sparse, theta) = Self::split(b, key)?;
        let grad = SparseVec::decode(sparse, key as u64, n).map_err(|e| e.to_string())?;
        let theta = theta
            .map(|t| decode_dense(t, key as u64, n).map_err(|e| e.to_string()))
            .transpose()?;
        Ok(Self { grad, theta })
    }
}

/// Payload bytes by codec class (`f32`, `fp16`, `bf16`, `sparse`), for the report.
pub type CodecBytes = BTreeMap<String, u64>;

/// Class name of a codec payload (by its header), or `None` if it has none.
fn class_of(payload: &[u8]) -> Option<&'static str> {
    if payload.len() < HEADER_LEN {
        return None;
    }
    if payload[0] == Layout::Sparse as u8 {
        return Some("sparse");
    }
    match ValueType::from_u8(payload[1])? {
        ValueType::F32 => Some("f32"),
        ValueType::F16 => Some("fp16"),
        ValueType::Bf16 => Some("bf16"),
    }
}

fn add(counts: &mut CodecBytes, class: &str, n: usize) {
    *counts.entry(class.to_string()).or_default() += n as u64;
}

/// Counts a dense payload sent or received under `codec` (see [`encode_values`]).
pub fn count_dense(counts: &mut CodecBytes, codec: PayloadCodec, payload: &[u8]) {
    let class = match codec {
        PayloadCodec::Raw => class_of(payload).unwrap_or("f32"),
        _ => "f32",
    };
    add(counts, class, payload.len());
}

/// Counts an up-push body (after its 4-byte count): a codec payload.
pub fn count_payload(counts: &mut CodecBytes, payload: &[u8]) {
    add(counts, class_of(payload).unwrap_or("f32"), payload.len());
}

/// Counts an [`Update`]: its sparse part as `sparse`, its θ part as `f32`.
pub fn count_update(counts: &mut CodecBytes, b: &[u8]) {
    match Update::split(b, 0) {
        Ok((sparse, theta)) => {
            add(counts, "sparse", 5 + sparse.len());
            if let Some(t) = theta {
                add(counts, "f32", t.len());
            }
        }
        Err(_) => add(counts, "sparse", b.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_kernels::PayloadHeader;

    fn header_of(payload: &[u8], key: usize, n: usize) -> Option<PayloadHeader> {
        PayloadHeader::parse(payload, key as u64, n).ok()
    }
    use crate::config::Fp16Codec;

    fn spec(density: f64, min_size: usize) -> SparseSpec {
        let c = SparseCodec {
            density,
            min_size,
            selection: SelectionKind::Exact,
            warmup_rounds: Some(0),
            ..SparseCodec::default()
        };
        TierCodec::from_config(&Codec::Bisparse(c), 10)
            .sparse()
            .unwrap()
            .clone()
    }

    #[test]
    fn resolves_codecs_and_key_modes() {
        let none = TierCodec::from_config(&Codec::None, 10);
        assert!(none.is_plain() && !none.is_sparse_key(1 << 30));
        let fp16 = TierCodec::from_config(&Codec::Fp16(Fp16Codec::default()), 10);
        assert_eq!(fp16.dense_type(), ValueType::F16);
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
            let (codec, b) = encode_values(&x, vt, Scaling::Pow2);
            // Multiples of 1/8 below 8 are exact in every type.
            assert_eq!(decode_values(codec, &b, 3, 100).unwrap(), x, "{vt:?}");
            assert!(decode_values(codec, &b, 3, 99).is_err());
        }
        let (_, b) = encode_values(&x, ValueType::F16, Scaling::Pow2);
        assert_eq!(b.len(), 12 + 200);
        let mut c = CodecBytes::new();
        count_dense(&mut c, PayloadCodec::Raw, &b);
        count_dense(&mut c, PayloadCodec::DenseF32, &[0; 8]);
        assert_eq!(c["fp16"], 212);
        assert_eq!(c["f32"], 8);
    }

    #[test]
    fn update_round_trip_and_rejects_malformed() {
        let g = SparseVec::new(10, vec![1, 7], vec![0.5, -2.0]).unwrap();
        let theta: Vec<f32> = (0..10).map(|i| i as f32).collect();
        for t in [None, Some(&theta[..])] {
            let b = Update::encode(&g, ValueType::F32, Scaling::None, t);
            let u = Update::decode(&b, 4, 10).unwrap();
            assert_eq!(u.grad, g);
            assert_eq!(u.theta.as_deref(), t);
            assert!(Update::decode(&b, 4, 11).is_err());
            assert!(Update::decode(&b[..b.len() - 1], 4, 10).is_err());
            let mut c = CodecBytes::new();
            count_update(&mut c, &b);
            assert_eq!(c["sparse"], 5 + 12 + 16);
            assert_eq!(c.get("f32").copied(), t.map(|_| 12 + 40));
        }
        let mut flipped = Update::encode(&g, ValueType::F32, Scaling::None, None);
        flipped[0] = 1;
        assert!(Update::decode(&flipped, 4, 10).is_err());
        assert!(Update::decode(&[7, 0, 0, 0, 0], 4, 10).is_err());
    }

    /// compression.md oracle 2 through the trainer's push path (encode → wire → decode): with
    /// integer gradients, Σ sent + residual == Σ g exactly, round after round; and oracle 1's
    /// per-round shape: the entries sent were the only ones cleared.
    #[test]
    fn error_feedback_invariant_at_the_local_server() {
        let n = 2000;
        let sp = spec(0.01, 1000);
        let mut c = RangeCompressor::new(&sp, Scaling::Pow2, 9, 1, 3, n).unwrap();
        let mut total_in = vec![0.0f32; n];
        let mut total_sent = vec![0.0f32; n];
        let mut state = 0x1234_5678u64;
        for round in 0..200 {
            let g: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % 2047) as f32 - 1023.0
                })
                .collect();
            let before: Vec<f32> = c.residual().to_vec();
            let bytes = c.push(&g, round).unwrap();
            let h = header_of(&bytes, 3, n).unwrap();
            assert_eq!(h.layout, Layout::Sparse);
            assert_eq!(h.count, 20, "k = ⌈0.01·2000⌉");
            let sent = decode_any(&bytes, 3, n).unwrap();
            for i in 0..n {
                total_in[i] += g[i];
                total_sent[i] += sent[i];
                let mid = before[i] + g[i];
                if sent[i] != 0.0 {
                    assert_eq!(sent[i], mid);
                    assert_eq!(c.residual()[i], 0.0);
                } else {
                    assert_eq!(c.residual()[i], mid);
                }
            }
            for i in 0..n {
                assert_eq!(
                    total_sent[i] + c.residual()[i],
                    total_in[i],
                    "round {round} i {i}"
                );
            }
        }
        assert_eq!(c.fallbacks(), 0);
    }

    /// With FP16 values the rounding error is fed back: decoded sent + residual + carry tracks the
    /// accumulated input to f32 rounding (tolerance 1e-3 on sums of magnitude ≤ ~2000), while the
    /// values lost without feedback would exceed it.
    #[test]
    fn fp16_values_feed_their_rounding_error_back() {
        let n = 1500;
        let mut sp = spec(0.02, 1000);
        sp.bisparse.value_type = ValueType::F16;
        let mut c = RangeCompressor::new(&sp, Scaling::Pow2, 1, 0, 0, n).unwrap();
        let mut total_in = vec![0.0f64; n];
        let mut total_sent = vec![0.0f64; n];
        let mut lost = 0.0f64;
        for round in 0..100u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| {
                    let h = (i as u64 * 2_654_435_761 + round * 40_503) % 1021;
                    (h as f32 - 510.0) / 64.0 + 1.0 / 3.0
                })
                .collect();
            let bytes = c.push(&g, round).unwrap();
            let sent = decode_any(&bytes, 0, n).unwrap();
            for i in 0..n {
                total_in[i] += f64::from(g[i]);
                total_sent[i] += f64::from(sent[i]);
                lost += f64::from(c.carry()[i]).abs();
            }
        }
        let mut worst = 0.0f64;
        for i in 0..n {
            let kept = f64::from(c.residual()[i]) + f64::from(c.carry()[i]);
            worst = worst.max((total_sent[i] + kept - total_in[i]).abs());
        }
        assert!(worst < 1e-3, "worst {worst}");
        assert!(lost > 1e-2, "rounding errors were fed back: {lost}");
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
}
