//! Coordinator: registration, deterministic ids, membership, barriers, liveness, done / abort.
//!
//! [`state::CoordState`] is the sans-IO logic; [`Coordinator`] runs it behind a
//! [`crate::KvServer`], and [`CoordClient`] is what every other process uses.

mod client;
mod codec;
mod journal;
mod persist;
mod server;
mod snapshot;
pub mod state;

use std::time::Duration;

pub use client::CoordClient;
pub use journal::{Journal, JournalRecord, JOURNAL_MAX_BYTES, JOURNAL_RECORD_MAX};
pub use server::{read_snapshot, CoordOutcome, Coordinator};
pub use snapshot::CoordSnapshot;

use crate::driver::NetOptions;
use crate::error::NetError;
use codec::{Reader, Writer};

/// Most processes one job's membership table holds: coordinator payloads listing more are
/// refused, so a configuration naming more is refused before it starts.
pub const MAX_NODES: usize = 1 << 16;

/// Protocol version of the coordinator messages; a mismatch is rejected at registration.
pub const PROTOCOL_VERSION: u32 = 4;

/// The coordinator's answer to a registration after every process sent Done: a restarted
/// process that finds it has nothing left to do (and may exit successfully).
pub const JOB_FINISHED: &str = "the job has finished";

/// Part of the coordinator's refusal of a reattachment while the member's previous connection is
/// still registered: the member retries until the coordinator has seen that connection close.
pub const STILL_ATTACHED: &str = "is still attached; retry once its old connection is gone";

/// Part of the coordinator's refusal of a registration of a rejoinable process whose previous
/// incarnation it still counts as live (a restart that came before the loss was seen): the new
/// process retries.
pub const STILL_REGISTERED: &str =
    "is still registered (the loss of its previous incarnation is not seen yet)";

/// What a process announces when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Role name (e.g. "worker", "local_server", "global_server").
    pub role: String,
    /// Data-center index.
    pub dc: u32,
    /// Rank within (dc, role).
    pub rank: u32,
    /// Address other processes connect to (empty if the process serves nothing).
    pub listen_addr: String,
    /// The process's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Hash of the configuration; every process of a job must agree.
    pub config_hash: u64,
    /// `Some(incarnation)`: a member of a running job reconnecting to a restarted coordinator,
    /// holding that incarnation; `None`: a registration.
    pub reattach: Option<u32>,
}

impl Hello {
    /// Encodes into the wire payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.str(&self.role)
            .u32(self.dc)
            .u32(self.rank)
            .str(&self.listen_addr);
        w.u32(self.protocol_version).u64(self.config_hash);
        match self.reattach {
            None => w.u32(0).u32(0),
            Some(i) => w.u32(1).u32(i),
        };
        w.0
    }

    /// Decodes a wire payload (bounded, total: malformed input is an error).
    pub fn decode(buf: &[u8]) -> Result<Hello, NetError> {
        let mut r = Reader::new(buf, "register");
        let h = Hello {
            role: r.str()?,
            dc: r.u32()?,
            rank: r.u32()?,
            listen_addr: r.str()?,
            protocol_version: r.u32()?,
            config_hash: r.u64()?,
            reattach: match (r.u32()?, r.u32()?) {
                (0, 0) => None,
                (1, i) => Some(i),
                _ => return Err(NetError::Protocol("bad register payload: reattach".into())),
            },
        };
        r.end()?;
        Ok(h)
    }

    /// The (dc, role, rank) identity.
    pub fn node_key(&self) -> NodeKey {
        NodeKey {
            dc: self.dc,
            role: self.role.clone(),
            rank: self.rank,
        }
    }
}

/// Identity of an expected process. Ids are assigned in this type's order: (dc, role, rank).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeKey {
    /// Data-center index.
    pub dc: u32,
    /// Role name.
    pub role: String,
    /// Rank within (dc, role).
    pub rank: u32,
}

impl NodeKey {
    /// Builds a key.
    pub fn new(role: impl Into<String>, dc: u32, rank: u32) -> NodeKey {
        NodeKey {
            dc,
            role: role.into(),
            rank,
        }
    }
}

