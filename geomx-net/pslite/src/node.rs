//! This process's place in the job: the data endpoint, the registration with the scheduler
//! (geomx's [`Coordinator`]), the node table, barriers, failure handling and shutdown.
//!
//! * Every process binds one [`KvServer`] (its *data endpoint*) for the requests of other nodes
//!   and connects [`KvClient`]s to the nodes it sends to, lazily.
//! * The scheduler process runs the [`Coordinator`] on `DMLC_PS_ROOT_PORT`. Every `Start` of a
//!   server or worker registers one (role, rank) with it, as ps-lite counts one node per started
//!   customer; the rank is the first free one (a taken rank is refused and the next is tried).
//!   The registration blocks until everyone registered and returns the node table.
//! * Barriers are counted by the scheduler's data endpoint, per group (ps-lite's group bits), so
//!   every combination of scheduler, servers and workers works.
//! * A process that dies or goes silent aborts the job through the coordinator: everyone's
//!   requests in flight and barriers fail with the coordinator's reason.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use geomx_net::coord::{
    CoordClient, CoordEvent, CoordOptions, CoordOutcome, Coordinator, Hello, Membership,
    PROTOCOL_VERSION,
};
use geomx_net::{
    ConnConfig, FrameHeader, Handler, KvClient, KvServer, MsgKind, NetError, NetOptions,
    PayloadCodec, Pending, Request, Responder,
};

use crate::codec::{self, Meta, F_REQUEST, F_SIMPLE};
use crate::customer::{self, Inbound, FOREVER};
use crate::env::{PsEnv, Role};
use crate::error::{PsError, Result};
use crate::groups::{self, BarrierCounter, ALL_GROUPS, SCHEDULER};
use crate::message::OutView;

/// Largest message (frame) a ps-lite node sends or accepts.
pub const MAX_MESSAGE: usize = 1 << 30;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static CURRENT: Mutex<Option<Arc<Node>>> = Mutex::new(None);
static EVER_FINALIZED: AtomicBool = AtomicBool::new(false);

/// The started node, or why there is none.
pub fn current() -> Result<Arc<Node>> {
    match lock(&CURRENT).as_ref() {
        Some(n) => Ok(n.clone()),
        None if EVER_FINALIZED.load(Ordering::SeqCst) => Err(PsError::State(
            "ps-lite was finalized (Finalize(0) was called); call Start again first".into(),
        )),
        None => Err(PsError::State(
            "ps-lite is not started: call ps::Start first".into(),
        )),
    }
}

/// Turns a transport error into this node's view: after an abort, the abort's reason.
pub fn explain(e: NetError) -> PsError {
    if let Ok(n) = current() {
        if let Some(r) = n.failed() {
            return PsError::Aborted(r);
        }
    }
    PsError::from_request(e)
}

/// The node table from the coordinator's membership.
#[derive(Debug)]
pub struct Topology {
    /// This process's ps-lite node id (the lowest of its registrations).
    pub my_id: i32,
    /// This process's rank within its role.
    pub my_rank: i32,
    addrs: HashMap<i32, String>,
    proc_of: HashMap<i32, i32>,
}

impl Topology {
    fn from_membership(m: &Membership, my_addr: &str) -> Result<Topology> {
        let mut addrs = HashMap::new();
        for n in &m.nodes {
            let id = match n.role.as_str() {
                "scheduler" => SCHEDULER,
                "server" => groups::server_id(n.rank),
                "worker" => groups::worker_id(n.rank),
                other => {
                    return Err(PsError::Protocol(format!(
                        "unexpected role {other:?} in the node table"
                    )))
                }
            };
            addrs.insert(id, n.addr.clone());
        }
        let mut by_addr: HashMap<&str, i32> = HashMap::new();
        for (&id, a) in &addrs {
            let e = by_addr.entry(a.as_str()).or_insert(id);
            *e = (*e).min(id);
        }
        let my_id = *by_addr.get(my_addr).ok_or_else(|| {
            PsError::Protocol(format!("this process ({my_addr}) is not in the node table"))
        })?;
        let proc_of = addrs
            .iter()
            .map(|(&id, a)| (id, by_addr[a.as_str()]))
            .collect();
        Ok(Topology {
            my_id,
            my_rank: groups::id_to_rank(my_id),
            addrs,
            proc_of,
        })
    }

