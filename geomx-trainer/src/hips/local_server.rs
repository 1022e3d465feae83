//! The local server role: a server to its DC's workers and a worker to the global tier.
//!
//! Worker pushes of `(key, r)` are parked until all n_d are in; their rank-ordered sum goes to the
//! owners of the key's ranges; when every range answered with θ_{r+1} the parked pushes are
//! answered with the key's θ_{r+1}. One uplink thread per key keeps keys independent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::{Receiver, Sender};
use geomx_net::{
    Handler, KvClient, MsgKind, NetError, PayloadCodec, PeerHandle, Pending, Request, Responder,
};

use super::global_server::reject;
use super::msg::{f32_bytes, f32_from_bytes, UpPush};
use super::node::{Aborter, FatalHook, Identity, Node};
use super::plan::roles;
use super::{lock, JobSpec, LocalAggregator, RoleStats, RunError};
use crate::placement::Range;

/// A completed lower-tier sum to send upward.
struct UpJob {
    round: u64,
    sum: Vec<f32>,
    replies: Vec<Responder>,
}

struct State {
    agg: LocalAggregator,
    /// Current (version, values) of every key; `None` until θ_0 arrived.
    theta: Vec<Option<(u64, Arc<Vec<u8>>)>>,
    /// Worker pushes of the round being collected, per key.
    parked: Vec<Vec<Responder>>,
    /// Worker pulls waiting for a version: (key, min_version, responder).
    pulls: Vec<(usize, u64, Responder)>,
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
    uplinks: OnceLock<Vec<Sender<UpJob>>>,
    aborter: OnceLock<Aborter>,
    all_done: Sender<()>,
}

impl LocalHandler {
    fn abort(&self, msg: String) {
        tracing::error!(%msg, "local server failure");
        if let Some(a) = self.aborter.get() {
            a.abort(msg);
        }
    }

    fn fail(&self, reply: Responder, msg: String) {
        let _ = reply.error(&msg);
        self.abort(msg);
    }

    fn on_push(&self, req: Request, reply: Responder) {
        let key = req.key as usize;
        let Some(&rank) = self.rank_of.get().and_then(|m| m.get(&req.sender)) else {
            // Not a member: refuse the request but keep the job running.
            return reject(
                reply,
                format!(
                    "push from node {} which is no worker of dc {}",
                    req.sender, self.dc
                ),
            );
        };
        let Some(grad) = f32_from_bytes(&req.payload) else {
            return self.fail(
                reply,
                format!("worker (dc {}, rank {rank}): payload is not f32", self.dc),
            );
        };
        let mut st = lock(&self.state);
        match st.agg.push(key, req.version, rank, grad) {
            Ok(None) => st.parked[key].push(reply),
            Ok(Some(sum)) => {
                let mut replies = std::mem::take(&mut st.parked[key]);
                replies.push(reply);
                drop(st);
                let job = UpJob {
                    round: req.version,
                    sum,
                    replies,
                };
                match self.uplinks.get().and_then(|u| u.get(key)) {
                    Some(tx) => {
                        if tx.send(job).is_err() {
                            self.abort(format!("dc {}: uplink of key {key} stopped", self.dc));
                        }
                    }
                    None => self.abort(format!("dc {}: push before the uplinks started", self.dc)),
                }
            }
            Err(e) => {
                drop(st);
                self.fail(reply, format!("worker (dc {}, rank {rank}): {e}", self.dc));
            }
        }
    }

    fn on_pull(&self, req: Request, reply: Responder) {
        let key = req.key as usize;
        let mut st = lock(&self.state);
        match st.theta.get(key) {
            None => {
                drop(st);
                self.fail(reply, format!("dc {}: pull of unknown key {key}", self.dc));
            }
            Some(Some((v, bytes))) if *v >= req.version => {
                let (v, bytes) = (*v, bytes.clone());
                drop(st);
                let _ = reply.send(v, PayloadCodec::DenseF32, &bytes);
            }
            Some(_) => st.pulls.push((key, req.version, reply)),
        }
    }

    /// Stores θ of `key` at `version` and answers `replies` plus the pulls it satisfies.
    fn publish(&self, key: usize, version: u64, theta: Vec<f32>, replies: Vec<Responder>) {
        let bytes = Arc::new(f32_bytes(&theta).into_owned());
        let mut st = lock(&self.state);
        st.theta[key] = Some((version, bytes.clone()));
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut st.pulls)
            .into_iter()
            .partition(|(k, v, _)| *k == key && *v <= version);
        st.pulls = rest;
        if version == self.rounds {
            st.finished_keys += 1;
            if st.finished_keys == self.key_lens.len() {
                let _ = self.all_done.send(());
            }
        }
        drop(st);
        for r in replies
            .into_iter()
            .chain(ready.into_iter().map(|(_, _, r)| r))
        {
            if let Err(e) = r.send(version, PayloadCodec::DenseF32, &bytes) {
                tracing::warn!(error = %e, key, "reply to a worker not delivered");
            }
        }
    }

    fn finished(&self) -> bool {
        lock(&self.state).finished_keys == self.key_lens.len()
    }
}

impl Handler for LocalHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        match req.kind {
            MsgKind::Push => self.on_push(req, reply),
            MsgKind::Pull => self.on_pull(req, reply),
            other => {
                let _ = reply.error(&format!("a local server does not serve {other:?}"));
            }
        }
    }

    fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
        let Some(&rank) = self.rank_of.get().and_then(|m| m.get(&peer.node_id())) else {
            return;
        };
        if !self.finished() {
            self.abort(format!(
                "worker (dc {}, rank {rank}) disconnected: {reason}",
                self.dc
            ));
        }
    }
}

