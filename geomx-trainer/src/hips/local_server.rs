//! The local server role: a server to its DC's workers and a worker to the global tier.
//!
//! Worker pushes of `(key, r)` are parked until all n_d are in; their rank-ordered sum goes to the
//! owners of the key's ranges; when every range answered, the parked pushes are answered with
//! what the workers apply (θ_{r+1}, or per-range segments re-encoded for the LAN, see
//! [`crate::codec::down`]). One uplink thread per key keeps keys independent.
//!
//! Every decoded worker payload and every sum is checked for NaN and ±inf: under
//! `train.nonfinite = "abort"` the job ends naming the worker (or the sum), key and round; under
//! `skip` the key's round is dropped (the push carries only the count with a flag) and the global
//! tier drops it for every DC.
//!
//! At the end the local server pulls the global servers' final θ (exact f32): its hash is the
//! report's `global_param_hash`, and under MixedSync the workers adopt it (the final pull).

use crate::config::{NonFinitePolicy, SyncAlgorithm};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use geomx_net::sched::credit::CreditTuner;
use geomx_net::sched::reply::SharedBytes;
use geomx_net::{
    Handler, KvClient, MsgKind, NetError, PayloadCodec, PeerHandle, Request, Responder,
};

use geomx_net::dgt::link::DgtClient;

use super::admit::{park_pull, Admission, PARKED_PULLS_PER_MEMBER_KEY};
use super::chaos::{Point, SelfFault};
use super::dgt::{DgtRoleStats, DgtUplink, DGT_INFO_KEY};
use super::msg::{UpPush, DIGEST_FLAG, LOSS_KEY};
use super::node::{Aborter, FatalHook, Identity, Node};
use super::plan::roles;
use super::replies::Replies;
use super::round_log::{MemberChange, RoundLog};
use super::time_split::{Phase, PhaseClock, Waiting, WanWait};
use super::upstream::{Rejoin, Upstream};
use super::{lock, JobSpec, LocalAggregator, LocalSum, RoleStats, RunError};
use crate::checkpoint::{RoundParts, SaveQueue, Saver};
use crate::clock::Mark;
use crate::codec::down::{
    decode_dense_segments, forward_dense, forward_sparse, join_segments, ReplyMode,
};
use crate::codec::{
    count_dense, count_nonfinite, count_payload, count_update, decode_push, decode_values,
    CodecBytes, KeyCounts, RangeCompressor, TierCodec, Update,
};
use crate::placement::Range;

mod ts;
mod ts_intra;

/// A completed lower-tier sum to send upward (`None`: the round is dropped).
struct UpJob {
    round: u64,
    sum: Option<Vec<f32>>,
    /// Workers the sum counts (n_d unless some were lost).
    count: u32,
    replies: Vec<Responder>,
}

pub use super::msg::REJOIN_KEY;

/// Flag of a pull key asking for an HFA key's rejoin state at a local round (elastic HFA): the
/// model the workers hold after that averaging, then the milestone, as f32.
pub const HFA_STATE_FLAG: u64 = 1 << 62;

/// Rounds of workers' loss reports a local server keeps (adaptive k reads the previous one).
const LOSS_ROUNDS: usize = 8;

/// A completed local round: (key, round, sum, the pushes it answers).
type Closed = (usize, u64, LocalSum, Vec<Responder>);

/// A key's stored reply: (version, codec, bytes).
type Stored = (u64, PayloadCodec, Arc<Vec<u8>>);

struct State {
    agg: LocalAggregator,
    /// Current (version, reply codec, reply bytes) of every key; `None` until θ_0 arrived.
    theta: Vec<Option<Stored>>,
    /// Worker pushes of the round being collected, per key.
    parked: Vec<Vec<Responder>>,
    /// Worker pulls waiting for a version: (key, min_version, responder).
    pulls: Vec<(usize, u64, Responder)>,
    /// Elastic HFA: each key's (local round, model ++ milestone) for rejoining workers.
    states: Vec<Option<(u64, Arc<Vec<u8>>)>>,
    /// Pulls of a state not reached yet: (key, version, responder).
    state_pulls: Vec<(usize, u64, Responder)>,
    /// Keys that reached the last round.
    finished_keys: usize,
}

struct LocalHandler {
    dc: u32,
    rounds: u64,
    key_lens: Vec<usize>,
    state: Mutex<State>,
    /// Worker node id → rank, known once registration completed.
    rank_of: OnceLock<HashMap<u32, usize>>,
    /// One job queue per key's uplink thread; emptied at the end so the threads exit.
    uplinks: Mutex<Vec<Sender<UpJob>>>,
    aborter: OnceLock<Aborter>,
    /// Under `lost_dc = "continue"`: ends this process on a failure instead of the job, since
    /// a lost DC is survivable (the global tier goes on without it and its restart rejoins).
    die: Option<FatalHook>,
    all_done: Sender<()>,
    /// W, the divisor of the global sum.
    total_workers: u32,
    intra: TierCodec,
    /// Worker-side Bi-Sparse: the workers' pushes may be sparse codec payloads.
    sparse_pushes: bool,
    inter: TierCodec,
    /// How each key's answer travels (see [`ReplyMode`]).
    modes: Vec<ReplyMode>,
    /// HFA / ESync: workers push models, not gradients.
    models: bool,
    policy: NonFinitePolicy,
    /// Inter-tier payload bytes by codec class.
    codec_bytes: Mutex<CodecBytes>,
    /// Sampled top-k selections that fell back to exact top-k.
    fallbacks: AtomicU64,
    /// The uplinks' P3 credit once tuned (`scheduling.p3.credit_bytes = "auto"`; 0: none).
    p3_credit: AtomicU64,
    /// Key rounds dropped here (non-finite worker values or sums).
    skipped: AtomicU64,
    /// FP16 / BF16 overflows of this process's encodings, by key.
    overflows: KeyCounts,
    /// `transport.inter = "dgt"`: one DGT link per global server (index = server rank).
    dgt_links: OnceLock<Vec<DgtClient>>,
    /// Contribution scores and channel assignment of the DGT pushes.
    dgt_up: Mutex<Option<DgtUplink>>,
    /// Under `transport.dgt.adaptive_k`: the workers' reported training losses of the last
    /// rounds, by round (sum, count).
    losses: Mutex<BTreeMap<u64, (f64, u32)>>,
    /// Which connection speaks for which worker; refused requests.
    admission: Admission,
    /// The local round this run started from (0, or the checkpoint's when resuming).
    start: u64,
    /// Training rounds per local round (HFA's k1, else 1): checkpoints count training rounds.
    per_local: u64,
    /// `[checkpoint]`: the saver, its writer thread and the state of the round being
    /// assembled, key by key.
    ckpt: Option<(Saver, SaveQueue, Mutex<RoundParts>)>,
    /// How workers' pushes are answered, by key: inline, or under P3 in priority order per
    /// worker connection.
    replies: Replies,
    /// Workers of this DC (n_d).
    n_workers: usize,
    /// `resilience.lost_worker = "continue"`: a lost worker leaves the rounds, and may rejoin.
    elastic: bool,
    /// Lost and rejoined workers, and the rounds that summed only some workers.
    log: Arc<RoundLog>,
    /// The fault this process injects into itself (`geomx launch --chaos`): as key 0's round
    /// starts, after its first push upward, or while it waits for the global tier's replies.
    chaos: Option<SelfFault>,
    /// `[scheduling.tsengine] inter`: what the other local servers send here.
    ts: Option<ts::TsLocal>,
    /// `[scheduling.tsengine] intra`: the roots of the workers' trees.
    ts_intra: Option<crate::hips::ts_root::Roots>,
    /// Where this process's rounds went ([`super::time_split`]).
    split: PhaseClock,
}

