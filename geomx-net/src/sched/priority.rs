//! P3's sender side (scheduling.md, "P3 — priority-based parameter propagation"): one priority
//! queue per outgoing connection; whenever the connection can take a new frame, the most urgent
//! queued slice goes out whole. A slice on the wire is never interrupted, so preemption happens
//! only at slice boundaries.
//!
//! * [`PriorityQueue`]: the heap (priority descending, then enqueue order), pure data.
//! * [`SliceSender`]: the sans-IO sender of one connection: the queue plus "is a slice being
//!   written", driven by [`SliceSender::poll_transmit`] and [`SliceSender::on_written`].
//! * [`PrioritySender`]: the thin driver, a thread that drains a [`SliceSender`] into a
//!   [`KvClient`] with blocking writes. The kernel's own queue sits behind it: give the client's
//!   connection a small [`crate::NetOptions::notsent_lowat`] so that a write returns only once
//!   the socket holds little unsent data, or the socket buffer turns back into a FIFO.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::path_credit::{follow, PathCredit};
use crate::error::NetError;
use crate::kv::{KvClient, Pending, Response};
use crate::wire::PayloadCodec;

/// Priority of a queued item: larger is more urgent (P3 uses −layer).
pub type Priority = i64;

struct Entry<T> {
    priority: Priority,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.priority, self.seq) == (other.priority, other.seq)
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    /// The max-heap's top is the highest priority, then the lowest sequence number.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// A max-heap of items by priority, first in first out among equal priorities.
pub struct PriorityQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    next_seq: u64,
}

impl<T> Default for PriorityQueue<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            next_seq: 0,
        }
    }
}

impl<T> PriorityQueue<T> {
    /// Queues `item`; returns its sequence number (enqueue order).
    pub fn push(&mut self, priority: Priority, item: T) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Entry {
            priority,
            seq,
            item,
        });
        seq
    }

    /// Removes the most urgent item: `(priority, sequence number, item)`.
    pub fn pop(&mut self) -> Option<(Priority, u64, T)> {
        self.heap.pop().map(|e| (e.priority, e.seq, e.item))
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Removes every item, in no particular order.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.heap.drain().map(|e| e.item)
    }
}

/// The sans-IO sender of one connection: ready slices wait in a [`PriorityQueue`]; one slice at
/// a time is handed out to be written whole.
pub struct SliceSender<T> {
    queue: PriorityQueue<T>,
    writing: bool,
}

impl<T> Default for SliceSender<T> {
    fn default() -> Self {
        Self {
            queue: PriorityQueue::default(),
            writing: false,
        }
    }
}

impl<T> SliceSender<T> {
    /// A slice became ready to send; returns its sequence number.
    pub fn enqueue(&mut self, priority: Priority, item: T) -> u64 {
        self.queue.push(priority, item)
    }

    /// The next slice to write, if the connection is free and something is queued: the most
    /// urgent one. The connection is then busy until [`SliceSender::on_written`].
    pub fn poll_transmit(&mut self) -> Option<(Priority, u64, T)> {
        if self.writing {
            return None;
        }
        let next = self.queue.pop();
        self.writing = next.is_some();
        next
    }

    /// The slice handed out last is completely written.
    pub fn on_written(&mut self) {
        self.writing = false;
    }

    /// Slices queued, not counting the one being written.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when no slice is queued (one may be being written).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// True while a slice is being written.
    pub fn is_writing(&self) -> bool {
        self.writing
    }

    /// Removes every queued slice (the one being written stays written).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.queue.drain()
    }
}

/// One push waiting in a [`PrioritySender`].
struct Job {
    key: u64,
    version: u64,
    codec: PayloadCodec,
    offset: u64,
    total: u64,
    payload: Vec<u8>,
    sent: Sender<Result<Pending, NetError>>,
}

/// What a writer thread shares with the code that queues for it.
pub(super) struct Writer<T> {
    /// The queued items and the one being written.
    pub(super) sender: SliceSender<T>,
    /// No more items come: the writer ends once the queue is empty.
    pub(super) closed: bool,
}

impl<T> Writer<T> {
    /// An empty, open queue, watched.
    pub(super) fn watched() -> Watched<Writer<T>> {
        Watched::new(Writer {
            sender: SliceSender::default(),
            closed: false,
        })
    }
}

