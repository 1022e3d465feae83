//! How a ps-lite message travels in a geomx frame (sans-IO, unit-tested on its own).
//!
//! A ps-lite message is a meta record (push / pull / SimpleApp flags, `head` = the KV `cmd` or the
//! SimpleApp head, app id, customer id, timestamp) plus up to three arrays (keys, values, value
//! lengths) or a SimpleApp body. It maps onto one geomx request or reply:
//!
//! | frame field | request (and deferred response) | reply |
//! |---|---|---|
//! | `kind` | `Push` (data), `Barrier` (barrier) | `Reply` / `ErrorReply` |
//! | `key` | the key of a *compact* message | echoed |
//! | `version` | `timestamp` (low 32 bits) and `head` (high 32 bits) | `flags` (low 32) and `aux` (high 32) |
//! | `offset` | `app_id` (bits 0-15), `customer_id` (bits 16-31), `flags` (bits 32-63) | echoed |
//! | `total` | `aux` | echoed |
//!
//! `aux` is the number of keys of a general message, or the only value length of a compact
//! message with lengths. Payload layouts:
//!
//! * compact (exactly one key, carried in the header): the values, nothing else, so a large
//!   single-key push or pull goes out straight from the caller's buffer;
//! * general: keys (8 bytes each), lengths (4 bytes each, if any), zero padding to a multiple of
//!   8 bytes, values;
//! * SimpleApp: the body;
//! * error (a deferred response that failed): a UTF-8 message.
//!
//! All integers are little-endian. Every length is checked against the payload before use.

use std::ops::Range;

use crate::error::PsError;

/// The message carries pushed values.
pub const F_PUSH: u32 = 1;
/// The message asks for values back.
pub const F_PULL: u32 = 1 << 1;
/// The message has value lengths.
pub const F_LENS: u32 = 1 << 2;
/// Exactly one key, carried in the frame header's `key`.
pub const F_COMPACT: u32 = 1 << 3;
/// A SimpleApp message (head + body).
pub const F_SIMPLE: u32 = 1 << 4;
/// A request (clear: a response delivered later, after a deferred reply).
pub const F_REQUEST: u32 = 1 << 5;
/// Reply only: the handler did not answer yet; the response follows as a separate message.
pub const F_DEFERRED: u32 = 1 << 6;
/// The response failed; the payload is the reason.
pub const F_ERROR: u32 = 1 << 7;

const KNOWN_FLAGS: u32 = (1 << 8) - 1;

/// Largest app or customer id that fits the header (ps-lite uses small integers).
pub const MAX_ID: i32 = u16::MAX as i32;

/// The meta part of a message, as carried by the frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// `F_*` bits.
    pub flags: u32,
    /// KV `cmd` or SimpleApp head.
    pub head: i32,
    /// Application id.
    pub app_id: i32,
    /// The requesting customer's id.
    pub customer_id: i32,
    /// The request's timestamp at the requesting customer.
    pub timestamp: i32,
}

impl Meta {
    /// True if `flag` is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// Header fields of a request frame (or a deferred response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFields {
    /// Frame `key`.
    pub key: u64,
    /// Frame `version`.
    pub version: u64,
    /// Frame `offset`.
    pub offset: u64,
    /// Frame `total`.
    pub total: u64,
}

/// Packs a request's meta into frame header fields.
pub fn encode_request(meta: &Meta, key: u64, aux: u32) -> RequestFields {
    RequestFields {
        key,
        version: (meta.timestamp as u32 as u64) | ((meta.head as u32 as u64) << 32),
        offset: (meta.app_id as u16 as u64)
            | ((meta.customer_id as u16 as u64) << 16)
            | ((meta.flags as u64) << 32),
        total: aux as u64,
    }
}

/// Unpacks a request's meta and `aux` from frame header fields.
pub fn decode_request(f: &RequestFields) -> Result<(Meta, u32), PsError> {
    let flags = (f.offset >> 32) as u32;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(PsError::Protocol(format!(
            "unknown message flags {flags:#x}"
        )));
    }
    if f.total > u32::MAX as u64 {
        return Err(PsError::Protocol(format!(
            "bad message aux field {}",
            f.total
        )));
    }
    let meta = Meta {
        flags,
        head: (f.version >> 32) as u32 as i32,
        app_id: (f.offset & 0xffff) as i32,
        customer_id: ((f.offset >> 16) & 0xffff) as i32,
        timestamp: f.version as u32 as i32,
    };
    Ok((meta, f.total as u32))
}

/// Packs a reply's flags and `aux` into the reply's `version`.
pub fn encode_reply_version(flags: u32, aux: u32) -> u64 {
    flags as u64 | ((aux as u64) << 32)
}

