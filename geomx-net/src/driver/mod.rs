//! I/O drivers: move bytes between sockets and [`Link`]s.
//!
//! * [`DriverKind::Portable`]: std sockets, one reader thread per connection, writes on the
//!   caller's thread.
//! * [`DriverKind::IoUring`] (Linux): one ring thread per endpoint (see `uring`).
//! * [`DriverKind::Auto`]: io_uring when the kernel allows it, otherwise portable, with one log line
//!   saying why.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::conn::{ConnConfig, Connection};
use crate::error::NetError;
use crate::link::{Dispatch, Link, ReplyTx};
use crate::stats::LiveCounters;
use crate::tls::record::{MAX_PLAINTEXT, RECORD_HEADER};
use crate::tls::{Opener, Sealer, Session, SessionParts};
use crate::wire::{Frame, FrameDecoder, MAX_FRAME};

/// Handling a connection's input (decoding, the connection machine, the endpoint's callbacks)
/// that takes this long on the thread that reads it is logged at `warn`: meanwhile that
/// connection (portable driver) or every connection of the endpoint (an io_uring ring turn) was
/// not read, and a live peer can be declared silent.
pub(crate) const SLOW_HANDLING: Duration = Duration::from_secs(1);

mod portable;
#[cfg(target_os = "linux")]
mod uring;

/// The default of [`NetOptions::io_chunk`]: the most bytes one send or receive system call (or
/// io_uring operation) moves.
///
/// Copying between user memory and a socket is kernel work that a kernel built without
/// preemption (`preempt=none`, common on cloud VMs) does not interrupt: one 9 MB send on loopback
/// or a veth holds its CPU for milliseconds, during which no other thread, real-time or not, runs
/// there. 256 KiB bounds that to tens of microseconds, for four system calls (or io_uring
/// operations) per megabyte. Measured with a real-time thread sharing the machine with two
/// processes streaming over loopback: it waited 6.2 s for a CPU in 12 s at 8 MiB per call, 1.5 s
/// at 1 MiB, 0.14 s at 256 KiB (docs/wan-lab.md, "Fidelity"). Where no such thread shares the
/// machine, larger calls cost fewer system calls and wake-ups per megabyte.
pub const DEFAULT_IO_CHUNK: usize = 256 << 10;
/// The smallest [`NetOptions::io_chunk`] used (smaller values are raised to it).
pub const MIN_IO_CHUNK: usize = 4 << 10;

/// Which I/O driver an endpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DriverKind {
    /// io_uring if available, else portable (logged once, with the reason).
    #[default]
    Auto,
    /// io_uring; endpoint creation fails with [`NetError::DriverUnavailable`] if it cannot run.
    IoUring,
    /// std sockets and threads; runs everywhere.
    Portable,
}

impl DriverKind {
    /// The name used in logs, configuration and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Auto => "auto",
            DriverKind::IoUring => "io-uring",
            DriverKind::Portable => "portable",
        }
    }
}

impl std::str::FromStr for DriverKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DriverKind::Auto),
            "io-uring" | "io_uring" | "iouring" => Ok(DriverKind::IoUring),
            "portable" => Ok(DriverKind::Portable),
            other => Err(format!(
                "unknown driver {other:?} (expected auto, io-uring or portable)"
            )),
        }
    }
}

/// Transport options shared by every endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// I/O driver.
    pub driver: DriverKind,
    /// Handshake, request, heartbeat and liveness timing.
    pub conn: ConnConfig,
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Largest frame (header + payload) sent or accepted.
    pub max_frame: usize,
    /// Timer granularity of the drivers (how often timeouts are checked).
    pub tick: Duration,
    /// io_uring: payloads at least this large go out with `SEND_ZC`.
    pub zerocopy_threshold: usize,
    /// The most bytes one send or receive call moves (at least [`MIN_IO_CHUNK`]); see
    /// [`DEFAULT_IO_CHUNK`] for the trade-off.
    pub io_chunk: usize,
    /// Plaintext, or mutual TLS 1.3 with the job's certificates ([`crate::tls`]).
    pub security: crate::tls::Security,
    /// A server's open connections at most ([`DEFAULT_MAX_CONNECTIONS`]); more are closed as
    /// they are accepted.
    pub max_connections: usize,
    /// Linux `TCP_NOTSENT_LOWAT` of every connection, in bytes: a blocking write returns once
    /// the socket holds at most this much data not yet sent (`None`: the kernel's default, which
    /// lets a whole socket buffer queue up). A priority sender
    /// ([`crate::sched::priority::PrioritySender`]) needs a small value, or the socket's queue
    /// turns its priorities back into first come, first served. Ignored elsewhere.
    pub notsent_lowat: Option<u32>,
    /// `SO_SNDBUF` of every connection, in bytes (`None`: the kernel's autotuning). It caps what
    /// a connection holds unacknowledged, in flight or queued, and so how much a priority sender
    /// has committed ahead of a more urgent slice: its credit. It must cover the path's
    /// bandwidth × round-trip time or it caps the throughput. Zero-copy sends escape this
    /// accounting: set [`NetOptions::zerocopy_threshold`] to `usize::MAX` with it.
    pub send_buffer: Option<usize>,
    /// TCP congestion control of every connection (`TCP_CONGESTION`, Linux; `None`: the
    /// system's default). See [`crate::congestion`] for why a lossy WAN wants `"bbr"`; a
    /// connection whose socket refuses the name fails to attach with the kernel's reason.
    pub congestion: Option<crate::congestion::Algorithm>,
}

