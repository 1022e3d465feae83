//! Worker-side Bi-Sparse (`compression.intra.codec = "bisparse"`) with the error feedback kept
//! on the GPU: each key's velocity and residual stay in device memory between rounds, the fused
//! error-feedback top-k kernel selects on the device, and only the selected indices and values
//! come to the host. The host copy in [`WorkerSparse`] is refreshed before checkpoints.

use geomx_kernels::{Scaling, ValueType};
use geomx_net::PayloadCodec;
use tch::Tensor;

use super::{GpuCompressError, GpuCompressor, HostState};
use crate::codec::{Encoded, WorkerSparse};

/// Error feedback kept per key where the gradients are ([`GpuCompressor`] on a GPU).
pub trait DeviceFeedback {
    /// Sets `key`'s velocity `u` and residual `v`.
    fn set_state(&mut self, key: usize, u: &[f32], v: &[f32]) -> Result<(), GpuCompressError>;
    /// `key`'s velocity and residual copied to the host, if it has state.
    fn state(&self, key: usize) -> Result<Option<HostState>, GpuCompressError>;
    /// One step of `key`: `u ← m·u + g`, `v ← v + u`, the exact top `k` of |v| moved out of
    /// `u` and `v`, returned as a sparse payload of f32 values.
    fn push(
        &mut self,
        key: usize,
        grad: &Tensor,
        momentum: f32,
        k: usize,
        scaling: Scaling,
    ) -> Result<Vec<u8>, GpuCompressError>;
}

impl DeviceFeedback for GpuCompressor {
    fn set_state(&mut self, key: usize, u: &[f32], v: &[f32]) -> Result<(), GpuCompressError> {
        self.set_ef_state(key, u, v)
    }

    fn state(&self, key: usize) -> Result<Option<HostState>, GpuCompressError> {
        self.ef_state(key)
    }

    fn push(
        &mut self,
        key: usize,
        grad: &Tensor,
        momentum: f32,
        k: usize,
        scaling: Scaling,
    ) -> Result<Vec<u8>, GpuCompressError> {
        self.ef_topk_payload(key, grad, momentum, k, ValueType::F32, scaling)
    }
}

/// Encodes round `round`'s pushes of the gradients `grads` (one per key, in key order), last
/// key first, into `on_payload(key, elements, payload)`. A key that
/// [`WorkerSparse::device_step`] allows is encoded by `dev`: its state goes up from the host
/// copy the first time and stays there. The other keys (small ones, settings only the host
/// computes) are copied to the host and encoded there ([`WorkerSparse::encode`]). Either way
/// the payloads are byte for byte those of the host path.
pub fn sparse_payloads(
    dev: &mut dyn DeviceFeedback,
    sparse: &mut WorkerSparse,
    grads: &[Tensor],
    round: u64,
    on_payload: &mut dyn FnMut(usize, usize, Encoded),
) -> Result<(), GpuCompressError> {
    for (key, g) in grads.iter().enumerate().rev() {
        let e = match sparse.device_step(key, round) {
            Some((momentum, k)) => {
                if let Some((u, v)) = sparse.take_to_device(key) {
                    dev.set_state(key, &u, &v)?;
                }
                Encoded {
                    codec: PayloadCodec::Raw,
                    bytes: dev.push(key, g, momentum, k, sparse.scaling())?,
                    overflow: 0,
                }
            }
            None => {
                let host = super::super::to_host(g);
                sparse
                    .encode(key, &host, round)
                    .map_err(GpuCompressError::Encode)?
            }
        };
        on_payload(key, g.numel(), e);
    }
    Ok(())
}

