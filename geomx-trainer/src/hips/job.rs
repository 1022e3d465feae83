//! Everything a role needs to know about the job, resolved once from the configuration.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use geomx_net::sched::priority::PrioritySender;
use geomx_net::NetOptions;

use super::plan::ClusterPlan;
use super::slices::KeyMap;
use super::RunError;
use crate::codec::down::ReplyMode;
use crate::config::{
    Config, ConfigError, DataConfig, Driver, EsyncConfig, HfaConfig, InjectNan, LostWorker,
    MixedLrScale, MixedOptimizer, NonFinitePolicy, P3Config, SecurityMode, SyncAlgorithm,
};
use crate::data::TrainTest;
use crate::engine::{build_model, Model, OptimizerConfig};
use crate::security::Keyring;

/// The resolved job: topology, model, training settings and transport options.
#[derive(Clone)]
pub struct JobSpec {
    /// Topology and placement.
    pub plan: ClusterPlan,
    /// The plan's keys as parts of the model's tensors (one key per tensor without P3).
    pub keys: KeyMap,
    /// P3 scheduling (`[scheduling.p3]`), when enabled.
    pub p3: Option<P3Config>,
    /// TSEngine on the inter tier (`[scheduling.tsengine] inter`), when enabled.
    pub tsengine: Option<geomx_net::sched::tsengine::TsConfig>,
    /// TSEngine on the intra tier (`[scheduling.tsengine] intra`), when enabled: each DC's
    /// workers push and pull through trees rooted at their local server.
    pub ts_intra: Option<geomx_net::sched::tsengine::TsConfig>,
    /// The model every role builds (global servers initialise θ_0 from it).
    pub model: Arc<dyn Model>,
    /// Optimizer run by the global servers.
    pub optimizer: OptimizerConfig,
    /// Seed of θ_0, data sharding and batch order.
    pub seed: u64,
    /// FSA rounds to run.
    pub rounds: u64,
    /// Data set, sharding, batch size and batch-order seed (`[data]`).
    pub data_config: DataConfig,
    /// Training and test data (loaded by every role: the model's shape depends on it).
    pub data: Arc<TrainTest>,
    /// Worker (dc 0, rank 0) evaluates on the test set every this many rounds (0: only at the end).
    pub eval_every: u64,
    /// Transport options (timeouts, driver).
    pub net: NetOptions,
    /// The coordinator aborts if not every process registered within this time.
    pub registration_timeout: Duration,
    /// Hash of the resolved configuration (registration rejects mismatches).
    pub config_hash: u64,
    /// Codec of the worker ↔ local server tier's replies, and of its pushes unless
    /// `worker_sparse` is set.
    pub intra: crate::codec::TierCodec,
    /// `compression.intra.codec = "bisparse"`: the workers' own error-feedback top-k of the keys
    /// of N ≥ T ([`crate::codec::WorkerSparse`]); the replies stay exact f32.
    pub worker_sparse: Option<crate::codec::SparseSpec>,
    /// Codec of the local ↔ global server tier.
    pub inter: crate::codec::TierCodec,
    /// Synchronisation algorithm of the global tier (`fsa` or `mixed`).
    pub sync: SyncAlgorithm,
    /// HFA periods, weighting and outer optimizer (used when `sync` is `hfa`; ESync runs HFA's
    /// model-averaging path with the defaults: k1 = k2 = 1, data weighting, plain averaging).
    pub hfa: HfaConfig,
    /// ESync tolerance, global learning rate and normalisation (used when `sync` is `esync`).
    pub esync: EsyncConfig,
    /// Optimizer of the MixedSync global server (DC-ASGD or the plain training optimizer).
    pub mixed_optimizer: geomx_kernels::optim::OptimizerConfig,
    /// How the MixedSync global server scales each DC's learning rate.
    pub mixed_lr_scale: MixedLrScale,
    /// Compute slow-down factor of each DC's workers (`cluster.data_centers[d].slowdown`).
    pub slowdown: Vec<f64>,
    /// The non-finite policy and its test faults (`train.nonfinite`, `train.inject_nan`).
    pub nonfinite: NonFiniteSpec,
    /// Where and how often every role saves its state (`[checkpoint] dir`), if at all.
    pub checkpoint: Option<crate::checkpoint::Policy>,
    /// The checkpoint directory to continue from (`--resume DIR`), set by [`JobSpec::resume_from`].
    pub resume: Option<PathBuf>,
    /// Where worker (dc 0, rank 0) writes the final model as safetensors (`--save PATH`,
    /// `[checkpoint] export`).
    pub export: Option<PathBuf>,
    /// `security.mode`: mutual TLS (the default) or plaintext.
    pub security: SecurityMode,
    /// What a lost worker does to the job (`resilience.lost_worker`).
    pub lost_worker: LostWorker,
    /// Whether a lost local server leaves the job running (`resilience.lost_dc = "continue"`).
    pub lost_dc: LostWorker,
    /// Whether a lost global server leaves the job running (`resilience.lost_global_server`).
    pub lost_global_server: LostWorker,
    /// Whether a lost coordinator restarts from its snapshot (`resilience.lost_coordinator`).
    pub lost_coordinator: LostWorker,
    /// Fewest DCs a global round may complete with (`resilience.min_dcs`).
    pub min_dcs: usize,
    /// This process's certificates ([`JobSpec::with_keyring`]); with mutual TLS and none given,
    /// the first [`JobSpec::net_as`] makes an ephemeral CA (in-process clusters).
    pub keyring: Arc<OnceLock<Arc<Keyring>>>,
}

