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
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use geomx_net::sched::tsengine::NodeId;
use geomx_net::{KvClient, PayloadCodec, Request, Responder};

use super::{LocalHandler, UpJob};
use crate::hips::lock;
use crate::hips::ts_msg::{self as msg, Op, PullStart, PullStep, PushStep, Sent, ROOT};

/// Transfers held per key at most (a partial and θ of two rounds).
const MAX_HELD_PER_KEY: usize = 4;

/// What other local servers sent this one, until its TSEngine thread takes it.
#[derive(Default)]
struct Inbox {
    /// (key, round, θ rather than a partial) → (sender DC, payload).
    held: Mutex<BTreeMap<Slot, (NodeId, Vec<u8>)>>,
    arrived: Condvar,
    /// Keys of the job (bounds what may be held).
    keys: usize,
}

/// Where a transfer goes: (key, round, θ rather than a partial).
type Slot = (usize, u64, bool);

impl Inbox {
    fn new(keys: usize) -> Self {
        Self {
            keys,
            ..Self::default()
        }
    }

    fn put(&self, at: Slot, from: NodeId, payload: Vec<u8>) -> Result<(), String> {
        let mut held = lock(&self.held);
        let (key, round, _) = at;
        if held.len() >= MAX_HELD_PER_KEY * self.keys.max(1) {
            return Err(format!(
                "{} TSEngine transfers are waiting already",
                held.len()
            ));
        }
        if held.contains_key(&at) {
            return Err(format!(
                "a second TSEngine transfer for key {key}, round {round}"
            ));
        }
        held.insert(at, (from, payload));
        self.arrived.notify_all();
        Ok(())
    }

