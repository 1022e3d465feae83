//! Unit tests of the libtorch back end (CPU; the GPU path runs where CUDA is present and is
//! reported as skipped otherwise).

use geomx_kernels::{encode_dense, topk_exact, Scaling, SparseVec, TopkScratch, ValueType};

use super::gpu::{GpuCompressError, GpuCompressor};
use super::*;
use crate::codec::{decode_any, encode_values};
use crate::data::{rng, Dataset};

/// `n` images of `channels × side × side`: noise U(0, 0.3) plus a bright horizontal band whose
/// position encodes the label (labels cycle through `classes`).
fn band_images(n: usize, channels: usize, side: usize, classes: usize, seed: u64) -> Dataset {
    let mut r = rng::rng_for(seed, &[0xba4d]);
    let per = channels * side * side;
    let mut features = Vec::with_capacity(n * per);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        let (lo, hi) = (c * side / classes, (c + 1) * side / classes);
        for _ch in 0..channels {
            for row in 0..side {
                for _col in 0..side {
                    let band = if (lo..hi.max(lo + 1)).contains(&row) {
                        0.7
                    } else {
                        0.0
                    };
                    features.push((0.3 * rng::unit_f64(&mut r) + band) as f32);
                }
            }
        }
        labels.push(c as u32);
    }
    Dataset::new(features, labels, per, classes).unwrap()
}

fn sgd(params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f32) {
    for (p, g) in params.iter_mut().zip(grads) {
        p.iter_mut().zip(g).for_each(|(p, g)| *p -= lr * g);
    }
}

#[test]
fn cnn_training_steps_decrease_the_loss() {
    let data = band_images(40, 1, 16, 4, 1);
    let m = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu).unwrap();
    let mut p = m.init(3);
    let before = m.evaluate(&p, data.view()).unwrap();
    for _ in 0..15 {
        let (_, g) = m.loss_and_grad(&p, data.view()).unwrap();
        sgd(&mut p, &g, 0.05);
    }
    let after = m.evaluate(&p, data.view()).unwrap();
    assert!(
        after.loss < 0.7 * before.loss,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(after.accuracy > before.accuracy, "{before:?} -> {after:?}");
}

/// Central differences of the f64 loss at the f32 parameters, compared with the f32 autograd
/// gradient at `coords` (key, index): |g − fd| ≤ 2e-3 + 2e-2·|fd|.
fn check_finite_differences(
    m: &TchModel,
    p: &[Vec<f32>],
    data: &Dataset,
    coords: &[(usize, usize)],
) {
    let (_, grads) = m.loss_and_grad(p, data.view()).unwrap();
    for &(key, i) in coords {
        let x = p[key][i];
        let h = 1e-4f64.max(x.abs() as f64 * 1e-4);
        let (xp, xm) = ((x as f64 + h) as f32, (x as f64 - h) as f32);
        let mut q = p.to_vec();
        q[key][i] = xp;
        let lp = m.loss_f64(&q, data.view()).unwrap();
        q[key][i] = xm;
        let lm = m.loss_f64(&q, data.view()).unwrap();
        let fd = (lp - lm) / (xp as f64 - xm as f64);
        let g = grads[key][i] as f64;
        assert!(
            (g - fd).abs() <= 2e-3 + 2e-2 * fd.abs(),
            "{} [{i}]: autograd {g}, finite difference {fd}",
            m.tensors()[key].name
        );
    }
}

#[test]
fn cnn_gradients_match_finite_differences() {
    let data = band_images(6, 1, 16, 3, 2);
    let m = TchModel::new(Arch::Cnn, 256, 3, Device::Cpu).unwrap();
    let p = m.init(9);
    // A few coordinates of every tensor, spread over each tensor.
    let coords: Vec<(usize, usize)> = m
        .tensors()
        .iter()
        .enumerate()
        .flat_map(|(k, s)| [(k, 0), (k, s.len() / 2), (k, s.len() - 1)])
        .collect();
    check_finite_differences(&m, &p, &data, &coords);
}

#[test]
fn resnet18_gradients_match_finite_differences_and_a_step_helps() {
    let data = band_images(8, 3, 8, 2, 3);
    let m = TchModel::new(Arch::Resnet18, 3 * 64, 2, Device::Cpu).unwrap();
    let mut p = m.init(4);
    let names: Vec<&str> = m.tensors().iter().map(|t| t.name.as_str()).collect();
    let key = |n: &str| names.iter().position(|&x| x == n).unwrap();
    let coords = [
        (key("conv1.weight"), 5),
        (key("layer2.0.shortcut.conv.weight"), 17),
        (key("layer4.1.bn2.weight"), 3),
        (key("fc.weight"), 100),
        (key("fc.bias"), 1),
    ];
    check_finite_differences(&m, &p, &data, &coords);
    let before = m.loss_f64(&p, data.view()).unwrap();
    let (_, g) = m.loss_and_grad(&p, data.view()).unwrap();
    sgd(&mut p, &g, 0.01);
    let after = m.loss_f64(&p, data.view()).unwrap();
    assert!(after < before, "loss {before} -> {after}");
}

