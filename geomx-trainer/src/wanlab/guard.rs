//! Clean-up that always happens: a process-wide registry of what each live lab must undo (its
//! processes, its namespaces), run by the lab's `Drop` (success, error, panic) and by a watcher
//! thread on SIGINT/SIGTERM, which then ends the process with status 128 + signal.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use super::netns::Netns;

/// What one lab must undo.
#[derive(Debug, Default, Clone)]
struct Cleanup {
    pids: Vec<u32>,
    namespaces: Vec<String>,
}

static REGISTRY: Mutex<BTreeMap<u64, Cleanup>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Write end of the signal pipe (−1 before installation).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<u64, Cleanup>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a lab that will own `namespaces`; returns its id for [`adopt_pid`] and [`teardown`].
pub fn register(namespaces: Vec<String>) -> u64 {
    install_signal_handlers();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    registry().insert(
        id,
        Cleanup {
            pids: Vec::new(),
            namespaces,
        },
    );
    id
}

/// Makes lab `id` stop process `pid` (SIGKILL) before deleting its namespaces.
pub fn adopt_pid(id: u64, pid: u32) {
    if let Some(c) = registry().get_mut(&id) {
        c.pids.push(pid);
    }
}

/// Undoes lab `id`: kills its processes by pid, then deletes its namespaces. Idempotent.
pub fn teardown(id: u64) {
    let c = registry().remove(&id);
    if let Some(c) = c {
        undo(&c);
    }
}

fn undo(c: &Cleanup) {
    for &pid in &c.pids {
        // SAFETY: kill(2) with a pid this lab started; no memory is touched.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    for ns in c.namespaces.iter().rev() {
        if let Err(e) = Netns::existing(ns).delete() {
            tracing::warn!(namespace = %ns, error = %e, "could not delete a lab namespace");
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; one byte from a valid stack location.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Installs the SIGINT/SIGTERM handlers and the watcher thread (once per process).
pub fn install_signal_handlers() {
    INSTALL.call_once(|| {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            tracing::warn!("no signal pipe: labs are not cleaned up on SIGINT/SIGTERM");
            return;
        }
        let (rd, wr) = (fds[0], fds[1]);
        let watcher = std::thread::Builder::new()
            .name("geomx-wan-guard".into())
            .spawn(move || {
                let mut b = 0u8;
                // SAFETY: read(2) of one byte into a valid location from our pipe.
                let n = unsafe { libc::read(rd, &mut b as *mut u8 as *mut libc::c_void, 1) };
                if n == 1 {
                    let all: Vec<Cleanup> =
                        std::mem::take(&mut *registry()).into_values().collect();
                    for c in &all {
                        undo(c);
                    }
                    eprintln!("geomx: signal {b}: WAN lab torn down");
                    std::process::exit(128 + b as i32);
                }
            });
        if watcher.is_err() {
            tracing::warn!("no signal watcher: labs are not cleaned up on SIGINT/SIGTERM");
            return;
        }
        SIGNAL_PIPE.store(wr, Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with our handler (which only calls write) is valid.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}
