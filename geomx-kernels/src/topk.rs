//! Top-k selection on |x| (`specs/compression.md`, "Selection").
//!
//! Order: |x| descending under the total order of `f32::total_cmp` on the absolute value (NaN
//! above +inf; every NaN payload is its own rank, larger payloads first), ties by ascending index.
//! Zeros (±0.0) are never selected. Internally |x| is the integer key `bits & 0x7FFF_FFFF`, whose
//! integer order is exactly that total order.
//!
//! - [`topk_exact`]: the first k non-zero entries in that order; no sort. Large tensors first try
//!   a sampled prefilter (a lower bound on the k-th key from a fixed-seed sample, one vectorised
//!   scan, exact selection within the candidates — the sample only affects speed); otherwise, or
//!   when the candidates do not cover k, a three-level radix select (11 + 11 + 9 key bits) and
//!   one emitting scan.
//! - [`topk_sampled`]: DGC's sampled threshold with the spec's tolerance band, exact
//!   re-selection when too many pass and an exact fallback (reported) when too few.
//!
//! Outputs are index lists in ascending order.

use crate::dense::abs_key;
use crate::error::{check_u32_len, KernelError};
use crate::rng::SampleRng;

/// Parameters of sampled selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledParams {
    /// Sample fraction f (default 0.01).
    pub sample_fraction: f64,
    /// Minimum expected sampled hits h (default 20): s = min(N, max(⌈f·N⌉, ⌈h/ρ⌉)).
    pub min_hits: u32,
    /// Tolerance τ (default 0.2): counts within (1 ± τ)·k are accepted as they are.
    ///
    /// τ = 0 is the exact-count mode: the selection returns exactly k entries (or all non-zeros
    /// when fewer exist). In that mode the sample rank is raised by three binomial standard
    /// deviations, r = ⌈ρs + 3·√(ρs)⌉, so that the candidate set almost always holds at least k
    /// entries and is cut down to exactly k by exact selection within it (a cheap refinement
    /// instead of a full exact fallback).
    pub tolerance: f64,
}

impl Default for SampledParams {
    fn default() -> Self {
        SampledParams {
            sample_fraction: 0.01,
            min_hits: 20,
            tolerance: 0.2,
        }
    }
}

impl SampledParams {
    /// Checks ranges: 0 < f ≤ 1, h ≥ 1, 0 ≤ τ < 1.
    pub fn validate(&self) -> Result<(), KernelError> {
        if !(self.sample_fraction > 0.0 && self.sample_fraction <= 1.0) {
            return Err(KernelError::InvalidConfig(format!(
                "sample fraction {} not in (0, 1]",
                self.sample_fraction
            )));
        }
        if self.min_hits == 0 {
            return Err(KernelError::InvalidConfig(
                "min sampled hits must be ≥ 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return Err(KernelError::InvalidConfig(format!(
                "tolerance {} not in [0, 1)",
                self.tolerance
            )));
        }
        Ok(())
    }
}

/// Selection mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// Exact top-k.
    Exact,
    /// DGC sampled threshold.
    Sampled(SampledParams),
}

impl Default for Selection {
    fn default() -> Self {
        Selection::Sampled(SampledParams::default())
    }
}

/// How a selection was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SelectPath {
    /// Exact selection (asked for, or the sample would cover half the tensor or more).
    Exact,
    /// The sampled threshold's candidate set was within the tolerance band and was sent as is.
    Accepted,
    /// Too many candidates: exact top-k within the candidate set.
    Refined,
    /// Too few candidates: exact top-k over the whole tensor (count these in a metric).
    Fallback,
}

/// Result of a selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectOutcome {
    /// The target count k.
    pub k: usize,
    /// Number of indices selected.
    pub count: usize,
    /// How the selection was made.
    pub path: SelectPath,
}

/// Reusable buffers for selection (avoids allocating per call).
#[derive(Debug, Default, Clone)]
pub struct TopkScratch {
    keys: Vec<u32>,
    hist: Vec<u32>,
}

/// k = max(1, ⌈ρ·N⌉) capped at N (0 for an empty tensor), computed in f64.
pub fn k_for_density(density: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((density * n as f64).ceil() as usize).clamp(1, n)
}

/// Sample size s = min(N, max(⌈f·N⌉, ⌈h/ρ⌉)).
pub fn sample_size(params: &SampledParams, density: f64, n: usize) -> usize {
    let by_fraction = (params.sample_fraction * n as f64).ceil();
    let by_hits = (f64::from(params.min_hits) / density).ceil();
    let s = by_fraction.max(by_hits);
    if s >= n as f64 {
        n
    } else {
        s as usize
    }
}

