//! Bounds on connections in their TLS handshake, shared by every server that authenticates its
//! peers (the key-value servers and the DGT receiver): a connection holds a [`HandshakeSlot`]
//! from its acceptance until its handshake ends. Connections from member hosts (addresses a
//! member completed a handshake from, [`MemberHosts`]) have a pool of [`MAX_HANDSHAKES`] of
//! their own; everyone else shares another as large, of which at most
//! [`MAX_HANDSHAKES_PER_ADDR`] from one remote address. A stranger who opens silent connections
//! from one host therefore holds a few slots, each for the handshake timeout at most; from many
//! hosts it can fill the strangers' pool, but not the members'.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::TlsContext;

/// At most this many connections may be in their TLS handshake at once, per server…
pub const MAX_HANDSHAKES: usize = 64;

/// …and at most this many of them from one IP address other than loopback. Loopback peers are
/// processes of this host: behind the WAN lab's userspace relays every process of a job
/// connects from 127.0.0.1, and a whole cluster registering at once must not be refused.
pub const MAX_HANDSHAKES_PER_ADDR: usize = 8;

/// How long a stranger's handshake is left alone when the strangers' pool is full: older ones
/// may be ended to make room for a new connection.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

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

/// A stranger's handshake in flight, which may be ended to make room
/// ([`EVICT_AFTER`]).
#[derive(Debug)]
struct InFlight {
    ip: IpAddr,
    since: Instant,
    /// A handle on the connection, to shut it down (none if the socket could not be cloned).
    conn: Option<TcpStream>,
}

/// The handshakes in flight, per pool and per stranger's address.
#[derive(Debug, Default)]
struct Counts {
    /// Strangers' handshakes per remote address.
    by_addr: HashMap<IpAddr, usize>,
    /// Strangers' handshakes, by slot id.
    strangers: HashMap<u64, InFlight>,
    /// Member hosts' handshakes in all.
    members: usize,
    next_id: u64,
}

impl Counts {
    /// Forgets stranger `id`'s handshake; whether it was still counted (not evicted).
    fn forget(&mut self, id: u64) -> Option<InFlight> {
        let f = self.strangers.remove(&id)?;
        if let Some(n) = self.by_addr.get_mut(&f.ip) {
            *n -= 1;
            if *n == 0 {
                self.by_addr.remove(&f.ip);
            }
        }
        Some(f)
    }

    /// Ends the oldest stranger's handshake in flight for [`EVICT_AFTER`] or longer, if any;
    /// whether one was ended.
    fn evict_oldest(&mut self, now: Instant) -> bool {
        let oldest = self
            .strangers
            .iter()
            .filter(|(_, f)| f.conn.is_some() && now.duration_since(f.since) >= EVICT_AFTER)
            .min_by_key(|(id, f)| (f.since, **id))
            .map(|(id, _)| *id);
        let Some(f) = oldest.and_then(|id| self.forget(id)) else {
            return false;
        };
        if let Some(c) = f.conn {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        true
    }
}

/// The handshakes in flight at one server (cheap to clone: shared): [`MAX_HANDSHAKES`] for
/// member hosts ([`MemberHosts`]), and as many for strangers, of which at most
/// [`MAX_HANDSHAKES_PER_ADDR`] from one address other than loopback. When the strangers' pool is
/// full, a new connection ends the oldest stranger's handshake that has lasted [`EVICT_AFTER`]
/// (a member's handshake takes a few round trips): to keep a newcomer out, strangers must open
/// more than [`MAX_HANDSHAKES`] connections per [`EVICT_AFTER`], not a few per handshake timeout.
#[derive(Debug, Clone, Default)]
pub struct HandshakeSlots {
    counts: Arc<Mutex<Counts>>,
}

impl HandshakeSlots {
    /// No handshake in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// A slot for connection `conn` from `ip`, about to be authenticated under `ctx` (from the
    /// member hosts' pool when `ctx` has met `ip`), or `None` when its pool is full (the caller
    /// closes the connection at once).
    pub fn take(&self, ip: IpAddr, ctx: &TlsContext, conn: &TcpStream) -> Option<HandshakeSlot> {
        let member_host = ctx.member_hosts().contains(ip);
        self.take_at(ip, member_host, conn, Instant::now())
    }

    /// [`HandshakeSlots::take`] at time `now`.
    fn take_at(
        &self,
        ip: IpAddr,
        member_host: bool,
        conn: &TcpStream,
        now: Instant,
    ) -> Option<HandshakeSlot> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let id = c.next_id;
        c.next_id += 1;
        if member_host {
            if c.members >= MAX_HANDSHAKES {
                return None;
            }
            c.members += 1;
        } else {
            let mine = c.by_addr.get(&ip).copied().unwrap_or(0);
            let room = |c: &Counts| fits(c.strangers.len(), mine, ip);
            // A full pool makes room by ending its oldest handshake, unless this address is at
            // its own bound.
            let fits_now = room(&c) || (mine_fits(mine, ip) && c.evict_oldest(now) && room(&c));
            if !fits_now {
                return None;
            }
            *c.by_addr.entry(ip).or_insert(0) += 1;
            let f = InFlight {
                ip,
                since: now,
                conn: conn.try_clone().ok(),
            };
            c.strangers.insert(id, f);
        }
        Some(HandshakeSlot {
            slots: self.clone(),
            id,
            member_host,
            released: false,
        })
    }