    /// The process (its lowest node id) that owns node `id`.
    pub fn process_of(&self, id: i32) -> Result<i32> {
        self.proc_of
            .get(&id)
            .copied()
            .ok_or_else(|| PsError::Invalid(format!("node {id} doesn't exist in this job")))
    }
}

struct Slot {
    cc: Option<CoordClient>,
    finalized: bool,
    done_sent: Arc<AtomicBool>,
    /// A scheduler customer other than the first: shares the scheduler's registration.
    shared: bool,
}

/// One started process.
pub struct Node {
    /// Launch configuration.
    pub env: PsEnv,
    opts: NetOptions,
    data_addr: String,
    coord_addr: String,
    server: Mutex<Option<KvServer>>,
    coordinator: Mutex<Option<Coordinator>>,
    topo: OnceLock<Topology>,
    clients: Mutex<HashMap<String, KvClient>>,
    slots: Mutex<HashMap<i32, Slot>>,
    slots_cv: Condvar,
    failed: Mutex<Option<String>>,
    barriers: Mutex<BarrierCounter<Responder>>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The data endpoint's request handler (holds the node weakly: the node owns the endpoint).
struct DataHandler {
    node: OnceLock<Weak<Node>>,
}

impl Handler for DataHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        let Some(node) = self.node.get().and_then(Weak::upgrade) else {
            let _ = reply.error("this node is shutting down");
            return;
        };
        // A panic here would end a geomx driver thread: contain it and answer with an error.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match req.kind {
                MsgKind::Barrier => node.on_barrier(req, reply),
                MsgKind::Push => node.on_message(req, reply),
                other => {
                    let _ = reply.error(&format!("a ps-lite node does not serve {other:?}"));
                }
            }));
        if outcome.is_err() {
            tracing::error!(
                "panic while handling a request (the request was answered with an error)"
            );
        }
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn write_port_file(path: &str, port: u16) -> Result<()> {
    let tmp = format!("{path}.tmp{}", std::process::id());
    std::fs::write(&tmp, format!("{port}\n"))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| PsError::Env(format!("GEOMX_PSLITE_PORT_FILE={path:?}: {e}")))
}

fn init_logging(verbose: i32) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if verbose <= 0 && std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    ONCE.call_once(|| {
        let default = if verbose >= 2 { "debug" } else { "info" };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init();
    });
}

/// Starts this process's node (first call) and registers customer `customer_id` with the
/// scheduler; with `do_barrier`, waits until every node started.
pub fn start(
    customer_id: i32,
    do_barrier: bool,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    if customer_id < 0 {
        return Err(PsError::Invalid(format!(
            "customer id {customer_id} is negative"
        )));
    }
    let node = {
        let mut g = lock(&CURRENT);
        match g.as_ref() {
            Some(n) => n.clone(),
            None => {
                let env = PsEnv::parse(lookup)?;
                init_logging(env.verbose);
                let n = Node::create(env)?;
                *g = Some(n.clone());
                n
            }
        }
    };
    node.start_slot(customer_id)?;
    if do_barrier {
        node.barrier(customer_id, ALL_GROUPS)?;
    }
    Ok(())
}

