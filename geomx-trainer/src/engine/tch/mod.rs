//! The libtorch back end (feature `tch`): GeoMX's demo CNN and ResNet-18 behind [`Model`].
//!
//! The trainer owns the parameters as flat `Vec<f32>` per key, as for the built-in engine. A
//! training step loads them into leaf tensors that stay on the model's device between steps
//! (`resident.rs`), runs the functional forward pass of [`arch::Net`] in the model's precision
//! ([`amp`]: f32 master weights, bf16 / fp16 compute) and autograd, and hands the gradients back,
//! stage by stage as the backward pass produces them when overlap is on
//! ([`TchModel::with_overlap`]). The shared state sits behind `Arc<Mutex<…>>`, so a
//! [`TchModel`] is `Send + Sync` and clones share it.
//!
//! On a CUDA device [`TchModel::backward_on_device`] gives the gradients as device tensors, so
//! that [`gpu::GpuCompressor`] can compress them in place and copy only the payload to the host.
//!
//! libtorch reports errors by panicking inside `tch`; every entry point runs under
//! [`std::panic::catch_unwind`] and turns such a panic into [`EngineError::Backend`].

pub mod amp;
pub mod arch;
mod gate;
pub mod gpu;
pub mod gpu_train;
mod resident;
mod split;
mod staging;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use geomx_kernels::ValueType;
use geomx_net::PayloadCodec;
use tch::{Kind, Tensor};

use super::{
    check_batch, check_params, encode_on_host, sparse_on_host, DenseEncoding, Device, EngineError,
    Evaluation, LayerGate, Model, TensorSpec,
};
use crate::codec::{Encoded, WorkerSparse};
use crate::config::Precision;
use crate::data::Samples;
pub use arch::{Arch, BnMode, BnStats, ImageShape, Net};
use gate::Gate;
use gpu::host_grads::HostGrads;
use gpu::GpuCompressor;
use resident::Resident;

/// Samples per forward pass when evaluating.
const EVAL_CHUNK: usize = 256;

/// A libtorch model: an architecture on a device.
#[derive(Debug, Clone)]
pub struct TchModel {
    net: Net,
    device: Device,
    /// Arithmetic of training steps ([`amp`]); evaluation computes in `f32`.
    precision: Precision,
    /// The loss scale of `Precision::Fp16Amp`, one per process as PyTorch's `GradScaler`.
    scaler: Arc<Mutex<amp::LossScaler>>,
    /// Hand each stage's gradients over as soon as the backward pass produced them.
    overlap: bool,
    /// Seconds the last training step spent loading the parameters (f64 bits; the GPU step
    /// benchmark's split).
    load_s: Arc<std::sync::atomic::AtomicU64>,
    /// The GPU compressor of [`Model::backward_encoded`], opened at first use.
    gpu: Arc<Mutex<Opened<GpuCompressor>>>,
    /// The copy stream and page-locked buffer that bring a CUDA model's gradients to the host
    /// stage by stage ([`TchModel::backward_host`]), opened at first use.
    host_grads: Arc<Mutex<Opened<HostGrads>>>,
    /// Whether libtorch can use `device`, checked at the first computation.
    device_ok: Arc<OnceLock<Result<(), EngineError>>>,
    /// The parameters kept on the device between training steps, made at the first one. A step
    /// that finds them in use by another thread (clones share them) builds its own tensors.
    resident: Arc<Mutex<Option<resident::Resident>>>,
    /// Batch norm's running statistics, created at the first training step (see [`BnMode`]).
    /// Each process that trains keeps its own, as each PyTorch replica does.
    bn: Arc<Mutex<Option<arch::BnStats>>>,
}

/// A piece of GPU machinery opened at first use (or found unavailable, once).
#[derive(Debug)]
enum Opened<T> {
    /// Not tried yet.
    Untried,
    /// Ready.
    Ready(Box<T>),
    /// Unavailable (the reason was logged): the host fallback is used.
    Unavailable,
}

impl<T> Opened<T> {
    /// The machinery, opened by `open` at the first call; `None` (with a warning naming `what`
    /// and the reason, logged once) when it cannot be opened.
    fn get_or_open(
        &mut self,
        what: &str,
        open: impl FnOnce() -> Result<T, gpu::GpuCompressError>,
    ) -> Option<&mut T> {
        if matches!(self, Opened::Untried) {
            *self = match open() {
                Ok(t) => Opened::Ready(Box::new(t)),
                Err(e) => {
                    tracing::warn!(error = %e, "{what} off: using the host path");
                    Opened::Unavailable
                }
            };
        }
        self.ready()
    }

    /// The machinery if it is open.
    fn ready(&mut self) -> Option<&mut T> {
        match self {
            Opened::Ready(t) => Some(t),
            _ => None,
        }
    }
}

/// What [`TchModel::backward_stages`] calls once a stage's gradients are final: the stage's keys,
/// the leaves, the resident parameters when the leaves are theirs, and the copy stream.
type StageFn<'a> = dyn FnMut(
        std::ops::Range<usize>,
        &[Tensor],
        Option<&mut Resident>,
        Option<&mut HostGrads>,
    ) -> Result<(), EngineError>
    + 'a;

