//! A local server as the root of its workers' TSEngine trees (`[scheduling.tsengine] intra`,
//! scheduling.md, "TSEngine"; messages in [`crate::hips::ts_msg`] on [`crate::hips::ts_msg::Tier::Intra`], the
//! workers' side in [`crate::hips::worker_tree`]).
//!
//! One root per key ([`Roots`]) (each key is a bundle, as on the inter tier, so that one key's pull
//! tree runs while the next key's push tree is under way). The workers' gradients reach the
//! local server through the push tree instead of one push each (no in-cast at the local server
//! when many workers finish at once): a tree's complete sum is the DC's sum of the round and goes
//! upward like the local aggregator's. The round's θ, once the global tier answered, goes down
//! through the pull tree: the local server sends it to one worker, which forwards it to the
//! workers the root names, and so on.

use geomx_net::sched::reply::SharedBytes;
use geomx_net::sched::tsengine::NodeId;
use geomx_net::{PayloadCodec, Request, Responder};

use super::{LocalHandler, UpJob};
use crate::hips::ts_msg::Op;
use crate::hips::ts_root::{Action, Roots};
use crate::hips::JobSpec;

/// The roots of DC `dc`'s intra-tier trees over its `n_workers` workers, one per key; `None`
/// when the intra tier has no TSEngine.
pub(super) fn roots(job: &JobSpec, dc: u32, n_workers: usize) -> Result<Option<Roots>, String> {
    let Some(cfg) = job.ts_intra else {
        return Ok(None);
    };
    let seed = job.seed ^ (u64::from(dc) << 32);
    Roots::new(cfg, n_workers, &job.plan.key_lens, seed).map(Some)
}

impl LocalHandler {
    /// A TSEngine request of one of this DC's workers (the intra tier).
    pub(super) fn on_ts_intra(&self, op: Op, req: Request, reply: Responder) {
        let Some(roots) = &self.ts_intra else {
            let msg = format!(
                "dc {}: TSEngine is off between workers and their local server",
                self.dc
            );
            return self.admission.refuse(reply, msg);
        };
        let rank = match self.member(&req) {
            Ok(r) => r as NodeId,
            Err(msg) => return self.admission.refuse(reply, msg),
        };
        let who = || format!("worker (dc {}, rank {rank})", self.dc);
        let abort = |msg| self.abort(msg);
        if let Some((key, round, actions)) =
            roots.serve(rank, who, op, req, reply, &self.admission, abort)
        {
            self.ts_intra_act(key, round, actions);
        }
    }

    /// Carries out the root's actions for `key` in `round`: answers to workers, and a complete
    /// sum that goes upward as the DC's.
    fn ts_intra_act(&self, key: usize, round: u64, actions: Vec<Action<Responder>>) {
        for a in actions {
            match a {
                Action::Answer(r, payload) => {
                    let payload: SharedBytes = payload;
                    self.replies
                        .send(key, r, round, PayloadCodec::Raw, &payload);
                }
                Action::Complete {
                    round,
                    sum,
                    workers,
                } => {
                    let Some(sum) = self.check_sum(key, round, sum) else {
                        return;
                    };
                    let up = UpJob {
                        round,
                        sum,
                        count: workers,
                        replies: Vec::new(),
                    };
                    self.to_uplink(key, up);
                }
            }
        }
    }

    /// The global tier answered `key` of `round` with θ (`codec`, `bytes`): its pull tree starts
    /// here. Nothing to do without TSEngine on the intra tier.
    pub(super) fn ts_intra_theta(&self, key: usize, round: u64, codec: PayloadCodec, bytes: &[u8]) {
        let Some(roots) = &self.ts_intra else {
            return;
        };
        if codec != PayloadCodec::DenseF32 {
            return self.abort(format!(
                "dc {}: TSEngine key {key}, round {round}: θ came as {codec:?}, not dense f32",
                self.dc
            ));
        }
        match roots.theta(key, round, bytes) {
            Ok(actions) => self.ts_intra_act(key, round, actions),
            Err(e) => self.abort(format!(
                "dc {}: TSEngine key {key}, round {round}: {e}",
                self.dc
            )),
        }
    }
}
