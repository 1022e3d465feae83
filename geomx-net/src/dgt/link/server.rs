//! The receiving endpoint: one [`DgtReceiver`] per connected sender, driven by one thread that
//! polls the TCP listener, the reliable connections and the UDP channel sockets.
//!
//! Admission and bounds (docs/security.md):
//! * with TLS, at most [`MAX_DGT_HANDSHAKES`] handshakes run at once (10 s each), and at most
//!   [`crate::tls::MAX_HANDSHAKES_PER_ADDR`] from one remote address (the key-value servers'
//!   bounds, [`crate::tls::slots`]); at most
//!   [`MAX_PENDING_HELLOS`] connections may wait for their hello, which must come within 10 s,
//!   and before it a connection can make the server buffer no more than one hello frame;
//! * a sender id is held by one live connection: a second hello for a live id is refused and the
//!   first connection stays. With TLS an id also belongs to the certificate that first held it
//!   (and a certificate to one id), so only that member may take it over again, e.g. after a
//!   reconnect while its old connection has not been noticed dead yet;
//! * per admitted sender the receiver core keeps at most two rounds in progress per key, and
//!   while [`MAX_QUEUED_DELIVERIES`] delivered tensors wait for the consumer the reliable
//!   channels are not read (TCP flow control holds the senders back). Frames are handled one
//!   at a time and finished tensors queued at once, so the bound holds exactly whatever the
//!   socket buffers hold; at most `READ_BUDGET` bytes per channel wait read but unhandled.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::sys::{self, Waker};
use super::{dgt_header, mark_reliable, read_frames, write_frame, Hello, LinkError, Reliable};
use crate::dgt::seal::{sealed_sender, DatagramOpener, Refusal};
use crate::dgt::udp::DEFAULT_RECV_BUFFER;
use crate::dgt::ChannelCounters;
use crate::dgt::{Delivery, DgtConfig, DgtKind, DgtReceiver, UdpChannels, ValueType, MAX_CHANNELS};
use crate::tls::{HandshakeSide, HandshakeSlots, Identity, TlsContext};
use crate::wire::{Frame, FrameDecoder, MsgKind, DGT_HELLO_LEN, DGT_MAX_END_PAYLOAD, HEADER_LEN};

const NCH: usize = MAX_CHANNELS as usize + 1;
/// Writes of reports / hello answers may wait this long for room.
const WRITE_LIMIT: Duration = Duration::from_secs(10);
/// Reliable channels in their TLS handshake at once (the key-value servers' bound); more are
/// closed at once, and so are more than [`crate::tls::MAX_HANDSHAKES_PER_ADDR`] from one remote
/// address.
pub const MAX_DGT_HANDSHAKES: usize = crate::tls::MAX_HANDSHAKES;
/// Time a reliable channel has for its TLS handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Time an admitted reliable channel has to send its hello.
const HELLO_LIMIT: Duration = Duration::from_secs(10);
/// Admitted connections that have not sent their hello yet; more are closed at once.
pub const MAX_PENDING_HELLOS: usize = 64;
/// Delivered tensors waiting for the consumer before the reliable channels stop being read.
pub const MAX_QUEUED_DELIVERIES: usize = 256;
/// Bytes read from one reliable channel before the others get their turn; what was read but
/// not handled yet is bounded by this.
const READ_BUDGET: usize = 256 << 10;
/// Reliable bytes a sender's goodput sample needs before the receiver reports it (auto pacing's
/// start): 16 blocks of 4 KiB, gathered over as many rounds as it takes, so that one small
/// round cannot set the pace.
const MIN_RATE_SAMPLE: u64 = 64 << 10;
/// Decoder bound before the hello: exactly one hello frame.
const PRE_HELLO_FRAME: usize = HEADER_LEN + DGT_HELLO_LEN;

