//! The HiPS roles: coordinator, global server, local server and worker (hips.md).
//!
//! Round logic is sans-IO: [`LocalAggregator`] and [`GlobalAggregator`] take pushes and return what
//! to answer; the role drivers ([`coordinator`], [`global_server`], [`local_server`], [`worker`])
//! wrap them around geomx-net servers and clients. [`JobSpec`] is the resolved configuration every
//! role starts from; [`RoleStats`] is what each process reports at its end.

mod admit;
pub mod chaos;
mod ckpt;
pub mod coordinator;
pub mod dgt;
pub mod dgt_lab;
pub mod esync;
mod fsa_round;
mod global_agg;
pub mod global_server;
pub mod hfa;
mod job;
pub mod journal;
mod local_agg;
pub mod local_server;
mod mixed_agg;
pub mod msg;
pub mod node;
pub mod plan;
mod replies;
pub mod round_log;
pub mod slices;
pub mod throughput;
pub mod time_split;
pub mod ts_msg;
mod ts_node;
mod ts_root;
mod upstream;
pub mod worker;
mod worker_tree;

use serde::{Deserialize, Serialize};

pub use global_agg::{
    DcPush, GlobalAggregator, RangeOptimizer, RangeSnapshot, RoundDone, SavedState, SkipCause,
};
pub use job::JobSpec;
pub use local_agg::{LocalAggregator, LocalSum};
pub use mixed_agg::{MixedAggregator, Staleness};
pub use plan::ClusterPlan;

pub(crate) use crate::lock;

/// Bytes sent plus received of a counter snapshot.
pub(crate) fn total_bytes(c: geomx_net::Counters) -> u64 {
    c.bytes_sent + c.bytes_recv
}

/// Why a role failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Data could not be loaded or split.
    #[error("data: {0}")]
    Data(crate::data::DataError),
    /// The model rejected its input.
    #[error("model: {0}")]
    Engine(crate::engine::EngineError),
    /// A transport operation failed.
    #[error("{0}: {1}")]
    Net(String, geomx_net::NetError),
    /// This process has no usable certificate (`[security]`).
    #[error("security: {0}")]
    Security(String),
    /// A peer broke the HiPS protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A process the membership table should list is missing.
    #[error("membership: {0}")]
    Membership(String),
    /// A wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The job finished before this (restarted) process registered: nothing is left to do.
    #[error("{0}")]
    JobFinished(String),
    /// The job was aborted (the notice names the failed process).
    #[error("job aborted: {0}")]
    Aborted(String),
    /// An operating-system error.
    #[error("{0}: {1}")]
    Io(String, String),
    /// A checkpoint could not be written, or the one to resume from is unusable.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

/// What one process reports when it ends (printed as one JSON line, collected by the launcher).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleStats {
    /// Role name.
    pub role: String,
    /// Data-center index.
    pub dc: u32,
    /// Rank within (dc, role).
    pub rank: u32,
    /// Bytes sent + received at this process's server sockets (the coordinator's for it).
    pub served_bytes: u64,
    /// Bytes sent + received at this process's client sockets to data-plane servers.
    pub client_bytes: u64,
    /// FNV-1a hash of the final parameters (workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_hash: Option<u64>,
    /// Training loss of the last batch (workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_loss: Option<f64>,
    /// Final test accuracy (the reporting worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_test_accuracy: Option<f64>,
    /// FNV-1a hash of the global servers' θ at the end of the run, assembled in key order and
    /// hashed like `param_hash` (local servers, from their final pull).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_param_hash: Option<u64>,
    /// Inter-tier payload bytes (push + reply) by codec class (local servers).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub codec_bytes: crate::codec::CodecBytes,
    /// Updates dropped under `train.nonfinite = "skip"`: (range, round) steps at a global server,
    /// (key, round) sums at a local server, (key, averaging) resets at a worker.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_updates: u64,
    /// Finite values that overflowed to ±inf in this process's FP16 / BF16 encodings, by key.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cast_overflows: std::collections::BTreeMap<u64, u64>,
    /// Dense resynchronisations a worker applied to its Bi-Sparse replicas.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resyncs: u64,
    /// Resynchronisations where the replica differed from the global server's θ.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resync_mismatches: u64,
    /// Sampled top-k selections that fell back to exact top-k (local servers, and workers with
    /// worker-side Bi-Sparse).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub topk_fallbacks: u64,
    /// MixedSync staleness of each DC's pushes, by DC (global servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staleness: Vec<Staleness>,
    /// DGT counters when `transport.inter = "dgt"` (local and global servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dgt: Option<dgt::DgtRoleStats>,
    /// Requests this process's servers refused with an error reply (unknown key, a push the
    /// round does not expect, a non-member or a connection borrowing a member's id); never fatal.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_requests: u64,
    /// The checkpoint round this process resumed from (`--resume`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_round: Option<u64>,
    /// Samples per second and where the step time went (workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<throughput::WorkerThroughput>,
    /// Where this process's rounds went: compute, codec, LAN wait, WAN wait and idle, in ms per
    /// training round (workers, local servers, global servers; see [`time_split`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<time_split::RoleSplit>,
    /// Workers lost and rejoined, as their local server saw it (local servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub member_events: Vec<round_log::MemberEvent>,
    /// Rounds that summed only some of the DC's workers (local servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partial_rounds: Vec<round_log::PartialRound>,
    /// The round log the coordinator assembled from its journal (the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_log: Option<round_log::JournalLog>,
    /// The incarnation of this process (0: never restarted).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub incarnation: u32,
    /// The P3 credit (send buffer, bytes) of the pushing connections (workers: their push
    /// connection; local servers: their uplinks, the largest): tuned from round times under
    /// `scheduling.p3.credit_bytes = "auto"`, last sized to the path under `"path"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p3_credit: Option<u64>,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

