//! Cluster configuration: the TOML topology file, defaults and validation.
//!
//! [`Config::default`] is the built-in run (central DC with one global server, 2 data centers × 2
//! workers, FSA, an MLP on the UCI digits). A TOML file overrides any subset of it; unknown keys and
//! bad values are rejected with a message naming the field. [`Config::from_dmlc_env`] builds the
//! configuration and this process's [`RoleSpec`] from the original GeoMX `DMLC_*` variables.

mod checkpoint;
mod cluster_toml;
mod data;
pub mod device;
mod dmlc;
mod optimizer;
mod resilience;
mod role;
mod scheduling;
mod security;
mod sync;
mod validate;
mod wan;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use checkpoint::{CheckpointConfig, DEFAULT_EVERY_ROUNDS, DEFAULT_KEEP};
pub use resilience::{LostWorker, ResilienceConfig, Restart};
pub use role::{Role, RoleSpec};
pub use scheduling::{
    Credit, CreditWord, P3Config, SchedulingConfig, SliceElems, TsEngineConfig,
    DEFAULT_CREDIT_BYTES, DEFAULT_SLICE_ELEMS, DEFAULT_UNSENT_BYTES, MIN_SLICE_ELEMS,
};
pub use security::{SecurityConfig, SecurityMode, SECURITY_DIR_ENV, SECURITY_MODE_ENV};
pub use sync::{
    EsyncConfig, EsyncNormalisation, HfaConfig, HfaCorrection, HfaWeighting, LambdaMode,
    MixedConfig, MixedLrScale, MixedOptimizer, OuterOptimizer, SyncAlgorithm, SyncConfig,
};
pub use wan::{
    LinkFigures, Site, WanCentralConfig, WanConfig, WanLossScope, WanMode, WanSiteConfig,
    MAX_DELAY_MS, MAX_RATE_MBIT, MIN_RATE_MBIT,
};

pub use data::{CifarConfig, ShardStrategy, SyntheticSpec, DIGITS_TRAIN_SAMPLES};
pub use optimizer::{AdamConfig, OptimizerConfig, SgdConfig};

use crate::hash::Fnv1a;

/// Rounds of the default run when neither `train.rounds` nor `train.epochs` is given.
pub const DEFAULT_ROUNDS: u64 = 400;

/// Errors from reading, parsing or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or `<string>`.
        origin: String,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field, e.g. `cluster.data_centers[1].workers`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A `DMLC_*` variable is missing, malformed or inconsistent.
    #[error("{var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Topology and addresses.
    pub cluster: ClusterConfig,
    /// Model back end and architecture.
    pub model: ModelConfig,
    /// Data set, sharding and batch size.
    pub data: DataConfig,
    /// Length of training, evaluation cadence, optimizer.
    pub train: TrainConfig,
    /// Synchronisation algorithm of the global tier.
    pub sync: SyncConfig,
    /// Codecs per tier.
    pub compression: CompressionConfig,
    /// Transport per tier and I/O driver.
    pub transport: TransportConfig,
    /// Timeouts of the control plane.
    pub timeouts: TimeoutsConfig,
    /// MultiGPS key placement.
    pub placement: PlacementConfig,
    /// Logging.
    pub log: LogConfig,
    /// The emulated WAN of `geomx launch` (wan-lab.md).
    pub wan: WanConfig,
    /// Checkpoints of every role and the final model's export.
    pub checkpoint: CheckpointConfig,
    /// Authentication and encryption of every link.
    pub security: SecurityConfig,
    /// Transfer scheduling: P3 (`[scheduling.p3]`).
    pub scheduling: SchedulingConfig,
    /// What a lost process does to the job, and the launcher's restarts.
    pub resilience: ResilienceConfig,
}