impl std::fmt::Display for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (dc {}, rank {})", self.role, self.dc, self.rank)
    }
}

/// One row of the membership table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Assigned node id (1-based; 0 is the coordinator).
    pub id: u32,
    /// Role name.
    pub role: String,
    /// Data-center index.
    pub dc: u32,
    /// Rank within (dc, role).
    pub rank: u32,
    /// Announced listen address.
    pub addr: String,
}

/// Writes a membership table's rows: a count, then id, role, dc, rank and address each.
fn put_nodes(w: &mut Writer, nodes: &[NodeInfo]) {
    w.u32(nodes.len() as u32);
    for n in nodes {
        w.u32(n.id).str(&n.role).u32(n.dc).u32(n.rank).str(&n.addr);
    }
}

/// Reads what [`put_nodes`] wrote (bounded).
fn take_nodes(r: &mut Reader<'_>) -> Result<Vec<NodeInfo>, NetError> {
    let n = r.count()?;
    let mut nodes = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        nodes.push(NodeInfo {
            id: r.u32()?,
            role: r.str()?,
            dc: r.u32()?,
            rank: r.u32()?,
            addr: r.str()?,
        });
    }
    Ok(nodes)
}

/// The membership table sent to every process once all expected processes registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The receiving process's own id.
    pub my_id: u32,
    /// All nodes, in id order.
    pub nodes: Vec<NodeInfo>,
    /// How many times the receiving process was lost and registered again (0: its first
    /// registration). A process with a non-zero incarnation joins a running job.
    pub incarnation: u32,
}

impl Membership {
    /// The node with this (role, dc, rank).
    pub fn find(&self, role: &str, dc: u32, rank: u32) -> Option<&NodeInfo> {
        self.nodes
            .iter()
            .find(|n| n.role == role && n.dc == dc && n.rank == rank)
    }

    /// The node with this id.
    pub fn by_id(&self, id: u32) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// This process's own row.
    pub fn me(&self) -> Option<&NodeInfo> {
        self.by_id(self.my_id)
    }

    /// Encodes into the wire payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.my_id);
        put_nodes(&mut w, &self.nodes);
        w.u32(self.incarnation);
        w.0
    }

    /// Decodes a wire payload (bounded, total: malformed input is an error).
    pub fn decode(buf: &[u8]) -> Result<Membership, NetError> {
        let mut r = Reader::new(buf, "membership");
        let my_id = r.u32()?;
        let nodes = take_nodes(&mut r)?;
        let incarnation = r.u32()?;
        r.end()?;
        Ok(Membership {
            my_id,
            nodes,
            incarnation,
        })
    }
}

/// Where a member of a running job is now (the answer to [`CoordClient::locate`]): a process
/// that lost a peer learns from it whether, and where, the peer registered again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// Its announced listen address (the newest incarnation's).
    pub addr: String,
    /// Its incarnation (0: first registration, +1 per rejoin).
    pub incarnation: u32,
    /// Whether it is registered and not lost now.
    pub live: bool,
    /// Not live, but not lost either: its connection dropped (or this coordinator restarted)
    /// and it may still reattach within the reattach window.
    pub reattaching: bool,
    /// How long ago this incarnation's own connection to the coordinator last dropped while
    /// the job ran (a restart of the coordinator does not count); `None`: never. A member whose
    /// link to it broke can tell a peer that was away too (stopped, cut off: dropped about when
    /// the link broke) from one that left it out (never dropped). Millisecond resolution.
    pub dropped_ago: Option<Duration>,
}

