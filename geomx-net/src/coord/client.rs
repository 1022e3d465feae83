//! What every non-coordinator process uses to talk to the coordinator.

use std::net::ToSocketAddrs;
use std::time::Duration;

use super::{AbortNotice, CoordEvent, Hello, Membership};
use crate::driver::NetOptions;
use crate::error::NetError;
use crate::kv::KvClient;
use crate::wire::{FrameHeader, MsgKind};

/// A registered process's connection to the coordinator. Heartbeats are sent by the driver's
/// background thread; the coordinator declares the process dead after the peer timeout.
#[derive(Clone)]
pub struct CoordClient {
    kv: KvClient,
    membership: Membership,
    wait_limit: Duration,
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
        let kv = KvClient::connect(coord_addr, u32::MAX, opts)?;
        let resp = kv
            .request(FrameHeader::new(MsgKind::Register), &hello.encode())?
            .wait(wait_limit)
            .map_err(|e| match e {
                NetError::Remote(m) => NetError::Rejected(m),
                other => other,
            })?;
        let membership = Membership::decode(&resp.payload)?;
        Ok((
            CoordClient {
                kv,
                membership: membership.clone(),
                wait_limit,
            },
            membership,
        ))
    }

    /// The membership table received at registration.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    fn call(&self, kind: MsgKind, payload: &[u8]) -> Result<(), NetError> {
        self.kv
            .request(FrameHeader::new(kind), payload)?
            .wait(self.wait_limit)
            .map(|_| ())
    }

    /// Waits until every member of `group` ("all", "dc:N", "role:NAME") entered the barrier. Fails
    /// if the job aborts meanwhile.
    pub fn barrier(&self, group: &str) -> Result<(), NetError> {
        self.call(MsgKind::Barrier, group.as_bytes())
    }

    /// Reports that this process finished; when all have, everyone gets [`CoordEvent::Shutdown`].
    pub fn done(&self) -> Result<(), NetError> {
        self.call(MsgKind::Done, &[])
    }

    /// Aborts the job; everyone gets [`CoordEvent::Abort`] naming this process.
    pub fn abort(&self, reason: &str) -> Result<(), NetError> {
        self.call(MsgKind::Abort, reason.as_bytes())
    }

    /// The next coordinator event, waiting up to `timeout`; `None` if none came.
    pub fn wait_event(&self, timeout: Duration) -> Option<CoordEvent> {
        let r = self.kv.next_notification(timeout)?;
        Some(match r {
            Ok(f) if f.header.kind == MsgKind::Shutdown => CoordEvent::Shutdown,
            Ok(f) => match AbortNotice::decode(&f.payload) {
                Ok(n) => CoordEvent::Abort(n),
                Err(e) => CoordEvent::CoordinatorLost(format!("undecodable abort notice: {e}")),
            },
            Err(NetError::Shutdown) => CoordEvent::CoordinatorLost("closed locally".into()),
            Err(e) => CoordEvent::CoordinatorLost(e.to_string()),
        })
    }

    /// Traffic counted at this connection.
    pub fn stats(&self) -> crate::Counters {
        self.kv.stats()
    }

    /// Closes the connection to the coordinator.
    pub fn close(&self) {
        self.kv.close();
    }
}