/// The parameters of a training step.
enum Params<'a, 'g> {
    /// Current: all loaded before the forward pass.
    Given(&'a [Vec<f32>]),
    /// Brought up to date layer by layer as the forward pass reaches them ([`gate`]).
    Gated(Gate<'a, 'g>),
}

/// Hands the gradients of keys `first..first + grads.len()` to `on_grad`, last key first, as
/// owned vectors ([`Model::backward_layerwise`]).
fn hand_over(
    on_grad: &mut dyn FnMut(usize, Vec<f32>),
    first: usize,
    grads: &[&[f32]],
) -> Result<(), EngineError> {
    for (i, g) in grads.iter().enumerate().rev() {
        on_grad(first + i, g.to_vec());
    }
    Ok(())
}

/// What [`TchModel::backward_host`] calls with each stage's host gradients: the stage's first
/// key, the gradients of its keys (key order), and the means to preload their next values.
pub type HostStageFn<'a> =
    dyn FnMut(usize, &[&[f32]], &mut Ahead<'_>) -> Result<(), EngineError> + 'a;

/// Loads a step's parameters for the next step from inside [`TchModel::backward_host`]'s
/// callback, while the backward pass goes on below.
pub struct Ahead<'a> {
    resident: Option<&'a mut Resident>,
    copies: Option<&'a HostGrads>,
    /// The lowest key whose gradient is complete: only keys from it on may be preloaded.
    done_from: usize,
}

impl<'a> Ahead<'a> {
    fn new(
        resident: Option<&'a mut Resident>,
        copies: Option<&'a HostGrads>,
        done_from: usize,
    ) -> Ahead<'a> {
        Ahead {
            resident,
            copies,
            done_from,
        }
    }

    /// Keys `first..first + values.len()` will have `values` at the next step: load them into
    /// the device now (on CUDA asynchronously, on the copy stream), so that the next step skips
    /// them when it is given the same values (see [`Model::preload`]). Only keys whose
    /// gradients have been handed over may be preloaded. Returns whether they were loaded: not
    /// when the step runs on fresh tensors (another thread held the resident ones) or without a
    /// copy stream.
    pub fn preload(&mut self, first: usize, values: &[&[f32]]) -> Result<bool, EngineError> {
        if first < self.done_from {
            return Err(EngineError::Backend(format!(
                "preload of key {first}: its gradient is not complete yet (keys from {} are)",
                self.done_from
            )));
        }
        match self.resident.as_deref_mut() {
            Some(r) => {
                let _copy = crate::clock::copy_span();
                // The keys' gradients have arrived, so nothing queued reads their old values.
                guarded(|| r.preload(first, values, self.copies, false))?
                    .map_err(EngineError::Backend)
            }
            None => Ok(false),
        }
    }
}

/// The gradients of keys `keys` in `host`, which holds a flat buffer's elements from `base` on
/// (`spans`: each key's offset and length in the flat buffer).
fn key_slices<'a>(
    keys: std::ops::Range<usize>,
    host: &'a [f32],
    base: usize,
    spans: &[(usize, usize)],
) -> Vec<&'a [f32]> {
    keys.map(|k| {
        let (off, len) = spans[k];
        &host[off - base..off - base + len]
    })
    .collect()
}

/// The libtorch device of `d`.
pub fn torch_device(d: Device) -> tch::Device {
    match d {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(n) => tch::Device::Cuda(n),
    }
}

/// Number of CUDA devices libtorch sees (0 without a GPU, a driver, or a CUDA build of torch).
pub fn cuda_device_count() -> usize {
    catch_unwind(tch::Cuda::device_count).unwrap_or(0).max(0) as usize
}

/// Checks that libtorch can use `device`: CUDA must be available with enough devices.
pub fn check_device(device: Device) -> Result<(), EngineError> {
    let Device::Cuda(n) = device else {
        return Ok(());
    };
    let count = cuda_device_count();
    if n >= count {
        return Err(EngineError::Device(format!(
            "model.device = \"{device}\" but libtorch sees {count} CUDA device(s) (no GPU, no \
             driver, or a CPU-only torch build); use model.device = \"cpu\""
        )));
    }
    Ok(())
}

/// Runs libtorch code, turning a panic of `tch` into [`EngineError::Backend`].
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libtorch error".into());
        EngineError::Backend(msg.lines().next().unwrap_or_default().to_string())
    })
}

/// Finite values of `g` that FP16 encoding with `scaling` turns into ±inf: none under `pow2`
/// (the maximum is scaled below 2^15), else the finite magnitudes of at least 65520 (counted on
/// the device; only the count comes to the host).
fn fp16_overflows(g: &Tensor, scaling: geomx_kernels::Scaling) -> Result<usize, EngineError> {
    if scaling == geomx_kernels::Scaling::Pow2 {
        return Ok(0);
    }
    guarded(|| {
        g.abs()
            .ge(65520.0)
            .logical_and(&g.isfinite())
            .sum(Kind::Int64)
            .int64_value(&[])
    })
    .map(|n| n.max(0) as usize)
}

