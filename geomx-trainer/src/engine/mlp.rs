//! The built-in CPU engine: a multi-layer perceptron with ReLU hidden layers and softmax
//! cross-entropy, matrix products through `matrixmultiply::sgemm`.
//!
//! Layer `l` maps `sizes[l]` inputs to `sizes[l + 1]` outputs with keys `2l` (`fc{l}.weight`, shape
//! `[out, in]`, row-major) and `2l + 1` (`fc{l}.bias`, shape `[out]`). Gradients are means over the
//! batch.

use super::gemm::{gemm, Layout};
use super::{check_batch, check_params, EngineError, Evaluation, LayerGate, Model, TensorSpec};
use crate::data::{rng, Samples};

/// Rows per chunk when evaluating large data sets.
const EVAL_CHUNK: usize = 512;
/// Most parameters of one MLP (2^32 − 1, 16 GiB of f32): a larger one is refused by name
/// rather than overflowing a size or failing an allocation.
pub const MAX_PARAMS: usize = u32::MAX as usize;

/// A ReLU multi-layer perceptron.
#[derive(Debug, Clone)]
pub struct Mlp {
    sizes: Vec<usize>,
    specs: Vec<TensorSpec>,
    /// Emulated compute per layer (`model.layer_delay_ms`).
    delays: Vec<std::time::Duration>,
}

impl Mlp {
    /// An MLP with `inputs` features, the given hidden layer widths and `classes` outputs.
    pub fn new(inputs: usize, hidden: &[usize], classes: usize) -> Result<Self, EngineError> {
        let mut sizes = vec![inputs];
        sizes.extend_from_slice(hidden);
        sizes.push(classes);
        if let Some(i) = sizes.iter().position(|&s| s == 0) {
            return Err(EngineError::Architecture(format!(
                "layer size {i} of {sizes:?} is zero"
            )));
        }
        if classes < 2 {
            return Err(EngineError::Architecture(format!(
                "{classes} classes; need at least 2"
            )));
        }
        let params = sizes.windows(2).try_fold(0usize, |n, w| {
            w[0].checked_add(1)?.checked_mul(w[1])?.checked_add(n)
        });
        if params.is_none_or(|n| n > MAX_PARAMS) {
            return Err(EngineError::Architecture(format!(
                "layer sizes {sizes:?} give more than {MAX_PARAMS} parameters, the most the \
                 built-in MLP takes"
            )));
        }
        let specs = sizes
            .windows(2)
            .enumerate()
            .flat_map(|(l, w)| {
                [
                    TensorSpec {
                        name: format!("fc{l}.weight"),
                        shape: vec![w[1], w[0]],
                    },
                    TensorSpec {
                        name: format!("fc{l}.bias"),
                        shape: vec![w[1]],
                    },
                ]
            })
            .collect();
        Ok(Self {
            sizes,
            specs,
            delays: Vec::new(),
        })
    }

    /// The same MLP with emulated compute: a training step sleeps `delays[l]` before layer l's
    /// forward pass and twice that before its backward pass (`model.layer_delay_ms`; missing
    /// layers: none). Values are unchanged; evaluation does not sleep.
    pub fn with_layer_delays(mut self, delays: Vec<std::time::Duration>) -> Self {
        self.delays = delays;
        self
    }

    /// Sleeps `times` × layer `l`'s emulated compute, if any.
    fn emulate(&self, l: usize, times: u32) {
        if let Some(d) = self.delays.get(l).filter(|d| !d.is_zero()) {
            std::thread::sleep(*d * times);
        }
    }

