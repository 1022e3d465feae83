//! Element-wise optimizers (SGD with momentum/Nesterov/weight decay, Adam) over flat `f32` slices.
//!
//! One [`Optimizer`] holds the state of one tensor or range; global servers keep one per range they
//! own and apply it to the mean gradient (hips.md). SGD follows PyTorch's convention
//! (`v ← μ·v + g`, `θ ← θ − lr·v`, Nesterov `θ ← θ − lr·(g + μ·v)`); weight decay adds `wd·θ` to `g`.

use serde::{Deserialize, Serialize};

use super::EngineError;

/// Optimizer choice and hyper-parameters (`[train.optimizer]`, selected by `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OptimizerConfig {
    /// Stochastic gradient descent.
    Sgd(SgdConfig),
    /// Adam (Kingma & Ba), with bias correction.
    Adam(AdamConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Sgd(SgdConfig::default())
    }
}

impl OptimizerConfig {
    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            Self::Sgd(c) => c.lr,
            Self::Adam(c) => c.lr,
        }
    }
}

/// SGD hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f32,
    /// Momentum μ in [0, 1).
    pub momentum: f32,
    /// Nesterov momentum (needs μ > 0).
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// Adam hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay β1 in [0, 1).
    pub beta1: f32,
    /// Second-moment decay β2 in [0, 1).
    pub beta2: f32,
    /// ε added to the root of the second moment.
    pub epsilon: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Sgd { velocity: Vec<f32> },
    Adam { m: Vec<f32>, v: Vec<f32> },
}

/// Optimizer state for one flat tensor (or range) of `len` elements.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: State,
    steps: u64,
}

impl Optimizer {
    /// Fresh state (zero moments) for `len` elements.
    pub fn new(config: &OptimizerConfig, len: usize) -> Self {
        let state = match config {
            OptimizerConfig::Sgd(_) => State::Sgd {
                velocity: vec![0.0; len],
            },
            OptimizerConfig::Adam(_) => State::Adam {
                m: vec![0.0; len],
                v: vec![0.0; len],
            },
        };
        Self {
            config: config.clone(),
            state,
            steps: 0,
        }
    }

    /// Steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Elements this state covers.
    pub fn len(&self) -> usize {
        match &self.state {
            State::Sgd { velocity } => velocity.len(),
            State::Adam { m, .. } => m.len(),
        }
    }

    /// True for a state of zero elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one step: `params ← opt(params, grad)`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), EngineError> {
        let len = self.len();
        for got in [params.len(), grad.len()] {
            if got != len {
                return Err(EngineError::Length { expected: len, got });
            }
        }
        self.steps += 1;
        match (&self.config, &mut self.state) {
            (OptimizerConfig::Sgd(c), State::Sgd { velocity }) => {
                for ((p, &g), v) in params.iter_mut().zip(grad).zip(velocity.iter_mut()) {
                    let g = if c.weight_decay != 0.0 {
                        g + c.weight_decay * *p
                    } else {
                        g
                    };
                    if c.momentum == 0.0 {
                        *p -= c.lr * g;
                        continue;
                    }
                    *v = c.momentum * *v + g;
                    let d = if c.nesterov { g + c.momentum * *v } else { *v };
                    *p -= c.lr * d;
                }
            }
            (OptimizerConfig::Adam(c), State::Adam { m, v }) => {
                let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
                let bc1 = (1.0 - f64::from(c.beta1).powi(t)) as f32;
                let bc2 = (1.0 - f64::from(c.beta2).powi(t)) as f32;
                for (((p, &g), m), v) in params
                    .iter_mut()
                    .zip(grad)
                    .zip(m.iter_mut())
                    .zip(v.iter_mut())
                {
                    let g = if c.weight_decay != 0.0 {
                        g + c.weight_decay * *p
                    } else {
                        g
                    };
                    *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                    *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                    let m_hat = *m / bc1;
                    let v_hat = *v / bc2;
                    *p -= c.lr * m_hat / (v_hat.sqrt() + c.epsilon);
                }
            }
            // `new` builds the state from the same config, so the kinds always match.
            _ => unreachable!("optimizer state does not match its configuration"),
        }
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