/// Finalizes customer `customer_id` (after a barrier of everyone with `do_barrier`); customer 0
/// also waits for the process's other customers and shuts the node down (the scheduler waits
/// until every process finalized).
pub fn finalize(customer_id: i32, do_barrier: bool) -> Result<()> {
    let node = current()?;
    let (cc, done_sent, shared) = {
        let s = lock(&node.slots);
        match s.get(&customer_id) {
            Some(slot) if slot.finalized => {
                return Err(PsError::State(format!(
                    "Finalize({customer_id}) was already called"
                )))
            }
            Some(slot) => (slot.cc.clone(), slot.done_sent.clone(), slot.shared),
            None => {
                return Err(PsError::State(format!(
                    "Finalize({customer_id}) without Start({customer_id})"
                )))
            }
        }
    };
    if cc.is_none() && !shared {
        return Err(PsError::State(format!(
            "Start({customer_id}) has not completed"
        )));
    }
    let mut result = Ok(());
    if do_barrier {
        result = node.barrier(customer_id, ALL_GROUPS);
    }
    if let Some(cc) = &cc {
        done_sent.store(true, Ordering::SeqCst);
        if let Err(e) = cc.done() {
            if result.is_ok() {
                result = Err(node.failed().map_or(PsError::Net(e), PsError::Aborted));
            }
        }
    }
    {
        let mut s = lock(&node.slots);
        if let Some(slot) = s.get_mut(&customer_id) {
            slot.finalized = true;
        }
    }
    node.slots_cv.notify_all();
    if customer_id == 0 {
        node.shut_down();
    }
    result
}