    fn take(&self, at: Slot, from: NodeId, limit: Duration) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + limit;
        let (_, round, _) = at;
        let mut held = lock(&self.held);
        loop {
            if let Some((f, p)) = held.remove(&at) {
                if f != from {
                    return Err(format!(
                        "round {round}: a transfer from dc {f}, expected dc {from}"
                    ));
                }
                return Ok(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "round {round}: nothing from dc {from} within {limit:?}"
                ));
            }
            held = self
                .arrived
                .wait_timeout(held, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// A local server's TSEngine state shared by its request handler and its thread.
pub(super) struct TsLocal {
    inbox: Inbox,
    /// Node id → DC of the other local servers, once the membership is known.
    peers: OnceLock<HashMap<u32, NodeId>>,
    /// Values of every key.
    key_lens: Vec<usize>,
}

impl TsLocal {
    /// The state of a local server with keys of `key_lens` values.
    pub(super) fn new(key_lens: Vec<usize>) -> Self {
        Self {
            inbox: Inbox::new(key_lens.len()),
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
        // The key travels in the request's offset.
        let key = req.offset as usize;
        let Some(&len) = ts.key_lens.get(key) else {
            let msg = format!("TSEngine {op:?} for unknown key {}", req.offset);
            return self.admission.refuse(reply, msg);
        };
        let (theta, want) = match op {
            Op::Partial => (false, 8 + len * 4),
            Op::Theta => (true, len * 4),
            _ => {
                let msg = format!("a local server does not answer TSEngine {op:?}");
                return self.admission.refuse(reply, msg);
            }
        };
        if req.payload.len() != want {
            let msg = format!(
                "TSEngine {op:?} of {} bytes, expected {want}",
                req.payload.len()
            );
            return self.admission.refuse(reply, msg);
        }
        // Only a well-formed request may claim the sender's id for this connection (admit.rs).
        if let Err(msg) = self.admission.bind(req.sender, &reply) {
            return self.admission.refuse(reply, msg);
        }
        if let Err(msg) = ts.inbox.put((key, req.version, theta), from, req.payload) {
            return self.admission.refuse(reply, msg);
        }
        let _ = reply.send(req.version, PayloadCodec::Raw, &[]);
    }
}

/// The TSEngine thread of one key of a local server.
pub(super) struct TsUplink {
    /// The key.
    pub key: usize,
    /// The local server.
    pub handler: Arc<LocalHandler>,
    /// The global server (root and coordinator).
    pub global: KvClient,
    /// The other local servers by DC.
    pub peers: BTreeMap<NodeId, KvClient>,
    /// How long one answer may take.
    pub limit: Duration,
}

impl TsUplink {
    /// Runs the key's rounds as its sums arrive; a failure ends the job.
    pub(super) fn run(self, jobs: Receiver<UpJob>) {
        let h = self.handler.clone();
        for up in jobs {
            let round = up.round;
            if let Err(e) = self.round(up) {
                let key = self.key;
                h.abort(format!(
                    "dc {}: TSEngine key {key}, round {round}: {e}",
                    h.dc
                ));
                return;
            }
        }
    }

    fn ts(&self) -> Result<&TsLocal, String> {
        self.handler
            .ts
            .as_ref()
            .ok_or_else(|| "TSEngine is off".into())
    }

    /// One round: push the sum through the tree, take θ, publish it, forward it.
    fn round(&self, up: UpJob) -> Result<(), String> {
        let h = &self.handler;
        let round = up.round;
        let sum = up.sum.ok_or("a dropped round")?;
        let t0 = Instant::now();
        let pushed = self.push(round, sum, up.count)?;
        let t1 = Instant::now();
        let (theta, from) = self.pull(round, pushed)?;
        let t2 = Instant::now();
        h.checkpoint(round + 1, self.key, &[]);
        // θ goes to the workers and on to other local servers from one buffer.
        let theta = Arc::new(theta);
        h.publish(
            self.key,
            round + 1,
            PayloadCodec::DenseF32,
            theta.clone(),
            up.replies,
            None,
        );
        self.forward(round, &theta)?;
        tracing::debug!(
            key = self.key,
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

    /// Sends `payload` as TSEngine `op` of `round` and waits for the answer.
    fn ask(&self, to: &KvClient, op: Op, round: u64, payload: &[u8]) -> Result<Vec<u8>, String> {
        to.push(
            op.key(),
            round,
            PayloadCodec::Raw,
            self.key as u64,
            0,
            payload,
        )
        .and_then(|p| p.wait(self.limit))
        .map(|r| r.payload)
        .map_err(|e| format!("TSEngine {op:?}: {e}"))
    }

    fn peer(&self, dc: NodeId) -> Result<&KvClient, String> {
        self.peers
            .get(&dc)
            .ok_or_else(|| format!("no local server of dc {dc}"))
    }

    /// The push tree: merges what comes in until told where to send; returns the send.
    fn push(&self, round: u64, mut sum: Vec<f32>, workers: u32) -> Result<Sent, String> {
        let ts = self.ts()?;
        let (mut dcs, mut workers, mut merged) = (1u32, workers, false);
        loop {
            let step = self.ask(&self.global, Op::Ready, round, &msg::encode_ready(merged))?;
            match PushStep::decode(&step)? {
                PushStep::SendTo(to) => {
                    let payload = msg::encode_partial(dcs, workers, &sum);
                    let dest = if to == ROOT {
                        &self.global
                    } else {
                        self.peer(to)?
                    };
                    let t0 = Instant::now();
                    self.ask(dest, Op::Partial, round, &payload)?;
                    return Ok(Sent {
                        to,
                        bytes: payload.len() as u64,
                        elapsed: t0.elapsed(),
                    });
                }
                PushStep::ReceiveFrom { from, dcs: n } => {
                    let p = ts.inbox.take((self.key, round, false), from, self.limit)?;
                    let p = msg::decode_partial(&p, sum.len())?;
                    if p.dcs != n {
                        return Err(format!("dc {from} sent {} DCs, the root said {n}", p.dcs));
                    }
                    for (a, x) in sum.iter_mut().zip(&p.sum) {
                        *a += *x;
                    }
                    dcs += p.dcs;
                    workers += p.workers;
                    merged = true;
                }
            }
        }
    }

    /// Waits for the round's θ (f32 bytes of the key), reporting the push's measurement;
    /// returns it with its sender (a DC, or [`ROOT`]).
    fn pull(&self, round: u64, pushed: Sent) -> Result<(Vec<u8>, NodeId), String> {
        let ts = self.ts()?;
        let a = self.ask(
            &self.global,
            Op::Await,
            round,
            &msg::encode_report(Some(pushed)),
        )?;
        let len = ts.key_lens.get(self.key).copied().unwrap_or(0);
        match PullStart::decode(&a, len)? {
            PullStart::Theta(theta) => Ok((theta, ROOT)),
            PullStart::From(holder) => ts
                .inbox
                .take((self.key, round, true), holder, self.limit)
                .map(|t| (t, holder)),
        }
    }

    /// Forwards θ to the local servers the coordinator names, until it says stop.
    fn forward(&self, round: u64, theta: &[u8]) -> Result<(), String> {
        let mut last = None;
        loop {
            let a = self.ask(&self.global, Op::Next, round, &msg::encode_report(last))?;
            match PullStep::decode(&a)? {
                PullStep::Stop => return Ok(()),
                PullStep::SendTo(to) => {
                    let t0 = Instant::now();
                    self.ask(self.peer(to)?, Op::Theta, round, theta)?;
                    last = Some(Sent {
                        to,
                        bytes: theta.len() as u64,
                        elapsed: t0.elapsed(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbox_holds_one_transfer_per_slot_and_names_its_sender() {
        let inbox = Inbox::new(2);
        inbox.put((0, 3, false), 1, vec![1]).unwrap();
        assert!(
            inbox.put((0, 3, false), 2, vec![2]).is_err(),
            "a second partial"
        );
        inbox.put((0, 3, true), 2, vec![3]).unwrap();
        inbox.put((1, 3, false), 2, vec![4]).unwrap();
        let short = Duration::from_millis(20);
        assert!(
            inbox.take((0, 3, true), 1, short).is_err(),
            "θ came from dc 2"
        );
        assert_eq!(inbox.take((0, 3, false), 1, short).unwrap(), vec![1]);
        assert_eq!(inbox.take((1, 3, false), 2, short).unwrap(), vec![4]);
        assert!(
            inbox.take((0, 4, false), 1, short).is_err(),
            "nothing for round 4"
        );
        for r in 0..(2 * MAX_HELD_PER_KEY) as u64 {
            inbox.put((0, 10 + r, false), 0, Vec::new()).unwrap();
        }
        assert!(inbox.put((1, 20, false), 0, Vec::new()).is_err(), "bounded");
    }

    #[test]
    fn a_transfer_arriving_later_wakes_the_taker() {
        let inbox = Arc::new(Inbox::new(1));
        let i = inbox.clone();
        let t = std::thread::spawn(move || i.take((0, 0, true), 4, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        inbox.put((0, 0, true), 4, vec![9, 9]).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), vec![9, 9]);
    }
}