/// What the roles do with NaN and ±inf (`train.nonfinite`), and the faults a test injects
/// (`train.inject_nan`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NonFiniteSpec {
    /// Abort the job or drop the round.
    pub policy: NonFinitePolicy,
    /// Pushes whose first value a worker replaces with NaN.
    pub inject: Vec<InjectNan>,
}

impl NonFiniteSpec {
    /// Whether worker (`dc`, `rank`) injects a NaN into its push of `key` in `round`.
    pub fn injects(&self, dc: u32, rank: u32, round: u64, key: usize) -> bool {
        self.inject
            .iter()
            .any(|i| i.dc == dc && i.rank == rank && i.round == round && i.key == key)
    }
}

impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSpec")
            .field("plan", &self.plan)
            .field("rounds", &self.rounds)
            .field("seed", &self.seed)
            .field("config_hash", &self.config_hash)
            .finish_non_exhaustive()
    }
}

/// The MixedSync global optimizer: DC-ASGD with `train.optimizer`'s learning rate and weight
/// decay, or the plain training optimizer.
fn mixed_optimizer(cfg: &Config) -> geomx_kernels::optim::OptimizerConfig {
    match (cfg.sync.mixed.optimizer, &cfg.train.optimizer) {
        (MixedOptimizer::Dcasgd, OptimizerConfig::Sgd(s)) => {
            geomx_kernels::optim::OptimizerConfig::DcAsgd(
                cfg.sync.mixed.dcasgd(s.lr, s.weight_decay),
            )
        }
        // Validation requires SGD with DC-ASGD; anything else runs the plain optimizer.
        _ => cfg.train.optimizer.to_kernel(),
    }
}

