//! Bounds on connections in their TLS handshake, shared by every server that authenticates its
//! peers (the key-value servers and the DGT receiver): a connection holds a [`HandshakeSlot`]
//! from its acceptance until its handshake ends, and none is accepted past
//! [`MAX_HANDSHAKES`] in all or [`MAX_HANDSHAKES_PER_ADDR`] from one remote address. A stranger
//! who opens silent connections from one host therefore holds a few slots, each for the
//! handshake timeout at most, and members from other hosts still get theirs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// At most this many connections may be in their TLS handshake at once, per server…
pub const MAX_HANDSHAKES: usize = 64;

/// …and at most this many of them from one IP address other than loopback. Loopback peers are
/// processes of this host: behind the WAN lab's userspace relays every process of a job
/// connects from 127.0.0.1, and a whole cluster registering at once must not be refused.
pub const MAX_HANDSHAKES_PER_ADDR: usize = 8;

/// Whether one more handshake from `ip` fits, with `total` in flight and `mine` from `ip`.
fn fits(total: usize, mine: usize, ip: IpAddr) -> bool {
    total < MAX_HANDSHAKES && (ip.is_loopback() || mine < MAX_HANDSHAKES_PER_ADDR)
}

/// The handshakes in flight at one server, per remote address (cheap to clone: shared).
#[derive(Debug, Clone, Default)]
pub struct HandshakeSlots {
    by_addr: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl HandshakeSlots {
    /// No handshake in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// A slot for a connection from `ip`, or `None` when a bound is reached (the caller closes
    /// the connection at once).
    pub fn take(&self, ip: IpAddr) -> Option<HandshakeSlot> {
        let mut h = self.by_addr.lock().unwrap_or_else(PoisonError::into_inner);
        let total: usize = h.values().sum();
        let mine = h.entry(ip).or_insert(0);
        if !fits(total, *mine, ip) {
            if *mine == 0 {
                h.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        Some(HandshakeSlot {
            slots: self.clone(),
            ip,
        })
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        let h = self.by_addr.lock().unwrap_or_else(PoisonError::into_inner);
        h.values().sum()
    }
}

/// One connection counted in its server's [`HandshakeSlots`] until dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    slots: HandshakeSlots,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut h = self
            .slots
            .by_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = h.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                h.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_bounded_per_remote_address_and_in_all() {
        let remote: IpAddr = [198, 18, 1, 2].into();
        let local: IpAddr = [127, 0, 0, 1].into();
        assert!(fits(0, 0, remote));
        assert!(fits(10, MAX_HANDSHAKES_PER_ADDR - 1, remote));
        assert!(!fits(10, MAX_HANDSHAKES_PER_ADDR, remote));
        // A one-host cluster behind the userspace relays connects from loopback only.
        assert!(fits(20, 20, local));
        assert!(fits(20, 20, std::net::Ipv6Addr::LOCALHOST.into()));
        assert!(!fits(MAX_HANDSHAKES, 0, local));
        assert!(!fits(MAX_HANDSHAKES, 0, remote));
    }

    #[test]
    fn slots_are_counted_until_dropped() {
        let slots = HandshakeSlots::new();
        let stranger: IpAddr = [198, 18, 1, 2].into();
        let member: IpAddr = [198, 18, 2, 2].into();
        let held: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_ADDR)
            .map(|_| slots.take(stranger).expect("within the per-address bound"))
            .collect();
        assert!(slots.take(stranger).is_none(), "a ninth from one address");
        let m = slots
            .take(member)
            .expect("another address still gets a slot");
        assert_eq!(slots.in_flight(), MAX_HANDSHAKES_PER_ADDR + 1);
        drop(held);
        assert_eq!(slots.in_flight(), 1);
        assert!(slots.take(stranger).is_some(), "freed when dropped");
        drop(m);
        // Loopback fills the whole bound, and then nothing else fits.
        let local: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES)
            .map(|_| slots.take([127, 0, 0, 1].into()).expect("loopback"))
            .collect();
        assert!(slots.take(member).is_none());
        drop(local);
        assert_eq!(slots.in_flight(), 0);
        assert!(slots.by_addr.lock().unwrap().is_empty(), "no empty entries");
    }
}
