//! Model engines: the built-in CPU MLP, the libtorch CNN / ResNet-18 (feature `tch`, module `tch`) and
//! the engine interface.
//!
//! Every back end implements [`Model`]. Parameters are a list of flat `f32` tensors in a fixed layer
//! order; a tensor's index in that list is its HiPS *key*. [`Model::backward_layerwise`] hands each
//! tensor's gradient to a callback as soon as it is ready (last layer first) so that communication
//! can overlap the rest of the backward pass; [`Model::loss_and_grad`] collects them instead.

pub mod export;
mod gemm;
pub mod mlp;
pub mod optim;
pub mod reference;
pub mod reference_hfa;
pub mod scaffold;
#[cfg(feature = "tch")]
pub mod tch;

use geomx_kernels::{Scaling, ValueType};
use serde::Serialize;

use crate::codec::{Encoded, WorkerSparse};

use crate::config::{ModelConfig, ModelKind};
use crate::data::{Samples, Stage};

pub use crate::config::device::{validate_model_config, Device};
pub use crate::hash::{params_hash, Fnv1a};
pub use mlp::Mlp;
pub use optim::{OptimState, Optimizer, OptimizerConfig};

/// Name and shape of one parameter tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    /// Stable name, e.g. `fc0.weight`.
    pub name: String,
    /// Shape, outermost first (row-major layout of the flat tensor).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a tensor without elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Errors from running a model on given parameters and data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The parameter list has the wrong number of tensors.
    #[error("expected {expected} parameter tensors, got {got}")]
    TensorCount {
        /// Tensors the model has.
        expected: usize,
        /// Tensors passed.
        got: usize,
    },
    /// A parameter tensor has the wrong number of elements.
    #[error("tensor {key} ({name}) has {got} elements, expected {expected}")]
    TensorLen {
        /// Key (index) of the tensor.
        key: usize,
        /// Its name.
        name: String,
        /// Elements expected.
        expected: usize,
        /// Elements passed.
        got: usize,
    },
    /// The samples have another feature count than the model's input.
    #[error("samples have {got} features, the model expects {expected}")]
    Features {
        /// Model input size.
        expected: usize,
        /// Samples' feature count.
        got: usize,
    },
    /// The feature buffer does not hold `labels × n_features` values.
    #[error("{values} feature values for {samples} samples of {n_features} features")]
    Ragged {
        /// Feature values passed.
        values: usize,
        /// Labels passed.
        samples: usize,
        /// Features per sample.
        n_features: usize,
    },
    /// A label is not below the model's class count.
    #[error("label {label} of sample {index} is not below {classes} classes")]
    Label {
        /// Sample index within the batch.
        index: usize,
        /// The label.
        label: u32,
        /// Model output size.
        classes: usize,
    },
    /// A model architecture that cannot be built (e.g. a layer of zero units).
    #[error("invalid architecture: {0}")]
    Architecture(String),
    /// An optimizer step got a gradient of another length than its parameters or state.
    #[error("gradient has {got} elements, the optimizer holds {expected}")]
    Length {
        /// Elements of the parameters and the optimizer state.
        expected: usize,
        /// Elements of the gradient or parameters passed.
        got: usize,
    },
    /// The optimizer configuration was rejected by the kernels.
    #[error("optimizer: {0}")]
    Optimizer(String),
    /// A gradient step was asked for on an empty batch.
    #[error("empty batch")]
    EmptyBatch,
    /// The configured device cannot be used (e.g. `cuda:0` without a GPU), or the model kind is
    /// not compiled in.
    #[error("device: {0}")]
    Device(String),
    /// The libtorch back end failed.
    #[error("libtorch: {0}")]
    Backend(String),
    /// A worker's push of `key` could not be encoded ([`Model::backward_sparse`]).
    #[error("encoding the push of key {key}: {message}")]
    Encode {
        /// The key.
        key: usize,
        /// What went wrong.
        message: String,
    },
    /// The caller's `ready` callback of [`Model::backward_gated`] failed (its message).
    #[error("waiting for layer {layer}'s parameters: {message}")]
    NotReady {
        /// The layer waited for.
        layer: usize,
        /// What went wrong.
        message: String,
    },
}

