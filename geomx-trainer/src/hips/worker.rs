//! The worker role: gradients of its data shard, pushed key by key as the backward pass produces
//! them; each push's reply carries what the global tier applied to that key (fused push-reply):
//! θ_{r+1}, an increment, or a sparse mean the worker's replica steps with
//! ([`crate::codec::down`]). Under HFA and ESync it pushes models and keeps the milestone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use geomx_net::sched::credit::CreditTuner;
use geomx_net::sched::priority::PrioritySender;
use geomx_net::{KvClient, NetError, PayloadCodec, Pending};
use serde::{Deserialize, Serialize};

use super::esync::{self, Answer, Reply};
use super::fsa_round::{fsa_round, FsaIo, Outstanding};
use super::node::{FatalHook, Identity, Node};
use super::plan::roles;
use super::throughput::{StepPart, StepSplit, ThroughputMeter};
use super::worker_tree::{PeerInbox, WorkerTree};
use super::{JobSpec, RoleStats, RunError};
use crate::clock::Mark;
use crate::codec::down::{decode_dense_segments, split_segments, ReplyMode};
use crate::codec::{
    count_nonfinite, decode_values, payload_nonfinite, poison_first, KeyCounts, Update,
    WorkerSparse,
};
use crate::config::{ConfigError, NonFinitePolicy, SyncAlgorithm};
use crate::data::{augment_for, batcher_for, Prefetcher};
use crate::engine::scaffold::ControlVariates;
use crate::engine::{params_hash, Optimizer};

/// Batches prepared ahead of the one computing.
const PREFETCH_DEPTH: usize = 2;

/// One progress line of worker (dc 0, rank 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Rounds completed.
    pub round: u64,
    /// Mean training loss of this worker's last batch.
    pub loss: f64,
    /// Mean loss on the test set.
    pub test_loss: f64,
    /// Accuracy on the test set.
    pub test_accuracy: f64,
    /// Wall seconds from the worker's start (right after the launcher spawned it) to this line,
    /// not counting the time the worker spent on its own test evaluations (a measurement, not
    /// training: time to accuracy must not depend on how often it is measured).
    #[serde(default)]
    pub elapsed_s: f64,
}

/// Receives progress lines.
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

pub(super) fn reply_of(
    key: usize,
    want_version: u64,
    resp: Result<geomx_net::Response, NetError>,
) -> Result<geomx_net::Response, RunError> {
    let resp =
        resp.map_err(|e| RunError::Net(format!("key {key} at version {want_version}"), e))?;
    if resp.version != want_version {
        return Err(RunError::Protocol(format!(
            "key {key}: got version {}, expected {want_version}",
            resp.version
        )));
    }
    Ok(resp)
}

/// Decodes dense values of a key and refuses non-finite ones (the servers check everything they
/// send, so a NaN here is a protocol error).
fn finite_values(key: usize, vals: Vec<f32>) -> Result<Vec<f32>, RunError> {
    match count_nonfinite(&vals) {
        0 => Ok(vals),
        n => Err(RunError::Protocol(format!(
            "key {key}: {n} non-finite values in a reply"
        ))),
    }
}

fn decode_key(
    key: usize,
    want_version: u64,
    len: usize,
    resp: Result<geomx_net::Response, NetError>,
) -> Result<Vec<f32>, RunError> {
    let resp = reply_of(key, want_version, resp)?;
    let vals = decode_values(resp.codec, &resp.payload, key, len).map_err(RunError::Protocol)?;
    finite_values(key, vals)
}

/// A key's increment from the segments of a reply (intra codec, one segment per range).
fn decode_increment(
    job: &JobSpec,
    key: usize,
    len: usize,
    payload: &[u8],
) -> Result<Vec<f32>, RunError> {
    let z = decode_dense_segments(payload, key, len, &job.plan.key_parts(key), |seg, id, n| {
        job.intra.decode_dense(seg, id, n)
    })
    .map_err(RunError::Protocol)?;
    finite_values(key, z)
}

/// The replica of a Bi-Sparse key: one optimizer per range, as the global servers keep, applied
/// to the mean gradient every range's update carries (not at all when the update is flagged
/// skipped).
pub(super) struct Replica {
    /// (range id, offset, length) of each range.
    parts: Vec<(usize, usize, usize)>,
    opts: Vec<Optimizer>,
    resyncs: u64,
    mismatches: u64,
}

impl Replica {
    fn new(job: &JobSpec, key: usize) -> Self {
        let parts = job.plan.key_parts(key);
        let opts = parts
            .iter()
            .map(|&(_, _, n)| Optimizer::new(&job.optimizer, n))
            .collect();
        Self {
            parts,
            opts,
            resyncs: 0,
            mismatches: 0,
        }
    }

    /// Saves the optimizer of every range under `replica.<key>.<range index>`.
    fn save(&self, key: usize, state: &mut crate::checkpoint::StateFile) {
        for (i, o) in self.opts.iter().enumerate() {
            super::ckpt::put_optim(state, &format!("replica.{key}.{i}"), &o.export_state());
        }
    }