impl JobSpec {
    /// Resolves a validated configuration: loads the data, builds the model and the placement.
    pub fn from_config(cfg: &Config) -> Result<Self, RunError> {
        let data = crate::data::load(&cfg.data).map_err(RunError::Data)?;
        let model: Arc<dyn Model> = Arc::from(
            build_model(&cfg.model, data.train.n_features(), data.train.n_classes())
                .map_err(RunError::Engine)?,
        );
        let workers_per_dc: Vec<usize> =
            cfg.cluster.data_centers.iter().map(|d| d.workers).collect();
        let w = workers_per_dc.iter().sum::<usize>().max(1);
        let central_dc = cfg.cluster.central_index();
        let lens: Vec<usize> = model.tensors().iter().map(|t| t.len()).collect();
        let p3 = cfg.scheduling.p3.enabled.then(|| cfg.scheduling.p3.clone());
        let keys = match &p3 {
            Some(p) => {
                let s = p.slice_elems.elems().ok_or_else(|| {
                    RunError::Config(ConfigError::invalid(
                        "scheduling.p3.slice_elems",
                        "\"auto\" is tuned by `geomx launch` before the job starts (its report's \
                         p3_tuning has the size it chose); a process started on its own needs a \
                         number of elements",
                    ))
                })?;
                KeyMap::sliced(&lens, &model.tensor_layers(), s)
            }
            None => KeyMap::whole(&lens, &model.tensor_layers()),
        };
        let key_lens = keys.key_lens();
        let plan = ClusterPlan::new(
            workers_per_dc,
            cfg.cluster.global_servers,
            central_dc,
            key_lens,
            cfg.placement.split_bound,
            cfg.placement.min_range,
        )
        .map_err(|e| RunError::Config(ConfigError::invalid("placement", e.to_string())))?;
        let batches_per_epoch = (data.train.len() / w) / cfg.data.batch_size.max(1);
        let rounds = cfg.train.total_rounds(batches_per_epoch);
        let mut hfa = match cfg.sync.algorithm {
            SyncAlgorithm::Esync => HfaConfig::default(),
            _ => cfg.sync.hfa,
        };
        if cfg.sync.algorithm == SyncAlgorithm::Hfa {
            if hfa.isolated {
                // No WAN exchange within the run: whole LAN periods, and a global period
                // longer than the run.
                check_hfa_rounds(rounds, hfa.k1, 1, cfg.train.epochs)?;
                hfa.k2 = rounds / hfa.k1.max(1) + 1;
            } else {
                check_hfa_rounds(rounds, hfa.k1, hfa.k2, cfg.train.epochs)?;
            }
        }
        let t = &cfg.timeouts;
        let base = NetOptions::default();
        let net = NetOptions {
            // P3 needs writes that block until the socket takes them (its priority heap must
            // hold the backlog); the io_uring driver queues what the socket does not take.
            driver: match (cfg.transport.driver, &p3) {
                (Driver::Auto, Some(_)) | (Driver::Portable, _) => geomx_net::DriverKind::Portable,
                (Driver::Auto, None) => geomx_net::DriverKind::Auto,
                (Driver::IoUring, _) => geomx_net::DriverKind::IoUring,
            },
            connect_timeout: t.connect(),
            conn: geomx_net::ConnConfig {
                request_timeout: t.request(),
                peer_timeout: t.peer_dead(),
                heartbeat_interval: t.heartbeat(),
                ..base.conn
            },
            // P3: a more urgent slice finds little queued in the socket ahead of it: little unsent
            // data, and a send buffer of `credit_bytes`.
            notsent_lowat: p3.as_ref().map(|p| p.unsent_bytes),
            send_buffer: p3.as_ref().map(|p| p.credit_bytes.initial() as usize),
            congestion: cfg
                .transport
                .congestion_checked()
                .map_err(RunError::Config)?,
            ..base
        };
        let mut h = crate::hash::Fnv1a::new();
        h.write(&cfg.config_hash().to_le_bytes());
        h.write(&plan.hash().to_le_bytes());
        h.write(&rounds.to_le_bytes());
        h.write(&super::msg::PAYLOAD_VERSION.to_le_bytes());
        let ts = geomx_net::sched::tsengine::TsConfig {
            max_greed: cfg.scheduling.tsengine.max_greed,
            expiry_rounds: cfg.scheduling.tsengine.expiry_rounds,
        };
        let (intra, worker_sparse) =
            crate::codec::TierCodec::from_config(&cfg.compression.intra, batches_per_epoch)
                .split_pushes();
        Ok(Self {
            plan,
            keys,
            p3,
            tsengine: cfg.scheduling.tsengine.inter.then_some(ts),
            ts_intra: cfg.scheduling.tsengine.intra.then_some(ts),
            model,
            optimizer: cfg.train.optimizer.clone(),
            seed: cfg.model.seed,
            rounds,
            data_config: cfg.data.clone(),
            data: Arc::new(data),
            eval_every: cfg.train.eval_every,
            net,
            registration_timeout: t.registration(),
            config_hash: h.finish(),
            intra,
            worker_sparse,
            inter: crate::codec::TierCodec::from_config(&cfg.compression.inter, batches_per_epoch)
                .with_transport(&cfg.transport),
            slowdown: cfg
                .cluster
                .data_centers
                .iter()
                .map(|d| d.slowdown)
                .collect(),
            sync: cfg.sync.algorithm,
            hfa,
            esync: cfg.sync.esync,
            mixed_optimizer: mixed_optimizer(cfg),
            mixed_lr_scale: cfg.sync.mixed.lr_scale,
            nonfinite: NonFiniteSpec {
                policy: cfg.train.nonfinite,
                inject: cfg.train.inject_nan.clone(),
            },
            checkpoint: cfg
                .checkpoint
                .dir
                .clone()
                .map(|dir| crate::checkpoint::Policy {
                    dir,
                    every_rounds: cfg.checkpoint.every_rounds,
                    keep: cfg.checkpoint.keep,
                    background: cfg.checkpoint.background,
                }),
            resume: None,
            export: cfg.checkpoint.export.clone(),
            security: cfg.security.mode,
            lost_worker: cfg.resilience.lost_worker,
            lost_dc: cfg.resilience.lost_dc,
            lost_global_server: cfg.resilience.lost_global_server,
            lost_coordinator: cfg.resilience.lost_coordinator,
            min_dcs: cfg.resilience.min_dcs,
            keyring: Arc::new(OnceLock::new()),
        })
    }

