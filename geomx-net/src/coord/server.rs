//! The coordinator process endpoint: [`CoordState`] behind a [`KvServer`].

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::persist::Persister;
use super::state::{Action, CoordState, Phase};
use super::{
    AbortNotice, CoordOptions, CoordSnapshot, Hello, Journal, JournalRecord, NodeInfo, NodeKey,
};
use crate::error::NetError;
use crate::kv::{Handler, KvServer, PeerHandle, Request, Responder};
use crate::wire::{MsgKind, PayloadCodec};
use std::io::{Read, Write};
use std::path::Path;

/// How a coordinated job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordOutcome {
    /// Every process sent Done; Shutdown was broadcast.
    Shutdown,
    /// The job was aborted; the notice was broadcast.
    Aborted(AbortNotice),
}

/// The coordinator: accepts registrations, assigns ids, runs barriers, watches liveness and
/// broadcasts Shutdown / Abort.
pub struct Coordinator {
    server: KvServer,
    shared: Arc<Shared>,
    ticker: Option<JoinHandle<()>>,
    /// Writes the snapshot file (with a state file).
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<CoordState<usize>>,
    /// Actions decided under the state lock, carried out after it is released, in order.
    outbox: Mutex<VecDeque<Action<usize>>>,
    /// Held by the one thread carrying out actions (so they never interleave or reorder).
    sending: Mutex<()>,
    tickets: Mutex<HashMap<u64, Responder>>,
    peers: Mutex<HashMap<usize, PeerHandle>>,
    next_ticket: AtomicU64,
    outcome: Mutex<Option<CoordOutcome>>,
    outcome_cv: Condvar,
    stop: AtomicBool,
    /// `CoordOptions::state_file`: the snapshot file's writer and what waits for it.
    persist: Option<Persister<Action<usize>>>,
    /// What members appended ([`CoordClient::journal`](super::CoordClient::journal)).
    journal: Mutex<Journal>,
    /// Records appended since the snapshot file last took the journal.
    journal_dirty: AtomicBool,
}

/// How often, at most, the ticker writes the snapshot for journal records alone (a membership
/// change writes it at once): records a member appended are on disk within about this long, so
/// that they outlive both the member and this coordinator.
const JOURNAL_PERSIST_EVERY: Duration = Duration::from_millis(100);