impl LocalHandler {
    fn abort(&self, msg: String) {
        tracing::error!(%msg, "local server failure");
        if let Some(die) = &self.die {
            // E.g. its link was cut for longer than the detection time: the global tier has
            // already left this DC out; the job goes on, and this server's restart rejoins.
            die(&format!(
                "{msg}; ending this local server (lost_dc = \"continue\": the job goes on \
                 without dc {} until its restart rejoins)",
                self.dc
            ));
            return;
        }
        if let Some(a) = self.aborter.get() {
            a.abort(msg);
        }
    }

    fn fail(&self, reply: Responder, msg: String) {
        let _ = reply.error(&msg);
        self.abort(msg);
    }

    /// The rank of the worker whose connection sent `req`, or why the request is refused: the
    /// sender is no worker of this DC, or another connection already speaks for it.
    fn member(&self, req: &Request) -> Result<usize, String> {
        let Some(&rank) = self.rank_of.get().and_then(|m| m.get(&req.sender)) else {
            return Err(format!(
                "{:?} from node {} which is no worker of dc {}",
                req.kind, req.sender, self.dc
            ));
        };
        Ok(rank)
    }

    /// Most pulls that may wait at once (see [`PARKED_PULLS_PER_MEMBER_KEY`]).
    fn pull_cap(&self) -> usize {
        let members = self.rank_of.get().map_or(1, |m| m.len().max(1));
        PARKED_PULLS_PER_MEMBER_KEY * members * self.key_lens.len().max(1)
    }

