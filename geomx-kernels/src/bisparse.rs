//! Bi-Sparse push state at a local server (`specs/compression.md`, "Push").
//!
//! Per (local server, key): velocity `u` and accumulator `v`, f32, length N, initially zero.
//! Each round: optional clipping of g to ‖g‖₂ ≤ `clip_norm`; `u ← m·u + g; v ← v + u` (with m = 0
//! plain error feedback `v ← v + g`, and `u` is not stored); density ρ_r from the warm-up
//! schedule; selection on |v|; the selected (i, v_i) are moved out (never rescaled) and
//! `v_i ← 0, u_i ← 0` (momentum factor masking). What was sent plus the new residual equals the
//! accumulated input exactly.

use crate::error::{check_len, check_u32_len, KernelError};
use crate::sparse::{sparse_is_smaller, SparseVec};
use crate::topk::{
    k_for_density, topk_exact, topk_sampled, SelectOutcome, SelectPath, Selection, TopkScratch,
};
use crate::wire::ValueType;

/// Bi-Sparse configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BiSparseConfig {
    /// Target density ρ (default 0.01).
    pub density: f64,
    /// Warm-up start density ρ_0 (default 0.25).
    pub warmup_density: f64,
    /// Warm-up length W in rounds (0: no warm-up).
    pub warmup_rounds: u64,
    /// Momentum correction m (default 0; > 0 requires momentum-free SGD at the receiver).
    pub momentum: f32,
    /// Clip g to this L2 norm before accumulating (off by default).
    pub clip_norm: Option<f32>,
    /// Selection mode (default sampled).
    pub selection: Selection,
    /// Value type of the sparse payload (decides when dense is smaller; default f32).
    pub value_type: ValueType,
}

impl Default for BiSparseConfig {
    fn default() -> Self {
        BiSparseConfig {
            density: 0.01,
            warmup_density: 0.25,
            warmup_rounds: 0,
            momentum: 0.0,
            clip_norm: None,
            selection: Selection::default(),
            value_type: ValueType::F32,
        }
    }
}