#[test]
fn layerwise_gradients_come_last_layer_first() {
    let data = band_images(4, 1, 16, 2, 5);
    let m = TchModel::new(Arch::Cnn, 256, 2, Device::Cpu).unwrap();
    let p = m.init(1);
    let mut order = Vec::new();
    let mut grads = vec![Vec::new(); p.len()];
    let loss = m
        .backward_layerwise(&p, data.view(), &mut |k, g| {
            order.push(k);
            grads[k] = g;
        })
        .unwrap();
    assert_eq!(order, (0..p.len()).rev().collect::<Vec<_>>());
    let (loss2, grads2) = m.loss_and_grad(&p, data.view()).unwrap();
    assert_eq!((loss, &grads), (loss2, &grads2));
    let reference = m.loss_f64(&p, data.view()).unwrap();
    assert!((f64::from(loss) - reference).abs() < 1e-5 * reference.max(1.0));
}

#[test]
fn forward_and_evaluate_agree() {
    let data = band_images(300, 1, 16, 3, 6);
    let m = TchModel::new(Arch::Cnn, 256, 3, Device::Cpu).unwrap();
    let p = m.init(2);
    let logits = m.forward(&p, data.features()).unwrap();
    assert_eq!(logits.len(), 300 * 3);
    // Loss and accuracy recomputed on the host from the logits (two eval chunks: 256 + 44).
    let (mut loss, mut correct) = (0f64, 0usize);
    for (row, &y) in logits.chunks(3).zip(data.labels()) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        loss += lse - row[y as usize] as f64;
        let arg = (0..3).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        correct += usize::from(arg == y as usize);
    }
    let e = m.evaluate(&p, data.view()).unwrap();
    assert_eq!(e.samples, 300);
    assert!(
        (e.loss - loss / 300.0).abs() < 1e-5,
        "{} vs {}",
        e.loss,
        loss / 300.0
    );
    assert_eq!(e.accuracy, correct as f64 / 300.0);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    assert!(matches!(
        TchModel::new(Arch::Cnn, 250, 10, Device::Cpu),
        Err(EngineError::Architecture(_))
    ));
    let m = TchModel::new(Arch::Cnn, 256, 3, Device::Cpu).unwrap();
    let p = m.init(1);
    let data = band_images(4, 1, 16, 4, 1);
    assert!(matches!(
        m.loss_and_grad(&p, data.view()),
        Err(EngineError::Label { label: 3, .. })
    ));
    let wide = band_images(2, 3, 16, 3, 1);
    assert!(matches!(
        m.evaluate(&p, wide.view()),
        Err(EngineError::Features {
            expected: 256,
            got: 768
        })
    ));
    assert!(matches!(
        m.loss_and_grad(&p[1..], data.view()),
        Err(EngineError::TensorCount { .. })
    ));
    // The device is checked at the first computation: a server only needs the shapes.
    let cuda = TchModel::new(Arch::Cnn, 256, 3, Device::Cuda(99)).unwrap();
    assert_eq!(cuda.tensors(), m.tensors());
    let small = band_images(2, 1, 16, 3, 1);
    let err = cuda
        .loss_and_grad(&p, small.view())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cuda:99") && err.contains("CUDA device"),
        "{err}"
    );
    assert!(cuda.evaluate(&p, small.view()).is_err());
    assert!(cuda.forward(&p, small.features()).is_err());
}

#[test]
fn encoded_backward_on_the_cpu_equals_host_encoding() {
    let data = band_images(4, 1, 16, 2, 8);
    let m = TchModel::new(Arch::Cnn, 256, 2, Device::Cpu).unwrap();
    let p = m.init(1);
    let (loss, grads) = m.loss_and_grad(&p, data.view()).unwrap();
    for vt in [ValueType::F16, ValueType::F32] {
        let enc = DenseEncoding {
            value_type: vt,
            scaling: Scaling::Pow2,
        };
        let mut keys = Vec::new();
        let l = m
            .backward_encoded(&p, data.view(), enc, &mut |key, n, e| {
                assert_eq!(n, grads[key].len());
                assert_eq!(e, encode_values(&grads[key], vt, Scaling::Pow2));
                keys.push(key);
            })
            .unwrap();
        assert_eq!(l, loss);
        assert_eq!(keys, (0..p.len()).rev().collect::<Vec<_>>());
    }
}

