//! A CUDA model's gradients brought to the host stage by stage while the backward pass goes on:
//! each stage's span of the flat gradient buffer (`resident.rs`) is copied into one reused
//! page-locked buffer on a copy stream of its own ([`CopyStream`]), queued right behind the
//! stage's backward kernels, so the copy overlaps the stages below it. The same stream brings
//! parameters loaded ahead of a step to the device (`Resident::preload`).

use std::ops::Range;
use std::sync::Arc;

use geomx_kernels::cuda::{Copied, CopyStream, CudaDevice, PinnedHostSlice};
use tch::{Kind, Tensor};

use super::GpuCompressError;

/// The copy streams and page-locked buffer of one model's flat gradients.
pub(crate) struct HostGrads {
    /// Device → host: the gradients.
    copies: CopyStream,
    /// Host → device: preloaded parameters (a stream of their own, so that they do not queue
    /// behind the gradients, or the gradients behind them).
    up: CopyStream,
    host: PinnedHostSlice<f32>,
    /// The address of `host`'s memory.
    base: *mut f32,
    /// The CUDA device of the tensors copied.
    ordinal: usize,
}

// SAFETY: `base` points into `host`, which `HostGrads` owns and which does not move with it;
// every access goes through `&self` / `&mut self` as the methods' borrows say.
unsafe impl Send for HostGrads {}

impl std::fmt::Debug for HostGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostGrads")
            .field("device", &self.ordinal)
            .field("elements", &self.host.len())
            .finish()
    }
}

impl HostGrads {
    /// Buffers for `elements` gradient values of CUDA device `ordinal`.
    pub(crate) fn new(ordinal: usize, elements: usize) -> Result<HostGrads, GpuCompressError> {
        let dev: Arc<CudaDevice> =
            CudaDevice::new(ordinal).map_err(|e| GpuCompressError::Unavailable(e.to_string()))?;
        let mut host = dev.pinned(elements)?;
        let base = CudaDevice::pinned_ptr(&mut host)?;
        Ok(HostGrads {
            copies: CopyStream::new(&dev)?,
            up: CopyStream::new(&dev)?,
            host,
            base,
            ordinal,
        })
    }

    /// Queues the copy of `flat[range]` into the same range of the host buffer, after the work
    /// libtorch has queued so far. `flat` must stay alive and unchanged, and the range must not
    /// be read, until the returned copy has completed ([`HostGrads::wait`]).
    pub(crate) fn queue(
        &mut self,
        flat: &Tensor,
        range: Range<usize>,
    ) -> Result<Copied, GpuCompressError> {
        if flat.numel() > self.host.len() {
            return Err(GpuCompressError::Tensor(format!(
                "flat gradients of {} elements, buffer {}",
                flat.numel(),
                self.host.len()
            )));
        }
        let src = self.address(flat, range.clone())?;
        let base = self.base;
        // SAFETY: `range` lies within the buffer (checked above). Only this range is borrowed, so
        // copies still in flight into other ranges are not aliased.
        let dst = unsafe { std::slice::from_raw_parts_mut(base.add(range.start), range.len()) };
        // SAFETY: `src` addresses `range.len()` f32 values inside `flat` (checked above), which
        // the caller keeps alive and unchanged until the copy completes; `dst` is page-locked
        // memory owned by `self`, which the caller does not read until then.
        Ok(unsafe { self.copies.dtoh_after_default(src, dst) }?)
    }

    /// The host values of `range` once `copied` (the copy that filled it) has completed.
    pub(crate) fn wait(
        &self,
        copied: &Copied,
        range: Range<usize>,
    ) -> Result<&[f32], GpuCompressError> {
        copied.wait()?;
        if range.start > range.end || range.end > self.host.len() {
            return Err(GpuCompressError::Tensor(format!(
                "range {range:?} outside the buffer of {}",
                self.host.len()
            )));
        }
        let base = self.base;
        // SAFETY: `range` lies within the buffer and its copy has completed; the slice borrows
        // `self`, so no copy into the buffer (`queue` takes `&mut self`) is queued while it is
        // read.
        Ok(unsafe { std::slice::from_raw_parts(base.add(range.start), range.len()) })
    }

    /// Queues the copy of `src` (page-locked, e.g. the resident parameters' staging buffer) to
    /// `flat[offset..offset + src.len()]` on the upload stream: after the work libtorch has
    /// queued so far when `after_queued` (it may still read the old values), else at once (the
    /// caller has seen that nothing queued reads them any more). libtorch's work waits for it
    /// only once told ([`Copied::order_default`]); `src` must not be written until then.
    pub(crate) fn load_async(
        &self,
        src: &[f32],
        flat: &Tensor,
        offset: usize,
        after_queued: bool,
    ) -> Result<Copied, GpuCompressError> {
        let end = offset.saturating_add(src.len());
        let dst = self.address(flat, offset..end)?;
        // SAFETY: `dst` addresses `src.len()` f32 values inside `flat` (checked above), which
        // lives as long as the model's resident parameters and which, unless `after_queued`, the
        // caller knows no queued work reads; the caller keeps `src` unchanged until libtorch's
        // queue waits for the copy.
        Ok(unsafe { self.up.htod(src, dst, after_queued) }?)
    }

    /// The device address of `flat[range]`, once `flat` is checked to be a contiguous f32
    /// tensor of this device that holds `range`.
    fn address(&self, flat: &Tensor, range: Range<usize>) -> Result<u64, GpuCompressError> {
        if flat.device() != tch::Device::Cuda(self.ordinal)
            || flat.kind() != Kind::Float
            || !flat.is_contiguous()
            || range.start > range.end
            || range.end > flat.numel()
        {
            return Err(GpuCompressError::Tensor(format!(
                "{:?} {:?} of {} elements (contiguous: {}), range {range:?}",
                flat.device(),
                flat.kind(),
                flat.numel(),
                flat.is_contiguous()
            )));
        }
        Ok(flat.data_ptr() as u64 + 4 * range.start as u64)
    }
}