/// Copies a host tensor of `shape` to a libtorch tensor of `kind` on `dev` (a copy span,
/// [`crate::clock::copy_span`]).
fn tensor_of(data: &[f32], shape: &[usize], kind: Kind, dev: tch::Device) -> Tensor {
    let _copy = crate::clock::copy_span();
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(data)
        .reshape(&shape)
        .to_kind(kind)
        .to_device(dev)
}

/// Copies a float tensor (any device) into a host vector (a copy span).
fn to_host(t: &Tensor) -> Vec<f32> {
    let _copy = crate::clock::copy_span();
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let n = t.numel();
    let mut out = vec![0f32; n];
    t.copy_data(&mut out, n);
    out
}

impl TchModel {
    /// `arch` for samples of `inputs` features (a square image of 1 or 3 channels) and `classes`
    /// classes on `device`. Errors when the input is not such an image or the architecture does
    /// not fit it. The device is checked at the first computation ([`check_device`]), so that
    /// roles that only need the shapes (servers) run on hosts without the GPU.
    pub fn new(
        arch: Arch,
        inputs: usize,
        classes: usize,
        device: Device,
    ) -> Result<TchModel, EngineError> {
        let image = ImageShape::infer(inputs).ok_or_else(|| {
            EngineError::Architecture(format!(
                "{inputs} features are not a square image of 1 or 3 channels"
            ))
        })?;
        let net = Net::new(arch, image, classes)?;
        Ok(TchModel {
            net,
            device,
            precision: Precision::Fp32,
            scaler: Arc::new(Mutex::new(amp::LossScaler::default())),
            overlap: false,
            load_s: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            gpu: Arc::new(Mutex::new(Opened::Untried)),
            host_grads: Arc::new(Mutex::new(Opened::Untried)),
            device_ok: Arc::new(OnceLock::new()),
            resident: Arc::new(Mutex::new(None)),
            bn: Arc::new(Mutex::new(None)),
        })
    }

    /// The running mean and variance of batch-norm layer `layer` (forward order), once a
    /// training step created them.
    pub fn bn_running(&self, layer: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let bn = self.bn.lock().unwrap_or_else(PoisonError::into_inner);
        let (m, v) = bn.as_ref()?.get(layer)?;
        Some((to_host(m), to_host(v)))
    }

    /// Runs `f` with the running statistics on `dev` (fresh ones until a training step made
    /// them; only training keeps them).
    fn with_bn<T>(&self, dev: tch::Device, train: bool, f: impl FnOnce(&arch::BnStats) -> T) -> T {
        let mut bn = self.bn.lock().unwrap_or_else(PoisonError::into_inner);
        if train && bn.is_none() {
            *bn = Some(self.net.bn_stats(dev));
        }
        match bn.as_ref() {
            Some(s) => f(s),
            None => f(&self.net.bn_stats(dev)),
        }
    }

    /// This model with training steps computed in `precision` (default `fp32`).
    pub fn with_precision(mut self, precision: Precision) -> TchModel {
        self.precision = precision;
        self
    }

    /// This model with the backward pass run stage by stage when `overlap` (default off): the
    /// gradients of the last layers go to the caller (and on to the network) while the earlier
    /// layers are differentiated. The gradients are bit for bit the same either way. Not with
    /// `fp16-amp`, whose overflow check needs every gradient before any is handed over.
    pub fn with_overlap(mut self, overlap: bool) -> TchModel {
        self.overlap = overlap;
        self
    }

    /// This model with a device that cannot compute: its shapes serve (servers), and every
    /// computation fails with `why` (`model.device = "cuda:local"` not resolved in this process).
    pub fn unusable(self, why: String) -> TchModel {
        let _ = self.device_ok.set(Err(EngineError::Device(why)));
        self
    }