/// Copies the state `dev` holds for `sparse`'s keys into its host copy (before a checkpoint);
/// the device keeps it and goes on from it.
pub fn sparse_state_to_host(
    dev: &dyn DeviceFeedback,
    sparse: &mut WorkerSparse,
) -> Result<(), GpuCompressError> {
    let keys: Vec<usize> = sparse.device_keys().collect();
    for key in keys {
        let (u, v) = dev.state(key)?.ok_or_else(|| {
            GpuCompressError::Encode(format!("key {key}: no state on the device"))
        })?;
        sparse
            .set_host_copy(key, u, v)
            .map_err(GpuCompressError::Encode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::codec::{TierCodec, WorkerSparse};
    use crate::config::{Codec, SelectionKind, SparseCodec};
    use geomx_kernels::{topk_exact, SparseVec, TopkScratch};

    /// Error feedback on CPU tensors written from compression.md's steps (an oracle independent
    /// of `BiSparse`): `u ← m·u + g`, `v ← v + u`, exact top-k of |v| moved out.
    #[derive(Default)]
    struct Spec {
        state: BTreeMap<usize, HostState>,
        uploads: usize,
    }

    impl DeviceFeedback for Spec {
        fn set_state(&mut self, key: usize, u: &[f32], v: &[f32]) -> Result<(), GpuCompressError> {
            self.uploads += 1;
            self.state.insert(key, (u.to_vec(), v.to_vec()));
            Ok(())
        }

        fn state(&self, key: usize) -> Result<Option<HostState>, GpuCompressError> {
            Ok(self.state.get(&key).cloned())
        }

        fn push(
            &mut self,
            key: usize,
            grad: &Tensor,
            m: f32,
            k: usize,
            scaling: Scaling,
        ) -> Result<Vec<u8>, GpuCompressError> {
            assert_eq!(grad.device(), tch::Device::Cpu);
            let g = Vec::<f32>::try_from(grad.flatten(0, -1)).unwrap();
            let (u, v) = self.state.get_mut(&key).expect("uploaded first");
            for ((u, v), &g) in u.iter_mut().zip(v.iter_mut()).zip(&g) {
                *u = if m == 0.0 { g } else { m * *u + g };
                *v += *u;
            }
            let mut idx = Vec::new();
            topk_exact(v, k, &mut TopkScratch::default(), &mut idx).unwrap();
            let values = idx.iter().map(|&i| v[i as usize]).collect();
            for &i in &idx {
                (u[i as usize], v[i as usize]) = (0.0, 0.0);
            }
            let s = SparseVec::new(g.len() as u32, idx, values).unwrap();
            let mut out = Vec::new();
            s.encode(ValueType::F32, scaling, &mut out);
            Ok(out)
        }
    }

    fn grad(n: usize, key: usize, round: u64) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u64 * 7919 + key as u64 * 131 + round * 31) % 1013) as f32 / 64.0 - 7.9)
            .collect()
    }

    /// The handoff on CPU tensors: the large keys go to the device once (one upload each, after
    /// two host rounds), every payload of the device path equals the host path's byte for byte
    /// (momentum 0 and 0.9), the small key stays on the host, and the state copied back equals
    /// the host's.
    #[test]
    fn device_feedback_continues_the_host_state_and_comes_back() {
        let lens = [3000usize, 10, 1500];
        for momentum in [0.0f32, 0.9] {
            let c = SparseCodec {
                density: 0.01,
                min_size: 1000,
                selection: SelectionKind::Exact,
                warmup_rounds: Some(0),
                momentum,
                ..SparseCodec::default()
            };
            let spec = TierCodec::from_config(&Codec::Bisparse(c), 10)
                .sparse()
                .unwrap()
                .clone();
            let new = || WorkerSparse::new(&spec, Scaling::Pow2, 3, (1, 1), &lens).unwrap();
            let (mut moved, mut host) = (new(), new());
            let mut dev = Spec::default();
            for round in 0..8u64 {
                let grads: Vec<Vec<f32>> = lens
                    .iter()
                    .enumerate()
                    .map(|(k, &n)| grad(n, k, round))
                    .collect();
                let mut got = vec![None; lens.len()];
                if round < 2 {
                    // The first rounds on the host: the device continues from their state.
                    for (k, g) in grads.iter().enumerate() {
                        got[k] = Some((g.len(), moved.encode(k, g, round).unwrap()));
                    }
                } else {
                    let tensors: Vec<Tensor> =
                        grads.iter().map(|g| Tensor::from_slice(g)).collect();
                    sparse_payloads(&mut dev, &mut moved, &tensors, round, &mut |k, n, e| {
                        got[k] = Some((n, e))
                    })
                    .unwrap();
                }
                for (k, g) in grads.iter().enumerate() {
                    let want = host.encode(k, g, round).unwrap();
                    assert_eq!(
                        got[k].as_ref(),
                        Some(&(g.len(), want)),
                        "m {momentum} round {round} key {k}"
                    );
                }
            }
            assert_eq!(dev.uploads, 2, "one upload per large key");
            assert_eq!(moved.device_keys().collect::<Vec<_>>(), [0, 2]);
            sparse_state_to_host(&dev, &mut moved).unwrap();
            let state = |w: &WorkerSparse| {
                w.compressors()
                    .map(|(k, c)| (k, c.export_state()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(state(&moved), state(&host), "m {momentum}");
            assert!(
                sparse_state_to_host(&Spec::default(), &mut moved).is_err(),
                "state lost"
            );
        }
    }
}