/// Unpacks a reply's flags and `aux`.
pub fn decode_reply_version(version: u64) -> Result<(u32, u32), PsError> {
    let flags = version as u32;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(PsError::Protocol(format!("unknown reply flags {flags:#x}")));
    }
    Ok((flags, (version >> 32) as u32))
}

/// Borrowed arrays of an outgoing message.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvRef<'a> {
    /// Keys.
    pub keys: &'a [u64],
    /// Values, as bytes.
    pub vals: &'a [u8],
    /// Value lengths (in values, not bytes); empty if the message has none.
    pub lens: &'a [i32],
}

/// How an outgoing KV message is laid out.
#[derive(Debug)]
pub enum Outgoing<'a> {
    /// One key in the header; the payload is the caller's value bytes, sent without a copy.
    Compact {
        /// The key.
        key: u64,
        /// `aux`: the value length when the message has lengths, else 0.
        aux: u32,
        /// Extra flags (`F_COMPACT`, maybe `F_LENS`).
        flags: u32,
        /// The values.
        payload: &'a [u8],
    },
    /// Keys, lengths and values in one assembled payload.
    General {
        /// `aux`: the number of keys.
        aux: u32,
        /// Extra flags (maybe `F_LENS`).
        flags: u32,
        /// The assembled payload.
        payload: Vec<u8>,
    },
}

impl Outgoing<'_> {
    /// The flags this layout adds to the message's own.
    pub fn flags(&self) -> u32 {
        match self {
            Outgoing::Compact { flags, .. } | Outgoing::General { flags, .. } => *flags,
        }
    }

    /// The frame `key`.
    pub fn key(&self) -> u64 {
        match self {
            Outgoing::Compact { key, .. } => *key,
            Outgoing::General { .. } => 0,
        }
    }

    /// The `aux` field.
    pub fn aux(&self) -> u32 {
        match self {
            Outgoing::Compact { aux, .. } | Outgoing::General { aux, .. } => *aux,
        }
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        match self {
            Outgoing::Compact { payload, .. } => payload,
            Outgoing::General { payload, .. } => payload,
        }
    }
}

/// Checks that keys, values and lengths are consistent for values of `val_size` bytes: lengths
/// either absent or one per key, summing to the number of values; without lengths, the same
/// number of values per key.
pub fn validate(kv: &KvRef<'_>, val_size: usize) -> Result<(), PsError> {
    if val_size == 0 {
        return Err(PsError::Invalid("value size is 0".into()));
    }
    if kv.vals.len() % val_size != 0 {
        return Err(PsError::Invalid(format!(
            "{} value bytes are not a whole number of {val_size}-byte values",
            kv.vals.len()
        )));
    }
    let nvals = kv.vals.len() / val_size;
    if kv.keys.len() > u32::MAX as usize {
        return Err(PsError::Invalid(format!(
            "{} keys in one message",
            kv.keys.len()
        )));
    }
    if !kv.lens.is_empty() {
        if kv.lens.len() != kv.keys.len() {
            return Err(PsError::Invalid(format!(
                "lens has {} entries for {} keys",
                kv.lens.len(),
                kv.keys.len()
            )));
        }
        let mut sum: u64 = 0;
        for (i, &l) in kv.lens.iter().enumerate() {
            if l < 0 {
                return Err(PsError::Invalid(format!("lens[{i}] = {l} is negative")));
            }
            sum += l as u64;
        }
        if sum != nvals as u64 {
            return Err(PsError::Invalid(format!(
                "lens sum to {sum} values but {nvals} values were given"
            )));
        }
    } else if kv.keys.is_empty() {
        if nvals != 0 {
            return Err(PsError::Invalid(format!("{nvals} values for no key")));
        }
    } else if nvals % kv.keys.len() != 0 {
        return Err(PsError::Invalid(format!(
            "{nvals} values do not divide evenly among {} keys (give lens for values of different lengths)",
            kv.keys.len()
        )));
    }
    Ok(())
}

fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Lays out a validated KV message: compact when allowed and there is exactly one key, general
/// otherwise, assembled in the buffer `scratch` returns (only called for the general layout).
pub fn layout<'a>(
    kv: &KvRef<'a>,
    compact_allowed: bool,
    scratch: impl FnOnce() -> Vec<u8>,
) -> Outgoing<'a> {
    if compact_allowed && kv.keys.len() == 1 {
        let (aux, flags) = match kv.lens.first() {
            Some(&l) => (l as u32, F_COMPACT | F_LENS),
            None => (0, F_COMPACT),
        };
        return Outgoing::Compact {
            key: kv.keys[0],
            aux,
            flags,
            payload: kv.vals,
        };
    }
    let n = kv.keys.len();
    let head = n * 8 + kv.lens.len() * 4;
    let vals_at = align8(head);
    let mut p = scratch();
    p.clear();
    p.reserve_exact(vals_at + kv.vals.len());
    for k in kv.keys {
        p.extend_from_slice(&k.to_le_bytes());
    }
    for l in kv.lens {
        p.extend_from_slice(&l.to_le_bytes());
    }
    p.resize(vals_at, 0);
    p.extend_from_slice(kv.vals);
    Outgoing::General {
        aux: n as u32,
        flags: if kv.lens.is_empty() { 0 } else { F_LENS },
        payload: p,
    }
}

/// Where the arrays of a received KV message lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One key (from the header) and maybe one length; the whole payload is values.
    Compact {
        /// The key.
        key: u64,
        /// The value length, if the message has lengths.
        len: Option<i32>,
    },
    /// Byte ranges of the payload.
    General {
        /// Keys (8 bytes each).
        keys: Range<usize>,
        /// Lengths (4 bytes each; empty range if none).
        lens: Range<usize>,
        /// Values.
        vals: Range<usize>,
    },
}

impl Layout {
    /// Number of keys.
    pub fn num_keys(&self) -> usize {
        match self {
            Layout::Compact { .. } => 1,
            Layout::General { keys, .. } => keys.len() / 8,
        }
    }

    /// Byte range of the values within the payload.
    pub fn vals(&self, payload_len: usize) -> Range<usize> {
        match self {
            Layout::Compact { .. } => 0..payload_len,
            Layout::General { vals, .. } => vals.clone(),
        }
    }
}

