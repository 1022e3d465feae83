//! The 32-byte DGT datagram header (spec layout, little-endian) and the terminator payload.
//!
//! | off | size | field |
//! |----:|-----:|-------|
//! | 0 | 2 | magic `0x4758` |
//! | 2 | 1 | version ([`DGT_VERSION`]) |
//! | 3 | 1 | kind ([`DgtKind`]: 48 block, 49 terminator with map, 50 report, 51 map, 52 terminator) |
//! | 4 | 1 | channel (0 reliable, 1..=C unreliable) |
//! | 5 | 1 | value type ([`ValueType`]) |
//! | 6 | 2 | flags (0) |
//! | 8 | 4 | sender id |
//! | 12 | 4 | key |
//! | 16 | 4 | round |
//! | 20 | 4 | block id (terminator: n_b) |
//! | 24 | 4 | element offset (terminator: 0) |
//! | 28 | 4 | element count (terminator: N) |
//!
//! A block message carries exactly `elem_count · e` value bytes after the header; End and Map
//! carry `n_b` channel bytes (`channel_of_block`, [`NOT_SENT`] for blocks not sent); Fin carries
//! nothing. Only blocks and Fin travel as datagrams.

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{DgtError, ValueType, MAX_CHANNELS, NOT_SENT};

/// Header magic (`"GX"` read as a little-endian u16 is 0x5847; the spec fixes 0x4758).
pub const DGT_MAGIC: u16 = 0x4758;
/// DGT header version spoken by this crate (3: the split terminator, [`DgtKind::Map`] and
/// [`DgtKind::Fin`]; 2: reliable runs).
pub const DGT_VERSION: u8 = 3;
/// Size of [`DgtHeader`] in bytes.
pub const DGT_HEADER_LEN: usize = 32;

/// Message kinds in the DGT range (48..=63) of the frame kind tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DgtKind {
    /// One block of values.
    Block = 48,
    /// End of (key, round): `channel_of_block` follows the header.
    End = 49,
    /// Receiver → sender: per-channel counters of a closed round ([`super::RoundReport`]).
    Report = 50,
    /// The channel map of (key, round) without ending it (reliable channel only): sent right
    /// after the reliable blocks; `channel_of_block` follows the header.
    Map = 51,
    /// End of (key, round) without the map (it came with [`DgtKind::Map`]); no payload. On the
    /// reliable channel and as datagrams.
    Fin = 52,
}

impl DgtKind {
    /// True for the kinds that may travel as datagrams (channels 1..=C).
    pub fn unreliable_ok(self) -> bool {
        matches!(self, DgtKind::Block | DgtKind::Fin)
    }
}

impl DgtKind {
    /// Parses a kind byte.
    pub fn from_u8(b: u8) -> Result<DgtKind, DgtError> {
        match b {
            48 => Ok(DgtKind::Block),
            49 => Ok(DgtKind::End),
            50 => Ok(DgtKind::Report),
            51 => Ok(DgtKind::Map),
            52 => Ok(DgtKind::Fin),
            other => Err(DgtError::BadKind(other)),
        }
    }
}

/// The raw header as it lies on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DgtHeader {
    /// [`DGT_MAGIC`].
    pub magic: U16,
    /// [`DGT_VERSION`].
    pub version: u8,
    /// [`DgtKind`] tag.
    pub kind: u8,
    /// Channel: 0 reliable, 1..=C unreliable.
    pub channel: u8,
    /// [`ValueType`] tag.
    pub value_type: u8,
    /// Must be 0.
    pub flags: U16,
    /// Sender node id.
    pub sender: U32,
    /// Key.
    pub key: U32,
    /// Round.
    pub round: U32,
    /// Block id (terminator: number of blocks n_b).
    pub block: U32,
    /// First element of the block (terminator: 0).
    pub elem_offset: U32,
    /// Elements in the block (terminator: tensor length N).
    pub elem_count: U32,
}

const _: () = assert!(core::mem::size_of::<DgtHeader>() == DGT_HEADER_LEN);

/// A header whose fixed fields (magic, version, kind, channel, value type, flags) are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: DgtKind,
    /// Channel.
    pub channel: u8,
    /// Value type.
    pub value_type: ValueType,
    /// Sender id.
    pub sender: u32,
    /// Key.
    pub key: u32,
    /// Round.
    pub round: u32,
    /// Block id (terminator: n_b).
    pub block: u32,
    /// Element offset (terminator: 0).
    pub elem_offset: u32,
    /// Element count (terminator: N).
    pub elem_count: u32,
}

