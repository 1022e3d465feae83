//! The membership log of a local server: when each worker was lost and rejoined, and which
//! rounds closed with fewer than all of the DC's workers (issue 16's round log).
//!
//! A round that is not listed summed every worker of the DC. With the log, a single process can
//! replay the job ([`replay`]) and must reach the same θ bit for
//! bit.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::lock;

/// What happened to a worker's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberChange {
    /// Its connection to the local server closed or went silent: it no longer counts.
    Lost,
    /// It registered again and counts from `round` on.
    Rejoined,
}

/// One change of a worker's membership, seen by its local server (or of a local server's, seen
/// by a global server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEvent {
    /// Role of the process: `worker` or `local_server`.
    #[serde(default = "worker_role")]
    pub role: String,
    /// Data center.
    pub dc: u32,
    /// Worker rank.
    pub rank: u32,
    /// Lost or rejoined.
    pub change: MemberChange,
    /// Lost: the highest round any key collected then. Rejoined: the first round it counts in.
    /// Training rounds (under HFA, a multiple of k1).
    pub round: u64,
    /// Wall-clock time of the change, milliseconds since the Unix epoch (the launcher compares
    /// it with the time it saw the process die).
    pub unix_ms: u64,
    /// Why (the connection's error), for a loss.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The process that logged it (`local_server (dc 1, rank 0)`; empty for the coordinator).
    /// A global server is seen by every DC's local server, each at its own round: a loss and
    /// the rejoin that ends it are the same observer's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub seen_by: String,
}

/// Consecutive rounds of one DC's key that summed the same subset of its workers (exchanges
/// with the local server: under HFA, local averagings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialRound {
    /// Data center.
    pub dc: u32,
    /// Key (a tensor: elastic membership runs without P3 slicing).
    pub key: u32,
    /// First round.
    pub from: u64,
    /// One past the last round.
    pub to: u64,
    /// The ranks summed in each of these rounds, ascending.
    pub ranks: Vec<u32>,
}

impl PartialRound {
    /// Whether these rounds cover (`dc`, `key`, `round`); then `Some(rank counted)`.
    pub fn counts(&self, dc: usize, rank: usize, key: usize, round: u64) -> Option<bool> {
        (self.dc as usize == dc
            && self.key as usize == key
            && (self.from..self.to).contains(&round))
        .then(|| self.ranks.contains(&(rank as u32)))
    }
}

/// One entry of a round log as it travels to the coordinator's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogItem {
    /// Round `round` of (`dc`, `key`) summed only `ranks`.
    Summed {
        /// Data center.
        dc: u32,
        /// Key.
        key: u32,
        /// Round.
        round: u64,
        /// The ranks summed, ascending.
        ranks: Vec<u32>,
    },
    /// A membership change.
    Event(MemberEvent),
}

/// The round log the coordinator assembled from its journal (its report entry): every partial
/// round and membership change its members logged, whichever of them died since.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JournalLog {
    /// Partial rounds, as runs in round order.
    pub partial_rounds: Vec<PartialRound>,
    /// Membership changes, in the order they arrived.
    pub member_events: Vec<MemberEvent>,
    /// Journal records (batches) received.
    pub records: u64,
    /// Records the journal refused or that did not decode: when non-zero the log is incomplete.
    pub lost_records: u64,
}

impl JournalLog {
    /// Builds the log from `items` (in arrival order; repeats, as members send their entries
    /// again after reattaching, count once; a round two servers logged counts the ranks both
    /// logged).
    pub fn from_items(items: impl IntoIterator<Item = LogItem>) -> Self {
        let mut seen = std::collections::HashSet::new();
        let mut rounds: std::collections::BTreeMap<(u32, u32, u64), Vec<u32>> = Default::default();
        let mut out = JournalLog::default();
        for item in items {
            let key = serde_json::to_string(&item).unwrap_or_default();
            if !seen.insert(key) {
                continue;
            }
            match item {
                LogItem::Summed {
                    dc,
                    key,
                    round,
                    ranks,
                } => {
                    // Two servers logged the round (a local server its workers, a global
                    // server the DC left out): only the ranks both counted reached θ.
                    rounds
                        .entry((dc, key, round))
                        .and_modify(|r| r.retain(|x| ranks.contains(x)))
                        .or_insert(ranks);
                }
                LogItem::Event(e) => out.member_events.push(e),
            }
        }
        for ((dc, key, round), ranks) in rounds {
            match out.partial_rounds.last_mut() {
                Some(p) if (p.dc, p.key, p.to) == (dc, key, round) && p.ranks == ranks => p.to += 1,
                _ => out.partial_rounds.push(PartialRound {
                    dc,
                    key,
                    from: round,
                    to: round + 1,
                    ranks,
                }),
            }
        }
        out.partial_rounds.sort_by_key(|p| (p.from, p.dc, p.key));
        out
    }
}

