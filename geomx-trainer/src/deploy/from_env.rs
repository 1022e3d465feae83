//! `geomx run --from-env`: the launcher that started this process and the task it is.
//!
//! [`detect`] finds the launcher from the variables it sets; [`assign`] maps (job file, launcher
//! variables) to a [`Task`] by the [`RoleTable`], the coordinator's address and this process's
//! local rank. Both are pure functions of the environment (docs/deployment.md, "Role mapping").
//!
//! | launcher | detected by | task | coordinator (default) |
//! |---|---|---|---|
//! | Slurm, one allocation | `SLURM_PROCID` | flat index `SLURM_PROCID` of `SLURM_NTASKS` = N | first node of `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST`, port 20000 + `SLURM_JOB_ID` mod 10000 |
//! | Slurm, heterogeneous job | `SLURM_PROCID` + `SLURM_HET_SIZE` | component k = tier k (`SLURM_NTASKS_HET_GROUP_k` = its size); `SLURM_PROCID` counts over all components | first node of `SLURM_JOB_NODELIST_HET_GROUP_0`, same port |
//! | Kubernetes Indexed Job | `JOB_COMPLETION_INDEX` | index in tier `GEOMX_TIER` (flat index without it) | `GEOMX_COORDINATOR` (the central tier's headless Service name) |
//! | JobSet | `JOBSET_NAME` | `JOB_COMPLETION_INDEX` in tier `GEOMX_TIER`, else replicated job `central` or `dc` (DC = `JOBSET_JOB_INDEX`) | `<JOBSET_NAME>-central-0-0.<JOBSET_NAME>:9092` |
//! | LeaderWorkerSet | `LWS_WORKER_INDEX` | index `LWS_WORKER_INDEX` (leader 0) in tier `GEOMX_TIER` or group `LWS_GROUP_INDEX`; `LWS_GROUP_SIZE` = the tier's size | central tier: `LWS_LEADER_ADDRESS:9092`; others `GEOMX_COORDINATOR` |
//! | torchrun | `RANK` / `WORLD_SIZE` | flat index `RANK` of `WORLD_SIZE` = N | `MASTER_ADDR:MASTER_PORT` (+1 when torchrun's agent holds that port: `TORCHELASTIC_USE_AGENT_STORE=True`) |
//! | ps-lite | `DMLC_ROLE` / `DMLC_ROLE_GLOBAL` | [`Config::from_dmlc_env`] | `DMLC_PS_GLOBAL_ROOT_URI:PORT` |
//!
//! For every launcher, `GEOMX_COORDINATOR=HOST:PORT` (then the job file's `cluster.coordinator`)
//! overrides the coordinator's address, `GEOMX_COORDINATOR_PORT` (then a non-zero
//! `cluster.base_port`) its port, and `GEOMX_LAUNCHER` chooses when variables of several launchers
//! are present. The local rank (`SLURM_LOCALID`, `LOCAL_RANK`; 0 for a Kubernetes pod) picks the
//! GPU of `model.device = "cuda:local"`.

use std::collections::HashMap;
use std::fmt;

use super::roles::{RoleTable, Task, Tier};
use super::{nodelist, DeployError, DEFAULT_COORDINATOR_PORT};
use crate::config::{Config, Role};

/// The process environment, as `std::env::vars()` gives it.
pub type Env = HashMap<String, String>;

/// Chooses the launcher when variables of several are present.
pub const LAUNCHER_VAR: &str = "GEOMX_LAUNCHER";
/// The coordinator's `HOST:PORT`, for every launcher.
pub const COORDINATOR_VAR: &str = "GEOMX_COORDINATOR";
/// The coordinator's port, for every launcher.
pub const COORDINATOR_PORT_VAR: &str = "GEOMX_COORDINATOR_PORT";
/// The host this process binds and advertises (Kubernetes: the pod IP).
pub const BIND_HOST_VAR: &str = "GEOMX_BIND_HOST";
/// The tier of a Kubernetes Job, JobSet replicated job or LeaderWorkerSet: `central` or a DC index.
pub const TIER_VAR: &str = "GEOMX_TIER";

