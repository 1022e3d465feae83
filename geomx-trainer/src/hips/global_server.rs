//! The global server role: owns its MultiGPS ranges, sums the DCs' pushes, runs the optimizer and
//! answers each push with the new values (fused push-reply).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use geomx_net::coord::CoordClient;
use geomx_net::sched::reply::SharedBytes;
use geomx_net::{Handler, MsgKind, NetError, PayloadCodec, PeerHandle, Request, Responder};

use std::net::ToSocketAddrs;

mod ts;

use super::admit::{park_pull, Admission, PARKED_PULLS_PER_MEMBER_KEY};
use super::chaos::{Point, SelfFault};
use super::dgt::{DGT_INFO_KEY, DGT_PUSH_LEN};
use super::msg::{
    f32_bytes, f32_from_bytes, UpPush, DIGEST_FLAG, REJOIN_KEY, REPLY_FLAG, SKIP_FLAG,
};
use super::node::{Aborter, FatalHook, Identity, Node};
use super::plan::roles;
use super::replies::Replies;
use super::round_log::{MemberChange, RoundLog};
use super::time_split::{Phase, PhaseClock, Waiting};
use super::{
    lock, AggError, GlobalAggregator, JobSpec, MixedAggregator, RoleStats, RoundDone, RunError,
    SkipCause,
};
use crate::checkpoint::queue::ErrorHook;
use crate::checkpoint::{RoundParts, SaveQueue, Saver, StateFile, When};
use crate::clock::Mark;
use crate::codec::{count_nonfinite, KeyCounts, TierCodec};
use crate::config::{NonFinitePolicy, SyncAlgorithm};
use crate::engine::Optimizer;
use crate::hash::values_hash;

impl super::RangeOptimizer for Optimizer {
    fn step(&mut self, params: &mut [f32], mean_grad: &[f32]) {
        if let Err(e) = Optimizer::step(self, params, mean_grad) {
            // Lengths are checked by the aggregator before it calls the optimizer.
            tracing::error!(error = %e, "optimizer step rejected");
        }
    }

    fn save(&self) -> super::SavedState {
        Box::new(self.clone())
    }

    fn restore(&mut self, saved: super::SavedState) {
        if let Ok(o) = saved.downcast::<Optimizer>() {
            *self = *o;
        }
    }

    fn export_state(&self) -> Option<crate::engine::OptimState> {
        Some(Optimizer::export_state(self))
    }
}

/// Mutable state behind the server handler.
struct State {
    agg: GlobalAggregator,
    /// Pushes of the round being collected, per range, answered when the round completes.
    parked: HashMap<usize, Vec<Responder>>,
    /// Pulls waiting for a version: (range, min_version, responder).
    pulls: Vec<(usize, u64, Responder)>,
    /// Owned ranges that reached the last round.
    finished: usize,
    /// MixedSync: the asynchronous aggregator (then `agg` holds no ranges) and the pushes applied
    /// per range.
    mixed: Option<MixedState>,
    /// A restarted HFA global server: per range, the reply of the round its checkpoint closed
    /// (version, f32 bytes), for a local server whose reply was lost with the predecessor.
    saved_replies: HashMap<usize, (u64, Vec<u8>)>,
}

/// MixedSync's aggregator and the pushes it applied per range.
type MixedState = (MixedAggregator, HashMap<usize, u64>);

struct GlobalHandler {
    state: Mutex<State>,
    /// Node id → DC of the local servers, known once registration completed.
    dc_of: OnceLock<HashMap<u32, usize>>,
    /// Which connection speaks for which local server; refused requests.
    admission: Admission,
    aborter: OnceLock<Aborter>,
    range_lens: Vec<usize>,
    /// The key of every range (for messages and per-key counters).
    range_keys: Vec<usize>,
    inter: TierCodec,
    policy: NonFinitePolicy,
    /// Range rounds dropped under `nonfinite = "skip"`.
    skipped: AtomicU64,
    /// FP16 / BF16 overflows of the replies, by key.
    overflows: KeyCounts,
    n_dcs: usize,
    owned: usize,
    rounds: u64,
    all_done: Sender<()>,
    /// This handler, for the thread that writes a checkpoint and then sends the replies that
    /// must wait for it (set once the handler is built).
    this: OnceLock<std::sync::Weak<GlobalHandler>>,
    /// `transport.inter = "dgt"`: the DGT receiver's port and the join of TCP pushes with
    /// DGT deliveries.
    dgt: Option<DgtJoin>,
    /// `[checkpoint]`: the saver and the state of the round being assembled, range by range.
    ckpt: Option<(Saver, Mutex<RoundParts>)>,
    /// `[checkpoint]`: the thread that writes the checkpoints and then, or before, sends the
    /// replies that wait for the disk (set once the handler is built).
    writer: OnceLock<SaveQueue>,
    /// Training rounds per global round (HFA's k1 · k2, else 1): checkpoints count training
    /// rounds.
    per_global: u64,
    /// Local averagings per global round (HFA's k2, else 1): the round log counts local rounds.
    per_exchange: u64,
    /// How pushes are answered, by range: inline, or under P3 in priority order per connection
    /// (not from the reader thread that completed the round).
    replies: Replies,
    /// `resilience.lost_dc = "continue"`: a lost local server's DC leaves the rounds, and may
    /// rejoin.
    elastic_dcs: bool,
    /// DC losses and rejoins, and the (range's key, round)s some DC was absent from.
    log: RoundLog,
    /// `resilience.lost_global_server = "continue"`: this process may be restarted from its
    /// checkpoint.
    restartable: bool,
    /// Checkpoints carry each round's reply ([`keeps_replies`]).
    keeps_replies: bool,
    /// Under `lost_dc` and `lost_global_server = "continue"` together: the DCs' membership, which
    /// checkpoints then carry and a restart restores ([`DcWatch`]).
    dcs: DcWatch,
    /// How long a dropped local server's loss is awaited at the coordinator
    /// ([`JobSpec::loss_verdict_after`]).
    verdict_after: Duration,
    /// Ends this process at once (not the job): a restartable global server that lost a local
    /// server's connection.
    die: FatalHook,
    /// The fault this process injects into itself (`geomx launch --chaos`), at the rounds of
    /// its first range.
    chaos: Option<(usize, SelfFault)>,
    /// `[scheduling.tsengine] inter`: the root and coordinator of the trees.
    ts: Option<ts::TsGlobal>,
    /// Where this process's rounds went: its request threads busy, else waiting for the DCs
    /// ([`super::time_split`]).
    split: PhaseClock,
}

