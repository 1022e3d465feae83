//! Errors of the CUDA backend.

use thiserror::Error;

/// Why a CUDA operation failed. Constructing a device never panics: a missing driver, a missing
/// NVRTC library or a machine without a GPU all come back as [`CudaError::NoCudaDevice`] or
/// [`CudaError::NvrtcUnavailable`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CudaError {
    /// No usable CUDA device: driver library absent, no device, or the ordinal does not exist.
    #[error("no CUDA device: {reason}")]
    NoCudaDevice {
        /// What the probe found.
        reason: String,
    },
    /// The NVRTC library (`libnvrtc.so*`) could not be loaded.
    #[error("NVRTC unavailable: {reason}")]
    NvrtcUnavailable {
        /// What the probe found.
        reason: String,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile cuda/{family}.cu: {log}")]
    Compile {
        /// Kernel family (file stem under `cuda/`).
        family: &'static str,
        /// Compiler log or error.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {detail}")]
    Driver {
        /// The operation that failed.
        op: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// Buffers whose lengths must agree do not.
    #[error("length mismatch in {op}: expected {expected}, got {got}")]
    LengthMismatch {
        /// The operation.
        op: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A sparse index outside the dense buffer (the kernel skipped it).
    #[error("scatter-add: {count} indices out of range (dense length {len}, base {base})")]
    IndexOutOfRange {
        /// How many indices were out of range.
        count: u64,
        /// Dense buffer length.
        len: usize,
        /// Base offset of the range.
        base: u64,
    },
    /// An argument outside its allowed range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl CudaError {
    /// Wraps a driver error with the operation that produced it.
    pub(crate) fn driver(
        op: &'static str,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
        move |e| CudaError::Driver {
            op,
            detail: format!("{e:?}"),
        }
    }
}

/// Checks that two lengths agree.
pub(crate) fn check_len(op: &'static str, expected: usize, got: usize) -> Result<(), CudaError> {
    if expected == got {
        Ok(())
    } else {
        Err(CudaError::LengthMismatch { op, expected, got })
    }
}