/// Default of [`NetOptions::max_connections`]: the portable driver runs a thread per connection.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

impl NetOptions {
    /// [`NetOptions::io_chunk`] as the drivers use it.
    pub(crate) fn chunk(&self) -> usize {
        self.io_chunk.max(MIN_IO_CHUNK)
    }
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            driver: DriverKind::Auto,
            conn: ConnConfig::default(),
            connect_timeout: Duration::from_secs(10),
            max_frame: MAX_FRAME,
            tick: Duration::from_millis(50),
            zerocopy_threshold: 64 << 10,
            io_chunk: DEFAULT_IO_CHUNK,
            security: crate::tls::Security::Off,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            notsent_lowat: None,
            send_buffer: None,
            congestion: None,
        }
    }
}

/// Reads from the socket go through here: opened first on an encrypted connection (into
/// `plain`, reused), then decoded into frames.
pub(crate) fn feed_input(
    opener: Option<&mut Opener>,
    plain: &mut Vec<u8>,
    dec: &mut FrameDecoder,
    bytes: &[u8],
    frames: &mut Vec<Frame>,
) -> Result<(), NetError> {
    match opener {
        None => dec.feed(bytes, frames).map_err(NetError::Wire),
        Some(o) => {
            // One record at a time: a whole record inside a payload is opened straight into
            // the payload's buffer (one copy); anything else goes through `plain`.
            let mut input = bytes;
            while !input.is_empty() {
                if let Some(len) = o.next_record_len(input).filter(|&l| l <= input.len()) {
                    if let Some(target) = dec.direct_target(len - RECORD_HEADER) {
                        let n = o.open_into(&input[..len], target)?;
                        // SAFETY: `open_into` initialised the first n bytes of the target.
                        unsafe { dec.commit_direct(n, frames) };
                        input = &input[len..];
                        continue;
                    }
                }
                let step = o.record_step(input);
                plain.clear();
                // Frames decoded before a failure are still delivered.
                let opened = o.open(&input[..step], plain);
                dec.feed(plain, frames)?;
                opened?;
                input = &input[step..];
            }
            Ok(())
        }
    }
}

/// Seals a frame into `out` (cleared first) for an encrypted connection.
pub(crate) fn seal_frame(
    sealer: &mut Sealer,
    header: &[u8],
    payload: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.clear();
    sealer
        .seal(&[header, payload], out)
        .map_err(|e| std::io::Error::other(NetError::Tls(e)))
}

