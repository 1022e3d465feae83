//! What every non-coordinator process uses to talk to the coordinator.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AbortNotice, CoordEvent, Hello, Located, Membership, NodeKey};
use crate::driver::NetOptions;
use crate::error::NetError;
use crate::kv::{KvClient, Response};
use crate::wire::{FrameHeader, MsgKind};

/// A registered process's connection to the coordinator. Heartbeats are sent by the driver's
/// background thread; the coordinator declares the process dead after the peer timeout.
///
/// With [`CoordClient::reconnecting`], a lost connection is not the end: the client reconnects
/// to the same address and reattaches under its id and incarnation (a restarted coordinator
/// continues the job from its snapshot), and requests in flight are sent again.
#[derive(Clone)]
pub struct CoordClient {
    inner: Arc<Inner>,
    membership: Membership,
}

struct Inner {
    /// The connection and its generation (bumped at every reattachment).
    kv: Mutex<(KvClient, u64)>,
    addrs: Vec<SocketAddr>,
    hello: Hello,
    opts: NetOptions,
    wait_limit: Duration,
    reconnect: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `e` means the connection is gone (not a refusal or a timeout).
fn connection_lost(e: &NetError) -> bool {
    matches!(e, NetError::PeerClosed(_) | NetError::Io(_))
}

impl CoordClient {
    /// Connects, sends `hello` and waits until every expected process has registered (or the
    /// coordinator rejects us / aborts), returning the client and the membership table.
    /// `opts.conn.request_timeout` bounds every wait, registration included.
    pub fn register(
        coord_addr: impl ToSocketAddrs,
        hello: Hello,
        opts: NetOptions,
    ) -> Result<(CoordClient, Membership), NetError> {
        let wait_limit = opts.conn.request_timeout + Duration::from_secs(1);
        let addrs: Vec<SocketAddr> = coord_addr
            .to_socket_addrs()
            .map_err(|e| NetError::Io(Arc::new(e)))?
            .collect();
        let kv = KvClient::connect(&addrs[..], u32::MAX, opts.clone())?;
        let resp = kv
            .request(FrameHeader::new(MsgKind::Register), &hello.encode())?
            .wait(wait_limit)
            .map_err(|e| match e {
                NetError::Remote(m) => NetError::Rejected(m),
                other => other,
            })?;
        let membership = Membership::decode(&resp.payload)?;
        let inner = Inner {
            kv: Mutex::new((kv, 0)),
            addrs,
            hello: Hello {
                reattach: Some(membership.incarnation),
                ..hello
            },
            opts,
            wait_limit,
            reconnect: AtomicBool::new(false),
        };
        Ok((
            CoordClient {
                inner: Arc::new(inner),
                membership: membership.clone(),
            },
            membership,
        ))
    }

    /// Makes a lost connection recoverable (the job's coordinator may be restarted): the client
    /// reconnects to the same address for up to the request timeout and reattaches.
    pub fn reconnecting(self, on: bool) -> Self {
        self.inner.reconnect.store(on, Ordering::Relaxed);
        self
    }

    /// The membership table received at registration.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    fn current(&self) -> (KvClient, u64) {
        let g = lock(&self.inner.kv);
        (g.0.clone(), g.1)
    }

    fn may_reconnect(&self) -> bool {
        self.inner.reconnect.load(Ordering::Relaxed)
    }