impl Header {
    /// Encodes into 32 bytes appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let raw = DgtHeader {
            magic: U16::new(DGT_MAGIC),
            version: DGT_VERSION,
            kind: self.kind as u8,
            channel: self.channel,
            value_type: self.value_type as u8,
            flags: U16::new(0),
            sender: U32::new(self.sender),
            key: U32::new(self.key),
            round: U32::new(self.round),
            block: U32::new(self.block),
            elem_offset: U32::new(self.elem_offset),
            elem_count: U32::new(self.elem_count),
        };
        out.extend_from_slice(raw.as_bytes());
    }

    /// Decodes and checks the fixed fields of a message; returns the header and the bytes after
    /// it. Field checks against the key table happen in the receiver.
    pub fn decode(buf: &[u8]) -> Result<(Header, &[u8]), DgtError> {
        let (raw, rest) =
            DgtHeader::ref_from_prefix(buf).map_err(|_| DgtError::Truncated(buf.len()))?;
        if raw.magic.get() != DGT_MAGIC {
            return Err(DgtError::BadMagic(raw.magic.get()));
        }
        if raw.version != DGT_VERSION {
            return Err(DgtError::BadVersion(raw.version));
        }
        let kind = DgtKind::from_u8(raw.kind)?;
        if raw.channel > MAX_CHANNELS {
            return Err(DgtError::BadChannel(raw.channel));
        }
        let value_type = ValueType::from_u8(raw.value_type)?;
        if raw.flags.get() != 0 {
            return Err(DgtError::BadFlags(raw.flags.get()));
        }
        if !kind.unreliable_ok() && raw.channel != 0 {
            return Err(DgtError::BadChannel(raw.channel));
        }
        Ok((
            Header {
                kind,
                channel: raw.channel,
                value_type,
                sender: raw.sender.get(),
                key: raw.key.get(),
                round: raw.round.get(),
                block: raw.block.get(),
                elem_offset: raw.elem_offset.get(),
                elem_count: raw.elem_count.get(),
            },
            rest,
        ))
    }
}

/// Checks a terminator's `channel_of_block` bytes: one per block, each 0..=`channels` or
/// [`NOT_SENT`].
pub fn check_channel_map(map: &[u8], n_b: usize, channels: u8) -> Result<(), DgtError> {
    if map.len() != n_b {
        return Err(DgtError::BadPayloadLen {
            got: map.len(),
            want: n_b,
        });
    }
    match map.iter().find(|&&c| c > channels && c != NOT_SENT) {
        Some(&c) => Err(DgtError::BadChannel(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: DgtKind::Block,
            channel: 2,
            value_type: ValueType::F16,
            sender: 7,
            key: 0xdead_beef,
            round: 3,
            block: 5,
            elem_offset: 5 * 2048,
            elem_count: 2048,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        let mut buf = Vec::new();
        h.encode_into(&mut buf);
        assert_eq!(buf.len(), DGT_HEADER_LEN);
        assert_eq!(&buf[0..2], &[0x58, 0x47]);
        assert_eq!(buf[3], 48);
        assert_eq!(&buf[12..16], &0xdead_beefu32.to_le_bytes());
        buf.push(9);
        let (d, rest) = Header::decode(&buf).unwrap();
        assert_eq!(d, h);
        assert_eq!(rest, &[9]);
    }

    #[test]
    fn each_bad_field_is_typed() {
        let mut good = Vec::new();
        sample().encode_into(&mut good);
        type Check = fn(&DgtError) -> bool;
        let cases: [(usize, u8, Check); 6] = [
            (0, 0, |e| matches!(e, DgtError::BadMagic(_))),
            (2, 9, |e| matches!(e, DgtError::BadVersion(9))),
            (3, 53, |e| matches!(e, DgtError::BadKind(53))),
            (4, 8, |e| matches!(e, DgtError::BadChannel(8))),
            (5, 2, |e| matches!(e, DgtError::BadValueType(2))),
            (6, 1, |e| matches!(e, DgtError::BadFlags(1))),
        ];
        for (off, val, ok) in cases {
            let mut b = good.clone();
            b[off] = val;
            let e = Header::decode(&b).unwrap_err();
            assert!(ok(&e), "offset {off}: {e:?}");
        }
        assert_eq!(
            Header::decode(&good[..31]).unwrap_err(),
            DgtError::Truncated(31)
        );
        let mut end_on_udp = good.clone();
        end_on_udp[3] = 49;
        assert!(matches!(
            Header::decode(&end_on_udp),
            Err(DgtError::BadChannel(2))
        ));
        let mut map_on_udp = good.clone();
        map_on_udp[3] = 51;
        assert!(matches!(
            Header::decode(&map_on_udp),
            Err(DgtError::BadChannel(2))
        ));
        let mut fin_on_udp = good.clone();
        fin_on_udp[3] = 52;
        assert_eq!(Header::decode(&fin_on_udp).unwrap().0.kind, DgtKind::Fin);
    }

    #[test]
    fn channel_map_checks() {
        assert!(check_channel_map(&[0, 1, 3, NOT_SENT], 4, 3).is_ok());
        assert!(check_channel_map(&[0, 4], 2, 3).is_err());
        assert!(check_channel_map(&[0], 2, 3).is_err());
    }
}
