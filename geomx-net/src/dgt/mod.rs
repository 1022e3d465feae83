//! DGT (differential gradient transmission), sans-IO core: see `docs/dgt.md` and the spec.
//!
//! The caller ranks blocks (geomx-kernels `dgt_score`) and hands the per-block channel
//! assignment to a [`DgtSender`](crate::dgt::DgtSender); the sender cuts values into blocks,
//! queues them per channel with strict priority, paces the unreliable channels with a token
//! bucket and emits the terminator. A [`DgtReceiver`](crate::dgt::DgtReceiver) validates
//! datagrams, drops duplicates, keeps early blocks, waits for the terminator (or its deadline)
//! and delivers the tensor with late blocks of the previous round folded in. Neither reads a
//! clock or owns a socket: `now` is passed in and transmits are returned
//! ([`Transmit`](crate::dgt::Transmit)); channel 0 bytes go on the reliable (TCP) transport,
//! channels 1..=C on the unreliable datagram sockets of [`udp`](crate::dgt::udp).

mod config;
pub mod header;
pub mod link;
mod pacing;
mod receiver;
mod report;
pub mod seal;
mod sender;
pub mod udp;

pub use config::{
    auto_block_bytes, DgtConfig, TerminatorMode, DEFAULT_WINDOW_BYTES, FIN_DATAGRAMS,
    IPV4_UDP_OVERHEAD, IPV6_UDP_OVERHEAD,
};
pub use header::{DgtKind, Header, DGT_HEADER_LEN, DGT_MAGIC, DGT_VERSION};
pub use pacing::TokenBucket;
pub use receiver::{ChannelCounters, Delivery, DgtReceiver};
pub use report::{ChannelRound, RoundReport};
pub use sender::{DgtSender, SenderCounters, Transmit, Values, RELIABLE_RUN_BYTES};
pub use udp::UdpChannels;

/// Marker in `channel_of_block` for a block that is not sent.
pub const NOT_SENT: u8 = 0xFF;
/// Highest unreliable channel number allowed (C ≤ 7).
pub const MAX_CHANNELS: u8 = 7;

/// Element type of the values in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ValueType {
    /// Little-endian f32.
    F32 = 0,
    /// IEEE binary16 bits, little-endian.
    F16 = 1,
}

impl ValueType {
    /// Parses a value type byte.
    pub fn from_u8(b: u8) -> Result<ValueType, DgtError> {
        match b {
            0 => Ok(ValueType::F32),
            1 => Ok(ValueType::F16),
            other => Err(DgtError::BadValueType(other)),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ValueType::F32 => 4,
            ValueType::F16 => 2,
        }
    }
}

/// Errors of the DGT core: malformed messages (counted as invalid by the receiver) and misuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DgtError {
    /// Fewer than 32 bytes.
    #[error("truncated DGT header: {0} of 32 bytes")]
    Truncated(usize),
    /// Magic is not [`DGT_MAGIC`].
    #[error("bad DGT magic {0:#06x}")]
    BadMagic(u16),
    /// Version is not [`DGT_VERSION`].
    #[error("unknown DGT version {0}")]
    BadVersion(u8),
    /// Kind is no [`DgtKind`].
    #[error("unknown DGT kind {0}")]
    BadKind(u8),
    /// Channel out of range or wrong for the transport / message.
    #[error("bad channel {0}")]
    BadChannel(u8),
    /// Value type is no [`ValueType`].
    #[error("unknown value type {0}")]
    BadValueType(u8),
    /// Reserved flags set.
    #[error("reserved flags set: {0:#06x}")]
    BadFlags(u16),
    /// Key not in the receiver's key table.
    #[error("unknown key {0}")]
    UnknownKey(u32),
    /// Value type differs from the key table's.
    #[error("value type {got:?} but key {key} has {want:?}")]
    ValueTypeMismatch {
        /// Key.
        key: u32,
        /// In the message.
        got: ValueType,
        /// In the key table.
        want: ValueType,
    },
    /// Block id ≥ n_b, or terminator n_b / N differ from the key table.
    #[error("block {block} out of range ({n_b} blocks)")]
    BlockOutOfRange {
        /// Block id in the message.
        block: u32,
        /// Blocks of the key.
        n_b: u32,
    },
    /// elem_offset / elem_count inconsistent with B and N.
    #[error("block {block}: elements {offset}+{count} inconsistent with the key table")]
    BadElemRange {
        /// Block id.
        block: u32,
        /// elem_offset.
        offset: u32,
        /// elem_count.
        count: u32,
    },
    /// Payload length differs from what the header implies.
    #[error("payload of {got} bytes, expected {want}")]
    BadPayloadLen {
        /// Present.
        got: usize,
        /// Expected.
        want: usize,
    },
    /// A block arrived on a channel other than the terminator assigned it.
    #[error("block {block} on channel {got}, assigned {want}")]
    WrongChannel {
        /// Block id.
        block: u32,
        /// Channel in the header.
        got: u8,
        /// Channel in channel_of_block.
        want: u8,
    },
    /// A second, different terminator for the same round.
    #[error("conflicting terminator for key {key} round {round}")]
    ConflictingEnd {
        /// Key.
        key: u32,
        /// Round.
        round: u32,
    },
    /// Invalid configuration or arguments from the local caller.
    #[error("invalid DGT use: {0}")]
    Invalid(String),
}

/// Widens IEEE binary16 bits to f32 (exact: every f16 is an f32).
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m · 2^-24, normalise into f32.
            let shift = m.leading_zeros() - 21; // bring the top bit to bit 10
            let m = (m << shift) & 0x3ff;
            let e = 127 - 15 + 1 - shift;
            sign | (e << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_matches_reference_values() {
        // Independent reference: value = (-1)^s · 2^(e-15) · (1 + m/1024), subnormals m · 2^-24.
        for h in 0u16..=0xffff {
            let s = if h >> 15 == 1 { -1.0f64 } else { 1.0 };
            let e = i32::from((h >> 10) & 0x1f);
            let m = f64::from(h & 0x3ff);
            let got = f16_bits_to_f32(h);
            if e == 0x1f {
                if m == 0.0 {
                    assert_eq!(f64::from(got), s * f64::INFINITY);
                } else {
                    assert!(got.is_nan());
                }
                continue;
            }
            let want = if e == 0 {
                s * m * 2f64.powi(-24)
            } else {
                s * 2f64.powi(e - 15) * (1.0 + m / 1024.0)
            };
            assert_eq!(f64::from(got), want, "h = {h:#06x}");
            assert_eq!(got.is_sign_negative(), s < 0.0);
        }
    }
}
