//! `[security]`: how the job's links are protected (docs/security.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

/// `security.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecurityMode {
    /// Mutual TLS 1.3 on every TCP link and sealed DGT datagrams, with the job's certificates.
    #[default]
    Mtls,
    /// Plaintext, identities self-declared: tests on one machine, or plaintext peers. Must be
    /// asked for by name; a process that binds a non-loopback address with it logs a warning.
    Off,
}

/// `[security]`: authentication and encryption of every link.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// `"mtls"` (default) or `"off"`.
    pub mode: SecurityMode,
    /// Directory of the job's credentials made by `geomx pki` (`ca.pem` and
    /// `<role>-dc<d>-rank<r>.pem` / `.key` per process): for jobs whose processes are not all
    /// started by `geomx launch`. Absent: `geomx launch` makes an ephemeral CA in memory and hands
    /// each child its key over a pipe.
    pub dir: Option<PathBuf>,
}

impl Config {
    /// `[security]`: a non-empty credentials directory.
    pub(crate) fn validate_security(&self) -> Result<(), ConfigError> {
        if self
            .security
            .dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::invalid("security.dir", "must not be empty"));
        }
        Ok(())
    }
}
