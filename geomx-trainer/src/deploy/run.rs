//! The I/O of `geomx run --from-env` around the pure [`assign`]: waiting (bounded) for the
//! coordinator's name to resolve, choosing the address to bind, and the GPU of
//! `model.device = "cuda:local"`.
//!
//! The bind host is `--bind`, else `GEOMX_BIND_HOST` (Kubernetes: the pod IP), else the local
//! address of the route to the coordinator (what peers on that network reach this host at). The
//! coordinator binds the address its name resolves to on this host, and fails at once if that
//! name is not this host's.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use super::from_env::{
    assign, Assignment, Endpoint, Env, Launcher, BIND_HOST_VAR, COORDINATOR_VAR,
};
use super::DeployError;
use crate::config::{Config, Role};
use crate::launch::role::RoleArgs;

pub use crate::config::device::CUDA_LOCAL;

/// The device `cuda:local` stands for: GPU `local_rank`, or `local_rank` mod the number of
/// devices `CUDA_VISIBLE_DEVICES` lists when it is set (Slurm and Kubernetes narrow it to the
/// process's or node's GPUs). `None` for any other device string (kept as written).
pub fn resolve_local_device(
    device: &str,
    local_rank: u32,
    visible: Option<&str>,
) -> Result<Option<String>, DeployError> {
    if device != CUDA_LOCAL {
        return Ok(None);
    }
    let none = || {
        DeployError::env(
            "CUDA_VISIBLE_DEVICES",
            "lists no device: this process sees no GPU, but model.device = \"cuda:local\"; \
             expected the launcher to give it one (Slurm --gpus, Kubernetes nvidia.com/gpu)",
        )
    };
    match visible.map(str::trim) {
        None => Ok(Some(format!("cuda:{local_rank}"))),
        Some(v) => match crate::config::device::visible_count(v) {
            0 => Err(none()),
            n => Ok(Some(format!("cuda:{}", local_rank as usize % n))),
        },
    }
}

/// Resolves `ep`, retrying while the name is unknown (a Kubernetes Service name appears only
/// once its pod exists) until `deadline`.
fn resolve(ep: &Endpoint, deadline: Instant) -> Result<Vec<SocketAddr>, DeployError> {
    resolve_with(ep, deadline, Duration::from_millis(250), |h, p| {
        (h, p).to_socket_addrs().map(Iterator::collect)
    })
}

/// [`resolve`] with the name lookup `lookup` and `pause` between tries.
fn resolve_with(
    ep: &Endpoint,
    deadline: Instant,
    pause: Duration,
    lookup: impl Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>,
) -> Result<Vec<SocketAddr>, DeployError> {
    loop {
        let why = match lookup(&ep.host, ep.port) {
            Ok(v) if !v.is_empty() => return Ok(v),
            Ok(_) => "no address".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(DeployError::env(
                COORDINATOR_VAR,
                format!(
                    "the coordinator's host {:?} did not resolve within the registration timeout \
                     ({why}); expected a name this host can resolve",
                    ep.host
                ),
            ));
        }
        std::thread::sleep(pause);
    }
}

/// The local address of the route to `to` (no packet is sent).
fn route_source(to: SocketAddr) -> Result<IpAddr, DeployError> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(any).map_err(|e| DeployError::io("opening a routing probe", e))?;
    s.connect(to)
        .map_err(|e| DeployError::io(format!("finding the route to the coordinator at {to}"), e))?;
    let ip = s
        .local_addr()
        .map_err(|e| DeployError::io("reading the routing probe's address", e))?
        .ip();
    if ip.is_unspecified() {
        return Err(DeployError::Invalid(format!(
            "no local address routes to the coordinator at {to}: pass --bind or {BIND_HOST_VAR}"
        )));
    }
    Ok(ip)
}

fn host_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// What `geomx run --from-env` runs: the configuration (device resolved), the role's arguments,
/// and the assignment they came from.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The job file, `cuda:local` resolved.
    pub config: Config,
    /// Arguments of [`crate::launch::role::run_role`].
    pub args: RoleArgs,
    /// The launcher's assignment.
    pub assignment: Assignment,
}

