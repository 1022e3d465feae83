//! `[sync]`: the synchronisation algorithm of the global tier and its parameters (sync.md).

use serde::{Deserialize, Serialize};

use geomx_kernels::optim::{DcAsgdConfig, DcAsgdLambda};

/// Synchronisation algorithms of the global tier (sync.md). Local tiers are synchronous in every
/// mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SyncAlgorithm {
    /// Fully synchronous: every round the optimizer applies the mean gradient of all W workers.
    #[default]
    Fsa,
    /// Synchronous inside a DC, asynchronous between DCs (the global server applies each DC's
    /// mean gradient as it arrives).
    Mixed,
    /// Hierarchical frequency aggregation: local model averaging every `k1` steps, global every
    /// `k1 * k2` steps.
    Hfa,
    /// ESync: fast workers take extra local steps while the slowest takes one (the coordinator
    /// decides), then every worker pushes its model delta in one synchronous round.
    Esync,
}

impl SyncAlgorithm {
    /// The name used in the TOML file.
    pub fn name(self) -> &'static str {
        match self {
            SyncAlgorithm::Fsa => "fsa",
            SyncAlgorithm::Mixed => "mixed",
            SyncAlgorithm::Hfa => "hfa",
            SyncAlgorithm::Esync => "esync",
        }
    }
}

/// `[sync]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// The algorithm.
    pub algorithm: SyncAlgorithm,
    /// MixedSync parameters (`[sync.mixed]`; ignored by other algorithms).
    pub mixed: MixedConfig,
    /// HFA parameters (`[sync.hfa]`; ignored by other algorithms).
    pub hfa: HfaConfig,
    /// ESync parameters (`[sync.esync]`; ignored by other algorithms).
    pub esync: EsyncConfig,
}

/// Optimizer of the MixedSync global server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MixedOptimizer {
    /// DC-ASGD with one backup per DC, learning rate and weight decay from `train.optimizer`.
    #[default]
    Dcasgd,
    /// The plain `train.optimizer` (no delay compensation).
    Plain,
}

/// DC-ASGD's λ mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LambdaMode {
    /// Constant λ = `lambda`.
    #[default]
    Constant,
    /// Element-wise λ = `lambda0 / sqrt(MS + eps)`, MS ← m·MS + (1 − m)·g⊙g.
    Adaptive,
}

/// How the global server scales the learning rate of one DC's asynchronous step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MixedLrScale {
    /// η · N_d / N: each DC's step is weighted by its share of the workers, so that one push from
    /// every DC moves θ as far as one FSA step (the DCs' steps are not averaged but applied one
    /// after the other; unscaled they add up to D times FSA's step and oscillate).
    #[default]
    Share,
    /// η for every push (sync.md as written; the original GeoMX).
    None,
}

/// `[sync.mixed]` (defaults from sync.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixedConfig {
    /// Optimizer of the global server.
    pub optimizer: MixedOptimizer,
    /// λ mode of DC-ASGD.
    pub lambda_mode: LambdaMode,
    /// Constant λ (default 0.04).
    pub lambda: f32,
    /// Adaptive λ0 (default 2.0).
    pub lambda0: f32,
    /// Adaptive decay m of the mean square (default 0.95).
    pub m: f32,
    /// Adaptive ε (default 1e-7).
    pub eps: f32,
    /// DC-ASGD momentum μ (MXNet variant; default 0).
    pub momentum: f32,
    /// Learning-rate scale of each DC's step (default `share`).
    pub lr_scale: MixedLrScale,
}

impl Default for MixedConfig {
    fn default() -> Self {
        Self {
            optimizer: MixedOptimizer::Dcasgd,
            lambda_mode: LambdaMode::Constant,
            lambda: 0.04,
            lambda0: 2.0,
            m: 0.95,
            eps: 1e-7,
            momentum: 0.0,
            lr_scale: MixedLrScale::Share,
        }
    }
}

impl MixedConfig {
    /// DC-ASGD settings with learning rate `lr` and weight decay `weight_decay` (from the
    /// configured training optimizer).
    pub fn dcasgd(&self, lr: f32, weight_decay: f32) -> DcAsgdConfig {
        DcAsgdConfig {
            lr,
            lambda: match self.lambda_mode {
                LambdaMode::Constant => DcAsgdLambda::Constant(self.lambda),
                LambdaMode::Adaptive => DcAsgdLambda::Adaptive {
                    lambda0: self.lambda0,
                    decay: self.m,
                    eps: self.eps,
                },
            },
            momentum: self.momentum,
            weight_decay,
        }
    }
}

/// How HFA weights workers inside a DC and DCs at the global tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HfaWeighting {
    /// By samples: N_i / N_d inside a DC, N_d / N between DCs.
    #[default]
    Data,
    /// Equal: 1 / n_d inside a DC, 1 / D between DCs (GeoMX).
    Equal,
}

/// HFA's outer optimizer at the global tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OuterOptimizer {
    /// m ← m + Δ (plain averaging).
    #[default]
    Average,
    /// DiLoCo Nesterov outer SGD with `outer_lr` and `outer_momentum`.
    Nesterov,
}

/// HFA's correction of the local steps' drift between global averagings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HfaCorrection {
    /// Plain local steps.
    #[default]
    None,
    /// SCAFFOLD's control variates (`crate::engine::scaffold`): every local step uses
    /// g + c − c_w, both variates derived from the models HFA exchanges anyway. Needs SGD and
    /// plain averaging (`outer = "average"`).
    Scaffold,
}

/// `[sync.hfa]` (defaults from sync.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HfaConfig {
    /// Local averaging every `k1` worker steps (≥ 1).
    pub k1: u64,
    /// Global averaging every `k2` local averagings (≥ 1).
    pub k2: u64,
    /// Weighting of workers and DCs.
    pub weighting: HfaWeighting,
    /// Outer optimizer.
    pub outer: OuterOptimizer,
    /// η_out of `nesterov` (default 0.7).
    pub outer_lr: f32,
    /// μ of `nesterov` (default 0.9).
    pub outer_momentum: f32,
    /// A control run: the data centers never exchange over the WAN (`k2` is ignored), each
    /// trains on its own data with its LAN averagings only; `train.rounds` must be a multiple
    /// of `k1`. It measures what the WAN exchange buys (default false).
    pub isolated: bool,
    /// Drift correction of the local steps (default `"none"`).
    pub correction: HfaCorrection,
}

impl Default for HfaConfig {
    fn default() -> Self {
        Self {
            k1: 1,
            k2: 1,
            weighting: HfaWeighting::Data,
            outer: OuterOptimizer::Average,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            isolated: false,
            correction: HfaCorrection::None,
        }
    }
}

/// How ESync combines the workers' model deltas when their local step counts differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EsyncNormalisation {
    /// w = w_prev + γ·Σ_r p_r·Δ_r.
    #[default]
    None,
    /// FedNova: w = w_prev + γ·τ_eff·Σ_r p_r·Δ_r / k_r with τ_eff = Σ_r p_r·k_r.
    Fednova,
}

/// `[sync.esync]` (defaults from sync.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EsyncConfig {
    /// Tolerance ε in seconds: a worker pushes instead of stepping again when its step would end
    /// later than ε before the slowest worker's (default 0.5).
    pub eps: f64,
    /// Global learning rate γ applied to the combined delta (default 1.0).
    pub gamma: f32,
    /// Normalisation of unequal local step counts.
    pub normalisation: EsyncNormalisation,
}

impl Default for EsyncConfig {
    fn default() -> Self {
        Self {
            eps: 0.5,
            gamma: 1.0,
            normalisation: EsyncNormalisation::None,
        }
    }
}
