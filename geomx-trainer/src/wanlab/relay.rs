//! The userspace L4 relay (no root needed): listens on a loopback port and forwards to a target,
//! adding a one-way delay, a token-bucket rate and (UDP only) random loss in each direction.
//!
//! TCP is split at the relay, so the sender no longer sees the WAN round trip; the relay caps its
//! in-flight bytes per connection and direction at rate × RTT (at least 64 KiB) to imitate a
//! window-limited path (wan-lab.md "Without root"). The timing logic is the sans-IO
//! [`ShapedPipe`]; threads move the bytes.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::awake::KeepAwake;
use super::WanLabError;

/// Smallest in-flight cap per connection direction.
const MIN_CAP: usize = 64 * 1024;
/// In-flight cap without a rate.
const UNSHAPED_CAP: usize = 8 * 1024 * 1024;
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// What one relay applies in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayParams {
    /// Bandwidth in Mbit/s; `None` = unlimited.
    pub rate_mbit: Option<f64>,
    /// One-way delay in milliseconds.
    pub delay_ms: f64,
    /// Drop probability of each UDP datagram (TCP is never dropped).
    pub loss: f64,
    /// Seed of the loss decisions.
    pub seed: u64,
}

impl RelayParams {
    /// In-flight cap of one direction: rate × RTT (RTT = 2 × one-way delay), at least 64 KiB.
    pub fn cap_bytes(&self) -> usize {
        match self.rate_mbit {
            Some(r) => ((r * 1e6 / 8.0 * 2.0 * self.delay_ms / 1e3) as usize).max(MIN_CAP),
            None => UNSHAPED_CAP,
        }
    }
}

/// One direction of a shaped path (sans-IO): a chunk of n bytes offered at `now` starts
/// serialising when the link is free, takes n / rate, and is released `delay` later.
pub struct ShapedPipe {
    ns_per_byte: f64,
    delay_ns: u64,
    cap: usize,
    link_free: u64,
    in_flight: usize,
    queue: VecDeque<(u64, Vec<u8>)>,
}

impl ShapedPipe {
    /// A pipe with `p`'s rate, delay and in-flight cap.
    pub fn new(p: &RelayParams) -> Self {
        Self {
            ns_per_byte: p.rate_mbit.map_or(0.0, |r| 8e3 / r),
            delay_ns: (p.delay_ms * 1e6).round() as u64,
            cap: p.cap_bytes(),
            link_free: 0,
            in_flight: 0,
            queue: VecDeque::new(),
        }
    }

    /// Bytes that may still be accepted before the in-flight cap.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.in_flight)
    }

    /// Queues `data` offered at `now`; returns its release time.
    pub fn push(&mut self, data: Vec<u8>, now: u64) -> u64 {
        let start = self.link_free.max(now);
        // Saturating: a release time beyond u64 nanoseconds (584 years) is never.
        let serialise = (data.len() as f64 * self.ns_per_byte).round() as u64;
        self.link_free = start.saturating_add(serialise);
        let due = self.link_free.saturating_add(self.delay_ns);
        self.in_flight += data.len();
        self.queue.push_back((due, data));
        due
    }

    /// The next release time.
    pub fn next_due(&self) -> Option<u64> {
        self.queue.front().map(|(d, _)| *d)
    }

    /// The next chunk if it is due at `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<Vec<u8>> {
        if self.next_due()? > now {
            return None;
        }
        let (_, d) = self.queue.pop_front()?;
        self.in_flight -= d.len();
        Some(d)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Bytes forwarded (both directions).
    pub bytes: AtomicU64,
    /// Datagrams forwarded (UDP).
    pub datagrams: AtomicU64,
    /// Datagrams received (UDP, both directions, before the loss model).
    pub seen: AtomicU64,
    /// Datagrams dropped by the loss model (UDP).
    pub dropped: AtomicU64,
    /// Connections accepted (TCP).
    pub connections: AtomicU64,
}

/// A running relay; stops on drop.
pub struct L4Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// While set, nothing passes (TCP): the relay neither forwards nor accepts.
    cut: Arc<AtomicBool>,
    counters: Arc<RelayCounters>,
    threads: Vec<JoinHandle<()>>,
    /// Relay threads sleep until chunks are due: keep the CPUs awake meanwhile.
    _awake: KeepAwake,
}

