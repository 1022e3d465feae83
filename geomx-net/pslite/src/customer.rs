//! Customers: ps-lite's per-app objects (a `KVWorker`, `KVServer` or `SimpleApp` is one), their
//! requests in flight, the requests they serve, and the callback into C / C++.
//!
//! # Threads
//! A customer's callback runs on geomx's threads:
//! * requests to the customer: the data endpoint's driver thread that read them (or a short-lived
//!   backlog thread for requests that waited for the customer to exist or to get a handler);
//! * responses to its requests: the thread inside `gxps_wait` for that timestamp, the customer's
//!   completer thread (requests nobody waits for), or the data endpoint's driver thread (responses
//!   a server sent after deferring them).
//!
//! Calls of one customer's callback never overlap (a per-customer lock, re-entrant so that a
//! callback may itself wait), as with ps-lite's one receive thread per customer.
//!
//! # Replies stay in order
//! A server answers each request inside its handler call, or the library answers "deferred" right
//! after the handler returns and the real response travels later as its own message. So every
//! request gets its reply promptly and in order, and a requester waiting on one reply never
//! holds up the others for long.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use geomx_net::{NetError, PayloadCodec, Pending, Responder, Response};

use crate::codec::{self, Meta, F_DEFERRED, F_ERROR, F_PULL, F_PUSH, F_REQUEST, F_SIMPLE, MAX_ID};
use crate::error::{PsError, Result};
use crate::keep::{Keeper, Kept};
use crate::message::{Delivery, GxMessage, Header, OutView};
use crate::node;

/// The C callback of a customer (`gxps_callback`): gets each received message; returns 0, or
/// non-zero with a NUL-terminated reason written into `err` (at most `err_cap` bytes).
pub type Callback = unsafe extern "C" fn(
    ctx: *mut c_void,
    msg: *const GxMessage,
    err: *mut c_char,
    err_cap: usize,
) -> i32;

/// How long an unclaimed request without a user callback waits for a `Wait` before the completer
/// thread takes it.
const LAZY: Duration = Duration::from_millis(2);
/// The completer polls (every [`LAZY`]) rather than sleeping until woken for this long after
/// its last request, so a busy customer's sends do not wake it one by one.
const IDLE_SLEEP: Duration = Duration::from_millis(100);
/// Waits on a request are bounded only by the connection's failure.
pub(crate) const FOREVER: Duration = Duration::from_secs(30 * 24 * 3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Target {
    f: Callback,
    ctx: *mut c_void,
}

// SAFETY: `gxps_customer_new`'s contract: `ctx` may be used from any thread until
// `gxps_customer_free` returns, and the callback is thread-safe (calls never overlap: CallLock).
unsafe impl Send for Target {}
// SAFETY: as above.
unsafe impl Sync for Target {}

/// A re-entrant lock serialising a customer's callback calls.
#[derive(Default)]
struct CallLock {
    state: Mutex<CallState>,
    cv: Condvar,
}

#[derive(Default)]
struct CallState {
    holder: Option<ThreadId>,
    depth: u32,
    /// Threads waiting to enter (a release wakes one only if there is one).
    waiting: u32,
}

struct CallGuard<'a>(&'a CallLock);

impl CallLock {
    fn enter(&self) -> CallGuard<'_> {
        let me = std::thread::current().id();
        let mut s = lock(&self.state);
        while s.holder.is_some() && s.holder != Some(me) {
            s.waiting += 1;
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            s.waiting -= 1;
        }
        s.holder = Some(me);
        s.depth += 1;
        CallGuard(self)
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.depth -= 1;
        if s.depth == 0 {
            s.holder = None;
            if s.waiting > 0 {
                self.0.cv.notify_one();
            }
        }
    }
}

/// A request received by the data endpoint, on its way to a customer.
pub(crate) struct Inbound {
    /// ps-lite node id of the requester.
    pub sender: i32,
    /// Decoded meta.
    pub meta: Meta,
    /// `aux` field.
    pub aux: u32,
    /// Frame key.
    pub key: u64,
    /// Payload.
    pub payload: Vec<u8>,
    /// Where the answer goes.
    pub reply: Responder,
    /// Arrival time (requests waiting for their customer expire).
    pub since: Instant,
}

impl Inbound {
    fn refuse(self, why: &str) {
        geomx_net::bufpool::recycle(self.payload);
        let _ = self.reply.error(why);
    }
}