/// Pushes `sum` of `key` at `round` to the owners of its ranges and assembles their replies.
fn exchange(
    clients: &[KvClient],
    ranges: &[(usize, Range)],
    key_len: usize,
    round: u64,
    count: u32,
    sum: Option<&[f32]>,
    job: &JobSpec,
) -> Result<Vec<f32>, String> {
    let mut pending: Vec<(usize, &Range, Pending)> = Vec::with_capacity(ranges.len());
    for (id, r) in ranges {
        let c = &clients[r.server];
        let p = match sum {
            Some(s) => {
                let payload = UpPush::encode(count, &s[r.offset..r.offset + r.len]);
                c.push(
                    *id as u64,
                    round,
                    PayloadCodec::Raw,
                    r.offset as u64,
                    key_len as u64,
                    &payload,
                )
            }
            None => c.pull(*id as u64, round, r.offset as u64, key_len as u64),
        }
        .map_err(|e| format!("range {id} to global server {}: {e}", r.server))?;
        pending.push((*id, r, p));
    }
    let mut theta = vec![0.0f32; key_len];
    let want = if sum.is_some() { round + 1 } else { round };
    for (id, r, p) in pending {
        let resp = p
            .wait(job.wait_limit())
            .map_err(|e| format!("range {id} from global server {}: {e}", r.server))?;
        let vals = f32_from_bytes(&resp.payload)
            .filter(|v| v.len() == r.len)
            .ok_or_else(|| format!("range {id}: reply of {} bytes", resp.payload.len()))?;
        if resp.version < want {
            return Err(format!(
                "range {id}: reply at version {}, expected {want}",
                resp.version
            ));
        }
        theta[r.offset..r.offset + r.len].copy_from_slice(&vals);
    }
    Ok(theta)
}

fn uplink(
    handler: Arc<LocalHandler>,
    key: usize,
    clients: Vec<KvClient>,
    ranges: Vec<(usize, Range)>,
    count: u32,
    jobs: Receiver<UpJob>,
    job: JobSpec,
) {
    let key_len = handler.key_lens[key];
    for up in jobs {
        match exchange(
            &clients,
            &ranges,
            key_len,
            up.round,
            count,
            Some(&up.sum),
            &job,
        ) {
            Ok(theta) => handler.publish(key, up.round + 1, theta, up.replies),
            Err(e) => {
                handler.abort(format!(
                    "dc {}: key {key} round {}: {e}",
                    handler.dc, up.round
                ));
                return;
            }
        }
    }
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
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let handler = Arc::new(LocalHandler {
        dc,
        rounds: job.rounds,
        key_lens: plan.key_lens.clone(),
        state: Mutex::new(State {
            agg: LocalAggregator::new(&plan.key_lens, n_d, 0),
            theta: vec![None; n_keys],
            parked: (0..n_keys).map(|_| Vec::new()).collect(),
            pulls: Vec::new(),
            finished_keys: 0,
        }),
        rank_of: OnceLock::new(),
        uplinks: OnceLock::new(),
        aborter: OnceLock::new(),
        all_done: done_tx,
    });
    let (mut server, node) =
        Node::serve_and_join(coord_addr, me, bind_addr, handler.clone(), job, fatal)?;
    let _ = handler.aborter.set(node.aborter());
    let rank_of = node
        .membership
        .nodes
        .iter()
        .filter(|n| n.role == roles::WORKER && n.dc == dc)
        .map(|n| (n.id, n.rank as usize))
        .collect();
    let _ = handler.rank_of.set(rank_of);

    // Connect to every global server.
    let mut clients = Vec::with_capacity(plan.num_global_servers());
    for s in 0..plan.num_global_servers() as u32 {
        let addr = node.addr_of(roles::GLOBAL_SERVER, plan.central_dc, s)?;
        let c = KvClient::connect(addr.as_str(), node.id(), job.net).map_err(|e| {
            RunError::Net(
                format!("dc {dc} connecting to global server {s} at {addr}"),
                e,
            )
        })?;
        clients.push(c);
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
    for (k, ranges) in key_ranges.iter().enumerate() {
        let theta = exchange(&clients, ranges, plan.key_lens[k], 0, 0, None, job)
            .map_err(|e| RunError::Protocol(format!("dc {dc} pulling θ_0 of key {k}: {e}")))?;
        handler.publish(k, 0, theta, Vec::new());
    }
    let mut senders = Vec::with_capacity(n_keys);
    for (k, ranges) in key_ranges.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded();
        senders.push(tx);
        let (h, c, j) = (handler.clone(), clients.clone(), job.clone());
        std::thread::Builder::new()
            .name(format!("geomx-uplink-{k}"))
            .spawn(move || uplink(h, k, c, ranges, n_d as u32, rx, j))
            .map_err(|e| RunError::Io("starting an uplink thread".into(), e.to_string()))?;
    }
    let _ = handler.uplinks.set(senders);
    node.barrier("all")?;
    if job.rounds > 0 && n_keys > 0 {
        // Bounded by the job: a lost peer aborts the job, which ends this process.
        let _ = done_rx.recv();
    }
    node.finish(job.wait_limit())?;
    let lan = server.stats();
    let wan: u64 = clients.iter().map(|c| super::total_bytes(c.stats())).sum();
    server.shutdown();
    let mut stats = RoleStats::new(&node.me, lan);
    stats.client_bytes = wan;
    Ok(stats)
}
