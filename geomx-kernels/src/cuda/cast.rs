//! f32 ↔ FP16 / BF16 casts on the device (`cuda/cast.cu`), bit-identical to [`crate::cast`].

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::context::CudaDevice;
use super::error::{check_len, CudaError};
use super::source::Family;

impl CudaDevice {
    fn launch_cast<S, D>(
        &self,
        kernel: &'static str,
        src: &CudaSlice<S>,
        dst: &mut CudaSlice<D>,
    ) -> Result<(), CudaError> {
        check_len(kernel, src.len(), dst.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let f = self.function(Family::Cast, kernel)?;
        let n = src.len() as u64;
        let cfg = self.grid_for(n.div_ceil(4));
        let mut b = self.stream().launch_builder(&f);
        b.arg(src).arg(dst).arg(&n);
        // SAFETY: the kernel reads n elements of src and writes n of dst, both of length n.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver(kernel))?;
        Ok(())
    }

    /// f32 → FP16 bits (spec RNE, NaN and overflow rules), `dst.len() == src.len()`.
    pub fn f32_to_f16(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<u16>,
    ) -> Result<(), CudaError> {
        self.launch_cast("cast_f32_to_f16", src, dst)
    }

    /// FP16 bits → f32 (exact; NaN made quiet).
    pub fn f16_to_f32(
        &self,
        src: &CudaSlice<u16>,
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.launch_cast("cast_f16_to_f32", src, dst)
    }

    /// f32 → BF16 bits (RNE; NaN stays NaN).
    pub fn f32_to_bf16(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<u16>,
    ) -> Result<(), CudaError> {
        self.launch_cast("cast_f32_to_bf16", src, dst)
    }

    /// BF16 bits → f32 (exact).
    pub fn bf16_to_f32(
        &self,
        src: &CudaSlice<u16>,
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.launch_cast("cast_bf16_to_f32", src, dst)
    }
}
