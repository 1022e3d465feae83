//! Upper-tier aggregation at a global server (hips.md FSA step 4), without IO.
//!
//! A [`GlobalAggregator`] owns some ranges of θ. For each it buffers the D local servers' pushes of
//! round r; when all are in it checks Σ count = W, forms G = s_1 + … + s_D in DC order,
//! ḡ = G / W (a division), applies the optimizer element-wise and bumps the range version to r+1.

use std::collections::BTreeMap;

use geomx_kernels::{Scaling, SparseVec, ValueType};

use super::AggError;

/// An optimizer step over one range: θ ← opt(θ, ḡ). Implementations keep their own state
/// (moments) for the range they were built for.
pub trait RangeOptimizer: Send {
    /// Updates `params` in place with the mean gradient `mean_grad` (same length).
    fn step(&mut self, params: &mut [f32], mean_grad: &[f32]);
}

impl<F: FnMut(&mut [f32], &[f32]) + Send> RangeOptimizer for F {
    fn step(&mut self, params: &mut [f32], mean_grad: &[f32]) {
        self(params, mean_grad)
    }
}

/// State of one owned range.
struct RangeState {
    params: Vec<f32>,
    version: u64,
    opt: Box<dyn RangeOptimizer>,
    pushes: Vec<Option<(Vec<f32>, u32)>>,
    received: usize,
    /// Bi-Sparse pull: the reply carries G's non-zero entries in this value type.
    sparse_reply: Option<(ValueType, Scaling)>,
}

/// A completed round of one range.
#[derive(Debug)]
pub struct RoundDone<'a> {
    /// θ_{r+1} of the range.
    pub theta: &'a [f32],
    /// For Bi-Sparse ranges: the encoded sparse payload of the global sum G (non-zero entries,
    /// ascending). The optimizer stepped with exactly what this payload decodes to, so replicas
    /// applying it reproduce θ bit for bit.
    pub sparse_sum: Option<Vec<u8>>,
}

/// Collects the DCs' pushes for the ranges one global server owns and applies the optimizer.
pub struct GlobalAggregator {
    n_dcs: usize,
    total_workers: u32,
    ranges: BTreeMap<usize, RangeState>,
}

impl GlobalAggregator {
    /// An aggregator for `n_dcs` DCs with `total_workers` (W) workers in all.
    pub fn new(n_dcs: usize, total_workers: u32) -> Self {
        Self {
            n_dcs,
            total_workers,
            ranges: BTreeMap::new(),
        }
    }

    /// Takes ownership of range `id` with initial values `params` at version `version`.
    pub fn add_range(
        &mut self,
        id: usize,
        params: Vec<f32>,
        version: u64,
        opt: Box<dyn RangeOptimizer>,
    ) {
        self.ranges.insert(
            id,
            RangeState {
                params,
                version,
                opt,
                pushes: vec![None; self.n_dcs],
                received: 0,
                sparse_reply: None,
            },
        );
    }

    /// Makes range `id` answer with the sparse global sum in `value_type` (Bi-Sparse pull).
    pub fn set_sparse_reply(&mut self, id: usize, value_type: ValueType, scaling: Scaling) {
        if let Some(r) = self.ranges.get_mut(&id) {
            r.sparse_reply = Some((value_type, scaling));
        }
    }

