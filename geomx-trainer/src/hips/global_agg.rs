//! Upper-tier aggregation at a global server (FSA step 4 and HFA's outer step), without IO.
//!
//! A [`GlobalAggregator`] owns some ranges of θ. For each it buffers the D local servers' pushes of
//! round r; when all are in it checks Σ count = W, forms G = s_1 + … + s_D in DC order,
//! ḡ = G / W (a division), applies the optimizer element-wise, bumps the range version to r+1 and
//! returns the reply every DC receives. What the reply carries depends on the range's
//! [`ReplyMode`]: θ_{r+1} when both tiers are lossless, otherwise the increment quantized through
//! both tiers' codecs (which the aggregator applies itself, so its θ is what every worker holds),
//! or for sparse ranges the quantized global sum (the aggregator steps with exactly the mean the
//! workers decode).
//!
//! Every value that enters the step is checked: a non-finite sum, quantized mean, increment or
//! stepped θ either fails the push ([`NonFinitePolicy::Abort`]) or drops the round for the range
//! ([`NonFinitePolicy::Skip`]: θ and the optimizer state stay as they were).

use std::any::Any;
use std::collections::BTreeMap;

use geomx_kernels::SparseVec;
use geomx_net::PayloadCodec;

use super::AggError;
use crate::codec::down::{dense_step, sparse_mean, sparse_step, DenseStep, ReplyMode};
use crate::codec::{count_nonfinite, f32_bytes, TierCodec, Update};
use crate::config::NonFinitePolicy;

/// A copy of an optimizer's state, to undo a step (see [`RangeOptimizer::save`]).
pub type SavedState = Box<dyn Any + Send>;

/// An optimizer step over one range: θ ← opt(θ, ḡ). Implementations keep their own state
/// (moments) for the range they were built for.
pub trait RangeOptimizer: Send {
    /// Updates `params` in place with the mean gradient `mean_grad` (same length).
    fn step(&mut self, params: &mut [f32], mean_grad: &[f32]);

    /// Writes into `out` the increment a step from `params` would add (`out = opt(θ, ḡ) − θ`),
    /// advancing the optimizer's state as [`RangeOptimizer::step`] does. The default steps a copy
    /// of `params`; an optimizer that forms its increment directly overrides it.
    fn increment(&mut self, params: &[f32], mean_grad: &[f32], out: &mut [f32]) {
        out.copy_from_slice(params);
        self.step(out, mean_grad);
        for (o, &p) in out.iter_mut().zip(params) {
            *o -= p;
        }
    }

    /// A copy of the state a step changes.
    fn save(&self) -> SavedState;

    /// Restores a state from [`RangeOptimizer::save`] (undoing the steps since).
    fn restore(&mut self, saved: SavedState);

    /// The state as plain values for a checkpoint, or `None` for an optimizer whose state
    /// checkpoints do not hold.
    fn export_state(&self) -> Option<crate::engine::OptimState> {
        None
    }
}

impl<F: FnMut(&mut [f32], &[f32]) + Send + Clone + 'static> RangeOptimizer for F {
    fn step(&mut self, params: &mut [f32], mean_grad: &[f32]) {
        self(params, mean_grad)
    }

    fn save(&self) -> SavedState {
        Box::new(self.clone())
    }

    fn restore(&mut self, saved: SavedState) {
        if let Ok(f) = saved.downcast::<F>() {
            *self = *f;
        }
    }
}

/// What a checkpoint saves of one range ([`GlobalAggregator::export_range`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSnapshot {
    /// The range's version (rounds applied).
    pub version: u64,
    /// θ of the range.
    pub params: Vec<f32>,
    /// The optimizer's state, `None` when it keeps state checkpoints do not hold.
    pub opt: Option<crate::engine::OptimState>,
    /// Delta replies with a lossy tier: the rounding remainder carried into the next increment
    /// (empty otherwise).
    pub carry: Vec<f32>,
}

/// One DC's push for a range: its sum over `count` workers, or `None` when the DC dropped the
/// round (a non-finite value under [`NonFinitePolicy::Skip`]).
pub type DcPush = (Option<Vec<f32>>, u32);

/// State of one owned range.
struct RangeState {
    params: Vec<f32>,
    version: u64,
    opt: Box<dyn RangeOptimizer>,
    pushes: Vec<Option<DcPush>>,
    mode: ReplyMode,
    /// Delta mode with a lossy tier: the part of past increments the codecs did not carry, added
    /// to the next increment (error feedback; empty otherwise).
    carry: Vec<f32>,
    /// Delta mode of a sparse key (HFA with a sparse inter codec): increments go down as their
    /// `k` largest entries ([`sparse_step`]), the rest stays in `carry`.
    sparse_k: Option<usize>,
}

impl RangeState {
    /// The encoded increment `delta` of this range (sparse or dense, per [`RangeState::sparse_k`]).
    fn increment(
        &self,
        delta: &[f32],
        inter: &TierCodec,
        intra: &TierCodec,
        id: usize,
    ) -> Result<DenseStep, String> {
        match self.sparse_k {
            Some(k) => sparse_step(delta, k, inter, intra, id),
            None => dense_step(delta, inter, intra, id),
        }
    }
}

/// Why a round was dropped for a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipCause {
    /// A DC dropped its push.
    Upstream,
    /// No worker of any DC counted in the round (all lost, rejoining later): θ stays.
    NoWorkers,
    /// A non-finite value at this server (`what`: sum, quantized mean, increment, step).
    NonFinite(&'static str),
}

/// A completed round of one range.
#[derive(Debug)]
pub struct RoundDone {
    /// The range's version after the round (r + 1).
    pub version: u64,
    /// The payload codec of the reply.
    pub codec: PayloadCodec,
    /// The reply every DC receives (see the module docs).
    pub reply: Vec<u8>,
    /// Set when the round was dropped: θ and the optimizer state did not change.
    pub skipped: Option<SkipCause>,
    /// Finite values that overflowed to ±inf in this round's encodings.
    pub overflow: usize,
    /// The DCs whose pushes the round summed, ascending (all unless some were lost).
    pub dcs: Vec<u32>,
}

/// The rounds a membership change completed: (range id, the round or why it failed).
pub type Completed = Vec<(usize, Result<RoundDone, AggError>)>;