/// Slurm's port base: the coordinator listens on 20000 + job id mod 10000, so that jobs sharing a
/// node do not collide (below Linux's ephemeral range).
const SLURM_PORT_BASE: u16 = 20000;

/// A launcher whose variables `geomx run --from-env` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Launcher {
    /// Slurm's `srun` (one allocation or a heterogeneous job).
    Slurm,
    /// A Kubernetes Indexed Job.
    IndexedJob,
    /// A JobSet (Indexed Jobs under one set).
    JobSet,
    /// A LeaderWorkerSet group.
    Lws,
    /// torchrun (or anything setting its variables, e.g. a PyTorchJob).
    Torchrun,
    /// ps-lite's `DMLC_*` scripts (the original GeoMX).
    Dmlc,
}

impl Launcher {
    /// Every launcher, in detection order.
    pub const ALL: [Launcher; 6] = [
        Launcher::Slurm,
        Launcher::IndexedJob,
        Launcher::JobSet,
        Launcher::Lws,
        Launcher::Torchrun,
        Launcher::Dmlc,
    ];

    /// The name `GEOMX_LAUNCHER` takes.
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Slurm => "slurm",
            Launcher::IndexedJob => "k8s",
            Launcher::JobSet => "jobset",
            Launcher::Lws => "lws",
            Launcher::Torchrun => "torchrun",
            Launcher::Dmlc => "dmlc",
        }
    }

    /// The variables whose presence means this launcher started the process.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Launcher::Slurm => &["SLURM_PROCID"],
            Launcher::IndexedJob => &["JOB_COMPLETION_INDEX"],
            Launcher::JobSet => &["JOBSET_NAME"],
            Launcher::Lws => &["LWS_WORKER_INDEX"],
            Launcher::Torchrun => &["RANK", "WORLD_SIZE"],
            Launcher::Dmlc => &["DMLC_ROLE", "DMLC_ROLE_GLOBAL"],
        }
    }

    fn parse(s: &str) -> Option<Launcher> {
        Self::ALL.into_iter().find(|l| l.name() == s.trim())
    }
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `host:port` of a listening process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `host:port` or `[v6]:port`; `None` if malformed.
    pub fn parse(s: &str) -> Option<Endpoint> {
        let s = s.trim();
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (h, p) = rest.split_once("]:")?;
                (h, p)
            }
            None => s.rsplit_once(':')?,
        };
        if host.is_empty() || (host.contains(':') && !s.starts_with('[')) {
            return None;
        }
        Some(Endpoint {
            host: host.to_string(),
            port: port.parse().ok()?,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What `geomx run --from-env` runs: the task, where the coordinator is, and this process's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The launcher whose variables gave it.
    pub launcher: Launcher,
    /// Tier of the task.
    pub tier: Tier,
    /// Index of the task in its tier.
    pub index: usize,
    /// Flat index of the task in the job.
    pub flat: usize,
    /// The task.
    pub task: Task,
    /// Where the coordinator listens. `None` only for the coordinator itself when nothing names
    /// its host: it then binds its own address (on `coordinator_port`).
    pub coordinator: Option<Endpoint>,
    /// The coordinator's port.
    pub coordinator_port: u16,
    /// `GEOMX_BIND_HOST`, when given.
    pub bind_host: Option<String>,
    /// The launcher's local rank (GPU choice of `cuda:local`).
    pub local_rank: u32,
}

impl fmt::Display for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} task {} (tier {}, index {}) is {}, coordinator ",
            self.launcher, self.flat, self.tier, self.index, self.task
        )?;
        match &self.coordinator {
            Some(c) => write!(f, "{c}"),
            None => write!(f, "on this host, port {}", self.coordinator_port),
        }?;
        write!(f, ", local rank {}", self.local_rank)
    }
}

struct Vars<'a>(&'a Env);

