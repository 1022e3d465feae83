//! DGT settings and the MTU-derived block size.

use std::time::Duration;

use super::{DgtError, MAX_CHANNELS};

/// IPv4 + UDP header bytes per datagram.
pub const IPV4_UDP_OVERHEAD: usize = 28;
/// IPv6 + UDP header bytes per datagram.
pub const IPV6_UDP_OVERHEAD: usize = 48;

/// When the terminator of (key, round) is queued, and on which transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminatorMode {
    /// The channel map ([`super::DgtKind::Map`]) right after the reliable blocks, then, after the
    /// last unreliable datagram was handed out, a terminator without map
    /// ([`super::DgtKind::Fin`]) on the reliable channel and [`FIN_DATAGRAMS`] copies as
    /// datagrams (default). A lost terminator then costs nothing: a lone TCP segment after an
    /// idle stretch is recovered only by a tail-loss probe (1.5 round trips + 200 ms in Linux),
    /// and the map, which a datagram cannot always carry, is recovered while the datagrams
    /// are still being sent. A (key, round) without unreliable blocks gets one [`super::DgtKind::End`].
    Split,
    /// One [`super::DgtKind::End`] with the map after the last unreliable datagram of (key, round)
    /// was handed out, on the reliable channel only.
    AfterAll,
    /// Right after the reliable blocks (the original's behaviour; unreliable blocks arrive late).
    AfterReliable,
}

/// Copies of a [`TerminatorMode::Split`] terminator sent as datagrams (on the first unreliable
/// channel, ahead of its queued blocks), besides the one on the reliable channel.
pub const FIN_DATAGRAMS: usize = 2;

/// Settings shared by sender and receiver (both sides must agree on `block_bytes`, `channels`).
#[derive(Debug, Clone, PartialEq)]
pub struct DgtConfig {
    /// Block size B in bytes (a multiple of 4; use [`auto_block_bytes`] for a path MTU).
    pub block_bytes: usize,
    /// Unreliable channels C, 1..=7.
    pub channels: u8,
    /// Pacing rate of all unreliable channels together in bit/s (IP/UDP overhead counted);
    /// `None` sends unpaced.
    pub rate_bps: Option<u64>,
    /// Token bucket depth in datagrams of maximal size.
    pub burst: u32,
    /// Per-datagram IP + UDP overhead charged by the pacer.
    pub ip_overhead: usize,
    /// Terminator placement.
    pub terminator: TerminatorMode,
    /// How long the receiver waits for listed blocks after the terminator.
    pub deadline: Duration,
    /// The sender's priority window in payload bytes: (key, round)s enter the per-channel
    /// queues in push order while the entered but unfinished ones hold at most this many bytes
    /// (at least one always enters). Strict channel priority then holds within the window, and
    /// a (key, round) is finished, its terminator sent, before much later data goes: the
    /// receiver delivers early tensors while later ones are still on the way, as a TCP push
    /// does. `None`: one window over everything queued (dgt.md's strict priority across all
    /// keys, which holds every terminator until all reliable blocks of all keys are out).
    pub window_bytes: Option<usize>,
}

impl Default for DgtConfig {
    fn default() -> DgtConfig {
        DgtConfig {
            block_bytes: 4096,
            channels: 3,
            rate_bps: Some(100_000_000),
            burst: 16,
            ip_overhead: IPV4_UDP_OVERHEAD,
            terminator: TerminatorMode::Split,
            deadline: Duration::from_millis(5),
            window_bytes: Some(DEFAULT_WINDOW_BYTES),
        }
    }
}

/// Default priority window of the sender ([`DgtConfig::window_bytes`]): 1 MiB.
pub const DEFAULT_WINDOW_BYTES: usize = 1 << 20;

impl DgtConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), DgtError> {
        if self.block_bytes == 0 || self.block_bytes % 4 != 0 || self.block_bytes > 1 << 20 {
            return Err(DgtError::Invalid(format!(
                "block_bytes {} must be a positive multiple of 4 up to 1 MiB",
                self.block_bytes
            )));
        }
        if !(1..=MAX_CHANNELS).contains(&self.channels) {
            return Err(DgtError::Invalid(format!(
                "channels {} not in 1..=7",
                self.channels
            )));
        }
        if self.window_bytes == Some(0) {
            return Err(DgtError::Invalid(
                "window_bytes must be positive (None: no window)".into(),
            ));
        }
        if self.rate_bps == Some(0) || self.burst == 0 {
            return Err(DgtError::Invalid("rate and burst must be positive".into()));
        }
        Ok(())
    }
}

/// Largest multiple of 64 bytes with B + 32 + `ip_overhead` ≤ `mtu`, capped at `configured`
/// (1408 for MTU 1500 over IPv4; 4096 on loopback). `None` if not even 64 bytes fit.
pub fn auto_block_bytes(mtu: usize, ip_overhead: usize, configured: usize) -> Option<usize> {
    let room = mtu.checked_sub(super::DGT_HEADER_LEN + ip_overhead)?;
    let b = (room / 64 * 64).min(configured / 64 * 64);
    (b >= 64).then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_block_size_per_spec() {
        assert_eq!(auto_block_bytes(1500, IPV4_UDP_OVERHEAD, 4096), Some(1408));
        assert_eq!(auto_block_bytes(65536, IPV4_UDP_OVERHEAD, 4096), Some(4096));
        assert_eq!(auto_block_bytes(1500, IPV6_UDP_OVERHEAD, 4096), Some(1408));
        assert_eq!(auto_block_bytes(1280, IPV6_UDP_OVERHEAD, 4096), Some(1152));
        assert_eq!(auto_block_bytes(100, IPV4_UDP_OVERHEAD, 4096), None);
        for mtu in [576usize, 1280, 1500, 9000] {
            let b = auto_block_bytes(mtu, IPV4_UDP_OVERHEAD, 4096).unwrap();
            assert!(b + 32 + 28 <= mtu && b + 64 + 32 + 28 > mtu.min(4096 + 60 + 63));
        }
    }

    #[test]
    fn validate_rejects_bad_settings() {
        assert!(DgtConfig::default().validate().is_ok());
        for c in [
            DgtConfig {
                channels: 0,
                ..DgtConfig::default()
            },
            DgtConfig {
                channels: 8,
                ..DgtConfig::default()
            },
            DgtConfig {
                block_bytes: 6,
                ..DgtConfig::default()
            },
            DgtConfig {
                rate_bps: Some(0),
                ..DgtConfig::default()
            },
        ] {
            assert!(c.validate().is_err());
        }
    }
}
