//! `[train.optimizer]`: the optimizer choice and its hyper-parameters (the update math and the
//! per-range state live in `geomx_kernels::optim` and `crate::engine::optim`).

use serde::{Deserialize, Serialize};

use geomx_kernels::optim as kernel;

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
    /// Weight decay: added to the gradient (L2), or decoupled when `decoupled`.
    pub weight_decay: f32,
    /// Decoupled weight decay (AdamW: `θ ← θ − lr·wd·θ` before the Adam step).
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

impl OptimizerConfig {
    /// The equivalent `geomx-kernels` configuration (the kernels hold the update math).
    pub fn to_kernel(&self) -> kernel::OptimizerConfig {
        match self {
            Self::Sgd(c) => kernel::OptimizerConfig::Sgd(kernel::SgdConfig {
                lr: c.lr,
                momentum: c.momentum,
                nesterov: c.nesterov,
                weight_decay: c.weight_decay,
            }),
            Self::Adam(c) => kernel::OptimizerConfig::Adam(kernel::AdamConfig {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.epsilon,
                weight_decay: c.weight_decay,
                decoupled: c.decoupled,
            }),
        }
    }
}