    /// What a worker pushes: gradients, or models under HFA / ESync.
    fn pushed(&self) -> &'static str {
        if self.models {
            "model"
        } else {
            "gradient"
        }
    }

    /// A worker's training loss of round `req.version` ([`LOSS_KEY`]), kept for the DGT
    /// uplink's adaptive share; bounded to the last [`LOSS_ROUNDS`] rounds.
    fn on_loss(&self, req: &Request, reply: Responder) {
        if let Err(msg) = self.member(req) {
            return self.admission.refuse(reply, msg);
        }
        let loss = <[u8; 8]>::try_from(&req.payload[..])
            .map(f64::from_le_bytes)
            .ok()
            .filter(|l| l.is_finite());
        let Some(loss) = loss else {
            let msg = format!("dc {}: a loss report is one finite f64", self.dc);
            return self.admission.refuse(reply, msg);
        };
        // Only the connection that speaks for the worker reports its loss (admit.rs).
        if let Err(msg) = self.admission.bind(req.sender, &reply) {
            return self.admission.refuse(reply, msg);
        }
        {
            let mut book = lock(&self.losses);
            let e = book.entry(req.version).or_default();
            e.0 += loss;
            e.1 += 1;
            while book.len() > LOSS_ROUNDS {
                book.pop_first();
            }
        }
        let _ = reply.send(req.version, PayloadCodec::Raw, &[]);
    }

    /// The DC's mean training loss of round `round`, if its workers reported it.
    fn mean_loss(&self, round: u64) -> Option<f64> {
        lock(&self.losses)
            .get(&round)
            .filter(|(_, n)| *n > 0)
            .map(|&(sum, n)| sum / f64::from(n))
    }

    fn on_push(&self, mut req: Request, reply: Responder) {
        if req.key == LOSS_KEY {
            return self.on_loss(&req, reply);
        }
        match super::ts_msg::Op::of_key(req.key) {
            Some((super::ts_msg::Tier::Inter, op)) => return self.on_ts(op, req, reply),
            Some((super::ts_msg::Tier::Intra, op)) => return self.on_ts_intra(op, req, reply),
            None => {}
        }
        let key = req.key as usize;
        // A peer's bad request is refused, never fatal: a genuine worker fails on the error
        // reply and ends the job itself, naming the cause.
        let rank = match self.member(&req) {
            Ok(r) => r,
            Err(msg) => return self.admission.refuse(reply, msg),
        };
        let Some(&len) = self.key_lens.get(key) else {
            let msg = format!("dc {}: push of unknown key {key}", self.dc);
            return self.admission.refuse(reply, msg);
        };
        let grad = match decode_push(req.codec, &req.payload, key, len, self.sparse_pushes) {
            Ok(g) => g,
            Err(e) => {
                let msg = format!("worker (dc {}, rank {rank}): {e}", self.dc);
                return self.admission.refuse(reply, msg);
            }
        };
        // The payload buffer goes back to the receive pool: the next push lands in memory
        // already touched (see `geomx_net::bufpool`), not in fresh pages.
        geomx_net::bufpool::recycle(std::mem::take(&mut req.payload));
        // A well-formed push binds the worker's id to this connection (admit.rs).
        if let Err(msg) = self.admission.bind(req.sender, &reply) {
            return self.admission.refuse(reply, msg);
        }
        let bad = count_nonfinite(&grad);
        if bad > 0 {
            let msg = format!(
                "non-finite {} from worker (dc {}, rank {rank}): key {key}, round {}: {bad} of \
                 {len} values",
                self.pushed(),
                self.dc,
                req.version
            );
            if self.policy == NonFinitePolicy::Abort {
                return self.fail(reply, msg);
            }
            // Under `skip` the NaN makes the sum non-finite, which drops the round below.
            tracing::warn!(%msg, "dropping the key's round");
        }
        let mut st = lock(&self.state);
        match st.agg.push(key, req.version, rank, grad) {
            Ok(None) => st.parked[key].push(reply),
            Ok(Some(sum)) => {
                let mut replies = std::mem::take(&mut st.parked[key]);
                replies.push(reply);
                drop(st);
                self.send_up(key, req.version, sum, replies);
            }
            Err(e) => {
                drop(st);
                let msg = format!("worker (dc {}, rank {rank}): {e}", self.dc);
                self.admission.refuse(reply, msg);
            }
        }
    }

    /// Hands a completed local sum and the pushes it answers to the key's uplink. A sum of no
    /// worker goes up as count 0 without values: the DC is absent from that round.
    fn send_up(&self, key: usize, round: u64, sum: LocalSum, replies: Vec<Responder>) {
        self.log
            .summed(self.dc, key, round, &sum.ranks, self.n_workers);
        let count = sum.count();
        let sum = match count {
            0 => None,
            _ => match self.check_sum(key, round, sum.sum) {
                Some(s) => s,
                None => return,
            },
        };
        let job = UpJob {
            round,
            sum,
            count,
            replies,
        };
        self.to_uplink(key, job);
    }

    /// Hands a completed local sum to the key's uplink thread.
    fn to_uplink(&self, key: usize, job: UpJob) {
        let tx = lock(&self.uplinks).get(key).cloned();
        match tx {
            Some(tx) => {
                if tx.send(job).is_err() {
                    self.abort(format!("dc {}: uplink of key {key} stopped", self.dc));
                }
            }
            None => self.abort(format!("dc {}: push before the uplinks started", self.dc)),
        }
    }

    /// Worker `rank` is lost (`resilience.lost_worker = "continue"`): it leaves the rounds, and
    /// the rounds that waited only for it go up.
    fn lose_worker(&self, rank: usize, reason: &NetError) {
        let mut st = lock(&self.state);
        if !st.agg.is_member(rank) {
            return;
        }
        let round = st.agg.top_round();
        let done = st.agg.lose(rank);
        let closed = Self::with_replies(&mut st, done);
        drop(st);
        // Events count training rounds (an HFA local round is k1 of them).
        self.log.change(
            self.dc,
            rank as u32,
            MemberChange::Lost,
            round * self.per_local,
            reason.to_string(),
        );
        for (key, round, sum, replies) in closed {
            self.send_up(key, round, sum, replies);
        }
    }

    /// A restarted worker asks to count again ([`REJOIN_KEY`]): it counts from the round every
    /// key has reached, which the reply's version names.
    fn rejoin(&self, req: &Request, reply: Responder) {
        if !self.elastic {
            let msg = format!(
                "dc {}: a worker may rejoin only with resilience.lost_worker = \"continue\"",
                self.dc
            );
            return self.admission.refuse(reply, msg);
        }
        let rank = match self.member(req) {
            Ok(r) => r,
            Err(msg) => return self.admission.refuse(reply, msg),
        };
        // The connection must be the worker's only one: the lost one's loss was seen first.
        if let Err(msg) = self.admission.bind(req.sender, &reply) {
            return self.admission.refuse(reply, msg);
        }
        let mut st = lock(&self.state);
        if st.agg.is_member(rank) {
            drop(st);
            let msg = format!(
                "worker (dc {}, rank {rank}) rejoining while a member",
                self.dc
            );
            return self.admission.refuse(reply, msg);
        }
        let Some((from, done)) = st.agg.join(rank) else {
            drop(st);
            let msg = format!("dc {}: no worker rank {rank}", self.dc);
            return self.admission.refuse(reply, msg);
        };
        let closed = Self::with_replies(&mut st, done);
        drop(st);
        self.log.change(
            self.dc,
            rank as u32,
            MemberChange::Rejoined,
            from * self.per_local,
            String::new(),
        );
        let _ = reply.send(from, PayloadCodec::Raw, &[]);
        for (key, round, sum, replies) in closed {
            self.send_up(key, round, sum, replies);
        }
    }

    /// Completed local rounds with the pushes parked for them (answered once they are done).
    fn with_replies(st: &mut State, done: super::local_agg::Completed) -> Vec<Closed> {
        done.into_iter()
            .map(|(key, round, sum)| {
                let replies = std::mem::take(&mut st.parked[key]);
                (key, round, sum, replies)
            })
            .collect()
    }

    /// The local sum of `key` at `round`, checked: `Some(Some(sum))` to push, `Some(None)` to drop
    /// the round (`skip`), `None` when the job is being aborted.
    fn check_sum(&self, key: usize, round: u64, sum: Vec<f32>) -> Option<Option<Vec<f32>>> {
        let bad = count_nonfinite(&sum);
        if bad == 0 {
            return Some(Some(sum));
        }
        let msg = format!(
            "non-finite local sum: key {key}, round {round}: {bad} of {} values",
            sum.len()
        );
        if self.policy == NonFinitePolicy::Abort {
            self.abort(msg);
            return None;
        }
        tracing::warn!(%msg, "round dropped");
        self.skipped.fetch_add(1, Ordering::Relaxed);
        Some(None)
    }

    fn on_pull(&self, req: Request, reply: Responder) {
        if req.key == REJOIN_KEY {
            return self.rejoin(&req, reply);
        }
        if req.key & HFA_STATE_FLAG != 0 {
            return self.on_state_pull(&req, reply);
        }
        let key = req.key as usize;
        if let Err(msg) = self.member(&req) {
            return self.admission.refuse(reply, msg);
        }
        if key < self.key_lens.len() {
            if let Err(msg) = self.admission.bind(req.sender, &reply) {
                return self.admission.refuse(reply, msg);
            }
        }
        let mut st = lock(&self.state);
        match st.theta.get(key) {
            None => {
                drop(st);
                let msg = format!("dc {}: pull of unknown key {key}", self.dc);
                self.admission.refuse(reply, msg);
            }
            Some(Some((v, codec, bytes))) if *v >= req.version => {
                let (v, codec) = (*v, *codec);
                let bytes: SharedBytes = bytes.clone();
                drop(st);
                self.replies.send(key, reply, v, codec, &bytes);
            }
            Some(_) => {
                let cap = self.pull_cap();
                if let Some(reply) = park_pull(&mut st.pulls, cap, key, req.version, reply) {
                    drop(st);
                    let msg = format!("dc {}: {cap} pulls wait already", self.dc);
                    self.admission.refuse(reply, msg);
                }
            }
        }
    }

    /// A rejoining HFA worker pulls a key's state ([`HFA_STATE_FLAG`]) at the round it counts
    /// from; answered once that averaging is done.
    fn on_state_pull(&self, req: &Request, reply: Responder) {
        let key = (req.key & !HFA_STATE_FLAG) as usize;
        if let Err(msg) = self.member(req) {
            return self.admission.refuse(reply, msg);
        }
        if !self.elastic || !self.models || key >= self.key_lens.len() {
            let msg = format!("dc {}: no HFA rejoin state for key {key}", self.dc);
            return self.admission.refuse(reply, msg);
        }
        let mut st = lock(&self.state);
        match st.states[key].clone() {
            Some((v, bytes)) if v >= req.version => {
                drop(st);
                let _ = reply.send(v, PayloadCodec::Raw, &bytes);
            }
            _ => {
                let cap = self.pull_cap();
                if let Some(reply) = park_pull(&mut st.state_pulls, cap, key, req.version, reply) {
                    drop(st);
                    let msg = format!("dc {}: {cap} pulls wait already", self.dc);
                    self.admission.refuse(reply, msg);
                }
            }
        }
    }

    /// Stores the reply of `key` at `version` and answers `replies` plus the pulls it satisfies;
    /// under elastic HFA also the key's rejoin `state` (model ++ milestone as f32).
    fn publish(
        &self,
        key: usize,
        version: u64,
        codec: PayloadCodec,
        bytes: impl Into<Arc<Vec<u8>>>,
        replies: Vec<Responder>,
        state: Option<Vec<u8>>,
    ) {
        if let (0, Some(c)) = (key, self.chaos.as_ref()) {
            c.at(version * self.per_local, Point::Start);
        }
        let bytes: Arc<Vec<u8>> = bytes.into();
        let mut st = lock(&self.state);
        st.theta[key] = Some((version, codec, bytes.clone()));
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut st.pulls)
            .into_iter()
            .partition(|(k, v, _)| *k == key && *v <= version);
        st.pulls = rest;
        let mut state_ready = Vec::new();
        if let Some(state) = state {
            let state = Arc::new(state);
            st.states[key] = Some((version, state.clone()));
            let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut st.state_pulls)
                .into_iter()
                .partition(|(k, v, _)| *k == key && *v <= version);
            st.state_pulls = rest;
            state_ready.extend(ready.into_iter().map(|(_, _, r)| (r, state.clone())));
        }
        if version == self.rounds {
            st.finished_keys += 1;
            if st.finished_keys == self.key_lens.len() {
                let _ = self.all_done.send(());
            }
        }
        drop(st);
        if version > self.start {
            // Under TSEngine on the intra tier θ goes to the workers through the pull tree.
            self.ts_intra_theta(key, version - 1, codec, &bytes);
        }
        for (r, state) in state_ready {
            let state: SharedBytes = state;
            self.replies
                .send(key, r, version, PayloadCodec::Raw, &state);
        }
        let payload: SharedBytes = bytes;
        for r in replies
            .into_iter()
            .chain(ready.into_iter().map(|(_, _, r)| r))
        {
            self.replies.send(key, r, version, codec, &payload);
        }
    }

    /// Counts `key` at local round `version` towards that round's checkpoint, when one is due,
    /// with its Bi-Sparse compressors' state (`comp.<key>.<range index>.<tensor>`), and writes
    /// the checkpoint once every key is in. Besides that, the local server's state is its round:
    /// the aggregator starts there, and θ_r (FSA) or the milestone (HFA, saved at global
    /// averagings only) comes from the global servers. Called before the round's reply is
    /// published; the file is written while the next rounds run (`checkpoint.background`), or
    /// before the reply goes out. A failed write ends the job (it asked for checkpoints).
    fn checkpoint(&self, version: u64, key: usize, compressors: &[RangeCompressor]) {
        let Some((saver, queue, parts)) = &self.ckpt else {
            return;
        };
        let round = version * self.per_local;
        if version <= self.start || !saver.due(round) {
            return;
        }
        let Some(state) = lock(parts).add(round, |f| {
            for (i, c) in compressors.iter().enumerate() {
                super::ckpt::put_compressor(f, &format!("comp.{key}.{i}"), c);
            }
        }) else {
            return;
        };
        if let Err(e) = queue.save(state) {
            self.abort(format!("dc {}: writing a checkpoint: {e}", self.dc));
        }
    }

    /// A restarted local server starts collecting at `round`, with every worker lost until it
    /// rejoins.
    fn restart_at(&self, round: u64) {
        let mut st = lock(&self.state);
        st.agg = LocalAggregator::new(&self.key_lens, self.n_workers, round);
        for r in 0..self.n_workers {
            st.agg.lose(r);
        }
    }

    /// Injects this process's chaos fault at `point` of key 0's upward exchange number
    /// `exchange` (the training round under FSA / MixedSync, the global round under HFA). A
    /// local server pushes at the end of training round (exchange + 1) · k1 · k2 − 1, like its
    /// workers (k1 = k2 = 1 outside HFA).
    fn fault_at(&self, key: usize, exchange: u64, job: &JobSpec, point: Point) {
        if let (0, Some(c)) = (key, self.chaos.as_ref()) {
            c.at((exchange + 1) * job.rounds_per_global() - 1, point);
        }
    }

    fn finished(&self) -> bool {
        lock(&self.state).finished_keys == self.key_lens.len()
    }

    /// Encodes dense values for the workers in the intra codec, counting overflows of `key`.
    fn encode_intra(&self, key: usize, x: &[f32]) -> (PayloadCodec, Vec<u8>) {
        let e = self.intra.encode_dense(x);
        self.overflows.add(key, e.overflow);
        (e.codec, e.bytes)
    }
}