/// Collects the DCs' pushes for the ranges one global server owns and applies the optimizer.
pub struct GlobalAggregator {
    n_dcs: usize,
    total_workers: u32,
    inter: TierCodec,
    intra: TierCodec,
    policy: NonFinitePolicy,
    ranges: BTreeMap<usize, RangeState>,
    /// Workers may be lost: a round counts the workers the DCs summed (1..=W) and divides by them.
    elastic: bool,
    /// Per DC: the first round it counts in; `None` while its local server is lost.
    dc_from: Vec<Option<u64>>,
    /// Fewest DCs a round may complete with (the quorum; D unless DCs may be lost).
    min_dcs: usize,
}

impl GlobalAggregator {
    /// An aggregator for `n_dcs` DCs with `total_workers` (W) workers in all, plain f32 tiers and
    /// the `abort` policy.
    pub fn new(n_dcs: usize, total_workers: u32) -> Self {
        Self {
            n_dcs,
            total_workers,
            inter: TierCodec::default(),
            intra: TierCodec::default(),
            policy: NonFinitePolicy::Abort,
            ranges: BTreeMap::new(),
            elastic: false,
            dc_from: vec![Some(0); n_dcs],
            min_dcs: n_dcs,
        }
    }

    /// Lets DCs be lost (`resilience.lost_dc = "continue"`): a round completes with the DCs
    /// present once at least `min_dcs` of them pushed; below the quorum it waits.
    pub fn with_elastic_dcs(mut self, min_dcs: usize) -> Self {
        self.min_dcs = min_dcs.clamp(1, self.n_dcs.max(1));
        self
    }

    fn counts(&self, dc: usize, round: u64) -> bool {
        self.dc_from
            .get(dc)
            .copied()
            .flatten()
            .is_some_and(|from| from <= round)
    }

    /// Whether range `id`'s round has every counting DC's push (and one at least) while the
    /// quorum of member DCs holds. The quorum counts members, not pushes: a DC that rejoined
    /// for a later round keeps an earlier round from waiting forever.
    fn ready(&self, id: usize) -> bool {
        let Some(r) = self.ranges.get(&id) else {
            return false;
        };
        let members = self.dc_from.iter().filter(|d| d.is_some()).count();
        let pushed = r.pushes.iter().any(Option::is_some);
        let waiting = (0..self.n_dcs).any(|d| self.counts(d, r.version) && r.pushes[d].is_none());
        // A round every member counts only after completes without pushes (nobody can push it).
        let later = self.dc_from.iter().flatten().any(|&from| from > r.version);
        (pushed || later) && !waiting && members >= self.min_dcs
    }

    /// Completes every owned range whose round no longer waits (after a membership change).
    fn complete_ready(&mut self) -> Completed {
        let ids: Vec<usize> = self
            .ranges
            .keys()
            .copied()
            .filter(|&id| self.ready(id))
            .collect();
        ids.into_iter().map(|id| (id, self.complete(id))).collect()
    }

    /// DC `dc`'s local server is lost: its pushes of the rounds being collected are dropped and
    /// it no longer counts. Returns the rounds that complete without it.
    pub fn lose_dc(&mut self, dc: usize) -> Completed {
        let Some(m) = self.dc_from.get_mut(dc) else {
            return Vec::new();
        };
        *m = None;
        for r in self.ranges.values_mut() {
            r.pushes[dc] = None;
        }
        self.complete_ready()
    }

    /// The highest round an owned range collects.
    pub fn top_round(&self) -> u64 {
        self.ranges.values().map(|r| r.version).max().unwrap_or(0)
    }

    /// Each DC's first counted round (`None`: lost), as a restart's checkpoint keeps it.
    pub fn dc_members(&self) -> &[Option<u64>] {
        &self.dc_from
    }

    /// Restores [`GlobalAggregator::dc_members`]: a restarted global server counts the DCs its
    /// checkpoint's round counted. An error for another number of DCs.
    pub fn set_dc_members(&mut self, members: Vec<Option<u64>>) -> Result<(), String> {
        if members.len() != self.dc_from.len() {
            return Err(format!(
                "membership of {} data centers, the job has {}",
                members.len(),
                self.dc_from.len()
            ));
        }
        self.dc_from = members;
        Ok(())
    }

    /// Whether DC `dc` counts (its local server is not lost).
    pub fn dc_is_member(&self, dc: usize) -> bool {
        self.dc_from.get(dc).is_some_and(Option::is_some)
    }

    /// DC `dc`'s local server comes back, or moves its start later: it counts from `at_least` or
    /// the highest round an owned range collects, whichever is higher (returned), together with
    /// the rounds that no longer wait for it. `None` for an unknown DC.
    pub fn join_dc(&mut self, dc: usize, at_least: u64) -> Option<(u64, Completed)> {
        let from = at_least.max(self.top_round());
        *self.dc_from.get_mut(dc)? = Some(from);
        Some((from, self.complete_ready()))
    }

    /// Lets a round count fewer than W workers (lost workers, `resilience.lost_worker =
    /// "continue"`): the global step divides by the workers actually summed.
    pub fn with_elastic_counts(mut self, elastic: bool) -> Self {
        self.elastic = elastic;
        self
    }

    /// Sets the tier codecs the replies travel through (inter: to the local servers; intra: on
    /// to the workers).
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

    /// Takes ownership of range `id` with initial values `params` at version `version`; it
    /// replies with θ until [`GlobalAggregator::set_mode`] says otherwise.
    pub fn add_range(
        &mut self,
        id: usize,
        params: Vec<f32>,
        version: u64,
        opt: Box<dyn RangeOptimizer>,
    ) {
        self.ranges.insert(
            id,
            RangeState {
                params,
                version,
                opt,
                pushes: vec![None; self.n_dcs],
                mode: ReplyMode::Theta,
                carry: Vec::new(),
                sparse_k: None,
            },
        );
    }

    /// Sets how range `id` replies (see [`ReplyMode`]).
    pub fn set_mode(&mut self, id: usize, mode: ReplyMode) {
        let lossy = self.inter.dense_type() != geomx_kernels::ValueType::F32
            || self.intra.dense_type() != geomx_kernels::ValueType::F32;
        if let Some(r) = self.ranges.get_mut(&id) {
            r.mode = mode;
            r.carry = if mode == ReplyMode::Delta && lossy {
                vec![0.0; r.params.len()]
            } else {
                Vec::new()
            };
        }
    }

    /// Range `id` (Delta mode) sends its increments as their `k` largest entries and carries the
    /// rest into the next increment (HFA with a sparse inter codec).
    pub fn set_sparse_increments(&mut self, id: usize, k: usize) {
        if let Some(r) = self.ranges.get_mut(&id) {
            r.sparse_k = Some(k);
            r.carry = vec![0.0; r.params.len()];
        }
    }