/// Writes `bytes` to `path` (creating its directory) through a temporary file, fsync and rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads a coordinator snapshot file (`CoordOptions::state_file`) for [`Coordinator::bind_restored`].
pub fn read_snapshot(path: &Path) -> Result<CoordSnapshot, NetError> {
    const MAX: u64 = 64 << 20;
    let f = std::fs::File::open(path).map_err(|e| NetError::Io(Arc::new(e)))?;
    let mut bytes = Vec::new();
    f.take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| NetError::Io(Arc::new(e)))?;
    if bytes.len() as u64 > MAX {
        return Err(NetError::Protocol(format!(
            "{}: larger than {MAX} bytes",
            path.display()
        )));
    }
    CoordSnapshot::decode(&bytes)
        .map_err(|e| NetError::Protocol(format!("{}: {e}", path.display())))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Runs `f` on the state, then carries out its actions in the order the state decided them.
    /// No network I/O, and no file I/O, happens under the state lock: a peer that stops reading
    /// or a slow disk can delay a send, never the coordinator's bookkeeping.
    fn step(&self, f: impl FnOnce(&mut CoordState<usize>) -> Vec<Action<usize>>) {
        {
            let mut st = lock(&self.state);
            let actions = f(&mut st);
            // On disk before anything the change decided can be sent: a changed membership's
            // snapshot (with the journal as it is then: a member's loss is such a change, so
            // its records are kept) goes to the writer thread, and the actions wait for it
            // (`Persister`). Under the state lock, so snapshots and actions keep the state's
            // order. Lock order: state, then journal, then the persister, then the outbox.
            match &self.persist {
                Some(p) => {
                    if let Some(mut snap) = st.snapshot() {
                        if p.membership_changed(snap.encode()) {
                            self.hand_snapshot(p, &mut snap);
                        }
                    }
                    p.admit(actions, &self.outbox);
                }
                None => lock(&self.outbox).extend(actions),
            }
        }
        self.drain();
    }

    /// Hands the writer the snapshot with the journal if records came since it was last handed
    /// (the ticker's job, at most every [`JOURNAL_PERSIST_EVERY`]). Under the state lock, as a
    /// membership change's, so the two keep the state's order.
    fn persist_journal(&self) {
        let Some(p) = &self.persist else {
            return;
        };
        if !self.journal_dirty.swap(false, Ordering::SeqCst) {
            return;
        }
        let st = lock(&self.state);
        if let Some(mut snap) = st.snapshot() {
            self.hand_snapshot(p, &mut snap);
        }
    }

    /// Hands the writer `snap` with the journal as it is now (the caller holds the state lock,
    /// which orders the hand-overs; lock order: state, then journal).
    fn hand_snapshot(&self, p: &Persister<Action<usize>>, snap: &mut CoordSnapshot) {
        self.journal_dirty.store(false, Ordering::SeqCst);
        snap.journal = lock(&self.journal).records().to_vec();
        p.hand(snap.encode());
    }

    /// Carries out queued actions. One thread at a time; a thread that finds another one doing
    /// it leaves its actions to that one, which looks again after letting go.
    fn drain(&self) {
        loop {
            if lock(&self.outbox).is_empty() {
                return;
            }
            let _one = match self.sending.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            loop {
                let next = lock(&self.outbox).pop_front();
                match next {
                    Some(a) => self.carry_out(a),
                    None => break,
                }
            }
        }
    }

    fn carry_out(&self, a: Action<usize>) {
        match a {
            Action::Reply { ticket, result } => {
                if let Some(r) = lock(&self.tickets).remove(&ticket) {
                    let _ = match result {
                        Ok(p) => r.send(0, PayloadCodec::Raw, &p),
                        Err(m) => r.error(&m),
                    };
                }
            }
            Action::Shutdown(conns) => {
                self.broadcast(&conns, MsgKind::Shutdown, &[]);
                self.finish(CoordOutcome::Shutdown);
            }
            Action::Abort(conns, notice) => {
                tracing::error!(%notice, "aborting the job");
                self.broadcast(&conns, MsgKind::AbortNotice, &notice.encode());
                self.finish(CoordOutcome::Aborted(notice));
            }
        }
    }

    fn broadcast(&self, conns: &[usize], kind: MsgKind, payload: &[u8]) {
        let peers: Vec<PeerHandle> = {
            let p = lock(&self.peers);
            conns.iter().filter_map(|c| p.get(c).cloned()).collect()
        };
        for p in peers {
            if let Err(e) = p.notify(kind, payload) {
                tracing::debug!(peer = %p.addr(), error = %e, "broadcast not delivered");
            }
        }
    }

    fn finish(&self, o: CoordOutcome) {
        let mut g = lock(&self.outcome);
        if g.is_none() {
            *g = Some(o);
        }
        self.outcome_cv.notify_all();
    }

    fn ticket(&self, r: Responder) -> u64 {
        let t = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        lock(&self.tickets).insert(t, r);
        t
    }
}

/// Driver events queued for the coordinator's thread at most.
const EVENT_QUEUE: usize = 4096;

/// What the driver hands the coordinator, in the order it happened.
enum Event {
    Request(Request, Responder),
    Connect(PeerHandle),
    Disconnect(PeerHandle, String),
}

/// The endpoint's handler: hands every event to the coordinator's own thread ([`serve_events`])
/// and returns at once. A state change writes the snapshot file (fsync) under the state lock,
/// which took about a second on a loaded machine; on the driver's thread (an io_uring ring serves
/// every connection from one thread) that silenced every member for as long, and members with a
/// 1 s dead-peer time declared the coordinator lost (seen in CI, 2026-12-06).
struct EventSender(crossbeam_channel::Sender<Event>);

impl EventSender {
    fn send(&self, ev: Event) {
        // The receiver ends only with the coordinator; an event after that has no one to serve.
        let _ = self.0.send(ev);
    }
}

impl Handler for EventSender {
    fn on_request(&self, req: Request, reply: Responder) {
        self.send(Event::Request(req, reply));
    }

    fn on_connect(&self, peer: &PeerHandle) {
        self.send(Event::Connect(peer.clone()));
    }

    fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
        self.send(Event::Disconnect(peer.clone(), reason.to_string()));
    }
}

/// The coordinator's thread: serves the driver's events in order until the endpoint is gone.
fn serve_events(handler: &CoordHandler, events: &crossbeam_channel::Receiver<Event>) {
    for ev in events {
        match ev {
            Event::Request(req, reply) => handler.on_request(req, reply),
            Event::Connect(peer) => handler.on_connect(&peer),
            Event::Disconnect(peer, reason) => handler.on_disconnect(&peer, reason),
        }
    }
}

/// The coordinator's event handling, run on its own thread ([`serve_events`]).
struct CoordHandler(Arc<Shared>);

