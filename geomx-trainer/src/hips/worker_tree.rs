//! A worker's side of TSEngine on the intra tier (`[scheduling.tsengine] intra`,
//! scheduling.md, "TSEngine"): its gradients reach its local server through the push tree and
//! θ comes back through the pull tree, both rooted at the local server
//! (`local_server/ts_intra.rs`) and chosen per round from measured transfers.
//!
//! The worker serves its DC's other workers (partials to merge, θ to take) on a server of its
//! own, bound on its host at a port the system picks and registered with the coordinator. Each
//! key is a bundle with a thread of its own ([`TsNode`]): a round's gradient goes in, the
//! round's θ comes out as the reply a direct push would have had, and the thread then forwards θ
//! to the workers the local server names before it takes the key's next round.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use geomx_net::coord::NodeInfo;
use geomx_net::sched::tsengine::NodeId;
use geomx_net::{
    Handler, KvClient, KvServer, MsgKind, NetError, PayloadCodec, Request, Responder, Response,
};

use super::admit::Admission;
use super::node::Node;
use super::plan::roles;
use super::ts_msg::{Op, Tier};
use super::ts_node::{receive, Inbox, TsNode};
use super::{JobSpec, RunError};
use crate::codec::decode_values;

/// What a worker's server takes from the other workers of its DC.
pub(super) struct PeerInbox {
    dc: u32,
    rank: u32,
    inbox: Arc<Inbox>,
    key_lens: Vec<usize>,
    /// Node id → rank of the DC's other workers, once the membership is known.
    peers: OnceLock<HashMap<u32, NodeId>>,
    admission: Admission,
}

impl PeerInbox {
    /// The inbox of worker (`dc`, `rank`) of `job`.
    pub(super) fn new(job: &JobSpec, dc: u32, rank: u32) -> Self {
        Self::with_keys(dc, rank, job.plan.key_lens.clone())
    }

    fn with_keys(dc: u32, rank: u32, key_lens: Vec<usize>) -> Self {
        Self {
            dc,
            rank,
            inbox: Arc::new(Inbox::new(key_lens.len())),
            key_lens,
            peers: OnceLock::new(),
            admission: Admission::default(),
        }
    }

    /// Admits the DC's other workers among `nodes` (the membership), whose certificates must
    /// say so, and serves what they sent before; returns their node id → rank.
    fn admit(&self, nodes: &[NodeInfo]) -> HashMap<u32, NodeId> {
        let is_peer =
            |n: &NodeInfo| n.role == roles::WORKER && n.dc == self.dc && n.rank != self.rank;
        self.admission.set_members(nodes, is_peer);
        let ids: HashMap<u32, NodeId> = nodes
            .iter()
            .filter(|n| is_peer(n))
            .map(|n| (n.id, n.rank))
            .collect();
        let early = self.admission.open(|| {
            let _ = self.peers.set(ids.clone());
        });
        for (req, reply) in early {
            self.on_request(req, reply);
        }
        ids
    }

    /// Requests refused so far.
    pub(super) fn refused(&self) -> u64 {
        self.admission.refused()
    }
}

impl Handler for PeerInbox {
    fn on_request(&self, req: Request, reply: Responder) {
        let known = || self.peers.get().is_some();
        let Some((req, reply)) = self.admission.hold_early(known, req, reply) else {
            return;
        };
        let op = match (req.kind, Op::of_key(req.key)) {
            (MsgKind::Push, Some((Tier::Intra, op))) => op,
            _ => {
                let msg = format!(
                    "worker (dc {}, rank {}) takes only TSEngine transfers of its DC's workers",
                    self.dc, self.rank
                );
                return self.admission.refuse(reply, msg);
            }
        };
        let Some(&from) = self.peers.get().and_then(|p| p.get(&req.sender)) else {
            let msg = format!(
                "TSEngine {op:?} from node {}, no other worker of dc {}",
                req.sender, self.dc
            );
            return self.admission.refuse(reply, msg);
        };
        receive(
            &self.inbox,
            &self.key_lens,
            from,
            op,
            req,
            reply,
            &self.admission,
        );
    }
}

/// One round of a key for its thread: the gradient as pushed (codec, bytes), and where θ goes.
struct TreeJob {
    round: u64,
    codec: PayloadCodec,
    grad: Vec<u8>,
    answer: Sender<Result<Response, NetError>>,
}

