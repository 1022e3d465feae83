//! Exact top-k of |v| on the device by radix select (`cuda/topk.cu`), fused with the error-feedback
//! update (`cuda/error_feedback.cu`). Same selection as [`crate::topk_exact`]: |v| descending under
//! the total order (NaN above +inf), ties to the lower index, zeros never selected; output in
//! ascending index order; optionally moves the values (v_i ← 0, u_i ← 0).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::context::CudaDevice;
use super::error::{check_len, CudaError};
use super::source::Family;

/// Elements per compaction chunk (`CHUNK` in `cuda/topk.cu`).
const CHUNK: u64 = 4096;
/// Threads per block of the chunk kernels (`TILE` in `cuda/topk.cu`).
const TILE: u32 = 256;
/// Radix histogram bins.
const HIST_BINS: usize = 2048;
/// Words of selection state.
const STATE_WORDS: usize = 8;
/// Index of the selected count in the state.
const STATE_COUNT: usize = 6;

/// Device scratch for [`CudaDevice::topk_into`], reusable across calls on tensors of up to
/// `capacity` elements.
pub struct TopkWorkspace {
    state: CudaSlice<u64>,
    hist: CudaSlice<u64>,
    counts: CudaSlice<u64>,
    capacity: usize,
}

impl TopkWorkspace {
    /// Allocates scratch for tensors of up to `capacity` elements.
    pub fn new(dev: &CudaDevice, capacity: usize) -> Result<TopkWorkspace, CudaError> {
        let s = dev.stream();
        let nchunks = (capacity as u64).div_ceil(CHUNK).max(1) as usize;
        Ok(TopkWorkspace {
            state: s
                .alloc_zeros(STATE_WORDS)
                .map_err(CudaError::driver("alloc"))?,
            hist: s
                .alloc_zeros(HIST_BINS)
                .map_err(CudaError::driver("alloc"))?,
            counts: s
                .alloc_zeros(2 * nchunks)
                .map_err(CudaError::driver("alloc"))?,
            capacity,
        })
    }

    /// Largest tensor this workspace serves.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A selection that stays on the device: the first `count` entries of `indices` / `values`,
/// ascending by index.
pub struct GpuSelection {
    /// Selected indices (capacity k; the first `count` are valid).
    pub indices: CudaSlice<u64>,
    /// Their values (as they were before a move).
    pub values: CudaSlice<f32>,
    /// Number of selected entries: min(k, number of non-zeros).
    pub count: usize,
}

impl GpuSelection {
    /// Copies the valid part to the host as (indices, values).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<(Vec<u64>, Vec<f32>), CudaError> {
        if self.count == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let s = dev.stream();
        let idx = s
            .clone_dtoh(&self.indices.slice(..self.count))
            .map_err(CudaError::driver("copy indices"))?;
        let val = s
            .clone_dtoh(&self.values.slice(..self.count))
            .map_err(CudaError::driver("copy values"))?;
        Ok((idx, val))
    }
}

/// Where the first radix pass comes from.
enum FirstPass<'a> {
    /// Histogram `v` as it is.
    Plain,
    /// Fused error-feedback update: `u ← m·u + g` (`u ← g` when m = 0), `v ← v + u`.
    ErrorFeedback { g: &'a CudaSlice<f32>, m: f32 },
}

fn missing_u() -> CudaError {
    CudaError::InvalidArgument("the fused error-feedback path needs u".into())
}

impl CudaDevice {
    /// Selects the top `k` of |v| (see the module doc) into a new [`GpuSelection`]. With
    /// `u = Some(..)` and `move_values`, selected entries of both `v` and `u` become 0.
    pub fn topk(
        &self,
        v: &mut CudaSlice<f32>,
        u: Option<&mut CudaSlice<f32>>,
        k: usize,
        move_values: bool,
    ) -> Result<GpuSelection, CudaError> {
        let mut ws = TopkWorkspace::new(self, v.len())?;
        self.topk_into(&mut ws, v, u, k, move_values)
    }

