//! TCP congestion control per connection (`TCP_CONGESTION`, Linux).
//!
//! On a lossy WAN the choice decides TCP's throughput more than anything else: a loss-based
//! algorithm (cubic, reno) reads random loss as congestion and shrinks its window, so at 1 %
//! loss and a 20 ms round trip a cubic flow moves a few Mbit/s whatever the link's bandwidth,
//! where BBR, which paces at its measured bandwidth, keeps most of it (docs/benchmarks.md, "DGT
//! under loss"). The system default (`net.ipv4.tcp_congestion_control`) is usually cubic. A
//! process may set, per socket, any algorithm the kernel has (`tcp_available_congestion_control`;
//! root may load modules); an unprivileged one only those in
//! `net.ipv4.tcp_allowed_congestion_control`.

use std::net::TcpStream;

/// Why an algorithm cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CongestionError {
    /// Not of the form the kernel accepts.
    #[error(
        "{0:?} is not a congestion control name (1 to {MAX_NAME_LEN} ASCII letters, digits, '_' \
         or '-')"
    )]
    BadName(String),
    /// The kernel refused it: not available, or not allowed to this user (`reason` says which,
    /// with the kernel's list).
    #[error("the kernel refused congestion control {name:?}: {reason}")]
    Refused {
        /// The algorithm.
        name: String,
        /// The kernel's error and its list of algorithms.
        reason: String,
    },
    /// No socket could be opened to try it.
    #[error("opening a TCP socket to try congestion control {name:?}: {reason}")]
    NoSocket {
        /// The algorithm.
        name: String,
        /// The error.
        reason: String,
    },
}

/// Longest algorithm name the kernel accepts (`TCP_CA_NAME_MAX` less the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;

/// A congestion control algorithm's name, checked by [`validate_name`] (a `Copy` value, so
/// that options holding it stay `Copy`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Algorithm {
    name: [u8; MAX_NAME_LEN],
    len: u8,
}

impl Algorithm {
    /// The algorithm called `name` (its form checked, not the kernel's support: see [`check`]).
    pub fn new(name: &str) -> Result<Algorithm, CongestionError> {
        validate_name(name)?;
        let mut a = Algorithm {
            name: [0; MAX_NAME_LEN],
            len: name.len() as u8,
        };
        a.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(a)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only ASCII went in (validate_name).
        std::str::from_utf8(&self.name[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = CongestionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::new(s)
    }
}

/// Checks the form of an algorithm name: 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `_` or
/// `-`. Whether the kernel has it is [`check`]'s question.
pub fn validate_name(name: &str) -> Result<(), CongestionError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CongestionError::BadName(name.to_string()))
    }
}

/// Sets a socket's congestion control to `algo`: a connected [`TcpStream`], or a
/// [`std::net::TcpListener`], whose accepted connections inherit it (any socket `socket2`
/// can borrow).
pub fn set<'s, S>(sock: &'s S, algo: Algorithm) -> std::io::Result<()>
where
    socket2::SockRef<'s>: From<&'s S>,
{
    let name = algo.as_str();
    imp::set_sock(&socket2::SockRef::from(sock), name).map_err(|e| annotate(name, e))
}

fn annotate(name: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(
        e.kind(),
        format!("setting TCP congestion control {name:?}: {e}{}", hint(&e)),
    )
}

/// `stream`'s congestion control.
pub fn get(stream: &TcpStream) -> std::io::Result<String> {
    imp::get(stream)
}

/// Whether this process can give a TCP socket the congestion control `name`: it opens a
/// socket (no connection) and tries. The error says why not, with the kernel's lists.
pub fn check(algo: Algorithm) -> Result<(), CongestionError> {
    let name = algo.as_str().to_string();
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| {
            CongestionError::NoSocket {
                name: name.clone(),
                reason: e.to_string(),
            }
        })?;
    imp::set_sock(&sock, &name).map_err(|e| CongestionError::Refused {
        reason: format!("{e}{}", hint(&e)),
        name,
    })
}

/// The kernel's lists, to name in an error.
fn hint(e: &std::io::Error) -> String {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"))
            .map(|s| s.trim().to_string())
            .ok()
    };
    match (
        e.raw_os_error(),
        read("tcp_available_congestion_control"),
        read("tcp_allowed_congestion_control"),
    ) {
        (Some(libc::ENOENT), Some(av), _) => format!(" (available: {av})"),
        (Some(libc::EPERM), _, Some(al)) => {
            format!(" (an unprivileged process may use only: {al})")
        }
        _ => String::new(),
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::net::TcpStream;

    pub(super) fn set_sock(sock: &socket2::Socket, name: &str) -> std::io::Result<()> {
        sock.set_tcp_congestion(name.as_bytes())
    }

    pub(super) fn get(stream: &TcpStream) -> std::io::Result<String> {
        let raw = socket2::SockRef::from(stream).tcp_congestion()?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Ok(String::from_utf8_lossy(&raw[..end]).into_owned())
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::net::TcpStream;

    fn unsupported() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "choosing the TCP congestion control per socket needs Linux",
        )
    }

    pub(super) fn set_sock(_: &socket2::Socket, _: &str) -> std::io::Result<()> {
        Err(unsupported())
    }

    pub(super) fn get(_: &TcpStream) -> std::io::Result<String> {
        Err(unsupported())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "cubic\0", "a b", "x/y", "sixteen-chars-xx", "bbré"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
            assert_eq!(
                Algorithm::new(bad),
                Err(CongestionError::BadName(bad.to_string()))
            );
        }
        for good in ["reno", "bbr", "cubic", "tcp_x-1", "fifteen-chars-x"] {
            let a: Algorithm = good.parse().unwrap();
            assert_eq!(a.as_str(), good);
            assert_eq!(a.to_string(), good);
        }
    }

    #[test]
    fn reno_is_set_on_a_connection_and_an_unknown_one_is_refused_with_the_list() {
        // reno is built into every Linux kernel and always allowed.
        let reno = Algorithm::new("reno").unwrap();
        let unknown = Algorithm::new("no-such-cc").unwrap();
        check(reno).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set(&c, reno).unwrap();
        assert_eq!(get(&c).unwrap(), "reno");
        let e = check(unknown).unwrap_err();
        assert!(
            matches!(&e, CongestionError::Refused { name, .. } if name == "no-such-cc"),
            "{e}"
        );
        assert!(e.to_string().contains("\"no-such-cc\""), "{e}");
        let e = set(&c, unknown).unwrap_err().to_string();
        assert!(e.contains("no-such-cc"), "{e}");
        assert_eq!(get(&c).unwrap(), "reno", "a refused name changes nothing");
    }
}