impl Located {
    /// Encodes into the wire payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.str(&self.addr)
            .u32(self.incarnation)
            .u32(match (self.live, self.reattaching) {
                (true, _) => 1,
                (false, true) => 2,
                (false, false) => 0,
            })
            .u32(self.dropped_ago.map_or(u32::MAX, |d| {
                u32::try_from(d.as_millis()).unwrap_or(u32::MAX - 1)
            }));
        w.0
    }

    /// Decodes a wire payload (bounded, total: malformed input is an error).
    pub fn decode(buf: &[u8]) -> Result<Located, NetError> {
        let mut r = Reader::new(buf, "located");
        let (addr, incarnation) = (r.str()?, r.u32()?);
        let (live, reattaching) = match r.u32()? {
            0 => (false, false),
            1 => (true, false),
            2 => (false, true),
            _ => return Err(NetError::Protocol("bad located payload: live flag".into())),
        };
        let dropped_ago = match r.u32()? {
            u32::MAX => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        };
        let l = Located {
            addr,
            incarnation,
            live,
            reattaching,
            dropped_ago,
        };
        r.end()?;
        Ok(l)
    }
}

impl NodeKey {
    /// Encodes into the payload of a locate request.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.str(&self.role).u32(self.dc).u32(self.rank);
        w.0
    }

    /// Decodes a locate request's payload (bounded, total).
    pub fn decode(buf: &[u8]) -> Result<NodeKey, NetError> {
        let mut r = Reader::new(buf, "locate");
        let k = NodeKey {
            role: r.str()?,
            dc: r.u32()?,
            rank: r.u32()?,
        };
        r.end()?;
        Ok(k)
    }
}

/// Why the job was aborted, naming the process responsible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortNotice {
    /// Role of the failed or aborting process ("coordinator" for registration timeouts).
    pub role: String,
    /// Its data center.
    pub dc: u32,
    /// Its rank.
    pub rank: u32,
    /// Human-readable reason.
    pub reason: String,
}

impl std::fmt::Display for AbortNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (dc {}, rank {}): {}",
            self.role, self.dc, self.rank, self.reason
        )
    }
}

impl AbortNotice {
    /// Encodes into the wire payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.str(&self.role)
            .u32(self.dc)
            .u32(self.rank)
            .str(&self.reason);
        w.0
    }

    /// Decodes a wire payload (bounded, total: malformed input is an error).
    pub fn decode(buf: &[u8]) -> Result<AbortNotice, NetError> {
        let mut r = Reader::new(buf, "abort");
        let a = AbortNotice {
            role: r.str()?,
            dc: r.u32()?,
            rank: r.u32()?,
            reason: r.str()?,
        };
        r.end()?;
        Ok(a)
    }
}

/// A broadcast from the coordinator, or the loss of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordEvent {
    /// Every process sent Done: flush, close and exit 0. Also what a reconnecting member gets
    /// when it lost the coordinator and, reattaching, learns that the job has finished
    /// meanwhile ([`JOB_FINISHED`]): the broadcast it missed.
    Shutdown,
    /// The job is aborted: print the reason and exit non-zero.
    Abort(AbortNotice),
    /// The connection to the coordinator failed (treat as abort).
    CoordinatorLost(String),
}

/// Coordinator settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordOptions {
    /// Transport options (driver, heartbeat and liveness timeouts).
    pub net: NetOptions,
    /// Expected [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Expected configuration hash.
    pub config_hash: u64,
    /// Abort if not every expected process registered within this time (hips.md: 60 s).
    pub registration_timeout: Duration,
    /// Roles whose processes may be lost while the job runs and register again (see
    /// [`state::CoordState::with_rejoinable`]); empty: any loss aborts the job.
    pub rejoinable: Vec<String>,
    /// Where the coordinator keeps its [`CoordSnapshot`] while the job runs (written atomically
    /// at every change of the membership), so that a restart can continue the job
    /// ([`Coordinator::bind_restored`]); `None`: nowhere.
    pub state_file: Option<std::path::PathBuf>,
    /// `Some`: a member whose connection drops may reconnect within this time before it is lost
    /// or ends the job (for a coordinator that may be restarted or stopped; see
    /// [`state::CoordState::with_reattach_window`]); `None`: the loss counts at once.
    pub reattach_window: Option<Duration>,
}

impl Default for CoordOptions {
    fn default() -> Self {
        CoordOptions {
            net: NetOptions::default(),
            protocol_version: PROTOCOL_VERSION,
            config_hash: 0,
            registration_timeout: Duration::from_secs(60),
            rejoinable: Vec::new(),
            state_file: None,
            reattach_window: None,
        }
    }
}
