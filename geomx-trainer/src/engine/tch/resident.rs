//! Parameters that stay on the model's device between steps.
//!
//! The trainer hands the parameters over as host vectors each step (they come back from the
//! servers). Instead of building fresh device tensors from them every step, a [`Resident`] keeps
//! one flat device buffer that holds every key (each starting at a multiple of 16 elements) and
//! leaf tensors that view it. A step loads the new values through one reused page-locked host
//! buffer and a single host → device copy. On the CPU the same code loads them straight into the
//! buffer (there is nothing to pin), so CPU runs test this path.
//!
//! The gradients are flat too: each leaf's gradient is bound to its span of one device buffer
//! (autograd accumulates into an existing gradient in place), so a step's gradients leave the
//! device in one copy per stage, with no concatenation, and are cleared with one fill.

use tch::{Device as TorchDevice, Kind, Tensor};

use geomx_kernels::cuda::Copied;

use super::gpu::host_grads::HostGrads;
use crate::engine::TensorSpec;

/// Keys start at multiples of this many elements (64 bytes).
const ALIGN: usize = 16;

/// A model's parameters kept on its device.
pub(super) struct Resident {
    /// Every key back to back, on the device.
    flat: Tensor,
    /// Offset and length of each key in `flat`.
    spans: Vec<(usize, usize)>,
    /// Leaf tensors (views of `flat`, shaped as the keys) that autograd differentiates.
    params: Vec<Tensor>,
    /// Every key's gradient back to back (the same spans as `flat`): the leaves' gradients are
    /// views of it.
    grads: Tensor,
    /// Page-locked host copy of `flat` through which loads go (CUDA only).
    staging: Option<Tensor>,
    /// Keys whose next values are already on the device ([`Resident::preload`]); the host copy
    /// they were loaded from (the staging buffer, or `flat` itself on the CPU) still holds them.
    preloaded: Vec<bool>,
    /// The preloads' device copies, which libtorch's queue waits for at the next load.
    in_flight: Vec<Copied>,
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resident")
            .field("device", &self.flat.device())
            .field("keys", &self.spans.len())
            .field("pinned", &self.staging.is_some())
            .finish()
    }
}

impl Resident {
    /// Each key's `(offset, len)` in the flat buffers of `specs`, and their length.
    fn layout(specs: &[TensorSpec]) -> (Vec<(usize, usize)>, usize) {
        let mut spans = Vec::with_capacity(specs.len());
        let mut total = 0usize;
        for s in specs {
            spans.push((total, s.len()));
            total += s.len().div_ceil(ALIGN) * ALIGN;
        }
        (spans, total)
    }

    /// Elements of the flat buffers of `specs` (every key and its alignment gap).
    pub(super) fn flat_len(specs: &[TensorSpec]) -> usize {
        Self::layout(specs).1
    }

    /// Zeroed parameters of `specs` on `dev`.
    pub(super) fn new(specs: &[TensorSpec], dev: TorchDevice) -> Resident {
        let (spans, total) = Self::layout(specs);
        let flat = Tensor::zeros([total as i64], (Kind::Float, dev));
        let params = specs
            .iter()
            .zip(&spans)
            .map(|(s, &(off, len))| {
                let shape: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
                flat.narrow(0, off as i64, len as i64)
                    .view(shape.as_slice())
                    .detach()
                    .set_requires_grad(true)
            })
            .collect::<Vec<Tensor>>();
        let grads = bind_grads(&params, &spans, total, dev);
        let staging = match dev {
            TorchDevice::Cpu => None,
            _ => {
                Some(Tensor::zeros([total as i64], (Kind::Float, TorchDevice::Cpu)).pin_memory(dev))
            }
        };
        Resident {
            flat,
            spans,
            params,
            grads,
            staging,
            preloaded: vec![false; specs.len()],
            in_flight: Vec::new(),
        }
    }

