//! P3's server side (scheduling.md, "Server side"): replies leave each connection in priority
//! order, from a writer thread of that connection.
//!
//! A server that answers from its reader threads writes with blocking sends: a reply to a peer
//! behind a slow link holds the thread that should be reading another peer's pushes, and replies
//! leave in completion order, not in the order the workers need them. [`ReplyQueue::send`] instead
//! queues the reply in the [`super::priority::SliceSender`] of the request's connection and returns at once; one
//! thread per connection writes the most urgent queued reply whenever the previous one is
//! written. As with [`super::priority::PrioritySender`], give the connections a small
//! [`crate::NetOptions::notsent_lowat`] so that the heap, not the socket buffer, holds the
//! backlog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::path_credit::{follow, PathCredit};
use super::priority::{write_in_order, Priority, Watched, Writer};
use crate::kv::Responder;
use crate::wire::PayloadCodec;

/// A reply's payload, shared by the replies that carry the same bytes (a server answers every
/// data center with the same values).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// One queued reply.
struct Reply {
    to: Responder,
    version: u64,
    codec: PayloadCodec,
    payload: SharedBytes,
}

/// The queue and writer state of one connection; closed once the queue is dropped or the
/// connection failed (then replies are no longer taken).
type Conn = Watched<Writer<Reply>>;

/// Replies in priority order, per connection. Dropping the queue lets each writer finish the
/// replies already queued, then end (writers are not joined: a peer that stopped reading must
/// not hold the server's shutdown; the connection's own timeouts end such a write).
pub struct ReplyQueue {
    name: String,
    conns: Mutex<HashMap<usize, Arc<Conn>>>,
    /// Size each connection's credit to its path ([`ReplyQueue::sized_by_path`]): the
    /// connections' `TCP_NOTSENT_LOWAT`.
    path_unsent: Option<u32>,
}

impl std::fmt::Debug for ReplyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyQueue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ReplyQueue {
    /// A queue whose writer threads are named `name.<n>`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            conns: Mutex::new(HashMap::new()),
            path_unsent: None,
        }
    }

    /// Like [`ReplyQueue::new`], with each connection's send buffer (its credit) sized to the
    /// bandwidth × round trip the kernel measures of its path
    /// ([`super::path_credit::PathCredit`]); `unsent` is the connections' `TCP_NOTSENT_LOWAT`.
    pub fn sized_by_path(name: &str, unsent: u32) -> Self {
        Self {
            name: name.to_string(),
            conns: Mutex::new(HashMap::new()),
            path_unsent: Some(unsent),
        }
    }

    /// Answers `to` with `payload` at `version`, after the more urgent replies queued for the
    /// same connection (priority descending, then FIFO). Returns at once. A reply that cannot be
    /// queued (its connection's writer ended, or no thread could start) is sent here, inline.
    pub fn send(
        &self,
        priority: Priority,
        to: Responder,
        version: u64,
        codec: PayloadCodec,
        payload: SharedBytes,
    ) {
        let reply = Reply {
            to,
            version,
            codec,
            payload,
        };
        let reply = match self.conn(&reply.to) {
            Some(conn) => {
                let mut st = conn.lock();
                if st.closed {
                    reply
                } else {
                    st.sender.enqueue(priority, reply);
                    drop(st);
                    conn.wake.notify_one();
                    return;
                }
            }
            None => reply,
        };
        write(reply);
    }

    /// Replies queued and not yet handed to their connection's socket, all connections.
    pub fn queued(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .values()
            .map(|c| {
                let st = c.lock();
                st.sender.len() + usize::from(st.sender.is_writing())
            })
            .sum()
    }

    /// The queue of `to`'s connection, its writer started on first use; `None` if no thread could
    /// start.
    fn conn(&self, to: &Responder) -> Option<Arc<Conn>> {
        let peer = to.peer();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conns.get(&peer.conn_id()).filter(|c| !c.lock().closed) {
            return Some(c.clone());
        }
        // A new connection (or a reused id): the connections that ended are forgotten first.
        conns.retain(|_, c| !c.lock().closed);
        let conn: Arc<Conn> = Arc::new(Writer::watched());
        let c = conn.clone();
        let path = self.path_unsent.map(PathCredit::new);
        let spawned = std::thread::Builder::new()
            .name(format!("{}.{}", self.name, conns.len()))
            .spawn(move || write_loop(&c, path));
        match spawned {
            Ok(_) => {
                conns.insert(peer.conn_id(), conn.clone());
                Some(conn)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reply writer did not start; replying inline");
                None
            }
        }
    }
}