    /// [`CudaDevice::topk`] with caller-provided scratch.
    pub fn topk_into(
        &self,
        ws: &mut TopkWorkspace,
        v: &mut CudaSlice<f32>,
        u: Option<&mut CudaSlice<f32>>,
        k: usize,
        move_values: bool,
    ) -> Result<GpuSelection, CudaError> {
        self.select(ws, v, u, k, move_values, FirstPass::Plain)
    }

    /// Error feedback fused with selection (one Bi-Sparse push step on the device):
    /// `u ← m·u + g`, `v ← v + u`, then the top `k` of |v| are selected and moved out of `v`
    /// and `u`.
    pub fn ef_update_topk(
        &self,
        ws: &mut TopkWorkspace,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: f32,
        k: usize,
    ) -> Result<GpuSelection, CudaError> {
        check_len("ef_update_topk", v.len(), u.len())?;
        check_len("ef_update_topk", v.len(), g.len())?;
        self.select(ws, v, Some(u), k, true, FirstPass::ErrorFeedback { g, m })
    }

    fn select(
        &self,
        ws: &mut TopkWorkspace,
        v: &mut CudaSlice<f32>,
        mut u: Option<&mut CudaSlice<f32>>,
        k: usize,
        move_values: bool,
        first: FirstPass<'_>,
    ) -> Result<GpuSelection, CudaError> {
        let n = v.len();
        if let Some(u) = u.as_deref() {
            check_len("topk", n, u.len())?;
        }
        if n > ws.capacity {
            return Err(CudaError::InvalidArgument(format!(
                "tensor of {n} elements exceeds the workspace capacity {}",
                ws.capacity
            )));
        }
        let k = k.min(n);
        let s = self.stream();
        let mut indices = s
            .alloc_zeros::<u64>(k.max(1))
            .map_err(CudaError::driver("alloc"))?;
        let mut values = s
            .alloc_zeros::<f32>(k.max(1))
            .map_err(CudaError::driver("alloc"))?;
        if k == 0 {
            if let FirstPass::ErrorFeedback { g, m } = first {
                // Nothing to select, but the update still happens.
                let u = u.as_deref_mut().ok_or_else(missing_u)?;
                self.ef_update(u, v, g, m)?;
            }
            return Ok(GpuSelection {
                indices,
                values,
                count: 0,
            });
        }
        let n64 = n as u64;
        let k64 = k as u64;
        s.memcpy_htod(&[k64, k64, 0, 0, 0, 0, 0, 0], &mut ws.state)
            .map_err(CudaError::driver("state upload"))?;

        // Radix passes.
        let hist_f = self.function(Family::Topk, "topk_hist")?;
        let select_f = self.function(Family::Topk, "topk_select")?;
        let one_block = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        for pass in 0u32..3 {
            if pass == 0 {
                match first {
                    FirstPass::Plain => {}
                    FirstPass::ErrorFeedback { g, m } => {
                        let f = self.function(Family::Topk, "ef_update_hist")?;
                        let u = u.as_deref_mut().ok_or_else(missing_u)?;
                        let mut b = s.launch_builder(&f);
                        b.arg(u)
                            .arg(&mut *v)
                            .arg(g)
                            .arg(&m)
                            .arg(&n64)
                            .arg(&mut ws.hist);
                        // SAFETY: u, v, g have n elements; hist has HIST_BINS.
                        unsafe { b.launch(self.grid_for(n64)) }
                            .map_err(CudaError::driver("ef_update_hist"))?;
                    }
                }
            }
            if pass > 0 || matches!(first, FirstPass::Plain) {
                let mut b = s.launch_builder(&hist_f);
                b.arg(&*v)
                    .arg(&n64)
                    .arg(&ws.state)
                    .arg(&mut ws.hist)
                    .arg(&pass);
                // SAFETY: v has n elements; state 8 words; hist HIST_BINS.
                unsafe { b.launch(self.grid_for(n64.div_ceil(4))) }
                    .map_err(CudaError::driver("topk_hist"))?;
            }
            let mut b = s.launch_builder(&select_f);
            b.arg(&mut ws.hist).arg(&mut ws.state).arg(&pass);
            // SAFETY: one block over HIST_BINS bins and the 8-word state.
            unsafe { b.launch(one_block) }.map_err(CudaError::driver("topk_select"))?;
        }

        // Ordered compaction.
        let nchunks = n64.div_ceil(CHUNK);
        let chunk_cfg = LaunchConfig {
            grid_dim: (nchunks.min(self.sm_count() as u64 * 16).max(1) as u32, 1, 1),
            block_dim: (TILE, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.function(Family::Topk, "topk_chunk_counts")?;
        let mut b = s.launch_builder(&f);
        b.arg(&*v)
            .arg(&n64)
            .arg(&ws.state)
            .arg(&mut ws.counts)
            .arg(&nchunks);
        // SAFETY: counts holds 2 words per chunk (workspace capacity checked above).
        unsafe { b.launch(chunk_cfg) }.map_err(CudaError::driver("topk_chunk_counts"))?;
        let f = self.function(Family::Topk, "topk_scan_counts")?;
        let mut b = s.launch_builder(&f);
        b.arg(&mut ws.counts).arg(&nchunks);
        // SAFETY: one block over 2 * nchunks words.
        unsafe { b.launch(one_block) }.map_err(CudaError::driver("topk_scan_counts"))?;
        let f = self.function(Family::Topk, "topk_compact")?;
        let move_flag = move_values as u32;
        let null = 0u64;
        let mut b = s.launch_builder(&f);
        b.arg(&mut *v);
        match u {
            Some(u) => b.arg(u),
            None => b.arg(&null),
        };
        b.arg(&n64)
            .arg(&ws.state)
            .arg(&ws.counts)
            .arg(&nchunks)
            .arg(&mut indices)
            .arg(&mut values)
            .arg(&move_flag);
        // SAFETY: output positions are < min(k, nnz) <= k = capacity of indices/values.
        unsafe { b.launch(chunk_cfg) }.map_err(CudaError::driver("topk_compact"))?;

        let state = s
            .clone_dtoh(&ws.state)
            .map_err(CudaError::driver("state download"))?;
        let count = state[STATE_COUNT] as usize;
        debug_assert!(count <= k);
        Ok(GpuSelection {
            indices,
            values,
            count,
        })
    }

    /// Error feedback / momentum update on the device: `u ← m·u + g` (`u ← g` when m = 0),
    /// `v ← v + u`, f32 without FMA contraction (bit-equal to the CPU).
    pub fn ef_update(
        &self,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: f32,
    ) -> Result<(), CudaError> {
        check_len("ef_update", v.len(), u.len())?;
        check_len("ef_update", v.len(), g.len())?;
        if v.is_empty() {
            return Ok(());
        }
        let n = v.len() as u64;
        let f = self.function(Family::ErrorFeedback, "ef_update")?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(u).arg(v).arg(g).arg(&m).arg(&n);
        // SAFETY: u, v, g have n elements.
        unsafe { b.launch(self.grid_for(n)) }.map_err(CudaError::driver("ef_update"))?;
        Ok(())
    }

    /// [`CudaDevice::ef_update`] fused with the sampled mode's threshold test: returns the number
    /// of i with v_i ≠ 0 and |v_i| ≥ |t| (total order of |v|, NaN above +inf) after the update.
    pub fn ef_update_count_ge(
        &self,
        u: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: f32,
        t: f32,
    ) -> Result<u64, CudaError> {
        check_len("ef_update_count_ge", v.len(), u.len())?;
        check_len("ef_update_count_ge", v.len(), g.len())?;
        if v.is_empty() {
            return Ok(0);
        }
        let n = v.len() as u64;
        let t_key = t.to_bits() & 0x7FFF_FFFF;
        let s = self.stream();
        let mut count = s
            .alloc_zeros::<u64>(1)
            .map_err(CudaError::driver("alloc"))?;
        let f = self.function(Family::ErrorFeedback, "ef_update_count_ge")?;
        let mut b = s.launch_builder(&f);
        b.arg(u)
            .arg(v)
            .arg(g)
            .arg(&m)
            .arg(&n)
            .arg(&t_key)
            .arg(&mut count);
        // SAFETY: u, v, g have n elements; count one word.
        unsafe { b.launch(self.grid_for(n)) }.map_err(CudaError::driver("ef_update_count_ge"))?;
        let c = s
            .clone_dtoh(&count)
            .map_err(CudaError::driver("count download"))?;
        Ok(c[0])
    }
}