/// One request of this customer to one node, until its response is delivered.
struct Slice {
    recver: i32,
    proc_id: i32,
    meta: Meta,
    pending: Option<Pending>,
    claimed: bool,
    deferred: bool,
    answered: bool,
}

impl Slice {
    fn header(&self) -> Header {
        Header {
            request: false,
            meta: self.meta,
            sender: self.recver,
        }
    }
}

#[derive(Clone, Copy)]
struct FifoItem {
    ts: i32,
    recver: i32,
    since: Instant,
    urgent: bool,
}

#[derive(Default)]
struct Table {
    slices: HashMap<i32, Vec<Slice>>,
    fifo: VecDeque<FifoItem>,
    sleeping: bool,
    stop: bool,
}

impl Table {
    fn find(&mut self, ts: i32, recver: i32) -> Option<&mut Slice> {
        self.slices
            .get_mut(&ts)?
            .iter_mut()
            .find(|s| s.recver == recver)
    }

    fn remove(&mut self, ts: i32, recver: i32) -> Option<Slice> {
        let v = self.slices.get_mut(&ts)?;
        let i = v.iter().position(|s| s.recver == recver)?;
        let s = v.swap_remove(i);
        if v.is_empty() {
            self.slices.remove(&ts);
        }
        Some(s)
    }
}

#[derive(Default)]
struct Inbox {
    queue: VecDeque<Inbound>,
    draining: bool,
}

type ServedKey = (i32, i32, i32);

/// A request this customer received and has not answered.
struct Served {
    responder: Option<Responder>,
    deferred: bool,
    meta: Meta,
    key: u64,
}

/// A customer (ps-lite `Customer`): identity, callback, requests in flight and served.
pub struct CustomerCore {
    /// The handle C holds.
    pub handle: u64,
    /// Application id.
    pub app_id: i32,
    /// Customer id (unique per app in a process).
    pub customer_id: i32,
    target: Target,
    call: CallLock,
    closed: AtomicBool,
    active: AtomicBool,
    table: Mutex<Table>,
    table_cv: Condvar,
    inbox: Mutex<Inbox>,
    served: Mutex<HashMap<ServedKey, Served>>,
}

struct Registry {
    by_handle: HashMap<u64, Arc<CustomerCore>>,
    by_key: HashMap<(i32, i32), u64>,
    parked: HashMap<(i32, i32), VecDeque<Inbound>>,
    next: u64,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    Mutex::new(Registry {
        by_handle: HashMap::new(),
        by_key: HashMap::new(),
        parked: HashMap::new(),
        next: 1,
    })
});

/// Creates a customer. `active`: whether it handles requests now (a `KVServer` becomes active
/// when it gets its request handler). Requests that arrived for it before are handed over.
pub fn create(
    app_id: i32,
    customer_id: i32,
    active: bool,
    f: Callback,
    ctx: *mut c_void,
) -> Result<u64> {
    for (what, v) in [("app id", app_id), ("customer id", customer_id)] {
        if !(0..=MAX_ID).contains(&v) {
            return Err(PsError::Invalid(format!(
                "{what} {v} is outside 0..={MAX_ID}"
            )));
        }
    }
    let core = {
        let mut reg = lock(&REGISTRY);
        if reg.by_key.contains_key(&(app_id, customer_id)) {
            return Err(PsError::Invalid(format!(
                "customer {customer_id} of app {app_id} already exists in this process"
            )));
        }
        let handle = reg.next;
        reg.next += 1;
        let core = Arc::new(CustomerCore {
            handle,
            app_id,
            customer_id,
            target: Target { f, ctx },
            call: CallLock::default(),
            closed: AtomicBool::new(false),
            active: AtomicBool::new(active),
            table: Mutex::new(Table::default()),
            table_cv: Condvar::new(),
            inbox: Mutex::new(Inbox {
                queue: reg
                    .parked
                    .remove(&(app_id, customer_id))
                    .unwrap_or_default(),
                draining: false,
            }),
            served: Mutex::new(HashMap::new()),
        });
        reg.by_handle.insert(handle, core.clone());
        reg.by_key.insert((app_id, customer_id), handle);
        core
    };
    let c2 = core.clone();
    if let Err(e) = std::thread::Builder::new()
        .name(format!("geomx-ps-c{app_id}.{customer_id}"))
        .spawn(move || completer(c2))
    {
        free(core.handle)?;
        return Err(PsError::Net(NetError::from(e)));
    }
    core.start_drain();
    Ok(core.handle)
}

