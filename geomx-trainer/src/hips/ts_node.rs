//! A participant's side of a TSEngine tree (scheduling.md, "TSEngine"; messages in
//! [`super::ts_msg`], the root and coordinator in [`super::ts_root`]), on either tier: a local
//! server under the global server (inter), or a worker under its local server (intra).
//!
//! One [`TsNode`] runs one key (a bundle) on the thread its role gives it: it takes the
//! participant's own sum of a round and asks the root where it goes — to the root, to another
//! participant, or nowhere yet because another participant's partial comes here first (merged,
//! then asked again). Once its partial is sent, it waits for the round's θ — from the root or
//! from a participant that holds it —, and after the role has used it, forwards it to the
//! participants the root names until it says stop. What other participants send arrives through
//! the role's request handler into an [`Inbox`].

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use geomx_net::sched::tsengine::NodeId;
use geomx_net::{KvClient, PayloadCodec, Request, Responder};

use super::admit::Admission;
use super::lock;
use super::ts_msg::{self as msg, Op, PullStart, PullStep, PushStep, Sent, Tier, ROOT};

/// Transfers held per key at most (a partial and θ of two rounds).
const MAX_HELD_PER_KEY: usize = 4;

/// Where a transfer goes: (key, round, θ rather than a partial).
pub(crate) type Slot = (usize, u64, bool);

/// What other participants sent this one, until its key's thread takes it.
#[derive(Default)]
pub(crate) struct Inbox {
    /// (key, round, θ rather than a partial) → (sender, payload).
    held: Mutex<BTreeMap<Slot, (NodeId, Vec<u8>)>>,
    arrived: Condvar,
    /// Keys of the job (bounds what may be held).
    keys: usize,
}

impl Inbox {
    /// An inbox for a job of `keys` keys.
    pub(crate) fn new(keys: usize) -> Self {
        Self {
            keys,
            ..Self::default()
        }
    }

