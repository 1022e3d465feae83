//! The JSON run report of `geomx launch --report PATH`, assembled from the processes' final stats.

use serde::{Deserialize, Serialize};

use crate::hips::plan::roles;
use crate::hips::worker::Progress;
use crate::hips::RoleStats;

/// Summary of one launched run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Test accuracy after the last round (worker dc 0 rank 0).
    pub final_test_accuracy: f64,
    /// Training loss of that worker's last batch.
    pub final_loss: f64,
    /// Rounds run.
    pub rounds: u64,
    /// Wall-clock seconds from the first spawn to the last exit.
    pub wall_seconds: f64,
    /// Bytes on the inter-DC tier (local ↔ global servers), sent + received, counted once at the
    /// local servers' client sockets, headers and heartbeats included.
    pub wan_bytes: u64,
    /// Bytes inside the DCs (workers ↔ local server, and worker ↔ worker under TSEngine's intra
    /// tier), counted once at the receiving server sockets (the local servers', the workers').
    pub lan_bytes: u64,
    /// `wan_bytes` divided by the rounds run (0 without rounds).
    pub wan_bytes_per_round: f64,
    /// Inter-tier payload bytes (push + reply, frame headers excluded) by codec class: `f32`
    /// (dense f32), `fp16`, `bf16` (dense 16-bit) and `sparse` (top-k payloads and updates).
    pub codec_bytes: crate::codec::CodecBytes,
    /// Bytes to and from the coordinator (control plane), counted at its sockets.
    pub control_bytes: u64,
    /// Bytes through each global server's sockets, by global server rank.
    pub per_global_server_bytes: Vec<u64>,
    /// Parameter bytes each global server owns under the MultiGPS placement.
    pub per_global_server_param_bytes: Vec<u64>,
    /// FNV-1a hash of the final parameters (hex), as every worker computed it.
    pub param_hash: String,
    /// FNV-1a hash (hex) of the global servers' final θ, assembled in key order and hashed like
    /// `param_hash` (every local server pulls it at the end and reports its hash).
    #[serde(default)]
    pub global_param_hash: String,
    /// True when every worker and the global servers ended with the same parameters: all worker
    /// hashes equal, every local server saw the same global θ, and the two agree.
    pub replicas_identical: bool,
    /// Updates the global tier dropped under `train.nonfinite = "skip"`: (range, round) steps of
    /// the global servers (under MixedSync, (range, push)).
    #[serde(default)]
    pub skipped_updates: u64,
    /// Finite values that overflowed to ±inf in FP16 / BF16 encodings, by key, over all
    /// processes.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cast_overflows: std::collections::BTreeMap<u64, u64>,
    /// Progress lines (round, loss, test metrics).
    pub progress: Vec<Progress>,
    /// Each process's final stats.
    pub processes: Vec<RoleStats>,
    /// The resolved configuration.
    pub config: serde_json::Value,
    /// The WAN emulation the run had: `off`, `netns` or `userspace-relay` (wan-lab.md).
    #[serde(default = "default_wan_mode")]
    pub wan_mode: String,
    /// The lab's own figures (link settings, relay lateness, qdisc drop counters), when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan_lab: Option<serde_json::Value>,
    /// The checkpoint round the job resumed from (`--resume`), if it did: the lowest any
    /// process reports (all report the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_round: Option<u64>,
    /// Each worker's samples per second and step split, by data center and rank.
    #[serde(default)]
    pub workers: Vec<crate::hips::throughput::WorkerThroughput>,
    /// Training samples per second of all workers together.
    #[serde(default)]
    pub samples_per_s: f64,
    /// Where each role's round went (compute, codec, LAN wait, WAN wait, idle; ms per training
    /// round), the mean of the role's processes: workers, local servers, global servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub role_splits: Vec<crate::hips::time_split::RoleSplitRow>,
    /// Processes that failed while the job ran, when and how the job recovered
    /// (`[resilience]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<crate::launch::supervise::FaultRecord>,
    /// Restarts by role (`resilience.restart = "on-failure"`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub restarts: std::collections::BTreeMap<String, u32>,
    /// How `geomx launch` tuned `scheduling.p3.slice_elems = "auto"` before the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p3_tuning: Option<crate::launch::slices::SliceTuning>,
}

fn default_wan_mode() -> String {
    "off".into()
}

