//! The CNN and ResNet-18 trained on a CUDA device (feature `tch`). Where libtorch sees no GPU (or
//! the CUDA kernels cannot load) the test prints `skipped: <reason>` and passes. On a GPU, for
//! each architecture, it runs a plain libtorch loop (parameters on the device) before and after
//! the geomx worker's step with dense f32, FP16 and error-feedback top-k pushes, checks that the
//! loss falls in each run, and prints one JSON line per run (`GPU_PLAIN` / `GPU_TRAIN`, read by
//! `scripts/gpu-check.sh`). `GEOMX_TCH_GPU_STEPS` sets the step count (default 30),
//! `GEOMX_TCH_GPU_ARCHS` the architectures (default `cnn,resnet18`), `GEOMX_TCH_GPU_PRECISIONS`
//! the precisions (default `fp32`; each further one runs the plain loop, dense and FP16 pushes).
//! The geomx worker runs with `model.overlap` on (the trainer's default); in fp32 the dense push
//! also runs with it off.
#![cfg(feature = "tch")]

use geomx_trainer::config::Precision;
use geomx_trainer::data::Dataset;
use geomx_trainer::engine::tch::gpu::unavailable_reason;
use geomx_trainer::engine::tch::gpu_train::{
    train_plain, train_with_gpu_compression, GpuCodec, GpuTrainOptions,
};
use geomx_trainer::engine::tch::{check_device, Arch, TchModel};
use geomx_trainer::engine::{Device, Model};

/// Square images of `channels × side × side` whose label is the position of a bright band, with
/// noise.
fn band_images(n: usize, classes: usize, channels: usize, side: usize) -> Dataset {
    let mut s = 0x9e37_79b9u32;
    let mut features = Vec::with_capacity(n * channels * side * side);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        for _ in 0..channels {
            for row in 0..side {
                for _ in 0..side {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    let band = if row * classes / side == c { 0.7 } else { 0.0 };
                    features.push((s % 1000) as f32 / 1000.0 * 0.3 + band);
                }
            }
        }
        labels.push(c as u32);
    }
    Dataset::new(features, labels, channels * side * side, classes).unwrap()
}

/// The architectures measured: `GEOMX_TCH_GPU_ARCHS` (comma-separated `cnn`, `resnet18`),
/// default both. The CNN gets MNIST-shaped input (1×28×28), ResNet-18 CIFAR-shaped (3×32×32).
fn archs() -> Vec<(Arch, usize, usize)> {
    let want = std::env::var("GEOMX_TCH_GPU_ARCHS").unwrap_or_else(|_| "cnn,resnet18".into());
    want.split(',')
        .filter_map(|a| match a.trim() {
            "cnn" => Some((Arch::Cnn, 1, 28)),
            "resnet18" => Some((Arch::Resnet18, 3, 32)),
            _ => None,
        })
        .collect()
}

/// The precisions measured: `GEOMX_TCH_GPU_PRECISIONS` (comma-separated `fp32`, `bf16`,
/// `fp16-amp`), default `fp32`.
fn precisions() -> Vec<Precision> {
    let want = std::env::var("GEOMX_TCH_GPU_PRECISIONS").unwrap_or_else(|_| "fp32".into());
    want.split(',')
        .filter_map(|p| match p.trim() {
            "fp32" => Some(Precision::Fp32),
            "bf16" => Some(Precision::Bf16),
            "fp16-amp" => Some(Precision::Fp16Amp),
            _ => None,
        })
        .collect()
}

/// `cuda:0` when libtorch sees it and geomx's CUDA kernels load there; else prints
/// `skipped: <reason>` and gives `None`.
fn gpu_or_skip() -> Option<Device> {
    let device = Device::Cuda(0);
    if let Err(e) = check_device(device) {
        println!("skipped: libtorch: {e}");
        return None;
    }
    if let Some(reason) = unavailable_reason(device) {
        println!("skipped: {reason}");
        return None;
    }
    Some(device)
}

