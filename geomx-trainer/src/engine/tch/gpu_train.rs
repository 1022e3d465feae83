//! Training a libtorch model on a CUDA device with GPU-resident compression, timed: the
//! measurement behind `scripts/gpu-check.sh` (step time and compression time per step).
//!
//! Each step computes the gradient on the device ([`TchModel::backward_on_device`]), compresses
//! every key there ([`GpuCompressor`]), copies only the payloads to the host, decodes them as a
//! server would ([`crate::codec::decode_any`]) and applies plain SGD to the host parameters.

use std::time::Instant;

use serde::Serialize;

use super::gpu::{GpuCompressError, GpuCompressor};
use super::TchModel;
use crate::codec::decode_any;
use crate::data::Dataset;
use crate::engine::{EngineError, Model};
use geomx_kernels::{Scaling, ValueType};

/// The push codec applied on the device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "codec", rename_all = "kebab-case")]
pub enum GpuCodec {
    /// Dense FP16 with pow2 scaling.
    Fp16,
    /// Error feedback + exact top-k of `density · n` per key, f32 values.
    Topk {
        /// Fraction of each key sent.
        density: f64,
        /// Error-feedback momentum.
        momentum: f32,
    },
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuTrainOptions {
    /// Training steps (the first one also warms up cuDNN and the kernels and is not timed).
    pub steps: usize,
    /// Samples per step.
    pub batch: usize,
    /// Learning rate of the host SGD step.
    pub lr: f32,
    /// Seed of the initial parameters.
    pub seed: u64,
    /// Codec.
    pub codec: GpuCodec,
}

/// Timings and outcome of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuTrainReport {
    /// The options.
    pub options: GpuTrainOptions,
    /// Device the model ran on.
    pub device: String,
    /// CUDA device name.
    pub gpu: String,
    /// Model parameters.
    pub params: usize,
    /// Median wall time of a whole step (gradient, compression, payload copy, decode, update), ms.
    pub step_ms_median: f64,
    /// Median time per step spent compressing on the device and copying payloads to the host, ms.
    pub compress_ms_median: f64,
    /// `compress_ms_median / step_ms_median`.
    pub compress_fraction: f64,
    /// Payload bytes sent per step (all keys).
    pub payload_bytes_per_step: usize,
    /// Bytes of the same gradients as dense f32.
    pub dense_bytes_per_step: usize,
    /// Mean loss of the first step.
    pub loss_first: f32,
    /// Mean loss of the last step.
    pub loss_last: f32,
}

/// Errors of a GPU training run.
#[derive(Debug, thiserror::Error)]
pub enum GpuTrainError {
    /// The model failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Compression failed or is unavailable.
    #[error(transparent)]
    Compress(#[from] GpuCompressError),
    /// A payload did not decode.
    #[error("decode: {0}")]
    Decode(String),
    /// Options that cannot run.
    #[error("invalid options: {0}")]
    Options(String),
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Trains `model` (on a CUDA device) on `data` for `opts.steps` steps with GPU-resident
/// compression; batches cycle through `data` in order.
pub fn train_with_gpu_compression(
    model: &TchModel,
    data: &Dataset,
    opts: GpuTrainOptions,
) -> Result<GpuTrainReport, GpuTrainError> {
    if opts.steps < 2 || opts.batch == 0 || opts.batch > data.len() {
        return Err(GpuTrainError::Options(format!(
            "steps {} (>= 2), batch {} (1..={})",
            opts.steps,
            opts.batch,
            data.len()
        )));
    }
    let mut comp = GpuCompressor::new(model.device())?;
    let specs = model.tensors().to_vec();
    let mut params = model.init(opts.seed);
    let (mut step_ms, mut comp_ms) = (Vec::new(), Vec::new());
    let (mut loss_first, mut loss_last, mut payload_bytes) = (0f32, 0f32, 0usize);
    for step in 0..opts.steps {
        let start = (step * opts.batch) % (data.len() - opts.batch + 1);
        let idx: Vec<usize> = (start..start + opts.batch).collect();
        let batch = data.gather(&idx);
        let t0 = Instant::now();
        let mut compress_s = 0f64;
        let mut payloads: Vec<(usize, Vec<u8>)> = Vec::with_capacity(specs.len());
        let mut failure: Option<GpuCompressError> = None;
        let loss = model.backward_on_device(&params, batch.view(), &mut |key, g| {
            if failure.is_some() {
                return;
            }
            let c0 = Instant::now();
            let r = match opts.codec {
                GpuCodec::Fp16 => comp.fp16_payload(g, Scaling::Pow2),
                GpuCodec::Topk { density, momentum } => {
                    let k = ((density * specs[key].len() as f64).ceil() as usize).max(1);
                    comp.ef_topk_payload(key, g, momentum, k, ValueType::F32, Scaling::None)
                }
            };
            compress_s += c0.elapsed().as_secs_f64();
            match r {
                Ok(p) => payloads.push((key, p)),
                Err(e) => failure = Some(e),
            }
        })?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        payload_bytes = payloads.iter().map(|(_, p)| p.len()).sum();
        for (key, p) in &payloads {
            let g = decode_any(p, *key, specs[*key].len()).map_err(GpuTrainError::Decode)?;
            params[*key]
                .iter_mut()
                .zip(&g)
                .for_each(|(w, g)| *w -= opts.lr * g);
        }
        let total = t0.elapsed().as_secs_f64();
        if step == 0 {
            loss_first = loss;
        } else {
            step_ms.push(total * 1e3);
            comp_ms.push(compress_s * 1e3);
        }
        loss_last = loss;
    }
    let (step_ms_median, compress_ms_median) = (median(&mut step_ms), median(&mut comp_ms));
    Ok(GpuTrainReport {
        options: opts,
        device: model.device().to_string(),
        gpu: comp.device().name().to_string(),
        params: model.num_params(),
        step_ms_median,
        compress_ms_median,
        compress_fraction: compress_ms_median / step_ms_median.max(f64::MIN_POSITIVE),
        payload_bytes_per_step: payload_bytes,
        dense_bytes_per_step: 4 * model.num_params(),
        loss_first,
        loss_last,
    })
}