/// Loss and accuracy of a model on a data set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evaluation {
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Fraction of samples whose arg-max prediction equals the label.
    pub accuracy: f64,
    /// Samples evaluated.
    pub samples: usize,
}

/// The callback of [`Model::backward_gated`]: `ready(layer, params)` brings `layer`'s tensors up
/// to date before the forward pass first uses them.
pub type LayerGate<'a> = dyn FnMut(usize, &mut [Vec<f32>]) -> Result<(), EngineError> + 'a;

/// The interface every model back end implements.
pub trait Model: Send + Sync {
    /// The parameter tensors in key order.
    fn tensors(&self) -> &[TensorSpec];

    /// The tensors' names in an exported model ([`export`]), in key order: the names under which
    /// the equivalent PyTorch module's `state_dict` holds them. Default: the tensors' own names.
    fn export_names(&self) -> Vec<String> {
        self.tensors().iter().map(|t| t.name.clone()).collect()
    }

    /// Total number of parameters.
    fn num_params(&self) -> usize {
        self.tensors().iter().map(TensorSpec::len).sum()
    }

    /// Deterministic initial parameters for `seed`, one flat tensor per key.
    fn init(&self, seed: u64) -> Vec<Vec<f32>>;

    /// Output logits (`n × classes`, row-major) for row-major `features` of `n` samples.
    fn forward(&self, params: &[Vec<f32>], features: &[f32]) -> Result<Vec<f32>, EngineError>;

