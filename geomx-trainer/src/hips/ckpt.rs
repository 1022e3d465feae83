//! What the roles share about checkpoints: their saver, their resumed state, and the optimizer
//! state's entries in a state file.

use super::node::Identity;
use super::{JobSpec, RunError};
use crate::checkpoint::queue::ErrorHook;
use crate::checkpoint::{self, FormatError, SaveQueue, Saver, StateFile};
use crate::codec::RangeCompressor;
use crate::engine::OptimState;

/// Most tensors one optimizer state may hold (DC-ASGD: one backup per DC and two buffers).
const MAX_OPT_TENSORS: u64 = 4096;

/// The file-name id of a role.
pub(crate) fn id_of(me: &Identity) -> String {
    checkpoint::process_id(me.role, me.dc, me.rank)
}

/// The saver of role `me`, when the job checkpoints.
pub(crate) fn saver(job: &JobSpec, me: &Identity) -> Option<Saver> {
    job.checkpoint
        .clone()
        .map(|p| Saver::new(p, id_of(me), job.config_hash))
}

/// The saver of role `me` and the thread that writes its checkpoints beside the rounds
/// ([`SaveQueue`]), when the job checkpoints.
pub(crate) fn save_queue(
    job: &JobSpec,
    me: &Identity,
) -> Result<Option<(Saver, SaveQueue)>, RunError> {
    let Some(saver) = saver(job, me) else {
        return Ok(None);
    };
    let queue = writer(&saver, None)?;
    Ok(Some((saver, queue)))
}

/// Starts the thread that writes `saver`'s checkpoints (`geomx-ckpt-write`); `on_error` sees
/// each failed write.
pub(crate) fn writer(saver: &Saver, on_error: Option<ErrorHook>) -> Result<SaveQueue, RunError> {
    SaveQueue::start(saver.clone(), "geomx-ckpt-write", on_error).map_err(|e| {
        RunError::Io(
            "starting the checkpoint writer thread".into(),
            e.to_string(),
        )
    })
}

/// The state role `me` continues from, when the job resumes: the newest round complete for
/// every process of the plan.
pub(crate) fn resume(job: &JobSpec, me: &Identity) -> Result<Option<Resumed>, RunError> {
    let Some(dir) = &job.resume else {
        return Ok(None);
    };
    let ids: Vec<String> = job
        .plan
        .expected_processes()
        .into_iter()
        .map(|(role, dc, rank)| checkpoint::process_id(&role, dc, rank))
        .collect();
    let id = id_of(me);
    let state = checkpoint::load(dir, &ids, &id, job.config_hash, job.rounds)?;
    let resumed = Resumed {
        dir: dir.clone(),
        id,
        state,
    };
    // HFA continues only from a global averaging, where every copy holds the milestone.
    let period = job.rounds_per_global();
    if resumed.round() % period != 0 {
        let why = format!(
            "round {} is not at a global averaging (every {period} rounds)",
            resumed.round()
        );
        return Err(resumed.misfit(why));
    }
    Ok(Some(resumed))
}

/// The state a restarted process of a running job continues from: its own newest intact
/// checkpoint in `[checkpoint] dir`, or the state the job `resumed` from when that is newer (or
/// there is none yet; `None` then means θ_0). A process does not wait for the others' files:
/// they are still running.
pub(crate) fn restart_state(
    job: &JobSpec,
    me: &Identity,
    resumed: Option<Resumed>,
) -> Result<Option<Resumed>, RunError> {
    let Some(policy) = &job.checkpoint else {
        return Ok(resumed);
    };
    let id = id_of(me);
    let own = checkpoint::load_newest_own(&policy.dir, &id, job.config_hash)?;
    Ok(match (own, resumed) {
        (Some(state), r) if r.as_ref().is_none_or(|r| r.round() < state.round) => Some(Resumed {
            dir: policy.dir.clone(),
            id,
            state,
        }),
        (_, r) => r,
    })
}

/// A role's loaded state, with what names its file in errors.
pub(crate) struct Resumed {
    dir: std::path::PathBuf,
    id: String,
    /// The decoded state file.
    pub state: StateFile,
}

impl Resumed {
    /// Rounds completed at the checkpoint.
    pub fn round(&self) -> u64 {
        self.state.round
    }

    /// An entry that does not fit the job, as an error naming the file.
    pub fn misfit(&self, e: impl std::fmt::Display) -> RunError {
        RunError::Checkpoint(checkpoint::misfit(&self.dir, self.round(), &self.id, e))
    }

    /// Takes tensor `name` of `len` values.
    pub fn f32(&mut self, name: &str, len: usize) -> Result<Vec<f32>, RunError> {
        let r = self.state.take_f32(name, Some(len));
        r.map_err(|e| self.misfit(e))
    }

    /// Takes tensor `name` of any length (the consumer checks it).
    pub fn f32_any(&mut self, name: &str) -> Result<Vec<f32>, RunError> {
        let r = self.state.take_f32(name, None);
        r.map_err(|e| self.misfit(e))
    }

    /// Takes `len` counters `name`.
    pub fn u64(&mut self, name: &str, len: usize) -> Result<Vec<u64>, RunError> {
        let r = self.state.take_u64(name, len);
        r.map_err(|e| self.misfit(e))
    }

    /// Takes the optimizer state saved under `prefix` ([`put_optim`]).
    pub fn optim(&mut self, prefix: &str) -> Result<OptimState, RunError> {
        let r = take_optim(&mut self.state, prefix);
        r.map_err(|e| self.misfit(e))
    }

    /// Restores into `c` the Bi-Sparse state saved under `prefix` ([`put_compressor`]).
    pub fn compressor(&mut self, prefix: &str, c: &mut RangeCompressor) -> Result<(), RunError> {
        let state = (0..3)
            .map(|j| self.f32_any(&format!("{prefix}.{j}")))
            .collect::<Result<Vec<_>, _>>()?;
        c.import_state(state).map_err(|e| self.misfit(e))
    }
}

/// Saves a Bi-Sparse compressor's state under `prefix`: `<prefix>.{0,1,2}`, its velocity u,
/// residual v and 16-bit carry (each empty where unused).
pub(crate) fn put_compressor(state: &mut StateFile, prefix: &str, c: &RangeCompressor) {
    for (j, t) in c.export_state().into_iter().enumerate() {
        state.put_f32(format!("{prefix}.{j}"), t);
    }
}

/// Saves an optimizer state under `prefix`: `<prefix>.meta` = [tensors, kernel step, steps],
/// `<prefix>.<i>` the tensors.
pub(crate) fn put_optim(state: &mut StateFile, prefix: &str, o: &OptimState) {
    state.put_u64(
        format!("{prefix}.meta"),
        vec![o.tensors.len() as u64, o.kernel_step, o.steps],
    );
    for (i, t) in o.tensors.iter().enumerate() {
        state.put_f32(format!("{prefix}.{i}"), t.clone());
    }
}

fn take_optim(state: &mut StateFile, prefix: &str) -> Result<OptimState, FormatError> {
    let meta = state.take_u64(&format!("{prefix}.meta"), 3)?;
    if meta[0] > MAX_OPT_TENSORS {
        return Err(FormatError::Entry(format!(
            "{prefix}: {} optimizer tensors",
            meta[0]
        )));
    }
    let tensors = (0..meta[0])
        .map(|i| state.take_f32(&format!("{prefix}.{i}"), None))
        .collect::<Result<_, _>>()?;
    Ok(OptimState {
        tensors,
        kernel_step: meta[1],
        steps: meta[2],
    })
}
