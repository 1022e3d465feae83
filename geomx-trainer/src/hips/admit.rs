//! Which connection speaks for which member, and what happens to a request that is refused.
//!
//! A server of the job (local server, global server, the ESync endpoint) hears from its members
//! and from anyone else who can reach its port. The node id a connection announced in its Hello is
//! self-declared, so it is bound to a connection here: the first connection whose request is
//! accepted for a member id holds that id until it closes. Requests for the same id from any
//! other connection are refused, and only the holding connection's loss counts as the member's
//! loss; a Hello that borrows a member's id and then disconnects changes nothing.
//!
//! With mutual TLS (`[security] mode = "mtls"`, the default) a connection also carries the
//! identity of its job certificate, and a member id is only granted to the connection whose
//! certificate names that member's (role, dc, rank): a worker of another data center, or a
//! process of another role, cannot speak for a member even with a valid certificate.
//!
//! A refused request gets an error reply, a `tracing` warning and a count in the process's
//! [`super::RoleStats::refused_requests`]; it never ends the job. A genuine member that receives
//! such an error fails its own request and ends the job itself, naming the cause, so real
//! protocol bugs stay loud while a stranger's frames stay harmless (docs/security.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use geomx_net::coord::NodeInfo;
use geomx_net::tls::Identity as CertIdentity;
use geomx_net::{PeerHandle, Request, Responder};

use super::lock;

/// Requests that may wait for the membership (they arrived before registration completed here):
/// beyond this many, further early requests are refused.
pub(crate) const MAX_EARLY_REQUESTS: usize = 4096;

/// Pulls that may wait for a later version, per (member, key): a member pulls each key once a
/// round, so more than this many waiting per member and key is no member's doing.
pub(crate) const PARKED_PULLS_PER_MEMBER_KEY: usize = 2;

/// Parks a pull of `key` that waits for `version` unless `cap` pulls wait already; then the
/// reply comes back, to be refused once the caller let go of its state.
pub(crate) fn park_pull<R>(
    pulls: &mut Vec<(usize, u64, R)>,
    cap: usize,
    key: usize,
    version: u64,
    reply: R,
) -> Option<R> {
    if pulls.len() >= cap {
        return Some(reply);
    }
    pulls.push((key, version, reply));
    None
}

/// Connection-bound member identities of one server and its count of refused requests.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    /// Requests that arrived before the membership was known, answered once it is.
    early: Mutex<Vec<(Request, Responder)>>,
    /// Member node id → the connection that holds it.
    bound: Mutex<HashMap<u32, usize>>,
    /// Requests refused with an error reply.
    refused: AtomicU64,
    /// The members this server serves: node id → the identity its certificate must state.
    members: OnceLock<HashMap<u32, CertIdentity>>,
}

impl Admission {
    /// Holds `(req, reply)` while `known()` is false (the membership is not known yet): returns
    /// them back when they can be served now. Beyond [`MAX_EARLY_REQUESTS`] they are refused.
    pub(crate) fn hold_early(
        &self,
        known: impl Fn() -> bool,
        req: Request,
        reply: Responder,
    ) -> Option<(Request, Responder)> {
        if known() {
            return Some((req, reply));
        }
        let mut early = lock(&self.early);
        if known() {
            return Some((req, reply));
        }
        if early.len() >= MAX_EARLY_REQUESTS {
            drop(early);
            self.refuse(reply, "request before the membership is known".into());
            return None;
        }
        early.push((req, reply));
        None
    }

    /// Makes the membership known (`publish`) and returns the requests held until then.
    pub(crate) fn open(&self, publish: impl FnOnce()) -> Vec<(Request, Responder)> {
        let mut early = lock(&self.early);
        publish();
        std::mem::take(&mut *early)
    }

    /// Sets the members this server serves (`nodes` that pass `serves`), whose certificates
    /// must state their (role, dc, rank).
    pub(crate) fn set_members<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a NodeInfo>,
        serves: impl Fn(&NodeInfo) -> bool,
    ) {
        let m = nodes
            .into_iter()
            .filter(|n| serves(n))
            .filter_map(|n| Some((n.id, CertIdentity::new(&n.role, n.dc, n.rank).ok()?)))
            .collect();
        let _ = self.members.set(m);
    }

    /// Why `peer`'s certificate may not speak for member `id` (`None`: it may, or the
    /// connection is plaintext).
    fn certificate_refusal(&self, id: u32, peer: &PeerHandle) -> Option<String> {
        let cert = peer.identity()?;
        match self.members.get().and_then(|m| m.get(&id)) {
            Some(want) if want == cert => None,
            Some(want) => Some(format!(
                "the certificate of {cert} may not speak for node {id} ({want})"
            )),
            None => Some(format!(
                "the certificate of {cert} names no member this server serves (node {id})"
            )),
        }
    }

    /// Binds member `id` to `peer`'s connection unless another connection holds it or the
    /// connection's certificate names someone else.
    fn claim(&self, id: u32, peer: &PeerHandle) -> Result<(), String> {
        if let Some(why) = self.certificate_refusal(id, peer) {
            return Err(why);
        }
        let conn = peer.conn_id();
        if *lock(&self.bound).entry(id).or_insert(conn) == conn {
            Ok(())
        } else {
            Err(format!(
                "node {id} is already connected; a second connection may not speak for it"
            ))
        }
    }

    /// [`Admission::claim`] for the connection of `reply`, with the refusal's message.
    pub(crate) fn bind(&self, id: u32, reply: &Responder) -> Result<(), String> {
        self.claim(id, &reply.peer())
    }

    /// True when `peer` is the connection holding its announced id (its loss is the member's).
    pub(crate) fn holds(&self, peer: &PeerHandle) -> bool {
        lock(&self.bound).get(&peer.node_id()) == Some(&peer.conn_id())
    }

    /// Frees the id `peer` holds (its connection closed), so that the member's next connection
    /// may claim it: a restarted process under `resilience.lost_worker = "continue"`.
    pub(crate) fn release(&self, peer: &PeerHandle) {
        let mut bound = lock(&self.bound);
        if bound.get(&peer.node_id()) == Some(&peer.conn_id()) {
            bound.remove(&peer.node_id());
        }
    }

    /// Refuses a request: error reply, warning, count. Never fatal.
    pub(crate) fn refuse(&self, reply: Responder, msg: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %reply.peer().addr(), %msg, "request refused");
        let _ = reply.error(&msg);
    }

    /// Requests refused so far.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::park_pull;

    #[test]
    fn pulls_park_up_to_the_cap_and_the_rest_come_back() {
        let mut pulls = Vec::new();
        for i in 0..3u32 {
            assert_eq!(park_pull(&mut pulls, 3, 1, 5, i), None);
        }
        assert_eq!(park_pull(&mut pulls, 3, 1, 5, 9), Some(9));
        assert_eq!(pulls.len(), 3);
        pulls.pop();
        assert_eq!(park_pull(&mut pulls, 3, 2, 6, 10), None);
        assert_eq!(pulls.last(), Some(&(2, 6, 10)));
    }
}
