//! HFA's drift correction: SCAFFOLD's control variates (Karimireddy et al., "SCAFFOLD:
//! Stochastic Controlled Averaging for Federated Learning", ICML 2020, option II), per worker,
//! derived from the models HFA already exchanges (`[sync.hfa] correction = "scaffold"`).
//!
//! When each data center holds different data (non-IID), the local steps between two global
//! averagings pull the DCs' models apart. Each worker keeps two vectors per tensor: its own
//! variate c_w and the global one c, both zero at the start. Every local step uses the corrected
//! gradient g + c − c_w. At a global averaging from milestone x, where the worker's model had
//! reached y and the new milestone is x⁺:
//!
//! - c_w ← c_w − c + (x − y) / (K·η),
//! - c ← (x − x⁺) / (K·η),
//!
//! with K = k1·k2 local steps per global averaging and η = lr / (1 − momentum), the step an SGD
//! with momentum takes per unit of gradient in its steady state. The second line is the mean of
//! every worker's new c_w when the milestone moves by the plain average of the workers' models
//! (SCAFFOLD's c = mean c_i, kept without sending the variates: no extra bytes on any tier).
//! Every input is a value every process already holds bit for bit, so a distributed run equals
//! the single-process reference ([`super::reference_hfa`]) exactly. A worker that starts afresh
//! (a restart) starts with zero variates; a checkpoint keeps them.

use crate::config::{HfaConfig, HfaCorrection, OptimizerConfig};

/// One worker's control variates, per tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVariates {
    /// c_w per tensor.
    own: Vec<Vec<f32>>,
    /// c per tensor.
    global: Vec<Vec<f32>>,
    /// 1 / (K·η).
    scale: f32,
}

impl ControlVariates {
    /// Zero variates for tensors of `lens` elements, with `steps` local steps per global
    /// averaging (K ≥ 1) and an SGD of learning rate `lr` and momentum `momentum` (in \[0, 1)).
    pub fn new(lens: &[usize], steps: u64, lr: f32, momentum: f32) -> Self {
        let eta = lr / (1.0 - momentum);
        Self {
            own: lens.iter().map(|&n| vec![0.0; n]).collect(),
            global: lens.iter().map(|&n| vec![0.0; n]).collect(),
            scale: 1.0 / (steps.max(1) as f32 * eta),
        }
    }

    /// The variates `hfa` asks for (`correction = "scaffold"`, which the configuration allows
    /// with SGD only), zero, for tensors of `lens` elements; `None` without a correction.
    pub fn of(hfa: &HfaConfig, optimizer: &OptimizerConfig, lens: &[usize]) -> Option<Self> {
        match (hfa.correction, optimizer) {
            (HfaCorrection::Scaffold, OptimizerConfig::Sgd(s)) => Some(Self::new(
                lens,
                hfa.k1.max(1) * hfa.k2.max(1),
                s.lr,
                s.momentum,
            )),
            _ => None,
        }
    }

    /// The corrected gradient of tensor `t`: g ← g + c − c_w.
    pub fn correct(&self, t: usize, g: &mut [f32]) {
        for ((x, c), cw) in g.iter_mut().zip(&self.global[t]).zip(&self.own[t]) {
            *x = *x + c - cw;
        }
    }

    /// After a global averaging of tensor `t`: the milestone was `x`, this worker's model had
    /// reached `y`, the milestone is now `x_new`.
    pub fn update(&mut self, t: usize, x: &[f32], y: &[f32], x_new: &[f32]) {
        let s = self.scale;
        let (own, global) = (&mut self.own[t], &mut self.global[t]);
        for i in 0..own.len() {
            own[i] = own[i] - global[i] + (x[i] - y[i]) * s;
            global[i] = (x[i] - x_new[i]) * s;
        }
    }

    /// Tensor `t` starts again from zero (its model was not finite).
    pub fn reset(&mut self, t: usize) {
        self.own[t].fill(0.0);
        self.global[t].fill(0.0);
    }

    /// Tensor `t`'s (c_w, c), for a checkpoint.
    pub fn tensor(&self, t: usize) -> (&[f32], &[f32]) {
        (&self.own[t], &self.global[t])
    }

    /// Restores tensor `t` from a checkpoint; false (nothing changed) if a length differs.
    pub fn restore(&mut self, t: usize, own: Vec<f32>, global: Vec<f32>) -> bool {
        if own.len() != self.own[t].len() || global.len() != self.global[t].len() {
            return false;
        }
        (self.own[t], self.global[t]) = (own, global);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variates_follow_scaffolds_option_two() {
        // K = 2 steps, lr 0.1, momentum 0.5: η = 0.2, 1/(Kη) = 2.5.
        let mut cv = ControlVariates::new(&[2], 2, 0.1, 0.5);
        let mut g = vec![1.0, -1.0];
        cv.correct(0, &mut g);
        assert_eq!(g, [1.0, -1.0], "zero variates change nothing");
        // x = [1, 1], y = [0.5, 1.5], x⁺ = [0.75, 1.0].
        cv.update(0, &[1.0, 1.0], &[0.5, 1.5], &[0.75, 1.0]);
        let (own, global) = cv.tensor(0);
        assert_eq!(own, [1.25, -1.25]);
        assert_eq!(global, [0.625, 0.0]);
        let mut g = vec![1.0, -1.0];
        cv.correct(0, &mut g);
        assert_eq!(g, [1.0 + 0.625 - 1.25, -1.0 + 1.25]);
        // The next update subtracts the old c from c_w.
        cv.update(0, &[0.75, 1.0], &[0.75, 1.0], &[0.75, 1.0]);
        assert_eq!(cv.tensor(0), (&[1.25 - 0.625, -1.25][..], &[0.0, 0.0][..]));
        cv.reset(0);
        assert_eq!(cv.tensor(0), (&[0.0, 0.0][..], &[0.0, 0.0][..]));
        assert!(!cv.restore(0, vec![1.0], vec![1.0, 2.0]));
        assert!(cv.restore(0, vec![1.0, 2.0], vec![3.0, 4.0]));
        assert_eq!(cv.tensor(0), (&[1.0, 2.0][..], &[3.0, 4.0][..]));
    }

    /// With every worker's c_w started at zero and the milestone moved by the plain average, c
    /// stays the mean of the workers' c_w (SCAFFOLD's invariant) without sending them.
    #[test]
    fn the_global_variate_is_the_mean_of_the_workers_under_plain_averaging() {
        let mut w: Vec<ControlVariates> = (0..4)
            .map(|_| ControlVariates::new(&[3], 4, 0.5, 0.0))
            .collect();
        let mut x = vec![0.5f32, -0.25, 1.0];
        for period in 0..3 {
            let ys: Vec<Vec<f32>> = (0..4)
                .map(|i| {
                    x.iter()
                        .enumerate()
                        .map(|(j, v)| v - 0.125 * (i + j + period) as f32)
                        .collect()
                })
                .collect();
            let x_new: Vec<f32> = (0..3)
                .map(|j| ys.iter().map(|y| y[j]).sum::<f32>() / 4.0)
                .collect();
            for (cv, y) in w.iter_mut().zip(&ys) {
                cv.update(0, &x, y, &x_new);
            }
            for j in 0..3 {
                let mean: f32 = w.iter().map(|cv| cv.tensor(0).0[j]).sum::<f32>() / 4.0;
                let c = w[0].tensor(0).1[j];
                assert!((mean - c).abs() <= 1e-5, "period {period}: {mean} vs {c}");
            }
            x = x_new;
        }
    }
}
