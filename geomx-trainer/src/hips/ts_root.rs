//! The global server's side of TSEngine on the inter tier: the root of every round's trees and
//! the coordinator that builds them (scheduling.md, "TSEngine"; messages in [`super::ts_msg`]).
//!
//! Sans-IO: [`TsRoot`] takes the local servers' requests with the thing that answers them (`R`,
//! a `Responder` in the server, anything in tests) and a `now`, and returns [`Action`]s: the
//! answers to send, and the round's complete sum once every DC's gradients have reached the
//! root. A request is answered when its decision exists, so a local server always holds one
//! outstanding request per phase (`Ready`, `Await`, `Next`) and learns its part from the answer.
//!
//! One [`TsRoot`] serves one bundle: a key of the model (the job has one global server). Per
//! round its push tree delivers one sum of all W workers' gradients of the key, its pull tree
//! the key's θ. Keys are bundles of their own so that one key's pull tree runs while the next
//! key's push tree is under way (the spec's bundle of every key would wait for the last key's
//! sum before any θ moves, giving up the overlap of push and pull that the direct path has);
//! the coordinator's traffic is then O(participants) per key and round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use geomx_net::sched::tsengine::{
    Measurement, NodeId, PullRound, PushRound, Transfer, TsConfig, TsEngine,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

use geomx_net::{PayloadCodec, Request, Responder};

use super::admit::Admission;
use super::ts_msg::{
    self as msg, encode_pull_from, encode_pull_theta, Op, Partial, PullStep, PushStep, Sent, ROOT,
};

/// What the server does next.
#[derive(Debug)]
pub(crate) enum Action<R> {
    /// Answer a parked request with this payload.
    Answer(R, Arc<Vec<u8>>),
    /// Every DC's sum reached the root: the round's gradient sum over `workers` workers.
    Complete {
        /// The round.
        round: u64,
        /// Σ of every worker's gradient, the bundle's keys in order.
        sum: Vec<f32>,
        /// Workers it sums.
        workers: u32,
    },
}

/// A refused request: why, and its answerer when it was not consumed (to answer the error).
pub(crate) type Refused<R> = (String, Option<R>);

/// A participant's request to the root, decoded.
enum RootRequest {
    /// `Ready`: merged or not.
    Ready(bool),
    /// `Await`, with the push's measurement.
    Await(Option<Sent>),
    /// `Next`, with the last send's measurement.
    Next(Option<Sent>),
    /// A partial sum for the root.
    Partial(Partial),
}

impl RootRequest {
    /// Decodes the payload of `op` for a bundle of `len` values; the root takes no θ.
    fn decode(op: Op, payload: &[u8], len: usize) -> Result<Self, String> {
        match op {
            Op::Ready => msg::decode_ready(payload).map(Self::Ready),
            Op::Await => msg::decode_report(payload, "await").map(Self::Await),
            Op::Next => msg::decode_report(payload, "next").map(Self::Next),
            Op::Partial => msg::decode_partial(payload, len).map(Self::Partial),
            Op::Theta => Err("the root takes no θ".into()),
        }
    }
}

/// The roots of one server's trees, one per key (each key is a bundle of its own), with the
/// keys' lengths.
pub(crate) struct Roots {
    roots: Vec<std::sync::Mutex<TsRoot<Responder>>>,
    lens: Vec<usize>,
}

