//! A packet capture of the loopback interface (AF_PACKET, root only), like `tcpdump -i lo`,
//! searched for byte patterns instead of written to a file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// What a capture saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Packets captured.
    pub packets: u64,
    /// Bytes captured (whole packets).
    pub bytes: u64,
    /// For each needle, the packets that contain it.
    pub hits: Vec<u64>,
}

/// A running capture; [`Capture::stop`] ends it and returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Seen>,
}

impl Capture {
    /// Starts capturing every packet on `lo`, counting those that contain each of `needles`;
    /// `Err` with the reason when this process may not (not root).
    pub fn start(needles: Vec<Vec<u8>>) -> Result<Capture, String> {
        Self::start_with(needles, |_| {})
    }

    /// [`Capture::start`] that also hands each packet as it arrives (once, on its way in; with
    /// the 14-byte link header of `lo`) to `each`.
    pub fn start_with(
        needles: Vec<Vec<u8>>,
        mut each: impl FnMut(&[u8]) + Send + 'static,
    ) -> Result<Capture, String> {
        // SAFETY: plain socket calls on a descriptor this function owns.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        if fd < 0 {
            return Err(format!(
                "no packet socket ({}); run as root",
                std::io::Error::last_os_error()
            ));
        }
        let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        let big: libc::c_int = 64 << 20;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: valid pointers and lengths for each option.
        let ok = unsafe {
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) == 0
                && {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        &big as *const _ as *const libc::c_void,
                        4,
                    );
                    true
                }
                && libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                ) == 0
        };
        if !ok {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(format!("cannot capture on lo: {e}"));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen {
                hits: vec![0; needles.len()],
                ..Seen::default()
            };
            let mut buf = vec![0u8; 1 << 17];
            while !s2.load(Ordering::Relaxed) {
                // SAFETY: sockaddr_ll is plain data.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: `buf` and `from` are valid for their lengths.
                let n = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                        &mut from as *mut _ as *mut libc::sockaddr,
                        &mut from_len,
                    )
                };
                if n <= 0 {
                    continue;
                }
                let pkt = &buf[..n as usize];
                if from.sll_pkttype != libc::PACKET_OUTGOING {
                    each(pkt);
                }
                seen.packets += 1;
                seen.bytes += n as u64;
                for (i, needle) in needles.iter().enumerate() {
                    if pkt.windows(needle.len()).any(|w| w == &needle[..]) {
                        seen.hits[i] += 1;
                    }
                }
            }
            unsafe { libc::close(fd) };
            seen
        });
        Ok(Capture { stop, thread })
    }

    /// Stops the capture.
    pub fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}