/// Exact top-k: writes into `out` the indices of the first `k` non-zero entries in (|v| desc,
/// index asc) order, ascending; all non-zero indices when fewer than `k` exist.
pub fn topk_exact(
    v: &[f32],
    k: usize,
    scratch: &mut TopkScratch,
    out: &mut Vec<u32>,
) -> Result<usize, KernelError> {
    check_u32_len(v.len())?;
    out.clear();
    if k == 0 || v.is_empty() {
        return Ok(0);
    }
    if prefiltered_exact(v, k, scratch, out) {
        return Ok(out.len());
    }
    radix_exact(v, k, scratch, out);
    Ok(out.len())
}

/// Smallest tensor for which [`topk_exact`] first tries a sampled prefilter.
const PREFILTER_MIN_N: usize = 1 << 16;
/// Sample size of the prefilter.
const PREFILTER_SAMPLE: usize = 4096;

/// Exact top-k through a sampled lower bound: a fixed-seed sample gives a threshold t expected
/// to lie a little below the k-th largest key; one vectorised scan collects C = {i : key ≥ t}.
/// If |C| ≥ k, every one of the k largest entries (ties included) has key ≥ t and lies in C, so
/// exact selection within C is the exact answer. Returns `false` (and leaves the work to the
/// radix path) when the prefilter does not apply or C is too small. The sample only affects
/// speed, never the result.
fn prefiltered_exact(v: &[f32], k: usize, scratch: &mut TopkScratch, out: &mut Vec<u32>) -> bool {
    let n = v.len();
    if n < PREFILTER_MIN_N || k.saturating_mul(16) > n {
        return false;
    }
    let mut rng = SampleRng::new(0x746F_706B ^ n as u64);
    scratch.keys.clear();
    scratch
        .keys
        .extend((0..PREFILTER_SAMPLE).map(|_| abs_key(v[rng.below(n as u64) as usize])));
    let expected = k as f64 * PREFILTER_SAMPLE as f64 / n as f64;
    let rank = ((expected + 3.0 * expected.sqrt()).ceil() as usize + 1).clamp(1, PREFILTER_SAMPLE);
    let (_, &mut t, _) = scratch.keys.select_nth_unstable(PREFILTER_SAMPLE - rank);
    let t = t.max(1);
    // Give up early (radix path) if the threshold admits far more than needed (e.g. many ties).
    let cap = n / 4;
    let mut overflow = false;
    scan_ge(v, t, |i, _| {
        if out.len() < cap {
            out.push(i as u32);
        } else {
            overflow = true;
        }
    });
    if overflow || out.len() < k {
        out.clear();
        return false;
    }
    refine_within(v, k, scratch, out);
    true
}

/// Exact top-k by three-level radix select over the whole tensor, then one emitting scan.
fn radix_exact(v: &[f32], k: usize, scratch: &mut TopkScratch, out: &mut Vec<u32>) {
    match kth_key(&SliceKeys(v), k, scratch) {
        None => scan_ge(v, 1, |i, _| out.push(i as u32)),
        Some((t, greater)) => {
            let mut ties = k - greater;
            out.reserve(k);
            scan_ge(v, t, |i, key| {
                if key > t {
                    out.push(i as u32);
                } else if ties > 0 {
                    out.push(i as u32);
                    ties -= 1;
                }
            });
        }
    }
}

/// Sampled top-k with density ρ (k = [`k_for_density`]) and the sample drawn from `seed`
/// (use [`crate::rng::selection_seed`]). Writes ascending indices into `out`.
///
/// Guarantees: no zero is selected; every selected |v| is ≥ every unselected |v|; the count is
/// within (1 ± τ)·k unless the outcome is [`SelectPath::Fallback`] (then exactly the exact top-k).
pub fn topk_sampled(
    v: &[f32],
    density: f64,
    params: &SampledParams,
    seed: u64,
    scratch: &mut TopkScratch,
    out: &mut Vec<u32>,
) -> Result<SelectOutcome, KernelError> {
    params.validate()?;
    if !(density > 0.0 && density <= 1.0) {
        return Err(KernelError::InvalidConfig(format!(
            "density {density} not in (0, 1]"
        )));
    }
    let n = v.len();
    check_u32_len(n)?;
    let k = k_for_density(density, n);
    let s = sample_size(params, density, n);
    if 2 * s >= n {
        let count = topk_exact(v, k, scratch, out)?;
        return Ok(SelectOutcome {
            k,
            count,
            path: SelectPath::Exact,
        });
    }
    // Threshold: the ⌈ρ·s⌉-th largest key of s positions drawn with replacement.
    let mut rng = SampleRng::new(seed);
    scratch.keys.clear();
    scratch
        .keys
        .extend((0..s).map(|_| abs_key(v[rng.below(n as u64) as usize])));
    let expected_hits = density * s as f64;
    let rank = if params.tolerance == 0.0 {
        expected_hits + 3.0 * expected_hits.sqrt()
    } else {
        expected_hits
    };
    let rank = (rank.ceil() as usize).clamp(1, s);
    let (_, &mut t, _) = scratch.keys.select_nth_unstable(s - rank);
    let t = t.max(1);

    out.clear();
    scan_ge(v, t, |i, _| out.push(i as u32));
    let c = out.len() as f64;
    let kf = k as f64;
    let path = if c > (1.0 + params.tolerance) * kf {
        refine_within(v, k, scratch, out);
        SelectPath::Refined
    } else if c < (1.0 - params.tolerance) * kf {
        topk_exact(v, k, scratch, out)?;
        SelectPath::Fallback
    } else {
        SelectPath::Accepted
    };
    Ok(SelectOutcome {
        k,
        count: out.len(),
        path,
    })
}