    /// Loads `params` (one host vector per key, lengths checked by the caller) into the device
    /// tensors and clears their gradients. On CUDA the values go into the page-locked staging
    /// buffer on several threads ([`super::split::copy_in`]), then to the device in one copy.
    /// Keys preloaded with the same values ([`Resident::preload`]; compared byte for byte with
    /// the host copy they were loaded from, which costs less than loading them) are skipped.
    pub(super) fn load(&mut self, params: &[Vec<f32>]) -> Result<(), String> {
        self.begin()?;
        let stale = self.stale_keys(params);
        let keys: Vec<usize> = (0..params.len()).filter(|&k| stale[k]).collect();
        tch::no_grad(|| match &self.staging {
            Some(staging) => {
                // SAFETY: only this `Resident` touches `staging`; the device copies out of it have
                // finished or are loaded again below, after them (see `preload`).
                let host = unsafe { host_mut(staging) };
                let srcs: Vec<&[f32]> = keys.iter().map(|&k| params[k].as_slice()).collect();
                let offsets: Vec<usize> = keys.iter().map(|&k| self.spans[k].0).collect();
                super::split::copy_in(&srcs, &offsets, host)
                    .expect("spans are increasing and lie within the buffer");
                // Copies from page-locked memory that complete before this returns, so the next
                // load may overwrite the staging buffer: one for the whole buffer when no key was
                // preloaded. (Four chunks, each sent asynchronously while the next was copied,
                // measured slower on an H200: 7.7 ms against 4.0.)
                if keys.len() == params.len() {
                    self.flat.shallow_clone().copy_(staging);
                } else {
                    for run in runs(&keys) {
                        let r = self.elements(run);
                        let (off, len) = (r.start as i64, r.len() as i64);
                        self.flat
                            .narrow(0, off, len)
                            .copy_(&staging.narrow(0, off, len));
                    }
                }
            }
            None => {
                for &k in &keys {
                    self.write_key(k, &params[k]);
                }
            }
        });
        self.preloaded.fill(false);
        Ok(())
    }

    /// Starts a training step: everything queued from here on (loads, the forward pass) comes
    /// after the preloads' copies, and the gradients are cleared.
    pub(super) fn begin(&mut self) -> Result<(), String> {
        for c in self.in_flight.drain(..) {
            c.order_default().map_err(|e| e.to_string())?;
        }
        tch::no_grad(|| {
            let _ = self.grads.zero_();
        });
        Ok(())
    }

    /// Loads keys `first..first + values.len()` during a step begun with [`Resident::begin`],
    /// before the forward pass first uses them, without touching the version counter that the
    /// leaves share (the layers already computed keep what autograd saved of theirs): on the CPU
    /// in place, on CUDA into the staging buffer and on `copies`' upload stream after the work
    /// queued so far, with libtorch's queue waiting for the copy. Returns whether they were
    /// loaded: not on CUDA without `copies`.
    pub(super) fn load_keys(
        &mut self,
        first: usize,
        values: &[&[f32]],
        copies: Option<&HostGrads>,
    ) -> Result<bool, String> {
        if !self.preload(first, values, copies, true)? {
            return Ok(false);
        }
        for c in self.in_flight.drain(..) {
            c.order_default().map_err(|e| e.to_string())?;
        }
        Ok(true)
    }

    /// Writes `values` into key `key`'s span of a CPU `flat`, past libtorch: a preload during a
    /// step must not bump the version counter the leaves share with `flat`, which autograd checks
    /// for the tensors that the stages below still need (their own spans are not written).
    fn write_key(&self, key: usize, values: &[f32]) {
        let (off, len) = self.spans[key];
        assert!(self.flat.device() == TorchDevice::Cpu);
        // SAFETY: on the CPU only this `Resident` touches `flat` outside autograd, and the
        // stages that still read it read other keys' spans.
        let flat = unsafe { host_mut(&self.flat) };
        flat[off..off + len].copy_from_slice(values);
    }

    /// The elements of `flat` that keys `keys` span (first key's offset to the last key's end).
    fn elements(&self, keys: std::ops::Range<usize>) -> std::ops::Range<usize> {
        self.flat_grads().elements(keys)
    }

