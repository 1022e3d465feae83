//! MixedSync aggregation at a global server (sync.md "MixedSync"), without IO.
//!
//! Local tiers stay synchronous; between DCs the global server is asynchronous. A [`MixedAggregator`]
//! applies DC d's mean gradient g_d = s_d / n_d to a range the moment it arrives (one optimizer
//! step, no waiting for other DCs), bumps the range version and returns the new values for the
//! reply. Each push carries the version it was computed from; the staleness τ = (current version) −
//! (that version) is recorded per DC. The optimizer is `geomx_kernels`' (DC-ASGD keeps one backup per
//! DC; plain SGD / Adam ignore the sender).
//!
//! **What a DC holds.** With both tiers lossless the reply is θ and the DC holds θ. Otherwise
//! ([`ReplyMode::Delta`]) the aggregator keeps each DC's copy: the reply is the difference between
//! θ and that copy, quantized through both tiers' codecs, and the copy advances by exactly what the
//! DC's workers decode. Either way DC-ASGD's backup for the DC is set to the DC's copy, so the delay
//! compensation measures the distance from what the DC actually computed its gradient on.

use std::collections::BTreeMap;

use geomx_kernels::optim::{Optimizer, OptimizerConfig};
use geomx_net::PayloadCodec;
use serde::{Deserialize, Serialize};

use super::global_agg::{DcPush, SkipCause};
use super::AggError;
use crate::codec::down::{dense_step, ReplyMode};
use crate::codec::{count_nonfinite, f32_bytes, TierCodec};
use crate::config::NonFinitePolicy;

/// Staleness statistics of one DC's pushes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staleness {
    /// Pushes applied.
    pub pushes: u64,
    /// Sum of τ over them.
    pub total: u64,
    /// Largest τ.
    pub max: u64,
    /// τ of the latest push.
    pub last: u64,
}

impl Staleness {
    /// Mean τ (0 before the first push).
    pub fn mean(&self) -> f64 {
        if self.pushes == 0 {
            0.0
        } else {
            self.total as f64 / self.pushes as f64
        }
    }

    fn record(&mut self, tau: u64) {
        self.pushes += 1;
        self.total += tau;
        self.max = self.max.max(tau);
        self.last = tau;
    }
}

/// State of one owned range.
struct MixedRange {
    params: Vec<f32>,
    version: u64,
    opt: Optimizer,
    mode: ReplyMode,
    /// Delta mode: each DC's copy of the range (what its workers hold); empty in Theta mode.
    held: Vec<Vec<f32>>,
}

/// The answer to one DC's push.
#[derive(Debug)]
pub struct MixedDone {
    /// The range's version after the push.
    pub version: u64,
    /// The payload codec of the reply.
    pub codec: PayloadCodec,
    /// The reply to the pushing DC: θ, or the quantized difference to its copy.
    pub reply: Vec<u8>,
    /// Set when the push was not applied (θ and the optimizer state unchanged; the DC still gets
    /// the current parameters).
    pub skipped: Option<SkipCause>,
    /// Finite values that overflowed to ±inf in the reply's encodings.
    pub overflow: usize,
}

/// Applies each DC's pushes to the ranges one global server owns, asynchronously between DCs.
pub struct MixedAggregator {
    n_dcs: usize,
    ranges: BTreeMap<usize, MixedRange>,
    staleness: Vec<Staleness>,
    inter: TierCodec,
    intra: TierCodec,
    policy: NonFinitePolicy,
    /// Learning-rate factor of each DC's steps (empty: 1 for every DC).
    lr_scales: Vec<f32>,
}

impl MixedAggregator {
    /// An aggregator for `n_dcs` DCs, plain f32 tiers and the `abort` policy.
    pub fn new(n_dcs: usize) -> Self {
        Self {
            n_dcs,
            ranges: BTreeMap::new(),
            staleness: vec![Staleness::default(); n_dcs],
            inter: TierCodec::default(),
            intra: TierCodec::default(),
            policy: NonFinitePolicy::Abort,
            lr_scales: Vec::new(),
        }
    }