impl CoordHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        let conn = reply.peer().conn_id();
        let sh = &self.0;
        match req.kind {
            MsgKind::Register => match Hello::decode(&req.payload) {
                // With mutual TLS a process registers only as what its certificate states.
                Ok(h)
                    if reply.peer().identity().is_some_and(|id| {
                        (id.role.as_str(), id.dc, id.rank) != (h.role.as_str(), h.dc, h.rank)
                    }) =>
                {
                    let cert = reply.peer().identity().map(ToString::to_string);
                    let msg = format!(
                        "the certificate of {} may not register as {} dc {} rank {}",
                        cert.unwrap_or_default(),
                        h.role,
                        h.dc,
                        h.rank
                    );
                    tracing::warn!(peer = %reply.peer().addr(), %msg, "registration refused");
                    let _ = reply.error(&msg);
                }
                Ok(h) => {
                    let t = sh.ticket(reply);
                    sh.step(|s| s.on_register(conn, t, h));
                }
                Err(e) => {
                    let _ = reply.error(&e.to_string());
                }
            },
            MsgKind::Barrier => {
                let group = String::from_utf8_lossy(&req.payload).into_owned();
                let t = sh.ticket(reply);
                sh.step(|s| s.on_barrier(conn, t, &group));
            }
            MsgKind::Done => {
                let t = sh.ticket(reply);
                sh.step(|s| s.on_done(conn, t));
            }
            MsgKind::Abort => {
                let reason = String::from_utf8_lossy(&req.payload).into_owned();
                let t = sh.ticket(reply);
                sh.step(|s| s.on_abort(conn, t, &reason));
            }
            // Locate: where a member is now. Answered like any request, after the snapshot of
            // the state it reads (a member admitted is not shown before that is on disk).
            MsgKind::Pull => match NodeKey::decode(&req.payload) {
                Ok(key) => {
                    let t = sh.ticket(reply);
                    sh.step(|s| {
                        let result = s.locate(conn, &key, Instant::now()).map(|l| l.encode());
                        vec![Action::Reply { ticket: t, result }]
                    });
                }
                Err(e) => {
                    let _ = reply.error(&e.to_string());
                }
            },
            // Journal: a member appends a record (bounded; members only).
            MsgKind::Push => {
                let from = lock(&sh.state).member_of(conn).cloned();
                let r = match from {
                    None => Err("only a registered member may append to the journal".to_string()),
                    Some(k) => lock(&sh.journal).append(k, req.payload.to_vec()),
                };
                if r.is_ok() {
                    sh.journal_dirty.store(true, Ordering::SeqCst);
                }
                let _ = match r {
                    Ok(()) => reply.send(0, PayloadCodec::Raw, &[]),
                    Err(m) => {
                        tracing::warn!(peer = %reply.peer().addr(), %m, "journal record refused");
                        reply.error(&m)
                    }
                };
            }
            other => {
                let _ = reply.error(&format!("the coordinator does not serve {other:?}"));
            }
        }
    }

    fn on_connect(&self, peer: &PeerHandle) {
        lock(&self.0.peers).insert(peer.conn_id(), peer.clone());
    }

    fn on_disconnect(&self, peer: &PeerHandle, reason: String) {
        let conn = peer.conn_id();
        self.0.step(|s| s.on_disconnect(conn, &reason));
        lock(&self.0.peers).remove(&conn);
    }
}

impl Coordinator {
    /// Binds `addr` and waits for exactly the `expected` (role, dc, rank) processes.
    pub fn bind(
        addr: impl ToSocketAddrs,
        expected: Vec<(String, u32, u32)>,
        opts: CoordOptions,
    ) -> Result<Coordinator, NetError> {
        let keys = expected.into_iter().map(|(r, d, k)| NodeKey::new(r, d, k));
        let state = CoordState::new(
            keys,
            opts.protocol_version,
            opts.config_hash,
            Instant::now() + opts.registration_timeout,
        );
        Self::start(addr, state, opts, Journal::default())
    }