impl Node {
    fn create(env: PsEnv) -> Result<Arc<Node>> {
        let opts = NetOptions {
            driver: env.driver,
            conn: ConnConfig {
                request_timeout: FOREVER,
                peer_timeout: env.peer_timeout,
                ..ConnConfig::default()
            },
            max_frame: MAX_MESSAGE,
            io_chunk: env.io_chunk,
            ..NetOptions::default()
        };
        let host = env.announce_host()?;
        let any = if host.parse::<Ipv6Addr>().is_ok() {
            "[::]"
        } else {
            "0.0.0.0"
        };
        let handler = Arc::new(DataHandler {
            node: OnceLock::new(),
        });
        let server = KvServer::bind_with_id(
            format!("{any}:{}", env.port),
            0,
            handler.clone(),
            opts.clone(),
        )
        .map_err(|e| {
            PsError::Env(format!(
                "cannot bind this node's endpoint on port {}: {e}",
                env.port
            ))
        })?;
        let data_addr = join_host_port(&host, server.local_addr().port());
        let (coordinator, coord_addr) = if env.role == Role::Scheduler {
            let mut expected = vec![(Role::Scheduler.name().to_string(), 0, 0)];
            expected.extend((0..env.num_servers).map(|r| (Role::Server.name().to_string(), 0, r)));
            expected.extend((0..env.num_workers).map(|r| (Role::Worker.name().to_string(), 0, r)));
            let root_any = if env.root_uri.parse::<Ipv6Addr>().is_ok() {
                "[::]"
            } else {
                "0.0.0.0"
            };
            let c = Coordinator::bind(
                format!("{root_any}:{}", env.root_port),
                expected,
                CoordOptions {
                    net: opts.clone(),
                    protocol_version: PROTOCOL_VERSION,
                    config_hash: env.config_hash(),
                    registration_timeout: env.registration_timeout,
                    rejoinable: Vec::new(),
                    state_file: None,
                    reattach_window: None,
                },
            )
            .map_err(|e| {
                PsError::Env(format!(
                    "the scheduler cannot listen on DMLC_PS_ROOT_PORT={}: {e}",
                    env.root_port
                ))
            })?;
            let port = c.local_addr().port();
            if let Some(f) = &env.port_file {
                write_port_file(f, port)?;
            }
            let local = if root_any == "[::]" {
                "[::1]"
            } else {
                "127.0.0.1"
            };
            (Some(c), format!("{local}:{port}"))
        } else {
            (None, join_host_port(&env.root_uri, env.root_port))
        };
        let barriers = BarrierCounter::new(env.num_servers, env.num_workers);
        let node = Arc::new(Node {
            env,
            opts,
            data_addr,
            coord_addr,
            server: Mutex::new(Some(server)),
            coordinator: Mutex::new(coordinator),
            topo: OnceLock::new(),
            clients: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            slots_cv: Condvar::new(),
            failed: Mutex::new(None),
            barriers: Mutex::new(barriers),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let _ = handler.node.set(Arc::downgrade(&node));
        let n2 = node.clone();
        let t = std::thread::Builder::new()
            .name("geomx-ps-maint".into())
            .spawn(move || n2.maintain())
            .map_err(|e| PsError::Net(NetError::from(e)))?;
        lock(&node.threads).push(t);
        tracing::info!(role = node.env.role.name(), addr = %node.data_addr, "geomx-pslite node started");
        Ok(node)
    }

    /// Why the job aborted, if it did.
    pub fn failed(&self) -> Option<String> {
        lock(&self.failed).clone()
    }

    /// Fails with the abort reason once the job aborted.
    pub fn check_alive(&self) -> Result<()> {
        match self.failed() {
            Some(r) => Err(PsError::Aborted(r)),
            None => Ok(()),
        }
    }

    /// The node table (after registration).
    pub fn topology(&self) -> Result<&Topology> {
        self.topo
            .get()
            .ok_or_else(|| PsError::State("Start has not completed on this process".into()))
    }

    fn explain(&self, e: NetError) -> PsError {
        match self.failed() {
            Some(r) => PsError::Aborted(r),
            None => PsError::from_request(e),
        }
    }

    fn maintain(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            let my_id = self.topo.get().map_or(-1, |t| t.my_id);
            customer::sweep(Instant::now(), self.env.customer_wait, my_id);
            let outcome = lock(&self.coordinator)
                .as_ref()
                .and_then(|c| c.wait(Duration::ZERO));
            if let Some(CoordOutcome::Aborted(n)) = outcome {
                self.fail(&n.to_string());
            }
        }
    }

    fn watch(self: Arc<Self>, cc: CoordClient, done_sent: Arc<AtomicBool>) {
        while !self.stop.load(Ordering::SeqCst) {
            match cc.wait_event(Duration::from_millis(200)) {
                None => {}
                Some(CoordEvent::Shutdown) => return,
                Some(CoordEvent::Abort(n)) => {
                    self.fail(&n.to_string());
                    return;
                }
                Some(CoordEvent::CoordinatorLost(m)) => {
                    if !done_sent.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                        self.fail(&format!("lost the scheduler: {m}"));
                    }
                    return;
                }
            }
        }
    }

    /// Aborts this node: barriers, requests in flight and later calls fail with `reason`.
    pub fn fail(&self, reason: &str) {
        {
            let mut f = lock(&self.failed);
            if f.is_some() {
                return;
            }
            *f = Some(reason.to_string());
        }
        tracing::error!(%reason, "geomx-pslite: the job aborted");
        let waiting = lock(&self.barriers).drain();
        for r in waiting {
            let _ = r.error(&format!("job aborted: {reason}"));
        }
        let clients: Vec<KvClient> = lock(&self.clients).drain().map(|(_, c)| c).collect();
        for c in clients {
            c.close();
        }
        customer::fail_everyone(reason);
        self.slots_cv.notify_all();
    }

