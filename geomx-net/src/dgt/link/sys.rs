//! System-call helpers of the DGT link driver: UDP GSO (`UDP_SEGMENT`) with a per-datagram
//! fallback, the path MTU of a destination, readiness waits and a wake-up pipe.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// `SOL_UDP` (17) / `UDP_SEGMENT` (103): libc does not export them.
#[cfg(target_os = "linux")]
const SOL_UDP: libc::c_int = 17;
#[cfg(target_os = "linux")]
const UDP_SEGMENT: libc::c_int = 103;

/// Most segments handed to the kernel in one GSO send (the kernel allows 64 or more).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (a UDP datagram's 16-bit length bounds the super-packet).
pub(crate) const GSO_MAX_BYTES: usize = 60_000;

/// True if `sock` accepts the `UDP_SEGMENT` option (Linux ≥ 4.18).
pub(crate) fn gso_supported(sock: &UdpSocket) -> bool {
    #[cfg(target_os = "linux")]
    {
        let v: libc::c_int = 0;
        // SAFETY: a valid fd and a pointer to an int of the stated size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                SOL_UDP,
                UDP_SEGMENT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sock;
        false
    }
}

/// Sends `buf`, the concatenation of datagrams of `seg` bytes each (the last may be shorter),
/// to `to` in one `sendmsg` with a `UDP_SEGMENT` control message.
#[cfg(target_os = "linux")]
pub(crate) fn send_gso(sock: &UdpSocket, buf: &[u8], seg: u16, to: SocketAddr) -> io::Result<()> {
    let addr = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut cbuf = [0u64; 4]; // 32 aligned bytes ≥ CMSG_SPACE(2)
    debug_assert!(space <= std::mem::size_of_val(&cbuf));
    // SAFETY: zeroed msghdr is a valid value; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable, aligned bytes, so the first header fits.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
    }
    loop {
        // SAFETY: a valid fd and a fully initialised msghdr.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                wait_fd(sock.as_raw_fd(), false, Duration::from_millis(5))?
            }
            _ => return Err(e),
        }
    }
}

/// Without Linux there is no GSO: the caller always uses the fallback.
#[cfg(not(target_os = "linux"))]
pub(crate) fn send_gso(_: &UdpSocket, _: &[u8], _: u16, _: SocketAddr) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "UDP GSO"))
}

/// Sends one datagram, waiting briefly while the socket buffer is full.
pub(crate) fn send_one(sock: &UdpSocket, buf: &[u8], to: SocketAddr) -> io::Result<()> {
    loop {
        match sock.send_to(buf, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(sock.as_raw_fd(), false, Duration::from_millis(5))?
            }
            Err(e) => return Err(e),
        }
    }
}

/// The kernel's MTU of the route to `to` (`IP_MTU` / `IPV6_MTU` on a connected UDP socket);
/// `None` where it cannot be read.
pub(crate) fn path_mtu(to: SocketAddr) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let local: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let s = UdpSocket::bind(local).ok()?;
        s.connect(to).ok()?;
        let (level, opt) = if to.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_MTU)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU)
        };
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid fd, an int-sized out buffer and its length.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0 && v > 0).then_some(v as usize)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = to;
        None
    }
}

/// Waits until `fd` is readable (`read`) or writable, or `timeout` passed.
pub(crate) fn wait_fd(fd: RawFd, read: bool, timeout: Duration) -> io::Result<()> {
    let ev = if read { libc::POLLIN } else { libc::POLLOUT };
    let mut p = [libc::pollfd {
        fd,
        events: ev,
        revents: 0,
    }];
    poll(&mut p, Some(timeout)).map(|_| ())
}

/// `poll(2)` with a sub-millisecond timeout (rounded up to whole milliseconds, at least 1 ms
/// when non-zero; `None` waits without limit). Interrupted waits return 0.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        Some(t) if t.is_zero() => 0,
        Some(t) => t.as_micros().div_ceil(1000).min(60_000) as libc::c_int,
    };
    // SAFETY: `fds` is a valid slice of pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Time left until `at`, zero if it passed.
pub(crate) fn until(at: Instant, now: Instant) -> Duration {
    at.saturating_duration_since(now)
}

/// A wake-up pipe: another thread [`Waker::wake`]s a loop that polls [`Waker::fd`].
#[derive(Debug)]
pub(crate) struct Waker {
    rx: UnixDatagram,
    tx: UnixDatagram,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let (rx, tx) = UnixDatagram::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Waker { rx, tx })
    }

    /// A sending half for another thread.
    pub(crate) fn handle(&self) -> io::Result<UnixDatagram> {
        self.tx.try_clone()
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// Empties the pipe.
    pub(crate) fn drain(&self) {
        let mut b = [0u8; 64];
        while self.rx.recv(&mut b).is_ok() {}
    }
}

/// Wakes the loop behind `tx` (a full pipe already means "awake").
pub(crate) fn wake(tx: &UnixDatagram) {
    let _ = tx.send(&[1]);
}
