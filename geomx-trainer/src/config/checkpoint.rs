//! `[checkpoint]`: where and how often every role saves its state, how many rounds are kept, and
//! where the final model is exported.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, SyncAlgorithm, TransportKind};

/// Rounds between checkpoints when `checkpoint.dir` is set and `every_rounds` is not.
pub const DEFAULT_EVERY_ROUNDS: u64 = 100;

/// Complete checkpoint rounds kept by default (the newest and one to fall back to).
pub const DEFAULT_KEEP: usize = 2;

/// `[checkpoint]`: periodic state files of every role (docs/architecture.md, "Checkpoints").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory of the checkpoint rounds (`DIR/round-<r>/…`); absent: no checkpoints.
    pub dir: Option<PathBuf>,
    /// Every role writes its state after every this many rounds (≥ 1).
    pub every_rounds: u64,
    /// Checkpoint rounds kept (≥ 1); older rounds are deleted after a newer one is written.
    pub keep: usize,
    /// Path of the final model as safetensors (like `--save PATH`); absent: not exported.
    pub export: Option<PathBuf>,
    /// Write checkpoints beside the rounds (default): no round waits for a checkpoint's fsync,
    /// and a global server's restart may continue from the checkpoint before its newest round,
    /// so each local server keeps two intervals of pushes instead of one. `false`: every role
    /// answers or continues a checkpoint round only once its file is on disk.
    pub background: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            dir: None,
            every_rounds: DEFAULT_EVERY_ROUNDS,
            keep: DEFAULT_KEEP,
            export: None,
            background: true,
        }
    }
}

impl Config {
    /// `[checkpoint]`: positive cadence and retention, non-empty paths, and a job whose whole
    /// state the roles save (see [`Config::checkpoint_support`]).
    pub(crate) fn validate_checkpoint(&self) -> Result<(), ConfigError> {
        let c = &self.checkpoint;
        if c.every_rounds == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.every_rounds",
                "must be >= 1",
            ));
        }
        if c.keep == 0 {
            return Err(ConfigError::invalid("checkpoint.keep", "must be >= 1"));
        }
        for (field, path) in [("checkpoint.dir", &c.dir), ("checkpoint.export", &c.export)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::invalid(field, "must not be empty"));
            }
        }
        if c.dir.is_some() {
            self.checkpoint_support("checkpoint.dir")?;
            if self.sync.algorithm == SyncAlgorithm::Hfa && self.sync.hfa.isolated {
                return Err(ConfigError::invalid(
                    "checkpoint.dir",
                    "HFA saves its state at global averagings, which sync.hfa.isolated = true \
                     never reaches",
                ));
            }
            let period = self.sync.hfa.k1.saturating_mul(self.sync.hfa.k2).max(1);
            if self.sync.algorithm == SyncAlgorithm::Hfa && c.every_rounds % period != 0 {
                return Err(ConfigError::invalid(
                    "checkpoint.every_rounds",
                    format!(
                        "{} is not a multiple of the HFA period k1 * k2 = {period}: HFA saves \
                         its state at global averagings",
                        c.every_rounds
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the roles save the whole state of this job: FSA or HFA with any tier codec, over
    /// TCP. ESync (the coordinator's state), MixedSync (per-DC copies) and DGT (late blocks)
    /// keep state that checkpoints do not hold yet; such a job is refused, naming `field`
    /// (`checkpoint.dir`, or `--resume`).
    pub fn checkpoint_support(&self, field: &str) -> Result<(), ConfigError> {
        let why = if !matches!(self.sync.algorithm, SyncAlgorithm::Fsa | SyncAlgorithm::Hfa) {
            Some("sync.algorithm must be \"fsa\" or \"hfa\"")
        } else if self.transport.inter == TransportKind::Dgt {
            Some("transport.inter must be \"tcp\"")
        } else {
            None
        };
        match why {
            Some(why) => Err(ConfigError::invalid(
                field,
                format!("checkpoints and resume support FSA and HFA over TCP so far: {why}"),
            )),
            None => Ok(()),
        }
    }
}
