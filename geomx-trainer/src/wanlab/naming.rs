//! Names and addresses of the lab (wan-lab.md): prefix `gx<tag>`, tag = the process id in hex plus a
//! letter `g`–`z` for the second and later labs of one process, link i on `198.18.i.0/24`.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

/// Labs made by this process so far (the sequence letter of the next tag).
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Letters that may follow the hex pid in a tag (never hex digits, so the pid parses back).
const SEQ_LETTERS: &[u8] = b"ghijklmnopqrstuvwxyz";

/// The tag of one lab: every namespace and interface it makes starts with `gx<tag>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// The tag of the `seq`-th lab of process `pid` (`seq` 0 has no letter; it wraps after 21).
    pub fn new(pid: u32, seq: u32) -> Self {
        let seq = seq as usize % (SEQ_LETTERS.len() + 1);
        if seq == 0 {
            Self(format!("{pid:x}"))
        } else {
            Self(format!("{pid:x}{}", SEQ_LETTERS[seq - 1] as char))
        }
    }

    /// A fresh tag for a lab of this process.
    pub fn next_for_this_process() -> Self {
        Self::new(std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
    }

    /// The tag itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `gx<tag>`: what every name of this lab starts with.
    pub fn prefix(&self) -> String {
        format!("gx{}", self.0)
    }

    /// The router namespace.
    pub fn wan_ns(&self) -> String {
        format!("gx{}-wan", self.0)
    }

    /// The namespace behind link `i` (0 = central).
    pub fn node_ns(&self, i: usize) -> String {
        if i == 0 {
            format!("gx{}-c", self.0)
        } else {
            format!("gx{}-dc{i}", self.0)
        }
    }

    /// The node-side interface of link `i`.
    pub fn node_if(&self, i: usize) -> String {
        format!("gx{}-d{i}", self.0)
    }

    /// The router-side interface of link `i`.
    pub fn wan_if(&self, i: usize) -> String {
        format!("gx{}-w{i}", self.0)
    }

    /// The TUN device of the delay relay.
    pub fn tun_if(&self) -> String {
        format!("gx{}-t", self.0)
    }
}

/// Longest interface name Linux accepts.
pub const IFNAMSIZ_MAX: usize = 15;

/// Most links a lab may have (one `/24` of `198.18.0.0/16` each).
pub const MAX_LINKS: usize = 256;

/// The pid encoded in a lab name (namespace or interface) of the form `gx<hex>[g-z]-<suffix>`,
/// where the suffix is one this module makes; `None` for any other name.
pub fn parse_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("gx")?;
    let (tag, suffix) = rest.split_once('-')?;
    let hex_len = tag
        .bytes()
        .take_while(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .count();
    let (hex, letter) = tag.split_at(hex_len);
    if hex.is_empty() || hex.len() > 8 || letter.len() > 1 {
        return None;
    }
    if let Some(l) = letter.bytes().next() {
        if !SEQ_LETTERS.contains(&l) {
            return None;
        }
    }
    let numbered = |p: &str| {
        suffix
            .strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let ours =
        matches!(suffix, "wan" | "c" | "t") || numbered("dc") || numbered("d") || numbered("w");
    if !ours {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// Address of link `i`: `198.18.i.2` on the node side, `198.18.i.1` on the router side.
pub fn link_addr(i: usize, node_side: bool) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, i as u8, if node_side { 2 } else { 1 })
}

/// The link whose `/24` holds `addr`, if it is a lab address.
pub fn link_of(addr: Ipv4Addr) -> Option<usize> {
    let o = addr.octets();
    (o[0] == 198 && o[1] == 18).then_some(o[2] as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_parse_back() {
        for (pid, seq) in [(1u32, 0u32), (0x3f2a, 0), (4_194_304, 5), (u32::MAX, 20)] {
            let t = Tag::new(pid, seq);
            for name in [t.node_if(255), t.wan_if(255), t.tun_if()] {
                assert_eq!(parse_pid(&name), Some(pid), "{name}");
            }
            for name in [t.wan_ns(), t.node_ns(0), t.node_ns(7)] {
                assert_eq!(parse_pid(&name), Some(pid), "{name}");
            }
        }
        // Realistic pids (≤ 2^22) with two-digit links fit.
        let t = Tag::new(4_194_304, 20);
        assert!(t.node_if(99).len() <= IFNAMSIZ_MAX);
        assert_eq!(Tag::new(0x3f2a, 0).node_if(1), "gx3f2a-d1");
        assert_eq!(Tag::new(0x3f2a, 1).wan_ns(), "gx3f2ag-wan");
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for n in [
            "gx", "gx-wan", "gxzz-wan", "gx12-foo", "gx12gg-c", "gx12-dc", "gx12-dcx", "eth0",
            "gx12a", "gx12-w1x", "docker0",
        ] {
            assert_eq!(parse_pid(n), None, "{n}");
        }
    }

    #[test]
    fn addresses_map_to_links() {
        assert_eq!(link_addr(3, true), Ipv4Addr::new(198, 18, 3, 2));
        assert_eq!(link_addr(0, false), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(link_of(Ipv4Addr::new(198, 18, 3, 2)), Some(3));
        assert_eq!(link_of(Ipv4Addr::new(10, 18, 3, 2)), None);
        assert_eq!(link_of(Ipv4Addr::new(198, 19, 3, 2)), None);
    }
}