/// A worker's trees: one thread per key, and the server its peers send to.
pub(super) struct WorkerTree {
    jobs: Vec<Sender<TreeJob>>,
    threads: Vec<JoinHandle<Result<(), String>>>,
    inbox: Arc<PeerInbox>,
    server: KvServer,
}

impl WorkerTree {
    /// Starts the trees of the worker `node` (registered with `inbox` served by `server`),
    /// whose local server is `root`: learns its peers, connects to them and starts one thread
    /// per key.
    pub(super) fn start(
        node: &Node,
        job: &JobSpec,
        inbox: Arc<PeerInbox>,
        server: KvServer,
        root: &KvClient,
    ) -> Result<Self, RunError> {
        let (dc, rank) = (node.me.dc, node.me.rank);
        let ids = inbox.admit(&node.membership.nodes);
        let mut peers = BTreeMap::new();
        for &r in ids.values() {
            let addr = node.addr_of(roles::WORKER, dc, r)?;
            let c = KvClient::connect(addr.as_str(), node.id(), node.net(job)?).map_err(|e| {
                RunError::Net(
                    format!("connecting to worker (dc {dc}, rank {r}) at {addr}"),
                    e,
                )
            })?;
            peers.insert(r, c);
        }
        let (mut jobs, mut threads) = (Vec::new(), Vec::new());
        for (key, &len) in job.plan.key_lens.iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let ts = TsNode {
                key,
                len,
                tier: Tier::Intra,
                root: root.clone(),
                peers: peers.clone(),
                inbox: inbox.inbox.clone(),
                limit: job.wait_limit(),
            };
            let t = std::thread::Builder::new()
                .name(format!("geomx-tree-{dc}.{rank}-{key}"))
                .spawn(move || run_key(&ts, rx))
                .map_err(|e| RunError::Io("starting a TSEngine thread".into(), e.to_string()))?;
            jobs.push(tx);
            threads.push(t);
        }
        Ok(Self {
            jobs,
            threads,
            inbox,
            server,
        })
    }

    /// Hands `key`'s gradient of `round` (encoded as for a push) to its tree, which decodes it
    /// off the training thread; the answer is θ of round + 1 as a dense f32 reply.
    pub(super) fn push(
        &self,
        key: usize,
        round: u64,
        codec: PayloadCodec,
        grad: Vec<u8>,
    ) -> Result<Receiver<Result<Response, NetError>>, RunError> {
        let (answer, rx) = crossbeam_channel::bounded(1);
        let tx = self
            .jobs
            .get(key)
            .ok_or_else(|| RunError::Protocol(format!("no TSEngine tree for key {key}")))?;
        tx.send(TreeJob {
            round,
            codec,
            grad,
            answer,
        })
        .map_err(|_| RunError::Protocol(format!("the TSEngine thread of key {key} has stopped")))?;
        Ok(rx)
    }

    /// Waits until every key's thread has forwarded its last θ; returns the first failure, or
    /// the traffic of the worker's server and the requests it refused.
    pub(super) fn finish(self) -> Result<(geomx_net::Counters, u64), RunError> {
        drop(self.jobs);
        let mut first = None;
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err("a TSEngine thread panicked".into()));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(RunError::Protocol(e)),
            None => Ok((self.server.stats(), self.inbox.refused())),
        }
    }
}