/// A writer thread's state behind a mutex, with the condition variable that wakes the writer.
pub(super) struct Watched<T> {
    state: Mutex<T>,
    /// Notified when the state changes in a way the writer waits for.
    pub(super) wake: Condvar,
}

impl<T> Watched<T> {
    /// `state`, watched.
    pub(super) fn new(state: T) -> Self {
        Self {
            state: Mutex::new(state),
            wake: Condvar::new(),
        }
    }

    /// The state (a poisoned lock is taken over: the state stays consistent between calls).
    pub(super) fn lock(&self) -> MutexGuard<'_, T> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on [`Watched::wake`] with `guard`.
    pub(super) fn wait<'a>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wake.wait(guard).unwrap_or_else(|p| p.into_inner())
    }
}

type Shared = Watched<Writer<Job>>;

/// A writer thread's loop: whenever the previous item is written, takes the most urgent queued
/// one and hands it to `write` (without the lock). Returns once the queue is closed and empty, or
/// when `write` returns false (the items left stay queued).
pub(super) fn write_in_order<T>(shared: &Watched<Writer<T>>, mut write: impl FnMut(T) -> bool) {
    let mut st = shared.lock();
    loop {
        let Some((_, _, item)) = st.sender.poll_transmit() else {
            if st.closed {
                return;
            }
            st = shared.wait(st);
            continue;
        };
        drop(st);
        let go_on = write(item);
        st = shared.lock();
        st.sender.on_written();
        if !go_on {
            return;
        }
    }
}

/// Pushes through one [`KvClient`] in priority order: [`PrioritySender::push`] queues a push and
/// returns at once; a thread writes the most urgent queued push whenever the previous one is
/// written. Dropping the sender fails the pushes still queued with [`NetError::Shutdown`].
pub struct PrioritySender {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The credit last sized to the path ([`PrioritySender::sized_by_path`]; 0: none yet).
    credit: Arc<AtomicU32>,
}

/// A push queued in a [`PrioritySender`]: becomes a [`Pending`] request once written; or a
/// request already sent ([`From<Pending>`], no queue involved).
#[derive(Debug)]
pub struct Queued(Slot);

#[derive(Debug)]
enum Slot {
    Sent(Pending),
    Waiting(Receiver<Result<Pending, NetError>>),
}

impl Queued {
    /// Waits up to `timeout` for the push to be written; returns its request.
    pub fn sent(self, timeout: Duration) -> Result<Pending, NetError> {
        let rx = match self.0 {
            Slot::Sent(p) => return Ok(p),
            Slot::Waiting(rx) => rx,
        };
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(NetError::Timeout(format!(
                "push still queued after {timeout:?}"
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(NetError::Shutdown),
        }
    }

    /// Waits up to `timeout` in all for the push to be written and answered.
    pub fn wait(self, timeout: Duration) -> Result<Response, NetError> {
        let deadline = Instant::now() + timeout;
        let pending = self.sent(timeout)?;
        pending.wait(deadline.saturating_duration_since(Instant::now()))
    }
}

impl From<Pending> for Queued {
    /// A request already sent, to be awaited like a queued one.
    fn from(p: Pending) -> Self {
        Queued(Slot::Sent(p))
    }
}

impl PrioritySender {
    /// Starts the writer thread of `client` (named `name`).
    pub fn new(client: KvClient, name: &str) -> Result<Self, NetError> {
        Self::start(client, name, None)
    }

    /// Like [`PrioritySender::new`], with the connection's send buffer (its credit) sized to
    /// the bandwidth × round trip the kernel measures of its path
    /// ([`super::path_credit::PathCredit`]); `unsent` is the connection's
    /// `TCP_NOTSENT_LOWAT`.
    pub fn sized_by_path(client: KvClient, name: &str, unsent: u32) -> Result<Self, NetError> {
        Self::start(client, name, Some(PathCredit::new(unsent)))
    }

    fn start(client: KvClient, name: &str, path: Option<PathCredit>) -> Result<Self, NetError> {
        let shared = Arc::new(Writer::watched());
        let credit = Arc::new(AtomicU32::new(0));
        let (s, c) = (shared.clone(), credit.clone());
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || write_loop(&s, &client, path, &c))?;
        Ok(Self {
            shared,
            thread: Some(thread),
            credit,
        })
    }

    /// The credit last sized to the path (`None` before the first, or when not path-sized).
    pub fn path_credit(&self) -> Option<u32> {
        Some(self.credit.load(Ordering::Relaxed)).filter(|&c| c != 0)
    }

    /// Queues a push of `payload` for `key` at `version` (range `offset` of `total`) with
    /// `priority`; see [`KvClient::push`].
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        priority: Priority,
        key: u64,
        version: u64,
        codec: PayloadCodec,
        offset: u64,
        total: u64,
        payload: Vec<u8>,
    ) -> Result<Queued, NetError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job = Job {
            key,
            version,
            codec,
            offset,
            total,
            payload,
            sent: tx,
        };
        let mut st = self.shared.lock();
        if st.closed {
            return Err(NetError::Shutdown);
        }
        st.sender.enqueue(priority, job);
        drop(st);
        self.shared.wake.notify_one();
        Ok(Queued(Slot::Waiting(rx)))
    }
}