/// Keeps in `sel` (ascending indices into `v`, all non-zero) only its exact top-k.
fn refine_within(v: &[f32], k: usize, scratch: &mut TopkScratch, sel: &mut Vec<u32>) {
    let mut keys = std::mem::take(&mut scratch.keys);
    keys.clear();
    keys.extend(sel.iter().map(|&i| abs_key(v[i as usize])));
    if let Some((t, greater)) = kth_key(&KeyList(&keys), k, scratch) {
        let mut ties = k - greater;
        let mut w = 0;
        for r in 0..sel.len() {
            let key = keys[r];
            let keep = if key > t {
                true
            } else if key == t && ties > 0 {
                ties -= 1;
                true
            } else {
                false
            };
            if keep {
                sel[w] = sel[r];
                w += 1;
            }
        }
        sel.truncate(w);
    }
    scratch.keys = keys;
}

/// A source of magnitude keys.
trait Keys {
    fn len(&self) -> usize;
    fn key(&self, i: usize) -> u32;
    /// Appends every key in `[lo, hi_excl)` (`lo ≥ 1`) to `out`.
    fn collect_range(&self, lo: u32, hi_excl: u64, out: &mut Vec<u32>) {
        for i in 0..self.len() {
            let key = self.key(i);
            if key >= lo && u64::from(key) < hi_excl {
                out.push(key);
            }
        }
    }
}

struct SliceKeys<'a>(&'a [f32]);
impl Keys for SliceKeys<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn key(&self, i: usize) -> u32 {
        abs_key(self.0[i])
    }
    fn collect_range(&self, lo: u32, hi_excl: u64, out: &mut Vec<u32>) {
        scan_ge(self.0, lo, |_, key| {
            if u64::from(key) < hi_excl {
                out.push(key);
            }
        });
    }
}

struct KeyList<'a>(&'a [u32]);
impl Keys for KeyList<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn key(&self, i: usize) -> u32 {
        self.0[i]
    }
}

const L1_BITS: u32 = 11;
const L1_SHIFT: u32 = 20;
const L2_BITS: u32 = 11;
const L2_SHIFT: u32 = 9;
const L3_BITS: u32 = 9;

/// Walks a histogram from the top; returns (bin, count strictly above the bin) for the bin that
/// holds the `k`-th largest element.
fn walk(hist: &[u32], k: usize) -> (usize, usize) {
    let mut above = 0usize;
    for b in (0..hist.len()).rev() {
        let h = hist[b] as usize;
        if above + h >= k {
            return (b, above);
        }
        above += h;
    }
    unreachable!("walk called with k above the histogram total")
}

