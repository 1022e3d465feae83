//! TSEngine's coordinator (Zhou et al., IEEE TNSM 2021; `../shared/specs/scheduling.md`,
//! "TSEngine — adaptive overlay for push and pull"): per bundle and round, it decides who sends
//! to whom from measured throughput.
//!
//! * [`ThroughputTable`]: A\[s\]\[r\] in bytes/s with the round it was measured in; an entry
//!   stamped in round r is usable through round r + `expiry_rounds` and forgotten after.
//! * [`PushRound`]: the dynamic aggregation tree. Nodes wait in a FIFO queue; whenever two are
//!   queued they are paired into a [`Transfer`]. A node is queued at most once and never while it
//!   receives, so no node ever has two incoming transfers (no in-cast).
//! * [`PullRound`]: the ε-greedy broadcast tree. Every holder of the new parameters asks for its
//!   next receiver ([`PullRound::next_receiver`]) and reports the throughput of its last transfer.
//! * [`TsEngine`]: owns the table and the round counter and creates the per-round state, so
//!   measurements carry across rounds and expire.
//!
//! Sans-IO: nothing here reads a clock or owns randomness. Durations come in as
//! [`Measurement`]s (taken by the sender on a monotonic clock, from the start of a transfer to the
//! receiver's acknowledgement) and random draws come from the caller's `rng`, so a seeded rng
//! replays a schedule exactly. Misuse (unknown ids, duplicate events, reports for transfers that
//! were never assigned) returns a [`TsError`]; no input panics.
//!
//! The root (a local server for the intra tier, the global server for the inter tier) has no
//! gradient of its own: it starts a push round with zero contributions and finishes when it holds
//! one from every participant. Node ids are the caller's; none is special except the root it names.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::Rng;

/// A node (participant or root), numbered by the caller.
pub type NodeId = u32;

/// Default [`TsConfig::max_greed`] (the original `MAX_GREED_RATE_TS`).
pub const DEFAULT_MAX_GREED: f64 = 0.9;
/// Default [`TsConfig::expiry_rounds`].
pub const DEFAULT_EXPIRY_ROUNDS: u64 = 5;

/// Errors of the TSEngine coordinator: bad configuration, bad measurements and misuse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TsError {
    /// [`TsConfig::max_greed`] is not in \[0, 1\].
    #[error("invalid TSEngine config: max_greed = {0} is not in [0, 1]")]
    InvalidMaxGreed(f64),
    /// A round needs at least one participant.
    #[error("a round needs at least one participant")]
    NoParticipants,
    /// A participant id appears twice.
    #[error("participant {0} is listed twice")]
    DuplicateParticipant(NodeId),
    /// The root was also listed as a participant.
    #[error("root {0} is also listed as a participant")]
    RootIsParticipant(NodeId),
    /// The id is not a participant of this round (the root is not a participant).
    #[error("node {0} is not a participant of this round")]
    NotParticipant(NodeId),
    /// `Ready` for a participant that already reported it this round.
    #[error("node {0} already reported Ready this round")]
    DuplicateReady(NodeId),
    /// `merged` for a node with no incoming transfer.
    #[error("node {0} has no incoming transfer to merge")]
    NothingToMerge(NodeId),
    /// A pull request from a node that does not hold the new parameters.
    #[error("node {0} does not hold the parameters of this round")]
    NotHolder(NodeId),
    /// (holder, receiver): the holder asked again without reporting the receiver it was given.
    #[error("holder {0} has not reported its transfer to {1}")]
    HolderBusy(NodeId, NodeId),
    /// (sender, receiver): a report about a transfer this round has not assigned.
    #[error("no transfer {0} -> {1} is outstanding")]
    UnknownTransfer(NodeId, NodeId),
    /// A measurement came without the receiver it was measured to.
    #[error("holder {0} sent a measurement without its last receiver")]
    MeasurementWithoutReceiver(NodeId),
    /// `delivered` for a participant that is not being sent to.
    #[error("no transfer to node {0} is in flight")]
    NotInFlight(NodeId),
    /// A transfer measured in zero time (its rate would be infinite).
    #[error("{0} bytes measured in zero time")]
    ZeroElapsed(u64),
    /// An acknowledgement stamped before the start of its transfer.
    #[error("acknowledgement before the start of the transfer")]
    AckBeforeStart,
    /// (sender, receiver, bytes/s): a negative, infinite or NaN rate, or a link to itself.
    #[error("invalid rate {2} bytes/s for link {0} -> {1}")]
    InvalidRate(NodeId, NodeId, f64),
}

/// Coordinator settings (`../shared/specs/scheduling.md`, "Defaults").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TsConfig {
    /// Cap of the greedy probability in pull, in \[0, 1\].
    pub max_greed: f64,
    /// A measurement stamped in round r is used through round r + `expiry_rounds`.
    pub expiry_rounds: u64,
}

impl Default for TsConfig {
    fn default() -> Self {
        TsConfig {
            max_greed: DEFAULT_MAX_GREED,
            expiry_rounds: DEFAULT_EXPIRY_ROUNDS,
        }
    }
}

