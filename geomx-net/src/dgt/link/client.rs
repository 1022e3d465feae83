//! The sending endpoint: a [`DgtSender`] driven by one thread over TCP (channel 0) and UDP.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::sys::{self, Waker, GSO_MAX_BYTES, GSO_MAX_SEGMENTS};
use super::{
    dgt_header, mark_reliable, read_frames, read_one, write_frame, Hello, LinkError, Reliable,
};
use crate::dgt::header::DgtKind;
use crate::dgt::seal::{DatagramSealer, SEAL_OVERHEAD};
use crate::dgt::udp::DEFAULT_RECV_BUFFER;
use crate::dgt::{
    auto_block_bytes, DgtConfig, DgtSender, RoundReport, SenderCounters, UdpChannels, ValueType,
    Values, IPV4_UDP_OVERHEAD, IPV6_UDP_OVERHEAD, MAX_CHANNELS,
};
use crate::tls::{HandshakeSide, TlsContext};
use crate::wire::{Frame, FrameDecoder, MsgKind};

/// Rate used by [`Pacing::Auto`] until the receiver's first goodput measurement (spec: 100 Mbit/s).
pub const AUTO_START_BPS: u64 = 100_000_000;

/// How the unreliable channels are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// `DgtConfig::rate_bps` as configured (`None`: unpaced).
    Configured,
    /// Start at `AUTO_START_BPS` (100 Mbit/s), take the reliable channel's goodput measured by the receiver
    /// in the first round, then adapt per round from the reported loss within [min, max].
    Auto {
        /// Lowest rate in bit/s.
        min_bps: u64,
        /// Highest rate in bit/s.
        max_bps: u64,
    },
}

/// Driver options of a [`DgtClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkOptions {
    /// Pacing of the unreliable channels.
    pub pacing: Pacing,
    /// Use UDP GSO (`UDP_SEGMENT`) where the kernel supports it.
    pub gso: bool,
    /// Path MTU to size blocks for; `None` reads the route's MTU from the kernel.
    pub mtu: Option<usize>,
    /// Connecting and the hello exchange.
    pub connect_timeout: Duration,
    /// One write on the reliable channel may wait this long for room.
    pub write_timeout: Duration,
    /// Congestion control of the reliable channel's TCP socket (`None`: the system's default;
    /// see [`crate::congestion`]). The reliable share is a round's critical path.
    pub congestion: Option<crate::congestion::Algorithm>,
}

impl Default for LinkOptions {
    fn default() -> LinkOptions {
        LinkOptions {
            pacing: Pacing::Configured,
            gso: true,
            mtu: None,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            congestion: None,
        }
    }
}

/// What a [`DgtClient`] did so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientStats {
    /// The sender's own counts per channel.
    pub sent: SenderCounters,
    /// Block size in use (from the path MTU).
    pub block_bytes: usize,
    /// True while UDP GSO is in use.
    pub gso: bool,
    /// Datagrams handed to the kernel, and system calls used for them.
    pub datagrams: u64,
    /// `sendmsg`/`sendto` calls for those datagrams (fewer than `datagrams` with GSO).
    pub udp_sends: u64,
    /// Datagrams the kernel refused (counted, not retried: the channel is unreliable).
    pub udp_errors: u64,
    /// Current pacing rate in bit/s.
    pub rate_bps: Option<u64>,
    /// Reliable goodput the receiver measured in the first round, bit/s.
    pub measured_goodput_bps: Option<u64>,
    /// Round reports received.
    pub reports: u64,
    /// Sums over the reports, per channel: (sent, on_time, late, lost).
    pub report_totals: [(u64, u64, u64, u64); MAX_CHANNELS as usize + 1],
}

impl ClientStats {
    /// Unreliable blocks the receiver reported lost for good, and sent, over all reports.
    pub fn unreliable_lost_sent(&self) -> (u64, u64) {
        self.report_totals
            .iter()
            .skip(1)
            .fold((0, 0), |(l, s), c| (l + c.3, s + c.0))
    }
}

