//! `[scheduling]`: when and in which order pushes move (scheduling.md); never which values are
//! aggregated.

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, SyncAlgorithm};

/// Default P3 slice size in elements (scheduling.md, "Defaults").
pub const DEFAULT_SLICE_ELEMS: usize = 50_000;

/// Smallest P3 slice: below this the per-key overhead (a frame, an aggregation slot and an
/// uplink per slice) outweighs any scheduling gain.
pub const MIN_SLICE_ELEMS: usize = 1024;

/// Default `TCP_NOTSENT_LOWAT` of P3 connections in bytes.
pub const DEFAULT_UNSENT_BYTES: u32 = 16 << 10;

/// Send buffer (credit) of P3 connections in bytes under `"auto"` before the tuner's first
/// candidate.
pub const DEFAULT_CREDIT_BYTES: u32 = 256 << 10;

/// `scheduling.p3.credit_bytes`: sized to each connection's path (`"path"`, the default), tuned
/// from round times (`"auto"`), or a fixed send buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Credit {
    /// This many bytes.
    Bytes(u32),
    /// A word: `"path"` or `"auto"`.
    Sized(CreditWord),
}

/// How a credit is sized when it is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CreditWord {
    /// `"path"`: every P3 connection (pushes and replies) keeps its send buffer at the
    /// bandwidth × round trip the kernel measures of its path, with room for the unsent bytes
    /// and one slice (`geomx_net::sched::path_credit::PathCredit`), starting at 4 MiB.
    Path,
    /// `"auto"`: tuned from measured round times within the first 15 rounds
    /// (`geomx_net::sched::credit::CreditTuner`) by each worker for its push connection and by
    /// each local server for its uplinks; the servers' reply connections are sized to their
    /// path as under `"path"`.
    Auto,
}

impl Credit {
    /// The credit sized to the path (the default).
    pub const PATH: Credit = Credit::Sized(CreditWord::Path);

    /// The credit tuned from round times.
    pub const AUTO: Credit = Credit::Sized(CreditWord::Auto);

    /// The send buffer a connection starts with.
    pub fn initial(self) -> u32 {
        match self {
            Credit::Bytes(b) => b,
            Credit::Sized(CreditWord::Path) => geomx_net::sched::path_credit::INITIAL,
            Credit::Sized(CreditWord::Auto) => DEFAULT_CREDIT_BYTES,
        }
    }

    /// True for `"auto"`.
    pub fn is_auto(self) -> bool {
        self == Self::AUTO
    }

    /// True where the pushing connections are sized to their path (`"path"`).
    pub fn pushes_by_path(self) -> bool {
        self == Self::PATH
    }

    /// True where the servers' reply connections are sized to their path (`"path"` and
    /// `"auto"`, whose tuners only size the pushing connections).
    pub fn replies_by_path(self) -> bool {
        matches!(self, Credit::Sized(_))
    }
}

/// `scheduling.p3.slice_elems`: a slice size in elements, or `"auto"`, which `geomx launch`
/// tunes before the job from measured round times (`crate::launch::slices`) and replaces by the
/// size it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceElems {
    /// This many elements per slice.
    Elems(usize),
    /// Tuned by `geomx launch`.
    Auto,
}

impl SliceElems {
    /// The slice size, once it is a number.
    pub fn elems(self) -> Option<usize> {
        match self {
            SliceElems::Elems(n) => Some(n),
            SliceElems::Auto => None,
        }
    }
}