    /// Ids of the owned ranges, ascending.
    pub fn range_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranges.keys().copied()
    }

    /// Current version and values of range `id`.
    pub fn get(&self, id: usize) -> Option<(u64, &[f32])> {
        self.ranges
            .get(&id)
            .map(|r| (r.version, r.params.as_slice()))
    }

    /// What a checkpoint saves of range `id` (`None` for a range not owned).
    pub fn export_range(&self, id: usize) -> Option<RangeSnapshot> {
        self.ranges.get(&id).map(|r| RangeSnapshot {
            version: r.version,
            params: r.params.clone(),
            opt: r.opt.export_state(),
            carry: r.carry.clone(),
        })
    }

    /// Restores range `id`'s rounding carry from a [`RangeSnapshot`] (after
    /// [`GlobalAggregator::set_mode`], which sizes it); another length is refused.
    pub fn set_carry(&mut self, id: usize, carry: Vec<f32>) -> Result<(), String> {
        let r = self
            .ranges
            .get_mut(&id)
            .ok_or_else(|| format!("range {id} is not owned here"))?;
        if carry.len() != r.carry.len() {
            return Err(format!(
                "range {id}: carry of {} values, expected {}",
                carry.len(),
                r.carry.len()
            ));
        }
        r.carry = carry;
        Ok(())
    }

    /// Values of range `id` if its version is at least `min_version` (a `Pull`).
    pub fn pull(&self, id: usize, min_version: u64) -> Result<Option<&[f32]>, AggError> {
        let r = self.ranges.get(&id).ok_or(AggError::UnknownKey(id))?;
        Ok((r.version >= min_version).then_some(r.params.as_slice()))
    }

    /// Records DC `dc`'s push of its sum `sum` over `count` workers for `(id, round)`. When this
    /// was the last missing DC, applies the optimizer and returns the new values θ_{round+1}.
    pub fn push(
        &mut self,
        id: usize,
        dc: usize,
        round: u64,
        sum: Vec<f32>,
        count: u32,
    ) -> Result<Option<&[f32]>, AggError> {
        if self
            .push_round(id, dc, round, (Some(sum), count))?
            .is_none()
        {
            return Ok(None);
        }
        Ok(self.get(id).map(|(_, p)| p))
    }

    /// Records DC `dc`'s push for `(id, round)`; when it was the last missing DC, completes the
    /// round and returns its reply.
    pub fn push_round(
        &mut self,
        id: usize,
        dc: usize,
        round: u64,
        push: DcPush,
    ) -> Result<Option<RoundDone>, AggError> {
        let n_dcs = self.n_dcs;
        let r = self.ranges.get_mut(&id).ok_or(AggError::UnknownKey(id))?;
        if round != r.version {
            return Err(AggError::WrongVersion {
                key: id,
                expected: r.version,
                got: round,
            });
        }
        if let Some(s) = &push.0 {
            if s.len() != r.params.len() {
                return Err(AggError::LengthMismatch {
                    key: id,
                    expected: r.params.len(),
                    got: s.len(),
                });
            }
        }
        let cell = r.pushes.get_mut(dc).ok_or(AggError::BadSender {
            sender: dc,
            n: n_dcs,
        })?;
        if cell.is_some() {
            return Err(AggError::Duplicate {
                key: id,
                round,
                sender: dc,
            });
        }
        if !self.counts(dc, round) {
            return Err(AggError::NotMember {
                key: id,
                round,
                rank: dc,
            });
        }
        if let Some(cell) = self.ranges.get_mut(&id).and_then(|r| r.pushes.get_mut(dc)) {
            *cell = Some(push);
        }
        if !self.ready(id) {
            return Ok(None);
        }
        self.complete(id).map(Some)
    }

    /// All D pushes of range `id` are in: sums them and steps (or drops the round).
    fn complete(&mut self, id: usize) -> Result<RoundDone, AggError> {
        let w = self.total_workers;
        let r = self.ranges.get_mut(&id).ok_or(AggError::UnknownKey(id))?;
        let mut counted = 0u64;
        let mut skipped_dc = false;
        let mut g: Option<Vec<f32>> = None;
        // Absent DCs (lost, or not counting yet) have no cell.
        let dcs: Vec<u32> = (0..r.pushes.len())
            .filter(|&d| r.pushes[d].is_some())
            .map(|d| d as u32)
            .collect();
        let elastic = self.elastic;
        for (s, c) in r.pushes.iter_mut().filter_map(Option::take) {
            counted += u64::from(c);
            match (s, g.as_mut()) {
                // A DC that summed no worker (count 0, lost workers) is absent, not dropped.
                (None, _) if elastic && c == 0 => {}
                (None, _) => skipped_dc = true,
                (Some(s), None) => g = Some(s),
                (Some(s), Some(acc)) => {
                    for (a, x) in acc.iter_mut().zip(&s) {
                        *a += *x;
                    }
                }
            }
        }
        let counts_ok = if self.elastic {
            // 0: no worker anywhere counted in this round; θ stays.
            counted <= u64::from(w)
        } else {
            counted == u64::from(w)
        };
        if !counts_ok {
            return Err(AggError::CountMismatch {
                key: id,
                got: counted,
                expected: w,
            });
        }
        // The mean is over the workers summed: all W unless some were lost.
        let w = counted as u32;
        let round = r.version;
        let mut overflow = 0;
        let stepped = match g {
            Some(g) if !skipped_dc => step_range(
                r,
                id,
                g,
                &self.inter,
                &self.intra,
                w,
                self.policy,
                &mut overflow,
            ),
            None if counted == 0 => Err(SkipCause::NoWorkers),
            _ => Err(SkipCause::Upstream),
        };
        let (reply, skipped) = match stepped {
            Ok(reply) => (reply, None),
            Err(SkipCause::NonFinite(what)) if self.policy == NonFinitePolicy::Abort => {
                return Err(AggError::NonFinite {
                    key: id,
                    round,
                    what,
                });
            }
            Err(cause) => (skip_reply(r, id, &self.inter, &self.intra)?, Some(cause)),
        };
        let (codec, reply) = match reply {
            Reply::Dense(codec, bytes) => (codec, bytes),
            Reply::Sparse(sparse) => {
                let theta = self.inter.resync_due(round).then_some(&r.params[..]);
                let bytes = Update::encode_parts(&sparse, theta, skipped.is_some());
                (PayloadCodec::Raw, bytes)
            }
        };
        r.version += 1;
        Ok(RoundDone {
            version: r.version,
            codec,
            reply,
            skipped,
            overflow,
            dcs,
        })
    }
}

