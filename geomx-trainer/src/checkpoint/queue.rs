//! Checkpoint writes beside the training: a process hands its state files to a thread of its
//! own, which writes them (file, fsync, rename, manifest) in the order they were handed, while
//! the rounds go on.
//!
//! A [`SaveQueue`] holds at most what its owner hands it; the owners keep that to one file
//! waiting and one being written (a worker waits for its previous write before it hands the
//! next, [`SaveQueue::wait`]; a global server's rounds cannot outrun the replies that a write
//! holds back, [`When::BeforeWrite`]). What the owner must know about the disk it learns from
//! callbacks that run on the writer thread at a fixed point of the sequence:
//! [`When::BeforeWrite`] once every earlier file is on disk, [`When::AfterWrite`] once this one
//! is. A failed write is kept for [`SaveQueue::wait`] and reported to the queue's error hook;
//! the files after it are still written.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use super::{CheckpointError, Saver, StateFile};

/// Work that must wait for the disk, run on the writer thread.
pub type Callback = Box<dyn FnOnce() + Send>;

/// Called on the writer thread with each failed write.
pub type ErrorHook = Box<dyn Fn(&CheckpointError) + Send>;

/// Where a callback runs in the sequence of writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Once every file handed before this one is written, before this one's write starts.
    BeforeWrite,
    /// Once this file is written (or its write failed).
    AfterWrite,
}

struct Job {
    file: StateFile,
    then: Option<(When, Callback)>,
}

#[derive(Default)]
struct Progress {
    handed: u64,
    done: u64,
    /// The first failed write not yet returned by [`SaveQueue::wait`].
    failed: Option<CheckpointError>,
}

#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Shared {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One process's checkpoint writer thread and what it has written.
pub struct SaveQueue {
    tx: Option<Sender<Job>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The saver's [`Saver::background`]: [`SaveQueue::save`] returns before the write.
    background: bool,
}

impl SaveQueue {
    /// Starts the writer thread of `saver` (named `name`); `on_error` sees each failed write.
    pub fn start(saver: Saver, name: &str, on_error: Option<ErrorHook>) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let shared = Arc::new(Shared::default());
        let background = saver.background();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for job in rx {
                    let (before, after) = match job.then {
                        Some((When::BeforeWrite, f)) => (Some(f), None),
                        Some((When::AfterWrite, f)) => (None, Some(f)),
                        None => (None, None),
                    };
                    if let Some(f) = before {
                        f();
                    }
                    let res = saver.save(&job.file);
                    if let (Err(e), Some(hook)) = (&res, &on_error) {
                        hook(e);
                    }
                    {
                        let mut p = s.progress();
                        p.done += 1;
                        if let Err(e) = res {
                            p.failed.get_or_insert(e);
                        }
                    }
                    s.changed.notify_all();
                    if let Some(f) = after {
                        f();
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            shared,
            thread: Some(thread),
            background,
        })
    }

    /// Saves `file` as a process that checkpoints every few rounds does: once every file handed
    /// before is written (one copy in flight), and in the background without waiting for this
    /// one (otherwise until it is written). The first failed write since the last check.
    pub fn save(&self, file: StateFile) -> Result<(), CheckpointError> {
        self.wait()?;
        self.hand(file);
        if self.background {
            Ok(())
        } else {
            self.wait()
        }
    }

    /// Hands `file` to the writer; never blocks.
    pub fn hand(&self, file: StateFile) {
        self.send(Job { file, then: None });
    }

    /// Hands `file` to the writer with `f` to run on the writer thread at `when`.
    pub fn hand_then(&self, file: StateFile, when: When, f: Callback) {
        self.send(Job {
            file,
            then: Some((when, f)),
        });
    }

    fn send(&self, job: Job) {
        self.shared.progress().handed += 1;
        let Some(tx) = &self.tx else { return };
        if let Err(crossbeam_channel::SendError(job)) = tx.send(job) {
            // The writer thread is gone (it panicked): nothing will be written.
            let mut p = self.shared.progress();
            p.done += 1;
            p.failed.get_or_insert(CheckpointError::Io {
                path: std::path::PathBuf::from(format!("round {}", job.file.round)),
                source: std::io::Error::other("the checkpoint writer thread ended"),
            });
        }
    }

    /// Waits until every file handed so far is written; the first write that failed since the
    /// last call, if any.
    pub fn wait(&self) -> Result<(), CheckpointError> {
        let mut p = self.shared.progress();
        while p.done < p.handed {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                break;
            }
            p = self
                .shared
                .changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
        match p.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for every write, then ends the writer thread.
    pub fn finish(mut self) -> Result<(), CheckpointError> {
        let res = self.wait();
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        res
    }
}