    /// Layer widths: inputs, hidden layers, classes.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    fn layers(&self) -> usize {
        self.sizes.len() - 1
    }

    fn inputs(&self) -> usize {
        self.sizes[0]
    }

    fn classes(&self) -> usize {
        self.sizes[self.layers()]
    }

    /// Validates params and batch shape; returns the number of samples.
    fn check(&self, params: &[Vec<f32>], batch: &Samples<'_>) -> Result<usize, EngineError> {
        check_batch(&self.specs, params, self.inputs(), self.classes(), batch)
    }

    /// Outputs of every layer for `n` rows of `x`: ReLU activations of the hidden layers, then the
    /// logits.
    fn forward_all(&self, params: &[Vec<f32>], x: &[f32], n: usize) -> Vec<Vec<f32>> {
        let outs: Result<_, std::convert::Infallible> =
            self.forward_layers(x, |l, input| Ok(self.layer_forward(l, params, input, n)));
        outs.unwrap_or_else(|e| match e {})
    }

    /// Every layer's output in forward order: `layer(l, input)` computes layer l from the
    /// previous layer's output (`x` for layer 0).
    fn forward_layers<E, F>(&self, x: &[f32], mut layer: F) -> Result<Vec<Vec<f32>>, E>
    where
        F: FnMut(usize, &[f32]) -> Result<Vec<f32>, E>,
    {
        let mut outs: Vec<Vec<f32>> = Vec::with_capacity(self.layers());
        for l in 0..self.layers() {
            let input: &[f32] = if l == 0 { x } else { &outs[l - 1] };
            let z = layer(l, input)?;
            outs.push(z);
        }
        Ok(outs)
    }

    /// Output of layer `l` for `n` rows of `input`: ReLU(input · Wᵀ + b), or the logits for the
    /// last layer.
    fn layer_forward(&self, l: usize, params: &[Vec<f32>], input: &[f32], n: usize) -> Vec<f32> {
        let (fan_in, fan_out) = (self.sizes[l], self.sizes[l + 1]);
        let bias = &params[2 * l + 1];
        let mut z: Vec<f32> = Vec::with_capacity(n * fan_out);
        for _ in 0..n {
            z.extend_from_slice(bias);
        }
        gemm(
            input,
            Layout::row_major(n, fan_in),
            &params[2 * l],
            Layout::transposed(fan_out, fan_in),
            1.0,
            &mut z,
        );
        if l + 1 < self.layers() {
            z.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        z
    }

    /// The backward pass from the forward outputs `outs` of `batch` (`n` samples): gradients to
    /// `on_grad`, last layer first. Returns the mean loss.
    fn backward_from(
        &self,
        params: &[Vec<f32>],
        batch: &Samples<'_>,
        n: usize,
        mut outs: Vec<Vec<f32>>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> f32 {
        let classes = self.classes();
        let mut delta = outs.pop().unwrap_or_default();
        let loss = softmax_xent(&mut delta, batch.labels, classes) / n as f64;
        // delta = (softmax - onehot) / n: the gradient of the mean loss w.r.t. the logits.
        let inv_n = 1.0 / n as f32;
        for (row, &label) in delta.chunks_exact_mut(classes).zip(batch.labels) {
            row[label as usize] -= 1.0;
            row.iter_mut().for_each(|v| *v *= inv_n);
        }
        for l in (0..self.layers()).rev() {
            self.emulate(l, 2);
            let (fan_in, fan_out) = (self.sizes[l], self.sizes[l + 1]);
            let input: &[f32] = if l == 0 { batch.features } else { &outs[l - 1] };
            // Bias gradient: column sums of delta.
            let mut db = vec![0f32; fan_out];
            for row in delta.chunks_exact(fan_out) {
                db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
            }
            // Weight gradient: delta^T (out × n) · input (n × in).
            let mut dw = vec![0f32; fan_out * fan_in];
            gemm(
                &delta,
                Layout::transposed(n, fan_out),
                input,
                Layout::row_major(n, fan_in),
                0.0,
                &mut dw,
            );
            // Input gradient (before this layer's weights are handed out).
            let next_delta = if l > 0 {
                let mut d = vec![0f32; n * fan_in];
                gemm(
                    &delta,
                    Layout::row_major(n, fan_out),
                    &params[2 * l],
                    Layout::row_major(fan_out, fan_in),
                    0.0,
                    &mut d,
                );
                // ReLU: pass the gradient where the activation was positive.
                d.iter_mut().zip(input).for_each(|(g, &a)| {
                    if a <= 0.0 {
                        *g = 0.0;
                    }
                });
                Some(d)
            } else {
                None
            };
            on_grad(2 * l + 1, db);
            on_grad(2 * l, dw);
            if let Some(d) = next_delta {
                delta = d;
            }
        }
        loss as f32
    }
}

/// Per-row softmax cross-entropy: returns the summed loss (f64) and writes the softmax
/// probabilities into `logits` in place.
fn softmax_xent(logits: &mut [f32], labels: &[u32], classes: usize) -> f64 {
    let mut total = 0f64;
    for (row, &label) in logits.chunks_exact_mut(classes).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let shifted_label = f64::from(row[label as usize] - max);
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        total += f64::from(sum.ln()) - shifted_label;
        row.iter_mut().for_each(|v| *v /= sum);
    }
    total
}

