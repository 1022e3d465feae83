//! Sparse vectors (strictly ascending u32 indices + f32 values), their payload codec, and the
//! aggregation kernels of the pull direction: scatter-add into dense and merge into sparse.
//!
//! Payload: the 12-byte header (`layout = Sparse`), then `count` u32 indices, then `count` values
//! (f32, FP16 or BF16; FP16 may carry a `pow2` scale). Size = 12 + count·(4 + value bytes).

use crate::cast::{self, Pow2};
use crate::dense::{max_abs_key, pow2_exponent, unscale_one, Scaling};
use crate::error::{check_u32_len, DecodeError, KernelError};
use crate::wire::{Layout, PayloadHeader, ValueType, HEADER_LEN};

/// A sparse vector of logical length `n_total`. Indices are strictly ascending and below
/// `n_total` (checked on construction), so kernels can rely on them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparseVec {
    n_total: u32,
    indices: Vec<u32>,
    values: Vec<f32>,
}

/// Reusable O(N) scratch for [`SparseVec::merge_with`] (a zeroed dense buffer and a bitmap;
/// both are left zeroed after every merge).
#[derive(Debug, Clone, Default)]
pub struct MergeScratch {
    dense: Vec<f32>,
    bits: Vec<u64>,
}

/// Payload size in bytes of a sparse payload with `count` values of `value_type`.
pub fn sparse_payload_len(count: usize, value_type: ValueType) -> usize {
    HEADER_LEN + count * (4 + value_type.size())
}

/// Whether a sparse payload of `count` values is smaller than the dense f32 data of `n` elements
/// (the spec sends dense when `count·(4 + value size) ≥ 4N`).
pub fn sparse_is_smaller(count: usize, value_type: ValueType, n: usize) -> bool {
    count.saturating_mul(4 + value_type.size()) < n.saturating_mul(4)
}

