//! The DGT driver: [`DgtClient`] (sender) and [`DgtServer`] (receiver) run the sans-IO
//! [`DgtSender`](super::DgtSender) / [`DgtReceiver`](super::DgtReceiver) over real sockets.
//!
//! * **Reliable channel 0**: one TCP connection per sender speaking geomx wire frames
//!   ([`crate::wire`]) of the DGT kinds: `DgtHello` both ways first (the sender announces its
//!   block size and channel count, the receiver answers with its UDP ports), then `DgtBlock` /
//!   `DgtEnd` from the sender and `DgtReport` / `DgtRate` from the receiver. Each frame's payload
//!   is one DGT message; frame bounds are checked by the frame decoder
//!   ([`crate::wire::MsgKind::check_dgt_payload`]), the DGT header by the receiver. The TCP
//!   socket carries ToS C·32 and `SO_PRIORITY` min(C, 6).
//! * **Unreliable channels 1..=C**: [`UdpChannels`](super::UdpChannels) on both sides; the
//!   sender batches consecutive equal-size datagrams of one channel into one `sendmsg` with
//!   `UDP_SEGMENT` (GSO) where the kernel accepts it, else sends them one by one.
//! * **Block size** from the path MTU (`IP_MTU` of the route to the receiver) via
//!   [`auto_block_bytes`](super::auto_block_bytes), capped at the configured size.
//! * **Pacing** at a fixed rate, or `auto`: 100 Mbit/s until the receiver reports the goodput
//!   it measured on the reliable channel in the first round, then ×0.8 / ×1.05 per round from
//!   the loss in each [`RoundReport`](super::RoundReport).
//!
//! Each endpoint owns one thread that waits with `poll(2)` on its sockets, a wake-up pipe and
//! the sans-IO timers; nothing else runs protocol logic.
//!
//! # Example
//! ```
//! use std::net::{IpAddr, Ipv4Addr};
//! use std::time::Duration;
//! use geomx_net::dgt::link::{DgtClient, DgtServer, LinkOptions};
//! use geomx_net::dgt::{DgtConfig, ValueType};
//!
//! let cfg = DgtConfig { rate_bps: Some(1_000_000_000), ..DgtConfig::default() };
//! let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
//! let server = DgtServer::bind(lo, cfg.clone(), &[(7, 3000, ValueType::F32)], None)?;
//! let client = DgtClient::connect(server.local_addr(), 1, cfg, LinkOptions::default())?;
//! let x: Vec<f32> = (0..3000).map(|i| i as f32).collect();
//! // Block 0 reliable, the rest on unreliable channel 1.
//! let n_b = client.num_blocks(x.len(), ValueType::F32);
//! let map: Vec<u8> = (0..n_b).map(|j| u8::from(j > 0)).collect();
//! client.push_f32(7, 0, x.clone(), map)?;
//! let d = server.recv_delivery(Duration::from_secs(5)).expect("delivered");
//! assert_eq!((d.sender, d.key, d.round), (1, 7, 0));
//! assert_eq!(d.values, x); // loopback: nothing lost
//! # Ok::<(), geomx_net::dgt::link::LinkError>(())
//! ```

mod client;
mod server;
mod sys;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

pub use client::{ClientStats, DgtClient, LinkOptions, Pacing};
pub use server::{
    DgtServer, ServerStats, ServerTls, MAX_DGT_HANDSHAKES, MAX_PENDING_HELLOS,
    MAX_QUEUED_DELIVERIES,
};

use super::{DgtError, MAX_CHANNELS};
use crate::driver::feed_input;
use crate::error::NetError;
use crate::tls::{
    handshake, HandshakeSide, Identity, Opener, Sealer, Session, SessionParts, TlsContext, TlsError,
};
use crate::wire::{
    Frame, FrameDecoder, FrameHeader, MsgKind, PayloadCodec, WireError, DGT_HELLO_LEN,
};

