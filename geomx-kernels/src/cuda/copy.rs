//! [`CopyStream`]: copies between device memory that another library owns (libtorch's tensors,
//! addressed by raw device pointer) and page-locked host memory, on a stream of their own so that
//! they overlap the kernels of the legacy default stream (where libtorch and [`CudaDevice`]
//! queue their work).
//!
//! A device → host copy is ordered after everything queued so far on the default stream (an
//! event recorded there); a host → device copy may be. Each completes behind a [`Copied`] event,
//! which the caller waits for on the host or makes the default stream wait for
//! ([`Copied::order_default`]) before the work that reads the copied values. Neither blocks the
//! calling thread.

use std::sync::Arc;

use cudarc::driver::result::stream::{create, destroy, StreamKind};
use cudarc::driver::result::{memcpy_dtoh_async, memcpy_htod_async};
use cudarc::driver::{sys, CudaEvent, CudaStream};

use super::{CudaDevice, CudaError};

/// A non-blocking copy stream of one device (see the module docs).
pub struct CopyStream {
    dev: Arc<CudaDevice>,
    /// The stream, owned here (created raw so that cudarc's context stays in single-stream mode:
    /// no per-buffer events on the default stream's work).
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for CopyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyStream")
            .field("device", &self.dev.ordinal())
            .finish()
    }
}

/// A queued copy: [`Copied::wait`] returns once it has completed.
#[must_use = "the destination may be read only after wait()"]
pub struct Copied(CudaEvent);

impl Copied {
    /// Blocks until the copy has completed.
    pub fn wait(&self) -> Result<(), CudaError> {
        self.0
            .synchronize()
            .map_err(CudaError::driver("copy stream: wait"))
    }

    /// Whether the copy has completed (without waiting; an error of the copy reads as not done,
    /// and [`Copied::wait`] reports it).
    pub fn is_done(&self) -> bool {
        self.0.is_complete()
    }

    /// Makes the work queued from now on on the default stream wait for the copy (without
    /// blocking the calling thread).
    pub fn order_default(&self) -> Result<(), CudaError> {
        self.0
            .context()
            .default_stream()
            .wait(&self.0)
            .map_err(CudaError::driver("copy stream: default waits"))
    }
}

impl CopyStream {
    /// A new copy stream on `dev`.
    pub fn new(dev: &Arc<CudaDevice>) -> Result<CopyStream, CudaError> {
        let ctx = dev.context();
        ctx.bind_to_thread()
            .map_err(CudaError::driver("copy stream: bind"))?;
        let raw = create(StreamKind::NonBlocking).map_err(CudaError::driver("stream create"))?;
        // SAFETY: `raw` is a stream of this context, destroyed only in `Drop`, after the wrapper
        // (held only here) is no longer used.
        let stream = unsafe { ctx.wrap_borrowed_stream(raw) };
        Ok(CopyStream {
            dev: dev.clone(),
            stream,
        })
    }

    /// An event recorded now on `stream`.
    fn record(&self, stream: &CudaStream) -> Result<CudaEvent, CudaError> {
        stream
            .record_event(None)
            .map_err(CudaError::driver("copy stream: record"))
    }

    /// Orders this stream's next copies after the work queued so far on the default stream.
    fn after_default(&self) -> Result<(), CudaError> {
        let after = self.record(self.dev.stream())?;
        self.stream
            .wait(&after)
            .map_err(CudaError::driver("copy stream: wait event"))
    }

    /// Queues a copy of `dst.len()` `f32` values from device address `src` into `dst`, after
    /// the work queued so far on the default stream.
    ///
    /// # Safety
    /// `src` must address `dst.len()` `f32` values of this device's memory that stay allocated
    /// and unchanged until the returned copy has completed; `dst` must be page-locked (for an
    /// asynchronous copy) and must be neither read, written, moved nor freed until then.
    pub unsafe fn dtoh_after_default(
        &self,
        src: sys::CUdeviceptr,
        dst: &mut [f32],
    ) -> Result<Copied, CudaError> {
        self.after_default()?;
        // SAFETY: the caller keeps `src` and `dst` valid and untouched until the copy completes.
        unsafe { memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(CudaError::driver("copy stream: device to host"))?;
        Ok(Copied(self.record(&self.stream)?))
    }

    /// Queues a copy of `src` to device address `dst` (as many `f32` values): when
    /// `after_queued`, ordered after the work queued so far on the default stream (which may
    /// still read the old values); otherwise only after this stream's earlier copies. The
    /// default stream does not wait for it until told ([`Copied::order_default`]).
    ///
    /// # Safety
    /// `dst` must address `src.len()` `f32` values of this device's memory that stay allocated
    /// until the copy has completed, and that no queued work still reads unless `after_queued`;
    /// `src` must be page-locked and must be neither moved nor freed until then (if it is
    /// written meanwhile, the device gets some mix of old and new values).
    pub unsafe fn htod(
        &self,
        src: &[f32],
        dst: sys::CUdeviceptr,
        after_queued: bool,
    ) -> Result<Copied, CudaError> {
        if after_queued {
            self.after_default()?;
        }
        // SAFETY: the caller keeps `src` and `dst` valid until the copy completes.
        unsafe { memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(CudaError::driver("copy stream: host to device"))?;
        Ok(Copied(self.record(&self.stream)?))
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        let ctx = self.dev.context();
        if ctx.bind_to_thread().is_ok() {
            // SAFETY: the stream was created in `new` and nothing uses it after this; pending
            // work completes before the driver releases it.
            let _ = unsafe { destroy(self.stream.cu_stream()) };
        }
    }
}