/// Maps this process's launcher environment to its role: loads `config` (default: the built-in
/// job), assigns the task, waits at most the registration timeout for the coordinator's name,
/// and picks the address to bind. `coordinator` and `bind` are the command line's overrides.
pub fn prepare(
    launcher: Launcher,
    env: &Env,
    config: Option<&Path>,
    coordinator: Option<&str>,
    bind: Option<&str>,
) -> Result<Prepared, DeployError> {
    let mut cfg = match config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let mut a = assign(&cfg, env, launcher)?;
    if let Some(c) = coordinator {
        let ep = Endpoint::parse(c).ok_or_else(|| {
            DeployError::Invalid(format!("--coordinator {c:?}: expected HOST:PORT"))
        })?;
        a.coordinator_port = ep.port;
        a.coordinator = Some(ep);
    }
    if let Some(d) = resolve_local_device(
        &cfg.model.device,
        a.local_rank,
        env.get("CUDA_VISIBLE_DEVICES").map(String::as_str),
    )? {
        cfg.model.device = d;
    }
    let deadline = Instant::now() + cfg.timeouts.registration();
    let resolved = match &a.coordinator {
        Some(ep) => Some(resolve(ep, deadline)?),
        None => None,
    };
    let explicit_bind = bind.map(str::to_string).or_else(|| a.bind_host.clone());
    let bind_host = match (explicit_bind, a.task.role, &resolved) {
        (Some(h), _, _) => h,
        (None, Role::Coordinator, Some(addrs)) => {
            let local =
                addrs
                    .iter()
                    .find(|s| TcpListener::bind(SocketAddr::new(s.ip(), 0)).is_ok())
                    .ok_or_else(|| {
                        DeployError::env(
                            COORDINATOR_VAR,
                            format!(
                            "{} resolves to {addrs:?}, none of them an address of this host, but \
                             this task is the coordinator; expected it to run where that name \
                             points",
                            a.coordinator.as_ref().map(|c| c.to_string()).unwrap_or_default()
                        ),
                        )
                    })?;
            host_of(local.ip())
        }
        (None, Role::Coordinator, None) => {
            return Err(DeployError::env(
                BIND_HOST_VAR,
                "not set, and nothing names the coordinator's host; expected the address this \
                 pod is reached at (the pod IP)",
            ))
        }
        (None, _, Some(addrs)) => host_of(route_source(addrs[0])?),
        (None, _, None) => unreachable!("assign requires a coordinator for other roles"),
    };
    let coordinator_arg = match a.task.role {
        Role::Coordinator => format!("{bind_host}:{}", a.coordinator_port),
        _ => a
            .coordinator
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default(),
    };
    Ok(Prepared {
        args: RoleArgs {
            spec: a.task.spec(),
            coordinator: Some(coordinator_arg),
            bind_host: Some(bind_host),
            resume: None,
            credentials_stdin: false,
        },
        config: cfg,
        assignment: a,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_local_follows_the_local_rank() {
        assert_eq!(resolve_local_device("cpu", 3, None).unwrap(), None);
        assert_eq!(resolve_local_device("cuda:1", 3, None).unwrap(), None);
        assert_eq!(
            resolve_local_device("cuda:local", 3, None)
                .unwrap()
                .as_deref(),
            Some("cuda:3")
        );
        // Narrowed to the process's own GPUs: they are numbered from 0.
        assert_eq!(
            resolve_local_device("cuda:local", 3, Some("5"))
                .unwrap()
                .as_deref(),
            Some("cuda:0")
        );
        assert_eq!(
            resolve_local_device("cuda:local", 3, Some("0,1"))
                .unwrap()
                .as_deref(),
            Some("cuda:1")
        );
        let e = resolve_local_device("cuda:local", 0, Some(" ")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("CUDA_VISIBLE_DEVICES: lists no device"),
            "{e}"
        );
    }

    #[test]
    fn name_resolution_waits_for_the_name_but_not_forever() {
        let ep = Endpoint {
            host: "geomx-central-0.geomx-central".into(),
            port: 9092,
        };
        let addr: SocketAddr = "198.19.0.10:9092".parse().unwrap();
        let tries = std::cell::Cell::new(0);
        let late = |_: &str, _: u16| {
            tries.set(tries.get() + 1);
            if tries.get() < 3 {
                Err(std::io::Error::other("Name or service not known"))
            } else {
                Ok(vec![addr])
            }
        };
        let far = Instant::now() + Duration::from_secs(600);
        let got = resolve_with(&ep, far, Duration::from_millis(1), late).unwrap();
        assert_eq!((got, tries.get()), (vec![addr], 3));
        let never = |_: &str, _: u16| Err(std::io::Error::other("Name or service not known"));
        let soon = Instant::now() + Duration::from_millis(50);
        let e = resolve_with(&ep, soon, Duration::from_millis(5), never).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GEOMX_COORDINATOR: the coordinator's host \"geomx-central-0.geomx-central\" did not \
             resolve within the registration timeout (Name or service not known); expected a name \
             this host can resolve"
        );
    }

    #[test]
    fn processes_on_different_gpus_agree_on_the_config_hash() {
        let mut a = Config::default();
        a.model.device = "cuda:0".into();
        let mut b = a.clone();
        b.model.device = "cuda:1".into();
        assert_eq!(a.config_hash(), b.config_hash());
        b.model.seed += 1;
        assert_ne!(a.config_hash(), b.config_hash());
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn loopback_job_binds_where_the_coordinator_is_reached() {
        // Worker: binds the local end of the route to the coordinator.
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]);
        let p = prepare(Launcher::Torchrun, &e, None, None, None).unwrap();
        assert_eq!(p.args.spec.role, Role::Worker);
        assert_eq!(p.args.bind_host.as_deref(), Some("127.0.0.1"));
        assert_eq!(p.args.coordinator.as_deref(), Some("127.0.0.1:29500"));
        // Coordinator: binds its own name's address on the coordinator port.
        let e = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "29500"),
        ]);
        let p = prepare(Launcher::Torchrun, &e, None, None, None).unwrap();
        assert_eq!(p.args.spec.role, Role::Coordinator);
        let c = p.args.coordinator.unwrap();
        assert!(
            c.ends_with(":29500") && c.starts_with(&p.args.bind_host.unwrap()),
            "{c}"
        );
        // --bind and --coordinator override.
        let p = prepare(
            Launcher::Torchrun,
            &e,
            None,
            Some("127.0.0.2:7"),
            Some("127.0.0.3"),
        )
        .unwrap();
        assert_eq!(p.args.coordinator.as_deref(), Some("127.0.0.3:7"));
    }

    #[test]
    fn a_coordinator_elsewhere_is_refused_at_once() {
        // 192.0.2.1 (TEST-NET-1) is no address of this host; nothing is sent to it.
        let e = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "192.0.2.1"),
            ("MASTER_PORT", "29500"),
        ]);
        let err = prepare(Launcher::Torchrun, &e, None, None, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("none of them an address of this host"),
            "{err}"
        );
        let e = env(&[("JOB_COMPLETION_INDEX", "0"), ("GEOMX_TIER", "central")]);
        let err = prepare(Launcher::IndexedJob, &e, None, None, None).unwrap_err();
        assert!(
            err.to_string().starts_with("GEOMX_BIND_HOST: not set"),
            "{err}"
        );
    }
}
