//! Sans-IO coordinator logic: fed requests, disconnects and `now`; returns actions.
//!
//! Connections are named by a caller-chosen id `C`, requests by a caller-chosen ticket (u64) that
//! the caller maps to its way of answering.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::{AbortNotice, Hello, Membership, NodeInfo, NodeKey};

/// What the coordinator wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<C> {
    /// Answer request `ticket`: `Ok(payload)` or an error message.
    Reply {
        /// The request.
        ticket: u64,
        /// Payload or error.
        result: Result<Vec<u8>, String>,
    },
    /// Send Shutdown to these connections.
    Shutdown(Vec<C>),
    /// Send this abort notice to these connections.
    Abort(Vec<C>, AbortNotice),
}

/// Where the job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for registrations until the deadline.
    Registering {
        /// Registration deadline.
        deadline: Instant,
    },
    /// Everyone registered.
    Running,
    /// Everyone sent Done; Shutdown was broadcast.
    Finished,
    /// Aborted; the notice was broadcast.
    Aborted(AbortNotice),
}

/// The coordinator state machine.
#[derive(Debug)]
pub struct CoordState<C> {
    expected: BTreeSet<NodeKey>,
    protocol_version: u32,
    config_hash: u64,
    phase: Phase,
    registered: BTreeMap<NodeKey, (C, Hello)>,
    register_tickets: Vec<(C, u64)>,
    conn_node: HashMap<C, NodeKey>,
    barriers: HashMap<String, Vec<(NodeKey, u64)>>,
    done: BTreeSet<NodeKey>,
    membership: Vec<NodeInfo>,
    /// Roles whose loss while running is not fatal (see [`CoordState::with_rejoinable`]).
    rejoinable: BTreeSet<String>,
    /// Processes lost while running that may register again, with their last incarnation.
    lost: BTreeMap<NodeKey, u32>,
    /// Incarnation of every registered process (0: its first registration).
    incarnations: BTreeMap<NodeKey, u32>,
    /// Members expected to reconnect (after a restart of the coordinator, or after their
    /// connection dropped while it may restart), and until when they may (`None`: set at the
    /// next tick, to now + `reattach_window`).
    reattaching: BTreeMap<NodeKey, Option<Instant>>,
    /// `Some`: a member whose connection drops may reconnect within this time
    /// ([`CoordState::with_reattach_window`]).
    reattach_window: Option<Duration>,
    /// Members whose own connection dropped while the job ran (not a restart of this
    /// coordinator): at which incarnation, and when (`None`: set at the next tick). A peer that
    /// lost it too tells a member that was away (stopped, cut off) from one that left it out.
    dropped_at: BTreeMap<NodeKey, (u32, Option<Instant>)>,
    /// The previous tick, and until when drops are this coordinator's own doing: after a gap
    /// of [`STALL`] between ticks (it was stopped), every member's connection drops as it
    /// wakes, and none of them was away.
    last_tick: Option<Instant>,
    stalled_until: Option<Instant>,
}

/// A gap between two ticks this long means the coordinator itself was stopped; drops seen
/// within as long again after it are not the members'.
const STALL: Duration = Duration::from_secs(1);

impl<C: Copy + Eq + Hash + std::fmt::Debug> CoordState<C> {
    /// Expects exactly `expected` processes, each with this version and config hash, by `deadline`.
    pub fn new(
        expected: impl IntoIterator<Item = NodeKey>,
        protocol_version: u32,
        config_hash: u64,
        deadline: Instant,
    ) -> Self {
        CoordState {
            expected: expected.into_iter().collect(),
            protocol_version,
            config_hash,
            phase: Phase::Registering { deadline },
            registered: BTreeMap::new(),
            register_tickets: Vec::new(),
            conn_node: HashMap::new(),
            barriers: HashMap::new(),
            done: BTreeSet::new(),
            membership: Vec::new(),
            rejoinable: BTreeSet::new(),
            lost: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            reattaching: BTreeMap::new(),
            reattach_window: None,
            dropped_at: BTreeMap::new(),
            last_tick: None,
            stalled_until: None,
        }
    }

    /// For a job whose coordinator may restart: a member whose connection drops (or that a
    /// stopped coordinator finds silent) is not lost at once but may reconnect and reattach
    /// within `window`. Past it, it is lost (a rejoinable role) or ends the job; a fresh
    /// registration of a rejoinable one meanwhile is its restart.
    pub fn with_reattach_window(mut self, window: Option<Duration>) -> Self {
        self.reattach_window = window;
        self
    }

    /// A restarted coordinator's state: the running job of `snap`, whose live members reconnect
    /// and reattach ([`Hello::reattach`]) by `deadline`. One that does not is then lost (a
    /// rejoinable role, or one that had sent Done) or aborts the job.
    pub fn restore(snap: super::CoordSnapshot, deadline: Instant) -> Self {
        let keys: Vec<NodeKey> = snap
            .nodes
            .iter()
            .map(|n| NodeKey::new(n.role.clone(), n.dc, n.rank))
            .collect();
        let lost: BTreeMap<NodeKey, u32> = snap
            .lost
            .iter()
            .map(|k| (k.clone(), snap.incarnations.get(k).copied().unwrap_or(0)))
            .collect();
        let incarnations: BTreeMap<NodeKey, u32> = snap
            .incarnations
            .into_iter()
            .filter(|(k, _)| !lost.contains_key(k))
            .collect();
        let mut s = CoordState::new(
            keys.clone(),
            snap.protocol_version,
            snap.config_hash,
            deadline,
        );
        s.phase = Phase::Running;
        s.membership = snap.nodes;
        s.reattaching = keys
            .into_iter()
            .filter(|k| !lost.contains_key(k))
            .map(|k| (k, Some(deadline)))
            .collect();
        s.incarnations = incarnations;
        s.lost = lost;
        s.done = snap.done;
        s
    }

    /// Members expected to reconnect that have not yet.
    pub fn reattaching_count(&self) -> usize {
        self.reattaching.len()
    }

    /// What a restart needs to continue the job, while it runs.
    pub fn snapshot(&self) -> Option<super::CoordSnapshot> {
        if self.phase != Phase::Running {
            return None;
        }
        let mut incarnations = self.incarnations.clone();
        incarnations.extend(self.lost.iter().map(|(k, i)| (k.clone(), *i)));
        Some(super::CoordSnapshot {
            protocol_version: self.protocol_version,
            config_hash: self.config_hash,
            nodes: self.membership.clone(),
            incarnations,
            lost: self.lost.keys().cloned().collect(),
            done: self.done.clone(),
            journal: Vec::new(),
        })
    }

