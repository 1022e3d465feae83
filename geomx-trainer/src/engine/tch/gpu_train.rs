//! Training a libtorch model on a CUDA device, timed: the measurement behind
//! `scripts/gpu-check.sh` (step time, and encode + copy time per step).
//!
//! [`train_with_gpu_compression`] runs the worker's step as the trainer runs it: the host
//! parameters are loaded into the device, the gradient is computed there, and either
//! - ([`GpuCodec::Dense`]) the gradients come to the host stage by stage while the backward pass
//!   goes on ([`TchModel::backward_host`], as the trainer's f32 pushes), a stand-in server applies
//!   plain SGD to each stage as it arrives, and the stage's new values are preloaded into the
//!   device ([`super::Ahead::preload`]), as the trainer does with each reply; or
//! - every key is compressed on the device ([`GpuCompressor`]) with only the payload copied,
//!   payloads are decoded as a server would ([`crate::codec::decode_any`]) and plain SGD updates
//!   the host parameters.
//!
//! [`train_plain`] is the baseline: a plain libtorch loop whose parameters and SGD step stay on
//! the device, on the same batches. Both loops stage each batch for the device
//! ([`crate::engine::Model::batch_stager`]: page-locked on CUDA) before its timed step, as the
//! worker's prefetch thread does.

use std::time::Instant;

use serde::Serialize;

use tch::{Kind, Tensor};

use super::arch::{cross_entropy, BnMode};
use super::gpu::{BatchTimes, GpuCompressError, GpuCompressor};
use super::{amp, guarded, torch_device, TchModel};
use crate::codec::decode_any;
use crate::config::Precision;
use crate::data::{Dataset, Stage};
use crate::engine::{EngineError, Model};
use geomx_kernels::{decode_dense_into, Scaling, ValueType};