impl Drop for SaveQueue {
    /// Lets the writer finish what it holds and end; does not wait for it (a process that drops
    /// its queue without [`SaveQueue::finish`] is failing, and a torn write is never read:
    /// files are renamed into place).
    fn drop(&mut self) {
        self.tx = None;
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::manifest::{round_dir, state_path};
    use super::super::Policy;
    use super::*;

    const HASH: u64 = 0x0bad_cafe;

    fn saver(dir: &Path) -> Saver {
        saver_of(dir, true)
    }

    fn saver_of(dir: &Path, background: bool) -> Saver {
        let policy = Policy {
            dir: dir.to_path_buf(),
            every_rounds: 10,
            keep: 10,
            background,
        };
        Saver::new(policy, "worker-0-0".into(), HASH)
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("geomx-queue-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn written(dir: &Path, round: u64) -> bool {
        state_path(&round_dir(dir, round), "worker-0-0").exists()
    }

    fn file(s: &Saver, round: u64) -> StateFile {
        let mut f = s.state(round);
        f.put_f32("x", vec![round as f32; 4]);
        f
    }

    #[test]
    fn callbacks_run_at_their_place_in_the_sequence_of_writes() {
        let dir = scratch("order");
        let s = saver(&dir);
        let q = SaveQueue::start(s.clone(), "test-ckpt", None).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        q.hand(file(&s, 10));
        let d = dir.clone();
        let t = tx.clone();
        q.hand_then(
            file(&s, 20),
            When::BeforeWrite,
            Box::new(move || {
                t.send(("before 20", written(&d, 10), written(&d, 20)))
                    .unwrap()
            }),
        );
        let d = dir.clone();
        q.hand_then(
            file(&s, 30),
            When::AfterWrite,
            Box::new(move || {
                tx.send(("after 30", written(&d, 20), written(&d, 30)))
                    .unwrap()
            }),
        );
        q.finish().unwrap();
        let seen: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            seen,
            [("before 20", true, false), ("after 30", true, true)],
            "(callback, earlier file written, own file written)"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn save_waits_for_the_previous_write_and_in_the_background_not_for_its_own() {
        let dir = scratch("save");
        let s = saver(&dir);
        let q = SaveQueue::start(s.clone(), "test-ckpt", None).unwrap();
        // Once round 10 is written, the writer is held until the test lets it go.
        let (go, gate) = crossbeam_channel::bounded::<()>(0);
        q.hand_then(
            file(&s, 10),
            When::AfterWrite,
            Box::new(move || {
                let _ = gate.recv();
            }),
        );
        q.save(file(&s, 20)).unwrap();
        // save returned after round 10's write, and round 20's cannot have started.
        assert!(written(&dir, 10) && !written(&dir, 20));
        go.send(()).unwrap();
        q.finish().unwrap();
        assert!(written(&dir, 20));
        let _ = std::fs::remove_dir_all(dir);

        // Waiting for the disk, save returns once its own file is written.
        let dir = scratch("save-wait");
        let s = saver_of(&dir, false);
        let q = SaveQueue::start(s.clone(), "test-ckpt", None).unwrap();
        for r in [10, 20] {
            q.save(file(&s, r)).unwrap();
            assert!(written(&dir, r));
        }
        q.finish().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn wait_returns_once_every_file_is_on_disk() {
        let dir = scratch("wait");
        let s = saver(&dir);
        let q = SaveQueue::start(s.clone(), "test-ckpt", None).unwrap();
        for r in 1..=5 {
            q.hand(file(&s, r * 10));
        }
        q.wait().unwrap();
        assert!((1..=5).all(|r| written(&dir, r * 10)));
        // Nothing handed since: returns at once.
        q.wait().unwrap();
        q.finish().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_failed_write_is_reported_once_and_the_next_files_are_still_written() {
        let dir = scratch("fail");
        std::fs::create_dir_all(&dir).unwrap();
        // Round 10's directory cannot be made: a plain file holds its name.
        std::fs::write(round_dir(&dir, 10), b"not a directory").unwrap();
        let s = saver(&dir);
        let (tx, rx) = crossbeam_channel::unbounded();
        let hook: ErrorHook = Box::new(move |e| tx.send(e.to_string()).unwrap());
        let q = SaveQueue::start(s.clone(), "test-ckpt", Some(hook)).unwrap();
        q.hand(file(&s, 10));
        q.hand(file(&s, 20));
        let err = q.wait().unwrap_err().to_string();
        assert!(err.contains("round-10"), "{err}");
        assert!(written(&dir, 20));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [err]);
        // Reported once.
        q.wait().unwrap();
        q.finish().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
