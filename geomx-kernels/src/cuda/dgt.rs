//! DGT block scoring on the device (`cuda/dgt.cu`): mean |x| per block, summed in f64.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::context::{CudaDevice, THREADS};
use super::error::{check_len, CudaError};
use super::source::Family;

impl CudaDevice {
    /// `out[b]` = mean of |x_i| over block b = [b·block_elems, min(n, (b+1)·block_elems)),
    /// summed in f64 (a tree sum: equal to a sequential f64 sum up to rounding, relative
    /// error below ~1e-15 for blocks of up to 2^16 elements). `out.len()` must be the number of
    /// blocks, ⌈n / block_elems⌉.
    pub fn block_mean_abs(
        &self,
        x: &CudaSlice<f32>,
        block_elems: usize,
        out: &mut CudaSlice<f64>,
    ) -> Result<(), CudaError> {
        if block_elems == 0 {
            return Err(CudaError::InvalidArgument(
                "block_elems must be positive".into(),
            ));
        }
        let nblocks = x.len().div_ceil(block_elems);
        check_len("block_mean_abs", nblocks, out.len())?;
        if nblocks == 0 {
            return Ok(());
        }
        let n = x.len() as u64;
        let be = block_elems as u64;
        let nb = nblocks as u64;
        let cfg = LaunchConfig {
            grid_dim: (nb.min(i32::MAX as u64) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.function(Family::Dgt, "dgt_block_mean_abs_f32")?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(x).arg(&n).arg(&be).arg(&nb).arg(out);
        // SAFETY: reads n elements of x, writes nblocks of out.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("dgt_block_mean_abs_f32"))?;
        Ok(())
    }
}
