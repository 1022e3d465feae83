//! Portable driver: std sockets and threads.
//!
//! * Writes happen on the calling thread under a per-connection lock (vectored: header and
//!   payload in one call, no copy).
//! * Accepted connections get a reader thread that decodes frames and runs the handler, and a
//!   thread that sends the heartbeats falling due while a handler holds the reader.
//! * Initiated (client) connections are read **inline** by the thread that waits for a response
//!   (whoever holds the reader lock reads and dispatches for everyone), so a response costs no
//!   extra thread wake-up; a background ticker drives timeouts and heartbeats and reads only while
//!   no caller is waiting.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use crate::conn::{Connection, Side};
use crate::error::NetError;
use crate::link::{Dispatch, Link, LinkIo, Pump, ReplyTx};
use crate::stats::LiveCounters;
use crate::tcp_state::TcpProgress;
use crate::tls::record::MAX_PLAINTEXT;
use crate::tls::{Opener, Sealer, SessionParts};
use crate::wire::{Frame, FrameDecoder, HEADER_LEN};

use super::{feed_input, seal_windows, NetOptions};

/// Reads go through a scratch buffer of this size unless a larger payload can be read in place.
const SCRATCH: usize = 64 << 10;

pub(crate) struct PortableDriver {
    max_frame: usize,
    tick: Duration,
    chunk: usize,
    /// A write that makes no progress for this long fails (the peer stopped reading).
    stall: Duration,
    /// What every connection's socket gets.
    pub(crate) socket_tuning: super::SocketTuning,
}

impl PortableDriver {
    pub(crate) fn new(opts: &NetOptions) -> Self {
        PortableDriver {
            socket_tuning: super::SocketTuning::new(opts),
            max_frame: opts.max_frame,
            tick: opts.tick,
            chunk: opts.chunk(),
            stall: opts.conn.peer_timeout,
        }
    }

    pub(crate) fn attach(
        &self,
        stream: TcpStream,
        conn: Connection<ReplyTx>,
        counters: Arc<LiveCounters>,
        dispatch: Arc<dyn Dispatch>,
        secure: SessionParts,
    ) -> Result<Arc<Link>, NetError> {
        let side = conn.side();
        let peer = stream.peer_addr()?;
        let read_half = stream.try_clone()?;
        read_half.set_read_timeout(Some(self.tick))?;
        // SO_SNDTIMEO: each write call gives up after this long without progress.
        stream.set_write_timeout(Some(self.stall.max(Duration::from_millis(1))))?;
        let ctl = stream.try_clone()?;
        let io = Box::new(StreamIo {
            stream: Mutex::new(Writer {
                stream,
                sealer: secure.sealer,
                sealed: Vec::new(),
            }),
            ctl,
            chunk: self.chunk,
        });
        let link = Link::new(
            conn,
            io,
            counters,
            self.max_frame,
            peer,
            secure.identity,
            dispatch,
        );
        let mut reader = Reader::new(read_half, self.max_frame, self.chunk);
        reader.opener = secure.opener;
        let l2 = link.clone();
        let tick = self.tick;
        match side {
            Side::Acceptor => {
                let busy = reader.busy.clone();
                std::thread::Builder::new()
                    .name("geomx-net-rd".into())
                    .spawn(move || read_loop(l2, reader, tick))?;
                let l3 = link.clone();
                std::thread::Builder::new()
                    .name("geomx-net-hb".into())
                    .spawn(move || busy_heartbeats(l3, busy, tick))?;
            }
            Side::Initiator => {
                let pump = Arc::new(InlinePump {
                    reader: Mutex::new(reader),
                    user_active: AtomicBool::new(false),
                });
                link.set_pump(pump.clone());
                std::thread::Builder::new()
                    .name("geomx-net-tick".into())
                    .spawn(move || tick_loop(l2, pump, tick))?;
            }
        }
        Ok(link)
    }
}

/// The write half: the socket and, on an encrypted connection, the sealer and its buffer.
struct Writer {
    stream: TcpStream,
    sealer: Option<Sealer>,
    sealed: Vec<u8>,
}

impl Writer {
    fn write_frame(&mut self, header: &[u8], payload: &[u8], chunk: usize) -> std::io::Result<()> {
        let Some(sealer) = self.sealer.as_mut() else {
            return write_all(&mut self.stream, header, payload, chunk);
        };
        // Sealed in windows of about `chunk` bytes, each written before the next is sealed.
        let stream = &mut self.stream;
        seal_windows(sealer, header, payload, chunk, &mut self.sealed, |w| {
            write_all(stream, w, &[], chunk)
        })?;
        if self.sealed.capacity() > 4 * chunk.max(MAX_PLAINTEXT) {
            self.sealed = Vec::new();
        }
        Ok(())
    }
}