impl Roots {
    /// Roots over participants 0..`n` for keys of `lens` values; key k's pull tree draws from
    /// `seed ^ k`.
    pub fn new(cfg: TsConfig, n: usize, lens: &[usize], seed: u64) -> Result<Self, String> {
        let roots = lens
            .iter()
            .enumerate()
            .map(|(k, &len)| TsRoot::new(cfg, n, len, seed ^ k as u64).map(Into::into))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            roots,
            lens: lens.to_vec(),
        })
    }

    /// Values of key `k`.
    pub fn len_of(&self, k: usize) -> Option<usize> {
        self.lens.get(k).copied()
    }

    /// Participant `from`'s TSEngine request `op` for the root of the key in its offset:
    /// decoded before the connection may speak for the participant (admit.rs: a stranger
    /// borrowing its id with a malformed request claims nothing), then handed to the root. A
    /// partial is acknowledged on arrival (the sender measures the transfer). Returns the key,
    /// the round and the root's actions; `None` when the request was refused (an error reply)
    /// or, through `abort`, when it was a partial the trees cannot go on without (a genuine
    /// participant never sends one). `who` names the participant in messages.
    #[allow(clippy::too_many_arguments)]
    pub fn serve(
        &self,
        from: NodeId,
        who: impl Fn() -> String,
        op: Op,
        req: Request,
        reply: Responder,
        admission: &Admission,
        abort: impl FnOnce(String),
    ) -> Option<(usize, u64, Vec<Action<Responder>>)> {
        let (round, now) = (req.version, Instant::now());
        let key = req.offset as usize;
        let (Some(root), Some(&len)) = (self.roots.get(key), self.lens.get(key)) else {
            let msg = format!("TSEngine {op:?} for unknown key {}", req.offset);
            admission.refuse(reply, msg);
            return None;
        };
        let parsed = match RootRequest::decode(op, &req.payload, len) {
            Ok(p) => p,
            Err(e) => {
                admission.refuse(reply, format!("TSEngine {op:?} from {}: {e}", who()));
                return None;
            }
        };
        if let Err(msg) = admission.bind(req.sender, &reply) {
            admission.refuse(reply, msg);
            return None;
        }
        let mut root = super::lock(root);
        let res = match parsed {
            RootRequest::Ready(merged) => root.ready(from, round, merged, reply),
            RootRequest::Await(sent) => root.await_theta(from, round, sent, reply, now),
            RootRequest::Next(last) => root.next(from, round, last, reply, now),
            RootRequest::Partial(p) => {
                let _ = reply.send(round, PayloadCodec::Raw, &[]);
                root.partial(from, round, p).map_err(|e| (e, None))
            }
        };
        drop(root);
        match res {
            Ok(actions) => Some((key, round, actions)),
            Err((e, reply)) => {
                let msg = format!(
                    "TSEngine {op:?} from {}, key {key}, round {round}: {e}",
                    who()
                );
                match reply {
                    Some(r) => admission.refuse(r, msg),
                    None => abort(msg),
                }
                None
            }
        }
    }

    /// Round `round`'s θ of key `k` (its f32 bytes) starts the key's pull tree.
    pub fn theta(
        &self,
        k: usize,
        round: u64,
        theta: &[u8],
    ) -> Result<Vec<Action<Responder>>, String> {
        let root = self.roots.get(k).ok_or_else(|| format!("no key {k}"))?;
        super::lock(root).theta(round, theta, Instant::now())
    }
}

/// Who sends a local server the round's θ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Root,
    Holder(NodeId),
}

/// One round's trees.
struct RoundState<R> {
    push: PushRound,
    /// Parked `Ready` requests, by DC.
    polls: BTreeMap<NodeId, R>,
    /// The partial the root was promised: (sender, DCs it sums).
    expect: Option<(NodeId, u32)>,
    /// The root's partial sum and the workers it counts.
    acc: Option<Vec<f32>>,
    workers: u32,
    pull: Option<PullRound>,
    /// The `Await` answer carrying θ.
    theta: Option<Arc<Vec<u8>>>,
    /// Parked `Await` requests, by DC.
    awaits: BTreeMap<NodeId, R>,
    /// Decided sources whose `Await` has not arrived.
    sources: BTreeMap<NodeId, Source>,
    /// The root's send of θ: the receiver and when the answer went out.
    root_send: Option<(NodeId, Option<Instant>)>,
}

/// The root and coordinator of TSEngine's trees for one bundle.
pub(crate) struct TsRoot<R> {
    engine: TsEngine,
    rng: StdRng,
    participants: Vec<NodeId>,
    len: usize,
    rounds: BTreeMap<u64, RoundState<R>>,
}

fn answer<R>(out: &mut Vec<Action<R>>, r: R, payload: Vec<u8>) {
    out.push(Action::Answer(r, Arc::new(payload)));
}

impl<R> TsRoot<R> {
    /// A root for DCs 0..`n_dcs` and a bundle of `len` values; `seed` seeds the pull tree's
    /// random picks.
    pub fn new(cfg: TsConfig, n_dcs: usize, len: usize, seed: u64) -> Result<Self, String> {
        let engine = TsEngine::new(cfg).map_err(|e| e.to_string())?;
        let participants = (0..n_dcs as NodeId).collect::<Vec<_>>();
        if participants.is_empty() {
            return Err("TSEngine needs a participant".into());
        }
        Ok(Self {
            engine,
            rng: StdRng::seed_from_u64(seed ^ 0x7473_656e_6769_6e65),
            participants,
            len,
            rounds: BTreeMap::new(),
        })
    }