/// The customer behind `handle`.
pub fn get(handle: u64) -> Result<Arc<CustomerCore>> {
    lock(&REGISTRY)
        .by_handle
        .get(&handle)
        .cloned()
        .ok_or_else(|| {
            PsError::NotFound(format!("no customer with handle {handle} (already freed?)"))
        })
}

/// Destroys a customer: no callback runs after this returns; unanswered requests it received are
/// answered with an error, its own requests in flight are dropped.
pub fn free(handle: u64) -> Result<()> {
    let core = {
        let mut reg = lock(&REGISTRY);
        let core = reg.by_handle.remove(&handle).ok_or_else(|| {
            PsError::NotFound(format!("no customer with handle {handle} (freed twice?)"))
        })?;
        reg.by_key.remove(&(core.app_id, core.customer_id));
        core
    };
    core.close();
    Ok(())
}

/// Every live customer.
pub(crate) fn all() -> Vec<Arc<CustomerCore>> {
    lock(&REGISTRY).by_handle.values().cloned().collect()
}

/// The customer (app, customer id), if it exists.
pub(crate) fn find(app_id: i32, customer_id: i32) -> Option<Arc<CustomerCore>> {
    let reg = lock(&REGISTRY);
    let h = reg.by_key.get(&(app_id, customer_id))?;
    reg.by_handle.get(h).cloned()
}

/// Hands a request to customer `to`, or parks it until that customer exists.
pub(crate) fn route(to: (i32, i32), inb: Inbound) {
    let core = {
        let mut reg = lock(&REGISTRY);
        match reg
            .by_key
            .get(&to)
            .and_then(|h| reg.by_handle.get(h))
            .cloned()
        {
            Some(c) => c,
            None => {
                reg.parked.entry(to).or_default().push_back(inb);
                return;
            }
        }
    };
    core.accept(inb);
}

/// Answers requests that waited longer than `max_age` for their customer (or its handler).
pub(crate) fn sweep(now: Instant, max_age: Duration, my_id: i32) {
    let expired = |i: &Inbound| now.saturating_duration_since(i.since) >= max_age;
    let mut refused = Vec::new();
    {
        let mut reg = lock(&REGISTRY);
        for ((app, cust), q) in reg.parked.iter_mut() {
            while q.front().is_some_and(expired) {
                if let Some(i) = q.pop_front() {
                    refused.push((
                        i,
                        format!(
                            "node {my_id} has no app {app} customer {cust} (waited {max_age:?})"
                        ),
                    ));
                }
            }
        }
        reg.parked.retain(|_, q| !q.is_empty());
    }
    for core in all() {
        if core.active.load(Ordering::SeqCst) {
            continue;
        }
        let mut ib = lock(&core.inbox);
        while ib.queue.front().is_some_and(expired) {
            if let Some(i) = ib.queue.pop_front() {
                refused.push((
                    i,
                    format!(
                        "app {} customer {} at node {my_id} has no request handler (waited {max_age:?})",
                        core.app_id, core.customer_id
                    ),
                ));
            }
        }
    }
    for (i, why) in refused {
        tracing::warn!(%why, "refusing a request");
        i.refuse(&why);
    }
}

/// Fails every customer's requests in flight (the job aborted).
pub(crate) fn fail_everyone(reason: &str) {
    for c in all() {
        c.fail_all(reason);
    }
}

