//! Server-side optimizers over flat f32 buffers (one instance per key range) and the DiLoCo
//! outer step (`specs/sync.md`).
//!
//! - SGD (PyTorch form): `d = g + wd·w; buf ← μ·buf + d; d ← nesterov ? d + μ·buf : buf;
//!   w ← w − η·d`. Terms with a zero coefficient are skipped, so the plain case is `w − η·g`.
//! - Adam: bias-corrected; weight decay either added to g (L2) or decoupled (AdamW:
//!   `w ← w − η·wd·w` first).
//! - DC-ASGD: `w ← w − η·(g + wd·w + λ ⊙ g ⊙ g ⊙ (w − w_bak[d]))`, then `w_bak[d] ← w`, one
//!   backup per sender (DC), starting at θ_0. Momentum form (MXNet):
//!   `mom ← μ·mom − η·(…); w ← w + mom`. Adaptive λ: `MS ← m·MS + (1 − m)·g⊙g` (first), then
//!   `λ = λ0 / sqrt(MS + ε)` element-wise.
//! - [`DilocoOuter`]: Nesterov outer SGD on the weighted model delta.

use crate::error::{check_len, KernelError};

/// SGD settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate η.
    pub lr: f32,
    /// Momentum μ (0: none).
    pub momentum: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.01,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// Adam settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate η.
    pub lr: f32,
    /// First-moment decay β1.
    pub beta1: f32,
    /// Second-moment decay β2.
    pub beta2: f32,
    /// ε added to the root of the second moment.
    pub eps: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Decoupled weight decay (AdamW) instead of L2 on the gradient.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

/// DC-ASGD's λ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DcAsgdLambda {
    /// Constant λ (default 0.04).
    Constant(f32),
    /// Adaptive λ = λ0 / sqrt(MS + ε) with MS the running mean of g⊙g (defaults 2.0, 0.95, 1e-7).
    Adaptive {
        /// λ0.
        lambda0: f32,
        /// Decay m of the mean square.
        decay: f32,
        /// ε.
        eps: f32,
    },
}

/// DC-ASGD settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DcAsgdConfig {
    /// Learning rate η.
    pub lr: f32,
    /// λ.
    pub lambda: DcAsgdLambda,
    /// Momentum μ (default 0).
    pub momentum: f32,
    /// Weight decay wd (default 0).
    pub weight_decay: f32,
}

impl Default for DcAsgdConfig {
    fn default() -> Self {
        DcAsgdConfig {
            lr: 0.01,
            lambda: DcAsgdLambda::Constant(0.04),
            momentum: 0.0,
            weight_decay: 0.0,
        }
    }
}

/// Which optimizer to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerConfig {
    /// SGD.
    Sgd(SgdConfig),
    /// Adam / AdamW.
    Adam(AdamConfig),
    /// DC-ASGD (MixedSync global server).
    DcAsgd(DcAsgdConfig),
}

impl OptimizerConfig {
    /// Whether the optimizer keeps momentum (Bi-Sparse momentum correction m > 0 requires
    /// `false`).
    pub fn has_momentum(&self) -> bool {
        match self {
            OptimizerConfig::Sgd(c) => c.momentum != 0.0,
            OptimizerConfig::Adam(_) => true,
            OptimizerConfig::DcAsgd(c) => c.momentum != 0.0,
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            OptimizerConfig::Sgd(c) => c.lr,
            OptimizerConfig::Adam(c) => c.lr,
            OptimizerConfig::DcAsgd(c) => c.lr,
        }
    }