/// What a global server that may restart (`lost_global_server = "continue"`) needs when DCs may
/// be lost too (`lost_dc = "continue"`): its checkpoints carry the DCs' membership, one is saved
/// after every membership change so that the newest holds it, and the coordinator tells a lost
/// local server from this server's own stall when a connection drops.
#[derive(Default)]
struct DcWatch {
    /// Both settings are on.
    on: bool,
    /// The coordinator, once this process registered.
    coord: OnceLock<CoordClient>,
    /// Versions saved whatever `every_rounds` says: the first every range completes after a
    /// membership change.
    forced: Mutex<std::collections::BTreeSet<u64>>,
    /// Per DC: bumped at each rejoin (a loss verdict reached before it must not undo it).
    epochs: Vec<AtomicU64>,
    /// Per DC: whether its local server has sent this process anything.
    seen: Vec<AtomicBool>,
}

impl DcWatch {
    fn new(on: bool, n_dcs: usize) -> Self {
        Self {
            on,
            epochs: (0..n_dcs).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..n_dcs).map(|_| AtomicBool::new(false)).collect(),
            ..Self::default()
        }
    }

    /// A membership change while `top` is the highest round a range collects: every range
    /// completes round `top` after it, so version `top + 1` is saved.
    fn changed(&self, top: u64) {
        if self.on {
            lock(&self.forced).insert(top + 1);
        }
    }

    fn forced(&self, version: u64) -> bool {
        self.on && lock(&self.forced).contains(&version)
    }

    /// DC `dc` rejoined: a loss verdict reached before it no longer applies.
    fn rejoined(&self, dc: usize) {
        if let Some(e) = self.epochs.get(dc) {
            e.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn epoch(&self, dc: usize) -> u64 {
        self.epochs.get(dc).map_or(0, |e| e.load(Ordering::SeqCst))
    }

    /// DC `dc`'s local server as the coordinator sees it (`None`: not known).
    fn locate(&self, dc: usize) -> Option<geomx_net::coord::Located> {
        let key = geomx_net::coord::NodeKey::new(roles::LOCAL_SERVER, dc as u32, 0);
        self.coord.get()?.locate(&key).ok()
    }

    /// Whether this process's own connection to the coordinator dropped within `within`: it
    /// was away (stopped, or behind a cut) then, not merely its peer.
    fn was_away(&self, within: Duration) -> bool {
        self.coord
            .get()
            .and_then(CoordClient::own_dropped_ago)
            .is_some_and(|d| d <= within)
    }
}

/// One half of a DGT-mode push: the TCP request (worker count + responder) or the values the
/// DGT receiver delivered, whichever came first. A dropped round has no values half.
enum Half {
    Push(u32, Responder),
    Values(Vec<f32>),
}

/// Pairs TCP pushes with DGT deliveries by (dc, range, round).
struct DgtJoin {
    port: u16,
    halves: Mutex<HashMap<(usize, usize, u64), Half>>,
}

impl GlobalHandler {
    /// The DC of the local server whose connection sent `req`, or why the request is refused:
    /// the sender is no local server, or another connection already speaks for it.
    fn member(&self, req: &Request) -> Result<usize, String> {
        let Some(&dc) = self.dc_of.get().and_then(|m| m.get(&req.sender)) else {
            return Err(format!(
                "{:?} from node {} which is no local server",
                req.kind, req.sender
            ));
        };
        if let Some(seen) = self.dcs.seen.get(dc) {
            seen.store(true, Ordering::Relaxed);
        }
        Ok(dc)
    }

    /// Parks a pull that waits for a later version of range `id`, unless
    /// [`PARKED_PULLS_PER_MEMBER_KEY`] per member and range wait already: then it is refused
    /// (after `st` is released).
    fn park(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        id: usize,
        version: u64,
        reply: Responder,
    ) {
        let members = self.dc_of.get().map_or(1, |m| m.len().max(1));
        let cap = PARKED_PULLS_PER_MEMBER_KEY * members * self.range_lens.len().max(1);
        if let Some(reply) = park_pull(&mut st.pulls, cap, id, version, reply) {
            drop(st);
            self.admission
                .refuse(reply, format!("{cap} pulls wait already"));
        }
    }

    /// An aggregation error: a non-finite value under `nonfinite = "abort"` ends the job (the
    /// configured policy); anything else is the pushing peer's bad request, refused.
    fn agg_error(&self, reply: Responder, dc: usize, e: &AggError) {
        let msg = self.agg_message(dc, e);
        if matches!(e, AggError::NonFinite { .. }) {
            self.fail(reply, msg);
        } else {
            self.admission.refuse(reply, msg);
        }
    }

    fn fail(&self, reply: Responder, msg: String) {
        tracing::error!(%msg, "protocol error at the global server");
        let _ = reply.error(&msg);
        if let Some(a) = self.aborter.get() {
            a.abort(msg);
        }
    }

    /// Ends the job with `msg` (a failure of this process, not of a peer's request).
    fn abort(&self, msg: String) {
        tracing::error!(%msg, "global server failure");
        if let Some(a) = self.aborter.get() {
            a.abort(msg);
        }
    }

    /// "key K (range R)" for messages.
    fn describe_range(&self, range: usize) -> String {
        match self.range_keys.get(range) {
            Some(k) => format!("key {k} (range {range})"),
            None => format!("range {range}"),
        }
    }

    /// The message of an aggregation error, naming the key of a range.
    fn agg_message(&self, dc: usize, e: &AggError) -> String {
        match e {
            AggError::NonFinite { key, round, what } => {
                format!(
                    "non-finite {what}: {}, round {round}",
                    self.describe_range(*key)
                )
            }
            other => format!("range push from dc {dc}: {other}"),
        }
    }

    /// Counts a completed round's overflows and a dropped round.
    fn account(&self, id: usize, round: u64, skipped: Option<SkipCause>, overflow: usize) {
        if let Some(k) = self.range_keys.get(id) {
            self.overflows.add(*k, overflow);
        }
        // A round no worker counted in is no drop: it had nothing to step with.
        if let Some(cause) = skipped.filter(|c| *c != SkipCause::NoWorkers) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                range = id,
                key = self.range_keys.get(id).copied(),
                round,
                ?cause,
                "non-finite values: round dropped"
            );
        }
    }

    fn on_push(&self, mut req: Request, reply: Responder) {
        match super::ts_msg::Op::of_key(req.key) {
            Some((super::ts_msg::Tier::Inter, op)) => return self.on_ts(op, req, reply),
            Some((super::ts_msg::Tier::Intra, op)) => {
                let msg = format!("TSEngine {op:?} of the intra tier at a global server");
                return self.admission.refuse(reply, msg);
            }
            None => {}
        }
        let id = req.key as usize;
        // A peer's bad request is refused, never fatal: a genuine local server fails on the
        // error reply and ends the job itself, naming the cause.
        let dc = match self.member(&req) {
            Ok(dc) => dc,
            Err(msg) => return self.admission.refuse(reply, msg),
        };
        let Some(&len) = self.range_lens.get(id) else {
            return self
                .admission
                .refuse(reply, format!("push for unknown range {id}"));
        };
        // A push for a known range binds the local server's id to this connection (admit.rs).
        if let Err(msg) = self.admission.bind(req.sender, &reply) {
            return self.admission.refuse(reply, msg);
        }
        if let Some(join) = &self.dgt {
            return self.on_push_dgt(join, id, dc, req, reply);
        }
        if self.ts.is_some() {
            let msg = format!("dc {dc}: a range push under TSEngine (the trees carry the sums)");
            return self.admission.refuse(reply, msg);
        }
        let up = if self.inter.is_plain() {
            UpPush::decode(&req.payload, id, len).map_err(|e| e.to_string())
        } else {
            UpPush::decode_coded(&req.payload, id, len)
        };
        let up = match up {
            Ok(u) => u,
            Err(e) => {
                let msg = format!("range push from dc {dc}: {e}");
                return self.admission.refuse(reply, msg);
            }
        };
        // Back to the receive pool (as the local server does with its workers' pushes).
        geomx_net::bufpool::recycle(std::mem::take(&mut req.payload));
        self.accept_push(id, dc, req.version, up, reply);
    }

    /// DGT mode: the request carries only the worker count; the values come from the DGT
    /// receiver (joined in [`GlobalHandler::on_delivery`] if they are not here yet).
    fn on_push_dgt(&self, join: &DgtJoin, id: usize, dc: usize, req: Request, reply: Responder) {
        let Ok(count) = <[u8; DGT_PUSH_LEN]>::try_from(req.payload.as_slice()) else {
            return self.admission.refuse(
                reply,
                format!(
                    "dgt push of range {id} from dc {dc}: {} payload bytes, expected {DGT_PUSH_LEN}",
                    req.payload.len()
                ),
            );
        };
        let count = u32::from_le_bytes(count);
        if count & SKIP_FLAG != 0 {
            // A dropped round: no DGT values follow.
            let up = UpPush {
                count: count & !SKIP_FLAG,
                sum: None,
            };
            return self.accept_push(id, dc, req.version, up, reply);
        }
        let slot = (dc, id, req.version);
        let mut halves = lock(&join.halves);
        match halves.remove(&slot) {
            Some(Half::Values(sum)) => {
                drop(halves);
                let up = UpPush {
                    count,
                    sum: Some(sum),
                };
                self.accept_push(id, dc, req.version, up, reply);
            }
            Some(Half::Push(..)) => {
                drop(halves);
                self.admission.refuse(
                    reply,
                    format!(
                        "second push of range {id} round {} from dc {dc}",
                        req.version
                    ),
                );
            }
            None => {
                halves.insert(slot, Half::Push(count, reply));
            }
        }
    }

    /// A tensor the DGT receiver delivered: joined with its TCP push.
    fn on_delivery(&self, join: &DgtJoin, d: geomx_net::dgt::Delivery) {
        let Some(&dc) = self.dc_of.get().and_then(|m| m.get(&d.sender)) else {
            tracing::warn!(
                sender = d.sender,
                "dgt delivery from a node that is no local server"
            );
            return;
        };
        let id = d.key as usize;
        if self.range_lens.get(id) != Some(&d.values.len()) {
            tracing::warn!(range = id, "dgt delivery of the wrong length dropped");
            return;
        }
        let version = u64::from(d.round);
        if !d.missing.is_empty() || d.folded_late > 0 {
            tracing::debug!(
                range = id,
                dc,
                round = version,
                missing = d.missing.len(),
                folded = d.folded_late,
                "dgt delivery"
            );
        }
        let slot = (dc, id, version);
        let mut halves = lock(&join.halves);
        match halves.remove(&slot) {
            Some(Half::Push(count, reply)) => {
                drop(halves);
                let up = UpPush {
                    count,
                    sum: Some(d.values),
                };
                self.accept_push(id, dc, version, up, reply);
            }
            Some(Half::Values(_)) | None => {
                halves.insert(slot, Half::Values(d.values));
            }
        }
    }

    /// Aggregates DC `dc`'s decoded push of range `id` at `version` (decoded payloads and DGT
    /// deliveries are checked for non-finite values here).
    fn accept_push(&self, id: usize, dc: usize, version: u64, mut up: UpPush, reply: Responder) {
        let bad = up.sum.as_deref().map_or(0, count_nonfinite);
        if bad > 0 {
            let msg = format!(
                "non-finite push from dc {dc}: {}, round {version}: {bad} values",
                self.describe_range(id)
            );
            if self.policy == NonFinitePolicy::Abort {
                return self.fail(reply, msg);
            }
            tracing::warn!(%msg, "dropping the push's round");
            up.sum = None;
        }
        let mut st = lock(&self.state);
        if st.mixed.is_some() {
            return self.on_push_mixed(st, id, dc, version, up, reply);
        }
        let done = match st.agg.push_round(id, dc, version, (up.sum, up.count)) {
            Ok(None) => {
                st.parked.entry(id).or_default().push(reply);
                drop(st);
                self.fault_at(id, version + 1, Point::MidPush);
                return;
            }
            Ok(Some(d)) => d,
            Err(e) => {
                drop(st);
                return self.agg_error(reply, dc, &e);
            }
        };
        st.parked.entry(id).or_default().push(reply);
        self.finish_round(st, id, done);
    }

    /// Carries out a completed round of range `id`: its checkpoint part, the replies to the
    /// pushes parked for it, the pulls it satisfies.
    fn finish_round(&self, mut st: std::sync::MutexGuard<'_, State>, id: usize, done: RoundDone) {
        self.account(id, done.version - 1, done.skipped, done.overflow);
        if self.elastic_dcs {
            let key = self.range_keys.get(id).copied().unwrap_or(id);
            // The local round this global round closes (HFA: the period's last averaging).
            let local = done.version * self.per_exchange - 1;
            for dc in (0..self.n_dcs as u32).filter(|d| !done.dcs.contains(d)) {
                // The DC contributed nothing: none of its workers counts in this round.
                self.log.summed(dc, key, local, &[], 1);
            }
        }
        let snapshot = self.snapshot(&st, id, &done);
        let waiting = st.parked.remove(&id).unwrap_or_default();
        let pulls = self.ready_pulls(&mut st, id, done.version);
        let mut last = false;
        if done.version == self.rounds {
            st.finished += 1;
            last = st.finished == self.owned;
        }
        drop(st);
        self.fault_at(id, done.version, Point::Start);
        let answer = move |h: &GlobalHandler| {
            // The round is complete and saved; the DCs wait for its replies.
            h.fault_at(id, done.version, Point::ReplyWait);
            let payload: SharedBytes = Arc::new(done.reply);
            for r in waiting {
                h.replies.send(id, r, done.version, done.codec, &payload);
            }
            h.ts_range_done(id, done.version - 1, (*payload).as_ref());
            h.answer_pulls(id, pulls, done.version);
            if last {
                let _ = h.all_done.send(());
            }
        };
        // The replies of a checkpoint round wait for the disk on the writer thread: this one may
        // be the network driver's, and a slow disk must not silence every connection past the
        // peers' detection time (seen in CI: 1 s). In the background (`checkpoint.background`)
        // they go out once the previous checkpoint is on disk, and this one is written while
        // the next rounds run (the local servers keep their pushes since that previous one,
        // `upstream::Rejoin::trim`); otherwise, and for the final round and a membership
        // change's round, once this one is.
        let Some((state, when)) = snapshot else {
            return answer(self);
        };
        match (
            self.this.get().and_then(std::sync::Weak::upgrade),
            self.writer.get(),
        ) {
            (Some(h), Some(q)) => q.hand_then(state, when, Box::new(move || answer(&h))),
            _ => {
                self.save(&state);
                answer(self);
            }
        }
    }

    /// Injects this process's chaos fault when range `id` is its first one and `round` (training
    /// rounds completed with this one) and `point` are the fault's.
    fn fault_at(&self, id: usize, round: u64, point: Point) {
        if let Some((first, c)) = &self.chaos {
            if *first == id {
                c.at(round * self.per_global, point);
            }
        }
    }

    /// Adds range `id` after round `done` to the checkpoint of that round when one is due (with
    /// the round's reply when [`keeps_replies`]); returns the round's state once every owned
    /// range is in, and when the round's replies may go out: before its write in the
    /// background, except for the final round and a membership change's, which a restart must
    /// find.
    fn snapshot(&self, st: &State, id: usize, done: &RoundDone) -> Option<(StateFile, When)> {
        let (saver, parts) = self.ckpt.as_ref()?;
        let version = done.version;
        let round = version * self.per_global;
        // A global server that may restart also saves the last round: a local server that
        // still pulls the final θ then finds it after a restart without any other DC's help.
        let last = self.restartable && version == self.rounds;
        let forced = self.dcs.forced(version);
        if !saver.due(round) && !last && !forced {
            return None;
        }
        let when = if saver.background() && !last && !forced {
            When::BeforeWrite
        } else {
            When::AfterWrite
        };
        let Some(super::RangeSnapshot {
            params: theta,
            opt: Some(opt),
            carry,
            ..
        }) = st.agg.export_range(id)
        else {
            self.abort(format!(
                "checkpoint of round {round}: range {id} has no saveable optimizer state"
            ));
            return None;
        };
        let reply = match (self.keeps_replies, done.codec) {
            (false, _) => None,
            (true, PayloadCodec::DenseF32) => f32_from_bytes(&done.reply),
            (true, codec) => {
                self.abort(format!(
                    "checkpoint of round {round}: range {id} replied in {codec:?}, not f32"
                ));
                return None;
            }
        };
        // Each DC's first counted round (u64::MAX: lost), as the last range to complete the
        // round saw it.
        let members: Option<Vec<u64>> = self.dcs.on.then(|| {
            st.agg
                .dc_members()
                .iter()
                .map(|m| m.unwrap_or(u64::MAX))
                .collect()
        });
        let state = lock(parts).add(round, |f| {
            if let Some(m) = members {
                f.put_u64("dcs", m);
            }
            f.put_f32(format!("theta.{id}"), theta);
            f.put_f32(format!("carry.{id}"), carry);
            if let Some(reply) = reply {
                f.put_f32(format!("reply.{id}"), reply);
            }
            super::ckpt::put_optim(f, &format!("opt.{id}"), &opt);
        })?;
        Some((state, when))
    }

    /// Writes a checkpoint; a failure ends the job (it asked for checkpoints).
    fn save(&self, state: &StateFile) {
        if let Some((saver, _)) = &self.ckpt {
            if let Err(e) = saver.save(state) {
                self.abort(format!(
                    "writing the checkpoint of round {}: {e}",
                    state.round
                ));
            }
        }
    }

    /// Takes the pulls of range `id` that `version` satisfies, with the range's θ (f32).
    fn ready_pulls(&self, st: &mut State, id: usize, version: u64) -> (Vec<Responder>, Vec<u8>) {
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut st.pulls)
            .into_iter()
            .partition(|(r, v, _)| *r == id && *v <= version);
        st.pulls = rest;
        if ready.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let theta = match st.mixed.as_ref() {
            Some((m, _)) => m.get(id).map(|(_, v)| f32_bytes(v).into_owned()),
            None => st.agg.get(id).map(|(_, v)| f32_bytes(v).into_owned()),
        };
        (
            ready.into_iter().map(|(_, _, r)| r).collect(),
            theta.unwrap_or_default(),
        )
    }

    /// Answers the parked pulls of range `id` with its θ at `version` (exact f32), from
    /// [`GlobalHandler::ready_pulls`].
    fn answer_pulls(&self, id: usize, (pulls, theta): (Vec<Responder>, Vec<u8>), version: u64) {
        if pulls.is_empty() {
            return;
        }
        let theta: SharedBytes = Arc::new(theta);
        for r in pulls {
            self.replies
                .send(id, r, version, PayloadCodec::DenseF32, &theta);
        }
    }

    /// MixedSync: applies DC `dc`'s push computed from `base` at once and answers it (θ, or the
    /// difference to what the DC holds); a range is finished after `rounds` pushes of every DC.
    fn on_push_mixed(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        id: usize,
        dc: usize,
        base: u64,
        up: UpPush,
        reply: Responder,
    ) {
        let n_dcs = self.n_dcs as u64;
        let Some((mixed, pushes)) = st.mixed.as_mut() else {
            return;
        };
        let done = match mixed.push_reply(id, dc, base, (up.sum, up.count)) {
            Ok(d) => d,
            Err(e) => {
                drop(st);
                return self.agg_error(reply, dc, &e);
            }
        };
        self.account(id, base, done.skipped, done.overflow);
        let n = pushes.entry(id).or_default();
        *n += 1;
        let range_done = *n == self.rounds * n_dcs;
        if range_done {
            st.finished += 1;
            if st.finished == self.owned {
                let _ = self.all_done.send(());
            }
        }
        let pulls = self.ready_pulls(&mut st, id, done.version);
        drop(st);
        let payload: SharedBytes = Arc::new(done.reply);
        self.replies
            .send(id, reply, done.version, done.codec, &payload);
        self.answer_pulls(id, pulls, done.version);
    }

    /// Answers a [`DIGEST_FLAG`] pull: the digest of the range's θ at exactly the version asked
    /// for, or an empty payload when the range is at another one.
    fn digest(&self, req: &Request, reply: Responder) {
        let id = (req.key & !DIGEST_FLAG) as usize;
        if let Err(msg) = self.member(req) {
            return self.admission.refuse(reply, msg);
        }
        if id >= self.range_lens.len() {
            let msg = format!("digest: unknown range {id}");
            return self.admission.refuse(reply, msg);
        }
        if let Err(msg) = self.admission.bind(req.sender, &reply) {
            return self.admission.refuse(reply, msg);
        }
        let st = lock(&self.state);
        let theta = match st.mixed.as_ref() {
            Some((m, _)) => m.get(id),
            None => st.agg.get(id),
        };
        let digest = match theta {
            Some((v, values)) if v == req.version => values_hash(values).to_le_bytes().to_vec(),
            _ => Vec::new(),
        };
        drop(st);
        let _ = reply.send(req.version, PayloadCodec::Raw, &digest);
    }

    fn on_pull(&self, req: Request, reply: Responder) {
        if req.key == REJOIN_KEY {
            return self.rejoin(&req, reply);
        }
        if req.key == DGT_INFO_KEY {
            return match &self.dgt {
                Some(j) => {
                    let _ = reply.send(0, PayloadCodec::Raw, &j.port.to_le_bytes());
                }
                None => {
                    let _ = reply.error("this global server does not speak dgt");
                }
            };
        }
        if req.key & REPLY_FLAG != 0 {
            return self.saved_reply(&req, reply);
        }
        if req.key & DIGEST_FLAG != 0 {
            return self.digest(&req, reply);
        }
        let id = req.key as usize;
        if let Err(msg) = self.member(&req) {
            return self.admission.refuse(reply, msg);
        }
        if id < self.range_lens.len() {
            if let Err(msg) = self.admission.bind(req.sender, &reply) {
                return self.admission.refuse(reply, msg);
            }
        }
        let st = lock(&self.state);
        if let Some((mixed, _)) = st.mixed.as_ref() {
            // MixedSync pulls only θ_0 (start-up); any version at least the one asked for serves.
            return match mixed.get(id) {
                Some((v, vals)) if v >= req.version => {
                    let bytes: SharedBytes = Arc::new(f32_bytes(vals).into_owned());
                    drop(st);
                    self.replies
                        .send(id, reply, v, PayloadCodec::DenseF32, &bytes);
                }
                Some(_) => self.park(st, id, req.version, reply),
                None => {
                    drop(st);
                    let msg = format!("pull: unknown range {id}");
                    self.admission.refuse(reply, msg);
                }
            };
        }
        match st.agg.pull(id, req.version) {
            Ok(Some(v)) => {
                let bytes: SharedBytes = Arc::new(f32_bytes(v).into_owned());
                let version = st.agg.get(id).map_or(0, |(v, _)| v);
                drop(st);
                // Through the replies: on the portable driver an inline answer would hold this
                // connection's reader while θ crosses the WAN, so the DC's next push could not
                // be read meanwhile (replies.rs).
                self.replies
                    .send(id, reply, version, PayloadCodec::DenseF32, &bytes);
            }
            Ok(None) => self.park(st, id, req.version, reply),
            Err(e) => {
                drop(st);
                self.admission.refuse(reply, format!("pull: {e}"));
            }
        }
    }
    /// A local server asks for the reply of the round that made `version` of a range
    /// ([`REPLY_FLAG`]): a restarted HFA global server has the one its checkpoint closed.
    fn saved_reply(&self, req: &Request, reply: Responder) {
        if let Err(msg) = self.member(req) {
            return self.admission.refuse(reply, msg);
        }
        let id = (req.key & !REPLY_FLAG) as usize;
        let st = lock(&self.state);
        match st.saved_replies.get(&id) {
            Some((v, bytes)) if *v == req.version => {
                let bytes = bytes.clone();
                drop(st);
                let _ = reply.send(req.version, PayloadCodec::DenseF32, &bytes);
            }
            other => {
                let held = other.map(|(v, _)| *v);
                drop(st);
                let msg = format!(
                    "range {id}: no saved reply of version {} (this server holds {held:?})",
                    req.version
                );
                self.admission.refuse(reply, msg);
            }
        }
    }

    /// Carries out the rounds a membership change completed (or ends the job on an error).
    fn finish_rounds(&self, done: super::global_agg::Completed) {
        for (id, d) in done {
            match d {
                Ok(d) => self.finish_round(lock(&self.state), id, d),
                Err(e) => return self.abort(format!("{}: {e}", self.describe_range(id))),
            }
        }
    }

    /// A restarted local server asks to count again (`Pull` of [`REJOIN_KEY`] with the round it
    /// proposes as the version): it counts from that round or the highest one this server's
    /// ranges collect, which the reply's version names.
    fn rejoin(&self, req: &Request, reply: Responder) {
        let dc = match self.member(req) {
            Ok(dc) => dc,
            Err(msg) => return self.admission.refuse(reply, msg),
        };
        if !self.elastic_dcs {
            let msg = "a local server may rejoin only with resilience.lost_dc = \"continue\"";
            return self.admission.refuse(reply, msg.into());
        }
        if let Err(msg) = self.admission.bind(req.sender, &reply) {
            return self.admission.refuse(reply, msg);
        }
        // The binding above refuses it while the lost incarnation's connection is open.
        let mut st = lock(&self.state);
        self.dcs.changed(st.agg.top_round());
        self.dcs.rejoined(dc);
        let Some((from, done)) = st.agg.join_dc(dc, req.version) else {
            drop(st);
            return self.admission.refuse(reply, format!("no dc {dc}"));
        };
        drop(st);
        self.log.change_of(
            roles::LOCAL_SERVER,
            dc as u32,
            0,
            MemberChange::Rejoined,
            from * self.per_global,
            String::new(),
        );
        let _ = reply.send(from, PayloadCodec::Raw, &[]);
        self.finish_rounds(done);
    }

    /// A local server is lost (`resilience.lost_dc = "continue"`): its DC leaves the rounds,
    /// and the rounds that waited only for it complete.
    fn lose_dc(&self, dc: usize, reason: &dyn std::fmt::Display) {
        let mut st = lock(&self.state);
        let round = st.agg.top_round();
        self.dcs.changed(round);
        let done = st.agg.lose_dc(dc);
        drop(st);
        // Events count training rounds (an HFA global round is k1 · k2 of them).
        self.log.change_of(
            roles::LOCAL_SERVER,
            dc as u32,
            0,
            MemberChange::Lost,
            round * self.per_global,
            reason.to_string(),
        );
        self.finish_rounds(done);
    }
}

