//! A worker's FSA / MixedSync round: gradients pushed key by key as the backward pass produces
//! them, each push answered with what the global tier applied to that key.
//!
//! Without P3 the round ends by applying every reply (last layer first, the first answered).
//! With P3 (scheduling.md) the keys are slices, the pushes go through a priority sender (the
//! layer next to the input first), and the replies stay [`Outstanding`] until the next round's
//! forward pass needs them: layer ℓ is brought up to date just before it computes
//! ([`crate::engine::Model::backward_gated`]), so the first layers compute while the last
//! layers' slices are still in flight. The values are the same either way; only the waiting
//! moves.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use geomx_net::sched::priority::{PrioritySender, Queued};
use geomx_net::{KvClient, NetError, Response};

use super::chaos::{Point, SelfFault};
use super::node::Node;
use super::throughput::{StepPart, StepSplit};
use super::worker::{check_push, reply_of, slow_down, KeyApply};
use super::worker_tree::WorkerTree;
use super::{JobSpec, RunError};
use crate::clock::Mark;
use crate::codec::{encode_values, poison_first, Encoded, KeyCounts, WorkerSparse};
use crate::data::Prefetcher;
use crate::engine::{DenseEncoding, EngineError};

/// What an FSA round talks to: the worker's node, its local server (directly, or through the
/// P3 priority sender), its overflow counters and its slowdown.
pub(super) struct FsaIo<'a> {
    pub node: &'a Node,
    pub client: &'a KvClient,
    /// P3: the priority sender in front of `client`.
    pub prio: Option<&'a PrioritySender>,
    /// TSEngine on the intra tier: the trees that carry the pushes instead of `client`.
    pub tree: Option<&'a WorkerTree>,
    pub overflows: &'a KeyCounts,
    /// This worker's emulated slowdown factor (`cluster.data_centers[].slowdown`).
    pub slowdown: f64,
    /// The fault this worker injects into itself (`geomx launch --chaos`), if any.
    pub chaos: Option<&'a SelfFault>,
}

/// How a push's reply comes back.
pub(super) enum Answer {
    /// From the local server (directly, or through the P3 priority sender).
    Net(Queued),
    /// From the key's TSEngine tree ([`WorkerTree`]).
    Tree(Receiver<Result<Response, NetError>>),
}

impl Answer {
    /// Waits up to `timeout` for the reply.
    fn wait(self, timeout: Duration) -> Result<Response, NetError> {
        match self {
            Answer::Net(q) => q.wait(timeout),
            Answer::Tree(rx) => rx.recv_timeout(timeout).unwrap_or_else(|_| {
                Err(NetError::Timeout(format!(
                    "no θ from the TSEngine tree within {timeout:?}"
                )))
            }),
        }
    }
}

/// Replies to one round's pushes, by key, that the worker has not applied yet.
#[derive(Default)]
pub(super) struct Outstanding {
    round: u64,
    replies: Vec<Option<Answer>>,
}

impl Outstanding {
    /// True when every reply was applied.
    pub fn is_empty(&self) -> bool {
        self.replies.iter().all(Option::is_none)
    }

    /// Waits for the replies of `keys` still outstanding and applies them to `params` (one
    /// vector per tensor). Keys that are whole tensors (no P3) go to the model's device at once
    /// (`Model::preload`), while later replies are awaited.
    pub fn settle(
        &mut self,
        job: &JobSpec,
        params: &mut [Vec<f32>],
        apply: &mut [KeyApply],
        keys: impl IntoIterator<Item = usize>,
        split: &mut StepSplit,
    ) -> Result<(), RunError> {
        for k in keys {
            let Some(q) = self.replies.get_mut(k).and_then(Option::take) else {
                continue;
            };
            let t = Mark::now();
            let resp = reply_of(k, self.round + 1, q.wait(job.wait_limit()))?;
            split.charge(StepPart::Wait, t);
            let t_apply = Mark::now();
            let (part, a) = job
                .keys
                .part_mut(params, k)
                .zip(apply.get_mut(k))
                .ok_or_else(|| RunError::Protocol(format!("key {k} outside the model")))?;
            a.apply(job, k, part, &resp)?;
            // The reply's buffer goes back to the receive pool for the next reply.
            geomx_net::bufpool::recycle(resp.payload);
            if !job.keys.is_sliced() {
                job.model
                    .preload(k, &[params[k].as_slice()])
                    .map_err(RunError::Engine)?;
            }
            split.charge(StepPart::Apply, t_apply);
        }
        Ok(())
    }

    /// [`Outstanding::settle`] for every key, in key order (the next forward pass's order).
    pub fn settle_all(
        &mut self,
        job: &JobSpec,
        params: &mut [Vec<f32>],
        apply: &mut [KeyApply],
        split: &mut StepSplit,
    ) -> Result<(), RunError> {
        self.settle(job, params, apply, 0..job.keys.len(), split)
    }
}

/// Queues or sends one key's push; the first failure is kept for the caller.
struct Pushes<'a> {
    job: &'a JobSpec,
    io: &'a FsaIo<'a>,
    round: u64,
    replies: Vec<Option<Answer>>,
    failed: Option<RunError>,
}

