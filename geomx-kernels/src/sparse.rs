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
    /// result equals `from_dense_nonzero` of that dense sum bit for bit.
    pub fn merge(inputs: &[&SparseVec]) -> Result<SparseVec, KernelError> {
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
        let mut acc_i: Vec<u32> = first.indices.clone();
        let mut acc_v: Vec<f32> = first.values.iter().map(|&v| 0.0 + v).collect();
        let mut next_i = Vec::new();
        let mut next_v = Vec::new();
        for s in &inputs[1..] {
            merge_two(
                &acc_i,
                &acc_v,
                &s.indices,
                &s.values,
                &mut next_i,
                &mut next_v,
            );
            std::mem::swap(&mut acc_i, &mut next_i);
            std::mem::swap(&mut acc_v, &mut next_v);
        }
        // Drop entries that summed to ±0 (branch-free compaction).
        let mut w = 0;
        for r in 0..acc_i.len() {
            acc_i[w] = acc_i[r];
            acc_v[w] = acc_v[r];
            w += usize::from(acc_v[r] != 0.0);
        }
        acc_i.truncate(w);
        acc_v.truncate(w);
        Ok(SparseVec::from_parts(n_total, acc_i, acc_v))
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

/// Merges accumulated entries (`acc`, never -0.0) with the next input: common indices give
/// `acc + x`, entries only in `acc` keep their value, entries only in the input give `0.0 + x`,
/// exactly what scatter-adding into a zeroed buffer computes. Branch-free inner loop (the
/// interleaving of two index sets is unpredictable).
fn merge_two(
    acc_i: &[u32],
    acc_v: &[f32],
    in_i: &[u32],
    in_v: &[f32],
    out_i: &mut Vec<u32>,
    out_v: &mut Vec<f32>,
) {
    let cap = acc_i.len() + in_i.len();
    out_i.clear();
    out_v.clear();
    out_i.resize(cap, 0);
    out_v.resize(cap, 0.0);
    let (mut a, mut b, mut w) = (0usize, 0usize, 0usize);
    while a < acc_i.len() && b < in_i.len() {
        let (ia, ib) = (acc_i[a], in_i[b]);
        let take_a = ia <= ib;
        let take_b = ib <= ia;
        let va = if take_a { acc_v[a] } else { 0.0 };
        let vb = if take_b { in_v[b] } else { 0.0 };
        out_i[w] = ia.min(ib);
        out_v[w] = va + vb;
        a += usize::from(take_a);
        b += usize::from(take_b);
        w += 1;
    }
    for r in a..acc_i.len() {
        out_i[w] = acc_i[r];
        out_v[w] = acc_v[r];
        w += 1;
    }
    for r in b..in_i.len() {
        out_i[w] = in_i[r];
        out_v[w] = 0.0 + in_v[r];
        w += 1;
    }
    out_i.truncate(w);
    out_v.truncate(w);
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
