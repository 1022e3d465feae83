//! Bounds on connections in their TLS handshake, shared by every server that authenticates its
//! peers (the key-value servers and the DGT receiver): a connection holds a [`HandshakeSlot`]
//! from its acceptance until its handshake ends. Connections from member hosts (addresses a
//! member completed a handshake from, [`MemberHosts`]) have a pool of [`MAX_HANDSHAKES`] of
//! their own; everyone else shares another as large, of which at most
//! [`MAX_HANDSHAKES_PER_ADDR`] from one remote address. A stranger who opens silent connections
//! from one host therefore holds a few slots, each for the handshake timeout at most; from many
//! hosts it can fill the strangers' pool, but not the members'.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// At most this many connections may be in their TLS handshake at once, per server…
pub const MAX_HANDSHAKES: usize = 64;

/// …and at most this many of them from one IP address other than loopback. Loopback peers are
/// processes of this host: behind the WAN lab's userspace relays every process of a job
/// connects from 127.0.0.1, and a whole cluster registering at once must not be refused.
pub const MAX_HANDSHAKES_PER_ADDR: usize = 8;

/// Most addresses a [`MemberHosts`] remembers: one per process of the largest job.
pub const MAX_MEMBER_HOSTS: usize = crate::coord::MAX_NODES;

/// Whether one more handshake from `ip`, a stranger's address, fits, with `total` strangers'
/// handshakes in flight and `mine` from `ip`.
fn fits(total: usize, mine: usize, ip: IpAddr) -> bool {
    total < MAX_HANDSHAKES && (ip.is_loopback() || mine < MAX_HANDSHAKES_PER_ADDR)
}

/// The addresses of the peers that completed a mutual-TLS handshake (either side) under one
/// [`super::TlsContext`], shared by every server and client of the process that uses it: the
/// hosts of the job's members. Their new connections take handshake slots from a pool of their
/// own, which strangers' connections cannot fill: once a member host has proven itself, a flood
/// from any number of other addresses no longer delays its handshakes (a restarted process, a
/// local server's DGT link after its key-value connections, a reconnect).
#[derive(Debug, Default)]
pub struct MemberHosts {
    ips: Mutex<HashSet<IpAddr>>,
}

impl MemberHosts {
    /// Remembers `ip` as a member host (at most [`MAX_MEMBER_HOSTS`] addresses).
    pub fn note(&self, ip: IpAddr) {
        let mut ips = self.ips.lock().unwrap_or_else(PoisonError::into_inner);
        if ips.len() < MAX_MEMBER_HOSTS {
            ips.insert(ip);
        }
    }

    /// Whether a member completed a handshake from (or at) `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ips = self.ips.lock().unwrap_or_else(PoisonError::into_inner);
        ips.contains(&ip)
    }
}

/// The handshakes in flight, per pool and per stranger's address.
#[derive(Debug, Default)]
struct Counts {
    /// Strangers' handshakes per remote address.
    by_addr: HashMap<IpAddr, usize>,
    /// Strangers' handshakes in all.
    strangers: usize,
    /// Member hosts' handshakes in all.
    members: usize,
}

/// The handshakes in flight at one server (cheap to clone: shared): [`MAX_HANDSHAKES`] for
/// member hosts ([`MemberHosts`]), and as many for strangers, of which at most
/// [`MAX_HANDSHAKES_PER_ADDR`] from one address other than loopback.
#[derive(Debug, Clone, Default)]
pub struct HandshakeSlots {
    counts: Arc<Mutex<Counts>>,
}

impl HandshakeSlots {
    /// No handshake in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// A slot for a connection from `ip` (a member host's when `member_host`), or `None` when
    /// its pool is full (the caller closes the connection at once).
    pub fn take(&self, ip: IpAddr, member_host: bool) -> Option<HandshakeSlot> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if member_host {
            if c.members >= MAX_HANDSHAKES {
                return None;
            }
            c.members += 1;
        } else {
            let mine = c.by_addr.get(&ip).copied().unwrap_or(0);
            if !fits(c.strangers, mine, ip) {
                return None;
            }
            c.strangers += 1;
            *c.by_addr.entry(ip).or_insert(0) += 1;
        }
        Some(HandshakeSlot {
            slots: self.clone(),
            ip,
            member_host,
        })
    }

    /// Handshakes in flight now, in both pools.
    pub fn in_flight(&self) -> usize {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.strangers + c.members
    }
}

/// One connection counted in its server's [`HandshakeSlots`] until dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    slots: HandshakeSlots,
    ip: IpAddr,
    member_host: bool,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut c = self
            .slots
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.member_host {
            c.members -= 1;
            return;
        }
        c.strangers -= 1;
        if let Some(n) = c.by_addr.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_addr.remove(&self.ip);
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
        let other: IpAddr = [198, 18, 2, 2].into();
        let held: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_ADDR)
            .map(|_| {
                slots
                    .take(stranger, false)
                    .expect("within the bound per address")
            })
            .collect();
        assert!(
            slots.take(stranger, false).is_none(),
            "a ninth from one address"
        );
        let o = slots
            .take(other, false)
            .expect("another address still gets a slot");
        assert_eq!(slots.in_flight(), MAX_HANDSHAKES_PER_ADDR + 1);
        drop(held);
        assert_eq!(slots.in_flight(), 1);
        assert!(slots.take(stranger, false).is_some(), "freed when dropped");
        drop(o);
        // Strangers from loopback (or from many addresses) fill their whole pool; a member host
        // still gets a slot from its own, which is bounded too.
        let local: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES)
            .map(|_| slots.take([127, 0, 0, 2].into(), false).expect("loopback"))
            .collect();
        assert!(slots.take(other, false).is_none());
        let members: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES)
            .map(|_| slots.take(other, true).expect("a member host's pool"))
            .collect();
        assert!(slots.take(other, true).is_none());
        assert_eq!(slots.in_flight(), 2 * MAX_HANDSHAKES);
        drop((local, members));
        assert_eq!(slots.in_flight(), 0);
        let c = slots.counts.lock().unwrap();
        assert!(c.by_addr.is_empty(), "no empty entries");
    }

    #[test]
    fn member_hosts_are_remembered_up_to_a_bound() {
        let hosts = MemberHosts::default();
        let ip: IpAddr = [198, 18, 1, 2].into();
        assert!(!hosts.contains(ip));
        hosts.note(ip);
        hosts.note(ip);
        assert!(hosts.contains(ip));
        for i in 0..MAX_MEMBER_HOSTS as u32 + 10 {
            hosts.note(std::net::Ipv4Addr::from(i).into());
        }
        assert_eq!(hosts.ips.lock().unwrap().len(), MAX_MEMBER_HOSTS);
    }
}