    fn check_dc(&self, dc: NodeId) -> Result<(), String> {
        if self.participants.contains(&dc) {
            Ok(())
        } else {
            Err(format!("participant {dc} takes no part in the trees"))
        }
    }

    /// Round `round`'s state, created (and the coordinator advanced to it) at its first
    /// `Ready`. Rounds before the previous one are over and dropped.
    fn open(&mut self, round: u64) -> Result<&mut RoundState<R>, String> {
        if !self.rounds.contains_key(&round) {
            if round < self.engine.round() {
                return Err(format!("round {round} is over"));
            }
            while self.engine.round() < round {
                self.engine.advance_round();
            }
            let push = self
                .engine
                .push_round(ROOT, &self.participants)
                .map_err(|e| e.to_string())?;
            self.rounds.retain(|&r, _| r + 1 >= round);
            self.rounds.insert(
                round,
                RoundState {
                    push,
                    polls: BTreeMap::new(),
                    expect: None,
                    acc: None,
                    workers: 0,
                    pull: None,
                    theta: None,
                    awaits: BTreeMap::new(),
                    sources: BTreeMap::new(),
                    root_send: None,
                },
            );
        }
        self.rounds
            .get_mut(&round)
            .ok_or_else(|| format!("round {round}"))
    }

    fn round(&mut self, round: u64) -> Result<&mut RoundState<R>, String> {
        self.rounds
            .get_mut(&round)
            .ok_or_else(|| format!("round {round} is not open"))
    }

    /// `Ready` from DC `dc`: its own sum (`merged` false) or a merged partial is ready.
    pub fn ready(
        &mut self,
        dc: NodeId,
        round: u64,
        merged: bool,
        poll: R,
    ) -> Result<Vec<Action<R>>, Refused<R>> {
        if let Err(e) = self
            .check_dc(dc)
            .and_then(|()| self.open(round).map(|_| ()))
        {
            return Err((e, Some(poll)));
        }
        let table = self.engine.table();
        let Some(st) = self.rounds.get_mut(&round) else {
            return Err((format!("round {round}"), Some(poll)));
        };
        if st.polls.contains_key(&dc) {
            return Err((
                format!("dc {dc}: a second ready in round {round}"),
                Some(poll),
            ));
        }
        let t = match if merged {
            st.push.merged(table, dc)
        } else {
            st.push.ready(table, dc)
        } {
            Ok(t) => t,
            Err(e) => return Err((format!("dc {dc}, round {round}: {e}"), Some(poll))),
        };
        st.polls.insert(dc, poll);
        let mut out = Vec::new();
        if let Some(t) = t {
            transfer(st, t, &mut out).map_err(|e| (e, None))?;
        }
        Ok(out)
    }

    /// A `Partial` reached the root from DC `from`.
    pub fn partial(
        &mut self,
        from: NodeId,
        round: u64,
        p: Partial,
    ) -> Result<Vec<Action<R>>, String> {
        let len = self.len;
        let table = self.engine.table();
        let st = self
            .rounds
            .get_mut(&round)
            .ok_or_else(|| format!("round {round} is not open"))?;
        if p.sum.len() != len {
            return Err(format!("partial of {} values, bundle {len}", p.sum.len()));
        }
        match st.expect {
            Some((f, dcs)) if f == from && dcs == p.dcs => st.expect = None,
            _ => {
                return Err(format!(
                    "dc {from}: a partial of {} DCs the root did not ask for (round {round})",
                    p.dcs
                ))
            }
        }
        match st.acc.as_mut() {
            // The first partial is the sum as it came, as the direct path takes the first
            // DC's push.
            None => st.acc = Some(p.sum),
            Some(acc) => {
                for (a, x) in acc.iter_mut().zip(&p.sum) {
                    *a += *x;
                }
            }
        }
        st.workers += p.workers;
        let t = st
            .push
            .merged(table, ROOT)
            .map_err(|e| format!("root, round {round}: {e}"))?;
        let mut out = Vec::new();
        if st.push.is_finished() {
            out.push(Action::Complete {
                round,
                sum: st.acc.take().unwrap_or_default(),
                workers: st.workers,
            });
        } else if let Some(t) = t {
            transfer(st, t, &mut out)?;
        }
        Ok(out)
    }