/// A completer thread: completes requests nobody waits for, oldest first; requests with a user
/// callback at once, others after [`LAZY`] (a `Wait` usually takes them on its own thread first).
fn completer(core: Arc<CustomerCore>) {
    let mut busy_at = Instant::now();
    loop {
        let (ts, recver, pending) = {
            let mut t = lock(&core.table);
            loop {
                if t.stop {
                    return;
                }
                let now = Instant::now();
                if !t.fifo.is_empty() {
                    busy_at = now;
                }
                let mut next_due: Option<Duration> = None;
                let mut pick = None;
                let mut i = 0;
                while i < t.fifo.len() {
                    let it = t.fifo[i];
                    let claimable = t
                        .find(it.ts, it.recver)
                        .is_some_and(|s| !s.claimed && s.pending.is_some());
                    if !claimable {
                        t.fifo.remove(i);
                        continue;
                    }
                    let due = it.since + LAZY;
                    if it.urgent || now >= due {
                        pick = Some(i);
                        break;
                    }
                    let left = due - now;
                    next_due = Some(next_due.map_or(left, |d: Duration| d.min(left)));
                    i += 1;
                }
                if let Some(i) = pick {
                    let it = t.fifo.remove(i).expect("index in range");
                    let s = t.find(it.ts, it.recver).expect("claimable slice");
                    s.claimed = true;
                    let p = s.pending.take().expect("claimable slice has a pending");
                    break (it.ts, it.recver, p);
                }
                if next_due.is_none() && now < busy_at + IDLE_SLEEP {
                    next_due = Some(LAZY);
                }
                t = match next_due {
                    None => {
                        t.sleeping = true;
                        let t = core.table_cv.wait(t).unwrap_or_else(|p| p.into_inner());
                        let mut t = t;
                        t.sleeping = false;
                        t
                    }
                    Some(d) => {
                        core.table_cv
                            .wait_timeout(t, d)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                };
            }
        };
        let r = pending.wait(FOREVER);
        core.finish(ts, recver, r);
    }
}

impl CustomerCore {
    fn invoke(&self, d: Delivery) -> std::result::Result<(), String> {
        let _g = self.call.enter();
        if self.closed.load(Ordering::SeqCst) {
            d.discard();
            return Err(format!(
                "app {} customer {} was destroyed",
                self.app_id, self.customer_id
            ));
        }
        let mut err = [0 as c_char; 1024];
        // SAFETY: the callback and ctx come from gxps_customer_new, whose contract makes them
        // callable from any thread until gxps_customer_free (which waits for this call: CallLock).
        // `d.msg` and the memory it points to stay alive for the call; the buffer's ownership
        // passes to the callee. `err` is writable for its length.
        let rc = unsafe {
            (self.target.f)(
                self.target.ctx,
                &d.msg as *const GxMessage,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        drop(d);
        if rc == 0 {
            return Ok(());
        }
        err[err.len() - 1] = 0;
        // SAFETY: `err` is NUL-terminated (forced just above).
        let text = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Err(if text.is_empty() {
            format!("callback failed with code {rc}")
        } else {
            text
        })
    }

    /// Starts (or stops refusing) request handling and hands over requests that waited.
    pub fn activate(self: &Arc<Self>) {
        self.active.store(true, Ordering::SeqCst);
        self.start_drain();
    }

    fn start_drain(self: &Arc<Self>) {
        {
            let mut ib = lock(&self.inbox);
            if ib.draining || ib.queue.is_empty() || !self.active.load(Ordering::SeqCst) {
                return;
            }
            ib.draining = true;
        }
        let core = self.clone();
        let spawned = std::thread::Builder::new()
            .name("geomx-ps-backlog".into())
            .spawn(move || loop {
                let next = {
                    let mut ib = lock(&core.inbox);
                    match ib.queue.pop_front() {
                        Some(i) => i,
                        None => {
                            ib.draining = false;
                            return;
                        }
                    }
                };
                core.handle_request(next);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the backlog thread");
            lock(&self.inbox).draining = false;
        }
    }

    /// A request arrived for this customer.
    pub(crate) fn accept(self: &Arc<Self>, inb: Inbound) {
        let mut ib = lock(&self.inbox);
        if self.closed.load(Ordering::SeqCst) {
            drop(ib);
            inb.refuse(&format!(
                "app {} customer {} was destroyed",
                self.app_id, self.customer_id
            ));
            return;
        }
        if !self.active.load(Ordering::SeqCst) || ib.draining || !ib.queue.is_empty() {
            ib.queue.push_back(inb);
            return;
        }
        drop(ib);
        self.handle_request(inb);
    }

    fn handle_request(self: &Arc<Self>, inb: Inbound) {
        let key = (inb.sender, inb.meta.customer_id, inb.meta.timestamp);
        let h = Header {
            request: true,
            meta: inb.meta,
            sender: inb.sender,
        };
        let d = match Delivery::data(&h, inb.meta.flags, inb.aux, inb.key, inb.payload) {
            Ok(d) => d,
            Err(e) => {
                let _ = inb.reply.error(&e.to_string());
                return;
            }
        };
        {
            let mut s = lock(&self.served);
            if s.contains_key(&key) {
                drop(s);
                d.discard();
                let _ = inb.reply.error(&format!(
                    "duplicate request: timestamp {} of customer {} at node {} is still unanswered",
                    key.2, key.1, key.0
                ));
                return;
            }
            s.insert(
                key,
                Served {
                    responder: Some(inb.reply),
                    deferred: false,
                    meta: inb.meta,
                    key: inb.key,
                },
            );
        }
        let r = self.invoke(d);
        let mut s = lock(&self.served);
        let Some(rec) = s.get_mut(&key) else { return };
        let Some(resp) = rec.responder.take() else {
            return;
        };
        match r {
            Ok(()) => {
                rec.deferred = true;
                drop(s);
                let _ = resp.send(
                    codec::encode_reply_version(F_DEFERRED, 0),
                    PayloadCodec::Raw,
                    &[],
                );
            }
            Err(e) => {
                s.remove(&key);
                drop(s);
                tracing::warn!(app = self.app_id, error = %e, "request handler failed");
                let _ = resp.error(&format!("request handler failed: {e}"));
            }
        }
    }

    /// Answers a request this customer received (`KVServer::Response`, `SimpleApp::Response`).
    ///
    /// With a `keeper`, the values of a one-key KV response (`out.kv.vals`) stay valid until the
    /// keeper is dropped, so they go to the transport without a copy; it is dropped once they
    /// were sent, or at once on any other path.
    pub fn respond(self: &Arc<Self>, out: &OutView<'_>, keeper: Option<Keeper>) -> Result<()> {
        let key = (out.peer, out.peer_customer_id, out.timestamp);
        let rec = {
            let mut s = lock(&self.served);
            match s.get(&key) {
                Some(r) if r.responder.is_some() || r.deferred => s.remove(&key),
                _ => None,
            }
        }
        .ok_or_else(|| {
            PsError::NotFound(format!(
                "no unanswered request with timestamp {} from customer {} at node {} \
                 (answered already, or not a request to app {})",
                out.timestamp, out.peer_customer_id, out.peer, self.app_id
            ))
        })?;
        let simple = rec.meta.has(F_SIMPLE);
        if simple != (out.flags & F_SIMPLE != 0) {
            return Err(PsError::Invalid(
                "a SimpleApp request needs a SimpleApp response and a KV request a KV response"
                    .into(),
            ));
        }
        let compact_ok =
            rec.meta.has(codec::F_COMPACT) && out.kv.keys.len() == 1 && out.kv.keys[0] == rec.key;
        let laid = (!simple).then(|| codec::layout(&out.kv, compact_ok, take_scratch));
        let (flags, aux, key, payload): (u32, u32, u64, &[u8]) = match &laid {
            None => (F_SIMPLE, 0, 0, out.body),
            Some(o) => (o.flags(), o.aux(), o.key(), o.payload()),
        };
        let version = codec::encode_reply_version(flags, aux);
        let result = match (rec.responder, keeper) {
            (Some(resp), Some(keeper))
                if matches!(laid, Some(codec::Outgoing::Compact { .. })) && !payload.is_empty() =>
            {
                // SAFETY: the compact payload is `out.kv.vals`, valid until the keeper is
                // dropped (gxps_respond_keep's contract).
                let kept = unsafe { Kept::new(payload, keeper) };
                resp.send_owned(version, PayloadCodec::Raw, Box::new(kept))
                    .map_err(PsError::Net)
            }
            (Some(resp), _) => resp
                .send(version, PayloadCodec::Raw, payload)
                .map_err(PsError::Net),
            (None, _) => {
                let meta = Meta {
                    flags: flags | (rec.meta.flags & (F_PUSH | F_PULL | F_SIMPLE)),
                    head: rec.meta.head,
                    app_id: rec.meta.app_id,
                    customer_id: rec.meta.customer_id,
                    timestamp: rec.meta.timestamp,
                };
                node::current().and_then(|n| n.send_oneway(out.peer, &meta, key, aux, payload))
            }
        };
        if let Some(codec::Outgoing::General { payload, .. }) = laid {
            give_scratch(payload);
        }
        result
    }

    /// Sends one request of this customer to node `out.peer` (one slice of a ps-lite request).
    pub fn send(self: &Arc<Self>, out: &OutView<'_>) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(PsError::State("the customer was destroyed".into()));
        }
        let node = node::current()?;
        node.check_alive()?;
        let proc_id = node.topology()?.process_of(out.peer)?;
        let meta = Meta {
            flags: (out.flags & (F_PUSH | F_PULL | F_SIMPLE)) | F_REQUEST,
            head: out.head,
            app_id: self.app_id,
            customer_id: self.customer_id,
            timestamp: out.timestamp,
        };
        {
            let mut t = lock(&self.table);
            let v = t.slices.entry(out.timestamp).or_default();
            if v.iter().any(|s| s.recver == out.peer) {
                return Err(PsError::Invalid(format!(
                    "timestamp {} already has a request to node {} in flight",
                    out.timestamp, out.peer
                )));
            }
            v.push(Slice {
                recver: out.peer,
                proc_id,
                meta,
                pending: None,
                claimed: false,
                deferred: false,
                answered: false,
            });
        }
        match node.send_request(out.peer, &meta, out) {
            Ok(p) => {
                let mut t = lock(&self.table);
                if let Some(s) = t.find(out.timestamp, out.peer) {
                    s.pending = Some(p);
                    t.fifo.push_back(FifoItem {
                        ts: out.timestamp,
                        recver: out.peer,
                        since: Instant::now(),
                        urgent: out.urgent,
                    });
                    if t.sleeping || out.urgent {
                        self.table_cv.notify_one();
                    }
                }
                Ok(())
            }
            Err(e) => {
                lock(&self.table).remove(out.timestamp, out.peer);
                Err(e)
            }
        }
    }

    /// Completes, on the calling thread, this timestamp's requests nobody has taken yet.
    pub fn wait(self: &Arc<Self>, ts: i32) {
        let jobs: Vec<(i32, Pending)> = {
            let mut t = lock(&self.table);
            match t.slices.get_mut(&ts) {
                Some(v) => v
                    .iter_mut()
                    .filter(|s| !s.claimed && s.pending.is_some())
                    .filter_map(|s| {
                        s.claimed = true;
                        s.pending.take().map(|p| (s.recver, p))
                    })
                    .collect(),
                None => Vec::new(),
            }
        };
        for (recver, p) in jobs {
            let r = p.wait(FOREVER);
            self.finish(ts, recver, r);
        }
    }

    /// The reply to slice (ts, recver) arrived (or the request failed).
    fn finish(self: &Arc<Self>, ts: i32, recver: i32, r: std::result::Result<Response, NetError>) {
        let decoded = r.map(|resp| {
            let fv = codec::decode_reply_version(resp.version);
            (resp, fv)
        });
        let (h, outcome) = {
            let mut t = lock(&self.table);
            if let Ok((_, Ok((flags, _)))) = &decoded {
                if flags & F_DEFERRED != 0 {
                    let answered = match t.find(ts, recver) {
                        Some(s) if !s.answered => {
                            s.deferred = true;
                            false
                        }
                        Some(_) => true,
                        None => false,
                    };
                    if answered {
                        t.remove(ts, recver);
                    }
                    return;
                }
            }
            let Some(s) = t.remove(ts, recver) else {
                if let Ok((resp, _)) = decoded {
                    geomx_net::bufpool::recycle(resp.payload);
                }
                return;
            };
            if s.answered {
                // The response already came separately; this is the (late) reply to the request.
                if let Ok((resp, _)) = decoded {
                    geomx_net::bufpool::recycle(resp.payload);
                }
                return;
            }
            (s.header(), decoded)
        };
        let d = match outcome {
            Ok((resp, Ok((flags, aux)))) => {
                let key = resp.key;
                Delivery::data(&h, flags, aux, key, resp.payload)
                    .unwrap_or_else(|e| Delivery::failure(&h, &e))
            }
            Ok((resp, Err(e))) => {
                geomx_net::bufpool::recycle(resp.payload);
                Delivery::failure(&h, &e)
            }
            Err(e) => Delivery::failure(&h, &node::explain(e)),
        };
        if let Err(e) = self.invoke(d) {
            tracing::debug!(error = %e, "response not delivered");
        }
    }

    /// A response that a server sent after deferring it (its own message, not a reply).
    pub(crate) fn deliver_late(
        self: &Arc<Self>,
        from_proc: i32,
        meta: Meta,
        aux: u32,
        key: u64,
        payload: Vec<u8>,
    ) {
        let ts = meta.timestamp;
        let h = {
            let mut t = lock(&self.table);
            let Some(v) = t.slices.get_mut(&ts) else {
                tracing::debug!(ts, from_proc, "late response for no request in flight");
                geomx_net::bufpool::recycle(payload);
                return;
            };
            let pick = v
                .iter()
                .position(|s| s.proc_id == from_proc && s.deferred)
                .or_else(|| v.iter().position(|s| s.proc_id == from_proc && !s.answered));
            let Some(i) = pick else {
                tracing::debug!(ts, from_proc, "late response matches no request");
                geomx_net::bufpool::recycle(payload);
                return;
            };
            let h = v[i].header();
            if v[i].deferred {
                v.swap_remove(i);
                if v.is_empty() {
                    t.slices.remove(&ts);
                }
            } else {
                v[i].answered = true;
            }
            h
        };
        let d = if meta.has(F_ERROR) {
            let text = String::from_utf8_lossy(&payload).into_owned();
            geomx_net::bufpool::recycle(payload);
            Delivery::failure(&h, &PsError::Remote(text))
        } else {
            Delivery::data(&h, meta.flags, aux, key, payload)
                .unwrap_or_else(|e| Delivery::failure(&h, &e))
        };
        if let Err(e) = self.invoke(d) {
            tracing::debug!(error = %e, "late response not delivered");
        }
    }

    /// Fails every request in flight that no thread is waiting on (the job aborted); waited ones
    /// fail when their connection closes.
    pub(crate) fn fail_all(self: &Arc<Self>, reason: &str) {
        let victims: Vec<Header> = {
            let mut t = lock(&self.table);
            let mut out = Vec::new();
            for v in t.slices.values_mut() {
                v.retain(|s| {
                    if s.claimed && !s.deferred {
                        return true;
                    }
                    if !s.answered {
                        out.push(s.header());
                    }
                    false
                });
            }
            t.slices.retain(|_, v| !v.is_empty());
            t.fifo.clear();
            out
        };
        let err = PsError::Aborted(reason.to_string());
        for h in victims {
            let _ = self.invoke(Delivery::failure(&h, &err));
        }
        let parked: Vec<Served> = lock(&self.served).drain().map(|(_, v)| v).collect();
        for rec in parked {
            if let Some(r) = rec.responder {
                let _ = r.error(&format!("job aborted: {reason}"));
            }
        }
    }

    fn close(self: &Arc<Self>) {
        self.closed.store(true, Ordering::SeqCst);
        // Wait for a callback in progress (re-entrant: freeing from inside a callback is fine).
        drop(self.call.enter());
        {
            let mut t = lock(&self.table);
            t.stop = true;
            t.slices.clear();
            t.fifo.clear();
        }
        self.table_cv.notify_all();
        let why = format!(
            "app {} customer {} was destroyed",
            self.app_id, self.customer_id
        );
        let queued: Vec<Inbound> = lock(&self.inbox).queue.drain(..).collect();
        for i in queued {
            i.refuse(&why);
        }
        let served: Vec<(ServedKey, Served)> = lock(&self.served).drain().collect();
        for ((sender, _, _), rec) in served {
            match rec.responder {
                Some(r) => {
                    let _ = r.error(&why);
                }
                None if rec.deferred => {
                    let meta = Meta {
                        flags: F_ERROR | (rec.meta.flags & (F_PUSH | F_PULL | F_SIMPLE)),
                        ..rec.meta
                    };
                    if let Ok(n) = node::current() {
                        let _ = n.send_oneway(sender, &meta, 0, 0, why.as_bytes());
                    }
                }
                None => {}
            }
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest assembly buffer a thread keeps between messages.
const SCRATCH_KEEP: usize = 64 << 20;

/// A reusable buffer for assembling a general message on this thread.
pub(crate) fn take_scratch() -> Vec<u8> {
    SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

/// Returns the assembly buffer.
pub(crate) fn give_scratch(mut v: Vec<u8>) {
    if v.capacity() <= SCRATCH_KEEP {
        v.clear();
        SCRATCH.with(|s| *s.borrow_mut() = v);
    }
}
