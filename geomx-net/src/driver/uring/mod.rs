//! io_uring driver (Linux): one ring thread per endpoint moves the bytes of all its connections.
//!
//! * Receives: one `RECV` per connection in flight, all submitted in one batch per loop turn; into
//!   a registered buffer (`READ_FIXED`) when the memlock limit allowed registering the pool, into a
//!   plain scratch buffer otherwise, and straight into the frame's payload buffer for large frames.
//! * Sends: when nothing of the connection is queued in the ring, the sender first writes what the
//!   socket takes at once with non-blocking calls from its own buffer ([`direct`]; no copy, no
//!   round through the ring). The rest (or everything, when the ring has bytes queued) is
//!   handed to the ring: small remainders are copied, queued and coalesced into one `SEND` per
//!   connection and turn; remainders at or above `NetOptions::zerocopy_threshold` go out from the
//!   caller's buffer while the caller waits, with `SEND_ZC`, completed only after the
//!   notification CQE (see [`send_track`]). Large payloads skip the direct write while zero copy
//!   is in use; when the notifications keep saying the kernel copied anyway (as on loopback,
//!   where zero copy measured ~25 % slower), the connection falls back to plain `SEND` and to
//!   direct writes. A send from the ring's own thread (a handler's reply) never waits: what the
//!   socket does not take is copied.
//! * After a receive, the rest of a frame's payload that has already arrived is read at once
//!   into the frame ([`Ring::read_ready`]).
//! * Commands from other threads arrive over a channel; an eventfd wakes the ring when it sleeps.
//! * Client endpoints are *inline*: a caller waiting for a response (or for its zero-copy send)
//!   drives the ring itself, so responses need no thread hand-off; the ring thread steps aside
//!   while callers are active and keeps timers, heartbeats and idle reads going otherwise.

mod direct;
mod send_track;
mod turn_clock;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use self::send_track::{Next, SendTrack, SEND_ZC_REPORT_USAGE};
use super::{feed_input, seal_windows, NetOptions};
use crate::conn::{Connection, Side};
use crate::error::NetError;
use crate::link::{Dispatch, Link, LinkIo, ReplyTx};
use crate::owned::OwnedBytes;
use crate::stats::LiveCounters;
use crate::tcp_state::TcpProgress;
use crate::tls::{Opener, Sealer, SessionParts};
use crate::wire::{Frame, FrameDecoder, HEADER_LEN};
use turn_clock::{Part, Phase, TurnClock};

/// Scratch receive buffer per connection.
const SCRATCH: usize = 256 << 10;
/// Registered receive buffers: count and size (4 MiB pinned per ring at most).
const REG_BUFS: usize = 16;
/// Coalesce queued small frames up to this many bytes per `SEND`.
const COALESCE: usize = 1 << 20;
/// Senders wait while this many bytes are queued for one connection; while it is exceeded on an
/// accepted connection, the ring neither dispatches its received frames nor reads more of its
/// input, so a peer that sends requests and never reads the replies holds at most this plus one
/// reply. A connection this process opened is always read: if both ends of a connection stopped
/// reading while their output was over the bound, neither would ever drain (two processes
/// exchanging large frames both ways, e.g. a worker's pushes and its local server's replies).
const MAX_QUEUED: usize = 16 << 20;
/// An encrypted send seals at most this much before it writes or queues it (at least `io_chunk`):
/// small enough that the receiver opens one window while the sender seals the next.
const SEAL_WINDOW: usize = 256 << 10;
const RING_ENTRIES: u32 = 512;
/// Non-blocking reads of a frame's arrived payload per completed receive (see `read_ready`).
const INLINE_READS: usize = 32;
/// After this many consecutive "copied" zero-copy notifications a connection uses plain `SEND`.
const ZC_GIVE_UP: u32 = 2;

const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const UD_WAKE: u64 = u64::MAX;

fn ud(kind: u64, idx: usize) -> u64 {
    (kind << 56) | idx as u64
}

/// Why io_uring cannot be used, or `None`.
pub(crate) fn probe() -> Option<String> {
    if std::env::var_os("GEOMX_NET_DISABLE_URING").is_some_and(|v| v != "0") {
        return Some("disabled by GEOMX_NET_DISABLE_URING".into());
    }
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if s.trim() == "2" {
            return Some("kernel.io_uring_disabled = 2 (sysctl)".into());
        }
    }
    let ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            return Some(match e.raw_os_error() {
                Some(libc::ENOSYS) => "io_uring_setup: ENOSYS (kernel too old or built without io_uring)".into(),
                Some(libc::EPERM) => {
                    "io_uring_setup: EPERM (kernel.io_uring_disabled = 1 without group membership, or seccomp)"
                        .into()
                }
                _ => format!("io_uring_setup failed: {e}"),
            })
        }
    };
    if !ring.params().is_feature_ext_arg() {
        return Some("kernel lacks IORING_FEAT_EXT_ARG (needs Linux 5.11+)".into());
    }
    let mut p = Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut p) {
        return Some(format!("io_uring probe failed: {e}"));
    }
    for (code, name) in [
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Read::CODE, "READ"),
    ] {
        if !p.is_supported(code) {
            return Some(format!("kernel io_uring lacks {name}"));
        }
    }
    ZC_SUPPORTED.get_or_init(|| p.is_supported(opcode::SendZc::CODE));
    FIXED_SUPPORTED.get_or_init(|| p.is_supported(opcode::ReadFixed::CODE));
    None
}

static ZC_SUPPORTED: OnceLock<bool> = OnceLock::new();
static FIXED_SUPPORTED: OnceLock<bool> = OnceLock::new();

enum Cmd {
    Attach(usize, Box<UConn>),
    Small(usize, Vec<u8>),
    /// A payload sent from the caller's buffer while the caller waits; `head` (the unsent part
    /// of the frame header, possibly empty) goes first.
    Big {
        idx: usize,
        head: Vec<u8>,
        ptr: usize,
        len: usize,
        done: Sender<io::Result<()>>,
    },
    /// A payload handed over, from byte `off` on.
    Owned(usize, OwnedBytes, usize),
    Close(usize),
    Stop,
}