/// `[cluster]`: data centers, global servers and addresses.
///
/// Data centers are a list of `[[cluster.data_centers]]` tables, or the shorthand
/// `data_centers = N` with `workers_per_dc = n` (default 2), which names them `dc0`, `dc1`, ….
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "cluster_toml::RawCluster")]
pub struct ClusterConfig {
    /// Number of global servers S (MultiGPS when > 1).
    pub global_servers: usize,
    /// Name of the central data center, which hosts the coordinator and the global servers. It may
    /// name one of `data_centers` (that DC then also trains) or a separate site.
    pub central_dc: String,
    /// Host every process binds and advertises when no per-role address is given.
    pub host: String,
    /// First port for the launcher to hand out; 0 = OS-assigned ports (discovered at registration).
    pub base_port: u16,
    /// Address `host:port` of the coordinator (multi-host runs); `None` = chosen by the launcher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Addresses `host:port` of the global servers in order (multi-host runs); empty = automatic.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub global_server_addrs: Vec<String>,
    /// The data centers that train, in order (their index is the `dc` of their processes).
    pub data_centers: Vec<DataCenterConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            global_servers: 1,
            central_dc: "central".into(),
            host: "127.0.0.1".into(),
            base_port: 0,
            coordinator: None,
            global_server_addrs: Vec::new(),
            data_centers: vec![
                DataCenterConfig::new("dc0", 2),
                DataCenterConfig::new("dc1", 2),
            ],
        }
    }
}

impl ClusterConfig {
    /// Total number of workers W.
    pub fn total_workers(&self) -> usize {
        self.data_centers.iter().map(|d| d.workers).sum()
    }

    /// Global worker index of (dc, rank): DCs in order, ranks in order within each.
    pub fn global_worker_index(&self, dc: usize, rank: usize) -> Option<usize> {
        let d = self.data_centers.get(dc)?;
        (rank < d.workers).then(|| {
            self.data_centers[..dc]
                .iter()
                .map(|d| d.workers)
                .sum::<usize>()
                + rank
        })
    }
}

/// One `[[cluster.data_centers]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCenterConfig {
    /// Unique name (letters, digits, `-`, `_`).
    pub name: String,
    /// Number of workers n_d (≥ 1).
    pub workers: usize,
    /// Address `host:port` of this DC's local server (multi-host runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_server: Option<String>,
    /// Addresses `host:port` of its workers by rank (multi-host runs); empty = automatic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_addrs: Vec<String>,
    /// Compute slow-down factor f ≥ 1 of its workers (heterogeneity knob, sync.md): after a step
    /// of measured duration d a worker sleeps (f − 1)·d. Default 1 (no slow-down).
    #[serde(default = "default_slowdown")]
    pub slowdown: f64,
    /// The WAN site (namespace and WAN link) this DC sits behind; default: its own name. Data
    /// centers with the same site share one link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

fn default_slowdown() -> f64 {
    1.0
}

impl ClusterConfig {
    /// The central DC's index: the position of `central_dc` among the data centers, or one past
    /// them when it is a separate site.
    pub fn central_index(&self) -> u32 {
        self.data_centers
            .iter()
            .position(|d| d.name == self.central_dc)
            .unwrap_or(self.data_centers.len()) as u32
    }
}

impl DataCenterConfig {
    /// A DC with `workers` workers and automatic addresses.
    pub fn new(name: &str, workers: usize) -> Self {
        Self {
            name: name.into(),
            workers,
            local_server: None,
            worker_addrs: Vec::new(),
            slowdown: default_slowdown(),
            site: None,
        }
    }

    /// `count` DCs `dc0`, `dc1`, … of `workers` workers each; `None` when `count` exceeds what a
    /// job holds ([`geomx_net::coord::MAX_NODES`]), checked before anything is built.
    pub fn numbered(count: usize, workers: usize) -> Option<Vec<Self>> {
        (count <= geomx_net::coord::MAX_NODES).then(|| {
            (0..count)
                .map(|i| Self::new(&format!("dc{i}"), workers))
                .collect()
        })
    }
}