impl Handler for LocalHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        let known = || self.rank_of.get().is_some();
        let Some((req, reply)) = self.admission.hold_early(known, req, reply) else {
            return;
        };
        match req.kind {
            MsgKind::Push => self.on_push(req, reply),
            MsgKind::Pull => self.on_pull(req, reply),
            other => {
                let msg = format!("a local server does not serve {other:?}");
                self.admission.refuse(reply, msg);
            }
        }
    }

    fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
        let Some(&rank) = self.rank_of.get().and_then(|m| m.get(&peer.node_id())) else {
            return;
        };
        // Only the connection that speaks for the worker is the worker: a Hello that borrowed
        // its id and went away is nobody's loss.
        if !self.admission.holds(peer) {
            return;
        }
        if self.elastic {
            // The worker's id is free for its next incarnation's connection.
            self.admission.release(peer);
            if !self.finished() {
                self.lose_worker(rank, reason);
            }
            return;
        }
        if !self.finished() {
            self.abort(format!(
                "worker (dc {}, rank {rank}) disconnected: {reason}",
                self.dc
            ));
        }
    }
}

/// What the global tier answered for one range, decoded.
enum RangeReply {
    /// θ (pulls, Theta mode) or an increment (Delta mode), per the key's [`ReplyMode`].
    Dense(Vec<f32>),
    /// A sparse range's update.
    Sparse(Update),
}

/// How one key's ranges travel upward.
enum UpSum<'a> {
    /// A θ pull at a version (start-up, end of run).
    Pull,
    /// Dense values.
    Dense(&'a [f32]),
    /// Bi-Sparse pushes through the ranges' compressors.
    Sparse(&'a [f32], &'a mut [RangeCompressor]),
    /// A dropped round: the count with the skip flag.
    Skip,
}

/// Pushes `sum` of `key` at `round` to the owners of its ranges (or pulls them at `round`) and
/// decodes their replies, in range order.
///
/// MixedSync passes `base`, the global version of each range the DC's θ came from: pushes carry
/// it instead of `round`, any later version answers, and `base` is advanced to the reply's.
#[allow(clippy::too_many_arguments)]
fn exchange(
    handler: &LocalHandler,
    up: &Upstream,
    key: usize,
    ranges: &[(usize, Range)],
    round: u64,
    count: u32,
    sum: UpSum<'_>,
    job: &JobSpec,
    mut base: Option<&mut [u64]>,
    wan: &mut WanWait<'_>,
) -> Result<Vec<RangeReply>, String> {
    let key_len = handler.key_lens[key];
    let mut pending = Vec::with_capacity(ranges.len());
    let pushing = !matches!(sum, UpSum::Pull);
    // Sparse replies: FSA's sparse keys. HFA's sparse keys push sparse deltas but are answered
    // with increments (dense, or a sparse codec payload the dense branch decodes).
    let sparse = pushing && handler.modes[key] == ReplyMode::Sparse;
    let mut counts = CodecBytes::new();
    let (values, mut compressors, skip) = match sum {
        UpSum::Pull => (None, None, false),
        UpSum::Dense(s) => (Some(s), None, false),
        UpSum::Sparse(s, c) => (Some(s), Some(c), false),
        UpSum::Skip => (None, None, true),
    };
    for (i, (id, r)) in ranges.iter().enumerate() {
        let version = base.as_deref().map_or(round, |b| b[i]);
        let slice = |s: &[f32]| s[r.offset..r.offset + r.len].to_vec();
        let payload = match (values, compressors.as_mut()) {
            (None, _) if skip => Some(UpPush::encode_skip(count)),
            (None, _) => None,
            (Some(s), Some(comps)) => {
                let comp = comps
                    .get_mut(i)
                    .ok_or_else(|| format!("range {id}: no compressor"))?;
                let before = comp.fallbacks();
                let (body, overflow) = comp.push(&slice(s), round)?;
                handler.overflows.add(key, overflow);
                handler
                    .fallbacks
                    .fetch_add(comp.fallbacks() - before, Ordering::Relaxed);
                count_payload(&mut counts, &body);
                Some(UpPush::encode_coded(count, &body))
            }
            (Some(s), None) if handler.dgt_links.get().is_some() => {
                // DGT: the values go through the range's DGT link, the push carries the count.
                let links = handler.dgt_links.get().ok_or("dgt links gone")?;
                let link = links
                    .get(r.server)
                    .ok_or_else(|| format!("range {id}: no dgt link to server {}", r.server))?;
                let x = slice(s);
                let mut up = lock(&handler.dgt_up);
                let up = up.as_mut().ok_or("dgt uplink not set")?;
                // Adaptive k: the share of round r follows the DC's loss of round r − 1, which
                // every worker reported before its pushes of round r.
                up.observe_loss(round, || {
                    round.checked_sub(1).and_then(|p| handler.mean_loss(p))
                });
                // The uplink's value type is the tier's dense type (`dgt::value_type`).
                crate::codec::bytes::count_values(&mut counts, handler.inter.dense_type(), x.len());
                let overflow = up.push(link, *id, version, x)?;
                handler.overflows.add(key, overflow);
                Some(count.to_le_bytes().to_vec())
            }
            (Some(s), None) if handler.inter.is_plain() => {
                let body = UpPush::encode(count, &slice(s));
                count_dense(&mut counts, PayloadCodec::DenseF32, &body[4..]);
                Some(body)
            }
            (Some(s), None) => {
                let e = handler.inter.encode_dense(&slice(s));
                handler.overflows.add(key, e.overflow);
                count_dense(&mut counts, e.codec, &e.bytes);
                Some(UpPush::encode_coded(
                    count,
                    &raw_body(e.codec, e.bytes, r.len),
                ))
            }
        };
        // Under P3 a push waits for the socket to take what is queued ahead of it.
        let (at, p) = wan.time(|| match payload {
            Some(payload) => {
                let at = (*id as u64, version, r.offset as u64, key_len as u64);
                up.push(r.server, job.keys.priority(key), at, payload)
                    .map(|p| (at, p))
            }
            None => {
                let at = (*id as u64, round, r.offset as u64, key_len as u64);
                up.pull(r.server, at).map(|p| (at, p))
            }
        })?;
        pending.push((*id, r, at, p));
        if i == 0 && pushing {
            handler.fault_at(key, round, job, Point::MidPush);
        }
    }
    if pushing {
        handler.fault_at(key, round, job, Point::ReplyWait);
    }
    let mut out = Vec::with_capacity(ranges.len());
    for (i, (id, r, at, p)) in pending.into_iter().enumerate() {
        let sent = base.as_deref().map_or(round, |b| b[i]);
        let want = if pushing { sent + 1 } else { sent };
        let resp = wan.time(|| up.wait(r.server, at, pushing, p))?;
        if resp.version < want {
            return Err(format!(
                "range {id}: reply at version {}, expected {want}",
                resp.version
            ));
        }
        if let Some(b) = base.as_deref_mut() {
            b[i] = resp.version;
        }
        if sparse {
            count_update(&mut counts, &resp.payload);
            out.push(RangeReply::Sparse(Update::decode(
                &resp.payload,
                id,
                r.len,
            )?));
        } else {
            if pushing {
                count_dense(&mut counts, resp.codec, &resp.payload);
            }
            let vals = match resp.codec {
                PayloadCodec::Raw => crate::codec::decode_any(&resp.payload, id, r.len)?,
                codec => decode_values(codec, &resp.payload, id, r.len)?,
            };
            geomx_net::bufpool::recycle(resp.payload);
            let bad = count_nonfinite(&vals);
            if bad > 0 {
                return Err(format!("range {id}: {bad} non-finite values in the reply"));
            }
            out.push(RangeReply::Dense(vals));
        }
    }
    if pushing {
        let mut total = lock(&handler.codec_bytes);
        for (k, v) in counts {
            *total.entry(k).or_default() += v;
        }
    }
    let resync = out
        .iter()
        .filter(|r| matches!(r, RangeReply::Sparse(u) if u.theta.is_some()))
        .count();
    if resync != 0 && resync != ranges.len() {
        return Err(format!(
            "only {resync} of {} ranges resynchronised",
            ranges.len()
        ));
    }
    Ok(out)
}