/// On a CUDA machine: GPU payloads equal the CPU encoders' bytes. Elsewhere: reports the reason.
#[test]
fn gpu_payloads_match_the_cpu_encoders_or_report_skipped() {
    let device = Device::Cuda(0);
    let mut c = match GpuCompressor::new(device) {
        Ok(c) => c,
        Err(GpuCompressError::Unavailable(reason)) => {
            assert!(!reason.is_empty());
            eprintln!("skipped: GPU-resident compression: {reason}");
            return;
        }
        Err(e) => panic!("unexpected error {e}"),
    };
    assert!(matches!(
        GpuCompressor::new(Device::Cpu),
        Err(GpuCompressError::Unavailable(_))
    ));
    let data = band_images(8, 1, 16, 2, 7);
    let m = TchModel::new(Arch::Cnn, 256, 2, device).unwrap();
    let p = m.init(1);
    let mut checked = 0;
    m.backward_on_device(&p, data.view(), &mut |key, g| {
        let host = to_host(g);
        for scaling in [Scaling::None, Scaling::Pow2] {
            let mut want = Vec::new();
            encode_dense(&host, ValueType::F16, scaling, &mut want).unwrap();
            assert_eq!(c.fp16_payload(g, scaling).unwrap(), want, "fp16 key {key}");
        }
        let k = host.len().div_ceil(10);
        let mut idx = Vec::new();
        topk_exact(&host, k, &mut TopkScratch::default(), &mut idx).unwrap();
        let val = idx.iter().map(|&i| host[i as usize]).collect();
        let mut want = Vec::new();
        SparseVec::new(host.len() as u32, idx, val).unwrap().encode(
            ValueType::F32,
            Scaling::None,
            &mut want,
        );
        let got = c.topk_payload(g, k, ValueType::F32, Scaling::None).unwrap();
        assert_eq!(got, want, "top-k key {key}");
        checked += 1;
    })
    .unwrap();
    assert_eq!(checked, p.len());

    // The worker's hook: FP16 payloads encoded on the device decode to the gradient (another
    // backward pass, so within FP16 rounding of it rather than bit for bit).
    let (_, host) = m.loss_and_grad(&p, data.view()).unwrap();
    let enc = DenseEncoding {
        value_type: ValueType::F16,
        scaling: Scaling::Pow2,
    };
    let mut seen = 0;
    m.backward_encoded(&p, data.view(), enc, &mut |key, n, e| {
        assert_eq!(
            (e.codec, n),
            (geomx_net::PayloadCodec::Raw, host[key].len())
        );
        assert_eq!(e.overflow, 0);
        let got = decode_any(&e.bytes, key, n).unwrap();
        let max = host[key].iter().fold(0f32, |a, v| a.max(v.abs()));
        for (g, h) in got.iter().zip(&host[key]) {
            assert!((g - h).abs() <= 2e-3 * max + 1e-7, "key {key}: {g} vs {h}");
        }
        seen += 1;
    })
    .unwrap();
    assert_eq!(seen, p.len());
}

/// Batch norm evaluates like PyTorch's `eval()`: with running statistics (fresh: mean 0,
/// variance 1), so one sample's logits are the same alone and inside a batch; a training step
/// updates the first layer's running mean to 0.9·0 + 0.1·(the batch mean of conv1's output per
/// channel), computed here independently with libtorch's conv2d (tolerance 1e-5), and the
/// running variance with the unbiased batch variance; evaluation then uses them (the logits
/// change), while the batch-statistics reference loss does not depend on them.
#[test]
fn batch_norm_uses_running_statistics_in_evaluation() {
    let data = band_images(12, 3, 8, 3, 11);
    let m = TchModel::new(Arch::Resnet18, 3 * 8 * 8, 3, Device::Cpu).unwrap();
    let p = m.init(5);
    let all = m.forward(&p, data.features()).unwrap();
    let per = 3 * 8 * 8;
    for i in [0usize, 5, 11] {
        let one = m
            .forward(&p, &data.features()[i * per..(i + 1) * per])
            .unwrap();
        for c in 0..3 {
            let (a, b) = (one[c], all[i * 3 + c]);
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "sample {i} class {c}"
            );
        }
    }
    assert!(
        m.bn_running(0).is_none(),
        "evaluation must not create running statistics"
    );
    let loss_before = m.loss_f64(&p, data.view()).unwrap();
    let mut seen = 0;
    m.backward_on_device(&p, data.view(), &mut |_, _| seen += 1)
        .unwrap();
    assert_eq!(seen, p.len());
    let (mean, var) = m.bn_running(0).unwrap();
    assert_eq!(mean.len(), 64);
    // conv1 (3×3, stride 1, padding 1, no bias) of the batch, per-channel mean and unbiased
    // variance over (n, h, w).
    let x = Tensor::from_slice(data.features()).reshape([12, 3, 8, 8]);
    let w = Tensor::from_slice(&p[0]).reshape([64, 3, 3, 3]);
    let y = x.conv2d(&w, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1);
    let want_mean = to_host(&y.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float));
    let want_var = to_host(&y.var_dim([0i64, 2, 3].as_slice(), true, false));
    for c in 0..64 {
        assert!((mean[c] - 0.1 * want_mean[c]).abs() <= 1e-5, "mean {c}");
        let v = 0.9 + 0.1 * want_var[c];
        assert!((var[c] - v).abs() <= 1e-5 * v.max(1.0), "var {c}");
    }
    let after = m.forward(&p, data.features()).unwrap();
    assert!(after.iter().zip(&all).any(|(a, b)| (a - b).abs() > 1e-4));
    assert_eq!(m.loss_f64(&p, data.view()).unwrap(), loss_before);
}