/// Model back ends. Open: a libtorch back end joins later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ModelKind {
    /// The built-in CPU MLP (`engine::Mlp`).
    #[default]
    Mlp,
    /// GeoMX's demo CNN on libtorch (feature `tch`): conv 16@5×5 → pool → conv 32@5×5 → pool →
    /// dense 256 → 128 → classes.
    Cnn,
    /// ResNet-18 for 32×32 images on libtorch (feature `tch`).
    Resnet18,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Back end.
    pub kind: ModelKind,
    /// Hidden layer widths (empty = softmax regression).
    pub hidden: Vec<usize>,
    /// Seed of the initial parameters θ_0.
    pub seed: u64,
    /// Where the model computes: `"cpu"`, `"cuda:N"`, or `"cuda:local"` (the GPU of the launcher's
    /// local rank, `geomx run --from-env`); CUDA for libtorch models only.
    pub device: String,
    /// Arithmetic of the forward and backward passes (libtorch models); master weights and the
    /// gradients that are pushed stay `f32`.
    pub precision: Precision,
    /// Push each layer's gradients as soon as the backward pass produced them, while the layers
    /// below are still differentiated (libtorch models; the gradients are the same either way).
    pub overlap: bool,
    /// Emulated compute per layer of the built-in MLP, in ms (empty: none; otherwise one value
    /// per layer, `hidden.len() + 1`): a training step sleeps this long before each layer's
    /// forward pass and twice as long before its backward pass. It gives the small MLP the
    /// compute profile of a larger model (e.g. a convolutional network, whose first layers
    /// compute most and hold few parameters) for scheduling benchmarks; the values it computes
    /// are unchanged, and evaluation does not sleep.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layer_delay_ms: Vec<f64>,
}

/// `model.precision`: the arithmetic of a libtorch model's forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Everything in `f32`.
    #[default]
    Fp32,
    /// Convolutions and dense layers in bfloat16 (batch norm and the loss in `f32`).
    Bf16,
    /// Convolutions and dense layers in float16 (batch norm and the loss in `f32`), with a
    /// dynamic loss scale as PyTorch's `GradScaler`; a step whose gradients overflow is
    /// recomputed at the halved scale rather than skipped.
    Fp16Amp,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16Amp => "fp16-amp",
        })
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Mlp,
            hidden: vec![64],
            seed: 42,
            device: "cpu".into(),
            precision: Precision::Fp32,
            overlap: true,
            layer_delay_ms: Vec::new(),
        }
    }
}

/// Data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// The embedded UCI 8×8 digits (1,437 train / 360 test).
    #[default]
    Digits,
    /// The seeded teacher-labelled task of `[data.synthetic]`.
    Synthetic,
    /// MNIST-format IDX files named in `[data.idx]`.
    Idx,
    /// The CIFAR-10 binary batches in `[data.cifar10] dir`.
    Cifar10,
}

/// `[data.idx]`: four IDX files (gzip or raw).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdxConfig {
    /// Training images (u8, count × rows × cols).
    pub train_images: PathBuf,
    /// Training labels (u8, count).
    pub train_labels: PathBuf,
    /// Test images.
    pub test_images: PathBuf,
    /// Test labels.
    pub test_labels: PathBuf,
    /// Number of classes (labels must be below it).
    pub classes: usize,
}