/// Mutual TLS of a [`DgtServer`]'s reliable channels.
#[derive(Clone)]
pub struct ServerTls {
    /// This receiver's certificate and the job CA.
    pub ctx: Arc<TlsContext>,
    /// Certificate roles admitted as senders (e.g. the job's local servers); empty: any member.
    pub roles: Vec<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// What a [`DgtServer`] received so far, over all senders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerStats {
    /// Receiver counters per channel (index = channel), summed over senders.
    pub channels: [ChannelCounters; NCH],
    /// Messages rejected by validation (DGT header, key table, unknown sender).
    pub invalid: u64,
    /// Tensors delivered.
    pub deliveries: u64,
    /// Deliveries that waited out the deadline.
    pub timed_out: u64,
    /// Senders connected now.
    pub peers: usize,
    /// Connections refused or closed for a protocol error (including those below).
    pub refused: u64,
    /// Hellos refused because another connection or certificate holds the sender id.
    pub duplicate_hellos: u64,
    /// Sealed datagrams (TLS) that failed to open: forged, tampered or from no sender.
    pub datagrams_forged: u64,
    /// Sealed datagrams that opened but were seen before (replays).
    pub datagrams_replayed: u64,
}

impl ServerStats {
    /// Unreliable blocks lost for good and listed as sent (channels 1..=C).
    pub fn unreliable_lost_sent(&self) -> (u64, u64) {
        self.channels
            .iter()
            .skip(1)
            .fold((0, 0), |(l, s), c| (l + c.lost, s + c.sent))
    }

    /// Late blocks (folded into the next round) on all channels.
    pub fn late(&self) -> u64 {
        self.channels.iter().map(|c| c.late).sum()
    }
}

struct Shared {
    stats: Mutex<ServerStats>,
    stop: AtomicBool,
}

/// Receiving endpoint of DGT links: accepts any number of [`super::DgtClient`]s (optionally only
/// the listed sender ids) and delivers their tensors for the registered keys.
pub struct DgtServer {
    addr: SocketAddr,
    udp_addrs: Vec<SocketAddr>,
    deliveries: Receiver<Delivery>,
    shared: Arc<Shared>,
    wake: UnixDatagram,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DgtServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DgtServer")
            .field("addr", &self.addr)
            .field("udp", &self.udp_addrs)
            .finish()
    }
}

impl DgtServer {
    /// Binds a TCP listener (the reliable channels) and C UDP sockets on `ip` (ephemeral ports).
    /// `cfg.channels` and `cfg.deadline` apply to every sender, `cfg.block_bytes` is the largest
    /// block size a sender may announce. `keys` are (key, N, value type); `allowed` restricts
    /// the sender ids (`None`: any).
    pub fn bind(
        ip: IpAddr,
        cfg: DgtConfig,
        keys: &[(u32, u32, ValueType)],
        allowed: Option<Vec<u32>>,
    ) -> Result<DgtServer, LinkError> {
        Self::bind_secure(ip, cfg, keys, allowed, None)
    }

