//! Optimizer configuration (`[train.optimizer]`) and per-range optimizer state.
//!
//! One [`Optimizer`] holds the state of one tensor or range; global servers keep one per range they
//! own and apply it to the mean gradient (hips.md). The update math lives in
//! `geomx_kernels::optim`: SGD follows PyTorch's convention (`v ← μ·v + g`, `θ ← θ − lr·v`,
//! Nesterov `θ ← θ − lr·(g + μ·v)`, weight decay adds `wd·θ` to `g`); Adam is bias-corrected.

pub use crate::config::{AdamConfig, OptimizerConfig, SgdConfig};

use geomx_kernels::optim as kernel;

use super::EngineError;

#[derive(Debug, Clone)]
enum Inner {
    Ready(kernel::Optimizer),
    Invalid(String),
}

/// An optimizer's state as plain values (checkpoints): the moment tensors, the kernel's step
/// counter (Adam's t) and the steps applied.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimState {
    /// Moment tensors in the kernel optimizer's order.
    pub tensors: Vec<Vec<f32>>,
    /// The kernel optimizer's own step counter (Adam's bias correction; 0 otherwise).
    pub kernel_step: u64,
    /// Steps applied through [`Optimizer::step`].
    pub steps: u64,
}

/// Optimizer state for one flat tensor (or range) of `len` elements: a thin layer over
/// `geomx_kernels::optim::Optimizer` that takes the configuration's types and counts steps.
#[derive(Debug, Clone)]
pub struct Optimizer {
    inner: Inner,
    len: usize,
    steps: u64,
}

impl Optimizer {
    /// Fresh state (zero moments) for `len` elements, or an error for an invalid configuration.
    pub fn try_new(config: &OptimizerConfig, len: usize) -> Result<Self, EngineError> {
        let opt = Self::new(config, len);
        match &opt.inner {
            Inner::Invalid(msg) => Err(EngineError::Optimizer(msg.clone())),
            Inner::Ready(_) => Ok(opt),
        }
    }

    /// Fresh state (zero moments) for `len` elements. The configuration is expected to have
    /// passed `Config::validate`; if it is invalid anyway, every [`Optimizer::step`] returns
    /// [`EngineError::Optimizer`].
    pub fn new(config: &OptimizerConfig, len: usize) -> Self {
        // θ_0 only matters to DC-ASGD's backups, which this configuration cannot select.
        let inner = match kernel::Optimizer::new(config.to_kernel(), &vec![0.0; len], 1) {
            Ok(o) => Inner::Ready(o),
            Err(e) => Inner::Invalid(e.to_string()),
        };
        Self {
            inner,
            len,
            steps: 0,
        }
    }

    /// Steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Elements this state covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a state of zero elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The state for a checkpoint: the kernel optimizer's tensors (see
    /// `geomx_kernels::optim::Optimizer::export_state`), its own step counter and this layer's
    /// count of applied steps.
    pub fn export_state(&self) -> OptimState {
        let (tensors, kernel_step) = match &self.inner {
            Inner::Ready(o) => o.export_state(),
            Inner::Invalid(_) => (Vec::new(), 0),
        };
        OptimState {
            tensors,
            kernel_step,
            steps: self.steps,
        }
    }

    /// Restores a state from [`Optimizer::export_state`] of an optimizer of the same configuration
    /// and length; a state of another shape is refused and nothing changes.
    pub fn import_state(&mut self, state: OptimState) -> Result<(), EngineError> {
        match &mut self.inner {
            Inner::Ready(o) => o
                .import_state(state.tensors, state.kernel_step)
                .map_err(|e| EngineError::Optimizer(e.to_string()))?,
            Inner::Invalid(msg) => return Err(EngineError::Optimizer(msg.clone())),
        }
        self.steps = state.steps;
        Ok(())
    }

    /// Applies one step: `params ← opt(params, grad)`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), EngineError> {
        for got in [params.len(), grad.len()] {
            if got != self.len {
                return Err(EngineError::Length {
                    expected: self.len,
                    got,
                });
            }
        }
        match &mut self.inner {
            Inner::Ready(o) => o
                .step(params, grad, 0)
                .map_err(|e| EngineError::Optimizer(e.to_string()))?,
            Inner::Invalid(msg) => return Err(EngineError::Optimizer(msg.clone())),
        }
        self.steps += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sgd(lr: f32, momentum: f32, nesterov: bool, weight_decay: f32) -> OptimizerConfig {
        OptimizerConfig::Sgd(SgdConfig {
            lr,
            momentum,
            nesterov,
            weight_decay,
        })
    }