impl Default for IdxConfig {
    fn default() -> Self {
        Self {
            train_images: PathBuf::new(),
            train_labels: PathBuf::new(),
            test_images: PathBuf::new(),
            test_labels: PathBuf::new(),
            classes: 10,
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Which data set.
    pub dataset: DatasetKind,
    /// How the training set is cut across workers.
    pub split: ShardStrategy,
    /// Samples per worker per round.
    pub batch_size: usize,
    /// Seed of sharding and of the per-epoch batch shuffles.
    pub seed: u64,
    /// Synthetic task parameters (used when `dataset = "synthetic"`).
    pub synthetic: SyntheticSpec,
    /// IDX file paths (used when `dataset = "idx"`).
    pub idx: IdxConfig,
    /// CIFAR-10 folder (used when `dataset = "cifar10"`).
    pub cifar10: CifarConfig,
    /// Normalise CIFAR-10 and IDX images per channel with torchvision's customary mean and
    /// standard deviation (CIFAR-10's, MNIST's), training and test sets alike.
    pub normalize: bool,
    /// Augment CIFAR-10 training batches as torchvision's `RandomCrop(32, padding=4)` and
    /// `RandomHorizontalFlip()`, seeded by `seed`, the worker and the batch (reproducible).
    pub augment: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Digits,
            split: ShardStrategy::Iid,
            batch_size: 32,
            seed: 7,
            synthetic: SyntheticSpec::default(),
            idx: IdxConfig::default(),
            cifar10: CifarConfig::default(),
            normalize: true,
            augment: true,
        }
    }
}

/// `[train]`. Give `rounds` or `epochs`, not both; with neither, [`DEFAULT_ROUNDS`] rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Number of synchronous rounds (one batch per worker each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u64>,
    /// Number of epochs over each worker's shard (converted to rounds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// Evaluate on the test set every this many rounds (0 = only at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// The optimizer the global servers run.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// What a NaN or ±inf does: end the job (`abort`, the default) or drop that round's update
    /// of the affected key everywhere (`skip`).
    #[serde(default)]
    pub nonfinite: NonFinitePolicy,
    /// Fault injection for tests of the non-finite policy: each entry makes one worker push a NaN
    /// as the first value of one key in one round. Empty in normal runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_nan: Vec<InjectNan>,
}

fn default_eval_every() -> u64 {
    50
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rounds: Some(DEFAULT_ROUNDS),
            epochs: None,
            eval_every: default_eval_every(),
            optimizer: OptimizerConfig::default(),
            nonfinite: NonFinitePolicy::default(),
            inject_nan: Vec::new(),
        }
    }
}

/// `train.nonfinite`: what a NaN or ±inf in a gradient, a sum, a step or a payload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NonFinitePolicy {
    /// End the job within the round, naming the role, dc, rank, key and round.
    #[default]
    Abort,
    /// Drop that round's update of the affected key (range, on the global tier) everywhere, and
    /// count it in the report.
    Skip,
}

/// One `[[train.inject_nan]]` entry: worker (`dc`, `rank`) replaces the first value of its push
/// of `key` in `round` (0-based; HFA and ESync: the averaging number) with NaN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectNan {
    /// Data center of the worker.
    pub dc: u32,
    /// Rank of the worker in its data center.
    pub rank: u32,
    /// Round of the push.
    pub round: u64,
    /// Key (tensor index) of the push.
    pub key: usize,
}

impl TrainConfig {
    /// Rounds to run, given how many full batches one worker's shard holds.
    pub fn total_rounds(&self, batches_per_epoch: usize) -> u64 {
        match (self.rounds, self.epochs) {
            (Some(r), _) => r,
            (None, Some(e)) => e.saturating_mul(batches_per_epoch as u64),
            (None, None) => DEFAULT_ROUNDS,
        }
    }
}

/// A codec of one tier (compression.md), selected by `codec`.
///
/// `bisparse` and `mpq` are inter-tier codecs (local ↔ global servers); `fp16` and `bf16` work on
/// either tier, in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "codec", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Codec {
    /// Dense f32, unchanged.
    #[default]
    None,
    /// Dense IEEE binary16 (compute stays f32).
    Fp16(Fp16Codec),
    /// Dense bfloat16 (compute stays f32).
    Bf16,
    /// Bi-Sparse: top-k push with error feedback, sparse pull of the global sum.
    Bisparse(SparseCodec),
    /// MPQ: tensors of N ≥ `min_size` go Bi-Sparse (f32 values), smaller ones dense FP16.
    Mpq(SparseCodec),
}