impl GlobalHandler {
    /// Under [`DcWatch`]: DC `dc`'s connection dropped (`cause`). If the coordinator finds its
    /// local server lost, or restarted, within the detection time (and a second), the DC is
    /// lost; if it still finds it alive, this server is the one that was away (stopped, or
    /// behind a cut) and ends itself so that its restart takes over from the checkpoint. It
    /// ends at once when its own connection to the coordinator dropped meanwhile: it was away.
    fn judge_disconnect(&self, dc: usize, cause: String) {
        let epoch = self.dcs.epoch(dc);
        let wait = self.verdict_after;
        self.spawn_own("geomx-dc-judge", move |me| {
            let started = Instant::now();
            let deadline = started + wait;
            let mut first = None;
            while Instant::now() < deadline {
                if me.dcs.was_away(started.elapsed() + wait) {
                    break;
                }
                // Not live: lost, or its coordinator connection dropped with ours (it may
                // reattach only if it is alive, which a closed connection to us denies).
                match me.dcs.locate(dc) {
                    Some(at) if !at.live => return me.lose_dc_at(dc, epoch, &cause),
                    Some(at) if first.is_some_and(|f| at.incarnation > f) => {
                        return me.lose_dc_at(dc, epoch, &cause);
                    }
                    Some(at) => first = first.or(Some(at.incarnation)),
                    None => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let msg = format!(
                "lost the connection of dc {dc}'s local server ({cause}), which the \
                     coordinator still counts alive: this server was away; ending so that a \
                     restart from the checkpoint takes over"
            );
            tracing::error!(%msg, "global server");
            (me.die)(&msg);
        });
    }

    /// Runs `f` with this handler on a thread of its own named `name`; a failure to start it
    /// ends the job.
    fn spawn_own(&self, name: &str, f: impl FnOnce(Arc<Self>) + Send + 'static) {
        let Some(me) = self.this.get().and_then(std::sync::Weak::upgrade) else {
            return self.abort(format!("{name}: the handler is gone"));
        };
        if let Err(e) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(me))
        {
            self.abort(format!("starting {name}: {e}"));
        }
    }

    /// The DC whose local server `peer` is, if it is one.
    fn dc_of_peer(&self, peer: &PeerHandle) -> Option<usize> {
        self.dc_of
            .get()
            .and_then(|m| m.get(&peer.node_id()).copied())
    }

    /// Loses DC `dc` unless it rejoined since `epoch`.
    fn lose_dc_at(&self, dc: usize, epoch: u64, cause: &str) {
        if self.dcs.epoch(dc) == epoch && lock(&self.state).agg.dc_is_member(dc) {
            self.lose_dc(dc, &cause);
        }
    }

    /// After a restart under [`DcWatch`]: a DC its checkpoint counts whose local server the
    /// coordinator finds lost (it died while this server was away) will not reconnect; it is
    /// lost, so that the rounds do not wait for it. Watches until every member DC has been
    /// heard from or lost, or the wait limit.
    fn watch_absent_dcs(&self, limit: Duration) {
        self.spawn_own("geomx-dc-watch", move |me| {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                let mut waiting = false;
                for dc in 0..me.n_dcs {
                    let member = lock(&me.state).agg.dc_is_member(dc);
                    if !member || me.dcs.seen[dc].load(Ordering::Relaxed) {
                        continue;
                    }
                    waiting = true;
                    // Lost, not merely reattaching to a restarted coordinator.
                    let lost = me
                        .dcs
                        .locate(dc)
                        .is_some_and(|at| !at.live && !at.reattaching);
                    if lost {
                        let epoch = me.dcs.epoch(dc);
                        me.lose_dc_at(dc, epoch, "not alive when this server restarted");
                    }
                }
                if !waiting {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
}

impl Handler for GlobalHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        let known = || self.dc_of.get().is_some();
        let Some((req, reply)) = self.admission.hold_early(known, req, reply) else {
            return;
        };
        let start = Mark::now();
        self.split.enter(Phase::Busy);
        match req.kind {
            MsgKind::Push => self.on_push(req, reply),
            MsgKind::Pull => self.on_pull(req, reply),
            other => {
                let msg = format!("a global server does not serve {other:?}");
                self.admission.refuse(reply, msg);
            }
        }
        self.split.thread_busy(start, Duration::ZERO);
        self.split.leave(Phase::Busy);
    }

    fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
        let running = || lock(&self.state).finished < self.owned;
        if self.dcs.on && self.admission.holds(peer) && running() {
            // Its DC was lost, or this server stalled: the coordinator tells which.
            let dc = self.dc_of_peer(peer);
            self.admission.release(peer);
            if let Some(dc) = dc {
                self.judge_disconnect(dc, reason.to_string());
            }
            return;
        }
        if self.restartable && self.admission.holds(peer) && running() {
            // A local server that lost its connection waits for this server's next incarnation
            // and resends to it what its checkpoint lacks (this process may have been stopped,
            // or the link cut): end this one, so that it is restarted.
            let dc = self.dc_of_peer(peer);
            let msg = format!(
                "lost the connection of dc {dc:?}'s local server ({reason}); ending so that a \
                 restart from the checkpoint takes over"
            );
            tracing::error!(%msg, "global server");
            (self.die)(&msg);
            return;
        }
        // Without `lost_dc = "continue"` the coordinator ends the job on a lost local server.
        if !self.elastic_dcs || !self.admission.holds(peer) {
            return;
        }
        let Some(dc) = self.dc_of_peer(peer) else {
            return;
        };
        self.admission.release(peer);
        if lock(&self.state).finished < self.owned {
            self.lose_dc(dc, reason);
        }
    }
}

/// The aggregator (MixedSync: the asynchronous one) of global server `rank`'s ranges: θ_0 from
/// the seed (the one source of initial parameters), or θ_r and the optimizer state of the
/// checkpoint it `resumed`.
fn own_ranges(
    job: &JobSpec,
    rank: u32,
    mut resumed: Option<&mut super::ckpt::Resumed>,
) -> Result<(GlobalAggregator, Option<MixedState>), RunError> {
    let plan = &job.plan;
    // Global rounds: training rounds / (k1 · k2) under HFA.
    let start = resumed.as_ref().map_or(0, |r| r.round()) / job.rounds_per_global();
    let theta0 = job.keys.split(job.model.init(job.seed));
    // Under TSEngine one push per round carries every DC's sum (one virtual DC).
    let dcs = if job.tsengine.is_some() {
        1
    } else {
        plan.num_dcs()
    };
    let mut agg = GlobalAggregator::new(dcs, plan.total_workers() as u32)
        .with_codecs(job.inter.clone(), job.intra.clone())
        .with_policy(job.nonfinite.policy)
        .with_elastic_counts(job.workers_may_rejoin());
    if job.dcs_may_rejoin() {
        agg = agg.with_elastic_dcs(job.min_dcs);
    }
    let mut mixed = (job.sync == SyncAlgorithm::Mixed).then(|| {
        let m = MixedAggregator::new(plan.num_dcs())
            .with_codecs(job.inter.clone(), job.intra.clone())
            .with_policy(job.nonfinite.policy)
            .with_lr_scales(job.mixed_lr_scales());
        (m, HashMap::new())
    });
    for (id, r) in plan.placement.ranges.iter().enumerate() {
        if r.server != rank as usize {
            continue;
        }
        let vals = match resumed.as_deref_mut() {
            Some(res) => res.f32(&format!("theta.{id}"), r.len)?,
            None => theta0[r.key][r.offset..r.offset + r.len].to_vec(),
        };
        let mode = job.reply_mode(r.key);
        if let Some((m, _)) = mixed.as_mut() {
            m.add_range_with(id, vals, 0, job.mixed_optimizer, mode)
                .map_err(|e| RunError::Protocol(format!("global server {rank}: {e}")))?;
            continue;
        }
        let opt: Box<dyn super::RangeOptimizer> = match job.hfa_periods() {
            Some(_) => {
                let mut opt = super::hfa::OuterStep::new(&job.hfa, r.len)
                    .map_err(|e| RunError::Protocol(format!("global server {rank}: {e}")))?;
                if let Some(res) = resumed.as_deref_mut() {
                    let saved = res.optim(&format!("opt.{id}"))?;
                    opt.import_state(saved).map_err(|e| res.misfit(e))?;
                }
                Box::new(opt)
            }
            None => {
                let mut opt = Optimizer::new(&job.optimizer, r.len);
                if let Some(res) = resumed.as_deref_mut() {
                    let saved = res.optim(&format!("opt.{id}"))?;
                    opt.import_state(saved).map_err(|e| res.misfit(e))?;
                }
                Box::new(opt)
            }
        };
        agg.add_range(id, vals, start, opt);
        agg.set_mode(id, mode);
        if let Some(k) = job.sparse_increments(r.key, r.len) {
            agg.set_sparse_increments(id, k);
        }
        if let Some(res) = resumed.as_deref_mut() {
            let carry = res.f32_any(&format!("carry.{id}"))?;
            agg.set_carry(id, carry).map_err(|e| res.misfit(e))?;
        }
    }
    Ok((agg, mixed))
}

/// Whether this job's global servers save each checkpoint round's reply: HFA's replies are
/// increments, which θ cannot stand in for, so a restarted global server must be able to give a
/// local server the reply its predecessor saved but never sent.
fn keeps_replies(job: &JobSpec) -> bool {
    job.global_servers_may_rejoin() && job.hfa_periods().is_some()
}

/// The replies of the round a restart's checkpoint closed, by range ([`keeps_replies`]).
fn saved_replies(
    job: &JobSpec,
    rank: u32,
    resumed: Option<&mut super::ckpt::Resumed>,
) -> Result<HashMap<usize, (u64, Vec<u8>)>, RunError> {
    let mut out = HashMap::new();
    let Some(res) = resumed.filter(|_| keeps_replies(job)) else {
        return Ok(out);
    };
    let version = res.round() / job.rounds_per_global();
    for (id, r) in job.plan.placement.ranges.iter().enumerate() {
        if r.server == rank as usize {
            let reply = res.f32(&format!("reply.{id}"), r.len)?;
            out.insert(id, (version, f32_bytes(&reply).into_owned()));
        }
    }
    Ok(out)
}

/// Runs global server `rank` until the job shuts down; returns its traffic.
pub fn run(
    job: &JobSpec,
    rank: u32,
    coord_addr: &str,
    bind_addr: &str,
    fatal: FatalHook,
) -> Result<RoleStats, RunError> {
    let plan = &job.plan;
    let me = Identity {
        role: roles::GLOBAL_SERVER,
        dc: plan.central_dc,
        rank,
    };
    // A resumed job starts from its checkpoint's θ_r and optimizer state (checked before this
    // process registers); a restarted one from its own newest checkpoint (after: only the
    // coordinator knows that this process is a restart).
    let resumed = super::ckpt::resume(job, &me)?;
    let owned = plan
        .placement
        .ranges
        .iter()
        .filter(|r| r.server == rank as usize)
        .count();
    let first_owned = plan
        .placement
        .ranges
        .iter()
        .position(|r| r.server == rank as usize);
    // DGT: the receiver listens on the IP of our bind address before anyone can ask for it.
    let dgt_server = match &job.inter.dgt() {
        Some(d) => {
            let ip = bind_addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| a.ip())
                .ok_or_else(|| RunError::Protocol(format!("dgt: cannot resolve {bind_addr}")))?;
            let ranges: Vec<(usize, usize)> = plan
                .placement
                .ranges
                .iter()
                .enumerate()
                .filter(|(_, r)| r.server == rank as usize)
                .map(|(id, r)| (id, r.len))
                .collect();
            let net = job.net_as(roles::GLOBAL_SERVER, plan.central_dc, rank)?;
            let s = super::dgt::value_type(job.inter.dense_type())
                .and_then(|vt| super::dgt::bind_server(ip, d, &ranges, vt, &net))
                .map_err(|e| RunError::Protocol(format!("global server {rank}: dgt: {e}")))?;
            tracing::info!(addr = %s.local_addr(), "dgt receiver listening");
            Some(s)
        }
        None => None,
    };
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let handler = Arc::new(GlobalHandler {
        // The ranges are installed once this process knows whether it is a restart (below),
        // before any request is let in.
        state: Mutex::new(State {
            agg: GlobalAggregator::new(plan.num_dcs(), plan.total_workers() as u32),
            parked: HashMap::new(),
            pulls: Vec::new(),
            finished: 0,
            mixed: None,
            saved_replies: HashMap::new(),
        }),
        dc_of: OnceLock::new(),
        admission: Admission::default(),
        aborter: OnceLock::new(),
        range_lens: plan.placement.ranges.iter().map(|r| r.len).collect(),
        range_keys: plan.placement.ranges.iter().map(|r| r.key).collect(),
        inter: job.inter.clone(),
        policy: job.nonfinite.policy,
        skipped: AtomicU64::new(0),
        overflows: KeyCounts::default(),
        n_dcs: plan.num_dcs(),
        owned,
        rounds: job.global_rounds(),
        all_done: done_tx,
        this: OnceLock::new(),
        dgt: dgt_server.as_ref().map(|s| DgtJoin {
            port: s.local_addr().port(),
            halves: Mutex::new(HashMap::new()),
        }),
        ckpt: super::ckpt::saver(job, &me)
            .map(|s| (s, Mutex::new(RoundParts::new(owned, job.config_hash)))),
        writer: OnceLock::new(),
        per_global: job.rounds_per_global(),
        per_exchange: job.locals_per_global(),
        replies: Replies::new(
            job,
            &format!("geomx-reply-g{rank}"),
            plan.placement.ranges.iter().map(|r| r.key),
        ),
        elastic_dcs: job.dcs_may_rejoin(),
        log: RoundLog::of(&me),
        restartable: job.global_servers_may_rejoin(),
        keeps_replies: keeps_replies(job),
        dcs: DcWatch::new(
            job.dcs_may_rejoin() && job.global_servers_may_rejoin(),
            plan.num_dcs(),
        ),
        verdict_after: job.loss_verdict_after(),
        die: fatal.clone(),
        chaos: SelfFault::from_env()
            .map_err(RunError::Membership)?
            .and_then(|c| first_owned.map(|id| (id, c))),
        ts: ts::TsGlobal::new(job).map_err(RunError::Protocol)?,
        split: PhaseClock::new(Waiting::Wan),
    });
    let _ = handler.this.set(Arc::downgrade(&handler));
    if let Some((saver, _)) = &handler.ckpt {
        let h = Arc::downgrade(&handler);
        let failed: ErrorHook = Box::new(move |e| {
            if let Some(h) = h.upgrade() {
                h.abort(format!("writing a checkpoint: {e}"));
            }
        });
        let _ = handler
            .writer
            .set(super::ckpt::writer(saver, Some(failed))?);
    }
    let consumer = dgt_server.as_ref().map(|s| {
        let (h, rx) = (handler.clone(), s.deliveries().clone());
        std::thread::spawn(move || {
            for d in rx {
                if let Some(j) = &h.dgt {
                    h.on_delivery(j, d);
                }
            }
        })
    });
    let (mut server, node) = Node::serve_and_join(
        coord_addr,
        me.clone(),
        bind_addr,
        handler.clone(),
        job,
        fatal,
    )?;
    super::journal::attach(&handler.log, &node, job)?;
    let incarnation = node.membership.incarnation;
    let mut resumed = match incarnation {
        0 => resumed,
        _ => super::ckpt::restart_state(job, &me, resumed)?,
    };
    let (mut agg, mixed) = own_ranges(job, rank, resumed.as_mut())?;
    let saved_replies = saved_replies(job, rank, resumed.as_mut())?;
    if handler.dcs.on {
        let _ = handler.dcs.coord.set(node.coord.clone());
        // A restart counts the DCs its checkpoint's round counted; those lost meanwhile rejoin.
        if let (true, Some(res)) = (incarnation > 0, resumed.as_mut()) {
            let members = res
                .u64("dcs", plan.num_dcs())?
                .into_iter()
                .map(|f| (f != u64::MAX).then_some(f))
                .collect();
            agg.set_dc_members(members).map_err(|e| res.misfit(e))?;
        }
    }
    {
        let mut st = lock(&handler.state);
        // A restart at the job's last round has nothing left but the final pulls.
        st.finished = agg
            .range_ids()
            .filter(|&id| agg.get(id).is_some_and(|(v, _)| v >= job.global_rounds()))
            .count();
        (st.agg, st.mixed, st.saved_replies) = (agg, mixed, saved_replies);
    }
    if incarnation > 0 && handler.dcs.on {
        handler.watch_absent_dcs(job.wait_limit());
    }
    if incarnation > 0 {
        let round = resumed.as_ref().map_or(0, |r| r.round());
        tracing::warn!(
            rank,
            incarnation,
            round,
            "global server restarted from round {round}"
        );
    }
    let dc_of = node
        .membership
        .nodes
        .iter()
        .filter(|n| n.role == roles::LOCAL_SERVER)
        .map(|n| (n.id, n.dc as usize))
        .collect();
    handler
        .admission
        .set_members(&node.membership.nodes, |n| n.role == roles::LOCAL_SERVER);
    let early = handler.admission.open(|| {
        let _ = handler.dc_of.set(dc_of);
    });
    for (req, reply) in early {
        handler.on_request(req, reply);
    }
    let _ = handler.aborter.set(node.aborter());
    if incarnation == 0 {
        node.barrier("all")?;
    }
    let finished = lock(&handler.state).finished;
    if owned > 0 && finished < owned && job.global_rounds() > 0 {
        // Every round needs every DC, so the wait is bounded by the job's total length; the
        // coordinator aborts the job (ending this process) if any peer dies meanwhile.
        let _ = done_rx.recv();
    }
    // The last checkpoint is on disk, and the round log at the coordinator, before it hears
    // this server is done.
    if let Some(q) = handler.writer.get() {
        q.wait()?;
    }
    handler.log.flush_journal(job.wait_limit());
    node.finish(job.wait_limit())?;
    let served = server.stats();
    server.shutdown();
    let mut stats = RoleStats::new(&node.me, served);
    stats.skipped_updates = handler.skipped.load(Ordering::Relaxed);
    stats.refused_requests = handler.admission.refused();
    stats.cast_overflows = handler.overflows.snapshot();
    stats.resumed_from_round = resumed.as_ref().map(|r| r.round());
    stats.incarnation = incarnation;
    (stats.member_events, stats.partial_rounds) = handler.log.snapshot();
    let from = stats.resumed_from_round.unwrap_or(0);
    stats.split = handler.split.split(job.rounds.saturating_sub(from));
    if let Some(s) = dgt_server {
        let d = super::dgt::DgtRoleStats::from_server(&s.stats());
        tracing::info!(
            lost = d.lost_blocks,
            late = d.late_blocks,
            timed_out = d.timed_out,
            "dgt receiver"
        );
        stats.served_bytes += s.stats().channels.iter().map(|c| c.bytes).sum::<u64>();
        stats.dgt = Some(d);
        drop(s);
        if let Some(c) = consumer {
            let _ = c.join();
        }
    }
    if let Some((m, _)) = lock(&handler.state).mixed.as_ref() {
        stats.staleness = (0..plan.num_dcs())
            .filter_map(|d| m.staleness(d).copied())
            .collect();
        for (d, s) in stats.staleness.iter().enumerate() {
            tracing::info!(
                dc = d,
                pushes = s.pushes,
                mean = s.mean(),
                max = s.max,
                "staleness"
            );
        }
    }
    Ok(stats)
}