/// Seals a frame in windows of about `window` bytes (whole records) into `out`, handing each to
/// `emit` before the next is sealed, so the socket moves one window while the CPU seals the next
/// and memory stays bounded. `emit` may take `out` (leaving it empty).
pub(crate) fn seal_windows(
    sealer: &mut Sealer,
    header: &[u8],
    payload: &[u8],
    window: usize,
    out: &mut Vec<u8>,
    mut emit: impl FnMut(&mut Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let window = (window / MAX_PLAINTEXT).max(1) * MAX_PLAINTEXT;
    let mut first = true;
    let mut rest = payload;
    while first || !rest.is_empty() {
        let head: &[u8] = if first { header } else { &[] };
        let take = window.saturating_sub(head.len()).min(rest.len());
        seal_frame(sealer, head, &rest[..take], out)?;
        emit(out)?;
        rest = &rest[take..];
        first = false;
    }
    Ok(())
}

/// A driver instance owned by one endpoint.
pub(crate) enum Driver {
    Portable(portable::PortableDriver),
    #[cfg(target_os = "linux")]
    Uring(Arc<uring::UringDriver>),
}

impl Driver {
    /// Creates the driver `opts.driver` asks for.
    /// `inline`: a client endpoint, whose waiting callers may drive the I/O themselves.
    pub(crate) fn new(opts: &NetOptions, inline: bool) -> Result<Driver, NetError> {
        match opts.driver {
            DriverKind::Portable => Ok(Driver::Portable(portable::PortableDriver::new(opts))),
            DriverKind::IoUring => Self::uring(opts, inline),
            DriverKind::Auto => match uring_unavailable_reason() {
                None => Self::uring(opts, inline).or_else(|e| {
                    tracing::info!(reason = %e, "io_uring driver failed to start; using the portable driver");
                    Ok(Driver::Portable(portable::PortableDriver::new(opts)))
                }),
                Some(_) => Ok(Driver::Portable(portable::PortableDriver::new(opts))),
            },
        }
    }

    #[cfg(target_os = "linux")]
    fn uring(opts: &NetOptions, inline: bool) -> Result<Driver, NetError> {
        if let Some(why) = uring_unavailable_reason() {
            return Err(NetError::DriverUnavailable(why));
        }
        Ok(Driver::Uring(uring::UringDriver::start(opts, inline)?))
    }

    #[cfg(not(target_os = "linux"))]
    fn uring(_opts: &NetOptions, _inline: bool) -> Result<Driver, NetError> {
        Err(NetError::DriverUnavailable(
            "io_uring exists only on Linux".into(),
        ))
    }

    /// The resolved kind (never `Auto`).
    pub(crate) fn kind(&self) -> DriverKind {
        match self {
            Driver::Portable(_) => DriverKind::Portable,
            #[cfg(target_os = "linux")]
            Driver::Uring(_) => DriverKind::IoUring,
        }
    }

    /// Wraps a connected stream in a [`Link`] and starts moving its bytes; with a TLS `session`
    /// (its handshake done on `stream`), every byte is sealed and opened with its keys.
    pub(crate) fn attach(
        &self,
        stream: TcpStream,
        conn: Connection<ReplyTx>,
        counters: Arc<LiveCounters>,
        dispatch: Arc<dyn Dispatch>,
        session: Option<Session>,
    ) -> Result<Arc<Link>, NetError> {
        stream.set_nodelay(true)?;
        self.socket_tuning().apply(&stream)?;
        let secure = SessionParts::from(session);
        // Only an initiator has something to send before it reads (its Hello). An acceptor's
        // events come from its input, and the thread that reads it dispatches them: flushing here
        // could run the endpoint's callbacks on the caller's thread, a server's accept loop,
        // which a reply blocked on a peer that reads nothing would then hold (no connection
        // accepted meanwhile; seen in CI as a second client's handshake timing out).
        let initiator = conn.side() == crate::conn::Side::Initiator;
        let link = match self {
            Driver::Portable(d) => d.attach(stream, conn, counters, dispatch, secure)?,
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.attach(stream, conn, counters, dispatch, secure)?,
        };
        if initiator {
            link.flush();
        }
        Ok(link)
    }

    /// What every connection's socket gets.
    fn socket_tuning(&self) -> &SocketTuning {
        match self {
            Driver::Portable(d) => &d.socket_tuning,
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => &d.socket_tuning,
        }
    }

    /// Stops driver threads (links must have been closed first).
    pub(crate) fn shutdown(&self) {
        match self {
            Driver::Portable(_) => {}
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.shutdown(),
        }
    }
}

/// Why io_uring cannot be used here, or `None` if it can. Probed once per process; the reason is
/// logged once (one line) the first time it is asked.
pub fn uring_unavailable_reason() -> Option<String> {
    use std::sync::OnceLock;
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let why = probe_uring();
            if let Some(why) = &why {
                tracing::info!(reason = %why, "io_uring unavailable; using the portable driver");
            }
            why
        })
        .clone()
}

#[cfg(target_os = "linux")]
fn probe_uring() -> Option<String> {
    uring::probe()
}

#[cfg(not(target_os = "linux"))]
fn probe_uring() -> Option<String> {
    Some("io_uring exists only on Linux".into())
}

/// The socket options [`Driver::attach`] sets on every connection: [`NetOptions::notsent_lowat`],
/// [`NetOptions::send_buffer`] and [`NetOptions::congestion`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SocketTuning {
    notsent_lowat: Option<u32>,
    send_buffer: Option<usize>,
    congestion: Option<crate::congestion::Algorithm>,
}

impl SocketTuning {
    pub(crate) fn new(opts: &NetOptions) -> Self {
        SocketTuning {
            notsent_lowat: opts.notsent_lowat,
            send_buffer: opts.send_buffer,
            congestion: opts.congestion,
        }
    }

    fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        if let Some(bytes) = self.notsent_lowat {
            set_notsent_lowat(stream, bytes)?;
        }
        if let Some(bytes) = self.send_buffer {
            socket2::SockRef::from(stream).set_send_buffer_size(bytes)?;
        }
        if let Some(algo) = self.congestion {
            crate::congestion::set(stream, algo)?;
        }
        Ok(())
    }
}