/// The plain libtorch loop (parameters and SGD on the device) and the geomx worker's step with
/// dense f32 pushes (parameters from the host, SGD on the host) do the same arithmetic, so on the
/// CPU they follow the same loss trajectory (tolerance 1e-5 relative: only libtorch's reduction
/// order could differ), in every precision and with the worker's backward pass staged or not.
#[test]
fn plain_loop_and_dense_worker_steps_agree_on_the_cpu() {
    use super::gpu_train::{train_plain, train_with_gpu_compression, GpuCodec, GpuTrainOptions};
    let data = band_images(40, 1, 16, 4, 2);
    let (steps, batch, lr, seed) = (6, 8, 0.05, 5);
    // In each precision, and with the worker's backward pass staged (overlap) or whole.
    for (precision, overlap) in [
        (Precision::Fp32, false),
        (Precision::Fp32, true),
        (Precision::Bf16, true),
        (Precision::Fp16Amp, false),
    ] {
        let model = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu)
            .unwrap()
            .with_precision(precision);
        let plain = train_plain(&model.clone(), &data, steps, batch, lr, seed).unwrap();
        let opts = GpuTrainOptions {
            steps,
            batch,
            lr,
            seed,
            codec: GpuCodec::Dense,
        };
        let model = model.with_overlap(overlap);
        let worker = train_with_gpu_compression(&model, &data, opts).unwrap();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * a.abs().max(b.abs());
        let what = format!("{precision} overlap {overlap}: {plain:?} {worker:?}");
        assert!(close(plain.loss_first, worker.loss_first), "{what}");
        // With fp16 the plain loop skips an overflowed step (GradScaler) where the worker
        // recomputes it, so after the first overflow the trajectories part; both learn.
        if precision == Precision::Fp16Amp {
            assert!(worker.loss_last < worker.loss_first, "{what}");
        } else {
            assert!(close(plain.loss_last, worker.loss_last), "{what}");
        }
        assert!(plain.loss_last < plain.loss_first, "{what}");
        assert_eq!(worker.payload_bytes_per_step, worker.dense_bytes_per_step);
        // The codecs that need CUDA kernels say so on a CPU model.
        let fp16 = GpuTrainOptions {
            codec: GpuCodec::Fp16,
            ..opts
        };
        assert!(train_with_gpu_compression(&model, &data, fp16).is_err());
    }
}

/// Gradients from the resident parameters (loaded into the same tensors step after step) are
/// bit-identical to gradients from fresh tensors (the path a step takes while another thread
/// holds the resident ones), over several steps whose parameters change, for both
/// architectures; the ResNet's keys do not all have lengths that are multiples of the alignment.
#[test]
fn resident_parameters_give_the_same_gradients_as_fresh_tensors() {
    for ((arch, channels, side), overlap) in [(Arch::Cnn, 1, 16), (Arch::Resnet18, 3, 8)]
        .into_iter()
        .flat_map(|a| [(a, false), (a, true)])
    {
        let data = band_images(6, channels, side, 4, 3);
        let make = || {
            TchModel::new(arch, channels * side * side, 4, Device::Cpu)
                .unwrap()
                .with_overlap(overlap)
        };
        let (resident, fresh) = (make(), make());
        // Holding `fresh`'s slot makes its steps build fresh tensors.
        let held = fresh.resident.clone();
        let _busy = held.lock().unwrap();
        let mut p = resident.init(9);
        for step in 0..3 {
            let (la, ga) = resident.loss_and_grad(&p, data.view()).unwrap();
            let (lb, gb) = fresh.loss_and_grad(&p, data.view()).unwrap();
            assert_eq!(la.to_bits(), lb.to_bits(), "{arch:?} step {step}: loss");
            for (key, (a, b)) in ga.iter().zip(&gb).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{arch:?} step {step}: gradient of key {key} differs"
                );
            }
            sgd(&mut p, &ga, 0.1);
        }
        assert!(
            resident.resident.lock().unwrap().is_some(),
            "{arch:?}: the resident path was not taken"
        );
    }
}

/// Relative L2 distance |a − b| / |b| over all keys.
fn relative_l2(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        d += f64::from(x - y).powi(2);
        n += f64::from(*y).powi(2);
    }
    (d / n).sqrt()
}