struct Shared {
    tx: Sender<Cmd>,
    sleeping: AtomicBool,
    efd: RawFd,
    next_idx: AtomicUsize,
    /// Client endpoints: callers drive the ring while they wait (no hand-off per response).
    inline: bool,
    /// A caller drove the ring or sent since the ring thread last looked.
    user_active: AtomicBool,
    /// The ring stopped and every connection is gone.
    finished: AtomicBool,
    /// `shutdown` was called: the ring thread stops stepping aside.
    stop_requested: AtomicBool,
    /// This ring's identity (see [`in_turn`]).
    ring_id: u64,
}

thread_local! {
    /// The rings whose turn this thread is running (their callbacks must not wait on them).
    static HELD: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Identity of each ring, for [`HELD`].
static NEXT_RING_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn in_turn(ring: u64) -> bool {
    HELD.with(|h| h.borrow().contains(&ring))
}

impl Shared {
    fn send(&self, cmd: Cmd) -> bool {
        if self.tx.send(cmd).is_err() {
            return false;
        }
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
        }
        true
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Runs one ring turn if nobody else is: the shared lock around the ring.
struct RingCell {
    ring: Mutex<Ring>,
    shared: Arc<Shared>,
}

impl RingCell {
    /// One turn waiting up to `max_wait` for completions; false if another thread holds the ring.
    fn try_turn(&self, max_wait: Duration) -> bool {
        let mut r = match self.ring.try_lock() {
            Ok(r) => r,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        r.turn(max_wait);
        if r.is_finished() {
            self.shared.finished.store(true, Ordering::SeqCst);
        }
        true
    }

    /// Waits for `rx`, driving the ring meanwhile when the endpoint is inline.
    fn drive_until<T>(&self, rx: &Receiver<T>, deadline: Option<Instant>) -> Option<T> {
        loop {
            match rx.try_recv() {
                Ok(v) => return Some(v),
                Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return None;
            }
            let slice = deadline.map_or(Duration::from_millis(50), |d| {
                (d - now).min(Duration::from_millis(50))
            });
            self.shared.user_active.store(true, Ordering::Relaxed);
            if in_turn(self.shared.ring_id)
                || self.shared.finished.load(Ordering::SeqCst)
                || !self.try_turn(slice)
            {
                // Another thread holds the ring: make it return soon, then look again.
                self.shared.kick();
                if let Ok(v) = rx.recv_timeout(slice.min(Duration::from_micros(200))) {
                    return Some(v);
                }
            }
        }
    }
}

impl crate::link::Pump for RingCell {
    fn pump(&self, _link: &Arc<Link>) -> bool {
        if in_turn(self.shared.ring_id) || self.shared.finished.load(Ordering::SeqCst) {
            return false;
        }
        self.shared.user_active.store(true, Ordering::Relaxed);
        if self.try_turn(Duration::from_millis(50)) {
            true
        } else {
            self.shared.kick();
            false
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: we own the eventfd.
        unsafe { libc::close(self.efd) };
    }
}

pub(crate) struct UringDriver {
    shared: Arc<Shared>,
    cell: Arc<RingCell>,
    opts: NetOptions,
    /// What every connection's socket gets.
    pub(crate) socket_tuning: super::SocketTuning,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl UringDriver {
    /// Starts a ring; `inline` (client endpoints) lets waiting callers drive it.
    pub(crate) fn start(opts: &NetOptions, inline: bool) -> Result<Arc<UringDriver>, NetError> {
        let ring = IoUring::new(RING_ENTRIES)
            .map_err(|e| NetError::DriverUnavailable(format!("io_uring_setup: {e}")))?;
        // SAFETY: plain syscall.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            tx,
            sleeping: AtomicBool::new(false),
            efd,
            next_idx: AtomicUsize::new(0),
            inline,
            user_active: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            ring_id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
        });
        let cell = Arc::new(RingCell {
            ring: Mutex::new(Ring::new(ring, rx, shared.clone(), opts.clone())),
            shared: shared.clone(),
        });
        let c2 = cell.clone();
        let tick = opts.tick;
        let handle = std::thread::Builder::new()
            .name("geomx-net-uring".into())
            .spawn(move || ring_thread(c2, tick))?;
        Ok(Arc::new(UringDriver {
            shared,
            cell,
            opts: opts.clone(),
            socket_tuning: super::SocketTuning::new(opts),
            thread: std::sync::Mutex::new(Some(handle)),
        }))
    }

    pub(crate) fn attach(
        &self,
        stream: TcpStream,
        conn: Connection<ReplyTx>,
        counters: Arc<LiveCounters>,
        dispatch: Arc<dyn Dispatch>,
        secure: SessionParts,
    ) -> Result<Arc<Link>, NetError> {
        let peer = stream.peer_addr()?;
        let hold_input = conn.side() == Side::Acceptor;
        let idx = self.shared.next_idx.fetch_add(1, Ordering::Relaxed);
        let queued = Arc::new(AtomicUsize::new(0));
        let stream = Arc::new(stream);
        let zc_off = Arc::new(AtomicBool::new(!*ZC_SUPPORTED.get().unwrap_or(&false)));
        let io = Box::new(UringIo {
            idx,
            stream: stream.clone(),
            cell: self.cell.clone(),
            zc_threshold: self.opts.zerocopy_threshold.max(HEADER_LEN + 1),
            chunk: self.opts.chunk(),
            queued: queued.clone(),
            sealed: secure.sealer.is_some(),
            order: Mutex::new(secure.sealer),
            zc_off: zc_off.clone(),
        });
        let link = Link::new(
            conn,
            io,
            counters,
            self.opts.max_frame,
            peer,
            secure.identity,
            dispatch,
        );
        if self.shared.inline {
            link.set_pump(self.cell.clone());
        }
        let uc = UConn {
            fd: stream.as_raw_fd(),
            stream,
            link: link.clone(),
            dec: FrameDecoder::new(self.opts.max_frame),
            scratch: Vec::new(),
            frames: Vec::new(),
            held: VecDeque::new(),
            recv: RecvState::Idle,
            queue: VecDeque::new(),
            cur: None,
            queued,
            dead: false,
            zc_copies: 0,
            zc_off,
            last_progress: Instant::now(),
            opener: secure.opener,
            plain: Vec::new(),
            hold_input,
            held_since: None,
            last_input: Instant::now(),
            input_told: false,
            recv_retries: 0,
            last_recv: None,
            last_arm: None,
            not_reading: 0,
        };
        if !self.shared.send(Cmd::Attach(idx, Box::new(uc))) {
            return Err(NetError::Shutdown);
        }
        Ok(link)
    }

    pub(crate) fn shutdown(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.shared.send(Cmd::Stop);
        self.shared.kick();
        if in_turn(self.shared.ring_id) {
            return; // called from a callback: cannot wait for ourselves; the thread exits on its own
        }
        if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// The ring thread: turns the ring, except on inline endpoints while callers are driving it.
fn ring_thread(cell: Arc<RingCell>, tick: Duration) {
    while !cell.shared.finished.load(Ordering::SeqCst) {
        if cell.shared.inline
            && cell.shared.user_active.swap(false, Ordering::Relaxed)
            && !cell.shared.stop_requested.load(Ordering::SeqCst)
        {
            std::thread::sleep(tick);
            continue;
        }
        let mut r = cell.ring.lock().unwrap_or_else(|p| p.into_inner());
        r.turn(tick);
        if r.is_finished() {
            cell.shared.finished.store(true, Ordering::SeqCst);
        }
    }
    let mut r = cell.ring.lock().unwrap_or_else(|p| p.into_inner());
    r.fail_late_commands();
}

struct UringIo {
    idx: usize,
    /// Shared with the ring's connection, so the descriptor stays this socket's while we exist.
    stream: Arc<TcpStream>,
    cell: Arc<RingCell>,
    zc_threshold: usize,
    /// At most this many bytes per call (`NetOptions::io_chunk`).
    chunk: usize,
    /// Bytes handed to the ring for this connection and not yet sent (0: nothing in flight).
    queued: Arc<AtomicUsize>,
    /// Serialises this connection's senders: a direct write and a hand-off to the ring never
    /// interleave, and frames keep the order of their `send` calls. Holds the sealer of an
    /// encrypted connection (records must leave in the order of their sequence numbers).
    order: Mutex<Option<Sealer>>,
    /// The connection is encrypted (`order` holds a sealer).
    sealed: bool,
    /// The ring does not use zero copy for this connection (unsupported, or the kernel copied).
    zc_off: Arc<AtomicBool>,
}

impl UringIo {
    fn stopped() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "io_uring driver stopped")
    }

    /// With `self.order` held: when `allowed` and nothing of this connection is in the ring,
    /// writes what the socket takes now from the caller's buffers; returns the bytes written.
    fn write_now(
        &self,
        header: &[u8; HEADER_LEN],
        payload: &[u8],
        allowed: bool,
        in_turn: bool,
    ) -> io::Result<usize> {
        let sent = if allowed && self.queued.load(Ordering::Acquire) == 0 {
            direct::send_nonblocking(self.stream.as_raw_fd(), [header, payload], 0, self.chunk)?
        } else {
            0
        };
        let shared = &self.cell.shared;
        if shared.inline && !in_turn {
            shared.user_active.store(true, Ordering::Relaxed);
        }
        Ok(sent)
    }

    /// Back-pressure: waits (driving an inline ring meanwhile) while this connection has more
    /// than [`MAX_QUEUED`] bytes queued. Never on the ring thread, before `order` is taken.
    fn wait_for_room(&self) {
        let shared = &self.cell.shared;
        while self.queued.load(Ordering::Acquire) > MAX_QUEUED {
            if !(shared.inline && self.cell.try_turn(Duration::from_millis(1))) {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// After handing bytes to the ring: a client's caller submits them now on its own thread
    /// (a non-blocking turn) rather than waking the ring thread.
    fn submit(&self, in_turn: bool) {
        let shared = &self.cell.shared;
        if shared.inline && !in_turn && !self.cell.try_turn(Duration::ZERO) {
            shared.kick();
        }
    }
}

impl UringIo {
    /// An encrypted connection's send: the frame is sealed into a pooled buffer (the copy that
    /// encryption makes anyway), written at once as far as the socket takes it, and the rest is
    /// handed to the ring without another copy or a wait.
    fn send_sealed(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> io::Result<()> {
        let shared = &self.cell.shared;
        let in_turn = in_turn(shared.ring_id);
        if !in_turn {
            self.wait_for_room();
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sealer) = order.as_mut() else {
            return Err(io::Error::other("sealed send without a sealer"));
        };
        // Sealed in windows: what the socket takes at once is written from the window's buffer,
        // the rest handed to the ring (and the ring thread woken) while the next window is
        // sealed, so encryption and transmission overlap.
        let window = self.chunk.max(SEAL_WINDOW);
        let mut buf =
            crate::bufpool::take(Sealer::sealed_len(window.min(HEADER_LEN + payload.len())));
        let mut handed = false;
        seal_windows(sealer, header, payload, window, &mut buf, |w| {
            let sent = if self.queued.load(Ordering::Acquire) == 0 {
                direct::send_nonblocking(self.stream.as_raw_fd(), [w, &[]], 0, self.chunk)?
            } else {
                0
            };
            if sent == w.len() {
                return Ok(());
            }
            self.queued.fetch_add(w.len() - sent, Ordering::AcqRel);
            let owned = std::mem::replace(w, crate::bufpool::take(Sealer::sealed_len(window)));
            let owned = Box::new(crate::bufpool::Pooled(owned));
            if !shared.send(Cmd::Owned(self.idx, owned, sent)) {
                return Err(Self::stopped());
            }
            if !in_turn {
                shared.kick();
            }
            handed = true;
            Ok(())
        })?;
        crate::bufpool::recycle(buf);
        if shared.inline && !in_turn {
            shared.user_active.store(true, Ordering::Relaxed);
        }
        drop(order);
        if handed {
            self.submit(in_turn);
        }
        Ok(())
    }
}

impl LinkIo for UringIo {
    fn send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> io::Result<()> {
        if self.sealed {
            return self.send_sealed(header, payload);
        }
        let shared = &self.cell.shared;
        let in_turn = in_turn(shared.ring_id);
        let big = payload.len() >= self.zc_threshold;
        // Zero copy pays only where the kernel does not copy anyway (not on loopback).
        let zero_copy = big && !in_turn && !self.zc_off.load(Ordering::Acquire);
        if !in_turn && !big {
            self.wait_for_room();
        }
        let order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let total = HEADER_LEN + payload.len();
        let sent = self.write_now(header, payload, !zero_copy, in_turn)?;
        if sent == total {
            return Ok(());
        }
        let head = &header[sent.min(HEADER_LEN)..];
        let body = &payload[sent.saturating_sub(HEADER_LEN)..];
        if body.len() >= self.zc_threshold && !in_turn {
            // The ring sends from `body` while we wait for the completion (and the zero-copy
            // notification), so the borrow outlives every kernel access.
            let (done_tx, done_rx) = crossbeam_channel::bounded(1);
            self.queued
                .fetch_add(head.len() + body.len(), Ordering::AcqRel);
            let cmd = Cmd::Big {
                idx: self.idx,
                head: head.to_vec(),
                ptr: body.as_ptr() as usize,
                len: body.len(),
                done: done_tx,
            };
            if !shared.send(cmd) {
                return Err(Self::stopped());
            }
            drop(order);
            let res = if shared.inline {
                self.cell.drive_until(&done_rx, None)
            } else {
                shared.kick();
                done_rx.recv().ok()
            };
            // `None` only when the ring stopped, after it released every borrowed buffer.
            return res.unwrap_or_else(|| Err(Self::stopped()));
        }
        let mut buf = crate::bufpool::take(head.len() + body.len());
        buf.extend_from_slice(head);
        buf.extend_from_slice(body);
        self.queued.fetch_add(buf.len(), Ordering::AcqRel);
        if !shared.send(Cmd::Small(self.idx, buf)) {
            return Err(Self::stopped());
        }
        drop(order);
        self.submit(in_turn);
        Ok(())
    }

    fn send_owned(&self, header: &[u8; HEADER_LEN], payload: OwnedBytes) -> io::Result<()> {
        if self.sealed {
            return self.send_sealed(header, (*payload).as_ref());
        }
        let shared = &self.cell.shared;
        let in_turn = in_turn(shared.ring_id);
        let order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: &[u8] = (*payload).as_ref();
        let total = HEADER_LEN + bytes.len();
        // As in `send`, but what the socket does not take now is queued without a copy and
        // without waiting: the ring keeps `payload` until the kernel is done with it.
        let zc_off = self.zc_off.load(Ordering::Acquire);
        let sent = self.write_now(header, bytes, zc_off, in_turn)?;
        let rest = total - sent;
        let off = sent.saturating_sub(HEADER_LEN);
        if rest == 0 {
            return Ok(());
        }
        self.queued.fetch_add(rest, Ordering::AcqRel);
        if sent < HEADER_LEN {
            let mut buf = crate::bufpool::take(HEADER_LEN - sent);
            buf.extend_from_slice(&header[sent..]);
            if !shared.send(Cmd::Small(self.idx, buf)) {
                return Err(Self::stopped());
            }
        }
        if off < bytes.len() && !shared.send(Cmd::Owned(self.idx, payload, off)) {
            return Err(Self::stopped());
        }
        drop(order);
        self.submit(in_turn);
        Ok(())
    }

    fn try_send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> io::Result<bool> {
        // Queueing never blocks on the ring thread; elsewhere skip when the queue is full.
        if self.queued.load(Ordering::Acquire) > MAX_QUEUED {
            return Ok(false);
        }
        self.send(header, payload).map(|_| true)
    }

    fn send_alert(&self, description: u8) {
        // Only when nothing of the connection is queued in the ring (it would be cut in two).
        let Ok(mut order) = self.order.try_lock() else {
            return;
        };
        let Some(sealer) = order.as_mut() else {
            return;
        };
        if self.queued.load(Ordering::Acquire) != 0 {
            return;
        }
        let mut rec = Vec::new();
        if sealer.seal_alert(description, &mut rec).is_ok() {
            let _ =
                direct::send_nonblocking(self.stream.as_raw_fd(), [&rec[..], &[]], 0, rec.len());
        }
    }

    fn shutdown(&self) {
        self.cell.shared.send(Cmd::Close(self.idx));
    }

    fn tcp_progress(&self) -> Option<TcpProgress> {
        TcpProgress::read(&*self.stream)
    }

    fn socket(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(&*self.stream)
    }

    fn driver(&self) -> super::DriverKind {
        super::DriverKind::IoUring
    }
}

enum OutItem {
    Bytes(Vec<u8>),
    /// A handed-over payload from byte `off` on.
    Owned {
        owner: OwnedBytes,
        off: usize,
    },
    Big {
        ptr: usize,
        len: usize,
        done: Sender<io::Result<()>>,
    },
}

impl OutItem {
    fn ptr_len(&self) -> (*const u8, usize) {
        match self {
            OutItem::Bytes(b) => (b.as_ptr(), b.len()),
            OutItem::Big { ptr, len, .. } => (*ptr as *const u8, *len),
            OutItem::Owned { owner, off } => {
                let b: &[u8] = (**owner).as_ref();
                (b[*off..].as_ptr(), b.len() - off)
            }
        }
    }

    fn finish(self, res: io::Result<()>) {
        if let OutItem::Big { done, .. } = self {
            let _ = done.send(res);
        }
    }
}

struct CurSend {
    item: OutItem,
    track: SendTrack,
    zc: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum RecvState {
    Idle,
    Scratch,
    Fixed(u16),
    Direct,
}

struct UConn {
    fd: RawFd,
    /// Keeps the descriptor this socket's; read for its `TCP_INFO`.
    stream: Arc<TcpStream>,
    link: Arc<Link>,
    dec: FrameDecoder,
    scratch: Vec<u8>,
    frames: Vec<Frame>,
    /// Received frames not dispatched yet: the connection's output was over [`MAX_QUEUED`].
    held: VecDeque<Frame>,
    recv: RecvState,
    queue: VecDeque<OutItem>,
    cur: Option<CurSend>,
    queued: Arc<AtomicUsize>,
    dead: bool,
    /// Consecutive zero-copy notifications that reported a copy.
    zc_copies: u32,
    /// Tells the senders that this connection no longer uses zero copy.
    zc_off: Arc<AtomicBool>,
    /// When output last moved (or became pending): a send that makes no progress for the peer
    /// timeout means the peer stopped reading, and the connection is dropped.
    last_progress: Instant,
    /// Encrypted connection: opens records before decoding; `plain` is its reused output.
    opener: Option<Opener>,
    plain: Vec<u8>,
    /// Accepted connection: its input waits while its output is over [`MAX_QUEUED`].
    hold_input: bool,
    /// Since when its input has waited (held frames or output over the bound), and whether
    /// that was reported.
    held_since: Option<(Instant, bool)>,
    /// When input last arrived, and whether its absence while the kernel holds readable bytes
    /// was reported.
    last_input: Instant,
    input_told: bool,
    /// Receives that completed without data and were re-armed (EAGAIN, EINTR, ECANCELED)
    /// since input last arrived, and the last receive's result and completion time.
    recv_retries: u32,
    last_recv: Option<(i32, Instant)>,
    /// When a receive was last submitted, and the turns that found the input waiting (held
    /// frames or output over the bound) since then.
    last_arm: Option<Instant>,
    not_reading: u32,
}

impl UConn {
    /// Input arrived.
    fn note_input(&mut self) {
        self.last_input = Instant::now();
        self.input_told = false;
        self.recv_retries = 0;
    }
}

impl UConn {
    /// Its received frames and input wait for its output to drain (see [`MAX_QUEUED`]).
    fn output_over_bound(&self) -> bool {
        self.hold_input && self.queued.load(Ordering::Acquire) > MAX_QUEUED
    }

    /// Output is being queued: an idle connection's stall clock starts now.
    fn note_output(&mut self) -> &mut Self {
        if !self.has_output() {
            self.last_progress = Instant::now();
        }
        self
    }

    fn has_output(&self) -> bool {
        self.cur.is_some() || !self.queue.is_empty()
    }

    fn busy(&self) -> bool {
        self.recv != RecvState::Idle || self.cur.as_ref().is_some_and(|c| c.track.in_flight())
    }

    /// `n` bytes handed over by the senders were sent.
    fn unqueue(&self, n: usize) {
        let n = n.min(self.queued.load(Ordering::Acquire));
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }

    fn fail_queue(&mut self) {
        for it in self.queue.drain(..) {
            it.finish(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            )));
        }
        self.queued.store(0, Ordering::Release);
    }
}

struct Ring {
    ring: IoUring,
    rx: Receiver<Cmd>,
    shared: Arc<Shared>,
    opts: NetOptions,
    conns: HashMap<usize, Box<UConn>>,
    /// Registered receive pool (None when registration failed) and its free slots.
    pool: Option<Vec<u8>>,
    free_fixed: Vec<u16>,
    wake_buf: &'static mut u64,
    wake_armed: bool,
    stopping: bool,
    zc: bool,
    next_tick: Instant,
    /// Turns run so far (diagnostics).
    turns: u64,
    /// Where the current turn's time goes (a slow one is reported).
    clock: TurnClock,
}

impl Ring {
    fn new(ring: IoUring, rx: Receiver<Cmd>, shared: Arc<Shared>, opts: NetOptions) -> Ring {
        let zc = *ZC_SUPPORTED.get().unwrap_or(&false);
        let mut r = Ring {
            ring,
            rx,
            shared,
            next_tick: Instant::now() + opts.tick,
            opts,
            conns: HashMap::new(),
            pool: None,
            free_fixed: Vec::new(),
            // Leaked on purpose: a cancelled eventfd read may still name it as the ring closes.
            wake_buf: Box::leak(Box::new(0u64)),
            wake_armed: false,
            stopping: false,
            zc,
            turns: 0,
            clock: TurnClock::start(Instant::now()),
        };
        if *FIXED_SUPPORTED.get().unwrap_or(&false) {
            r.register_pool();
        }
        r
    }

    fn register_pool(&mut self) {
        let mut pool = vec![0u8; REG_BUFS * SCRATCH];
        let iovs: Vec<libc::iovec> = (0..REG_BUFS)
            .map(|i| libc::iovec {
                iov_base: pool[i * SCRATCH..].as_mut_ptr() as *mut libc::c_void,
                iov_len: SCRATCH,
            })
            .collect();
        // SAFETY: the pool lives in `self.pool` for the ring's lifetime and is not moved (Vec heap).
        match unsafe { self.ring.submitter().register_buffers(&iovs) } {
            Ok(()) => {
                self.pool = Some(pool);
                self.free_fixed = (0..REG_BUFS as u16).rev().collect();
            }
            Err(e) => {
                tracing::debug!(error = %e, "registered buffers unavailable (memlock limit?); plain receives")
            }
        }
    }

    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every buffer named by the entries we build stays valid until its CQE (see the
            // owners: UConn scratch/decoder/cur, the registered pool, the leaked wake buffer).
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit() {
                tracing::warn!(error = %err, "io_uring submit failed");
            }
        }
    }

    fn is_finished(&self) -> bool {
        self.stopping && self.conns.is_empty()
    }

    /// One turn: commands, submissions, a wait of at most `max_wait`, completions, timers.
    fn turn(&mut self, max_wait: Duration) {
        self.turns += 1;
        self.clock = TurnClock::start(Instant::now());
        let id = self.shared.ring_id;
        HELD.with(|h| h.borrow_mut().push(id));
        self.drain_commands();
        self.clock.lap(Phase::Commands, Instant::now());
        if !self.wake_armed {
            let e = opcode::Read::new(
                types::Fd(self.shared.efd),
                self.wake_buf as *mut u64 as *mut u8,
                8,
            )
            .build()
            .user_data(UD_WAKE);
            self.push(e);
            self.wake_armed = true;
        }
        let idxs: Vec<usize> = self.conns.keys().copied().collect();
        for idx in &idxs {
            if self.conns.get(idx).is_some_and(|c| !c.held.is_empty()) {
                self.dispatch(*idx);
            }
            self.arm(*idx);
        }
        self.reap();
        self.clock.lap(Phase::Arm, Instant::now());
        if !self.is_finished() {
            let until = (Instant::now() + max_wait).min(self.next_tick);
            self.wait(until, !max_wait.is_zero());
            self.clock.lap(Phase::Wait, Instant::now());
            self.complete();
        }
        let now = Instant::now();
        self.clock.lap(Phase::Complete, now);
        if now >= self.next_tick {
            self.next_tick = now + self.opts.tick;
            self.drop_stalled(now);
            self.report_held_input(now);
            let links: Vec<Arc<Link>> = self
                .conns
                .values()
                .filter(|c| !c.dead)
                .map(|c| c.link.clone())
                .collect();
            for l in links {
                l.on_tick(now);
            }
        }
        self.clock.lap(Phase::Tick, Instant::now());
        // Callbacks may have queued sends: submit them without waiting.
        if !self.rx.is_empty() {
            self.drain_commands();
            for idx in self.conns.keys().copied().collect::<Vec<_>>() {
                self.arm(idx);
            }
            let _ = self.ring.submit();
        }
        let end = Instant::now();
        self.clock.lap(Phase::After, end);
        if let Some(report) = self.clock.report(end) {
            tracing::warn!(
                ring = id,
                turns = self.turns,
                conns = self.conns.len(),
                "{report}"
            );
        }
        HELD.with(|h| h.borrow_mut().retain(|r| *r != id));
    }

    /// Warns once when an accepted connection's input has waited 2 s for its output to drain
    /// (held frames or output over [`MAX_QUEUED`]), and once when any connection has taken no
    /// input for 2 s while the kernel holds bytes for it, with the state of its input and
    /// output: the signs of a stall that does not end (docs/benchmarks.md, the e2e hang).
    fn report_held_input(&mut self, now: Instant) {
        for c in self.conns.values_mut() {
            if !c.dead
                && !c.input_told
                && now.saturating_duration_since(c.last_input) >= Duration::from_secs(2)
            {
                if let Some(readable) = direct::readable(c.fd).filter(|&n| n > 0) {
                    c.input_told = true;
                    let cur = c.cur.as_ref().map(|cur| {
                        let t = &cur.track;
                        (t.total, t.sent, t.result_pending, t.notifs_pending, cur.zc)
                    });
                    let last_recv = c
                        .last_recv
                        .map(|(res, at)| (res, now.saturating_duration_since(at)));
                    tracing::warn!(
                        peer = %c.link.peer_addr(),
                        readable,
                        recv = ?c.recv,
                        retries = c.recv_retries,
                        ?last_recv,
                        last_arm = ?c.last_arm.map(|t| now.saturating_duration_since(t)),
                        not_reading = c.not_reading,
                        turns = self.turns,
                        thread = std::thread::current().name().unwrap_or("?"),
                        held = c.held.len(),
                        over_bound = c.output_over_bound(),
                        queued = c.queued.load(Ordering::Acquire),
                        queue_items = c.queue.len(),
                        ?cur,
                        "no input taken for 2 s while the kernel holds some"
                    );
                }
            }
            let holding = !c.dead && (!c.held.is_empty() || c.output_over_bound());
            if !holding {
                c.held_since = None;
                continue;
            }
            let (since, told) = c.held_since.get_or_insert((now, false));
            if !*told && now.saturating_duration_since(*since) >= Duration::from_secs(2) {
                *told = true;
                let queue_bytes: usize = c.queue.iter().map(|i| i.ptr_len().1).sum();
                let cur = c.cur.as_ref().map(|cur| {
                    let t = &cur.track;
                    (t.total, t.sent, t.result_pending, t.notifs_pending, cur.zc)
                });
                tracing::warn!(
                    peer = %c.link.peer_addr(),
                    queued = c.queued.load(Ordering::Acquire),
                    queue_items = c.queue.len(),
                    queue_bytes,
                    ?cur,
                    held = c.held.len(),
                    recv = ?c.recv,
                    "input held for 2 s"
                );
            }
        }
    }

    /// Drops connections whose output made no progress for the peer timeout: the peer stopped
    /// reading (it may still send, so the receive side's liveness check does not see it). Their
    /// senders' waits end with the connection; the error names the kernel's account of it.
    fn drop_stalled(&mut self, now: Instant) {
        let limit = self.opts.conn.peer_timeout;
        let stalled: Vec<(usize, Duration, usize, String)> = self
            .conns
            .iter()
            .map(|(i, c)| (i, c, now.saturating_duration_since(c.last_progress)))
            .filter(|(_, c, idle)| !c.dead && c.has_output() && *idle >= limit)
            .map(|(i, c, idle)| {
                let tcp = TcpProgress::suffix(&*c.stream);
                (*i, idle, c.queued.load(Ordering::Acquire), tcp)
            })
            .collect();
        for (idx, idle, unsent, tcp) in stalled {
            let Some(link) = self.conns.get(&idx).map(|c| c.link.clone()) else {
                continue;
            };
            tracing::warn!(
                peer = %link.peer_addr(),
                unsent,
                ?idle,
                tcp = tcp.trim_start_matches("; "),
                "dropping connection: the peer stopped reading"
            );
            link.on_io_closed(format!(
                "peer stopped reading: {unsent} bytes unsent for {:.1} s{tcp}",
                idle.as_secs_f64()
            ));
            self.kill(idx);
        }
    }

    /// After the last turn: fail senders whose commands came too late.
    fn fail_late_commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Big { done, .. } = cmd {
                let _ = done.send(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "io_uring driver stopped",
                )));
            }
        }
    }

    fn wait(&mut self, until: Instant, block: bool) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let want = if block && self.rx.is_empty() { 1 } else { 0 };
        let ts = types::Timespec::from(
            until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_micros(1)),
        );
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => tracing::warn!(error = %e, "io_uring wait failed"),
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
    }

    fn drain_commands(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Attach(idx, c) => {
                    if self.stopping {
                        c.link.on_io_closed("io_uring driver stopped".into());
                    }
                    self.conns.insert(idx, c);
                    if self.stopping {
                        self.kill(idx);
                    }
                }
                Cmd::Small(idx, bytes) => match self.conns.get_mut(&idx) {
                    Some(c) if !c.dead => match c.note_output().queue.back_mut() {
                        Some(OutItem::Bytes(b)) if b.len() + bytes.len() <= COALESCE => {
                            b.extend_from_slice(&bytes)
                        }
                        _ => c.queue.push_back(OutItem::Bytes(bytes)),
                    },
                    _ => {}
                },
                Cmd::Big {
                    idx,
                    head,
                    ptr,
                    len,
                    done,
                } => match self.conns.get_mut(&idx) {
                    Some(c) if !c.dead => {
                        c.note_output();
                        // The sender counted `head` and `len` in `queued`.
                        if !head.is_empty() {
                            match c.queue.back_mut() {
                                Some(OutItem::Bytes(b)) => b.extend_from_slice(&head),
                                _ => c.queue.push_back(OutItem::Bytes(head)),
                            }
                        }
                        c.queue.push_back(OutItem::Big { ptr, len, done });
                    }
                    _ => {
                        let _ = done.send(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "connection closed",
                        )));
                    }
                },
                Cmd::Owned(idx, owner, off) => match self.conns.get_mut(&idx) {
                    Some(c) if !c.dead => c
                        .note_output()
                        .queue
                        .push_back(OutItem::Owned { owner, off }),
                    _ => {} // dropped: the connection is gone
                },
                Cmd::Close(idx) => self.kill(idx),
                Cmd::Stop => {
                    self.stopping = true;
                    let idxs: Vec<usize> = self.conns.keys().copied().collect();
                    for idx in idxs {
                        if let Some(c) = self.conns.get(&idx) {
                            c.link.on_io_closed("io_uring driver stopped".into());
                        }
                        self.kill(idx);
                    }
                }
            }
        }
    }

    /// Marks a connection dead and shuts its socket, which completes its outstanding receive.
    fn kill(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(&idx) {
            if !c.dead {
                c.dead = true;
                // SAFETY: plain syscall on a socket we own.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
                c.fail_queue();
            }
        }
    }

    fn arm(&mut self, idx: usize) {
        let zc = self.zc;
        let chunk = self.opts.chunk();
        let Some(c) = self.conns.get_mut(&idx) else {
            return;
        };
        if c.dead {
            return;
        }
        let mut entries = Vec::with_capacity(2);
        // Input waits while received frames wait for the output to drain.
        let reading = c.held.is_empty() && !c.output_over_bound();
        if c.recv == RecvState::Idle && !reading {
            c.not_reading += 1;
        }
        if c.recv == RecvState::Idle && reading {
            c.last_arm = Some(Instant::now());
            c.not_reading = 0;
            let fd = types::Fd(c.fd);
            // Encrypted input is opened before decoding, so it never goes straight to a payload.
            let direct = match c.opener {
                None => c.dec.direct_target(SCRATCH),
                Some(_) => None,
            };
            if let Some(t) = direct {
                let len = t.len().min(chunk) as u32;
                entries.push(
                    opcode::Recv::new(fd, t.as_mut_ptr() as *mut u8, len)
                        .build()
                        .user_data(ud(KIND_RECV, idx)),
                );
                c.recv = RecvState::Direct;
            } else if let (Some(pool), Some(slot)) = (self.pool.as_mut(), self.free_fixed.pop()) {
                let ptr = pool[slot as usize * SCRATCH..].as_mut_ptr();
                entries.push(
                    opcode::ReadFixed::new(fd, ptr, SCRATCH as u32, slot)
                        .build()
                        .user_data(ud(KIND_RECV, idx)),
                );
                c.recv = RecvState::Fixed(slot);
            } else {
                if c.scratch.is_empty() {
                    c.scratch = vec![0u8; SCRATCH];
                }
                entries.push(
                    opcode::Recv::new(fd, c.scratch.as_mut_ptr(), SCRATCH as u32)
                        .build()
                        .user_data(ud(KIND_RECV, idx)),
                );
                c.recv = RecvState::Scratch;
            }
        }
        if c.cur.is_none() {
            if let Some(item) = c.queue.pop_front() {
                let is_big = !matches!(item, OutItem::Bytes(_));
                let (_, len) = item.ptr_len();
                c.cur = Some(CurSend {
                    item,
                    track: SendTrack::new(len),
                    zc: is_big && zc && c.zc_copies < ZC_GIVE_UP,
                });
            }
        }
        if let Some(cur) = &mut c.cur {
            if cur.track.may_submit() {
                let (ptr, len) = cur.item.ptr_len();
                // SAFETY: offset within the item's buffer.
                let p = unsafe { ptr.add(cur.track.sent) };
                let n = (len - cur.track.sent).min(chunk) as u32;
                let fd = types::Fd(c.fd);
                let e = if cur.zc {
                    opcode::SendZc::new(fd, p, n)
                        .flags(libc::MSG_NOSIGNAL)
                        .zc_flags(SEND_ZC_REPORT_USAGE)
                        .build()
                } else {
                    opcode::Send::new(fd, p, n)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                };
                entries.push(e.user_data(ud(KIND_SEND, idx)));
                cur.track.submitted();
            }
        }
        for e in entries {
            self.push(e);
        }
    }

    fn complete(&mut self) {
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (data, res, flags) in cqes {
            if data == UD_WAKE {
                self.wake_armed = false;
                continue;
            }
            let idx = (data & 0x00ff_ffff_ffff_ffff) as usize;
            let t = Instant::now();
            let kind = match data >> 56 {
                KIND_RECV => {
                    self.on_recv(idx, res);
                    "recv"
                }
                KIND_SEND => {
                    self.on_send(idx, res, flags);
                    "send"
                }
                _ => continue,
            };
            self.clock.completion(kind, idx, t.elapsed());
        }
    }

    fn on_recv(&mut self, idx: usize, res: i32) {
        let Some(c) = self.conns.get_mut(&idx) else {
            return;
        };
        let state = std::mem::replace(&mut c.recv, RecvState::Idle);
        if let RecvState::Fixed(slot) = state {
            self.free_fixed.push(slot);
        }
        c.last_recv = Some((res, Instant::now()));
        if c.dead {
            return;
        }
        let link = c.link.clone();
        if res == 0 {
            let reason = match c.dec.finish() {
                Ok(()) => "connection closed by peer".to_string(),
                Err(e) => format!("connection closed by peer mid-frame ({e})"),
            };
            link.on_io_closed(reason);
            self.kill(idx);
            return;
        }
        if res < 0 {
            // ECANCELED: the thread that submitted it exited (callers drive inline endpoints);
            // the connection is fine, so the receive is simply re-armed.
            if res == -libc::EINTR || res == -libc::EAGAIN || res == -libc::ECANCELED {
                c.recv_retries += 1;
                return;
            }
            link.on_io_closed(format!(
                "connection reset: {}",
                io::Error::from_raw_os_error(-res)
            ));
            self.kill(idx);
            return;
        }
        let n = res as usize;
        link.counters().add_recv_bytes(n);
        c.note_input();
        let t = Instant::now();
        let fed = match state {
            RecvState::Direct => {
                // SAFETY: the kernel wrote n bytes into the direct target we submitted.
                unsafe { c.dec.commit_direct(n, &mut c.frames) };
                Ok(())
            }
            state => {
                let bytes = match state {
                    RecvState::Fixed(slot) => {
                        let pool = self.pool.as_ref().expect("fixed receive without a pool");
                        let off = slot as usize * SCRATCH;
                        &pool[off..off + n]
                    }
                    _ => &c.scratch[..n],
                };
                let opener = c.opener.as_mut();
                feed_input(opener, &mut c.plain, &mut c.dec, bytes, &mut c.frames)
            }
        };
        c.held.extend(c.frames.drain(..));
        self.clock.add(Part::Decode, t.elapsed());
        self.dispatch(idx);
        match fed {
            Ok(()) => self.read_ready(idx),
            Err(e) => {
                link.on_input_error(e);
                self.kill(idx);
            }
        }
    }

    /// After a receive, reads the rest of the current frame's payload that has already arrived
    /// straight into it, without a round through the ring (at most [`INLINE_READS`] calls, so a
    /// busy peer cannot hold the ring). End of stream and errors are left to the next receive.
    fn read_ready(&mut self, idx: usize) {
        for _ in 0..INLINE_READS {
            let Some(c) = self.conns.get_mut(&idx) else {
                return;
            };
            // Only while no receive of the ring's can write into the same buffer (and never on
            // an encrypted connection, whose input is opened before decoding).
            if c.dead
                || c.recv != RecvState::Idle
                || c.opener.is_some()
                || !c.held.is_empty()
                || c.output_over_bound()
            {
                return;
            }
            let fd = c.fd;
            let chunk = self.opts.chunk();
            let Some(target) = c.dec.direct_target(1) else {
                return;
            };
            let t = Instant::now();
            let read = direct::recv_nonblocking(fd, target, chunk);
            let Some(n) = read else {
                self.clock.add(Part::InlineRead, t.elapsed());
                return;
            };
            let link = c.link.clone();
            link.counters().add_recv_bytes(n);
            c.note_input();
            // SAFETY: the kernel wrote n bytes into the direct target.
            unsafe { c.dec.commit_direct(n, &mut c.frames) };
            c.held.extend(c.frames.drain(..));
            self.clock.add(Part::InlineRead, t.elapsed());
            self.dispatch(idx);
        }
    }

    /// Hands the connection's received frames to its link one at a time, while its queued
    /// output stays within [`MAX_QUEUED`] (a handler on this thread replies at once); the rest
    /// wait, and so does the connection's input (see `arm`).
    fn dispatch(&mut self, idx: usize) {
        let t = Instant::now();
        self.dispatch_held(idx);
        self.clock.add(Part::Dispatch, t.elapsed());
    }

    /// Hands a connection's held frames to its link, one at a time, while its output allows.
    fn dispatch_held(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(&idx) else {
            return;
        };
        let link = c.link.clone();
        let mut one = std::mem::take(&mut c.frames);
        loop {
            let Some(c) = self.conns.get_mut(&idx) else {
                return;
            };
            if c.dead || c.output_over_bound() {
                c.frames = one;
                return;
            }
            let Some(f) = c.held.pop_front() else {
                c.frames = one;
                return;
            };
            one.push(f);
            link.on_input(Instant::now(), &mut one);
        }
    }

    fn on_send(&mut self, idx: usize, res: i32, flags: u32) {
        let Some(c) = self.conns.get_mut(&idx) else {
            return;
        };
        let Some(cur) = c.cur.as_mut() else { return };
        if res > 0 && flags & send_track::CQE_F_NOTIF == 0 {
            c.last_progress = Instant::now();
        }
        let next = cur.track.on_cqe(res, flags);
        if flags & send_track::CQE_F_NOTIF != 0 {
            let copied = (res as u32) & send_track::NOTIF_USAGE_ZC_COPIED != 0;
            c.link.counters().add_zerocopy(copied);
            // The kernel copies anyway on this path (loopback, some NICs): zero copy only adds
            // the notification round, so the connection stops asking for it.
            c.zc_copies = if copied { c.zc_copies + 1 } else { 0 };
            if c.zc_copies >= ZC_GIVE_UP {
                c.zc_off.store(true, Ordering::Release);
            }
        }
        match next {
            Next::Wait | Next::Resubmit => {} // `arm` resubmits the remainder
            Next::Done => {
                let cur = c.cur.take().expect("checked");
                match cur.item {
                    OutItem::Bytes(b) => {
                        c.unqueue(b.len());
                        crate::bufpool::recycle(b);
                    }
                    big => {
                        c.unqueue(big.ptr_len().1);
                        big.finish(Ok(()))
                    }
                }
            }
            Next::Failed(errno) => {
                let cur = c.cur.take().expect("checked");
                let err = io::Error::from_raw_os_error(errno);
                let link = c.link.clone();
                cur.item
                    .finish(Err(io::Error::new(err.kind(), err.to_string())));
                if !c.dead {
                    link.on_io_closed(format!("send failed: {err}"));
                    self.kill(idx);
                }
            }
        }
    }

    /// Drops dead connections with nothing in flight (closing their sockets).
    fn reap(&mut self) {
        let done: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.dead && !c.busy())
            .map(|(i, _)| *i)
            .collect();
        for idx in done {
            if let Some(mut c) = self.conns.remove(&idx) {
                if let Some(cur) = c.cur.take() {
                    cur.item.finish(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "connection closed",
                    )));
                }
                c.fail_queue();
            }
        }
        // A dead connection with a send in flight: its buffer is released by the CQE; the
        // receive completes because the socket was shut down.
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.pool.is_some() {
            let _ = self.ring.submitter().unregister_buffers();
        }
    }
}
