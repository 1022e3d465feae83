//! The 12-byte codec payload header (little-endian):
//! `layout u8, value_type u8, scale_exp i16, n_total u32, count u32`.
//!
//! The spec calls the first byte `codec`; its values are [`Layout::Dense`] (0) and
//! [`Layout::Sparse`] (1).

use crate::error::DecodeError;

/// Length of the payload header in bytes.
pub const HEADER_LEN: usize = 12;

/// Payload layout (the header's `codec` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Layout {
    /// `n_total` values follow the header.
    Dense = 0,
    /// `count` u32 indices, then `count` values.
    Sparse = 1,
}

impl Layout {
    /// Name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Dense => "dense",
            Layout::Sparse => "sparse",
        }
    }
}

/// Element type of the values in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ValueType {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

impl ValueType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            ValueType::F32 => 4,
            ValueType::F16 | ValueType::Bf16 => 2,
        }
    }

    /// Parses the header byte.
    pub fn from_u8(b: u8) -> Option<ValueType> {
        match b {
            0 => Some(ValueType::F32),
            1 => Some(ValueType::F16),
            2 => Some(ValueType::Bf16),
            _ => None,
        }
    }
}

/// The codec payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadHeader {
    /// Dense or sparse.
    pub layout: Layout,
    /// Element type of the values.
    pub value_type: ValueType,
    /// `pow2` scale exponent e: the receiver multiplies values by 2^-e (0 when unscaled).
    pub scale_exp: i16,
    /// Length of the tensor range.
    pub n_total: u32,
    /// Number of values carried (= `n_total` for dense payloads).
    pub count: u32,
}

impl PayloadHeader {
    /// Serialises the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.layout as u8;
        b[1] = self.value_type as u8;
        b[2..4].copy_from_slice(&self.scale_exp.to_le_bytes());
        b[4..8].copy_from_slice(&self.n_total.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Total payload length (header included) this header implies.
    pub fn payload_len(&self) -> usize {
        let vs = self.value_type.size();
        match self.layout {
            Layout::Dense => HEADER_LEN + self.n_total as usize * vs,
            Layout::Sparse => HEADER_LEN + self.count as usize * (4 + vs),
        }
    }

    /// Parses and validates a header for key `key` whose length is `expected_n`.
    ///
    /// Checks the layout and value type bytes, `n_total == expected_n`, `count ≤ n_total`
    /// (`count == n_total` for dense), no scale on f32 values, and that `bytes.len()` equals the
    /// implied payload length exactly.
    pub fn parse(bytes: &[u8], key: u64, expected_n: usize) -> Result<PayloadHeader, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::ShortHeader {
                key,
                len: bytes.len(),
            });
        }
        let layout = match bytes[0] {
            0 => Layout::Dense,
            1 => Layout::Sparse,
            layout => return Err(DecodeError::UnknownLayout { key, layout }),
        };
        let value_type = ValueType::from_u8(bytes[1]).ok_or(DecodeError::UnknownValueType {
            key,
            value_type: bytes[1],
        })?;
        let scale_exp = i16::from_le_bytes([bytes[2], bytes[3]]);
        let n_total = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if n_total as usize != expected_n || u32::try_from(expected_n).is_err() {
            return Err(DecodeError::WrongLength {
                key,
                n_total,
                expected: expected_n,
            });
        }
        let count_ok = match layout {
            Layout::Dense => count == n_total,
            Layout::Sparse => count <= n_total,
        };
        if !count_ok {
            return Err(DecodeError::BadCount {
                key,
                count,
                n_total,
            });
        }
        if value_type == ValueType::F32 && scale_exp != 0 {
            return Err(DecodeError::ScaledF32 { key, scale_exp });
        }
        let h = PayloadHeader {
            layout,
            value_type,
            scale_exp,
            n_total,
            count,
        };
        let expected = h.payload_len();
        if bytes.len() != expected {
            return Err(DecodeError::PayloadLength {
                key,
                expected,
                got: bytes.len(),
            });
        }
        Ok(h)
    }
}