/// Locates the arrays of a received KV message from its flags, `aux`, header key and payload
/// length.
pub fn locate(flags: u32, aux: u32, key: u64, payload_len: usize) -> Result<Layout, PsError> {
    if flags & F_COMPACT != 0 {
        let len = if flags & F_LENS != 0 {
            if aux > i32::MAX as u32 {
                return Err(PsError::Protocol(format!(
                    "value length {aux} out of range"
                )));
            }
            Some(aux as i32)
        } else {
            None
        };
        return Ok(Layout::Compact { key, len });
    }
    let n = aux as usize;
    let lens_bytes = if flags & F_LENS != 0 { n * 4 } else { 0 };
    let head = n
        .checked_mul(8)
        .and_then(|k| k.checked_add(lens_bytes))
        .ok_or_else(|| PsError::Protocol(format!("{n} keys overflow")))?;
    let vals_at = align8(head);
    if vals_at > payload_len {
        return Err(PsError::Protocol(format!(
            "{n} keys{} need {vals_at} bytes but the payload has {payload_len}",
            if lens_bytes > 0 { " and lengths" } else { "" }
        )));
    }
    Ok(Layout::General {
        keys: 0..n * 8,
        lens: n * 8..head,
        vals: vals_at..payload_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(flags: u32) -> Meta {
        Meta {
            flags,
            head: -7,
            app_id: 3,
            customer_id: 65535,
            timestamp: 123_456,
        }
    }

    #[test]
    fn request_fields_round_trip() {
        for flags in [
            0,
            F_PUSH,
            F_PUSH | F_PULL | F_COMPACT | F_LENS,
            F_SIMPLE | F_REQUEST,
        ] {
            let m = meta(flags);
            let f = encode_request(&m, 42, 9);
            assert_eq!(f.key, 42);
            assert_eq!(decode_request(&f).unwrap(), (m, 9));
        }
    }

    #[test]
    fn unknown_flags_and_bad_aux_are_rejected() {
        let mut f = encode_request(&meta(F_PUSH), 0, 0);
        f.offset |= 1 << 60;
        assert!(decode_request(&f).is_err());
        let mut f = encode_request(&meta(F_PUSH), 0, 0);
        f.total = u64::MAX;
        assert!(decode_request(&f).is_err());
        assert!(decode_reply_version(1 << 20).is_err());
        assert_eq!(
            decode_reply_version(encode_reply_version(F_DEFERRED, 77)).unwrap(),
            (F_DEFERRED, 77)
        );
    }

    #[test]
    fn validate_catches_mismatches() {
        let keys = [1u64, 2, 3];
        let vals = [0u8; 24];
        let ok = KvRef {
            keys: &keys,
            vals: &vals,
            lens: &[],
        };
        assert!(validate(&ok, 4).is_ok());
        assert!(validate(&ok, 0).is_err());
        assert!(
            validate(&ok, 5).is_err(),
            "24 bytes are no whole number of 5-byte values"
        );
        let uneven = KvRef {
            vals: &vals[..20],
            ..ok
        };
        assert!(validate(&uneven, 4).is_err(), "5 values among 3 keys");
        let short_lens = KvRef {
            lens: &[1, 2],
            ..ok
        };
        let e = validate(&short_lens, 4).unwrap_err().to_string();
        assert!(e.contains("lens has 2 entries for 3 keys"), "{e}");
        let bad_sum = KvRef {
            lens: &[1, 2, 4],
            ..ok
        };
        assert!(validate(&bad_sum, 4).is_err());
        let negative = KvRef {
            lens: &[-1, 3, 4],
            ..ok
        };
        assert!(validate(&negative, 4).is_err());
        let good_lens = KvRef {
            lens: &[1, 2, 3],
            ..ok
        };
        assert!(validate(&good_lens, 4).is_ok());
        let no_keys = KvRef {
            keys: &[],
            vals: &vals,
            lens: &[],
        };
        assert!(validate(&no_keys, 4).is_err());
    }

    #[test]
    fn compact_layout_sends_the_values_in_place() {
        let keys = [99u64];
        let vals = [7u8; 16];
        let kv = KvRef {
            keys: &keys,
            vals: &vals,
            lens: &[4],
        };
        let out = layout(&kv, true, Vec::new);
        assert_eq!(out.payload().as_ptr(), vals.as_ptr());
        assert_eq!((out.key(), out.aux()), (99, 4));
        assert_eq!(out.flags(), F_COMPACT | F_LENS);
        let l = locate(out.flags(), out.aux(), out.key(), 16).unwrap();
        assert_eq!(
            l,
            Layout::Compact {
                key: 99,
                len: Some(4)
            }
        );
        assert_eq!(l.vals(16), 0..16);
    }

    #[test]
    fn general_layout_round_trips_with_aligned_values() {
        let keys = [1u64, 5, 9];
        let lens = [1i32, 0, 2];
        let vals: Vec<u8> = (0..24).collect();
        let kv = KvRef {
            keys: &keys,
            vals: &vals,
            lens: &lens,
        };
        let out = layout(&kv, true, Vec::new);
        assert_eq!(out.flags(), F_LENS);
        let p = out.payload().to_vec();
        let l = locate(out.flags(), out.aux(), 0, p.len()).unwrap();
        let Layout::General {
            keys: kr,
            lens: lr,
            vals: vr,
        } = l
        else {
            panic!("general expected")
        };
        assert_eq!(vr.start % 8, 0);
        let got_keys: Vec<u64> = p[kr]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let got_lens: Vec<i32> = p[lr]
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got_keys, keys);
        assert_eq!(got_lens, lens);
        assert_eq!(&p[vr], &vals[..]);
        // A single key may be forced into the general layout (a reply whose key differs).
        let one = KvRef {
            keys: &keys[..1],
            vals: &vals[..4],
            lens: &[],
        };
        assert!(matches!(
            layout(&one, false, Vec::new),
            Outgoing::General { .. }
        ));
    }

    #[test]
    fn truncated_general_payloads_are_rejected() {
        assert!(locate(0, 3, 0, 23).is_err());
        assert!(
            locate(F_LENS, 3, 0, 36).is_err(),
            "3 keys + 3 lens need 40 bytes"
        );
        assert!(locate(F_LENS, 3, 0, 40).is_ok());
        assert!(locate(0, u32::MAX, 0, 1 << 20).is_err());
        assert!(locate(F_COMPACT | F_LENS, u32::MAX, 1, 8).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_general_message_round_trips(
            keys in proptest::collection::vec(proptest::num::u64::ANY, 0..40),
            per_key in 0usize..5,
            with_lens in proptest::bool::ANY,
        ) {
            let nvals = keys.len() * per_key;
            let vals: Vec<u8> = (0..nvals * 4).map(|i| i as u8).collect();
            let lens: Vec<i32> = if with_lens { vec![per_key as i32; keys.len()] } else { vec![] };
            let kv = KvRef { keys: &keys, vals: &vals, lens: &lens };
            proptest::prop_assert!(validate(&kv, 4).is_ok());
            let out = layout(&kv, false, Vec::new);
            let p = out.payload().to_vec();
            let l = locate(out.flags(), out.aux(), out.key(), p.len()).unwrap();
            proptest::prop_assert_eq!(l.num_keys(), keys.len());
            proptest::prop_assert_eq!(&p[l.vals(p.len())], &vals[..]);
        }
    }
}