impl TsConfig {
    /// Checks every field; the error names the offending one.
    pub fn validate(&self) -> Result<(), TsError> {
        if !(0.0..=1.0).contains(&self.max_greed) {
            return Err(TsError::InvalidMaxGreed(self.max_greed));
        }
        Ok(())
    }
}

/// One transfer's size and duration, as measured by its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes of the transfer.
    pub bytes: u64,
    /// From the start of the transfer to the receiver's acknowledgement.
    pub elapsed: Duration,
}

impl Measurement {
    /// `bytes` moved in `elapsed`.
    pub fn new(bytes: u64, elapsed: Duration) -> Self {
        Measurement { bytes, elapsed }
    }

    /// `bytes` sent at `start` and acknowledged at `acked` (monotonic clock readings).
    pub fn between(bytes: u64, start: Instant, acked: Instant) -> Result<Self, TsError> {
        let elapsed = acked.checked_duration_since(start);
        Ok(Measurement::new(
            bytes,
            elapsed.ok_or(TsError::AckBeforeStart)?,
        ))
    }

    /// Throughput in bytes per second; a zero duration is an error, never infinity.
    pub fn rate(&self) -> Result<f64, TsError> {
        if self.elapsed.is_zero() {
            return Err(TsError::ZeroElapsed(self.bytes));
        }
        Ok(self.bytes as f64 / self.elapsed.as_secs_f64())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate {
    bytes_per_s: f64,
    round: u64,
}

/// A\[s\]\[r\]: the last measured throughput from s to r in bytes/s, stamped with its round.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputTable {
    expiry_rounds: u64,
    entries: BTreeMap<(NodeId, NodeId), Rate>,
}

impl ThroughputTable {
    /// An empty table whose entries are usable for `expiry_rounds` rounds after their stamp.
    pub fn new(expiry_rounds: u64) -> Self {
        ThroughputTable {
            expiry_rounds,
            entries: BTreeMap::new(),
        }
    }

    /// Records measurement `m` of a transfer `from` → `to` made in `round`; returns bytes/s.
    pub fn record(
        &mut self,
        from: NodeId,
        to: NodeId,
        m: Measurement,
        round: u64,
    ) -> Result<f64, TsError> {
        let rate = m.rate()?;
        self.record_rate(from, to, rate, round)?;
        Ok(rate)
    }

    /// Records a rate in bytes/s (finite, ≥ 0) measured in `round`. An entry stamped in a later
    /// round than `round` is kept: the table holds the last measurement.
    pub fn record_rate(
        &mut self,
        from: NodeId,
        to: NodeId,
        bytes_per_s: f64,
        round: u64,
    ) -> Result<(), TsError> {
        if from == to || !bytes_per_s.is_finite() || bytes_per_s < 0.0 {
            return Err(TsError::InvalidRate(from, to, bytes_per_s));
        }
        let new = Rate { bytes_per_s, round };
        let slot = self.entries.entry((from, to)).or_insert(new);
        if slot.round <= round {
            *slot = new;
        }
        Ok(())
    }

    /// A\[from\]\[to\] as seen in `current_round`: `None` if never measured or if
    /// `current_round − stamp > expiry_rounds`.
    pub fn get(&self, from: NodeId, to: NodeId, current_round: u64) -> Option<f64> {
        self.entries
            .get(&(from, to))
            .filter(|e| current_round.saturating_sub(e.round) <= self.expiry_rounds)
            .map(|e| e.bytes_per_s)
    }

    /// Drops the entries that are expired in `current_round`.
    pub fn prune(&mut self, current_round: u64) {
        let expiry = self.expiry_rounds;
        self.entries
            .retain(|_, e| current_round.saturating_sub(e.round) <= expiry);
    }
}

/// Greedy probability p = min(known / (known + unknown), `max_greed`) in floating point; 0 when
/// there are no candidates.
pub fn greedy_probability(known: usize, unknown: usize, max_greed: f64) -> f64 {
    let total = known + unknown;
    if total == 0 {
        return 0.0;
    }
    (known as f64 / total as f64).min(max_greed)
}

/// Checks a round's ids: at least one participant, no duplicates, root not among them.
fn check_ids(root: NodeId, participants: &[NodeId]) -> Result<BTreeSet<NodeId>, TsError> {
    if participants.is_empty() {
        return Err(TsError::NoParticipants);
    }
    let mut set = BTreeSet::new();
    for &p in participants {
        if p == root {
            return Err(TsError::RootIsParticipant(root));
        }
        if !set.insert(p) {
            return Err(TsError::DuplicateParticipant(p));
        }
    }
    Ok(set)
}

/// A push decision: `from` sends its partial sum (of `contributions` original gradients) to `to`
/// and is then done for the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Sender.
    pub from: NodeId,
    /// Receiver; it reports [`PushRound::merged`] once it has added the partial sum.
    pub to: NodeId,
    /// Original contributions in the sender's partial sum.
    pub contributions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushState {
    NotReady,
    Queued,
    Receiving { contributions: usize },
    Sent,
    Done,
}

/// The dynamic aggregation tree of one bundle and round.
///
/// Events: [`ready`](Self::ready) (a participant's gradient exists) and
/// [`merged`](Self::merged) (a receiver has added an incoming partial sum). Each event queues at
/// most one node, and pairing empties the queue down to one node, so each returns at most one
/// [`Transfer`], which the caller sends to the sender.
#[derive(Debug, Clone)]
pub struct PushRound {
    root: NodeId,
    round: u64,
    participants: usize,
    /// Every node (root included): state and contributions in its partial sum.
    nodes: BTreeMap<NodeId, (PushState, usize)>,
    queue: VecDeque<NodeId>,
    finished: bool,
}

impl PushRound {
    /// A round in which `participants` aggregate into `root`; the root is queued at once.
    pub fn new(root: NodeId, participants: &[NodeId], round: u64) -> Result<Self, TsError> {
        let ids = check_ids(root, participants)?;
        let mut nodes: BTreeMap<_, _> = ids
            .iter()
            .map(|&id| (id, (PushState::NotReady, 0)))
            .collect();
        nodes.insert(root, (PushState::Queued, 0));
        Ok(PushRound {
            root,
            round,
            participants: ids.len(),
            nodes,
            queue: VecDeque::from([root]),
            finished: false,
        })
    }

