//! HFA (sync.md "HFA") pieces without IO: the outer step of the global tier and the weights the
//! local servers give their DC's delta.
//!
//! Workers push their models every `k1` steps; a local server averages them (w̄_d = Σ_i w_i / n_d:
//! shards are equal, so data weighting is 1/n_d) and every `k2` averagings pushes
//! s_d = f_d·(w̄_d − m) with `count` n_d. The global aggregator divides Σ_d s_d by W, so with
//! f_d = n_d (`data`) the mean is Σ_d (N_d/N)·Δ_d and with f_d = W/D (`equal`) it is Σ_d Δ_d / D.
//! [`OuterStep`] then forms the increment δ: Δ (`average`) or DiLoCo's Nesterov step. The reply is
//! δ, quantized through both tiers' codecs; every copy of the milestone (the global server's, the
//! local servers', the workers') adds the same quantized δ, so all copies agree bit for bit.

use geomx_kernels::optim::{apply_increment, DilocoOuter};

use super::RangeOptimizer;
use crate::config::{HfaConfig, HfaWeighting, OuterOptimizer};

/// The outer step of one range at the global server.
#[derive(Debug, Clone)]
pub struct OuterStep {
    nesterov: Option<DilocoOuter>,
    inc: Vec<f32>,
}

impl OuterStep {
    /// The outer step `cfg` names for a range of `len` elements.
    pub fn new(cfg: &HfaConfig, len: usize) -> Result<Self, String> {
        let nesterov = match cfg.outer {
            OuterOptimizer::Average => None,
            OuterOptimizer::Nesterov => Some(
                DilocoOuter::new(len, cfg.outer_momentum, cfg.outer_lr)
                    .map_err(|e| e.to_string())?,
            ),
        };
        Ok(Self {
            nesterov,
            inc: vec![0.0; len],
        })
    }

    /// Restores the state [`RangeOptimizer::export_state`] gave: the Nesterov velocity (one
    /// tensor), or nothing for plain averaging.
    pub fn import_state(&mut self, state: crate::engine::OptimState) -> Result<(), String> {
        let mut t = state.tensors;
        match (self.nesterov.as_mut(), t.len()) {
            (None, 0) => Ok(()),
            (Some(o), 1) => o.set_velocity(t.remove(0)).map_err(|e| e.to_string()),
            (_, n) => Err(format!("outer step state of {n} tensors")),
        }
    }
}

impl RangeOptimizer for OuterStep {
    /// `m` is the milestone, `delta` the weighted mean model delta Δ: m ← m + δ.
    fn step(&mut self, m: &mut [f32], delta: &[f32]) {
        let mut inc = std::mem::take(&mut self.inc);
        self.increment(m, delta, &mut inc);
        if let Err(e) = apply_increment(m, &inc) {
            // Lengths are checked by the aggregator before it calls the optimizer.
            tracing::error!(error = %e, "outer step rejected");
        }
        self.inc = inc;
    }

    /// δ itself: Δ for `average`, DiLoCo's Nesterov increment otherwise (no subtraction).
    fn increment(&mut self, _m: &[f32], delta: &[f32], out: &mut [f32]) {
        let res = match self.nesterov.as_mut() {
            None => {
                out.copy_from_slice(delta);
                Ok(())
            }
            Some(o) => o.increment(delta, out),
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "outer step rejected");
        }
    }

    fn save(&self) -> super::global_agg::SavedState {
        Box::new(self.nesterov.clone())
    }

    fn restore(&mut self, saved: super::global_agg::SavedState) {
        if let Ok(n) = saved.downcast::<Option<DilocoOuter>>() {
            self.nesterov = *n;
        }
    }

    fn export_state(&self) -> Option<crate::engine::OptimState> {
        Some(crate::engine::OptimState {
            tensors: self
                .nesterov
                .iter()
                .map(|o| o.velocity().to_vec())
                .collect(),
            ..Default::default()
        })
    }
}

/// The factor f_d a local server of a DC with `n_d` workers gives its delta (see the module docs)
/// in a job of `total_workers` workers in `n_dcs` DCs.
pub fn delta_factor(
    weighting: HfaWeighting,
    n_d: usize,
    total_workers: usize,
    n_dcs: usize,
) -> f32 {
    match weighting {
        HfaWeighting::Data => n_d as f32,
        HfaWeighting::Equal => total_workers as f32 / n_dcs.max(1) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hips::GlobalAggregator;

    fn nesterov() -> HfaConfig {
        HfaConfig {
            outer: OuterOptimizer::Nesterov,
            ..HfaConfig::default()
        }
    }

    /// sync.md oracle 6: m = 1.0, mean model 0.8 → m = 0.734; next mean 0.634 → m = 0.4876
    /// (within 1e-6), through the global aggregator of 2 DCs × 1 worker with data weighting.
    #[test]
    fn diloco_worked_example_through_the_aggregator() {
        let mut agg = GlobalAggregator::new(2, 2);
        agg.add_range(
            0,
            vec![1.0],
            0,
            Box::new(OuterStep::new(&nesterov(), 1).unwrap()),
        );
        let f = delta_factor(HfaWeighting::Data, 1, 2, 2);
        let mut m = 1.0f32;
        for (round, (mean, want)) in [(0.8f32, 0.734f32), (0.634, 0.4876)]
            .into_iter()
            .enumerate()
        {
            // Both DCs hold the mean model.
            let s = vec![f * (mean - m)];
            agg.push(0, 0, round as u64, s.clone(), 1).unwrap();
            m = agg.push(0, 1, round as u64, s, 1).unwrap().unwrap()[0];
            assert!((m - want).abs() < 1e-6, "round {round}: {m} vs {want}");
        }
    }

    /// Oracle 6, first part: η_out = 1, μ = 0 equals plain averaging bit for bit.
    #[test]
    fn diloco_with_unit_rate_and_no_momentum_is_averaging() {
        let n = 9;
        let m0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let deltas: Vec<Vec<f32>> = (0..3)
            .map(|r| {
                (0..n)
                    .map(|i| ((i + 7 * r) as f32 * 0.91).cos() * 0.1)
                    .collect()
            })
            .collect();
        let plain_cfg = HfaConfig::default();
        let unit = HfaConfig {
            outer_lr: 1.0,
            outer_momentum: 0.0,
            ..nesterov()
        };
        let (mut a, mut b) = (m0.clone(), m0);
        let mut oa = OuterStep::new(&plain_cfg, n).unwrap();
        let mut ob = OuterStep::new(&unit, n).unwrap();
        for d in &deltas {
            oa.step(&mut a, d);
            ob.step(&mut b, d);
        }
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.to_bits(), y.to_bits());
        }
    }

    #[test]
    fn delta_factors_weigh_dcs_by_data_or_equally() {
        // 3 + 1 workers: data weighting gives DC weights 3/4 and 1/4, equal 1/2 each.
        assert_eq!(delta_factor(HfaWeighting::Data, 3, 4, 2) / 4.0, 0.75);
        assert_eq!(delta_factor(HfaWeighting::Data, 1, 4, 2) / 4.0, 0.25);
        assert_eq!(delta_factor(HfaWeighting::Equal, 3, 4, 2) / 4.0, 0.5);
        assert_eq!(delta_factor(HfaWeighting::Equal, 1, 4, 2) / 4.0, 0.5);
        assert!(OuterStep::new(
            &HfaConfig {
                outer_lr: 0.0,
                ..nesterov()
            },
            1
        )
        .is_err());
    }
}
