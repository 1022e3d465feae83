//! How a server answers: under P3 through a [`ReplyQueue`] that writes each connection's replies
//! in priority order (scheduling.md, "Server side"); otherwise inline where sends only queue
//! (io_uring) and through the same queue, first in first out, where they block (portable).
//!
//! On the portable driver a handler runs on the thread that reads its request's connection, and
//! a send blocks until the socket takes the bytes. Answered inline, a pull of θ held that reader
//! while θ crossed the WAN: in `geomx bench sched`'s direct job (6 DCs behind one 25 Mbit/s
//! link, 2.4 MB per DC) the global server's readers sat in `sendto` for 1.0–3.4 s answering the
//! DCs' pulls of θ_0 and of the final θ, reading nothing from that DC meanwhile (its connection
//! ran half duplex) and sending it no heartbeat; and the reader of the push that completed a
//! round wrote every DC's reply, behind any write in progress to that DC.

use geomx_net::sched::reply::{ReplyQueue, SharedBytes};
use geomx_net::{DriverKind, PayloadCodec, Responder};

use super::JobSpec;

/// A server's replies: queued by P3 priority (the key's −layer), queued first in first out where
/// the connection's sends block, inline otherwise.
pub(super) struct Replies {
    /// The writers of the queued replies (threads start per connection, on first use).
    queue: ReplyQueue,
    /// P3: the priority of each of the server's entries (keys or ranges).
    p3: Option<Vec<i64>>,
}

impl Replies {
    /// Replies whose queue's writers are named `name`, with entry `i` answering for key
    /// `keys[i]` (its P3 priority).
    pub fn new(job: &JobSpec, name: &str, keys: impl IntoIterator<Item = usize>) -> Self {
        let p3 = job
            .p3
            .as_ref()
            .map(|_| keys.into_iter().map(|k| job.keys.priority(k)).collect());
        let queue = match job.p3.as_ref() {
            Some(p) if p.credit_bytes.replies_by_path() => {
                ReplyQueue::sized_by_path(name, p.unsent_bytes)
            }
            _ => ReplyQueue::new(name),
        };
        Self { queue, p3 }
    }

    /// Answers `to` for entry `i` with `payload` at `version`. Inline, a failure means the
    /// peer is gone (it sees that itself): it is logged, not returned.
    pub fn send(
        &self,
        i: usize,
        to: Responder,
        version: u64,
        codec: PayloadCodec,
        payload: &SharedBytes,
    ) {
        let priority = match &self.p3 {
            Some(prio) => prio.get(i).copied().unwrap_or(i64::MIN),
            None if to.peer().driver() == DriverKind::Portable => 0,
            None => {
                if let Err(e) = to.send(version, codec, (**payload).as_ref()) {
                    tracing::warn!(error = %e, entry = i, "reply not delivered");
                }
                return;
            }
        };
        self.queue
            .send(priority, to, version, codec, payload.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use geomx_net::{Handler, KvClient, KvServer, NetOptions, Request};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// Bytes whose reading waits until the gate opens: a reply that takes long to write.
    struct Gated {
        bytes: Vec<u8>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl AsRef<[u8]> for Gated {
        fn as_ref(&self) -> &[u8] {
            let (open, cv) = &*self.gate;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            &self.bytes
        }
    }

    /// Key 0 is answered through [`Replies`] with gated bytes, any other key inline at once.
    struct Server {
        replies: Replies,
        gate: Arc<(Mutex<bool>, Condvar)>,
        drivers: Mutex<Vec<DriverKind>>,
    }

    impl Handler for Server {
        fn on_request(&self, req: Request, reply: Responder) {
            self.drivers.lock().unwrap().push(reply.peer().driver());
            if req.key == 0 {
                let payload: SharedBytes = Arc::new(Gated {
                    bytes: vec![7; 1 << 20],
                    gate: self.gate.clone(),
                });
                self.replies.send(0, reply, 1, PayloadCodec::Raw, &payload);
            } else {
                let _ = reply.send(2, PayloadCodec::Raw, b"now");
            }
        }
    }

    /// On the portable driver a reply that is still being written does not hold the reader of
    /// its connection: the next request on it is answered meanwhile. (Inline, the second
    /// answer could only follow the first: the reader would wait in the first's write.)
    #[test]
    fn a_portable_reply_in_progress_does_not_hold_its_connections_reader() {
        let job = crate::hips::JobSpec::from_config(&Config::default()).unwrap();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let handler = Arc::new(Server {
            replies: Replies::new(&job, "test-replies", 0..1),
            gate: gate.clone(),
            drivers: Mutex::new(Vec::new()),
        });
        let opts = NetOptions {
            driver: DriverKind::Portable,
            ..NetOptions::default()
        };
        let server = KvServer::bind("127.0.0.1:0", handler.clone(), opts.clone()).unwrap();
        let client = KvClient::connect(server.local_addr(), 1, opts).unwrap();
        let slow = client.pull(0, 0, 0, 0).unwrap();
        let quick = client.pull(1, 0, 0, 0).unwrap();
        let answered = quick.wait(Duration::from_secs(20));
        // Open the gate before asserting, so that a failure does not leave the writer waiting.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let answered = answered
            .expect("the second request was not answered while the first reply was being written");
        assert_eq!(
            (answered.version, answered.payload.as_slice()),
            (2, &b"now"[..])
        );
        let r = slow.wait(Duration::from_secs(20)).unwrap();
        assert_eq!((r.version, r.payload.len()), (1, 1 << 20));
        assert!(r.payload.iter().all(|&b| b == 7));
        let drivers = handler.drivers.lock().unwrap().clone();
        assert_eq!(drivers, [DriverKind::Portable; 2]);
    }
}