/// bf16 and fp16 (with its loss scale) give f32 gradients close to the fp32 ones for both
/// architectures, and the same loss within 1e-2. The bounds on the relative L2 error are those
/// of PyTorch's own autocast at initialisation: on the same ResNet-18 shape (16×16 inputs, batch
/// 16) `torch.autocast("cpu")` differs from fp32 by 0.33 (bf16) and 0.12 (fp16), as batch norm
/// and 17 convolutions amplify rounding; we measured 0.35 and 0.12, and 0.077 and 0.010 on the
/// CNN.
#[test]
fn mixed_precision_gradients_are_close_to_fp32() {
    let cases = [
        (Arch::Cnn, 1, 16, Precision::Bf16, 0.15),
        (Arch::Cnn, 1, 16, Precision::Fp16Amp, 0.03),
        (Arch::Resnet18, 3, 16, Precision::Bf16, 0.5),
        (Arch::Resnet18, 3, 16, Precision::Fp16Amp, 0.2),
    ];
    for (arch, channels, side, precision, tol) in cases {
        let data = band_images(16, channels, side, 4, 5);
        let inputs = channels * side * side;
        let fp32 = TchModel::new(arch, inputs, 4, Device::Cpu).unwrap();
        let p = fp32.init(4);
        let (l32, g32) = fp32.loss_and_grad(&p, data.view()).unwrap();
        let m = TchModel::new(arch, inputs, 4, Device::Cpu)
            .unwrap()
            .with_precision(precision);
        let (l, g) = m.loss_and_grad(&p, data.view()).unwrap();
        assert!(
            g.iter().flatten().all(|x| x.is_finite()),
            "{arch:?} {precision}"
        );
        let err = relative_l2(&g, &g32);
        assert!(err <= tol, "{arch:?} {precision}: gradient error {err}");
        assert!(err > 0.0, "{arch:?} {precision}: computed in fp32");
        let lerr = f64::from((l - l32).abs() / l32);
        assert!(lerr <= 1e-2, "{arch:?} {precision}: loss {l} vs {l32}");
    }
}

/// An fp16 step whose scaled gradients overflow is recomputed at halved scales until they fit:
/// it still returns the fp32 gradients (within fp16's bound), never zeros.
#[test]
fn an_overflowed_fp16_step_is_recomputed_at_a_smaller_scale() {
    let data = band_images(16, 1, 16, 4, 5);
    let fp32 = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu).unwrap();
    let p = fp32.init(4);
    let (_, g32) = fp32.loss_and_grad(&p, data.view()).unwrap();
    let m = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu)
        .unwrap()
        .with_precision(Precision::Fp16Amp);
    // 2^30 overflows fp16 (max 65504) in the backward pass for certain.
    *m.scaler.lock().unwrap() = amp::LossScaler::starting_at(2f64.powi(30));
    let (_, g) = m.loss_and_grad(&p, data.view()).unwrap();
    let (scale, overflows) = m.loss_scale();
    assert!(
        overflows >= 1 && scale < 2f64.powi(30),
        "{scale} {overflows}"
    );
    let err = relative_l2(&g, &g32);
    assert!(
        err <= 0.03,
        "gradient error {err} after {overflows} recomputes"
    );
}

/// A model whose `model.device = "cuda:local"` was not resolved in this process gives its shapes
/// (servers need only those) but refuses to compute, saying why.
#[test]
fn an_unresolved_cuda_local_model_has_shapes_but_does_not_compute() {
    let cfg = crate::config::ModelConfig {
        kind: crate::config::ModelKind::Cnn,
        device: crate::config::device::CUDA_LOCAL.into(),
        ..crate::config::ModelConfig::default()
    };
    let m = crate::engine::build_model(&cfg, 256, 4).unwrap();
    assert_eq!(m.tensors().len(), 10);
    let data = band_images(2, 1, 16, 4, 1);
    let e = m.loss_and_grad(&m.init(1), data.view()).unwrap_err();
    assert!(e.to_string().contains("was not resolved"), "{e}");
}

/// The staged backward pass (overlap) hands over every gradient bit for bit as one backward pass
/// computes it, in descending key order, for both architectures in fp32 and bf16, over steps whose
/// parameters change.
#[test]
fn staged_backward_gives_the_same_gradients_in_the_same_order() {
    for (arch, channels, side) in [(Arch::Cnn, 1, 16), (Arch::Resnet18, 3, 8)] {
        for precision in [Precision::Fp32, Precision::Bf16] {
            let data = band_images(6, channels, side, 4, 3);
            let inputs = channels * side * side;
            let make = |overlap| {
                TchModel::new(arch, inputs, 4, Device::Cpu)
                    .unwrap()
                    .with_precision(precision)
                    .with_overlap(overlap)
            };
            let (staged, whole) = (make(true), make(false));
            assert!(staged.staged() && !whole.staged());
            let mut p = staged.init(2);
            for step in 0..2 {
                let mut order = Vec::new();
                let mut got = vec![Vec::new(); p.len()];
                let la = staged
                    .backward_layerwise(&p, data.view(), &mut |k, g| {
                        order.push(k);
                        got[k] = g;
                    })
                    .unwrap();
                let (lb, want) = whole.loss_and_grad(&p, data.view()).unwrap();
                assert_eq!(
                    la.to_bits(),
                    lb.to_bits(),
                    "{arch:?} {precision} step {step}"
                );
                assert_eq!(order, (0..p.len()).rev().collect::<Vec<_>>());
                for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        a.len() == b.len()
                            && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{arch:?} {precision} step {step}: key {k} differs"
                    );
                }
                sgd(&mut p, &want, 0.1);
            }
        }
    }
}

