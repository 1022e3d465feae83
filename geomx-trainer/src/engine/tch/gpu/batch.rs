//! Encoding every gradient of a step at once: the tensors are concatenated on the device, one
//! segmented launch computes each key's maximum and one casts every key, and one copy brings all
//! values into a reused page-locked host buffer. Two synchronisations per step instead of three
//! per key. The buffers the size of the model (device bits, page-locked copies, the payloads of
//! `_into`) are reused; only the per-key exponents and scale factors, a few bytes per key, are
//! made and uploaded each step.

use std::time::Instant;

use geomx_kernels::cuda::{pow2_factors, CudaDevice, CudaSlice, PinnedHostSlice, Segments};
use geomx_kernels::dense::pow2_exponent;
use geomx_kernels::{Layout, PayloadHeader, Scaling, ValueType, HEADER_LEN};
use serde::Serialize;
use tch::{Kind, Tensor};

use super::{torch_err, GpuCompressError, GpuCompressor};

/// Where the time of a batched encode went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BatchTimes {
    /// Device work and its synchronisations: concatenation, maxima, scaling and casting.
    pub encode_s: f64,
    /// The copy to page-locked host memory and the payloads built from it.
    pub copy_s: f64,
}

/// Buffers of one model's layout, kept across steps.
pub(super) struct BatchBuffers {
    segs: Segments,
    max_keys: CudaSlice<u32>,
    bits: Option<CudaSlice<u16>>,
    host16: Option<PinnedHostSlice<u16>>,
}

impl GpuCompressor {
    /// The buffers for tensors of `lens` elements (made again when the layout changes).
    fn buffers(&mut self, lens: &[usize]) -> Result<&mut BatchBuffers, GpuCompressError> {
        let same = self
            .batch
            .as_ref()
            .is_some_and(|b| b.segs.lens().eq(lens.iter().copied()));
        if !same {
            self.batch = Some(BatchBuffers {
                segs: self.dev.segments(lens)?,
                max_keys: self.dev.zeros(lens.len())?,
                bits: None,
                host16: None,
            });
        }
        Ok(self.batch.as_mut().expect("set above"))
    }

    /// The gradients (key order) as one flat contiguous f32 tensor on the device, and their
    /// lengths.
    fn concat(&self, grads: &[&Tensor]) -> Result<(Tensor, Vec<usize>), GpuCompressError> {
        if grads.is_empty() {
            return Err(GpuCompressError::Tensor("no gradients".into()));
        }
        let lens: Vec<usize> = grads.iter().map(|g| g.numel()).collect();
        let flat = std::panic::catch_unwind(|| {
            let views: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
            Tensor::cat(&views, 0).to_kind(Kind::Float).contiguous()
        })
        .map_err(torch_err)?;
        Ok((flat, lens))
    }

    /// Dense FP16 payloads of every gradient (key order), each identical to
    /// `encode_dense(grad, F16, scaling)` on the host, with the time split.
    pub fn fp16_payloads(
        &mut self,
        grads: &[&Tensor],
        scaling: Scaling,
    ) -> Result<(Vec<Vec<u8>>, BatchTimes), GpuCompressError> {
        let mut out = Vec::new();
        let times = self.fp16_payloads_into(grads, scaling, &mut out)?;
        Ok((out, times))
    }

    /// [`GpuCompressor::fp16_payloads`] into `out` (one buffer per key, reused: no allocation
    /// once the buffers have their sizes).
    pub fn fp16_payloads_into(
        &mut self,
        grads: &[&Tensor],
        scaling: Scaling,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<BatchTimes, GpuCompressError> {
        let t0 = Instant::now();
        let (flat, lens) = self.concat(grads)?;
        for &n in &lens {
            u32::try_from(n).map_err(|_| GpuCompressError::Encode(format!("{n} elements")))?;
        }
        let mut g = self.borrow(&flat)?;
        let dev = self.dev.clone();
        let total = flat.numel();
        let b = self.buffers(&lens)?;
        let exps: Vec<i16> = match scaling {
            Scaling::Pow2 => {
                dev.max_abs_key_segments(g.slice(), &b.segs, &mut b.max_keys)?;
                let mut keys = vec![0u32; lens.len()];
                dev.download_into(&b.max_keys, &mut keys)?;
                keys.into_iter().map(pow2_exponent).collect()
            }
            Scaling::None => vec![0; lens.len()],
        };
        let factors: Vec<f32> = exps
            .iter()
            .flat_map(|&e| {
                let (a, b) = pow2_factors(e);
                [a, b]
            })
            .collect();
        let factors = dev.upload(&factors)?;
        if b.bits.as_ref().is_none_or(|x| x.len() != total) {
            b.bits = Some(dev.zeros(total)?);
        }
        let bits = b.bits.as_mut().expect("set above");
        dev.f32_to_f16_scaled_segments(g.slice(), &b.segs, &factors, bits)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        if b.host16.as_ref().is_none_or(|h| h.len() < total) {
            b.host16 = Some(dev.pinned(total)?);
        }
        let host = b.host16.as_mut().expect("set above");
        let host = &mut CudaDevice::pinned_mut(host)?[..total];
        dev.download_into(bits, host)?;
        drop(g);
        out.resize_with(lens.len(), Vec::new);
        for ((s, &e), p) in exps.iter().enumerate().zip(out.iter_mut()) {
            let vals = &host[b.segs.range(s)];
            let header = PayloadHeader {
                layout: Layout::Dense,
                value_type: ValueType::F16,
                scale_exp: e,
                n_total: vals.len() as u32,
                count: vals.len() as u32,
            };
            p.clear();
            p.reserve(header.payload_len());
            p.extend_from_slice(&header.to_bytes());
            extend_le(p, vals);
            debug_assert_eq!(p.len(), HEADER_LEN + 2 * vals.len());
        }
        Ok(BatchTimes {
            encode_s: (t1 - t0).as_secs_f64(),
            copy_s: t1.elapsed().as_secs_f64(),
        })
    }
}

/// Appends `vals` as little-endian bytes (one copy on little-endian hosts).
fn extend_le(out: &mut Vec<u8>, vals: &[u16]) {
    #[cfg(target_endian = "little")]
    out.extend_from_slice(zerocopy::IntoBytes::as_bytes(vals));
    #[cfg(not(target_endian = "little"))]
    out.extend(vals.iter().flat_map(|h| h.to_le_bytes()));
}
