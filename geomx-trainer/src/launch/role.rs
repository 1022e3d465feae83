//! `geomx run`: one role of a job in this process.

use std::io::Write;
use std::sync::Arc;

use super::lines;
use crate::config::{Config, Role, RoleSpec, SecurityMode};
use crate::hips::node::FatalHook;
use crate::hips::worker::{Progress, ProgressSink};
use crate::hips::{coordinator, global_server, local_server, worker, JobSpec, RoleStats, RunError};
use crate::security::Keyring;

/// Where a role finds the rest of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleArgs {
    /// Who this process is.
    pub spec: RoleSpec,
    /// Coordinator address: where to bind (coordinator) or connect (everyone else).
    pub coordinator: Option<String>,
    /// Host to bind and advertise (default `cluster.host`).
    pub bind_host: Option<String>,
    /// Continue from the newest complete round of this checkpoint directory (`--resume DIR`).
    pub resume: Option<std::path::PathBuf>,
    /// Read this process's credentials from stdin (`--credentials-stdin`, how `geomx launch`
    /// hands them over); otherwise from `security.dir`.
    pub credentials_stdin: bool,
}

/// The keyring of a process of a job with `security.mode = "mtls"`: its stdin (from `geomx
/// launch`) or `security.dir`; with `"off"`, none (and a warning when `host` is not loopback).
pub fn process_keyring(
    cfg: &Config,
    args: &RoleArgs,
    host: &str,
) -> Result<Option<Arc<Keyring>>, RoleError> {
    match (cfg.security.mode, args.credentials_stdin, &cfg.security.dir) {
        (SecurityMode::Off, _, _) => {
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                tracing::warn!(
                    host,
                    "security.mode = \"off\": this process binds a non-loopback address; every \
                     link is plaintext and unauthenticated"
                );
            }
            Ok(None)
        }
        (SecurityMode::Mtls, true, _) => Keyring::read_bundles(std::io::stdin().lock())
            .map(|k| Some(Arc::new(k)))
            .map_err(RoleError::Usage),
        (SecurityMode::Mtls, false, Some(dir)) => Ok(Some(Arc::new(Keyring::from_dir(dir)))),
        (SecurityMode::Mtls, false, None) => Err(RoleError::Usage(
            "security.mode = \"mtls\" (the default) and this process has no credentials: start \
             the job with `geomx launch`, or make them with `geomx pki` and set security.dir \
             (or GEOMX_SECURITY_DIR); security.mode = \"off\" runs plaintext"
                .into(),
        )),
    }
}

/// Errors of `geomx run` before or while the role runs.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The arguments do not say enough to run the role.
    #[error("{0}")]
    Usage(String),
    /// The role failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

fn print_line(prefix: &str, json: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{prefix}{json}");
    let _ = out.flush();
}

/// The fatal hook of the binary: print the reason and exit non-zero at once.
pub fn exit_hook() -> FatalHook {
    Arc::new(|msg: &str| {
        eprintln!("error: {msg}");
        std::process::exit(2);
    })
}

/// Prints progress as machine-readable lines on stdout (the launcher turns them into text).
pub fn stdout_progress() -> ProgressSink {
    Arc::new(|p: &Progress| {
        if let Ok(j) = serde_json::to_string(p) {
            print_line(lines::PROGRESS, &j);
        }
    })
}

