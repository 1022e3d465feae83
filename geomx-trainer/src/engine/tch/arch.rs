//! The libtorch architectures as parameter lists plus a functional forward pass: parameters are
//! plain tensors in key order, so the trainer's flat `Vec<f32>` per key is the only model state.
//!
//! - [`Arch::Cnn`]: GeoMX's demo CNN. conv 16@5×5 (ReLU) → max-pool 2 → conv 32@5×5 (ReLU) →
//!   max-pool 2 → dense 256 (ReLU) → dense 128 (ReLU) → dense classes. No padding, so images of
//!   side `s` reach the dense layers as `32 × q × q` with `q = ((s − 4)/2 − 4)/2` (4 for 28×28 MNIST,
//!   5 for 32×32 CIFAR); `s >= 16`.
//! - [`Arch::Resnet18`]: ResNet-18 for 32×32 images (the CIFAR variant: 3×3 stem of 64 channels,
//!   stride 1, no max-pool; four stages of two basic blocks with 64, 128, 256, 512 channels, strides
//!   1, 2, 2, 2, 1×1 projection shortcuts where the shape changes; global average pool; dense
//!   classes). Convolutions have no bias; batch norm has a learned scale and shift (parameters,
//!   synchronised like every key) and running statistics (buffers, kept by each process that
//!   trains: [`BnStats`]). As in PyTorch, training normalises with the batch's statistics and
//!   updates the running ones (momentum 0.1, unbiased variance); evaluation normalises with the
//!   running statistics ([`BnMode::Eval`]), so a sample's output does not depend on the others.

use tch::{Kind, Tensor};

use super::super::{EngineError, TensorSpec};
use crate::data::rng;

/// Batch-norm epsilon.
const BN_EPS: f64 = 1e-5;

/// The running mean and variance of every batch-norm layer, in forward order (PyTorch's
/// `running_mean` / `running_var` buffers; fresh: 0 and 1).
pub type BnStats = Vec<(Tensor, Tensor)>;

/// How a forward pass normalises in its batch-norm layers.
#[derive(Clone, Copy)]
pub enum BnMode<'a> {
    /// With the batch's statistics, updating nothing (a pure function of the parameters: the
    /// double-precision reference of the gradient checks).
    Batch,
    /// Training: with the batch's statistics, updating the running ones in place.
    Train(&'a BnStats),
    /// Evaluation: with the running statistics.
    Eval(&'a BnStats),
}

/// A libtorch architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// GeoMX's demo CNN.
    Cnn,
    /// ResNet-18 for small images.
    Resnet18,
}

/// Input image geometry: channels × side × side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    /// Channels (1 for MNIST, 3 for CIFAR).
    pub channels: usize,
    /// Side in pixels.
    pub side: usize,
}

impl ImageShape {
    /// The square image with 1 or 3 channels that has `features` values (`1·s²` or `3·s²`; the two
    /// never coincide since √3 is irrational).
    pub fn infer(features: usize) -> Option<ImageShape> {
        [1, 3].into_iter().find_map(|channels| {
            if features % channels != 0 {
                return None;
            }
            let area = features / channels;
            let side = (area as f64).sqrt().round() as usize;
            (side >= 1 && side * side == area).then_some(ImageShape { channels, side })
        })
    }

    /// Values per image.
    pub fn features(&self) -> usize {
        self.channels * self.side * self.side
    }
}

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// U(±bound).
    Uniform(f64),
    /// Constant.
    Const(f32),
}

/// Parameter list under construction.
struct Builder {
    specs: Vec<TensorSpec>,
    inits: Vec<Init>,
}

impl Builder {
    fn push(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.specs.push(TensorSpec { name, shape });
        self.inits.push(init);
    }

