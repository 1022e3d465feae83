//! Policy-routing rules of a namespace over rtnetlink, without starting `ip`: the WAN lab's link
//! cuts ([`super::Lab::cut`]) must take effect at once, and on a loaded machine whose delay relay
//! keeps the CPUs busy, starting `ip -n …` (which unshares a mount namespace and remounts sysfs)
//! was measured to take 2–10 s.
//!
//! [`RuleSocket::open`] creates a `NETLINK_ROUTE` socket inside a namespace; the socket stays
//! bound to that namespace whichever thread uses it. [`rule_message`] is the pure part (the
//! message bytes, unit-tested); [`RuleSocket::blackhole`] sends one and reads the kernel's ack.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use super::netns::Netns;
use super::WanLabError;

/// `RTM_NEWRULE` / `RTM_DELRULE` (linux/rtnetlink.h).
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
/// `NLMSG_ERROR`: the ack (error 0) or the failure of a request.
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// `FRA_DST`, `FRA_SRC`, `FRA_PRIORITY` (linux/fib_rules.h).
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_PRIORITY: u16 = 6;
/// `FR_ACT_BLACKHOLE`: drop silently.
const FR_ACT_BLACKHOLE: u8 = 6;
/// `RT_TABLE_UNSPEC`.
const TABLE_UNSPEC: u8 = 0;
const NLMSG_HDR: usize = 16;
const FIB_RULE_HDR: usize = 12;

/// Which packets a rule matches: those from an address, or those to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source address.
    From,
    /// Destination address.
    To,
}

fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The netlink request that adds (`add`) or deletes a rule `from|to ADDR/32 priority PRIO
/// blackhole`, with sequence number `seq` (as `ip rule add from ADDR priority PRIO blackhole`).
pub fn rule_message(seq: u32, add: bool, dir: Direction, addr: Ipv4Addr, prio: u32) -> Vec<u8> {
    let (kind, flags) = if add {
        (
            RTM_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK)
    };
    let mut m = vec![0u8; NLMSG_HDR];
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let (dst_len, src_len) = match dir {
        Direction::From => (0, 32),
        Direction::To => (32, 0),
    };
    m.extend_from_slice(&[
        libc::AF_INET as u8,
        dst_len,
        src_len,
        0,
        TABLE_UNSPEC,
        0,
        0,
        FR_ACT_BLACKHOLE,
    ]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    debug_assert_eq!(m.len(), NLMSG_HDR + FIB_RULE_HDR);
    let which = match dir {
        Direction::From => FRA_SRC,
        Direction::To => FRA_DST,
    };
    attr(&mut m, which, &addr.octets());
    attr(&mut m, FRA_PRIORITY, &prio.to_ne_bytes());
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// The kernel's answer to request `seq`: `Ok(0)` for the ack, `Ok(errno)` for a refusal, `Err`
/// for bytes that are no answer to it.
pub fn parse_ack(buf: &[u8], seq: u32) -> Result<i32, String> {
    let mut at = 0;
    while buf.len() >= at + NLMSG_HDR {
        let h = &buf[at..];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let s = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        if len < NLMSG_HDR || at + len > buf.len() {
            return Err(format!("a netlink message of {len} bytes in {}", buf.len()));
        }
        if kind == NLMSG_ERROR && s == seq && len >= NLMSG_HDR + 4 {
            let e = i32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
            return Ok(-e);
        }
        at += len.next_multiple_of(4);
    }
    Err(format!("no answer to request {seq}"))
}

/// A `NETLINK_ROUTE` socket bound to one namespace.
#[derive(Debug)]
pub struct RuleSocket {
    fd: OwnedFd,
    seq: Mutex<u32>,
}

impl RuleSocket {
    /// Opens the socket inside `ns`.
    pub fn open(ns: &Netns) -> Result<Self, WanLabError> {
        let fd = ns.run(|| {
            // SAFETY: socket(2) with constant arguments; the fd is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        let fd = fd.map_err(|e| WanLabError::io(format!("rtnetlink in {}", ns.name()), e))?;
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Self {
            fd,
            seq: Mutex::new(0),
        })
    }

    /// Adds (`on`) or removes the blackhole rule for packets `dir` `addr` at priority `prio`.
    /// Adding a rule that exists, or removing one that does not, succeeds.
    pub fn blackhole(
        &self,
        dir: Direction,
        addr: Ipv4Addr,
        prio: u32,
        on: bool,
    ) -> Result<(), WanLabError> {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let msg = rule_message(*seq, on, dir, addr, prio);
        let what = || {
            format!(
                "{} the rule {dir:?} {addr} blackhole",
                if on { "adding" } else { "removing" }
            )
        };
        // SAFETY: sending our own buffer on our socket (to the kernel: zeroed sockaddr_nl).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(WanLabError::io(what(), std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: receiving into our own buffer of that length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(WanLabError::io(what(), std::io::Error::last_os_error()));
            }
            match parse_ack(&buf[..n as usize], *seq) {
                Ok(0) => return Ok(()),
                Ok(libc::EEXIST) if on => return Ok(()),
                Ok(libc::ENOENT) if !on => return Ok(()),
                Ok(e) => {
                    return Err(WanLabError::io(
                        what(),
                        std::io::Error::from_raw_os_error(e),
                    ))
                }
                // An answer to an earlier request that timed out: read on.
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_request_is_laid_out_as_ip_rule_sends_it() {
        let m = rule_message(7, true, Direction::From, Ipv4Addr::new(198, 18, 2, 2), 1);
        // 16 header + 12 fib_rule_hdr + 8 FRA_SRC + 8 FRA_PRIORITY.
        assert_eq!(m.len(), 44);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 44);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWRULE);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x605);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[16..24], &[2, 0, 32, 0, 0, 0, 0, FR_ACT_BLACKHOLE]);
        assert_eq!(u16::from_ne_bytes([m[30], m[31]]), FRA_SRC);
        assert_eq!(&m[32..36], &[198, 18, 2, 2]);
        assert_eq!(u16::from_ne_bytes([m[38], m[39]]), FRA_PRIORITY);
        assert_eq!(u32::from_ne_bytes(m[40..44].try_into().unwrap()), 1);
        let d = rule_message(8, false, Direction::To, Ipv4Addr::new(10, 0, 0, 1), 1);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), RTM_DELRULE);
        assert_eq!(u16::from_ne_bytes([d[6], d[7]]), 0x5);
        assert_eq!((d[17], d[18]), (32, 0));
        assert_eq!(u16::from_ne_bytes([d[30], d[31]]), FRA_DST);
    }

    #[test]
    fn acks_and_refusals_are_read_and_garbage_is_not() {
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(parse_ack(&ack, 3), Ok(0));
        ack[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(parse_ack(&ack, 3), Ok(libc::EEXIST));
        assert!(parse_ack(&ack, 4).is_err(), "another request's answer");
        assert!(parse_ack(&ack[..10], 3).is_err());
        let mut bad = ack.clone();
        bad[0..4].copy_from_slice(&4000u32.to_ne_bytes());
        assert!(parse_ack(&bad, 3).is_err());
    }
}