    /// Checks ranges (finite non-negative rates, decays in [0, 1), positive ε).
    pub fn validate(&self) -> Result<(), KernelError> {
        let bad = |what: &str, v: f32| KernelError::InvalidConfig(format!("{what} = {v}"));
        let rate = |what: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(what, v))
            }
        };
        let decay = |what: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(bad(what, v))
            }
        };
        match *self {
            OptimizerConfig::Sgd(c) => {
                rate("lr", c.lr)?;
                decay("momentum", c.momentum)?;
                rate("weight_decay", c.weight_decay)?;
                if c.nesterov && c.momentum == 0.0 {
                    return Err(KernelError::InvalidConfig(
                        "nesterov needs momentum > 0".into(),
                    ));
                }
            }
            OptimizerConfig::Adam(c) => {
                rate("lr", c.lr)?;
                decay("beta1", c.beta1)?;
                decay("beta2", c.beta2)?;
                rate("weight_decay", c.weight_decay)?;
                if !(c.eps > 0.0 && c.eps.is_finite()) {
                    return Err(bad("eps", c.eps));
                }
            }
            OptimizerConfig::DcAsgd(c) => {
                rate("lr", c.lr)?;
                decay("momentum", c.momentum)?;
                rate("weight_decay", c.weight_decay)?;
                match c.lambda {
                    DcAsgdLambda::Constant(l) => rate("lambda", l)?,
                    DcAsgdLambda::Adaptive {
                        lambda0,
                        decay: d,
                        eps,
                    } => {
                        rate("lambda0", lambda0)?;
                        decay("decay", d)?;
                        if !(eps > 0.0 && eps.is_finite()) {
                            return Err(bad("eps", eps));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum State {
    Sgd {
        buf: Vec<f32>,
    },
    Adam {
        m: Vec<f32>,
        v: Vec<f32>,
        t: u64,
    },
    DcAsgd {
        backups: Vec<Vec<f32>>,
        mom: Vec<f32>,
        ms: Vec<f32>,
    },
}

/// An optimizer with its state for one parameter range.
#[derive(Debug, Clone)]
pub struct Optimizer {
    cfg: OptimizerConfig,
    n: usize,
    state: State,
}

impl Optimizer {
    /// Builds the optimizer for parameters `params` (θ_0: DC-ASGD's initial backups) and
    /// `senders` senders (DCs; used by DC-ASGD only, at least 1).
    pub fn new(
        cfg: OptimizerConfig,
        params: &[f32],
        senders: usize,
    ) -> Result<Optimizer, KernelError> {
        cfg.validate()?;
        let n = params.len();
        let state = match cfg {
            OptimizerConfig::Sgd(c) => State::Sgd {
                buf: if c.momentum != 0.0 {
                    vec![0.0; n]
                } else {
                    Vec::new()
                },
            },
            OptimizerConfig::Adam(_) => State::Adam {
                m: vec![0.0; n],
                v: vec![0.0; n],
                t: 0,
            },
            OptimizerConfig::DcAsgd(c) => {
                if senders == 0 {
                    return Err(KernelError::InvalidConfig(
                        "DC-ASGD needs at least one sender".into(),
                    ));
                }
                State::DcAsgd {
                    backups: vec![params.to_vec(); senders],
                    mom: if c.momentum != 0.0 {
                        vec![0.0; n]
                    } else {
                        Vec::new()
                    },
                    ms: match c.lambda {
                        DcAsgdLambda::Adaptive { .. } => vec![0.0; n],
                        DcAsgdLambda::Constant(_) => Vec::new(),
                    },
                }
            }
        };
        Ok(Optimizer { cfg, n, state })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// Changes the learning rate (schedules).
    pub fn set_lr(&mut self, lr: f32) {
        match &mut self.cfg {
            OptimizerConfig::Sgd(c) => c.lr = lr,
            OptimizerConfig::Adam(c) => c.lr = lr,
            OptimizerConfig::DcAsgd(c) => c.lr = lr,
        }
    }

    /// DC-ASGD's backup for `sender` (the parameters last sent to it), if this is DC-ASGD.
    pub fn backup(&self, sender: usize) -> Option<&[f32]> {
        match &self.state {
            State::DcAsgd { backups, .. } => backups.get(sender).map(|b| &b[..]),
            _ => None,
        }
    }

    /// Sets DC-ASGD's backup for `sender` to `values`: what that sender holds now, when it did not
    /// receive the parameters exactly (a lossy reply codec). Other optimizers keep no backups and
    /// ignore it.
    pub fn set_backup(&mut self, sender: usize, values: &[f32]) -> Result<(), KernelError> {
        check_len(self.n, values.len())?;
        if let State::DcAsgd { backups, .. } = &mut self.state {
            let senders = backups.len();
            backups
                .get_mut(sender)
                .ok_or(KernelError::UnknownSender { sender, senders })?
                .copy_from_slice(values);
        }
        Ok(())
    }

    /// The state as flat tensors and a step counter, for checkpoints: SGD `[momentum buffer]`
    /// (empty without momentum) and 0; Adam `[m, v]` and t; DC-ASGD the backups of every sender,
    /// then the momentum and mean-square buffers (empty when unused), and 0.
    pub fn export_state(&self) -> (Vec<Vec<f32>>, u64) {
        match &self.state {
            State::Sgd { buf } => (vec![buf.clone()], 0),
            State::Adam { m, v, t } => (vec![m.clone(), v.clone()], *t),
            State::DcAsgd { backups, mom, ms } => {
                let mut out = backups.clone();
                out.push(mom.clone());
                out.push(ms.clone());
                (out, 0)
            }
        }
    }

    /// Restores a state from [`Optimizer::export_state`] of an optimizer of the same
    /// configuration and length. The number of tensors and every tensor's length must equal this
    /// optimizer's own; otherwise nothing changes and the mismatch is returned.
    pub fn import_state(&mut self, tensors: Vec<Vec<f32>>, step: u64) -> Result<(), KernelError> {
        let (own, _) = self.export_state();
        if own.len() != tensors.len() {
            return Err(KernelError::InvalidConfig(format!(
                "optimizer state of {} tensors, expected {}",
                tensors.len(),
                own.len()
            )));
        }
        for (a, b) in own.iter().zip(&tensors) {
            check_len(a.len(), b.len())?;
        }
        let mut it = tensors.into_iter();
        let mut next = || it.next().unwrap_or_default();
        match &mut self.state {
            State::Sgd { buf } => *buf = next(),
            State::Adam { m, v, t } => {
                *m = next();
                *v = next();
                *t = step;
            }
            State::DcAsgd { backups, mom, ms } => {
                for b in backups.iter_mut() {
                    *b = next();
                }
                *mom = next();
                *ms = next();
            }
        }
        Ok(())
    }

    /// One step: updates `params` in place from `grad` pushed by `sender` (ignored except by
    /// DC-ASGD, which then sets that sender's backup to the new parameters).
    pub fn step(
        &mut self,
        params: &mut [f32],
        grad: &[f32],
        sender: usize,
    ) -> Result<(), KernelError> {
        check_len(self.n, params.len())?;
        check_len(self.n, grad.len())?;
        match (&self.cfg, &mut self.state) {
            (OptimizerConfig::Sgd(c), State::Sgd { buf }) => sgd_step(c, buf, params, grad),
            (OptimizerConfig::Adam(c), State::Adam { m, v, t }) => {
                *t += 1;
                adam_step(c, *t, m, v, params, grad);
            }
            (OptimizerConfig::DcAsgd(c), State::DcAsgd { backups, mom, ms }) => {
                let senders = backups.len();
                let bak = backups
                    .get_mut(sender)
                    .ok_or(KernelError::UnknownSender { sender, senders })?;
                dcasgd_step(c, bak, mom, ms, params, grad);
            }
            _ => unreachable!("state always matches its configuration"),
        }
        Ok(())
    }
}

fn sgd_step(c: &SgdConfig, buf: &mut [f32], w: &mut [f32], g: &[f32]) {
    let (lr, mu, wd) = (c.lr, c.momentum, c.weight_decay);
    if mu == 0.0 {
        for (w, &g) in w.iter_mut().zip(g) {
            let d = if wd != 0.0 { g + wd * *w } else { g };
            *w -= lr * d;
        }
        return;
    }
    for ((w, b), &g) in w.iter_mut().zip(buf.iter_mut()).zip(g) {
        let d = if wd != 0.0 { g + wd * *w } else { g };
        *b = mu * *b + d;
        let d = if c.nesterov { d + mu * *b } else { *b };
        *w -= lr * d;
    }
}

fn adam_step(c: &AdamConfig, t: u64, m: &mut [f32], v: &mut [f32], w: &mut [f32], g: &[f32]) {
    let t = i32::try_from(t).unwrap_or(i32::MAX);
    let bc1 = (1.0 - f64::from(c.beta1).powi(t)) as f32;
    let bc2 = (1.0 - f64::from(c.beta2).powi(t)) as f32;
    let (b1, b2) = (c.beta1, c.beta2);
    for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let mut d = g;
        if c.weight_decay != 0.0 {
            if c.decoupled {
                *w -= c.lr * c.weight_decay * *w;
            } else {
                d += c.weight_decay * *w;
            }
        }
        *m = b1 * *m + (1.0 - b1) * d;
        *v = b2 * *v + (1.0 - b2) * d * d;
        let mhat = *m / bc1;
        let vhat = *v / bc2;
        *w -= c.lr * mhat / (vhat.sqrt() + c.eps);
    }
}

fn dcasgd_step(
    c: &DcAsgdConfig,
    bak: &mut [f32],
    mom: &mut [f32],
    ms: &mut [f32],
    w: &mut [f32],
    g: &[f32],
) {
    let (lr, mu, wd) = (c.lr, c.momentum, c.weight_decay);
    for i in 0..w.len() {
        let gi = g[i];
        let lambda = match c.lambda {
            DcAsgdLambda::Constant(l) => l,
            DcAsgdLambda::Adaptive {
                lambda0,
                decay,
                eps,
            } => {
                ms[i] = decay * ms[i] + (1.0 - decay) * gi * gi;
                lambda0 / (ms[i] + eps).sqrt()
            }
        };
        let mut d = gi;
        if wd != 0.0 {
            d += wd * w[i];
        }
        if lambda != 0.0 {
            d += lambda * gi * gi * (w[i] - bak[i]);
        }
        if mu != 0.0 {
            mom[i] = mu * mom[i] - lr * d;
            w[i] += mom[i];
        } else {
            w[i] -= lr * d;
        }
    }
    bak.copy_from_slice(w);
}

/// DiLoCo's Nesterov outer step at the global server, state v per range (starts at 0).
///
/// Given Δ = Σ_d (N_d/N)·(w̄_d − m), with Δ_out = −Δ: `v ← μ·v + Δ_out`,
/// increment `δ = −η_out·(Δ_out + μ·v)`; every copy then sets `m ← m + δ`. With μ = 0 the
/// velocity is not used, so η_out = 1, μ = 0 gives δ = Δ bit for bit (plain averaging).
#[derive(Debug, Clone)]
pub struct DilocoOuter {
    mu: f32,
    lr: f32,
    v: Vec<f32>,
}

impl DilocoOuter {
    /// Outer step for `n` parameters with momentum μ (default 0.9) and rate η_out (default 0.7).
    pub fn new(n: usize, mu: f32, lr: f32) -> Result<DilocoOuter, KernelError> {
        let lr_ok = lr.is_finite() && lr > 0.0;
        if !(0.0..1.0).contains(&mu) || !lr_ok {
            return Err(KernelError::InvalidConfig(format!(
                "outer momentum {mu} must be in [0, 1) and rate {lr} positive"
            )));
        }
        Ok(DilocoOuter {
            mu,
            lr,
            v: vec![0.0; n],
        })
    }

    /// The velocity v.
    pub fn velocity(&self) -> &[f32] {
        &self.v
    }

    /// Restores a velocity from [`DilocoOuter::velocity`] (checkpoints); a wrong length is
    /// refused and nothing changes.
    pub fn set_velocity(&mut self, v: Vec<f32>) -> Result<(), KernelError> {
        check_len(self.v.len(), v.len())?;
        self.v = v;
        Ok(())
    }

    /// Computes the increment δ from the weighted model delta Δ.
    pub fn increment(&mut self, delta: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        check_len(self.v.len(), delta.len())?;
        check_len(self.v.len(), out.len())?;
        let (mu, lr) = (self.mu, self.lr);
        for ((v, &d), o) in self.v.iter_mut().zip(delta).zip(out.iter_mut()) {
            let d_out = -d;
            if mu == 0.0 {
                *o = -(lr * d_out);
            } else {
                *v = mu * *v + d_out;
                *o = -(lr * (d_out + mu * *v));
            }
        }
        Ok(())
    }
}

/// `m ← m + δ` (what every copy of the milestone does with the increment).
pub fn apply_increment(m: &mut [f32], increment: &[f32]) -> Result<(), KernelError> {
    check_len(m.len(), increment.len())?;
    for (m, &d) in m.iter_mut().zip(increment) {
        *m += d;
    }
    Ok(())
}

#[cfg(test)]
#[path = "optim_tests.rs"]
mod tests;
