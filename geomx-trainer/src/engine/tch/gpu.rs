//! GPU-resident compression of libtorch gradients.
//!
//! The gradient stays in the libtorch tensor's device memory: geomx-kernels' CUDA kernels (FP16
//! cast, exact top-k, error feedback fused with top-k) run on that memory through a borrowed
//! `CudaSlice`, and only the compressed payload (16-bit values, or the selected indices and
//! values) is copied to the host, where the codec header is added. Every payload is byte for byte
//! what the CPU encoders ([`geomx_kernels::encode_dense`], [`SparseVec::encode`] of
//! [`geomx_kernels::topk_exact`]'s selection) produce from the same gradient.
//!
//! libtorch and cudarc share the device's primary context; libtorch's work is synchronised before
//! a tensor is borrowed, and both enqueue on the legacy default stream.
//!
//! Without CUDA (no driver, no device, a CPU model) [`GpuCompressor::new`] returns
//! [`GpuCompressError::Unavailable`] with the reason; nothing panics.

mod batch;
pub(crate) mod host_grads;
mod worker_sparse;

pub use batch::BatchTimes;
pub use worker_sparse::{sparse_payloads, sparse_state_to_host, DeviceFeedback};

use std::collections::BTreeMap;
use std::sync::Arc;

use geomx_kernels::cuda::{CudaDevice, CudaError, CudaSlice, TopkWorkspace};
use geomx_kernels::{Scaling, SparseVec, ValueType};
use tch::{Kind, Tensor};

use super::super::Device;

/// Errors of GPU-resident compression.
#[derive(Debug, thiserror::Error)]
pub enum GpuCompressError {
    /// No usable CUDA device: the reason (callers report the check as skipped).
    #[error("GPU compression unavailable: {0}")]
    Unavailable(String),
    /// The tensor is not a contiguous `Float` tensor on this compressor's device.
    #[error("tensor not usable on the GPU path: {0}")]
    Tensor(String),
    /// A CUDA call failed.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// A libtorch call failed.
    #[error("libtorch: {0}")]
    Torch(String),
    /// The payload could not be encoded (e.g. more than `u32::MAX` elements).
    #[error("encode: {0}")]
    Encode(String),
}

/// A libtorch tensor's device memory seen as a `CudaSlice` that is never freed by cudarc.
struct Borrowed {
    slice: Option<CudaSlice<f32>>,
}

impl Borrowed {
    fn slice(&mut self) -> &mut CudaSlice<f32> {
        self.slice.as_mut().expect("present until drop")
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            // libtorch owns the memory: give the pointer back without freeing it.
            let _ = s.leak();
        }
    }
}

/// Error-feedback state of one key copied to the host: velocity `u` and residual `v`.
pub type HostState = (Vec<f32>, Vec<f32>);

/// Error-feedback state of one key on the device: momentum `u` and residual `v`.
struct Residual {
    u: CudaSlice<f32>,
    v: CudaSlice<f32>,
}

/// Compresses libtorch CUDA gradients on their device.
pub struct GpuCompressor {
    dev: Arc<CudaDevice>,
    ws: Option<TopkWorkspace>,
    residuals: BTreeMap<usize, Residual>,
    /// Buffers of the batched encoders ([`GpuCompressor::fp16_payloads`]).
    batch: Option<batch::BatchBuffers>,
}

impl std::fmt::Debug for GpuCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCompressor")
            .field("device", &self.dev)
            .field("keys_with_residual", &self.residuals.len())
            .finish()
    }
}

fn torch_err(p: Box<dyn std::any::Any + Send>) -> GpuCompressError {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "libtorch error".into());
    GpuCompressError::Torch(msg.lines().next().unwrap_or_default().to_string())
}

impl GpuCompressor {
    /// A compressor for the model device `device`: [`GpuCompressError::Unavailable`] for the CPU
    /// or when CUDA cannot be opened (the reason says why).
    pub fn new(device: Device) -> Result<GpuCompressor, GpuCompressError> {
        let Device::Cuda(ordinal) = device else {
            return Err(GpuCompressError::Unavailable(
                "the model runs on the cpu (model.device = \"cpu\")".into(),
            ));
        };
        let dev =
            CudaDevice::new(ordinal).map_err(|e| GpuCompressError::Unavailable(e.to_string()))?;
        dev.load_all()?;
        Ok(GpuCompressor {
            dev,
            ws: None,
            residuals: BTreeMap::new(),
            batch: None,
        })
    }

    /// The CUDA device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Borrows the memory of `t` after libtorch's queued work on the device has finished.
    fn borrow(&self, t: &Tensor) -> Result<Borrowed, GpuCompressError> {
        let ordinal = self.dev.ordinal();
        if t.device() != tch::Device::Cuda(ordinal) {
            return Err(GpuCompressError::Tensor(format!(
                "on {:?}, the compressor is on cuda:{ordinal}",
                t.device()
            )));
        }
        if t.kind() != Kind::Float || !t.is_contiguous() {
            return Err(GpuCompressError::Tensor(format!(
                "{:?} (contiguous: {}), need contiguous Float",
                t.kind(),
                t.is_contiguous()
            )));
        }
        std::panic::catch_unwind(|| tch::Cuda::synchronize(ordinal as i64)).map_err(torch_err)?;
        let ptr = t.data_ptr() as u64;
        // SAFETY: `t` is a live contiguous f32 CUDA tensor of `numel` elements in the primary
        // context cudarc also uses; the slice never outlives this call's borrow of `t` (callers
        // drop it before returning) and is leaked, not freed, on drop.
        let slice = unsafe { self.dev.stream().upgrade_device_ptr::<f32>(ptr, t.numel()) };
        Ok(Borrowed { slice: Some(slice) })
    }