impl SparseVec {
    /// An empty vector of length `n_total`.
    pub fn empty(n_total: u32) -> SparseVec {
        SparseVec {
            n_total,
            indices: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Builds a vector, checking that indices are strictly ascending and below `n_total` and
    /// that there are as many values as indices.
    pub fn new(
        n_total: u32,
        indices: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<SparseVec, KernelError> {
        if indices.len() != values.len() {
            return Err(KernelError::LengthMismatch {
                expected: indices.len(),
                got: values.len(),
            });
        }
        validate_indices(&indices, n_total).map_err(KernelError::InvalidSparse)?;
        Ok(SparseVec {
            n_total,
            indices,
            values,
        })
    }

    /// Builds a vector from parts known to be valid (crate-internal producers).
    pub(crate) fn from_parts(n_total: u32, indices: Vec<u32>, values: Vec<f32>) -> SparseVec {
        debug_assert!(validate_indices(&indices, n_total).is_ok());
        debug_assert_eq!(indices.len(), values.len());
        SparseVec {
            n_total,
            indices,
            values,
        }
    }

    /// The non-zero entries of `dense` (±0.0 omitted), ascending (a vectorised scan).
    pub fn from_dense_nonzero(dense: &[f32]) -> Result<SparseVec, KernelError> {
        let mut s = SparseVec::default();
        s.assign_dense_nonzero(dense)?;
        Ok(s)
    }

    /// Replaces `self` with the non-zero entries of `dense`, reusing the buffers.
    pub fn assign_dense_nonzero(&mut self, dense: &[f32]) -> Result<(), KernelError> {
        self.n_total = check_u32_len(dense.len())?;
        self.indices.clear();
        self.values.clear();
        crate::topk::scan_ge(dense, 1, |i, _| self.indices.push(i as u32));
        self.values
            .extend(self.indices.iter().map(|&i| dense[i as usize]));
        Ok(())
    }

    /// Logical length.
    pub fn n_total(&self) -> u32 {
        self.n_total
    }

    /// Number of stored entries.
    pub fn count(&self) -> usize {
        self.indices.len()
    }

    /// Whether no entries are stored.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Stored indices (strictly ascending).
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Stored values, one per index.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Divides every value by `d` (the local server's mean over W workers).
    pub fn div_values(&mut self, d: f32) {
        for v in &mut self.values {
            *v /= d;
        }
    }

    /// The dense form.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0.0; self.n_total as usize];
        for (&i, &v) in self.indices.iter().zip(&self.values) {
            d[i as usize] = v;
        }
        d
    }

    /// `dense[i] += v` for every stored entry.
    pub fn scatter_add_into(&self, dense: &mut [f32]) -> Result<(), KernelError> {
        if dense.len() != self.n_total as usize {
            return Err(KernelError::LengthMismatch {
                expected: self.n_total as usize,
                got: dense.len(),
            });
        }
        scatter_add_unchecked(&self.indices, &self.values, dense);
        Ok(())
    }

    /// Sum of several sparse vectors of the same length, as a sparse vector.
    ///
    /// Values are summed in input order starting from +0.0, exactly as scatter-adding the inputs
    /// in order into a zeroed dense buffer would, and entries whose sum is ±0.0 are omitted; the
    /// result equals `from_dense_nonzero` of that dense sum bit for bit. Allocates an O(N)
    /// scratch; use [`SparseVec::merge_with`] to reuse one across rounds.
    pub fn merge(inputs: &[&SparseVec]) -> Result<SparseVec, KernelError> {
        SparseVec::merge_with(inputs, &mut MergeScratch::default())
    }

    /// [`SparseVec::merge`] with a reusable scratch: the inputs are scatter-added into the
    /// scratch's dense buffer while a bitmap records the touched indices; the bitmap is then
    /// walked in index order to emit the non-zero sums and reset the buffer to zero.
    pub fn merge_with(
        inputs: &[&SparseVec],
        scratch: &mut MergeScratch,
    ) -> Result<SparseVec, KernelError> {
        let Some(first) = inputs.first() else {
            return Err(KernelError::InvalidConfig("merge of zero vectors".into()));
        };
        let n_total = first.n_total;
        if let Some(bad) = inputs.iter().find(|s| s.n_total != n_total) {
            return Err(KernelError::LengthMismatch {
                expected: n_total as usize,
                got: bad.n_total as usize,
            });
        }
        let n = n_total as usize;
        // Invariant between calls: `dense` and `bits` are all zero.
        if scratch.dense.len() < n {
            scratch.dense.resize(n, 0.0);
        }
        let words = n.div_ceil(64);
        if scratch.bits.len() < words {
            scratch.bits.resize(words, 0);
        }
        let dense = &mut scratch.dense[..n];
        let bits = &mut scratch.bits[..words];
        let mut touched = 0usize;
        for s in inputs {
            touched += s.indices.len();
            for (&i, &v) in s.indices.iter().zip(&s.values) {
                dense[i as usize] += v;
                bits[(i >> 6) as usize] |= 1u64 << (i & 63);
            }
        }
        let mut indices = Vec::with_capacity(touched);
        let mut values = Vec::with_capacity(touched);
        for (w, word) in bits.iter_mut().enumerate() {
            let mut m = std::mem::take(word);
            while m != 0 {
                let i = w * 64 + m.trailing_zeros() as usize;
                let x = std::mem::take(&mut dense[i]);
                if x != 0.0 {
                    indices.push(i as u32);
                    values.push(x);
                }
                m &= m - 1;
            }
        }
        Ok(SparseVec::from_parts(n_total, indices, values))
    }

    /// Encodes into a payload of `value_type` values, replacing the contents of `out`.
    /// `scaling` applies to FP16 values only. Returns the number of non-finite values sent.
    pub fn encode(&self, value_type: ValueType, scaling: Scaling, out: &mut Vec<u8>) -> usize {
        let count = self.indices.len() as u32;
        let scale_exp = match (value_type, scaling) {
            (ValueType::F16, Scaling::Pow2) => pow2_exponent(max_abs_key(&self.values)),
            _ => 0,
        };
        let header = PayloadHeader {
            layout: Layout::Sparse,
            value_type,
            scale_exp,
            n_total: self.n_total,
            count,
        };
        out.clear();
        out.resize(header.payload_len(), 0);
        out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        let (idx_bytes, val_bytes) = out[HEADER_LEN..].split_at_mut(4 * self.indices.len());
        for (d, &i) in idx_bytes.chunks_exact_mut(4).zip(&self.indices) {
            d.copy_from_slice(&i.to_le_bytes());
        }
        match value_type {
            ValueType::F32 => {
                for (d, &v) in val_bytes.chunks_exact_mut(4).zip(&self.values) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
                self.values.iter().filter(|v| !v.is_finite()).count()
            }
            ValueType::F16 => {
                let scale = Pow2::new(i32::from(scale_exp)).filter(|_| scale_exp != 0);
                cast::narrow_f16(&self.values, scale, val_bytes)
            }
            ValueType::Bf16 => cast::f32_to_bf16_bytes(&self.values, val_bytes),
        }
    }

    /// Decodes a sparse payload for key `key` of length `expected_n`.
    pub fn decode(bytes: &[u8], key: u64, expected_n: usize) -> Result<SparseVec, DecodeError> {
        let mut s = SparseVec::default();
        s.decode_from(bytes, key, expected_n)?;
        Ok(s)
    }

    /// Decodes into `self`, reusing its buffers. On error `self` is left empty.
    pub fn decode_from(
        &mut self,
        bytes: &[u8],
        key: u64,
        expected_n: usize,
    ) -> Result<PayloadHeader, DecodeError> {
        self.indices.clear();
        self.values.clear();
        let h = parse_sparse(bytes, key, expected_n)?;
        self.n_total = h.n_total;
        let count = h.count as usize;
        let (idx_bytes, val_bytes) = bytes[HEADER_LEN..].split_at(4 * count);
        self.indices.extend(
            idx_bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        self.values.resize(count, 0.0);
        decode_values(h, val_bytes, &mut self.values);
        Ok(h)
    }
}

/// Elements per block of [`scatter_add_many`] (64 KiB of f32: stays in L2 while every input
/// adds into it).
const SCATTER_BLOCK: usize = 1 << 14;

/// `dense += Σ parts`, adding the parts in order for every element (bit-identical to calling
/// [`SparseVec::scatter_add_into`] for each part in turn), but walking the dense buffer in
/// cache-sized blocks so each block is loaded once for all parts instead of once per part.
pub fn scatter_add_many(parts: &[&SparseVec], dense: &mut [f32]) -> Result<(), KernelError> {
    if let Some(bad) = parts.iter().find(|p| p.n_total as usize != dense.len()) {
        return Err(KernelError::LengthMismatch {
            expected: bad.n_total as usize,
            got: dense.len(),
        });
    }
    if parts.len() == 1 {
        scatter_add_unchecked(&parts[0].indices, &parts[0].values, dense);
        return Ok(());
    }
    let mut cursors = vec![0usize; parts.len()];
    let mut start = 0usize;
    while start < dense.len() {
        let end = (start + SCATTER_BLOCK).min(dense.len()) as u64;
        for (p, c) in parts.iter().zip(cursors.iter_mut()) {
            let idx = &p.indices[*c..];
            let take = idx.partition_point(|&i| u64::from(i) < end);
            scatter_add_unchecked(&idx[..take], &p.values[*c..*c + take], dense);
            *c += take;
        }
        start = end as usize;
    }
    Ok(())
}

/// Adds a sparse payload directly into `dense` (the key's full range), without an intermediate
/// vector. The payload is validated completely before `dense` is touched.
pub fn scatter_add_payload(
    bytes: &[u8],
    key: u64,
    dense: &mut [f32],
) -> Result<PayloadHeader, DecodeError> {
    let h = parse_sparse(bytes, key, dense.len())?;
    let count = h.count as usize;
    let (idx_bytes, val_bytes) = bytes[HEADER_LEN..].split_at(4 * count);
    let vs = h.value_type.size();
    for (c, v) in idx_bytes.chunks_exact(4).zip(val_bytes.chunks_exact(vs)) {
        let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
        let x = match h.value_type {
            ValueType::F32 => f32::from_le_bytes([v[0], v[1], v[2], v[3]]),
            ValueType::F16 => unscale_one(
                cast::f16_to_f32(u16::from_le_bytes([v[0], v[1]])),
                h.scale_exp,
            ),
            ValueType::Bf16 => unscale_one(
                cast::bf16_to_f32(u16::from_le_bytes([v[0], v[1]])),
                h.scale_exp,
            ),
        };
        // Indices were validated against dense.len() by parse_sparse.
        dense[i] += x;
    }
    Ok(h)
}

/// Parses a sparse header and validates the index list.
fn parse_sparse(bytes: &[u8], key: u64, expected_n: usize) -> Result<PayloadHeader, DecodeError> {
    let h = PayloadHeader::parse(bytes, key, expected_n)?;
    if h.layout != Layout::Sparse {
        return Err(DecodeError::WrongLayout {
            key,
            expected: Layout::Sparse.name(),
            got: h.layout.name(),
        });
    }
    let count = h.count as usize;
    let idx_bytes = &bytes[HEADER_LEN..HEADER_LEN + 4 * count];
    let mut prev: Option<u32> = None;
    for (position, c) in idx_bytes.chunks_exact(4).enumerate() {
        let index = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if index >= h.n_total {
            return Err(DecodeError::IndexOutOfRange {
                key,
                position,
                index,
                n_total: h.n_total,
            });
        }
        if let Some(previous) = prev {
            if index <= previous {
                return Err(DecodeError::NotAscending {
                    key,
                    position,
                    index,
                    previous,
                });
            }
        }
        prev = Some(index);
    }
    Ok(h)
}

fn decode_values(h: PayloadHeader, val_bytes: &[u8], out: &mut [f32]) {
    match h.value_type {
        ValueType::F32 => {
            for (d, s) in out.iter_mut().zip(val_bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        ValueType::F16 => crate::dense::widen_scaled(val_bytes, h.scale_exp, out),
        ValueType::Bf16 => {
            cast::bf16_bytes_to_f32(val_bytes, out);
            crate::dense::unscale_slow(h.scale_exp, out);
        }
    }
}

fn validate_indices(indices: &[u32], n_total: u32) -> Result<(), String> {
    let mut prev: Option<u32> = None;
    for (pos, &i) in indices.iter().enumerate() {
        if i >= n_total {
            return Err(format!(
                "index {i} at position {pos} is not below n_total {n_total}"
            ));
        }
        if let Some(p) = prev {
            if i <= p {
                return Err(format!("index {i} at position {pos} does not exceed {p}"));
            }
        }
        prev = Some(i);
    }
    Ok(())
}

/// `dense[i] += v` over validated (in-range) indices.
fn scatter_add_unchecked(indices: &[u32], values: &[f32], dense: &mut [f32]) {
    for (&i, &v) in indices.iter().zip(values) {
        // Indices are below n_total == dense.len() by the SparseVec invariant; the bounds check
        // stays (it is well predicted and keeps this function safe).
        dense[i as usize] += v;
    }
}

#[cfg(test)]
#[path = "sparse_tests.rs"]
mod tests;
