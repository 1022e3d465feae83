//! How a server answers pushes: inline from the thread that completed the round, or under P3
//! through a [`ReplyQueue`] that writes each connection's replies in priority order
//! (scheduling.md, "Server side").

use geomx_net::sched::reply::{ReplyQueue, SharedBytes};
use geomx_net::{PayloadCodec, Responder};

use super::JobSpec;

/// A server's replies: inline, or queued by P3 priority (the key's −layer).
pub(super) struct Replies {
    /// P3: the queue and the priority of each of the server's entries (keys or ranges).
    p3: Option<(ReplyQueue, Vec<i64>)>,
}

impl Replies {
    /// Inline without P3; under P3 a queue whose writers are named `name`, with entry `i`
    /// answering for key `keys[i]`.
    pub fn new(job: &JobSpec, name: &str, keys: impl IntoIterator<Item = usize>) -> Self {
        let p3 = job.p3.as_ref().map(|_| {
            let prio = keys.into_iter().map(|k| job.keys.priority(k)).collect();
            (ReplyQueue::new(name), prio)
        });
        Self { p3 }
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
        match &self.p3 {
            Some((q, prio)) => {
                let p = prio.get(i).copied().unwrap_or(i64::MIN);
                q.send(p, to, version, codec, payload.clone());
            }
            None => {
                if let Err(e) = to.send(version, codec, (**payload).as_ref()) {
                    tracing::warn!(error = %e, entry = i, "reply not delivered");
                }
            }
        }
    }
}