enum Owned {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

enum Cmd {
    Push {
        key: u32,
        round: u32,
        values: Owned,
        map: Vec<u8>,
        done: Sender<Result<(), LinkError>>,
    },
    Flush(Sender<()>),
}

struct Shared {
    stats: Mutex<ClientStats>,
    closed: Mutex<Option<String>>,
}

/// Sending endpoint of a DGT link: one receiver ([`super::DgtServer`]), any number of keys.
/// Cheap calls from any thread; the thread behind it sends. Dropping it stops the thread
/// (queued data not yet sent is discarded; call [`DgtClient::flush`] first).
pub struct DgtClient {
    cmd: Sender<Cmd>,
    wake: UnixDatagram,
    shared: Arc<Shared>,
    block_bytes: usize,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DgtClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DgtClient")
            .field("block_bytes", &self.block_bytes)
            .finish()
    }
}

impl DgtClient {
    /// Connects to the [`super::DgtServer`] at `server` (its TCP address) as DGT sender
    /// `sender_id`. `cfg.block_bytes` is the cap: the block size in use is the largest that
    /// fits the path MTU ([`DgtClient::block_bytes`]); the receiver learns it in the hello.
    pub fn connect(
        server: SocketAddr,
        sender_id: u32,
        cfg: DgtConfig,
        opts: LinkOptions,
    ) -> Result<DgtClient, LinkError> {
        Self::connect_secure(server, sender_id, cfg, opts, None)
    }

    /// [`DgtClient::connect`] with mutual TLS on the reliable channel when `tls` is given: the
    /// handshake runs first (bounded by `opts.connect_timeout`), then every frame is sealed.
    pub fn connect_secure(
        server: SocketAddr,
        sender_id: u32,
        mut cfg: DgtConfig,
        opts: LinkOptions,
        tls: Option<&TlsContext>,
    ) -> Result<DgtClient, LinkError> {
        cfg.validate()?;
        let tcp = TcpStream::connect_timeout(&server, opts.connect_timeout)
            .map_err(|e| LinkError::Io("tcp connect", e))?;
        mark_reliable(&tcp, cfg.channels);
        if let Some(algo) = opts.congestion {
            crate::congestion::set(&tcp, algo).map_err(|e| LinkError::Io("tcp congestion", e))?;
        }
        let mut tcp = Reliable::handshake(tcp, tls, HandshakeSide::Client, opts.connect_timeout)?;
        tcp.tcp
            .set_nonblocking(true)
            .map_err(|e| LinkError::Io("set_nonblocking", e))?;
        let overhead = if server.is_ipv4() {
            IPV4_UDP_OVERHEAD
        } else {
            IPV6_UDP_OVERHEAD
        };
        // Sealed datagrams (TLS) carry a clear prefix and a tag: blocks shrink to fit.
        let overhead = overhead + tcp.datagram_key.map_or(0, |_| SEAL_OVERHEAD);
        let mtu = opts.mtu.or_else(|| sys::path_mtu(server)).unwrap_or(1500);
        cfg.block_bytes = auto_block_bytes(mtu, overhead, cfg.block_bytes).ok_or_else(|| {
            LinkError::Protocol(format!("path MTU {mtu} leaves no room for a block"))
        })?;
        cfg.ip_overhead = overhead;
        if let Pacing::Auto { min_bps, max_bps } = opts.pacing {
            if min_bps == 0 || max_bps < min_bps {
                return Err(LinkError::Protocol(format!(
                    "auto pacing bounds {min_bps}..{max_bps}"
                )));
            }
            cfg.rate_bps = Some(AUTO_START_BPS.clamp(min_bps, max_bps));
        }
        // Hello: our block size and channels; the answer carries the receiver's UDP ports.
        let hello = Hello {
            block_bytes: cfg.block_bytes as u32,
            channels: cfg.channels,
            ports: [0; MAX_CHANNELS as usize],
        };
        let h = dgt_header(MsgKind::DgtHello, sender_id);
        write_frame(&mut tcp, &h, &hello.encode(), opts.connect_timeout)?;
        let mut dec = FrameDecoder::new(crate::wire::HEADER_LEN + crate::wire::DGT_MAX_END_PAYLOAD);
        let mut pending = Vec::new();
        let f = read_one(&mut tcp, &mut dec, &mut pending, opts.connect_timeout)?;
        if f.header.kind != MsgKind::DgtHello {
            return Err(LinkError::Protocol(format!(
                "expected a hello, got {:?}",
                f.header.kind
            )));
        }
        let ack = Hello::decode(&f.payload)?;
        if ack.block_bytes != hello.block_bytes || ack.channels != cfg.channels {
            return Err(LinkError::Protocol(format!(
                "receiver answered block {} channels {}, we use {} / {}",
                ack.block_bytes, ack.channels, hello.block_bytes, cfg.channels
            )));
        }
        let ip = tcp
            .tcp
            .local_addr()
            .map_err(|e| LinkError::Io("local_addr", e))?
            .ip();
        let udp = UdpChannels::bind(ip, cfg.channels, DEFAULT_RECV_BUFFER)
            .map_err(|e| LinkError::Io("udp bind", e))?;
        let dest: Vec<SocketAddr> = ack.ports[..usize::from(cfg.channels)]
            .iter()
            .map(|&p| SocketAddr::new(server.ip(), p))
            .collect();
        let gso = opts.gso && udp.socket(1).map(sys::gso_supported).unwrap_or(false);
        let block_bytes = cfg.block_bytes;
        let sender = DgtSender::new(sender_id, cfg, Instant::now())?;
        let shared = Arc::new(Shared {
            stats: Mutex::new(ClientStats {
                block_bytes,
                gso,
                rate_bps: sender.rate_bps(),
                ..ClientStats::default()
            }),
            closed: Mutex::new(None),
        });
        let waker = Waker::new().map_err(|e| LinkError::Io("waker", e))?;
        let wake = waker.handle().map_err(|e| LinkError::Io("waker", e))?;
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let seal = tcp
            .datagram_key
            .map(|(k, aes)| DatagramSealer::new(&k, aes, sender_id));
        let mut lp = Loop {
            seal,
            sealed: Vec::new(),
            id: sender_id,
            sender,
            tcp,
            dec,
            pending,
            udp,
            dest,
            batch: Batch::default(),
            gso,
            waker,
            cmd: cmd_rx,
            shared: shared.clone(),
            opts,
            flushes: Vec::new(),
            datagrams: 0,
            udp_sends: 0,
            udp_errors: 0,
            round_loss: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("geomx-dgt-tx-{sender_id}"))
            .spawn(move || {
                let reason = match lp.run() {
                    Ok(()) => "closed".to_string(),
                    Err(e @ LinkError::Closed(_)) => {
                        // The receiver went away (e.g. at the end of a job): not a fault here.
                        tracing::debug!(error = %e, "dgt sender link closed by the receiver");
                        e.to_string()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dgt sender link stopped");
                        e.to_string()
                    }
                };
                lp.publish();
                *lp.shared.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            })
            .map_err(|e| LinkError::Io("spawn", e))?;
        Ok(DgtClient {
            cmd: cmd_tx,
            wake,
            shared,
            block_bytes,
            thread: Some(thread),
        })
    }

