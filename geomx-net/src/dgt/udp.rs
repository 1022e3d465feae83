//! Thin driver piece: one UDP socket per unreliable channel, marked with the channel's ToS /
//! traffic class and `SO_PRIORITY`. No protocol logic here: the bytes come from
//! [`DgtSender::poll_transmit`](super::DgtSender::poll_transmit) and go to
//! [`DgtReceiver::handle_datagram`](super::DgtReceiver::handle_datagram).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::MAX_CHANNELS;

/// Receive buffer requested per socket (the kernel may cap it at `net.core.rmem_max`).
pub const DEFAULT_RECV_BUFFER: usize = 8 << 20;

/// ToS byte (IPv4) / traffic class (IPv6) of unreliable channel `i` of `channels`: (C − i)·32,
/// DSCP class CS(C − i); channel C is best effort.
pub fn channel_tos(channels: u8, i: u8) -> u32 {
    u32::from(channels.saturating_sub(i)) * 32
}

/// `SO_PRIORITY` of unreliable channel `i`: C − i (≤ 6, so no CAP_NET_ADMIN needed).
pub fn channel_priority(channels: u8, i: u8) -> u32 {
    u32::from(channels.saturating_sub(i))
}

/// `SO_PRIORITY` for the reliable channel's TCP socket: min(C, 6).
pub fn reliable_priority(channels: u8) -> u32 {
    u32::from(channels.min(6))
}

/// The UDP sockets of channels 1..=C, non-blocking.
#[derive(Debug)]
pub struct UdpChannels {
    socks: Vec<UdpSocket>,
}

impl UdpChannels {
    /// Binds C sockets on `ip` (ephemeral ports), each with its ToS / traffic class,
    /// `SO_PRIORITY` (Linux) and a receive buffer of `recv_buffer` bytes (best effort: a smaller
    /// kernel limit is logged, not an error).
    pub fn bind(ip: IpAddr, channels: u8, recv_buffer: usize) -> io::Result<UdpChannels> {
        if !(1..=MAX_CHANNELS).contains(&channels) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("channels {channels} not in 1..=7"),
            ));
        }
        let mut socks = Vec::with_capacity(usize::from(channels));
        for i in 1..=channels {
            let addr = SocketAddr::new(ip, 0);
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            let tos = channel_tos(channels, i);
            if ip.is_ipv4() {
                s.set_tos_v4(tos)?;
            } else {
                #[cfg(unix)]
                s.set_tclass_v6(tos)?;
            }
            #[cfg(target_os = "linux")]
            s.set_priority(channel_priority(channels, i))?;
            if let Err(e) = s.set_recv_buffer_size(recv_buffer) {
                tracing::warn!(channel = i, error = %e, "dgt: receive buffer not set");
            } else if let Ok(got) = s.recv_buffer_size() {
                if got < recv_buffer {
                    tracing::debug!(
                        channel = i,
                        got,
                        wanted = recv_buffer,
                        "dgt: receive buffer capped"
                    );
                }
            }
            s.bind(&addr.into())?;
            s.set_nonblocking(true)?;
            socks.push(UdpSocket::from(s));
        }
        Ok(UdpChannels { socks })
    }

    /// Number of channels C.
    pub fn channels(&self) -> u8 {
        self.socks.len() as u8
    }

    /// The socket of channel `ch` (1..=C).
    pub fn socket(&self, ch: u8) -> io::Result<&UdpSocket> {
        usize::from(ch)
            .checked_sub(1)
            .and_then(|i| self.socks.get(i))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no channel {ch}")))
    }

    /// Local addresses of channels 1..=C, in order.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.socks.iter().map(UdpSocket::local_addr).collect()
    }

    /// ToS (IPv4) or traffic class (IPv6) read back from channel `ch`'s socket.
    pub fn tos(&self, ch: u8) -> io::Result<u32> {
        let s = self.socket(ch)?;
        let r = SockRef::from(s);
        if s.local_addr()?.is_ipv4() {
            r.tos_v4()
        } else {
            #[cfg(unix)]
            return r.tclass_v6();
            #[cfg(not(unix))]
            Err(io::Error::new(io::ErrorKind::Unsupported, "traffic class"))
        }
    }

    /// Sends one datagram on channel `ch` to `to`.
    pub fn send_to(&self, ch: u8, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.socket(ch)?.send_to(buf, to)
    }

    /// Receives one datagram from the lowest channel that has one; `Ok(None)` if none waits.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<(u8, usize, SocketAddr)>> {
        for (i, s) in self.socks.iter().enumerate() {
            match s.recv_from(buf) {
                Ok((n, from)) => return Ok(Some((i as u8 + 1, n, from))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_per_spec() {
        assert_eq!(
            (1..=3).map(|i| channel_tos(3, i)).collect::<Vec<_>>(),
            [64, 32, 0]
        );
        assert_eq!((1..=7).map(|i| channel_priority(7, i)).max(), Some(6));
        assert_eq!((reliable_priority(3), reliable_priority(7)), (3, 6));
    }
}