impl Report {
    /// Aggregates the processes' stats. `param_bytes` is the placement's per-server ownership.
    pub fn assemble(
        stats: Vec<RoleStats>,
        progress: Vec<Progress>,
        rounds: u64,
        wall_seconds: f64,
        param_bytes: Vec<u64>,
        config: serde_json::Value,
    ) -> Self {
        let sum = |role: &str, f: fn(&RoleStats) -> u64| -> u64 {
            stats.iter().filter(|s| s.role == role).map(f).sum()
        };
        // Workers serve only their DC's other workers (TSEngine's intra tier).
        let lan_bytes =
            sum(roles::LOCAL_SERVER, |s| s.served_bytes) + sum(roles::WORKER, |s| s.served_bytes);
        let wan_bytes = sum(roles::LOCAL_SERVER, |s| s.client_bytes);
        let control_bytes = sum(roles::COORDINATOR, |s| s.served_bytes);
        let mut codec_bytes = crate::codec::CodecBytes::new();
        for s in stats.iter().filter(|s| s.role == roles::LOCAL_SERVER) {
            for (k, v) in &s.codec_bytes {
                *codec_bytes.entry(k.clone()).or_default() += v;
            }
        }
        let mut per_global_server_bytes = vec![0; param_bytes.len()];
        for s in stats.iter().filter(|s| s.role == roles::GLOBAL_SERVER) {
            if let Some(slot) = per_global_server_bytes.get_mut(s.rank as usize) {
                *slot = s.served_bytes;
            }
        }
        let workers: Vec<&RoleStats> = stats.iter().filter(|s| s.role == roles::WORKER).collect();
        let hashes: Vec<u64> = workers.iter().filter_map(|s| s.param_hash).collect();
        let locals: Vec<&RoleStats> = stats
            .iter()
            .filter(|s| s.role == roles::LOCAL_SERVER)
            .collect();
        let globals: Vec<u64> = locals.iter().filter_map(|s| s.global_param_hash).collect();
        let all_equal = |h: &[u64]| !h.is_empty() && h.iter().all(|x| *x == h[0]);
        let replicas_identical = hashes.len() == workers.len()
            && globals.len() == locals.len()
            && all_equal(&hashes)
            && all_equal(&globals)
            && hashes[0] == globals[0];
        let mut cast_overflows = std::collections::BTreeMap::new();
        for s in &stats {
            for (k, n) in &s.cast_overflows {
                *cast_overflows.entry(*k).or_default() += n;
            }
        }
        let reporter = workers.iter().find(|s| s.dc == 0 && s.rank == 0);
        let mut throughput: Vec<_> = workers
            .iter()
            .filter_map(|s| s.throughput.clone())
            .collect();
        throughput.sort_by_key(|t| (t.dc, t.rank));
        let samples_per_s = throughput.iter().map(|t| t.samples_per_s).sum();
        let resumed_from_round = stats.iter().filter_map(|s| s.resumed_from_round).min();
        let role_splits = role_splits(&stats);
        Self {
            final_test_accuracy: reporter
                .and_then(|s| s.final_test_accuracy)
                .unwrap_or(f64::NAN),
            final_loss: reporter.and_then(|s| s.final_loss).unwrap_or(f64::NAN),
            rounds,
            wall_seconds,
            wan_bytes,
            lan_bytes,
            wan_bytes_per_round: if rounds > 0 {
                wan_bytes as f64 / rounds as f64
            } else {
                0.0
            },
            codec_bytes,
            control_bytes,
            per_global_server_bytes,
            per_global_server_param_bytes: param_bytes,
            param_hash: hashes
                .first()
                .map(|h| format!("{h:016x}"))
                .unwrap_or_default(),
            global_param_hash: globals
                .first()
                .map(|h| format!("{h:016x}"))
                .unwrap_or_default(),
            replicas_identical,
            skipped_updates: sum(roles::GLOBAL_SERVER, |s| s.skipped_updates),
            cast_overflows,
            progress,
            processes: stats,
            config,
            wan_mode: default_wan_mode(),
            wan_lab: None,
            resumed_from_round,
            workers: throughput,
            samples_per_s,
            role_splits,
            faults: Vec::new(),
            restarts: Default::default(),
            p3_tuning: None,
        }
    }

    /// The netns lab's delay-relay lateness, when the run had one.
    pub fn relay_lateness(&self) -> Option<crate::wanlab::delay::Lateness> {
        let relay = self.wan_lab.as_ref()?.get("delay_relay")?;
        serde_json::from_value(relay.clone()).ok()
    }

