//! Clean-up that always happens: a process-wide registry of what each live lab must undo (its
//! processes, its namespaces), run by the lab's `Drop` (success, error, panic) and by a watcher
//! thread on SIGINT/SIGTERM, which then ends the process with status 128 + signal.
//!
//! **Pids are signalled only while the registry lock is held, and a pid is forgotten
//! ([`forget_pid`]) before its owner reaps it.** A reaped pid may be reused by an unrelated
//! process; the launcher therefore checks that a child exited without reaping it, forgets its pid,
//! and only then reaps it, so the guard can never kill a reused pid as root.

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

/// Forgets `pid` in every lab: its owner saw it exit and is about to reap it, after which the pid
/// may belong to another process. Call it before reaping (see the module docs).
pub fn forget_pid(pid: u32) {
    for c in registry().values_mut() {
        c.pids.retain(|&p| p != pid);
    }
}

/// Undoes lab `id`: kills its processes by pid, then deletes its namespaces. Idempotent.
pub fn teardown(id: u64) {
    let c = {
        let mut reg = registry();
        let c = reg.remove(&id);
        // Signalled under the lock: no pid can be forgotten and reaped meanwhile.
        if let Some(c) = &c {
            kill_pids(c);
        }
        c
    };
    if let Some(c) = c {
        delete_namespaces(&c);
    }
}

fn kill_pids(c: &Cleanup) {
    for &pid in &c.pids {
        // SAFETY: kill(2) with a pid this lab started and whose owner has not reaped it (pids
        // are forgotten before reaping); no memory is touched.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

fn delete_namespaces(c: &Cleanup) {
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
                    let all: Vec<Cleanup> = {
                        let mut reg = registry();
                        let all: Vec<Cleanup> = std::mem::take(&mut *reg).into_values().collect();
                        all.iter().for_each(kill_pids);
                        all
                    };
                    all.iter().for_each(delete_namespaces);
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

/// The pids lab `id` would kill (tests).
#[cfg(test)]
pub(crate) fn pids(id: u64) -> Vec<u32> {
    registry()
        .get(&id)
        .map(|c| c.pids.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forgotten pid is never signalled: it leaves every lab's list, the others stay.
    #[test]
    fn forgotten_pids_leave_every_lab() {
        let (a, b) = (register(Vec::new()), register(Vec::new()));
        // Positive pids above the kernel's pid_max (at most 2^22) never name a process, so
        // teardown signals nothing.
        let (p, q) = ((i32::MAX - 7) as u32, (i32::MAX - 9) as u32);
        adopt_pid(a, p);
        adopt_pid(a, q);
        adopt_pid(b, p);
        forget_pid(p);
        assert_eq!(pids(a), vec![q]);
        assert_eq!(pids(b), Vec::<u32>::new());
        teardown(a);
        teardown(b);
        assert!(pids(a).is_empty() && registry().get(&a).is_none());
    }
}