    /// Dense FP16 payload of `grad` (header + n 16-bit values), identical to
    /// `encode_dense(grad, F16, scaling)` on the host: [`GpuCompressor::fp16_payloads`] of one
    /// tensor.
    pub fn fp16_payload(
        &mut self,
        grad: &Tensor,
        scaling: Scaling,
    ) -> Result<Vec<u8>, GpuCompressError> {
        let (mut p, _) = self.fp16_payloads(&[grad], scaling)?;
        Ok(p.remove(0))
    }

    fn workspace(&mut self, n: usize) -> Result<&mut TopkWorkspace, GpuCompressError> {
        if self.ws.as_ref().is_none_or(|w| w.capacity() < n) {
            self.ws = Some(TopkWorkspace::new(&self.dev, n)?);
        }
        Ok(self.ws.as_mut().expect("just set"))
    }

    /// Sparse payload of the exact top `k` of |grad| (ties to the lower index, zeros never
    /// sent), values as `vt`; only the selected indices and values come to the host.
    pub fn topk_payload(
        &mut self,
        grad: &Tensor,
        k: usize,
        vt: ValueType,
        scaling: Scaling,
    ) -> Result<Vec<u8>, GpuCompressError> {
        let n = grad.numel();
        let mut g = self.borrow(grad)?;
        let dev = self.dev.clone();
        let ws = self.workspace(n)?;
        let sel = dev.topk_into(ws, g.slice(), None, k, false)?;
        let (idx, val) = sel.to_host(&dev)?;
        drop(g);
        encode_sparse(n, idx, val, vt, scaling)
    }

    /// One error-feedback step of key `key` on the device (`u ← m·u + g`, `v ← v + u`, the top
    /// `k` of |v| selected and moved out of `u` and `v`), returning the sparse payload of the
    /// selected values. The state lives on the device across calls.
    pub fn ef_topk_payload(
        &mut self,
        key: usize,
        grad: &Tensor,
        momentum: f32,
        k: usize,
        vt: ValueType,
        scaling: Scaling,
    ) -> Result<Vec<u8>, GpuCompressError> {
        let n = grad.numel();
        if self.residuals.get(&key).is_some_and(|r| r.u.len() != n) {
            self.residuals.remove(&key);
        }
        if !self.residuals.contains_key(&key) {
            let r = Residual {
                u: self.dev.zeros(n)?,
                v: self.dev.zeros(n)?,
            };
            self.residuals.insert(key, r);
        }
        let mut g = self.borrow(grad)?;
        let dev = self.dev.clone();
        self.workspace(n)?;
        let ws = self.ws.as_mut().expect("allocated above");
        let r = self.residuals.get_mut(&key).expect("inserted above");
        let sel = dev.ef_update_topk(ws, &mut r.u, &mut r.v, g.slice(), momentum, k)?;
        let (idx, val) = sel.to_host(&dev)?;
        drop(g);
        encode_sparse(n, idx, val, vt, scaling)
    }

    /// The error-feedback state (`u`, `v`) of `key` copied to the host, if the key has state.
    pub fn ef_state(&self, key: usize) -> Result<Option<HostState>, GpuCompressError> {
        match self.residuals.get(&key) {
            Some(r) => Ok(Some((self.dev.download(&r.u)?, self.dev.download(&r.v)?))),
            None => Ok(None),
        }
    }

    /// Sets the error-feedback state of `key` on the device to `u` and `v` (equal lengths): the
    /// next [`GpuCompressor::ef_topk_payload`] of the key continues from it.
    pub fn set_ef_state(
        &mut self,
        key: usize,
        u: &[f32],
        v: &[f32],
    ) -> Result<(), GpuCompressError> {
        if u.len() != v.len() {
            return Err(GpuCompressError::Encode(format!(
                "key {key}: a state of u {} and v {} elements",
                u.len(),
                v.len()
            )));
        }
        let r = Residual {
            u: self.dev.upload(u)?,
            v: self.dev.upload(v)?,
        };
        self.residuals.insert(key, r);
        Ok(())
    }

    /// The residual `v` of `key` copied to the host (for checks), if the key has state.
    pub fn residual(&self, key: usize) -> Result<Option<Vec<f32>>, GpuCompressError> {
        match self.residuals.get(&key) {
            Some(r) => Ok(Some(self.dev.download(&r.v)?)),
            None => Ok(None),
        }
    }
}

fn encode_sparse(
    n: usize,
    idx: Vec<u64>,
    val: Vec<f32>,
    vt: ValueType,
    scaling: Scaling,
) -> Result<Vec<u8>, GpuCompressError> {
    let n = u32::try_from(n).map_err(|_| GpuCompressError::Encode(format!("{n} elements")))?;
    let idx: Vec<u32> = idx.into_iter().map(|i| i as u32).collect();
    let s = SparseVec::new(n, idx, val).map_err(|e| GpuCompressError::Encode(e.to_string()))?;
    let mut out = Vec::new();
    s.encode(vt, scaling, &mut out);
    Ok(out)
}

/// Why GPU-resident compression cannot run for `device` on this machine, or `None` when it can.
pub fn unavailable_reason(device: Device) -> Option<String> {
    match GpuCompressor::new(device) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}