impl L4Relay {
    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters.
    pub fn counters(&self) -> &RelayCounters {
        &self.counters
    }

    /// Cuts the path (`true`) or restores it (`false`). While cut, a TCP relay forwards no byte
    /// in either direction and accepts no connection: the bytes sent meanwhile wait (up to the
    /// pipe's in-flight cap, then the senders block) and pass once the path is restored, as
    /// after a partition that heals before TCP gives up. Ignored by UDP relays.
    pub fn set_cut(&self, on: bool) {
        self.cut.store(on, Ordering::Relaxed);
    }
}

impl Drop for L4Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Shared {
    pipe: Mutex<ShapedPipe>,
    cv: Condvar,
    eof: AtomicBool,
    /// The writing side gave up (its peer went away): the reading side stops too.
    broken: AtomicBool,
}

impl Shared {
    /// A fresh one-direction pipe shaped by `p`.
    fn new(p: &RelayParams) -> Arc<Self> {
        Arc::new(Self {
            pipe: Mutex::new(ShapedPipe::new(p)),
            cv: Condvar::new(),
            eof: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        })
    }
}

fn epoch_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, WanLabError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = super::tun::realtime_thread();
            f()
        })
        .map_err(|e| WanLabError::io("starting a relay thread", e))
}

/// Starts a TCP relay on `listen` (e.g. `127.0.0.1:0`) towards `target`.
pub fn tcp(listen: &str, target: SocketAddr, p: RelayParams) -> Result<L4Relay, WanLabError> {
    let l =
        TcpListener::bind(listen).map_err(|e| WanLabError::io(format!("binding {listen}"), e))?;
    let addr = l
        .local_addr()
        .map_err(|e| WanLabError::io("relay address", e))?;
    l.set_nonblocking(true)
        .map_err(|e| WanLabError::io("relay listener", e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(RelayCounters::default());
    let (s, c, k) = (stop.clone(), counters.clone(), cut.clone());
    let t = spawn("geomx-relay-accept", move || {
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !s.load(Ordering::Relaxed) {
            if k.load(Ordering::Relaxed) {
                std::thread::sleep(POLL / 5);
                continue;
            }
            match l.accept() {
                Ok((down, _)) => {
                    c.connections.fetch_add(1, Ordering::Relaxed);
                    match TcpStream::connect(target) {
                        Ok(up) => conns.extend(splice(down, up, p, &s, &k, &c)),
                        Err(e) => tracing::warn!(%target, error = %e, "relay cannot reach target"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(POLL / 5)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay accept failed");
                    std::thread::sleep(POLL);
                }
            }
        }
        for c in conns {
            let _ = c.join();
        }
    })?;
    Ok(L4Relay {
        addr,
        stop,
        cut,
        counters,
        threads: vec![t],
        _awake: KeepAwake::acquire(),
    })
}

/// Both directions of one TCP connection through the relay: four threads.
fn splice(
    a: TcpStream,
    b: TcpStream,
    p: RelayParams,
    stop: &Arc<AtomicBool>,
    cut: &Arc<AtomicBool>,
    c: &Arc<RelayCounters>,
) -> Vec<JoinHandle<()>> {
    let mut out = Vec::new();
    for (src, dst) in [(&a, &b), (&b, &a)] {
        let (Ok(src), Ok(dst)) = (src.try_clone(), dst.try_clone()) else {
            continue;
        };
        let _ = src.set_nodelay(true);
        let _ = dst.set_nodelay(true);
        let sh = Shared::new(&p);
        let epoch = Instant::now();
        let (sh1, st1) = (sh.clone(), stop.clone());
        if let Ok(t) = spawn("geomx-relay-rd", move || read_side(src, &sh1, &st1, epoch)) {
            out.push(t);
        }
        let (st2, c2, k2) = (stop.clone(), c.clone(), cut.clone());
        if let Ok(t) = spawn("geomx-relay-wr", move || {
            write_side(dst, &sh, &st2, &k2, &c2, epoch)
        }) {
            out.push(t);
        }
    }
    out
}

fn read_side(mut src: TcpStream, sh: &Shared, stop: &AtomicBool, epoch: Instant) {
    let _ = src.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; CHUNK];
    let done = || stop.load(Ordering::Relaxed) || sh.broken.load(Ordering::Relaxed);
    while !done() {
        let room = {
            let mut g = sh.pipe.lock().unwrap_or_else(|e| e.into_inner());
            while g.room() == 0 && !done() {
                g = sh
                    .cv
                    .wait_timeout(g, POLL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            g.room()
        };
        if room == 0 {
            break;
        }
        let want = room.min(CHUNK);
        match src.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                let mut g = sh.pipe.lock().unwrap_or_else(|e| e.into_inner());
                g.push(buf[..n].to_vec(), epoch_ns(epoch));
                sh.cv.notify_all();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    sh.eof.store(true, Ordering::Relaxed);
    sh.cv.notify_all();
    if sh.broken.load(Ordering::Relaxed) {
        // Pass the failure back to the sender, as a broken path would.
        let _ = src.shutdown(Shutdown::Both);
    }
}

fn write_side(
    mut dst: TcpStream,
    sh: &Shared,
    stop: &AtomicBool,
    cut: &AtomicBool,
    c: &RelayCounters,
    epoch: Instant,
) {
    loop {
        let chunk = {
            let mut g = sh.pipe.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let now = epoch_ns(epoch);
                if cut.load(Ordering::Relaxed) {
                    g = sh
                        .cv
                        .wait_timeout(g, POLL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                if let Some(d) = g.pop_due(now) {
                    sh.cv.notify_all();
                    break Some(d);
                }
                if g.is_empty() && sh.eof.load(Ordering::Relaxed) {
                    break None;
                }
                let wait = g
                    .next_due()
                    .map_or(POLL, |d| Duration::from_nanos(d - now).min(POLL));
                g = sh
                    .cv
                    .wait_timeout(g, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        match chunk {
            Some(d) => {
                if dst.write_all(&d).is_err() {
                    sh.broken.store(true, Ordering::Relaxed);
                    sh.cv.notify_all();
                    return;
                }
                c.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            None => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Starts a UDP relay on `listen` towards `target`: datagrams from the latest client go to the
/// target, the target's answers go back to that client; each may be dropped with `p.loss`.
pub fn udp(listen: &str, target: SocketAddr, p: RelayParams) -> Result<L4Relay, WanLabError> {
    let down =
        UdpSocket::bind(listen).map_err(|e| WanLabError::io(format!("binding {listen}"), e))?;
    let addr = down
        .local_addr()
        .map_err(|e| WanLabError::io("relay address", e))?;
    let up = UdpSocket::bind(SocketAddr::new(target.ip(), 0))
        .and_then(|u| u.connect(target).map(|_| u))
        .map_err(|e| WanLabError::io(format!("relay socket towards {target}"), e))?;
    for s in [&down, &up] {
        s.set_read_timeout(Some(POLL))
            .map_err(|e| WanLabError::io("relay socket", e))?;
        enlarge_receive_buffer(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(RelayCounters::default());
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for (dir, seed) in [(0u8, p.seed), (1, p.seed ^ 0x9e37_79b9_7f4a_7c15)] {
        let (rx, tx) = match dir {
            0 => (clone_udp(&down)?, clone_udp(&up)?),
            _ => (clone_udp(&up)?, clone_udp(&down)?),
        };
        let sh = Shared::new(&p);
        let epoch = Instant::now();
        let (sh1, st1, c1, cl1) = (sh.clone(), stop.clone(), counters.clone(), client.clone());
        threads.push(spawn("geomx-relay-urd", move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut buf = vec![0u8; 65_536];
            while !st1.load(Ordering::Relaxed) {
                let Ok((n, from)) = rx.recv_from(&mut buf) else {
                    continue;
                };
                c1.seen.fetch_add(1, Ordering::Relaxed);
                if dir == 0 {
                    *cl1.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                }
                if rng.random::<f64>() < p.loss {
                    c1.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut g = sh1.pipe.lock().unwrap_or_else(|e| e.into_inner());
                if g.room() < n {
                    c1.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                g.push(buf[..n].to_vec(), epoch_ns(epoch));
                sh1.cv.notify_all();
            }
        })?);
        let (st2, c2, cl2) = (stop.clone(), counters.clone(), client.clone());
        threads.push(spawn("geomx-relay-uwr", move || {
            while !st2.load(Ordering::Relaxed) {
                let d = {
                    let mut g = sh.pipe.lock().unwrap_or_else(|e| e.into_inner());
                    let now = epoch_ns(epoch);
                    match g.pop_due(now) {
                        Some(d) => d,
                        None => {
                            let wait = g
                                .next_due()
                                .map_or(POLL, |d| Duration::from_nanos(d - now).min(POLL));
                            let _ = sh.cv.wait_timeout(g, wait);
                            continue;
                        }
                    }
                };
                let sent = if dir == 0 {
                    tx.send(&d)
                } else {
                    match *cl2.lock().unwrap_or_else(|e| e.into_inner()) {
                        Some(to) => tx.send_to(&d, to),
                        None => continue,
                    }
                };
                if sent.is_ok() {
                    c2.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    c2.datagrams.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?);
    }
    Ok(L4Relay {
        addr,
        stop,
        cut: Arc::new(AtomicBool::new(false)),
        counters,
        threads,
        _awake: KeepAwake::acquire(),
    })
}

/// Asks for an 8 MiB receive buffer on `s` (`SO_RCVBUFFORCE` as root, else `SO_RCVBUF`, which the
/// kernel caps at `net.core.rmem_max`), so that a burst waits in the kernel instead of being
/// dropped while the reading thread is descheduled. Best effort: failures keep the default size.
pub fn enlarge_receive_buffer(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a valid, open fd with a c_int option value of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

fn clone_udp(s: &UdpSocket) -> Result<UdpSocket, WanLabError> {
    s.try_clone()
        .map_err(|e| WanLabError::io("relay socket", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rate: Option<f64>, delay_ms: f64) -> RelayParams {
        RelayParams {
            rate_mbit: rate,
            delay_ms,
            loss: 0.0,
            seed: 1,
        }
    }

    #[test]
    fn pipe_serialises_at_the_rate_then_delays() {
        // 8 Mbit/s = 1 byte per µs; 10 ms delay.
        let mut p = ShapedPipe::new(&params(Some(8.0), 10.0));
        assert_eq!(p.push(vec![0; 1000], 0), 1_000_000 + 10_000_000);
        // Offered while the link is busy: starts when the first finished.
        assert_eq!(p.push(vec![0; 500], 200_000), 1_500_000 + 10_000_000);
        // Offered after the link went idle: starts at once.
        assert_eq!(p.push(vec![0; 100], 5_000_000), 5_100_000 + 10_000_000);
        assert_eq!(p.pop_due(10_999_999), None);
        assert_eq!(p.pop_due(11_000_000).map(|d| d.len()), Some(1000));
        assert_eq!(p.pop_due(20_000_000).map(|d| d.len()), Some(500));
        assert_eq!(p.pop_due(20_000_000).map(|d| d.len()), Some(100));
        assert!(p.is_empty());
    }

    #[test]
    fn in_flight_cap_is_rate_times_rtt() {
        // 100 Mbit/s × 100 ms = 1.25 MB.
        assert_eq!(params(Some(100.0), 50.0).cap_bytes(), 1_250_000);
        assert_eq!(params(Some(1.0), 1.0).cap_bytes(), MIN_CAP);
        let mut p = ShapedPipe::new(&params(Some(100.0), 50.0));
        p.push(vec![0; 1_000_000], 0);
        assert_eq!(p.room(), 250_000);
        let due = p.next_due().unwrap();
        p.pop_due(due);
        assert_eq!(p.room(), 1_250_000);
    }

    #[test]
    fn a_cut_relay_passes_nothing_until_restored_and_then_everything() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let relay = tcp("127.0.0.1:0", target, params(None, 1.0)).unwrap();
        let mut client = TcpStream::connect(relay.local_addr()).unwrap();
        let (mut far, _) = server.accept().unwrap();
        far.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        client.write_all(b"before").unwrap();
        let mut buf = [0u8; 6];
        far.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"before");
        relay.set_cut(true);
        client.write_all(b"during").unwrap();
        // Nothing arrives while the path is cut (300 ms read timeout, several relay polls).
        let err = far.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        relay.set_cut(false);
        far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        far.read_exact(&mut buf).unwrap();
        assert_eq!(
            &buf, b"during",
            "the bytes sent during the cut pass after it"
        );
    }

    #[test]
    fn unshaped_pipe_only_delays() {
        let mut p = ShapedPipe::new(&params(None, 2.0));
        assert_eq!(p.push(vec![0; 1 << 20], 7), 2_000_007);
    }
}