    /// Restores what [`Replica::save`] saved.
    fn restore(&mut self, key: usize, res: &mut super::ckpt::Resumed) -> Result<(), RunError> {
        for (i, o) in self.opts.iter_mut().enumerate() {
            let saved = res.optim(&format!("replica.{key}.{i}"))?;
            o.import_state(saved).map_err(|e| res.misfit(e))?;
        }
        Ok(())
    }

    /// Applies a reply of per-range [`Update`] segments to `params`; dense θ (resynchronisation)
    /// replaces the range after the step. A resynchronisation counts once per key (a mismatch
    /// if any range differed).
    fn apply(&mut self, key: usize, params: &mut [f32], payload: &[u8]) -> Result<(), RunError> {
        let segs = split_segments(payload, self.parts.len(), key).map_err(RunError::Protocol)?;
        let (mut resynced, mut differed) = (false, false);
        for ((seg, &(id, offset, len)), opt) in
            segs.into_iter().zip(&self.parts).zip(&mut self.opts)
        {
            let up = Update::decode(seg, id, len).map_err(RunError::Protocol)?;
            let range = params
                .get_mut(offset..offset + len)
                .ok_or_else(|| RunError::Protocol(format!("key {key}: range {id} outside")))?;
            if !up.skipped {
                let mut grad = vec![0.0f32; len];
                up.grad
                    .scatter_add_into(&mut grad)
                    .map_err(|e| RunError::Protocol(format!("key {key}: {e}")))?;
                finite_values(key, grad.clone())?;
                opt.step(range, &grad).map_err(RunError::Engine)?;
            }
            if let Some(theta) = up.theta {
                let same = range
                    .iter()
                    .zip(&theta)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                tracing::debug!(key, range = id, same, "dense resynchronisation");
                resynced = true;
                differed |= !same;
                range.copy_from_slice(&finite_values(key, theta)?);
            }
        }
        self.resyncs += u64::from(resynced);
        self.mismatches += u64::from(differed);
        Ok(())
    }
}

/// How a worker applies its local server's answer for one key (see [`ReplyMode`]).
pub(super) enum KeyApply {
    /// Replace the key with θ.
    Theta,
    /// Add the increment.
    Delta,
    /// Step the replica.
    Sparse(Replica),
}

impl KeyApply {
    pub(super) fn apply(
        &mut self,
        job: &JobSpec,
        key: usize,
        params: &mut [f32],
        resp: &geomx_net::Response,
    ) -> Result<(), RunError> {
        match self {
            KeyApply::Theta => {
                let theta = decode_values(resp.codec, &resp.payload, key, params.len())
                    .map_err(RunError::Protocol)?;
                params.copy_from_slice(&finite_values(key, theta)?);
            }
            KeyApply::Delta => {
                let z = decode_increment(job, key, params.len(), &resp.payload)?;
                for (p, d) in params.iter_mut().zip(z) {
                    *p += d;
                }
            }
            KeyApply::Sparse(r) => r.apply(key, params, &resp.payload)?,
        }
        Ok(())
    }
}

/// Checks a payload this worker is about to push (`what`: gradient or model) for non-finite
/// values; under `abort` the job ends naming this worker, the key and the round. Returns whether
/// it was non-finite.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_push(
    job: &JobSpec,
    node: &Node,
    what: &str,
    key: usize,
    round: u64,
    codec: PayloadCodec,
    bytes: &[u8],
    n: usize,
) -> Result<bool, RunError> {
    let bad = payload_nonfinite(codec, bytes, n);
    if bad == 0 {
        return Ok(false);
    }
    let msg = format!("non-finite {what}: key {key}, round {round}: {bad} of {n} values");
    if job.nonfinite.policy == NonFinitePolicy::Abort {
        node.abort(&msg);
        return Err(RunError::Aborted(format!("{}: {msg}", node.me)));
    }
    tracing::warn!(%msg, "pushing it: the round is dropped for this key");
    Ok(true)
}

/// The heterogeneity knob (sync.md): after a step of measured duration `step`, sleeps
/// `(factor − 1)·step`.
pub(super) fn slow_down(factor: f64, step: Duration) {
    if factor > 1.0 {
        std::thread::sleep(step.mul_f64(factor - 1.0));
    }
}

/// A worker's side of HFA's model averaging (also ESync's): its copy of the milestone, and its
/// own optimizers (state kept across averagings).
struct Averaging<'a> {
    client: &'a KvClient,
    node: &'a Node,
    job: &'a JobSpec,
    overflows: &'a KeyCounts,
    /// The last globally agreed model, exactly as the global servers hold it.
    milestone: Vec<Vec<f32>>,
    /// The worker's optimizer per key (HFA's local steps; ESync's too).
    opts: Vec<Optimizer>,
    /// HFA with `correction = "scaffold"`: this worker's control variates.
    variates: Option<ControlVariates>,
    /// Key averagings this worker dropped (a non-finite model under `skip`).
    skipped: u64,
    /// The fault this worker injects into itself (`geomx launch --chaos`), if any.
    chaos: Option<&'a super::chaos::SelfFault>,
}