    /// [`DgtServer::bind`] with mutual TLS on the reliable channels when `tls` is given: each
    /// accepted connection completes its handshake on a short-lived thread (at most
    /// [`MAX_DGT_HANDSHAKES`] at once and a few per remote address, 10 s each) before any frame
    /// is read, and a sender whose
    /// certificate's role is not in `tls.roles` is refused at its hello.
    pub fn bind_secure(
        ip: IpAddr,
        cfg: DgtConfig,
        keys: &[(u32, u32, ValueType)],
        allowed: Option<Vec<u32>>,
        tls: Option<ServerTls>,
    ) -> Result<DgtServer, LinkError> {
        cfg.validate()?;
        let listener =
            TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| LinkError::Io("tcp bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| LinkError::Io("set_nonblocking", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| LinkError::Io("local_addr", e))?;
        let udp = UdpChannels::bind(ip, cfg.channels, DEFAULT_RECV_BUFFER)
            .map_err(|e| LinkError::Io("udp bind", e))?;
        let udp_addrs = udp
            .local_addrs()
            .map_err(|e| LinkError::Io("local_addr", e))?;
        // Validate the key table once, up front.
        let mut probe = DgtReceiver::new(cfg.clone())?;
        for &(k, n, vt) in keys {
            probe.add_key(k, n, vt)?;
        }
        let shared = Arc::new(Shared {
            stats: Mutex::new(ServerStats::default()),
            stop: AtomicBool::new(false),
        });
        let waker = Waker::new().map_err(|e| LinkError::Io("waker", e))?;
        let wake = waker.handle().map_err(|e| LinkError::Io("waker", e))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (hs_tx, hs_rx) = crossbeam_channel::unbounded();
        let mut lp = Loop {
            tls,
            handshakes: HandshakeSlots::new(),
            hs_tx,
            hs_rx,
            cfg,
            keys: keys.to_vec(),
            allowed,
            listener,
            udp,
            conns: HashMap::new(),
            next_conn: 0,
            peers: HashMap::new(),
            claims: HashMap::new(),
            gone: Totals::default(),
            waker,
            out: tx,
            shared: shared.clone(),
            refused: 0,
            duplicate_hellos: 0,
            deliveries: 0,
            timed_out: 0,
            forged: 0,
            replayed: 0,
        };
        let thread = std::thread::Builder::new()
            .name("geomx-dgt-rx".into())
            .spawn(move || {
                if let Err(e) = lp.run() {
                    tracing::error!(error = %e, "dgt receiver stopped");
                }
                lp.publish();
            })
            .map_err(|e| LinkError::Io("spawn", e))?;
        Ok(DgtServer {
            addr,
            udp_addrs,
            deliveries: rx,
            shared,
            wake,
            thread: Some(thread),
        })
    }

    /// The TCP address senders connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The UDP addresses of channels 1..=C.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// The next delivered tensor within `timeout`, in delivery order.
    pub fn recv_delivery(&self, timeout: Duration) -> Option<Delivery> {
        self.deliveries.recv_timeout(timeout).ok()
    }

    /// The delivery queue itself (e.g. for `select!` or a consumer thread).
    pub fn deliveries(&self) -> &Receiver<Delivery> {
        &self.deliveries
    }

    /// Counters so far (refreshed by the receiving thread every few milliseconds).
    pub fn stats(&self) -> ServerStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for DgtServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        sys::wake(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Conn {
    tcp: Reliable,
    /// When it was admitted: a channel that sends no hello within [`HELLO_LIMIT`] is dropped.
    since: Instant,
    dec: FrameDecoder,
    sender: Option<u32>,
    /// First reliable block of the round in progress, and the bytes since.
    round_start: Option<Instant>,
    round_bytes: u64,
    /// Reliable bytes and busy seconds (first block to terminator) of finished rounds, until
    /// the goodput sample is large enough to report.
    sample_bytes: u64,
    sample_secs: f64,
    rate_sent: bool,
    /// Frames read but not handled yet: they wait while the delivery queue is full.
    pending: VecDeque<Frame>,
    /// The sender closed the channel: it is dropped once `pending` is handled.
    eof: bool,
}

struct Peer {
    rx: DgtReceiver,
    conn: u64,
    /// The address of its reliable channel: its datagrams must come from the same host
    /// (plaintext only; sealed datagrams are authenticated instead).
    ip: IpAddr,
    /// Opens its sealed datagrams (TLS).
    opener: Option<DatagramOpener>,
}

#[derive(Default)]
struct Totals {
    channels: [ChannelCounters; NCH],
    invalid: u64,
}

impl Totals {
    fn add(&mut self, c: &[ChannelCounters; NCH], invalid: u64) {
        for (t, c) in self.channels.iter_mut().zip(c) {
            t.sent += c.sent;
            t.on_time += c.on_time;
            t.late += c.late;
            t.lost += c.lost;
            t.stale += c.stale;
            t.dup += c.dup;
            t.future_dropped += c.future_dropped;
            t.received += c.received;
            t.bytes += c.bytes;
        }
        self.invalid += invalid;
    }
}

struct Loop {
    tls: Option<ServerTls>,
    /// Handshakes in flight, and their results (a channel and the waker end the poll).
    handshakes: HandshakeSlots,
    hs_tx: Sender<Reliable>,
    hs_rx: Receiver<Reliable>,
    cfg: DgtConfig,
    keys: Vec<(u32, u32, ValueType)>,
    allowed: Option<Vec<u32>>,
    listener: TcpListener,
    udp: UdpChannels,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    peers: HashMap<u32, Peer>,
    /// With TLS: sender id → the certificate that holds it (for the server's lifetime).
    claims: HashMap<u32, Identity>,
    gone: Totals,
    waker: Waker,
    out: Sender<Delivery>,
    shared: Arc<Shared>,
    refused: u64,
    duplicate_hellos: u64,
    deliveries: u64,
    timed_out: u64,
    forged: u64,
    replayed: u64,
}

impl Loop {
    fn run(&mut self) -> Result<(), LinkError> {
        let mut rbuf = vec![0u8; 64 * 1024];
        let mut frames = Vec::new();
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.waker.drain();
            self.accept();
            // While the consumer is behind, admitted senders are not read: TCP flow control
            // holds them back instead of the delivery queue growing.
            let ids: Vec<u64> = self.conns.keys().copied().collect();
            for id in ids {
                self.serve_conn(id, &mut rbuf, &mut frames);
            }
            let paused = self.paused();
            self.read_udp(&mut rbuf);
            let now = Instant::now();
            let silent: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| c.sender.is_none() && now.duration_since(c.since) > HELLO_LIMIT)
                .map(|(&id, _)| id)
                .collect();
            for id in silent {
                self.refused += 1;
                self.drop_conn(id, "no hello within the time allowed");
            }
            self.service(now);
            self.publish();
            let timeout = self
                .peers
                .values()
                .filter_map(|p| p.rx.poll_timeout())
                .min()
                .map_or(Duration::from_millis(50), |t| sys::until(t, Instant::now()))
                .min(Duration::from_millis(if paused { 5 } else { 50 }));
            // Frames already read wait only for room in the queue.
            let timeout = if !paused && self.conns.values().any(|c| !c.pending.is_empty()) {
                Duration::ZERO
            } else {
                timeout
            };
            let mut fds = Vec::with_capacity(3 + self.conns.len() + usize::from(self.cfg.channels));
            for fd in [self.listener.as_raw_fd(), self.waker.fd()] {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            for ch in 1..=self.cfg.channels {
                if let Ok(s) = self.udp.socket(ch) {
                    fds.push(libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            for c in self
                .conns
                .values()
                .filter(|c| !c.eof && (!paused || c.sender.is_none()))
            {
                fds.push(libc::pollfd {
                    fd: c.tcp.tcp.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            sys::poll(&mut fds, Some(timeout)).map_err(|e| LinkError::Io("poll", e))?;
        }
        Ok(())
    }

    /// Starts the TLS handshake of an accepted connection on its own thread (bounded); the
    /// authenticated channel comes back through `hs_rx`.
    fn authenticate(&mut self, tcp: TcpStream, tls: &ServerTls) {
        let peer = tcp.peer_addr().ok();
        let slot = peer.and_then(|p| self.handshakes.take(p.ip(), &tls.ctx, &tcp));
        let Some(slot) = slot else {
            tracing::warn!(
                ?peer,
                "dgt: connection refused: too many handshakes in flight"
            );
            return;
        };
        let (ctx, out) = (tls.ctx.clone(), self.hs_tx.clone());
        let wake = self.waker.handle();
        let spawned = std::thread::Builder::new()
            .name("geomx-dgt-tls".into())
            .spawn(move || {
                let done =
                    Reliable::handshake(tcp, Some(&ctx), HandshakeSide::Server, HANDSHAKE_LIMIT);
                // Past this, the channel is ours; an eviction meanwhile has shut it down.
                if !slot.release() {
                    tracing::warn!(?peer, "dgt: connection refused: ended for a newcomer");
                    return;
                }
                match done {
                    Ok(r) => {
                        let _ = out.send(r);
                        if let Ok(w) = wake {
                            sys::wake(&w);
                        }
                    }
                    Err(e) => tracing::warn!(?peer, error = %e, "dgt: connection refused"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(?peer, error = %e, "dgt: connection refused: no thread for its handshake");
        }
    }

    fn accept(&mut self) {
        let ready: Vec<Reliable> = self.hs_rx.try_iter().collect();
        for r in ready {
            self.admit(r);
        }
        loop {
            match self.listener.accept() {
                Ok((tcp, _)) => match self.tls.clone() {
                    // Accepted sockets do not inherit the listener's non-blocking mode.
                    Some(tls) => self.authenticate(tcp, &tls),
                    None => self.admit(Reliable::new(tcp, None)),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "dgt: accept failed");
                    return;
                }
            }
        }
    }

    /// Starts reading an accepted (and, with TLS, authenticated) reliable channel.
    fn admit(&mut self, tcp: Reliable) {
        let pending = self.conns.values().filter(|c| c.sender.is_none()).count();
        if pending >= MAX_PENDING_HELLOS {
            self.refused += 1;
            tracing::warn!("dgt: connection refused: too many connections without a hello");
            return;
        }
        if let Err(e) = tcp.tcp.set_nonblocking(true) {
            tracing::warn!(error = %e, "dgt: connection dropped");
            return;
        }
        mark_reliable(&tcp.tcp, self.cfg.channels);
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                tcp,
                since: Instant::now(),
                dec: FrameDecoder::new(PRE_HELLO_FRAME),
                sender: None,
                round_start: None,
                round_bytes: 0,
                sample_bytes: 0,
                sample_secs: 0.0,
                rate_sent: false,
                pending: VecDeque::new(),
                eof: false,
            },
        );
    }

    /// The consumer is behind: admitted senders' frames wait (and their channels are not read).
    fn paused(&self) -> bool {
        self.out.len() >= MAX_QUEUED_DELIVERIES
    }

    /// Handles a connection's frames already read, one at a time while the delivery queue has
    /// room, then reads more (at most [`READ_BUDGET`] bytes) once they are all handled. A
    /// sender that closed its channel is dropped once its last frame is handled; one that broke
    /// the protocol at once.
    /// `frames` is scratch space reused across calls.
    fn serve_conn(&mut self, id: u64, rbuf: &mut [u8], frames: &mut Vec<Frame>) {
        let mut read = false;
        loop {
            let Some(sender) = self.conns.get(&id).map(|c| c.sender) else {
                return;
            };
            if sender.is_some() && self.paused() {
                return;
            }
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if let Some(f) = c.pending.pop_front() {
                if let Err(e) = self.on_frame(id, f) {
                    self.refused += 1;
                    self.drop_conn(id, &e.to_string());
                    return;
                }
                if let Some(s) = sender {
                    self.deliver_ready(s);
                }
                continue;
            }
            if c.eof {
                self.drop_conn(id, "closed by the sender");
                return;
            }
            if read {
                return;
            }
            read = true;
            let res = read_frames(&mut c.tcp, &mut c.dec, rbuf, READ_BUDGET, frames);
            c.pending.extend(frames.drain(..));
            match res {
                Ok(open) => c.eof = !open,
                Err(e) => {
                    self.refused += 1;
                    self.drop_conn(id, &e.to_string());
                    return;
                }
            }
        }
    }

    fn drop_conn(&mut self, id: u64, reason: &str) {
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        tracing::debug!(sender = ?c.sender, reason, "dgt: reliable channel closed");
        if let Some(s) = c.sender {
            if self.peers.get(&s).is_some_and(|p| p.conn == id) {
                if let Some(mut p) = self.peers.remove(&s) {
                    self.drain_peer(s, &mut p);
                    self.gone.add(p.rx.counters(), p.rx.invalid());
                }
            }
        }
    }

    fn on_frame(&mut self, id: u64, f: Frame) -> Result<(), LinkError> {
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        match (f.header.kind, conn.sender) {
            (MsgKind::DgtHello, None) => {
                let sender = f.header.sender;
                let hello = Hello::decode(&f.payload)?;
                if self.allowed.as_ref().is_some_and(|a| !a.contains(&sender)) {
                    return Err(LinkError::Protocol(format!("sender {sender} not allowed")));
                }
                if let (Some(tls), Some(id)) = (&self.tls, &conn.tcp.peer) {
                    if !tls.roles.is_empty() && !tls.roles.contains(&id.role) {
                        return Err(LinkError::Protocol(format!(
                            "the certificate of {id} may not send DGT (admitted: {:?})",
                            tls.roles
                        )));
                    }
                }
                let ident = conn.tcp.peer.clone();
                if let Err(e) = claimable(&self.claims, &self.peers, sender, ident.as_ref()) {
                    self.duplicate_hellos += 1;
                    return Err(e);
                }
                // The sender waits for the answer before sending more (bytes or whole frames).
                if conn.dec.buffered() != 0 || !conn.pending.is_empty() {
                    return Err(LinkError::Protocol(format!(
                        "sender {sender} sent more before the hello answer"
                    )));
                }
                let b = hello.block_bytes as usize;
                if hello.channels != self.cfg.channels || b > self.cfg.block_bytes {
                    return Err(LinkError::Protocol(format!(
                        "sender {sender} announced block {b} / {} channels, receiver allows \
                         block ≤ {} / {} channels",
                        hello.channels, self.cfg.block_bytes, self.cfg.channels
                    )));
                }
                let cfg = DgtConfig {
                    block_bytes: b,
                    ..self.cfg.clone()
                };
                let mut rx = DgtReceiver::new(cfg)?;
                for &(k, n, vt) in &self.keys {
                    rx.add_key(k, n, vt)?;
                }
                let mut ports = [0u16; MAX_CHANNELS as usize];
                for ch in 1..=self.cfg.channels {
                    let s = self.udp.socket(ch).map_err(|e| LinkError::Io("udp", e))?;
                    ports[usize::from(ch) - 1] =
                        s.local_addr().map_err(|e| LinkError::Io("udp", e))?.port();
                }
                let ack = Hello {
                    block_bytes: hello.block_bytes,
                    channels: hello.channels,
                    ports,
                };
                write_frame(
                    &mut conn.tcp,
                    &dgt_header(MsgKind::DgtHello, 0),
                    &ack.encode(),
                    WRITE_LIMIT,
                )?;
                conn.sender = Some(sender);
                conn.dec = FrameDecoder::new(HEADER_LEN + DGT_MAX_END_PAYLOAD);
                if let Some(ident) = ident {
                    self.claims.insert(sender, ident);
                }
                let ip = conn
                    .tcp
                    .tcp
                    .peer_addr()
                    .map_err(|e| LinkError::Io("peer_addr", e))?
                    .ip();
                let opener = conn
                    .tcp
                    .datagram_key
                    .map(|(k, aes)| DatagramOpener::new(&k, aes, sender));
                let peer = Peer {
                    rx,
                    conn: id,
                    ip,
                    opener,
                };
                if let Some(mut old) = self.peers.insert(sender, peer) {
                    // The same member reconnecting (its certificate holds the id) starts over
                    // at round 0; its old connection is closed.
                    self.gone.add(old.rx.counters(), old.rx.invalid());
                    while old.rx.poll_delivery().is_some() {}
                    let stale: Vec<u64> = self
                        .conns
                        .iter()
                        .filter(|(&c, k)| c != id && k.sender == Some(sender))
                        .map(|(&c, _)| c)
                        .collect();
                    for c in stale {
                        self.conns.remove(&c);
                    }
                }
                Ok(())
            }
            (kind @ (MsgKind::DgtBlock | MsgKind::DgtEnd), Some(sender)) => {
                // A DgtEnd frame carries End, Map or Fin.
                let agrees = match DgtKind::from_u8(f.payload[3]) {
                    Ok(DgtKind::Block) => kind == MsgKind::DgtBlock,
                    Ok(DgtKind::End | DgtKind::Map | DgtKind::Fin) => kind == MsgKind::DgtEnd,
                    _ => false,
                };
                // Frame kind, DGT kind and sender must agree (bounds were checked by the decoder).
                let p = &f.payload;
                let msg_sender = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
                let peer = self
                    .peers
                    .get_mut(&sender)
                    .ok_or_else(|| LinkError::Protocol("no receiver for the sender".into()))?;
                if !agrees || msg_sender != sender {
                    // Counted as invalid like any malformed message; the link stays up.
                    let _ = peer.rx.handle_reliable(now, &[]);
                    return Ok(());
                }
                if kind == MsgKind::DgtBlock {
                    conn.round_start.get_or_insert(now);
                    conn.round_bytes += p.len() as u64;
                }
                // The round's terminator (End or Fin; a Map only follows the reliable blocks).
                let end = kind == MsgKind::DgtEnd && p[3] != DgtKind::Map as u8;
                if let Err(e) = peer.rx.handle_reliable(now, p) {
                    tracing::debug!(sender, error = %e, "dgt: reliable message rejected");
                    return Ok(());
                }
                if end {
                    // The round's busy time, first reliable block to terminator (idle time
                    // between rounds is not the link's).
                    if let Some(t0) = conn.round_start.take() {
                        conn.sample_secs += now.duration_since(t0).as_secs_f64();
                        conn.sample_bytes += std::mem::take(&mut conn.round_bytes);
                    }
                }
                if end && !conn.rate_sent && conn.sample_bytes >= MIN_RATE_SAMPLE {
                    let secs = conn.sample_secs.max(1e-6);
                    let bps = (conn.sample_bytes as f64 * 8.0 / secs) as u64;
                    conn.rate_sent = true;
                    write_frame(
                        &mut conn.tcp,
                        &dgt_header(MsgKind::DgtRate, 0),
                        &bps.max(1).to_le_bytes(),
                        WRITE_LIMIT,
                    )?;
                }
                Ok(())
            }
            (kind, s) => Err(LinkError::Protocol(format!(
                "{kind:?} on a reliable channel (hello done: {})",
                s.is_some()
            ))),
        }
    }

    fn read_udp(&mut self, buf: &mut [u8]) {
        let now = Instant::now();
        // Bounded so a flood cannot starve the reliable channels and the timers.
        for _ in 0..4096 {
            let (n, ch, from) = match self.udp.try_recv(buf) {
                Ok(Some((ch, n, from))) => (n, ch, from),
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "dgt: udp receive error");
                    return;
                }
            };
            if self.tls.is_some() {
                self.read_sealed(now, ch, &mut buf[..n]);
                continue;
            }
            let msg = &buf[..n];
            let sender = (n >= 12).then(|| u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]));
            match sender.and_then(|s| self.peers.get_mut(&s)) {
                Some(p) => {
                    if msg.get(4) != Some(&ch) || from.ip() != p.ip {
                        // A datagram must arrive on the socket of its own channel, from the host
                        // of its sender's reliable channel.
                        let _ = p.rx.handle_datagram(now, &[]);
                    } else if let Err(e) = p.rx.handle_datagram(now, msg) {
                        tracing::trace!(error = %e, "dgt: datagram rejected");
                    }
                }
                None => self.gone.invalid += 1,
            }
        }
    }

    /// A sealed datagram (TLS) received on `ch`'s socket: opened with its sender's key, the
    /// replay window checked, then handed to the receiver core; anything else is counted and
    /// dropped before the core sees it.
    fn read_sealed(&mut self, now: Instant, ch: u8, datagram: &mut [u8]) {
        let peer = sealed_sender(datagram).and_then(|s| self.peers.get_mut(&s).map(|p| (s, p)));
        let Some((sender, p)) = peer else {
            self.forged += 1;
            return;
        };
        let Some(opener) = p.opener.as_mut() else {
            self.forged += 1;
            return;
        };
        match opener.open(ch, datagram) {
            Ok(msg) => {
                // The sealed header must name the channel and the sender it was sealed for.
                let inner = (msg.len() >= 12)
                    .then(|| u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]));
                if msg.get(4) != Some(&ch) || inner != Some(sender) {
                    self.forged += 1;
                } else if let Err(e) = p.rx.handle_datagram(now, msg) {
                    tracing::trace!(error = %e, "dgt: datagram rejected");
                }
            }
            Err(Refusal::Forged) => self.forged += 1,
            Err(Refusal::Replayed) => self.replayed += 1,
        }
    }

    fn service(&mut self, now: Instant) {
        let senders: Vec<u32> = self.peers.keys().copied().collect();
        for s in senders {
            let Some(mut p) = self.peers.remove(&s) else {
                continue;
            };
            p.rx.handle_timeout(now);
            self.drain_peer(s, &mut p);
            let mut broken = None;
            while let Some(r) = p.rx.poll_report() {
                let mut b = Vec::with_capacity(r.encoded_len());
                r.encode_into(&mut b);
                if let Some(c) = self.conns.get_mut(&p.conn) {
                    if let Err(e) = write_frame(
                        &mut c.tcp,
                        &dgt_header(MsgKind::DgtReport, 0),
                        &b,
                        WRITE_LIMIT,
                    ) {
                        broken = Some(e.to_string());
                        break;
                    }
                }
            }
            let conn = p.conn;
            self.peers.insert(s, p);
            if let Some(reason) = broken {
                self.drop_conn(conn, &reason);
            }
        }
    }

    fn drain_peer(&mut self, _sender: u32, p: &mut Peer) {
        hand_over(
            &mut p.rx,
            &self.out,
            &mut self.deliveries,
            &mut self.timed_out,
        );
    }

    /// Hands the sender's finished tensors to the consumer at once, so that the queue bound
    /// counts them before the next frame is handled.
    fn deliver_ready(&mut self, sender: u32) {
        if let Some(p) = self.peers.get_mut(&sender) {
            hand_over(
                &mut p.rx,
                &self.out,
                &mut self.deliveries,
                &mut self.timed_out,
            );
        }
    }

    fn publish(&self) {
        let mut t = Totals {
            channels: self.gone.channels,
            invalid: self.gone.invalid,
        };
        for p in self.peers.values() {
            t.add(p.rx.counters(), p.rx.invalid());
        }
        let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        *st = ServerStats {
            channels: t.channels,
            invalid: t.invalid,
            deliveries: self.deliveries,
            timed_out: self.timed_out,
            peers: self.peers.len(),
            refused: self.refused,
            duplicate_hellos: self.duplicate_hellos,
            datagrams_forged: self.forged,
            datagrams_replayed: self.replayed,
        };
    }
}

/// Whether a hello for `sender` from a connection with certificate `ident` may take the id:
/// no other live connection holds it, and with TLS no other certificate ever held it, nor
/// does this certificate hold another id.
/// Moves a receiver's finished tensors into the delivery queue, counting them.
fn hand_over(
    rx: &mut DgtReceiver,
    out: &Sender<Delivery>,
    deliveries: &mut u64,
    timed_out: &mut u64,
) {
    while let Some(d) = rx.poll_delivery() {
        *deliveries += 1;
        *timed_out += u64::from(d.timed_out);
        let _ = out.send(d);
    }
}

fn claimable(
    claims: &HashMap<u32, Identity>,
    peers: &HashMap<u32, Peer>,
    sender: u32,
    ident: Option<&Identity>,
) -> Result<(), LinkError> {
    let Some(ident) = ident else {
        if peers.contains_key(&sender) {
            return Err(LinkError::Protocol(format!(
                "sender {sender} is already connected"
            )));
        }
        return Ok(());
    };
    if let Some(owner) = claims.get(&sender).filter(|o| *o != ident) {
        return Err(LinkError::Protocol(format!(
            "sender id {sender} belongs to {owner}, not to {ident}"
        )));
    }
    if let Some((other, _)) = claims
        .iter()
        .find(|(&s, o)| s != sender && *o == ident && peers.contains_key(&s))
    {
        return Err(LinkError::Protocol(format!(
            "{ident} already sends as sender {other}"
        )));
    }
    Ok(())
}
