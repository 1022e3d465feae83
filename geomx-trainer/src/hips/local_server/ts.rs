//! A local server's side of TSEngine on the inter tier (`[scheduling.tsengine] inter`,
//! scheduling.md, "TSEngine"; messages in [`crate::hips::ts_msg`], the coordinator in
//! [`crate::hips::ts_root`]).
//!
//! Each key is a bundle of its own (one thread per key, as without TSEngine), so that the pull
//! tree of one key runs while the push tree of the next is still under way. A key's thread takes
//! the DC's sum of a round and asks the global server where it goes: to the global server, to
//! another local server, or nowhere yet because another local server's partial comes here first
//! (merged, then asked again). Once its partial is sent, it waits for the round's θ — from the
//! global server or from a local server that holds it —, hands it to the workers, and then
//! forwards it to the local servers the global server names until it says stop.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crossbeam_channel::Receiver;
use geomx_net::sched::tsengine::NodeId;
use geomx_net::{PayloadCodec, Request, Responder};

use super::{LocalHandler, UpJob};
use crate::hips::ts_msg::{Op, Tier};
use crate::hips::ts_node::{receive, Inbox, TsNode};

/// A local server's TSEngine state shared by its request handler and its thread.
pub(super) struct TsLocal {
    inbox: Arc<Inbox>,
    /// Node id → DC of the other local servers, once the membership is known.
    peers: OnceLock<HashMap<u32, NodeId>>,
    /// Values of every key.
    key_lens: Vec<usize>,
}

impl TsLocal {
    /// The state of a local server with keys of `key_lens` values.
    pub(super) fn new(key_lens: Vec<usize>) -> Self {
        Self {
            inbox: Arc::new(Inbox::new(key_lens.len())),
            peers: OnceLock::new(),
            key_lens,
        }
    }

    /// Sets the other local servers: node id → DC.
    pub(super) fn set_peers(&self, peers: HashMap<u32, NodeId>) {
        let _ = self.peers.set(peers);
    }
}

impl LocalHandler {
    /// A TSEngine request of another local server: a partial to merge or θ to take. Held for
    /// the thread and acknowledged at once, so the sender's measurement is the transfer's.
    pub(super) fn on_ts(&self, op: Op, req: Request, reply: Responder) {
        let Some(ts) = &self.ts else {
            return self
                .admission
                .refuse(reply, format!("dc {}: TSEngine is off", self.dc));
        };
        let Some(&from) = ts.peers.get().and_then(|p| p.get(&req.sender)) else {
            let msg = format!("TSEngine {op:?} from node {}, no local server", req.sender);
            return self.admission.refuse(reply, msg);
        };
        receive(
            &ts.inbox,
            &ts.key_lens,
            from,
            op,
            req,
            reply,
            &self.admission,
        );
    }
}

/// The TSEngine thread of one key of a local server.
pub(super) struct TsUplink {
    /// The key's participant in the inter tier's trees (the global server is the root).
    pub node: TsNode,
    /// The local server.
    pub handler: Arc<LocalHandler>,
}

impl TsUplink {
    /// The thread of `key`: the global server is the root, `peers` the other local servers by
    /// DC.
    pub(super) fn new(
        key: usize,
        handler: Arc<LocalHandler>,
        global: geomx_net::KvClient,
        peers: BTreeMap<NodeId, geomx_net::KvClient>,
        limit: std::time::Duration,
    ) -> Result<Self, String> {
        let ts = handler.ts.as_ref().ok_or("TSEngine is off")?;
        let node = TsNode {
            key,
            len: ts.key_lens.get(key).copied().unwrap_or(0),
            tier: Tier::Inter,
            root: global,
            peers,
            inbox: ts.inbox.clone(),
            limit,
        };
        Ok(Self { node, handler })
    }

    /// Runs the key's rounds as its sums arrive; a failure ends the job.
    pub(super) fn run(self, jobs: Receiver<UpJob>) {
        let h = self.handler.clone();
        for up in jobs {
            let round = up.round;
            if let Err(e) = self.round(up) {
                let key = self.node.key;
                h.abort(format!(
                    "dc {}: TSEngine key {key}, round {round}: {e}",
                    h.dc
                ));
                return;
            }
        }
    }

    /// One round: push the sum through the tree, take θ, publish it, forward it.
    fn round(&self, up: UpJob) -> Result<(), String> {
        let (h, key) = (&self.handler, self.node.key);
        let round = up.round;
        let sum = up.sum.ok_or("a dropped round")?;
        let t0 = Instant::now();
        let pushed = self.node.push(round, sum, up.count)?;
        let t1 = Instant::now();
        let (theta, from) = self.node.pull(round, pushed)?;
        let t2 = Instant::now();
        h.checkpoint(round + 1, key, &[]);
        // θ goes to the workers and on to other local servers from one buffer.
        let theta = Arc::new(theta);
        h.publish(
            key,
            round + 1,
            PayloadCodec::DenseF32,
            theta.clone(),
            up.replies,
            None,
        );
        self.node.forward(round, &theta)?;
        tracing::debug!(
            key,
            round,
            to = pushed.to,
            from,
            push_ms = (t1 - t0).as_secs_f64() * 1e3,
            send_ms = pushed.elapsed.as_secs_f64() * 1e3,
            pull_ms = (t2 - t1).as_secs_f64() * 1e3,
            forward_ms = t2.elapsed().as_secs_f64() * 1e3,
            "TSEngine round"
        );
        Ok(())
    }
}
