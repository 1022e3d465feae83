//! Measurements across a lab's links with real traffic: bulk TCP goodput and a UDP round trip.
//! The lab's tests and `geomx wan-lab --selftest` share them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::{Lab, WanLabError};

fn io(what: &str) -> impl FnOnce(std::io::Error) -> WanLabError + '_ {
    move |e| WanLabError::io(what, e)
}

/// Longest a probe waits for one packet or one read before giving up.
const STALL: Duration = Duration::from_secs(10);

/// Bulk TCP from the namespace of link `send` to that of link `recv` for `total` after the first
/// byte arrives; returns the receiver's goodput in Mbit/s over `[skip, total)`.
pub fn bulk_tcp_mbit(
    lab: &Lab,
    recv: usize,
    send: usize,
    skip: Duration,
    total: Duration,
) -> Result<f64, WanLabError> {
    if skip >= total {
        return Err(WanLabError::Invalid(format!(
            "bulk TCP: skip {skip:?} must be shorter than total {total:?}"
        )));
    }
    let bind = SocketAddr::new(lab.node_addr(recv).into(), 0);
    let listener = lab
        .node(recv)
        .run(move || TcpListener::bind(bind))?
        .map_err(io("binding the bulk TCP receiver"))?;
    let to = listener
        .local_addr()
        .map_err(io("bulk TCP receiver address"))?;
    // The sender stops when the receiver closes, or after the receiver's time plus a margin.
    let limit = total + STALL;
    let sender = lab.node(send).spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(to)?;
        let buf = vec![7u8; 256 * 1024];
        let t = Instant::now();
        while t.elapsed() < limit {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
        Ok(())
    })?;
    let (mut c, _) = listener.accept().map_err(io("accepting bulk TCP"))?;
    c.set_read_timeout(Some(STALL))
        .map_err(io("bulk TCP read timeout"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut first = None;
    let mut counted = 0u64;
    loop {
        let n = c.read(&mut buf).map_err(io("reading bulk TCP"))?;
        let now = Instant::now();
        let el = now - *first.get_or_insert(now);
        if el >= total || n == 0 {
            break;
        }
        if el >= skip {
            counted += n as u64;
        }
    }
    drop(c);
    match sender.join() {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(WanLabError::io("bulk TCP sender", e)),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(WanLabError::Invalid("bulk TCP sender panicked".into())),
    }
    Ok(counted as f64 * 8.0 / (total - skip).as_secs_f64() / 1e6)
}

/// One UDP ping-pong.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ping {
    /// Round trip as the pinging thread saw it (send call to its return from `recv`), ms: the
    /// path plus both threads' wake-up delays.
    pub app_ms: f64,
    /// Round trip of the packets alone, ms: (echo's kernel receive time − ping sent) + (pinger's
    /// kernel receive time − pong sent), from `SO_TIMESTAMPNS`. The threads' scheduling delays
    /// are not in it, so it measures what the lab emulates even on a loaded machine.
    pub path_ms: f64,
}

/// `pings` UDP ping-pongs from the namespace of link `from` to an echo in that of link `to`, in
/// the order sent.
pub fn udp_pings(
    lab: &Lab,
    from: usize,
    to: usize,
    pings: usize,
) -> Result<Vec<Ping>, WanLabError> {
    let bind = SocketAddr::new(lab.node_addr(to).into(), 0);
    let echo = lab
        .node(to)
        .run(move || UdpSocket::bind(bind))?
        .map_err(io("binding the UDP echo"))?;
    let echo_addr = echo.local_addr().map_err(io("UDP echo address"))?;
    let bind = SocketAddr::new(lab.node_addr(from).into(), 0);
    let pinger = lab
        .node(from)
        .run(move || UdpSocket::bind(bind))?
        .map_err(io("binding the UDP pinger"))?;
    ping_pong(&pinger, echo, echo_addr, pings)
}