impl Pushes<'_> {
    fn push(&mut self, key: usize, n: usize, mut e: Encoded) {
        let (job, io, round) = (self.job, self.io, self.round);
        let me = &io.node.me;
        if job.nonfinite.injects(me.dc, me.rank, round, key) {
            poison_first(e.codec, &mut e.bytes);
        }
        io.overflows.add(key, e.overflow);
        let sent =
            check_push(job, io.node, "gradient", key, round, e.codec, &e.bytes, n).and_then(|_| {
                if let Some(t) = io.tree {
                    return t.push(key, round, e.codec, e.bytes).map(Answer::Tree);
                }
                let r = match io.prio {
                    Some(s) => s.push(
                        job.keys.priority(key),
                        key as u64,
                        round,
                        e.codec,
                        0,
                        n as u64,
                        e.bytes,
                    ),
                    None => io
                        .client
                        .push(key as u64, round, e.codec, 0, n as u64, &e.bytes)
                        .map(Queued::from),
                };
                r.map(Answer::Net)
                    .map_err(|e| RunError::Net(format!("pushing key {key} round {round}"), e))
            });
        if let Some(c) = io.chaos {
            c.at(round, Point::MidPush);
        }
        match (sent, self.replies.get_mut(key)) {
            (Ok(q), Some(slot)) => *slot = Some(q),
            (Ok(_), None) => {
                self.failed.get_or_insert(RunError::Protocol(format!(
                    "the model produced a gradient for unknown key {key}"
                )));
            }
            (Err(e), _) => {
                self.failed.get_or_insert(e);
            }
        }
    }
}

/// One FSA / MixedSync round (see the module docs). `out` holds the previous round's replies
/// under P3 and this round's on return; without P3 it is empty on return. `sparse`: the
/// worker's own Bi-Sparse pushes (`compression.intra.codec = "bisparse"`, never with P3).
/// Returns the loss.
#[allow(clippy::too_many_arguments)]
pub(super) fn fsa_round(
    job: &JobSpec,
    io: &FsaIo<'_>,
    sparse: Option<&mut WorkerSparse>,
    params: &mut [Vec<f32>],
    apply: &mut [KeyApply],
    out: &mut Outstanding,
    batcher: &mut Prefetcher,
    round: u64,
    split: &mut StepSplit,
) -> Result<f64, RunError> {
    let t = Instant::now();
    let batch = batcher.next_batch().map_err(RunError::Data)?;
    split.data_s += t.elapsed().as_secs_f64();
    split.samples += batch.len() as u64;
    let started = Mark::now();
    let booked_before = split.booked();
    let (codec_before, copy_before) = (split.codec_s, split.copy_s);
    let mut pushes = Pushes {
        job,
        io,
        round,
        replies: (0..job.keys.len()).map(|_| None).collect(),
        failed: None,
    };
    let loss = if io.prio.is_some() {
        let enc = DenseEncoding::from(&job.intra);
        let mut gate_failure = None;
        let step = job.model.backward_gated(
            params,
            batch.view(),
            &mut |layer, p| {
                let keys = job.keys.layer_keys(layer).iter().copied();
                out.settle(job, p, apply, keys, split).map_err(|e| {
                    let message = e.to_string();
                    gate_failure = Some(e);
                    EngineError::NotReady { layer, message }
                })
            },
            // Each slice is encoded and queued as soon as its tensor's gradient exists.
            &mut |t, grad| {
                for k in job.keys.keys_of(t) {
                    let part = job.keys.part(&grad, k).unwrap_or_default();
                    let e = encode_values(part, enc.value_type, enc.scaling);
                    pushes.push(k, part.len(), e);
                }
            },
        );
        step.map_err(|e| gate_failure.take().unwrap_or(RunError::Engine(e)))?
    } else if let Some(sparse) = sparse {
        job.model
            .backward_sparse(params, batch.view(), sparse, round, &mut |key, n, e| {
                pushes.push(key, n, e)
            })
            .map_err(RunError::Engine)?
    } else {
        job.model
            // Gradients encoded per key by the model (on its GPU for a CUDA tch model).
            .backward_encoded(
                params,
                batch.view(),
                (&job.intra).into(),
                &mut |key, n, e| pushes.push(key, n, e),
            )
            .map_err(RunError::Engine)?
    };
    // What the replies settled meanwhile (P3) booked themselves; the rest of the codec time is
    // this round's encoding, and the rest of the copy time its loads of the parameters and the
    // batch and its gradients' copies.
    let booked = Duration::from_secs_f64(split.booked() - booked_before);
    let spent = started.elapsed();
    let since = |before: f64, now: f64| Duration::from_secs_f64(now - before);
    let encoding = spent
        .codec
        .saturating_sub(since(codec_before, split.codec_s));
    let copying = spent.copy.saturating_sub(since(copy_before, split.copy_s));
    let own = booked + encoding + copying;
    slow_down(io.slowdown, started.at.elapsed().saturating_sub(own));
    // The slow-down counts as compute, as it emulates a slower device.
    split.codec_s += encoding.as_secs_f64();
    split.copy_s += copying.as_secs_f64();
    split.compute_s += started.at.elapsed().saturating_sub(own).as_secs_f64();
    if let Some(e) = pushes.failed {
        return Err(e);
    }
    if let Some(k) = pushes.replies.iter().position(Option::is_none) {
        return Err(RunError::Protocol(format!(
            "the model produced no gradient for key {k}"
        )));
    }
    if !out.is_empty() {
        return Err(RunError::Protocol(format!(
            "round {round} started with replies of round {} outstanding",
            out.round
        )));
    }
    *out = Outstanding {
        round,
        replies: pushes.replies,
    };
    if let Some(c) = io.chaos {
        c.at(round, Point::ReplyWait);
    }
    if io.prio.is_none() {
        // Replies in push order (last layer first, the first to be answered).
        let keys = (0..job.keys.len()).rev();
        out.settle(job, params, apply, keys, split)?;
    }
    Ok(f64::from(loss))
}