    /// Handshakes in flight now, in both pools.
    pub fn in_flight(&self) -> usize {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.strangers.len() + c.members
    }
}

/// Whether `ip` may start one more handshake with `mine` in flight, whatever the total.
fn mine_fits(mine: usize, ip: IpAddr) -> bool {
    ip.is_loopback() || mine < MAX_HANDSHAKES_PER_ADDR
}

/// One connection counted in its server's [`HandshakeSlots`] until released or dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    slots: HandshakeSlots,
    id: u64,
    member_host: bool,
    released: bool,
}

impl HandshakeSlot {
    /// Ends the count once the handshake is over; whether the connection is still usable:
    /// `false` when the slot was evicted meanwhile ([`HandshakeSlots`]), which shut it down.
    /// After this, the connection is the caller's and no eviction touches it.
    pub fn release(mut self) -> bool {
        self.end()
    }

    /// Stops counting this slot (once); whether it was still counted (not evicted).
    fn end(&mut self) -> bool {
        if std::mem::replace(&mut self.released, true) {
            return false;
        }
        let mut c = self
            .slots
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.member_host {
            c.members -= 1;
            return true;
        }
        c.forget(self.id).is_some()
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.end();
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

    /// A connected loopback pair: (ours, the peer's end).
    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        (ours, theirs)
    }

    #[test]
    fn slots_are_counted_until_dropped() {
        let slots = HandshakeSlots::new();
        let (conn, _peer) = pair();
        let stranger: IpAddr = [198, 18, 1, 2].into();
        let other: IpAddr = [198, 18, 2, 2].into();
        let take = |ip, member| slots.take_at(ip, member, &conn, Instant::now());
        let held: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_ADDR)
            .map(|_| take(stranger, false).expect("within the bound per address"))
            .collect();
        assert!(take(stranger, false).is_none(), "a ninth from one address");
        let o = take(other, false).expect("another address still gets a slot");
        assert_eq!(slots.in_flight(), MAX_HANDSHAKES_PER_ADDR + 1);
        drop(held);
        assert_eq!(slots.in_flight(), 1);
        assert!(take(stranger, false).is_some(), "freed when dropped");
        assert!(o.release(), "not evicted");
        assert_eq!(
            slots.in_flight(),
            0,
            "released once, not again when dropped"
        );
        // Strangers from loopback (or from many addresses) fill their whole pool; a member host
        // still gets a slot from its own, which is bounded too.
        let local: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES)
            .map(|_| take([127, 0, 0, 2].into(), false).expect("loopback"))
            .collect();
        assert!(take(other, false).is_none(), "nothing old enough to evict");
        let members: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES)
            .map(|_| take(other, true).expect("a member host's pool"))
            .collect();
        assert!(take(other, true).is_none());
        assert_eq!(slots.in_flight(), 2 * MAX_HANDSHAKES);
        drop((local, members));
        assert_eq!(slots.in_flight(), 0);
        let c = slots.counts.lock().unwrap();
        assert!(c.by_addr.is_empty(), "no empty entries");
    }

    #[test]
    fn a_full_strangers_pool_makes_room_by_ending_its_oldest_handshake() {
        let slots = HandshakeSlots::new();
        let t0 = Instant::now();
        let flood: Vec<(TcpStream, TcpStream)> = (0..MAX_HANDSHAKES).map(|_| pair()).collect();
        let held: Vec<HandshakeSlot> = flood
            .iter()
            .enumerate()
            .map(|(i, (c, _))| {
                let at = t0 + Duration::from_millis(i as u64);
                slots.take_at([127, 0, 0, 2].into(), false, c, at).unwrap()
            })
            .collect();
        let (newcomer, _peer) = pair();
        let ip: IpAddr = [198, 18, 2, 2].into();
        let young = t0 + EVICT_AFTER / 2;
        assert!(
            slots.take_at(ip, false, &newcomer, young).is_none(),
            "none old enough"
        );
        let later = t0 + EVICT_AFTER + Duration::from_millis(10);
        let admitted = slots
            .take_at(ip, false, &newcomer, later)
            .expect("room made");
        assert_eq!(slots.in_flight(), MAX_HANDSHAKES);
        // The oldest was ended: its peer reads the end of the stream, and it is not usable.
        let mut theirs = flood[0].1.try_clone().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut theirs, &mut b).unwrap(), 0);
        let mut held = held.into_iter();
        assert!(!held.next().unwrap().release(), "evicted");
        assert!(held.next().unwrap().release(), "the second oldest was not");
        // More from the newcomer's address make room too (the pool stays full), up to that
        // address's bound, past which nobody is evicted.
        let own: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_ADDR - 1)
            .map(|_| slots.take_at(ip, false, &newcomer, later).unwrap())
            .collect();
        assert_eq!(slots.in_flight(), MAX_HANDSHAKES);
        let full = later + EVICT_AFTER * 2;
        assert!(slots.take_at(ip, false, &newcomer, full).is_none());
        assert_eq!(slots.in_flight(), MAX_HANDSHAKES);
        drop((held, own, admitted));
        assert_eq!(slots.in_flight(), 0);
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