/// Replays a job that lost processes on one machine ([`fsa_reference_with`] for FSA,
/// [`hfa_reference_with`] for HFA) from the partial rounds its servers logged: every round
/// not listed summed every worker. Rounds are the servers' rounds: training rounds under FSA,
/// local averagings under HFA.
pub fn replay(
    cfg: &crate::config::Config,
    data: &crate::data::TrainTest,
    rounds: u64,
    partial: &[PartialRound],
) -> Result<crate::engine::reference::ReferenceRun, crate::engine::reference::ReferenceError> {
    let counts = |dc, rank, t, r| {
        partial
            .iter()
            .find_map(|p| p.counts(dc, rank, t, r))
            .unwrap_or(true)
    };
    match cfg.sync.algorithm {
        crate::config::SyncAlgorithm::Fsa => {
            crate::engine::reference::fsa_reference_with(cfg, data, Some(rounds), counts)
        }
        crate::config::SyncAlgorithm::Hfa => {
            crate::engine::reference_hfa::hfa_reference_with(cfg, data, Some(rounds), counts)
        }
        other => Err(crate::engine::reference::ReferenceError::Unsupported(
            format!("no replay of sync.algorithm {other:?}"),
        )),
    }
}

#[cfg(doc)]
use crate::engine::{reference::fsa_reference_with, reference_hfa::hfa_reference_with};