/// A key's rounds: push the gradient, take θ and answer it, then forward θ.
fn run_key(node: &TsNode, jobs: Receiver<TreeJob>) -> Result<(), String> {
    for j in jobs {
        let key = node.key;
        let got = decode_values(j.codec, &j.grad, key, node.len)
            .and_then(|grad| node.push(j.round, grad, 1))
            .and_then(|sent| node.pull(j.round, sent));
        let theta = match got {
            Ok((theta, _)) => theta,
            Err(e) => {
                let e = format!("TSEngine key {key}, round {}: {e}", j.round);
                let _ = j.answer.send(Err(NetError::Protocol(e.clone())));
                return Err(e);
            }
        };
        let reply = Response {
            sender: 0,
            key: key as u64,
            version: j.round + 1,
            offset: 0,
            total: node.len as u64,
            codec: PayloadCodec::DenseF32,
            payload: theta.clone(),
        };
        let _ = j.answer.send(Ok(reply));
        node.forward(j.round, &theta)
            .map_err(|e| format!("TSEngine key {key}, round {}: forwarding θ: {e}", j.round))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use geomx_net::NetOptions;

    use super::*;
    use crate::hips::ts_msg::encode_partial;

    fn node(id: u32, role: &str, dc: u32, rank: u32) -> NodeInfo {
        NodeInfo {
            id,
            role: role.into(),
            dc,
            rank,
            addr: String::new(),
        }
    }

    fn connect(addr: SocketAddr, id: u32) -> KvClient {
        KvClient::connect(addr, id, NetOptions::default()).unwrap()
    }

    /// Pushes `payload` under `key` for model key `offset` in round 3; whether it was answered
    /// without an error.
    fn send(c: &KvClient, key: u64, offset: u64, payload: &[u8]) -> bool {
        c.push(key, 3, PayloadCodec::Raw, offset, 0, payload)
            .and_then(|p| p.wait(Duration::from_secs(10)))
            .is_ok()
    }

    fn serve(inbox: &Arc<PeerInbox>) -> KvServer {
        KvServer::bind_with_id("127.0.0.1:0", 5, inbox.clone(), NetOptions::default()).unwrap()
    }

    #[test]
    fn a_worker_takes_transfers_from_its_dc_s_workers_only() {
        let inbox = Arc::new(PeerInbox::with_keys(0, 0, vec![2, 3]));
        let server = serve(&inbox);
        let addr = server.local_addr();
        let ids = inbox.admit(&[
            node(5, roles::WORKER, 0, 0),
            node(6, roles::WORKER, 0, 1),
            node(7, roles::WORKER, 1, 1),
            node(8, roles::LOCAL_SERVER, 0, 0),
        ]);
        assert_eq!(ids, HashMap::from([(6, 1)]), "its DC's other worker only");
        let partial = encode_partial(1, 1, &[1.0, 2.0]);
        let (p_key, t_key) = (Op::Partial.key(Tier::Intra), Op::Theta.key(Tier::Intra));
        // Refused: a worker of another DC, the local server, a stranger.
        for id in [7, 8, 99] {
            assert!(!send(&connect(addr, id), p_key, 0, &partial), "node {id}");
        }
        // Refused from the DC's worker: the inter tier's keys, a request no participant
        // answers, a payload of the wrong size, an unknown key, a plain push.
        let peer = connect(addr, 6);
        assert!(!send(&peer, Op::Partial.key(Tier::Inter), 0, &partial));
        assert!(!send(&peer, Op::Ready.key(Tier::Intra), 0, &[0]));
        assert!(!send(&peer, t_key, 0, &[0; 12]));
        assert!(!send(&peer, t_key, 9, &[0; 8]));
        assert!(!send(&peer, 0, 0, &[0; 8]));
        assert_eq!(inbox.refused(), 8);
        // Taken: its partial and θ, for the keys' threads; a second partial of the slot is not.
        assert!(send(&peer, p_key, 0, &partial));
        assert!(send(&peer, t_key, 1, &[0; 12]));
        assert!(!send(&peer, p_key, 0, &partial));
        assert_eq!(inbox.refused(), 9);
        let short = Duration::from_secs(5);
        assert_eq!(inbox.inbox.take((0, 3, false), 1, short).unwrap(), partial);
        assert_eq!(
            inbox.inbox.take((1, 3, true), 1, short).unwrap(),
            vec![0; 12]
        );
        // Another connection may not speak for the worker its first one holds.
        assert!(!send(&connect(addr, 6), p_key, 0, &partial));
    }

    #[test]
    fn a_transfer_sent_before_the_membership_is_known_is_served_once_it_is() {
        let inbox = Arc::new(PeerInbox::with_keys(0, 0, vec![2]));
        let server = serve(&inbox);
        let addr = server.local_addr();
        let partial = encode_partial(1, 1, &[3.0, 4.0]);
        let p = partial.clone();
        let t = std::thread::spawn(move || {
            send(&connect(addr, 6), Op::Partial.key(Tier::Intra), 0, &p)
        });
        std::thread::sleep(Duration::from_millis(100));
        inbox.admit(&[node(5, roles::WORKER, 0, 0), node(6, roles::WORKER, 0, 1)]);
        assert!(t.join().unwrap(), "acknowledged once admitted");
        let got = inbox.inbox.take((0, 3, false), 1, Duration::from_secs(5));
        assert_eq!(got.unwrap(), partial);
    }
}