    /// Wall seconds (the progress lines' `elapsed_s`, measured from the reporting worker's start,
    /// its test evaluations left out) at the first progress line whose test accuracy reached `target`; `None` if none did.
    pub fn time_to_accuracy(&self, target: f64) -> Option<f64> {
        self.progress
            .iter()
            .filter(|p| p.test_accuracy >= target)
            .min_by_key(|p| p.round)
            .map(|p| p.elapsed_s)
    }
}

/// The mean split of each data-plane role's processes that reported one, in tier order.
fn role_splits(stats: &[RoleStats]) -> Vec<crate::hips::time_split::RoleSplitRow> {
    use crate::hips::time_split::{RoleSplit, RoleSplitRow};
    [roles::WORKER, roles::LOCAL_SERVER, roles::GLOBAL_SERVER]
        .into_iter()
        .filter_map(|role| {
            let splits: Vec<RoleSplit> = stats
                .iter()
                .filter(|s| s.role == role)
                .filter_map(|s| s.split)
                .collect();
            RoleSplit::mean(&splits).map(|split| RoleSplitRow {
                role: role.to_string(),
                processes: splits.len(),
                split,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(
        role: &str,
        dc: u32,
        rank: u32,
        served: u64,
        client: u64,
        hash: Option<u64>,
    ) -> RoleStats {
        let worker = role == roles::WORKER;
        RoleStats {
            role: role.into(),
            dc,
            rank,
            served_bytes: served,
            client_bytes: client,
            param_hash: hash.filter(|_| worker),
            final_loss: hash.filter(|_| worker).map(|_| 0.5),
            final_test_accuracy: (worker && dc == 0 && rank == 0 && hash.is_some()).then_some(0.9),
            global_param_hash: hash.filter(|_| role == roles::LOCAL_SERVER),
            codec_bytes: Default::default(),
            resyncs: 0,
            staleness: Vec::new(),
            resync_mismatches: 0,
            topk_fallbacks: 0,
            skipped_updates: 0,
            cast_overflows: Default::default(),
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

    #[test]
    fn role_splits_are_the_means_of_each_roles_processes_in_tier_order() {
        use crate::hips::time_split::RoleSplit;
        let split = |wan: f64| RoleSplit {
            rounds: 10,
            compute_ms: 1.0,
            codec_ms: 0.5,
            lan_wait_ms: 2.0,
            wan_wait_ms: wan,
            idle_ms: 0.0,
        };
        let mut stats = vec![
            st("global_server", 2, 0, 20, 0, None),
            st("local_server", 0, 0, 100, 25, Some(9)),
            st("local_server", 1, 0, 200, 25, Some(9)),
            st("worker", 0, 0, 0, 50, Some(9)),
            st("coordinator", 2, 0, 7, 0, None),
        ];
        stats[1].split = Some(split(4.0));
        stats[2].split = Some(split(8.0));
        stats[3].split = Some(split(0.0));
        let r = Report::assemble(stats, vec![], 10, 1.5, vec![8], serde_json::json!({}));
        let rows: Vec<_> = r
            .role_splits
            .iter()
            .map(|r| (r.role.as_str(), r.processes, r.split.wan_wait_ms))
            .collect();
        // No row for the global server, which reported none.
        assert_eq!(rows, vec![("worker", 1, 0.0), ("local_server", 2, 6.0)]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["role_splits"][1]["lan_wait_ms"].as_f64(), Some(2.0));
    }

    #[test]
    fn assembles_tiers_and_replica_check() {
        let stats = vec![
            st("coordinator", 2, 0, 7, 0, None),
            st("global_server", 2, 1, 30, 0, None),
            st("global_server", 2, 0, 20, 0, None),
            st("local_server", 0, 0, 100, 25, Some(9)),
            st("local_server", 1, 0, 200, 25, Some(9)),
            st("worker", 0, 0, 0, 50, Some(9)),
            // It served another worker of its DC (TSEngine's intra tier).
            st("worker", 1, 0, 40, 50, Some(9)),
        ];
        let r = Report::assemble(stats, vec![], 10, 1.5, vec![8, 8], serde_json::json!({}));
        assert_eq!(r.lan_bytes, 340);
        assert_eq!(r.wan_bytes, 50);
        assert_eq!(r.control_bytes, 7);
        assert_eq!(r.per_global_server_bytes, vec![20, 30]);
        assert!(r.replicas_identical);
        assert_eq!(r.param_hash, "0000000000000009");
        assert_eq!(r.global_param_hash, "0000000000000009");
        assert_eq!(r.final_test_accuracy, 0.9);
        let json = serde_json::to_value(&r).unwrap();
        for k in [
            "final_test_accuracy",
            "rounds",
            "wall_seconds",
            "wan_bytes",
            "lan_bytes",
            "per_global_server_bytes",
            "config",
        ] {
            assert!(json.get(k).is_some(), "{k}");
        }
    }

    fn line(round: u64, acc: f64, elapsed_s: f64) -> Progress {
        Progress {
            round,
            loss: 1.0,
            test_loss: 1.0,
            test_accuracy: acc,
            elapsed_s,
        }
    }

    #[test]
    fn time_to_accuracy_takes_the_first_line_reaching_the_target() {
        // Lines out of round order (as they might be collected): the earliest round counts.
        let progress = vec![
            line(30, 0.95, 3.0),
            line(10, 0.50, 1.0),
            line(20, 0.91, 2.0),
            line(40, 0.89, 4.0),
        ];
        let r = Report::assemble(vec![], progress, 40, 4.5, vec![], serde_json::Value::Null);
        assert_eq!(r.time_to_accuracy(0.9), Some(2.0));
        assert_eq!(r.time_to_accuracy(0.95), Some(3.0));
        assert_eq!(r.time_to_accuracy(0.5), Some(1.0));
        assert_eq!(r.time_to_accuracy(0.96), None);
        // Old progress lines without `elapsed_s` still parse (0 seconds).
        let old: Progress =
            serde_json::from_str(r#"{"round":1,"loss":1.0,"test_loss":1.0,"test_accuracy":0.5}"#)
                .unwrap();
        assert_eq!(old.elapsed_s, 0.0);
    }

    #[test]
    fn differing_or_missing_hashes_are_not_identical() {
        let local = |h| st("local_server", 0, 0, 0, 0, Some(h));
        let a = vec![
            local(1),
            st("worker", 0, 0, 0, 0, Some(1)),
            st("worker", 0, 1, 0, 0, Some(2)),
        ];
        assert!(
            !Report::assemble(a, vec![], 1, 0.0, vec![], serde_json::Value::Null)
                .replicas_identical
        );
        let b = vec![
            local(1),
            st("worker", 0, 0, 0, 0, Some(1)),
            st("worker", 0, 1, 0, 0, None),
        ];
        assert!(
            !Report::assemble(b, vec![], 1, 0.0, vec![], serde_json::Value::Null)
                .replicas_identical
        );
        // Workers agree with each other but not with the global θ.
        let c = vec![
            local(2),
            st("worker", 0, 0, 0, 0, Some(1)),
            st("worker", 0, 1, 0, 0, Some(1)),
        ];
        let r = Report::assemble(c, vec![], 1, 0.0, vec![], serde_json::Value::Null);
        assert!(!r.replicas_identical);
        assert_eq!(r.global_param_hash, "0000000000000002");
        // Two local servers that saw different global θ.
        let d = vec![
            local(1),
            st("local_server", 1, 0, 0, 0, Some(3)),
            st("worker", 0, 0, 0, 0, Some(1)),
        ];
        assert!(
            !Report::assemble(d, vec![], 1, 0.0, vec![], serde_json::Value::Null)
                .replicas_identical
        );
        // A local server without a global hash.
        let e = vec![
            st("local_server", 0, 0, 0, 0, None),
            st("worker", 0, 0, 0, 0, Some(1)),
        ];
        assert!(
            !Report::assemble(e, vec![], 1, 0.0, vec![], serde_json::Value::Null)
                .replicas_identical
        );
    }

    #[test]
    fn skips_and_overflows_are_summed() {
        let mut g0 = st("global_server", 2, 0, 0, 0, None);
        g0.skipped_updates = 2;
        g0.cast_overflows.insert(3, 4);
        let mut g1 = st("global_server", 2, 1, 0, 0, None);
        g1.skipped_updates = 1;
        let mut l = st("local_server", 0, 0, 0, 0, Some(1));
        l.skipped_updates = 5;
        l.cast_overflows.insert(3, 1);
        l.cast_overflows.insert(0, 7);
        let r = Report::assemble(
            vec![g0, g1, l],
            vec![],
            1,
            0.0,
            vec![0, 0],
            serde_json::Value::Null,
        );
        assert_eq!(r.skipped_updates, 3);
        assert_eq!(
            r.cast_overflows.into_iter().collect::<Vec<_>>(),
            vec![(0, 7), (3, 5)]
        );
    }
}
