//! The TUN driver of the delay relay: one thread in the router namespace reads packets from the
//! TUN device, queues them in a [`DelayScheduler`] and writes each back at its due time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::delay::{DelayScheduler, DelayStats};
use super::netns::Netns;
use super::WanLabError;

/// Longest wait for packets before checking the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// Per-pair queue limit (packets).
const MAX_QUEUE: usize = 100_000;

/// `struct ifreq` for TUNSETIFF: name + flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens TUN device `name` (IFF_TUN | IFF_NO_PI, non-blocking) in the calling thread's namespace.
pub fn open_tun(name: &str) -> Result<File, WanLabError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| WanLabError::io("opening /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(WanLabError::Invalid(format!(
            "interface name {name} too long"
        )));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq of the right layout from a valid pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(WanLabError::io(
            format!("attaching to TUN device {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

/// Waits until `fd` is readable or `timeout` passes (nanosecond resolution).
fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    let n = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Makes the calling thread wake on time on a loaded machine: 1 ns timer slack, and real-time
/// scheduling (SCHED_FIFO, low priority) where allowed. The relay blocks in `ppoll` between
/// releases, so it never holds a CPU; the kernel's RT throttling bounds it anyway.
pub(crate) fn realtime_thread() {
    // SAFETY: prctl and sched_setscheduler on the calling thread with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        let p = libc::sched_param { sched_priority: 10 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) != 0 {
            tracing::debug!(
                "no real-time scheduling for a relay thread; lateness may grow under load"
            );
        }
    }
}

/// A running delay relay; stops (and joins its thread) on drop.
pub struct TunRelay {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<DelayStats>>,
    thread: Option<JoinHandle<Result<(), WanLabError>>>,
}

impl TunRelay {
    /// Starts the relay on TUN device `tun` in namespace `ns` with per-link one-way delays.
    pub fn start(ns: &Netns, tun: &str, delay_ns: Vec<u64>) -> Result<Self, WanLabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(DelayStats::default()));
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (st, sp, name) = (stats.clone(), stop.clone(), tun.to_string());
        let ns2 = ns.clone();
        let thread = std::thread::Builder::new()
            .name("geomx-wan-relay".into())
            .spawn(move || {
                realtime_thread();
                let opened = ns2.enter_current_thread().and_then(|_| open_tun(&name));
                let dev = match opened {
                    Ok(f) => {
                        let _ = ready_tx.send(Ok(()));
                        f
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let _ = ready_tx.send(Err(msg));
                        return Err(e);
                    }
                };
                drive(dev, DelayScheduler::new(delay_ns, MAX_QUEUE), &sp, &st)
            })
            .map_err(|e| WanLabError::io("starting the delay relay", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                stats,
                thread: Some(thread),
            }),
            Ok(Err(m)) => {
                let _ = thread.join();
                Err(WanLabError::Invalid(format!("delay relay: {m}")))
            }
            Err(_) => Err(WanLabError::Invalid("delay relay thread died".into())),
        }
    }

    /// The counters so far (refreshed every few milliseconds while packets flow).
    pub fn stats(&self) -> DelayStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the relay and returns its final counters.
    pub fn stop(mut self) -> DelayStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Ok(Err(e)) = t.join() {
                tracing::warn!(error = %e, "delay relay ended with an error");
            }
        }
    }
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The relay loop: wait for packets or the next due time, queue what arrived, release what is due.
fn drive(
    mut dev: File,
    mut sched: DelayScheduler,
    stop: &AtomicBool,
    stats: &Mutex<DelayStats>,
) -> Result<(), WanLabError> {
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_nanos() as u64;
    let fd = dev.as_raw_fd();
    let mut buf = vec![0u8; 65_536];
    let mut last_publish = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let wait = match sched.next_due() {
            Some(due) => Duration::from_nanos(due.saturating_sub(now())).min(IDLE_WAIT),
            None => IDLE_WAIT,
        };
        if wait.is_zero() || wait_readable(fd, wait) {
            // Bounded, so releases are not starved under heavy input.
            for _ in 0..512 {
                match dev.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let _ = sched.push(buf[..n].to_vec(), now());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(WanLabError::io("reading the TUN device", e)),
                }
            }
        }
        let t = now();
        while let Some(p) = sched.pop_due(t) {
            match dev.write(&p) {
                Ok(n) if n == p.len() => {}
                Ok(n) => tracing::debug!(n, len = p.len(), "short relay write"),
                // The kernel refused one packet (e.g. no route): it is lost, as on a real path.
                Err(e) => tracing::debug!(error = %e, "relay write failed"),
            }
        }
        if t.saturating_sub(last_publish) > 5_000_000 {
            last_publish = t;
            if let Ok(mut s) = stats.lock() {
                *s = sched.stats().clone();
            }
        }
    }
    if let Ok(mut s) = stats.lock() {
        *s = sched.stats().clone();
    }
    Ok(())
}
