//! The local server role: a server to its DC's workers and a worker to the global tier.
//!
//! Worker pushes of `(key, r)` are parked until all n_d are in; their rank-ordered sum goes to the
//! owners of the key's ranges; when every range answered with θ_{r+1} the parked pushes are
//! answered with the key's θ_{r+1}. One uplink thread per key keeps keys independent.

use crate::config::SyncAlgorithm;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::{Receiver, Sender};
use geomx_net::{
    Handler, KvClient, MsgKind, NetError, PayloadCodec, PeerHandle, Pending, Request, Responder,
};

use geomx_kernels::SparseVec;
use geomx_net::dgt::link::DgtClient;

use super::codec::{
    count_dense, count_payload, count_update, decode_values, CodecBytes, RangeCompressor,
    TierCodec, Update,
};
use super::dgt::{DgtRoleStats, DgtUplink, DGT_INFO_KEY};
use super::global_server::reject;
use super::msg::UpPush;
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

/// A key's stored reply: (version, codec, bytes).
type Stored = (u64, PayloadCodec, Arc<Vec<u8>>);

struct State {
    agg: LocalAggregator,
    /// Current (version, reply codec, reply bytes) of every key; `None` until θ_0 arrived. For
    /// Bi-Sparse keys after round 0 the bytes are the round's [`Update`], not θ.
    theta: Vec<Option<Stored>>,
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
    /// W, the divisor of the global sum.
    total_workers: u32,
    intra: TierCodec,
    inter: TierCodec,
    /// Inter-tier payload bytes by codec class.
    codec_bytes: Mutex<CodecBytes>,
    /// Sampled top-k selections that fell back to exact top-k.
    fallbacks: std::sync::atomic::AtomicU64,
    /// `transport.inter = "dgt"`: one DGT link per global server (index = server rank).
    dgt_links: OnceLock<Vec<DgtClient>>,
    /// Contribution scores and channel assignment of the DGT pushes.
    dgt_up: Mutex<Option<DgtUplink>>,
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
        let Some(&len) = self.key_lens.get(key) else {
            return self.fail(reply, format!("dc {}: push of unknown key {key}", self.dc));
        };
        let grad = match decode_values(req.codec, &req.payload, key, len) {
            Ok(g) => g,
            Err(e) => {
                return self.fail(reply, format!("worker (dc {}, rank {rank}): {e}", self.dc));
            }
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
            Some(Some((v, codec, bytes))) if *v >= req.version => {
                let (v, codec, bytes) = (*v, *codec, bytes.clone());
                drop(st);
                let _ = reply.send(v, codec, &bytes);
            }
            Some(_) => st.pulls.push((key, req.version, reply)),
        }
    }

    /// Stores the reply of `key` at `version` and answers `replies` plus the pulls it satisfies.
    fn publish(
        &self,
        key: usize,
        version: u64,
        codec: PayloadCodec,
        bytes: Vec<u8>,
        replies: Vec<Responder>,
    ) {
        let bytes = Arc::new(bytes);
        let mut st = lock(&self.state);
        st.theta[key] = Some((version, codec, bytes.clone()));
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
            if let Err(e) = r.send(version, codec, &bytes) {
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

/// What the global tier answered for one key.
enum KeyReply {
    /// θ of the key.
    Dense(Vec<f32>),
    /// Bi-Sparse: the global sum G of the key and, on resynchronisation rounds, θ.
    Sparse {
        sum: SparseVec,
        theta: Option<Vec<f32>>,
    },
}

/// How one key's ranges travel upward: `None` = dense θ pull (start-up).
enum UpSum<'a> {
    Pull,
    Dense(&'a [f32]),
    Sparse(&'a [f32], &'a mut [RangeCompressor]),
}

/// Pushes `sum` of `key` at `round` to the owners of its ranges and assembles their replies.
///
/// MixedSync passes `base`, the global version of each range the DC's θ came from: pushes carry
/// it instead of `round`, any later version answers, and `base` is advanced to the reply's.
#[allow(clippy::too_many_arguments)]
fn exchange(
    handler: &LocalHandler,
    clients: &[KvClient],
    ranges: &[(usize, Range)],
    key_len: usize,
    round: u64,
    count: u32,
    sum: UpSum<'_>,
    job: &JobSpec,
    mut base: Option<&mut [u64]>,
) -> Result<KeyReply, String> {
    let mut pending: Vec<(usize, &Range, Pending)> = Vec::with_capacity(ranges.len());
    let pushing = !matches!(sum, UpSum::Pull);
    let sparse = matches!(sum, UpSum::Sparse(..));
    let mut counts = CodecBytes::new();
    let (values, mut compressors) = match sum {
        UpSum::Pull => (None, None),
        UpSum::Dense(s) => (Some(s), None),
        UpSum::Sparse(s, c) => (Some(s), Some(c)),
    };
    for (i, (id, r)) in ranges.iter().enumerate() {
        let c = &clients[r.server];
        let version = base.as_deref().map_or(round, |b| b[i]);
        let slice = |s: &[f32]| s[r.offset..r.offset + r.len].to_vec();
        let payload = match (values, compressors.as_mut()) {
            (None, _) => None,
            (Some(s), Some(comps)) => {
                let comp = comps
                    .get_mut(i)
                    .ok_or_else(|| format!("range {id}: no compressor"))?;
                let before = comp.fallbacks();
                let body = comp.push(&slice(s), round)?;
                handler.fallbacks.fetch_add(
                    comp.fallbacks() - before,
                    std::sync::atomic::Ordering::Relaxed,
                );
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
                count_dense(
                    &mut counts,
                    PayloadCodec::DenseF32,
                    &super::msg::f32_bytes(&x),
                );
                lock(&handler.dgt_up)
                    .as_mut()
                    .ok_or("dgt uplink not set")?
                    .push(link, *id, version, x)?;
                Some(count.to_le_bytes().to_vec())
            }
            (Some(s), None) if handler.inter.is_plain() => {
                let body = UpPush::encode(count, &slice(s));
                count_dense(&mut counts, PayloadCodec::DenseF32, &body[4..]);
                Some(body)
            }
            (Some(s), None) => {
                let (codec, body) = handler.inter.encode_dense(&slice(s));
                count_dense(&mut counts, codec, &body);
                Some(UpPush::encode_coded(count, &raw_body(codec, body, r.len)))
            }
        };
        let p = match payload {
            Some(payload) => c.push(
                *id as u64,
                version,
                PayloadCodec::Raw,
                r.offset as u64,
                key_len as u64,
                &payload,
            ),
            None => c.pull(*id as u64, round, r.offset as u64, key_len as u64),
        }
        .map_err(|e| format!("range {id} to global server {}: {e}", r.server))?;
        pending.push((*id, r, p));
    }
    let mut theta = vec![0.0f32; key_len];
    let (mut idx, mut vals, mut resync) = (Vec::new(), Vec::new(), 0usize);
    for (i, (id, r, p)) in pending.into_iter().enumerate() {
        let sent = base.as_deref().map_or(round, |b| b[i]);
        let want = if pushing { sent + 1 } else { sent };
        let resp = p
            .wait(job.wait_limit())
            .map_err(|e| format!("range {id} from global server {}: {e}", r.server))?;
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
            let up = Update::decode(&resp.payload, id, r.len)?;
            idx.extend(up.grad.indices().iter().map(|&i| i + r.offset as u32));
            vals.extend_from_slice(up.grad.values());
            if let Some(t) = up.theta {
                theta[r.offset..r.offset + r.len].copy_from_slice(&t);
                resync += 1;
            }
        } else {
            if pushing {
                count_dense(&mut counts, resp.codec, &resp.payload);
            }
            let vals = decode_values(resp.codec, &resp.payload, id, r.len)?;
            theta[r.offset..r.offset + r.len].copy_from_slice(&vals);
        }
    }
    if pushing {
        let mut total = lock(&handler.codec_bytes);
        for (k, v) in counts {
            *total.entry(k).or_default() += v;
        }
    }
    if !sparse {
        return Ok(KeyReply::Dense(theta));
    }
    if resync != 0 && resync != ranges.len() {
        return Err(format!(
            "only {resync} of {} ranges resynchronised",
            ranges.len()
        ));
    }
    let sum = SparseVec::new(key_len as u32, idx, vals).map_err(|e| e.to_string())?;
    Ok(KeyReply::Sparse {
        sum,
        theta: (resync > 0).then_some(theta),
    })
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

#[allow(clippy::too_many_arguments)]
fn uplink(
    handler: Arc<LocalHandler>,
    key: usize,
    clients: Vec<KvClient>,
    ranges: Vec<(usize, Range)>,
    count: u32,
    jobs: Receiver<UpJob>,
    job: JobSpec,
    mut compressors: Vec<RangeCompressor>,
    mut milestone: Option<Vec<f32>>,
) {
    let key_len = handler.key_lens[key];
    let mut base = (job.sync == SyncAlgorithm::Mixed).then(|| vec![0u64; ranges.len()]);
    for mut up in jobs {
        if let (Some((_, k2)), Some(m)) = (job.hfa_periods(), milestone.as_mut()) {
            let local = up.round + 1;
            let res = hfa_round(
                &handler,
                &clients,
                &ranges,
                key_len,
                local,
                k2,
                count,
                &mut up.sum,
                m,
                &job,
            );
            match res {
                Ok((codec, bytes)) => handler.publish(key, local, codec, bytes, up.replies),
                Err(e) => {
                    handler.abort(format!(
                        "dc {}: key {key} averaging {local}: {e}",
                        handler.dc
                    ));
                    return;
                }
            }
            continue;
        }
        let sum = if compressors.is_empty() {
            UpSum::Dense(&up.sum)
        } else {
            UpSum::Sparse(&up.sum, &mut compressors)
        };
        let res = exchange(
            &handler,
            &clients,
            &ranges,
            key_len,
            up.round,
            count,
            sum,
            &job,
            base.as_deref_mut(),
        )
        .map(|reply| handler.down_reply(reply));
        match res {
            Ok((codec, bytes)) => handler.publish(key, up.round + 1, codec, bytes, up.replies),
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

/// HFA at a local server for averaging number `local` (1-based) of one key: `sum` holds Σ_i w_i
/// (rank order). Forms w̄_d = sum / n_d; every `k2`-th averaging also sends f_d·(w̄_d − m) to the
/// global tier and adopts the milestone it answers. Returns the reply to the workers (w̄_d or m).
#[allow(clippy::too_many_arguments)]
fn hfa_round(
    handler: &LocalHandler,
    clients: &[KvClient],
    ranges: &[(usize, Range)],
    key_len: usize,
    local: u64,
    k2: u64,
    count: u32,
    sum: &mut [f32],
    m: &mut Vec<f32>,
    job: &JobSpec,
) -> Result<(PayloadCodec, Vec<u8>), String> {
    let n_d = count as f32;
    for a in sum.iter_mut() {
        *a /= n_d;
    }
    if local % k2 != 0 {
        return Ok(handler.intra.encode_dense(sum));
    }
    let f = super::hfa::delta_factor(
        job.hfa.weighting,
        count as usize,
        job.plan.total_workers(),
        job.plan.num_dcs(),
    );
    for (a, &mi) in sum.iter_mut().zip(m.iter()) {
        *a = f * (*a - mi);
    }
    let global = local / k2 - 1;
    match exchange(
        handler,
        clients,
        ranges,
        key_len,
        global,
        count,
        UpSum::Dense(sum),
        job,
        None,
    )? {
        KeyReply::Dense(new_m) => *m = new_m,
        KeyReply::Sparse { .. } => return Err("sparse reply to an HFA delta".into()),
    }
    Ok(handler.intra.encode_dense(m))
}

impl LocalHandler {
    /// The reply to the workers for what the global tier answered: θ in the intra codec, or for
    /// Bi-Sparse keys the mean ḡ = G / W as an [`Update`] (with θ on resynchronisation rounds).
    fn down_reply(&self, reply: KeyReply) -> (PayloadCodec, Vec<u8>) {
        match reply {
            KeyReply::Dense(theta) => self.intra.encode_dense(&theta),
            KeyReply::Sparse { mut sum, theta } => {
                sum.div_values(self.total_workers as f32);
                let bytes = Update::encode(
                    &sum,
                    self.intra.sparse_values(),
                    self.intra.scaling(),
                    theta.as_deref(),
                );
                (PayloadCodec::Raw, bytes)
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
        rounds: job.local_rounds(),
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
        total_workers: plan.total_workers() as u32,
        intra: job.intra.clone(),
        inter: job.inter.clone(),
        codec_bytes: Mutex::new(CodecBytes::new()),
        fallbacks: Default::default(),
        dgt_links: OnceLock::new(),
        dgt_up: Mutex::new(job.inter.dgt().map(DgtUplink::new)),
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
            let link = super::dgt::connect(addr, node.id(), d).map_err(|e| {
                RunError::Protocol(format!(
                    "dc {dc}: dgt link to global server {s} at {addr}: {e}"
                ))
            })?;
            tracing::info!(%addr, block_bytes = link.block_bytes(), "dgt link up");
            links.push(link);
        }
        let _ = handler.dgt_links.set(links);
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
    let mut milestones = Vec::with_capacity(n_keys);
    for (k, ranges) in key_ranges.iter().enumerate() {
        let theta = match exchange(
            &handler,
            &clients,
            ranges,
            plan.key_lens[k],
            0,
            0,
            UpSum::Pull,
            job,
            None,
        ) {
            Ok(KeyReply::Dense(t)) => t,
            Ok(KeyReply::Sparse { .. }) => {
                return Err(RunError::Protocol(format!(
                    "dc {dc}: sparse θ_0 of key {k}"
                )))
            }
            Err(e) => {
                return Err(RunError::Protocol(format!(
                    "dc {dc} pulling θ_0 of key {k}: {e}"
                )))
            }
        };
        // θ_0 travels exact (f32): Bi-Sparse replicas must start identical.
        let bytes = super::msg::f32_bytes(&theta).into_owned();
        handler.publish(k, 0, PayloadCodec::DenseF32, bytes, Vec::new());
        // HFA: the milestone starts at the global θ_0.
        milestones.push(job.hfa_periods().map(|_| theta));
    }
    let mut senders = Vec::with_capacity(n_keys);
    for ((k, ranges), milestone) in key_ranges.into_iter().enumerate().zip(milestones) {
        let (tx, rx) = crossbeam_channel::unbounded();
        senders.push(tx);
        let (h, c, j) = (handler.clone(), clients.clone(), job.clone());
        let compressors = match job.inter.sparse() {
            Some(spec) if job.inter.is_sparse_key(plan.key_lens[k]) => ranges
                .iter()
                .map(|(id, r)| {
                    RangeCompressor::new(spec, job.inter.scaling(), job.seed, dc, *id, r.len)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RunError::Protocol(format!("dc {dc} key {k}: {e}")))?,
            _ => Vec::new(),
        };
        std::thread::Builder::new()
            .name(format!("geomx-uplink-{k}"))
            .spawn(move || uplink(h, k, c, ranges, n_d as u32, rx, j, compressors, milestone))
            .map_err(|e| RunError::Io("starting an uplink thread".into(), e.to_string()))?;
    }
    let _ = handler.uplinks.set(senders);
    node.barrier("all")?;
    if job.local_rounds() > 0 && n_keys > 0 {
        // Bounded by the job: a lost peer aborts the job, which ends this process.
        let _ = done_rx.recv();
    }
    node.finish(job.wait_limit())?;
    let lan = server.stats();
    let mut wan: u64 = clients.iter().map(|c| super::total_bytes(c.stats())).sum();
    server.shutdown();
    let mut stats = RoleStats::new(&node.me, lan);
    if let Some(links) = handler.dgt_links.get() {
        let cs: Vec<_> = links.iter().map(DgtClient::stats).collect();
        wan += cs
            .iter()
            .map(|c| c.sent.bytes.iter().sum::<u64>())
            .sum::<u64>();
        let d = DgtRoleStats::from_clients(&cs);
        tracing::info!(
            lost = d.lost_blocks,
            late = d.late_blocks,
            datagrams = d.datagrams,
            "dgt sender"
        );
        stats.dgt = Some(d);
    }
    stats.client_bytes = wan;
    stats.codec_bytes = lock(&handler.codec_bytes).clone();
    stats.topk_fallbacks = handler.fallbacks.load(std::sync::atomic::Ordering::Relaxed);
    Ok(stats)
}