/// The key's θ assembled from dense range replies (θ pulls and Theta-mode replies).
fn assemble(
    ranges: &[(usize, Range)],
    key_len: usize,
    replies: Vec<RangeReply>,
) -> Result<Vec<f32>, String> {
    let mut theta = vec![0.0f32; key_len];
    for ((id, r), reply) in ranges.iter().zip(replies) {
        match reply {
            RangeReply::Dense(v) => theta[r.offset..r.offset + r.len].copy_from_slice(&v),
            RangeReply::Sparse(_) => return Err(format!("range {id}: sparse reply to a θ pull")),
        }
    }
    Ok(theta)
}

/// The body of a coded up-push for a dense payload: f32 payloads get their codec header too.
fn raw_body(codec: PayloadCodec, body: Vec<u8>, len: usize) -> Vec<u8> {
    if codec == PayloadCodec::Raw {
        return body;
    }
    let header = geomx_kernels::PayloadHeader {
        layout: geomx_kernels::Layout::Dense,
        value_type: geomx_kernels::ValueType::F32,
        scale_exp: 0,
        n_total: len as u32,
        count: len as u32,
    };
    let mut out = header.to_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// An HFA averaging's reply to the workers (codec, bytes) and, under elastic HFA, the key's
/// rejoin state.
type HfaAnswer = (PayloadCodec, Vec<u8>, Option<Vec<u8>>);

/// The rejoin state of an HFA key: the model the workers hold, then the milestone, as f32.
fn rejoin_state(model: &[f32], milestone: &[f32]) -> Vec<u8> {
    let mut out = super::msg::f32_bytes(model).into_owned();
    out.extend_from_slice(&super::msg::f32_bytes(milestone));
    out
}

/// One key's uplink: its ranges, their compressors (Bi-Sparse) and, under HFA / ESync, the
/// DC's copy of the milestone.
struct Uplink {
    handler: Arc<LocalHandler>,
    key: usize,
    up: Arc<Upstream>,
    ranges: Vec<(usize, Range)>,
    job: JobSpec,
    compressors: Vec<RangeCompressor>,
    milestone: Option<Vec<f32>>,
    /// Key 0's uplink under `credit_bytes = "auto"`: tunes every uplink's credit from the
    /// period of its rounds (every key completes once per round).
    tuner: Option<CreditTuner>,
}

impl Uplink {
    fn run(mut self, jobs: Receiver<UpJob>) {
        let mut base =
            (self.job.sync == SyncAlgorithm::Mixed).then(|| vec![0u64; self.ranges.len()]);
        let h = self.handler.clone();
        let mut last_round: Option<Instant> = None;
        for up in jobs {
            let arrived = Mark::now();
            h.split.enter(Phase::Busy);
            let mut wan = WanWait::new(Some(&h.split));
            let (version, res) = match self.job.hfa_periods() {
                Some((_, k2)) => {
                    let local = up.round + 1;
                    (local, self.hfa_round(local, k2, up.sum, up.count, &mut wan))
                }
                None => (
                    up.round + 1,
                    self.round(up.round, up.sum, up.count, base.as_deref_mut(), &mut wan)
                        .map(|(c, b)| (c, b, None)),
                ),
            };
            h.split.thread_busy(arrived, wan.total);
            h.split.leave(Phase::Busy);
            match res {
                Ok((codec, bytes, state)) => {
                    h.split.enter(Phase::Other);
                    h.checkpoint(version, self.key, &self.compressors);
                    h.publish(self.key, version, codec, bytes, up.replies, state);
                    if let Err(e) = self.tune(&mut last_round) {
                        h.abort(format!("dc {}: {e}", h.dc));
                        return;
                    }
                    h.split.leave(Phase::Other);
                }
                Err(e) => {
                    h.abort(format!(
                        "dc {}: key {} round {}: {e}",
                        h.dc, self.key, up.round
                    ));
                    return;
                }
            }
        }
    }

    /// Feeds the tuner the time since the previous round's answer and applies what it chooses.
    fn tune(&mut self, last: &mut Option<Instant>) -> Result<(), String> {
        let Some(t) = self.tuner.as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        let change = last.and_then(|l| t.record((now - l).as_secs_f64()));
        *last = Some(now);
        if let Some(c) = change {
            self.up.set_credit(c)?;
        }
        if let Some(c) = t.settled() {
            if self.handler.p3_credit.swap(u64::from(c), Ordering::Relaxed) == 0 {
                tracing::info!(credit = c, measured = ?t.measured(), "P3 uplink credit tuned");
            }
        }
        Ok(())
    }

    /// FSA / MixedSync: pushes the DC's sum (or a dropped round) and turns the global tier's
    /// answer into the workers' reply.
    fn round(
        &mut self,
        round: u64,
        sum: Option<Vec<f32>>,
        count: u32,
        base: Option<&mut [u64]>,
        wan: &mut WanWait<'_>,
    ) -> Result<(PayloadCodec, Vec<u8>), String> {
        let h = &self.handler;
        let up = match (&sum, self.compressors.is_empty()) {
            (None, _) => UpSum::Skip,
            (Some(s), true) => UpSum::Dense(s),
            (Some(s), false) => UpSum::Sparse(s, &mut self.compressors),
        };
        let replies = exchange(
            h,
            &self.up,
            self.key,
            &self.ranges,
            round,
            count,
            up,
            &self.job,
            base,
            wan,
        )?;
        self.down_reply(replies)
    }

    /// The workers' reply for the global tier's answers: θ as f32 (Theta), or one segment per
    /// range re-encoded with the intra codec (Delta increments, Sparse updates).
    fn down_reply(&self, replies: Vec<RangeReply>) -> Result<(PayloadCodec, Vec<u8>), String> {
        let h = &self.handler;
        let key_len = h.key_lens[self.key];
        if h.modes[self.key] == ReplyMode::Theta {
            let theta = assemble(&self.ranges, key_len, replies)?;
            return Ok((
                PayloadCodec::DenseF32,
                super::msg::f32_bytes(&theta).into_owned(),
            ));
        }
        let mut segs = Vec::with_capacity(replies.len());
        for reply in replies {
            let seg = match reply {
                RangeReply::Dense(y) => {
                    let e = forward_dense(&y, &h.intra);
                    h.overflows.add(self.key, e.overflow);
                    e.bytes
                }
                RangeReply::Sparse(u) => {
                    let (seg, overflow) = forward_sparse(&u, h.total_workers, &h.intra);
                    h.overflows.add(self.key, overflow);
                    seg
                }
            };
            segs.push(seg);
        }
        Ok((PayloadCodec::Raw, join_segments(segs)))
    }

    /// HFA at a local server for averaging number `local` (1-based) of one key: `sum` holds
    /// Σ_i w_i (rank order). Forms w̄_d = sum / n_d; every `k2`-th averaging also sends
    /// f_d·(w̄_d − m) to the global tier and adds the increment it answers to m. Returns the
    /// reply to the workers: w̄_d in the intra codec, the increment's segments on global rounds,
    /// or an empty payload for a dropped local averaging (workers go back to m).
    fn hfa_round(
        &mut self,
        local: u64,
        k2: u64,
        sum: Option<Vec<f32>>,
        count: u32,
        wan: &mut WanWait<'_>,
    ) -> Result<HfaAnswer, String> {
        let h = self.handler.clone();
        // The DC's mean is over the workers summed (all n_d unless some were lost).
        let n_d = count as f32;
        let mean = sum.map(|mut s| {
            for a in s.iter_mut() {
                *a /= n_d;
            }
            s
        });
        if local % k2 != 0 {
            // What the workers hold next: the mean, or the milestone when the round was dropped.
            let state = h.elastic.then(|| {
                let m = self.milestone.as_deref().unwrap_or_default();
                rejoin_state(mean.as_deref().unwrap_or(m), m)
            });
            let (codec, bytes) = match mean {
                Some(m) => h.encode_intra(self.key, &m),
                None => (PayloadCodec::Raw, Vec::new()),
            };
            return Ok((codec, bytes, state));
        }
        let m = self.milestone.as_mut().ok_or("no milestone")?;
        let f = super::hfa::delta_factor(
            self.job.hfa.weighting,
            count as usize,
            self.job.plan.total_workers(),
            self.job.plan.num_dcs(),
        );
        let delta = mean.map(|mut w| {
            for (a, &mi) in w.iter_mut().zip(m.iter()) {
                *a = f * (*a - mi);
            }
            w
        });
        let global = local / k2 - 1;
        let delta = match delta {
            Some(d) => h
                .check_sum(self.key, global, d)
                .ok_or("non-finite milestone delta")?,
            None => None,
        };
        let up = match &delta {
            Some(d) if !self.compressors.is_empty() => UpSum::Sparse(d, &mut self.compressors),
            Some(d) => UpSum::Dense(d),
            None => UpSum::Skip,
        };
        let replies = exchange(
            &h,
            &self.up,
            self.key,
            &self.ranges,
            global,
            count,
            up,
            &self.job,
            None,
            wan,
        )?;
        let (codec, bytes) = self.down_reply(replies)?;
        // The milestone moves by what the workers decode (the global server applied the same).
        let z = decode_dense_segments(
            &bytes,
            self.key,
            h.key_lens[self.key],
            &self.job.plan.key_parts(self.key),
            |seg, id, n| h.intra.decode_dense(seg, id, n),
        )?;
        let m = self.milestone.as_mut().ok_or("no milestone")?;
        for (a, &d) in m.iter_mut().zip(&z) {
            *a += d;
        }
        let state = h.elastic.then(|| rejoin_state(m, m));
        Ok((codec, bytes, state))
    }
}

/// The global tier's final θ of every key (a pull at `version` of every range), assembled.
fn final_theta(
    handler: &LocalHandler,
    up: &Upstream,
    key_ranges: &[Vec<(usize, Range)>],
    version: u64,
    job: &JobSpec,
) -> Result<Vec<Vec<f32>>, String> {
    key_ranges
        .iter()
        .enumerate()
        .map(|(k, ranges)| pull_theta(handler, up, k, ranges, version, job))
        .collect()
}

/// Key `key`'s θ at `version` from the global tier (a pull of each of its ranges), assembled.
fn pull_theta(
    handler: &LocalHandler,
    up: &Upstream,
    key: usize,
    ranges: &[(usize, Range)],
    version: u64,
    job: &JobSpec,
) -> Result<Vec<f32>, String> {
    let mut wan = WanWait::new(None);
    let replies = exchange(
        handler,
        up,
        key,
        ranges,
        version,
        0,
        UpSum::Pull,
        job,
        None,
        &mut wan,
    )?;
    assemble(ranges, handler.key_lens[key], replies)
}

/// A fresh job's θ_0 per key, made from the model's seed like the global servers' and kept
/// where every range's digest at version 0 matches theirs ([`DIGEST_FLAG`]); `None` where one
/// differs or could not be had (that key is pulled instead). The digests are asked for all at
/// once: one round trip across the WAN instead of the model's bytes.
fn seeded_theta0(
    clients: &[KvClient],
    key_ranges: &[Vec<(usize, Range)>],
    job: &JobSpec,
) -> Vec<Option<Vec<f32>>> {
    let theta = job.keys.split(job.model.init(job.seed));
    let asked: Vec<Vec<_>> = key_ranges
        .iter()
        .map(|ranges| {
            ranges
                .iter()
                .map(|(id, r)| {
                    let c = clients.get(r.server)?;
                    c.pull(DIGEST_FLAG | *id as u64, 0, 0, 0).ok()
                })
                .collect()
        })
        .collect();
    theta
        .into_iter()
        .zip(key_ranges.iter().zip(asked))
        .map(|(t, (ranges, asked))| {
            let same = ranges.iter().zip(asked).all(|((id, r), p)| {
                let Some(resp) = p.and_then(|p| p.wait(job.wait_limit()).ok()) else {
                    return false;
                };
                let mine = t
                    .get(r.offset..r.offset + r.len)
                    .map(crate::hash::values_hash);
                let theirs = <[u8; 8]>::try_from(resp.payload.as_slice()).map(u64::from_le_bytes);
                let same = mine.is_some() && theirs.ok() == mine;
                if !same {
                    tracing::info!(
                        range = id,
                        "θ_0 differs from the global server's: pulling it"
                    );
                }
                same
            });
            (same && t.len() == ranges.iter().map(|(_, r)| r.len).sum::<usize>()).then_some(t)
        })
        .collect()
}

/// Runs the local server of DC `dc` until the job shuts down; returns its traffic.
pub fn run(
    job: &JobSpec,
    dc: u32,
    coord_addr: &str,
    bind_addr: &str,
    fatal: FatalHook,
) -> Result<RoleStats, RunError> {
    let plan = &job.plan;
    let n_d = *plan
        .workers_per_dc
        .get(dc as usize)
        .ok_or_else(|| RunError::Membership(format!("no DC {dc} in the topology")))?;
    let me = Identity {
        role: roles::LOCAL_SERVER,
        dc,
        rank: 0,
    };
    let n_keys = plan.key_lens.len();
    // Resuming at training round r: the local round r / k1, the global round r / (k1 · k2).
    let mut resumed = super::ckpt::resume(job, &me)?;
    let round0 = resumed.as_ref().map_or(0, |r| r.round());
    let (mut start, mut start_global) = (
        round0 / job.rounds_per_local(),
        round0 / job.rounds_per_global(),
    );
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let dgt_up = match job.inter.dgt() {
        Some(d) => Some(
            DgtUplink::new(
                d,
                super::dgt::value_type(job.inter.dense_type()).map_err(RunError::Protocol)?,
            )
            .map_err(RunError::Protocol)?,
        ),
        None => None,
    };
    let handler = Arc::new(LocalHandler {
        dc,
        rounds: job.local_rounds(),
        key_lens: plan.key_lens.clone(),
        state: Mutex::new(State {
            agg: LocalAggregator::new(&plan.key_lens, n_d, start),
            theta: vec![None; n_keys],
            parked: (0..n_keys).map(|_| Vec::new()).collect(),
            pulls: Vec::new(),
            states: vec![None; n_keys],
            state_pulls: Vec::new(),
            finished_keys: 0,
        }),
        rank_of: OnceLock::new(),
        uplinks: Mutex::new(Vec::new()),
        aborter: OnceLock::new(),
        die: job.dcs_may_rejoin().then(|| fatal.clone()),
        all_done: done_tx,
        total_workers: plan.total_workers() as u32,
        intra: job.intra.clone(),
        sparse_pushes: job.worker_sparse.is_some(),
        inter: job.inter.clone(),
        modes: (0..n_keys).map(|k| job.reply_mode(k)).collect(),
        models: job.hfa_periods().is_some(),
        policy: job.nonfinite.policy,
        codec_bytes: Mutex::new(CodecBytes::new()),
        fallbacks: AtomicU64::new(0),
        p3_credit: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        overflows: KeyCounts::default(),
        dgt_links: OnceLock::new(),
        dgt_up: Mutex::new(dgt_up),
        losses: Mutex::new(BTreeMap::new()),
        admission: Admission::default(),
        start,
        per_local: job.rounds_per_local(),
        ckpt: super::ckpt::save_queue(job, &me)?
            .map(|(s, q)| (s, q, Mutex::new(RoundParts::new(n_keys, job.config_hash)))),
        replies: Replies::new(job, &format!("geomx-reply-l{dc}"), 0..n_keys),
        n_workers: n_d,
        elastic: job.workers_may_rejoin(),
        log: Arc::new(RoundLog::of(&me)),
        chaos: SelfFault::from_env().map_err(RunError::Membership)?,
        ts: job
            .tsengine
            .map(|_| ts::TsLocal::new(plan.key_lens.clone())),
        ts_intra: ts_intra::roots(job, dc, n_d).map_err(RunError::Protocol)?,
        split: PhaseClock::new(Waiting::Lan),
    });
    let (mut server, node) =
        Node::serve_and_join(coord_addr, me, bind_addr, handler.clone(), job, fatal)?;
    let _ = handler.aborter.set(node.aborter());
    super::journal::attach(&handler.log, &node, job)?;
    let rank_of = node
        .membership
        .nodes
        .iter()
        .filter(|n| n.role == roles::WORKER && n.dc == dc)
        .map(|n| (n.id, n.rank as usize))
        .collect();
    // Under TSEngine the other local servers send partials and θ here.
    let ts_peers = |n: &geomx_net::coord::NodeInfo| {
        job.tsengine.is_some() && n.role == roles::LOCAL_SERVER && n.dc != dc
    };
    handler.admission.set_members(&node.membership.nodes, |n| {
        (n.role == roles::WORKER && n.dc == dc) || ts_peers(n)
    });
    if let Some(ts) = &handler.ts {
        let peers = node.membership.nodes.iter().filter(|n| ts_peers(n));
        ts.set_peers(peers.map(|n| (n.id, n.dc)).collect());
    }
    let early = handler.admission.open(|| {
        let _ = handler.rank_of.set(rank_of);
    });
    for (req, reply) in early {
        handler.on_request(req, reply);
    }

    // Connect to every global server.
    let mut clients = Vec::with_capacity(plan.num_global_servers());
    for s in 0..plan.num_global_servers() as u32 {
        let addr = node.addr_of(roles::GLOBAL_SERVER, plan.central_dc, s)?;
        let c = KvClient::connect(addr.as_str(), node.id(), node.net(job)?).map_err(|e| {
            RunError::Net(
                format!("dc {dc} connecting to global server {s} at {addr}"),
                e,
            )
        })?;
        clients.push(c);
    }
    if let Some(d) = job.inter.dgt() {
        // The global servers' DGT ports, then one link each (replies stay on TCP).
        let mut links = Vec::with_capacity(clients.len());
        for (s, c) in clients.iter().enumerate() {
            let port = c
                .pull(DGT_INFO_KEY, 0, 0, 0)
                .and_then(|p| p.wait(job.wait_limit()))
                .map_err(|e| {
                    RunError::Net(
                        format!("dc {dc} asking global server {s} for its dgt port"),
                        e,
                    )
                })?;
            let port = <[u8; 2]>::try_from(port.payload.as_slice())
                .map(u16::from_le_bytes)
                .map_err(|_| {
                    RunError::Protocol(format!(
                        "dc {dc}: bad dgt port answer from global server {s}"
                    ))
                })?;
            let addr = std::net::SocketAddr::new(c.peer_addr().ip(), port);
            let deadline = std::time::Instant::now() + job.registration_timeout;
            let link = super::dgt::connect(addr, node.id(), d, &node.net(job)?, deadline).map_err(
                |e| {
                    RunError::Protocol(format!(
                        "dc {dc}: dgt link to global server {s} at {addr}: {e}"
                    ))
                },
            )?;
            tracing::info!(%addr, block_bytes = link.block_bytes(), "dgt link up");
            links.push(link);
        }
        let _ = handler.dgt_links.set(links);
    }
    // A restarted local server (`lost_dc = "continue"`) joins the running job where the global
    // servers are; its workers count again as they rejoin.
    let incarnation = node.membership.incarnation;
    if incarnation > 0 {
        // The global servers name a global round (HFA: a period of k2 local averagings).
        let round = super::node::rejoin(&clients, job)?;
        (start, start_global) = (round * job.locals_per_global(), round);
        handler.restart_at(start);
        tracing::warn!(%dc, incarnation, round, "local server rejoined the job");
    }
    // θ_0 comes from the global servers; workers pulling earlier wait for it.
    let key_ranges: Vec<Vec<(usize, Range)>> = (0..n_keys)
        .map(|k| {
            plan.placement
                .key_ranges(k)
                .iter()
                .enumerate()
                .filter_map(|(i, r)| plan.placement.range_id(k, i).map(|id| (id, *r)))
                .collect()
        })
        .collect();
    let rejoin = job.global_servers_may_rejoin().then(|| {
        node.net(job).map(|net| {
            Rejoin::new(
                job,
                dc,
                node.coord.clone(),
                node.id(),
                net,
                handler.log.clone(),
            )
        })
    });
    // A fresh job's θ_0 is the model's seeded initialisation, as at the global servers: made
    // here, and checked against their digests.
    let seeded = if start_global == 0 {
        seeded_theta0(&clients, &key_ranges, job)
    } else {
        vec![None; n_keys]
    };
    let ts_global = clients.first().cloned();
    let upstream = Arc::new(Upstream::new(clients, job, dc, rejoin.transpose()?)?);
    // Otherwise (a resumed job starts from θ_r of its checkpoint round, HFA the milestone), and
    // for any key whose digest differed, θ comes from the global servers.
    let theta0 = seeded
        .into_iter()
        .enumerate()
        .map(|(k, theta)| match theta {
            Some(t) => Ok(t),
            None => pull_theta(&handler, &upstream, k, &key_ranges[k], start_global, job),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunError::Protocol(format!("dc {dc} pulling θ_{start_global}: {e}")))?;
    let mut milestones = Vec::with_capacity(n_keys);
    for (k, theta) in theta0.into_iter().enumerate() {
        // θ_0 travels exact (f32): replicas start identical.
        let bytes = super::msg::f32_bytes(&theta).into_owned();
        // Elastic HFA: a worker rejoining at the start holds θ as model and milestone.
        let state = (job.workers_may_rejoin() && job.hfa_periods().is_some())
            .then(|| rejoin_state(&theta, &theta));
        handler.publish(k, start, PayloadCodec::DenseF32, bytes, Vec::new(), state);
        // HFA: the milestone starts at the global θ_0.
        milestones.push(job.hfa_periods().map(|_| theta));
    }
    let mut senders = Vec::with_capacity(n_keys);
    let mut threads = Vec::with_capacity(n_keys);
    // Under TSEngine: the connections to the other local servers (WAN traffic too).
    let mut ts_links = Vec::new();
    if let (Some(_), Some(global)) = (&handler.ts, ts_global) {
        // TSEngine: each key's trees instead of its uplink.
        let mut peers = BTreeMap::new();
        for n in node.membership.nodes.iter().filter(|n| ts_peers(n)) {
            let addr = node.addr_of(roles::LOCAL_SERVER, n.dc, 0)?;
            let c = KvClient::connect(addr.as_str(), node.id(), node.net(job)?).map_err(|e| {
                RunError::Net(
                    format!(
                        "dc {dc} connecting to the local server of dc {} at {addr}",
                        n.dc
                    ),
                    e,
                )
            })?;
            ts_links.push(c.clone());
            peers.insert(n.dc, c);
        }
        for k in 0..n_keys {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            let up = ts::TsUplink::new(
                k,
                handler.clone(),
                global.clone(),
                peers.clone(),
                job.wait_limit(),
            )
            .map_err(RunError::Protocol)?;
            let t = std::thread::Builder::new()
                .name(format!("geomx-tsengine-{k}"))
                .spawn(move || up.run(rx))
                .map_err(|e| RunError::Io("starting a TSEngine thread".into(), e.to_string()))?;
            threads.push(t);
        }
    }
    let per_key = if handler.ts.is_some() {
        Vec::new()
    } else {
        key_ranges
            .iter()
            .cloned()
            .enumerate()
            .zip(milestones)
            .collect()
    };
    for ((k, ranges), milestone) in per_key {
        let (tx, rx) = crossbeam_channel::unbounded();
        senders.push(tx);
        let mut compressors = match job.inter.sparse() {
            Some(spec) if job.inter.is_sparse_key(plan.key_lens[k]) => ranges
                .iter()
                .map(|(id, r)| {
                    RangeCompressor::new(spec, job.inter.scaling(), job.seed, dc, *id, r.len)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RunError::Protocol(format!("dc {dc} key {k}: {e}")))?,
            _ => Vec::new(),
        };
        if let Some(res) = resumed.as_mut() {
            for (i, c) in compressors.iter_mut().enumerate() {
                res.compressor(&format!("comp.{k}.{i}"), c)?;
            }
        }
        let up = Uplink {
            handler: handler.clone(),
            key: k,
            up: upstream.clone(),
            ranges,
            job: job.clone(),
            compressors,
            milestone,
            tuner: (k == 0 && job.p3.as_ref().is_some_and(|p| p.credit_bytes.is_auto()))
                .then(CreditTuner::default),
        };
        let t = std::thread::Builder::new()
            .name(format!("geomx-uplink-{k}"))
            .spawn(move || up.run(rx))
            .map_err(|e| RunError::Io("starting an uplink thread".into(), e.to_string()))?;
        threads.push(t);
    }
    *lock(&handler.uplinks) = senders;
    if incarnation == 0 {
        node.barrier("all")?;
    }
    if job.local_rounds() > 0 && n_keys > 0 {
        // Bounded by the job: a lost peer aborts the job, which ends this process.
        let _ = done_rx.recv();
    }
    // The uplinks have answered their last round: close their queues and join them.
    lock(&handler.uplinks).clear();
    for t in threads {
        let _ = t.join();
    }
    // The global tier's final θ: its hash for the report; under MixedSync the workers adopt it.
    let last = match job.sync {
        SyncAlgorithm::Mixed => job.global_rounds() * plan.num_dcs() as u64,
        _ => job.global_rounds(),
    };
    let theta = final_theta(&handler, &upstream, &key_ranges, last, job)
        .map_err(|e| RunError::Protocol(format!("dc {dc} pulling the final θ: {e}")))?;
    if job.sync == SyncAlgorithm::Mixed {
        for (k, t) in theta.iter().enumerate() {
            let bytes = super::msg::f32_bytes(t).into_owned();
            handler.publish(
                k,
                job.rounds + 1,
                PayloadCodec::DenseF32,
                bytes,
                Vec::new(),
                None,
            );
        }
    }
    // Hashed per tensor, as the workers hash their replicas.
    let global_hash = crate::engine::params_hash(&job.keys.assemble(theta));
    // The last checkpoint is on disk, and the round log at the coordinator, before it hears
    // this server is done.
    if let Some((_, queue, _)) = &handler.ckpt {
        queue.wait()?;
    }
    handler.log.flush_journal(job.wait_limit());
    node.finish(job.wait_limit())?;
    let lan = server.stats();
    let mut wan: u64 = upstream.total_bytes();
    wan += ts_links
        .iter()
        .map(|c| super::total_bytes(c.stats()))
        .sum::<u64>();
    server.shutdown();
    let mut stats = RoleStats::new(&node.me, lan);
    if let Some(links) = handler.dgt_links.get() {
        let cs: Vec<_> = links.iter().map(DgtClient::stats).collect();
        wan += cs
            .iter()
            .map(|c| c.sent.bytes.iter().sum::<u64>())
            .sum::<u64>();
        let mut d = DgtRoleStats::from_clients(&cs);
        d.reliable_share = lock(&handler.dgt_up).as_ref().map(DgtUplink::share);
        tracing::info!(
            lost = d.lost_blocks,
            late = d.late_blocks,
            datagrams = d.datagrams,
            "dgt sender"
        );
        stats.dgt = Some(d);
    }
    stats.client_bytes = wan;
    stats.p3_credit = match handler.p3_credit.load(Ordering::Relaxed) {
        0 => upstream.path_credit().map(u64::from),
        c => Some(c),
    };
    stats.global_param_hash = Some(global_hash);
    if handler.ts.is_none() {
        let trained = job.rounds.saturating_sub(start * job.rounds_per_local());
        stats.split = handler.split.split(trained);
    }
    stats.codec_bytes = lock(&handler.codec_bytes).clone();
    stats.topk_fallbacks = handler.fallbacks.load(Ordering::Relaxed);
    stats.skipped_updates = handler.skipped.load(Ordering::Relaxed);
    stats.refused_requests = handler.admission.refused();
    stats.cast_overflows = handler.overflows.snapshot();
    stats.resumed_from_round = resumed.as_ref().map(|r| r.round());
    stats.incarnation = incarnation;
    (stats.member_events, stats.partial_rounds) = handler.log.snapshot();
    Ok(stats)
}