impl<'a> Averaging<'a> {
    fn new(
        client: &'a KvClient,
        node: &'a Node,
        job: &'a JobSpec,
        overflows: &'a KeyCounts,
        theta0: &[Vec<f32>],
        chaos: Option<&'a super::chaos::SelfFault>,
    ) -> Self {
        Self {
            client,
            node,
            job,
            overflows,
            chaos,
            milestone: theta0.to_vec(),
            opts: theta0
                .iter()
                .map(|t| Optimizer::new(&job.optimizer, t.len()))
                .collect(),
            variates: ControlVariates::of(
                &job.hfa,
                &job.optimizer,
                &theta0.iter().map(Vec::len).collect::<Vec<_>>(),
            ),
            skipped: 0,
        }
    }

    /// Sends this worker's model for local averaging number `local` (1-based) and replaces it
    /// with the answer: the DC's average, or on global averagings (every `k2`-th) the milestone
    /// moved by the increment every copy adds. A dropped local averaging (an empty reply) sends
    /// the key back to the milestone. A key whose model was not finite also restarts its
    /// optimizer state.
    fn average(&mut self, params: &mut [Vec<f32>], local: u64, k2: u64) -> Result<(), RunError> {
        let (job, me) = (self.job, &self.node.me);
        // Chaos points name the training round whose end this averaging follows.
        let round = local * job.hfa_periods().map_or(1, |(k1, _)| k1) - 1;
        let mut pending = Vec::with_capacity(params.len());
        let mut poisoned = vec![false; params.len()];
        for (k, p) in params.iter().enumerate() {
            let mut e = job.intra.encode_dense(p);
            self.overflows.add(k, e.overflow);
            if job.nonfinite.injects(me.dc, me.rank, local - 1, k) {
                poison_first(e.codec, &mut e.bytes);
            }
            poisoned[k] = check_push(
                job,
                self.node,
                "model",
                k,
                local - 1,
                e.codec,
                &e.bytes,
                p.len(),
            )?;
            let req = self
                .client
                .push(k as u64, local - 1, e.codec, 0, p.len() as u64, &e.bytes)
                .map_err(|e| {
                    RunError::Net(format!("pushing model key {k} averaging {local}"), e)
                })?;
            pending.push(req);
            if let Some(c) = self.chaos {
                c.at(round, super::chaos::Point::MidPush);
            }
        }
        if let Some(c) = self.chaos {
            c.at(round, super::chaos::Point::ReplyWait);
        }
        let global = local % k2 == 0;
        for (k, p) in pending.into_iter().enumerate() {
            let n = params[k].len();
            let resp = reply_of(k, local, p.wait(job.wait_limit()))?;
            if global {
                let z = decode_increment(job, k, n, &resp.payload)?;
                let before = self.variates.as_ref().map(|_| self.milestone[k].clone());
                for (m, d) in self.milestone[k].iter_mut().zip(z) {
                    *m += d;
                }
                if let (Some(cv), Some(x)) = (self.variates.as_mut(), before) {
                    cv.update(k, &x, &params[k], &self.milestone[k]);
                }
                params[k].clone_from(&self.milestone[k]);
            } else if resp.payload.is_empty() {
                tracing::warn!(key = k, local, "averaging dropped: back to the milestone");
                self.skipped += 1;
                params[k].clone_from(&self.milestone[k]);
            } else {
                let v =
                    decode_values(resp.codec, &resp.payload, k, n).map_err(RunError::Protocol)?;
                params[k] = finite_values(k, v)?;
            }
            if poisoned[k] {
                self.opts[k] = Optimizer::new(&job.optimizer, n);
                if let Some(cv) = self.variates.as_mut() {
                    cv.reset(k);
                }
            }
        }
        Ok(())
    }
}

/// One local step (HFA, ESync): gradients of `batch` at `params`, corrected by `variates` (HFA's
/// SCAFFOLD) and applied by the worker's own optimizers (`None`: a warm-up step, gradients
/// discarded), then the slow-down. Returns the batch loss and the step's duration including the
/// slow-down.
fn local_step(
    job: &JobSpec,
    params: &mut [Vec<f32>],
    batch: &crate::data::Dataset,
    opts: Option<(&mut [Optimizer], Option<&ControlVariates>)>,
    slowdown: f64,
) -> Result<(f64, Duration), RunError> {
    let started = Instant::now();
    let mut grads: Vec<Option<Vec<f32>>> = (0..params.len()).map(|_| None).collect();
    let l = job
        .model
        .backward_layerwise(params, batch.view(), &mut |key, grad| {
            if let Some(g) = grads.get_mut(key) {
                *g = Some(grad)
            }
        })
        .map_err(RunError::Engine)?;
    if let Some((opts, variates)) = opts {
        for (k, (g, opt)) in grads.iter_mut().zip(opts.iter_mut()).enumerate() {
            let g = g.as_mut().ok_or_else(|| {
                RunError::Protocol(format!("the model produced no gradient for key {k}"))
            })?;
            if let Some(cv) = variates {
                cv.correct(k, g);
            }
            opt.step(&mut params[k], g).map_err(RunError::Engine)?;
        }
    }
    slow_down(slowdown, started.elapsed());
    Ok((f64::from(l), started.elapsed()))
}

