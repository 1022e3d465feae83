//! Process roles of a HiPS run.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What one `geomx` process does (hips.md, Roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The single coordinator (registration, membership, barriers, heartbeats, abort).
    Coordinator,
    /// Registration and barrier of one data center; only when started from `DMLC_*` variables
    /// (the original's party scheduler).
    DcCoordinator,
    /// Owns a share of the parameters in the central DC and runs the optimizer.
    GlobalServer,
    /// Server to its DC's workers and worker to the global tier.
    LocalServer,
    /// Computes gradients on its data shard.
    Worker,
    /// The original's master worker: registers, then exits 0 (compatibility only).
    MasterWorker,
}

impl Role {
    /// The kebab-case name used on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::DcCoordinator => "dc-coordinator",
            Role::GlobalServer => "global-server",
            Role::LocalServer => "local-server",
            Role::Worker => "worker",
            Role::MasterWorker => "master-worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who this process is: role, data center and rank, plus what `DMLC_*` variables said about the
/// process itself.
///
/// `dc` is an index into `cluster.data_centers`; `rank` counts within the role (and within the DC
/// for local roles). Both are `None` when started from `DMLC_*` variables without `GEOMX_DC` /
/// `GEOMX_RANK`: the coordinator then assigns them at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSpec {
    /// The role.
    pub role: Role,
    /// Data center index, if known.
    pub dc: Option<u32>,
    /// Rank within the role (and DC), if known.
    pub rank: Option<u32>,
    /// Address `host:port` of this DC's coordinator (`DMLC_PS_ROOT_URI:PORT`), DMLC mode only.
    pub dc_coordinator: Option<String>,
    /// Host to advertise to peers (`DMLC_NODE_HOST`).
    pub node_host: Option<String>,
    /// Port to listen on (`PORT`); `None` or 0 means OS-assigned.
    pub port: Option<u16>,
    /// Network interface to bind (`DMLC_INTERFACE`).
    pub interface: Option<String>,
}

impl RoleSpec {
    /// A role with known DC and rank and nothing else (topology-file mode).
    pub fn new(role: Role, dc: u32, rank: u32) -> Self {
        Self {
            role,
            dc: Some(dc),
            rank: Some(rank),
            dc_coordinator: None,
            node_host: None,
            port: None,
            interface: None,
        }
    }
}