/// [`run_role`] as the binary ends it: a restarted process that finds the job already finished
/// (it came too late to rejoin) succeeds with a note and no stats to report.
pub fn run_role_to_end(cfg: &Config, args: &RoleArgs, fatal: FatalHook) -> Result<(), RoleError> {
    match run_role(cfg, args, fatal) {
        Ok(_) => Ok(()),
        Err(RoleError::Run(RunError::JobFinished(m))) => {
            eprintln!("note: {m}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Runs the role `args` describes with configuration `cfg`; prints the coordinator address and
/// the final stats as lines on stdout.
pub fn run_role(cfg: &Config, args: &RoleArgs, fatal: FatalHook) -> Result<RoleStats, RoleError> {
    let mut owned = cfg.clone();
    owned
        .security_from_env(|k| std::env::var(k).ok())
        .map_err(RunError::Config)?;
    let cfg = &owned;
    let mut job = JobSpec::from_config(cfg)?;
    if let Some(dir) = &args.resume {
        job.resume_from(cfg, dir.clone())
            .map_err(RunError::Config)?;
    }
    let host = args
        .bind_host
        .clone()
        .or_else(|| args.spec.node_host.clone())
        .unwrap_or_else(|| cfg.cluster.host.clone());
    let port = args.spec.port.unwrap_or(0);
    let coord = args
        .coordinator
        .clone()
        .or_else(|| cfg.cluster.coordinator.clone());
    let need = |what: &str| -> Result<u32, RoleError> {
        let v = match what {
            "dc" => args.spec.dc,
            _ => args.spec.rank,
        };
        v.ok_or_else(|| {
            RoleError::Usage(format!(
                "the {} role needs --{what} (or GEOMX_{})",
                args.spec.role,
                what.to_uppercase()
            ))
        })
    };
    let coord_addr = || {
        coord.clone().ok_or_else(|| {
            RoleError::Usage(
                "no coordinator address: pass --coordinator HOST:PORT or set cluster.coordinator"
                    .into(),
            )
        })
    };
    if matches!(
        args.spec.role,
        Role::GlobalServer | Role::LocalServer | Role::Worker
    ) {
        coord_addr()?;
    }
    if let Some(k) = process_keyring(cfg, args, &host)? {
        job = job.with_keyring(k);
    }
    let stats = match args.spec.role {
        Role::Coordinator => {
            let addr = coord.clone().unwrap_or_else(|| {
                format!("{host}:{}", args.spec.port.unwrap_or(cfg.cluster.base_port))
            });
            coordinator::run(&job, &addr, |a| {
                print_line(lines::COORDINATOR, &a.to_string())
            })?
        }
        Role::GlobalServer => {
            let rank = args.spec.rank.unwrap_or(0);
            let bind = cfg
                .cluster
                .global_server_addrs
                .get(rank as usize)
                .cloned()
                .unwrap_or_else(|| format!("{host}:{port}"));
            global_server::run(&job, rank, &coord_addr()?, &bind, fatal)?
        }
        Role::LocalServer => {
            let dc = need("dc")?;
            let bind = cfg
                .cluster
                .data_centers
                .get(dc as usize)
                .and_then(|d| d.local_server.clone())
                .unwrap_or_else(|| format!("{host}:{port}"));
            local_server::run(&job, dc, &coord_addr()?, &bind, fatal)?
        }
        Role::Worker => worker::run(
            &job,
            need("dc")?,
            need("rank")?,
            &coord_addr()?,
            &host,
            fatal,
            stdout_progress(),
        )?,
        Role::DcCoordinator | Role::MasterWorker => {
            // geomx merges the party schedulers into the one coordinator and takes the optimizer
            // and θ_0 from the configuration, so these roles of the original have nothing to do.
            tracing::info!(role = %args.spec.role, "merged into the coordinator; exiting");
            return Ok(RoleStats {
                role: args.spec.role.as_str().to_string(),
                dc: args.spec.dc.unwrap_or(0),
                rank: args.spec.rank.unwrap_or(0),
                served_bytes: 0,
                client_bytes: 0,
                param_hash: None,
                final_loss: None,
                staleness: Vec::new(),
                final_test_accuracy: None,
                global_param_hash: None,
                codec_bytes: Default::default(),
                skipped_updates: 0,
                cast_overflows: Default::default(),
                resyncs: 0,
                resync_mismatches: 0,
                topk_fallbacks: 0,
                dgt: None,
                refused_requests: 0,
                resumed_from_round: None,
                throughput: None,
                split: None,
                member_events: Vec::new(),
                partial_rounds: Vec::new(),
                round_log: None,
                incarnation: 0,
                p3_credit: None,
            });
        }
    };
    if let Ok(j) = serde_json::to_string(&stats) {
        print_line(lines::STATS, &j);
    }
    Ok(stats)
}