    /// The root.
    pub fn root(&self) -> NodeId {
        self.root
    }

    /// The round this state was created for (the round used for table look-ups).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// True once the root holds every participant's contribution.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Contributions in `node`'s partial sum (for a sender: what it sent); `None` for unknown ids.
    pub fn contributions(&self, node: NodeId) -> Option<usize> {
        self.nodes.get(&node).map(|n| n.1)
    }

    /// Participant `node`'s own gradient is ready: it joins the queue.
    pub fn ready(
        &mut self,
        table: &ThroughputTable,
        node: NodeId,
    ) -> Result<Option<Transfer>, TsError> {
        if node == self.root {
            return Err(TsError::NotParticipant(node));
        }
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or(TsError::NotParticipant(node))?;
        if n.0 != PushState::NotReady {
            return Err(TsError::DuplicateReady(node));
        }
        *n = (PushState::Queued, 1);
        self.queue.push_back(node);
        Ok(self.pair(table))
    }

    /// `node` has added its incoming partial sum: it joins the queue again, or, for the root
    /// holding every contribution, the round finishes.
    pub fn merged(
        &mut self,
        table: &ThroughputTable,
        node: NodeId,
    ) -> Result<Option<Transfer>, TsError> {
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or(TsError::NotParticipant(node))?;
        let PushState::Receiving { contributions } = n.0 else {
            return Err(TsError::NothingToMerge(node));
        };
        n.1 += contributions;
        if node == self.root && n.1 == self.participants {
            n.0 = PushState::Done;
            self.finished = true;
            return Ok(None);
        }
        n.0 = PushState::Queued;
        self.queue.push_back(node);
        Ok(self.pair(table))
    }

    /// Spec step 2: pops the front two (a, then b) when two are queued.
    fn pair(&mut self, table: &ThroughputTable) -> Option<Transfer> {
        if self.queue.len() < 2 {
            return None;
        }
        let a = self.queue.pop_front()?;
        let b = self.queue.pop_front()?;
        let (from, to) = if b == self.root {
            (a, b)
        } else if a == self.root {
            (b, a)
        } else {
            let ab = table.get(a, b, self.round).unwrap_or(-1.0);
            let ba = table.get(b, a, self.round).unwrap_or(-1.0);
            if ab > ba {
                (a, b)
            } else {
                (b, a)
            }
        };
        let contributions = self.nodes.get(&from).map_or(0, |n| n.1);
        if let Some(n) = self.nodes.get_mut(&from) {
            n.0 = PushState::Sent;
        }
        if let Some(n) = self.nodes.get_mut(&to) {
            n.0 = PushState::Receiving { contributions };
        }
        Some(Transfer {
            from,
            to,
            contributions,
        })
    }
}

/// A pull decision: the holder sends the new parameters to `receiver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// The participant to send to.
    pub receiver: NodeId,
    /// True if chosen greedily (highest known throughput), false if at random.
    pub greedy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullState {
    Waiting,
    Assigned,
    Served,
}

/// The ε-greedy broadcast tree of one bundle and round. Holders start as {root}; a participant
/// becomes a holder when [`delivered`](Self::delivered) is reported for it.
#[derive(Debug, Clone)]
pub struct PullRound {
    root: NodeId,
    round: u64,
    max_greed: f64,
    nodes: BTreeMap<NodeId, PullState>,
    /// Holder → the receiver it was last given and has not yet reported.
    pending: BTreeMap<NodeId, NodeId>,
    served: usize,
}

impl PullRound {
    /// A round in which `root` broadcasts to `participants`.
    pub fn new(
        root: NodeId,
        participants: &[NodeId],
        round: u64,
        cfg: &TsConfig,
    ) -> Result<Self, TsError> {
        cfg.validate()?;
        let ids = check_ids(root, participants)?;
        Ok(PullRound {
            root,
            round,
            max_greed: cfg.max_greed,
            nodes: ids.iter().map(|&id| (id, PullState::Waiting)).collect(),
            pending: BTreeMap::new(),
            served: 0,
        })
    }