/// A worker's side of ESync: its connection to the coordinator's ESync endpoint, the duration of
/// its last step and the Reset still in flight (see [`super::esync`]).
struct EsyncWorker {
    endpoint: KvClient,
    index: u32,
    workers: usize,
    c: f64,
    steps: u64,
    slowdown: f64,
    /// A Reset sent but not yet answered (settled before the next request, which the endpoint
    /// answers after it anyway).
    pending: Option<Pending>,
}

impl EsyncWorker {
    /// Connects worker `index` (global index) to the endpoint; `c` is the warm-up step's
    /// duration, `slowdown` its DC's compute slow-down.
    fn connect(
        node: &Node,
        job: &JobSpec,
        index: u32,
        c: Duration,
        slowdown: f64,
    ) -> Result<Self, RunError> {
        let addr = node.addr_of(esync::ROLE, job.plan.central_dc, 0)?;
        let endpoint = KvClient::connect(addr.as_str(), node.id(), node.net(job)?)
            .map_err(|e| RunError::Net(format!("connecting to the ESync endpoint at {addr}"), e))?;
        Ok(Self {
            endpoint,
            index,
            workers: job.plan.total_workers(),
            c: c.as_secs_f64(),
            steps: 0,
            slowdown,
            pending: None,
        })
    }

    fn send(&self, req: esync::Request) -> Result<Pending, RunError> {
        let (key, version, payload) = req.to_frame();
        self.endpoint
            .push(key, version, PayloadCodec::Raw, 0, 0, &payload)
            .map_err(|e| RunError::Net(format!("ESync {req:?}"), e))
    }

    fn wait(p: Pending, limit: Duration, what: &str) -> Result<Vec<u8>, RunError> {
        p.wait(limit)
            .map(|r| r.payload)
            .map_err(|e| RunError::Net(format!("ESync {what}"), e))
    }

    /// `Ask{r, k, c}`.
    fn ask(&self, k: u64, limit: Duration) -> Result<Answer, RunError> {
        let req = esync::Request::Ask {
            worker: self.index,
            k,
            c: self.c,
        };
        let p = Self::wait(self.send(req)?, limit, "ask")?;
        Reply::decode_answer(&p).map_err(|e| RunError::Protocol(e.to_string()))
    }

    /// `Steps{r, round}`: every worker's step count in `round` (FedNova's τ_eff), once all were
    /// told to push.
    fn round_steps(&self, round: u64, limit: Duration) -> Result<Vec<u64>, RunError> {
        let req = esync::Request::Steps {
            worker: self.index,
            round,
            c: self.c,
        };
        let p = Self::wait(self.send(req)?, limit, "steps")?;
        Reply::decode_steps(&p, self.workers).map_err(|e| RunError::Protocol(e.to_string()))
    }

    /// Waits for the Reset in flight, if any.
    fn settle(&mut self, limit: Duration) -> Result<(), RunError> {
        if let Some(p) = self.pending.take() {
            let payload = Self::wait(p, limit, "reset")?;
            Reply::decode_steps(&payload, self.workers)
                .map_err(|e| RunError::Protocol(e.to_string()))?;
        }
        Ok(())
    }

    /// One ESync round (`round` 0-based): local steps from the milestone until the coordinator
    /// says push, then u = m + s·a·(w − m) through the averaging path; the new milestone is the
    /// round's model. Returns the last step's loss.
    fn round(
        &mut self,
        job: &JobSpec,
        avg: &mut Averaging<'_>,
        params: &mut [Vec<f32>],
        round: u64,
        next_batch: &mut dyn FnMut() -> Result<crate::data::Dataset, RunError>,
        split: &mut StepSplit,
    ) -> Result<f64, RunError> {
        let limit = job.wait_limit();
        let mut k = 0;
        let mut loss = f64::NAN;
        // After a reset, the Ask{k = 0} travelled with it (always answered step); the first round
        // asks with the warm-up duration.
        let t = Mark::now();
        let mut answer = if round == 0 {
            self.ask(0, limit)?
        } else {
            Answer::Step
        };
        split.charge(StepPart::Wait, t);
        while answer == Answer::Step {
            let batch = next_batch()?;
            let t = Mark::now();
            let (l, d) = local_step(
                job,
                params,
                &batch,
                Some((&mut avg.opts, None)),
                self.slowdown,
            )?;
            split.charge(StepPart::Compute, t);
            loss = l;
            self.c = d.as_secs_f64();
            k += 1;
            let t = Mark::now();
            self.settle(limit)?;
            answer = self.ask(k, limit)?;
            split.charge(StepPart::Wait, t);
        }
        // From here on the round waits for the other workers: the step counts, the averaging.
        let waiting = Mark::now();
        if k == 0 {
            return Err(RunError::Protocol(
                "the ESync endpoint answered push before any local step".into(),
            ));
        }
        self.steps += k;
        let norm = job.esync.normalisation;
        let s = match norm {
            // FedNova's τ_eff needs every worker's step count before the push.
            esync::Normalisation::Fednova => {
                let steps = self.round_steps(round + 1, limit)?;
                esync::round_scale(norm, job.esync.gamma, &steps)
            }
            esync::Normalisation::None => esync::round_scale(norm, job.esync.gamma, &[]),
        };
        let a = s * esync::push_factor(norm, k);
        for (p, m) in params.iter_mut().zip(&avg.milestone) {
            // Every worker started the round at the milestone: w_prev = m.
            *p = esync::push_model(m, p, m, a);
        }
        // Every averaging is global (k1 = k2 = 1): the reply moves the milestone, which every
        // worker and the global servers then hold.
        avg.average(params, round + 1, 1)?;
        split.charge(StepPart::Wait, waiting);
        self.pending = Some(self.send(esync::Request::Reset {
            worker: self.index,
            round: round + 2,
            c: self.c,
        })?);
        Ok(loss)
    }
}

