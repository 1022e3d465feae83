//! A whole cluster in this process: every role of a job on its own thread, talking over loopback
//! exactly as separate processes do. For tests and embedders that want a [`Report`] without
//! spawning processes (the roles' code is the same; only the process boundary is missing).
//!
//! A fatal event (an abort broadcast, a lost coordinator) cannot end the process here; the first
//! one is recorded and returned as the run's error once every role has returned or the wait
//! limit passed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hips::node::FatalHook;
use crate::hips::worker::{Progress, ProgressSink};
use crate::hips::{coordinator, global_server, local_server, worker, JobSpec, RoleStats};
use crate::report::Report;

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
/// configuration. Each role must return within `limit` of the previous one.
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
        match res_rx.recv_timeout(limit) {
            Ok(Ok(s)) => stats.push(s),
            Ok(Err(e)) => errors.push(e),
            Err(_) => {
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