    /// Block size B in use.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Blocks n_b of a tensor of `n` elements of `vt` at this link's block size.
    pub fn num_blocks(&self, n: usize, vt: ValueType) -> usize {
        n.div_ceil(self.block_bytes / vt.size())
    }

    /// Queues f32 `values` of (key, round) with the caller's channel map (see
    /// [`DgtSender::push`]); returns once the sender accepted or refused them.
    pub fn push_f32(
        &self,
        key: u32,
        round: u32,
        values: Vec<f32>,
        channel_of_block: Vec<u8>,
    ) -> Result<(), LinkError> {
        self.push(key, round, Owned::F32(values), channel_of_block)
    }

    /// As [`DgtClient::push_f32`] for IEEE binary16 bit patterns.
    pub fn push_f16(
        &self,
        key: u32,
        round: u32,
        values: Vec<u16>,
        channel_of_block: Vec<u8>,
    ) -> Result<(), LinkError> {
        self.push(key, round, Owned::F16(values), channel_of_block)
    }

    fn push(&self, key: u32, round: u32, values: Owned, map: Vec<u8>) -> Result<(), LinkError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let cmd = Cmd::Push {
            key,
            round,
            values,
            map,
            done: tx,
        };
        self.cmd.send(cmd).map_err(|_| self.closed_error())?;
        sys::wake(&self.wake);
        rx.recv().map_err(|_| self.closed_error())?
    }

    /// Waits until everything queued has been handed to the kernel.
    pub fn flush(&self, timeout: Duration) -> Result<(), LinkError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.cmd
            .send(Cmd::Flush(tx))
            .map_err(|_| self.closed_error())?;
        sys::wake(&self.wake);
        match rx.recv_timeout(timeout) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                Err(LinkError::Timeout(format!("flushing for {timeout:?}")))
            }
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ClientStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the link stopped, or `None` while it runs.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared
            .closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn closed_error(&self) -> LinkError {
        LinkError::Closed(self.closed_reason().unwrap_or_else(|| "stopped".into()))
    }
}