    /// Members now: registered, or (after a restart) still expected to reattach.
    fn members(&self) -> impl Iterator<Item = &NodeKey> {
        self.registered.keys().chain(self.reattaching.keys())
    }

    /// Makes the loss of a running process of one of `roles` non-fatal: it leaves the
    /// membership (its barriers go on without it, the job can finish without it) and may register
    /// again under its old (role, dc, rank), with the next incarnation. Processes that already
    /// sent Done, and every other role, are unaffected.
    pub fn with_rejoinable(mut self, roles: impl IntoIterator<Item = String>) -> Self {
        self.rejoinable = roles.into_iter().collect();
        self
    }

    /// Processes lost while running that have not registered again.
    pub fn lost(&self) -> impl Iterator<Item = &NodeKey> {
        self.lost.keys()
    }

    /// The incarnation of a registered process (0: first registration, +1 per rejoin).
    pub fn incarnation(&self, key: &NodeKey) -> Option<u32> {
        self.incarnations.get(key).copied()
    }

    /// Where member `key` is now, asked by connection `conn`, which must be a registered member
    /// itself (a stranger learns nothing). Answered only while the job runs.
    pub fn locate(&self, conn: C, key: &NodeKey, now: Instant) -> Result<super::Located, String> {
        if !self.conn_node.contains_key(&conn) {
            return Err("only a registered member may locate another".into());
        }
        if self.phase != Phase::Running {
            return Err(format!("{key}: the job is not running"));
        }
        let node = self
            .membership
            .iter()
            .find(|n| n.role == key.role && n.dc == key.dc && n.rank == key.rank)
            .ok_or_else(|| format!("{key} is not in the membership table"))?;
        let live = self.registered.contains_key(key);
        let incarnation = match self.incarnations.get(key) {
            Some(&i) => i,
            None => self.lost.get(key).copied().unwrap_or(0),
        };
        let dropped_ago = match self.dropped_at.get(key) {
            Some(&(i, at)) if i == incarnation => {
                Some(at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)))
            }
            _ => None,
        };
        Ok(super::Located {
            addr: node.addr.clone(),
            incarnation,
            live,
            reattaching: !live && self.reattaching.contains_key(key),
            dropped_ago,
        })
    }

    /// The member connection `conn` speaks for, if it is a registered one.
    pub fn member_of(&self, conn: C) -> Option<&NodeKey> {
        self.conn_node.get(&conn)
    }

    /// The current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The membership table once everyone registered (empty before).
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.membership
    }

    fn err(ticket: u64, msg: String) -> Vec<Action<C>> {
        vec![Action::Reply {
            ticket,
            result: Err(msg),
        }]
    }

    /// A Register request from connection `conn`.
    pub fn on_register(&mut self, conn: C, ticket: u64, hello: Hello) -> Vec<Action<C>> {
        if let Some(incarnation) = hello.reattach {
            return self.reattach(conn, ticket, hello, incarnation);
        }
        let key = hello.node_key();
        if self.phase == Phase::Running
            && self.rejoinable.contains(&key.role)
            && self.reattaching.remove(&key).is_some()
        {
            // Expected to reattach, it registers afresh instead: it was restarted.
            let incarnation = self.incarnations.remove(&key).unwrap_or(0);
            self.lost.insert(key.clone(), incarnation);
        }
        if self.phase == Phase::Running && self.lost.contains_key(&key) {
            return self.rejoin(conn, ticket, hello);
        }
        if self.phase == Phase::Running
            && self.rejoinable.contains(&key.role)
            && self.registered.contains_key(&key)
        {
            return Self::err(ticket, format!("{key} {}", super::STILL_REGISTERED));
        }
        if self.phase == Phase::Finished {
            return Self::err(ticket, super::JOB_FINISHED.into());
        }
        if !matches!(self.phase, Phase::Registering { .. }) {
            return Self::err(ticket, "registration is closed".into());
        }
        if hello.protocol_version != self.protocol_version {
            return Self::err(
                ticket,
                format!(
                    "protocol version {} does not match the coordinator's {}",
                    hello.protocol_version, self.protocol_version
                ),
            );
        }
        if hello.config_hash != self.config_hash {
            return Self::err(
                ticket,
                format!(
                    "config hash {:#018x} does not match the coordinator's {:#018x}",
                    hello.config_hash, self.config_hash
                ),
            );
        }
        let key = hello.node_key();
        if !self.expected.contains(&key) {
            return Self::err(ticket, format!("{key} is not an expected process"));
        }
        if self.registered.contains_key(&key) || self.conn_node.contains_key(&conn) {
            return Self::err(ticket, format!("{key} registered twice"));
        }
        self.conn_node.insert(conn, key.clone());
        self.incarnations.insert(key.clone(), 0);
        self.registered.insert(key, (conn, hello));
        self.register_tickets.push((conn, ticket));
        if self.registered.len() < self.expected.len() {
            return Vec::new();
        }
        // Everyone is here: ids by (dc, role, rank), 1-based.
        self.membership = self
            .registered
            .iter()
            .enumerate()
            .map(|(i, (k, (_, h)))| NodeInfo {
                id: i as u32 + 1,
                role: k.role.clone(),
                dc: k.dc,
                rank: k.rank,
                addr: h.listen_addr.clone(),
            })
            .collect();
        self.phase = Phase::Running;
        let tickets = std::mem::take(&mut self.register_tickets);
        tickets
            .into_iter()
            .map(|(c, t)| {
                let key = &self.conn_node[&c];
                let my_id = self
                    .membership
                    .iter()
                    .find(|n| n.role == key.role && n.dc == key.dc && n.rank == key.rank)
                    .map_or(0, |n| n.id);
                let m = Membership {
                    my_id,
                    nodes: self.membership.clone(),
                    incarnation: 0,
                };
                Action::Reply {
                    ticket: t,
                    result: Ok(m.encode()),
                }
            })
            .collect()
    }

    /// A lost process registers again (checked like a first registration): it is admitted at
    /// once under its old id, with its new address and the next incarnation.
    fn rejoin(&mut self, conn: C, ticket: u64, hello: Hello) -> Vec<Action<C>> {
        if hello.protocol_version != self.protocol_version || hello.config_hash != self.config_hash
        {
            return Self::err(
                ticket,
                format!(
                    "{} rejoining with protocol version {} and config hash {:#018x}; the job \
                     runs {} and {:#018x}",
                    hello.node_key(),
                    hello.protocol_version,
                    hello.config_hash,
                    self.protocol_version,
                    self.config_hash
                ),
            );
        }
        if self.conn_node.contains_key(&conn) {
            return Self::err(ticket, format!("{} registered twice", hello.node_key()));
        }
        let key = hello.node_key();
        let incarnation = self.lost.remove(&key).unwrap_or(0) + 1;
        self.done.remove(&key);
        let Some(node) = self
            .membership
            .iter_mut()
            .find(|n| n.role == key.role && n.dc == key.dc && n.rank == key.rank)
        else {
            return Self::err(ticket, format!("{key} is not in the membership table"));
        };
        node.addr.clone_from(&hello.listen_addr);
        let my_id = node.id;
        self.incarnations.insert(key.clone(), incarnation);
        self.admit_running(conn, ticket, key, hello, my_id, incarnation)
    }

    /// Admits `key` on `conn` into the running job and answers with the membership table.
    fn admit_running(
        &mut self,
        conn: C,
        ticket: u64,
        key: NodeKey,
        hello: Hello,
        my_id: u32,
        incarnation: u32,
    ) -> Vec<Action<C>> {
        self.conn_node.insert(conn, key.clone());
        self.registered.insert(key, (conn, hello));
        let m = Membership {
            my_id,
            nodes: self.membership.clone(),
            incarnation,
        };
        vec![Action::Reply {
            ticket,
            result: Ok(m.encode()),
        }]
    }

    /// A member of the running job reconnects to this (restarted) coordinator, holding
    /// `incarnation`: admitted under its id if it is one the snapshot expects back.
    fn reattach(&mut self, conn: C, ticket: u64, hello: Hello, incarnation: u32) -> Vec<Action<C>> {
        let key = hello.node_key();
        if let Phase::Aborted(n) = &self.phase {
            return Self::err(ticket, format!("job aborted: {n}"));
        }
        if self.phase == Phase::Finished {
            return Self::err(ticket, super::JOB_FINISHED.into());
        }
        if self.phase == Phase::Running && self.registered.contains_key(&key) {
            // Its old connection is not seen closed yet (a coordinator that was stopped wakes to
            // both): the member retries.
            return Self::err(ticket, format!("{key} {}", super::STILL_ATTACHED));
        }
        if self.phase != Phase::Running || !self.reattaching.contains_key(&key) {
            return Self::err(
                ticket,
                format!("{key}: nothing to reattach to (this coordinator did not restart, or it is attached)"),
            );
        }
        if hello.protocol_version != self.protocol_version || hello.config_hash != self.config_hash
        {
            return Self::err(
                ticket,
                format!("{key} reattaching with another protocol version or configuration"),
            );
        }
        let known = self.incarnations.get(&key).copied();
        if known != Some(incarnation) || self.conn_node.contains_key(&conn) {
            return Self::err(
                ticket,
                format!("{key} reattaching as incarnation {incarnation}; the job knows {known:?}"),
            );
        }
        let Some(my_id) = self
            .membership
            .iter()
            .find(|n| n.role == key.role && n.dc == key.dc && n.rank == key.rank)
            .map(|n| n.id)
        else {
            return Self::err(ticket, format!("{key} is not in the membership table"));
        };
        tracing::info!(node = %key, incarnation, "member reattached");
        self.reattaching.remove(&key);
        self.admit_running(conn, ticket, key, hello, my_id, incarnation)
    }

    fn group_members(&self, group: &str) -> Result<BTreeSet<NodeKey>, String> {
        let filter: Box<dyn Fn(&NodeKey) -> bool> = if group == "all" {
            Box::new(|_| true)
        } else if let Some(dc) = group.strip_prefix("dc:") {
            let dc: u32 = dc.parse().map_err(|_| format!("bad group {group:?}"))?;
            Box::new(move |k| k.dc == dc)
        } else if let Some(role) = group.strip_prefix("role:") {
            let role = role.to_string();
            Box::new(move |k| k.role == role)
        } else {
            return Err(format!(
                "bad group {group:?} (expected \"all\", \"dc:N\" or \"role:NAME\")"
            ));
        };
        Ok(self.members().filter(|k| filter(k)).cloned().collect())
    }

    /// A Barrier request for `group` ("all", "dc:N" or "role:NAME").
    pub fn on_barrier(&mut self, conn: C, ticket: u64, group: &str) -> Vec<Action<C>> {
        if self.phase != Phase::Running {
            return Self::err(
                ticket,
                format!(
                    "barrier {group:?} outside the running phase ({:?})",
                    self.phase
                ),
            );
        }
        let Some(key) = self.conn_node.get(&conn).cloned() else {
            return Self::err(ticket, "barrier from an unregistered connection".into());
        };
        let members = match self.group_members(group) {
            Ok(m) => m,
            Err(e) => return Self::err(ticket, e),
        };
        if !members.contains(&key) {
            return Self::err(ticket, format!("{key} is not in group {group:?}"));
        }
        let waiting = self.barriers.entry(group.to_string()).or_default();
        if waiting.iter().any(|(k, _)| *k == key) {
            return Self::err(ticket, format!("{key} entered barrier {group:?} twice"));
        }
        waiting.push((key, ticket));
        self.release_barrier(group)
    }

    /// Releases the barrier of `group` if every current member of it is waiting.
    fn release_barrier(&mut self, group: &str) -> Vec<Action<C>> {
        let Ok(members) = self.group_members(group) else {
            return Vec::new();
        };
        let waiting = self.barriers.get(group).map_or(0, Vec::len);
        if waiting < members.len() {
            return Vec::new();
        }
        let waiting = self.barriers.remove(group).unwrap_or_default();
        waiting
            .into_iter()
            .map(|(_, t)| Action::Reply {
                ticket: t,
                result: Ok(Vec::new()),
            })
            .collect()
    }

    /// Shutdown once every registered process sent Done.
    fn finish_if_done(&mut self) -> Vec<Action<C>> {
        if self.phase != Phase::Running || self.members().any(|k| !self.done.contains(k)) {
            return Vec::new();
        }
        self.phase = Phase::Finished;
        vec![Action::Shutdown(
            self.registered.values().map(|(c, _)| *c).collect(),
        )]
    }

    /// A Done request.
    pub fn on_done(&mut self, conn: C, ticket: u64) -> Vec<Action<C>> {
        let Some(key) = self.conn_node.get(&conn).cloned() else {
            return Self::err(ticket, "done from an unregistered connection".into());
        };
        if self.phase != Phase::Running {
            return Self::err(
                ticket,
                format!("done outside the running phase ({:?})", self.phase),
            );
        }
        self.done.insert(key);
        let mut out = vec![Action::Reply {
            ticket,
            result: Ok(Vec::new()),
        }];
        out.extend(self.finish_if_done());
        out
    }

    /// An Abort request carrying `reason`.
    pub fn on_abort(&mut self, conn: C, ticket: u64, reason: &str) -> Vec<Action<C>> {
        let Some(key) = self.conn_node.get(&conn).cloned() else {
            return Self::err(ticket, "abort from an unregistered connection".into());
        };
        let mut out = vec![Action::Reply {
            ticket,
            result: Ok(Vec::new()),
        }];
        out.extend(self.abort(&key, reason.to_string()));
        out
    }

    /// A connection closed or went silent. Fatal for a registered process that has not sent Done,
    /// unless its role is rejoinable and the job is running: then it leaves the membership (and
    /// so does a rejoinable one that had sent Done; its next incarnation must send Done again).
    pub fn on_disconnect(&mut self, conn: C, reason: &str) -> Vec<Action<C>> {
        let Some(key) = self.conn_node.get(&conn).cloned() else {
            return Vec::new(); // never admitted: nothing to do
        };
        if self.done.contains(&key) {
            // Its part is done, but peers may still need it (a global server answers the final
            // pulls after its Done): a rejoinable one may come back, and must then be done again.
            if self.rejoinable.contains(&key.role) && self.phase == Phase::Running {
                return self.leave(conn, key, reason);
            }
            return Vec::new();
        }
        if self.reattach_window.is_some() && self.phase == Phase::Running {
            tracing::warn!(node = %key, %reason, "connection lost; it may reconnect");
            let incarnation = self.incarnations.get(&key).copied().unwrap_or(0);
            self.dropped_at.insert(key.clone(), (incarnation, None));
            self.conn_node.remove(&conn);
            self.registered.remove(&key);
            self.reattaching.insert(key, None);
            return Vec::new();
        }
        if self.rejoinable.contains(&key.role) {
            match self.phase {
                Phase::Running => return self.leave(conn, key, reason),
                Phase::Registering { .. } => {
                    // Not admitted yet: it may simply register again.
                    self.conn_node.remove(&conn);
                    self.registered.remove(&key);
                    self.incarnations.remove(&key);
                    self.register_tickets.retain(|(c, _)| *c != conn);
                    return Vec::new();
                }
                _ => {}
            }
        }
        self.abort(&key, format!("lost connection: {reason}"))
    }

    /// A rejoinable process was lost: it leaves the membership until it registers again; the
    /// barriers it was not in may now be complete, and so may the job.
    fn leave(&mut self, conn: C, key: NodeKey, reason: &str) -> Vec<Action<C>> {
        tracing::warn!(node = %key, %reason, "process lost; it may rejoin");
        self.conn_node.remove(&conn);
        self.registered.remove(&key);
        let incarnation = self.incarnations.remove(&key).unwrap_or(0);
        self.lost.insert(key.clone(), incarnation);
        let mut out = Vec::new();
        let groups: Vec<String> = self.barriers.keys().cloned().collect();
        for g in groups {
            if let Some(w) = self.barriers.get_mut(&g) {
                w.retain(|(k, _)| *k != key);
            }
            out.extend(self.release_barrier(&g));
        }
        out.extend(self.finish_if_done());
        out
    }

    /// Advances time: the registration deadline, and after a restart the reattach deadline.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action<C>> {
        if self
            .last_tick
            .is_some_and(|t| now.saturating_duration_since(t) >= STALL)
        {
            self.stalled_until = Some(now + STALL);
        }
        self.last_tick = Some(now);
        let stalled = self.stalled_until.is_some_and(|u| now < u);
        self.dropped_at.retain(|_, (_, at)| {
            if at.is_none() && stalled {
                return false;
            }
            at.get_or_insert(now);
            true
        });
        if self.phase == Phase::Running && !self.reattaching.is_empty() {
            let window = self.reattach_window.unwrap_or_default();
            let mut expired = Vec::new();
            for (key, deadline) in self.reattaching.iter_mut() {
                match deadline {
                    None => *deadline = Some(now + window),
                    Some(d) if now >= *d => expired.push(key.clone()),
                    Some(_) => {}
                }
            }
            if expired.is_empty() {
                return Vec::new();
            }
            let mut out = Vec::new();
            for key in expired {
                self.reattaching.remove(&key);
                if self.done.contains(&key) {
                    continue; // its part is done
                }
                if !self.rejoinable.contains(&key.role) {
                    let reason =
                        "lost its connection to the coordinator and did not reconnect".to_string();
                    return self.abort(&key, reason);
                }
                tracing::warn!(node = %key, "did not reconnect to the coordinator; lost");
                let incarnation = self.incarnations.remove(&key).unwrap_or(0);
                self.lost.insert(key, incarnation);
            }
            let groups: Vec<String> = self.barriers.keys().cloned().collect();
            for g in groups {
                out.extend(self.release_barrier(&g));
            }
            out.extend(self.finish_if_done());
            return out;
        }
        match self.phase {
            Phase::Registering { deadline } if now >= deadline => {
                let missing: Vec<String> = self
                    .expected
                    .iter()
                    .filter(|k| !self.registered.contains_key(*k))
                    .map(|k| k.to_string())
                    .collect();
                let who = NodeKey::new("coordinator", 0, 0);
                self.abort(
                    &who,
                    format!("registration timed out; missing: {}", missing.join(", ")),
                )
            }
            _ => Vec::new(),
        }
    }

    fn abort(&mut self, key: &NodeKey, reason: String) -> Vec<Action<C>> {
        if matches!(self.phase, Phase::Finished | Phase::Aborted(_)) {
            return Vec::new();
        }
        let notice = AbortNotice {
            role: key.role.clone(),
            dc: key.dc,
            rank: key.rank,
            reason,
        };
        self.phase = Phase::Aborted(notice.clone());
        let msg = format!("job aborted: {notice}");
        let mut out: Vec<Action<C>> = std::mem::take(&mut self.register_tickets)
            .into_iter()
            .map(|(_, t)| Action::Reply {
                ticket: t,
                result: Err(msg.clone()),
            })
            .collect();
        for (_, waiting) in self.barriers.drain() {
            out.extend(waiting.into_iter().map(|(_, t)| Action::Reply {
                ticket: t,
                result: Err(msg.clone()),
            }));
        }
        out.push(Action::Abort(
            self.registered.values().map(|(c, _)| *c).collect(),
            notice,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(role: &str, dc: u32, rank: u32) -> Hello {
        Hello {
            role: role.into(),
            dc,
            rank,
            listen_addr: format!("10.0.{dc}.{rank}:9000"),
            protocol_version: 1,
            config_hash: 42,
            reattach: None,
        }
    }

    fn expected() -> Vec<NodeKey> {
        vec![
            NodeKey::new("worker", 1, 0),
            NodeKey::new("server", 0, 0),
            NodeKey::new("worker", 0, 1),
            NodeKey::new("worker", 0, 0),
        ]
    }

    /// The tickets of `acts`, all successful replies, ascending.
    fn ok_tickets(acts: &[Action<u32>]) -> Vec<u64> {
        let mut tickets: Vec<u64> = acts
            .iter()
            .map(|a| match a {
                Action::Reply {
                    ticket,
                    result: Ok(_),
                } => *ticket,
                o => panic!("{o:?}"),
            })
            .collect();
        tickets.sort();
        tickets
    }

    fn running(t0: Instant) -> CoordState<u32> {
        let mut s = CoordState::new(expected(), 1, 42, t0 + Duration::from_secs(60));
        // Register in scrambled order; conn id = ticket = 10 + i.
        for (i, (r, d, k)) in [
            ("worker", 0, 1),
            ("worker", 1, 0),
            ("server", 0, 0),
            ("worker", 0, 0),
        ]
        .iter()
        .enumerate()
        {
            s.on_register(10 + i as u32, 10 + i as u64, hello(r, *d, *k));
        }
        s
    }

    #[test]
    fn ids_are_deterministic_by_dc_role_rank() {
        let t0 = Instant::now();
        let mut s = CoordState::new(expected(), 1, 42, t0 + Duration::from_secs(60));
        assert!(s.on_register(1u32, 1, hello("worker", 0, 1)).is_empty());
        assert!(s.on_register(2, 2, hello("worker", 1, 0)).is_empty());
        assert!(s.on_register(3, 3, hello("server", 0, 0)).is_empty());
        let acts = s.on_register(4, 4, hello("worker", 0, 0));
        assert_eq!(acts.len(), 4);
        let table: Vec<(u32, String, u32, u32)> = s
            .nodes()
            .iter()
            .map(|n| (n.id, n.role.clone(), n.dc, n.rank))
            .collect();
        assert_eq!(
            table,
            vec![
                (1, "server".into(), 0, 0),
                (2, "worker".into(), 0, 0),
                (3, "worker".into(), 0, 1),
                (4, "worker".into(), 1, 0)
            ]
        );
        for a in acts {
            let Action::Reply {
                ticket,
                result: Ok(bytes),
            } = a
            else {
                panic!("{a:?}")
            };
            let m = Membership::decode(&bytes).unwrap();
            let want = match ticket {
                1 => 3,
                2 => 4,
                3 => 1,
                4 => 2,
                _ => unreachable!(),
            };
            assert_eq!(m.my_id, want);
            assert_eq!(m.incarnation, 0);
            assert_eq!(m.me().unwrap().addr, s.nodes()[want as usize - 1].addr);
        }
        assert_eq!(s.phase(), &Phase::Running);
    }

    #[test]
    fn rejects_mismatch_unknown_and_duplicate() {
        let t0 = Instant::now();
        let mut s: CoordState<u32> =
            CoordState::new(expected(), 1, 42, t0 + Duration::from_secs(60));
        let reject = |acts: Vec<Action<u32>>| match &acts[..] {
            [Action::Reply { result: Err(m), .. }] => m.clone(),
            other => panic!("{other:?}"),
        };
        let mut h = hello("worker", 0, 0);
        h.protocol_version = 2;
        assert!(reject(s.on_register(1, 1, h)).contains("protocol version 2"));
        let mut h = hello("worker", 0, 0);
        h.config_hash = 7;
        assert!(reject(s.on_register(1, 1, h)).contains("config hash"));
        assert!(reject(s.on_register(1, 1, hello("worker", 5, 0))).contains("not an expected"));
        assert!(s.on_register(1, 1, hello("worker", 0, 0)).is_empty());
        assert!(reject(s.on_register(2, 2, hello("worker", 0, 0))).contains("twice"));
        // The rejected attempts left no trace: an unknown peer disconnecting is harmless.
        assert!(s.on_disconnect(2, "gone").is_empty());
    }

    #[test]
    fn barrier_releases_when_group_complete() {
        let t0 = Instant::now();
        let mut s = running(t0);
        // dc:0 = conns 10 (worker 0/1), 12 (server 0/0), 13 (worker 0/0)
        assert!(s.on_barrier(10, 100, "dc:0").is_empty());
        assert!(s.on_barrier(12, 101, "dc:0").is_empty());
        let bad = s.on_barrier(11, 102, "dc:0");
        assert!(matches!(
            &bad[..],
            [Action::Reply {
                ticket: 102,
                result: Err(_)
            }]
        ));
        let acts = s.on_barrier(13, 103, "dc:0");
        let tickets = ok_tickets(&acts);
        assert_eq!(tickets, vec![100, 101, 103]);
        // A barrier can be reused.
        assert!(s.on_barrier(10, 104, "dc:0").is_empty());
    }

    #[test]
    fn done_from_all_broadcasts_shutdown() {
        let t0 = Instant::now();
        let mut s = running(t0);
        for c in 10..13 {
            assert_eq!(s.on_done(c, u64::from(c)).len(), 1);
        }
        // A finished node may disconnect without aborting.
        assert!(s.on_disconnect(10, "closed").is_empty());
        let acts = s.on_done(13, 13);
        assert!(matches!(&acts[1], Action::Shutdown(c) if c.len() == 4));
        assert_eq!(s.phase(), &Phase::Finished);
    }

    #[test]
    fn lost_node_aborts_naming_it_and_fails_barriers() {
        let t0 = Instant::now();
        let mut s = running(t0);
        assert!(s.on_barrier(10, 100, "all").is_empty());
        let acts = s.on_disconnect(11, "connection reset");
        assert!(
            matches!(&acts[0], Action::Reply { ticket: 100, result: Err(m) } if m.contains("worker (dc 1, rank 0)"))
        );
        match &acts[1] {
            Action::Abort(conns, n) => {
                assert_eq!(conns.len(), 4);
                assert_eq!((n.role.as_str(), n.dc, n.rank), ("worker", 1, 0));
                assert!(n.reason.contains("connection reset"));
            }
            o => panic!("{o:?}"),
        }
        assert!(s.on_disconnect(12, "x").is_empty(), "only one abort");
    }

    #[test]
    fn a_rejoinable_process_leaves_and_rejoins_under_its_old_id() {
        let t0 = Instant::now();
        let mut s = running(t0).with_rejoinable(["worker".to_string()]);
        let id = |s: &CoordState<u32>| s.nodes().iter().find(|n| n.dc == 1).map(|n| n.id);
        let before = id(&s);
        // Worker (dc 1, rank 0) is conn 11. Two others wait in barrier "all".
        assert!(s.on_barrier(10, 100, "all").is_empty());
        assert!(s.on_barrier(12, 101, "all").is_empty());
        assert!(s.on_disconnect(11, "connection reset").is_empty());
        assert_eq!(s.phase(), &Phase::Running);
        assert_eq!(s.lost().count(), 1);
        // The barrier now completes without it.
        let acts = s.on_barrier(13, 102, "all");
        assert_eq!(acts.len(), 3, "{acts:?}");
        // A stranger cannot take another live identity, and the lost one rejoins once.
        let refused = s.on_register(20, 200, hello("worker", 0, 0));
        assert!(
            matches!(&refused[..], [Action::Reply { result: Err(m), .. }] if m.contains("still registered"))
        );
        let mut h = hello("worker", 1, 0);
        h.listen_addr = "10.9.9.9:1".into();
        let acts = s.on_register(21, 201, h.clone());
        let [Action::Reply {
            ticket: 201,
            result: Ok(bytes),
        }] = &acts[..]
        else {
            panic!("{acts:?}")
        };
        let m = Membership::decode(bytes).unwrap();
        assert_eq!((Some(m.my_id), m.incarnation), (before, 1));
        assert_eq!(m.me().unwrap().addr, "10.9.9.9:1");
        assert_eq!(s.incarnation(&NodeKey::new("worker", 1, 0)), Some(1));
        assert_eq!(s.lost().count(), 0);
        let twice = s.on_register(22, 202, h);
        assert!(matches!(&twice[..], [Action::Reply { result: Err(_), .. }]));
        // Lost again: incarnation 2 next time.
        assert!(s.on_disconnect(21, "killed").is_empty());
        let acts = s.on_register(23, 203, hello("worker", 1, 0));
        let [Action::Reply { result: Ok(b), .. }] = &acts[..] else {
            panic!("{acts:?}")
        };
        assert_eq!(Membership::decode(b).unwrap().incarnation, 2);
        // A non-rejoinable role still aborts the job.
        let acts = s.on_disconnect(12, "gone");
        assert!(matches!(acts.last(), Some(Action::Abort(..))), "{acts:?}");
    }

    #[test]
    fn members_locate_a_lost_peer_and_its_next_incarnation_strangers_learn_nothing() {
        let t0 = Instant::now();
        let mut s = running(t0).with_rejoinable(["server".to_string()]);
        let server = NodeKey::new("server", 0, 0);
        // Conn 10 is worker (dc 0, rank 1); the server (conn 12) is live, incarnation 0.
        let l = s.locate(10, &server, t0).unwrap();
        assert_eq!(
            (l.addr.as_str(), l.incarnation, l.live),
            ("10.0.0.0:9000", 0, true)
        );
        assert!(s
            .locate(99, &server, t0)
            .unwrap_err()
            .contains("registered member"));
        let nobody = NodeKey::new("server", 7, 0);
        assert!(s
            .locate(10, &nobody, t0)
            .unwrap_err()
            .contains("not in the membership"));
        // Lost: not live, still at its last incarnation until it registers again.
        assert!(s.on_disconnect(12, "killed").is_empty());
        let l = s.locate(10, &server, t0).unwrap();
        assert_eq!((l.incarnation, l.live, l.reattaching), (0, false, false));
        let mut h = hello("server", 0, 0);
        h.listen_addr = "10.0.0.0:9100".into();
        s.on_register(30, 300, h);
        let l = s.locate(11, &server, t0).unwrap();
        assert_eq!(
            (l.addr.as_str(), l.incarnation, l.live),
            ("10.0.0.0:9100", 1, true)
        );
        // The payloads round-trip, and malformed ones are errors.
        assert_eq!(super::super::Located::decode(&l.encode()).unwrap(), l);
        let away = super::super::Located {
            live: false,
            reattaching: true,
            ..l.clone()
        };
        assert_eq!(super::super::Located::decode(&away.encode()).unwrap(), away);
        let dropped = super::super::Located {
            dropped_ago: Some(Duration::from_millis(1500)),
            ..l.clone()
        };
        assert_eq!(
            super::super::Located::decode(&dropped.encode()).unwrap(),
            dropped
        );
        let mut three = l.encode();
        let n = three.len();
        three[n - 8] = 3;
        assert!(super::super::Located::decode(&three).is_err());
        assert_eq!(NodeKey::decode(&server.encode()).unwrap(), server);
        let mut bad = l.encode();
        bad[n - 5] = 2;
        assert!(super::super::Located::decode(&bad).is_err());
        // A version 3 payload (no drop field) is refused, not misread.
        assert!(super::super::Located::decode(&l.encode()[..n - 4]).is_err());
        assert!(NodeKey::decode(&server.encode()[..5]).is_err());
    }

    #[test]
    fn a_rejoinable_process_lost_while_registering_may_register_again() {
        let t0 = Instant::now();
        let mut s = CoordState::new(expected(), 1, 42, t0 + Duration::from_secs(60))
            .with_rejoinable(["worker".to_string()]);
        assert!(s.on_register(1u32, 1, hello("worker", 0, 0)).is_empty());
        assert!(s.on_register(2, 2, hello("server", 0, 0)).is_empty());
        assert!(s.on_disconnect(1, "killed").is_empty());
        assert!(matches!(s.phase(), Phase::Registering { .. }));
        // A lost server is still fatal.
        let mut strict = CoordState::new(expected(), 1, 42, t0 + Duration::from_secs(60))
            .with_rejoinable(["worker".to_string()]);
        strict.on_register(2u32, 2, hello("server", 0, 0));
        assert!(matches!(
            strict.on_disconnect(2, "x").last(),
            Some(Action::Abort(..))
        ));
        // The worker registers again from a new connection; everyone gets the table once.
        assert!(s.on_register(3, 3, hello("worker", 0, 0)).is_empty());
        assert!(s.on_register(4, 4, hello("worker", 0, 1)).is_empty());
        let acts = s.on_register(5, 5, hello("worker", 1, 0));
        let tickets = ok_tickets(&acts);
        assert_eq!(tickets, vec![2, 3, 4, 5]);
    }

    #[test]
    fn the_job_finishes_without_a_lost_process_that_never_returns() {
        let t0 = Instant::now();
        let mut s = running(t0).with_rejoinable(["worker".to_string()]);
        for c in [10, 12] {
            assert_eq!(s.on_done(c, u64::from(c)).len(), 1);
        }
        assert!(s.on_disconnect(11, "killed").is_empty());
        let acts = s.on_done(13, 13);
        assert!(
            matches!(&acts[1], Action::Shutdown(c) if c.len() == 3),
            "{acts:?}"
        );
        // Too late to rejoin.
        let late = s.on_register(30, 300, hello("worker", 1, 0));
        assert!(
            matches!(&late[..], [Action::Reply { result: Err(m), .. }] if m == super::super::JOB_FINISHED)
        );
    }

    #[test]
    fn a_done_rejoinable_process_lost_before_the_end_may_come_back_and_is_awaited() {
        let t0 = Instant::now();
        let mut s = running(t0).with_rejoinable(["server".to_string()]);
        // The server (conn 12) is done, then killed while the workers still need it.
        assert_eq!(s.on_done(12, 12).len(), 1);
        assert!(s.on_disconnect(12, "killed").is_empty());
        assert_eq!(s.lost().count(), 1);
        let acts = s.on_register(30, 300, hello("server", 0, 0));
        assert!(matches!(&acts[..], [Action::Reply { result: Ok(_), .. }]));
        // Its new incarnation must be done too before the job ends.
        for c in [10, 11, 13] {
            assert_eq!(s.on_done(c, u64::from(c)).len(), 1, "conn {c}");
        }
        assert_eq!(s.phase(), &Phase::Running);
        let acts = s.on_done(30, 30);
        assert!(
            matches!(acts.last(), Some(Action::Shutdown(c)) if c.len() == 4),
            "{acts:?}"
        );
        // A done process of a role that is not rejoinable leaves quietly, as before.
        let mut s = running(t0).with_rejoinable(["server".to_string()]);
        assert_eq!(s.on_done(10, 10).len(), 1);
        assert!(s.on_disconnect(10, "exited").is_empty());
        assert_eq!(s.lost().count(), 0);
    }

    fn reattach(key: (&str, u32, u32), incarnation: u32) -> Hello {
        Hello {
            reattach: Some(incarnation),
            ..hello(key.0, key.1, key.2)
        }
    }

    #[test]
    fn a_restored_coordinator_takes_its_members_back_and_finishes_the_job() {
        let t0 = Instant::now();
        let mut s = running(t0).with_rejoinable(["worker".to_string()]);
        // Worker (dc 1, rank 0), conn 11, is lost and comes back as incarnation 1; worker
        // (dc 0, rank 1), conn 10, is done. Then the coordinator dies.
        assert!(s.on_disconnect(11, "killed").is_empty());
        s.on_register(20, 200, hello("worker", 1, 0));
        assert_eq!(s.on_done(10, 10).len(), 1);
        let mut snap = s.snapshot().unwrap();
        snap.journal = vec![super::super::JournalRecord {
            from: NodeKey::new("worker", 1, 0),
            bytes: vec![0, 255, 7],
        }];
        let bytes = snap.encode();
        let back = super::super::CoordSnapshot::decode(&bytes).unwrap();
        assert_eq!(back, snap);
        let snap = back;
        assert_eq!(snap.incarnations[&NodeKey::new("worker", 1, 0)], 1);
        // A version-1 snapshot (no journal) still reads, with an empty journal.
        let mut v1 = bytes[..bytes.len() - (4 + 4 + 6 + 4 + 4 + 4 + 3)].to_vec();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        let old = super::super::CoordSnapshot::decode(&v1).unwrap();
        assert!(old.journal.is_empty());
        assert_eq!(old.nodes, snap.nodes);
        for cut in [0, 7, bytes.len() - 1] {
            assert!(super::super::CoordSnapshot::decode(&bytes[..cut]).is_err());
        }
        let deadline = t0 + Duration::from_secs(5);
        let mut r: CoordState<u32> =
            CoordState::restore(snap, deadline).with_rejoinable(["worker".to_string()]);
        // Fresh registrations are refused; a stale incarnation is refused; members reattach.
        let fresh = r.on_register(30, 300, hello("server", 0, 0));
        assert!(
            matches!(&fresh[..], [Action::Reply { result: Err(m), .. }] if m.contains("closed"))
        );
        let stale = r.on_register(31, 301, reattach(("worker", 1, 0), 0));
        assert!(
            matches!(&stale[..], [Action::Reply { result: Err(m), .. }] if m.contains("incarnation"))
        );
        for (c, key, inc) in [
            (40, ("worker", 1, 0), 1),
            (41, ("server", 0, 0), 0),
            (42, ("worker", 0, 1), 0),
        ] {
            let acts = r.on_register(c, u64::from(c), reattach(key, inc));
            let [Action::Reply { result: Ok(b), .. }] = &acts[..] else {
                panic!("{key:?}: {acts:?}")
            };
            assert_eq!(Membership::decode(b).unwrap().incarnation, inc);
        }
        let twice = r.on_register(43, 303, reattach(("server", 0, 0), 0));
        assert!(matches!(&twice[..], [Action::Reply { result: Err(_), .. }]));
        // Worker (dc 0, rank 0) is still away: the job does not finish without it...
        for c in [40, 41, 42] {
            assert_eq!(r.on_done(c, u64::from(c)).len(), 1);
        }
        assert_eq!(r.phase(), &Phase::Running);
        // ...and past the deadline a non-rejoinable member that never came back would abort; a
        // worker is rejoinable, so it is lost and the job finishes.
        assert!(r.on_tick(deadline - Duration::from_millis(1)).is_empty());
        let acts = r.on_tick(deadline);
        assert!(
            matches!(acts.last(), Some(Action::Shutdown(c)) if c.len() == 3),
            "{acts:?}"
        );
    }

    #[test]
    fn drops_as_a_stopped_coordinator_wakes_are_not_the_members() {
        let t0 = Instant::now();
        let w = Duration::from_secs(3);
        let mut s = running(t0).with_reattach_window(Some(w));
        let server = NodeKey::new("server", 0, 0);
        assert!(s.on_tick(t0).is_empty());
        // The coordinator was stopped for 2 s: as it wakes every connection drops at once.
        assert!(s.on_disconnect(12, "silent").is_empty());
        let woke = t0 + Duration::from_secs(2);
        assert!(s.on_tick(woke).is_empty());
        assert_eq!(s.locate(10, &server, woke).unwrap().dropped_ago, None);
        // Past the stall, a member's drop is its own again.
        let acts = s.on_register(50, 500, reattach(("server", 0, 0), 0));
        assert!(
            matches!(&acts[..], [Action::Reply { result: Ok(_), .. }]),
            "{acts:?}"
        );
        let mut now = woke;
        for _ in 0..20 {
            now += Duration::from_millis(100);
            assert!(s.on_tick(now).is_empty());
        }
        assert!(s.on_disconnect(50, "silent").is_empty());
        assert!(s.on_tick(now).is_empty());
        let later = now + Duration::from_millis(300);
        assert_eq!(
            s.locate(10, &server, later).unwrap().dropped_ago,
            Some(Duration::from_millis(300))
        );
    }

    #[test]
    fn with_a_reattach_window_a_dropped_member_may_reconnect_and_a_silent_one_ends_the_job() {
        let t0 = Instant::now();
        let w = Duration::from_secs(3);
        let mut s = running(t0)
            .with_rejoinable(["worker".to_string()])
            .with_reattach_window(Some(w));
        // The server (conn 12) drops and reconnects; worker (dc 1, rank 0) (conn 11) drops and is
        // restarted (a fresh registration: its next incarnation).
        assert!(s.on_disconnect(12, "silent").is_empty());
        assert!(s.on_disconnect(11, "killed").is_empty());
        assert!(s.on_tick(t0).is_empty());
        // Meanwhile a peer that locates it learns it is away but not lost, and since when.
        let server = NodeKey::new("server", 0, 0);
        let l = s.locate(10, &server, t0).unwrap();
        assert_eq!((l.live, l.reattaching), (false, true));
        let acts = s.on_register(50, 500, reattach(("server", 0, 0), 0));
        assert!(
            matches!(&acts[..], [Action::Reply { result: Ok(_), .. }]),
            "{acts:?}"
        );
        // Back at the same incarnation, it still shows when its connection dropped: a peer
        // whose link to it broke then learns that it was away too.
        let later = t0 + Duration::from_millis(700);
        let l = s.locate(10, &server, later).unwrap();
        assert_eq!(
            (l.live, l.dropped_ago),
            (true, Some(Duration::from_millis(700)))
        );
        let acts = s.on_register(51, 501, hello("worker", 1, 0));
        let [Action::Reply { result: Ok(b), .. }] = &acts[..] else {
            panic!("{acts:?}")
        };
        assert_eq!(Membership::decode(b).unwrap().incarnation, 1);
        // Its restart (a new incarnation) never dropped; nor did a member that stayed.
        let worker = NodeKey::new("worker", 1, 0);
        assert_eq!(s.locate(10, &worker, later).unwrap().dropped_ago, None);
        let stayed = NodeKey::new("worker", 0, 0);
        assert_eq!(s.locate(10, &stayed, later).unwrap().dropped_ago, None);
        // The server, which is not rejoinable, drops again and stays away: the job ends naming
        // it.
        assert!(s.on_disconnect(50, "silent").is_empty());
        assert!(s.on_tick(t0 + Duration::from_secs(1)).is_empty());
        let acts = s.on_tick(t0 + Duration::from_secs(1) + w);
        assert!(
            matches!(acts.last(), Some(Action::Abort(_, n)) if n.role == "server" && n.reason.contains("did not reconnect")),
            "{acts:?}"
        );
    }

    #[test]
    fn registration_timeout_names_missing() {
        let t0 = Instant::now();
        let mut s: CoordState<u32> =
            CoordState::new(expected(), 1, 42, t0 + Duration::from_secs(60));
        s.on_register(1, 1, hello("worker", 0, 0));
        assert!(s.on_tick(t0 + Duration::from_secs(59)).is_empty());
        let acts = s.on_tick(t0 + Duration::from_secs(60));
        assert!(
            matches!(&acts[0], Action::Reply { ticket: 1, result: Err(m) } if m.contains("server (dc 0, rank 0)") && m.contains("worker (dc 1, rank 0)"))
        );
        assert!(matches!(s.phase(), Phase::Aborted(_)));
    }

    #[test]
    fn payload_codecs_round_trip_and_reject_garbage() {
        let h = hello("local_server", 3, 2);
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let m = Membership {
            my_id: 2,
            nodes: vec![NodeInfo {
                id: 2,
                role: "w".into(),
                dc: 1,
                rank: 0,
                addr: "a".into(),
            }],
            incarnation: 3,
        };
        assert_eq!(Membership::decode(&m.encode()).unwrap(), m);
        let a = AbortNotice {
            role: "w".into(),
            dc: 1,
            rank: 2,
            reason: "r".into(),
        };
        assert_eq!(AbortNotice::decode(&a.encode()).unwrap(), a);
        let enc = h.encode();
        for cut in 0..enc.len() {
            assert!(Hello::decode(&enc[..cut]).is_err());
        }
        let mut long = enc.clone();
        long.push(0);
        assert!(Hello::decode(&long).is_err());
        assert!(Hello::decode(&[0xff; 64]).is_err());
    }
}