impl Drop for PrioritySender {
    fn drop(&mut self) {
        let left: Vec<Job> = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.sender.drain().collect()
        };
        for j in left {
            let _ = j.sent.send(Err(NetError::Shutdown));
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: takes the most urgent push when the previous one is written (and sizes
/// the connection's credit after each, when `path` is given).
fn write_loop(
    shared: &Shared,
    client: &KvClient,
    mut path: Option<PathCredit>,
    credit: &AtomicU32,
) {
    write_in_order(shared, |job: Job| {
        let r = client.push(
            job.key,
            job.version,
            job.codec,
            job.offset,
            job.total,
            &job.payload,
        );
        let _ = job.sent.send(r);
        let sized = follow(
            path.as_mut(),
            job.payload.len(),
            || client.tcp_rate(),
            |c| {
                client.set_send_buffer(c)?;
                client.send_buffer()
            },
        );
        if let Some(c) = sized {
            credit.store(c, Ordering::Relaxed);
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_orders_by_priority_then_enqueue_order() {
        let mut q = PriorityQueue::default();
        for (p, name) in [(-3, "a"), (0, "b"), (-3, "c"), (0, "d"), (-1, "e")] {
            q.push(p, name);
        }
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|(_, _, n)| n)).collect();
        assert_eq!(order, ["b", "d", "e", "a", "c"]);
        assert!(q.is_empty());
    }

    /// A slice of a layer on the send log: (layer, slice index, bytes).
    type Slice = (usize, usize, usize);

    /// One connection of `rate` bytes/s on virtual time: slices become ready at scripted times
    /// (`ready[i]` = (time s, slice)); returns the send log (start, end, priority, seq, slice) and,
    /// at every start, the priorities still queued.
    #[allow(clippy::type_complexity)]
    fn simulate(
        rate: f64,
        mut ready: Vec<(f64, Slice)>,
    ) -> Vec<(f64, f64, Priority, u64, Slice, Vec<Priority>)> {
        ready.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut s = SliceSender::default();
        let mut queued: Vec<(Priority, u64)> = Vec::new();
        let (mut now, mut next, mut busy_until) = (0.0f64, 0usize, None::<f64>);
        let mut log = Vec::new();
        loop {
            // Everything ready by `now` is queued first (ties: a slice ready as another ends may
            // go next).
            while next < ready.len() && ready[next].0 <= now {
                let (_, sl) = ready[next];
                let p = -(sl.0 as Priority);
                let seq = s.enqueue(p, sl);
                queued.push((p, seq));
                next += 1;
            }
            if busy_until.is_some_and(|t| t <= now) {
                s.on_written();
                busy_until = None;
            }
            if let Some((p, seq, sl)) = s.poll_transmit() {
                queued.retain(|&(_, q)| q != seq);
                let end = now + sl.2 as f64 / rate;
                log.push((now, end, p, seq, sl, queued.iter().map(|q| q.0).collect()));
                busy_until = Some(end);
                continue;
            }
            let t_ready = ready.get(next).map(|r| r.0);
            now = match (busy_until, t_ready) {
                (Some(b), Some(r)) => b.min(r),
                (Some(b), None) => b,
                (None, Some(r)) => r,
                (None, None) => break,
            };
        }
        log
    }

    #[test]
    fn the_send_log_honours_priorities_and_never_interleaves() {
        // Backward pass of 6 layers, last layer first, 2 ms apart; layer sizes differ, so some
        // layers have several slices (S = 4 units).
        let sizes = [9usize, 3, 12, 1, 5, 8];
        let s_elems = 4usize;
        let mut ready = Vec::new();
        for (i, l) in (0..sizes.len()).rev().enumerate() {
            let n = sizes[l];
            for j in 0..n.div_ceil(s_elems) {
                let len = s_elems.min(n - j * s_elems);
                ready.push((i as f64 * 0.002, (l, j, len * 1000)));
            }
        }
        let total: usize = ready.len();
        let log = simulate(1e6, ready);
        assert_eq!(log.len(), total);
        for (i, (start, end, p, seq, _, still)) in log.iter().enumerate() {
            // Oracle 1: nothing queued at a start had a strictly higher priority.
            assert!(
                still.iter().all(|q| q <= p),
                "slice {i}: {p} sent before {still:?}"
            );
            // Never two slices on the wire at once.
            if let Some(prev) = log.get(i.wrapping_sub(1)) {
                assert!(prev.1 <= *start + 1e-12, "interleaved at {start}");
            }
            assert!(end > start);
            // Equal priorities go out in enqueue order.
            for later in &log[i + 1..] {
                if later.2 == *p {
                    assert!(later.3 > *seq);
                }
            }
        }
        // Snapshot of the schedule (4 ms per full slice, a layer every 2 ms): layer 5 goes out
        // alone at t = 0; later the queue always sends its most urgent layer, so layer 0 (ready
        // last) overtakes the slices of layers 2, 4 and 5 queued before it.
        let order: Vec<usize> = log.iter().map(|l| l.4 .0).collect();
        assert_eq!(order, [5, 3, 4, 1, 0, 0, 0, 2, 2, 2, 4, 5]);
    }

    #[test]
    fn all_ready_at_once_sends_layer_zero_first() {
        // Oracle 4 at the sender: with every gradient ready at once, layer 0 arrives before
        // layer L − 1 starts.
        let ready: Vec<(f64, Slice)> = (0..5).rev().map(|l| (0.0, (l, 0, 1000))).collect();
        let log = simulate(1e6, ready);
        let order: Vec<usize> = log.iter().map(|l| l.4 .0).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
        assert!(log[0].1 <= log[4].0);
    }

    #[test]
    fn pushes_through_a_priority_sender_are_all_answered() {
        use crate::{Handler, KvServer, NetOptions, Request, Responder};
        struct Echo;
        impl Handler for Echo {
            fn on_request(&self, req: Request, reply: Responder) {
                let _ = reply.send(req.version + 1, req.codec, &req.payload);
            }
        }
        let opts = NetOptions {
            notsent_lowat: Some(16 << 10),
            ..NetOptions::default()
        };
        let server = KvServer::bind("127.0.0.1:0", Echo, opts.clone()).unwrap();
        let client = KvClient::connect(server.local_addr(), 1, opts).unwrap();
        // The credit can change on a live connection (Linux doubles what it is given).
        client.set_send_buffer(100_000).unwrap();
        assert!(client.send_buffer().unwrap() >= 100_000);
        let sender = PrioritySender::new(client, "test-prio").unwrap();
        let queued: Vec<(u64, Queued)> = (0..20u64)
            .map(|k| {
                let payload = vec![k as u8; 1000 + 5000 * k as usize];
                let q = sender
                    .push(-(k as i64 % 4), k, 3, PayloadCodec::Raw, 0, 1, payload)
                    .unwrap();
                (k, q)
            })
            .collect();
        for (k, q) in queued {
            let r = q.wait(Duration::from_secs(30)).unwrap();
            assert_eq!((r.key, r.version), (k, 4));
            assert_eq!(r.payload, vec![k as u8; 1000 + 5000 * k as usize]);
        }
        drop(sender);
    }

    #[test]
    fn the_sender_hands_out_one_slice_at_a_time() {
        let mut s = SliceSender::default();
        s.enqueue(-1, "low");
        assert_eq!(s.poll_transmit().map(|t| t.2), Some("low"));
        s.enqueue(0, "high");
        // The connection is busy until the slice on the wire is written.
        assert!(s.poll_transmit().is_none());
        assert!(s.is_writing());
        s.on_written();
        assert_eq!(s.poll_transmit().map(|t| t.2), Some("high"));
        s.on_written();
        assert!(s.poll_transmit().is_none());
        assert!(!s.is_writing());
    }
}