/// `pings` UDP ping-pongs from `pinger` to `echo` (served by a thread until the end), sent to
/// `to`: the echo's own address, or a relay's in front of it.
pub fn ping_pong(
    pinger: &UdpSocket,
    echo: UdpSocket,
    to: SocketAddr,
    pings: usize,
) -> Result<Vec<Ping>, WanLabError> {
    echo.set_read_timeout(Some(STALL))
        .map_err(io("UDP echo timeout"))?;
    stamp::enable(&echo).map_err(io("UDP echo timestamps"))?;
    let e = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while let Ok((n, t_rx, a)) = stamp::recv(&echo, &mut b) {
            if n == 1 && b[0] == STOP {
                break;
            }
            // The pong carries the echo's receive and send times.
            let mut pong = [0u8; 16];
            pong[..8].copy_from_slice(&t_rx.to_le_bytes());
            pong[8..].copy_from_slice(&stamp::now_ns().to_le_bytes());
            let _ = echo.send_to(&pong, a);
        }
    });
    pinger
        .set_read_timeout(Some(STALL))
        .map_err(io("UDP pinger timeout"))?;
    stamp::enable(pinger).map_err(io("UDP pinger timestamps"))?;
    let mut out = Vec::with_capacity(pings);
    let mut b = [0u8; 64];
    let result = (|| {
        for _ in 0..pings {
            let (t, t_tx) = (Instant::now(), stamp::now_ns());
            pinger
                .send_to(&[0u8; 32], to)
                .map_err(io("sending a UDP ping"))?;
            let (n, t_rx, _) = stamp::recv(pinger, &mut b).map_err(io("waiting for a UDP pong"))?;
            let app_ms = t.elapsed().as_secs_f64() * 1e3;
            if n != 16 {
                return Err(WanLabError::Invalid(format!(
                    "UDP pong of {n} bytes, sent 16"
                )));
            }
            let field = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
            let (echo_rx, echo_tx) = (field(0), field(8));
            let path_ns = echo_rx.saturating_sub(t_tx) + t_rx.saturating_sub(echo_tx);
            out.push(Ping {
                app_ms,
                path_ms: path_ns as f64 / 1e6,
            });
        }
        Ok(())
    })();
    let _ = pinger.send_to(&[STOP], to);
    let _ = e.join();
    result.map(|()| out)
}

/// The one-byte datagram that ends the echo.
const STOP: u8 = 0xff;

/// Kernel receive timestamps (`SO_TIMESTAMPNS`) on UDP sockets.
mod stamp {
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;

    /// Asks the kernel to timestamp every datagram `s` receives.
    pub fn enable(s: &UdpSocket) -> std::io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid fd and a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Now on the clock the kernel stamps with (`CLOCK_REALTIME`), ns.
    pub fn now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// Receives one datagram: its length, the kernel's receive time (ns, `CLOCK_REALTIME`; now
    /// when the kernel gave none) and the sender.
    pub fn recv(s: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, u64, SocketAddr)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // Room for one cmsghdr with a timespec, 8-byte aligned.
        let mut control = [0u64; 8];
        // SAFETY: zeroed sockaddr_storage and msghdr are valid; the pointers set below stay
        // valid for the call.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut from as *mut libc::sockaddr_storage as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg describes valid buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut stamp = None;
        // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
        // msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                    stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let addr = sockaddr(&from).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "datagram without an IPv4 sender",
            )
        })?;
        Ok((n as usize, stamp.unwrap_or_else(now_ns), addr))
    }

    /// The IPv4 address in `a`, if it holds one.
    fn sockaddr(a: &libc::sockaddr_storage) -> Option<SocketAddr> {
        if a.ss_family as libc::c_int != libc::AF_INET {
            return None;
        }
        // SAFETY: an AF_INET sockaddr_storage holds a sockaddr_in.
        let v4 = unsafe { &*(a as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
        let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
        Some(SocketAddr::new(ip.into(), u16::from_be(v4.sin_port)))
    }
}

/// The median of `v` (the upper one for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(vec![]).is_nan());
    }
}