/// Sets `TCP_NOTSENT_LOWAT` on `stream` (Linux; a no-op elsewhere).
fn set_notsent_lowat(stream: &TcpStream, bytes: u32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket descriptor and a c_int option value of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Frame, FrameHeader, MsgKind};

    #[test]
    #[cfg(target_os = "linux")]
    fn socket_tuning_sets_every_option_it_holds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let t = SocketTuning::new(&NetOptions {
            notsent_lowat: Some(16 << 10),
            send_buffer: Some(64 << 10),
            congestion: Some(crate::congestion::Algorithm::new("reno").unwrap()),
            ..NetOptions::default()
        });
        t.apply(&c).unwrap();
        assert_eq!(crate::congestion::get(&c).unwrap(), "reno");
        // Linux doubles SO_SNDBUF for its bookkeeping.
        let sndbuf = socket2::SockRef::from(&c).send_buffer_size().unwrap();
        assert_eq!(sndbuf, 128 << 10);
        // Nothing set: the socket keeps what it had.
        SocketTuning::default().apply(&c).unwrap();
        assert_eq!(crate::congestion::get(&c).unwrap(), "reno");
    }

    #[test]
    fn frames_cross_key_updates_on_every_input_split() {
        // A KeyUpdate every 2 records, so updates land inside headers' and payloads' records.
        let payloads: Vec<Vec<u8>> = [10usize, 100_000, 0, 40_000]
            .iter()
            .map(|&n| (0..n).map(|i| (i % 241) as u8).collect())
            .collect();
        let (mut s, _) = crate::tls::record::test_updating_pair(2);
        let mut wire = Vec::new();
        let mut out = Vec::new();
        for p in &payloads {
            let f = Frame::new(FrameHeader::new(MsgKind::Push), p.clone());
            seal_windows(&mut s, &f.header.encode(), p, 32 << 10, &mut out, |w| {
                wire.extend_from_slice(w);
                w.clear();
                Ok(())
            })
            .unwrap();
        }
        assert!(s.generation() >= 5, "{}", s.generation());
        for step in [1, 999, 16_405, wire.len()] {
            let (_, mut o) = crate::tls::record::test_updating_pair(2);
            let (mut plain, mut frames) = (Vec::new(), Vec::new());
            let mut dec = FrameDecoder::new(1 << 20);
            for c in wire.chunks(step) {
                feed_input(Some(&mut o), &mut plain, &mut dec, c, &mut frames).unwrap();
            }
            let got: Vec<&Vec<u8>> = frames.iter().map(|f| &f.payload).collect();
            assert_eq!(got, payloads.iter().collect::<Vec<_>>(), "step {step}");
            assert_eq!(o.generation(), s.generation());
        }
    }

    /// A record that fails authentication delivers nothing and is reported as what it is: an
    /// on-path attacker who writes a plaintext frame as a record's body (with any tag) gets no
    /// byte of it decoded, and the connection fails with an authentication error (before the
    /// fix, the failed record's buffer, which ring zeroes, reached the decoder: "bad magic").
    #[test]
    fn a_record_that_fails_authentication_delivers_nothing_and_says_so() {
        use crate::tls::record::{test_pair, RECORD_HEADER, TAG_LEN};
        use crate::tls::TlsError;
        let forged_frame = crate::wire::encode(&Frame::new(
            FrameHeader::new(MsgKind::Push),
            vec![0xAB; 300],
        ));
        let mut body = forged_frame.clone();
        body.push(23);
        body.extend_from_slice(&[0u8; TAG_LEN]);
        let mut forged = vec![23, 3, 3];
        forged.extend_from_slice(&(body.len() as u16).to_be_bytes());
        forged.extend_from_slice(&body);
        // At a frame boundary (through `open`) and inside a payload (through `open_into`).
        for inside_payload in [false, true] {
            let (mut s, mut o) = test_pair(&ring::aead::AES_256_GCM);
            let mut wire = Vec::new();
            if inside_payload {
                let f = Frame::new(FrameHeader::new(MsgKind::Push), vec![1; 4000]);
                s.seal(&[&f.header.encode()], &mut wire).unwrap();
            }
            wire.extend_from_slice(&forged);
            let (mut plain, mut frames) = (Vec::new(), Vec::new());
            let mut dec = FrameDecoder::new(1 << 20);
            let res = feed_input(Some(&mut o), &mut plain, &mut dec, &wire, &mut frames);
            assert!(
                matches!(res, Err(NetError::Tls(TlsError::BadRecordMac))),
                "{res:?}"
            );
            assert!(frames.is_empty(), "a forged record's frame was decoded");
            assert!(RECORD_HEADER < forged.len());
        }
    }
}
