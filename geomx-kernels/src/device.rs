//! Run-time choice between the CPU kernels and the CUDA kernels (feature `cuda`).
//!
//! [`Device`] offers the operations both backends implement, on host slices, so the trainer
//! picks the backend at run time: [`Device::Cpu`] always works; [`Device::cuda`] returns a typed
//! [`DeviceError::NoCudaDevice`] (never panics) when the crate was built without the `cuda`
//! feature or the machine has no usable GPU, driver or NVRTC.
//!
//! The CUDA variant copies its inputs to the device and its results back on every call; code that
//! keeps tensors resident on the GPU uses `cuda::CudaDevice` (feature `cuda`) directly. Both variants give
//! bit-identical results, except [`Device::block_mean_abs`] (f64 sums in a different order:
//! relative difference ≤ 1e-12).

#[cfg(feature = "cuda")]
use std::sync::Arc;

use thiserror::Error;

use crate::dgt_score::block_range;
use crate::error::KernelError;
use crate::sparse::SparseVec;
use crate::topk::{topk_exact, TopkScratch};

#[cfg(feature = "cuda")]
use crate::cuda::{CudaDevice, CudaError};

/// Errors of [`Device`] operations.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DeviceError {
    /// No usable CUDA device (or the crate was built without the `cuda` feature).
    #[error("no CUDA device: {reason}")]
    NoCudaDevice {
        /// Why.
        reason: String,
    },
    /// Invalid arguments, as the CPU kernels report them.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A CUDA failure other than a missing device.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(CudaError),
}

#[cfg(feature = "cuda")]
impl From<CudaError> for DeviceError {
    fn from(e: CudaError) -> DeviceError {
        match e {
            CudaError::NoCudaDevice { reason } => DeviceError::NoCudaDevice { reason },
            CudaError::NvrtcUnavailable { reason } => DeviceError::NoCudaDevice {
                reason: format!("NVRTC unavailable: {reason}"),
            },
            e => DeviceError::Cuda(e),
        }
    }
}

/// Where the kernels run.
#[derive(Debug, Clone)]
pub enum Device {
    /// The CPU kernels of this crate (always available).
    Cpu,
    /// A CUDA GPU.
    #[cfg(feature = "cuda")]
    Cuda(Arc<CudaDevice>),
}

fn check_len(expected: usize, got: usize) -> Result<(), DeviceError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch { expected, got }.into())
    }
}

#[cfg(feature = "cuda")]
fn count_nonfinite(halves: &[u16], exp_mask: u16) -> usize {
    halves.iter().filter(|&&h| h & exp_mask == exp_mask).count()
}

impl Device {
    /// CUDA device `ordinal`, or why it is not available.
    pub fn cuda(ordinal: usize) -> Result<Device, DeviceError> {
        #[cfg(feature = "cuda")]
        {
            Ok(Device::Cuda(CudaDevice::new(ordinal)?))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(DeviceError::NoCudaDevice {
                reason: "geomx-kernels was built without the `cuda` feature".into(),
            })
        }
    }