    /// Ids of the owned ranges, ascending.
    pub fn range_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranges.keys().copied()
    }

    /// Current version and values of range `id`.
    pub fn get(&self, id: usize) -> Option<(u64, &[f32])> {
        self.ranges
            .get(&id)
            .map(|r| (r.version, r.params.as_slice()))
    }

    /// Values of range `id` if its version is at least `min_version` (a `Pull`).
    pub fn pull(&self, id: usize, min_version: u64) -> Result<Option<&[f32]>, AggError> {
        let r = self.ranges.get(&id).ok_or(AggError::UnknownKey(id))?;
        Ok((r.version >= min_version).then_some(r.params.as_slice()))
    }

    /// Records DC `dc`'s push of its sum `sum` over `count` workers for `(id, round)`. When this
    /// was the last missing DC, applies the optimizer and returns the new values θ_{round+1}.
    pub fn push(
        &mut self,
        id: usize,
        dc: usize,
        round: u64,
        sum: Vec<f32>,
        count: u32,
    ) -> Result<Option<&[f32]>, AggError> {
        Ok(self.push_round(id, dc, round, sum, count)?.map(|d| d.theta))
    }

    /// [`GlobalAggregator::push`], also returning the sparse sum of Bi-Sparse ranges.
    pub fn push_round(
        &mut self,
        id: usize,
        dc: usize,
        round: u64,
        sum: Vec<f32>,
        count: u32,
    ) -> Result<Option<RoundDone<'_>>, AggError> {
        let n_dcs = self.n_dcs;
        let w = self.total_workers;
        let r = self.ranges.get_mut(&id).ok_or(AggError::UnknownKey(id))?;
        if round != r.version {
            return Err(AggError::WrongVersion {
                key: id,
                expected: r.version,
                got: round,
            });
        }
        if sum.len() != r.params.len() {
            return Err(AggError::LengthMismatch {
                key: id,
                expected: r.params.len(),
                got: sum.len(),
            });
        }
        let cell = r.pushes.get_mut(dc).ok_or(AggError::BadSender {
            sender: dc,
            n: n_dcs,
        })?;
        if cell.is_some() {
            return Err(AggError::Duplicate {
                key: id,
                round,
                sender: dc,
            });
        }
        *cell = Some((sum, count));
        r.received += 1;
        if r.received < n_dcs {
            return Ok(None);
        }
        let mut counted = 0u64;
        let mut it = r.pushes.iter_mut().map(|p| p.take().unwrap_or_default());
        let (mut g, c0) = it.next().unwrap_or_default();
        counted += u64::from(c0);
        for (s, c) in it {
            counted += u64::from(c);
            for (a, x) in g.iter_mut().zip(&s) {
                *a += *x;
            }
        }
        r.received = 0;
        if counted != u64::from(w) {
            return Err(AggError::CountMismatch {
                key: id,
                got: counted,
                expected: w,
            });
        }
        let sparse_sum = match r.sparse_reply {
            Some((vt, scaling)) => Some(quantize_sparse(&mut g, vt, scaling, id)?),
            None => None,
        };
        let wf = w as f32;
        for a in g.iter_mut() {
            *a /= wf;
        }
        r.opt.step(&mut r.params, &g);
        r.version += 1;
        Ok(Some(RoundDone {
            theta: r.params.as_slice(),
            sparse_sum,
        }))
    }
}