    /// Computes the mean loss over `batch` and its gradient. Each tensor's gradient goes to
    /// `on_grad(key, grad)` as soon as it is ready, in descending key order (last layer first).
    /// Returns the mean loss.
    fn backward_layerwise(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<f32, EngineError>;

    /// Mean loss over `batch` and the gradient of every tensor, in key order.
    fn loss_and_grad(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
    ) -> Result<(f32, Vec<Vec<f32>>), EngineError> {
        let mut grads: Vec<Vec<f32>> = vec![Vec::new(); self.tensors().len()];
        let loss = self.backward_layerwise(params, batch, &mut |key, g| grads[key] = g)?;
        Ok((loss, grads))
    }

    /// Layer of every tensor, in key order: 0 next to the input, counting up in forward order;
    /// a layer's tensors (weight, bias) share it. Default: from the tensors' names
    /// ([`layers_from_names`]).
    fn tensor_layers(&self) -> Vec<usize> {
        layers_from_names(self.tensors().iter().map(|t| t.name.as_str()))
    }

    /// [`Model::backward_layerwise`] whose forward pass may start before every parameter is
    /// current: `ready(layer, params)` is called once per layer, in forward order, before the
    /// first use of that layer's tensors, and may bring them up to date in `params` (P3: wait
    /// for the layer's slices and apply them). The default calls it for every layer first, then
    /// runs [`Model::backward_layerwise`]; an engine with a per-layer forward pass overrides it.
    /// An error from `ready` ends the step with that error.
    fn backward_gated(
        &self,
        params: &mut [Vec<f32>],
        batch: Samples<'_>,
        ready: &mut LayerGate<'_>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<f32, EngineError> {
        let layers = self
            .tensor_layers()
            .iter()
            .map(|l| l + 1)
            .max()
            .unwrap_or(0);
        for l in 0..layers {
            ready(l, params)?;
        }
        self.backward_layerwise(params, batch, on_grad)
    }

    /// Mean loss and accuracy over `data`.
    fn evaluate(&self, params: &[Vec<f32>], data: Samples<'_>) -> Result<Evaluation, EngineError>;

    /// Keys `first..first + values.len()` will have `values` at the next training step: a back
    /// end that keeps its parameters on a device may load them now, while the caller still waits
    /// for other keys, and skip them in that step if it is given the same values (a back end
    /// compares them, which costs less than loading them; other values are loaded as usual).
    /// Returns whether they were loaded (default: no, nothing to do).
    fn preload(&self, first: usize, values: &[&[f32]]) -> Result<bool, EngineError> {
        let _ = (first, values);
        Ok(false)
    }

    /// What prepares this model's batches for its device on the worker's prefetch thread
    /// ([`crate::data::Prefetcher`]): a back end that computes on a GPU copies each batch into
    /// page-locked memory there and finds the copy in the step's [`Samples::staged`]. Default:
    /// none (the model reads the host samples).
    fn batch_stager(&self) -> Option<Stage> {
        None
    }

    /// [`Model::backward_layerwise`] with each gradient already encoded as a dense push payload
    /// of `enc` (what [`crate::codec::encode_values`] returns): `on_payload(key, elements,
    /// payload)`, last layer first. The default ([`encode_on_host`]) encodes host gradients; a
    /// back end that computes on a GPU may encode there and copy only the payload
    /// (`engine::tch::TchModel`, feature `tch`).
    fn backward_encoded(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        enc: DenseEncoding,
        on_payload: &mut dyn FnMut(usize, usize, Encoded),
    ) -> Result<f32, EngineError> {
        encode_on_host(self, params, batch, enc, on_payload)
    }

    /// [`Model::backward_encoded`] for a worker that sparsifies its own pushes
    /// (`compression.intra.codec = "bisparse"`): each key's gradient goes through `sparse`'s
    /// error feedback for `round` and comes out as the key's push payload
    /// (`on_payload(key, elements, payload)`, last layer first). The default encodes host
    /// gradients ([`sparse_on_host`]); a back end that computes on a GPU may keep the error
    /// feedback on its device (`engine::tch::TchModel`, feature `tch`).
    fn backward_sparse(
        &self,
        params: &[Vec<f32>],
        batch: Samples<'_>,
        sparse: &mut WorkerSparse,
        round: u64,
        on_payload: &mut dyn FnMut(usize, usize, Encoded),
    ) -> Result<f32, EngineError> {
        sparse_on_host(self, params, batch, sparse, round, on_payload)
    }

    /// Copies the error feedback that [`Model::backward_sparse`] keeps on a device into
    /// `sparse`'s host copy (before a checkpoint). Default: nothing is kept elsewhere.
    fn sparse_to_host(&self, sparse: &mut WorkerSparse) -> Result<(), EngineError> {
        let _ = sparse;
        Ok(())
    }
}

/// [`Model::backward_sparse`] on the host: [`Model::backward_layerwise`], then
/// [`WorkerSparse::encode`] per key.
pub fn sparse_on_host<M: Model + ?Sized>(
    model: &M,
    params: &[Vec<f32>],
    batch: Samples<'_>,
    sparse: &mut WorkerSparse,
    round: u64,
    on_payload: &mut dyn FnMut(usize, usize, Encoded),
) -> Result<f32, EngineError> {
    let mut failed = None;
    let loss = model.backward_layerwise(params, batch, &mut |key, grad| match sparse
        .encode(key, &grad, round)
    {
        Ok(e) => on_payload(key, grad.len(), e),
        Err(message) => {
            failed.get_or_insert(EngineError::Encode { key, message });
        }
    })?;
    failed.map_or(Ok(loss), Err)
}

/// [`Model::backward_encoded`] on the host: [`Model::backward_layerwise`], then
/// [`crate::codec::encode_values`] per key.
pub fn encode_on_host<M: Model + ?Sized>(
    model: &M,
    params: &[Vec<f32>],
    batch: Samples<'_>,
    enc: DenseEncoding,
    on_payload: &mut dyn FnMut(usize, usize, Encoded),
) -> Result<f32, EngineError> {
    model.backward_layerwise(params, batch, &mut |key, grad| {
        let e = crate::codec::encode_values(&grad, enc.value_type, enc.scaling);
        on_payload(key, grad.len(), e)
    })
}

/// Layer of every tensor from its name: consecutive tensors whose names share the part before
/// the last `.` (`fc0.weight`, `fc0.bias`) are one layer; layers count up in key order.
pub fn layers_from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
    let mut out = Vec::new();
    let mut last: Option<&str> = None;
    let mut layer = 0;
    for name in names {
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        if last.is_some_and(|l| l != module) {
            layer += 1;
        }
        last = Some(module);
        out.push(layer);
    }
    out
}

/// How a tier sends dense values: the element type and the FP16 scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseEncoding {
    /// Element type on the wire.
    pub value_type: ValueType,
    /// Scaling of FP16 payloads.
    pub scaling: Scaling,
}