    /// Scales the learning rate of DC d's steps by `scales[d]` (e.g. its share of the workers).
    pub fn with_lr_scales(mut self, scales: Vec<f32>) -> Self {
        self.lr_scales = scales;
        self
    }

    /// Sets the tier codecs the replies travel through.
    pub fn with_codecs(mut self, inter: TierCodec, intra: TierCodec) -> Self {
        self.inter = inter;
        self.intra = intra;
        self
    }

    /// Sets the non-finite policy.
    pub fn with_policy(mut self, policy: NonFinitePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Takes ownership of range `id` with initial values `params` (θ_0, every DC's first copy and
    /// DC-ASGD's initial backups) at version `version`, stepped by an optimizer built from `cfg`,
    /// replying in `mode` (`Theta` or `Delta`).
    pub fn add_range(
        &mut self,
        id: usize,
        params: Vec<f32>,
        version: u64,
        cfg: OptimizerConfig,
    ) -> Result<(), AggError> {
        self.add_range_with(id, params, version, cfg, ReplyMode::Theta)
    }

    /// [`MixedAggregator::add_range`] with the reply mode.
    pub fn add_range_with(
        &mut self,
        id: usize,
        params: Vec<f32>,
        version: u64,
        cfg: OptimizerConfig,
        mode: ReplyMode,
    ) -> Result<(), AggError> {
        if mode == ReplyMode::Sparse {
            return Err(AggError::Optimizer {
                key: id,
                message: "sparse replies are not defined for MixedSync".into(),
            });
        }
        let opt =
            Optimizer::new(cfg, &params, self.n_dcs.max(1)).map_err(|e| AggError::Optimizer {
                key: id,
                message: e.to_string(),
            })?;
        let held = match mode {
            ReplyMode::Delta => vec![params.clone(); self.n_dcs],
            _ => Vec::new(),
        };
        self.ranges.insert(
            id,
            MixedRange {
                params,
                version,
                opt,
                mode,
                held,
            },
        );
        Ok(())
    }

    /// Current version and values of range `id`.
    pub fn get(&self, id: usize) -> Option<(u64, &[f32])> {
        self.ranges
            .get(&id)
            .map(|r| (r.version, r.params.as_slice()))
    }

    /// Staleness statistics of DC `dc`.
    pub fn staleness(&self, dc: usize) -> Option<&Staleness> {
        self.staleness.get(dc)
    }

    /// What DC `dc` holds of range `id` in Delta mode (`None` in Theta mode, where it holds θ of
    /// its last reply).
    pub fn held(&self, id: usize, dc: usize) -> Option<&[f32]> {
        self.ranges.get(&id)?.held.get(dc).map(Vec::as_slice)
    }

    /// Applies DC `dc`'s push of its sum `sum` over `count` workers, computed from version
    /// `base_version` of range `id`: one optimizer step with g = sum / count. Returns the new
    /// version and values.
    pub fn push(
        &mut self,
        id: usize,
        dc: usize,
        base_version: u64,
        sum: Vec<f32>,
        count: u32,
    ) -> Result<(u64, &[f32]), AggError> {
        let d = self.push_reply(id, dc, base_version, (Some(sum), count))?;
        let r = self.ranges.get(&id).ok_or(AggError::UnknownKey(id))?;
        Ok((d.version, r.params.as_slice()))
    }

    /// Applies DC `dc`'s push (computed from version `base_version` of range `id`; `None`: the DC
    /// dropped the round) and returns the reply to `dc`.
    pub fn push_reply(
        &mut self,
        id: usize,
        dc: usize,
        base_version: u64,
        push: DcPush,
    ) -> Result<MixedDone, AggError> {
        let n_dcs = self.n_dcs;
        let policy = self.policy;
        let r = self.ranges.get_mut(&id).ok_or(AggError::UnknownKey(id))?;
        let stats = self.staleness.get_mut(dc).ok_or(AggError::BadSender {
            sender: dc,
            n: n_dcs,
        })?;
        if base_version > r.version {
            return Err(AggError::WrongVersion {
                key: id,
                expected: r.version,
                got: base_version,
            });
        }
        let (sum, count) = push;
        if let Some(s) = &sum {
            if s.len() != r.params.len() {
                return Err(AggError::LengthMismatch {
                    key: id,
                    expected: r.params.len(),
                    got: s.len(),
                });
            }
        }
        if count == 0 {
            return Err(AggError::CountMismatch {
                key: id,
                got: 0,
                expected: 1,
            });
        }
        stats.record(r.version - base_version);
        let round = r.version;
        let scale = self.lr_scales.get(dc).copied().unwrap_or(1.0);
        let applied = match sum {
            None => Err(SkipCause::Upstream),
            Some(s) => apply(r, dc, s, count, scale, policy),
        };
        let skipped = match applied {
            Ok(()) => None,
            Err(SkipCause::NonFinite(what)) if policy == NonFinitePolicy::Abort => {
                return Err(AggError::NonFinite {
                    key: id,
                    round,
                    what,
                })
            }
            Err(cause) => Some(cause),
        };
        let (codec, reply, overflow) = reply_to(r, dc, &self.inter, &self.intra, id)?;
        r.version += 1;
        Ok(MixedDone {
            version: r.version,
            codec,
            reply,
            skipped,
            overflow,
        })
    }
}

/// One step of `r` with DC `dc`'s mean `sum / count` at `lr_scale` times the learning rate; θ
/// and the optimizer state are restored when the step is not finite (under `skip`).
fn apply(
    r: &mut MixedRange,
    dc: usize,
    mut sum: Vec<f32>,
    count: u32,
    lr_scale: f32,
    policy: NonFinitePolicy,
) -> Result<(), SkipCause> {
    if count_nonfinite(&sum) > 0 {
        return Err(SkipCause::NonFinite("pushed sum"));
    }
    let n = count as f32;
    for a in sum.iter_mut() {
        *a /= n;
    }
    let saved = (policy == NonFinitePolicy::Skip).then(|| (r.opt.clone(), r.params.clone()));
    let lr = r.opt.config().lr();
    if lr_scale != 1.0 {
        r.opt.set_lr(lr * lr_scale);
    }
    let step = r.opt.step(&mut r.params, &sum, dc);
    r.opt.set_lr(lr);
    let stepped = step.is_ok() && count_nonfinite(&r.params) == 0;
    if stepped {
        return Ok(());
    }
    if let Some((opt, params)) = saved {
        r.opt = opt;
        r.params = params;
    }
    Err(SkipCause::NonFinite("optimizer step"))
}

/// The reply to DC `dc` and its new copy: θ (Theta), or θ minus its copy through both codecs
/// (Delta; a zero increment if that is not finite). DC-ASGD's backup becomes the DC's copy.
fn reply_to(
    r: &mut MixedRange,
    dc: usize,
    inter: &TierCodec,
    intra: &TierCodec,
    id: usize,
) -> Result<(PayloadCodec, Vec<u8>, usize), AggError> {
    let internal = |message: String| AggError::Optimizer { key: id, message };
    match r.mode {
        ReplyMode::Delta => {
            let held = r
                .held
                .get_mut(dc)
                .ok_or(AggError::BadSender { sender: dc, n: 0 })?;
            let delta: Vec<f32> = r
                .params
                .iter()
                .zip(held.iter())
                .map(|(&p, &h)| p - h)
                .collect();
            let mut s = dense_step(&delta, inter, intra, id).map_err(internal)?;
            let ok = count_nonfinite(&s.applied) == 0
                && held
                    .iter()
                    .zip(&s.applied)
                    .all(|(&h, &z)| (h + z).is_finite());
            if !ok {
                s = dense_step(&vec![0.0; delta.len()], inter, intra, id).map_err(internal)?;
            }
            for (h, &z) in held.iter_mut().zip(&s.applied) {
                *h += z;
            }
            r.opt
                .set_backup(dc, held)
                .map_err(|e| internal(e.to_string()))?;
            Ok((s.reply.codec, s.reply.bytes, s.overflow))
        }
        _ => {
            r.opt
                .set_backup(dc, &r.params)
                .map_err(|e| internal(e.to_string()))?;
            Ok((PayloadCodec::DenseF32, f32_bytes(&r.params).into_owned(), 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geomx_kernels::optim::{DcAsgdConfig, DcAsgdLambda, SgdConfig};

    fn dcasgd(lr: f32, lambda: f32) -> OptimizerConfig {
        OptimizerConfig::DcAsgd(DcAsgdConfig {
            lr,
            lambda: DcAsgdLambda::Constant(lambda),
            momentum: 0.0,
            weight_decay: 0.0,
        })
    }

    /// Fixed "awkward" gradients (sums not exactly representable).
    fn grad(seed: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((seed * 7919 + i as u32 * 104_729) % 1009) as f32 / 333.0 - 1.5)
            .collect()
    }

    /// sync.md oracle 1: DC-ASGD with λ = 0 equals plain asynchronous SGD bit for bit on the
    /// scripted arrival order DC 1, 2, 2, 1, 2 (DCs 0 and 1 here). The reference is written
    /// independently: θ ← θ − η·(s / n) in arrival order.
    #[test]
    fn dcasgd_with_zero_lambda_is_plain_async_sgd() {
        let n = 19;
        let theta0 = grad(42, n);
        let lr = 0.1f32;
        let counts = [2u32, 3];
        let mut agg = MixedAggregator::new(2);
        agg.add_range(0, theta0.clone(), 0, dcasgd(lr, 0.0))
            .unwrap();
        let mut plain = MixedAggregator::new(2);
        let sgd = OptimizerConfig::Sgd(SgdConfig {
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        });
        plain.add_range(0, theta0.clone(), 0, sgd).unwrap();
        let mut reference = theta0;
        let mut seen = [0u64; 2];
        for (step, dc) in [0usize, 1, 1, 0, 1].into_iter().enumerate() {
            let s = grad(step as u32 + 1, n);
            for (w, x) in reference.iter_mut().zip(&s) {
                *w -= lr * (*x / counts[dc] as f32);
            }
            let (v, got) = agg.push(0, dc, seen[dc], s.clone(), counts[dc]).unwrap();
            assert_eq!(v, step as u64 + 1);
            for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "dcasgd step {step} element {i}");
            }
            let (_, got) = plain.push(0, dc, seen[dc], s, counts[dc]).unwrap();
            for (a, b) in got.iter().zip(&reference) {
                assert_eq!(a.to_bits(), b.to_bits(), "sgd step {step}");
            }
            seen[dc] = v;
        }
    }

    /// sync.md oracle 2 through the aggregator: w = 1.0, w_bak = 0.5, g = 2.0, η = 0.1, λ = 0.04
    /// → w = 0.792 (f32), and only the pushing DC's backup changes.
    #[test]
    fn dcasgd_hand_value_and_per_dc_backups() {
        // θ_0 = 0.5 is every DC's backup. DC 1 pushes g = −5 from version 0 (λ term 0, since
        // w = w_bak): w = 0.5 + 0.5 = 1.0 exactly, and only DC 1's backup becomes 1.0.
        let mut agg = MixedAggregator::new(2);
        agg.add_range(0, vec![0.5], 0, dcasgd(0.1, 0.04)).unwrap();
        let (_, w) = agg.push(0, 1, 0, vec![-5.0], 1).unwrap();
        assert_eq!(w, [1.0f32]);
        // DC 0 (backup 0.5) pushes g = 2 computed from version 0.
        let (v, w) = agg.push(0, 0, 0, vec![4.0], 2).unwrap();
        assert_eq!(v, 2);
        let expect = 1.0f32 - 0.1 * (2.0 + 0.04 * 2.0 * 2.0 * (1.0 - 0.5));
        assert!((w[0] - 0.792).abs() < 1e-6, "{}", w[0]);
        assert_eq!(w[0].to_bits(), expect.to_bits());
        assert_eq!(agg.staleness(0).unwrap().last, 1);
        assert_eq!(agg.staleness(1).unwrap().last, 0);
    }

    /// sync.md oracle 3: DC 1 pushes at t = 1…6, DC 2 at 3.5 and 6.5 with instant replies: DC 2's
    /// τ is 3 both times.
    #[test]
    fn each_dc_steps_at_its_share_of_the_learning_rate() {
        // DC 0 holds 1 of 4 workers, DC 1 three: lr 0.1 becomes 0.025 and 0.075 (λ = 0), and
        // the configured lr is left as it was.
        let mut agg = MixedAggregator::new(2).with_lr_scales(vec![0.25, 0.75]);
        agg.add_range(0, vec![1.0], 0, dcasgd(0.1, 0.0)).unwrap();
        let (_, w) = agg.push(0, 0, 0, vec![2.0], 1).unwrap();
        assert!((w[0] - (1.0 - 0.025 * 2.0)).abs() < 1e-7, "{}", w[0]);
        let (_, w) = agg.push(0, 1, 1, vec![6.0], 3).unwrap();
        assert!((w[0] - (0.95 - 0.075 * 2.0)).abs() < 1e-7, "{}", w[0]);
        assert_eq!(agg.ranges[&0].opt.config().lr(), 0.1);
    }

    #[test]
    fn staleness_is_recorded_per_dc() {
        let mut agg = MixedAggregator::new(2);
        agg.add_range(0, vec![0.0; 3], 0, dcasgd(0.01, 0.04))
            .unwrap();
        let mut events: Vec<(f64, usize)> = (1..=6).map(|t| (t as f64, 0)).collect();
        events.extend([(3.5, 1), (6.5, 1)]);
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut seen = [0u64; 2];
        let mut taus = Vec::new();
        for (_, dc) in events {
            let (v, _) = agg.push(0, dc, seen[dc], vec![0.5; 3], 1).unwrap();
            if dc == 1 {
                taus.push(agg.staleness(1).unwrap().last);
            }
            seen[dc] = v;
        }
        assert_eq!(taus, [3, 3]);
        let s1 = agg.staleness(1).unwrap();
        assert_eq!((s1.pushes, s1.max, s1.mean()), (2, 3, 3.0));
        let s0 = agg.staleness(0).unwrap();
        // DC 0 after DC 1's pushes at 3.5 (before its t = 4 push) and 6.5 (after all of its own).
        assert_eq!((s0.pushes, s0.max, s0.total), (6, 1, 1));
    }

    #[test]
    fn rejects_bad_pushes() {
        let mut agg = MixedAggregator::new(2);
        agg.add_range(5, vec![0.0; 2], 0, dcasgd(0.1, 0.04))
            .unwrap();
        assert!(matches!(
            agg.push(4, 0, 0, vec![0.0; 2], 1),
            Err(AggError::UnknownKey(4))
        ));
        assert!(matches!(
            agg.push(5, 2, 0, vec![0.0; 2], 1),
            Err(AggError::BadSender { .. })
        ));
        assert!(matches!(
            agg.push(5, 0, 1, vec![0.0; 2], 1),
            Err(AggError::WrongVersion { .. })
        ));
        assert!(matches!(
            agg.push(5, 0, 0, vec![0.0; 3], 1),
            Err(AggError::LengthMismatch { .. })
        ));
        assert!(matches!(
            agg.push(5, 0, 0, vec![0.0; 2], 0),
            Err(AggError::CountMismatch { .. })
        ));
        assert!(matches!(
            agg.add_range(6, vec![0.0], 0, dcasgd(-1.0, 0.04)),
            Err(AggError::Optimizer { key: 6, .. })
        ));
        assert_eq!(agg.get(5).unwrap().0, 0);
    }

    /// FP16 on the WAN and the LAN (Delta mode): each DC's copy advances by exactly what its
    /// workers decode, and DC-ASGD's backup is that copy, not θ. A replica built by applying the
    /// decoded replies (local server re-encoding included) matches the copy bit for bit.
    #[test]
    fn lossy_replies_track_what_each_dc_holds() {
        let n = 23;
        let theta0 = grad(5, n);
        let fp16 = TierCodec::from_config(
            &crate::config::Codec::Fp16(crate::config::Fp16Codec::default()),
            1,
        );
        let mut agg = MixedAggregator::new(2).with_codecs(fp16.clone(), fp16.clone());
        agg.add_range_with(0, theta0.clone(), 0, dcasgd(0.1, 0.04), ReplyMode::Delta)
            .unwrap();
        let mut replicas = [theta0.clone(), theta0.clone()];
        let mut seen = [0u64; 2];
        for (step, dc) in [0usize, 1, 1, 0, 1].into_iter().enumerate() {
            let d = agg
                .push_reply(0, dc, seen[dc], (Some(grad(step as u32 + 1, n)), 2))
                .unwrap();
            seen[dc] = d.version;
            let y = fp16.decode_dense(&d.reply, 0, n).unwrap();
            let seg = crate::codec::down::forward_dense(&y, &fp16);
            let z = fp16.decode_dense(&seg.bytes, 0, n).unwrap();
            for (p, dz) in replicas[dc].iter_mut().zip(&z) {
                *p += *dz;
            }
            let held = agg.held(0, dc).unwrap();
            for i in 0..n {
                assert_eq!(
                    held[i].to_bits(),
                    replicas[dc][i].to_bits(),
                    "step {step} {i}"
                );
            }
            let bak = agg.ranges[&0].opt.backup(dc).unwrap();
            assert_eq!(bak, held, "step {step}: the backup is the DC's copy");
            // The copy is within FP16 rounding of θ (not equal: the reply was rounded).
            let (_, theta) = agg.get(0).unwrap();
            for i in 0..n {
                assert!((theta[i] - held[i]).abs() <= 1e-3 * theta[i].abs().max(1.0));
            }
        }
    }

    /// A non-finite push: `abort` fails it; `skip` leaves θ and the optimizer state unchanged,
    /// still bumps the version, and answers with the current parameters.
    #[test]
    fn non_finite_pushes_abort_or_are_skipped() {
        let mut bad = grad(1, 4);
        bad[2] = f32::INFINITY;
        let mut abort = MixedAggregator::new(2);
        abort
            .add_range(0, vec![0.5; 4], 0, dcasgd(0.1, 0.04))
            .unwrap();
        assert!(matches!(
            abort.push_reply(0, 1, 0, (Some(bad.clone()), 1)),
            Err(AggError::NonFinite {
                key: 0,
                round: 0,
                ..
            })
        ));
        let mut skip = MixedAggregator::new(2).with_policy(NonFinitePolicy::Skip);
        skip.add_range(0, vec![0.5; 4], 0, dcasgd(0.1, 0.04))
            .unwrap();
        let d = skip.push_reply(0, 1, 0, (Some(bad), 1)).unwrap();
        assert_eq!(d.skipped, Some(SkipCause::NonFinite("pushed sum")));
        assert_eq!(d.version, 1);
        assert_eq!(skip.get(0).unwrap().1, &[0.5f32; 4][..]);
        let ok = skip.push_reply(0, 0, 1, (Some(grad(2, 4)), 1)).unwrap();
        assert!(ok.skipped.is_none());
        assert_ne!(skip.get(0).unwrap().1, &[0.5f32; 4][..]);
        let d = skip.push_reply(0, 0, 2, (None, 1)).unwrap();
        assert_eq!(d.skipped, Some(SkipCause::Upstream));
    }
}