/// Runs `f` on the range's optimizer; if `f` reports a non-finite result, the state saved before
/// (under `skip`) is restored.
fn guarded<T>(
    r: &mut RangeState,
    policy: NonFinitePolicy,
    f: impl FnOnce(&mut RangeState) -> Result<T, SkipCause>,
) -> Result<T, SkipCause> {
    let saved = (policy == NonFinitePolicy::Skip).then(|| r.opt.save());
    let out = f(r);
    if let (Err(_), Some(s)) = (&out, saved) {
        r.opt.restore(s);
    }
    out
}

fn finite(x: &[f32], what: &'static str) -> Result<(), SkipCause> {
    if count_nonfinite(x) == 0 {
        Ok(())
    } else {
        Err(SkipCause::NonFinite(what))
    }
}

/// What a range answers, before a sparse update gets its θ and flags.
enum Reply {
    /// A dense payload.
    Dense(PayloadCodec, Vec<u8>),
    /// The encoded sparse sum of an [`Update`].
    Sparse(Vec<u8>),
}

/// One round's step of range `r` (id `id`) with the DCs' sum `g`; returns the reply, or why the
/// round is dropped (θ and the optimizer state then unchanged).
#[allow(clippy::too_many_arguments)]
fn step_range(
    r: &mut RangeState,
    id: usize,
    mut g: Vec<f32>,
    inter: &TierCodec,
    intra: &TierCodec,
    w: u32,
    policy: NonFinitePolicy,
    overflow: &mut usize,
) -> Result<Reply, SkipCause> {
    finite(&g, "global sum")?;
    let wf = w as f32;
    match r.mode {
        ReplyMode::Theta => {
            for a in g.iter_mut() {
                *a /= wf;
            }
            let before = (policy == NonFinitePolicy::Skip).then(|| r.params.clone());
            let res = guarded(r, policy, |r| {
                r.opt.step(&mut r.params, &g);
                finite(&r.params, "optimizer step")
            });
            if let (Err(_), Some(b)) = (&res, before) {
                r.params = b;
            }
            res?;
            let theta = {
                let _codec = crate::clock::span();
                f32_bytes(&r.params).into_owned()
            };
            Ok(Reply::Dense(PayloadCodec::DenseF32, theta))
        }
        ReplyMode::Delta => {
            for a in g.iter_mut() {
                *a /= wf;
            }
            let mut delta = vec![0.0f32; r.params.len()];
            let step = guarded(r, policy, |r| {
                r.opt.increment(&r.params, &g, &mut delta);
                finite(&delta, "optimizer step")?;
                for (d, &c) in delta.iter_mut().zip(&r.carry) {
                    *d += c;
                }
                let s = r
                    .increment(&delta, inter, intra, id)
                    .map_err(|_| SkipCause::NonFinite("encoded increment"))?;
                finite(&s.applied, "encoded increment")?;
                if r.params
                    .iter()
                    .zip(&s.applied)
                    .any(|(&p, &z)| !(p + z).is_finite())
                {
                    return Err(SkipCause::NonFinite("optimizer step"));
                }
                Ok(s)
            })?;
            *overflow += step.overflow;
            for (c, (&d, &z)) in r.carry.iter_mut().zip(delta.iter().zip(&step.applied)) {
                *c = d - z;
            }
            for (p, &z) in r.params.iter_mut().zip(&step.applied) {
                *p += z;
            }
            Ok(Reply::Dense(step.reply.codec, step.reply.bytes))
        }
        ReplyMode::Sparse => {
            let sparse = SparseVec::from_dense_nonzero(&g)
                .map_err(|_| SkipCause::NonFinite("global sum"))?;
            let mut inter_bytes = Vec::new();
            let nonfinite = sparse.encode(inter.sparse_values(), inter.scaling(), &mut inter_bytes);
            *overflow += nonfinite;
            let sum = SparseVec::decode(&inter_bytes, id as u64, g.len())
                .map_err(|_| SkipCause::NonFinite("encoded global sum"))?;
            finite(sum.values(), "encoded global sum")?;
            let (mean_bytes, of) = sparse_mean(&sum, w, intra);
            *overflow += of;
            let mean = SparseVec::decode(&mean_bytes, id as u64, g.len())
                .map_err(|_| SkipCause::NonFinite("quantized mean"))?;
            finite(mean.values(), "quantized mean")?;
            // The dense mean every worker will step with: zeros and the decoded entries.
            g.fill(0.0);
            mean.scatter_add_into(&mut g)
                .map_err(|_| SkipCause::NonFinite("quantized mean"))?;
            let before = (policy == NonFinitePolicy::Skip).then(|| r.params.clone());
            let res = guarded(r, policy, |r| {
                r.opt.step(&mut r.params, &g);
                finite(&r.params, "optimizer step")
            });
            if let (Err(_), Some(b)) = (&res, before) {
                r.params = b;
            }
            res?;
            Ok(Reply::Sparse(inter_bytes))
        }
    }
}