impl From<&crate::codec::TierCodec> for DenseEncoding {
    /// The dense encoding of a tier (what its `encode_dense` writes).
    fn from(t: &crate::codec::TierCodec) -> Self {
        DenseEncoding {
            value_type: t.dense_type(),
            scaling: t.scaling(),
        }
    }
}

/// Builds the model a `[model]` configuration names for `inputs` features and `classes` classes.
pub fn build_model(
    cfg: &ModelConfig,
    inputs: usize,
    classes: usize,
) -> Result<Box<dyn Model>, EngineError> {
    // `cuda:local` is resolved per process (`geomx launch` gives each worker `--device`,
    // `geomx run --from-env` the launcher's local rank). Roles that only need the shapes run with
    // it unresolved; a computation on such a model fails with this message.
    let unresolved = (cfg.device == crate::config::device::CUDA_LOCAL).then(|| {
        "model.device = \"cuda:local\" was not resolved to a GPU in this process: start it with \
         `geomx launch`, `geomx run --device cuda:N` or `geomx run --from-env`, or give cuda:N"
            .to_string()
    });
    let device = match unresolved {
        Some(_) => Device::Cuda(0),
        None => Device::parse(&cfg.device)
            .ok_or_else(|| EngineError::Device(format!("{:?} is not cpu or cuda:N", cfg.device)))?,
    };
    match cfg.kind {
        ModelKind::Mlp => {
            if device != Device::Cpu {
                return Err(EngineError::Device(format!(
                    "the built-in mlp runs on the cpu only, not {device}"
                )));
            }
            let delays = cfg
                .layer_delay_ms
                .iter()
                .map(|&ms| std::time::Duration::from_secs_f64(ms.max(0.0) / 1e3))
                .collect();
            Ok(Box::new(
                Mlp::new(inputs, &cfg.hidden, classes)?.with_layer_delays(delays),
            ))
        }
        ModelKind::Cnn | ModelKind::Resnet18 => {
            build_tch_model(cfg, device, unresolved, inputs, classes)
        }
    }
}

#[cfg(feature = "tch")]
fn build_tch_model(
    cfg: &ModelConfig,
    device: Device,
    unresolved: Option<String>,
    inputs: usize,
    classes: usize,
) -> Result<Box<dyn Model>, EngineError> {
    let arch = match cfg.kind {
        ModelKind::Resnet18 => self::tch::Arch::Resnet18,
        _ => self::tch::Arch::Cnn,
    };
    let mut m = self::tch::TchModel::new(arch, inputs, classes, device)?
        .with_precision(cfg.precision)
        .with_overlap(cfg.overlap);
    if let Some(why) = unresolved {
        m = m.unusable(why);
    }
    Ok(Box::new(m))
}

#[cfg(not(feature = "tch"))]
fn build_tch_model(
    cfg: &ModelConfig,
    _device: Device,
    _unresolved: Option<String>,
    _inputs: usize,
    _classes: usize,
) -> Result<Box<dyn Model>, EngineError> {
    Err(EngineError::Device(format!(
        "model.kind = {:?} needs the libtorch back end: build with `--features tch`",
        cfg.kind
    )))
}

/// Number of CUDA devices the model back end sees: libtorch's count with the `tch` feature, 0
/// without it (the built-in engine computes on the CPU only).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "tch")]
    {
        self::tch::cuda_device_count()
    }
    #[cfg(not(feature = "tch"))]
    {
        0
    }
}

/// Checks `params` against `specs` (count and lengths).
pub fn check_params(specs: &[TensorSpec], params: &[Vec<f32>]) -> Result<(), EngineError> {
    if specs.len() != params.len() {
        return Err(EngineError::TensorCount {
            expected: specs.len(),
            got: params.len(),
        });
    }
    for (key, (spec, p)) in specs.iter().zip(params).enumerate() {
        if spec.len() != p.len() {
            return Err(EngineError::TensorLen {
                key,
                name: spec.name.clone(),
                expected: spec.len(),
                got: p.len(),
            });
        }
    }
    Ok(())
}