    /// A convolution `out × inp × k × k` (He-uniform, as for layers followed by ReLU) and, when
    /// `bias`, its bias (U(±1/√fan_in), PyTorch's default).
    fn conv(&mut self, name: &str, inp: usize, out: usize, k: usize, bias: bool) {
        let fan_in = (inp * k * k) as f64;
        self.push(
            format!("{name}.weight"),
            vec![out, inp, k, k],
            Init::Uniform((6.0 / fan_in).sqrt()),
        );
        if bias {
            self.push(
                format!("{name}.bias"),
                vec![out],
                Init::Uniform(1.0 / fan_in.sqrt()),
            );
        }
    }

    /// A dense layer `out × inp`: He-uniform weights when followed by ReLU, PyTorch's default
    /// U(±1/√fan_in) for the output layer; bias U(±1/√fan_in).
    fn dense(&mut self, name: &str, inp: usize, out: usize, relu: bool) {
        let fan_in = inp as f64;
        let bound = if relu {
            (6.0 / fan_in).sqrt()
        } else {
            1.0 / fan_in.sqrt()
        };
        self.push(
            format!("{name}.weight"),
            vec![out, inp],
            Init::Uniform(bound),
        );
        self.push(
            format!("{name}.bias"),
            vec![out],
            Init::Uniform(1.0 / fan_in.sqrt()),
        );
    }

    /// Batch norm: scale 1, shift 0.
    fn bn(&mut self, name: &str, channels: usize) {
        self.push(format!("{name}.weight"), vec![channels], Init::Const(1.0));
        self.push(format!("{name}.bias"), vec![channels], Init::Const(0.0));
    }
}

/// Residual stages of ResNet-18: (channels, stride of the first block).
const STAGES: [(usize, usize); 4] = [(64, 1), (128, 2), (256, 2), (512, 2)];

/// A built architecture: parameter specs, their initialisers, the input geometry and classes.
#[derive(Debug, Clone)]
pub struct Net {
    arch: Arch,
    image: ImageShape,
    classes: usize,
    specs: Vec<TensorSpec>,
    inits: Vec<Init>,
}