    /// Seconds the last training step of this model (or a clone) spent loading the parameters
    /// onto its device.
    pub fn last_load_seconds(&self) -> f64 {
        f64::from_bits(self.load_s.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The arithmetic of training steps.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The loss scale of `fp16-amp` and the number of backward passes recomputed at a smaller
    /// scale because their gradients overflowed.
    pub fn loss_scale(&self) -> (f64, u64) {
        let s = self.scaler.lock().unwrap_or_else(PoisonError::into_inner);
        (s.scale(), s.overflows())
    }

    /// The architecture.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The compute device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// [`check_device`] once per model.
    fn ensure_device(&self) -> Result<(), EngineError> {
        self.device_ok
            .get_or_init(|| check_device(self.device))
            .clone()
    }

    /// Validates params and batch; returns the number of samples.
    fn check(&self, params: &[Vec<f32>], batch: &Samples<'_>) -> Result<usize, EngineError> {
        check_batch(
            self.net.specs(),
            params,
            self.net.image().features(),
            self.net.classes(),
            batch,
        )
    }

    /// Parameters as libtorch tensors of `kind` on `dev`, tracking gradients when `grad`.
    fn params_on(
        &self,
        params: &[Vec<f32>],
        kind: Kind,
        dev: tch::Device,
        grad: bool,
    ) -> Vec<Tensor> {
        self.net
            .specs()
            .iter()
            .zip(params)
            .map(|(s, p)| tensor_of(p, &s.shape, kind, dev).set_requires_grad(grad))
            .collect()
    }

    /// Input images `[n, c, s, s]` and int64 labels of `batch` on `dev`: the batch's staged copy
    /// ([`TchModel::batch_stager`]) is sent when it has one. A copy span.
    fn batch_on(&self, batch: &Samples<'_>, kind: Kind, dev: tch::Device) -> (Tensor, Tensor) {
        let _copy = crate::clock::copy_span();
        staging::on_device(batch, self.net.image(), kind, dev)
    }

    /// Runs `f` with `params` loaded as leaf tensors on the model's device: the model's
    /// [`resident::Resident`] tensors (also given to `f`: their gradients are spans of one flat
    /// buffer), or fresh tensors when another thread is using those. `f` must be done with their
    /// gradients when it returns (the next step overwrites them).
    fn with_params<R>(
        &self,
        params: &[Vec<f32>],
        batch: &Samples<'_>,
        f: impl FnOnce(&[Tensor], tch::Device, Option<&mut Resident>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        if self.check(params, batch)? == 0 {
            return Err(EngineError::EmptyBatch);
        }
        self.ensure_device()?;
        let dev = torch_device(self.device);
        let mut slot = self.resident.try_lock().ok();
        let copy = crate::clock::copy_span();
        let (p, resident) = match slot.as_deref_mut() {
            Some(r) => {
                let r = self.resident_in(r, dev)?;
                guarded(|| r.load(params))?.map_err(EngineError::Backend)?;
                let p: Vec<Tensor> = r.params().iter().map(Tensor::shallow_clone).collect();
                (p, Some(r))
            }
            None => (
                guarded(|| self.params_on(params, Kind::Float, dev, true))?,
                None,
            ),
        };
        let load = copy.end().as_secs_f64();
        self.load_s
            .store(load.to_bits(), std::sync::atomic::Ordering::Relaxed);
        f(&p, dev, resident)
    }

    /// The resident parameters in `slot`, made on `dev` at the first step.
    fn resident_in<'s>(
        &self,
        slot: &'s mut Option<Resident>,
        dev: tch::Device,
    ) -> Result<&'s mut Resident, EngineError> {
        if slot.is_none() {
            *slot = Some(guarded(|| Resident::new(self.net.specs(), dev))?);
        }
        Ok(slot.as_mut().expect("made above"))
    }

    /// `f` with the GPU compressor of a CUDA model (opened at the first call), or `None` on the
    /// CPU and where the CUDA kernels cannot load (the caller encodes on the host).
    fn with_compressor<R>(&self, f: impl FnOnce(&mut GpuCompressor) -> R) -> Option<R> {
        if !self.device.is_cuda() {
            return None;
        }
        let mut state = self.gpu.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .get_or_open("GPU-resident encoding", || GpuCompressor::new(self.device))
            .map(f)
    }

    /// Mean loss over `batch` and the gradients (key order) on the model's device, handed to
    /// `consume` while they are valid (see [`TchModel::with_params`]).
    fn with_grads<R>(
        &self,
        params: &[Vec<f32>],
        batch: &Samples<'_>,
        consume: impl FnOnce(f32, &[Tensor]) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        self.with_params(params, batch, |p, dev, _| {
            let (loss, grads) = guarded(|| self.full_backward(p, batch, dev, &mut |_| {}))?;
            consume(loss, &grads)
        })
    }

    /// One forward and backward pass over `batch` at parameters `p` in the model's precision
    /// (with the fp16 loss scale, recomputed on overflow); the loss and every key's gradient.
    /// The forward passes call `reach` ([`Net::forward_reaching`]).
    fn full_backward(
        &self,
        p: &[Tensor],
        batch: &Samples<'_>,
        dev: tch::Device,
        reach: &mut dyn FnMut(usize),
    ) -> (f32, Vec<Tensor>) {
        let (x, y) = self.batch_on(batch, Kind::Float, dev);
        let compute = amp::compute_kind(self.precision);
        let mut scaler = (self.precision == Precision::Fp16Amp)
            .then(|| self.scaler.lock().unwrap_or_else(PoisonError::into_inner));
        let mut attempt = 0;
        let (loss, grads) = loop {
            let logits = self.with_bn(dev, true, |s| {
                self.net
                    .forward_reaching(p, &x, BnMode::Train(s), compute, None, &mut *reach)
            });
            let loss = arch::cross_entropy(&logits, &y, Kind::Float);
            let Some(s) = scaler.as_deref_mut() else {
                loss.backward();
                break (
                    loss,
                    p.iter().map(|t| t.grad().contiguous()).collect::<Vec<_>>(),
                );
            };
            (&loss * s.scale()).backward();
            let mut grads: Vec<Tensor> = p.iter().map(|t| t.grad().contiguous()).collect();
            // Only a finite loss can have finite gradients at a smaller scale; a non-finite
            // one goes to the worker's non-finite policy as it is.
            let retry = !s.unscale(&mut grads) && loss.isfinite().int64_value(&[]) != 0;
            if !retry || attempt == amp::MAX_RECOMPUTES {
                break (loss, grads);
            }
            attempt += 1;
            tracing::debug!(
                scale = s.scale(),
                "fp16 gradients overflowed: step recomputed"
            );
            drop(grads);
            for t in p {
                t.shallow_clone().zero_grad();
            }
        };
        (loss.double_value(&[]) as f32, grads)
    }

    /// Whether training steps run the backward pass stage by stage ([`TchModel::with_overlap`];
    /// not with the fp16 loss scale, whose overflow check needs every gradient first).
    fn staged(&self) -> bool {
        self.overlap && self.precision != Precision::Fp16Amp
    }

    /// Mean loss over `batch` and its gradients, announced stage by stage: once the kernels that
    /// finish the gradients of keys `keys` are queued, `on_stage(keys, leaves, flat, copies)` is
    /// called (the leaves' `grad()` hold them; `flat` is the flat gradient buffer when the leaves
    /// are the resident ones). Stages come last layer first and cover every key once. With
    /// [`TchModel::staged`] the backward pass runs stage by stage ([`Net::forward_staged`]) and a
    /// stage is announced before the stage below it is differentiated; otherwise one backward
    /// pass ([`TchModel::full_backward`]) announces all keys at once. Either way the gradients
    /// are bit for bit those of one backward pass.
    ///
    /// [`Params::Gated`] parameters are loaded layer by layer as the forward pass reaches them
    /// ([`gate`]), which needs the resident tensors, layers in key order and, on CUDA, the copy
    /// stream `copies`; without those every layer is brought up to date first and the step runs
    /// as with [`Params::Given`].
    fn backward_stages(
        &self,
        params: Params<'_, '_>,
        batch: &Samples<'_>,
        copies: Option<&mut HostGrads>,
        on_stage: &mut StageFn<'_>,
    ) -> Result<f32, EngineError> {
        let mut gate = match params {
            Params::Given(params) => {
                return self.with_params(params, batch, |p, dev, resident| {
                    self.stages_on(p, dev, resident, copies, batch, None, on_stage)
                })
            }
            Params::Gated(gate) => gate,
        };
        if self.check(gate.params(), batch)? == 0 {
            return Err(EngineError::EmptyBatch);
        }
        self.ensure_device()?;
        let gated = gate.layered() && (!self.device.is_cuda() || copies.is_some());
        let mut slot = gated.then(|| self.resident.try_lock().ok()).flatten();
        let Some(slot) = slot.as_deref_mut() else {
            let params = gate.ready_all()?;
            return self.with_params(params, batch, |p, dev, resident| {
                self.stages_on(p, dev, resident, copies, batch, None, on_stage)
            });
        };
        let dev = torch_device(self.device);
        let r = self.resident_in(slot, dev)?;
        guarded(|| r.begin())?.map_err(EngineError::Backend)?;
        let p: Vec<Tensor> = r.params().iter().map(Tensor::shallow_clone).collect();
        self.stages_on(&p, dev, Some(r), copies, batch, Some(&mut gate), on_stage)
    }

    /// The body of [`TchModel::backward_stages`] on parameters `p` on the device (`resident`
    /// when they are the resident tensors); with `gate` the forward pass loads each layer's
    /// parameters into `resident` as it reaches them, and the stages are announced only once
    /// every layer was brought.
    #[allow(clippy::too_many_arguments)]
    fn stages_on(
        &self,
        p: &[Tensor],
        dev: tch::Device,
        mut resident: Option<&mut Resident>,
        mut copies: Option<&mut HostGrads>,
        batch: &Samples<'_>,
        mut gate: Option<&mut Gate<'_, '_>>,
        on_stage: &mut StageFn<'_>,
    ) -> Result<f32, EngineError> {
        let mut reach = |k: usize| {
            if let (Some(g), Some(r)) = (gate.as_deref_mut(), resident.as_deref_mut()) {
                g.reach(k, r, copies.as_deref());
            }
        };
        if !self.staged() {
            let (loss, _) = guarded(|| self.full_backward(p, batch, dev, &mut reach))?;
            self.gate_done(gate, resident.as_deref_mut(), copies.as_deref())?;
            on_stage(0..p.len(), p, resident, copies)?;
            return Ok(loss);
        }
        let mut cuts = Vec::new();
        let loss = guarded(|| {
            let (x, y) = self.batch_on(batch, Kind::Float, dev);
            let compute = amp::compute_kind(self.precision);
            let logits = self.with_bn(dev, true, |s| {
                self.net.forward_reaching(
                    p,
                    &x,
                    BnMode::Train(s),
                    compute,
                    Some(&mut cuts),
                    &mut reach,
                )
            });
            let loss = arch::cross_entropy(&logits, &y, Kind::Float);
            loss.backward();
            loss
        })?;
        self.gate_done(gate, resident.as_deref_mut(), copies.as_deref())?;
        let mut hi = p.len();
        for (keys, out, leaf) in cuts.iter().rev() {
            on_stage(*keys..hi, p, resident.as_deref_mut(), copies.as_deref_mut())?;
            hi = *keys;
            // d/d out of sum(out · g) is exactly g: the stage's backward pass from the
            // gradient its output received.
            guarded(|| (out * leaf.grad()).sum(Kind::Float).backward())?;
        }
        on_stage(0..hi, p, resident, copies)?;
        // Read last: reading the loss waits for the device.
        guarded(|| loss.double_value(&[]) as f32)
    }

    /// After a step's forward pass: the layers `gate` did not reach are brought and loaded, and
    /// its failure, if any, ends the step (before any gradient is handed over).
    fn gate_done(
        &self,
        gate: Option<&mut Gate<'_, '_>>,
        resident: Option<&mut Resident>,
        copies: Option<&HostGrads>,
    ) -> Result<(), EngineError> {
        let Some(gate) = gate else {
            return Ok(());
        };
        let r = resident.ok_or_else(|| {
            EngineError::Backend("a gated step without the resident parameters".into())
        })?;
        let load = gate.finish(r, copies)?;
        self.load_s
            .store(load.to_bits(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Mean loss over `batch`; each key's gradient (on the model's device, `f32`, contiguous)
    /// goes to `on_grad` in descending key order as soon as its stage is done
    /// ([`TchModel::backward_stages`]).
    fn staged_backward(
        &self,
        params: &[Vec<f32>],
        batch: &Samples<'_>,
        on_grad: &mut dyn FnMut(usize, &Tensor) -> Result<(), EngineError>,
    ) -> Result<f32, EngineError> {
        self.backward_stages(Params::Given(params), batch, None, &mut |keys, p, _, _| {
            for key in keys.rev() {
                let g = guarded(|| p[key].grad().contiguous())?;
                on_grad(key, &g)?;
            }
            Ok(())
        })
    }

    /// The copy stream and page-locked gradient buffer of a CUDA model, opened at the first call
    /// (locked; `None` on the CPU or when it cannot be opened).
    fn copier(&self) -> Option<std::sync::MutexGuard<'_, Opened<HostGrads>>> {
        let Device::Cuda(ordinal) = self.device else {
            return None;
        };
        let total = Resident::flat_len(self.net.specs());
        let mut state = self
            .host_grads
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state
            .get_or_open("staged gradient copies", || HostGrads::new(ordinal, total))
            .is_some()
            .then_some(state)
    }

    /// Mean loss over `batch` and its gradients on the host, a stage at a time, last layer first:
    /// `on_stage(first, grads, ahead)` gets the gradients of keys `first..first + grads.len()`
    /// (key order), borrowed until it returns, and may load those keys' next values with
    /// [`Ahead::preload`].
    ///
    /// With the resident parameters the gradients leave the device from the flat gradient
    /// buffer: on CUDA each stage's span is copied into page-locked memory on a copy stream
    /// queued behind the stage's backward kernels (`HostGrads`), so the copy of one stage
    /// overlaps the backward pass of the next, and `on_stage` for a stage runs once its copy is
    /// done (this thread waits only after queueing the last stage), while the device works on the
    /// stages below; on the CPU they are read in place. Otherwise (clones sharing
    /// the resident tensors, or no copy stream) each key is copied out on its own.
    pub fn backward_host(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        on_stage: &mut HostStageFn<'_>,
    ) -> Result<f32, EngineError> {
        self.host_stages(Params::Given(params), batch, on_stage)
    }

    /// [`TchModel::backward_host`] on `params`, gated or not ([`TchModel::backward_stages`]).
    fn host_stages(
        &self,
        params: Params<'_, '_>,
        batch: Samples<'_>,
        on_stage: &mut HostStageFn<'_>,
    ) -> Result<f32, EngineError> {
        let mut copier = self.copier();
        let copies = copier.as_deref_mut().and_then(Opened::ready);
        let backend = |e: gpu::GpuCompressError| EngineError::Backend(e.to_string());
        // CUDA stages whose copies are queued, oldest first. A stage is handed over once its copy
        // is done; only after the last stage has been queued does this thread wait for them, so
        // the device has the rest of the backward pass queued while `on_stage` runs.
        let mut in_flight = std::collections::VecDeque::new();
        let cuda = self.device.is_cuda();
        self.backward_stages(params, &batch, copies, &mut |keys, p, resident, copies| {
            let last = keys.start == 0;
            match (resident, copies) {
                (Some(r), Some(hg)) if cuda => {
                    let f = r.flat_grads();
                    let copied = hg
                        .queue(f.grads, f.elements(keys.clone()))
                        .map_err(backend)?;
                    in_flight.push_back((keys, copied));
                    let hg = &*hg;
                    while in_flight.front().is_some_and(
                        |(_, c): &(_, geomx_kernels::cuda::Copied)| last || c.is_done(),
                    ) {
                        let (done, c) = in_flight.pop_front().expect("checked above");
                        let f = r.flat_grads();
                        let el = f.elements(done.clone());
                        let host = hg.wait(&c, el.clone()).map_err(backend)?;
                        let grads = key_slices(done.clone(), host, el.start, f.spans);
                        let mut ahead = Ahead::new(Some(&mut *r), Some(hg), done.start);
                        on_stage(done.start, &grads, &mut ahead)?;
                    }
                    Ok(())
                }
                (Some(r), _) if !cuda => {
                    // SAFETY: a CPU flat buffer whose computation has finished (CPU kernels are
                    // synchronous); nothing writes it before `on_stage` returns (preloading
                    // writes the parameters, not it).
                    let flat = r.flat_grads().grads.shallow_clone();
                    let host: &[f32] = unsafe { resident::host_mut(&flat) };
                    let grads = key_slices(keys.clone(), host, 0, r.flat_grads().spans);
                    on_stage(
                        keys.start,
                        &grads,
                        &mut Ahead::new(Some(r), None, keys.start),
                    )
                }
                _ => {
                    let owned: Vec<Vec<f32>> = keys
                        .clone()
                        .map(|k| guarded(|| to_host(&p[k].grad())))
                        .collect::<Result<_, _>>()?;
                    let grads: Vec<&[f32]> = owned.iter().map(Vec::as_slice).collect();
                    on_stage(keys.start, &grads, &mut Ahead::new(None, None, keys.start))
                }
            }
        })
    }

    /// Mean loss over `batch` and its gradient, which stays on the model's device: each tensor's
    /// gradient goes to `on_grad(key, grad)` (shaped as the parameter, `Float`, contiguous) in
    /// descending key order, once autograd has finished. Returns the mean loss.
    pub fn backward_on_device(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        on_grad: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<f32, EngineError> {
        self.staged_backward(params, &batch, &mut |key, g| {
            on_grad(key, g);
            Ok(())
        })
    }

    /// Mean loss over `batch` computed in double precision on the CPU: the reference for
    /// finite-difference checks of the gradients.
    pub fn loss_f64(&self, params: &[Vec<f32>], batch: Samples<'_>) -> Result<f64, EngineError> {
        if self.check(params, &batch)? == 0 {
            return Err(EngineError::EmptyBatch);
        }
        let dev = tch::Device::Cpu;
        guarded(|| {
            tch::no_grad(|| {
                let p = self.params_on(params, Kind::Double, dev, false);
                let (x, y) = self.batch_on(&batch, Kind::Double, dev);
                let logits = self.net.forward(&p, &x, BnMode::Batch);
                arch::cross_entropy(&logits, &y, Kind::Double).double_value(&[])
            })
        })
    }
}

impl Model for TchModel {
    fn tensors(&self) -> &[TensorSpec] {
        self.net.specs()
    }

    /// See [`Net::init`].
    fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        self.net.init(seed)
    }

    fn forward(&self, params: &[Vec<f32>], features: &[f32]) -> Result<Vec<f32>, EngineError> {
        check_params(self.net.specs(), params)?;
        let inputs = self.net.image().features();
        if features.len() % inputs != 0 {
            return Err(EngineError::Ragged {
                values: features.len(),
                samples: features.len() / inputs,
                n_features: inputs,
            });
        }
        self.ensure_device()?;
        let dev = torch_device(self.device);
        let img = self.net.image();
        guarded(|| {
            tch::no_grad(|| {
                let p = self.params_on(params, Kind::Float, dev, false);
                let mut out = Vec::with_capacity(features.len() / inputs * self.net.classes());
                for chunk in features.chunks(EVAL_CHUNK * inputs) {
                    let n = chunk.len() / inputs;
                    let x = tensor_of(
                        chunk,
                        &[n, img.channels, img.side, img.side],
                        Kind::Float,
                        dev,
                    );
                    let logits =
                        self.with_bn(dev, false, |s| self.net.forward(&p, &x, BnMode::Eval(s)));
                    out.extend(to_host(&logits));
                }
                out
            })
        })
    }

    /// The gradients come to the host stage by stage ([`TchModel::backward_host`]).
    fn backward_layerwise(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<f32, EngineError> {
        self.backward_host(params, batch, &mut |first, grads, _| {
            hand_over(on_grad, first, grads)
        })
    }

    /// The forward pass waits for each layer's parameters just before that layer computes
    /// (`engine/tch/gate.rs`), so P3's replies for the later layers arrive while the first
    /// layers compute; the gradients come to the host as in [`Model::backward_layerwise`].
    /// Every layer is brought up to date first (as the default) when another thread holds the
    /// resident parameters or a CUDA model has no copy stream.
    fn backward_gated(
        &self,
        params: &mut [Vec<f32>],
        batch: Samples<'_>,
        ready: &mut LayerGate<'_>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<f32, EngineError> {
        let layers = self.tensor_layers();
        let gate = Gate::new(params, ready, &layers);
        self.host_stages(Params::Gated(gate), batch, &mut |first, grads, _| {
            hand_over(on_grad, first, grads)
        })
    }

    /// Loads the values into the resident parameters now (on CUDA through the copy stream,
    /// without waiting): see `Resident`'s `preload`. Nothing is loaded while another thread
    /// holds the resident parameters or before the first step made them.
    fn preload(&self, first: usize, values: &[&[f32]]) -> Result<bool, EngineError> {
        let Ok(mut slot) = self.resident.try_lock() else {
            return Ok(false);
        };
        let Some(r) = slot.as_mut() else {
            return Ok(false);
        };
        let mut copier = self.copier();
        let copies = copier.as_deref_mut().and_then(Opened::ready);
        let _copy = crate::clock::copy_span();
        guarded(|| r.preload(first, values, copies.as_deref(), true))?.map_err(EngineError::Backend)
    }

    /// Builds each batch's input tensors on the prefetch thread: page-locked on a CUDA device,
    /// so that the step sends them with one asynchronous copy (`engine/tch/staging.rs`). None when the
    /// device is unusable (the step reports that).
    fn batch_stager(&self) -> Option<crate::data::Stage> {
        self.ensure_device().ok()?;
        Some(staging::stager(self.net.image(), torch_device(self.device)))
    }

    /// On a CUDA device with an FP16 tier, the gradients stay on the device and are encoded
    /// there ([`GpuCompressor::fp16_payload`]); only the payloads come to the host. Otherwise (CPU,
    /// f32 or BF16 tiers, CUDA kernels unavailable) as the host default.
    fn backward_encoded(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        enc: DenseEncoding,
        on_payload: &mut dyn FnMut(usize, usize, Encoded),
    ) -> Result<f32, EngineError> {
        if enc.value_type != ValueType::F16 {
            return encode_on_host(self, params, batch, enc, on_payload);
        }
        let on_gpu = self.with_compressor(|comp| {
            self.with_grads(params, &batch, |loss, grads| {
                let refs: Vec<&Tensor> = grads.iter().collect();
                let (payloads, _) = comp
                    .fp16_payloads(&refs, enc.scaling)
                    .map_err(|e| EngineError::Backend(e.to_string()))?;
                for (key, bytes) in payloads.into_iter().enumerate().rev() {
                    let g = &grads[key];
                    let overflow = fp16_overflows(g, enc.scaling)?;
                    on_payload(
                        key,
                        g.numel(),
                        Encoded {
                            codec: PayloadCodec::Raw,
                            bytes,
                            overflow,
                        },
                    );
                }
                Ok(loss)
            })
        });
        match on_gpu {
            Some(r) => r,
            None => encode_on_host(self, params, batch, enc, on_payload),
        }
    }

    /// On a CUDA device the gradients stay on the device and each sparse key's error feedback
    /// lives there too ([`gpu::sparse_payloads`]: exact top-k of f32 values without clipping;
    /// other settings and the small keys are encoded on the host). Otherwise (CPU, CUDA kernels
    /// unavailable) as the host default.
    fn backward_sparse(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        sparse: &mut WorkerSparse,
        round: u64,
        on_payload: &mut dyn FnMut(usize, usize, Encoded),
    ) -> Result<f32, EngineError> {
        let on_gpu = self.with_compressor(|comp| {
            self.with_grads(params, &batch, |loss, grads| {
                gpu::sparse_payloads(comp, sparse, grads, round, on_payload)
                    .map_err(|e| EngineError::Backend(e.to_string()))?;
                Ok(loss)
            })
        });
        match on_gpu {
            Some(r) => r,
            None => sparse_on_host(self, params, batch, sparse, round, on_payload),
        }
    }

    fn sparse_to_host(&self, sparse: &mut WorkerSparse) -> Result<(), EngineError> {
        if sparse.device_keys().next().is_none() {
            return Ok(());
        }
        let mut state = self.gpu.lock().unwrap_or_else(PoisonError::into_inner);
        let comp = state.ready().ok_or_else(|| {
            EngineError::Backend("error feedback on a device whose compressor is closed".into())
        })?;
        gpu::sparse_state_to_host(&*comp, sparse).map_err(|e| EngineError::Backend(e.to_string()))
    }

    fn evaluate(&self, params: &[Vec<f32>], data: Samples<'_>) -> Result<Evaluation, EngineError> {
        let n = self.check(params, &data)?;
        if n == 0 {
            return Ok(Evaluation {
                loss: 0.0,
                accuracy: 0.0,
                samples: 0,
            });
        }
        self.ensure_device()?;
        let dev = torch_device(self.device);
        let inputs = data.n_features;
        let (loss_sum, correct) = guarded(|| {
            tch::no_grad(|| {
                let p = self.params_on(params, Kind::Float, dev, false);
                let (mut loss_sum, mut correct) = (0f64, 0i64);
                for (f, l) in data
                    .features
                    .chunks(EVAL_CHUNK * inputs)
                    .zip(data.labels.chunks(EVAL_CHUNK))
                {
                    let chunk = Samples {
                        features: f,
                        labels: l,
                        n_features: inputs,
                        staged: None,
                    };
                    let (x, y) = self.batch_on(&chunk, Kind::Float, dev);
                    let logits =
                        self.with_bn(dev, false, |s| self.net.forward(&p, &x, BnMode::Eval(s)));
                    let loss = arch::cross_entropy(&logits, &y, Kind::Float);
                    loss_sum += loss.double_value(&[]) * l.len() as f64;
                    correct += logits
                        .argmax(-1, false)
                        .eq_tensor(&y)
                        .sum(Kind::Int64)
                        .int64_value(&[]);
                }
                (loss_sum, correct)
            })
        })?;
        Ok(Evaluation {
            loss: loss_sum / n as f64,
            accuracy: correct as f64 / n as f64,
            samples: n,
        })
    }
}

#[cfg(test)]
mod tests;