/// Runs worker `rank` of DC `dc` for the job's rounds; returns its traffic, final parameter hash
/// and (for dc 0 rank 0) final test accuracy. Under TSEngine on the intra tier the worker serves
/// its DC's other workers at `host` (port chosen by the system); otherwise it serves nothing.
pub fn run(
    job: &JobSpec,
    dc: u32,
    rank: u32,
    coord_addr: &str,
    host: &str,
    fatal: FatalHook,
    progress: ProgressSink,
) -> Result<RoleStats, RunError> {
    let launched = Instant::now();
    let plan = &job.plan;
    let me = Identity {
        role: roles::WORKER,
        dc,
        rank,
    };
    let n_d = plan.workers_per_dc.get(dc as usize).copied().unwrap_or(0);
    if rank as usize >= n_d {
        return Err(RunError::Membership(format!("no {me} in the topology")));
    }
    let w = job.worker_index(dc as usize, rank as usize);
    let train = &job.data.train;
    let mut batcher =
        batcher_for(&job.data_config, train, plan.total_workers(), w).map_err(RunError::Data)?;
    let reporter = dc == 0 && rank == 0;
    let slowdown = job.slowdown.get(dc as usize).copied().unwrap_or(1.0);
    // A resumed worker continues its batch sequence where its checkpoint left it.
    let mut resumed = super::ckpt::resume(job, &me)?;
    let mut start = resumed.as_ref().map_or(0, |r| r.round());
    if let Some(res) = resumed.as_mut() {
        let c = res.u64("batcher", 2)?;
        let pos = usize::try_from(c[1]).unwrap_or(usize::MAX);
        batcher.seek(c[0], pos).map_err(|e| res.misfit(e))?;
    }
    let chaos = super::chaos::SelfFault::from_env().map_err(RunError::Membership)?;
    // Checkpoints are written beside the rounds; at most one waits for the disk at a time.
    let saver = super::ckpt::save_queue(job, &me)?;

    // TSEngine on the intra tier: the other workers of the DC send partials and θ here.
    let (node, peer_inbox) = match job.ts_intra {
        Some(_) => {
            let inbox = Arc::new(PeerInbox::new(job, dc, rank));
            let bind = format!("{host}:0");
            let (server, node) =
                Node::serve_and_join(coord_addr, me, &bind, inbox.clone(), job, fatal)?;
            (node, Some((inbox, server)))
        }
        None => (Node::join(coord_addr, me, String::new(), job, fatal)?, None),
    };
    let client = node.connect_server(roles::LOCAL_SERVER, dc, 0, job)?;
    let tree = peer_inbox
        .map(|(inbox, server)| WorkerTree::start(&node, job, inbox, server, &client))
        .transpose()?;
    // A restarted worker (incarnation > 0) joins the running job where its local server is,
    // with that round's batch and θ, instead of where it was lost or last saved.
    let incarnation = node.membership.incarnation;
    if incarnation > 0 {
        // The local server counts averagings under HFA: a training round is k1 of them.
        start = super::node::rejoin(std::slice::from_ref(&client), job)? * job.rounds_per_local();
        resumed = None;
        batcher.skip_to(start);
        tracing::warn!(%dc, %rank, incarnation, round = start, "worker rejoined the job");
    }
    // The next batches are prepared on a thread while this one computes, and staged there for
    // the model's device (page-locked copies on CUDA).
    let augment = augment_for(&job.data_config, w).map_err(RunError::Data)?;
    let mut batcher = Prefetcher::new(
        batcher,
        train,
        PREFETCH_DEPTH,
        augment,
        job.model.batch_stager(),
    )
    .map_err(RunError::Data)?;
    // θ_0 from the local server (which has it from the global servers); θ_r when resuming,
    // which must be what this worker saved.
    // A worker rejoining HFA takes the model its DC's workers hold and their milestone.
    let (mut params, rejoin_milestone) = if incarnation > 0 && job.hfa_periods().is_some() {
        let (p, m) = pull_hfa_state(&client, start / job.rounds_per_local(), job)?;
        (p, Some(m))
    } else {
        (
            pull_all(&client, start / job.rounds_per_local(), job)?,
            None,
        )
    };
    if let Some(res) = resumed.as_mut() {
        for (k, p) in params.iter().enumerate() {
            let saved = res.f32(&format!("params.{k}"), p.len())?;
            if !saved
                .iter()
                .map(|v| v.to_bits())
                .eq(p.iter().map(|v| v.to_bits()))
            {
                return Err(res.misfit(format!(
                    "key {k} differs from the global servers' θ of round {start}"
                )));
            }
        }
    }
    if incarnation == 0 {
        node.barrier("all")?;
    }
    let mut apply: Vec<KeyApply> = (0..plan.key_lens.len())
        .map(|k| match job.reply_mode(k) {
            ReplyMode::Theta => KeyApply::Theta,
            ReplyMode::Delta => KeyApply::Delta,
            ReplyMode::Sparse => KeyApply::Sparse(Replica::new(job, k)),
        })
        .collect();
    if let Some(res) = resumed.as_mut() {
        for (k, a) in apply.iter_mut().enumerate() {
            if let KeyApply::Sparse(r) = a {
                r.restore(k, res)?;
            }
        }
    }
    // Worker-side Bi-Sparse: this worker's error feedback, continued from its checkpoint.
    let mut sparse = job
        .worker_sparse
        .as_ref()
        .map(|spec| {
            WorkerSparse::new(
                spec,
                job.intra.scaling(),
                job.seed,
                (dc, rank),
                &plan.key_lens,
            )
            .map_err(|e| RunError::Config(ConfigError::invalid("compression.intra", e)))
        })
        .transpose()?;
    if let (Some(sp), Some(res)) = (sparse.as_mut(), resumed.as_mut()) {
        for (k, c) in sp.compressors_mut() {
            res.compressor(&format!("push.{k}"), c)?;
        }
    }

    let mut loss = f64::NAN;
    let mut last_eval = None;
    // Time spent on test evaluations (left out of the progress lines' clock).
    let mut evaluating = Duration::ZERO;
    // HFA and ESync: the worker's milestone and its own optimizers.
    let overflows = KeyCounts::default();
    let mut avg = job
        .hfa_periods()
        .map(|_| Averaging::new(&client, &node, job, &overflows, &params, chaos.as_ref()));
    if let (Some(avg), Some(m)) = (avg.as_mut(), rejoin_milestone) {
        avg.milestone = m;
    }
    // HFA: the worker's own optimizers continue with their saved state (the milestone is the
    // θ just pulled: checkpoints are taken at global averagings).
    if let (Some(avg), Some(res)) = (avg.as_mut(), resumed.as_mut()) {
        for (k, opt) in avg.opts.iter_mut().enumerate() {
            let saved = res.optim(&format!("opt.{k}"))?;
            opt.import_state(saved).map_err(|e| res.misfit(e))?;
        }
        if let Some(cv) = avg.variates.as_mut() {
            for (k, &n) in plan.key_lens.iter().enumerate() {
                let own = res.f32(&format!("scaffold.own.{k}"), n)?;
                let global = res.f32(&format!("scaffold.global.{k}"), n)?;
                if !cv.restore(k, own, global) {
                    return Err(res.misfit(format!("scaffold variates of key {k}")));
                }
            }
        }
    }
    let mut esync = match job.sync {
        SyncAlgorithm::Esync => {
            // c before the first step: a warm-up step's duration (gradients discarded).
            let warmup = batcher.next_batch().map_err(RunError::Data)?;
            let c = local_step(job, &mut params, &warmup, None, slowdown)?.1;
            Some(EsyncWorker::connect(&node, job, w as u32, c, slowdown)?)
        }
        _ => None,
    };
    let mut meter = ThroughputMeter::default();
    // P3: pushes go through a priority sender; replies are applied by the next forward pass.
    let prio = job.p3_sender(&client, &format!("geomx-p3-w{dc}.{rank}"))?;
    let mut outstanding = Outstanding::default();
    // P3 with `credit_bytes = "auto"`: the push connection's credit from measured round times.
    let mut tuner = job
        .p3
        .as_ref()
        .filter(|p| p.credit_bytes.is_auto())
        .map(|_| CreditTuner::default());
    for round in start..job.rounds {
        if let Some(c) = chaos.as_ref() {
            c.at(round, super::chaos::Point::Start);
        }
        let round_started = Instant::now();
        let mut split = StepSplit::default();
        if let (Some(es), Some(avg)) = (esync.as_mut(), avg.as_mut()) {
            // The batch closure keeps its own tally: `split` is lent to the round.
            let (mut data_s, mut samples) = (0.0, 0u64);
            let mut next = || {
                let t = Instant::now();
                let b = batcher.next_batch().map_err(RunError::Data)?;
                data_s += t.elapsed().as_secs_f64();
                samples += b.len() as u64;
                Ok(b)
            };
            loss = es.round(job, avg, &mut params, round, &mut next, &mut split)?;
            (split.data_s, split.samples) = (data_s, samples);
        } else if let (Some((k1, k2)), Some(avg)) = (job.hfa_periods(), avg.as_mut()) {
            let batch = batcher.next_batch().map_err(RunError::Data)?;
            split.data_s = round_started.elapsed().as_secs_f64();
            split.samples = batch.len() as u64;
            let t = Mark::now();
            let step = Some((&mut avg.opts[..], avg.variates.as_ref()));
            loss = local_step(job, &mut params, &batch, step, slowdown)?.0;
            split.charge(StepPart::Compute, t);
            if (round + 1) % k1 == 0 {
                let t = Mark::now();
                avg.average(&mut params, (round + 1) / k1, k2)?;
                split.charge(StepPart::Wait, t);
            }
        } else {
            let io = FsaIo {
                node: &node,
                client: &client,
                prio: prio.as_ref(),
                tree: tree.as_ref(),
                overflows: &overflows,
                slowdown,
                chaos: chaos.as_ref(),
            };
            loss = fsa_round(
                job,
                &io,
                sparse.as_mut(),
                &mut params,
                &mut apply,
                &mut outstanding,
                &mut batcher,
                round,
                &mut split,
            )?;
            if job.inter.dgt().is_some_and(|d| d.adaptive_k) && loss.is_finite() {
                // The DC's loss steers its DGT uplink's reliable share; the empty reply is not
                // awaited (this connection's next push fails if it broke).
                client
                    .push(
                        super::msg::LOSS_KEY,
                        round,
                        PayloadCodec::Raw,
                        0,
                        0,
                        &loss.to_le_bytes(),
                    )
                    .map_err(|e| {
                        RunError::Net(format!("reporting the loss of round {round}"), e)
                    })?;
            }
        }
        let done = round + 1;
        let saving = saver.as_ref().is_some_and(|(s, _)| s.due(done));
        let due = job.eval_every > 0 && done % job.eval_every == 0;
        if done == job.rounds || saving || (reporter && due) {
            // P3 leaves the replies to the next forward pass; whoever reads θ now needs them.
            outstanding.settle_all(job, &mut params, &mut apply, &mut split)?;
        }
        meter.record(round_started.elapsed(), split);
        if let Some(c) = tuner
            .as_mut()
            .and_then(|t| t.record(round_started.elapsed().as_secs_f64()))
        {
            client
                .set_send_buffer(c as usize)
                .map_err(|e| RunError::Net("setting the P3 credit".into(), e))?;
        }
        if let Some((saver, queue)) = saver.as_ref().filter(|_| saving) {
            if let Some(sp) = sparse.as_mut() {
                // Error feedback a GPU model keeps on its device comes back for the file.
                job.model.sparse_to_host(sp).map_err(RunError::Engine)?;
            }
            let opts = avg.as_ref().map_or(&[][..], |a| &a.opts[..]);
            let variates = avg.as_ref().and_then(|a| a.variates.as_ref());
            // The previous checkpoint has had `every_rounds` rounds to reach the disk.
            queue.save(checkpoint_state(
                saver,
                done,
                &params,
                &batcher,
                (opts, variates),
                (&apply, sparse.as_ref()),
            ))?;
        }
        if done == job.rounds && job.sync == SyncAlgorithm::Mixed {
            // The final pull: every replica adopts the global servers' final θ.
            params = pull_all(&client, job.rounds + 1, job)?;
        }
        if reporter && (due || done == job.rounds) {
            let t = Instant::now();
            let ev = job
                .model
                .evaluate(&params, job.data.test.view())
                .map_err(RunError::Engine)?;
            let trained = t.duration_since(launched).saturating_sub(evaluating);
            evaluating += t.elapsed();
            let p = Progress {
                round: done,
                loss,
                test_loss: ev.loss,
                test_accuracy: ev.accuracy,
                elapsed_s: trained.as_secs_f64(),
            };
            progress(&p);
            last_eval = Some(p);
        }
    }
    // The last checkpoint is on disk before this worker reports done.
    if let Some((_, queue)) = saver {
        queue.finish()?;
    }
    let hash = params_hash(&params);
    if let Some(path) = job.export.as_ref().filter(|_| reporter) {
        crate::engine::export::write(path, job.model.as_ref(), &params).map_err(|e| {
            RunError::Io(
                format!("exporting the model to {}", path.display()),
                e.to_string(),
            )
        })?;
        tracing::info!(path = %path.display(), "final model written (safetensors)");
    }
    if let Some(es) = esync.as_mut() {
        es.settle(job.wait_limit())?;
        tracing::info!(%dc, %rank, local_steps = es.steps, "ESync local steps");
    }
    let skipped = avg.as_ref().map_or(0, |a| a.skipped);
    drop(avg);
    tracing::info!(
        %dc,
        %rank,
        hash = format!("{hash:016x}"),
        evaluating_s = evaluating.as_secs_f64(),
        "worker finished"
    );
    // The trees forward θ to the other workers until the last round's is everywhere.
    let (served, refused) = tree
        .map(WorkerTree::finish)
        .transpose()?
        .unwrap_or_default();
    node.finish(job.wait_limit())?;
    let mut stats = RoleStats::new(&node.me, served);
    stats.refused_requests = refused;
    stats.client_bytes = super::total_bytes(client.stats());
    stats.param_hash = Some(hash);
    stats.final_loss = Some(loss);
    stats.final_test_accuracy = last_eval.map(|p| p.test_accuracy);
    stats.skipped_updates = skipped;
    stats.resumed_from_round = resumed.as_ref().map(|r| r.round());
    stats.incarnation = incarnation;
    stats.throughput = meter.summary(dc, rank);
    stats.split = stats
        .throughput
        .as_ref()
        .map(super::time_split::RoleSplit::of_worker);
    stats.p3_credit = tuner
        .and_then(|t| t.settled())
        .or_else(|| prio.as_ref().and_then(PrioritySender::path_credit))
        .map(u64::from);
    stats.cast_overflows = overflows.snapshot();
    stats.topk_fallbacks = sparse.as_ref().map_or(0, WorkerSparse::fallbacks);
    for a in &apply {
        if let KeyApply::Sparse(r) = a {
            stats.resyncs += r.resyncs;
            stats.resync_mismatches += r.mismatches;
        }
    }
    Ok(stats)
}