impl Vars<'_> {
    fn get(&self, var: &str) -> Option<&str> {
        self.0.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn has(&self, var: &str) -> bool {
        self.get(var).is_some()
    }

    fn num<T: std::str::FromStr>(&self, var: &str) -> Result<Option<T>, DeployError> {
        self.get(var)
            .map(|v| {
                v.parse::<T>().map_err(|_| {
                    DeployError::env(var, format!("{v:?}, expected a non-negative integer"))
                })
            })
            .transpose()
    }

    fn need<T: std::str::FromStr>(&self, var: &str, what: &str) -> Result<T, DeployError> {
        self.num(var)?
            .ok_or_else(|| DeployError::env(var, format!("not set; expected {what}")))
    }

    fn tier(&self) -> Result<Option<Tier>, DeployError> {
        self.get(TIER_VAR)
            .map(|v| {
                Tier::parse(v).ok_or_else(|| {
                    DeployError::env(
                        TIER_VAR,
                        format!("{v:?}, expected \"central\" or a data-center index"),
                    )
                })
            })
            .transpose()
    }
}

/// The launcher that started this process: `GEOMX_LAUNCHER` if set, else the one launcher whose
/// variables are present. Errors when none or several are (a JobSet's pods also carry
/// `JOB_COMPLETION_INDEX`; that is one launcher).
pub fn detect(env: &Env) -> Result<Launcher, DeployError> {
    let v = Vars(env);
    if let Some(name) = v.get(LAUNCHER_VAR) {
        return Launcher::parse(name).ok_or_else(|| {
            DeployError::env(
                LAUNCHER_VAR,
                format!("{name:?}, expected one of {}", names(&Launcher::ALL)),
            )
        });
    }
    let mut found: Vec<Launcher> = Launcher::ALL
        .into_iter()
        .filter(|l| l.markers().iter().any(|m| v.has(m)))
        .collect();
    if found.contains(&Launcher::JobSet) {
        found.retain(|&l| l != Launcher::IndexedJob);
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(DeployError::env(
            LAUNCHER_VAR,
            format!(
                "not set, and no launcher variables found; expected {} (or pass --role)",
                Launcher::ALL
                    .iter()
                    .map(|l| format!("{} ({l})", l.markers().join("/")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        several => Err(DeployError::env(
            LAUNCHER_VAR,
            format!(
                "not set, but variables of {} launchers are present ({}); expected one of {} to \
                 say which one started this process",
                several.len(),
                several
                    .iter()
                    .map(|l| format!(
                        "{} for {l}",
                        l.markers()
                            .iter()
                            .filter(|m| v.has(m))
                            .copied()
                            .collect::<Vec<_>>()
                            .join("/")
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                names(several)
            ),
        )),
    }
}

fn names(ls: &[Launcher]) -> String {
    ls.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
}

/// Where a task is, before the coordinator's address is settled.
struct Placed {
    tier: Tier,
    index: usize,
    local_rank: u32,
    /// The coordinator's host by the launcher's convention, if it has one.
    conventional_host: Option<String>,
    /// The launcher's port for the coordinator (torchrun's MASTER_PORT), if it has one.
    launcher_port: Option<u16>,
    /// The launcher's default port.
    default_port: u16,
}

/// Maps the environment of a process started by `launcher` to its task in the job `cfg`
/// describes (the module doc has the table). Errors name the variable and the expected value.
pub fn assign(cfg: &Config, env: &Env, launcher: Launcher) -> Result<Assignment, DeployError> {
    let table = RoleTable::from_config(cfg);
    let v = Vars(env);
    let placed = match launcher {
        Launcher::Slurm => slurm(&table, &v)?,
        Launcher::IndexedJob => indexed_job(&table, &v)?,
        Launcher::JobSet => jobset(&table, &v)?,
        Launcher::Lws => lws(&table, &v)?,
        Launcher::Torchrun => torchrun(&table, &v)?,
        Launcher::Dmlc => {
            return Err(DeployError::Invalid(
                "DMLC_* variables map through Config::from_dmlc_env, not the role table".into(),
            ))
        }
    };
    let task = table.task(placed.tier, placed.index).ok_or_else(|| {
        DeployError::Invalid(format!("no task {} in tier {}", placed.index, placed.tier))
    })?;
    let port = match v.num::<u16>(COORDINATOR_PORT_VAR)? {
        Some(p) => p,
        None => placed
            .launcher_port
            .or((cfg.cluster.base_port != 0).then_some(cfg.cluster.base_port))
            .unwrap_or(placed.default_port),
    };
    let explicit = match v.get(COORDINATOR_VAR) {
        Some(s) => Some(Endpoint::parse(s).ok_or_else(|| {
            DeployError::env(COORDINATOR_VAR, format!("{s:?}, expected HOST:PORT"))
        })?),
        None => match &cfg.cluster.coordinator {
            Some(s) => Some(Endpoint::parse(s).ok_or_else(|| {
                DeployError::Invalid(format!("cluster.coordinator: {s:?}, expected HOST:PORT"))
            })?),
            None => None,
        },
    };
    let coordinator = explicit.or_else(|| {
        placed
            .conventional_host
            .clone()
            .map(|host| Endpoint { host, port })
    });
    if coordinator.is_none() && task.role != Role::Coordinator {
        return Err(DeployError::env(
            COORDINATOR_VAR,
            format!(
                "not set; expected the coordinator's HOST:PORT ({})",
                match launcher {
                    Launcher::Lws => "the central tier's LWS_LEADER_ADDRESS and port",
                    _ => "the central tier's headless Service name and port",
                }
            ),
        ));
    }
    Ok(Assignment {
        launcher,
        tier: placed.tier,
        index: placed.index,
        flat: table.tier_offset(placed.tier) + placed.index,
        task,
        coordinator_port: coordinator.as_ref().map_or(port, |c| c.port),
        coordinator,
        bind_host: v.get(BIND_HOST_VAR).map(str::to_string),
        local_rank: placed.local_rank,
    })
}

fn slurm(table: &RoleTable, v: &Vars<'_>) -> Result<Placed, DeployError> {
    let procid: usize = v.need("SLURM_PROCID", "the task's rank")?;
    let ntasks: usize = v.need("SLURM_NTASKS", "the number of tasks")?;
    let job_id: Option<u64> = v.num("SLURM_JOB_ID")?;
    let (tier, index, list_var) = match v.num::<usize>("SLURM_HET_SIZE")? {
        Some(k) => {
            if k != table.tiers() {
                return Err(DeployError::env(
                    "SLURM_HET_SIZE",
                    format!(
                        "{k}, expected {} (one component for the central tier and one per data \
                         center)",
                        table.tiers()
                    ),
                ));
            }
            let mut sum = 0;
            for c in 0..k {
                let var = format!("SLURM_NTASKS_HET_GROUP_{c}");
                let tier = Tier::from_position(c);
                let want = table.tier_len(tier);
                let n: usize = v.need(&var, &format!("{want} (tasks of component {c})"))?;
                if n != want {
                    return Err(DeployError::env(
                        &var,
                        format!(
                            "{n}, expected {want} (component {c} is tier {tier}: {})",
                            tier_roles(table, tier)
                        ),
                    ));
                }
                sum += n;
            }
            if ntasks != sum {
                return Err(DeployError::env(
                    "SLURM_NTASKS",
                    format!(
                        "{ntasks}, expected {sum} (all {k} components in one step: srun \
                         --het-group=0-{})",
                        k - 1
                    ),
                ));
            }
            let (tier, index) = locate(table, "SLURM_PROCID", procid)?;
            (tier, index, "SLURM_JOB_NODELIST_HET_GROUP_0".to_string())
        }
        None => {
            if ntasks != table.len() {
                return Err(DeployError::env(
                    "SLURM_NTASKS",
                    format!(
                        "{ntasks}, expected {} (the job file has {})",
                        table.len(),
                        table.summary()
                    ),
                ));
            }
            let (tier, index) = locate(table, "SLURM_PROCID", procid)?;
            let var = [
                "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST",
                "SLURM_NODELIST",
            ]
            .into_iter()
            .find(|var| v.has(var))
            .unwrap_or("SLURM_JOB_NODELIST");
            (tier, index, var.to_string())
        }
    };
    let conventional_host = match v.get(&list_var) {
        Some(list) => Some(nodelist::first(&list_var, list)?),
        None => None,
    };
    if let (Some(first), Some(me), (Tier::Central, 0)) =
        (&conventional_host, v.get("SLURMD_NODENAME"), (tier, index))
    {
        if first != me {
            return Err(DeployError::env(
                "SLURMD_NODENAME",
                format!(
                    "{me:?}, expected {first:?}: this task is the coordinator, which must run on \
                     the first node of {list_var} (use block distribution, or set \
                     GEOMX_COORDINATOR)"
                ),
            ));
        }
    }
    Ok(Placed {
        tier,
        index,
        local_rank: v.num("SLURM_LOCALID")?.unwrap_or(0),
        conventional_host,
        launcher_port: None,
        default_port: job_id.map_or(DEFAULT_COORDINATOR_PORT, |id| {
            SLURM_PORT_BASE + (id % 10_000) as u16
        }),
    })
}

fn indexed_job(table: &RoleTable, v: &Vars<'_>) -> Result<Placed, DeployError> {
    let index: usize = v.need("JOB_COMPLETION_INDEX", "the pod's completion index")?;
    let (tier, index) = match v.tier()? {
        Some(t) => in_tier(
            table,
            TIER_VAR,
            t,
            "JOB_COMPLETION_INDEX",
            index,
            "completions",
        )?,
        None => locate(table, "JOB_COMPLETION_INDEX", index)?,
    };
    Ok(k8s_placed(tier, index, None))
}

fn jobset(table: &RoleTable, v: &Vars<'_>) -> Result<Placed, DeployError> {
    let name = v.get("JOBSET_NAME").unwrap_or_default().to_string();
    let index: usize = v.need("JOB_COMPLETION_INDEX", "the pod's completion index")?;
    let tier = match v.tier()? {
        Some(t) => t,
        None => match v.get("JOBSET_REPLICATED_JOB") {
            Some("central") => Tier::Central,
            Some("dc") => Tier::Dc(v.need(
                "JOBSET_JOB_INDEX",
                "the Job's index in replicated job \"dc\" (its data center)",
            )?),
            other => {
                return Err(DeployError::env(
                    "JOBSET_REPLICATED_JOB",
                    format!(
                        "{}, expected \"central\" or \"dc\" (or set {TIER_VAR})",
                        other.map_or("not set".into(), |o| format!("{o:?}"))
                    ),
                ))
            }
        },
    };
    let var = if v.has(TIER_VAR) {
        TIER_VAR
    } else {
        "JOBSET_JOB_INDEX"
    };
    let (tier, index) = in_tier(
        table,
        var,
        tier,
        "JOB_COMPLETION_INDEX",
        index,
        "completions",
    )?;
    let host = (!name.is_empty()).then(|| format!("{name}-central-0-0.{name}"));
    Ok(k8s_placed(tier, index, host))
}

fn lws(table: &RoleTable, v: &Vars<'_>) -> Result<Placed, DeployError> {
    let index: usize = v.need("LWS_WORKER_INDEX", "the pod's index in its group")?;
    let size: usize = v.need("LWS_GROUP_SIZE", "the group's size")?;
    let (tier, var) =
        match v.tier()? {
            Some(t) => (t, TIER_VAR),
            None => match v.num::<usize>("LWS_GROUP_INDEX")? {
                Some(g) => (Tier::from_position(g), "LWS_GROUP_INDEX"),
                None => return Err(DeployError::env(
                    TIER_VAR,
                    "not set (nor LWS_GROUP_INDEX); expected \"central\" or a data-center index",
                )),
            },
        };
    table.check_tier(var, tier)?;
    let want = table.tier_len(tier);
    if size != want {
        return Err(DeployError::env(
            "LWS_GROUP_SIZE",
            format!(
                "{size}, expected {want} (tier {tier}: {})",
                tier_roles(table, tier)
            ),
        ));
    }
    let (tier, index) = in_tier(table, var, tier, "LWS_WORKER_INDEX", index, "size")?;
    let host = match tier {
        Tier::Central => v.get("LWS_LEADER_ADDRESS").map(str::to_string),
        Tier::Dc(_) => None,
    };
    Ok(k8s_placed(tier, index, host))
}

fn torchrun(table: &RoleTable, v: &Vars<'_>) -> Result<Placed, DeployError> {
    let world: usize = v.need("WORLD_SIZE", "the number of processes")?;
    let rank: usize = v.need("RANK", "the process's global rank")?;
    if world != table.len() {
        return Err(DeployError::env(
            "WORLD_SIZE",
            format!(
                "{world}, expected {} (the job file has {})",
                table.len(),
                table.summary()
            ),
        ));
    }
    let (tier, index) = locate(table, "RANK", rank)?;
    let agent_store = v.get("TORCHELASTIC_USE_AGENT_STORE") == Some("True");
    let launcher_port = match v.num::<u16>("MASTER_PORT")? {
        Some(p) if agent_store => Some(p.checked_add(1).ok_or_else(|| {
            DeployError::env(
                "MASTER_PORT",
                "65535 leaves no port for the coordinator beside torchrun's store; expected a \
                 lower port",
            )
        })?),
        p => p,
    };
    Ok(Placed {
        tier,
        index,
        local_rank: v.num("LOCAL_RANK")?.unwrap_or(0),
        conventional_host: v.get("MASTER_ADDR").map(str::to_string),
        launcher_port,
        default_port: DEFAULT_COORDINATOR_PORT,
    })
}

fn k8s_placed(tier: Tier, index: usize, host: Option<String>) -> Placed {
    Placed {
        tier,
        index,
        // Each pod gets its own GPUs (nvidia.com/gpu), numbered from 0.
        local_rank: 0,
        conventional_host: host,
        launcher_port: None,
        default_port: DEFAULT_COORDINATOR_PORT,
    }
}

/// Flat index `index` (from `var`) in the table.
fn locate(table: &RoleTable, var: &str, index: usize) -> Result<(Tier, usize), DeployError> {
    table.locate(index).ok_or_else(|| {
        DeployError::env(
            var,
            format!(
                "{index}, expected below {} (the job file has {}: more tasks than roles)",
                table.len(),
                table.summary()
            ),
        )
    })
}

/// Index `index` (from `index_var`) in `tier` (from `tier_var`).
fn in_tier(
    table: &RoleTable,
    tier_var: &str,
    tier: Tier,
    index_var: &str,
    index: usize,
    count_name: &str,
) -> Result<(Tier, usize), DeployError> {
    table.check_tier(tier_var, tier)?;
    let n = table.tier_len(tier);
    if index >= n {
        return Err(DeployError::env(
            index_var,
            format!(
                "{index}, expected below {n} (tier {tier} has {n} processes: {}; set its {count_name} \
                 to {n})",
                tier_roles(table, tier)
            ),
        ));
    }
    Ok((tier, index))
}

fn tier_roles(table: &RoleTable, tier: Tier) -> String {
    let n = table.tier_len(tier).saturating_sub(1);
    match tier {
        Tier::Central => format!("the coordinator and {n} global server(s)"),
        Tier::Dc(d) => format!(
            "data center {:?}'s local server and {n} worker(s)",
            table.dc_names.get(d as usize).map_or("?", String::as_str)
        ),
    }
}

#[cfg(test)]
#[path = "from_env_tests.rs"]
mod tests;