/// Checks `params` against `specs` and `batch` against a model of `inputs` features and `classes`
/// classes (feature count, a `labels × n_features` buffer, every label below `classes`); returns
/// the number of samples.
pub fn check_batch(
    specs: &[TensorSpec],
    params: &[Vec<f32>],
    inputs: usize,
    classes: usize,
    batch: &Samples<'_>,
) -> Result<usize, EngineError> {
    check_params(specs, params)?;
    if batch.n_features != inputs {
        return Err(EngineError::Features {
            expected: inputs,
            got: batch.n_features,
        });
    }
    let n = batch.labels.len();
    if batch.features.len() != n * batch.n_features {
        return Err(EngineError::Ragged {
            values: batch.features.len(),
            samples: n,
            n_features: batch.n_features,
        });
    }
    if let Some(index) = batch.labels.iter().position(|&l| l as usize >= classes) {
        return Err(EngineError::Label {
            index,
            label: batch.labels[index],
            classes,
        });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_model_follows_the_config() {
        let cfg = ModelConfig {
            hidden: vec![5, 4],
            ..ModelConfig::default()
        };
        let m = build_model(&cfg, 3, 2).unwrap();
        let shapes: Vec<Vec<usize>> = m.tensors().iter().map(|t| t.shape.clone()).collect();
        assert_eq!(
            shapes,
            vec![
                vec![5, 3],
                vec![5],
                vec![4, 5],
                vec![4],
                vec![2, 4],
                vec![2]
            ]
        );
        assert_eq!(m.num_params(), 15 + 5 + 20 + 4 + 8 + 2);
        assert_eq!(m.tensors()[2].name, "fc1.weight");
        assert!(build_model(&cfg, 0, 2).is_err());
    }

    #[test]
    fn encoded_backward_defaults_to_host_encoding() {
        let m = Mlp::new(3, &[4], 2).unwrap();
        let p = m.init(1);
        let features = [0.5f32, -1.0, 2.0, 1.0, 0.0, -0.5];
        let batch = Samples {
            features: &features,
            labels: &[1, 0],
            n_features: 3,
            staged: None,
        };
        let (loss, grads) = m.loss_and_grad(&p, batch).unwrap();
        let enc = DenseEncoding {
            value_type: ValueType::F16,
            scaling: Scaling::None,
        };
        let mut keys = Vec::new();
        let l = m
            .backward_encoded(&p, batch, enc, &mut |key, n, e| {
                assert_eq!(e.codec, geomx_net::PayloadCodec::Raw);
                assert_eq!(n, grads[key].len());
                assert_eq!(e.overflow, 0);
                let back = crate::codec::decode_any(&e.bytes, key, n).unwrap();
                let want: Vec<f32> = grads[key]
                    .iter()
                    .map(|&g| half::f16::from_f32(g).to_f32())
                    .collect();
                assert_eq!(back, want);
                keys.push(key);
            })
            .unwrap();
        assert_eq!(l, loss);
        assert_eq!(keys, vec![3, 2, 1, 0]);
    }

    #[test]
    fn a_tier_codec_gives_its_dense_encoding() {
        use crate::codec::TierCodec;
        use crate::config::{Codec, Fp16Codec};
        let x = [1.5f32, -2.0e-3, 7.0];
        for codec in [Codec::None, Codec::Fp16(Fp16Codec::default())] {
            let tier = TierCodec::from_config(&codec, 10);
            let enc = DenseEncoding::from(&tier);
            assert_eq!(
                crate::codec::encode_values(&x, enc.value_type, enc.scaling),
                tier.encode_dense(&x)
            );
        }
    }

    #[test]
    fn layers_come_from_module_names() {
        let names = ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "head"];
        assert_eq!(layers_from_names(names), [0, 0, 1, 1, 2]);
        let resnet = [
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "layer1.0.conv1.weight",
        ];
        assert_eq!(layers_from_names(resnet), [0, 1, 1, 2]);
    }
}