/// A worker's state after `done` rounds: its replica (`params.<k>`), its batch cursor
/// (`batcher`), under HFA its own optimizers (`opt.<k>`), its Bi-Sparse replicas' optimizers,
/// and its own pushes' error feedback (`push.<k>.<j>`, worker-side Bi-Sparse).
fn checkpoint_state(
    saver: &crate::checkpoint::Saver,
    done: u64,
    params: &[Vec<f32>],
    batcher: &Prefetcher,
    (opts, variates): (&[Optimizer], Option<&ControlVariates>),
    (apply, sparse): (&[KeyApply], Option<&WorkerSparse>),
) -> crate::checkpoint::StateFile {
    let mut state = saver.state(done);
    for (k, p) in params.iter().enumerate() {
        state.put_f32(format!("params.{k}"), p.clone());
    }
    let (epoch, pos) = batcher.cursor();
    state.put_u64("batcher", vec![epoch, pos as u64]);
    for (k, opt) in opts.iter().enumerate() {
        super::ckpt::put_optim(&mut state, &format!("opt.{k}"), &opt.export_state());
    }
    if let Some(cv) = variates {
        for k in 0..params.len() {
            let (own, global) = cv.tensor(k);
            state.put_f32(format!("scaffold.own.{k}"), own.to_vec());
            state.put_f32(format!("scaffold.global.{k}"), global.to_vec());
        }
    }
    for (k, a) in apply.iter().enumerate() {
        if let KeyApply::Sparse(r) = a {
            r.save(k, &mut state);
        }
    }
    for (k, c) in sparse.into_iter().flat_map(WorkerSparse::compressors) {
        super::ckpt::put_compressor(&mut state, &format!("push.{k}"), c);
    }
    state
}

