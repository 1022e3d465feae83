//! Mixed precision (`model.precision`): the compute kind and the dynamic loss scale of fp16.
//!
//! [`LossScaler`] follows PyTorch's `torch.amp.GradScaler` with its defaults: the loss is
//! multiplied by the scale (initially 2^16) before the backward pass and the gradients are divided
//! by it afterwards. Gradients that hold an infinity or NaN halve the scale; 2,000 finite steps in
//! a row double it. The scale lives on the host, so the sequence of scales is the same on every
//! run.
//!
//! Unlike GradScaler, an overflowed step is not skipped but recomputed at the halved scale (at most
//! [`MAX_RECOMPUTES`] times): a worker of a parameter server cannot skip a round, and pushing
//! zeros instead would still move the model, since the server's optimizer applies its momentum
//! to every round (measured: skipping with zero pushes made an SGD-momentum CNN run diverge where
//! fp32 converged). A non-finite loss is not retried; its gradients go to the worker's
//! non-finite policy.

use tch::{Kind, Tensor};

use crate::config::Precision;

/// The libtorch kind convolutions and dense layers compute in, `None` for `f32`.
pub(super) fn compute_kind(p: Precision) -> Option<Kind> {
    match p {
        Precision::Fp32 => None,
        Precision::Bf16 => Some(Kind::BFloat16),
        Precision::Fp16Amp => Some(Kind::Half),
    }
}

/// The scale a run starts with (GradScaler's `init_scale`).
pub const INIT_SCALE: f64 = 65536.0;
/// Finite steps in a row after which the scale doubles (GradScaler's `growth_interval`).
pub const GROWTH_INTERVAL: u32 = 2000;
/// Most backward passes of one step recomputed after an overflow (the scale falls by 2^16 at
/// most; gradients that still overflow are returned as they are).
pub const MAX_RECOMPUTES: u32 = 16;

/// A dynamic loss scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    scale: f64,
    /// Finite steps since the last change of the scale.
    good: u32,
    /// Backward passes whose gradients overflowed.
    overflows: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: INIT_SCALE,
            good: 0,
            overflows: 0,
        }
    }
}

impl LossScaler {
    /// The factor the next loss is multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// A scaler starting at `scale` (tests: force an overflow).
    #[cfg(test)]
    pub(super) fn starting_at(scale: f64) -> LossScaler {
        LossScaler {
            scale,
            ..LossScaler::default()
        }
    }

    /// Backward passes whose gradients overflowed so far.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Records one backward pass: `finite` says whether all its gradients were finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good += 1;
            if self.good >= GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(f64::MIN_POSITIVE);
            self.good = 0;
            self.overflows += 1;
        }
    }

    /// Divides the gradients of a loss multiplied by [`LossScaler::scale`] by it and updates the
    /// scale. Returns whether every element was finite.
    pub(super) fn unscale(&mut self, grads: &mut [Tensor]) -> bool {
        let inv = 1.0 / self.scale;
        for g in grads.iter_mut() {
            let _ = g.g_mul_scalar_(inv);
        }
        // One flag per key, then a single device → host transfer.
        let flags: Vec<Tensor> = grads.iter().map(|g| g.isfinite().all()).collect();
        let finite = flags.is_empty() || Tensor::stack(&flags, 0).all().int64_value(&[]) != 0;
        self.update(finite);
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = LossScaler::default();
        s.update(false);
        assert_eq!((s.scale(), s.overflows()), (INIT_SCALE / 2.0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s.scale(), INIT_SCALE / 2.0);
        s.update(true);
        assert_eq!(s.scale(), INIT_SCALE);
        // An overflow resets the count of finite steps.
        for _ in 0..10 {
            s.update(true);
        }
        s.update(false);
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!((s.scale(), s.overflows()), (INIT_SCALE / 2.0, 2));
    }

    #[test]
    fn unscaling_divides_the_gradients_and_detects_overflow() {
        let mut s = LossScaler::default();
        let mut g = vec![
            Tensor::from_slice(&[65536.0f32, -131072.0]),
            Tensor::from_slice(&[32768.0f32]),
        ];
        assert!(s.unscale(&mut g));
        assert_eq!(Vec::<f32>::try_from(&g[0]).unwrap(), vec![1.0, -2.0]);
        assert_eq!(Vec::<f32>::try_from(&g[1]).unwrap(), vec![0.5]);
        let mut g = vec![
            Tensor::from_slice(&[1.0f32, 2.0]),
            Tensor::from_slice(&[f32::INFINITY]),
        ];
        assert!(!s.unscale(&mut g));
        assert_eq!(
            Vec::<f32>::try_from(&g[0]).unwrap(),
            vec![1.0 / INIT_SCALE as f32, 2.0 / INIT_SCALE as f32]
        );
        assert_eq!((s.scale(), s.overflows()), (INIT_SCALE / 2.0, 1));
        let mut g = vec![Tensor::from_slice(&[f32::NAN])];
        assert!(!s.unscale(&mut g));
        assert_eq!(s.scale(), INIT_SCALE / 4.0);
    }
}