    fn start_slot(self: &Arc<Self>, customer_id: i32) -> Result<()> {
        let done_sent = Arc::new(AtomicBool::new(false));
        {
            let mut s = lock(&self.slots);
            if s.contains_key(&customer_id) {
                return Err(PsError::State(format!(
                    "Start({customer_id}) was already called"
                )));
            }
            let shared = self.env.role == Role::Scheduler && !s.is_empty();
            s.insert(
                customer_id,
                Slot {
                    cc: None,
                    finalized: false,
                    done_sent: done_sent.clone(),
                    shared,
                },
            );
            if shared {
                while self.topo.get().is_none() && self.failed().is_none() {
                    s = self
                        .slots_cv
                        .wait_timeout(s, Duration::from_millis(200))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                drop(s);
                return self.check_alive();
            }
        }
        let registered = self.register().and_then(|(cc, m)| {
            let topo = Topology::from_membership(&m, &self.data_addr)?;
            let _ = self.topo.set(topo);
            Ok(cc)
        });
        let cc = match registered {
            Ok(cc) => cc,
            Err(e) => {
                lock(&self.slots).remove(&customer_id);
                self.slots_cv.notify_all();
                return Err(e);
            }
        };
        let (n2, c2) = (self.clone(), cc.clone());
        let t = std::thread::Builder::new()
            .name("geomx-ps-watch".into())
            .spawn(move || n2.watch(c2, done_sent))
            .map_err(|e| PsError::Net(NetError::from(e)))?;
        lock(&self.threads).push(t);
        if let Some(slot) = lock(&self.slots).get_mut(&customer_id) {
            slot.cc = Some(cc);
        }
        self.slots_cv.notify_all();
        Ok(())
    }

    /// Registers one (role, rank) with the scheduler: the first free rank, starting from a
    /// per-process offset so that concurrent processes rarely collide.
    fn register(&self) -> Result<(CoordClient, Membership)> {
        let role = self.env.role;
        let (n, var) = match role {
            Role::Scheduler => (1, "the scheduler"),
            Role::Server => (self.env.num_servers, "DMLC_NUM_SERVER"),
            Role::Worker => (self.env.num_workers, "DMLC_NUM_WORKER"),
        };
        if n == 0 {
            return Err(PsError::Env(format!(
                "{var}=0 but this process is a {}",
                role.name()
            )));
        }
        let deadline = Instant::now() + self.env.registration_timeout;
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64);
        let first = (seed % n as u64) as u32;
        let mut tried = 0;
        while tried < n {
            let rank = (first + tried) % n;
            let hello = Hello {
                role: role.name().into(),
                dc: 0,
                rank,
                listen_addr: self.data_addr.clone(),
                protocol_version: PROTOCOL_VERSION,
                config_hash: self.env.config_hash(),
                reattach: None,
            };
            match CoordClient::register(self.coord_addr.as_str(), hello, self.opts.clone()) {
                Ok(r) => return Ok(r),
                Err(NetError::Rejected(m)) if m.contains("registered twice") => tried += 1,
                Err(NetError::Rejected(m)) => {
                    return Err(PsError::State(format!(
                        "the scheduler at {} refused this {}: {m}",
                        self.coord_addr,
                        role.name()
                    )))
                }
                Err(e) if not_listening(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(PsError::State(format!(
                        "registering with the scheduler at {} (DMLC_PS_ROOT_URI / DMLC_PS_ROOT_PORT): {e}",
                        self.coord_addr
                    )))
                }
            }
        }
        Err(PsError::State(format!(
            "every {} rank (0..{n}) is taken: more {} processes than {var}={n}",
            role.name(),
            role.name()
        )))
    }

    fn client_for(&self, id: i32) -> Result<KvClient> {
        let topo = self.topology()?;
        let addr = topo
            .addrs
            .get(&id)
            .ok_or_else(|| PsError::Invalid(format!("node {id} doesn't exist in this job")))?;
        if let Some(c) = lock(&self.clients).get(addr) {
            if c.closed_reason().is_none() {
                return Ok(c.clone());
            }
        }
        self.check_alive()?;
        let c = KvClient::connect(addr.as_str(), topo.my_id as u32, self.opts.clone())
            .map_err(|e| self.explain(e))?;
        let mut m = lock(&self.clients);
        if let Some(r) = self.failed() {
            c.close();
            return Err(PsError::Aborted(r));
        }
        match m.get(addr) {
            Some(existing) if existing.closed_reason().is_none() => {
                c.close();
                Ok(existing.clone())
            }
            _ => {
                m.insert(addr.clone(), c.clone());
                Ok(c)
            }
        }
    }

