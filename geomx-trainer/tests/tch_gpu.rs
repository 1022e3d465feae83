//! The CNN trained on a CUDA device with GPU-resident compression (feature `tch`). Where libtorch
//! sees no GPU (or the CUDA kernels cannot load) the test prints `skipped: <reason>` and passes;
//! on a GPU it checks that the loss falls with FP16 and with error-feedback top-k and prints one
//! JSON line per codec with the step time and the compression time per step (read by
//! `scripts/gpu-check.sh`). `GEOMX_TCH_GPU_STEPS` sets the step count (default 30).
#![cfg(feature = "tch")]

use geomx_trainer::data::Dataset;
use geomx_trainer::engine::tch::gpu::unavailable_reason;
use geomx_trainer::engine::tch::gpu_train::{
    train_with_gpu_compression, GpuCodec, GpuTrainOptions,
};
use geomx_trainer::engine::tch::{check_device, Arch, TchModel};
use geomx_trainer::engine::Device;

/// MNIST-sized (28×28) images whose label is the position of a bright band, with noise.
fn band_images(n: usize, classes: usize) -> Dataset {
    let side = 28;
    let mut s = 0x9e37_79b9u32;
    let mut features = Vec::with_capacity(n * side * side);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        for row in 0..side {
            for _ in 0..side {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let band = if row * classes / side == c { 0.7 } else { 0.0 };
                features.push((s % 1000) as f32 / 1000.0 * 0.3 + band);
            }
        }
        labels.push(c as u32);
    }
    Dataset::new(features, labels, side * side, classes).unwrap()
}

#[test]
fn cnn_trains_on_the_gpu_with_gpu_resident_compression_or_reports_skipped() {
    let device = Device::Cuda(0);
    if let Err(e) = check_device(device) {
        println!("skipped: libtorch: {e}");
        return;
    }
    if let Some(reason) = unavailable_reason(device) {
        println!("skipped: {reason}");
        return;
    }
    let steps = std::env::var("GEOMX_TCH_GPU_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let data = band_images(4_096, 10);
    let model = TchModel::new(Arch::Cnn, 784, 10, device).unwrap();
    for codec in [
        GpuCodec::Fp16,
        GpuCodec::Topk {
            density: 0.01,
            momentum: 0.9,
        },
    ] {
        let opts = GpuTrainOptions {
            steps,
            batch: 128,
            lr: 0.05,
            seed: 1,
            codec,
        };
        let r = train_with_gpu_compression(&model, &data, opts).unwrap();
        println!("GPU_TRAIN {}", serde_json::to_string(&r).unwrap());
        assert!(
            r.loss_last < r.loss_first,
            "{codec:?}: loss {} -> {}",
            r.loss_first,
            r.loss_last
        );
        assert!(r.payload_bytes_per_step < r.dense_bytes_per_step);
    }
}