/// `backward_host` hands the gradients over a stage at a time, last stage first, as borrowed
/// slices of the right lengths: with overlap the CNN's stages are its five layers, without it
/// one stage holds every key.
#[test]
fn host_gradients_come_a_stage_at_a_time() {
    let data = band_images(4, 1, 16, 4, 1);
    for (overlap, want) in [(true, vec![8, 6, 4, 2, 0]), (false, vec![0])] {
        let m = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu)
            .unwrap()
            .with_overlap(overlap);
        let p = m.init(1);
        let (_, reference) = m.loss_and_grad(&p, data.view()).unwrap();
        let mut firsts = Vec::new();
        let mut seen = 0;
        m.backward_host(&p, data.view(), &mut |first, grads, _| {
            firsts.push(first);
            for (i, g) in grads.iter().enumerate() {
                assert_eq!(*g, reference[first + i].as_slice(), "key {}", first + i);
                seen += 1;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(firsts, want, "overlap {overlap}");
        assert_eq!(seen, p.len());
    }
}

/// The stages really are differentiated one at a time: after the loss's own backward pass only
/// the last stage's parameters have gradients; the first stage's appear once the cuts above it
/// are differentiated.
#[test]
fn the_last_stage_has_gradients_before_the_first_is_differentiated() {
    let m = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu).unwrap();
    let data = band_images(4, 1, 16, 4, 1);
    let p = m.params_on(&m.init(1), Kind::Float, tch::Device::Cpu, true);
    let (x, y) = m.batch_on(&data.view(), Kind::Float, tch::Device::Cpu);
    let mut cuts = Vec::new();
    let logits = m
        .net()
        .forward_staged(&p, &x, BnMode::Batch, None, &mut cuts);
    assert_eq!(cuts.iter().map(|c| c.0).collect::<Vec<_>>(), [2, 4, 6, 8]);
    arch::cross_entropy(&logits, &y, Kind::Float).backward();
    assert!(p[9].grad().defined() && p[8].grad().defined());
    assert!(!p[7].grad().defined() && !p[0].grad().defined());
    for (_, out, leaf) in cuts.iter().rev() {
        (out * leaf.grad()).sum(Kind::Float).backward();
    }
    assert!(p.iter().all(|t| t.grad().defined()));
}

/// A step whose stand-in server applies SGD to each stage as it arrives and preloads the stage's
/// new values (what the GPU benchmark's worker does) trains bit for bit as plain steps do, for
/// both architectures with overlap on and off; the preloads are taken.
#[test]
fn preloading_each_stage_during_the_step_changes_nothing() {
    for ((arch, channels, side), overlap) in [(Arch::Cnn, 1, 16), (Arch::Resnet18, 3, 8)]
        .into_iter()
        .flat_map(|a| [(a, true), (a, false)])
    {
        let data = band_images(6, channels, side, 4, 3);
        let make = || {
            TchModel::new(arch, channels * side * side, 4, Device::Cpu)
                .unwrap()
                .with_overlap(overlap)
        };
        let (ahead, plain) = (make(), make());
        let mut p = ahead.init(4);
        let mut q = p.clone();
        for step in 0..3 {
            let mut next: Vec<Vec<f32>> = vec![Vec::new(); p.len()];
            let mut taken = 0;
            let la = ahead
                .backward_host(&p, data.view(), &mut |first, grads, ahead| {
                    for (i, g) in grads.iter().enumerate() {
                        let k = first + i;
                        next[k] = p[k].iter().zip(*g).map(|(w, g)| w - 0.1 * g).collect();
                    }
                    let values: Vec<&[f32]> = next[first..first + grads.len()]
                        .iter()
                        .map(Vec::as_slice)
                        .collect();
                    taken += usize::from(ahead.preload(first, &values)?);
                    Ok(())
                })
                .unwrap();
            assert!(taken > 0, "{arch:?} overlap {overlap}: no preload taken");
            p = next;
            let (lb, g) = plain.loss_and_grad(&q, data.view()).unwrap();
            sgd(&mut q, &g, 0.1);
            assert_eq!(la.to_bits(), lb.to_bits(), "{arch:?} step {step}: loss");
            for (k, (a, b)) in p.iter().zip(&q).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{arch:?} overlap {overlap} step {step}: key {k} differs"
                );
            }
        }
    }
}