#[test]
fn models_train_on_the_gpu_with_gpu_resident_compression_or_report_skipped() {
    let Some(device) = gpu_or_skip() else {
        return;
    };
    let steps = std::env::var("GEOMX_TCH_GPU_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let batch = 128;
    let lr = 0.05;
    let mut failures = Vec::new();
    for (arch, channels, side) in archs() {
        let data = band_images(4_096, 10, channels, side);
        for precision in precisions() {
            let model = TchModel::new(arch, channels * side * side, 10, device)
                .unwrap()
                .with_precision(precision);
            let tag = |extra: serde_json::Value| {
                let mut v = serde_json::json!({
                    "arch": format!("{arch:?}"),
                    "precision": precision.to_string(),
                });
                v.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                v
            };
            // The plain loop first and last, so that clock or cache warm-up favours neither side.
            let plain_a = train_plain(&model, &data, steps, batch, lr, 1).unwrap();
            println!("GPU_PLAIN {}", tag(serde_json::json!({"run": plain_a})));
            let mut runs = vec![(GpuCodec::Dense, true), (GpuCodec::Fp16, true)];
            if precision == Precision::Fp32 {
                runs.insert(1, (GpuCodec::Dense, false));
                runs.push((
                    GpuCodec::Topk {
                        density: 0.01,
                        momentum: 0.9,
                    },
                    true,
                ));
            }
            for (codec, overlap) in runs {
                let opts = GpuTrainOptions {
                    steps,
                    batch,
                    lr,
                    seed: 1,
                    codec,
                };
                let m = model.clone().with_overlap(overlap);
                let r = train_with_gpu_compression(&m, &data, opts).unwrap();
                println!(
                    "GPU_TRAIN {}",
                    tag(serde_json::json!({"overlap": overlap, "run": r}))
                );
                if r.loss_last.partial_cmp(&r.loss_first) != Some(std::cmp::Ordering::Less) {
                    failures.push(format!(
                        "{arch:?} {precision} {codec:?}: loss {} -> {}",
                        r.loss_first, r.loss_last
                    ));
                }
                if codec != GpuCodec::Dense && r.payload_bytes_per_step >= r.dense_bytes_per_step {
                    failures.push(format!(
                        "{arch:?} {codec:?}: payload not smaller than dense"
                    ));
                }
            }
            let plain_b = train_plain(&model, &data, steps, batch, lr, 1).unwrap();
            println!("GPU_PLAIN {}", tag(serde_json::json!({"run": plain_b})));
            if plain_b.loss_last.partial_cmp(&plain_b.loss_first) != Some(std::cmp::Ordering::Less)
            {
                failures.push(format!(
                    "{arch:?} {precision} plain: loss {} -> {}",
                    plain_b.loss_first, plain_b.loss_last
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Relative distance `‖a − b‖ / ‖b‖` of two vectors (0 for two zero vectors).
fn rel_dist(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (f64::from(*x) - f64::from(*y)).powi(2);
        n += f64::from(*y).powi(2);
    }
    if n == 0.0 {
        d.sqrt()
    } else {
        (d / n).sqrt()
    }
}

/// The loss and every key's gradient copied out of the device one by one by libtorch (the
/// reference for the copy stream), after a full load of `p`.
fn device_grads(
    m: &TchModel,
    p: &[Vec<f32>],
    b: &geomx_trainer::data::Dataset,
) -> (f32, Vec<Vec<f32>>) {
    let mut out = vec![Vec::new(); p.len()];
    let l = m
        .backward_on_device(p, b.view(), &mut |k, g| {
            let g = g.flatten(0, -1).to_device(tch::Device::Cpu);
            out[k] = Vec::<f32>::try_from(&g).unwrap();
        })
        .unwrap();
    (l, out)
}

/// On the GPU, ResNet-18 with overlap: the gradients that come to the host stage by stage on the
/// copy stream equal the device gradients copied out one by one, and a step whose keys were
/// preloaded on the copy stream during the previous backward pass computes what a model that
/// loads every key computes. (cuDNN may pick different algorithms per model, so the two sides
/// agree to 1e-4 relative, not bit for bit; a missed synchronisation gives stale or zero values
/// far outside that.)
#[test]
fn staged_copies_and_preloads_match_plain_loads_on_the_gpu_or_report_skipped() {
    let device = Device::Cuda(0);
    if let Err(e) = check_device(device) {
        println!("skipped: libtorch: {e}");
        return;
    }
    let data = band_images(256, 10, 3, 32);
    let batch = |i: usize| data.gather(&(i * 64..(i + 1) * 64).collect::<Vec<_>>());
    let model = TchModel::new(Arch::Resnet18, 3 * 32 * 32, 10, device)
        .unwrap()
        .with_overlap(true);
    let reference = TchModel::new(Arch::Resnet18, 3 * 32 * 32, 10, device).unwrap();
    let p0 = model.init(3);
    let mut next: Vec<Vec<f32>> = vec![Vec::new(); p0.len()];
    let mut host: Vec<Vec<f32>> = vec![Vec::new(); p0.len()];
    let mut preloaded = 0;
    let b0 = batch(0);
    let l0 = model
        .backward_host(&p0, b0.view(), &mut |first, grads, ahead| {
            for (i, g) in grads.iter().enumerate() {
                let k = first + i;
                host[k] = g.to_vec();
                next[k] = p0[k].iter().zip(*g).map(|(w, g)| w - 0.05 * g).collect();
            }
            let values: Vec<&[f32]> = next[first..first + grads.len()]
                .iter()
                .map(Vec::as_slice)
                .collect();
            preloaded += usize::from(ahead.preload(first, &values)?);
            Ok(())
        })
        .unwrap();
    assert!(preloaded > 1, "preloads taken: {preloaded}");
    let (lr0, want) = device_grads(&reference, &p0, &b0);
    assert!((l0 - lr0).abs() <= 1e-4 * lr0.abs(), "loss {l0} vs {lr0}");
    for (k, (a, b)) in host.iter().zip(&want).enumerate() {
        let d = rel_dist(a, b);
        assert!(d <= 1e-4, "step 0 key {k}: gradient off by {d}");
    }
    // The next step starts from the preloaded values.
    let b1 = batch(1);
    let (l1, g1) = model.loss_and_grad(&next, b1.view()).unwrap();
    let (lr1, gr1) = device_grads(&reference, &next, &b1);
    assert!((l1 - lr1).abs() <= 1e-4 * lr1.abs(), "loss {l1} vs {lr1}");
    for (k, (a, b)) in g1.iter().zip(&gr1).enumerate() {
        let d = rel_dist(a, b);
        assert!(d <= 1e-4, "step 1 key {k}: gradient off by {d}");
    }
    println!("GPU_PRELOAD_CHECK ok: {preloaded} stages preloaded, losses {l0} {l1}");
}

/// Seeded values with ties and zeros for key `key` of round `round`.
fn seeded_grad(n: usize, key: usize, round: u64) -> Vec<f32> {
    let mut s = (key as u64 + 1) * 0x9E37_79B9 + round * 0x85EB_CA6B;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 33) % 2001) as f32 / 37.0 - 27.0
        })
        .collect()
}

/// Worker-side Bi-Sparse with the error feedback on the device (`gpu::sparse_payloads`): over 8
/// rounds of seeded gradients on the GPU (keys of 20,000, 3,000 and 10 elements; exact top 1 %,
/// momentum 0 and 0.9), every payload equals the host path's (`WorkerSparse::encode` of the
/// same values) byte for byte, and the state copied back from the device equals the host's.
#[test]
fn worker_side_bisparse_on_the_device_matches_the_host_or_report_skipped() {
    use geomx_trainer::codec::{TierCodec, WorkerSparse};
    use geomx_trainer::config::Config;
    use geomx_trainer::engine::tch::gpu::{sparse_payloads, sparse_state_to_host, GpuCompressor};
    let Some(device) = gpu_or_skip() else {
        return;
    };
    let lens = [20_000usize, 3_000, 10];
    for momentum in [0.0f32, 0.9] {
        let toml = format!(
            "[train.optimizer]\nkind = \"sgd\"\nmomentum = 0.0\n[compression]\n\
             intra = {{ codec = \"bisparse\", density = 0.01, min_size = 1000, \
             selection = \"exact\", warmup_rounds = 0, momentum = {momentum} }}\n"
        );
        let cfg = Config::from_toml_str(&toml).unwrap();
        let (intra, spec) = TierCodec::from_config(&cfg.compression.intra, 10).split_pushes();
        let spec = spec.unwrap();
        let new = || WorkerSparse::new(&spec, intra.scaling(), 11, (0, 1), &lens).unwrap();
        let (mut on_device, mut host) = (new(), new());
        let mut comp = GpuCompressor::new(device).unwrap();
        for round in 0..8u64 {
            let grads: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(k, &n)| seeded_grad(n, k, round))
                .collect();
            let tensors: Vec<tch::Tensor> = grads
                .iter()
                .map(|g| tch::Tensor::from_slice(g).to_device(tch::Device::Cuda(0)))
                .collect();
            let mut got = vec![None; lens.len()];
            sparse_payloads(
                &mut comp,
                &mut on_device,
                &tensors,
                round,
                &mut |k, n, e| got[k] = Some((n, e)),
            )
            .unwrap();
            for (k, g) in grads.iter().enumerate() {
                let want = host.encode(k, g, round).unwrap();
                assert_eq!(
                    got[k].as_ref(),
                    Some(&(g.len(), want)),
                    "momentum {momentum} round {round} key {k}"
                );
            }
        }
        assert_eq!(on_device.device_keys().collect::<Vec<_>>(), [0, 1]);
        sparse_state_to_host(&comp, &mut on_device).unwrap();
        let state = |w: &WorkerSparse| {
            w.compressors()
                .map(|(k, c)| (k, c.export_state()))
                .collect::<Vec<_>>()
        };
        assert_eq!(state(&on_device), state(&host), "momentum {momentum}");
    }
    println!("GPU_WORKER_SPARSE ok: device payloads and state equal the host's");
}

/// On the GPU, batches that the prefetch thread stages in page-locked memory (the model's
/// `batch_stager` run on the `Prefetcher`'s thread) give ResNet-18 the loss and gradients of the
/// same batches copied from the host (to 1e-4 relative: cuDNN may pick other algorithms between
/// calls), each batch dropped after its step so that the page-locked buffers are reused; and the
/// step reads the staged copy (a batch carrying another batch's copy computes that batch's loss).
#[test]
fn page_locked_batches_from_the_prefetch_thread_match_host_batches_or_report_skipped() {
    use geomx_trainer::data::{Batcher, Prefetcher};
    let Some(device) = gpu_or_skip() else {
        return;
    };
    let data = band_images(512, 10, 3, 32);
    let model = TchModel::new(Arch::Resnet18, 3 * 32 * 32, 10, device).unwrap();
    let p = model.init(7);
    let batcher = Batcher::new((0..data.len()).collect(), 64, 5, 0).unwrap();
    let mut prefetch = Prefetcher::new(batcher, &data, 3, None, model.batch_stager()).unwrap();
    let mut previous: Option<Dataset> = None;
    for step in 0..8 {
        let b = prefetch.next_batch().unwrap();
        assert!(
            b.staged().is_some(),
            "step {step}: the batch was not staged"
        );
        let host = Dataset::new(
            b.features().to_vec(),
            b.labels().to_vec(),
            b.n_features(),
            10,
        )
        .unwrap();
        let (ls, gs) = model.loss_and_grad(&p, b.view()).unwrap();
        let (lh, gh) = model.loss_and_grad(&p, host.view()).unwrap();
        assert!(
            (ls - lh).abs() <= 1e-4 * lh.abs(),
            "step {step}: loss {ls} vs {lh}"
        );
        for (k, (a, b)) in gs.iter().zip(&gh).enumerate() {
            let d = rel_dist(a, b);
            assert!(d <= 1e-4, "step {step} key {k}: gradient off by {d}");
        }
        if let Some(prev) = previous.take() {
            let crossed = host.clone().with_staged(prev.staged().unwrap().clone());
            let (lc, _) = model.loss_and_grad(&p, crossed.view()).unwrap();
            let (lp, _) = model.loss_and_grad(&p, prev.view()).unwrap();
            assert!(
                (lc - lp).abs() <= 1e-4 * lp.abs(),
                "step {step}: {lc} vs {lp}"
            );
        }
        previous = Some(b);
    }
    println!("GPU_STAGED_BATCH_CHECK ok: 8 page-locked batches");
}