    /// Sends one request (a message of a customer to node `peer`).
    pub fn send_request(&self, peer: i32, meta: &Meta, out: &OutView<'_>) -> Result<Pending> {
        let client = self.client_for(peer)?;
        let laid =
            (!meta.has(F_SIMPLE)).then(|| codec::layout(&out.kv, true, customer::take_scratch));
        let (fields, payload) = match &laid {
            None => (codec::encode_request(meta, 0, 0), out.body),
            Some(o) => {
                let m = Meta {
                    flags: meta.flags | o.flags(),
                    ..*meta
                };
                (codec::encode_request(&m, o.key(), o.aux()), o.payload())
            }
        };
        let header = FrameHeader {
            key: fields.key,
            version: fields.version,
            offset: fields.offset,
            total: fields.total,
            ..FrameHeader::new(MsgKind::Push)
        };
        let r = client.request(header, payload).map_err(|e| self.explain(e));
        if let Some(codec::Outgoing::General { payload, .. }) = laid {
            customer::give_scratch(payload);
        }
        r
    }

    /// Sends a response that was deferred (as its own message to the requester's endpoint).
    pub fn send_oneway(
        &self,
        peer: i32,
        meta: &Meta,
        key: u64,
        aux: u32,
        payload: &[u8],
    ) -> Result<()> {
        let client = self.client_for(peer)?;
        let m = Meta {
            flags: meta.flags & !F_REQUEST,
            ..*meta
        };
        let f = codec::encode_request(&m, key, aux);
        let header = FrameHeader {
            key: f.key,
            version: f.version,
            offset: f.offset,
            total: f.total,
            ..FrameHeader::new(MsgKind::Push)
        };
        // The acknowledgement carries nothing: drop it unread.
        client
            .request(header, payload)
            .map(drop)
            .map_err(|e| self.explain(e))
    }

    /// Waits until every member of `group` (ps-lite group bits) entered the barrier.
    pub fn barrier(&self, customer_id: i32, group: i32) -> Result<()> {
        if !(1..=ALL_GROUPS).contains(&group) {
            return Err(PsError::Invalid(format!(
                "barrier group {group} is not in 1..=7"
            )));
        }
        let bit = match self.env.role {
            Role::Scheduler => SCHEDULER,
            Role::Server => groups::SERVER_GROUP,
            Role::Worker => groups::WORKER_GROUP,
        };
        if group & bit == 0 {
            return Err(PsError::Invalid(format!(
                "a {} is not a member of barrier group {group}",
                self.env.role.name()
            )));
        }
        self.topology()?;
        if groups::group_size(group, self.env.num_servers, self.env.num_workers) <= 1 {
            return Ok(());
        }
        self.check_alive()?;
        let c = self.client_for(SCHEDULER)?;
        let mut p = Vec::with_capacity(8);
        p.extend_from_slice(&group.to_le_bytes());
        p.extend_from_slice(&customer_id.to_le_bytes());
        let pending = c
            .request(FrameHeader::new(MsgKind::Barrier), &p)
            .map_err(|e| self.explain(e))?;
        pending.wait(FOREVER).map(drop).map_err(|e| self.explain(e))
    }

