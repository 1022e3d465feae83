//! The parameter gate of a libtorch training step under P3 ([`Model::backward_gated`]).
//!
//! The forward pass takes the resident tensors in key order ([`super::Net::forward_reaching`]).
//! The first key of layer ℓ it reaches calls the caller's `ready(ℓ, params)` (P3: wait for the
//! layer's slices and apply them to the host vectors), then loads the layer's keys into the
//! resident tensors ([`Resident::load_keys`]) before the layer computes; the layers below were
//! computed with the values loaded for them. Layers come in order, each once; one the forward pass
//! did not reach is brought at the end ([`Gate::finish`]). A failure of `ready` or of a load is
//! kept and ends the step before any gradient is handed over.
//!
//! [`Model::backward_gated`]: crate::engine::Model::backward_gated

use std::ops::Range;

use super::gpu::host_grads::HostGrads;
use super::guarded;
use super::resident::Resident;
use crate::engine::{EngineError, LayerGate};

/// The layers' keys of a step whose forward pass waits for each layer's parameters.
pub(super) struct Gate<'a, 'g> {
    /// The step's parameters, one host vector per key, brought up to date layer by layer.
    params: &'a mut [Vec<f32>],
    /// The caller's gate.
    ready: &'a mut LayerGate<'g>,
    /// Number of layers: `ready` is called for `0..layers`.
    layers: usize,
    /// Each layer's keys, when every layer's keys are contiguous and ascend with the layer
    /// (the forward pass then reaches them in layer order); otherwise the step cannot be gated.
    ranges: Option<Vec<Range<usize>>>,
    /// The next layer to bring up to date.
    next: usize,
    /// The first failure.
    failed: Option<EngineError>,
    /// Seconds spent loading keys into the device tensors.
    load_s: f64,
}

impl<'a, 'g> Gate<'a, 'g> {
    /// The gate of `params` whose keys lie in layers `tensor_layers` (key order).
    pub(super) fn new(
        params: &'a mut [Vec<f32>],
        ready: &'a mut LayerGate<'g>,
        tensor_layers: &[usize],
    ) -> Gate<'a, 'g> {
        let layers = tensor_layers.iter().map(|l| l + 1).max().unwrap_or(0);
        let ascending = tensor_layers.windows(2).all(|w| w[0] <= w[1]);
        let ranges = ascending.then(|| {
            let mut k = 0;
            (0..layers)
                .map(|l| {
                    let start = k;
                    while tensor_layers.get(k) == Some(&l) {
                        k += 1;
                    }
                    start..k
                })
                .collect()
        });
        Gate {
            params,
            ready,
            layers,
            ranges,
            next: 0,
            failed: None,
            load_s: 0.0,
        }
    }

    /// Whether the forward pass can wait layer by layer (see [`Gate::ranges`]).
    pub(super) fn layered(&self) -> bool {
        self.ranges.is_some()
    }

    /// The parameters as they are now.
    pub(super) fn params(&self) -> &[Vec<f32>] {
        self.params
    }

    /// Brings every layer not yet brought up to date, without loading anything (the caller loads
    /// all the parameters afterwards): the step then computes as without a gate.
    pub(super) fn ready_all(&mut self) -> Result<&[Vec<f32>], EngineError> {
        while self.next < self.layers {
            let l = self.next;
            self.next += 1;
            (self.ready)(l, self.params)?;
        }
        Ok(self.params)
    }

    /// The forward pass is about to use key `key` for the first time: brings every layer up to
    /// the key's up to date and loads its keys into `r` (on CUDA through `copies`). Nothing
    /// after a failure.
    pub(super) fn reach(&mut self, key: usize, r: &mut Resident, copies: Option<&HostGrads>) {
        let Some(ranges) = &self.ranges else {
            return;
        };
        while self.failed.is_none() && ranges.get(self.next).is_some_and(|k| k.start <= key) {
            let (l, keys) = (self.next, ranges[self.next].clone());
            self.next += 1;
            if let Err(e) = (self.ready)(l, self.params) {
                self.failed = Some(e);
                break;
            }
            let copy = crate::clock::copy_span();
            let values: Vec<&[f32]> = self.params[keys.clone()]
                .iter()
                .map(Vec::as_slice)
                .collect();
            let loaded = guarded(|| r.load_keys(keys.start, &values, copies)).and_then(|done| {
                match done.map_err(EngineError::Backend)? {
                    true => Ok(()),
                    false => Err(EngineError::Backend(format!(
                        "layer {l}'s parameters could not be loaded during the step"
                    ))),
                }
            });
            self.load_s += copy.end().as_secs_f64();
            if let Err(e) = loaded {
                self.failed = Some(e);
            }
        }
    }

    /// After the forward pass: brings and loads the layers it did not reach; the first failure
    /// of the step, if any. Returns the seconds spent loading.
    pub(super) fn finish(
        &mut self,
        r: &mut Resident,
        copies: Option<&HostGrads>,
    ) -> Result<f64, EngineError> {
        self.reach(usize::MAX, r, copies);
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(self.load_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_key_ranges_when_they_ascend() {
        let mut params = vec![Vec::new(); 5];
        let mut ready = |_: usize, _: &mut [Vec<f32>]| Ok(());
        let g = Gate::new(&mut params, &mut ready, &[0, 0, 1, 3, 3]);
        assert_eq!(g.layers, 4);
        assert_eq!(g.ranges, Some(vec![0..2, 2..3, 3..3, 3..5]));
        let g = Gate::new(&mut params, &mut ready, &[0, 1, 0, 2, 2]);
        assert!(!g.layered());
        assert_eq!(g.layers, 3);
    }

    /// Without layer ranges every layer is still brought in order, once.
    #[test]
    fn ready_all_brings_each_layer_once_in_order() {
        let mut params = vec![vec![0.0f32]; 3];
        let mut seen = Vec::new();
        let mut ready = |l: usize, p: &mut [Vec<f32>]| {
            seen.push(l);
            p[l][0] = l as f32 + 1.0;
            Ok(())
        };
        let mut g = Gate::new(&mut params, &mut ready, &[1, 0, 2]);
        assert_eq!(g.ready_all().unwrap(), &[vec![1.0], vec![2.0], vec![3.0]]);
        assert_eq!(g.ready_all().unwrap().len(), 3);
        drop(g);
        assert_eq!(seen, [0, 1, 2]);
    }
}
