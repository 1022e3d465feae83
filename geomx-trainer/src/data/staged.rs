//! A batch's copy prepared for a model's device ahead of its step.
//!
//! A back end that computes on a GPU copies each batch into page-locked host memory before it
//! can send it to the device asynchronously. [`super::Prefetcher`] runs a back end's [`Stage`] on
//! its thread, after the batch is gathered and augmented, and attaches the result to the batch
//! ([`super::Dataset::staged`]); the model finds it in the batch's [`super::Samples`] view. The
//! data module only carries the value: what it holds is the back end's business.

use std::any::Any;
use std::sync::Arc;

use super::Dataset;

/// A back end's copy of a batch's samples (opaque here; the back end downcasts it). Cloning
/// shares it.
#[derive(Clone)]
pub struct Staged(Arc<dyn Any + Send + Sync>);

impl Staged {
    /// Wraps a back end's copy of a batch.
    pub fn new<T: Any + Send + Sync>(value: T) -> Staged {
        Staged(Arc::new(value))
    }

    /// The copy, if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Staged(..)")
    }
}

/// Prepares a batch for a model's device, on the prefetch thread. An error leaves that batch
/// unstaged (the model then copies it at its step) and is logged.
pub type Stage = Box<dyn FnMut(&Dataset) -> Result<Staged, String> + Send>;
