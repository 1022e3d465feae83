//! The receiver's per-round counters, returned to the sender on the reliable channel (used by
//! `auto` pacing and reports).
//!
//! Encoding: the 32-byte header with kind 50, channel 0, value type 0, `sender` = the DGT sender
//! the report is about, key, round, `block` = number of channel entries (C + 1),
//! `elem_offset = elem_count = 0`; then per channel 0..=C three little-endian u32:
//! sent, on_time, late.

use super::header::{DgtKind, Header, DGT_HEADER_LEN};
use super::{DgtError, ValueType, MAX_CHANNELS};

/// Counts of one channel in one round (final once the round's late window closed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelRound {
    /// Blocks the terminator listed on this channel.
    pub sent: u32,
    /// Arrived before delivery.
    pub on_time: u32,
    /// Arrived after delivery, before the next round's delivery.
    pub late: u32,
}

impl ChannelRound {
    /// sent − on_time − late.
    pub fn lost(&self) -> u32 {
        self.sent - self.on_time - self.late
    }
}

/// Per-channel counters of one closed (sender, key, round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// The DGT sender the round came from.
    pub sender: u32,
    /// Key.
    pub key: u32,
    /// Round.
    pub round: u32,
    /// Index = channel (0 reliable, 1..=C).
    pub channels: Vec<ChannelRound>,
}

impl RoundReport {
    /// Fraction of unreliable blocks lost for good (0 when none was sent).
    pub fn unreliable_loss(&self) -> f64 {
        let (sent, lost) = self
            .channels
            .iter()
            .skip(1)
            .fold((0u64, 0u64), |(s, l), c| {
                (s + u64::from(c.sent), l + u64::from(c.lost()))
            });
        if sent == 0 {
            0.0
        } else {
            lost as f64 / sent as f64
        }
    }

    /// Appends the encoded report to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        Header {
            kind: DgtKind::Report,
            channel: 0,
            value_type: ValueType::F32,
            sender: self.sender,
            key: self.key,
            round: self.round,
            block: self.channels.len() as u32,
            elem_offset: 0,
            elem_count: 0,
        }
        .encode_into(out);
        for c in &self.channels {
            for v in [c.sent, c.on_time, c.late] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Decodes and checks a report (entries ≤ 8, on_time + late ≤ sent).
    pub fn decode(buf: &[u8]) -> Result<RoundReport, DgtError> {
        let (h, payload) = Header::decode(buf)?;
        if h.kind != DgtKind::Report {
            return Err(DgtError::BadKind(h.kind as u8));
        }
        let n = h.block as usize;
        if n == 0 || n > usize::from(MAX_CHANNELS) + 1 || h.elem_offset != 0 || h.elem_count != 0 {
            return Err(DgtError::BlockOutOfRange {
                block: h.block,
                n_b: u32::from(MAX_CHANNELS) + 1,
            });
        }
        if payload.len() != 12 * n {
            return Err(DgtError::BadPayloadLen {
                got: payload.len(),
                want: 12 * n,
            });
        }
        let u = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut channels = Vec::with_capacity(n);
        for e in payload.chunks_exact(12) {
            let c = ChannelRound {
                sent: u(&e[0..4]),
                on_time: u(&e[4..8]),
                late: u(&e[8..12]),
            };
            if u64::from(c.on_time) + u64::from(c.late) > u64::from(c.sent) {
                return Err(DgtError::Invalid(format!("report counts {c:?}")));
            }
            channels.push(c);
        }
        Ok(RoundReport {
            sender: h.sender,
            key: h.key,
            round: h.round,
            channels,
        })
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        DGT_HEADER_LEN + 12 * self.channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let r = RoundReport {
            sender: 3,
            key: 9,
            round: 41,
            channels: vec![
                ChannelRound {
                    sent: 10,
                    on_time: 10,
                    late: 0,
                },
                ChannelRound {
                    sent: 8,
                    on_time: 5,
                    late: 1,
                },
                ChannelRound {
                    sent: 2,
                    on_time: 0,
                    late: 0,
                },
            ],
        };
        assert_eq!(r.channels[1].lost(), 2);
        assert_eq!(r.unreliable_loss(), 0.4);
        let mut b = Vec::new();
        r.encode_into(&mut b);
        assert_eq!(b.len(), r.encoded_len());
        assert_eq!(RoundReport::decode(&b).unwrap(), r);
        let mut bad = b.clone();
        bad[32 + 12 + 4] = 9; // on_time 9 > sent 8
        assert!(RoundReport::decode(&bad).is_err());
        assert!(RoundReport::decode(&b[..b.len() - 1]).is_err());
        let mut many = b.clone();
        many[20] = 9;
        assert!(RoundReport::decode(&many).is_err());
        let empty = RoundReport {
            channels: vec![],
            ..r
        };
        assert_eq!(empty.unreliable_loss(), 0.0);
    }
}