impl Drop for DgtClient {
    fn drop(&mut self) {
        // Closing the command channel ends the loop.
        let (tx, _) = crossbeam_channel::unbounded();
        drop(std::mem::replace(&mut self.cmd, tx));
        sys::wake(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Consecutive datagrams of one channel, all `seg` bytes but possibly the last.
#[derive(Default)]
struct Batch {
    ch: u8,
    seg: usize,
    count: usize,
    closed: bool,
    buf: Vec<u8>,
}

struct Loop {
    /// Seals every datagram (TLS), into `sealed`.
    seal: Option<DatagramSealer>,
    sealed: Vec<u8>,
    id: u32,
    sender: DgtSender,
    tcp: Reliable,
    dec: FrameDecoder,
    pending: Vec<Frame>,
    udp: UdpChannels,
    dest: Vec<SocketAddr>,
    batch: Batch,
    gso: bool,
    waker: Waker,
    cmd: Receiver<Cmd>,
    shared: Arc<Shared>,
    opts: LinkOptions,
    flushes: Vec<Sender<()>>,
    datagrams: u64,
    udp_sends: u64,
    udp_errors: u64,
    /// Unreliable (sent, lost) summed over the reports of the latest round: (round, sent, lost).
    round_loss: Option<(u32, u64, u64)>,
}

impl Loop {
    fn run(&mut self) -> Result<(), LinkError> {
        let mut rbuf = vec![0u8; 64 * 1024];
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut frames = std::mem::take(&mut self.pending);
        let mut last_publish = Instant::now();
        loop {
            self.waker.drain();
            loop {
                match self.cmd.try_recv() {
                    Ok(Cmd::Push {
                        key,
                        round,
                        values,
                        map,
                        done,
                    }) => {
                        let v = match &values {
                            Owned::F32(v) => Values::F32(v),
                            Owned::F16(v) => Values::F16(v),
                        };
                        let r = self.sender.push(key, round, v, &map);
                        let _ = done.send(r.map_err(LinkError::from));
                    }
                    Ok(Cmd::Flush(tx)) => self.flushes.push(tx),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            if !read_frames(
                &mut self.tcp,
                &mut self.dec,
                &mut rbuf,
                usize::MAX,
                &mut frames,
            )? {
                return Err(LinkError::Closed(
                    "receiver closed the reliable channel".into(),
                ));
            }
            for f in frames.drain(..) {
                self.on_frame(f)?;
            }
            let now = Instant::now();
            loop {
                buf.clear();
                let Some(t) = self.sender.poll_transmit(now, &mut buf) else {
                    break;
                };
                if t.channel == 0 {
                    self.flush_batch();
                    let kind = match t.kind {
                        DgtKind::Block => MsgKind::DgtBlock,
                        _ => MsgKind::DgtEnd,
                    };
                    let h = dgt_header(kind, self.id);
                    write_frame(&mut self.tcp, &h, &buf, self.opts.write_timeout)?;
                } else {
                    self.add_datagram(t.channel, &buf);
                }
            }
            self.flush_batch();
            if !self.sender.is_busy() {
                for f in self.flushes.drain(..) {
                    let _ = f.send(());
                }
            }
            if now.duration_since(last_publish) >= Duration::from_millis(20)
                || !self.sender.is_busy()
            {
                self.publish();
                last_publish = now;
            }
            let timeout = match self.sender.poll_timeout() {
                Some(at) => sys::until(at, Instant::now()),
                None if self.sender.is_busy() => Duration::ZERO,
                None => Duration::from_millis(100),
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.tcp.tcp.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.waker.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            sys::poll(&mut fds, Some(timeout)).map_err(|e| LinkError::Io("poll", e))?;
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), LinkError> {
        match f.header.kind {
            MsgKind::DgtReport => {
                let r = RoundReport::decode(&f.payload)?;
                if r.sender != self.id {
                    return Err(LinkError::Protocol(format!(
                        "report for sender {} on sender {}'s link",
                        r.sender, self.id
                    )));
                }
                self.on_report(&r)
            }
            MsgKind::DgtRate => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&f.payload);
                let bps = u64::from_le_bytes(b);
                let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
                st.measured_goodput_bps = Some(bps);
                drop(st);
                if let Pacing::Auto { min_bps, max_bps } = self.opts.pacing {
                    let r = bps.clamp(min_bps, max_bps);
                    self.sender.set_rate(r, Instant::now())?;
                    tracing::debug!(rate = r, measured = bps, "dgt: pacing from goodput");
                }
                Ok(())
            }
            other => Err(LinkError::Protocol(format!("{other:?} from the receiver"))),
        }
    }

    fn on_report(&mut self, r: &RoundReport) -> Result<(), LinkError> {
        {
            let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.reports += 1;
            for (i, c) in r.channels.iter().enumerate() {
                let t = &mut st.report_totals[i];
                t.0 += u64::from(c.sent);
                t.1 += u64::from(c.on_time);
                t.2 += u64::from(c.late);
                t.3 += u64::from(c.lost());
            }
        }
        // `auto` adapts once per round, from the unreliable loss over all keys of that round
        // (one report per key and round; the reports of a round come together, rounds in order).
        let (sent, lost) = r.channels.iter().skip(1).fold((0u64, 0u64), |(s, l), c| {
            (s + u64::from(c.sent), l + u64::from(c.lost()))
        });
        match self.round_loss {
            Some((round, s, l)) if round == r.round => {
                self.round_loss = Some((round, s + sent, l + lost));
            }
            prev => {
                if let Some((_, s, l)) = prev {
                    self.adapt(s, l)?;
                }
                self.round_loss = Some((r.round, sent, lost));
            }
        }
        Ok(())
    }

    /// One `auto` pacing step from a round's unreliable blocks `sent` and `lost`.
    fn adapt(&mut self, sent: u64, lost: u64) -> Result<(), LinkError> {
        if let Pacing::Auto { min_bps, max_bps } = self.opts.pacing {
            let loss = if sent == 0 {
                0.0
            } else {
                lost as f64 / sent as f64
            };
            let rate = self
                .sender
                .adapt_rate(loss, min_bps, max_bps, Instant::now())?;
            tracing::trace!(loss, rate, "dgt: pacing adapted");
        }
        Ok(())
    }

    fn add_datagram(&mut self, ch: u8, bytes: &[u8]) {
        let mut sealed = std::mem::take(&mut self.sealed);
        let bytes = match self.seal.as_mut() {
            Some(s) => {
                s.seal(ch, bytes, &mut sealed);
                &sealed[..]
            }
            None => bytes,
        };
        self.add_to_batch(ch, bytes);
        self.sealed = sealed;
    }

    fn add_to_batch(&mut self, ch: u8, bytes: &[u8]) {
        let b = &mut self.batch;
        if b.count > 0
            && (b.ch != ch
                || bytes.len() > b.seg
                || b.closed
                || b.count == GSO_MAX_SEGMENTS
                || b.buf.len() + bytes.len() > GSO_MAX_BYTES)
        {
            self.flush_batch();
        }
        let b = &mut self.batch;
        if b.count == 0 {
            b.ch = ch;
            b.seg = bytes.len();
            b.closed = false;
            b.buf.clear();
        }
        b.buf.extend_from_slice(bytes);
        b.count += 1;
        if bytes.len() < b.seg {
            b.closed = true;
        }
        if !self.gso {
            self.flush_batch();
        }
    }

    fn flush_batch(&mut self) {
        let b = std::mem::take(&mut self.batch);
        if b.count == 0 {
            return;
        }
        self.batch.buf = Vec::with_capacity(b.buf.capacity());
        let to = self.dest[usize::from(b.ch) - 1];
        let Ok(sock) = self.udp.socket(b.ch) else {
            self.udp_errors += b.count as u64;
            return;
        };
        self.datagrams += b.count as u64;
        if self.gso && b.count > 1 {
            match sys::send_gso(sock, &b.buf, b.seg as u16, to) {
                Ok(()) => {
                    self.udp_sends += 1;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dgt: UDP GSO send failed, sending datagrams one by one");
                    self.gso = false;
                }
            }
        }
        for d in b.buf.chunks(b.seg) {
            self.udp_sends += 1;
            if let Err(e) = sys::send_one(sock, d, to) {
                self.udp_errors += 1;
                tracing::debug!(error = %e, "dgt: datagram not sent");
            }
        }
    }

    fn publish(&self) {
        let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.sent = self.sender.counters().clone();
        st.gso = self.gso;
        st.datagrams = self.datagrams;
        st.udp_sends = self.udp_sends;
        st.udp_errors = self.udp_errors;
        st.rate_bps = self.sender.rate_bps();
    }
}
