//! Sparse scatter-add on the device (`cuda/scatter.cu`), bit-equal to the CPU's sequential
//! `dense[base + idx[j]] += val[j]` for one sparse vector with strictly ascending indices.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::context::CudaDevice;
use super::error::{check_len, CudaError};
use super::source::Family;

impl CudaDevice {
    /// Adds the sparse vector (`idx`, `val`) into `dense` at `base + idx[j]`. Apply vectors one
    /// call at a time in DC order. `idx` must be strictly ascending (as decoded payloads are);
    /// out-of-range indices are not written and make the call fail with
    /// [`CudaError::IndexOutOfRange`] (after the in-range ones were added). Synchronises.
    pub fn scatter_add(
        &self,
        dense: &mut CudaSlice<f32>,
        base: u64,
        idx: &CudaSlice<u32>,
        val: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_len("scatter_add", idx.len(), val.len())?;
        if idx.is_empty() {
            return Ok(());
        }
        let s = self.stream();
        let mut bad = s
            .alloc_zeros::<u64>(1)
            .map_err(CudaError::driver("alloc"))?;
        let n = dense.len() as u64;
        let count = idx.len() as u64;
        let f = self.function(Family::Scatter, "scatter_add_f32")?;
        let mut b = s.launch_builder(&f);
        b.arg(&mut *dense)
            .arg(&n)
            .arg(&base)
            .arg(idx)
            .arg(val)
            .arg(&count)
            .arg(&mut bad);
        // SAFETY: reads count entries of idx/val; writes only dense[i] with i < n.
        unsafe { b.launch(self.grid_for(count)) }.map_err(CudaError::driver("scatter_add_f32"))?;
        let bad = s
            .clone_dtoh(&bad)
            .map_err(CudaError::driver("bad-count download"))?[0];
        if bad != 0 {
            return Err(CudaError::IndexOutOfRange {
                count: bad,
                len: dense.len(),
                base,
            });
        }
        Ok(())
    }
}