/// The k-th largest non-zero key t and the number of non-zero keys strictly greater than t, or
/// `None` when there are at most k non-zero keys.
fn kth_key<K: Keys>(src: &K, k: usize, scratch: &mut TopkScratch) -> Option<(u32, usize)> {
    let n = src.len();
    // Level 1: top 11 key bits, four interleaved histograms to break store-to-load chains.
    let bins1 = 1usize << L1_BITS;
    scratch.hist.clear();
    scratch.hist.resize(4 * bins1, 0);
    let mut zeros = 0usize;
    {
        let (h0, rest) = scratch.hist.split_at_mut(bins1);
        let (h1, rest) = rest.split_at_mut(bins1);
        let (h2, h3) = rest.split_at_mut(bins1);
        let body = n - n % 4;
        let mut i = 0;
        while i < body {
            let (a, b, c, d) = (src.key(i), src.key(i + 1), src.key(i + 2), src.key(i + 3));
            zeros += (a == 0) as usize + (b == 0) as usize + (c == 0) as usize + (d == 0) as usize;
            h0[(a >> L1_SHIFT) as usize] += 1;
            h1[(b >> L1_SHIFT) as usize] += 1;
            h2[(c >> L1_SHIFT) as usize] += 1;
            h3[(d >> L1_SHIFT) as usize] += 1;
            i += 4;
        }
        for j in body..n {
            let a = src.key(j);
            zeros += (a == 0) as usize;
            h0[(a >> L1_SHIFT) as usize] += 1;
        }
        for b in 0..bins1 {
            h0[b] += h1[b] + h2[b] + h3[b];
        }
        h0[0] -= zeros as u32;
    }
    if n - zeros <= k {
        return None;
    }
    let (b1, above1) = walk(&scratch.hist[..bins1], k);
    let k2 = k - above1;

    // Level 2: keys of bin b1 (non-zero), next 11 bits.
    let lo = (b1 as u32) << L1_SHIFT;
    let hi_excl = u64::from(lo) + (1u64 << L1_SHIFT);
    let mut cand = std::mem::take(&mut scratch.keys);
    cand.clear();
    src.collect_range(lo.max(1), hi_excl, &mut cand);
    let bins2 = 1usize << L2_BITS;
    scratch.hist.clear();
    scratch.hist.resize(bins2, 0);
    for &key in &cand {
        scratch.hist[((key >> L2_SHIFT) as usize) & (bins2 - 1)] += 1;
    }
    let (b2, above2) = walk(&scratch.hist, k2);
    let k3 = k2 - above2;

    // Level 3: the last 9 bits within (b1, b2).
    let bins3 = 1usize << L3_BITS;
    scratch.hist.clear();
    scratch.hist.resize(bins3, 0);
    for &key in &cand {
        if ((key >> L2_SHIFT) as usize) & (bins2 - 1) == b2 {
            scratch.hist[(key as usize) & (bins3 - 1)] += 1;
        }
    }
    let (b3, above3) = walk(&scratch.hist, k3);
    scratch.keys = cand;
    let t = lo | ((b2 as u32) << L2_SHIFT) | b3 as u32;
    Some((t, above1 + above2 + above3))
}

/// Calls `f(i, key)` in ascending i for every element with key ≥ `t` (`t ≥ 1`).
#[inline]
pub(crate) fn scan_ge<F: FnMut(usize, u32)>(v: &[f32], t: u32, mut f: F) {
    debug_assert!(t >= 1);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 available (checked above).
            unsafe { x86::scan_ge_avx2(v, t, &mut f) };
            return;
        }
    }
    scan_ge_portable(v, t, 0, &mut f);
}

/// Portable scan over `v` (whose first element has index `base`).
fn scan_ge_portable<F: FnMut(usize, u32)>(v: &[f32], t: u32, base: usize, f: &mut F) {
    for (j, &x) in v.iter().enumerate() {
        let key = abs_key(x);
        if key >= t {
            f(base + j, key);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::scan_ge_portable;
    use crate::dense::abs_key;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scan_ge_avx2<F: FnMut(usize, u32)>(v: &[f32], t: u32, f: &mut F) {
        let n = v.len();
        let p = v.as_ptr();
        let abs = _mm256_set1_epi32(0x7FFF_FFFF);
        // key ≥ t  ⇔  key > t − 1 (t ≥ 1, keys < 2^31 so signed compares are exact).
        let vt = _mm256_set1_epi32(t as i32 - 1);
        let body = n - n % 32;
        let mut i = 0;
        while i < body {
            let mut m = 0u32;
            for q in 0..4 {
                // SAFETY: i + 32 <= n.
                let x = unsafe { _mm256_loadu_si256(p.add(i + 8 * q).cast()) };
                let gt = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs), vt);
                m |= (_mm256_movemask_ps(_mm256_castsi256_ps(gt)) as u32) << (8 * q);
            }
            while m != 0 {
                let j = i + m.trailing_zeros() as usize;
                f(j, abs_key(v[j]));
                m &= m - 1;
            }
            i += 32;
        }
        scan_ge_portable(&v[body..], t, body, f);
    }
}

/// Test hook: the portable scan path.
#[cfg(test)]
pub(crate) fn scan_ge_portable_for_tests(v: &[f32], t: u32) -> Vec<u32> {
    let mut out = Vec::new();
    scan_ge_portable(v, t, 0, &mut |i, _| out.push(i as u32));
    out
}

#[cfg(test)]
#[path = "topk_tests.rs"]
mod tests;
