//! Deployment on real schedulers (docs/deployment.md).
//!
//! - [`from_env`]: `geomx run --from-env` — which launcher started this process (Slurm,
//!   Kubernetes Indexed Job / JobSet / LeaderWorkerSet, torchrun, ps-lite's `DMLC_*`) and which
//!   task of the job it is, by the [`roles`] table; pure functions of the environment.
//! - [`nodelist`]: Slurm's compressed host lists.
//! - [`slurm`], [`k8s`]: `geomx deploy slurm|k8s` — the sbatch script, the manifests and the
//!   container recipe, as text.
//! - [`yaml`]: the YAML writer of the manifests.
//! - [`collect`]: the job report from the processes' output lines (`geomx deploy report`).
//! - [`run`]: the I/O around [`from_env`]: name resolution, the address to bind, the GPU.
//! - [`cli`]: the `geomx deploy` subcommands.

pub mod cli;
pub mod collect;
pub mod from_env;
pub mod k8s;
pub mod nodelist;
pub mod roles;
pub mod run;
pub mod slurm;
pub mod yaml;

use crate::config::ConfigError;

/// The coordinator's port when neither the job file, `GEOMX_COORDINATOR(_PORT)` nor the launcher
/// says otherwise (Kubernetes, LeaderWorkerSet).
pub const DEFAULT_COORDINATOR_PORT: u16 = 9092;

/// Errors of deployment: a wrong environment, an unusable job file, files that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A launcher variable is missing, malformed or inconsistent with the job file.
    #[error("{var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The job file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file or socket operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Something else does not fit (manifests, logs, options); the message says what.
    #[error("{0}")]
    Invalid(String),
}

impl DeployError {
    /// An [`DeployError::Env`] error for `var`.
    pub fn env(var: &str, message: impl Into<String>) -> Self {
        Self::Env {
            var: var.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io(what.into(), e)
    }
}