    /// The optimizer produced round `round`'s θ (`theta`: the bundle's f32 bytes): the pull
    /// tree starts at the root.
    pub fn theta(
        &mut self,
        round: u64,
        theta: &[u8],
        now: Instant,
    ) -> Result<Vec<Action<R>>, String> {
        let pull = self
            .engine
            .pull_round(ROOT, &self.participants)
            .map_err(|e| e.to_string())?;
        let st = self.round(round)?;
        if st.pull.is_some() {
            return Err(format!("round {round}: θ twice"));
        }
        st.pull = Some(pull);
        st.theta = Some(Arc::new(encode_pull_theta(theta)));
        let mut out = Vec::new();
        self.root_next(round, None, now, &mut out)?;
        Ok(out)
    }

    /// The root is an idle holder: it picks its next receiver.
    fn root_next(
        &mut self,
        round: u64,
        last: Option<(NodeId, Measurement)>,
        now: Instant,
        out: &mut Vec<Action<R>>,
    ) -> Result<(), String> {
        let Self {
            engine,
            rng,
            rounds,
            ..
        } = self;
        let st = rounds
            .get_mut(&round)
            .ok_or_else(|| format!("round {round}"))?;
        let pull = st.pull.as_mut().ok_or("no pull tree")?;
        let pick = pull
            .next_receiver(
                engine.table_mut(),
                ROOT,
                last.map(|l| l.0),
                last.map(|l| l.1),
                rng,
            )
            .map_err(|e| format!("root, round {round}: {e}"))?;
        st.root_send = None;
        if let Some(p) = pick {
            st.root_send = Some((p.receiver, None));
            start(st, p.receiver, Source::Root, now, out);
        }
        Ok(())
    }

