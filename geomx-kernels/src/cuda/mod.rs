//! CUDA kernels (feature `cuda`): the GPU counterparts of the CPU kernels, checked against them.
//!
//! Kernel sources live in the repository's `cuda/` folder, one file per family (`cast.cu`,
//! `error_feedback.cu`, `topk.cu`, `scatter.cu`, `dgt.cu`, `fill.cu`), are embedded with
//! `include_str!`, compiled with NVRTC at first use (PTX cached per process and architecture) and
//! loaded once per [`CudaDevice`]. cudarc loads `libcuda` and `libnvrtc` dynamically: without a
//! driver, a device or NVRTC, [`CudaDevice::new`] returns [`CudaError`] and nothing panics.
//!
//! Element counts are 64-bit and every kernel is a grid-stride loop, so tensors above 2^32
//! elements work.
//!
//! | Operation | Method | CPU oracle |
//! |---|---|---|
//! | f32 ↔ f16 / bf16 | [`CudaDevice::f32_to_f16`] … | [`crate::cast`] |
//! | error feedback | [`CudaDevice::ef_update`], [`CudaDevice::ef_update_count_ge`] | [`crate::bisparse`] |
//! | exact top-k (+ move) | [`CudaDevice::topk`], [`CudaDevice::ef_update_topk`] | [`crate::topk_exact`] |
//! | scatter-add | [`CudaDevice::scatter_add`] | [`crate::sparse`] |
//! | DGT block mean \|x\| | [`CudaDevice::block_mean_abs`] | [`crate::dgt_score`] |

mod cast;
mod context;
mod copy;
mod dgt;
mod error;
pub mod fill;
mod scatter;
mod segments;
mod source;
mod topk;

pub use context::{device_count, driver_available, CudaDevice};
pub use copy::{Copied, CopyStream};
pub use error::CudaError;
pub use segments::{pow2_factors, Segments};
pub use source::{compile, nvrtc_available, ptxas_resources, Family, KernelResources};
pub use topk::{GpuSelection, TopkWorkspace};

/// Re-export of the cudarc driver types the API takes (`CudaSlice`, `CudaStream`, …).
pub use cudarc::driver::{CudaSlice, CudaStream, PinnedHostSlice};
