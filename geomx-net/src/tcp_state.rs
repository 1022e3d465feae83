//! What the kernel knows of a TCP connection's progress (`TCP_INFO`, Linux).
//!
//! The liveness errors name it, because a silence has several causes that the connection alone
//! cannot tell apart: a dead host or a cut path (the peer's stack acknowledges nothing either),
//! a hung process, or a TCP flow towards us in retransmission backoff on a congested or lossy
//! link, whose timer doubles with each lost retransmission (0.2, 0.4, … 6.4 s: 12.6 s of
//! silence after six in a row; in the last two the peer's stack still acknowledges what we send
//! it), and a peer that stopped reading (zero-window probes, nothing unacknowledged).

use std::time::Duration;

/// A snapshot of one socket's `TCP_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpProgress {
    /// Since the peer's stack last acknowledged anything we sent.
    pub since_ack: Duration,
    /// Since data last reached our stack (in order or not).
    pub since_data: Duration,
    /// Segments we sent that the peer has not acknowledged.
    pub unacked: u32,
    /// Our retransmission timer's backoffs in a row (`tcpi_backoff`).
    pub backoff: u8,
    /// Zero-window probes outstanding: the peer's receive window is closed (it stopped reading).
    pub window_probes: u8,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// The peer's receive window, bytes: 0 when it stopped reading (`None`: a kernel older than
    /// 5.4 does not say).
    pub peer_window: Option<u32>,
}

impl TcpProgress {
    /// Reads `sock`'s `TCP_INFO`; `None` where the platform has none or the call fails.
    pub fn read<'s, S>(sock: &'s S) -> Option<TcpProgress>
    where
        socket2::SockRef<'s>: From<&'s S>,
    {
        imp::read(&socket2::SockRef::from(sock))
    }

    /// `"; TCP: …"` of `sock`, to end an error message with; empty where it cannot be read.
    pub fn suffix<'s, S>(sock: &'s S) -> String
    where
        socket2::SockRef<'s>: From<&'s S>,
    {
        Self::read(sock)
            .map(|t| format!("; {t}"))
            .unwrap_or_default()
    }
}

/// What the kernel measured of a TCP connection's path (`TCP_INFO`, Linux ≥ 4.9): the figures
/// that size a send buffer to the path ([`crate::sched::path_credit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRate {
    /// The lowest round-trip time seen (`tcpi_min_rtt`): the path's propagation delay.
    pub min_rtt: Duration,
    /// The most recent delivery-rate sample, bytes per second (`tcpi_delivery_rate`); 0 before
    /// the first acknowledged data.
    pub delivery_rate: u64,
}

impl TcpRate {
    /// Reads `sock`'s path figures; `None` where the platform or the kernel has none.
    pub fn read<'s, S>(sock: &'s S) -> Option<TcpRate>
    where
        socket2::SockRef<'s>: From<&'s S>,
    {
        Self::of(&socket2::SockRef::from(sock))
    }

    /// [`TcpRate::read`] of a socket2 socket.
    pub(crate) fn of(sock: &socket2::Socket) -> Option<TcpRate> {
        imp::read_rate(sock)
    }
}

impl std::fmt::Display for TcpProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TCP: peer's last ack {:.1} s ago, last data {:.1} s ago, {} unacked, backoff {}, \
             {} zero-window probes, {} retransmitted, rtt {:.2} ms",
            self.since_ack.as_secs_f64(),
            self.since_data.as_secs_f64(),
            self.unacked,
            self.backoff,
            self.window_probes,
            self.total_retrans,
            self.rtt.as_secs_f64() * 1e3,
        )?;
        match self.peer_window {
            Some(w) => write!(f, ", peer's window {w} bytes"),
            None => Ok(()),
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::{TcpProgress, TcpRate};

    /// The socket's `TCP_INFO` and how many bytes of it the kernel wrote (an older kernel
    /// writes fewer: only the fields inside that length are valid).
    fn info(sock: &socket2::Socket) -> Option<(libc::tcp_info, usize)> {
        // SAFETY: tcp_info is plain old data; all zeros is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is valid for `len` writable bytes; the kernel writes at most that many.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some((info, len as usize))
    }

    pub(super) fn read_rate(sock: &socket2::Socket) -> Option<TcpRate> {
        let (info, len) = info(sock)?;
        let end = std::mem::offset_of!(libc::tcp_info, tcpi_delivery_rate) + 8;
        (len >= end).then(|| TcpRate {
            min_rtt: Duration::from_micros(u64::from(info.tcpi_min_rtt)),
            delivery_rate: info.tcpi_delivery_rate,
        })
    }

    pub(super) fn read(sock: &socket2::Socket) -> Option<TcpProgress> {
        // The fields read here are in every kernel version's first part.
        let (info, len) = info(sock)?;
        let has = |end: usize| len >= end;
        let wnd = std::mem::offset_of!(libc::tcp_info, tcpi_snd_wnd);
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        Some(TcpProgress {
            since_ack: ms(info.tcpi_last_ack_recv),
            since_data: ms(info.tcpi_last_data_recv),
            unacked: info.tcpi_unacked,
            backoff: info.tcpi_backoff,
            window_probes: info.tcpi_probes,
            total_retrans: info.tcpi_total_retrans,
            rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
            peer_window: has(wnd + 4).then_some(info.tcpi_snd_wnd),
        })
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::{TcpProgress, TcpRate};

    pub(super) fn read(_: &socket2::Socket) -> Option<TcpProgress> {
        None
    }

    pub(super) fn read_rate(_: &socket2::Socket) -> Option<TcpRate> {
        None
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn a_connection_that_just_exchanged_bytes_reads_as_recently_acknowledged() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        b.write_all(b"pong").unwrap();
        a.read_exact(&mut buf).unwrap();
        let p = TcpProgress::read(&a).expect("TCP_INFO on Linux");
        // Everything was acknowledged within the exchange (a loaded machine: seconds at most).
        assert_eq!(p.unacked, 0, "{p}");
        assert!(p.since_ack < Duration::from_secs(5), "{p}");
        assert!(p.since_data < Duration::from_secs(5), "{p}");
        assert_eq!(p.backoff, 0, "{p}");
        assert_eq!(p.window_probes, 0, "{p}");
        assert!(p.to_string().starts_with("TCP: peer's last ack"), "{p}");
        let r = TcpRate::read(&a).expect("TCP_INFO rate fields (Linux >= 4.9)");
        // Loopback: a measured round trip well under a second, and a rate once data was acked.
        assert!(r.min_rtt < Duration::from_secs(1), "{r:?}");
        assert!(r.delivery_rate > 0, "{r:?}");
    }
}