impl Net {
    /// Builds `arch` for `image` inputs and `classes` outputs.
    pub fn new(arch: Arch, image: ImageShape, classes: usize) -> Result<Net, EngineError> {
        if classes < 2 {
            return Err(EngineError::Architecture(format!(
                "{classes} classes; need at least 2"
            )));
        }
        let mut b = Builder {
            specs: Vec::new(),
            inits: Vec::new(),
        };
        match arch {
            Arch::Cnn => {
                let s = image.side;
                if s < 16 {
                    return Err(EngineError::Architecture(format!(
                        "the cnn needs images of side >= 16, got {}×{s}×{s}",
                        image.channels
                    )));
                }
                let q = ((s - 4) / 2 - 4) / 2;
                b.conv("conv1", image.channels, 16, 5, true);
                b.conv("conv2", 16, 32, 5, true);
                b.dense("fc1", 32 * q * q, 256, true);
                b.dense("fc2", 256, 128, true);
                b.dense("fc3", 128, classes, false);
            }
            Arch::Resnet18 => {
                if image.side < 8 {
                    return Err(EngineError::Architecture(format!(
                        "resnet18 needs images of side >= 8, got {}×{s}×{s}",
                        image.channels,
                        s = image.side
                    )));
                }
                b.conv("conv1", image.channels, 64, 3, false);
                b.bn("bn1", 64);
                let mut inp = 64;
                for (stage, &(out, stride)) in STAGES.iter().enumerate() {
                    for block in 0..2 {
                        let name = format!("layer{}.{block}", stage + 1);
                        let s = if block == 0 { stride } else { 1 };
                        b.conv(&format!("{name}.conv1"), inp, out, 3, false);
                        b.bn(&format!("{name}.bn1"), out);
                        b.conv(&format!("{name}.conv2"), out, out, 3, false);
                        b.bn(&format!("{name}.bn2"), out);
                        if s != 1 || inp != out {
                            b.conv(&format!("{name}.shortcut.conv"), inp, out, 1, false);
                            b.bn(&format!("{name}.shortcut.bn"), out);
                        }
                        inp = out;
                    }
                }
                b.dense("fc", 512, classes, false);
            }
        }
        Ok(Net {
            arch,
            image,
            classes,
            specs: b.specs,
            inits: b.inits,
        })
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Input geometry.
    pub fn image(&self) -> ImageShape {
        self.image
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Parameter specs in key order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Fresh running statistics (mean 0, variance 1) of every batch-norm layer, on `dev`; empty
    /// for an architecture without batch norm.
    pub fn bn_stats(&self, dev: tch::Device) -> BnStats {
        self.specs
            .iter()
            .filter(|s| s.name.contains("bn") && s.name.ends_with(".weight"))
            .map(|s| {
                let c = s.len() as i64;
                (
                    Tensor::zeros([c], (Kind::Float, dev)),
                    Tensor::ones([c], (Kind::Float, dev)),
                )
            })
            .collect()
    }

    /// Deterministic initial parameters: each tensor from its own stream of `(seed, key)`.
    pub fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        self.specs
            .iter()
            .zip(&self.inits)
            .enumerate()
            .map(|(key, (spec, init))| match *init {
                Init::Const(c) => vec![c; spec.len()],
                Init::Uniform(bound) => {
                    let mut r = rng::rng_for(seed, &[0x5443_4849, key as u64]);
                    (0..spec.len())
                        .map(|_| ((2.0 * rng::unit_f64(&mut r) - 1.0) * bound) as f32)
                        .collect()
                }
            })
            .collect()
    }

    /// Logits `[n, classes]` of `x` (`[n, c, s, s]`) under parameters `p` (key order, shaped),
    /// batch norm as `mode` says (its statistics must come from [`Net::bn_stats`] on `x`'s
    /// device, in the parameters' kind).
    pub fn forward(&self, p: &[Tensor], x: &Tensor, mode: BnMode<'_>) -> Tensor {
        self.forward_in(p, x, mode, None)
    }

    /// [`Net::forward`] with convolutions and dense layers computed in `compute` (`BFloat16` or
    /// `Half`) when given: the input and those layers' parameters are cast to it, batch norm
    /// takes the low-precision activations with its `f32` parameters and statistics (libtorch's
    /// mixed batch norm), and the logits come back as `f32`. The parameters stay `f32` leaves, so
    /// their gradients are `f32` (master weights).
    pub fn forward_in(
        &self,
        p: &[Tensor],
        x: &Tensor,
        mode: BnMode<'_>,
        compute: Option<Kind>,
    ) -> Tensor {
        self.forward_reaching(p, x, mode, compute, None, &mut |_| {})
    }

    /// [`Net::forward_in`] cut into stages for a backward pass stage by stage: at each stage
    /// boundary (after each layer of the CNN; after the stem and each of the four stages of two
    /// residual blocks of ResNet-18: every cut costs a pass of the autograd engine)
    /// the activation is replaced by a leaf tensor that requires its gradient, and `cuts` gets
    /// `(keys, activation, leaf)`: the number of parameters used before the boundary, the
    /// activation the previous stage produced and the leaf the next stage starts from.
    pub fn forward_staged(
        &self,
        p: &[Tensor],
        x: &Tensor,
        mode: BnMode<'_>,
        compute: Option<Kind>,
        cuts: &mut Vec<(usize, Tensor, Tensor)>,
    ) -> Tensor {
        self.forward_reaching(p, x, mode, compute, Some(cuts), &mut |_| {})
    }

    /// [`Net::forward_in`], or [`Net::forward_staged`] when `cuts` is given, calling `reach(k)`
    /// just before key `k`'s tensor is first used (keys come in key order, a layer's after the
    /// layers below it have been computed): a gated step ([`crate::engine::Model::backward_gated`])
    /// brings a layer's parameters up to date there, in place.
    pub fn forward_reaching(
        &self,
        p: &[Tensor],
        x: &Tensor,
        mode: BnMode<'_>,
        compute: Option<Kind>,
        mut cuts: Option<&mut Vec<(usize, Tensor, Tensor)>>,
        reach: &mut dyn FnMut(usize),
    ) -> Tensor {
        let mut cut = |a: Tensor, keys: usize| match cuts.as_deref_mut() {
            Some(cuts) => {
                let leaf = a.detach().set_requires_grad(true);
                cuts.push((keys, a, leaf.shallow_clone()));
                leaf
            }
            None => a,
        };
        let low = |t: &Tensor| match compute {
            Some(k) => t.to_kind(k),
            None => t.shallow_clone(),
        };
        let x = &low(x);
        let logits = self.forward_cast(p, x, mode, &low, &mut cut, reach);
        match compute {
            Some(_) => logits.to_kind(Kind::Float),
            None => logits,
        }
    }

    /// The layers of [`Net::forward_in`]; `low` casts a convolution's or dense layer's parameter.
    /// `cut(x, keys)` is called at each stage boundary with the activation and the number of
    /// parameters used before it; the forward pass continues from what it returns. `reach(k)`
    /// comes just before key `k` is taken for its first use.
    fn forward_cast(
        &self,
        p: &[Tensor],
        x: &Tensor,
        mode: BnMode<'_>,
        low: &dyn Fn(&Tensor) -> Tensor,
        cut: &mut dyn FnMut(Tensor, usize) -> Tensor,
        reach: &mut dyn FnMut(usize),
    ) -> Tensor {
        let mut it = p.iter();
        let layer = std::cell::Cell::new(0usize);
        let used = std::cell::Cell::new(0usize);
        let mut next = || {
            reach(used.get());
            used.set(used.get() + 1);
            it.next().expect("parameter count checked by the caller")
        };
        match self.arch {
            Arch::Cnn => {
                let conv = |x: &Tensor, w: &Tensor, b: &Tensor| {
                    x.conv2d(&low(w), Some(&low(b)), [1, 1], [0, 0], [1, 1], 1)
                        .relu()
                        .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
                };
                let x = cut(conv(x, next(), next()), used.get());
                let x = cut(conv(&x, next(), next()).flatten(1, -1), used.get());
                let dense = |x: &Tensor, w: &Tensor, b: &Tensor| x.linear(&low(w), Some(&low(b)));
                let x = cut(dense(&x, next(), next()).relu(), used.get());
                let x = cut(dense(&x, next(), next()).relu(), used.get());
                dense(&x, next(), next())
            }
            Arch::Resnet18 => {
                let bn = |x: &Tensor, w: &Tensor, b: &Tensor| {
                    let i = layer.get();
                    layer.set(i + 1);
                    let (stats, training) = match mode {
                        BnMode::Batch => (None, true),
                        BnMode::Train(s) => (s.get(i), true),
                        BnMode::Eval(s) => (s.get(i), false),
                    };
                    x.batch_norm(
                        Some(w),
                        Some(b),
                        stats.map(|s| &s.0),
                        stats.map(|s| &s.1),
                        training || stats.is_none(),
                        0.1,
                        BN_EPS,
                        true,
                    )
                };
                let conv = |x: &Tensor, w: &Tensor, stride: i64| {
                    let pad = w.size()[2] / 2;
                    x.conv2d(
                        &low(w),
                        None::<&Tensor>,
                        [stride, stride],
                        [pad, pad],
                        [1, 1],
                        1,
                    )
                };
                let w = next();
                let mut x = cut(bn(&conv(x, w, 1), next(), next()).relu(), used.get());
                let mut inp = 64;
                for &(out, stride) in &STAGES {
                    for block in 0..2 {
                        let s = if block == 0 { stride as i64 } else { 1 };
                        let w1 = next();
                        let h = bn(&conv(&x, w1, s), next(), next()).relu();
                        let w2 = next();
                        let h = bn(&conv(&h, w2, 1), next(), next());
                        let short = if s != 1 || inp != out {
                            let ws = next();
                            bn(&conv(&x, ws, s), next(), next())
                        } else {
                            x.shallow_clone()
                        };
                        x = (h + short).relu();
                        if block == 1 {
                            x = cut(x, used.get());
                        }
                        inp = out;
                    }
                }
                let x = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
                let (w, b) = (next(), next());
                x.linear(&low(w), Some(&low(b)))
            }
        }
    }
}

/// Mean softmax cross-entropy of `logits` against `labels` (int64), computed in `kind`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, kind: Kind) -> Tensor {
    logits.log_softmax(-1, kind).nll_loss(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_shapes_are_inferred_from_feature_counts() {
        let s = |c, side| Some(ImageShape { channels: c, side });
        assert_eq!(ImageShape::infer(784), s(1, 28));
        assert_eq!(ImageShape::infer(3_072), s(3, 32));
        assert_eq!(ImageShape::infer(256), s(1, 16));
        assert_eq!(ImageShape::infer(3 * 256), s(3, 16));
        assert_eq!(ImageShape::infer(785), None);
        assert_eq!(ImageShape::infer(64).unwrap().features(), 64);
    }

    #[test]
    fn cnn_shapes_follow_the_geomx_demo() {
        let mnist = Net::new(Arch::Cnn, ImageShape::infer(784).unwrap(), 10).unwrap();
        let shapes: Vec<Vec<usize>> = mnist.specs().iter().map(|s| s.shape.clone()).collect();
        assert_eq!(
            shapes,
            vec![
                vec![16, 1, 5, 5],
                vec![16],
                vec![32, 16, 5, 5],
                vec![32],
                vec![256, 512],
                vec![256],
                vec![128, 256],
                vec![128],
                vec![10, 128],
                vec![10],
            ]
        );
        // 416 + 12,832 + 131,328 + 32,896 + 1,290 parameters.
        let total: usize = mnist.specs().iter().map(TensorSpec::len).sum();
        assert_eq!(total, 178_762);
        let cifar = Net::new(Arch::Cnn, ImageShape::infer(3_072).unwrap(), 10).unwrap();
        assert_eq!(cifar.specs()[0].shape, vec![16, 3, 5, 5]);
        assert_eq!(cifar.specs()[4].shape, vec![256, 800]);
        assert!(Net::new(Arch::Cnn, ImageShape::infer(225).unwrap(), 10).is_err());
        assert!(Net::new(Arch::Cnn, ImageShape::infer(784).unwrap(), 1).is_err());
    }

    #[test]
    fn resnet18_has_the_published_parameter_count() {
        // torchvision-style CIFAR ResNet-18 with 10 classes: 11,173,962 parameters.
        let net = Net::new(Arch::Resnet18, ImageShape::infer(3_072).unwrap(), 10).unwrap();
        let total: usize = net.specs().iter().map(TensorSpec::len).sum();
        assert_eq!(total, 11_173_962);
        assert_eq!(net.specs()[0].name, "conv1.weight");
        assert_eq!(net.specs().last().unwrap().name, "fc.bias");
        let shortcuts = net
            .specs()
            .iter()
            .filter(|s| s.name.ends_with("shortcut.conv.weight"))
            .count();
        assert_eq!(shortcuts, 3);
    }

    #[test]
    fn init_is_deterministic_per_seed_and_key() {
        let net = Net::new(Arch::Cnn, ImageShape::infer(256).unwrap(), 10).unwrap();
        let a = net.init(5);
        assert_eq!(a, net.init(5));
        assert_ne!(a[0], net.init(6)[0]);
        for (spec, t) in net.specs().iter().zip(&a) {
            assert_eq!(spec.len(), t.len());
        }
        // conv1: fan_in 25, He bound √(6/25) ≈ 0.49; values fill the range.
        let max = a[0].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= (6.0f32 / 25.0).sqrt() && max > 0.4, "{max}");
    }
}