    /// Reconnects after the connection of `generation` was lost (unless another thread did) and
    /// reattaches to the (restarted) coordinator, retrying while nothing listens, up to the
    /// request timeout.
    fn reattach(&self, generation: u64) -> Result<(), NetError> {
        let mut g = lock(&self.inner.kv);
        if g.1 != generation {
            return Ok(());
        }
        let me = self.inner.hello.node_key();
        tracing::warn!(node = %me, "lost the coordinator; reconnecting");
        let deadline = Instant::now() + self.inner.wait_limit;
        loop {
            let attempt =
                KvClient::connect(&self.inner.addrs[..], u32::MAX, self.inner.opts.clone())
                    .and_then(|kv| {
                        let resp = kv
                            .request(
                                FrameHeader::new(MsgKind::Register),
                                &self.inner.hello.encode(),
                            )?
                            .wait(self.inner.wait_limit)?;
                        Membership::decode(&resp.payload)?;
                        Ok(kv)
                    });
            match attempt {
                Ok(kv) => {
                    g.0.close();
                    *g = (kv, generation + 1);
                    tracing::warn!(node = %me, "reattached to the coordinator");
                    return Ok(());
                }
                Err(NetError::Remote(m)) if !m.contains(super::STILL_ATTACHED) => {
                    return Err(NetError::Rejected(m))
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "coordinator not back yet");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Sends one request and waits for its answer; a lost connection is reattached and the
    /// request sent again when the client is [`reconnecting`](Self::reconnecting).
    fn call(&self, kind: MsgKind, payload: &[u8]) -> Result<Response, NetError> {
        loop {
            let (kv, generation) = self.current();
            match kv
                .request(FrameHeader::new(kind), payload)
                .and_then(|p| p.wait(self.inner.wait_limit))
            {
                Err(e) if self.may_reconnect() && connection_lost(&e) => {
                    self.reattach(generation)?
                }
                other => return other,
            }
        }
    }

    /// Where member `key` is now: its address, incarnation and whether it is live (a process
    /// that lost a peer polls this until the peer registered again).
    pub fn locate(&self, key: &NodeKey) -> Result<Located, NetError> {
        let resp = self.call(MsgKind::Pull, &key.encode())?;
        Located::decode(&resp.payload)
    }

    /// How long ago this process's own connection to the coordinator dropped while the job ran
    /// ([`Located::dropped_ago`]; `None`: never, or not known): a member that finds a peer's
    /// link broken tells from it whether it was the one away (stopped, or cut off).
    pub fn own_dropped_ago(&self) -> Option<Duration> {
        self.locate(&self.inner.hello.node_key()).ok()?.dropped_ago
    }

    /// Appends `record` (at most [`JOURNAL_RECORD_MAX`](super::JOURNAL_RECORD_MAX) bytes) to the
    /// coordinator's journal and waits for it to be stored.
    pub fn journal(&self, record: &[u8]) -> Result<(), NetError> {
        self.call(MsgKind::Push, record).map(drop)
    }

    /// How many times the connection was replaced (reattached) so far: a member that keeps
    /// state at the coordinator (its journal records) sends it again when this changes, since a
    /// restarted coordinator starts from its snapshot.
    pub fn generation(&self) -> u64 {
        self.current().1
    }

    /// Waits until every member of `group` ("all", "dc:N", "role:NAME") entered the barrier. Fails
    /// if the job aborts meanwhile.
    pub fn barrier(&self, group: &str) -> Result<(), NetError> {
        self.call(MsgKind::Barrier, group.as_bytes()).map(drop)
    }

    /// Reports that this process finished; when all have, everyone gets [`CoordEvent::Shutdown`].
    pub fn done(&self) -> Result<(), NetError> {
        self.call(MsgKind::Done, &[]).map(drop)
    }

    /// Aborts the job; everyone gets [`CoordEvent::Abort`] naming this process.
    pub fn abort(&self, reason: &str) -> Result<(), NetError> {
        self.call(MsgKind::Abort, reason.as_bytes()).map(drop)
    }

    /// The next coordinator event, waiting up to `timeout`; `None` if none came (or the
    /// connection was lost and reattached meanwhile).
    pub fn wait_event(&self, timeout: Duration) -> Option<CoordEvent> {
        let (kv, generation) = self.current();
        let r = kv.next_notification(timeout)?;
        Some(match r {
            Ok(f) if f.header.kind == MsgKind::Shutdown => CoordEvent::Shutdown,
            Ok(f) => match AbortNotice::decode(&f.payload) {
                Ok(n) => CoordEvent::Abort(n),
                Err(e) => CoordEvent::CoordinatorLost(format!("undecodable abort notice: {e}")),
            },
            Err(e) if self.may_reconnect() && connection_lost(&e) => {
                return match self.reattach(generation) {
                    Ok(()) => None,
                    // Every member sent Done while this one was away: the Shutdown it missed.
                    Err(NetError::Rejected(m)) if m.contains(super::JOB_FINISHED) => {
                        tracing::info!(
                            node = %self.inner.hello.node_key(),
                            "the coordinator was lost after the job finished"
                        );
                        Some(CoordEvent::Shutdown)
                    }
                    Err(e2) => Some(CoordEvent::CoordinatorLost(format!(
                        "{e}; reconnecting failed: {e2}"
                    ))),
                };
            }
            Err(NetError::Shutdown) => CoordEvent::CoordinatorLost("closed locally".into()),
            Err(e) => CoordEvent::CoordinatorLost(e.to_string()),
        })
    }

    /// Traffic counted at this connection.
    pub fn stats(&self) -> crate::Counters {
        self.current().0.stats()
    }

    /// Closes the connection to the coordinator (and stops reconnecting).
    pub fn close(&self) {
        self.inner.reconnect.store(false, Ordering::Relaxed);
        self.current().0.close();
    }
}
