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

/// Overrides `security.dir` (a `geomx pki` directory): how schedulers point tasks at their keys.
pub const SECURITY_DIR_ENV: &str = "GEOMX_SECURITY_DIR";
/// Overrides `security.mode` (`mtls` or `off`).
pub const SECURITY_MODE_ENV: &str = "GEOMX_SECURITY_MODE";

impl Config {
    /// Applies [`SECURITY_MODE_ENV`] and [`SECURITY_DIR_ENV`] from `get` (the environment).
    pub fn security_from_env(
        &mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(m) = get(SECURITY_MODE_ENV) {
            self.security.mode = match m.as_str() {
                "mtls" => SecurityMode::Mtls,
                "off" => SecurityMode::Off,
                other => {
                    return Err(ConfigError::invalid(
                        SECURITY_MODE_ENV,
                        format!("{other:?}: expected \"mtls\" or \"off\""),
                    ))
                }
            };
        }
        if let Some(d) = get(SECURITY_DIR_ENV).filter(|d| !d.is_empty()) {
            self.security.dir = Some(PathBuf::from(d));
        }
        Ok(())
    }

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
