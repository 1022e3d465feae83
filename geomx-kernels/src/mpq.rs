//! MPQ (mixed-precision quantization): the one codec decision by tensor size.
//!
//! A tensor is **large iff N ≥ T**; large tensors go Bi-Sparse with f32 values, small ones dense
//! FP16. This is the only definition of the boundary (the original used `>=` in C++ and `>` in
//! Python).

use crate::wire::ValueType;

/// Default threshold T (GeoMX server default).
pub const DEFAULT_MIN_SIZE: usize = 200_000;

/// Codec chosen by MPQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpqCodec {
    /// Bi-Sparse top-k, f32 values.
    SparseF32,
    /// Dense FP16.
    DenseF16,
}

impl MpqCodec {
    /// Value type on the wire.
    pub fn value_type(self) -> ValueType {
        match self {
            MpqCodec::SparseF32 => ValueType::F32,
            MpqCodec::DenseF16 => ValueType::F16,
        }
    }
}

/// Whether a tensor of `n` elements is large (N ≥ T).
#[inline]
pub fn is_large(n: usize, threshold: usize) -> bool {
    n >= threshold
}

/// The MPQ codec for a tensor of `n` elements under threshold `threshold`.
pub fn choose_codec(n: usize, threshold: usize) -> MpqCodec {
    if is_large(n, threshold) {
        MpqCodec::SparseF32
    } else {
        MpqCodec::DenseF16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_is_inclusive() {
        let t = DEFAULT_MIN_SIZE;
        assert_eq!(choose_codec(t - 1, t), MpqCodec::DenseF16);
        assert_eq!(choose_codec(t, t), MpqCodec::SparseF32);
        assert_eq!(choose_codec(t + 1, t), MpqCodec::SparseF32);
        assert_eq!(choose_codec(0, t), MpqCodec::DenseF16);
        assert_eq!(choose_codec(1000, 1000), MpqCodec::SparseF32);
    }
}
