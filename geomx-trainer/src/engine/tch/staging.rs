//! Batches staged for the model's device on the worker's prefetch thread.
//!
//! [`stager`] turns each prefetched batch into libtorch tensors there: the images `[n, c, s, s]`
//! (f32) and the int64 labels, in page-locked memory when the model is on a CUDA device. At the
//! step, [`on_device`] sends them with an asynchronous copy on the model's stream instead of
//! building host tensors and copying them from pageable memory on the training thread. libtorch's
//! page-locked allocator keeps a freed buffer until the copies out of it have finished, so the
//! batch may be dropped as soon as the step is done with it. On the CPU the stage builds the same
//! host tensors the step would, so CPU runs test this path.

use std::sync::{Mutex, PoisonError};

use tch::{Device as TorchDevice, Kind, Tensor};

use super::{guarded, ImageShape};
use crate::data::{Dataset, Samples, Stage, Staged};

/// A staged batch: its images and labels, page-locked when `pinned`.
struct StagedBatch {
    /// Images `[n, c, s, s]`, f32.
    x: Mutex<Tensor>,
    /// Labels `[n]`, int64.
    y: Mutex<Tensor>,
    /// Whether both are page-locked (staged for a CUDA device).
    pinned: bool,
}

/// The stage of a model whose images are `image` and whose device is `dev`.
pub(super) fn stager(image: ImageShape, dev: TorchDevice) -> Stage {
    Box::new(move |batch: &Dataset| {
        let n = batch.len();
        if batch.n_features() != image.features() {
            return Err(format!(
                "a batch of {} features for images of {}",
                batch.n_features(),
                image.features()
            ));
        }
        let shape = [
            n as i64,
            image.channels as i64,
            image.side as i64,
            image.side as i64,
        ];
        let labels: Vec<i64> = batch.labels().iter().map(|&l| i64::from(l)).collect();
        let pinned = dev != TorchDevice::Cpu;
        let (x, y) = guarded(|| {
            let x = Tensor::from_slice(batch.features()).reshape(shape);
            let y = Tensor::from_slice(&labels);
            if pinned {
                (x.pin_memory(dev), y.pin_memory(dev))
            } else {
                (x, y)
            }
        })
        .map_err(|e| format!("staging a batch of {n} samples: {e}"))?;
        Ok(Staged::new(StagedBatch {
            x: Mutex::new(x),
            y: Mutex::new(y),
            pinned,
        }))
    })
}

/// The images (in `kind`) and labels of `batch` on `dev` from its staged copy, if it has one of
/// [`stager`]'s for `n` images of `image` (else the caller copies the host samples).
pub(super) fn on_device(
    batch: &Samples<'_>,
    image: ImageShape,
    kind: Kind,
    dev: TorchDevice,
) -> Option<(Tensor, Tensor)> {
    let staged = batch.staged?.downcast_ref::<StagedBatch>()?;
    let n = batch.labels.len() as i64;
    let want = [
        n,
        image.channels as i64,
        image.side as i64,
        image.side as i64,
    ];
    let x = staged.x.lock().unwrap_or_else(PoisonError::into_inner);
    let y = staged.y.lock().unwrap_or_else(PoisonError::into_inner);
    if x.size() != want || y.size() != [n] {
        return None;
    }
    // Asynchronous from page-locked memory: the step's kernels follow on the same stream.
    let non_blocking = staged.pinned && dev != TorchDevice::Cpu;
    Some((
        x.to_device_(dev, Kind::Float, non_blocking, false)
            .to_kind(kind),
        y.to_device_(dev, Kind::Int64, non_blocking, false),
    ))
}
