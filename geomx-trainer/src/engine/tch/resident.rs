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
    /// tensors and clears their gradients. On CUDA the values go into the page-locked staging
    /// buffer on several threads ([`super::split::copy_in`]), then to the device in one copy.
    pub(super) fn load(&mut self, params: &[Vec<f32>]) {
        tch::no_grad(|| match &self.staging {
            Some(staging) => {
                let total = staging.numel();
                // SAFETY: `staging` is a contiguous CPU f32 tensor of `total` elements that only
                // this `Resident` holds; nothing else reads or writes it during this borrow (the
                // device copy out of it has finished when `load` returns).
                let host = unsafe {
                    std::slice::from_raw_parts_mut(staging.data_ptr().cast::<f32>(), total)
                };
                let srcs: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
                let offsets: Vec<usize> = self.spans.iter().map(|&(off, _)| off).collect();
                super::split::copy_in(&srcs, &offsets, host)
                    .expect("spans are increasing and lie within the buffer");
                // One copy from page-locked memory. It completes before this returns, so the next
                // load may overwrite the staging buffer. (Four chunks, each sent asynchronously
                // while the next was copied, measured slower on an H200: 7.7 ms against 4.0.)
                self.flat.shallow_clone().copy_(staging);
            }
            None => {
                for (p, &(off, len)) in params.iter().zip(&self.spans) {
                    debug_assert_eq!(p.len(), len);
                    // SAFETY: `p` holds `len` f32 values and outlives `src`, which is dropped at
                    // the end of this iteration, after the synchronous CPU copy out of it.
                    let src = unsafe {
                        Tensor::from_blob(
                            p.as_ptr().cast::<u8>(),
                            &[len as i64],
                            &[1],
                            Kind::Float,
                            TorchDevice::Cpu,
                        )
                    };
                    let mut dst = self.flat.narrow(0, off as i64, len as i64);
                    dst.copy_(&src);
                }
            }
        });
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// A CPU `Resident` that loads through an (unpinned) staging buffer, as on CUDA: tests run
    /// the staging path without a GPU.
    #[cfg(test)]
    fn staged_on_cpu(specs: &[TensorSpec]) -> Resident {
        let mut r = Resident::new(specs, TorchDevice::Cpu);
        r.staging = Some(Tensor::zeros(
            [r.flat.numel() as i64],
            (Kind::Float, TorchDevice::Cpu),
        ));
        r
    }

    /// The leaf tensors, in key order.
    pub(super) fn params(&self) -> &[Tensor] {
        &self.params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loading through the staging buffer (the CUDA path, split over threads) and loading
    /// directly give the same tensors, step after step; keys keep their alignment gaps at zero.
    #[test]
    fn staged_and_direct_loads_agree() {
        let lens = [3usize, 1_500_000, 17, 0, 700_001, 64];
        let specs: Vec<TensorSpec> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| TensorSpec {
                name: format!("k{i}"),
                shape: vec![n],
            })
            .collect();
        let mut direct = Resident::new(&specs, TorchDevice::Cpu);
        let mut staged = Resident::staged_on_cpu(&specs);
        for step in 0..3u32 {
            let params: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(k, &n)| {
                    (0..n)
                        .map(|i| (i as f32) * 0.5 + (k as f32) + step as f32)
                        .collect()
                })
                .collect();
            direct.load(&params);
            staged.load(&params);
            assert!(direct.flat.equal(&staged.flat), "step {step}");
            for (k, p) in params.iter().enumerate() {
                let got = Vec::<f32>::try_from(&staged.params()[k].flatten(0, -1)).unwrap();
                assert_eq!(&got, p, "step {step} key {k}");
            }
        }
        // The alignment gaps stay zero: the buffer's sum is the sum of the keys.
        let keys: f64 = (0..lens.len())
            .map(|k| staged.params()[k].sum(Kind::Double).double_value(&[]))
            .sum();
        let all = staged.flat.sum(Kind::Double).double_value(&[]);
        assert!((all - keys).abs() <= 1e-6 * all.abs(), "{all} vs {keys}");
    }
}