    /// The root.
    pub fn root(&self) -> NodeId {
        self.root
    }

    /// The round this state was created for (measurements are stamped with it).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// True if `node` holds the new parameters (the root, or a served participant).
    pub fn is_holder(&self, node: NodeId) -> bool {
        node == self.root || self.nodes.get(&node) == Some(&PullState::Served)
    }

    /// True once every participant has received the parameters.
    pub fn is_finished(&self) -> bool {
        self.served == self.nodes.len()
    }

    /// Holder `holder` is idle and asks whom to send to next (spec steps 1–5). It reports the
    /// receiver it was last given (required if it was given one) and, if it has one, the
    /// measurement of that transfer, which is stored in A\[holder\]\[last_receiver\] first.
    /// `Ok(None)`: no participant is left to assign; the holder stops. On an error nothing changes.
    pub fn next_receiver<R: Rng + ?Sized>(
        &mut self,
        table: &mut ThroughputTable,
        holder: NodeId,
        last_receiver: Option<NodeId>,
        measurement: Option<Measurement>,
        rng: &mut R,
    ) -> Result<Option<Pick>, TsError> {
        if !self.is_holder(holder) {
            return Err(TsError::NotHolder(holder));
        }
        match (self.pending.get(&holder).copied(), last_receiver) {
            (Some(p), Some(l)) if p == l => {}
            (_, Some(l)) => return Err(TsError::UnknownTransfer(holder, l)),
            (Some(p), None) => return Err(TsError::HolderBusy(holder, p)),
            (None, None) => {}
        }
        if let Some(m) = measurement {
            let last = last_receiver.ok_or(TsError::MeasurementWithoutReceiver(holder))?;
            table.record_rate(holder, last, m.rate()?, self.round)?;
        }
        self.pending.remove(&holder);

        let candidates: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, s)| **s == PullState::Waiting)
            .map(|(&id, _)| id)
            .collect();
        let Some(pick) = choose(table, self.round, holder, &candidates, self.max_greed, rng) else {
            return Ok(None);
        };
        self.nodes.insert(pick.receiver, PullState::Assigned);
        self.pending.insert(holder, pick.receiver);
        Ok(Some(pick))
    }

    /// The transfer to `receiver` has completed: it becomes a holder.
    pub fn delivered(&mut self, receiver: NodeId) -> Result<(), TsError> {
        match self.nodes.get_mut(&receiver) {
            None => Err(TsError::NotParticipant(receiver)),
            Some(s) if *s == PullState::Assigned => {
                *s = PullState::Served;
                self.served += 1;
                Ok(())
            }
            Some(_) => Err(TsError::NotInFlight(receiver)),
        }
    }
}

/// Spec steps 3–4 over `candidates` (ascending ids); `None` if there are none.
fn choose<R: Rng + ?Sized>(
    table: &ThroughputTable,
    round: u64,
    holder: NodeId,
    candidates: &[NodeId],
    max_greed: f64,
    rng: &mut R,
) -> Option<Pick> {
    let mut best: Option<(NodeId, f64)> = None;
    let mut unknown = Vec::new();
    for &u in candidates {
        match table.get(holder, u, round) {
            // Strictly greater: among equal rates the lowest id (seen first) wins.
            Some(rate) => {
                if best.is_none_or(|(_, b)| rate > b) {
                    best = Some((u, rate));
                }
            }
            None => unknown.push(u),
        }
    }
    let p = greedy_probability(candidates.len() - unknown.len(), unknown.len(), max_greed);
    let draw: f64 = rng.random();
    let pick = |receiver, greedy| Some(Pick { receiver, greedy });
    if let Some((receiver, _)) = best.filter(|_| draw < p) {
        return pick(receiver, true);
    }
    // Explore: uniformly among the unknown, or among all candidates if every link is known.
    let pool = if unknown.is_empty() {
        candidates
    } else {
        &unknown
    };
    if pool.is_empty() {
        return None;
    }
    pick(*pool.get(rng.random_range(0..pool.len()))?, false)
}

/// The coordinator: the throughput table, the round counter and the configuration. Rounds are
/// created from it and keep their own state; measurements go into its table.
#[derive(Debug, Clone)]
pub struct TsEngine {
    cfg: TsConfig,
    table: ThroughputTable,
    round: u64,
}