fn is_zero_u32(x: &u32) -> bool {
    *x == 0
}

impl RoleStats {
    /// Stats of `me` with its server-side counters.
    pub fn new(me: &node::Identity, served: geomx_net::Counters) -> Self {
        Self {
            role: me.role.to_string(),
            dc: me.dc,
            rank: me.rank,
            served_bytes: total_bytes(served),
            client_bytes: 0,
            param_hash: None,
            final_loss: None,
            final_test_accuracy: None,
            global_param_hash: None,
            codec_bytes: Default::default(),
            skipped_updates: 0,
            cast_overflows: Default::default(),
            resyncs: 0,
            resync_mismatches: 0,
            topk_fallbacks: 0,
            staleness: Vec::new(),
            dgt: None,
            refused_requests: 0,
            resumed_from_round: None,
            throughput: None,
            split: None,
            member_events: Vec::new(),
            partial_rounds: Vec::new(),
            round_log: None,
            incarnation: 0,
            p3_credit: None,
        }
    }
}

/// Protocol errors of the FSA round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggError {
    /// A push for a key or range this process does not hold.
    #[error("unknown key or range {0}")]
    UnknownKey(usize),
    /// A push for another round than the one being collected (a protocol error in FSA).
    #[error("push for key {key} at version {got}, expected {expected}")]
    WrongVersion {
        /// Key or range id.
        key: usize,
        /// Version being collected.
        expected: u64,
        /// Version received.
        got: u64,
    },
    /// The pushed tensor has the wrong number of elements.
    #[error("push for key {key} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// Key or range id.
        key: usize,
        /// Expected elements.
        expected: usize,
        /// Received elements.
        got: usize,
    },
    /// A sender index (worker rank or DC) out of range.
    #[error("sender {sender} out of range (only {n})")]
    BadSender {
        /// Rank or DC index.
        sender: usize,
        /// Number of senders.
        n: usize,
    },
    /// A push from a worker that does not count in this round (lost, or rejoining later).
    #[error(
        "push for key {key} round {round} from worker {rank}, which is no member of that round"
    )]
    NotMember {
        /// Key id.
        key: usize,
        /// Round.
        round: u64,
        /// Worker rank.
        rank: usize,
    },
    /// The same sender pushed twice in one round.
    #[error("duplicate push from {sender} for key {key} round {round}")]
    Duplicate {
        /// Key or range id.
        key: usize,
        /// Round.
        round: u64,
        /// Rank or DC index.
        sender: usize,
    },
    /// The DCs' worker counts do not add up to W (with lost workers allowed: are 0 or over W).
    #[error("worker counts for range {key} sum to {got}, expected W = {expected}")]
    CountMismatch {
        /// Range id.
        key: usize,
        /// Sum of counts.
        got: u64,
        /// W.
        expected: u32,
    },
    /// A NaN or ±inf under `train.nonfinite = "abort"`.
    #[error("non-finite {what} of range {key} at round {round}")]
    NonFinite {
        /// Range id.
        key: usize,
        /// Round (version) of the push.
        round: u64,
        /// Which value: global sum, quantized mean, encoded increment, optimizer step.
        what: &'static str,
    },
    /// The range's optimizer refused its configuration or a step.
    #[error("optimizer of range {key}: {message}")]
    Optimizer {
        /// Range id.
        key: usize,
        /// The optimizer's message.
        message: String,
    },
}