/// Index of the largest logit in each row (first on ties).
fn argmax_rows(logits: &[f32], classes: usize) -> impl Iterator<Item = usize> + '_ {
    logits.chunks_exact(classes).map(|row| {
        let mut best = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = j;
            }
        }
        best
    })
}

impl Model for Mlp {
    fn tensors(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// `layers.{2l}.weight` / `layers.{2l}.bias` for layer l: a module whose `layers` is an
    /// `nn.Sequential` of `Linear` layers with a `ReLU` between each two (docs/architecture.md,
    /// "Model export").
    fn export_names(&self) -> Vec<String> {
        (0..self.layers())
            .flat_map(|l| {
                [
                    format!("layers.{}.weight", 2 * l),
                    format!("layers.{}.bias", 2 * l),
                ]
            })
            .collect()
    }

    /// Weights: He-uniform `U(±√(6/fan_in))` for hidden layers, Glorot-uniform
    /// `U(±√(6/(fan_in + fan_out)))` for the output layer; biases zero. Each tensor has its own
    /// stream derived from `(seed, key)`, so a range of one tensor can be rebuilt alone.
    fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut params = Vec::with_capacity(self.specs.len());
        for l in 0..self.layers() {
            let (fan_in, fan_out) = (self.sizes[l], self.sizes[l + 1]);
            let bound = if l + 1 < self.layers() {
                (6.0 / fan_in as f64).sqrt()
            } else {
                (6.0 / (fan_in + fan_out) as f64).sqrt()
            };
            let mut r = rng::rng_for(seed, &[0x494e_4954, 2 * l as u64]);
            let w = (0..fan_in * fan_out)
                .map(|_| ((2.0 * rng::unit_f64(&mut r) - 1.0) * bound) as f32)
                .collect();
            params.push(w);
            params.push(vec![0.0; fan_out]);
        }
        params
    }

    fn forward(&self, params: &[Vec<f32>], features: &[f32]) -> Result<Vec<f32>, EngineError> {
        check_params(&self.specs, params)?;
        if features.len() % self.inputs() != 0 {
            return Err(EngineError::Ragged {
                values: features.len(),
                samples: features.len() / self.inputs(),
                n_features: self.inputs(),
            });
        }
        let n = features.len() / self.inputs();
        Ok(self
            .forward_all(params, features, n)
            .pop()
            .unwrap_or_default())
    }

