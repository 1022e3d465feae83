//! The Bi-Sparse push of one range at a local server, or of one key at a worker
//! (`compression.intra.codec = "bisparse"`): error feedback, seeded selection, encoding.

use geomx_kernels::{
    encode_dense, selection_seed, BiSparse, PushPayload, Scaling, SparseVec, Tier, ValueType,
};

use super::SparseSpec;

/// The Bi-Sparse push of one range at a local server (or of one key at a worker,
/// [`RangeCompressor::for_worker`]): error feedback and momentum state, seeded selection, and the
/// encoded payload.
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
    tier: Tier,
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
        Self::on_tier(spec, scaling, run_seed, Tier::Inter, dc, range, len)
    }

    /// State for key `key` (of `len` elements) of worker `rank` of DC `dc`, pushing to its local
    /// server. Each worker draws its samples from a stream of its own, derived from the run seed
    /// and its (dc, rank), so that the workers of a DC do not sample the same positions.
    pub fn for_worker(
        spec: &SparseSpec,
        scaling: Scaling,
        run_seed: u64,
        dc: u32,
        rank: u32,
        key: usize,
        len: usize,
    ) -> Result<Self, String> {
        let own = selection_seed(run_seed, Tier::Intra, dc, u64::from(rank), u64::MAX);
        Self::on_tier(spec, scaling, own, Tier::Intra, dc, key, len)
    }

    fn on_tier(
        spec: &SparseSpec,
        scaling: Scaling,
        run_seed: u64,
        tier: Tier,
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
            tier,
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
    /// top-k, or dense f32 where the sparse form would not be smaller) and how many of its finite
    /// values overflowed to ±inf (16-bit values).
    pub fn push(&mut self, g: &[f32], round: u64) -> Result<(Vec<u8>, usize), String> {
        let _codec = crate::clock::span();
        let seed = selection_seed(self.run_seed, self.tier, self.dc, self.range, round);
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
        let mut overflow = 0;
        match out.payload {
            PushPayload::Sparse(s) => {
                let nonfinite = s.encode(self.state.config().value_type, self.scaling, &mut bytes);
                overflow = nonfinite.saturating_sub(super::count_nonfinite(s.values()));
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
        Ok((bytes, overflow))
    }

    /// The error-feedback residual v.
    pub fn residual(&self) -> &[f32] {
        self.state.residual()
    }

    /// The momentum velocity u (empty when the momentum is 0).
    pub fn velocity(&self) -> &[f32] {
        self.state.velocity()
    }

    /// The push settings (density and warm-up, momentum, clipping, selection, value type).
    pub fn config(&self) -> &geomx_kernels::BiSparseConfig {
        self.state.config()
    }

    /// Exact-top-k fallbacks of sampled selection so far.
    pub fn fallbacks(&self) -> u64 {
        self.state.fallbacks()
    }

    /// The 16-bit rounding error carried into the next push (empty when not fed back).
    pub fn carry(&self) -> &[f32] {
        &self.carry
    }

    /// The state a checkpoint saves: the velocity u, the residual v and the 16-bit carry (each
    /// empty where unused).
    pub fn export_state(&self) -> Vec<Vec<f32>> {
        vec![
            self.state.velocity().to_vec(),
            self.state.residual().to_vec(),
            self.carry.clone(),
        ]
    }

    /// Restores [`RangeCompressor::export_state`] of a compressor built alike; a state of
    /// another shape is refused and nothing changes.
    pub fn import_state(&mut self, state: Vec<Vec<f32>>) -> Result<(), String> {
        let [u, v, carry]: [Vec<f32>; 3] = state
            .try_into()
            .map_err(|s: Vec<Vec<f32>>| format!("compressor state of {} tensors", s.len()))?;
        if carry.len() != self.carry.len() {
            return Err(format!(
                "range {}: carry of {} values, expected {}",
                self.range,
                carry.len(),
                self.carry.len()
            ));
        }
        self.state
            .set_state(u, v)
            .map_err(|e| format!("range {}: {e}", self.range))?;
        self.carry = carry;
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::codec::{decode_any, TierCodec};
    use crate::config::{Codec, SelectionKind, SparseCodec};
    use geomx_kernels::{Layout, PayloadHeader};

    fn header_of(payload: &[u8], key: usize, n: usize) -> Option<PayloadHeader> {
        PayloadHeader::parse(payload, key as u64, n).ok()
    }

    /// Bi-Sparse settings with exact selection and no warm-up (also the worker tests').
    pub(in crate::codec) fn spec(density: f64, min_size: usize) -> SparseSpec {
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

    /// A compressor restored from another's exported state (residual, velocity, 16-bit carry)
    /// pushes the same bytes; a state of another shape is refused.
    #[test]
    fn exported_state_restores_identical_pushes() {
        let n = 1500;
        let mut sp = spec(0.02, 1000);
        sp.bisparse.value_type = ValueType::F16;
        sp.bisparse.momentum = 0.0;
        let g = |round: u64| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u64 * 7919 + round * 31) % 101) as f32 / 7.0 - 7.0)
                .collect()
        };
        let mut a = RangeCompressor::new(&sp, Scaling::Pow2, 1, 0, 0, n).unwrap();
        for round in 0..3 {
            a.push(&g(round), round).unwrap();
        }
        let state = a.export_state();
        assert_eq!(state[2].len(), n, "fp16 values carry their rounding error");
        let mut b = RangeCompressor::new(&sp, Scaling::Pow2, 1, 0, 0, n).unwrap();
        let mut wrong = state.clone();
        wrong[1].pop();
        assert!(b.import_state(wrong).is_err());
        assert!(b.import_state(state[..2].to_vec()).is_err());
        b.import_state(state).unwrap();
        assert_eq!(a.push(&g(3), 3).unwrap(), b.push(&g(3), 3).unwrap());
    }

    /// Compression oracle 2 through the trainer's push path (encode → wire → decode): with
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
            let (bytes, overflow) = c.push(&g, round).unwrap();
            assert_eq!(overflow, 0);
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
            let (bytes, overflow) = c.push(&g, round).unwrap();
            assert_eq!(overflow, 0);
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
}