impl Serialize for SliceElems {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SliceElems::Elems(n) => s.serialize_u64(*n as u64),
            SliceElems::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for SliceElems {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SliceElems;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of elements or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SliceElems, E> {
                usize::try_from(v)
                    .map(SliceElems::Elems)
                    .map_err(|_| E::custom(format!("{v} elements is too many")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SliceElems, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SliceElems, E> {
                match v {
                    "auto" => Ok(SliceElems::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[scheduling]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingConfig {
    /// P3: layer-priority slicing on both tiers (`[scheduling.p3]`).
    pub p3: P3Config,
    /// TSEngine: the adaptive push and pull overlay (`[scheduling.tsengine]`).
    pub tsengine: TsEngineConfig,
}

/// `[scheduling.tsengine]`: TSEngine's adaptive overlay (scheduling.md, "TSEngine"). Under
/// `inter`, the local servers' sums reach the global server through a dynamic aggregation tree
/// (no in-cast at the global server) and the new parameters come back through an ε-greedy
/// broadcast tree, both chosen per round from measured throughput; under `intra`, the same
/// between each DC's workers and their local server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TsEngineConfig {
    /// Workers ↔ local server: each DC's workers push through a dynamic aggregation tree and
    /// pull through an ε-greedy broadcast tree rooted at their local server (every worker then
    /// serves its DC's other workers on a port of its host).
    pub intra: bool,
    /// Local servers ↔ global server.
    pub inter: bool,
    /// Highest probability of a greedy pick in the pull tree (`MAX_GREED`), in \[0, 1\].
    pub max_greed: f64,
    /// Rounds a throughput measurement stays usable (one stamped in round r is forgotten in
    /// round r + expiry_rounds + 1).
    pub expiry_rounds: u64,
}

impl Default for TsEngineConfig {
    fn default() -> Self {
        Self {
            intra: false,
            inter: false,
            max_greed: geomx_net::sched::tsengine::DEFAULT_MAX_GREED,
            expiry_rounds: geomx_net::sched::tsengine::DEFAULT_EXPIRY_ROUNDS,
        }
    }
}

/// `[scheduling.p3]`: priority-based parameter propagation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct P3Config {
    /// Slice tensors into keys of `slice_elems`, send them most urgent layer first on both tiers,
    /// and start the next forward pass of each layer as soon as its slices are back.
    pub enabled: bool,
    /// Slice size S in elements: a tensor of n elements becomes ⌈n/S⌉ keys. `"auto"`: tuned by
    /// `geomx launch` before the job (`crate::launch::slices`).
    pub slice_elems: SliceElems,
    /// Unsent bytes a P3 connection's socket may hold (`TCP_NOTSENT_LOWAT`): what a more urgent
    /// slice may find queued ahead of it besides the slice on the wire.
    pub unsent_bytes: u32,
    /// Send buffer of a P3 connection (`SO_SNDBUF`; Linux doubles it for its bookkeeping):
    /// what it may hold unacknowledged, in flight or queued, ahead of a more urgent slice. It
    /// must cover the path's bandwidth × round-trip time, or it caps the throughput; much more
    /// and the queue below the priority heap is first come, first served again. Default
    /// `"path"`: sized to each connection's measured path; `"auto"`: tuned from measured round
    /// times; or a number of bytes.
    pub credit_bytes: Credit,
}

impl Default for P3Config {
    fn default() -> Self {
        Self {
            enabled: false,
            slice_elems: SliceElems::Elems(DEFAULT_SLICE_ELEMS),
            unsent_bytes: DEFAULT_UNSENT_BYTES,
            credit_bytes: Credit::PATH,
        }
    }
}

impl Config {
    /// `[scheduling]`: a slice size in range, and P3 only with the gradient-pushing algorithms.
    pub(crate) fn validate_scheduling(&self) -> Result<(), ConfigError> {
        let p3 = &self.scheduling.p3;
        if let SliceElems::Elems(n) = p3.slice_elems {
            if !(MIN_SLICE_ELEMS..=u32::MAX as usize).contains(&n) {
                return Err(ConfigError::invalid(
                    "scheduling.p3.slice_elems",
                    format!(
                        "{n} must be in {MIN_SLICE_ELEMS}..={} or \"auto\"",
                        u32::MAX
                    ),
                ));
            }
        }
        for (field, v) in [
            ("scheduling.p3.unsent_bytes", p3.unsent_bytes),
            ("scheduling.p3.credit_bytes", p3.credit_bytes.initial()),
        ] {
            if v < 4096 || v > i32::MAX as u32 {
                return Err(ConfigError::invalid(
                    field,
                    format!("{v} must be in 4096..={}", i32::MAX),
                ));
            }
        }
        if p3.enabled && self.transport.driver == super::Driver::IoUring {
            return Err(ConfigError::invalid(
                "scheduling.p3.enabled",
                "P3 runs on the portable driver (its priority heap needs writes that block until \
                 the socket takes them; io_uring queues the rest): set transport.driver to \
                 \"auto\" or \"portable\"",
            ));
        }
        if p3.enabled
            && !matches!(
                self.sync.algorithm,
                SyncAlgorithm::Fsa | SyncAlgorithm::Mixed
            )
        {
            return Err(ConfigError::invalid(
                "scheduling.p3.enabled",
                format!(
                    "P3 schedules the gradient pushes of fsa and mixed, not the model \
                     averagings of {}",
                    self.sync.algorithm.name()
                ),
            ));
        }
        self.validate_tsengine()
    }

    /// `[scheduling.tsengine]`: on either tier, only where one tree per round carries every
    /// value (FSA, dense f32 over TCP) and every worker and DC takes part; on the inter tier
    /// with one global server.
    fn validate_tsengine(&self) -> Result<(), ConfigError> {
        let ts = &self.scheduling.tsengine;
        if !(0.0..=1.0).contains(&ts.max_greed) {
            return Err(ConfigError::invalid(
                "scheduling.tsengine.max_greed",
                format!("{} must be in [0, 1]", ts.max_greed),
            ));
        }
        // The field named: the inter tier's when it is on, else the intra tier's.
        let field = match (ts.intra, ts.inter) {
            (_, true) => "scheduling.tsengine.inter",
            (true, false) => "scheduling.tsengine.intra",
            (false, false) => return Ok(()),
        };
        let r = &self.resilience;
        let why = if self.sync.algorithm != SyncAlgorithm::Fsa {
            "TSEngine aggregates the gradient sums of fsa only (sync.algorithm)"
        } else if ts.inter && self.cluster.global_servers != 1 {
            "TSEngine needs one global server (cluster.global_servers = 1)"
        } else if ts.inter && self.transport.inter == super::TransportKind::Dgt {
            "TSEngine sends over TCP: set transport.inter to \"tcp\""
        } else if self.compression.inter != super::Codec::None
            || self.compression.intra != super::Codec::None
        {
            "TSEngine adds dense f32 sums and sends θ: set compression.inter and \
             compression.intra to \"none\""
        } else if self.scheduling.p3.enabled {
            "P3 and TSEngine are exclusive: set scheduling.p3.enabled = false"
        } else if [r.lost_worker, r.lost_dc, r.lost_global_server]
            .contains(&super::LostWorker::Continue)
        {
            "every DC and worker takes part in every round: resilience.lost_worker, lost_dc \
             and lost_global_server must be \"abort\""
        } else if self.train.nonfinite != super::NonFinitePolicy::Abort {
            "every DC takes part in every round: train.nonfinite must be \"abort\""
        } else {
            return Ok(());
        };
        Err(ConfigError::invalid(field, why))
    }
}
