//! The TUN driver of the delay relay: it reads packets from the TUN device of the router
//! namespace, queues them in a [`DelayScheduler`] and writes each back at its due time.
//!
//! Two real-time threads share the work, each pinned to its own CPU: the *primary* waits for
//! packets and for the next due time; the *backup* waits for the next due time plus
//! [`BACKUP_GRACE`] and acts only when a release is still overdue then. On a virtual machine the
//! hypervisor sometimes stops one virtual CPU for several milliseconds (steal time); the backup's
//! CPU usually runs meanwhile. Whoever acts holds one lock while it reads and writes, so packets
//! of a pair leave in order. [`KeepAwake`] spinners keep idle CPUs from halting, so that neither
//! thread's wake-up waits for the hypervisor to resume a halted CPU.
//!
//! The device runs in threaded-NAPI mode: a write only queues the packet, and the kernel forwards
//! it (routing, shaping, the receiver's TCP) in the device's own real-time kernel thread, below
//! the relay threads' priority, rather than inside the relay's system call. docs/wan-lab.md
//! ("Fidelity") has the measurements behind each of these choices.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::awake::{allowed_cpus, pin, KeepAwake};
use super::delay::{DelayScheduler, DelayStats};
use super::netns::Netns;
use super::WanLabError;

/// Longest wait for packets before checking the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// How long after a due time the backup thread steps in.
pub const BACKUP_GRACE: Duration = Duration::from_micros(150);
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
/// `IFF_NAPI`: written packets go to the device's NAPI instance instead of being forwarded inside
/// the writer's system call.
const IFF_NAPI: libc::c_int = 0x0010;
/// Real-time priority of the relay threads: above the NAPI thread's, so a relay thread due to
/// release packets preempts the forwarding of earlier ones.
const RT_PRIORITY: libc::c_int = 20;
/// Real-time priority of the TUN device's NAPI thread: above every normal thread.
const NAPI_PRIORITY: libc::c_int = 10;

/// Opens TUN device `name` (IFF_TUN | IFF_NO_PI | IFF_NAPI, non-blocking) in the calling thread's
/// namespace.
pub fn open_tun(name: &str) -> Result<File, WanLabError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| WanLabError::io("opening /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | IFF_NAPI) as libc::c_short,
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
/// releases, so it never holds a CPU; the kernel's RT throttling bounds it anyway. Returns whether
/// real-time scheduling was granted (it needs CAP_SYS_NICE, and under cgroup v1 with RT group
/// scheduling a CPU group with real-time runtime).
pub(crate) fn realtime_thread() -> bool {
    // SAFETY: prctl and sched_setscheduler on the calling thread with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        let p = libc::sched_param {
            sched_priority: RT_PRIORITY,
        };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "no real-time scheduling for a relay thread; lateness may grow under load"
            );
            return false;
        }
    }
    true
}

/// Pids of the kernel threads (children of kthreadd, pid 2) whose name starts with `prefix`.
fn kernel_threads(prefix: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_string()
            };
            field("PPid:") == "2" && field("Name:").starts_with(prefix)
        })
        .collect()
}