    /// Uses `keyring` for this process's certificates.
    pub fn with_keyring(mut self, keyring: Arc<Keyring>) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(keyring);
        self.keyring = Arc::new(cell);
        self
    }

    /// The keyring in use (an ephemeral one is made on first use when none was given).
    pub fn keyring(&self) -> Result<&Arc<Keyring>, RunError> {
        if let Some(k) = self.keyring.get() {
            return Ok(k);
        }
        let k = Keyring::ephemeral("in-process").map_err(RunError::Security)?;
        Ok(self.keyring.get_or_init(|| Arc::new(k)))
    }

    /// The transport options of the process that is (`role`, `dc`, `rank`): with mutual TLS, its
    /// certificate from the keyring.
    pub fn net_as(&self, role: &str, dc: u32, rank: u32) -> Result<NetOptions, RunError> {
        let mut net = self.net.clone();
        if self.security == SecurityMode::Mtls {
            let id = geomx_net::tls::Identity::new(role, dc, rank)
                .map_err(|e| RunError::Security(e.to_string()))?;
            let ctx = self.keyring()?.context(&id).map_err(RunError::Security)?;
            net.security = geomx_net::tls::Security::Mtls(ctx);
        }
        Ok(net)
    }

    /// The configuration hash as registration sends it: keyed with the job secret when the
    /// keyring has one (HMAC-SHA256, first 8 bytes), so only members can produce it.
    pub fn registration_hash(&self) -> Result<u64, RunError> {
        match self.security {
            SecurityMode::Off => Ok(self.config_hash),
            SecurityMode::Mtls => self
                .keyring()?
                .registration_hash(self.config_hash)
                .map_err(RunError::Security),
        }
    }

    /// Makes every role continue from the newest complete round of checkpoint directory `dir`
    /// (`--resume DIR`); refused for a job whose state checkpoints do not hold
    /// ([`Config::checkpoint_support`]).
    pub fn resume_from(&mut self, cfg: &Config, dir: PathBuf) -> Result<(), ConfigError> {
        cfg.checkpoint_support("--resume")?;
        self.resume = Some(dir);
        Ok(())
    }

    /// P3's priority sender in front of `client` (its writer thread named `name`), sized to
    /// the path under `credit_bytes = "path"`; `None` without P3.
    pub fn p3_sender(
        &self,
        client: &geomx_net::KvClient,
        name: &str,
    ) -> Result<Option<PrioritySender>, RunError> {
        let Some(p3) = self.p3.as_ref() else {
            return Ok(None);
        };
        let client = client.clone();
        match p3.credit_bytes.pushes_by_path() {
            true => PrioritySender::sized_by_path(client, name, p3.unsent_bytes),
            false => PrioritySender::new(client, name),
        }
        .map(Some)
        .map_err(|e| RunError::Net("starting the P3 sender".into(), e))
    }

    /// How the global tier's answer for `key` travels to the workers.
    pub fn reply_mode(&self, key: usize) -> ReplyMode {
        let len = self.plan.key_lens.get(key).copied().unwrap_or(0);
        ReplyMode::of(self.sync, &self.inter, &self.intra, len)
    }

    /// HFA with a sparse inter codec: the number of entries a range of `range_len` elements of
    /// `key` sends down per increment (D times what each DC sends up, at most the range), or
    /// `None` where increments travel densely.
    pub fn sparse_increments(&self, key: usize, range_len: usize) -> Option<usize> {
        let len = self.plan.key_lens.get(key).copied().unwrap_or(0);
        let spec = self
            .inter
            .sparse()
            .filter(|_| self.inter.is_sparse_key(len))?;
        self.hfa_periods()?;
        let up = geomx_kernels::topk::k_for_density(spec.bisparse.density, range_len);
        Some((up * self.plan.num_dcs()).min(range_len))
    }

    /// Whether a lost worker leaves the job running (`resilience.lost_worker = "continue"`).
    pub fn workers_may_rejoin(&self) -> bool {
        self.lost_worker == LostWorker::Continue
    }

    /// Whether a lost local server leaves the job running (`resilience.lost_dc = "continue"`).
    pub fn dcs_may_rejoin(&self) -> bool {
        self.lost_dc == LostWorker::Continue
    }

    /// Whether a lost global server restarts from its checkpoint and the job goes on
    /// (`resilience.lost_global_server = "continue"`).
    pub fn global_servers_may_rejoin(&self) -> bool {
        self.lost_global_server == LostWorker::Continue
    }

    /// Whether the coordinator may be restarted and its members reconnect to it
    /// (`resilience.lost_coordinator = "continue"`).
    pub fn coordinator_may_restart(&self) -> bool {
        self.lost_coordinator == LostWorker::Continue
    }

    /// The coordinator's membership snapshot under `lost_coordinator = "continue"`.
    pub fn coordinator_state_file(&self) -> Option<std::path::PathBuf> {
        let dir = &self.checkpoint.as_ref()?.dir;
        self.coordinator_may_restart()
            .then(|| dir.join("coordinator.state"))
    }

    /// The longest a role waits for any single step of the protocol before it gives up.
    pub fn wait_limit(&self) -> Duration {
        self.net.conn.request_timeout
    }

    /// HFA's `(k1, k2)` (`(1, 1)` for ESync, which uses its averaging path), or `None`.
    pub fn hfa_periods(&self) -> Option<(u64, u64)> {
        match self.sync {
            SyncAlgorithm::Hfa => Some((self.hfa.k1.max(1), self.hfa.k2.max(1))),
            // ESync pushes its model deltas through HFA's averaging path, one per round.
            SyncAlgorithm::Esync => Some((1, 1)),
            _ => None,
        }
    }

    /// Exchanges between workers and their local server: `rounds`, or HFA's local averagings.
    pub fn local_rounds(&self) -> u64 {
        self.hfa_periods()
            .map_or(self.rounds, |(k1, _)| self.rounds / k1)
    }

    /// Exchanges between local and global servers: `rounds`, or HFA's global averagings.
    pub fn global_rounds(&self) -> u64 {
        self.hfa_periods()
            .map_or(self.rounds, |(k1, k2)| self.rounds / (k1 * k2))
    }

    /// MixedSync: the learning-rate factor of each DC's steps (its share N_d / N of the workers
    /// under `share`, else 1).
    pub fn mixed_lr_scales(&self) -> Vec<f32> {
        let w = &self.plan.workers_per_dc;
        let total: usize = w.iter().sum();
        w.iter()
            .map(|&n| match self.mixed_lr_scale {
                MixedLrScale::Share if total > 0 => n as f32 / total as f32,
                _ => 1.0,
            })
            .collect()
    }

    /// Training rounds per exchange between workers and local servers: HFA's k1, else 1.
    pub fn rounds_per_local(&self) -> u64 {
        self.hfa_periods().map_or(1, |(k1, _)| k1)
    }

    /// Training rounds per exchange between local and global servers: HFA's k1 · k2, else 1.
    pub fn rounds_per_global(&self) -> u64 {
        self.hfa_periods().map_or(1, |(k1, k2)| k1 * k2)
    }

    /// Local averagings per exchange between local and global servers: HFA's k2, else 1.
    pub fn locals_per_global(&self) -> u64 {
        self.rounds_per_global() / self.rounds_per_local()
    }

    /// How long a process that lost a peer's connection gives the coordinator to find that peer
    /// lost before it concludes the peer is alive and it was the one away: the detection time
    /// and a second.
    pub fn loss_verdict_after(&self) -> Duration {
        self.net.conn.peer_timeout + Duration::from_secs(1)
    }

    /// Global index of worker `rank` of DC `dc` (DCs in order, ranks within).
    pub fn worker_index(&self, dc: usize, rank: usize) -> usize {
        self.plan.workers_per_dc[..dc].iter().sum::<usize>() + rank
    }
}