/// One vector per tensor.
type Tensors = Vec<Vec<f32>>;

/// A rejoining HFA worker's start: every key's model and milestone after local averaging
/// `version` ([`super::local_server::HFA_STATE_FLAG`]), one vector per tensor each.
fn pull_hfa_state(
    client: &KvClient,
    version: u64,
    job: &JobSpec,
) -> Result<(Tensors, Tensors), RunError> {
    let lens = &job.plan.key_lens;
    let flag = super::local_server::HFA_STATE_FLAG;
    let pulls: Vec<Pending> = (0..lens.len())
        .map(|k| client.pull(k as u64 | flag, version, 0, 2 * lens[k] as u64))
        .collect::<Result<_, _>>()
        .map_err(|e| RunError::Net(format!("pulling the HFA state of averaging {version}"), e))?;
    let (mut models, mut milestones) = (Vec::new(), Vec::new());
    for (k, p) in pulls.into_iter().enumerate() {
        let resp = reply_of(k, version, p.wait(job.wait_limit()))?;
        let both = crate::codec::f32_from_bytes(&resp.payload)
            .filter(|v| v.len() == 2 * lens[k])
            .ok_or_else(|| {
                RunError::Protocol(format!(
                    "key {k}: an HFA state of {} bytes, expected {}",
                    resp.payload.len(),
                    8 * lens[k]
                ))
            })?;
        let both = finite_values(k, both)?;
        let (model, milestone) = both.split_at(lens[k]);
        models.push(model.to_vec());
        milestones.push(milestone.to_vec());
    }
    Ok((job.keys.assemble(models), job.keys.assemble(milestones)))
}

/// Pulls every key at `version` from the local server (exact f32 θ), one vector per tensor.
fn pull_all(client: &KvClient, version: u64, job: &JobSpec) -> Result<Vec<Vec<f32>>, RunError> {
    let lens = &job.plan.key_lens;
    let pulls: Vec<Pending> = (0..lens.len())
        .map(|k| client.pull(k as u64, version, 0, lens[k] as u64))
        .collect::<Result<_, _>>()
        .map_err(|e| RunError::Net(format!("pulling θ at version {version}"), e))?;
    let keys = pulls
        .into_iter()
        .enumerate()
        .map(|(k, p)| decode_key(k, version, lens[k], p.wait(job.wait_limit())))
        .collect::<Result<_, _>>()?;
    Ok(job.keys.assemble(keys))
}
