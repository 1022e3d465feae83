//! `Config::from_dmlc_env`: the original GeoMX `DMLC_*` variables (hips.md, Compatibility).
//!
//! Each original process saw only part of the topology, so the shape is derived from what it has,
//! assuming equal data centers (n_d = W / D):
//! - S = `DMLC_NUM_GLOBAL_SERVER`, else `DMLC_NUM_SERVER` for a global server, else 1;
//! - D = `DMLC_NUM_GLOBAL_WORKER`, else W / n_d for a worker (`DMLC_NUM_ALL_WORKER` /
//!   `DMLC_NUM_WORKER`), else 1;
//! - n_d = W / D when both are known, else `DMLC_NUM_WORKER` for local roles, else 1.
//!
//! The coordinator and global servers need the true shape and fail with the missing variable
//! named. Unequal data centers need a topology file. DC and rank are unknown to the original
//! processes; `GEOMX_DC` and `GEOMX_RANK` may give them, otherwise the coordinator assigns them.

use std::collections::HashMap;

use super::{Config, ConfigError, DataCenterConfig, LogLevel, Role, RoleSpec};

fn env_err(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Env {
        var: var.to_string(),
        message: message.into(),
    }
}

struct Vars<'a>(&'a HashMap<String, String>);

impl Vars<'_> {
    fn get(&self, var: &str) -> Option<&str> {
        self.0.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn num<T: std::str::FromStr>(&self, var: &str) -> Result<Option<T>, ConfigError> {
        self.get(var)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| env_err(var, format!("{v:?} is not a valid number")))
            })
            .transpose()
    }

    /// A count of processes: at least 1, and no more than a job's membership holds (checked
    /// before the data centers are listed).
    fn count(&self, var: &str) -> Result<Option<usize>, ConfigError> {
        let max = geomx_net::coord::MAX_NODES;
        match self.num::<usize>(var)? {
            Some(0) => Err(env_err(var, "must be >= 1")),
            Some(n) if n > max => Err(env_err(var, format!("{n} is more than {max}"))),
            other => Ok(other),
        }
    }

    fn flag(&self, var: &str) -> Result<bool, ConfigError> {
        match self.get(var) {
            None | Some("0") | Some("false") => Ok(false),
            Some("1") | Some("true") => Ok(true),
            Some(v) => Err(env_err(var, format!("{v:?} is not 0 or 1"))),
        }
    }

    /// `URI` + `PORT` as `host:port`, if the URI is set.
    fn addr(&self, uri: &str, port: &str) -> Result<Option<String>, ConfigError> {
        let Some(host) = self.get(uri) else {
            return Ok(None);
        };
        let p: u16 = self
            .num(port)?
            .ok_or_else(|| env_err(port, format!("required with {uri}")))?;
        Ok(Some(if host.contains(':') {
            format!("[{host}]:{p}")
        } else {
            format!("{host}:{p}")
        }))
    }
}

fn role_of(v: &Vars<'_>) -> Result<Role, ConfigError> {
    let local = v.get("DMLC_ROLE");
    match v.get("DMLC_ROLE_GLOBAL") {
        Some("global_scheduler") => return Ok(Role::Coordinator),
        Some("global_server") => {
            return match local {
                None | Some("server") => Ok(Role::GlobalServer),
                Some(other) => Err(env_err(
                    "DMLC_ROLE",
                    format!("{other:?} with DMLC_ROLE_GLOBAL=global_server; expected \"server\""),
                )),
            }
        }
        Some(other) => {
            return Err(env_err(
                "DMLC_ROLE_GLOBAL",
                format!("{other:?}; expected global_scheduler or global_server"),
            ))
        }
        None => {}
    }
    let master = v.flag("DMLC_ROLE_MASTER_WORKER")?;
    match local {
        Some("scheduler") => Ok(Role::DcCoordinator),
        Some("server") => Ok(Role::LocalServer),
        Some("worker") if master => Ok(Role::MasterWorker),
        Some("worker") => Ok(Role::Worker),
        Some(other) => Err(env_err(
            "DMLC_ROLE",
            format!("{other:?}; expected scheduler, server or worker"),
        )),
        None => Err(env_err("DMLC_ROLE", "not set (nor DMLC_ROLE_GLOBAL)")),
    }
}