/// The reply of a dropped round: θ unchanged (Theta), a zero increment that every holder adds
/// (Delta; the aggregator adds it too, so a −0 element turns +0 everywhere alike), or an empty
/// sum (Sparse; flagged skipped by the caller).
fn skip_reply(
    r: &mut RangeState,
    id: usize,
    inter: &TierCodec,
    intra: &TierCodec,
) -> Result<Reply, AggError> {
    let internal = |message: String| AggError::Optimizer { key: id, message };
    Ok(match r.mode {
        ReplyMode::Theta => Reply::Dense(PayloadCodec::DenseF32, f32_bytes(&r.params).into_owned()),
        ReplyMode::Delta => {
            let zeros = vec![0.0f32; r.params.len()];
            let s = r.increment(&zeros, inter, intra, id).map_err(internal)?;
            for (p, &z) in r.params.iter_mut().zip(&s.applied) {
                *p += z;
            }
            Reply::Dense(s.reply.codec, s.reply.bytes)
        }
        ReplyMode::Sparse => {
            let empty = SparseVec::new(r.params.len() as u32, Vec::new(), Vec::new())
                .map_err(|e| internal(e.to_string()))?;
            let mut bytes = Vec::new();
            empty.encode(inter.sparse_values(), inter.scaling(), &mut bytes);
            Reply::Sparse(bytes)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hips::LocalAggregator;

    fn sgd(lr: f32) -> Box<dyn RangeOptimizer> {
        Box::new(move |p: &mut [f32], g: &[f32]| {
            for (p, g) in p.iter_mut().zip(g) {
                *p -= lr * *g;
            }
        })
    }

    /// The engine's SGD with momentum (stateful: a skipped round must leave the momentum alone).
    fn momentum(lr: f32, n: usize) -> Box<dyn RangeOptimizer> {
        let cfg = crate::engine::OptimizerConfig::Sgd(crate::engine::optim::SgdConfig {
            lr,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        });
        Box::new(crate::engine::Optimizer::new(&cfg, n))
    }

    /// Deterministic "awkward" f32 values (not exactly representable sums).
    fn vals(seed: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x =
                    (seed.wrapping_mul(2_654_435_761) ^ (i as u32).wrapping_mul(40_503)) % 10_007;
                (x as f32 - 5003.0) / 977.0 + 1.0e-3 * seed as f32
            })
            .collect()
    }

    /// hips.md oracle 1 through both tiers: 2 DCs × 2 workers, plain SGD with lr 1.
    #[test]
    fn oracle1_mean_of_four_workers_bit_exact() {
        let n = 33;
        let theta0 = vals(99, n);
        let g: Vec<Vec<f32>> = (0..4).map(|i| vals(i + 1, n)).collect();
        let mut locals = [
            LocalAggregator::new(&[n], 2, 0),
            LocalAggregator::new(&[n], 2, 0),
        ];
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(0, theta0.clone(), 0, sgd(1.0));
        // Arrival orders differ from rank order on purpose.
        assert!(locals[0].push(0, 0, 1, g[1].clone()).unwrap().is_none());
        let s1 = locals[0].push(0, 0, 0, g[0].clone()).unwrap().unwrap();
        assert!(locals[1].push(0, 0, 1, g[3].clone()).unwrap().is_none());
        let s2 = locals[1].push(0, 0, 0, g[2].clone()).unwrap().unwrap();
        // DC 2 arrives first.
        assert!(global.push(0, 1, 0, s2.sum, 2).unwrap().is_none());
        let theta1 = global.push(0, 0, 0, s1.sum, 2).unwrap().unwrap().to_vec();
        for i in 0..n {
            let expect = theta0[i] - ((g[0][i] + g[1][i]) + (g[2][i] + g[3][i])) / 4.0;
            assert_eq!(theta1[i].to_bits(), expect.to_bits(), "element {i}");
        }
        assert_eq!(global.get(0).unwrap().0, 1);
    }

    /// Oracle 1, second part: 3 workers in one DC and 1 in the other still weigh 1/4 each.
    #[test]
    fn oracle1_uneven_dcs_weigh_every_worker_equally() {
        let n = 17;
        let theta0 = vals(7, n);
        let g: Vec<Vec<f32>> = (0..4).map(|i| vals(i + 11, n)).collect();
        let mut dc0 = LocalAggregator::new(&[n], 3, 0);
        let mut dc1 = LocalAggregator::new(&[n], 1, 0);
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(0, theta0.clone(), 0, sgd(1.0));
        dc0.push(0, 0, 2, g[2].clone()).unwrap();
        dc0.push(0, 0, 0, g[0].clone()).unwrap();
        let s0 = dc0.push(0, 0, 1, g[1].clone()).unwrap().unwrap();
        let s1 = dc1.push(0, 0, 0, g[3].clone()).unwrap().unwrap();
        global.push(0, 0, 0, s0.sum, 3).unwrap();
        let theta1 = global.push(0, 1, 0, s1.sum, 1).unwrap().unwrap();
        for i in 0..n {
            let expect = theta0[i] - (((g[0][i] + g[1][i]) + g[2][i]) + g[3][i]) / 4.0;
            assert_eq!(theta1[i].to_bits(), expect.to_bits(), "element {i}");
        }
    }

    /// Oracle 2 (SGD part): fixed pushes that are multiples of 2^-8, lr and W powers of two, so the
    /// closed form θ_R = θ_0 − R·lr·(Σ g)/W is exact.
    #[test]
    fn oracle2_known_rounds_closed_form() {
        let n = 8;
        let theta0: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let g: Vec<Vec<f32>> = (0..4)
            .map(|w| {
                (0..n)
                    .map(|i| ((w * 37 + i * 11) % 64) as f32 / 256.0)
                    .collect()
            })
            .collect();
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(0, theta0.clone(), 0, sgd(0.5));
        let rounds = 20u64;
        for r in 0..rounds {
            let s0: Vec<f32> = (0..n).map(|i| g[0][i] + g[1][i]).collect();
            let s1: Vec<f32> = (0..n).map(|i| g[2][i] + g[3][i]).collect();
            global.push(0, 0, r, s0, 2).unwrap();
            global.push(0, 1, r, s1, 2).unwrap().unwrap();
        }
        let (v, theta) = global.get(0).unwrap();
        assert_eq!(v, rounds);
        for i in 0..n {
            let sum: f32 = (0..4).map(|w| g[w][i]).sum();
            let expect = theta0[i] - rounds as f32 * 0.5 * sum / 4.0;
            assert_eq!(theta[i], expect, "element {i}");
        }
    }

    #[test]
    fn a_lost_dc_leaves_the_rounds_the_quorum_holds_and_rejoins_later() {
        // 3 DCs × 1 worker, quorum 2; ranges 0 and 1.
        let mut agg = GlobalAggregator::new(3, 3)
            .with_elastic_counts(true)
            .with_elastic_dcs(2);
        agg.add_range(0, vec![0.0; 1], 0, sgd(1.0));
        agg.add_range(1, vec![0.0; 1], 0, sgd(1.0));
        // Whether DC `dc`'s push of `v` to range `id` at `round` completed the round.
        let done_by = |agg: &mut GlobalAggregator, id, dc, round, v: f32| {
            agg.push_round(id, dc, round, (Some(vec![v]), 1))
                .unwrap()
                .is_some()
        };
        assert!(!done_by(&mut agg, 0, 0, 0, 3.0));
        assert!(!done_by(&mut agg, 0, 2, 0, 6.0));
        assert!(!done_by(&mut agg, 1, 1, 0, 1.0));
        // DC 1 lost: range 0 completes with DCs 0 and 2 (mean over 2 workers); range 1 drops
        // DC 1's push and waits.
        let done = agg.lose_dc(1);
        assert_eq!(done.len(), 1);
        let (id, d) = &done[0];
        assert_eq!((*id, d.as_ref().unwrap().version), (0, 1));
        assert_eq!(agg.get(0).unwrap().1, &[-4.5]);
        assert!(matches!(
            agg.push_round(1, 1, 0, (Some(vec![1.0]), 1)),
            Err(AggError::NotMember { rank: 1, .. })
        ));
        // DC 2 lost too: one member is below the quorum, so DC 0's push waits.
        assert!(agg.lose_dc(2).is_empty());
        assert!(!done_by(&mut agg, 1, 0, 0, 2.0));
        // DC 2 rejoins: range 0 collects round 1, so it counts from there; the quorum is back
        // and range 1's round 0 completes with DC 0 alone.
        let (from, done) = agg.join_dc(2, 0).unwrap();
        assert_eq!((from, done.len()), (1, 1));
        assert_eq!(agg.get(1).unwrap().1, &[-2.0]);
        // Round 1 needs DCs 0 and 2; DC 1 rejoins later, from round 2.
        assert!(!done_by(&mut agg, 0, 0, 1, 0.0));
        assert!(done_by(&mut agg, 0, 2, 1, 0.0));
        let (from, done) = agg.join_dc(1, 0).unwrap();
        assert_eq!((from, done.len()), (2, 0));
        assert!(agg.dc_is_member(1));
        assert!(!done_by(&mut agg, 1, 0, 1, 0.0));
        // Moving DC 2's start later releases the round that waited for it.
        let (from, done) = agg.join_dc(2, 2).unwrap();
        assert_eq!((from, done.len()), (2, 1));
    }

    #[test]
    fn a_round_no_worker_counted_in_keeps_theta_and_absent_dcs_are_not_drops() {
        let mut agg = GlobalAggregator::new(2, 2).with_elastic_counts(true);
        agg.add_range(0, vec![1.0; 1], 0, sgd(1.0));
        // DC 0 summed nobody (count 0, no values), DC 1 one worker: the mean is DC 1's.
        agg.push_round(0, 0, 0, (None, 0)).unwrap();
        let d = agg
            .push_round(0, 1, 0, (Some(vec![0.5]), 1))
            .unwrap()
            .unwrap();
        assert_eq!((d.skipped, d.dcs.clone()), (None, vec![0, 1]));
        assert_eq!(agg.get(0).unwrap().1, &[0.5]);
        // Both absent: the round completes without a step.
        agg.push_round(0, 0, 1, (None, 0)).unwrap();
        let d = agg.push_round(0, 1, 1, (None, 0)).unwrap().unwrap();
        assert_eq!(d.skipped, Some(SkipCause::NoWorkers));
        assert_eq!(agg.get(0).unwrap(), (2, &[0.5][..]));
    }

    #[test]
    fn elastic_counts_divide_by_the_workers_summed() {
        // W = 4, but DC 0 summed 1 of its 2 workers: the mean is over 3.
        let theta0 = vec![1.0f32; 3];
        let g = [vec![0.3f32, -0.7, 1.1], vec![0.9f32, 0.2, -0.4]];
        let mut strict = GlobalAggregator::new(2, 4);
        strict.add_range(0, theta0.clone(), 0, sgd(1.0));
        strict.push(0, 0, 0, g[0].clone(), 1).unwrap();
        assert!(matches!(
            strict.push(0, 1, 0, g[1].clone(), 2),
            Err(AggError::CountMismatch { got: 3, .. })
        ));
        let mut elastic = GlobalAggregator::new(2, 4).with_elastic_counts(true);
        elastic.add_range(0, theta0.clone(), 0, sgd(1.0));
        elastic.push(0, 0, 0, g[0].clone(), 1).unwrap();
        let theta1 = elastic.push(0, 1, 0, g[1].clone(), 2).unwrap().unwrap();
        for i in 0..3 {
            let expect = theta0[i] - (g[0][i] + g[1][i]) / 3.0;
            assert_eq!(theta1[i].to_bits(), expect.to_bits(), "element {i}");
        }
        // More than W is still refused.
        elastic.push(0, 0, 1, g[0].clone(), 4).unwrap();
        assert!(matches!(
            elastic.push(0, 1, 1, g[1].clone(), 1),
            Err(AggError::CountMismatch { got: 5, .. })
        ));
    }

    #[test]
    fn rejects_wrong_version_count_and_duplicates() {
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(3, vec![0.0; 2], 0, sgd(1.0));
        assert!(matches!(
            global.push(3, 0, 1, vec![0.0; 2], 2),
            Err(AggError::WrongVersion { .. })
        ));
        assert!(matches!(
            global.push(4, 0, 0, vec![0.0; 2], 2),
            Err(AggError::UnknownKey(4))
        ));
        assert!(matches!(
            global.push(3, 2, 0, vec![0.0; 2], 2),
            Err(AggError::BadSender { .. })
        ));
        global.push(3, 0, 0, vec![0.0; 2], 2).unwrap();
        assert!(matches!(
            global.push(3, 0, 0, vec![0.0; 2], 2),
            Err(AggError::Duplicate { .. })
        ));
        assert_eq!(
            global.push(3, 1, 0, vec![0.0; 2], 1).err(),
            Some(AggError::CountMismatch {
                key: 3,
                got: 3,
                expected: 4
            })
        );
    }

    #[test]
    fn pull_waits_for_version() {
        let mut global = GlobalAggregator::new(1, 1);
        global.add_range(0, vec![1.0], 0, sgd(1.0));
        assert_eq!(global.pull(0, 0).unwrap(), Some(&[1.0f32][..]));
        assert_eq!(global.pull(0, 1).unwrap(), None);
        global.push(0, 0, 0, vec![0.5], 1).unwrap();
        assert_eq!(global.pull(0, 1).unwrap(), Some(&[0.5f32][..]));
        assert_eq!(global.range_ids().collect::<Vec<_>>(), vec![0]);
    }

    /// DC 0 then DC 1 (one worker each) push `a` and `b` for range 0 at `round`; the second
    /// push completes the round.
    fn two_dc_round(global: &mut GlobalAggregator, round: u64, a: &[f32], b: &[f32]) -> RoundDone {
        assert!(global
            .push_round(0, 0, round, (Some(a.to_vec()), 1))
            .unwrap()
            .is_none());
        global
            .push_round(0, 1, round, (Some(b.to_vec()), 1))
            .unwrap()
            .unwrap()
    }

    fn tier(codec: crate::config::Codec) -> TierCodec {
        TierCodec::from_config(&codec, 1)
    }

    fn fp16_unscaled() -> TierCodec {
        tier(crate::config::Codec::Fp16(crate::config::Fp16Codec {
            scaling: crate::config::ScalingKind::None,
        }))
    }

    /// Delta mode (FP16 on the WAN, BF16 on the LAN): the aggregator's θ equals θ_0 plus what a
    /// worker decodes after the local server's re-encoding, bit for bit, round after round; the
    /// first increment matches an independent reference (−lr·ḡ through `half`'s FP16 then BF16
    /// casts); and with error feedback the applied increments add up to the unquantized ones.
    #[test]
    fn delta_replies_are_what_the_aggregator_applies() {
        let n = 29;
        let theta0 = vals(5, n);
        let (inter, intra) = (fp16_unscaled(), tier(crate::config::Codec::Bf16));
        let mut global = GlobalAggregator::new(2, 2).with_codecs(inter.clone(), intra.clone());
        global.add_range(0, theta0.clone(), 0, sgd(0.01));
        global.set_mode(0, ReplyMode::Delta);
        let mut replica = theta0.clone();
        let mut exact = theta0.clone();
        for round in 0..5u64 {
            let (a, b) = (vals(round as u32 + 10, n), vals(round as u32 + 20, n));
            let d = two_dc_round(&mut global, round, &a, &b);
            assert_eq!(d.version, round + 1);
            assert!(d.skipped.is_none());
            // Local server, then worker.
            let y = inter.decode_dense(&d.reply, 0, n).unwrap();
            let seg = crate::codec::down::forward_dense(&y, &intra);
            let z = intra.decode_dense(&seg.bytes, 0, n).unwrap();
            for (p, dz) in replica.iter_mut().zip(&z) {
                *p += *dz;
            }
            let (_, theta) = global.get(0).unwrap();
            for i in 0..n {
                assert_eq!(
                    theta[i].to_bits(),
                    replica[i].to_bits(),
                    "round {round} {i}"
                );
            }
            for i in 0..n {
                let g = (a[i] + b[i]) / 2.0;
                if round == 0 {
                    let step = theta0[i] - 0.01 * g - theta0[i];
                    let want = half::bf16::from_f32(half::f16::from_f32(step).to_f32()).to_f32();
                    assert_eq!(z[i].to_bits(), want.to_bits(), "element {i}");
                }
                exact[i] -= 0.01 * g;
            }
        }
        // Error feedback keeps the quantized trajectory within one BF16 quantum of the exact one
        // (|steps| ≤ 0.1, BF16 keeps 8 bits: tolerance 0.1·2^-7).
        let (_, theta) = global.get(0).unwrap();
        for i in 0..n {
            assert!((theta[i] - exact[i]).abs() <= 0.1 / 128.0, "element {i}");
        }
    }

    /// HFA with Bi-Sparse: DCs push sparse model deltas; the increment goes down as its k
    /// largest entries. With no more than k non-zeros it is exactly the mean delta (against an
    /// element-wise reference); with more, the rest is carried and sent in the next round, so
    /// the milestone ends at θ_0 + Σ mean deltas, bit for bit.
    #[test]
    fn sparse_increments_send_the_largest_entries_and_carry_the_rest() {
        let n = 40;
        let theta0 = vals(3, n);
        let codec = crate::config::Codec::Bisparse(crate::config::SparseCodec {
            min_size: 1,
            ..Default::default()
        });
        let (inter, intra) = (tier(codec), TierCodec::default());
        let mut global = GlobalAggregator::new(2, 2).with_codecs(inter, intra);
        let avg = crate::config::HfaConfig::default();
        let opt = Box::new(crate::hips::hfa::OuterStep::new(&avg, n).unwrap());
        global.add_range(0, theta0.clone(), 0, opt);
        global.set_mode(0, ReplyMode::Delta);
        global.set_sparse_increments(0, 6);
        let sparse = |entries: &[(usize, f32)]| {
            let mut v = vec![0.0f32; n];
            for &(i, x) in entries {
                v[i] = x;
            }
            v
        };
        let rounds = [
            // 5 distinct non-zeros in the mean: all sent.
            (
                sparse(&[(1, 0.5), (5, -0.25), (9, 0.125)]),
                sparse(&[(5, 0.75), (20, -1.5), (30, 0.0625)]),
            ),
            // 10: the 6 largest in magnitude go, 4 are carried.
            (
                sparse(&[(0, 0.1), (2, -0.9), (4, 0.3), (6, 0.7), (8, -0.05)]),
                sparse(&[(11, 0.2), (13, -0.6), (15, 0.4), (17, 0.8), (19, -0.01)]),
            ),
            // Nothing new: the 4 carried entries go.
            (vec![0.0; n], vec![0.0; n]),
        ];
        let mut replica = theta0.clone();
        let mut want = theta0.clone();
        let mut sent = Vec::new();
        for (round, (a, b)) in rounds.iter().enumerate() {
            let round = round as u64;
            let d = two_dc_round(&mut global, round, a, b);
            // What a local server decodes (and, with a plain LAN, what the workers add).
            let z = crate::codec::decode_any(&d.reply, 0, n).unwrap();
            sent.push(z.iter().filter(|x| **x != 0.0).count());
            for (p, dz) in replica.iter_mut().zip(&z) {
                *p += *dz;
            }
            for i in 0..n {
                want[i] += (a[i] + b[i]) / 2.0;
            }
            if round == 0 {
                for i in 0..n {
                    assert_eq!(z[i].to_bits(), ((a[i] + b[i]) / 2.0).to_bits(), "{i}");
                }
            }
            if round == 1 {
                // The six largest |mean|: 0.45 (2), 0.35 (6), 0.4 (17), 0.3 (13), 0.2 (15), 0.15 (4).
                let nz: Vec<usize> = (0..n).filter(|&i| z[i] != 0.0).collect();
                assert_eq!(nz, vec![2, 4, 6, 13, 15, 17]);
            }
        }
        assert_eq!(sent, vec![5, 6, 4]);
        let (_, theta) = global.get(0).unwrap();
        for i in 0..n {
            assert_eq!(theta[i].to_bits(), replica[i].to_bits(), "replica {i}");
            assert_eq!(theta[i].to_bits(), want[i].to_bits(), "reference {i}");
        }
    }

    /// Sparse mode with FP16 values on the WAN and BF16 on the LAN: a worker replica running the
    /// same optimizer on the mean it decodes ends bit-identical to the aggregator's θ.
    #[test]
    fn sparse_replies_let_replicas_step_to_the_same_theta() {
        let n = 40;
        let theta0 = vals(3, n);
        let inter = tier(crate::config::Codec::Bisparse(crate::config::SparseCodec {
            values: crate::config::SparseValues::Fp16,
            min_size: 10,
            ..Default::default()
        }));
        let intra = tier(crate::config::Codec::Bf16);
        let mut global = GlobalAggregator::new(2, 4).with_codecs(inter.clone(), intra.clone());
        global.add_range(0, theta0.clone(), 0, momentum(0.05, n));
        global.set_mode(0, ReplyMode::Sparse);
        let mut replica = theta0;
        let mut opt = momentum(0.05, n);
        for round in 0..4u64 {
            let sparse = |seed: u32| {
                let mut v = vals(seed, n);
                for (i, x) in v.iter_mut().enumerate() {
                    if (i as u32 + seed) % 3 != 0 {
                        *x = 0.0;
                    }
                }
                v
            };
            global
                .push_round(0, 0, round, (Some(sparse(round as u32)), 2))
                .unwrap();
            let d = global
                .push_round(0, 1, round, (Some(sparse(round as u32 + 1)), 2))
                .unwrap()
                .unwrap();
            let up = Update::decode(&d.reply, 0, n).unwrap();
            let (seg, _) = crate::codec::down::forward_sparse(&up, 4, &intra);
            let at_worker = Update::decode(&seg, 0, n).unwrap();
            let mut g = vec![0.0f32; n];
            at_worker.grad.scatter_add_into(&mut g).unwrap();
            opt.step(&mut replica, &g);
            let (_, theta) = global.get(0).unwrap();
            for i in 0..n {
                assert_eq!(
                    theta[i].to_bits(),
                    replica[i].to_bits(),
                    "round {round} {i}"
                );
            }
        }
    }

    /// A NaN in one DC's sum: under `abort` the push fails naming the range and round; under
    /// `skip` the round is dropped (θ and the momentum unchanged, version bumped), and the next
    /// rounds end exactly where a run without the bad round ends.
    #[test]
    fn non_finite_sums_abort_or_drop_the_round() {
        let n = 7;
        let theta0 = vals(1, n);
        let mut bad = vals(2, n);
        bad[3] = f32::NAN;
        let mut abort = GlobalAggregator::new(2, 2);
        abort.add_range(4, theta0.clone(), 0, momentum(0.1, n));
        abort.push_round(4, 0, 0, (Some(bad.clone()), 1)).unwrap();
        assert_eq!(
            abort.push_round(4, 1, 0, (Some(vals(3, n)), 1)).err(),
            Some(AggError::NonFinite {
                key: 4,
                round: 0,
                what: "global sum"
            })
        );
        for mode in [ReplyMode::Theta, ReplyMode::Delta] {
            let mut skip = GlobalAggregator::new(2, 2).with_policy(NonFinitePolicy::Skip);
            let mut clean = GlobalAggregator::new(2, 2);
            for a in [&mut skip, &mut clean] {
                a.add_range(4, theta0.clone(), 0, momentum(0.1, n));
                a.set_mode(4, mode);
            }
            skip.push_round(4, 0, 0, (Some(bad.clone()), 1)).unwrap();
            let d = skip
                .push_round(4, 1, 0, (Some(vals(3, n)), 1))
                .unwrap()
                .unwrap();
            assert_eq!(d.skipped, Some(SkipCause::NonFinite("global sum")));
            assert_eq!(d.version, 1);
            assert_eq!(skip.get(4).unwrap().1, &theta0[..]);
            for round in 1..4u64 {
                let (a, b) = (vals(round as u32 + 5, n), vals(round as u32 + 9, n));
                skip.push_round(4, 0, round, (Some(a.clone()), 1)).unwrap();
                skip.push_round(4, 1, round, (Some(b.clone()), 1)).unwrap();
                clean.push_round(4, 0, round - 1, (Some(a), 1)).unwrap();
                clean.push_round(4, 1, round - 1, (Some(b), 1)).unwrap();
            }
            assert_eq!(skip.get(4).unwrap().1, clean.get(4).unwrap().1, "{mode:?}");
        }
    }

    /// A step that overflows θ (lr 1e30) is undone under `skip`; a DC's dropped push drops the
    /// round too; a sparse range answers a dropped round with an empty update flagged skipped.
    #[test]
    fn overflowing_steps_and_dropped_pushes_are_skipped() {
        let n = 5;
        let theta0 = vals(8, n);
        let mut agg = GlobalAggregator::new(2, 2).with_policy(NonFinitePolicy::Skip);
        agg.add_range(0, theta0.clone(), 0, momentum(1.0e30, n));
        agg.push_round(0, 0, 0, (Some(vec![1.0e10; n]), 1)).unwrap();
        let d = agg
            .push_round(0, 1, 0, (Some(vec![1.0e10; n]), 1))
            .unwrap()
            .unwrap();
        assert_eq!(d.skipped, Some(SkipCause::NonFinite("optimizer step")));
        assert_eq!(agg.get(0).unwrap().1, &theta0[..]);
        agg.push_round(0, 0, 1, (None, 1)).unwrap();
        let d = agg
            .push_round(0, 1, 1, (Some(vec![0.0; n]), 1))
            .unwrap()
            .unwrap();
        assert_eq!(d.skipped, Some(SkipCause::Upstream));
        let inter = tier(crate::config::Codec::Bisparse(crate::config::SparseCodec {
            min_size: 1,
            ..Default::default()
        }));
        let mut sparse = GlobalAggregator::new(1, 1)
            .with_codecs(inter, TierCodec::default())
            .with_policy(NonFinitePolicy::Skip);
        sparse.add_range(2, theta0.clone(), 0, sgd(1.0));
        sparse.set_mode(2, ReplyMode::Sparse);
        let mut g = vec![0.0f32; n];
        g[1] = f32::INFINITY;
        let d = sparse.push_round(2, 0, 0, (Some(g), 1)).unwrap().unwrap();
        let up = Update::decode(&d.reply, 2, n).unwrap();
        assert!(up.skipped && up.grad.is_empty());
        assert_eq!(sparse.get(2).unwrap().1, &theta0[..]);
    }
}
