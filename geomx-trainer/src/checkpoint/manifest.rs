//! Round directories, their manifests, atomic writes and the choice of the round to resume.
//!
//! `DIR/round-<r>/` holds one state file per process, `<id>.ckpt`, and the round's manifest, one
//! entry per process, `<id>.manifest.json` (format, configuration hash, round, file, size and
//! FNV-1a content hash). A process writes its state file first and its manifest entry second,
//! each atomically (temporary file, fsync, rename, fsync of the directory), so an entry always
//! describes a whole file, and processes never write the same file. A round is complete when
//! every process of the job has an entry that matches the job and a file that matches its entry.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::FORMAT_VERSION;
use super::CheckpointError;
use crate::hash::Fnv1a;

/// Largest manifest entry read (they are a few hundred bytes).
const MAX_ENTRY_BYTES: u64 = 64 * 1024;

/// One process's entry in a round's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// State file format ([`FORMAT_VERSION`]).
    pub format: u32,
    /// The job's configuration hash, as 16 hex digits.
    pub config_hash: String,
    /// Rounds completed.
    pub round: u64,
    /// The state file's name in the round directory.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// FNV-1a 64 of its bytes, as 16 hex digits.
    pub fnv1a: String,
}

/// `DIR/round-<r>`.
pub fn round_dir(dir: &Path, round: u64) -> PathBuf {
    dir.join(format!("round-{round}"))
}

/// The state file of process `id` in a round directory.
pub fn state_path(round_dir: &Path, id: &str) -> PathBuf {
    round_dir.join(format!("{id}.ckpt"))
}

/// The manifest entry of process `id` in a round directory.
pub fn entry_path(round_dir: &Path, id: &str) -> PathBuf {
    round_dir.join(format!("{id}.manifest.json"))
}

/// FNV-1a 64 of `bytes` as 16 hex digits.
pub fn content_hash(bytes: &[u8]) -> String {
    let mut h = Fnv1a::new();
    h.write(bytes);
    format!("{:016x}", h.finish())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename over `path`,
/// fsync of the directory. A crash leaves the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Reads at most `limit` bytes of `path`; a longer file is refused.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, CheckpointError> {
    let f = std::fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::Missing {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let mut out = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(io_err(path))?;
    if out.len() as u64 > limit {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("longer than {limit} bytes"),
        });
    }
    Ok(out)
}

/// Writes process `id`'s state `bytes` of `round` and then its manifest entry.
pub fn write_round_file(
    dir: &Path,
    round: u64,
    id: &str,
    config_hash: u64,
    bytes: &[u8],
) -> Result<(), CheckpointError> {
    let rd = round_dir(dir, round);
    std::fs::create_dir_all(&rd).map_err(io_err(&rd))?;
    sync_dir(dir)?;
    let file = state_path(&rd, id);
    write_atomic(&file, bytes)?;
    let entry = ManifestEntry {
        format: FORMAT_VERSION,
        config_hash: format!("{config_hash:016x}"),
        round,
        file: format!("{id}.ckpt"),
        bytes: bytes.len() as u64,
        fnv1a: content_hash(bytes),
    };
    let json = serde_json::to_vec_pretty(&entry).map_err(|e| CheckpointError::Corrupt {
        path: entry_path(&rd, id),
        reason: e.to_string(),
    })?;
    write_atomic(&entry_path(&rd, id), &json)
}

/// Reads and checks process `id`'s state file of `round` against its manifest entry and the job:
/// returns the file's bytes. Every refusal names the file.
pub fn read_checked(
    dir: &Path,
    round: u64,
    id: &str,
    config_hash: u64,
) -> Result<Vec<u8>, CheckpointError> {
    let rd = round_dir(dir, round);
    let ep = entry_path(&rd, id);
    let corrupt = |path: &Path, reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let raw = read_bounded(&ep, MAX_ENTRY_BYTES)?;
    let entry: ManifestEntry = serde_json::from_slice(&raw)
        .map_err(|e| corrupt(&ep, format!("bad manifest entry: {e}")))?;
    if entry.format != FORMAT_VERSION {
        return Err(corrupt(
            &ep,
            format!("format {}, this build reads {FORMAT_VERSION}", entry.format),
        ));
    }
    let want = format!("{config_hash:016x}");
    if entry.config_hash != want {
        return Err(CheckpointError::ConfigMismatch {
            path: ep,
            found: entry.config_hash,
            expected: want,
        });
    }
    if entry.round != round || entry.file != format!("{id}.ckpt") {
        return Err(corrupt(
            &ep,
            format!(
                "describes {} of round {}, expected {id}.ckpt of round {round}",
                entry.file, entry.round
            ),
        ));
    }
    let file = state_path(&rd, id);
    if entry.bytes > super::MAX_STATE_BYTES {
        return Err(corrupt(
            &ep,
            format!(
                "a state file of {} bytes, more than the {} accepted",
                entry.bytes,
                super::MAX_STATE_BYTES
            ),
        ));
    }
    let bytes = read_bounded(&file, entry.bytes)?;
    if bytes.len() as u64 != entry.bytes {
        return Err(corrupt(
            &file,
            format!("{} bytes, the manifest says {}", bytes.len(), entry.bytes),
        ));
    }
    let found = content_hash(&bytes);
    if found != entry.fnv1a {
        return Err(corrupt(
            &file,
            format!("content hash {found}, the manifest says {}", entry.fnv1a),
        ));
    }
    Ok(bytes)
}

/// The rounds that have a directory in `dir`, newest first.
pub fn rounds(dir: &Path) -> Result<Vec<u64>, CheckpointError> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CheckpointError::Missing {
                path: dir.to_path_buf(),
            },
            _ => CheckpointError::Io {
                path: dir.to_path_buf(),
                source,
            },
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|r| r.parse().ok())
        })
        .collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    Ok(out)
}

/// The newest round of `dir` in which every process of `ids` has a state file that matches its
/// manifest entry and the job. Incomplete or corrupt rounds are skipped with a warning naming the
/// file; none complete is an error listing why each round was refused.
pub fn newest_complete(
    dir: &Path,
    ids: &[String],
    config_hash: u64,
) -> Result<u64, CheckpointError> {
    let mut refused = Vec::new();
    for round in rounds(dir)? {
        match ids
            .iter()
            .try_for_each(|id| read_checked(dir, round, id, config_hash).map(drop))
        {
            Ok(()) => return Ok(round),
            Err(e) => {
                tracing::warn!(round, error = %e, "checkpoint round refused, trying an older one");
                refused.push(format!("round {round}: {e}"));
            }
        }
    }
    Err(CheckpointError::NoCompleteRound {
        dir: dir.to_path_buf(),
        why: if refused.is_empty() {
            "no round-<r> directory".into()
        } else {
            refused.join("; ")
        },
    })
}

/// Deletes process `id`'s files of rounds older than the newest `keep` rounds up to `round`
/// (`every` apart), and each such round directory once it is empty.
pub fn prune(dir: &Path, round: u64, every: u64, keep: usize, id: &str) {
    let span = every.saturating_mul(keep as u64);
    let Ok(all) = rounds(dir) else {
        return;
    };
    for old in all.into_iter().filter(|&q| q.saturating_add(span) <= round) {
        let rd = round_dir(dir, old);
        for p in [entry_path(&rd, id), state_path(&rd, id)] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "cannot delete an old checkpoint");
                }
            }
        }
        // Temporary files of writes that a crash interrupted (nobody writes an old round).
        if let Ok(entries) = std::fs::read_dir(&rd) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Other processes may still have files here; the last one out removes the directory.
        let _ = std::fs::remove_dir(&rd);
    }
}