/// 16-bit scaling of FP16 payloads (compression.md "Scaling").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScalingKind {
    /// Power-of-two scaling of each payload into [2^14, 2^15).
    #[default]
    Pow2,
    /// Values are sent as they are.
    None,
}

/// Parameters of the `fp16` codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Fp16Codec {
    /// Scaling of each payload.
    pub scaling: ScalingKind,
}

/// Top-k selection mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SelectionKind {
    /// DGC sampled threshold (sample fraction 0.01, 20 hits, tolerance 0.2).
    #[default]
    Sampled,
    /// Exact top-k.
    Exact,
}

/// Value type of sparse payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SparseValues {
    /// f32 values.
    #[default]
    F32,
    /// FP16 values (pow2-scaled); Bi-Sparse only.
    Fp16,
}

/// Parameters of the `bisparse` and `mpq` codecs (defaults from compression.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SparseCodec {
    /// Target density ρ: fraction of elements sent per push.
    pub density: f64,
    /// Tensors of fewer elements (T) go dense.
    pub min_size: usize,
    /// Top-k selection.
    pub selection: SelectionKind,
    /// Momentum correction m (> 0 needs momentum-free SGD as the optimizer).
    pub momentum: f32,
    /// Warm-up start density ρ_0.
    pub warmup_density: f64,
    /// Warm-up length in epochs (converted to rounds); ignored when `warmup_rounds` is given.
    pub warmup_epochs: f64,
    /// Warm-up length in rounds (overrides `warmup_epochs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_rounds: Option<u64>,
    /// Clip each DC's gradient to this L2 norm before accumulating (off when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip: Option<f32>,
    /// Every this many rounds the global server sends dense θ and replicas replace theirs (0: off).
    pub resync_every: u64,
    /// Value type of the sparse payloads (`mpq` requires f32).
    pub values: SparseValues,
}

impl Default for SparseCodec {
    fn default() -> Self {
        Self {
            density: 0.01,
            min_size: geomx_kernels::mpq::DEFAULT_MIN_SIZE,
            selection: SelectionKind::Sampled,
            momentum: 0.0,
            warmup_density: 0.25,
            warmup_epochs: 4.0,
            warmup_rounds: None,
            clip: None,
            resync_every: 0,
            values: SparseValues::F32,
        }
    }
}

impl SparseCodec {
    /// Warm-up length in rounds for `batches_per_epoch` rounds per epoch.
    pub fn warmup_rounds(&self, batches_per_epoch: usize) -> u64 {
        self.warmup_rounds
            .unwrap_or_else(|| (self.warmup_epochs * batches_per_epoch as f64).ceil() as u64)
    }
}

/// `[compression]`: `intra` = worker ↔ local server, `inter` = local ↔ global server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Codec inside a DC.
    pub intra: Codec,
    /// Codec on the WAN tier.
    pub inter: Codec,
}

/// Transport protocols of a tier. Open: `dgt` joins later (inter tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TransportKind {
    /// Framed TCP.
    #[default]
    Tcp,
    /// DGT (inter tier only): local servers push their DC sums with differential gradient
    /// transmission (`[transport.dgt]`); replies and pulls stay on TCP.
    Dgt,
}

/// I/O drivers of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    /// io_uring where the kernel allows it, else portable.
    #[default]
    Auto,
    /// io_uring only (fail if unavailable).
    IoUring,
    /// Portable blocking sockets.
    Portable,
}

/// `[transport]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Transport inside a DC.
    pub intra: TransportKind,
    /// Transport on the WAN tier.
    pub inter: TransportKind,
    /// I/O driver.
    pub driver: Driver,
    /// DGT parameters, used when `inter = "dgt"`.
    pub dgt: DgtTransportConfig,
    /// TCP congestion control of every connection the job's processes open or accept, and of
    /// DGT's reliable channel (Linux `TCP_CONGESTION`), e.g. `"bbr"`; absent: the system's
    /// default. On a lossy WAN a loss-based algorithm (cubic, the usual default) falls to a few
    /// Mbit/s at 1 % loss where BBR keeps most of the link (docs/benchmarks.md, "DGT under
    /// loss"). Checked at start: the kernel must have it and allow it to this user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub congestion_control: Option<String>,
}