/// Preloading is refused for keys whose gradients are not complete yet, and a key preloaded and
/// then changed is loaded again: the step computes with the values it is given.
#[test]
fn preloading_too_early_is_an_error_and_changed_values_are_loaded_again() {
    let data = band_images(4, 1, 16, 4, 1);
    let m = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu)
        .unwrap()
        .with_overlap(true);
    let fresh = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu).unwrap();
    let mut p = m.init(1);
    let early = p[0].clone();
    let e = m
        .backward_host(&p, data.view(), &mut |first, _, ahead| {
            if first == 8 {
                ahead.preload(0, &[early.as_slice()])?;
            }
            Ok(())
        })
        .unwrap_err();
    assert!(e.to_string().contains("not complete yet"), "{e}");
    // Outside a step every key may be preloaded; the next step takes them.
    let values: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
    assert!(m.preload(0, &values).unwrap());
    let same = |m: &TchModel, p: &[Vec<f32>]| {
        let (la, ga) = m.loss_and_grad(p, data.view()).unwrap();
        let (lb, gb) = fresh.loss_and_grad(p, data.view()).unwrap();
        la.to_bits() == lb.to_bits() && ga == gb
    };
    assert!(same(&m, &p));
    assert!(m.preload(3, &[&[1.0]]).is_err(), "length checked");
    // Preloaded, then changed in place or replaced: the step loads the values it is given.
    let values: Vec<&[f32]> = p[2..4].iter().map(Vec::as_slice).collect();
    assert!(m.preload(2, &values).unwrap());
    p[3][0] += 1.0;
    p[2] = p[2].iter().map(|v| v * 0.5).collect();
    assert!(same(&m, &p));
}

/// Parameters `p` with every value of layer `layer`'s keys moved by `delta` times its index
/// (what a P3 reply does to a layer between two steps).
fn moved(p: &[Vec<f32>], layers: &[usize], layer: usize, delta: f32) -> Vec<Vec<f32>> {
    p.iter()
        .zip(layers)
        .map(|(t, &l)| {
            t.iter()
                .enumerate()
                .map(|(i, v)| {
                    if l == layer {
                        v + delta * (i % 7) as f32
                    } else {
                        *v
                    }
                })
                .collect()
        })
        .collect()
}

/// A gated step ([`Model::backward_gated`]) whose gate brings each layer's new values when the
/// forward pass reaches it computes bit for bit what a plain step on the new values computes,
/// for both architectures with overlap on and off and in fp16 with a loss scale, step after
/// step and mixed with plain steps on the same model; `ready` sees each layer once, in order.
#[test]
fn gated_steps_compute_what_plain_steps_on_the_new_values_compute() {
    let cases = [
        (Arch::Cnn, 1, 16, true, Precision::Fp32),
        (Arch::Cnn, 1, 16, false, Precision::Fp32),
        (Arch::Cnn, 1, 16, true, Precision::Fp16Amp),
        (Arch::Resnet18, 3, 8, true, Precision::Fp32),
        (Arch::Resnet18, 3, 8, false, Precision::Fp32),
    ];
    for (arch, channels, side, overlap, precision) in cases {
        let name = format!("{arch:?} overlap {overlap} {precision:?}");
        let data = band_images(6, channels, side, 4, 3);
        let make = || {
            TchModel::new(arch, channels * side * side, 4, Device::Cpu)
                .unwrap()
                .with_overlap(overlap)
                .with_precision(precision)
        };
        let (gated, plain) = (make(), make());
        let layers = gated.tensor_layers();
        let count = layers.iter().max().unwrap() + 1;
        let mut p = gated.init(4);
        for step in 0..4 {
            // The step starts from the previous values; the gate brings layer ℓ's new ones.
            let fresh: Vec<Vec<f32>> = (0..count).fold(p.clone(), |q, l| {
                moved(&q, &layers, l, 1e-3 * (step + 1) as f32)
            });
            let (lb, gb) = plain.loss_and_grad(&fresh, data.view()).unwrap();
            let (la, ga) = if step == 2 {
                // A plain step on the gated model in between.
                p = fresh.clone();
                gated.loss_and_grad(&p, data.view()).unwrap()
            } else {
                let mut seen = Vec::new();
                let mut grads = vec![Vec::new(); p.len()];
                let loss = gated
                    .backward_gated(
                        &mut p,
                        data.view(),
                        &mut |l, q| {
                            seen.push(l);
                            for (k, t) in q.iter_mut().enumerate() {
                                if layers[k] == l {
                                    t.clone_from(&fresh[k]);
                                }
                            }
                            Ok(())
                        },
                        &mut |k, g| grads[k] = g,
                    )
                    .unwrap();
                assert_eq!(seen, (0..count).collect::<Vec<_>>(), "{name}");
                assert_eq!(p, fresh, "{name}: the gate's values are the step's");
                (loss, grads)
            };
            assert_eq!(la.to_bits(), lb.to_bits(), "{name} step {step}: loss");
            for (k, (a, b)) in ga.iter().zip(&gb).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{name} step {step}: key {k}'s gradient differs"
                );
            }
        }
    }
}

