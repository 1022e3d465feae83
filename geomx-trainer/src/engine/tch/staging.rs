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

/// A staged batch: its images and labels ([`build`]), page-locked when `pinned`.
struct StagedBatch {
    tensors: Mutex<(Tensor, Tensor)>,
    /// Whether both are page-locked (staged for a CUDA device).
    pinned: bool,
}

/// The host tensors of `features` and `labels` (`n` samples): images `[n, c, s, s]` (f32) of
/// `image`, and int64 labels.
fn build(features: &[f32], labels: &[u32], image: ImageShape) -> (Tensor, Tensor) {
    let shape = [
        labels.len() as i64,
        image.channels as i64,
        image.side as i64,
        image.side as i64,
    ];
    let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    (
        Tensor::from_slice(features).reshape(shape),
        Tensor::from_slice(&labels),
    )
}

/// The stage of a model whose images are `image` and whose device is `dev`.
pub(super) fn stager(image: ImageShape, dev: TorchDevice) -> Stage {
    Box::new(move |batch: &Dataset| {
        if batch.n_features() != image.features() {
            return Err(format!(
                "a batch of {} features for images of {}",
                batch.n_features(),
                image.features()
            ));
        }
        let pinned = dev != TorchDevice::Cpu;
        let tensors = guarded(|| {
            let (x, y) = build(batch.features(), batch.labels(), image);
            if pinned {
                (x.pin_memory(dev), y.pin_memory(dev))
            } else {
                (x, y)
            }
        })
        .map_err(|e| format!("staging a batch of {} samples: {e}", batch.len()))?;
        Ok(Staged::new(StagedBatch {
            tensors: Mutex::new(tensors),
            pinned,
        }))
    })
}

/// The images (in `kind`) and labels of `batch` (images of `image`) on `dev`: sent from its
/// staged copy when it has one of [`stager`]'s of the same size (asynchronously when
/// page-locked: the step's kernels follow on the same stream), else built from the host samples
/// and sent.
pub(super) fn on_device(
    batch: &Samples<'_>,
    image: ImageShape,
    kind: Kind,
    dev: TorchDevice,
) -> (Tensor, Tensor) {
    let n = batch.labels.len() as i64;
    let staged = batch
        .staged
        .and_then(|s| s.downcast_ref::<StagedBatch>())
        .and_then(|s| {
            let t = s.tensors.lock().unwrap_or_else(PoisonError::into_inner);
            (t.1.size() == [n]).then(|| (t.0.shallow_clone(), t.1.shallow_clone(), s.pinned))
        });
    let (x, y, non_blocking) = staged.unwrap_or_else(|| {
        let (x, y) = build(batch.features, batch.labels, image);
        (x, y, false)
    });
    (
        x.to_device_(dev, Kind::Float, non_blocking, false)
            .to_kind(kind),
        y.to_device_(dev, Kind::Int64, non_blocking, false),
    )
}