impl Drop for ReplyQueue {
    fn drop(&mut self) {
        let conns = self.conns.get_mut().unwrap_or_else(|p| p.into_inner());
        for c in conns.values() {
            c.lock().closed = true;
            c.wake.notify_all();
        }
    }
}

/// Writes one reply (blocking) and returns its payload's size; `None`: the connection is gone,
/// which the peer sees.
fn write(r: Reply) -> Option<usize> {
    let bytes: &[u8] = (*r.payload).as_ref();
    match r.to.send(r.version, r.codec, bytes) {
        Ok(()) => Some(bytes.len()),
        Err(e) => {
            tracing::debug!(error = %e, "reply not delivered");
            None
        }
    }
}

/// A connection's writer: the most urgent queued reply, written whole, then the next (and the
/// connection's credit sized after each, when `path` is given). Ends when the queue is dropped
/// and empty, or when the connection fails (the replies left are dropped, which answers their
/// requests with an error on a connection that is gone anyway).
fn write_loop(conn: &Conn, mut path: Option<PathCredit>) {
    write_in_order(conn, |reply: Reply| {
        let peer = reply.to.peer();
        let Some(bytes) = write(reply) else {
            return !peer.is_closed();
        };
        follow(
            path.as_mut(),
            bytes,
            || peer.tcp_rate(),
            |c| {
                peer.set_send_buffer(c)?;
                peer.send_buffer()
            },
        );
        true
    });
    let left: Vec<Reply> = {
        let mut st = conn.lock();
        st.closed = true;
        st.sender.drain().collect()
    };
    drop(left);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Handler, KvClient, KvServer, NetOptions, Request};
    use std::sync::Condvar;
    use std::time::Duration;

    /// A payload that logs its key when its bytes are taken for writing; the first write waits
    /// until the gate opens, so that every later reply is queued before the second write.
    struct Probe {
        key: [u8; 8],
        log: Arc<Mutex<Vec<u64>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl AsRef<[u8]> for Probe {
        fn as_ref(&self) -> &[u8] {
            let mut log = self.log.lock().unwrap();
            log.push(u64::from_le_bytes(self.key));
            let first = log.len() == 1;
            drop(log);
            if first {
                let (open, cv) = &*self.gate;
                let mut o = open.lock().unwrap();
                while !*o {
                    o = cv.wait(o).unwrap();
                }
            }
            &self.key
        }
    }

    /// Answers pushes through a [`ReplyQueue`], priority = key, once `hold` are in.
    struct Held {
        queue: ReplyQueue,
        hold: usize,
        parked: Mutex<Vec<(u64, Responder)>>,
        log: Arc<Mutex<Vec<u64>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Handler for Held {
        fn on_request(&self, req: Request, reply: Responder) {
            let mut parked = self.parked.lock().unwrap();
            parked.push((req.key, reply));
            if parked.len() < self.hold {
                return;
            }
            for (key, r) in parked.drain(..) {
                let payload: SharedBytes = Arc::new(Probe {
                    key: key.to_le_bytes(),
                    log: self.log.clone(),
                    gate: self.gate.clone(),
                });
                self.queue
                    .send(key as Priority, r, key, PayloadCodec::Raw, payload);
            }
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }
    }

    /// Replies queued together are written in priority order (after the first, which was on the
    /// wire while the others were queued), each request gets its own payload, the queue empties.
    #[test]
    fn replies_leave_in_priority_order_and_all_arrive() {
        let hold = 40u64;
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Held {
            queue: ReplyQueue::new("test-replies"),
            hold: hold as usize,
            parked: Mutex::new(Vec::new()),
            log: log.clone(),
            gate: Arc::new((Mutex::new(false), Condvar::new())),
        });
        let opts = NetOptions {
            notsent_lowat: Some(16 << 10),
            ..NetOptions::default()
        };
        let server = KvServer::bind("127.0.0.1:0", handler.clone(), opts.clone()).unwrap();
        let client = KvClient::connect(server.local_addr(), 1, opts).unwrap();
        // Keys in an order that is not the priority order.
        let keys: Vec<u64> = (0..hold).map(|i| (i * 17) % hold).collect();
        let pending: Vec<_> = keys
            .iter()
            .map(|&k| client.push(k, 0, PayloadCodec::Raw, 0, 1, &[]).unwrap())
            .collect();
        for (p, &k) in pending.into_iter().zip(&keys) {
            let r = p.wait(Duration::from_secs(30)).unwrap();
            assert_eq!((r.key, r.version), (k, k));
            assert_eq!(r.payload, k.to_le_bytes());
        }
        let order = log.lock().unwrap().clone();
        assert_eq!(order.len(), hold as usize);
        assert!(
            order[1..].windows(2).all(|w| w[0] > w[1]),
            "write order {order:?}"
        );
        // The writer marks its last reply written after the peer may have read it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while handler.queue.queued() > 0 {
            assert!(std::time::Instant::now() < deadline, "replies still queued");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Keeps every request's responder, to be answered by the test.
    #[derive(Default)]
    struct Keep(Mutex<Vec<Responder>>);

    impl Handler for Keep {
        fn on_request(&self, _req: Request, reply: Responder) {
            self.0.lock().unwrap().push(reply);
        }
    }

    /// Replies queued for a connection that closed are dropped and its writer ends (the queue
    /// forgets it); a new connection gets a writer of its own and its replies.
    #[test]
    fn a_closed_connection_loses_its_writer_not_the_queue() {
        let keep = Arc::new(Keep::default());
        let opts = NetOptions::default();
        let server = KvServer::bind("127.0.0.1:0", keep.clone(), opts.clone()).unwrap();
        let queue = ReplyQueue::new("test-closed");
        let gone = KvClient::connect(server.local_addr(), 1, opts.clone()).unwrap();
        let pending: Vec<_> = (0..3u64)
            .map(|k| gone.push(k, 0, PayloadCodec::Raw, 0, 1, &[]).unwrap())
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while keep.0.lock().unwrap().len() < 3 {
            assert!(std::time::Instant::now() < deadline, "pushes not received");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(pending);
        drop(gone);
        let stale: Vec<Responder> = keep.0.lock().unwrap().drain(..).collect();
        while !stale[0].peer().is_closed() {
            assert!(std::time::Instant::now() < deadline, "close not seen");
            std::thread::sleep(Duration::from_millis(5));
        }
        let big: SharedBytes = Arc::new(vec![7u8; 1 << 20]);
        for (i, r) in stale.into_iter().enumerate() {
            queue.send(i as Priority, r, 1, PayloadCodec::Raw, big.clone());
        }
        while queue.queued() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "stale replies still queued"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // A new connection is answered through a writer of its own.
        let client = KvClient::connect(server.local_addr(), 2, opts).unwrap();
        let p = client.push(9, 0, PayloadCodec::Raw, 0, 1, &[]).unwrap();
        while keep.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "push not received");
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = keep.0.lock().unwrap().pop().unwrap();
        queue.send(0, r, 4, PayloadCodec::Raw, Arc::new(vec![1u8, 2, 3]));
        let got = p.wait(Duration::from_secs(20)).unwrap();
        assert_eq!((got.version, got.payload), (4, vec![1, 2, 3]));
        assert_eq!(
            queue.conns.lock().unwrap().len(),
            1,
            "the closed connection is forgotten"
        );
    }
}
