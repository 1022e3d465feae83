//! Checkpoints: every process saves its own state every `checkpoint.every_rounds` rounds and a
//! resumed job loads it back (docs/architecture.md, "Checkpoints").
//!
//! [`format`](mod@format) is the versioned, self-checking state file of one process; [`manifest`] the round
//! directories, their manifests, atomic writes and the choice of the newest complete round;
//! [`Saver`] and [`load`] are what a role calls; [`RoundParts`] assembles a state that several
//! threads of one process contribute to (ranges, keys) before it is written; [`SaveQueue`]
//! writes a process's files on a thread of its own while the rounds go on.

pub mod format;
pub mod manifest;
pub mod queue;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use format::{Entry, FormatError, StateFile};
pub use queue::{SaveQueue, When};

/// Largest state file read (a safeguard against a wrong file; far above any model here).
pub const MAX_STATE_BYTES: u64 = 16 << 30;

/// Why a checkpoint cannot be written or used. Every variant names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("checkpoint {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file the round needs is not there.
    #[error("checkpoint {}: missing", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// A file is torn, altered or malformed.
    #[error("checkpoint {}: corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint belongs to a job of another configuration.
    #[error(
        "checkpoint {}: written by a job of configuration hash {found}, this job's is {expected}",
        path.display()
    )]
    ConfigMismatch {
        /// The manifest entry or state file.
        path: PathBuf,
        /// Its configuration hash.
        found: String,
        /// This job's.
        expected: String,
    },
    /// No round of the directory is complete and intact.
    #[error("no complete checkpoint round in {}: {why}", dir.display())]
    NoCompleteRound {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Why each round was refused.
        why: String,
    },
    /// The newest complete round is the job's last: there is nothing left to run.
    #[error("checkpoint {}: round {round} is the job's last round, nothing to resume", dir.display())]
    Finished {
        /// The round directory.
        dir: PathBuf,
        /// Its round.
        round: u64,
    },
}

/// The file-name id of a process: `<role>-<dc>-<rank>`, the role with dashes
/// (`global-server-2-0`, `local-server-1-0`, `worker-0-1`).
pub fn process_id(role: &str, dc: u32, rank: u32) -> String {
    format!("{}-{dc}-{rank}", role.replace('_', "-"))
}

/// Where and how often a process saves its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Directory of the round directories.
    pub dir: PathBuf,
    /// Rounds between checkpoints (≥ 1).
    pub every_rounds: u64,
    /// Rounds kept (≥ 1).
    pub keep: usize,
    /// Checkpoints are written beside the rounds (`checkpoint.background`): a global server
    /// answers a due round before its file is on disk, once the previous checkpoint's is.
    pub background: bool,
}

impl Policy {
    /// Whether the state after `round` completed rounds is saved.
    pub fn due(&self, round: u64) -> bool {
        round > 0 && self.every_rounds > 0 && round % self.every_rounds == 0
    }
}

/// Saves one process's state under a [`Policy`].
#[derive(Debug, Clone)]
pub struct Saver {
    policy: Policy,
    id: String,
    config_hash: u64,
}

impl Saver {
    /// A saver for process `id` of the job with `config_hash`.
    pub fn new(policy: Policy, id: String, config_hash: u64) -> Self {
        Self {
            policy,
            id,
            config_hash,
        }
    }

    /// Whether the state after `round` completed rounds is saved.
    pub fn due(&self, round: u64) -> bool {
        self.policy.due(round)
    }

    /// Whether checkpoints are written beside the rounds ([`Policy::background`]).
    pub fn background(&self) -> bool {
        self.policy.background
    }

    /// An empty state of this job for `round`.
    pub fn state(&self, round: u64) -> StateFile {
        StateFile::new(self.config_hash, round)
    }

    /// Writes `state` (file, then manifest entry) and deletes this process's rounds beyond
    /// `keep`.
    pub fn save(&self, state: &StateFile) -> Result<(), CheckpointError> {
        let p = &self.policy;
        let started = std::time::Instant::now();
        manifest::write_round_file(
            &p.dir,
            state.round,
            &self.id,
            self.config_hash,
            &state.encode(),
        )?;
        let took = started.elapsed();
        // Writes run beside the rounds ([`SaveQueue`]), but a disk that takes seconds per
        // fsync still holds back whatever waits for the write (the next save, the final round).
        if took >= SLOW_SAVE {
            tracing::warn!(round = state.round, id = %self.id, ?took, "checkpoint written slowly");
        } else {
            tracing::debug!(round = state.round, id = %self.id, "checkpoint written");
        }
        manifest::prune(&p.dir, state.round, p.every_rounds, p.keep, &self.id);
        Ok(())
    }
}