/// Moves the TUN device's packet processing into its own kernel thread (threaded NAPI) with
/// real-time priority. A relay `write` then only queues the packet; forwarding, shaping and the
/// receivers' TCP work run in that thread, on whichever CPU is free, instead of inside the
/// relay's system call, where one burst of writes would hold the relay for milliseconds.
fn thread_napi(ns: &Netns, tun: &str) -> Result<(), WanLabError> {
    ns.write_sysfs(&format!("class/net/{tun}/threaded"), "1")?;
    // The kernel names it napi/<dev>-<napi id>; thread names are cut to 15 bytes.
    let prefix: String = format!("napi/{tun}-").chars().take(15).collect();
    let pids = kernel_threads(&prefix);
    if pids.is_empty() {
        return Err(WanLabError::Invalid(format!(
            "no NAPI thread {prefix}… after enabling threaded NAPI"
        )));
    }
    let p = libc::sched_param {
        sched_priority: NAPI_PRIORITY,
    };
    for pid in pids {
        // SAFETY: sched_setscheduler with a valid sched_param on a pid we found.
        if unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &p) } != 0 {
            return Err(WanLabError::io(
                format!("real-time priority for NAPI thread {pid}"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The calling thread's CPU time and run-queue wait in nanoseconds (`/proc/thread-self/schedstat`).
fn schedstat() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// A running delay relay; stops (and joins its threads) on drop.
pub struct TunRelay {
    core: Arc<Core>,
    threads: Vec<JoinHandle<Result<(), WanLabError>>>,
    _awake: Option<KeepAwake>,
}

impl TunRelay {
    /// Starts the relay on TUN device `tun` in namespace `ns` with per-link one-way delays; with
    /// `keep_awake`, [`KeepAwake`] spinners run while it lives.
    pub fn start(
        ns: &Netns,
        tun: &str,
        delay_ns: Vec<u64>,
        keep_awake: bool,
    ) -> Result<Self, WanLabError> {
        let name = tun.to_string();
        // The device stays in the namespace it was opened in; any thread may read and write it.
        let dev = ns.run(move || open_tun(&name))??;
        let napi_thread = match thread_napi(ns, tun) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "TUN packets are forwarded inside the relay's writes");
                false
            }
        };
        // A packet queued while the backup sleeps is due no sooner than the smallest link delay
        // later: the backup looks at least that often.
        let backup_idle = delay_ns
            .iter()
            .copied()
            .filter(|&d| d > 0)
            .min()
            .map_or(IDLE_WAIT, |d| Duration::from_nanos(d).min(IDLE_WAIT));
        // Two threads pinned to distinct CPUs where there are two: one CPU stopped by the host
        // then leaves the other thread running.
        let pins: Vec<Option<usize>> = match allowed_cpus().as_slice() {
            [a, b, ..] => vec![Some(*a), Some(*b)],
            _ => vec![None],
        };
        let roles = pins.len();
        let core = Arc::new(Core {
            fd: dev.as_raw_fd(),
            state: Mutex::new(State {
                dev,
                sched: DelayScheduler::new(delay_ns, MAX_QUEUE),
                pool: Pool(Vec::new()),
                buf: vec![0u8; 65_536],
                last_publish: 0,
            }),
            next_due: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            stats: Mutex::new(DelayStats::default()),
            realtime: (0..roles).map(|_| AtomicBool::new(false)).collect(),
            times: (0..roles)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            keep_awake,
            napi_thread,
            backup_idle,
        });
        let awake = keep_awake.then(KeepAwake::acquire);
        let mut threads = Vec::new();
        for (role, cpu) in pins.into_iter().enumerate() {
            let c = core.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("geomx-wan-relay-{role}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin(cpu);
                    }
                    c.realtime[role].store(realtime_thread(), Ordering::Relaxed);
                    let r = work(&c, role);
                    if r.is_err() {
                        c.stop.store(true, Ordering::Relaxed);
                    }
                    r
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    core.stop.store(true, Ordering::Relaxed);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(WanLabError::io("starting the delay relay", e));
                }
            }
        }
        Ok(Self {
            core,
            threads,
            _awake: awake,
        })
    }

    /// The counters so far (refreshed every few milliseconds while packets flow).
    pub fn stats(&self) -> DelayStats {
        self.core
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Stops the relay and returns its final counters.
    pub fn stop(mut self) -> DelayStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.core.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
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

/// Buffers of released packets, reused for new arrivals (no allocation per packet in steady state).
struct Pool(Vec<Vec<u8>>);

impl Pool {
    /// Most buffers kept for reuse.
    const KEEP: usize = 4096;

    /// A copy of `data` in a reused buffer.
    fn copy(&mut self, data: &[u8]) -> Vec<u8> {
        let mut b = self.0.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(data);
        b
    }

    fn give_back(&mut self, b: Vec<u8>) {
        if self.0.len() < Self::KEEP {
            self.0.push(b);
        }
    }
}

/// How often the shared counters are refreshed while packets flow (ns).
const PUBLISH_NS: u64 = 5_000_000;
/// How often a relay thread reads its schedstat (ns).
const SCHEDSTAT_NS: u64 = 250_000_000;

/// What the relay threads share.
struct Core {
    fd: RawFd,
    state: Mutex<State>,
    /// The earliest due release (ns since `epoch`), `u64::MAX` when nothing is queued; written
    /// under the state lock, read without it by sleeping threads.
    next_due: AtomicU64,
    epoch: Instant,
    stop: AtomicBool,
    stats: Mutex<DelayStats>,
    /// Per thread: whether it got real-time priority.
    realtime: Vec<AtomicBool>,
    /// Per thread: CPU time and run-queue wait (ns).
    times: Vec<[AtomicU64; 2]>,
    keep_awake: bool,
    napi_thread: bool,
    /// The backup's longest sleep while nothing is queued.
    backup_idle: Duration,
}

/// What one thread at a time works on.
struct State {
    dev: File,
    sched: DelayScheduler,
    pool: Pool,
    buf: Vec<u8>,
    last_publish: u64,
}

impl Core {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Reads what arrived, then writes what is due. Lateness is taken per packet, just before its
    /// write, so time spent writing earlier packets of a batch counts.
    fn pump(&self, st: &mut State) -> Result<(), WanLabError> {
        // Bounded, so releases are not starved under heavy input.
        for _ in 0..512 {
            match st.dev.read(&mut st.buf) {
                Ok(0) => break,
                Ok(n) => {
                    let p = st.pool.copy(&st.buf[..n]);
                    let _ = st.sched.push(p, self.now());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WanLabError::io("reading the TUN device", e)),
            }
        }
        while let Some(p) = st.sched.pop_due(self.now()) {
            match st.dev.write(&p) {
                Ok(n) if n == p.len() => {}
                Ok(n) => tracing::debug!(n, len = p.len(), "short relay write"),
                // The kernel refused one packet (e.g. no route): it is lost, as on a real path.
                Err(e) => tracing::debug!(error = %e, "relay write failed"),
            }
            st.pool.give_back(p);
        }
        self.next_due
            .store(st.sched.next_due().unwrap_or(u64::MAX), Ordering::Release);
        Ok(())
    }

    /// Copies the scheduler's counters and the threads' figures into `stats`.
    fn publish(&self, st: &State) {
        if let Ok(mut s) = self.stats.lock() {
            *s = st.sched.stats().clone();
            s.queued = st.sched.depth() as u64;
            s.realtime = self.realtime.iter().all(|r| r.load(Ordering::Relaxed));
            s.keep_awake = self.keep_awake;
            s.napi_thread = self.napi_thread;
            s.cpu_ns = self
                .times
                .iter()
                .map(|t| t[0].load(Ordering::Relaxed))
                .sum();
            s.runqueue_wait_ns = self
                .times
                .iter()
                .map(|t| t[1].load(Ordering::Relaxed))
                .sum();
        }
    }

    fn record_schedstat(&self, role: usize) {
        if let Some((cpu, wait)) = schedstat() {
            self.times[role][0].store(cpu, Ordering::Relaxed);
            self.times[role][1].store(wait, Ordering::Relaxed);
        }
    }
}

/// One relay thread: role 0 is the primary, role 1 the backup (see the module docs).
fn work(core: &Core, role: usize) -> Result<(), WanLabError> {
    let primary = role == 0;
    let grace = if primary {
        0
    } else {
        BACKUP_GRACE.as_nanos() as u64
    };
    let mut last_schedstat = 0u64;
    while !core.stop.load(Ordering::Relaxed) {
        let due = core.next_due.load(Ordering::Acquire).saturating_add(grace);
        let now = core.now();
        let idle = if primary { IDLE_WAIT } else { core.backup_idle };
        let wait = Duration::from_nanos(due.saturating_sub(now)).min(idle);
        let readable = if primary {
            wait.is_zero() || wait_readable(core.fd, wait)
        } else {
            if !wait.is_zero() {
                sleep_for(wait);
            }
            false
        };
        let overdue = core.next_due.load(Ordering::Acquire).saturating_add(grace) <= core.now();
        if readable || overdue {
            let mut st = core.state.lock().unwrap_or_else(|e| e.into_inner());
            core.pump(&mut st)?;
            let t = core.now();
            if t.saturating_sub(st.last_publish) > PUBLISH_NS {
                st.last_publish = t;
                core.publish(&st);
            }
        }
        let t = core.now();
        if t.saturating_sub(last_schedstat) > SCHEDSTAT_NS {
            last_schedstat = t;
            core.record_schedstat(role);
        }
    }
    core.record_schedstat(role);
    let st = core.state.lock().unwrap_or_else(|e| e.into_inner());
    core.publish(&st);
    Ok(())
}

/// Sleeps for `d` (nanosecond resolution, 1 ns timer slack).
fn sleep_for(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid timespec; an interrupted sleep just returns early.
    unsafe {
        libc::nanosleep(&ts, std::ptr::null_mut());
    }
}