impl BiSparseConfig {
    /// Checks ranges: densities in (0, 1], 0 ≤ m < 1, clip norm positive and finite.
    pub fn validate(&self) -> Result<(), KernelError> {
        for (name, d) in [
            ("density", self.density),
            ("warm-up density", self.warmup_density),
        ] {
            if !(d > 0.0 && d <= 1.0) {
                return Err(KernelError::InvalidConfig(format!(
                    "{name} {d} not in (0, 1]"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(KernelError::InvalidConfig(format!(
                "momentum {} not in [0, 1)",
                self.momentum
            )));
        }
        if let Some(c) = self.clip_norm {
            if !(c > 0.0 && c.is_finite()) {
                return Err(KernelError::InvalidConfig(format!(
                    "clip norm {c} must be positive"
                )));
            }
        }
        if let Selection::Sampled(p) = &self.selection {
            p.validate()?;
        }
        Ok(())
    }

    /// Density of round r: ρ_0·(ρ/ρ_0)^(min(r, W)/W), or ρ when W = 0.
    pub fn density_at(&self, round: u64) -> f64 {
        if self.warmup_rounds == 0 {
            return self.density;
        }
        let frac = round.min(self.warmup_rounds) as f64 / self.warmup_rounds as f64;
        if frac >= 1.0 {
            return self.density;
        }
        self.warmup_density * (self.density / self.warmup_density).powf(frac)
    }
}

/// What a push emits.
#[derive(Debug, Clone, PartialEq)]
pub enum PushPayload {
    /// The selected entries.
    Sparse(SparseVec),
    /// The whole accumulator (sent dense because the sparse form would not be smaller).
    Dense(Vec<f32>),
}

/// Result of one push.
#[derive(Debug, Clone, PartialEq)]
pub struct PushOutput {
    /// Data to send.
    pub payload: PushPayload,
    /// Density ρ_r used this round.
    pub density: f64,
    /// Selection details (`None` when the push went dense).
    pub selection: Option<SelectOutcome>,
}

impl PushOutput {
    /// Whether the selection fell back to an exact scan (count in a metric).
    pub fn is_fallback(&self) -> bool {
        matches!(
            self.selection,
            Some(SelectOutcome {
                path: SelectPath::Fallback,
                ..
            })
        )
    }
}

/// Bi-Sparse state of one key at one local server.
#[derive(Debug, Clone)]
pub struct BiSparse {
    cfg: BiSparseConfig,
    n: u32,
    u: Vec<f32>,
    v: Vec<f32>,
    clipped: Vec<f32>,
    scratch: TopkScratch,
    sel: Vec<u32>,
    fallbacks: u64,
}

impl BiSparse {
    /// Zero state for a key of `n` elements.
    pub fn new(cfg: BiSparseConfig, n: usize) -> Result<BiSparse, KernelError> {
        cfg.validate()?;
        let n32 = check_u32_len(n)?;
        Ok(BiSparse {
            cfg,
            n: n32,
            u: if cfg.momentum > 0.0 {
                vec![0.0; n]
            } else {
                Vec::new()
            },
            v: vec![0.0; n],
            clipped: Vec::new(),
            scratch: TopkScratch::default(),
            sel: Vec::new(),
            fallbacks: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BiSparseConfig {
        &self.cfg
    }

    /// The accumulator v (the residual not yet sent).
    pub fn residual(&self) -> &[f32] {
        &self.v
    }

    /// The velocity u (empty when m = 0).
    pub fn velocity(&self) -> &[f32] {
        &self.u
    }

    /// Restores the velocity u and the residual v from [`BiSparse::velocity`] and
    /// [`BiSparse::residual`] of a state of the same configuration and length (checkpoints);
    /// wrong lengths are refused and nothing changes.
    pub fn set_state(&mut self, velocity: Vec<f32>, residual: Vec<f32>) -> Result<(), KernelError> {
        check_len(self.u.len(), velocity.len())?;
        check_len(self.v.len(), residual.len())?;
        self.u = velocity;
        self.v = residual;
        Ok(())
    }

    /// Number of sampled selections that fell back to exact over the whole tensor.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// Accumulates `g` (steps 1–2) without selecting or sending.
    pub fn accumulate(&mut self, g: &[f32]) -> Result<(), KernelError> {
        check_len(self.n as usize, g.len())?;
        let g = match self.cfg.clip_norm {
            Some(c) => {
                let norm = g
                    .iter()
                    .map(|&x| f64::from(x) * f64::from(x))
                    .sum::<f64>()
                    .sqrt();
                if norm > f64::from(c) {
                    let s = (f64::from(c) / norm) as f32;
                    self.clipped.clear();
                    self.clipped.extend(g.iter().map(|&x| x * s));
                    &self.clipped[..]
                } else {
                    g
                }
            }
            None => g,
        };
        if self.u.is_empty() {
            for (v, &x) in self.v.iter_mut().zip(g) {
                *v += x;
            }
        } else {
            let m = self.cfg.momentum;
            for ((u, v), &x) in self.u.iter_mut().zip(self.v.iter_mut()).zip(g) {
                *u = m * *u + x;
                *v += *u;
            }
        }
        Ok(())
    }

    /// One push of round `round` (0-based, drives the warm-up): accumulate `g`, select, emit and
    /// clear the selected entries. `seed` seeds sampled selection
    /// ([`crate::rng::selection_seed`] of run, tier, DC, key, round).
    pub fn push(&mut self, g: &[f32], round: u64, seed: u64) -> Result<PushOutput, KernelError> {
        self.accumulate(g)?;
        let density = self.cfg.density_at(round);
        let n = self.n as usize;
        let k = k_for_density(density, n);
        if !sparse_is_smaller(k, self.cfg.value_type, n) {
            return Ok(self.take_dense(density, None));
        }
        let outcome = match self.cfg.selection {
            Selection::Exact => {
                let count = topk_exact(&self.v, k, &mut self.scratch, &mut self.sel)?;
                SelectOutcome {
                    k,
                    count,
                    path: SelectPath::Exact,
                }
            }
            Selection::Sampled(p) => {
                topk_sampled(&self.v, density, &p, seed, &mut self.scratch, &mut self.sel)?
            }
        };
        if outcome.path == SelectPath::Fallback {
            self.fallbacks += 1;
            tracing::debug!(
                n,
                k,
                fallbacks = self.fallbacks,
                "sampled top-k found too few candidates; exact fallback"
            );
        }
        if !sparse_is_smaller(outcome.count, self.cfg.value_type, n) {
            // The sampled count overshot k so far that dense is smaller: send everything.
            return Ok(self.take_dense(density, Some(outcome)));
        }
        let mut values = Vec::with_capacity(self.sel.len());
        for &i in &self.sel {
            let i = i as usize;
            values.push(self.v[i]);
            self.v[i] = 0.0;
        }
        if !self.u.is_empty() {
            for &i in &self.sel {
                self.u[i as usize] = 0.0;
            }
        }
        let indices = self.sel.clone();
        Ok(PushOutput {
            payload: PushPayload::Sparse(SparseVec::from_parts(self.n, indices, values)),
            density,
            selection: Some(outcome),
        })
    }

    /// Moves the whole accumulator out (a dense push) and clears u and v.
    fn take_dense(&mut self, density: f64, selection: Option<SelectOutcome>) -> PushOutput {
        let dense = std::mem::replace(&mut self.v, vec![0.0; self.n as usize]);
        self.u.iter_mut().for_each(|u| *u = 0.0);
        PushOutput {
            payload: PushPayload::Dense(dense),
            density,
            selection,
        }
    }
}

/// The momentum rule: DGC momentum correction (m > 0) replaces the receiver's momentum, so it is
/// only allowed when the optimizer applied to the pulled mean is momentum-free.
pub fn check_momentum_rule(
    cfg: &BiSparseConfig,
    receiver: &crate::optim::OptimizerConfig,
) -> Result<(), KernelError> {
    if cfg.momentum > 0.0 && receiver.has_momentum() {
        return Err(KernelError::InvalidConfig(format!(
            "Bi-Sparse momentum correction m = {} needs a momentum-free optimizer at the receiver \
             (got {receiver:?}); set m = 0 or use SGD without momentum",
            cfg.momentum
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{selection_seed, Tier};
    use crate::topk::SampledParams;
    use rand::{Rng, SeedableRng};

    fn seed(r: u64) -> u64 {
        selection_seed(17, Tier::Inter, 0, 3, r)
    }

    #[test]
    fn per_round_invariant_bit_exact() {
        // Oracle 1: with v_mid = v_before + u, each i is either sent (sent == v_mid, v = u = 0)
        // or kept (v_after == v_mid).
        let n = 30_000;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (m, selection) in [
            (0.0, Selection::Exact),
            (0.9, Selection::Exact),
            (0.0, Selection::default()),
            (0.9, Selection::default()),
        ] {
            let cfg = BiSparseConfig {
                momentum: m,
                selection,
                warmup_rounds: 5,
                ..BiSparseConfig::default()
            };
            let mut s = BiSparse::new(cfg, n).unwrap();
            for r in 0..20 {
                let g: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
                let v_before = s.residual().to_vec();
                let u_before = s.velocity().to_vec();
                let out = s.push(&g, r, seed(r)).unwrap();
                let PushPayload::Sparse(sent) = out.payload else {
                    panic!("expected sparse at density {}", out.density)
                };
                let dense_sent = sent.to_dense();
                let mut is_sent = vec![false; n];
                for &i in sent.indices() {
                    is_sent[i as usize] = true;
                }
                for i in 0..n {
                    let u = if m == 0.0 {
                        g[i]
                    } else {
                        m * u_before[i] + g[i]
                    };
                    let v_mid = v_before[i] + u;
                    if is_sent[i] {
                        assert_eq!(dense_sent[i].to_bits(), v_mid.to_bits());
                        assert_eq!(s.residual()[i], 0.0);
                        if m != 0.0 {
                            assert_eq!(s.velocity()[i], 0.0);
                        }
                    } else {
                        assert_eq!(s.residual()[i].to_bits(), v_mid.to_bits());
                        if m != 0.0 {
                            assert_eq!(s.velocity()[i].to_bits(), u.to_bits());
                        }
                    }
                }
                let k = crate::topk::k_for_density(cfg.density_at(r), n) as f64;
                assert!(sent.count() as f64 <= 1.2 * k + 1.0);
            }
        }
    }

    #[test]
    fn cumulative_sent_plus_residual_equals_input() {
        // Oracle 2: m = 0, integer gradients |g| < 2^10, 1000 rounds: Σ sent + v == Σ g exactly.
        let n = 2000;
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for selection in [Selection::Exact, Selection::default()] {
            let cfg = BiSparseConfig {
                selection,
                ..BiSparseConfig::default()
            };
            let mut s = BiSparse::new(cfg, n).unwrap();
            let mut sum_g = vec![0f32; n];
            let mut sum_sent = vec![0f32; n];
            for r in 0..1000 {
                let g: Vec<f32> = (0..n)
                    .map(|_| f32::from(rng.random_range(-1023i16..1024)))
                    .collect();
                for (a, &x) in sum_g.iter_mut().zip(&g) {
                    *a += x;
                }
                match s.push(&g, r, seed(r)).unwrap().payload {
                    PushPayload::Sparse(sv) => sv.scatter_add_into(&mut sum_sent).unwrap(),
                    PushPayload::Dense(d) => panic!("unexpected dense push of {}", d.len()),
                }
            }
            for i in 0..n {
                assert_eq!(sum_sent[i] + s.residual()[i], sum_g[i]);
            }
        }
    }

    #[test]
    fn momentum_rule() {
        use crate::optim::{AdamConfig, OptimizerConfig, SgdConfig};
        let m = BiSparseConfig {
            momentum: 0.9,
            ..BiSparseConfig::default()
        };
        let plain = OptimizerConfig::Sgd(SgdConfig::default());
        let heavy = OptimizerConfig::Sgd(SgdConfig {
            momentum: 0.9,
            ..SgdConfig::default()
        });
        let adam = OptimizerConfig::Adam(AdamConfig::default());
        assert!(check_momentum_rule(&m, &plain).is_ok());
        assert!(check_momentum_rule(&m, &heavy).is_err());
        assert!(check_momentum_rule(&m, &adam).is_err());
        assert!(check_momentum_rule(&BiSparseConfig::default(), &adam).is_ok());
    }

    #[test]
    fn warmup_follows_dgc_schedule() {
        let cfg = BiSparseConfig {
            density: 0.001,
            warmup_density: 0.25,
            warmup_rounds: 4,
            ..BiSparseConfig::default()
        };
        // ρ_r = ρ_0·(ρ/ρ_0)^(r/W), and DGC's published 75 % → … → 99.9 % sparsities within 2 %.
        let dgc = [0.25, 0.0625, 0.015625, 0.00390625, 0.001, 0.001];
        for (r, w) in dgc.iter().enumerate() {
            let d = cfg.density_at(r as u64);
            let exact = 0.25 * (0.001f64 / 0.25).powf(r.min(4) as f64 / 4.0);
            assert!((d - exact).abs() <= 1e-15, "round {r}: {d} vs {exact}");
            assert!((d - w).abs() < 0.02 * w, "round {r}: {d} vs DGC {w}");
        }
        let no_warmup = BiSparseConfig::default();
        assert_eq!(no_warmup.density_at(0), 0.01);
    }

    #[test]
    fn zeros_dense_fallback_and_clipping() {
        // All-zero input: count 0.
        let mut s = BiSparse::new(BiSparseConfig::default(), 1000).unwrap();
        let out = s.push(&[0.0; 1000], 0, 1).unwrap();
        assert_eq!(out.payload, PushPayload::Sparse(SparseVec::empty(1000)));
        // Density 0.5 with f32 values: sparse would not be smaller, everything goes dense.
        let cfg = BiSparseConfig {
            density: 0.5,
            momentum: 0.5,
            ..BiSparseConfig::default()
        };
        let mut s = BiSparse::new(cfg, 4).unwrap();
        let out = s.push(&[1.0, -2.0, 3.0, 0.0], 0, 1).unwrap();
        assert_eq!(out.payload, PushPayload::Dense(vec![1.0, -2.0, 3.0, 0.0]));
        assert!(s.residual().iter().chain(s.velocity()).all(|&x| x == 0.0));
        // Clipping to norm 1: g = (3, 4) becomes (0.6, 0.8).
        let cfg = BiSparseConfig {
            clip_norm: Some(1.0),
            ..BiSparseConfig::default()
        };
        let mut s = BiSparse::new(cfg, 2).unwrap();
        s.accumulate(&[3.0, 4.0]).unwrap();
        assert!((s.residual()[0] - 0.6).abs() < 1e-7 && (s.residual()[1] - 0.8).abs() < 1e-7);
        assert!(s.accumulate(&[1.0]).is_err());
        // Bad configurations.
        for bad in [
            BiSparseConfig {
                density: 0.0,
                ..BiSparseConfig::default()
            },
            BiSparseConfig {
                momentum: 1.0,
                ..BiSparseConfig::default()
            },
            BiSparseConfig {
                clip_norm: Some(-1.0),
                ..BiSparseConfig::default()
            },
            BiSparseConfig {
                selection: Selection::Sampled(SampledParams {
                    min_hits: 0,
                    ..SampledParams::default()
                }),
                ..BiSparseConfig::default()
            },
        ] {
            assert!(BiSparse::new(bad, 10).is_err());
        }
    }
}