impl TransportConfig {
    /// `congestion_control` as the network layer takes it; a malformed name is an error naming
    /// the field.
    pub fn congestion(&self) -> Result<Option<geomx_net::congestion::Algorithm>, ConfigError> {
        self.congestion_control
            .as_deref()
            .map(|n| {
                geomx_net::congestion::Algorithm::new(n).map_err(|e| {
                    ConfigError::invalid("transport.congestion_control", e.to_string())
                })
            })
            .transpose()
    }

    /// [`Self::congestion`], and whether this process may use it (it tries it on a socket).
    pub fn congestion_checked(
        &self,
    ) -> Result<Option<geomx_net::congestion::Algorithm>, ConfigError> {
        let algo = self.congestion()?;
        if let Some(a) = algo {
            geomx_net::congestion::check(a)
                .map_err(|e| ConfigError::invalid("transport.congestion_control", e.to_string()))?;
        }
        Ok(algo)
    }
}

/// `[transport.dgt]`: differential gradient transmission of the local → global push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DgtTransportConfig {
    /// Unreliable UDP channels C, 1..=7.
    pub channels: u8,
    /// Reliable share k of the non-zero blocks (ranked by contribution), in [0, 1].
    pub k: f64,
    /// Adaptive k (dgt.md): each round the share is k_t = min(1, max(k·L_t/L_0, k_min)), L_t
    /// the DC's mean training loss as its workers report it (L_0 the first), so fewer blocks
    /// need the reliable channel as training converges.
    pub adaptive_k: bool,
    /// Floor of the adaptive share, in [0, k].
    pub k_min: f64,
    /// Contribution EMA factor α, in [0, 1).
    pub alpha: f64,
    /// Block size cap in bytes (a multiple of 64); blocks shrink to fit the path MTU.
    pub block_bytes: usize,
    /// Pacing rate of the unreliable channels in Mbit/s; absent = `auto` (start at the
    /// reliable channel's measured goodput, then adapt to the reported loss).
    pub rate_mbit: Option<f64>,
    /// `auto` pacing bounds in Mbit/s.
    pub min_rate_mbit: f64,
    /// `auto` pacing bounds in Mbit/s.
    pub max_rate_mbit: f64,
    /// Token bucket depth in datagrams.
    pub burst: u32,
    /// How long the receiver waits for listed blocks after the terminator, in milliseconds.
    pub deadline_ms: u64,
    /// Use UDP GSO where the kernel supports it.
    pub gso: bool,
    /// Path MTU to size blocks for; absent = read the route's MTU from the kernel.
    pub mtu: Option<usize>,
    /// The sender's priority window in bytes: ranges enter the channel queues in push order
    /// while those in the queues hold at most this much, so the global server gets the first
    /// ranges (and answers them) while later ones are still on the way. 0: one window over
    /// all ranges of a round (strict priority across ranges, every terminator after the last
    /// reliable block).
    pub window_bytes: usize,
}

impl Default for DgtTransportConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            k: 0.8,
            adaptive_k: false,
            k_min: 0.2,
            alpha: 0.3,
            block_bytes: 4096,
            rate_mbit: None,
            min_rate_mbit: 10.0,
            max_rate_mbit: 10_000.0,
            burst: 16,
            deadline_ms: 5,
            gso: true,
            mtu: None,
            window_bytes: geomx_net::dgt::DEFAULT_WINDOW_BYTES,
        }
    }
}