    fn on_barrier(&self, req: Request, reply: Responder) {
        if self.env.role != Role::Scheduler {
            let _ = reply.error("barriers are counted by the scheduler");
            return;
        }
        let Some(group) = req
            .payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_le_bytes)
        else {
            let _ = reply.error("malformed barrier request");
            return;
        };
        if !(1..=ALL_GROUPS).contains(&group) {
            let _ = reply.error(&format!("barrier group {group} is not in 1..=7"));
            return;
        }
        let released = {
            let mut b = lock(&self.barriers);
            if let Some(r) = self.failed() {
                drop(b);
                let _ = reply.error(&format!("job aborted: {r}"));
                return;
            }
            b.enter(group, reply)
        };
        if let Ok(Some(all)) = released {
            for r in all {
                let _ = r.send(0, PayloadCodec::Raw, &[]);
            }
        }
    }

    fn on_message(&self, req: Request, reply: Responder) {
        let fields = codec::RequestFields {
            key: req.key,
            version: req.version,
            offset: req.offset,
            total: req.total,
        };
        let (meta, aux) = match codec::decode_request(&fields) {
            Ok(x) => x,
            Err(e) => {
                let _ = reply.error(&e.to_string());
                return;
            }
        };
        let sender = req.sender as i32;
        if !meta.has(F_REQUEST) {
            let _ = reply.send(0, PayloadCodec::Raw, &[]);
            match customer::find(meta.app_id, meta.customer_id) {
                Some(c) => c.deliver_late(sender, meta, aux, req.key, req.payload),
                None => geomx_net::bufpool::recycle(req.payload),
            }
            return;
        }
        // ps-lite routes a request to the customer with the sender's customer id on workers and
        // to the app's customer (id = app id) everywhere else.
        let to = if self.env.role == Role::Worker {
            meta.customer_id
        } else {
            meta.app_id
        };
        customer::route(
            (meta.app_id, to),
            Inbound {
                sender,
                meta,
                aux,
                key: req.key,
                payload: req.payload,
                reply,
                since: Instant::now(),
            },
        );
    }

    fn shut_down(self: &Arc<Self>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        {
            let mut s = lock(&self.slots);
            while s.values().any(|x| !x.finalized) && self.failed().is_none() {
                let now = Instant::now();
                if now >= deadline {
                    tracing::warn!("Finalize(0): other customers of this process never finalized");
                    break;
                }
                s = self
                    .slots_cv
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if self.env.role == Role::Scheduler {
            // The coordinator stays up until every process finalized (or the job aborted).
            loop {
                let outcome = lock(&self.coordinator)
                    .as_ref()
                    .and_then(|c| c.wait(Duration::from_millis(200)));
                if outcome.is_some() || self.failed().is_some() {
                    break;
                }
            }
        }
        {
            let mut g = lock(&CURRENT);
            if g.as_ref().is_some_and(|n| Arc::ptr_eq(n, self)) {
                *g = None;
            }
        }
        EVER_FINALIZED.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let threads: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        let clients: Vec<KvClient> = lock(&self.clients).drain().map(|(_, c)| c).collect();
        for c in clients {
            c.close();
        }
        for slot in lock(&self.slots).values() {
            if let Some(cc) = &slot.cc {
                cc.close();
            }
        }
        if let Some(mut s) = lock(&self.server).take() {
            s.shutdown();
        }
        if let Some(mut c) = lock(&self.coordinator).take() {
            c.shutdown();
        }
        tracing::info!("geomx-pslite node finalized");
    }
}

fn not_listening(e: &NetError) -> bool {
    match e {
        NetError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        ),
        NetError::Timeout(m) => m.starts_with("connect to"),
        _ => false,
    }
}

/// Role, server count, worker count and verbosity of the started node.
pub fn info() -> Result<(Role, u32, u32, i32)> {
    let n = current()?;
    Ok((
        n.env.role,
        n.env.num_servers,
        n.env.num_workers,
        n.env.verbose,
    ))
}

/// This process's node id and rank.
pub fn identity() -> Result<(i32, i32)> {
    let n = current()?;
    let t = n.topology()?;
    Ok((t.my_id, t.my_rank))
}

/// Enters a barrier of `group` for `customer_id`.
pub fn barrier(customer_id: i32, group: i32) -> Result<()> {
    current()?.barrier(customer_id, group)
}
