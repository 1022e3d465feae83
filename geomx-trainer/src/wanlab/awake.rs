//! Keeps the CPUs out of their idle state while a relay runs.
//!
//! On a virtual machine an idle CPU halts, and the hypervisor has to schedule the virtual CPU
//! again before a timer or an inter-processor interrupt reaches the thread waiting on it. On the
//! 2-core machines of this project that wake-up costs 1–12 ms whenever the host is busy (it shows
//! as steal time), far more than the relay's 1 ms lateness budget: a real-time relay thread that
//! sleeps until a packet is due wakes late, however high its priority.
//!
//! [`KeepAwake`] runs one `SCHED_IDLE` spinner per CPU the process may use. A `SCHED_IDLE` thread
//! runs only when nothing else wants that CPU, and any other thread preempts it at once, so
//! training processes lose no time to it; but the CPU never halts, so wake-ups arrive on time.
//! The spinners start with the first [`KeepAwake::acquire`] of the process and stop when the last
//! guard is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The process's spinners and how many guards hold them.
struct Spinners {
    holders: usize,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

static SPINNERS: Mutex<Option<Spinners>> = Mutex::new(None);

/// A guard: while any lives, every CPU of the process's affinity mask stays awake.
#[derive(Debug)]
pub struct KeepAwake {
    _private: (),
}

impl KeepAwake {
    /// Starts the spinners (if this is the first guard) and returns a guard.
    pub fn acquire() -> Self {
        let mut g = SPINNERS.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(s) => s.holders += 1,
            None => *g = Some(start()),
        }
        Self { _private: () }
    }

    /// How many spinner threads run now (0 when no guard lives).
    pub fn spinners() -> usize {
        let g = SPINNERS.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map_or(0, |s| s.threads.len())
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        let mut g = SPINNERS.lock().unwrap_or_else(|e| e.into_inner());
        let last = match g.as_mut() {
            Some(s) => {
                s.holders -= 1;
                s.holders == 0
            }
            None => false,
        };
        if last {
            if let Some(s) = g.take() {
                s.stop.store(true, Ordering::Relaxed);
                for t in s.threads {
                    let _ = t.join();
                }
            }
        }
    }
}

/// The CPUs in the calling thread's affinity mask.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu`. False when that failed.
pub(crate) fn pin(cpu: usize) -> bool {
    // SAFETY: a valid cpu_set_t for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Pins the calling thread to `cpu` and gives it the idle policy. False when either failed.
fn pin_idle(cpu: usize) -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param for the calling thread.
    pin(cpu) && unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) } == 0
}

fn start() -> Spinners {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for cpu in allowed_cpus() {
        let s = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("geomx-awake-{cpu}"))
            .spawn(move || {
                if !pin_idle(cpu) {
                    // An unpinned or normal-priority spinner would take CPU from real work.
                    tracing::debug!(cpu, "cannot pin an idle-priority spinner; none on this CPU");
                    return;
                }
                while !s.load(Ordering::Relaxed) {
                    for _ in 0..1024 {
                        std::hint::spin_loop();
                    }
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => tracing::debug!(cpu, error = %e, "cannot start a keep-awake spinner"),
        }
    }
    tracing::debug!(cpus = threads.len(), "keep-awake spinners started");
    Spinners {
        holders: 1,
        stop,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinners_live_exactly_as_long_as_a_guard() {
        // One test owns the process-wide spinners (tests run in parallel in one process).
        let cpus = allowed_cpus().len();
        assert!(cpus >= 1);
        let a = KeepAwake::acquire();
        let b = KeepAwake::acquire();
        assert_eq!(KeepAwake::spinners(), cpus);
        drop(a);
        assert_eq!(KeepAwake::spinners(), cpus, "b still holds them");
        drop(b);
        assert_eq!(KeepAwake::spinners(), 0);
        let c = KeepAwake::acquire();
        assert_eq!(KeepAwake::spinners(), cpus);
        drop(c);
        assert_eq!(KeepAwake::spinners(), 0);
    }
}
