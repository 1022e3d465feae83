//! [`CudaDevice`]: one CUDA context and stream, with the kernel modules loaded lazily.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PinnedHostSlice, ValidAsZeroBits,
};

use super::error::CudaError;
use super::source::{compile_cached, Family};

/// Threads per block of the elementwise kernels.
pub(crate) const THREADS: u32 = 256;

/// One GPU: its primary context, the context's default stream (every operation of every handle
/// on this device runs there, in order), and the kernel modules, each compiled and loaded at
/// first use.
///
/// Operations are stream-ordered; methods that return host data synchronise the stream.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: String,
    sm_count: u32,
    modules: [OnceLock<Arc<CudaModule>>; Family::ALL.len()],
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("sm_count", &self.sm_count)
            .finish()
    }
}

/// Whether the CUDA driver library can be loaded (never panics).
pub fn driver_available() -> Result<(), CudaError> {
    // SAFETY: only tries to dlopen the candidate library names.
    let present =
        catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false);
    if present {
        Ok(())
    } else {
        Err(CudaError::NoCudaDevice {
            reason: "CUDA driver library (libcuda.so*) not found on the library path".into(),
        })
    }
}

/// Number of CUDA devices, or why there are none. Never panics.
pub fn device_count() -> Result<usize, CudaError> {
    driver_available()?;
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => Ok(n.max(0) as usize),
        Ok(Err(e)) => Err(CudaError::NoCudaDevice {
            reason: format!("driver reports no device ({e:?})"),
        }),
        Err(_) => Err(CudaError::NoCudaDevice {
            reason: "CUDA driver library is missing a required symbol (driver too old?)".into(),
        }),
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Errors (never panics) when the driver, the device or NVRTC is
    /// missing; kernels are compiled later, at first use.
    pub fn new(ordinal: usize) -> Result<Arc<CudaDevice>, CudaError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoCudaDevice {
                reason: format!("ordinal {ordinal} requested, {count} device(s) present"),
            });
        }
        super::source::nvrtc_available()?;
        let opened = catch_unwind(AssertUnwindSafe(|| -> Result<CudaDevice, CudaError> {
            let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("open context"))?;
            let name = ctx.name().map_err(CudaError::driver("device name"))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(CudaError::driver("compute capability"))?;
            let sm_count = ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(CudaError::driver("SM count"))?;
            // The context's default stream: with a single stream cudarc needs no per-buffer
            // events (it records them only once a second stream exists), which saves a few
            // microseconds per kernel argument.
            let stream = ctx.default_stream();
            Ok(CudaDevice {
                ctx,
                stream,
                name,
                arch: format!("compute_{major}{minor}"),
                sm_count: sm_count.max(1) as u32,
                modules: Default::default(),
            })
        }));
        match opened {
            Ok(r) => r.map(Arc::new),
            Err(_) => Err(CudaError::NoCudaDevice {
                reason: "CUDA driver library is missing a required symbol (driver too old?)".into(),
            }),
        }
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// NVRTC virtual architecture the kernels are compiled for (`compute_XY`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The stream all operations of this handle are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx
            .mem_get_info()
            .map_err(CudaError::driver("memory info"))
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("synchronize"))
    }

    /// A zeroed device buffer of `len` elements (stream-ordered).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .alloc_zeros(len)
            .map_err(CudaError::driver("alloc"))
    }

    /// Copies a host slice into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, src: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .clone_htod(src)
            .map_err(CudaError::driver("upload"))
    }

    /// Copies a whole device buffer into `dst` (same length). Synchronises.
    pub fn download_into<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut [T],
    ) -> Result<(), CudaError> {
        super::error::check_len("download", src.len(), dst.len())?;
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(CudaError::driver("download"))
    }

    /// Zeroed page-locked host memory of `len` elements, for fast device ↔ host copies (pass
    /// `as_mut_slice()?` to [`CudaDevice::download_into`]). Cached, not write-combined, so that
    /// the host reads it at full speed.
    pub fn pinned<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<PinnedHostSlice<T>, CudaError> {
        // SAFETY: the memory is zeroed below before anything reads it, and zero bits are a valid
        // `T` (`ValidAsZeroBits`).
        let mut p = unsafe { self.ctx.alloc_pinned_with_flags::<T>(len, 0) }
            .map_err(CudaError::driver("alloc_pinned"))?;
        let ptr = p.as_mut_ptr().map_err(CudaError::driver("alloc_pinned"))?;
        // SAFETY: `ptr` points to `len` elements of `T` owned by `p`.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(p)
    }

    /// The contents of page-locked memory from [`CudaDevice::pinned`], once the copies queued
    /// into it have finished.
    pub fn pinned_mut<T: ValidAsZeroBits>(
        p: &mut PinnedHostSlice<T>,
    ) -> Result<&mut [T], CudaError> {
        p.as_mut_slice().map_err(CudaError::driver("pinned"))
    }

    /// The address of page-locked memory from [`CudaDevice::pinned`], once the copies queued into
    /// it through cudarc have finished (copies queued by a [`super::CopyStream`] are waited for
    /// through their [`super::Copied`]), for handing out disjoint parts of it.
    pub fn pinned_ptr<T: ValidAsZeroBits>(p: &mut PinnedHostSlice<T>) -> Result<*mut T, CudaError> {
        p.as_mut_ptr().map_err(CudaError::driver("pinned"))
    }

    /// Copies a whole device buffer to a new host vector. Synchronises.
    pub fn download<T: DeviceRepr>(&self, src: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        self.stream
            .clone_dtoh(src)
            .map_err(CudaError::driver("download"))
    }

    /// Compiles (once per process) and loads (once per device) every kernel family, so that
    /// later calls do not pay for NVRTC. Optional: families also load at first use.
    pub fn load_all(&self) -> Result<(), CudaError> {
        for family in Family::ALL {
            self.module(family)?;
        }
        Ok(())
    }

    fn module(&self, family: Family) -> Result<&Arc<CudaModule>, CudaError> {
        let slot = &self.modules[family.index()];
        if let Some(m) = slot.get() {
            return Ok(m);
        }
        let ptx = compile_cached(family, &self.arch)?;
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(CudaError::driver("load module"))?;
        // A concurrent first use may have won the race; either module is equivalent.
        Ok(slot.get_or_init(|| module))
    }

    /// A kernel of `family` by name.
    pub(crate) fn function(
        &self,
        family: Family,
        name: &'static str,
    ) -> Result<CudaFunction, CudaError> {
        self.module(family)?
            .load_function(name)
            .map_err(CudaError::driver("load function"))
    }

    /// Grid-stride launch configuration for `work` items on this device ([`grid_for`]).
    pub(crate) fn grid_for(&self, work: u64) -> LaunchConfig {
        grid_for(work, self.sm_count)
    }
}

