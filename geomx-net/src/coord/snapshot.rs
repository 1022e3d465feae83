//! What a coordinator keeps on disk while the job runs, so that a restarted coordinator can
//! continue it: the membership table, every process's incarnation, the lost ones and the ones
//! that sent Done, and the journal its members appended to. Barriers are not kept: a member
//! that waited in one enters it again.

use std::collections::{BTreeMap, BTreeSet};

use super::codec::{Reader, Writer};
use super::{JournalRecord, NodeInfo, NodeKey, JOURNAL_RECORD_MAX};
use crate::error::NetError;

/// Magic of a snapshot file ("GXCS").
const MAGIC: u32 = 0x5343_5847;
/// Snapshot format version (2 added the journal; 1 is read as an empty one).
const VERSION: u32 = 2;

/// A running job's membership as a coordinator persists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordSnapshot {
    /// Protocol version of the job.
    pub protocol_version: u32,
    /// Configuration hash of the job.
    pub config_hash: u64,
    /// The membership table (ids, roles, addresses).
    pub nodes: Vec<NodeInfo>,
    /// Incarnation of every process, lost ones included.
    pub incarnations: BTreeMap<NodeKey, u32>,
    /// Processes lost (rejoinable) that have not registered again.
    pub lost: BTreeSet<NodeKey>,
    /// Processes that sent Done.
    pub done: BTreeSet<NodeKey>,
    /// The journal's records (a restarted coordinator keeps the entries of members that died
    /// before it; live members send theirs again anyway).
    pub journal: Vec<JournalRecord>,
}

fn put_key(w: &mut Writer, k: &NodeKey) {
    w.str(&k.role).u32(k.dc).u32(k.rank);
}

fn take_key(r: &mut Reader<'_>) -> Result<NodeKey, NetError> {
    Ok(NodeKey {
        role: r.str()?,
        dc: r.u32()?,
        rank: r.u32()?,
    })
}

impl CoordSnapshot {
    /// Encodes into the file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(MAGIC)
            .u32(VERSION)
            .u32(self.protocol_version)
            .u64(self.config_hash);
        super::put_nodes(&mut w, &self.nodes);
        w.u32(self.incarnations.len() as u32);
        for (k, i) in &self.incarnations {
            put_key(&mut w, k);
            w.u32(*i);
        }
        for set in [&self.lost, &self.done] {
            w.u32(set.len() as u32);
            for k in set {
                put_key(&mut w, k);
            }
        }
        w.u32(self.journal.len() as u32);
        for r in &self.journal {
            put_key(&mut w, &r.from);
            w.bytes(&r.bytes);
        }
        w.0
    }

    /// Decodes a file's bytes (bounded, total: anything malformed is an error).
    pub fn decode(buf: &[u8]) -> Result<CoordSnapshot, NetError> {
        let mut r = Reader::new(buf, "coordinator snapshot");
        if r.u32()? != MAGIC {
            return Err(NetError::Protocol("not a coordinator snapshot".into()));
        }
        let version = r.u32()?;
        if !(1..=VERSION).contains(&version) {
            return Err(NetError::Protocol(format!(
                "coordinator snapshot version {version}, expected {VERSION}"
            )));
        }
        let protocol_version = r.u32()?;
        let config_hash = r.u64()?;
        let nodes = super::take_nodes(&mut r)?;
        let mut incarnations = BTreeMap::new();
        for _ in 0..r.count()? {
            let k = take_key(&mut r)?;
            incarnations.insert(k, r.u32()?);
        }
        let mut sets = [BTreeSet::new(), BTreeSet::new()];
        for set in &mut sets {
            for _ in 0..r.count()? {
                set.insert(take_key(&mut r)?);
            }
        }
        let mut journal = Vec::new();
        if version >= 2 {
            // A record is at least a key (three fields) and a length: 16 bytes.
            for _ in 0..r.count_of(16)? {
                let from = take_key(&mut r)?;
                journal.push(JournalRecord {
                    from,
                    bytes: r.bytes(JOURNAL_RECORD_MAX)?,
                });
            }
        }
        r.end()?;
        let [lost, done] = sets;
        let known = |k: &NodeKey| {
            nodes
                .iter()
                .any(|n| (n.role.as_str(), n.dc, n.rank) == (k.role.as_str(), k.dc, k.rank))
        };
        if let Some(k) = incarnations
            .keys()
            .chain(&lost)
            .chain(&done)
            .find(|k| !known(k))
        {
            return Err(NetError::Protocol(format!(
                "coordinator snapshot names {k}, which is not in its membership table"
            )));
        }
        Ok(CoordSnapshot {
            protocol_version,
            config_hash,
            nodes,
            incarnations,
            lost,
            done,
            journal,
        })
    }
}