    /// Binds `addr` as the restart of a coordinator whose running job `snap` holds: its members
    /// reconnect and reattach within the registration timeout (see [`CoordState::restore`]).
    pub fn bind_restored(
        addr: impl ToSocketAddrs,
        snap: CoordSnapshot,
        opts: CoordOptions,
    ) -> Result<Coordinator, NetError> {
        if (snap.protocol_version, snap.config_hash) != (opts.protocol_version, opts.config_hash) {
            return Err(NetError::Protocol(format!(
                "the coordinator snapshot is of protocol version {} and configuration hash \
                 {:#018x}; this coordinator runs {} and {:#018x}",
                snap.protocol_version, snap.config_hash, opts.protocol_version, opts.config_hash
            )));
        }
        let mut journal = Journal::default();
        for r in &snap.journal {
            // Bounded as any append: a snapshot holds no more than the journal may.
            let _ = journal.append(r.from.clone(), r.bytes.clone());
        }
        let state = CoordState::restore(snap, Instant::now() + opts.registration_timeout);
        Self::start(addr, state, opts, journal)
    }

    fn start(
        addr: impl ToSocketAddrs,
        state: CoordState<usize>,
        opts: CoordOptions,
        journal: Journal,
    ) -> Result<Coordinator, NetError> {
        let state = state
            .with_rejoinable(opts.rejoinable.iter().cloned())
            .with_reattach_window(opts.reattach_window);
        let persist = opts.state_file.clone().map(Persister::new);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            outbox: Mutex::new(VecDeque::new()),
            sending: Mutex::new(()),
            tickets: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(1),
            outcome: Mutex::new(None),
            outcome_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            persist,
            journal: Mutex::new(journal),
            journal_dirty: AtomicBool::new(false),
        });
        // The snapshot file's writer (see `Persister`), with a state file.
        let writer = if shared.persist.is_some() {
            let sh = shared.clone();
            let save = move || {
                if let Some(p) = &sh.persist {
                    p.run(write_atomic, &sh.outbox, || sh.drain());
                }
            };
            Some(
                std::thread::Builder::new()
                    .name("geomx-coord-save".into())
                    .spawn(save)?,
            )
        } else {
            None
        };
        // Events are served on a thread of their own (see `EventSender`); it ends when the
        // endpoint, and with it the sender, is gone. Bounded: a flood of requests waits in the
        // sockets (the driver blocks on a full queue), not in memory.
        let (events_tx, events) = crossbeam_channel::bounded(EVENT_QUEUE);
        let handler = CoordHandler(shared.clone());
        std::thread::Builder::new()
            .name("geomx-coord-events".into())
            .spawn(move || serve_events(&handler, &events))?;
        // Requests to the coordinator (registration, barriers) may legitimately wait long.
        let server =
            KvServer::bind_with_id(addr, 0, Arc::new(EventSender(events_tx)), opts.net.clone())?;
        let sh = shared.clone();
        let tick = opts.net.tick.max(Duration::from_millis(10));
        let ticker = std::thread::Builder::new()
            .name("geomx-coord-tick".into())
            .spawn(move || {
                let mut persisted = Instant::now();
                while !sh.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    sh.step(|s| s.on_tick(Instant::now()));
                    if persisted.elapsed() >= JOURNAL_PERSIST_EVERY {
                        persisted = Instant::now();
                        sh.persist_journal();
                    }
                }
            })?;
        Ok(Coordinator {
            server,
            shared,
            ticker: Some(ticker),
            writer,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The membership table once every expected process registered.
    pub fn membership(&self) -> Option<Vec<NodeInfo>> {
        let st = lock(&self.shared.state);
        (!st.nodes().is_empty()).then(|| st.nodes().to_vec())
    }

    /// The journal's records so far, and how many appends it refused.
    pub fn journal(&self) -> (Vec<JournalRecord>, u64) {
        let j = lock(&self.shared.journal);
        (j.records().to_vec(), j.refused())
    }

    /// Members of the running job that have not reconnected yet (after a restart, or after their
    /// connection dropped under a reattach window).
    pub fn reattaching(&self) -> usize {
        lock(&self.shared.state).reattaching_count()
    }

    /// True while waiting for registrations.
    pub fn is_registering(&self) -> bool {
        matches!(lock(&self.shared.state).phase(), Phase::Registering { .. })
    }

    /// Waits up to `timeout` for the job to end (Shutdown or Abort broadcast); `None` if it has not.
    pub fn wait(&self, timeout: Duration) -> Option<CoordOutcome> {
        let g = lock(&self.shared.outcome);
        let (g, _) = self
            .shared
            .outcome_cv
            .wait_timeout_while(g, timeout, |o| o.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
    }

    /// Traffic counted at the coordinator's sockets.
    pub fn stats(&self) -> crate::Counters {
        self.server.stats()
    }

    /// Stops the coordinator (closes every connection).
    pub fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        self.server.shutdown();
        // The snapshots handed so far are written before it ends.
        if let Some(p) = &self.shared.persist {
            p.stop();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown();
    }
}