    /// Which keys `load` must copy: all but the preloaded ones whose host copy (the staging
    /// buffer on CUDA, `flat` on the CPU) equals `params` byte for byte, compared on several
    /// threads.
    fn stale_keys(&self, params: &[Vec<f32>]) -> Vec<bool> {
        let mut stale = vec![true; params.len()];
        if !self.preloaded.contains(&true) {
            return stale;
        }
        // SAFETY: only this `Resident` touches it, and nothing writes it during this borrow
        // (device copies may still read it).
        let host: &[f32] = unsafe { host_mut(self.staging.as_ref().unwrap_or(&self.flat)) };
        // Large keys are compared in pieces, so that one key does not hold a thread alone.
        let differs: Vec<std::sync::atomic::AtomicBool> =
            params.iter().map(|_| false.into()).collect();
        let mut jobs = Vec::new();
        for (k, p) in params
            .iter()
            .enumerate()
            .filter(|&(k, _)| self.preloaded[k])
        {
            let (off, len) = self.spans[k];
            let pieces = host[off..off + len].chunks(super::split::PIECE);
            jobs.extend(
                pieces
                    .zip(p.chunks(super::split::PIECE))
                    .map(|(a, b)| (k, a, b)),
            );
        }
        super::split::each_split(
            jobs,
            |(_, a, _)| a.len(),
            |(k, a, b)| {
                if zerocopy::IntoBytes::as_bytes(a) != zerocopy::IntoBytes::as_bytes(b) {
                    differs[k].store(true, std::sync::atomic::Ordering::Relaxed);
                }
            },
        );
        for ((s, pre), d) in stale.iter_mut().zip(&self.preloaded).zip(&differs) {
            *s = !pre || d.load(std::sync::atomic::Ordering::Relaxed);
        }
        stale
    }

    /// Loads the values the next step will use for keys `first..first + values.len()` now, so
    /// that the next [`Resident::load`] skips them (when it is given the same values).
    ///
    /// On the CPU they are written in place; on CUDA they go into the staging buffer and to the
    /// device on `copies`' upload stream, without waiting: after the work queued so far when
    /// `after_queued`, at once otherwise (the caller has seen those keys' gradients arrive, so
    /// the kernels that read their old values have run). Returns whether they were loaded: not
    /// on CUDA without `copies`.
    ///
    /// The next load makes libtorch's queue wait for the copies. The staging buffer is not
    /// written again before they are done: the next load writes only keys that were not
    /// preloaded with the same values (and loads those again after the copies), and the next
    /// preload of a key comes after the next step's gradients, which come after its forward pass.
    pub(super) fn preload(
        &mut self,
        first: usize,
        values: &[&[f32]],
        copies: Option<&HostGrads>,
        after_queued: bool,
    ) -> Result<bool, String> {
        let keys = first..first + values.len();
        if keys.end > self.spans.len() {
            return Err(format!("keys {keys:?} of {}", self.spans.len()));
        }
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(i, v)| v.len() != self.spans[first + i].1)
        {
            return Err(format!(
                "key {}: {} values for {}",
                first + i,
                v.len(),
                self.spans[first + i].1
            ));
        }
        match (&self.staging, copies) {
            (Some(staging), Some(copies)) => {
                // SAFETY: only this `Resident` touches `staging`; the copies queued from other
                // ranges of it are not aliased by the writes below (`copy_in` writes only these
                // keys' spans).
                let host = unsafe { host_mut(staging) };
                let offsets: Vec<usize> = keys.clone().map(|k| self.spans[k].0).collect();
                super::split::copy_in(values, &offsets, host)?;
                let r = self.elements(keys.clone());
                let copied = copies
                    .load_async(&host[r.clone()], &self.flat, r.start, after_queued)
                    .map_err(|e| e.to_string())?;
                self.in_flight.push(copied);
            }
            (Some(_), None) => return Ok(false),
            (None, _) => {
                for (k, v) in keys.clone().zip(values) {
                    self.write_key(k, v);
                }
            }
        }
        self.preloaded[keys].fill(true);
        Ok(true)
    }

    /// A CPU `Resident` that loads through an (unpinned) staging buffer, as on CUDA: tests run
    /// the staging path without a GPU.
    #[cfg(test)]
    fn staged_on_cpu(specs: &[TensorSpec]) -> Resident {
        let mut r = Resident::new(specs, TorchDevice::Cpu);
        r.staging = Some(Tensor::zeros(
            [r.flat.numel() as i64],
            (Kind::Float, TorchDevice::Cpu),
        ));
        r
    }

    /// The leaf tensors, in key order.
    pub(super) fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The flat gradient buffer and each key's `(offset, len)` in it.
    pub(super) fn flat_grads(&self) -> FlatGrads<'_> {
        FlatGrads {
            grads: &self.grads,
            spans: &self.spans,
        }
    }
}