    /// `Await` from DC `dc`, with the measurement of its push.
    pub fn await_theta(
        &mut self,
        dc: NodeId,
        round: u64,
        push: Option<Sent>,
        poll: R,
        now: Instant,
    ) -> Result<Vec<Action<R>>, Refused<R>> {
        if let Err(e) = self.check_dc(dc) {
            return Err((e, Some(poll)));
        }
        if let Some(s) = push {
            let to = if s.to == ROOT {
                Ok(())
            } else {
                self.check_dc(s.to)
            };
            let recorded = to.and_then(|()| {
                self.engine
                    .record(dc, s.to, s.measurement())
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = recorded {
                return Err((e, Some(poll)));
            }
        }
        let st = match self.round(round) {
            Ok(st) => st,
            Err(e) => return Err((e, Some(poll))),
        };
        if st.awaits.contains_key(&dc) {
            return Err((
                format!("dc {dc}: a second await in round {round}"),
                Some(poll),
            ));
        }
        st.awaits.insert(dc, poll);
        let mut out = Vec::new();
        if let Some(s) = st.sources.remove(&dc) {
            start(st, dc, s, now, &mut out);
        }
        Ok(out)
    }

    /// `Next` from DC `dc`, a holder of θ, with the measurement of its last send.
    pub fn next(
        &mut self,
        dc: NodeId,
        round: u64,
        last: Option<Sent>,
        poll: R,
        now: Instant,
    ) -> Result<Vec<Action<R>>, Refused<R>> {
        let mut out = Vec::new();
        if let Err(e) = self.deliver(dc, round, now, &mut out) {
            return Err((e, Some(poll)));
        }
        let Self {
            engine,
            rng,
            rounds,
            ..
        } = self;
        let Some(st) = rounds.get_mut(&round) else {
            return Err((format!("round {round}"), Some(poll)));
        };
        let Some(pull) = st.pull.as_mut() else {
            return Err(("no pull tree".into(), Some(poll)));
        };
        let pick = match pull.next_receiver(
            engine.table_mut(),
            dc,
            last.map(|s| s.to),
            last.map(|s| s.measurement()),
            rng,
        ) {
            Ok(p) => p,
            Err(e) => return Err((format!("dc {dc}, round {round}: {e}"), Some(poll))),
        };
        match pick {
            Some(p) => {
                answer(&mut out, poll, PullStep::SendTo(p.receiver).encode());
                start(st, p.receiver, Source::Holder(dc), now, &mut out);
            }
            None => answer(&mut out, poll, PullStep::Stop.encode()),
        }
        Ok(out)
    }

    /// DC `dc` holds θ: the first time, it becomes a holder, and if the root sent it, the
    /// root's send is acknowledged and the root picks its next receiver.
    fn deliver(
        &mut self,
        dc: NodeId,
        round: u64,
        now: Instant,
        out: &mut Vec<Action<R>>,
    ) -> Result<(), String> {
        self.check_dc(dc)?;
        let st = self.round(round)?;
        let theta_len = st
            .theta
            .as_ref()
            .map(|t| t.len() as u64 - 1)
            .ok_or_else(|| format!("dc {dc}: next before θ of round {round}"))?;
        let pull = st.pull.as_mut().ok_or("no pull tree")?;
        if pull.is_holder(dc) {
            return Ok(());
        }
        pull.delivered(dc)
            .map_err(|e| format!("dc {dc}, round {round}: {e}"))?;
        if let Some((r, Some(t0))) = st.root_send {
            if r == dc {
                let m = Measurement::new(theta_len, now.saturating_duration_since(t0));
                self.root_next(round, Some((dc, m)), now, out)?;
            }
        }
        Ok(())
    }

    /// Whether every DC of round `round` holds θ.
    #[cfg(test)]
    fn pulled(&self, round: u64) -> bool {
        self.rounds
            .get(&round)
            .and_then(|st| st.pull.as_ref())
            .is_some_and(PullRound::is_finished)
    }
}

/// Answers both ends of a push transfer: the sender learns where to send, a local receiver
/// what to merge; a root receiver waits for the partial.
fn transfer<R>(
    st: &mut RoundState<R>,
    t: Transfer,
    out: &mut Vec<Action<R>>,
) -> Result<(), String> {
    let dcs = u32::try_from(t.contributions).map_err(|_| "too many DCs")?;
    let poll = st
        .polls
        .remove(&t.from)
        .ok_or_else(|| format!("dc {}: no ready to answer", t.from))?;
    answer(out, poll, PushStep::SendTo(t.to).encode());
    if t.to == ROOT {
        st.expect = Some((t.from, dcs));
    } else {
        let poll = st
            .polls
            .remove(&t.to)
            .ok_or_else(|| format!("dc {}: no ready to answer", t.to))?;
        answer(
            out,
            poll,
            PushStep::ReceiveFrom { from: t.from, dcs }.encode(),
        );
    }
    Ok(())
}

/// Tells DC `dc` where its θ comes from, now if its `Await` is here, else when it comes.
fn start<R>(
    st: &mut RoundState<R>,
    dc: NodeId,
    source: Source,
    now: Instant,
    out: &mut Vec<Action<R>>,
) {
    let Some(poll) = st.awaits.remove(&dc) else {
        st.sources.insert(dc, source);
        return;
    };
    match source {
        Source::Root => {
            if let Some(theta) = &st.theta {
                out.push(Action::Answer(poll, theta.clone()));
                st.root_send = Some((dc, Some(now)));
            }
        }
        Source::Holder(h) => answer(out, poll, encode_pull_from(h)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use rand::Rng;

    use super::super::ts_msg::PullStart;
    use super::*;

    /// A parked request in tests: the DC and what it asked.
    type Poll = (NodeId, Ask);

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Ask {
        Ready,
        Await,
        Next,
    }

    /// What happens next at a local server (or on the wire).
    #[derive(Debug)]
    enum Ev {
        Ready(NodeId, bool),
        /// A partial in flight; on arrival the sender goes on to `Await`.
        Partial(NodeId, NodeId),
        Await(NodeId),
        /// θ in flight from a holder (or the root) to a DC.
        Theta(NodeId, NodeId),
        Next(NodeId, Option<NodeId>),
    }

    /// The local servers' side of a simulated round.
    struct Sim {
        partial: Vec<(Vec<f32>, u32)>,
        incoming: BTreeMap<NodeId, u32>,
        sent: BTreeSet<NodeId>,
        holders: BTreeSet<NodeId>,
        complete: Option<Vec<f32>>,
        pending: Vec<Ev>,
    }

    impl Sim {
        /// Turns the root's actions into the local servers' next events.
        fn take(
            &mut self,
            root: &mut TsRoot<Poll>,
            round: u64,
            now: Instant,
            out: Vec<Action<Poll>>,
        ) {
            for a in out {
                match a {
                    Action::Complete { sum, workers, .. } => {
                        assert_eq!(workers as usize, self.partial.len());
                        assert!(self.complete.replace(sum).is_none(), "two completions");
                        let theta = vec![0u8; self.partial[0].0.len() * 4];
                        let more = root.theta(round, &theta, now).unwrap();
                        self.take(root, round, now, more);
                    }
                    Action::Answer((dc, Ask::Ready), p) => match PushStep::decode(&p).unwrap() {
                        PushStep::SendTo(to) => {
                            assert!(self.sent.insert(dc), "dc {dc} sent twice");
                            self.pending.push(Ev::Partial(dc, to));
                        }
                        PushStep::ReceiveFrom { from, dcs } => {
                            assert_eq!(dcs, self.partial[from as usize].1);
                            let n = self.incoming.entry(dc).or_default();
                            *n += 1;
                            assert_eq!(*n, 1, "dc {dc}: two incoming transfers");
                        }
                    },
                    Action::Answer((dc, Ask::Await), p) => {
                        match PullStart::decode(&p, self.partial[0].0.len()).unwrap() {
                            PullStart::Theta(_) => self.pending.push(Ev::Theta(ROOT, dc)),
                            PullStart::From(h) => assert!(self.holders.contains(&h)),
                        }
                    }
                    Action::Answer((dc, Ask::Next), p) => match PullStep::decode(&p).unwrap() {
                        PullStep::SendTo(to) => self.pending.push(Ev::Theta(dc, to)),
                        PullStep::Stop => {}
                    },
                }
            }
        }
    }

    /// `rounds` rounds of `d` local servers through the root, events in random order (random
    /// transfer durations): the spec's oracles 6–8 — exact sums for inputs that are multiples
    /// of 2^-8 up to 256, no node with two incoming transfers, one send per participant, θ
    /// delivered once to each.
    fn simulate(d: usize, seed: u64, rounds: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let len = 3;
        let mut root: TsRoot<Poll> = TsRoot::new(TsConfig::default(), d, len, seed).unwrap();
        let t0 = Instant::now();
        let mut step = 0u64;
        for round in 0..rounds {
            let inputs: Vec<Vec<f32>> = (0..d)
                .map(|_| {
                    (0..len)
                        .map(|_| rng.random_range(-65536i32..=65536) as f32 / 256.0)
                        .collect()
                })
                .collect();
            let mut want = vec![0.0f32; len];
            for x in &inputs {
                for (a, b) in want.iter_mut().zip(x) {
                    *a += b;
                }
            }
            let mut sim = Sim {
                partial: inputs.iter().map(|x| (x.clone(), 1)).collect(),
                incoming: BTreeMap::new(),
                sent: BTreeSet::new(),
                holders: BTreeSet::from([ROOT]),
                complete: None,
                pending: (0..d as NodeId).map(|i| Ev::Ready(i, false)).collect(),
            };
            while !sim.pending.is_empty() {
                step += 1;
                assert!(step < 1_000_000, "no progress");
                let ev = sim
                    .pending
                    .swap_remove(rng.random_range(0..sim.pending.len()));
                let now = t0 + Duration::from_millis(step);
                let out = match ev {
                    Ev::Ready(dc, merged) => {
                        root.ready(dc, round, merged, (dc, Ask::Ready)).unwrap()
                    }
                    Ev::Partial(from, to) => {
                        sim.pending.push(Ev::Await(from));
                        let (sum, dcs) = sim.partial[from as usize].clone();
                        if to == ROOT {
                            let p = Partial {
                                dcs,
                                workers: dcs,
                                sum,
                            };
                            root.partial(from, round, p).unwrap()
                        } else {
                            let p = &mut sim.partial[to as usize];
                            for (a, b) in p.0.iter_mut().zip(&sum) {
                                *a += b;
                            }
                            p.1 += dcs;
                            *sim.incoming.get_mut(&to).unwrap() -= 1;
                            sim.pending.push(Ev::Ready(to, true));
                            Vec::new()
                        }
                    }
                    Ev::Await(dc) => root
                        .await_theta(dc, round, None, (dc, Ask::Await), now)
                        .unwrap(),
                    Ev::Theta(from, to) => {
                        assert!(sim.holders.contains(&from));
                        assert!(sim.holders.insert(to), "dc {to} got θ twice");
                        sim.pending.push(Ev::Next(to, None));
                        if from != ROOT {
                            sim.pending.push(Ev::Next(from, Some(to)));
                        }
                        Vec::new()
                    }
                    Ev::Next(dc, last) => {
                        let last = last.map(|to| Sent {
                            to,
                            bytes: 100,
                            elapsed: Duration::from_millis(rng.random_range(1..50)),
                        });
                        root.next(dc, round, last, (dc, Ask::Next), now).unwrap()
                    }
                };
                sim.take(&mut root, round, now, out);
            }
            assert_eq!(sim.complete.as_deref(), Some(&want[..]), "round {round}");
            assert_eq!(sim.sent.len(), d, "every participant sends once");
            assert_eq!(
                sim.holders.len(),
                d + 1,
                "every participant receives θ once"
            );
            assert!(root.pulled(round));
        }
    }

    #[test]
    fn trees_sum_exactly_and_deliver_once() {
        for seed in 0..1000 {
            simulate(2 + (seed as usize % 15), seed, 1);
        }
        for d in [1, 3, 8] {
            simulate(d, 7, 12);
        }
    }

    #[test]
    fn two_dcs_sum_like_the_direct_path() {
        // The direct path takes the first DC's push and adds the other: with two DCs the root's
        // sum is that sum, in either order (IEEE addition commutes).
        let a = [0.1f32, 1e-8, -3.3];
        let b = [0.7f32, 1.0, 1e7];
        for first in [0u32, 1] {
            let mut root: TsRoot<u8> = TsRoot::new(TsConfig::default(), 2, 3, 1).unwrap();
            let out = root.ready(first, 0, false, 0).unwrap();
            assert!(matches!(&out[..], [Action::Answer(0, _)]));
            let out = root.ready(1 - first, 0, false, 1).unwrap();
            assert!(out.is_empty(), "the root is receiving");
            let (x, y) = if first == 0 { (a, b) } else { (b, a) };
            let p = |s: [f32; 3]| Partial {
                dcs: 1,
                workers: 2,
                sum: s.to_vec(),
            };
            let out = root.partial(first, 0, p(x)).unwrap();
            assert!(matches!(&out[..], [Action::Answer(1, _)]));
            let out = root.partial(1 - first, 0, p(y)).unwrap();
            let [Action::Complete {
                sum, workers: 4, ..
            }] = &out[..]
            else {
                panic!("{out:?}");
            };
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(sum, &want);
        }
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let mut root: TsRoot<u8> = TsRoot::new(TsConfig::default(), 2, 2, 1).unwrap();
        assert!(root.ready(5, 0, false, 0).is_err(), "not a participant");
        assert!(
            root.ready(ROOT, 0, false, 0).is_err(),
            "the root is no participant"
        );
        root.ready(0, 0, false, 0).unwrap();
        assert!(root.ready(0, 0, false, 0).is_err(), "second ready");
        // A partial nobody asked for, then one of the wrong shape.
        let p = Partial {
            dcs: 1,
            workers: 1,
            sum: vec![1.0, 2.0],
        };
        assert!(root.partial(1, 0, p.clone()).is_err());
        let short = Partial {
            sum: vec![1.0],
            ..p.clone()
        };
        assert!(root.partial(0, 0, short).is_err());
        let two = Partial {
            dcs: 2,
            ..p.clone()
        };
        assert!(root.partial(0, 0, two).is_err());
        root.partial(0, 0, p).unwrap();
        assert!(
            root.next(0, 0, None, 0, Instant::now()).is_err(),
            "next before θ"
        );
        assert!(
            root.theta(3, &[0; 8], Instant::now()).is_err(),
            "round not open"
        );
        assert!(root.await_theta(0, 0, None, 0, Instant::now()).is_ok());
        assert!(
            root.await_theta(0, 0, None, 0, Instant::now()).is_err(),
            "second await"
        );
        // Rounds before the previous one are over.
        root.ready(0, 5, false, 0).unwrap();
        assert!(root.ready(1, 0, false, 0).is_err());
    }
}
