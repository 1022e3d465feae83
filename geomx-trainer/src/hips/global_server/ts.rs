//! The global server's side of TSEngine on the inter tier (`[scheduling.tsengine] inter`): the
//! driver around one [`TsRoot`] per key (each key is a bundle, so that one key's pull tree runs
//! while the next key's push tree is under way; the key travels in the requests' offset). The
//! local servers' requests go in, the answers go out, a push tree's complete sum goes into the
//! aggregator as one push of all W workers (a single virtual DC), and once the key's ranges are
//! complete their θ starts its pull tree.

use std::collections::BTreeMap;
use std::sync::Mutex;

use geomx_net::sched::reply::SharedBytes;
use geomx_net::sched::tsengine::{NodeId, TsConfig};
use geomx_net::{PayloadCodec, Request, Responder};

use super::GlobalHandler;
use crate::codec::count_nonfinite;
use crate::hips::lock;
use crate::hips::ts_msg::Op;
use crate::hips::ts_root::{Action, Roots};
use crate::hips::JobSpec;

/// θ of (key, round)s being assembled from their completed ranges: bytes, ranges in.
type Assembly = BTreeMap<(usize, u64), (Vec<u8>, usize)>;

/// TSEngine state of a global server.
pub(super) struct TsGlobal {
    /// One root per key.
    roots: Roots,
    /// θ of a (key, round) being assembled from its completed ranges: bytes, ranges in.
    theta: Mutex<Assembly>,
    /// Each key's ranges: (range id, offset in the key, length).
    ranges: Vec<Vec<(usize, usize, usize)>>,
}

impl TsGlobal {
    /// The state for `job`; `None` when TSEngine is off.
    pub(super) fn new(job: &JobSpec) -> Result<Option<Self>, String> {
        let Some(cfg): Option<TsConfig> = job.tsengine else {
            return Ok(None);
        };
        let plan = &job.plan;
        Ok(Some(Self {
            roots: Roots::new(cfg, plan.num_dcs(), &plan.key_lens, job.seed)?,
            theta: Mutex::new(BTreeMap::new()),
            ranges: (0..plan.key_lens.len())
                .map(|k| plan.key_parts(k))
                .collect(),
        }))
    }
}

impl GlobalHandler {
    /// A TSEngine request of a local server.
    pub(super) fn on_ts(&self, op: Op, req: Request, reply: Responder) {
        let Some(ts) = &self.ts else {
            return self.admission.refuse(reply, "TSEngine is off".into());
        };
        let dc = match self.member(&req) {
            Ok(dc) => dc as NodeId,
            Err(msg) => return self.admission.refuse(reply, msg),
        };
        let who = || format!("dc {dc}");
        let abort = |msg| self.abort(msg);
        if let Some((key, round, actions)) =
            ts.roots
                .serve(dc, who, op, req, reply, &self.admission, abort)
        {
            self.ts_act(key, round, actions);
        }
    }

    /// Carries out the root's actions for `key` in `round`.
    fn ts_act(&self, key: usize, round: u64, actions: Vec<Action<Responder>>) {
        // The replies' entry of the key (its first range), for its P3 priority.
        let entry = self.ts.as_ref().and_then(|ts| ts.ranges.get(key)?.first());
        let entry = entry.map_or(0, |r| r.0);
        for a in actions {
            match a {
                // Through the replies: a tree answer may go to another DC than the one whose
                // message completed this step (replies.rs).
                Action::Answer(r, payload) => {
                    let payload: SharedBytes = payload;
                    self.replies
                        .send(entry, r, round, PayloadCodec::Raw, &payload);
                }
                Action::Complete {
                    round,
                    sum,
                    workers,
                } => self.ts_complete(key, round, &sum, workers),
            }
        }
    }

    /// Every DC's sum of `key` reached the root: one push of all W workers per range.
    fn ts_complete(&self, key: usize, round: u64, sum: &[f32], workers: u32) {
        let Some(ts) = &self.ts else { return };
        let bad = count_nonfinite(sum);
        if bad > 0 {
            return self.abort(format!(
                "TSEngine key {key}, round {round}: {bad} non-finite values"
            ));
        }
        for &(id, off, len) in ts.ranges.get(key).into_iter().flatten() {
            let Some(part) = sum.get(off..off + len) else {
                return self.abort(format!("TSEngine round {round}: range {id} out of the sum"));
            };
            let mut st = lock(&self.state);
            match st
                .agg
                .push_round(id, 0, round, (Some(part.to_vec()), workers))
            {
                Ok(Some(done)) => self.finish_round(st, id, done),
                Ok(None) => {
                    drop(st);
                    return self.abort(format!("TSEngine round {round}: range {id} incomplete"));
                }
                Err(e) => {
                    drop(st);
                    return self.abort(format!("TSEngine round {round}, range {id}: {e}"));
                }
            }
        }
    }

    /// Range `id` of `round` is complete with θ `reply` (f32 bytes): once every range of its
    /// key is, the key's pull tree starts.
    pub(super) fn ts_range_done(&self, id: usize, round: u64, reply: &[u8]) {
        let Some(ts) = &self.ts else { return };
        let key = self.range_keys[id];
        let (Some(ranges), Some(key_len)) = (ts.ranges.get(key), ts.roots.len_of(key)) else {
            return self.abort(format!("TSEngine: range {id} of an unknown key"));
        };
        let Some(&(_, off, len)) = ranges.iter().find(|r| r.0 == id) else {
            return self.abort(format!("TSEngine: range {id} not in key {key}"));
        };
        let theta = {
            let mut t = lock(&ts.theta);
            let e = t
                .entry((key, round))
                .or_insert_with(|| (vec![0u8; key_len * 4], 0));
            match e.0.get_mut(off * 4..(off + len) * 4) {
                Some(dst) if reply.len() == len * 4 => dst.copy_from_slice(reply),
                _ => {
                    drop(t);
                    return self.abort(format!("TSEngine round {round}: range {id}'s θ"));
                }
            }
            e.1 += 1;
            if e.1 < ranges.len() {
                return;
            }
            t.remove(&(key, round)).map(|e| e.0).unwrap_or_default()
        };
        match ts.roots.theta(key, round, &theta) {
            Ok(actions) => self.ts_act(key, round, actions),
            Err(e) => self.abort(format!("TSEngine key {key}, round {round}: {e}")),
        }
    }
}
