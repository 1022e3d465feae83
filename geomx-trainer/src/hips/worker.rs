//! The worker role: gradients of its data shard, pushed key by key as the backward pass produces
//! them; each push's reply carries θ_{r+1} of that key (fused push-reply).

use std::sync::Arc;
use std::time::{Duration, Instant};

use geomx_net::{KvClient, NetError, PayloadCodec, Pending};
use serde::{Deserialize, Serialize};

use super::codec::{decode_values, Update};
use super::esync::{self, Answer, Reply};
use super::node::{FatalHook, Identity, Node};
use super::plan::roles;
use super::{JobSpec, RoleStats, RunError};
use crate::config::SyncAlgorithm;
use crate::data::batcher_for;
use crate::engine::{params_hash, Optimizer};

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
    /// Wall seconds from the worker's start (right after the launcher spawned it) to this line.
    #[serde(default)]
    pub elapsed_s: f64,
}

/// Receives progress lines.
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

fn reply_of(
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

fn decode_key(
    key: usize,
    want_version: u64,
    len: usize,
    resp: Result<geomx_net::Response, NetError>,
) -> Result<Vec<f32>, RunError> {
    let resp = reply_of(key, want_version, resp)?;
    decode_values(resp.codec, &resp.payload, key, len).map_err(RunError::Protocol)
}

/// The replica of a Bi-Sparse key: the worker applies the optimizer to the mean gradient it
/// receives, as the global server does to the authoritative θ.
struct Replica {
    opt: Optimizer,
    grad: Vec<f32>,
    resyncs: u64,
    mismatches: u64,
}

impl Replica {
    /// Applies an [`Update`] reply to `params`; dense θ (resynchronisation) replaces the replica.
    fn apply(
        &mut self,
        key: usize,
        params: &mut [f32],
        resp: &geomx_net::Response,
    ) -> Result<(), RunError> {
        let up = Update::decode(&resp.payload, key, params.len()).map_err(RunError::Protocol)?;
        self.grad.fill(0.0);
        up.grad
            .scatter_add_into(&mut self.grad)
            .map_err(|e| RunError::Protocol(format!("key {key}: {e}")))?;
        self.opt
            .step(params, &self.grad)
            .map_err(RunError::Engine)?;
        if let Some(theta) = up.theta {
            let same = params
                .iter()
                .zip(&theta)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            tracing::debug!(key, same, "dense resynchronisation");
            self.resyncs += 1;
            self.mismatches += u64::from(!same);
            params.copy_from_slice(&theta);
        }
        Ok(())
    }
}

/// The heterogeneity knob (sync.md): after a step of measured duration `step`, sleeps
/// `(factor − 1)·step`.
fn slow_down(factor: f64, step: Duration) {
    if factor > 1.0 {
        std::thread::sleep(step.mul_f64(factor - 1.0));
    }
}

/// HFA: sends this worker's model for local averaging number `local` (1-based) and replaces it
/// with the answer (the DC's average, or the new milestone on global rounds).
fn average(
    client: &KvClient,
    params: &mut [Vec<f32>],
    local: u64,
    job: &JobSpec,
) -> Result<(), RunError> {
    let mut pending = Vec::with_capacity(params.len());
    for (k, p) in params.iter().enumerate() {
        let (codec, bytes) = job.intra.encode_dense(p);
        let req = client
            .push(k as u64, local - 1, codec, 0, p.len() as u64, &bytes)
            .map_err(|e| RunError::Net(format!("pushing model key {k} averaging {local}"), e))?;
        pending.push(req);
    }
    for (k, p) in pending.into_iter().enumerate() {
        let n = params[k].len();
        params[k] = decode_key(k, local, n, p.wait(job.wait_limit()))?;
    }
    Ok(())
}

/// One local step (HFA, ESync): gradients of `batch` at `params`, applied by the worker's own
/// optimizers (`None`: a warm-up step, gradients discarded), then the slow-down. Returns the
/// batch loss and the step's duration including the slow-down.
fn local_step(
    job: &JobSpec,
    params: &mut [Vec<f32>],
    batch: &crate::data::Dataset,
    opts: Option<&mut [Optimizer]>,
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
    if let Some(opts) = opts {
        for (k, (g, opt)) in grads.iter().zip(opts.iter_mut()).enumerate() {
            let g = g.as_ref().ok_or_else(|| {
                RunError::Protocol(format!("the model produced no gradient for key {k}"))
            })?;
            opt.step(&mut params[k], g).map_err(RunError::Engine)?;
        }
    }
    slow_down(slowdown, started.elapsed());
    Ok((f64::from(l), started.elapsed()))
}

/// A worker's side of ESync: its connection to the coordinator's ESync endpoint, the duration of
/// its last step, the servers' milestone m (see [`super::esync`]) and the Reset still in flight.
struct EsyncWorker {
    endpoint: KvClient,
    index: u32,
    workers: usize,
    c: f64,
    milestone: Vec<Vec<f32>>,
    steps: u64,
    slowdown: f64,
    /// A Reset sent but not yet answered (its reply is needed only for FedNova, or before the
    /// next Ask, which the endpoint answers after it anyway).
    pending: Option<Pending>,
}

impl EsyncWorker {
    /// Connects worker `index` (global index) to the endpoint; `theta0` is the first milestone,
    /// `c` the warm-up step's duration, `slowdown` its DC's compute slow-down.
    fn connect(
        node: &Node,
        job: &JobSpec,
        index: u32,
        theta0: &[Vec<f32>],
        c: Duration,
        slowdown: f64,
    ) -> Result<Self, RunError> {
        let addr = node.addr_of(esync::ROLE, job.plan.central_dc, 0)?;
        let endpoint = KvClient::connect(addr.as_str(), node.id(), job.net)
            .map_err(|e| RunError::Net(format!("connecting to the ESync endpoint at {addr}"), e))?;
        Ok(Self {
            endpoint,
            index,
            workers: job.plan.total_workers(),
            c: c.as_secs_f64(),
            milestone: theta0.to_vec(),
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

    /// Waits for the Reset in flight, if any; returns the step counts it answered.
    fn settle(&mut self, limit: Duration) -> Result<Option<Vec<u64>>, RunError> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        let payload = Self::wait(p, limit, "reset")?;
        Reply::decode_steps(&payload, self.workers)
            .map(Some)
            .map_err(|e| RunError::Protocol(e.to_string()))
    }

    /// One ESync round (`round` 0-based): local steps until the coordinator says push, then the
    /// synchronous model-delta round and the combination. Returns the last step's loss.
    fn round(
        &mut self,
        job: &JobSpec,
        client: &KvClient,
        params: &mut [Vec<f32>],
        opts: &mut [Optimizer],
        round: u64,
        next_batch: &mut dyn FnMut() -> crate::data::Dataset,
    ) -> Result<f64, RunError> {
        let limit = job.wait_limit();
        let w_prev = params.to_vec();
        let mut k = 0;
        let mut loss = f64::NAN;
        // After a reset, the Ask{k = 0} travelled with it (always answered step); the first round
        // asks with the warm-up duration.
        let mut answer = if round == 0 {
            self.ask(0, limit)?
        } else {
            Answer::Step
        };
        while answer == Answer::Step {
            let batch = next_batch();
            let (l, d) = local_step(job, params, &batch, Some(&mut *opts), self.slowdown)?;
            loss = l;
            self.c = d.as_secs_f64();
            k += 1;
            self.settle(limit)?;
            answer = self.ask(k, limit)?;
        }
        if k == 0 {
            return Err(RunError::Protocol(
                "the ESync endpoint answered push before any local step".into(),
            ));
        }
        self.steps += k;
        let norm = job.esync.normalisation;
        let a = esync::push_factor(norm, k);
        let mut u: Vec<Vec<f32>> = (0..params.len())
            .map(|i| esync::push_model(&self.milestone[i], &params[i], &w_prev[i], a))
            .collect();
        average(client, &mut u, round + 1, job)?;
        self.pending = Some(self.send(esync::Request::Reset {
            worker: self.index,
            round: round + 2,
            c: self.c,
        })?);
        let s = match norm {
            // FedNova's τ_eff needs every worker's step count now.
            esync::Normalisation::Fednova => {
                let steps = self.settle(limit)?.unwrap_or_default();
                esync::round_scale(norm, job.esync.gamma, &steps)
            }
            esync::Normalisation::None => esync::round_scale(norm, job.esync.gamma, &[]),
        };
        for (i, p) in params.iter_mut().enumerate() {
            *p = esync::apply_round(&w_prev[i], &self.milestone[i], &u[i], s);
        }
        self.milestone = u;
        Ok(loss)
    }
}

/// Runs worker `rank` of DC `dc` for the job's rounds; returns its traffic, final parameter hash
/// and (for dc 0 rank 0) final test accuracy.
pub fn run(
    job: &JobSpec,
    dc: u32,
    rank: u32,
    coord_addr: &str,
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

    let node = Node::join(coord_addr, me, String::new(), job, fatal)?;
    let addr = node.addr_of(roles::LOCAL_SERVER, dc, 0)?;
    let client = KvClient::connect(addr.as_str(), node.id(), job.net).map_err(|e| {
        RunError::Net(
            format!("connecting to the local server of dc {dc} at {addr}"),
            e,
        )
    })?;
    let lens = &plan.key_lens;
    // θ_0 from the local server (which has it from the global servers).
    let pulls: Vec<Pending> = (0..lens.len())
        .map(|k| client.pull(k as u64, 0, 0, lens[k] as u64))
        .collect::<Result<_, _>>()
        .map_err(|e| RunError::Net("pulling θ_0".into(), e))?;
    let mut params = Vec::with_capacity(lens.len());
    for (k, p) in pulls.into_iter().enumerate() {
        params.push(decode_key(k, 0, lens[k], p.wait(job.wait_limit()))?);
    }
    node.barrier("all")?;
    let mut replicas: Vec<Option<Replica>> = lens
        .iter()
        .map(|&n| {
            job.inter.is_sparse_key(n).then(|| Replica {
                opt: Optimizer::new(&job.optimizer, n),
                grad: vec![0.0; n],
                resyncs: 0,
                mismatches: 0,
            })
        })
        .collect();

    let mut loss = f64::NAN;
    let mut last_eval = None;
    // HFA: every worker runs its own optimizer (state kept across averagings).
    let mut local_opts: Vec<Optimizer> = match job.hfa_periods() {
        Some(_) => lens
            .iter()
            .map(|&n| Optimizer::new(&job.optimizer, n))
            .collect(),
        None => Vec::new(),
    };
    let mut esync = match job.sync {
        SyncAlgorithm::Esync => {
            // c before the first step: a warm-up step's duration (gradients discarded).
            let warmup = batcher.next_batch(train);
            let c = local_step(job, &mut params, &warmup, None, slowdown)?.1;
            Some(EsyncWorker::connect(
                &node, job, w as u32, &params, c, slowdown,
            )?)
        }
        _ => None,
    };
    for round in 0..job.rounds {
        if let Some(es) = esync.as_mut() {
            loss = es.round(
                job,
                &client,
                &mut params,
                &mut local_opts,
                round,
                &mut || batcher.next_batch(train),
            )?;
        } else if let Some((k1, _)) = job.hfa_periods() {
            let batch = batcher.next_batch(train);
            loss = local_step(job, &mut params, &batch, Some(&mut local_opts), slowdown)?.0;
            if (round + 1) % k1 == 0 {
                average(&client, &mut params, (round + 1) / k1, job)?;
            }
        } else {
            let batch = batcher.next_batch(train);
            let started = Instant::now();
            let mut pending: Vec<Option<Result<Pending, NetError>>> =
                (0..lens.len()).map(|_| None).collect();
            let l = job
                .model
                // Gradients encoded per key by the model (on its GPU for a CUDA tch model).
                .backward_encoded(
                    &params,
                    batch.view(),
                    (&job.intra).into(),
                    &mut |key, n, codec, bytes| {
                        pending[key] =
                            Some(client.push(key as u64, round, codec, 0, n as u64, &bytes));
                    },
                )
                .map_err(RunError::Engine)?;
            loss = f64::from(l);
            slow_down(slowdown, started.elapsed());
            for (k, p) in pending.into_iter().enumerate() {
                let p = p
                    .ok_or_else(|| {
                        RunError::Protocol(format!("the model produced no gradient for key {k}"))
                    })?
                    .map_err(|e| RunError::Net(format!("pushing key {k} round {round}"), e))?;
                match replicas[k].as_mut() {
                    Some(rep) => {
                        let resp = reply_of(k, round + 1, p.wait(job.wait_limit()))?;
                        rep.apply(k, &mut params[k], &resp)?;
                    }
                    None => {
                        params[k] = decode_key(k, round + 1, lens[k], p.wait(job.wait_limit()))?;
                    }
                }
            }
        }
        let done = round + 1;
        let due = job.eval_every > 0 && done % job.eval_every == 0;
        if reporter && (due || done == job.rounds) {
            let ev = job
                .model
                .evaluate(&params, job.data.test.view())
                .map_err(RunError::Engine)?;
            let p = Progress {
                round: done,
                loss,
                test_loss: ev.loss,
                test_accuracy: ev.accuracy,
                elapsed_s: launched.elapsed().as_secs_f64(),
            };
            progress(&p);
            last_eval = Some(p);
        }
    }
    let hash = params_hash(&params);
    if let Some(es) = esync.as_mut() {
        es.settle(job.wait_limit())?;
        tracing::info!(%dc, %rank, local_steps = es.steps, "ESync local steps");
    }
    tracing::info!(%dc, %rank, hash = format!("{hash:016x}"), "worker finished");
    node.finish(job.wait_limit())?;
    let mut stats = RoleStats::new(&node.me, Default::default());
    stats.client_bytes = super::total_bytes(client.stats());
    stats.param_hash = Some(hash);
    stats.final_loss = Some(loss);
    stats.final_test_accuracy = last_eval.map(|p| p.test_accuracy);
    for r in replicas.iter().flatten() {
        stats.resyncs += r.resyncs;
        stats.resync_mismatches += r.mismatches;
    }
    Ok(stats)
}