/// Errors of the DGT driver.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A socket call failed.
    #[error("dgt link I/O ({0}): {1}")]
    Io(&'static str, #[source] io::Error),
    /// The reliable channel's byte stream is malformed.
    #[error("dgt reliable channel: {0}")]
    Wire(#[from] WireError),
    /// The DGT core refused a message or argument.
    #[error("dgt: {0}")]
    Dgt(#[from] DgtError),
    /// The peer broke the link protocol (wrong hello, unexpected kind …).
    #[error("dgt link protocol: {0}")]
    Protocol(String),
    /// The link's thread stopped (the peer closed, or an earlier error); the reason.
    #[error("dgt link closed: {0}")]
    Closed(String),
    /// Waiting took longer than allowed.
    #[error("dgt link: timed out {0}")]
    Timeout(String),
    /// Mutual TLS on the reliable channel failed (handshake, identity, a tampered record).
    #[error("dgt reliable channel TLS: {0}")]
    Tls(#[from] TlsError),
}

/// The reliable channel's hello, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    /// Block size B the sender uses (sender → receiver; echoed back).
    block_bytes: u32,
    /// Unreliable channels C.
    channels: u8,
    /// UDP ports of channels 1..=C (receiver → sender; zeros from the sender).
    ports: [u16; MAX_CHANNELS as usize],
}

impl Hello {
    fn encode(&self) -> [u8; DGT_HELLO_LEN] {
        let mut b = [0u8; DGT_HELLO_LEN];
        b[0..4].copy_from_slice(&self.block_bytes.to_le_bytes());
        b[4] = self.channels;
        for (i, p) in self.ports.iter().enumerate() {
            b[8 + 2 * i..10 + 2 * i].copy_from_slice(&p.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Hello, LinkError> {
        if b.len() != DGT_HELLO_LEN {
            return Err(LinkError::Protocol(format!("hello of {} bytes", b.len())));
        }
        if b[5] != 0 || b[6] != 0 || b[7] != 0 || b[22] != 0 || b[23] != 0 {
            return Err(LinkError::Protocol("hello with reserved bytes set".into()));
        }
        let block_bytes = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let channels = b[4];
        if !(1..=MAX_CHANNELS).contains(&channels) {
            return Err(LinkError::Protocol(format!("hello: {channels} channels")));
        }
        let mut ports = [0u16; MAX_CHANNELS as usize];
        for (i, p) in ports.iter_mut().enumerate() {
            *p = u16::from_le_bytes([b[8 + 2 * i], b[9 + 2 * i]]);
        }
        Ok(Hello {
            block_bytes,
            channels,
            ports,
        })
    }
}

/// The reliable channel's socket, and with mutual TLS its record keys and the peer's identity.
pub(super) struct Reliable {
    pub(super) tcp: TcpStream,
    sealer: Option<Sealer>,
    opener: Option<Opener>,
    /// The peer's verified certificate identity (TLS only).
    pub(super) peer: Option<Identity>,
    /// The datagram key exported from the TLS session, and whether it is AES (else ChaCha20).
    pub(super) datagram_key: Option<([u8; 32], bool)>,
    plain: Vec<u8>,
    sealed: Vec<u8>,
}

impl Reliable {
    /// A channel on `tcp` (its handshake, if any, done: `session`).
    pub(super) fn new(tcp: TcpStream, session: Option<Session>) -> Reliable {
        let parts = SessionParts::from(session);
        Reliable {
            tcp,
            sealer: parts.sealer,
            opener: parts.opener,
            peer: parts.identity,
            datagram_key: parts.datagram_key,
            plain: Vec::new(),
            sealed: Vec::new(),
        }
    }

    /// Runs the TLS handshake on a fresh blocking `tcp` when `tls` is given.
    pub(super) fn handshake(
        mut tcp: TcpStream,
        tls: Option<&TlsContext>,
        side: HandshakeSide,
        limit: Duration,
    ) -> Result<Reliable, LinkError> {
        let session = match tls {
            Some(ctx) => Some(handshake(&mut tcp, ctx, side, Instant::now() + limit)?),
            None => None,
        };
        Ok(Reliable::new(tcp, session))
    }
}

/// Frame header of a DGT frame from node `sender`.
fn dgt_header(kind: MsgKind, sender: u32) -> FrameHeader {
    FrameHeader {
        sender,
        codec: PayloadCodec::Raw,
        ..FrameHeader::new(kind)
    }
}

/// Writes one frame to a non-blocking stream (sealed into records with TLS), waiting for room up
/// to `limit`.
fn write_frame(
    r: &mut Reliable,
    h: &FrameHeader,
    payload: &[u8],
    limit: Duration,
) -> Result<(), LinkError> {
    let mut h = *h;
    h.payload_len = u32::try_from(payload.len())
        .map_err(|_| LinkError::Protocol(format!("frame of {} bytes", payload.len())))?;
    let head = h.encode();
    let deadline = Instant::now() + limit;
    let parts: [&[u8]; 2] = match r.sealer.as_mut() {
        None => [&head[..], payload],
        Some(sealer) => {
            r.sealed.clear();
            sealer.seal(&[&head[..], payload], &mut r.sealed)?;
            [&r.sealed[..], &[]]
        }
    };
    let s = &mut r.tcp;
    for part in parts {
        let mut off = 0;
        while off < part.len() {
            let end = part.len().min(off + crate::driver::DEFAULT_IO_CHUNK);
            match s.write(&part[off..end]) {
                Ok(0) => return Err(LinkError::Closed("peer closed the reliable channel".into())),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(LinkError::Timeout(format!(
                            "writing the reliable channel for {limit:?}"
                        )));
                    }
                    sys::wait_fd(s.as_raw_fd(), false, sys::until(deadline, now))
                        .map_err(|e| LinkError::Io("poll", e))?;
                }
                Err(e) => return Err(LinkError::Io("tcp write", e)),
            }
        }
    }
    Ok(())
}

/// Reads what a non-blocking stream has, up to about `budget` bytes, into `dec` (opening
/// records with TLS); `Ok(false)` at end of stream.
fn read_frames(
    r: &mut Reliable,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
    budget: usize,
    out: &mut Vec<Frame>,
) -> Result<bool, LinkError> {
    let mut taken = 0usize;
    loop {
        if taken >= budget {
            return Ok(true);
        }
        match r.tcp.read(buf) {
            Ok(0) => {
                dec.finish()?;
                return Ok(false);
            }
            Ok(n) => {
                taken += n;
                feed_input(r.opener.as_mut(), &mut r.plain, dec, &buf[..n], out).map_err(|e| {
                    match e {
                        NetError::Wire(w) => LinkError::Wire(w),
                        NetError::Tls(t) => LinkError::Tls(t),
                        other => LinkError::Protocol(other.to_string()),
                    }
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(LinkError::Io("tcp read", e)),
        }
    }
}

/// Reads exactly one frame from a non-blocking stream within `limit` (the hello exchange).
fn read_one(
    s: &mut Reliable,
    dec: &mut FrameDecoder,
    pending: &mut Vec<Frame>,
    limit: Duration,
) -> Result<Frame, LinkError> {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 4096];
    loop {
        if !pending.is_empty() {
            return Ok(pending.remove(0));
        }
        if !read_frames(s, dec, &mut buf, usize::MAX, pending)? {
            return Err(LinkError::Closed("peer closed during the hello".into()));
        }
        if pending.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return Err(LinkError::Timeout(format!(
                    "waiting {limit:?} for the hello"
                )));
            }
            sys::wait_fd(s.tcp.as_raw_fd(), true, sys::until(deadline, now))
                .map_err(|e| LinkError::Io("poll", e))?;
        }
    }
}

/// Marks the reliable channel's TCP socket: ToS C·32 and `SO_PRIORITY` min(C, 6) (best effort).
fn mark_reliable(s: &TcpStream, channels: u8) {
    let r = socket2::SockRef::from(s);
    let tos = u32::from(channels) * 32;
    let res = match s.local_addr() {
        Ok(a) if a.is_ipv4() => r.set_tos_v4(tos),
        #[cfg(unix)]
        Ok(_) => r.set_tclass_v6(tos),
        #[cfg(not(unix))]
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "dgt: reliable channel ToS not set");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = r.set_priority(super::udp::reliable_priority(channels)) {
        tracing::debug!(error = %e, "dgt: reliable channel priority not set");
    }
    let _ = s.set_nodelay(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_bad_fields() {
        let h = Hello {
            block_bytes: 1408,
            channels: 3,
            ports: [4000, 4001, 4002, 0, 0, 0, 0],
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[4] = 0;
        assert!(Hello::decode(&b).is_err());
        let mut b = h.encode();
        b[4] = 8;
        assert!(Hello::decode(&b).is_err());
        let mut b = h.encode();
        b[23] = 1;
        assert!(Hello::decode(&b).is_err());
        assert!(Hello::decode(&b[..20]).is_err());
    }
}
