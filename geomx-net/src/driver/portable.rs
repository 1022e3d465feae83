//! Portable driver: std sockets, one reader thread per connection; writes happen on the calling
//! thread under a per-connection lock (vectored, header + payload in one call).

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use crate::conn::Connection;
use crate::error::NetError;
use crate::link::{Dispatch, Link, LinkIo, ReplyTx};
use crate::stats::LiveCounters;
use crate::wire::{FrameDecoder, HEADER_LEN};

use super::NetOptions;

/// Reads go through a scratch buffer of this size unless a larger payload can be read in place.
const SCRATCH: usize = 64 << 10;

pub(crate) struct PortableDriver {
    max_frame: usize,
    tick: Duration,
}

impl PortableDriver {
    pub(crate) fn new(opts: &NetOptions) -> Self {
        PortableDriver {
            max_frame: opts.max_frame,
            tick: opts.tick,
        }
    }

    pub(crate) fn attach(
        &self,
        stream: TcpStream,
        conn: Connection<ReplyTx>,
        counters: Arc<LiveCounters>,
        dispatch: Arc<dyn Dispatch>,
    ) -> Result<Arc<Link>, NetError> {
        let peer = stream.peer_addr()?;
        let reader = stream.try_clone()?;
        reader.set_read_timeout(Some(self.tick))?;
        let ctl = stream.try_clone()?;
        let io = Box::new(StreamIo {
            stream: Mutex::new(stream),
            ctl,
        });
        let link = Link::new(conn, io, counters, self.max_frame, peer, dispatch);
        let l2 = link.clone();
        let tick = self.tick;
        let max_frame = self.max_frame;
        std::thread::Builder::new()
            .name("geomx-net-rd".into())
            .spawn(move || read_loop(l2, reader, tick, max_frame))?;
        Ok(link)
    }
}

struct StreamIo {
    stream: Mutex<TcpStream>,
    ctl: TcpStream,
}

fn write_all(stream: &mut TcpStream, header: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(payload)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    if payload.is_empty() {
        bufs = &mut bufs[..1];
    }
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl LinkIo for StreamIo {
    fn send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> std::io::Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        write_all(&mut s, header, payload)
    }

    fn try_send(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> std::io::Result<bool> {
        let mut s = match self.stream.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        write_all(&mut s, header, payload).map(|_| true)
    }

    fn shutdown(&self) {
        // Through a second handle, so a writer blocked under the lock is woken too.
        let _ = self.ctl.shutdown(Shutdown::Both);
    }
}

fn read_loop(link: Arc<Link>, mut stream: TcpStream, tick: Duration, max_frame: usize) {
    let mut dec = FrameDecoder::new(max_frame);
    let mut buf = vec![0u8; SCRATCH];
    let mut frames = Vec::new();
    let mut next_tick = Instant::now() + tick;
    while !link.is_closed() {
        let direct = dec.direct_target(SCRATCH).is_some();
        let res = match dec.direct_target(SCRATCH) {
            Some(target) => read_uninit(&mut stream, target),
            None => stream.read(&mut buf),
        };
        match res {
            Ok(0) => {
                let reason = match dec.finish() {
                    Ok(()) => "connection closed by peer".to_string(),
                    Err(e) => format!("connection closed by peer mid-frame ({e})"),
                };
                link.on_io_closed(reason);
                break;
            }
            Ok(n) => {
                link.counters().add_recv_bytes(n);
                let res = if direct {
                    // SAFETY: `read_uninit` initialised exactly n bytes of the direct target.
                    unsafe { dec.commit_direct(n, &mut frames) };
                    Ok(())
                } else {
                    dec.feed(&buf[..n], &mut frames)
                };
                link.on_input(Instant::now(), &mut frames);
                if let Err(e) = res {
                    link.on_wire_error(e);
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                link.on_io_closed(format!("connection reset: {e}"));
                break;
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            link.on_tick(now);
            next_tick = now + tick;
        }
    }
}

/// Reads into uninitialised memory (the kernel writes it; nothing reads it before).
#[cfg(unix)]
fn read_uninit(
    stream: &mut TcpStream,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let len = buf.len().min(1 << 30);
    // SAFETY: `buf` is valid for `len` writable bytes; recv writes at most that many.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            len,
            0,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Portable fallback: zero the target first, then read into it.
#[cfg(not(unix))]
fn read_uninit(
    stream: &mut TcpStream,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> std::io::Result<usize> {
    for b in buf.iter_mut() {
        b.write(0);
    }
    // SAFETY: every byte was initialised just above.
    let init = unsafe { &mut *(buf as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) };
    stream.read(init)
}
