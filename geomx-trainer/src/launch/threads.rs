//! A whole cluster in this process: every role of a job on its own thread, talking over loopback
//! exactly as separate processes do. For tests and embedders that want a [`Report`] without
//! spawning processes (the roles' code is the same; only the process boundary is missing).
//!
//! A fatal event (an abort broadcast, a lost coordinator) cannot end the process here; the first
//! one is recorded and returned as the run's error. Once a role has failed or a fatal event was
//! reported, the run waits at most [`AFTER_FAILURE`] for each further role, not the whole wait
//! limit: roles that wait on a failed peer end only on their own timeouts, which are left to run
//! out on their threads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hips::node::FatalHook;
use crate::hips::worker::{Progress, ProgressSink};
use crate::hips::{coordinator, global_server, local_server, worker, JobSpec, RoleStats};
use crate::report::Report;

/// How long a failed run waits for each further role to return.
pub const AFTER_FAILURE: Duration = Duration::from_secs(5);

/// How often a wait for a role checks whether the run has failed meanwhile.
const POLL: Duration = Duration::from_millis(100);

/// Why an in-process run failed.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    /// A role returned an error (first one listed), or a fatal event was reported.
    #[error("{0}")]
    Failed(String),
    /// Not every role returned within the wait limit.
    #[error("the cluster did not finish within {0:?}: {1}")]
    Hung(Duration, String),
}

/// Runs every role of `job` on loopback threads (the coordinator on `127.0.0.1:0`, every server
/// on an OS-assigned port) and assembles the report; `config` is the report's resolved
/// configuration. Each role must return within `limit` of the previous one ([`AFTER_FAILURE`]
/// once the run has failed).
pub fn run(
    job: &JobSpec,
    config: serde_json::Value,
    limit: Duration,
) -> Result<Report, ThreadsError> {
    let started = Instant::now();
    let fatals = Arc::new(Mutex::new(Vec::<String>::new()));
    let f2 = fatals.clone();
    let fatal: FatalHook = Arc::new(move |m: &str| crate::lock(&f2).push(m.to_string()));
    let lines = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let l2 = lines.clone();
    let progress: ProgressSink = Arc::new(move |p: &Progress| crate::lock(&l2).push(*p));
    let (res_tx, res_rx) = crossbeam_channel::unbounded();
    let (addr_tx, addr_rx) = crossbeam_channel::bounded(1);
    let spawn = |name: String, f: Box<dyn FnOnce() -> Result<RoleStats, String> + Send>| {
        let tx = res_tx.clone();
        let thread = format!("geomx-{name}");
        let what = format!("starting {name}");
        std::thread::Builder::new()
            .name(thread)
            .spawn(move || {
                let _ = tx.send(f().map_err(|e| format!("{name}: {e}")));
            })
            .map_err(|e| ThreadsError::Failed(format!("{what}: {e}")))
    };
    {
        let j = job.clone();
        spawn(
            "coordinator".into(),
            Box::new(move || {
                coordinator::run(&j, "127.0.0.1:0", |a| {
                    let _ = addr_tx.send(a.to_string());
                })
                .map_err(|e| e.to_string())
            }),
        )?;
    }
    let coord = addr_rx
        .recv_timeout(limit)
        .map_err(|_| ThreadsError::Hung(limit, "no coordinator address".into()))?;
    let plan = &job.plan;
    for s in 0..plan.num_global_servers() as u32 {
        let (j, c, f) = (job.clone(), coord.clone(), fatal.clone());
        spawn(
            format!("global-server-{s}"),
            Box::new(move || {
                global_server::run(&j, s, &c, "127.0.0.1:0", f).map_err(|e| e.to_string())
            }),
        )?;
    }
    for (d, &n) in plan.workers_per_dc.iter().enumerate() {
        let d = d as u32;
        let (j, c, f) = (job.clone(), coord.clone(), fatal.clone());
        spawn(
            format!("local-server-{d}"),
            Box::new(move || {
                local_server::run(&j, d, &c, "127.0.0.1:0", f).map_err(|e| e.to_string())
            }),
        )?;
        for r in 0..n as u32 {
            let (j, c, f, p) = (job.clone(), coord.clone(), fatal.clone(), progress.clone());
            spawn(
                format!("worker-{d}-{r}"),
                Box::new(move || {
                    worker::run(&j, d, r, &c, "127.0.0.1", f, p).map_err(|e| e.to_string())
                }),
            )?;
        }
    }
    let total = 1 + plan.num_global_servers() + plan.num_dcs() + plan.total_workers();
    let mut stats = Vec::with_capacity(total);
    let mut errors = Vec::new();
    for _ in 0..total {
        let failed = || !errors.is_empty() || !crate::lock(&fatals).is_empty();
        match next_result(&res_rx, limit, AFTER_FAILURE, failed) {
            Some(Ok(s)) => stats.push(s),
            Some(Err(e)) => errors.push(e),
            // The roles still out wait on the failed one: the failure is the run's error.
            None if failed() => break,
            None => {
                let f = crate::lock(&fatals).join("; ");
                return Err(ThreadsError::Hung(limit, format!("{errors:?} {f}")));
            }
        }
    }
    let fatal = crate::lock(&fatals).clone();
    if let Some(e) = errors.first().or(fatal.first()) {
        return Err(ThreadsError::Failed(e.clone()));
    }
    let progress = std::mem::take(&mut *crate::lock(&lines));
    Ok(Report::assemble(
        stats,
        progress,
        job.rounds,
        started.elapsed().as_secs_f64(),
        plan.placement.server_bytes.clone(),
        config,
    ))
}

/// The next role's result, or `None` when none came in time: within `limit`, or within `grace`
/// of the moment `failed()` first held during the wait.
fn next_result<T>(
    rx: &crossbeam_channel::Receiver<T>,
    limit: Duration,
    grace: Duration,
    failed: impl Fn() -> bool,
) -> Option<T> {
    let mut deadline = Instant::now() + limit;
    loop {
        if failed() {
            deadline = deadline.min(Instant::now() + grace);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match rx.recv_timeout(left.min(POLL)) {
            Ok(r) => return Some(r),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            // Every sender gone: no role is left to report.
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A wait returns a result that comes; without one it ends at the limit, or `grace` after
    /// the run failed, whether it had failed before the wait or fails during it.
    #[test]
    fn a_wait_ends_soon_after_the_run_fails() {
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        let long = Duration::from_secs(60);
        let grace = Duration::from_millis(50);
        tx.send(7).unwrap();
        assert_eq!(next_result(&rx, long, grace, || true), Some(7));
        let t = Instant::now();
        assert_eq!(
            next_result(&rx, Duration::from_millis(50), long, || false),
            None
        );
        assert!(t.elapsed() < Duration::from_secs(30));
        let t = Instant::now();
        assert_eq!(next_result(&rx, long, grace, || true), None);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        // The failure comes during the wait.
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            f2.store(true, Ordering::SeqCst);
        });
        let t = Instant::now();
        assert_eq!(
            next_result(&rx, long, grace, || flag.load(Ordering::SeqCst)),
            None
        );
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(30), "{waited:?}");
        setter.join().unwrap();
        drop(tx);
        assert_eq!(
            next_result(&rx, long, long, || false),
            None,
            "no sender left"
        );
    }
}