/// A checkpoint write that takes this long is reported (a warning naming the round and time).
const SLOW_SAVE: std::time::Duration = std::time::Duration::from_secs(1);

/// Loads process `id`'s state from the newest round of `dir` that is complete for every process
/// of `ids` and intact, for a job of `config_hash` that runs `rounds` rounds.
pub fn load(
    dir: &Path,
    ids: &[String],
    id: &str,
    config_hash: u64,
    rounds: u64,
) -> Result<StateFile, CheckpointError> {
    let round = manifest::newest_complete(dir, ids, config_hash)?;
    if round >= rounds {
        let path = manifest::state_path(&manifest::round_dir(dir, round), id);
        return Err(CheckpointError::Finished { dir: path, round });
    }
    let state = load_round(dir, round, id, config_hash)?;
    tracing::info!(round, id, dir = %dir.display(), "resuming from checkpoint");
    Ok(state)
}

/// Loads process `id`'s own newest intact state in `dir` (a restarted process of a running job,
/// which needs no other process's file); `None` when it has none yet.
pub fn load_newest_own(
    dir: &Path,
    id: &str,
    config_hash: u64,
) -> Result<Option<StateFile>, CheckpointError> {
    let ids = [id.to_string()];
    let round = match manifest::newest_complete(dir, &ids, config_hash) {
        Ok(r) => r,
        Err(CheckpointError::NoCompleteRound { why, .. }) => {
            tracing::info!(id, dir = %dir.display(), %why, "no checkpoint of this process yet");
            return Ok(None);
        }
        Err(CheckpointError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let state = load_round(dir, round, id, config_hash)?;
    tracing::info!(round, id, dir = %dir.display(), "restarting from this process's checkpoint");
    Ok(Some(state))
}

/// Loads and checks process `id`'s state file of `round` in `dir`.
fn load_round(
    dir: &Path,
    round: u64,
    id: &str,
    config_hash: u64,
) -> Result<StateFile, CheckpointError> {
    let path = manifest::state_path(&manifest::round_dir(dir, round), id);
    let bytes = manifest::read_checked(dir, round, id, config_hash)?;
    let state = StateFile::decode(&bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.config_hash != config_hash {
        return Err(CheckpointError::ConfigMismatch {
            path,
            found: format!("{:016x}", state.config_hash),
            expected: format!("{config_hash:016x}"),
        });
    }
    if state.round != round {
        return Err(CheckpointError::Corrupt {
            path,
            reason: format!(
                "holds round {}, its directory is round {round}",
                state.round
            ),
        });
    }
    Ok(state)
}

/// Assembles one state per round from `parts` contributions (a global server's ranges, a local
/// server's keys), which may arrive from different threads and interleave across two rounds.
#[derive(Debug)]
pub struct RoundParts {
    parts: usize,
    config_hash: u64,
    pending: BTreeMap<u64, (usize, StateFile)>,
}

impl RoundParts {
    /// Expects `parts` contributions per round, for the job with `config_hash`.
    pub fn new(parts: usize, config_hash: u64) -> Self {
        Self {
            parts,
            config_hash,
            pending: BTreeMap::new(),
        }
    }

    /// Adds one contribution to `round` (`fill` writes its entries); returns the round's state
    /// once every part is in.
    pub fn add(&mut self, round: u64, fill: impl FnOnce(&mut StateFile)) -> Option<StateFile> {
        let slot = self
            .pending
            .entry(round)
            .or_insert_with(|| (0, StateFile::new(self.config_hash, round)));
        fill(&mut slot.1);
        slot.0 += 1;
        if slot.0 < self.parts {
            return None;
        }
        self.pending.remove(&round).map(|(_, s)| s)
    }
}

/// Error of a role's state that does not fit the job (a missing entry, a wrong length),
/// naming the file.
pub fn misfit(
    policy_dir: &Path,
    round: u64,
    id: &str,
    e: impl std::fmt::Display,
) -> CheckpointError {
    CheckpointError::Corrupt {
        path: manifest::state_path(&manifest::round_dir(policy_dir, round), id),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests;