impl TsEngine {
    /// A coordinator at round 0 with an empty table.
    pub fn new(cfg: TsConfig) -> Result<Self, TsError> {
        cfg.validate()?;
        Ok(TsEngine {
            cfg,
            table: ThroughputTable::new(cfg.expiry_rounds),
            round: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TsConfig {
        &self.cfg
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The throughput table (pass it to [`PushRound`]'s events).
    pub fn table(&self) -> &ThroughputTable {
        &self.table
    }

    /// The throughput table, mutably (pass it to [`PullRound::next_receiver`]).
    pub fn table_mut(&mut self) -> &mut ThroughputTable {
        &mut self.table
    }

    /// Starts the next round and forgets the measurements that expire in it; returns its number.
    pub fn advance_round(&mut self) -> u64 {
        self.round = self.round.saturating_add(1);
        self.table.prune(self.round);
        self.round
    }

    /// Stores a measurement of a transfer `from` → `to` in the current round; returns bytes/s.
    pub fn record(&mut self, from: NodeId, to: NodeId, m: Measurement) -> Result<f64, TsError> {
        self.table.record(from, to, m, self.round)
    }

    /// The push state of one bundle in the current round.
    pub fn push_round(&self, root: NodeId, participants: &[NodeId]) -> Result<PushRound, TsError> {
        PushRound::new(root, participants, self.round)
    }

    /// The pull state of one bundle in the current round.
    pub fn pull_round(&self, root: NodeId, participants: &[NodeId]) -> Result<PullRound, TsError> {
        PullRound::new(root, participants, self.round, &self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::TsError::*;
    use super::*;
    use rand::seq::index::sample;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    type Rng8 = ChaCha8Rng;

    fn engine() -> TsEngine {
        TsEngine::new(TsConfig::default()).unwrap()
    }

    fn cfg(max_greed: f64) -> TsConfig {
        TsConfig {
            max_greed,
            ..TsConfig::default()
        }
    }

    /// Distinct random ids in 0..64: a root and `n` participants.
    fn random_ids(rng: &mut Rng8, n: usize) -> (NodeId, Vec<NodeId>) {
        let idx: Vec<NodeId> = sample(rng, 64, n + 1).iter().map(|i| i as NodeId).collect();
        (idx[0], idx[1..].to_vec())
    }

    fn ms(n: u64) -> Measurement {
        Measurement::new(n, Duration::from_millis(1))
    }

    /// One push round on virtual time: readiness at random times in 0..50 ms, transfers of random
    /// durations in 1..20 ms. Asserts oracle 7 throughout; returns the root's sum and the
    /// measurement of every transfer.
    fn run_push(
        engine: &TsEngine,
        root: NodeId,
        grads: &BTreeMap<NodeId, Vec<f32>>,
        rng: &mut Rng8,
    ) -> (Vec<f32>, Vec<(NodeId, NodeId, Measurement)>) {
        let ids: Vec<NodeId> = grads.keys().copied().collect();
        let mut push = engine.push_round(root, &ids).unwrap();
        // Event: (time ns, seq, Ok(ready node) | Err(index of the arriving transfer)).
        let mut events = BinaryHeap::<Reverse<(u64, usize, Result<NodeId, usize>)>>::new();
        for (seq, &id) in ids.iter().enumerate() {
            events.push(Reverse((rng.random_range(0..50_000_000u64), seq, Ok(id))));
        }
        let mut partial = BTreeMap::from([(root, vec![0.0f32; 4])]);
        let mut held = BTreeMap::from([(root, 0usize)]);
        let (mut incoming, mut sent) = (BTreeSet::new(), BTreeSet::new());
        let mut flights: Vec<(Transfer, Vec<f32>, Measurement)> = Vec::new();
        while let Some(Reverse((now, _, ev))) = events.pop() {
            let decision = match ev {
                Ok(id) => {
                    partial.insert(id, grads[&id].clone());
                    held.insert(id, 1);
                    push.ready(engine.table(), id).unwrap()
                }
                Err(slot) => {
                    let (t, sum, _) = &flights[slot];
                    let acc = partial.get_mut(&t.to).unwrap();
                    acc.iter_mut().zip(sum).for_each(|(x, y)| *x += *y);
                    *held.get_mut(&t.to).unwrap() += t.contributions;
                    incoming.remove(&t.to);
                    push.merged(engine.table(), t.to).unwrap()
                }
            };
            if let Some(t) = decision {
                assert!(incoming.insert(t.to), "two transfers into {}", t.to);
                assert!(sent.insert(t.from), "{} sent twice", t.from);
                assert_eq!((t.from == root, t.contributions), (false, held[&t.from]));
                let d = Duration::from_nanos(rng.random_range(1_000_000..20_000_000));
                flights.push((t, partial[&t.from].clone(), Measurement::new(1 << 20, d)));
                let (at, slot) = (now + d.as_nanos() as u64, flights.len() - 1);
                events.push(Reverse((at, ids.len() + slot, Err(slot))));
            }
        }
        assert!(push.is_finished());
        assert_eq!(held[&root], ids.len());
        assert_eq!(push.contributions(root), Some(ids.len()));
        assert_eq!(sent.len(), ids.len(), "each participant sends once");
        let reports = flights.iter().map(|(t, _, m)| (t.from, t.to, *m)).collect();
        (partial[&root].clone(), reports)
    }

    /// `schedules` random schedules of `rounds` push rounds each (2..=16 participants, random
    /// prior measurements; each round's measurements feed the next). Calls `check(got, plain)`
    /// for every element of every round.
    fn push_schedules(seed: u64, schedules: usize, rounds: usize, mut check: impl FnMut(f32, f32)) {
        let mut rng = Rng8::seed_from_u64(seed);
        for _ in 0..schedules {
            let n = rng.random_range(2..=16usize);
            let (root, ids) = random_ids(&mut rng, n);
            let mut engine = engine();
            for _ in 0..n {
                let (a, b) = (ids[rng.random_range(0..n)], ids[rng.random_range(0..n)]);
                let rate = rng.random_range(1e6..1e9);
                let _ = engine.table_mut().record_rate(a, b, rate, 0); // refused if a == b
            }
            for _ in 0..rounds {
                // Multiples of 2^-8 with magnitude <= 256: every summation order is exact.
                let mut grad = |_| rng.random_range(-65536..=65536) as f32 / 256.0;
                let mut grads = BTreeMap::<NodeId, Vec<f32>>::new();
                ids.iter()
                    .for_each(|&id| _ = grads.insert(id, (0..4).map(&mut grad).collect()));
                let (sum, reports) = run_push(&engine, root, &grads, &mut rng);
                for (i, &got) in sum.iter().enumerate() {
                    check(got, ids.iter().fold(0.0f32, |acc, id| acc + grads[id][i]));
                }
                engine.advance_round();
                for (from, to, m) in reports {
                    engine.record(from, to, m).unwrap();
                }
            }
        }
    }

    #[test]
    fn oracle6_push_sum_is_exact() {
        let mut checked = 0;
        push_schedules(6, 1000, 2, |got, plain| {
            assert_eq!(got.to_bits(), plain.to_bits(), "{got} != {plain}");
            checked += 1;
        });
        assert_eq!(checked, 1000 * 2 * 4);
    }

    #[test]
    fn oracle7_no_incast_full_count_each_sends_once() {
        // run_push asserts oracle 7 on every transfer and at the end of every round.
        push_schedules(7, 200, 4, |_, _| {});
    }

    /// (from, to, contributions) of a push decision.
    fn ft(r: Result<Option<Transfer>, TsError>) -> Option<(NodeId, NodeId, usize)> {
        r.unwrap().map(|t| (t.from, t.to, t.contributions))
    }

    #[test]
    fn push_pairing_rule() {
        let engine = engine();
        let (mut push, tb) = (engine.push_round(40, &[5, 9, 2]).unwrap(), engine.table());
        // The root is queued first: the first ready participant sends to it.
        assert_eq!(ft(push.ready(tb, 5)), Some((5, 40, 1)));
        assert_eq!(ft(push.ready(tb, 9)), None);
        // No measurement: the later arrival (2) sends to the earlier one (9).
        assert_eq!(ft(push.ready(tb, 2)), Some((2, 9, 1)));
        assert_eq!(ft(push.merged(tb, 40)), None);
        assert_eq!(ft(push.merged(tb, 9)), Some((9, 40, 2)));
        assert!(!push.is_finished());
        assert_eq!(ft(push.merged(tb, 40)), None);
        assert!(push.is_finished() && push.contributions(40) == Some(3));
    }

    #[test]
    fn push_bad_input_is_an_error() {
        let e = engine();
        assert_eq!(e.push_round(1, &[]).err(), Some(NoParticipants));
        assert_eq!(e.push_round(1, &[2, 1]).err(), Some(RootIsParticipant(1)));
        assert_eq!(
            e.push_round(1, &[2, 2]).err(),
            Some(DuplicateParticipant(2))
        );
        let (mut push, tb) = (e.push_round(1, &[2, 3, 4]).unwrap(), e.table());
        assert_eq!(push.ready(tb, 7), Err(NotParticipant(7)));
        assert_eq!(push.ready(tb, 1), Err(NotParticipant(1)));
        assert_eq!(push.merged(tb, 7), Err(NotParticipant(7)));
        assert_eq!(push.merged(tb, 3), Err(NothingToMerge(3)));
        assert_eq!(push.merged(tb, 1), Err(NothingToMerge(1)));
        assert!(push.ready(tb, 2).unwrap().is_some());
        assert_eq!(push.ready(tb, 2), Err(DuplicateReady(2)));
        assert_eq!(push.merged(tb, 2), Err(NothingToMerge(2)));
        assert_eq!(push.ready(tb, 3), Ok(None));
        assert_eq!(push.ready(tb, 3), Err(DuplicateReady(3)));
        assert_eq!(push.contributions(99), None);
    }

    /// One pull round on virtual time: each holder sends to one receiver at a time and reports
    /// the measurement with its next request. Asserts oracle 8; returns the completion time (ns).
    fn run_pull(
        engine: &mut TsEngine,
        (root, ids): (NodeId, &[NodeId]),
        rng: &mut Rng8,
        mut nanos: impl FnMut(NodeId, NodeId, &mut Rng8) -> u64,
    ) -> u64 {
        let mut pull = engine.pull_round(root, ids).unwrap();
        let (mut events, mut asks) = (BinaryHeap::new(), vec![(root, None, None)]);
        let (mut seq, mut now, mut received) = (0u64, 0u64, BTreeMap::<NodeId, usize>::new());
        loop {
            for (holder, last, m) in asks.drain(..) {
                let pick = pull.next_receiver(engine.table_mut(), holder, last, m, rng);
                if let Some(Pick { receiver, .. }) = pick.unwrap() {
                    let d = nanos(holder, receiver, rng);
                    events.push(Reverse((now + d, seq, holder, receiver, d)));
                    seq += 1;
                }
            }
            let Some(Reverse((t, _, from, to, d))) = events.pop() else {
                break;
            };
            now = t;
            pull.delivered(to).unwrap();
            *received.entry(to).or_default() += 1;
            let m = Measurement::new(100_000_000, Duration::from_nanos(d));
            asks.extend([(from, Some(to), Some(m)), (to, None, None)]);
        }
        assert!(pull.is_finished() && received.len() == ids.len());
        assert!(received.values().all(|&c| c == 1), "{received:?}");
        now
    }

    #[test]
    fn oracle8_pull_serves_each_once_and_terminates() {
        let mut rng = Rng8::seed_from_u64(8);
        for _ in 0..300 {
            let n = rng.random_range(1..=16usize);
            let (root, ids) = random_ids(&mut rng, n);
            let mut engine = engine();
            for _ in 0..4 {
                run_pull(&mut engine, (root, &ids), &mut rng, |_, _, r| {
                    r.random_range(1_000_000..20_000_000)
                });
                engine.advance_round();
            }
        }
    }

    /// Share of greedy picks by the root over 10,000 fresh rounds, `known` of 4 links known.
    fn greedy_share(known: usize) -> f64 {
        let (root, ids, mut engine) = (7, [3, 11, 20, 42], engine());
        let tb = engine.table_mut();
        for &u in &ids[..known] {
            tb.record_rate(root, u, f64::from(u + 1), 0).unwrap();
        }
        let best = if known == 1 { 3 } else { 42 }; // the highest known rate
        let (mut rng, mut greedy) = (Rng8::seed_from_u64(9), 0);
        for _ in 0..10_000 {
            let mut pull = engine.pull_round(root, &ids).unwrap();
            let pick = pull.next_receiver(engine.table_mut(), root, None, None, &mut rng);
            let pick = pick.unwrap().unwrap();
            if pick.greedy {
                assert_eq!(pick.receiver, best);
                greedy += 1;
            } else if known == 1 {
                assert_ne!(pick.receiver, best, "exploration picks among the unknown");
            }
        }
        f64::from(greedy) / 10_000.0
    }

    #[test]
    fn oracle9_greedy_rate() {
        assert_eq!(greedy_probability(1, 3, 0.9), 0.25);
        assert_eq!(greedy_probability(4, 0, 0.9), 0.9);
        assert_eq!(greedy_probability(0, 0, 0.9), 0.0);
        let (quarter, capped) = (greedy_share(1), greedy_share(4));
        println!("greedy share: known 1 / unknown 3 -> {quarter:.4}; all known -> {capped:.4}");
        assert!((0.23..=0.27).contains(&quarter), "{quarter}");
        assert!((0.88..=0.92).contains(&capped), "{capped}");
        // Equal rates: the lowest id wins.
        let mut engine = TsEngine::new(cfg(1.0)).unwrap();
        for u in [30, 4, 17] {
            engine.table_mut().record_rate(0, u, 5e6, 0).unwrap();
        }
        let mut pull = engine.pull_round(0, &[30, 4, 17]).unwrap();
        let rng: &mut dyn rand::RngCore = &mut Rng8::seed_from_u64(10); // dyn works too
        let pick = pull.next_receiver(engine.table_mut(), 0, None, None, rng);
        assert_eq!(
            pick.unwrap().map(|p| (p.receiver, p.greedy)),
            Some((4, true))
        );
    }

    #[test]
    fn oracle10_expiry() {
        let mut table = ThroughputTable::new(DEFAULT_EXPIRY_ROUNDS);
        table.record_rate(1, 2, 3e6, 3).unwrap();
        assert_eq!((table.get(1, 2, 8), table.get(1, 2, 9)), (Some(3e6), None));
        assert_eq!(table.get(2, 1, 3), None);
        // Through the engine: pairing 9 (earlier) with 2 (later) uses A[9][2] > A[2][9] = unknown
        // (9 sends) in round r + 5; in round r + 6 it is unknown, so the later arrival (2) sends.
        let mut engine = engine();
        let r = engine.advance_round();
        engine.record(9, 2, ms(1000)).unwrap();
        for (rounds, sender) in [(5, 9), (6, 2)] {
            while engine.round() < r + rounds {
                engine.advance_round();
            }
            let (mut push, tb) = (engine.push_round(40, &[5, 9, 2]).unwrap(), engine.table());
            push.ready(tb, 5).unwrap();
            push.ready(tb, 9).unwrap();
            assert_eq!(
                push.ready(tb, 2).unwrap().unwrap().from,
                sender,
                "r + {rounds}"
            );
        }
        assert!(engine.table().entries.is_empty(), "pruned");
    }

    #[test]
    fn oracle11_units() {
        let t0 = Instant::now(); // a fake clock: only offsets from t0 are used
        let m = Measurement::between(10_000_000, t0, t0 + Duration::from_millis(500)).unwrap();
        let mut engine = engine();
        assert_eq!(engine.record(3, 4, m), Ok(2e7));
        assert_eq!(engine.table().get(3, 4, 0), Some(2e7));
        let back = Measurement::between(1, t0 + Duration::from_millis(1), t0);
        assert_eq!(back, Err(AckBeforeStart));
    }

    #[test]
    fn table_and_config_bad_input_is_an_error() {
        let mut t = ThroughputTable::new(5);
        let zero = Measurement::new(100, Duration::ZERO);
        assert_eq!(t.record(1, 2, zero, 0), Err(ZeroElapsed(100)));
        for (from, rate) in [(1, f64::NAN), (1, f64::INFINITY), (1, -1.0), (2, 1.0)] {
            let err = t.record_rate(from, 2, rate, 0);
            assert!(matches!(err, Err(InvalidRate(..))), "{from} {rate}");
        }
        assert_eq!(t.get(1, 2, 0), None);
        t.record_rate(1, 2, 7.0, 4).unwrap();
        t.record_rate(1, 2, 9.0, 2).unwrap();
        assert_eq!(t.get(1, 2, 4), Some(7.0), "an older stamp is not kept");
        for bad in [1.5, -0.1, f64::NAN] {
            let err = TsEngine::new(cfg(bad)).unwrap_err();
            assert!(matches!(err, InvalidMaxGreed(_)));
            assert!(err.to_string().contains("max_greed"));
        }
    }

    #[test]
    fn pull_bad_input_is_an_error() {
        let (mut engine, mut rng) = (engine(), Rng8::seed_from_u64(11));
        let mut p = engine.pull_round(0, &[1, 2]).unwrap();
        let tb = engine.table_mut();
        let (m, zero) = (Some(ms(10)), Some(Measurement::new(10, Duration::ZERO)));
        let mut ask = |p: &mut PullRound, h, last, m| p.next_receiver(tb, h, last, m, &mut rng);
        assert_eq!(ask(&mut p, 1, None, None), Err(NotHolder(1)));
        assert_eq!(ask(&mut p, 9, None, None), Err(NotHolder(9)));
        assert_eq!(ask(&mut p, 0, Some(1), m), Err(UnknownTransfer(0, 1)));
        assert_eq!(ask(&mut p, 0, None, m), Err(MeasurementWithoutReceiver(0)));
        assert_eq!(p.delivered(1), Err(NotInFlight(1)));
        assert_eq!(p.delivered(5), Err(NotParticipant(5)));
        let first = ask(&mut p, 0, None, None).unwrap().unwrap().receiver;
        assert_eq!(ask(&mut p, 0, None, None), Err(HolderBusy(0, first)));
        // A zero-time measurement is refused and changes nothing: the holder can report again.
        assert_eq!(ask(&mut p, 0, Some(first), zero), Err(ZeroElapsed(10)));
        p.delivered(first).unwrap();
        assert_eq!(p.delivered(first), Err(NotInFlight(first)));
        let second = ask(&mut p, 0, Some(first), m).unwrap().unwrap().receiver;
        assert_eq!(ask(&mut p, first, None, None), Ok(None));
        p.delivered(second).unwrap();
        assert!(p.is_finished());
        assert_eq!(ask(&mut p, 0, Some(second), None), Ok(None));
        assert_eq!(engine.table().get(0, first, 0), Some(10_000.0));
    }

    #[test]
    fn oracle12_four_dcs_one_slow_link_tsengine_beats_star() {
        // The root (global server) and the local servers of 4 DCs. Links run at 100 MB/s ± 20 %
        // (fixed per link), except root <-> DC 4 at 10 MB/s. Bundle: 100 MB. A holder sends to
        // one receiver at a time; links do not share capacity.
        let (root, dcs) = (0, [1, 2, 3, 4]);
        let mut rng = Rng8::seed_from_u64(12);
        let mut nanos = BTreeMap::new();
        for a in 0..5 {
            for b in (0..5).filter(|&b| b != a) {
                let (fast, slow) = (
                    1e8 * rng.random_range(0.8..1.2),
                    a.min(b) == root && a.max(b) == 4,
                );
                let rate = if slow { 1e7 } else { fast };
                nanos.insert((a, b), (1e8 / rate * 1e9) as u64);
            }
        }
        let secs = |ns: u64| ns as f64 / 1e9;
        let star = secs(dcs.iter().map(|&d| nanos[&(root, d)]).sum());
        let (mut engine, mut times) = (engine(), Vec::new());
        let link = |a: NodeId, b: NodeId, _: &mut Rng8| nanos[&(a, b)];
        for _ in 0..20 {
            times.push(secs(run_pull(&mut engine, (root, &dcs), &mut rng, link)));
            engine.advance_round();
        }
        let mean = times.iter().sum::<f64>() / 20.0;
        let worst = times.iter().copied().fold(0.0, f64::max);
        println!(
            "oracle 12: star {star:.2} s; TSEngine round 1 {:.2} s, mean of 20 rounds {mean:.2} s, \
             worst {worst:.2} s; per round {times:.2?}",
            times[0]
        );
        assert!(mean < star, "{mean} >= {star}");
    }
}