/// The forward pass really waits layer by layer: a gate that, when asked for layer 1, changes
/// layer 0 (already computed) does not change the step, which computed layer 0 with the values
/// it had when layer 0 was brought; waiting for every layer first would have used the change.
/// A failing gate ends the step before any gradient is handed over, and the model goes on.
#[test]
fn a_layer_computes_with_the_values_it_had_when_the_forward_pass_reached_it() {
    let data = band_images(6, 1, 16, 4, 3);
    let m = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu)
        .unwrap()
        .with_overlap(true);
    let reference = TchModel::new(Arch::Cnn, 256, 4, Device::Cpu).unwrap();
    let layers = m.tensor_layers();
    let p0 = m.init(2);
    let late = moved(&p0, &layers, 0, 0.05);
    let mut p = p0.clone();
    let mut grads = vec![Vec::new(); p.len()];
    let loss = m
        .backward_gated(
            &mut p,
            data.view(),
            &mut |l, q| {
                if l == 1 {
                    q[..2].clone_from_slice(&late[..2]);
                }
                Ok(())
            },
            &mut |k, g| grads[k] = g,
        )
        .unwrap();
    assert_eq!(p, late, "the gate's change stays in the host values");
    let (at_reach, g_reach) = reference.loss_and_grad(&p0, data.view()).unwrap();
    let (at_end, g_end) = reference.loss_and_grad(&late, data.view()).unwrap();
    assert_eq!(loss.to_bits(), at_reach.to_bits());
    assert_eq!(grads, g_reach);
    assert_ne!(g_reach, g_end, "the test tells the two apart");
    assert_ne!(at_reach.to_bits(), at_end.to_bits());
    // The next step loads layer 0's changed values.
    let (l_next, g_next) = m.loss_and_grad(&p, data.view()).unwrap();
    assert_eq!((l_next.to_bits(), &g_next), (at_end.to_bits(), &g_end));

    let mut handed = 0;
    let e = m
        .backward_gated(
            &mut p,
            data.view(),
            &mut |l, _| match l {
                2 => Err(EngineError::NotReady {
                    layer: 2,
                    message: "no reply".into(),
                }),
                _ => Ok(()),
            },
            &mut |_, _| handed += 1,
        )
        .unwrap_err();
    assert!(matches!(e, EngineError::NotReady { layer: 2, .. }), "{e}");
    assert_eq!(handed, 0, "no gradient of a failed step");
    let (l_after, g_after) = m.loss_and_grad(&p, data.view()).unwrap();
    assert_eq!((l_after.to_bits(), &g_after), (at_end.to_bits(), &g_end));
}

/// A batch staged as the prefetch thread stages it (`batch_stager`: plain host tensors on the
/// CPU) gives the same loss and gradients, bit for bit, as the same batch unstaged, for both
/// architectures. The staged copy is what the step reads (a batch carrying another batch's copy
/// computes that batch's loss); a copy of another size is ignored; a batch of other features is
/// not staged.
#[test]
fn staged_batches_compute_what_host_batches_compute() {
    for (arch, channels, side) in [(Arch::Cnn, 1, 16), (Arch::Resnet18, 3, 8)] {
        let per = channels * side * side;
        let m = TchModel::new(arch, per, 4, Device::Cpu).unwrap();
        let p = m.init(5);
        let data = band_images(6, channels, side, 4, 2);
        let other = band_images(6, channels, side, 4, 3);
        let small = band_images(3, channels, side, 4, 4);
        let mut stage = m
            .batch_stager()
            .expect("a usable CPU model stages its batches");
        let staged = data.clone().with_staged(stage(&data).unwrap());
        let (l0, g0) = m.loss_and_grad(&p, data.view()).unwrap();
        let (l1, g1) = m.loss_and_grad(&p, staged.view()).unwrap();
        assert_eq!(l0.to_bits(), l1.to_bits(), "{arch:?}");
        assert_eq!(g0, g1, "{arch:?}");
        // The step's input is the staged copy.
        let crossed = data.clone().with_staged(stage(&other).unwrap());
        let (lo, _) = m.loss_and_grad(&p, other.view()).unwrap();
        let (lc, _) = m.loss_and_grad(&p, crossed.view()).unwrap();
        assert_ne!(l0.to_bits(), lo.to_bits(), "{arch:?}: the batches differ");
        assert_eq!(lc.to_bits(), lo.to_bits(), "{arch:?}");
        // A copy of three images does not stand for six.
        let misfit = data.clone().with_staged(stage(&small).unwrap());
        let (lm, _) = m.loss_and_grad(&p, misfit.view()).unwrap();
        assert_eq!(lm.to_bits(), l0.to_bits(), "{arch:?}");
        let wrong = band_images(2, 1, side / 2, 4, 1);
        let e = stage(&wrong).unwrap_err();
        assert!(e.contains("features"), "{e}");
    }
}