/// Encodes the non-zero entries of `g` with values of `vt` and replaces `g` with exactly what the
/// payload decodes to (the same values every receiver will see).
fn quantize_sparse(
    g: &mut [f32],
    vt: ValueType,
    scaling: Scaling,
    id: usize,
) -> Result<Vec<u8>, AggError> {
    let n = g.len();
    let bad = |got| AggError::LengthMismatch {
        key: id,
        expected: n,
        got,
    };
    let sparse = SparseVec::from_dense_nonzero(g).map_err(|_| bad(n))?;
    let mut bytes = Vec::new();
    sparse.encode(vt, scaling, &mut bytes);
    // Also for f32: ±0 entries become the +0 a receiver reconstructs.
    let back = SparseVec::decode(&bytes, id as u64, n).map_err(|_| bad(n))?;
    g.fill(0.0);
    back.scatter_add_into(g).map_err(|_| bad(n))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hips::LocalAggregator;

    fn sgd(lr: f32) -> Box<dyn RangeOptimizer> {
        Box::new(move |p: &mut [f32], g: &[f32]| {
            for (p, g) in p.iter_mut().zip(g) {
                *p -= lr * *g;
            }
        })
    }

    /// Deterministic "awkward" f32 values (not exactly representable sums).
    fn vals(seed: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x =
                    (seed.wrapping_mul(2_654_435_761) ^ (i as u32).wrapping_mul(40_503)) % 10_007;
                (x as f32 - 5003.0) / 977.0 + 1.0e-3 * seed as f32
            })
            .collect()
    }

    /// hips.md oracle 1 through both tiers: 2 DCs × 2 workers, plain SGD with lr 1.
    #[test]
    fn oracle1_mean_of_four_workers_bit_exact() {
        let n = 33;
        let theta0 = vals(99, n);
        let g: Vec<Vec<f32>> = (0..4).map(|i| vals(i + 1, n)).collect();
        let mut locals = [
            LocalAggregator::new(&[n], 2, 0),
            LocalAggregator::new(&[n], 2, 0),
        ];
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(0, theta0.clone(), 0, sgd(1.0));
        // Arrival orders differ from rank order on purpose.
        assert!(locals[0].push(0, 0, 1, g[1].clone()).unwrap().is_none());
        let s1 = locals[0].push(0, 0, 0, g[0].clone()).unwrap().unwrap();
        assert!(locals[1].push(0, 0, 1, g[3].clone()).unwrap().is_none());
        let s2 = locals[1].push(0, 0, 0, g[2].clone()).unwrap().unwrap();
        // DC 2 arrives first.
        assert!(global.push(0, 1, 0, s2, 2).unwrap().is_none());
        let theta1 = global.push(0, 0, 0, s1, 2).unwrap().unwrap().to_vec();
        for i in 0..n {
            let expect = theta0[i] - ((g[0][i] + g[1][i]) + (g[2][i] + g[3][i])) / 4.0;
            assert_eq!(theta1[i].to_bits(), expect.to_bits(), "element {i}");
        }
        assert_eq!(global.get(0).unwrap().0, 1);
    }

    /// Oracle 1, second part: 3 workers in one DC and 1 in the other still weigh 1/4 each.
    #[test]
    fn oracle1_uneven_dcs_weigh_every_worker_equally() {
        let n = 17;
        let theta0 = vals(7, n);
        let g: Vec<Vec<f32>> = (0..4).map(|i| vals(i + 11, n)).collect();
        let mut dc0 = LocalAggregator::new(&[n], 3, 0);
        let mut dc1 = LocalAggregator::new(&[n], 1, 0);
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(0, theta0.clone(), 0, sgd(1.0));
        dc0.push(0, 0, 2, g[2].clone()).unwrap();
        dc0.push(0, 0, 0, g[0].clone()).unwrap();
        let s0 = dc0.push(0, 0, 1, g[1].clone()).unwrap().unwrap();
        let s1 = dc1.push(0, 0, 0, g[3].clone()).unwrap().unwrap();
        global.push(0, 0, 0, s0, 3).unwrap();
        let theta1 = global.push(0, 1, 0, s1, 1).unwrap().unwrap();
        for i in 0..n {
            let expect = theta0[i] - (((g[0][i] + g[1][i]) + g[2][i]) + g[3][i]) / 4.0;
            assert_eq!(theta1[i].to_bits(), expect.to_bits(), "element {i}");
        }
    }

    /// Oracle 2 (SGD part): fixed pushes that are multiples of 2^-8, lr and W powers of two, so the
    /// closed form θ_R = θ_0 − R·lr·(Σ g)/W is exact.
    #[test]
    fn oracle2_known_rounds_closed_form() {
        let n = 8;
        let theta0: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let g: Vec<Vec<f32>> = (0..4)
            .map(|w| {
                (0..n)
                    .map(|i| ((w * 37 + i * 11) % 64) as f32 / 256.0)
                    .collect()
            })
            .collect();
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(0, theta0.clone(), 0, sgd(0.5));
        let rounds = 20u64;
        for r in 0..rounds {
            let s0: Vec<f32> = (0..n).map(|i| g[0][i] + g[1][i]).collect();
            let s1: Vec<f32> = (0..n).map(|i| g[2][i] + g[3][i]).collect();
            global.push(0, 0, r, s0, 2).unwrap();
            global.push(0, 1, r, s1, 2).unwrap().unwrap();
        }
        let (v, theta) = global.get(0).unwrap();
        assert_eq!(v, rounds);
        for i in 0..n {
            let sum: f32 = (0..4).map(|w| g[w][i]).sum();
            let expect = theta0[i] - rounds as f32 * 0.5 * sum / 4.0;
            assert_eq!(theta[i], expect, "element {i}");
        }
    }

    #[test]
    fn rejects_wrong_version_count_and_duplicates() {
        let mut global = GlobalAggregator::new(2, 4);
        global.add_range(3, vec![0.0; 2], 0, sgd(1.0));
        assert!(matches!(
            global.push(3, 0, 1, vec![0.0; 2], 2),
            Err(AggError::WrongVersion { .. })
        ));
        assert!(matches!(
            global.push(4, 0, 0, vec![0.0; 2], 2),
            Err(AggError::UnknownKey(4))
        ));
        assert!(matches!(
            global.push(3, 2, 0, vec![0.0; 2], 2),
            Err(AggError::BadSender { .. })
        ));
        global.push(3, 0, 0, vec![0.0; 2], 2).unwrap();
        assert!(matches!(
            global.push(3, 0, 0, vec![0.0; 2], 2),
            Err(AggError::Duplicate { .. })
        ));
        assert_eq!(
            global.push(3, 1, 0, vec![0.0; 2], 1).err(),
            Some(AggError::CountMismatch {
                key: 3,
                got: 3,
                expected: 4
            })
        );
    }

    #[test]
    fn pull_waits_for_version() {
        let mut global = GlobalAggregator::new(1, 1);
        global.add_range(0, vec![1.0], 0, sgd(1.0));
        assert_eq!(global.pull(0, 0).unwrap(), Some(&[1.0f32][..]));
        assert_eq!(global.pull(0, 1).unwrap(), None);
        global.push(0, 0, 0, vec![0.5], 1).unwrap();
        assert_eq!(global.pull(0, 1).unwrap(), Some(&[0.5f32][..]));
        assert_eq!(global.range_ids().collect::<Vec<_>>(), vec![0]);
    }
}