    /// Holds `payload` from `from` for `at`; refused beyond the bound or for a taken slot.
    pub(crate) fn put(&self, at: Slot, from: NodeId, payload: Vec<u8>) -> Result<(), String> {
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

    /// Waits up to `limit` for the transfer of `at`, which must come from `from`.
    pub(crate) fn take(&self, at: Slot, from: NodeId, limit: Duration) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + limit;
        let (_, round, _) = at;
        let mut held = lock(&self.held);
        loop {
            if let Some((f, p)) = held.remove(&at) {
                if f != from {
                    return Err(format!(
                        "round {round}: a transfer from {f}, expected {from}"
                    ));
                }
                return Ok(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "round {round}: nothing from {from} within {limit:?}"
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

/// Checks the length of a transfer another participant sent for a key of `len` values: a
/// partial (`Op::Partial`, its two counts and the values) or θ (`Op::Theta`). Returns whether it
/// is θ; any other op is refused.
fn transfer_kind(op: Op, payload: usize, len: usize) -> Result<bool, String> {
    let (theta, want) = match op {
        Op::Partial => (false, 8 + len * 4),
        Op::Theta => (true, len * 4),
        _ => return Err(format!("a participant does not answer TSEngine {op:?}")),
    };
    if payload != want {
        return Err(format!(
            "TSEngine {op:?} of {payload} bytes, expected {want}"
        ));
    }
    Ok(theta)
}

/// A transfer participant `from` sent (`req`: a partial or θ of the key in its offset): checked,
/// bound to its connection (admit.rs), held in `inbox` for the key's thread and acknowledged at
/// once, so that the sender's measurement is the transfer's. Anything else is refused.
pub(crate) fn receive(
    inbox: &Inbox,
    key_lens: &[usize],
    from: NodeId,
    op: Op,
    req: Request,
    reply: Responder,
    admission: &Admission,
) {
    // The key travels in the request's offset.
    let key = req.offset as usize;
    let Some(&len) = key_lens.get(key) else {
        let msg = format!("TSEngine {op:?} for unknown key {}", req.offset);
        return admission.refuse(reply, msg);
    };
    let theta = match transfer_kind(op, req.payload.len(), len) {
        Ok(t) => t,
        Err(msg) => return admission.refuse(reply, msg),
    };
    // Only a well-formed request may claim the sender's id for this connection.
    if let Err(msg) = admission.bind(req.sender, &reply) {
        return admission.refuse(reply, msg);
    }
    if let Err(msg) = inbox.put((key, req.version, theta), from, req.payload) {
        return admission.refuse(reply, msg);
    }
    let _ = reply.send(req.version, PayloadCodec::Raw, &[]);
}

/// One key's participant in its tier's trees.
pub(crate) struct TsNode {
    /// The key.
    pub key: usize,
    /// Values of the key.
    pub len: usize,
    /// The tier's messages.
    pub tier: Tier,
    /// The root (and coordinator).
    pub root: KvClient,
    /// The other participants by id.
    pub peers: BTreeMap<NodeId, KvClient>,
    /// What the other participants send here.
    pub inbox: Arc<Inbox>,
    /// How long one answer may take.
    pub limit: Duration,
}

impl TsNode {
    /// Sends `payload` as TSEngine `op` of `round` and waits for the answer.
    fn ask(&self, to: &KvClient, op: Op, round: u64, payload: &[u8]) -> Result<Vec<u8>, String> {
        to.push(
            op.key(self.tier),
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

    fn peer(&self, id: NodeId) -> Result<&KvClient, String> {
        self.peers
            .get(&id)
            .ok_or_else(|| format!("no TSEngine participant {id}"))
    }

    /// The push tree: merges what comes in until told where to send the sum (of `workers`
    /// workers); returns the send.
    pub fn push(&self, round: u64, mut sum: Vec<f32>, workers: u32) -> Result<Sent, String> {
        let (mut parts, mut workers, mut merged) = (1u32, workers, false);
        loop {
            let step = self.ask(&self.root, Op::Ready, round, &msg::encode_ready(merged))?;
            match PushStep::decode(&step)? {
                PushStep::SendTo(to) => {
                    let payload = msg::encode_partial(parts, workers, &sum);
                    let dest = if to == ROOT {
                        &self.root
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
                    let p = self
                        .inbox
                        .take((self.key, round, false), from, self.limit)?;
                    let p = msg::decode_partial(&p, sum.len())?;
                    if p.dcs != n {
                        return Err(format!(
                            "{from} sent a partial of {} participants, the root said {n}",
                            p.dcs
                        ));
                    }
                    for (a, x) in sum.iter_mut().zip(&p.sum) {
                        *a += *x;
                    }
                    parts += p.dcs;
                    workers += p.workers;
                    merged = true;
                }
            }
        }
    }

    /// Waits for the round's θ (f32 bytes of the key), reporting the push's measurement;
    /// returns it with its sender (a participant, or [`ROOT`]).
    pub fn pull(&self, round: u64, pushed: Sent) -> Result<(Vec<u8>, NodeId), String> {
        let a = self.ask(
            &self.root,
            Op::Await,
            round,
            &msg::encode_report(Some(pushed)),
        )?;
        match PullStart::decode(&a, self.len)? {
            PullStart::Theta(theta) => Ok((theta, ROOT)),
            PullStart::From(holder) => self
                .inbox
                .take((self.key, round, true), holder, self.limit)
                .map(|t| (t, holder)),
        }
    }

    /// Forwards θ to the participants the root names, until it says stop.
    pub fn forward(&self, round: u64, theta: &[u8]) -> Result<(), String> {
        let mut last = None;
        loop {
            let a = self.ask(&self.root, Op::Next, round, &msg::encode_report(last))?;
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
        assert!(inbox.take((0, 3, true), 1, short).is_err(), "θ came from 2");
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

    #[test]
    fn transfers_are_partials_or_theta_of_the_key_s_length() {
        assert_eq!(transfer_kind(Op::Partial, 8 + 12, 3), Ok(false));
        assert_eq!(transfer_kind(Op::Theta, 12, 3), Ok(true));
        assert!(transfer_kind(Op::Theta, 16, 3).is_err());
        assert!(transfer_kind(Op::Partial, 12, 3).is_err());
        for op in [Op::Ready, Op::Await, Op::Next] {
            assert!(transfer_kind(op, 1, 3).is_err(), "{op:?}");
        }
    }
}
