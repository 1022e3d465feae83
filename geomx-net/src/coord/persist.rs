//! The coordinator's snapshot file, written by a thread of its own (group commit).
//!
//! A change of the membership must be on disk before anything it decided is sent (a restarted
//! coordinator must not forget a process it admitted, or a Done it acknowledged). Writing the
//! snapshot (fsync) where the change is made held the coordinator's state for as long as the
//! disk took: on a loaded 2-core machine an fsync took up to 14 s, every Done and registration
//! queued behind one such write each, and the members' 120 s request timeouts ran out (seen in
//! the WAN lab recovery test, 2026-12-07). Now the state only hands the newest snapshot to the
//! writer thread and holds back what the change decided; the writer writes the newest snapshot
//! it was handed (one write covers every older one: each holds the whole state) and releases,
//! in order, everything that waited for it. However many changes come during one slow write,
//! they wait for at most one more.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

/// The snapshot file and what waits for it.
pub(super) struct Persister<A> {
    path: PathBuf,
    queue: Mutex<Queue<A>>,
    wake: Condvar,
    /// The newest snapshot's encoding without the journal (what decides a new write).
    membership: Mutex<Vec<u8>>,
}

struct Queue<A> {
    /// The newest snapshot handed and not yet taken by the writer: (number, bytes).
    newest: Option<(u64, Vec<u8>)>,
    /// The number of the newest snapshot handed (0: none).
    handed: u64,
    /// The number of the newest snapshot on disk (or whose write failed and was logged).
    durable: u64,
    /// Actions waiting for a snapshot, with its number, in the order they were decided.
    held: VecDeque<(u64, A)>,
    stop: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<A> Persister<A> {
    /// A persister of the snapshot file at `path`.
    pub(super) fn new(path: PathBuf) -> Self {
        Persister {
            path,
            queue: Mutex::new(Queue {
                newest: None,
                handed: 0,
                durable: 0,
                held: VecDeque::new(),
                stop: false,
            }),
            wake: Condvar::new(),
            membership: Mutex::new(Vec::new()),
        }
    }

    /// Whether `membership` (a snapshot's encoding without the journal) differs from the last
    /// one seen, which it then becomes.
    pub(super) fn membership_changed(&self, membership: Vec<u8>) -> bool {
        let mut last = lock(&self.membership);
        if *last == membership {
            return false;
        }
        *last = membership;
        true
    }

    /// Hands the writer a snapshot, newer than every one handed before (the caller holds the
    /// state's lock, which orders the hand-overs).
    pub(super) fn hand(&self, bytes: Vec<u8>) {
        let mut q = lock(&self.queue);
        q.handed += 1;
        let n = q.handed;
        q.newest = Some((n, bytes));
        self.wake.notify_all();
    }

    /// Passes `actions` to `outbox` at once if no snapshot handed so far is still being written
    /// (and nothing is held before them); holds them until it is otherwise. Called under the
    /// state's lock, after the change's snapshot (if any) was handed.
    pub(super) fn admit(&self, actions: Vec<A>, outbox: &Mutex<VecDeque<A>>) {
        if actions.is_empty() {
            return;
        }
        let mut q = lock(&self.queue);
        if q.held.is_empty() && q.durable >= q.handed {
            lock(outbox).extend(actions);
        } else {
            let n = q.handed;
            q.held.extend(actions.into_iter().map(|a| (n, a)));
        }
    }

    /// The writer's next snapshot: waits until one is handed; `None` once stopped with none left.
    fn next_write(&self) -> Option<(u64, Vec<u8>)> {
        let mut q = lock(&self.queue);
        loop {
            if let Some(w) = q.newest.take() {
                return Some(w);
            }
            if q.stop {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Snapshot `n` is on disk: what waited for it (or an older one) goes to `outbox`, in order.
    fn written(&self, n: u64, outbox: &Mutex<VecDeque<A>>) {
        let mut q = lock(&self.queue);
        q.durable = q.durable.max(n);
        let mut out = lock(outbox);
        while q.held.front().is_some_and(|(m, _)| *m <= q.durable) {
            if let Some((_, a)) = q.held.pop_front() {
                out.push_back(a);
            }
        }
    }

    /// Ends [`Persister::run`] once the snapshots handed so far are written.
    pub(super) fn stop(&self) {
        lock(&self.queue).stop = true;
        self.wake.notify_all();
    }

    /// The writer thread: writes each newest snapshot with `write` (the file at its path),
    /// releases what waited for it into `outbox` and calls `released`, until
    /// [`Persister::stop`]. A write that fails is logged and counts as done: a coordinator
    /// that cannot save goes on as one without a state file would.
    pub(super) fn run(
        &self,
        write: impl Fn(&Path, &[u8]) -> std::io::Result<()>,
        outbox: &Mutex<VecDeque<A>>,
        released: impl Fn(),
    ) {
        while let Some((n, bytes)) = self.next_write() {
            if let Err(e) = write(&self.path, &bytes) {
                tracing::error!(path = %self.path.display(), error = %e, "coordinator snapshot not written");
            }
            self.written(n, outbox);
            released();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    fn drain(outbox: &Mutex<VecDeque<u32>>) -> Vec<u32> {
        lock(outbox).drain(..).collect()
    }

    #[test]
    fn actions_wait_for_the_snapshot_handed_before_them_and_keep_their_order() {
        let p: Persister<u32> = Persister::new(PathBuf::from("unused"));
        let outbox = Mutex::new(VecDeque::new());
        // Nothing handed: actions go at once.
        p.admit(vec![1, 2], &outbox);
        assert_eq!(drain(&outbox), [1, 2]);
        // A change's actions wait for its snapshot; so do later ones without a change.
        p.hand(b"s1".to_vec());
        p.admit(vec![3], &outbox);
        p.admit(vec![4], &outbox);
        assert!(drain(&outbox).is_empty());
        p.hand(b"s2".to_vec());
        p.admit(vec![5], &outbox);
        // The writer takes only the newest snapshot; writing it releases everything before it.
        let (n, bytes) = p.next_write().unwrap();
        assert_eq!((n, bytes.as_slice()), (2, &b"s2"[..]));
        p.written(n, &outbox);
        assert_eq!(drain(&outbox), [3, 4, 5]);
        // An older write completing releases only what waited for it.
        p.hand(b"s3".to_vec());
        p.admit(vec![6], &outbox);
        p.hand(b"s4".to_vec());
        p.admit(vec![7], &outbox);
        p.written(3, &outbox);
        assert_eq!(drain(&outbox), [6]);
        // Held actions keep later ones back even once nothing is being written.
        p.admit(vec![8], &outbox);
        assert!(drain(&outbox).is_empty());
        p.written(4, &outbox);
        assert_eq!(drain(&outbox), [7, 8]);
        p.admit(vec![9], &outbox);
        assert_eq!(drain(&outbox), [9]);
    }

    #[test]
    fn a_slow_write_holds_back_only_replies_and_one_write_covers_every_change_meanwhile() {
        let p: Arc<Persister<u32>> = Arc::new(Persister::new(PathBuf::from("unused")));
        let outbox = Arc::new(Mutex::new(VecDeque::new()));
        let (started_tx, started) = mpsc::channel::<Vec<u8>>();
        let (go_tx, go) = mpsc::channel::<()>();
        let go = Mutex::new(go);
        let writer = {
            let (p, outbox) = (p.clone(), outbox.clone());
            std::thread::spawn(move || {
                p.run(
                    |_, bytes| {
                        started_tx.send(bytes.to_vec()).unwrap();
                        lock(&go).recv().unwrap();
                        Ok(())
                    },
                    &outbox,
                    || {},
                )
            })
        };
        p.hand(b"a".to_vec());
        p.admit(vec![1], &outbox);
        assert_eq!(started.recv().unwrap(), b"a");
        // While "a" is being written, three more changes are made without waiting for it.
        for (i, s) in [b"b", b"c", b"d"].iter().enumerate() {
            p.hand(s.to_vec());
            p.admit(vec![2 + i as u32], &outbox);
        }
        assert!(drain(&outbox).is_empty());
        go_tx.send(()).unwrap();
        // Only the newest of them is written next, and it releases all of them.
        assert_eq!(started.recv().unwrap(), b"d");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.is_empty() && std::time::Instant::now() < deadline {
            got.extend(drain(&outbox));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got, [1]);
        go_tx.send(()).unwrap();
        p.stop();
        writer.join().unwrap();
        assert_eq!(drain(&outbox), [2, 3, 4]);
        assert!(started.try_recv().is_err(), "a snapshot written twice");
    }

    #[test]
    fn a_failed_write_is_logged_and_releases_what_waited() {
        let p: Persister<u32> = Persister::new(PathBuf::from("unused"));
        let outbox = Mutex::new(VecDeque::new());
        p.hand(b"x".to_vec());
        p.admit(vec![1], &outbox);
        p.stop();
        p.run(
            |_, _| Err(std::io::Error::other("disk full")),
            &outbox,
            || {},
        );
        assert_eq!(drain(&outbox), [1]);
    }
}