fn worker_role() -> String {
    super::plan::roles::WORKER.to_string()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A local server's log (shared by its request handler and uplinks).
#[derive(Debug, Default)]
pub struct RoundLog {
    events: Mutex<Vec<MemberEvent>>,
    partial: Mutex<Vec<PartialRound>>,
    /// Where each entry also goes: the coordinator's journal ([`super::journal`]).
    journal: std::sync::OnceLock<super::journal::JournalTx>,
    /// The process keeping it ([`MemberEvent::seen_by`]).
    owner: String,
}

impl RoundLog {
    /// The log of process `owner`.
    pub fn of(owner: &super::node::Identity) -> Self {
        Self {
            owner: owner.to_string(),
            ..Self::default()
        }
    }

    /// Records a membership change of a worker now.
    pub fn change(&self, dc: u32, rank: u32, change: MemberChange, round: u64, reason: String) {
        self.change_of(super::plan::roles::WORKER, dc, rank, change, round, reason);
    }

    /// Records a membership change of a process of `role` now.
    pub fn change_of(
        &self,
        role: &str,
        dc: u32,
        rank: u32,
        change: MemberChange,
        round: u64,
        reason: String,
    ) {
        tracing::warn!(role, dc, rank, ?change, round, %reason, "membership changed");
        let e = MemberEvent {
            role: role.to_string(),
            dc,
            rank,
            change,
            round,
            unix_ms: unix_ms(),
            reason,
            seen_by: self.owner.clone(),
        };
        if let Some(j) = self.journal.get() {
            j.send(LogItem::Event(e.clone()));
        }
        lock(&self.events).push(e);
    }

    /// Every entry so far, and from now on every new one, also goes to the coordinator's
    /// journal through `tx`.
    pub fn attach_journal(&self, tx: super::journal::JournalTx) {
        let events = lock(&self.events);
        let partial = lock(&self.partial);
        for e in events.iter() {
            tx.send(LogItem::Event(e.clone()));
        }
        for p in partial.iter() {
            for round in p.from..p.to {
                tx.send(LogItem::Summed {
                    dc: p.dc,
                    key: p.key,
                    round,
                    ranks: p.ranks.clone(),
                });
            }
        }
        let _ = self.journal.set(tx);
    }

    /// Waits (up to `wait`) until every entry so far is in the coordinator's journal.
    pub fn flush_journal(&self, wait: std::time::Duration) {
        if let Some(j) = self.journal.get() {
            j.flush(wait);
        }
    }

    /// Records the ranks of a round of `key` unless they are all `n_workers` (extending the
    /// key's last entry when it ended at `round` with the same ranks).
    pub fn summed(&self, dc: u32, key: usize, round: u64, ranks: &[u32], n_workers: usize) {
        if ranks.len() >= n_workers {
            return;
        }
        if let Some(j) = self.journal.get() {
            j.send(LogItem::Summed {
                dc,
                key: key as u32,
                round,
                ranks: ranks.to_vec(),
            });
        }
        let mut partial = lock(&self.partial);
        let key = key as u32;
        let last = partial
            .iter_mut()
            .rev()
            .find(|p| p.dc == dc && p.key == key);
        match last {
            Some(p) if p.to == round && p.ranks == ranks => p.to += 1,
            _ => partial.push(PartialRound {
                dc,
                key,
                from: round,
                to: round + 1,
                ranks: ranks.to_vec(),
            }),
        }
    }

    /// The events and partial rounds so far.
    pub fn snapshot(&self) -> (Vec<MemberEvent>, Vec<PartialRound>) {
        let mut partial = lock(&self.partial).clone();
        partial.sort_by_key(|p| (p.from, p.key));
        (lock(&self.events).clone(), partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinators_log_merges_rounds_into_runs_and_counts_repeats_once() {
        let s = |key, round, ranks: &[u32]| LogItem::Summed {
            dc: 1,
            key,
            round,
            ranks: ranks.to_vec(),
        };
        let e = MemberEvent {
            role: "worker".into(),
            dc: 1,
            rank: 0,
            change: MemberChange::Lost,
            round: 6,
            unix_ms: 9,
            reason: String::new(),
            seen_by: String::new(),
        };
        let items = vec![
            LogItem::Event(e.clone()),
            s(0, 6, &[1]),
            s(1, 6, &[1]),
            s(0, 7, &[1]),
            // Sent again after a reattach.
            LogItem::Event(e.clone()),
            s(0, 6, &[1]),
            s(0, 9, &[0]),
            // The global tier left the DC out of key 1's round 6.
            s(1, 6, &[]),
        ];
        let log = JournalLog::from_items(items);
        assert_eq!(log.member_events, vec![e]);
        assert_eq!(
            log.partial_rounds
                .iter()
                .map(|p| (p.key, p.from, p.to, p.ranks.clone()))
                .collect::<Vec<_>>(),
            vec![(0, 6, 8, vec![1]), (1, 6, 7, vec![]), (0, 9, 10, vec![0])]
        );
    }

    #[test]
    fn only_partial_rounds_are_logged_as_runs_in_round_order() {
        let log = RoundLog::default();
        log.summed(1, 0, 5, &[0, 1], 2);
        log.summed(1, 1, 7, &[1], 2);
        log.summed(1, 0, 6, &[0], 2);
        log.summed(1, 0, 7, &[0], 2);
        log.summed(1, 1, 8, &[1], 2);
        log.summed(1, 1, 9, &[0], 2);
        log.change(1, 0, MemberChange::Lost, 6, "reset".into());
        let (events, partial) = log.snapshot();
        assert_eq!(events.len(), 1);
        assert!(events[0].unix_ms > 0);
        assert_eq!(
            partial
                .iter()
                .map(|p| (p.key, p.from, p.to, p.ranks.clone()))
                .collect::<Vec<_>>(),
            vec![(0, 6, 8, vec![0]), (1, 7, 9, vec![1]), (1, 9, 10, vec![0])]
        );
        assert_eq!(partial[0].counts(1, 1, 0, 7), Some(false));
        assert_eq!(partial[0].counts(1, 0, 0, 7), Some(true));
        assert_eq!(partial[0].counts(1, 1, 0, 8), None);
        assert_eq!(partial[0].counts(0, 1, 0, 7), None);
    }

    #[test]
    fn a_replay_without_partial_rounds_is_the_reference_and_with_them_differs() {
        let mut cfg = crate::config::Config::default();
        cfg.model.hidden = vec![8];
        let data = crate::data::load(&cfg.data).unwrap();
        let full = crate::engine::reference::fsa_reference(&cfg, &data, Some(6)).unwrap();
        let same = replay(&cfg, &data, 6, &[]).unwrap();
        assert_eq!(full.params, same.params);
        let lost = PartialRound {
            dc: 1,
            key: 0,
            from: 2,
            to: 4,
            ranks: vec![1],
        };
        let other = replay(&cfg, &data, 6, &[lost]).unwrap();
        assert_ne!(full.params[0], other.params[0]);
    }
}