/// `[timeouts]`, in milliseconds (defaults from hips.md where it gives them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Establishing a connection to a peer.
    pub connect_ms: u64,
    /// A request waiting for its answer (e.g. a push for its fused reply).
    pub request_ms: u64,
    /// A peer is dead after this long without any message (hips.md: 10 s).
    pub peer_dead_ms: u64,
    /// Registration must complete within this; the error names missing roles (hips.md: 60 s).
    pub registration_ms: u64,
    /// Heartbeat interval; any message counts (hips.md: 1 s).
    pub heartbeat_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: 10_000,
            request_ms: 120_000,
            peer_dead_ms: 10_000,
            registration_ms: 60_000,
            heartbeat_ms: 1_000,
        }
    }
}

impl TimeoutsConfig {
    /// Connect timeout.
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }
    /// Request timeout.
    pub fn request(&self) -> Duration {
        Duration::from_millis(self.request_ms)
    }
    /// Peer-dead timeout.
    pub fn peer_dead(&self) -> Duration {
        Duration::from_millis(self.peer_dead_ms)
    }
    /// Registration timeout.
    pub fn registration(&self) -> Duration {
        Duration::from_millis(self.registration_ms)
    }
    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

/// `[placement]`: the size-balanced MultiGPS placement (hips.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// Split bound B_max in elements (`MXNET_KVSTORE_BIGARRAY_BOUND`).
    pub split_bound: usize,
    /// Minimum range size in elements.
    pub min_range: usize,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            split_bound: 1_000_000,
            min_range: 4_096,
        }
    }
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Progress (default).
    #[default]
    Info,
    /// Protocol detail (`PS_VERBOSE=1`).
    Debug,
    /// Every message (`PS_VERBOSE=2`).
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Level.
    pub level: LogLevel,
}

impl Config {
    /// Parses and validates a TOML configuration; absent keys keep their defaults.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_origin(text, "<string>")
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with_origin(&text, &path.display().to_string())
    }

    fn parse_with_origin(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        if cfg.train.rounds.is_none() && cfg.train.epochs.is_none() {
            cfg.train.rounds = Some(DEFAULT_ROUNDS);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML (every field spelled out).
    pub fn to_toml_string(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Stable 64-bit hash of everything that must agree across processes for a correct run: the
    /// cluster's shape (data centers, their workers and slow-downs, global servers, the central
    /// DC), model, data, training, sync, compression, transport (kinds and DGT settings) and
    /// placement. Addresses, ports, the I/O driver, timeouts, log level, security settings and
    /// the model's device are left out: they legitimately differ between processes (`cuda:local`
    /// becomes each process's own GPU). FNV-1a over canonical JSON; registration keys it with the
    /// job secret ([`crate::security::Keyring::registration_hash`]).
    pub fn config_hash(&self) -> u64 {
        let mut model = serde_json::to_value(&self.model).unwrap_or_default();
        if let Some(m) = model.as_object_mut() {
            m.remove("device");
        }
        let view = serde_json::json!({
            "model": model,
            "data": self.data,
            "train": self.train,
            "sync": self.sync,
            "compression": self.compression,
            "cluster": {
                "global_servers": self.cluster.global_servers,
                "central_dc": self.cluster.central_dc,
                "data_centers": self.cluster.data_centers.iter()
                    .map(|d| serde_json::json!([d.name, d.workers, d.slowdown]))
                    .collect::<Vec<_>>(),
            },
            "transport": {
                "intra": self.transport.intra,
                "inter": self.transport.inter,
                "dgt": self.transport.dgt,
            },
            "placement": self.placement,
            // Every process must slice (and so key) the model alike and wait per layer alike.
            "p3": self.scheduling.p3,
            // Every local server and the global server must take the same path.
            "tsengine": self.scheduling.tsengine,
        });
        let mut h = Fnv1a::new();
        h.write(view.to_string().as_bytes());
        h.finish()
    }

    /// The configuration as pretty JSON (the report's "resolved configuration").
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests;