    fn backward_layerwise(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<f32, EngineError> {
        let n = self.check(params, &batch)?;
        if n == 0 {
            return Err(EngineError::EmptyBatch);
        }
        let outs: Result<_, EngineError> = self.forward_layers(batch.features, |l, input| {
            self.emulate(l, 1);
            Ok(self.layer_forward(l, params, input, n))
        });
        Ok(self.backward_from(params, &batch, n, outs?, on_grad))
    }

    fn tensor_layers(&self) -> Vec<usize> {
        (0..2 * self.layers()).map(|k| k / 2).collect()
    }

    fn backward_gated(
        &self,
        params: &mut [Vec<f32>],
        batch: Samples<'_>,
        ready: &mut LayerGate<'_>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<f32, EngineError> {
        let n = self.check(params, &batch)?;
        if n == 0 {
            return Err(EngineError::EmptyBatch);
        }
        // Layer l computes as soon as its own parameters are current.
        let outs = self.forward_layers(batch.features, |l, input| {
            ready(l, params)?;
            self.emulate(l, 1);
            Ok(self.layer_forward(l, params, input, n))
        })?;
        // A parameter list whose lengths `ready` changed is refused before the backward pass.
        self.check(params, &batch)?;
        Ok(self.backward_from(params, &batch, n, outs, on_grad))
    }

    fn evaluate(&self, params: &[Vec<f32>], data: Samples<'_>) -> Result<Evaluation, EngineError> {
        let n = self.check(params, &data)?;
        let classes = self.classes();
        let (mut loss, mut correct) = (0f64, 0usize);
        for start in (0..n).step_by(EVAL_CHUNK) {
            let end = (start + EVAL_CHUNK).min(n);
            let x = &data.features[start * data.n_features..end * data.n_features];
            let labels = &data.labels[start..end];
            let mut logits = self
                .forward_all(params, x, end - start)
                .pop()
                .unwrap_or_default();
            correct += argmax_rows(&logits, classes)
                .zip(labels)
                .filter(|(p, &l)| *p == l as usize)
                .count();
            loss += softmax_xent(&mut logits, labels, classes);
        }
        let denom = n.max(1) as f64;
        Ok(Evaluation {
            loss: loss / denom,
            accuracy: correct as f64 / denom,
            samples: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    /// Independent f64 reference: naive loops, mean softmax cross-entropy.
    fn reference_loss(sizes: &[usize], params: &[Vec<f64>], x: &[f64], labels: &[u32]) -> f64 {
        let n = labels.len();
        let mut total = 0.0;
        for s in 0..n {
            let mut a: Vec<f64> = x[s * sizes[0]..(s + 1) * sizes[0]].to_vec();
            for l in 0..sizes.len() - 1 {
                let (w, b) = (&params[2 * l], &params[2 * l + 1]);
                let mut z = vec![0.0; sizes[l + 1]];
                for (o, zo) in z.iter_mut().enumerate() {
                    *zo = b[o]
                        + (0..sizes[l])
                            .map(|i| w[o * sizes[l] + i] * a[i])
                            .sum::<f64>();
                }
                if l + 2 < sizes.len() {
                    z.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                a = z;
            }
            let max = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + a.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            total += lse - a[labels[s] as usize];
        }
        total / n as f64
    }

    fn tiny_batch(n: usize, features: usize, classes: usize, seed: u64) -> Dataset {
        let mut r = rng::rng_for(seed, &[]);
        let x = (0..n * features)
            .map(|_| (rng::normal_f64(&mut r)) as f32)
            .collect();
        let y = (0..n).map(|_| rng::below(&mut r, classes) as u32).collect();
        Dataset::new(x, y, features, classes).unwrap()
    }

    #[test]
    fn more_parameters_than_the_bound_are_refused_without_overflow() {
        // (64 + 1) * 66_076_419 = 4_294_967_235 <= 2^32 - 1; one more output is over.
        let at = Mlp::new(64, &[], 66_076_419).unwrap();
        assert_eq!(at.num_params(), 4_294_967_235);
        for hidden in [vec![66_076_420], vec![usize::MAX], vec![1 << 40, 1 << 40]] {
            let e = Mlp::new(64, &hidden, 10).map(drop).unwrap_err().to_string();
            assert!(e.contains("parameters"), "{hidden:?}: {e}");
        }
        assert!(Mlp::new(64, &[], usize::MAX).is_err());
    }

    #[test]
    fn a_gated_step_waits_for_each_layer_and_matches_the_plain_step() {
        let mlp = Mlp::new(6, &[9, 5], 4).unwrap();
        let fresh = mlp.init(21);
        let batch = tiny_batch(8, 6, 4, 22);
        let mut plain = Vec::new();
        let l0 = mlp
            .backward_layerwise(&fresh, batch.view(), &mut |k, g| plain.push((k, g)))
            .unwrap();
        // Start from stale parameters; `ready(l)` brings layer l up to date, as P3's replies do.
        let mut params: Vec<Vec<f32>> = fresh.iter().map(|t| vec![0.5; t.len()]).collect();
        let mut order = Vec::new();
        let mut gated = Vec::new();
        let l1 = mlp
            .backward_gated(
                &mut params,
                batch.view(),
                &mut |l, p| {
                    // Layers above l are still stale when l is asked for.
                    for (k, t) in p.iter().enumerate().skip(2 * l + 2) {
                        assert!(t.iter().all(|&v| v == 0.5), "key {k} updated early");
                    }
                    order.push(l);
                    p[2 * l].clone_from(&fresh[2 * l]);
                    p[2 * l + 1].clone_from(&fresh[2 * l + 1]);
                    Ok(())
                },
                &mut |k, g| gated.push((k, g)),
            )
            .unwrap();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(l0.to_bits(), l1.to_bits());
        assert_eq!(gated.len(), plain.len());
        for ((k0, g0), (k1, g1)) in plain.iter().zip(&gated) {
            assert_eq!(k0, k1);
            assert!(g0.iter().zip(g1).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        assert_eq!(mlp.tensor_layers(), [0, 0, 1, 1, 2, 2]);
        // A failing gate ends the step with its error.
        let err = mlp
            .backward_gated(
                &mut params,
                batch.view(),
                &mut |l, _| {
                    Err(EngineError::NotReady {
                        layer: l,
                        message: "gone".into(),
                    })
                },
                &mut |_, _| panic!("no gradient after a failed gate"),
            )
            .unwrap_err();
        assert!(err.to_string().contains("layer 0"), "{err}");
    }

    #[test]
    fn emulated_compute_sleeps_per_layer_and_changes_no_value() {
        let plain = Mlp::new(4, &[6], 3).unwrap();
        let ms = std::time::Duration::from_millis;
        let slow = Mlp::new(4, &[6], 3)
            .unwrap()
            .with_layer_delays(vec![ms(20), ms(10)]);
        let params = plain.init(5);
        let batch = tiny_batch(5, 4, 3, 6);
        let (l0, g0) = plain.loss_and_grad(&params, batch.view()).unwrap();
        let t = std::time::Instant::now();
        let (l1, g1) = slow.loss_and_grad(&params, batch.view()).unwrap();
        // Forward 20 + 10 ms, backward twice that: at least 90 ms (sleeps never end early).
        assert!(t.elapsed() >= ms(90), "{:?}", t.elapsed());
        assert_eq!(l0.to_bits(), l1.to_bits());
        assert_eq!(g0, g1);
        assert_eq!(
            plain.evaluate(&params, batch.view()).unwrap(),
            slow.evaluate(&params, batch.view()).unwrap()
        );
    }

    #[test]
    fn gradient_matches_central_differences_of_f64_reference() {
        let mlp = Mlp::new(5, &[7, 4], 3).unwrap();
        let mut params = mlp.init(11);
        // Non-zero biases so every parameter matters.
        let mut r = rng::rng_for(12, &[]);
        for key in [1, 3, 5] {
            params[key]
                .iter_mut()
                .for_each(|v| *v = (0.1 * rng::normal_f64(&mut r)) as f32);
        }
        let batch = tiny_batch(6, 5, 3, 13);
        let (loss, grads) = mlp.loss_and_grad(&params, batch.view()).unwrap();

        let p64: Vec<Vec<f64>> = params
            .iter()
            .map(|t| t.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let x64: Vec<f64> = batch.features().iter().map(|&v| f64::from(v)).collect();
        let sizes = mlp.sizes().to_vec();
        let ref_loss = reference_loss(&sizes, &p64, &x64, batch.labels());
        assert!(
            (f64::from(loss) - ref_loss).abs() < 1e-5,
            "{loss} vs {ref_loss}"
        );

        // Central differences in f64 with h = 1e-5: truncation error O(h^2) ≈ 1e-10, far below
        // the f32 rounding of the analytic gradient. Tolerance: 2e-5 absolute + 1e-3 relative.
        let h = 1e-5;
        let mut checked = 0;
        for key in 0..p64.len() {
            for i in 0..p64[key].len() {
                let mut plus = p64.clone();
                plus[key][i] += h;
                let mut minus = p64.clone();
                minus[key][i] -= h;
                let num = (reference_loss(&sizes, &plus, &x64, batch.labels())
                    - reference_loss(&sizes, &minus, &x64, batch.labels()))
                    / (2.0 * h);
                let got = f64::from(grads[key][i]);
                assert!(
                    (got - num).abs() <= 2e-5 + 1e-3 * num.abs(),
                    "key {key} elem {i}: analytic {got}, numeric {num}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, mlp.num_params());
        assert_eq!(checked, 5 * 7 + 7 + 7 * 4 + 4 + 4 * 3 + 3);
    }

    #[test]
    fn gradients_arrive_last_layer_first_once_each() {
        let mlp = Mlp::new(4, &[3, 3], 2).unwrap();
        let params = mlp.init(1);
        let batch = tiny_batch(5, 4, 2, 2);
        let mut order = Vec::new();
        let mut streamed = vec![Vec::new(); 6];
        mlp.backward_layerwise(&params, batch.view(), &mut |k, g| {
            order.push(k);
            streamed[k] = g;
        })
        .unwrap();
        assert_eq!(order, vec![5, 4, 3, 2, 1, 0]);
        let (_, grads) = mlp.loss_and_grad(&params, batch.view()).unwrap();
        assert_eq!(streamed, grads);
        for (g, spec) in grads.iter().zip(mlp.tensors()) {
            assert_eq!(g.len(), spec.len());
        }
    }

    #[test]
    fn sgd_steps_reduce_the_loss() {
        let mlp = Mlp::new(6, &[16], 3).unwrap();
        let mut params = mlp.init(5);
        let data = tiny_batch(24, 6, 3, 6);
        let first = mlp.evaluate(&params, data.view()).unwrap();
        for _ in 0..50 {
            let (_, grads) = mlp.loss_and_grad(&params, data.view()).unwrap();
            for (p, g) in params.iter_mut().zip(&grads) {
                p.iter_mut().zip(g).for_each(|(p, g)| *p -= 0.5 * g);
            }
        }
        let last = mlp.evaluate(&params, data.view()).unwrap();
        assert!(last.loss < 0.5 * first.loss, "{first:?} -> {last:?}");
        assert!(last.accuracy > first.accuracy, "{first:?} -> {last:?}");
    }

    #[test]
    fn init_is_deterministic_by_seed_and_bounded() {
        let mlp = Mlp::new(64, &[32], 10).unwrap();
        let a = mlp.init(42);
        assert_eq!(a, mlp.init(42));
        assert_ne!(a, mlp.init(43));
        assert_eq!(a.len(), 4);
        let he = (6.0f32 / 64.0).sqrt();
        assert!(a[0].iter().all(|v| v.abs() <= he) && a[0].iter().any(|v| v.abs() > 0.5 * he));
        let glorot = (6.0f32 / 42.0).sqrt();
        assert!(a[2].iter().all(|v| v.abs() <= glorot));
        assert!(a[1].iter().chain(&a[3]).all(|&v| v == 0.0));
        // Keys keep their own stream: a wider output layer leaves layer 0 unchanged.
        assert_eq!(Mlp::new(64, &[32], 12).unwrap().init(42)[0], a[0]);
    }

    #[test]
    fn evaluate_agrees_with_forward_and_loss() {
        let mlp = Mlp::new(5, &[8], 4).unwrap();
        let params = mlp.init(3);
        let data = tiny_batch(1100, 5, 4, 4); // more than one evaluation chunk
        let eval = mlp.evaluate(&params, data.view()).unwrap();
        let logits = mlp.forward(&params, data.features()).unwrap();
        let correct = argmax_rows(&logits, 4)
            .zip(data.labels())
            .filter(|(p, &l)| *p == l as usize)
            .count();
        assert_eq!(eval.accuracy, correct as f64 / 1100.0);
        assert_eq!(eval.samples, 1100);
        let (loss, _) = mlp.loss_and_grad(&params, data.view()).unwrap();
        assert!((eval.loss - f64::from(loss)).abs() < 1e-5);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let mlp = Mlp::new(3, &[4], 2).unwrap();
        let params = mlp.init(0);
        let d = tiny_batch(2, 3, 2, 0);
        assert!(matches!(
            mlp.loss_and_grad(&params[..3], d.view()),
            Err(EngineError::TensorCount {
                expected: 4,
                got: 3
            })
        ));
        let mut short = params.clone();
        short[2].pop();
        assert!(matches!(
            mlp.loss_and_grad(&short, d.view()),
            Err(EngineError::TensorLen { key: 2, .. })
        ));
        let wide = tiny_batch(2, 4, 2, 0);
        assert!(matches!(
            mlp.evaluate(&params, wide.view()),
            Err(EngineError::Features { .. })
        ));
        let bad_label = Samples {
            labels: &[0, 5],
            ..d.view()
        };
        assert!(matches!(
            mlp.loss_and_grad(&params, bad_label),
            Err(EngineError::Label { index: 1, .. })
        ));
        let empty = Samples {
            features: &[],
            labels: &[],
            n_features: 3,
            staged: None,
        };
        assert_eq!(
            mlp.loss_and_grad(&params, empty).unwrap_err(),
            EngineError::EmptyBatch
        );
        assert!(mlp.forward(&params, &[0.0; 4]).is_err());
        assert!(Mlp::new(3, &[0], 2).is_err());
        assert!(Mlp::new(3, &[], 1).is_err());
    }
}
