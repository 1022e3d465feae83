//! `Config::validate`: value ranges and cross-field rules, each error naming its field.

use super::OptimizerConfig;
use super::{
    Codec, Config, ConfigError, DatasetKind, HfaCorrection, LambdaMode, MixedOptimizer,
    OuterOptimizer, SparseCodec, SparseValues, SyncAlgorithm,
};

type Result = std::result::Result<(), ConfigError>;

/// Most values one synthetic array may hold (the teacher, the training or the test features):
/// 2^32, 16 GiB of f32.
const MAX_SYNTHETIC_VALUES: usize = 1 << 32;

fn check(ok: bool, field: impl FnOnce() -> String, message: impl FnOnce() -> String) -> Result {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(field(), message()))
    }
}

/// Accepts `host:port` and `[v6]:port` with a non-empty host and a numeric port.
fn valid_addr(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains(':') && !host.contains(char::is_whitespace)
    };
    host_ok && port.parse::<u16>().is_ok()
}

fn check_addr(field: &str, addr: &str) -> Result {
    check(
        valid_addr(addr),
        || field.to_string(),
        || format!("{addr:?} is not a host:port address"),
    )
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn positive_finite(field: &str, v: f32) -> Result {
    check(
        v.is_finite() && v > 0.0,
        || field.into(),
        || format!("{v} must be a finite number > 0"),
    )
}

fn unit_interval(field: &str, v: f32) -> Result {
    check(
        (0.0..1.0).contains(&v),
        || field.into(),
        || format!("{v} must be in [0, 1)"),
    )
}

fn non_negative(field: &str, v: f32) -> Result {
    check(
        v.is_finite() && v >= 0.0,
        || field.into(),
        || format!("{v} must be a finite number >= 0"),
    )
}

impl Config {
    /// Checks every value and cross-field rule; the first violation is returned with its field.
    pub fn validate(&self) -> Result {
        self.validate_cluster()?;
        self.validate_model_and_data()?;
        self.validate_train()?;
        self.validate_compression()?;
        self.validate_sync()?;
        self.transport.congestion()?;
        self.validate_dgt()?;
        self.validate_wan()?;
        self.validate_checkpoint()?;
        self.validate_security()?;
        self.validate_scheduling()?;
        self.validate_resilience()?;
        self.validate_timeouts_and_placement()
    }

    /// `transport.inter = "dgt"`: only on the inter tier, with f32 or unscaled fp16 values and FSA
    /// (DGT rounds are consecutive per range), and parameters in range.
    fn validate_dgt(&self) -> Result {
        use super::TransportKind;
        check(
            self.transport.intra != TransportKind::Dgt,
            || "transport.intra".into(),
            || "dgt is an inter-tier transport (local → global push)".into(),
        )?;
        if self.transport.inter != TransportKind::Dgt {
            return Ok(());
        }
        let d = &self.transport.dgt;
        check(
            self.sync.algorithm == SyncAlgorithm::Fsa,
            || "transport.inter".into(),
            || "dgt needs sync.algorithm = \"fsa\"".into(),
        )?;
        check(
            matches!(
                self.compression.inter,
                Codec::None
                    | Codec::Fp16(super::Fp16Codec {
                        scaling: super::ScalingKind::None
                    })
            ),
            || "compression.inter.codec".into(),
            || {
                "dgt sends dense f32 or fp16 blocks without a scale: use codec \"none\", or \
                 \"fp16\" with scaling = \"none\", on the inter tier"
                    .into()
            },
        )?;
        check(
            (1..=7).contains(&d.channels),
            || "transport.dgt.channels".into(),
            || format!("{} not in 1..=7", d.channels),
        )?;
        check(
            (0.0..=1.0).contains(&d.k),
            || "transport.dgt.k".into(),
            || format!("{} not in [0, 1]", d.k),
        )?;
        check(
            (0.0..=d.k).contains(&d.k_min),
            || "transport.dgt.k_min".into(),
            || format!("{} not in [0, k = {}]", d.k_min, d.k),
        )?;
        check(
            (0.0..1.0).contains(&d.alpha),
            || "transport.dgt.alpha".into(),
            || format!("{} not in [0, 1)", d.alpha),
        )?;
        check(
            d.block_bytes >= 64 && d.block_bytes % 64 == 0 && d.block_bytes <= 1 << 20,
            || "transport.dgt.block_bytes".into(),
            || format!("{} must be a multiple of 64 in 64..=1048576", d.block_bytes),
        )?;
        let rate_ok = |r: f64| r.is_finite() && r > 0.0;
        check(
            d.rate_mbit.is_none_or(rate_ok)
                && rate_ok(d.min_rate_mbit)
                && rate_ok(d.max_rate_mbit)
                && d.min_rate_mbit <= d.max_rate_mbit,
            || "transport.dgt.rate_mbit".into(),
            || "rates must be finite and > 0, min_rate_mbit <= max_rate_mbit".into(),
        )?;
        check(
            d.burst >= 1,
            || "transport.dgt.burst".into(),
            || "must be >= 1".into(),
        )?;
        check(
            (1..=60_000).contains(&d.deadline_ms),
            || "transport.dgt.deadline_ms".into(),
            || format!("{} not in 1..=60000", d.deadline_ms),
        )?;
        check(
            d.mtu.is_none_or(|m| (576..=65536).contains(&m)),
            || "transport.dgt.mtu".into(),
            || "must be in 576..=65536".into(),
        )
    }

    fn validate_sync(&self) -> Result {
        let s = &self.sync;
        match s.algorithm {
            SyncAlgorithm::Fsa => Ok(()),
            SyncAlgorithm::Mixed => {
                let m = &s.mixed;
                check(
                    !matches!(self.compression.inter, Codec::Bisparse(_) | Codec::Mpq(_)),
                    || "compression.inter.codec".into(),
                    || "Bi-Sparse is not defined for sync.algorithm = \"mixed\"".into(),
                )?;
                if m.optimizer == MixedOptimizer::Dcasgd {
                    check(
                        matches!(self.train.optimizer, OptimizerConfig::Sgd(_)),
                        || "sync.mixed.optimizer".into(),
                        || {
                            "dcasgd takes its learning rate from train.optimizer, which must be sgd"
                                .into()
                        },
                    )?;
                    match m.lambda_mode {
                        LambdaMode::Constant => non_negative("sync.mixed.lambda", m.lambda)?,
                        LambdaMode::Adaptive => {
                            non_negative("sync.mixed.lambda0", m.lambda0)?;
                            unit_interval("sync.mixed.m", m.m)?;
                            positive_finite("sync.mixed.eps", m.eps)?;
                        }
                    }
                    unit_interval("sync.mixed.momentum", m.momentum)?;
                }
                Ok(())
            }
            SyncAlgorithm::Hfa => {
                let h = &s.hfa;
                // Sparse codecs carry model deltas here: DGC's momentum correction is defined
                // for gradients only.
                if let Codec::Bisparse(c) | Codec::Mpq(c) = &self.compression.inter {
                    check(
                        c.momentum == 0.0,
                        || "compression.inter.momentum".into(),
                        || {
                            format!(
                                "momentum correction m = {} is for gradients; under \
                                 sync.algorithm = \"hfa\" the codec carries model deltas: set 0",
                                c.momentum
                            )
                        },
                    )?;
                }
                check(h.k1 >= 1, || "sync.hfa.k1".into(), || "must be >= 1".into())?;
                check(h.k2 >= 1, || "sync.hfa.k2".into(), || "must be >= 1".into())?;
                if h.outer == OuterOptimizer::Nesterov {
                    positive_finite("sync.hfa.outer_lr", h.outer_lr)?;
                    unit_interval("sync.hfa.outer_momentum", h.outer_momentum)?;
                }
                if h.correction == HfaCorrection::Scaffold {
                    let why = if h.isolated {
                        Some("corrects the drift between global averagings, which                               sync.hfa.isolated = true never makes"
                            .to_string())
                    } else if h.outer != OuterOptimizer::Average {
                        Some(format!(
                            "derives the global variate from plain averaging; set                              sync.hfa.outer = \"average\" (not {:?})",
                            h.outer
                        ))
                    } else if !matches!(self.train.optimizer, OptimizerConfig::Sgd(_)) {
                        Some(
                            "scales its variates by SGD's step: set train.optimizer.kind = \"sgd\""
                                .to_string(),
                        )
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Err(ConfigError::invalid(
                            "sync.hfa.correction",
                            format!("\"scaffold\" {why}"),
                        ));
                    }
                }
                Ok(())
            }
            SyncAlgorithm::Esync => {
                let e = &s.esync;
                check(
                    !matches!(self.compression.inter, Codec::Bisparse(_) | Codec::Mpq(_)),
                    || "compression.inter.codec".into(),
                    || "sparse codecs are not implemented for sync.algorithm = \"esync\"".into(),
                )?;
                check(
                    e.eps.is_finite() && e.eps >= 0.0,
                    || "sync.esync.eps".into(),
                    || format!("{} must be a finite number of seconds >= 0", e.eps),
                )?;
                positive_finite("sync.esync.gamma", e.gamma)
            }
        }
    }

    fn validate_compression(&self) -> Result {
        let c = &self.compression;
        check(
            !matches!(c.intra, Codec::Mpq(_)),
            || "compression.intra.codec".into(),
            || "mpq is an inter-tier codec (local <-> global servers)".into(),
        )?;
        if let Codec::Bisparse(s) = &c.intra {
            self.validate_worker_sparse(s)?;
        }
        match &c.inter {
            Codec::Bisparse(s) => self.validate_sparse(s, "bisparse", "inter"),
            Codec::Mpq(s) => {
                check(
                    s.values == SparseValues::F32,
                    || "compression.inter.values".into(),
                    || "mpq sends large tensors with f32 values (small ones go FP16)".into(),
                )?;
                self.validate_sparse(s, "mpq", "inter")
            }
            _ => Ok(()),
        }
    }

    /// `compression.intra.codec = "bisparse"`: workers sparsify their own gradient pushes (FSA or
    /// MixedSync rounds, without P3's slices); replies stay exact f32, so there is nothing to
    /// resynchronise, and DGC's momentum correction may run on one tier only.
    fn validate_worker_sparse(&self, s: &SparseCodec) -> Result {
        let field = || "compression.intra.codec".to_string();
        check(
            matches!(
                self.sync.algorithm,
                SyncAlgorithm::Fsa | SyncAlgorithm::Mixed
            ),
            field,
            || {
                format!(
                    "bisparse on the intra tier sparsifies the workers' gradient pushes: it needs \
                     sync.algorithm = \"fsa\" or \"mixed\", got \"{}\"",
                    self.sync.algorithm.name()
                )
            },
        )?;
        check(!self.scheduling.p3.enabled, field, || {
            "bisparse on the intra tier does not run with scheduling.p3 (its pushes are slices)"
                .into()
        })?;
        check(
            s.resync_every == 0,
            || "compression.intra.resync_every".into(),
            || "the intra tier's replies are exact f32: there is nothing to resynchronise".into(),
        )?;
        let inter_momentum = match &self.compression.inter {
            Codec::Bisparse(i) | Codec::Mpq(i) => i.momentum,
            _ => 0.0,
        };
        check(
            s.momentum == 0.0 || inter_momentum == 0.0,
            || "compression.intra.momentum".into(),
            || {
                "momentum correction on both tiers would apply momentum twice: set it on one \
                 tier only"
                    .into()
            },
        )?;
        self.validate_sparse(s, "bisparse", "intra")
    }

    fn validate_sparse(&self, s: &SparseCodec, name: &str, tier: &str) -> Result {
        let f = |x: &str| format!("compression.{tier}.{x}");
        for (field, d) in [("density", s.density), ("warmup_density", s.warmup_density)] {
            check(
                d > 0.0 && d <= 1.0,
                || f(field),
                || format!("{d} must be in (0, 1]"),
            )?;
        }
        check(
            s.warmup_epochs.is_finite() && s.warmup_epochs >= 0.0,
            || f("warmup_epochs"),
            || format!("{} must be a finite number >= 0", s.warmup_epochs),
        )?;
        check(s.min_size >= 1, || f("min_size"), || "must be >= 1".into())?;
        unit_interval(&f("momentum"), s.momentum)?;
        if let Some(c) = s.clip {
            positive_finite(&f("clip"), c)?;
        }
        check(
            s.momentum == 0.0 || !self.train.optimizer.to_kernel().has_momentum(),
            || f("momentum"),
            || {
                format!(
                    "{name} momentum correction m = {} replaces the optimizer's momentum: it needs \
                     momentum-free SGD (train.optimizer), got {:?}",
                    s.momentum, self.train.optimizer
                )
            },
        )
    }

    fn validate_cluster(&self) -> Result {
        let c = &self.cluster;
        let max = geomx_net::coord::MAX_NODES;
        check(
            (1..=max).contains(&c.global_servers),
            || "cluster.global_servers".into(),
            || format!("{} must be between 1 and {max}", c.global_servers),
        )?;
        check(
            valid_name(&c.central_dc),
            || "cluster.central_dc".into(),
            || {
                format!(
                    "{:?} must be non-empty letters, digits, '-' or '_'",
                    c.central_dc
                )
            },
        )?;
        check(
            !c.host.trim().is_empty(),
            || "cluster.host".into(),
            || "must not be empty".into(),
        )?;
        if let Some(addr) = &c.coordinator {
            check_addr("cluster.coordinator", addr)?;
        }
        check(
            c.global_server_addrs.is_empty() || c.global_server_addrs.len() == c.global_servers,
            || "cluster.global_server_addrs".into(),
            || {
                format!(
                    "{} addresses for {} global servers",
                    c.global_server_addrs.len(),
                    c.global_servers
                )
            },
        )?;
        for (i, a) in c.global_server_addrs.iter().enumerate() {
            check_addr(&format!("cluster.global_server_addrs[{i}]"), a)?;
        }
        check(
            !c.data_centers.is_empty(),
            || "cluster.data_centers".into(),
            || "at least one data center is required".into(),
        )?;
        for (i, dc) in c.data_centers.iter().enumerate() {
            let f = |name: &str| format!("cluster.data_centers[{i}].{name}");
            check(
                valid_name(&dc.name),
                || f("name"),
                || {
                    format!(
                        "{:?} must be non-empty letters, digits, '-' or '_'",
                        dc.name
                    )
                },
            )?;
            check(
                !c.data_centers[..i].iter().any(|o| o.name == dc.name),
                || f("name"),
                || format!("{:?} is used by an earlier data center", dc.name),
            )?;
            check(
                (1..=max).contains(&dc.workers),
                || f("workers"),
                || format!("{} must be between 1 and {max}", dc.workers),
            )?;
            check(
                dc.slowdown.is_finite() && dc.slowdown >= 1.0,
                || f("slowdown"),
                || format!("{} must be a finite number >= 1", dc.slowdown),
            )?;
            if let Some(addr) = &dc.local_server {
                check_addr(&f("local_server"), addr)?;
            }
            check(
                dc.worker_addrs.is_empty() || dc.worker_addrs.len() == dc.workers,
                || f("worker_addrs"),
                || {
                    format!(
                        "{} addresses for {} workers",
                        dc.worker_addrs.len(),
                        dc.workers
                    )
                },
            )?;
            for (r, a) in dc.worker_addrs.iter().enumerate() {
                check_addr(&format!("cluster.data_centers[{i}].worker_addrs[{r}]"), a)?;
            }
        }
        // The coordinator, the global servers, a local server per DC and the workers.
        let processes = 1 + c.global_servers + c.data_centers.len() + c.total_workers();
        check(
            processes <= max,
            || "cluster.data_centers".into(),
            || format!("{processes} processes in all, at most {max}"),
        )
    }

    fn validate_model_and_data(&self) -> Result {
        super::device::validate_model_config(&self.model)
            .map_err(|(field, message)| ConfigError::invalid(field, message))?;
        for (i, &h) in self.model.hidden.iter().enumerate() {
            check(
                h >= 1,
                || format!("model.hidden[{i}]"),
                || "must be >= 1".into(),
            )?;
        }
        let d = &self.data;
        check(
            d.batch_size >= 1,
            || "data.batch_size".into(),
            || "must be >= 1".into(),
        )?;
        let s = &d.synthetic;
        check(
            s.features >= 1,
            || "data.synthetic.features".into(),
            || "must be >= 1".into(),
        )?;
        check(
            s.classes >= 2,
            || "data.synthetic.classes".into(),
            || "must be >= 2".into(),
        )?;
        check(
            s.train_samples >= 1,
            || "data.synthetic.train_samples".into(),
            || "must be >= 1".into(),
        )?;
        check(
            s.test_samples >= 1,
            || "data.synthetic.test_samples".into(),
            || "must be >= 1".into(),
        )?;
        // The teacher and the samples are held whole: bounded products, never an overflow.
        for (name, n, what) in [
            ("classes", s.classes, "classes"),
            ("train_samples", s.train_samples, "samples"),
            ("test_samples", s.test_samples, "samples"),
        ] {
            check(
                n.checked_mul(s.features)
                    .is_some_and(|v| v <= MAX_SYNTHETIC_VALUES),
                || format!("data.synthetic.{name}"),
                || {
                    format!(
                        "{n} {what} × {} features exceed {MAX_SYNTHETIC_VALUES} values",
                        s.features
                    )
                },
            )?;
        }
        let train_samples = match d.dataset {
            DatasetKind::Digits => Some(super::DIGITS_TRAIN_SAMPLES),
            DatasetKind::Synthetic => Some(s.train_samples),
            DatasetKind::Idx => {
                let idx = &d.idx;
                for (name, p) in [
                    ("train_images", &idx.train_images),
                    ("train_labels", &idx.train_labels),
                    ("test_images", &idx.test_images),
                    ("test_labels", &idx.test_labels),
                ] {
                    check(
                        !p.as_os_str().is_empty(),
                        || format!("data.idx.{name}"),
                        || "a path is required when data.dataset = \"idx\"".into(),
                    )?;
                }
                check(
                    idx.classes >= 2,
                    || "data.idx.classes".into(),
                    || "must be >= 2".into(),
                )?;
                None
            }
            DatasetKind::Cifar10 => {
                check(
                    !d.cifar10.dir.as_os_str().is_empty(),
                    || "data.cifar10.dir".into(),
                    || "a folder is required when data.dataset = \"cifar10\"".into(),
                )?;
                None
            }
        };
        if let Some(n) = train_samples {
            let workers = self.cluster.total_workers().max(1);
            let per = n / workers;
            check(
                d.batch_size <= per,
                || "data.batch_size".into(),
                || {
                    format!(
                        "{} exceeds the {per} samples of each of the {workers} worker shards",
                        d.batch_size
                    )
                },
            )?;
        }
        Ok(())
    }

    fn validate_train(&self) -> Result {
        let t = &self.train;
        check(
            !(t.rounds.is_some() && t.epochs.is_some()),
            || "train.epochs".into(),
            || "give train.rounds or train.epochs, not both".into(),
        )?;
        check(
            t.rounds != Some(0),
            || "train.rounds".into(),
            || "must be >= 1".into(),
        )?;
        check(
            t.epochs != Some(0),
            || "train.epochs".into(),
            || "must be >= 1".into(),
        )?;
        for (i, f) in t.inject_nan.iter().enumerate() {
            let workers = self
                .cluster
                .data_centers
                .get(f.dc as usize)
                .map_or(0, |d| d.workers);
            check(
                (f.rank as usize) < workers,
                || format!("train.inject_nan[{i}]"),
                || format!("no worker (dc {}, rank {}) in the cluster", f.dc, f.rank),
            )?;
        }
        match &t.optimizer {
            OptimizerConfig::Sgd(c) => {
                positive_finite("train.optimizer.lr", c.lr)?;
                unit_interval("train.optimizer.momentum", c.momentum)?;
                check(
                    !c.nesterov || c.momentum > 0.0,
                    || "train.optimizer.nesterov".into(),
                    || "needs train.optimizer.momentum > 0".into(),
                )?;
                non_negative("train.optimizer.weight_decay", c.weight_decay)
            }
            OptimizerConfig::Adam(c) => {
                positive_finite("train.optimizer.lr", c.lr)?;
                unit_interval("train.optimizer.beta1", c.beta1)?;
                unit_interval("train.optimizer.beta2", c.beta2)?;
                positive_finite("train.optimizer.epsilon", c.epsilon)?;
                non_negative("train.optimizer.weight_decay", c.weight_decay)
            }
        }
    }

    fn validate_timeouts_and_placement(&self) -> Result {
        let t = &self.timeouts;
        for (name, v) in [
            ("connect_ms", t.connect_ms),
            ("request_ms", t.request_ms),
            ("peer_dead_ms", t.peer_dead_ms),
            ("registration_ms", t.registration_ms),
            ("heartbeat_ms", t.heartbeat_ms),
        ] {
            check(
                v >= 1,
                || format!("timeouts.{name}"),
                || "must be >= 1".into(),
            )?;
        }
        check(
            t.heartbeat_ms < t.peer_dead_ms,
            || "timeouts.heartbeat_ms".into(),
            || {
                format!(
                    "{} must be below timeouts.peer_dead_ms ({}), or live peers are declared dead",
                    t.heartbeat_ms, t.peer_dead_ms
                )
            },
        )?;
        let p = &self.placement;
        check(
            p.min_range >= 1,
            || "placement.min_range".into(),
            || "must be >= 1".into(),
        )?;
        check(
            p.split_bound >= p.min_range,
            || "placement.split_bound".into(),
            || {
                format!(
                    "{} must be >= placement.min_range ({})",
                    p.split_bound, p.min_range
                )
            },
        )?;
        check(
            p.split_bound <= u32::MAX as usize,
            || "placement.split_bound".into(),
            || {
                format!(
                    "{} must fit in u32 (range element counts are u32)",
                    p.split_bound
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::valid_addr;

    #[test]
    fn address_syntax() {
        for ok in [
            "127.0.0.1:9000",
            "host-a:0",
            "[::1]:80",
            "dc0.example:65535",
        ] {
            assert!(valid_addr(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            ":80",
            "h:99999",
            "::1:80",
            "[zz]:1",
            "a b:1",
            "h:",
        ] {
            assert!(!valid_addr(bad), "{bad}");
        }
    }
}