impl Config {
    /// Builds the configuration and this process's role from `DMLC_*` variables (the original
    /// GeoMX launch scripts), on top of [`Config::default`] for everything they do not set.
    ///
    /// Mapped: `DMLC_ROLE`, `DMLC_ROLE_GLOBAL`, `DMLC_ROLE_MASTER_WORKER`, `DMLC_PS_ROOT_URI/_PORT`
    /// (DC coordinator), `DMLC_PS_GLOBAL_ROOT_URI/_PORT` (coordinator), `DMLC_NUM_SERVER`,
    /// `DMLC_NUM_WORKER`, `DMLC_NUM_GLOBAL_SERVER`, `DMLC_NUM_GLOBAL_WORKER`,
    /// `DMLC_NUM_ALL_WORKER`, `DMLC_ENABLE_CENTRAL_WORKER` (the central DC is `dc0` and trains),
    /// `DMLC_INTERFACE`, `DMLC_NODE_HOST`, `PORT`, `PS_VERBOSE` (0 info, 1 debug, 2 trace),
    /// `MXNET_KVSTORE_BIGARRAY_BOUND` (placement split bound), and ours: `GEOMX_DC`, `GEOMX_RANK`.
    pub fn from_dmlc_env(
        vars: &HashMap<String, String>,
    ) -> Result<(Config, RoleSpec), ConfigError> {
        let v = Vars(vars);
        let role = role_of(&v)?;
        let mut cfg = Config::default();

        let s = match (v.count("DMLC_NUM_GLOBAL_SERVER")?, role) {
            (Some(s), _) => s,
            (None, Role::GlobalServer) => v.count("DMLC_NUM_SERVER")?.unwrap_or(1),
            (None, _) => 1,
        };
        let all = v.count("DMLC_NUM_ALL_WORKER")?;
        let party = v.count("DMLC_NUM_WORKER")?;
        let local_role = matches!(role, Role::Worker | Role::LocalServer | Role::DcCoordinator);
        let mut d = v.count("DMLC_NUM_GLOBAL_WORKER")?;
        if d.is_none() && role == Role::Worker {
            if let (Some(w), Some(n)) = (all, party) {
                if w % n != 0 {
                    return Err(env_err(
                        "DMLC_NUM_ALL_WORKER",
                        format!("{w} is not a multiple of DMLC_NUM_WORKER={n}: unequal data centers need a topology file"),
                    ));
                }
                d = Some(w / n);
            }
        }
        let n_d = match (all, d) {
            (Some(w), Some(dd)) => {
                if w % dd != 0 {
                    return Err(env_err(
                        "DMLC_NUM_ALL_WORKER",
                        format!("{w} is not a multiple of DMLC_NUM_GLOBAL_WORKER={dd}: unequal data centers need a topology file"),
                    ));
                }
                let n = w / dd;
                if let (true, Some(p)) = (matches!(role, Role::Worker | Role::LocalServer), party) {
                    if p != n {
                        return Err(env_err(
                            "DMLC_NUM_WORKER",
                            format!("{p}, but DMLC_NUM_ALL_WORKER / DMLC_NUM_GLOBAL_WORKER = {n}: unequal data centers need a topology file"),
                        ));
                    }
                }
                Some(n)
            }
            _ if local_role => party,
            _ => None,
        };
        if matches!(role, Role::Coordinator | Role::GlobalServer) {
            if d.is_none() {
                return Err(env_err(
                    "DMLC_NUM_GLOBAL_WORKER",
                    format!("required for the {role}"),
                ));
            }
            if n_d.is_none() {
                return Err(env_err(
                    "DMLC_NUM_ALL_WORKER",
                    format!("required for the {role} (geomx registers every worker)"),
                ));
            }
        }
        let (d, n_d) = (d.unwrap_or(1), n_d.unwrap_or(1));

        cfg.cluster.global_servers = s;
        // `d` is bounded by `count`: the list is always built.
        cfg.cluster.data_centers = DataCenterConfig::numbered(d, n_d).unwrap_or_default();
        if v.flag("DMLC_ENABLE_CENTRAL_WORKER")? {
            cfg.cluster.central_dc = "dc0".into();
        }
        cfg.cluster.coordinator = v.addr("DMLC_PS_GLOBAL_ROOT_URI", "DMLC_PS_GLOBAL_ROOT_PORT")?;
        if let Some(host) = v.get("DMLC_NODE_HOST") {
            cfg.cluster.host = host.to_string();
        }
        cfg.log.level = match v.num::<u8>("PS_VERBOSE")? {
            None | Some(0) => LogLevel::Info,
            Some(1) => LogLevel::Debug,
            Some(_) => LogLevel::Trace,
        };
        if let Some(b) = v.num::<usize>("MXNET_KVSTORE_BIGARRAY_BOUND")? {
            cfg.placement.split_bound = b;
            cfg.placement.min_range = cfg.placement.min_range.min(b.max(1));
        }
        let spec = RoleSpec {
            role,
            dc: v.num("GEOMX_DC")?,
            rank: v.num("GEOMX_RANK")?,
            dc_coordinator: v.addr("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT")?,
            node_host: v.get("DMLC_NODE_HOST").map(str::to_string),
            port: v.num("PORT")?,
            interface: v.get("DMLC_INTERFACE").map(str::to_string),
        };
        if let Some(dc) = spec.dc {
            if dc as usize >= d {
                return Err(env_err(
                    "GEOMX_DC",
                    format!("{dc} is not below the {d} data centers"),
                ));
            }
        }
        cfg.validate()
            .map_err(|e| env_err("DMLC_*", format!("resulting configuration is invalid: {e}")))?;
        Ok((cfg, spec))
    }
}