/// HFA runs whole global periods only, so that every replica ends on the agreed milestone:
/// `rounds` must be a positive multiple of k1 · k2. The error names the nearest valid values
/// (and, for `train.epochs`, the steps the epochs came to).
fn check_hfa_rounds(rounds: u64, k1: u64, k2: u64, epochs: Option<u64>) -> Result<(), ConfigError> {
    // A count TOML can write (its integers are i64).
    const MAX: u64 = i64::MAX as u64;
    let Some(period) = k1.checked_mul(k2).filter(|&p| p <= MAX) else {
        return Err(ConfigError::invalid(
            "sync.hfa.k2",
            format!("the HFA period k1 * k2 = {k1} * {k2} exceeds {MAX} rounds"),
        ));
    };
    let period = period.max(1);
    if rounds % period == 0 && rounds > 0 {
        return Ok(());
    }
    let below = rounds - rounds % period;
    let above = below.checked_add(period).filter(|&a| a <= MAX);
    let nearest = match (below, above) {
        (0, Some(a)) => format!("{a}"),
        (b, Some(a)) => format!("{b} or {a}"),
        (b, None) => format!("{b}"),
    };
    let source = match epochs {
        Some(e) => format!("train.epochs = {e} comes to {rounds} steps"),
        None => format!("{rounds} steps"),
    };
    Err(ConfigError::invalid(
        "train.rounds",
        format!(
            "{source}, not a multiple of the HFA period k1 * k2 = {period}: \
             use {nearest} (train.rounds)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataCenterConfig;

    #[test]
    fn hfa_periods_beyond_toml_integers_are_refused_and_suggestions_stay_writable() {
        let field = |r: Result<(), ConfigError>| match r {
            Err(ConfigError::Invalid { field, message }) => (field, message),
            other => panic!("{other:?}"),
        };
        let max = i64::MAX as u64;
        let (f, m) = field(check_hfa_rounds(400, max, 2, None));
        assert_eq!(f, "sync.hfa.k2", "{m}");
        assert!(field(check_hfa_rounds(400, u64::MAX, u64::MAX, None))
            .1
            .contains("exceeds"));
        // The nearest multiple above would not fit: only the one below is offered.
        let (f, m) = field(check_hfa_rounds(max, 200, 1, None));
        assert_eq!(f, "train.rounds");
        assert!(
            m.ends_with(&format!("use {} (train.rounds)", max - max % 200)),
            "{m}"
        );
        assert!(check_hfa_rounds(max - max % 200, 200, 1, None).is_ok());
    }

    #[test]
    fn default_config_resolves_to_the_built_in_job() {
        let cfg = Config::default();
        let job = JobSpec::from_config(&cfg).unwrap();
        assert_eq!(job.plan.workers_per_dc, vec![2, 2]);
        assert_eq!(job.plan.num_global_servers(), 1);
        // "central" is a separate site after the two training DCs.
        assert_eq!(job.plan.central_dc, 2);
        assert_eq!(job.rounds, crate::config::DEFAULT_ROUNDS);
        let lens: usize = job.plan.key_lens.iter().sum();
        assert_eq!(lens, job.model.num_params());
        assert_eq!(job.plan.expected_processes().len(), 1 + 2 + 4);
        assert_eq!(job.worker_index(1, 1), 3);
    }

    #[test]
    fn central_dc_epochs_and_timeouts_are_resolved() {
        let mut cfg = Config::default();
        cfg.cluster.central_dc = "dc1".into();
        cfg.cluster.data_centers = vec![
            DataCenterConfig::new("dc0", 3),
            DataCenterConfig::new("dc1", 1),
        ];
        cfg.train.rounds = None;
        cfg.train.epochs = Some(2);
        cfg.timeouts.peer_dead_ms = 1234;
        cfg.timeouts.request_ms = 5678;
        cfg.validate().unwrap();
        let job = JobSpec::from_config(&cfg).unwrap();
        assert_eq!(job.plan.central_dc, 1);
        let per_epoch = (job.data.train.len() / 4) / cfg.data.batch_size;
        assert_eq!(job.rounds, 2 * per_epoch as u64);
        assert_eq!(job.net.conn.peer_timeout, Duration::from_millis(1234));
        assert_eq!(job.wait_limit(), Duration::from_millis(5678));
    }

    #[test]
    fn slowdown_and_sync_settings_resolve() {
        let mut cfg = Config::default();
        cfg.cluster.data_centers[1].slowdown = 2.5;
        assert_eq!(JobSpec::from_config(&cfg).unwrap().slowdown, [1.0, 2.5]);
        cfg.sync.algorithm = SyncAlgorithm::Mixed;
        let job = JobSpec::from_config(&cfg).unwrap();
        assert_eq!(job.sync, SyncAlgorithm::Mixed);
        match job.mixed_optimizer {
            geomx_kernels::optim::OptimizerConfig::DcAsgd(d) => {
                assert_eq!((d.lr, d.momentum), (cfg.train.optimizer.lr(), 0.0));
                assert_eq!(d.lambda, geomx_kernels::optim::DcAsgdLambda::Constant(0.04));
            }
            other => panic!("expected DC-ASGD, got {other:?}"),
        }
        cfg.sync.mixed.optimizer = MixedOptimizer::Plain;
        assert_eq!(
            JobSpec::from_config(&cfg).unwrap().mixed_optimizer,
            cfg.train.optimizer.to_kernel()
        );
        // HFA runs whole periods only: 400 steps with k1 * k2 = 6 are refused, naming 396 and
        // 402; 396 runs.
        cfg.sync.algorithm = SyncAlgorithm::Hfa;
        cfg.sync.hfa.k1 = 2;
        cfg.sync.hfa.k2 = 3;
        let refusal = |cfg: &Config| match JobSpec::from_config(cfg) {
            Err(RunError::Config(ConfigError::Invalid { field, message })) => {
                assert_eq!(field, "train.rounds");
                message
            }
            other => panic!("expected a refusal, got {other:?}"),
        };
        let m = refusal(&cfg);
        assert!(m.contains("396 or 402"), "{m}");
        cfg.train.rounds = Some(396);
        let job = JobSpec::from_config(&cfg).unwrap();
        assert_eq!(job.rounds, 396);
        assert_eq!(job.hfa_periods(), Some((2, 3)));
        assert_eq!((job.local_rounds(), job.global_rounds()), (198, 66));
        cfg.train.rounds = Some(5);
        let m = refusal(&cfg);
        assert!(m.contains("use 6 "), "{m}");
        // Isolated data centers: whole LAN periods, no global averaging within the run.
        cfg.sync.hfa.isolated = true;
        cfg.train.rounds = Some(400);
        let job = JobSpec::from_config(&cfg).unwrap();
        assert_eq!(job.hfa_periods(), Some((2, 201)));
        assert_eq!((job.local_rounds(), job.global_rounds()), (200, 0));
        cfg.train.rounds = Some(401);
        assert!(refusal(&cfg).contains("400 or 402"));
    }

    #[test]
    fn config_hash_changes_with_topology_and_training() {
        let base = JobSpec::from_config(&Config::default())
            .unwrap()
            .config_hash;
        let mut two = Config::default();
        two.cluster.global_servers = 2;
        assert_ne!(JobSpec::from_config(&two).unwrap().config_hash, base);
        let mut lr = Config::default();
        lr.train.rounds = Some(7);
        assert_ne!(JobSpec::from_config(&lr).unwrap().config_hash, base);
        assert_eq!(
            JobSpec::from_config(&Config::default())
                .unwrap()
                .config_hash,
            base
        );
    }
}