    /// CUDA device `ordinal` if available, else the CPU (logging why).
    pub fn cuda_or_cpu(ordinal: usize) -> Device {
        match Device::cuda(ordinal) {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(error = %e, "using the CPU kernels");
                Device::Cpu
            }
        }
    }

    /// A short description ("cpu" or "cuda:0 (NVIDIA H200)").
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => format!("cuda:{} ({})", d.ordinal(), d.name()),
        }
    }

    /// Whether this is a GPU.
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Device::Cpu)
    }

    /// f32 → FP16 bits ([`crate::cast::f32_to_f16`] rules). Returns the number of non-finite
    /// halves written.
    pub fn f32_to_f16(&self, src: &[f32], dst: &mut [u16]) -> Result<usize, DeviceError> {
        check_len(src.len(), dst.len())?;
        match self {
            Device::Cpu => Ok(crate::cast::f32_to_f16_slice(src, dst)),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                gpu::map(d, src, dst, |d, a, b| d.f32_to_f16(a, b))?;
                Ok(count_nonfinite(dst, 0x7C00))
            }
        }
    }

    /// FP16 bits → f32 (exact; NaN made quiet).
    pub fn f16_to_f32(&self, src: &[u16], dst: &mut [f32]) -> Result<(), DeviceError> {
        check_len(src.len(), dst.len())?;
        match self {
            Device::Cpu => {
                crate::cast::f16_to_f32_slice(src, dst);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => gpu::map(d, src, dst, |d, a, b| d.f16_to_f32(a, b)),
        }
    }

    /// f32 → BF16 bits. Returns the number of non-finite outputs.
    pub fn f32_to_bf16(&self, src: &[f32], dst: &mut [u16]) -> Result<usize, DeviceError> {
        check_len(src.len(), dst.len())?;
        match self {
            Device::Cpu => Ok(crate::cast::f32_to_bf16_slice(src, dst)),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                gpu::map(d, src, dst, |d, a, b| d.f32_to_bf16(a, b))?;
                Ok(count_nonfinite(dst, 0x7F80))
            }
        }
    }

    /// BF16 bits → f32 (exact).
    pub fn bf16_to_f32(&self, src: &[u16], dst: &mut [f32]) -> Result<(), DeviceError> {
        check_len(src.len(), dst.len())?;
        match self {
            Device::Cpu => {
                crate::cast::bf16_to_f32_slice(src, dst);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => gpu::map(d, src, dst, |d, a, b| d.bf16_to_f32(a, b)),
        }
    }

    /// Error feedback (spec step 2): with `u`, `u ← m·u + g` then `v ← v + u`; without `u`
    /// (momentum 0), `v ← v + g`. f32 arithmetic without fused multiply-add, as
    /// [`crate::BiSparse`] does.
    pub fn error_feedback(
        &self,
        u: Option<&mut [f32]>,
        v: &mut [f32],
        g: &[f32],
        m: f32,
    ) -> Result<(), DeviceError> {
        check_len(v.len(), g.len())?;
        if let Some(u) = u.as_deref() {
            check_len(v.len(), u.len())?;
        }
        match self {
            Device::Cpu => {
                match u {
                    None => v.iter_mut().zip(g).for_each(|(v, &x)| *v += x),
                    Some(u) => {
                        for ((u, v), &x) in u.iter_mut().zip(v.iter_mut()).zip(g) {
                            *u = m * *u + x;
                            *v += *u;
                        }
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => gpu::error_feedback(d, u, v, g, m),
        }
    }

    /// Exact top-k indices of |v| ([`crate::topk_exact`]): ascending, zeros never selected.
    pub fn topk_exact(&self, v: &[f32], k: usize) -> Result<Vec<u32>, DeviceError> {
        crate::error::check_u32_len(v.len())?;
        match self {
            Device::Cpu => {
                let mut out = Vec::new();
                topk_exact(v, k, &mut TopkScratch::default(), &mut out)?;
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let mut copy = v.to_vec();
                Ok(gpu::topk(d, None, &mut copy, k, false)?.indices().to_vec())
            }
        }
    }

    /// Selects the exact top-k of |v| and moves it out (spec step 5): returns the selected
    /// entries as a sparse vector and sets them to 0 in `v` and in `u` when given.
    pub fn take_topk(
        &self,
        u: Option<&mut [f32]>,
        v: &mut [f32],
        k: usize,
    ) -> Result<SparseVec, DeviceError> {
        let n = crate::error::check_u32_len(v.len())?;
        if let Some(u) = u.as_deref() {
            check_len(v.len(), u.len())?;
        }
        match self {
            Device::Cpu => {
                let mut idx = Vec::new();
                topk_exact(v, k, &mut TopkScratch::default(), &mut idx)?;
                let values: Vec<f32> = idx.iter().map(|&i| v[i as usize]).collect();
                for &i in &idx {
                    v[i as usize] = 0.0;
                }
                if let Some(u) = u {
                    for &i in &idx {
                        u[i as usize] = 0.0;
                    }
                }
                Ok(SparseVec::new(n, idx, values)?)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => gpu::topk(d, u, v, k, true),
        }
    }

    /// `dense[i] += value` for every entry of `sparse` (one vector; call in DC order).
    pub fn scatter_add(&self, sparse: &SparseVec, dense: &mut [f32]) -> Result<(), DeviceError> {
        match self {
            Device::Cpu => Ok(sparse.scatter_add_into(dense)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                check_len(sparse.n_total() as usize, dense.len())?;
                gpu::scatter_add(d, sparse, dense)
            }
        }
    }

    /// DGT block scoring input: `out[j]` = mean |x_i| over block j of `per_block` elements
    /// ([`crate::dgt_score::block_range`]), summed in f64. `out.len()` must be ⌈n / per_block⌉.
    pub fn block_mean_abs(
        &self,
        x: &[f32],
        per_block: usize,
        out: &mut [f64],
    ) -> Result<(), DeviceError> {
        if per_block == 0 {
            return Err(KernelError::InvalidConfig("per_block must be positive".into()).into());
        }
        check_len(x.len().div_ceil(per_block), out.len())?;
        match self {
            Device::Cpu => {
                for (j, o) in out.iter_mut().enumerate() {
                    let r = block_range(j, per_block, x.len());
                    let len = r.len() as f64;
                    *o = x[r].iter().map(|&v| f64::from(v.abs())).sum::<f64>() / len;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => gpu::block_mean_abs(d, x, per_block, out),
        }
    }
}

/// Host-slice adapters of the CUDA variant: upload, run, download.
#[cfg(feature = "cuda")]
mod gpu {
    use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

    use super::{DeviceError, SparseVec};
    use crate::cuda::{CudaDevice, CudaError};

    /// Runs an elementwise kernel from `src` into `dst`.
    pub(super) fn map<S: DeviceRepr, D: DeviceRepr + ValidAsZeroBits>(
        d: &CudaDevice,
        src: &[S],
        dst: &mut [D],
        op: impl FnOnce(&CudaDevice, &CudaSlice<S>, &mut CudaSlice<D>) -> Result<(), CudaError>,
    ) -> Result<(), DeviceError> {
        if src.is_empty() {
            return Ok(());
        }
        let a = d.upload(src)?;
        let mut b = d.zeros::<D>(dst.len())?;
        op(d, &a, &mut b)?;
        d.download_into(&b, dst)?;
        Ok(())
    }

    pub(super) fn error_feedback(
        d: &CudaDevice,
        u: Option<&mut [f32]>,
        v: &mut [f32],
        g: &[f32],
        m: f32,
    ) -> Result<(), DeviceError> {
        if v.is_empty() {
            return Ok(());
        }
        let mut vd = d.upload(v)?;
        let gd = d.upload(g)?;
        match u {
            Some(u) => {
                let mut ud = d.upload(u)?;
                d.ef_update(&mut ud, &mut vd, &gd, m)?;
                d.download_into(&ud, u)?;
            }
            None => {
                // Momentum-free error feedback: v ← v + g (the kernel's u is a scratch copy of g).
                let mut ud = d.zeros::<f32>(v.len())?;
                d.ef_update(&mut ud, &mut vd, &gd, 0.0)?;
            }
        }
        d.download_into(&vd, v)?;
        Ok(())
    }

    pub(super) fn topk(
        d: &CudaDevice,
        u: Option<&mut [f32]>,
        v: &mut [f32],
        k: usize,
        move_values: bool,
    ) -> Result<SparseVec, DeviceError> {
        let n = crate::error::check_u32_len(v.len())?;
        if v.is_empty() || k == 0 {
            return Ok(SparseVec::empty(n));
        }
        let mut vd = d.upload(v)?;
        let mut ud = match u.as_deref() {
            Some(u) => Some(d.upload(u)?),
            None => None,
        };
        let sel = d.topk(&mut vd, ud.as_mut(), k, move_values)?;
        let (idx, val) = sel.to_host(d)?;
        if move_values {
            d.download_into(&vd, v)?;
            if let (Some(u), Some(ud)) = (u, ud.as_ref()) {
                d.download_into(ud, u)?;
            }
        }
        // Indices are < n ≤ u32::MAX (checked above).
        let idx = idx.into_iter().map(|i| i as u32).collect();
        Ok(SparseVec::new(n, idx, val)?)
    }

    pub(super) fn scatter_add(
        d: &CudaDevice,
        sparse: &SparseVec,
        dense: &mut [f32],
    ) -> Result<(), DeviceError> {
        if sparse.is_empty() {
            return Ok(());
        }
        let mut dd = d.upload(dense)?;
        let id = d.upload(sparse.indices())?;
        let vd = d.upload(sparse.values())?;
        d.scatter_add(&mut dd, 0, &id, &vd)?;
        d.download_into(&dd, dense)?;
        Ok(())
    }

    pub(super) fn block_mean_abs(
        d: &CudaDevice,
        x: &[f32],
        per_block: usize,
        out: &mut [f64],
    ) -> Result<(), DeviceError> {
        if x.is_empty() {
            return Ok(());
        }
        let xd = d.upload(x)?;
        let mut od = d.zeros::<f64>(out.len())?;
        d.block_mean_abs(&xd, per_block, &mut od)?;
        d.download_into(&od, out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_matches_the_scalar_kernels() {
        let d = Device::Cpu;
        let x = [1.0f32, -2.5, 0.0, 65520.0, f32::NAN, 1e-30];
        let mut h = [0u16; 6];
        assert_eq!(d.f32_to_f16(&x, &mut h).unwrap(), 2);
        for (&xi, &hi) in x.iter().zip(&h) {
            assert_eq!(hi, crate::cast::f32_to_f16(xi));
        }
        let mut b = [0u16; 6];
        assert_eq!(d.f32_to_bf16(&x, &mut b).unwrap(), 1);
        let mut w = [0f32; 6];
        d.bf16_to_f32(&b, &mut w).unwrap();
        assert_eq!(w[1], -2.5);
    }

    #[test]
    fn take_topk_moves_the_selection() {
        let d = Device::Cpu;
        let mut v = vec![0.5f32, -3.0, 0.0, 3.0, 1.0];
        let mut u = vec![1.0f32; 5];
        let s = d.take_topk(Some(&mut u), &mut v, 2).unwrap();
        assert_eq!(s.indices(), &[1, 3]);
        assert_eq!(s.values(), &[-3.0, 3.0]);
        assert_eq!(v, vec![0.5, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(u, vec![1.0, 0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn error_feedback_with_and_without_momentum() {
        let d = Device::Cpu;
        let mut v = vec![1.0f32, 2.0];
        d.error_feedback(None, &mut v, &[0.5, -2.0], 0.0).unwrap();
        assert_eq!(v, vec![1.5, 0.0]);
        let mut u = vec![1.0f32, -1.0];
        d.error_feedback(Some(&mut u), &mut v, &[1.0, 1.0], 0.5)
            .unwrap();
        assert_eq!(u, vec![1.5, 0.5]);
        assert_eq!(v, vec![3.0, 0.5]);
    }

    #[test]
    fn block_mean_abs_and_argument_checks() {
        let d = Device::Cpu;
        let mut out = [0f64; 2];
        d.block_mean_abs(&[1.0, -3.0, 2.0], 2, &mut out).unwrap();
        assert_eq!(out, [2.0, 2.0]);
        assert!(d.block_mean_abs(&[1.0], 0, &mut out).is_err());
        assert!(d.block_mean_abs(&[1.0], 1, &mut out).is_err());
        let mut dense = vec![0f32; 3];
        let s = SparseVec::new(3, vec![0, 2], vec![1.0, 2.0]).unwrap();
        d.scatter_add(&s, &mut dense).unwrap();
        assert_eq!(dense, vec![1.0, 0.0, 2.0]);
    }

    #[test]
    fn cuda_without_a_device_is_a_typed_error() {
        // Never panics; on a GPU machine with the feature this opens the device instead.
        match Device::cuda(usize::MAX) {
            Err(DeviceError::NoCudaDevice { reason }) => assert!(!reason.is_empty()),
            other => panic!("expected NoCudaDevice, got {other:?}"),
        }
    }
}
