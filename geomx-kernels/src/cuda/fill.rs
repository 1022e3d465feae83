//! Deterministic test patterns generated on the device (`cuda/fill.cu`), with CPU mirrors, so
//! tests and benchmarks can build multi-GiB inputs at memory speed and still know every value.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::context::CudaDevice;
use super::error::CudaError;
use super::source::Family;

/// splitmix64 finaliser (same constants as `cuda/fill.cu`).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Element `i` of [`CudaDevice::fill_bits`]: any f32 bit pattern.
pub fn bits_at(seed: u64, i: u64) -> u32 {
    splitmix64(seed ^ i) as u32
}

/// Element `i` of [`CudaDevice::fill_uniform`]: uniform in [-1, 1) on a 2^-23 grid.
pub fn uniform_at(seed: u64, i: u64) -> f32 {
    (splitmix64(seed ^ i) >> 40) as f32 * (1.0 / 8_388_608.0) - 1.0
}

impl CudaDevice {
    fn launch_fill<T>(
        &self,
        kernel: &'static str,
        dst: &mut CudaSlice<T>,
        seed: u64,
    ) -> Result<(), CudaError> {
        if dst.is_empty() {
            return Ok(());
        }
        let f = self.function(Family::Fill, kernel)?;
        let n = dst.len() as u64;
        let mut b = self.stream().launch_builder(&f);
        b.arg(dst).arg(&n).arg(&seed);
        // SAFETY: writes exactly n elements of dst.
        unsafe { b.launch(self.grid_for(n)) }.map_err(CudaError::driver(kernel))?;
        Ok(())
    }

    /// Fills `dst` with the bit patterns [`bits_at`]`(seed, i)` (NaNs and subnormals included).
    pub fn fill_bits(&self, dst: &mut CudaSlice<f32>, seed: u64) -> Result<(), CudaError> {
        self.launch_fill("fill_bits", dst, seed)
    }

    /// Fills `dst` with [`uniform_at`]`(seed, i)`.
    pub fn fill_uniform(&self, dst: &mut CudaSlice<f32>, seed: u64) -> Result<(), CudaError> {
        self.launch_fill("fill_uniform", dst, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_values_are_in_range_on_the_grid_and_seeded() {
        for i in 0..10_000u64 {
            let x = uniform_at(3, i);
            assert!((-1.0..1.0).contains(&x));
            assert_eq!(((x + 1.0) * 8_388_608.0).fract(), 0.0);
        }
        assert_ne!(uniform_at(3, 1), uniform_at(4, 1));
        assert_eq!(bits_at(7, 5), splitmix64(7 ^ 5) as u32);
    }

    #[test]
    fn splitmix64_reference_value() {
        // First output of the reference splitmix64 generator seeded with 0.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
