//! Non-blocking socket calls made beside the ring: a send the socket can take at once, and the
//! rest of a frame's payload that has already arrived. Each saves a round through the ring (a
//! submission, a completion and, for other threads, a wake-up), and a direct send from the
//! caller's buffer saves the copy into a queued buffer. At most `chunk` bytes per call
//! (`NetOptions::io_chunk`).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;

/// Writes from `parts` (in order, starting `skip` bytes in) without blocking, in calls of at most
/// `chunk` bytes, until everything is written or the socket's buffer is full. Returns the
/// bytes written (counting from `skip`); an error other than "would block" is returned as is.
pub(super) fn send_nonblocking(
    fd: RawFd,
    parts: [&[u8]; 2],
    skip: usize,
    chunk: usize,
) -> io::Result<usize> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut off = skip;
    while off < total {
        let (iov, n) = window(parts, off, chunk);
        let msg = libc::msghdr {
            msg_name: std::ptr::null_mut(),
            msg_namelen: 0,
            msg_iov: iov.as_ptr() as *mut libc::iovec,
            msg_iovlen: n,
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        };
        // SAFETY: the iovecs point into `parts`, which outlive the call; the kernel only reads.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            off += r as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => break,
            _ => return Err(e),
        }
    }
    Ok(off - skip)
}

/// The iovecs for at most `chunk` bytes of `parts` from `off`, and how many are used.
fn window(parts: [&[u8]; 2], mut off: usize, chunk: usize) -> ([libc::iovec; 2], usize) {
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iov = [empty, empty];
    let mut n = 0;
    let mut budget = chunk;
    for p in parts {
        if off >= p.len() {
            off -= p.len();
            continue;
        }
        let take = (p.len() - off).min(budget);
        if take == 0 {
            break;
        }
        iov[n] = libc::iovec {
            iov_base: p[off..].as_ptr() as *mut libc::c_void,
            iov_len: take,
        };
        n += 1;
        budget -= take;
        off = 0;
    }
    (iov, n)
}

/// Reads into `buf` (at most `chunk` bytes) without blocking. `None` when nothing is
/// available or the call failed: the ring's next receive reports end of stream and errors.
pub(super) fn recv_nonblocking(
    fd: RawFd,
    buf: &mut [MaybeUninit<u8>],
    chunk: usize,
) -> Option<usize> {
    let len = buf.len().min(chunk);
    loop {
        // SAFETY: `buf` is valid for `len` writable bytes.
        let r = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                len,
                libc::MSG_DONTWAIT,
            )
        };
        if r > 0 {
            return Some(r as usize);
        }
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// Bytes the kernel holds for `fd` that no receive has taken yet (`FIONREAD`); `None` when the
/// query fails.
pub(super) fn readable(fd: RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    (r == 0).then_some(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    const IO_CHUNK: usize = crate::driver::DEFAULT_IO_CHUNK;

    #[test]
    fn window_spans_both_parts_and_caps_at_io_chunk() {
        let a = [1u8; 10];
        let b = vec![2u8; IO_CHUNK * 2];
        let (iov, n) = window([&a, &b], 0, IO_CHUNK);
        assert_eq!(n, 2);
        assert_eq!(iov[0].iov_len, 10);
        assert_eq!(iov[1].iov_len, IO_CHUNK - 10);
        let (iov, n) = window([&a, &b], 4, IO_CHUNK);
        assert_eq!((n, iov[0].iov_len, iov[1].iov_len), (2, 6, IO_CHUNK - 6));
        let (iov, n) = window([&a, &b], 10 + IO_CHUNK * 2 - 5, IO_CHUNK);
        assert_eq!((n, iov[0].iov_len), (1, 5));
        assert_eq!(iov[0].iov_base as *const u8, b[IO_CHUNK * 2 - 5..].as_ptr());
        let (_, n) = window([&a, &[]], 10, IO_CHUNK);
        assert_eq!(n, 0);
    }

    #[test]
    fn sends_what_fits_then_stops_without_blocking() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        let head = [7u8; 4];
        // Far more than two sockets' buffers hold: the call must return early, not block.
        let body: Vec<u8> = (0..64 << 20).map(|i| (i % 251) as u8).collect();
        let n = send_nonblocking(tx.as_raw_fd(), [&head, &body], 0, IO_CHUNK).unwrap();
        assert!(n > head.len() && n < head.len() + body.len(), "sent {n}");
        // The rest, from where it stopped, while the peer reads everything.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).unwrap();
            got
        });
        let mut off = n;
        while off < head.len() + body.len() {
            off += send_nonblocking(tx.as_raw_fd(), [&head, &body], off, IO_CHUNK).unwrap();
            std::thread::yield_now();
        }
        drop(tx);
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], &head);
        assert!(got[4..] == body[..], "bytes differ");
    }

    #[test]
    fn recv_returns_none_when_nothing_is_there() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        let mut buf = vec![MaybeUninit::new(0u8); 16];
        assert_eq!(recv_nonblocking(rx.as_raw_fd(), &mut buf, IO_CHUNK), None);
        std::io::Write::write_all(&mut tx, b"abc").unwrap();
        let mut n = None;
        for _ in 0..1000 {
            n = recv_nonblocking(rx.as_raw_fd(), &mut buf, IO_CHUNK);
            if n.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(n, Some(3));
        // SAFETY: 3 bytes were written.
        assert_eq!(unsafe { *buf[2].as_ptr() }, b'c');
    }
}