/// Grid-stride launch configuration for `work` items (64-bit) on `sm_count` SMs: enough blocks
/// of [`THREADS`] to fill the device (16 per SM), never more than the work needs, and at least
/// `work / 2^24` blocks so that no block sees 2^32 elements (its shared u32 counters cannot
/// overflow).
pub(crate) fn grid_for(work: u64, sm_count: u32) -> LaunchConfig {
    let wanted = work.div_ceil(THREADS as u64).max(1);
    let fill = u64::from(sm_count.max(1)) * 16;
    let floor = work >> 24;
    let blocks = wanted.min(fill).max(floor).clamp(1, i32::MAX as u64) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_sizes() {
        assert_eq!(grid_for(0, 132).grid_dim.0, 1);
        assert_eq!(grid_for(1, 132).grid_dim.0, 1);
        assert_eq!(grid_for(257, 132).grid_dim.0, 2);
        assert_eq!(grid_for(1 << 28, 132).grid_dim.0, 132 * 16);
        // Per-block work stays below 2^24 items (of up to 4 elements) even on a tiny device.
        let work = 1u64 << 40;
        let g = grid_for(work, 1).grid_dim.0 as u64;
        assert!(work.div_ceil(g) <= 1 << 24, "{g} blocks");
        assert_eq!(grid_for(u64::MAX, 1).grid_dim.0, i32::MAX as u32);
        assert_eq!(grid_for(1000, 0).block_dim.0, THREADS);
    }
}
