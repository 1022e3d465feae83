//! Typed errors of the kernels.

use thiserror::Error;

/// A payload that failed validation. Every variant names the key the payload was decoded for.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the 12-byte header.
    #[error("key {key}: payload of {len} bytes is shorter than the 12-byte header")]
    ShortHeader {
        /// Key being decoded.
        key: u64,
        /// Payload length in bytes.
        len: usize,
    },
    /// The layout byte is not a known layout.
    #[error("key {key}: unknown payload layout {layout}")]
    UnknownLayout {
        /// Key being decoded.
        key: u64,
        /// The layout byte received.
        layout: u8,
    },
    /// The value type byte is not a known value type.
    #[error("key {key}: unknown value type {value_type}")]
    UnknownValueType {
        /// Key being decoded.
        key: u64,
        /// The value type byte received.
        value_type: u8,
    },
    /// The payload's layout differs from the one the caller expects.
    #[error("key {key}: expected a {expected} payload, got {got}")]
    WrongLayout {
        /// Key being decoded.
        key: u64,
        /// Layout the caller asked for.
        expected: &'static str,
        /// Layout found in the header.
        got: &'static str,
    },
    /// `n_total` differs from the key's length.
    #[error("key {key}: n_total {n_total} differs from the key's length {expected}")]
    WrongLength {
        /// Key being decoded.
        key: u64,
        /// `n_total` from the header.
        n_total: u32,
        /// The key's length.
        expected: usize,
    },
    /// `count` is larger than `n_total`, or differs from it in a dense payload.
    #[error("key {key}: count {count} is invalid for n_total {n_total}")]
    BadCount {
        /// Key being decoded.
        key: u64,
        /// `count` from the header.
        count: u32,
        /// `n_total` from the header.
        n_total: u32,
    },
    /// A scale exponent on an f32 payload (only 16-bit payloads are scaled).
    #[error("key {key}: scale exponent {scale_exp} on an f32 payload")]
    ScaledF32 {
        /// Key being decoded.
        key: u64,
        /// The scale exponent received.
        scale_exp: i16,
    },
    /// The payload length does not match the header exactly.
    #[error("key {key}: payload is {got} bytes, header implies {expected}")]
    PayloadLength {
        /// Key being decoded.
        key: u64,
        /// Length implied by the header.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A sparse index is not below `n_total`.
    #[error("key {key}: index {index} at position {position} is not below n_total {n_total}")]
    IndexOutOfRange {
        /// Key being decoded.
        key: u64,
        /// Position of the index in the payload.
        position: usize,
        /// The index.
        index: u32,
        /// `n_total` from the header.
        n_total: u32,
    },
    /// Sparse indices are not strictly ascending (includes duplicates).
    #[error(
        "key {key}: index {index} at position {position} does not exceed the previous {previous}"
    )]
    NotAscending {
        /// Key being decoded.
        key: u64,
        /// Position of the index in the payload.
        position: usize,
        /// The index.
        index: u32,
        /// The index before it.
        previous: u32,
    },
}

/// Errors of the kernel entry points (bad arguments or configurations).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KernelError {
    /// Two buffers that must have the same length do not.
    #[error("length mismatch: expected {expected}, got {got}")]
    LengthMismatch {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A tensor range longer than `u32::MAX` elements (split it into ranges first).
    #[error("tensor of {len} elements exceeds u32::MAX; split it into ranges")]
    TooLong {
        /// The length.
        len: usize,
    },
    /// Sparse indices that are not strictly ascending or not below `n_total`.
    #[error("invalid sparse vector: {0}")]
    InvalidSparse(String),
    /// A configuration value outside its allowed range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A sender (data center) id outside the configured range.
    #[error("sender {sender} out of range (have {senders})")]
    UnknownSender {
        /// The sender id.
        sender: usize,
        /// Number of configured senders.
        senders: usize,
    },
    /// A payload that failed to decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Checks that a tensor range fits u32 indices.
pub(crate) fn check_u32_len(len: usize) -> Result<u32, KernelError> {
    u32::try_from(len).map_err(|_| KernelError::TooLong { len })
}

/// Checks that two lengths agree.
pub(crate) fn check_len(expected: usize, got: usize) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch { expected, got })
    }
}