/// The gradients of a [`Resident`]'s leaves as one flat tensor (on the model's device) and each
/// key's `(offset, len)` in it; valid until the next load clears them.
#[derive(Clone, Copy)]
pub(super) struct FlatGrads<'a> {
    /// Every key's gradient back to back, with the keys' alignment gaps (zero).
    pub(super) grads: &'a Tensor,
    /// Offset and length of each key.
    pub(super) spans: &'a [(usize, usize)],
}

impl FlatGrads<'_> {
    /// The elements that keys `keys` span (from the first key's offset to the end of the last
    /// key; empty for no key, or keys beyond the buffer's).
    pub(super) fn elements(&self, keys: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let spans = self.spans;
        match (
            spans.get(keys.start),
            keys.end.checked_sub(1).and_then(|l| spans.get(l)),
        ) {
            (Some(&(start, _)), Some(&(off, len))) if keys.start < keys.end => start..off + len,
            _ => 0..0,
        }
    }
}

/// The elements of a [`Resident`]'s host buffer: the staging buffer, or `flat` or the gradients
/// on the CPU.
///
/// # Safety
/// `t` must be a contiguous CPU f32 tensor that nothing else reads or writes through libtorch or
/// another slice while the returned one lives. Device copies queued from it may still read it:
/// the caller writes only spans that no copy in flight reads, or that are loaded again after
/// those copies (as `load` does).
#[allow(clippy::mut_from_ref)]
pub(super) unsafe fn host_mut(t: &Tensor) -> &mut [f32] {
    debug_assert!(t.device() == TorchDevice::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    // SAFETY: `t` is a contiguous CPU f32 tensor of `numel` elements, alive for the borrow, and
    // the caller holds no other view of it.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), t.numel()) }
}

/// `keys` (increasing) grouped into runs of consecutive keys.
fn runs(keys: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &k in keys {
        match out.last_mut() {
            Some(r) if r.end == k => r.end = k + 1,
            _ => out.push(k..k + 1),
        }
    }
    out
}

/// A zeroed gradient buffer of `total` elements to which each of `params`' gradients is bound
/// (the view of its span). Autograd adds a new gradient into an existing one in place, so once a
/// first backward pass has defined the gradients, pointing them at these views (`set_data`) makes
/// every later backward pass write there.
fn bind_grads(
    params: &[Tensor],
    spans: &[(usize, usize)],
    total: usize,
    dev: TorchDevice,
) -> Tensor {
    let grads = Tensor::zeros([total as i64], (Kind::Float, dev));
    if params.is_empty() {
        return grads;
    }
    let sum = params
        .iter()
        .map(|p| p.sum(Kind::Float))
        .reduce(|a, b| a + b)
        .expect("not empty");
    sum.backward();
    tch::no_grad(|| {
        for (p, &(off, len)) in params.iter().zip(spans) {
            let mut g = p.grad();
            g.set_data(
                &grads
                    .narrow(0, off as i64, len as i64)
                    .view(p.size().as_slice()),
            );
        }
        let _ = grads.shallow_clone().zero_();
    });
    grads
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One-dimensional keys of `lens` elements.
    fn vectors(lens: &[usize]) -> Vec<TensorSpec> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| TensorSpec {
                name: format!("k{i}"),
                shape: vec![n],
            })
            .collect()
    }

    /// Loading through the staging buffer (the CUDA path, split over threads) and loading
    /// directly give the same tensors, step after step; keys keep their alignment gaps at zero.
    #[test]
    fn staged_and_direct_loads_agree() {
        let lens = [3usize, 1_500_000, 17, 0, 700_001, 64];
        let specs = vectors(&lens);
        let mut direct = Resident::new(&specs, TorchDevice::Cpu);
        let mut staged = Resident::staged_on_cpu(&specs);
        for step in 0..3u32 {
            let params: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(k, &n)| {
                    (0..n)
                        .map(|i| (i as f32) * 0.5 + (k as f32) + step as f32)
                        .collect()
                })
                .collect();
            direct.load(&params).unwrap();
            staged.load(&params).unwrap();
            assert!(direct.flat.equal(&staged.flat), "step {step}");
            for (k, p) in params.iter().enumerate() {
                let got = Vec::<f32>::try_from(&staged.params()[k].flatten(0, -1)).unwrap();
                assert_eq!(&got, p, "step {step} key {k}");
            }
        }
        // The alignment gaps stay zero: the buffer's sum is the sum of the keys.
        let keys: f64 = (0..lens.len())
            .map(|k| staged.params()[k].sum(Kind::Double).double_value(&[]))
            .sum();
        let all = staged.flat.sum(Kind::Double).double_value(&[]);
        assert!((all - keys).abs() <= 1e-6 * all.abs(), "{all} vs {keys}");
    }

    /// A function of every parameter with distinct gradients per key.
    fn objective(p: &[Tensor]) -> Tensor {
        p.iter()
            .enumerate()
            .map(|(k, t)| ((t * t) * (k as f64 + 1.0) + t.sin()).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap()
    }

    /// After each step's backward pass every leaf's gradient is its span of the flat buffer, bit
    /// for bit what fresh leaves get, and nothing of the previous step is left in it.
    #[test]
    fn gradients_land_in_the_flat_buffer_bit_for_bit() {
        let shapes: [&[usize]; 4] = [&[3, 4], &[5], &[0], &[2, 3, 7]];
        let specs: Vec<TensorSpec> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| TensorSpec {
                name: format!("k{i}"),
                shape: s.to_vec(),
            })
            .collect();
        let mut r = Resident::new(&specs, TorchDevice::Cpu);
        for step in 0..3u32 {
            let params: Vec<Vec<f32>> = specs
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    (0..s.len())
                        .map(|i| ((i + k) as f32 * 0.37 + step as f32).cos())
                        .collect()
                })
                .collect();
            r.load(&params).unwrap();
            objective(r.params()).backward();
            let fresh: Vec<Tensor> = specs
                .iter()
                .zip(&params)
                .map(|(s, p)| {
                    let shape: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
                    Tensor::from_slice(p)
                        .view(shape.as_slice())
                        .set_requires_grad(true)
                })
                .collect();
            objective(&fresh).backward();
            let flat = r.flat_grads();
            let host = Vec::<f32>::try_from(flat.grads).unwrap();
            for (k, f) in fresh.iter().enumerate() {
                let want = Vec::<f32>::try_from(&f.grad().flatten(0, -1)).unwrap();
                let got = &host[flat.elements(k..k + 1)];
                let same = want.len() == got.len()
                    && want
                        .iter()
                        .zip(got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "step {step} key {k}");
                assert!(r.params()[k].grad().equal(&f.grad()), "step {step} key {k}");
            }
        }
        let flat = r.flat_grads();
        assert_eq!(flat.elements(0..4), 0..flat.spans[3].0 + 42);
        assert_eq!(flat.elements(1..2), 16..21);
        assert_eq!(flat.elements(2..2), 0..0);
    }

    /// A preloaded key given the same values is skipped; one given other values (one bit of its
    /// last element), and every key not preloaded, is loaded; a load clears the marks.
    #[test]
    fn only_preloaded_keys_with_the_same_values_are_skipped() {
        // The last key is compared in several pieces.
        let specs = vectors(&[5, 40, 2 * super::super::split::PIECE + 3]);
        let mut r = Resident::new(&specs, TorchDevice::Cpu);
        let p: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.25; s.len()]).collect();
        r.load(&p).unwrap();
        assert_eq!(r.stale_keys(&p), [true, true, true]);
        let next: Vec<Vec<f32>> = specs.iter().map(|s| vec![-1.5; s.len()]).collect();
        assert!(r.preload(1, &[&next[1], &next[2]], None, true).unwrap());
        let mut given = next.clone();
        assert_eq!(r.stale_keys(&given), [true, false, false]);
        let last = given[2].len() - 1;
        given[2][last] = f32::from_bits(given[2][last].to_bits() ^ 1);
        assert_eq!(r.stale_keys(&given), [true, false, true]);
        r.load(&given).unwrap();
        assert_eq!(r.stale_keys(&given), [true, true, true]);
        let got = Vec::<f32>::try_from(&r.flat).unwrap();
        assert_eq!(&got[r.elements(2..3)], given[2].as_slice());
    }
}
