//! Parameters that stay on the model's device between steps.
//!
//! The trainer hands the parameters over as host vectors each step (they come back from the
//! servers). Instead of building fresh device tensors from them every step, a [`Resident`] keeps
//! one flat device buffer that holds every key (each starting at a multiple of 16 elements) and
//! leaf tensors that view it. A step loads the new values through one reused page-locked host
//! buffer and a single host → device copy. On the CPU the same code loads them straight into the
//! buffer (there is nothing to pin), so CPU runs test this path.

use tch::{Device as TorchDevice, Kind, Tensor};

use crate::engine::TensorSpec;

/// Keys start at multiples of this many elements (64 bytes).
const ALIGN: usize = 16;

/// A model's parameters kept on its device.
pub(super) struct Resident {
    /// Every key back to back, on the device.
    flat: Tensor,
    /// Offset and length of each key in `flat`.
    spans: Vec<(usize, usize)>,
    /// Leaf tensors (views of `flat`, shaped as the keys) that autograd differentiates.
    params: Vec<Tensor>,
    /// Page-locked host copy of `flat` through which loads go (CUDA only).
    staging: Option<Tensor>,
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resident")
            .field("device", &self.flat.device())
            .field("keys", &self.spans.len())
            .field("pinned", &self.staging.is_some())
            .finish()
    }
}

impl Resident {
    /// Zeroed parameters of `specs` on `dev`.
    pub(super) fn new(specs: &[TensorSpec], dev: TorchDevice) -> Resident {
        let mut spans = Vec::with_capacity(specs.len());
        let mut total = 0usize;
        for s in specs {
            spans.push((total, s.len()));
            total += s.len().div_ceil(ALIGN) * ALIGN;
        }
        let flat = Tensor::zeros([total as i64], (Kind::Float, dev));
        let params = specs
            .iter()
            .zip(&spans)
            .map(|(s, &(off, len))| {
                let shape: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
                flat.narrow(0, off as i64, len as i64)
                    .view(shape.as_slice())
                    .detach()
                    .set_requires_grad(true)
            })
            .collect();
        let staging = match dev {
            TorchDevice::Cpu => None,
            _ => {
                Some(Tensor::zeros([total as i64], (Kind::Float, TorchDevice::Cpu)).pin_memory(dev))
            }
        };
        Resident {
            flat,
            spans,
            params,
            staging,
        }
    }

    /// Loads `params` (one host vector per key, lengths checked by the caller) into the device
    /// tensors and clears their gradients.
    pub(super) fn load(&mut self, params: &[Vec<f32>]) {
        let target = self.staging.as_ref().unwrap_or(&self.flat).shallow_clone();
        tch::no_grad(|| {
            for (p, &(off, len)) in params.iter().zip(&self.spans) {
                debug_assert_eq!(p.len(), len);
                // SAFETY: `p` holds `len` f32 values and outlives `src`, which is dropped at the
                // end of this iteration, after the synchronous CPU copy out of it.
                let src = unsafe {
                    Tensor::from_blob(
                        p.as_ptr().cast::<u8>(),
                        &[len as i64],
                        &[1],
                        Kind::Float,
                        TorchDevice::Cpu,
                    )
                };
                let mut dst = target.narrow(0, off as i64, len as i64);
                dst.copy_(&src);
            }
            if let Some(staging) = &self.staging {
                // One copy from page-locked memory. It completes before this returns, so the next
                // load may overwrite the staging buffer.
                self.flat.shallow_clone().copy_(staging);
            }
        });
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// The leaf tensors, in key order.
    pub(super) fn params(&self) -> &[Tensor] {
        &self.params
    }
}
