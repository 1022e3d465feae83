//! `[checkpoint]`: where and how often every role saves its state, how many rounds are kept, and
//! where the final model is exported.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Codec, Config, ConfigError, SyncAlgorithm, TransportKind};

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
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            dir: None,
            every_rounds: DEFAULT_EVERY_ROUNDS,
            keep: DEFAULT_KEEP,
            export: None,
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
        }
        Ok(())
    }

    /// Whether the roles save the whole state of this job: FSA with uncompressed f32 tiers over
    /// TCP. HFA, ESync, MixedSync, the lossy codecs (error feedback, residuals) and DGT (late
    /// blocks) keep state that checkpoints do not hold yet; such a job is refused, naming `field`
    /// (`checkpoint.dir`, or `--resume`).
    pub fn checkpoint_support(&self, field: &str) -> Result<(), ConfigError> {
        let why = if self.sync.algorithm != SyncAlgorithm::Fsa {
            Some("sync.algorithm must be \"fsa\"")
        } else if !matches!(self.compression.intra, Codec::None)
            || !matches!(self.compression.inter, Codec::None)
        {
            Some("compression.intra and compression.inter must be codec \"none\"")
        } else if self.transport.inter == TransportKind::Dgt {
            Some("transport.inter must be \"tcp\"")
        } else {
            None
        };
        match why {
            Some(why) => Err(ConfigError::invalid(
                field,
                format!("checkpoints and resume support FSA with uncompressed tiers over TCP so far: {why}"),
            )),
            None => Ok(()),
        }
    }
}