/// The push codec applied on the device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "codec", rename_all = "kebab-case")]
pub enum GpuCodec {
    /// No encoding: each gradient is copied to the host as f32 (the trainer's f32 tier).
    Dense,
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
    /// CUDA device name (`none` on the CPU).
    pub gpu: String,
    /// Model parameters.
    pub params: usize,
    /// Median wall time of a whole step (gradient, compression, payload copy, decode, update), ms.
    pub step_ms_median: f64,
    /// Median time of the forward and backward pass, ms.
    pub compute_ms_median: f64,
    /// Median time of loading the parameters from the host into the device tensors, ms.
    pub load_ms_median: f64,
    /// Median time of the encoding on the device (with its synchronisations), ms.
    pub encode_ms_median: f64,
    /// Median time of copying the payloads to the host, ms (0 for [`GpuCodec::Dense`], whose
    /// copies run on a copy stream during the backward pass: waiting for them counts as
    /// compute).
    pub copy_ms_median: f64,
    /// Median time of the host side standing in for the server: decoding and the SGD update, ms
    /// (for [`GpuCodec::Dense`]: the SGD of each stage and its preload, inside the backward pass
    /// while the device works on the stages below).
    pub update_ms_median: f64,
    /// Median time of preloading the next parameters into the device, ms (part of
    /// `update_ms_median`; [`GpuCodec::Dense`] only, else 0).
    pub preload_ms_median: f64,
    /// Median of encode + copy per step, ms.
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

/// The compressor of a codec that needs one (always present then).
fn gpu(comp: Option<&mut GpuCompressor>) -> Result<&mut GpuCompressor, GpuCompressError> {
    comp.ok_or_else(|| GpuCompressError::Unavailable("no compressor for a CPU model".into()))
}

/// Per-step times (ms) of the timed steps.
#[derive(Default)]
struct Split {
    step: Vec<f64>,
    load: Vec<f64>,
    compute: Vec<f64>,
    encode: Vec<f64>,
    copy: Vec<f64>,
    update: Vec<f64>,
    preload: Vec<f64>,
    coded: Vec<f64>,
}

/// Buffers reused across steps, so that no step allocates on the host once they have their sizes.
#[derive(Default)]
struct Scratch {
    /// Per key: the gradient as f32 (dense pushes, or decoded FP16 payloads).
    grads: Vec<Vec<f32>>,
    /// Per key: the encoded payload (FP16 and top-k).
    payloads: Vec<Vec<u8>>,
}

/// Encodes a step's gradients (key order) with `codec` into `scratch`: batched on the device for
/// FP16, per key for top-k (its state is per key). Returns the time split and the bytes pushed.
fn encode_step(
    comp: &mut Option<GpuCompressor>,
    codec: GpuCodec,
    grads: &[&Tensor],
    specs: &[crate::engine::TensorSpec],
    scratch: &mut Scratch,
) -> Result<(BatchTimes, usize), GpuTrainError> {
    match (codec, comp.as_mut()) {
        (GpuCodec::Dense, _) => Err(GpuTrainError::Options(
            "dense pushes take the staged path (dense_step)".into(),
        )),
        (GpuCodec::Fp16, c) => {
            let times = gpu(c)?.fp16_payloads_into(grads, Scaling::Pow2, &mut scratch.payloads)?;
            Ok((times, scratch.payloads.iter().map(Vec::len).sum()))
        }
        (GpuCodec::Topk { density, momentum }, c) => {
            let c = gpu(c)?;
            let t0 = Instant::now();
            scratch.payloads = grads
                .iter()
                .enumerate()
                .map(|(key, g)| {
                    let k = ((density * specs[key].len() as f64).ceil() as usize).max(1);
                    c.ef_topk_payload(key, g, momentum, k, ValueType::F32, Scaling::None)
                })
                .collect::<Result<_, _>>()?;
            let times = BatchTimes {
                encode_s: t0.elapsed().as_secs_f64(),
                copy_s: 0.0,
            };
            Ok((times, scratch.payloads.iter().map(Vec::len).sum()))
        }
    }
}

/// The server's side of a step, standing in for it on the worker's host: decodes what was pushed
/// and applies SGD to `params`, keys in parallel ([`super::split::run_split`], as a server's
/// threads would).
fn apply_step(
    codec: GpuCodec,
    params: &mut [Vec<f32>],
    scratch: &mut Scratch,
    lr: f32,
) -> Result<(), GpuTrainError> {
    let n = params.len();
    scratch.grads.resize_with(n, Vec::new);
    scratch.payloads.resize_with(n, Vec::new);
    let work: Vec<_> = params
        .iter_mut()
        .zip(scratch.grads.iter_mut())
        .zip(scratch.payloads.iter())
        .enumerate()
        .collect();
    super::split::run_split(
        work,
        |(_, ((w, _), _))| w.len(),
        |(key, ((w, g), payload))| {
            match codec {
                GpuCodec::Dense => {}
                GpuCodec::Fp16 => {
                    g.resize(w.len(), 0.0);
                    decode_dense_into(payload, key as u64, g)
                        .map_err(|e| GpuTrainError::Decode(e.to_string()))?;
                }
                GpuCodec::Topk { .. } => {
                    *g = decode_any(payload, key, w.len()).map_err(GpuTrainError::Decode)?;
                }
            }
            w.iter_mut().zip(g.iter()).for_each(|(w, g)| *w -= lr * g);
            Ok(())
        },
    )
}

/// One step with dense f32 pushes, as the trainer's worker and a server run it. The gradients
/// come to the host a stage at a time during the backward pass ([`TchModel::backward_host`]:
/// each stage once its copy is done, while the device works on the stages below); the stand-in
/// server applies SGD to each stage as it arrives (`next ← params − lr·g`, keys in parallel) and
/// the stage's new values are preloaded into the device ([`super::Ahead::preload`]), as the
/// worker does with each reply. `params` becomes the new values (`next` keeps the old buffers,
/// reused next step). Returns the loss, the seconds spent in the stand-in server's update and
/// the preloads, and those of the preloads alone.
fn dense_step(
    model: &TchModel,
    params: &mut Vec<Vec<f32>>,
    next: &mut Vec<Vec<f32>>,
    batch: &Dataset,
    lr: f32,
) -> Result<(f32, f64, f64), GpuTrainError> {
    let (mut host_s, mut preload_s) = (0.0, 0.0);
    let current: &[Vec<f32>] = params;
    let loss = model.backward_host(current, batch.view(), &mut |first, grads, ahead| {
        let t = Instant::now();
        let keys = first..first + grads.len();
        // Keys in pieces, so that a large key does not hold one thread alone.
        let piece = super::split::PIECE;
        let mut work = Vec::new();
        for ((n, w), g) in next[keys.clone()]
            .iter_mut()
            .zip(&current[keys.clone()])
            .zip(grads)
        {
            n.resize(w.len(), 0.0);
            work.extend(
                n.chunks_mut(piece)
                    .zip(w.chunks(piece))
                    .zip(g.chunks(piece)),
            );
        }
        super::split::each_split(
            work,
            |((_, w), _)| w.len(),
            |((n, w), g)| {
                for ((n, w), g) in n.iter_mut().zip(w).zip(g) {
                    *n = w - lr * g;
                }
            },
        );
        let t_pre = Instant::now();
        let values: Vec<&[f32]> = next[keys].iter().map(Vec::as_slice).collect();
        ahead.preload(first, &values)?;
        host_s += t.elapsed().as_secs_f64();
        preload_s += t_pre.elapsed().as_secs_f64();
        Ok(())
    })?;
    std::mem::swap(params, next);
    Ok((loss, host_s, preload_s))
}

/// The batch of step `step` (`batch` samples of `data` from `step · batch`, wrapping), staged for
/// the model's device by `stage` as a worker's prefetch thread stages it. Both loops do this
/// before their timed step, as a PyTorch loop's `DataLoader(pin_memory=True)` pins its batches
/// outside it.
fn step_batch(
    stage: &mut Option<Stage>,
    data: &Dataset,
    step: usize,
    batch: usize,
) -> Result<Dataset, GpuTrainError> {
    let start = (step * batch) % (data.len() - batch + 1);
    let idx: Vec<usize> = (start..start + batch).collect();
    let b = data.gather(&idx);
    match stage.as_mut() {
        Some(st) => {
            let staged = st(&b).map_err(|e| GpuTrainError::Engine(EngineError::Backend(e)))?;
            Ok(b.with_staged(staged))
        }
        None => Ok(b),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Trains `model` on `data` for `opts.steps` steps as the geomx worker does, with GPU-resident
/// compression (a CUDA model) or dense f32 pushes (any device); batches cycle through `data` in
/// order.
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
    // Dense pushes need no CUDA kernels, so they also run on a CPU model (the tests' check).
    let mut comp = if opts.codec == GpuCodec::Dense {
        None
    } else {
        Some(GpuCompressor::new(model.device())?)
    };
    let specs = model.tensors().to_vec();
    let mut params = model.init(opts.seed);
    let mut split = Split::default();
    let mut scratch = Scratch::default();
    let (mut loss_first, mut loss_last, mut payload_bytes) = (0f32, 0f32, 0usize);
    let mut next: Vec<Vec<f32>> = vec![Vec::new(); specs.len()];
    let mut stage = model.batch_stager();
    for step in 0..opts.steps {
        let batch = step_batch(&mut stage, data, step, opts.batch)?;
        let t0 = Instant::now();
        let mut times = BatchTimes::default();
        let (loss, update_s, preload_s) = if opts.codec == GpuCodec::Dense {
            payload_bytes = 4 * model.num_params();
            dense_step(model, &mut params, &mut next, &batch, opts.lr)?
        } else {
            let mut grads: Vec<Option<Tensor>> = (0..specs.len()).map(|_| None).collect();
            let mut seen = 0usize;
            let mut failure: Option<GpuTrainError> = None;
            let loss = model.backward_on_device(&params, batch.view(), &mut |key, g| {
                grads[key] = Some(g.shallow_clone());
                seen += 1;
                if seen < specs.len() {
                    return;
                }
                // The last gradient: encode them all while they are valid.
                let all: Vec<&Tensor> = grads.iter().flatten().collect();
                match encode_step(&mut comp, opts.codec, &all, &specs, &mut scratch) {
                    Ok((t, bytes)) => {
                        times = t;
                        payload_bytes = bytes;
                    }
                    Err(e) => failure = Some(e),
                }
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            let t_update = Instant::now();
            apply_step(opts.codec, &mut params, &mut scratch, opts.lr)?;
            (loss, t_update.elapsed().as_secs_f64(), 0.0)
        };
        let total = t0.elapsed().as_secs_f64();
        if step == 0 {
            loss_first = loss;
        } else {
            let coded = times.encode_s + times.copy_s;
            let load_s = model.last_load_seconds();
            split.step.push(total * 1e3);
            split.load.push(load_s * 1e3);
            split
                .compute
                .push((total - coded - update_s - load_s) * 1e3);
            split.encode.push(times.encode_s * 1e3);
            split.copy.push(times.copy_s * 1e3);
            split.update.push(update_s * 1e3);
            split.preload.push(preload_s * 1e3);
            split.coded.push(coded * 1e3);
        }
        loss_last = loss;
    }
    let step_ms_median = median(&mut split.step);
    let compress_ms_median = median(&mut split.coded);
    Ok(GpuTrainReport {
        options: opts,
        device: model.device().to_string(),
        gpu: match (&comp, model.device()) {
            (Some(c), _) => c.device().name().to_string(),
            (None, crate::engine::Device::Cuda(o)) => geomx_kernels::cuda::CudaDevice::new(o)
                .map_or_else(|e| format!("unknown ({e})"), |d| d.name().to_string()),
            (None, crate::engine::Device::Cpu) => "none".into(),
        },
        params: model.num_params(),
        step_ms_median,
        compute_ms_median: median(&mut split.compute),
        load_ms_median: median(&mut split.load),
        encode_ms_median: median(&mut split.encode),
        copy_ms_median: median(&mut split.copy),
        update_ms_median: median(&mut split.update),
        preload_ms_median: median(&mut split.preload),
        compress_ms_median,
        compress_fraction: compress_ms_median / step_ms_median.max(f64::MIN_POSITIVE),
        payload_bytes_per_step: payload_bytes,
        dense_bytes_per_step: 4 * model.num_params(),
        loss_first,
        loss_last,
    })
}

/// Timings and outcome of the plain libtorch loop ([`train_plain`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlainReport {
    /// Steps run (the first is not timed).
    pub steps: usize,
    /// Samples per step.
    pub batch: usize,
    /// Device the model ran on.
    pub device: String,
    /// Model parameters.
    pub params: usize,
    /// Median wall time of a whole step (batch copy, forward, backward, SGD on the device, loss
    /// read back), ms.
    pub step_ms_median: f64,
    /// Mean loss of the first step.
    pub loss_first: f32,
    /// Mean loss of the last step.
    pub loss_last: f32,
}

/// The baseline of [`train_with_gpu_compression`]: a plain libtorch training loop on the model's
/// device, as a PyTorch user writes it. Parameters (from `model.init(seed)`) and batch-norm
/// statistics stay on the device, each step copies the batch there, runs forward and backward (in
/// the model's precision, with GradScaler's loss scale for fp16) and applies SGD (`p ← p − lr·g`)
/// on the device, then reads the loss back. Batches are the same as
/// [`train_with_gpu_compression`]'s for the same `steps` and `batch`, staged the same way before
/// each timed step.
pub fn train_plain(
    model: &TchModel,
    data: &Dataset,
    steps: usize,
    batch: usize,
    lr: f32,
    seed: u64,
) -> Result<PlainReport, GpuTrainError> {
    if steps < 2 || batch == 0 || batch > data.len() {
        return Err(GpuTrainError::Options(format!(
            "steps {steps} (>= 2), batch {batch} (1..={})",
            data.len()
        )));
    }
    model.ensure_device()?;
    let dev = torch_device(model.device());
    let init = model.init(seed);
    let net = model.net();
    let (mut step_ms, mut loss_first, mut loss_last) = (Vec::new(), 0f32, 0f32);
    let mut stage = model.batch_stager();
    guarded(|| -> Result<(), GpuTrainError> {
        let p: Vec<Tensor> = model.params_on(&init, Kind::Float, dev, true);
        let bn = net.bn_stats(dev);
        let compute = amp::compute_kind(model.precision());
        let mut scaler = (model.precision() == Precision::Fp16Amp).then(amp::LossScaler::default);
        for step in 0..steps {
            let b = step_batch(&mut stage, data, step, batch)?;
            let t0 = Instant::now();
            let (x, y) = model.batch_on(&b.view(), Kind::Float, dev);
            let logits = net.forward_in(&p, &x, BnMode::Train(&bn), compute);
            let loss = cross_entropy(&logits, &y, Kind::Float);
            // fp16: scale the loss, unscale the gradients and skip the update on overflow, as
            // PyTorch's GradScaler does.
            let finite = match scaler.as_mut() {
                Some(s) => {
                    (&loss * s.scale()).backward();
                    let mut g: Vec<Tensor> = p.iter().map(Tensor::grad).collect();
                    s.unscale(&mut g)
                }
                None => {
                    loss.backward();
                    true
                }
            };
            tch::no_grad(|| {
                for t in &p {
                    let mut g = t.grad();
                    if finite {
                        let _ = t.shallow_clone().g_sub_(&(&g * f64::from(lr)));
                    }
                    let _ = g.zero_();
                }
            });
            let l = loss.double_value(&[]) as f32;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if step == 0 {
                loss_first = l;
            } else {
                step_ms.push(ms);
            }
            loss_last = l;
        }
        Ok(())
    })??;
    Ok(PlainReport {
        steps,
        batch,
        device: model.device().to_string(),
        params: model.num_params(),
        step_ms_median: median(&mut step_ms),
        loss_first,
        loss_last,
    })
}