    #[test]
    fn plain_sgd_is_exact_closed_form() {
        // lr and gradients are powers of two: every operation is exact in f32.
        let mut opt = Optimizer::new(&sgd(0.25, 0.0, false, 0.0), 3);
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = [0.5f32, -1.0, 4.0];
        for _ in 0..8 {
            opt.step(&mut p, &g).unwrap();
        }
        assert_eq!(
            p,
            vec![1.0 - 8.0 * 0.125, -2.0 + 8.0 * 0.25, 0.5 - 8.0 * 1.0]
        );
        assert_eq!(opt.steps(), 8);
    }

    #[test]
    fn momentum_and_nesterov_follow_hand_values() {
        // μ = 0.5, lr = 0.5, g = 1 each step: v = 1, 1.5, 1.75; θ = -0.5, -1.25, -2.125.
        let mut opt = Optimizer::new(&sgd(0.5, 0.5, false, 0.0), 1);
        let mut p = vec![0.0f32];
        let mut seen = Vec::new();
        for _ in 0..3 {
            opt.step(&mut p, &[1.0]).unwrap();
            seen.push(p[0]);
        }
        assert_eq!(seen, vec![-0.5, -1.25, -2.125]);
        // Nesterov: d = g + μ·v: d = 1.5, 1.75, 1.875; θ = -0.75, -1.625, -2.5625.
        let mut opt = Optimizer::new(&sgd(0.5, 0.5, true, 0.0), 1);
        let mut p = vec![0.0f32];
        let mut seen = Vec::new();
        for _ in 0..3 {
            opt.step(&mut p, &[1.0]).unwrap();
            seen.push(p[0]);
        }
        assert_eq!(seen, vec![-0.75, -1.625, -2.5625]);
        // Weight decay 0.5 on θ = 2, g = 0: θ ← 2 − 0.5·(0.5·2) = 1.5.
        let mut opt = Optimizer::new(&sgd(0.5, 0.0, false, 0.5), 1);
        let mut p = vec![2.0f32];
        opt.step(&mut p, &[0.0]).unwrap();
        assert_eq!(p, vec![1.5]);
    }

    #[test]
    fn adam_matches_f64_reference() {
        let cfg = AdamConfig {
            lr: 0.01,
            ..AdamConfig::default()
        };
        let mut opt = Optimizer::new(&OptimizerConfig::Adam(cfg.clone()), 4);
        let mut p = vec![0.5f32, -1.0, 2.0, 0.0];
        let (mut rp, mut rm, mut rv) = (
            p.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            [0f64; 4],
            [0f64; 4],
        );
        let (b1, b2, eps, lr) = (0.9f64, 0.999f64, 1e-8f64, 0.01f64);
        for t in 1..=30 {
            let g: Vec<f32> = (0..4)
                .map(|i| ((t * 7 + i * 3) % 11) as f32 / 4.0 - 1.25)
                .collect();
            opt.step(&mut p, &g).unwrap();
            for i in 0..4 {
                let gi = f64::from(g[i]);
                rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
                rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
                let mh = rm[i] / (1.0 - b1.powi(t));
                let vh = rv[i] / (1.0 - b2.powi(t));
                rp[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        for i in 0..4 {
            let rel = (f64::from(p[i]) - rp[i]).abs() / rp[i].abs().max(1e-3);
            assert!(rel < 1e-5, "elem {i}: {} vs {}", p[i], rp[i]);
        }
    }

    #[test]
    fn adamw_decay_is_decoupled() {
        // g = 0 keeps both moments at 0, so only the decoupled decay moves θ: 2 − 0.5·0.5·2.
        let cfg = OptimizerConfig::Adam(AdamConfig {
            lr: 0.5,
            weight_decay: 0.5,
            decoupled: true,
            ..AdamConfig::default()
        });
        let mut opt = Optimizer::try_new(&cfg, 1).unwrap();
        let mut p = vec![2.0f32];
        opt.step(&mut p, &[0.0]).unwrap();
        assert_eq!(p, vec![1.5]);
    }

    #[test]
    fn invalid_configuration_fails_without_panicking() {
        let bad = sgd(0.1, 0.0, true, 0.0); // Nesterov without momentum
        assert!(matches!(
            Optimizer::try_new(&bad, 2),
            Err(EngineError::Optimizer(_))
        ));
        let mut opt = Optimizer::new(&bad, 2);
        let mut p = vec![1.0f32; 2];
        assert!(matches!(
            opt.step(&mut p, &[1.0; 2]),
            Err(EngineError::Optimizer(_))
        ));
        assert_eq!((p, opt.steps()), (vec![1.0; 2], 0));
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut opt = Optimizer::new(&OptimizerConfig::default(), 3);
        let mut p = vec![0.0; 3];
        assert_eq!(
            opt.step(&mut p, &[1.0; 2]),
            Err(EngineError::Length {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            opt.step(&mut [0.0; 4], &[1.0; 3]),
            Err(EngineError::Length {
                expected: 3,
                got: 4
            })
        );
        assert_eq!(opt.steps(), 0);
    }
}