struct StreamIo {
    stream: Mutex<Writer>,
    ctl: TcpStream,
    /// At most this many bytes per call (`NetOptions::io_chunk`).
    chunk: usize,
}

fn write_all(
    stream: &mut TcpStream,
    header: &[u8],
    payload: &[u8],
    chunk: usize,
) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(payload)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    if payload.is_empty() {
        bufs = &mut bufs[..1];
    }
    while !bufs.is_empty() {
        // At most `chunk` bytes per call (see `NetOptions::io_chunk`): the first slice, or both
        // when the header and the payload's start fit.
        let first = bufs[0].len();
        let res = if first >= chunk {
            stream.write(&bufs[0][..chunk])
        } else if bufs.len() > 1 {
            let rest = (chunk - first).min(bufs[1].len());
            stream.write_vectored(&[IoSlice::new(&bufs[0]), IoSlice::new(&bufs[1][..rest])])
        } else {
            stream.write(&bufs[0])
        };
        match res {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // SO_SNDTIMEO expired: the socket took nothing for the peer timeout.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let tcp = TcpProgress::suffix(&*stream);
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "peer stopped reading (a write made no progress for the peer timeout{tcp})"
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl LinkIo for StreamIo {
    fn send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> std::io::Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        s.write_frame(header, payload, self.chunk)
    }

    fn try_send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> std::io::Result<bool> {
        let mut s = match self.stream.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        s.write_frame(header, payload, self.chunk).map(|_| true)
    }

    fn send_alert(&self, description: u8) {
        // Only if no frame is being written (it would be cut in two).
        let Ok(mut w) = self.stream.try_lock() else {
            return;
        };
        let w = &mut *w;
        let Some(sealer) = w.sealer.as_mut() else {
            return;
        };
        let mut rec = Vec::new();
        if sealer.seal_alert(description, &mut rec).is_ok() {
            let _ = w.stream.set_nonblocking(true);
            let _ = w.stream.write(&rec);
            let _ = w.stream.set_nonblocking(false);
        }
    }

    fn shutdown(&self) {
        // Through a second handle, so a writer blocked under the lock is woken too.
        let _ = self.ctl.shutdown(Shutdown::Both);
    }

    fn tcp_progress(&self) -> Option<TcpProgress> {
        TcpProgress::read(&self.ctl)
    }

    fn socket(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(&self.ctl)
    }

    fn driver(&self) -> super::DriverKind {
        super::DriverKind::Portable
    }
}

/// The read half of a connection: socket, decoder and buffers.
struct Reader {
    stream: TcpStream,
    /// At most this many bytes per read (`NetOptions::io_chunk`).
    chunk: usize,
    dec: FrameDecoder,
    buf: Vec<u8>,
    frames: Vec<Frame>,
    done: bool,
    /// Encrypted connection: opens records before decoding; `plain` is its reused output.
    opener: Option<Opener>,
    plain: Vec<u8>,
    /// Set while the endpoint's callbacks run on this thread (accepted connections).
    busy: Arc<Busy>,
    /// How long the last read's input took to handle.
    handled_for: Duration,
}

/// Since when a reader thread has been running the endpoint's callbacks, if it is.
struct Busy {
    /// Milliseconds after `epoch` plus one; 0 while the thread is not in a callback.
    since: AtomicU64,
    epoch: Instant,
}

impl Busy {
    fn new() -> Busy {
        Busy {
            since: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn enter(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.since.store(ms + 1, Ordering::Release);
    }

    fn leave(&self) {
        self.since.store(0, Ordering::Release);
    }

    /// Whether the thread has been in a callback for at least `d` at `now`.
    fn for_at_least(&self, d: Duration, now: Instant) -> bool {
        match self.since.load(Ordering::Acquire) {
            0 => false,
            s => {
                let in_for = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1 - s;
                in_for >= d.as_millis() as u64
            }
        }
    }
}

impl Reader {
    fn new(stream: TcpStream, max_frame: usize, chunk: usize) -> Reader {
        Reader {
            stream,
            chunk,
            dec: FrameDecoder::new(max_frame),
            buf: vec![0u8; SCRATCH],
            frames: Vec::new(),
            done: false,
            opener: None,
            plain: Vec::new(),
            busy: Arc::new(Busy::new()),
            handled_for: Duration::ZERO,
        }
    }

    /// One read (blocking up to the socket's read timeout) and its processing. Sets `done` when
    /// the connection ended.
    fn read_once(&mut self, link: &Arc<Link>) {
        if self.done {
            return;
        }
        // Encrypted input is opened before decoding, so it never goes straight to a payload.
        let plain = self.opener.is_none();
        let direct = plain && self.dec.direct_target(SCRATCH).is_some();
        let res = match self.dec.direct_target(SCRATCH) {
            Some(target) if plain => read_uninit(&mut self.stream, target, self.chunk),
            _ => self.stream.read(&mut self.buf),
        };
        match res {
            Ok(0) => {
                let reason = match self.dec.finish() {
                    Ok(()) => "connection closed by peer".to_string(),
                    Err(e) => format!("connection closed by peer mid-frame ({e})"),
                };
                self.done = true;
                link.on_io_closed(reason);
            }
            Ok(n) => {
                link.counters().add_recv_bytes(n);
                let res = if direct {
                    // SAFETY: `read_uninit` initialised exactly n bytes of the direct target.
                    unsafe { self.dec.commit_direct(n, &mut self.frames) };
                    Ok(())
                } else {
                    feed_input(
                        self.opener.as_mut(),
                        &mut self.plain,
                        &mut self.dec,
                        &self.buf[..n],
                        &mut self.frames,
                    )
                };
                let t = Instant::now();
                self.busy.enter(t);
                link.on_input(t, &mut self.frames);
                self.busy.leave();
                let took = t.elapsed();
                self.handled_for = took;
                if took >= super::SLOW_HANDLING {
                    tracing::warn!(
                        peer = %link.peer_addr(),
                        "handling one read's input took {:.1} ms on the thread that reads the \
                         connection (the endpoint's callbacks); it was not read meanwhile",
                        took.as_secs_f64() * 1e3
                    );
                }
                if let Err(e) = res {
                    self.done = true;
                    link.on_input_error(e);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                self.done = true;
                link.on_io_closed(format!("connection reset: {e}"));
            }
        }
        if link.is_closed() {
            self.done = true;
        }
    }
}

/// Server side: a dedicated reader thread per accepted connection.
fn read_loop(link: Arc<Link>, mut reader: Reader, tick: Duration) {
    let mut next_tick = Instant::now() + tick;
    while !reader.done {
        reader.handled_for = Duration::ZERO;
        reader.read_once(&link);
        if reader.handled_for >= tick {
            // Read again before judging the peer's silence: what it sent while the callbacks
            // held this thread waits in the kernel.
            continue;
        }
        let now = Instant::now();
        if now >= next_tick {
            link.on_tick(now);
            next_tick = now + tick;
        }
    }
}

/// Server side: heartbeats while the reader thread runs the endpoint's callbacks, which may
/// block (a reply written to a slow peer, a lock, a full queue); otherwise the reader ticks. So
/// a busy endpoint is not declared dead by its peer.
fn busy_heartbeats(link: Arc<Link>, busy: Arc<Busy>, tick: Duration) {
    while !link.is_closed() {
        std::thread::sleep(tick);
        let now = Instant::now();
        if busy.for_at_least(tick, now) {
            link.heartbeat_while_busy(now);
        }
    }
}

/// Client side: reading done by whichever thread waits (see the module docs).
struct InlinePump {
    reader: Mutex<Reader>,
    /// A caller read since the ticker last looked.
    user_active: AtomicBool,
}

impl Pump for InlinePump {
    fn pump(&self, link: &Arc<Link>) -> bool {
        let mut r = match self.reader.try_lock() {
            Ok(r) => r,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        self.user_active.store(true, Ordering::Relaxed);
        if r.done {
            return false;
        }
        r.read_once(link);
        true
    }
}

/// Client side: timers and heartbeats every tick; reads only while no caller is reading.
fn tick_loop(link: Arc<Link>, pump: Arc<InlinePump>, tick: Duration) {
    loop {
        if !pump.user_active.swap(false, Ordering::Relaxed) {
            let mut r = pump.reader.lock().unwrap_or_else(|p| p.into_inner());
            r.read_once(&link); // blocks up to one tick
            if r.done {
                break;
            }
        } else {
            std::thread::sleep(tick);
        }
        link.on_tick(Instant::now());
        if link.is_closed() {
            break;
        }
    }
    // Wake callers blocked on the reader with the final state.
    link.flush();
}

/// Reads into uninitialised memory (the kernel writes it; nothing reads it before).
#[cfg(unix)]
fn read_uninit(
    stream: &mut TcpStream,
    buf: &mut [std::mem::MaybeUninit<u8>],
    chunk: usize,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let len = buf.len().min(chunk);
    // SAFETY: `buf` is valid for `len` writable bytes; recv writes at most that many.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            len,
            0,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Portable fallback: zero the target first, then read into it.
#[cfg(not(unix))]
fn read_uninit(
    stream: &mut TcpStream,
    buf: &mut [std::mem::MaybeUninit<u8>],
    chunk: usize,
) -> std::io::Result<usize> {
    let buf = &mut buf[..buf.len().min(chunk)];
    for b in buf.iter_mut() {
        b.write(0);
    }
    // SAFETY: every byte was initialised just above.
    let init = unsafe { &mut *(buf as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) };
    stream.read(init)
}
