//! Segmented kernels (`cuda/cast.cu`): one launch covers every tensor of a model laid out back to
//! back in one flat buffer, instead of one launch (and one synchronisation) per tensor.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::context::{CudaDevice, THREADS};
use super::error::{check_len, CudaError};
use super::source::Family;

/// Most segments one launch covers (the grid's y dimension).
const MAX_GRID_Y: usize = 65_535;

/// Blocks per segment: enough for the longest segment at 8 elements per thread, at most 1024.
fn blocks_x(longest: u64) -> u32 {
    longest.div_ceil(u64::from(THREADS) * 8).clamp(1, 1024) as u32
}

/// The layout of tensors of `lens` elements back to back in one flat buffer, on the device.
#[derive(Debug)]
pub struct Segments {
    /// Prefix sums: segment s is `offsets[s]..offsets[s + 1]`.
    host: Vec<u64>,
    dev: CudaSlice<u64>,
    longest: u64,
}

impl Segments {
    /// Segment lengths.
    pub fn lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.host.windows(2).map(|w| (w[1] - w[0]) as usize)
    }

    /// Number of segments.
    pub fn count(&self) -> usize {
        self.host.len() - 1
    }

    /// Total elements.
    pub fn total(&self) -> usize {
        self.host[self.host.len() - 1] as usize
    }

    /// Element range of segment `s`.
    pub fn range(&self, s: usize) -> std::ops::Range<usize> {
        self.host[s] as usize..self.host[s + 1] as usize
    }
}

impl CudaDevice {
    /// The layout of tensors of `lens` elements back to back (offsets uploaded once). Errors on
    /// no segment.
    pub fn segments(&self, lens: &[usize]) -> Result<Segments, CudaError> {
        if lens.is_empty() {
            return Err(CudaError::InvalidArgument("no segments".into()));
        }
        let mut host = Vec::with_capacity(lens.len() + 1);
        host.push(0u64);
        for &l in lens {
            host.push(host[host.len() - 1] + l as u64);
        }
        let longest = lens.iter().copied().max().unwrap_or(0) as u64;
        let dev = self.upload(&host)?;
        Ok(Segments { host, dev, longest })
    }

    /// The launches covering `segs`: (configuration, base segment) per chunk of at most 65,535
    /// segments.
    fn segment_launches(segs: &Segments) -> impl Iterator<Item = (LaunchConfig, u32)> + '_ {
        (0..segs.count()).step_by(MAX_GRID_Y).map(move |base| {
            let chunk = (segs.count() - base).min(MAX_GRID_Y);
            let cfg = LaunchConfig {
                grid_dim: (blocks_x(segs.longest), chunk as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (cfg, base as u32)
        })
    }

    /// Per segment of `src`, the largest |x| key (the bits of |x|, NaN above inf), as
    /// [`crate::dense::max_abs_key`] computes it on the host. `out` has one entry per segment.
    pub fn max_abs_key_segments(
        &self,
        src: &CudaSlice<f32>,
        segs: &Segments,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        check_len("max_abs_key_segments", segs.total(), src.len())?;
        check_len("max_abs_key_segments out", segs.count(), out.len())?;
        self.stream()
            .memset_zeros(out)
            .map_err(CudaError::driver("memset"))?;
        if src.is_empty() {
            return Ok(());
        }
        let kernel = "max_abs_key_segments";
        let f = self.function(Family::Cast, kernel)?;
        for (cfg, base) in Self::segment_launches(segs) {
            let mut b = self.stream().launch_builder(&f);
            b.arg(src).arg(&segs.dev).arg(&mut *out).arg(&base);
            // SAFETY: the segments tile `src` (length checked) and `out` has one entry per
            // segment; the grid's y index plus `base` stays below `segs.count()`.
            unsafe { b.launch(cfg) }.map_err(CudaError::driver(kernel))?;
        }
        Ok(())
    }

    /// FP16 bits of each segment of `src` times 2^e, applied as `(x·a)·b` with
    /// `factors[2s] = a`, `factors[2s + 1] = b` (1 and 1: no scaling), bit-identical to the host's
    /// pow2 encoder ([`crate::encode_dense`]). `dst.len() == src.len()`.
    pub fn f32_to_f16_scaled_segments(
        &self,
        src: &CudaSlice<f32>,
        segs: &Segments,
        factors: &CudaSlice<f32>,
        dst: &mut CudaSlice<u16>,
    ) -> Result<(), CudaError> {
        check_len("f32_to_f16_scaled_segments", segs.total(), src.len())?;
        check_len("f32_to_f16_scaled_segments dst", src.len(), dst.len())?;
        check_len(
            "f32_to_f16_scaled_segments factors",
            2 * segs.count(),
            factors.len(),
        )?;
        if src.is_empty() {
            return Ok(());
        }
        let kernel = "cast_f32_to_f16_scaled_segments";
        let f = self.function(Family::Cast, kernel)?;
        for (cfg, base) in Self::segment_launches(segs) {
            let mut b = self.stream().launch_builder(&f);
            b.arg(src)
                .arg(&mut *dst)
                .arg(&segs.dev)
                .arg(factors)
                .arg(&base);
            // SAFETY: the segments tile `src` and `dst` (lengths checked), `factors` has two
            // entries per segment; the grid's y index plus `base` stays below `segs.count()`.
            unsafe { b.launch(cfg) }.map_err(CudaError::driver(kernel))?;
        }
        Ok(())
    }
}

/// The factors `(a, b)` with which the host's pow2 encoder scales by 2^e (`(x·a)·b`); `(1, 1)`
/// for e = 0 (no scaling) or an exponent outside the representable range.
pub fn pow2_factors(e: i16) -> (f32, f32) {
    crate::cast::Pow2::new(i32::from(e))
        .filter(|_| e != 0)
        .map_or((1.0, 1.0), |p| p.factors())
}
