//! The figures of `geomx bench e2e`: one [`ScenarioResult`] per scenario, the speed-up over the
//! flat baseline, and the markdown table of `results.md`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::scenario::{MatrixParams, ScenarioId};
use crate::config::ShardStrategy;
use crate::hips::worker::Progress;
use crate::wanlab::delay::Lateness;

/// How a scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Ran all its rounds and reached the target accuracy.
    Reached,
    /// Ran all its rounds without reaching the target accuracy.
    NotReached,
    /// Stopped at the wall-time cap (no final report; figures from its progress lines).
    Capped,
    /// The cluster failed.
    Failed,
    /// The configuration is not supported by this build (the validator's message is the note).
    Unavailable,
}

impl Status {
    /// A short word for the table.
    pub fn label(self) -> &'static str {
        match self {
            Status::Reached => "reached",
            Status::NotReached => "not reached",
            Status::Capped => "wall cap",
            Status::Failed => "failed",
            Status::Unavailable => "unavailable",
        }
    }
}

/// The figures of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The scenario.
    pub id: ScenarioId,
    /// Its row title.
    pub title: String,
    /// How it ended.
    pub status: Status,
    /// Why it failed, was capped or is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Wall seconds (from the reporting worker's start) to the first evaluation at or above the
    /// target accuracy.
    pub time_to_target_s: Option<f64>,
    /// Test accuracy at the end (or at the last evaluation before the cap).
    pub final_accuracy: Option<f64>,
    /// Rounds run (configured rounds when it finished; the last evaluated round when capped).
    pub rounds: u64,
    /// Wall seconds of the whole launch (first spawn to last exit), or until the cap.
    pub wall_seconds: Option<f64>,
    /// WAN bytes, sent + received at the local servers' client sockets.
    pub wan_bytes: Option<u64>,
    /// `wan_bytes` per round.
    pub wan_bytes_per_round: Option<f64>,
    /// Time to target of the flat baseline divided by this scenario's.
    pub speedup: Option<f64>,
    /// Final accuracy minus the flat baseline's, in percentage points.
    pub accuracy_delta_points: Option<f64>,
    /// The lab mode the launch reported (`netns`, `userspace-relay`, `off`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan_mode: Option<String>,
    /// The netns lab's delay-relay lateness during the run (`degraded` when its p99 exceeded
    /// 1 ms: the emulated WAN delay was not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_lateness: Option<Lateness>,
    /// The workers' samples per second and where their rounds went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<crate::hips::throughput::MeanSplit>,
    /// Where each role's round went (the job report's `role_splits`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub role_splits: Vec<crate::hips::time_split::RoleSplitRow>,
    /// The test evaluations of the reporting worker.
    pub progress: Vec<Progress>,
    /// The configuration it ran (as JSON).
    pub config: serde_json::Value,
}

impl ScenarioResult {
    /// A scenario that did not run, with the reason (on one line).
    pub fn unavailable(id: ScenarioId, note: &str) -> Self {
        Self::empty(
            id,
            Status::Unavailable,
            Some(one_line(note)),
            serde_json::Value::Null,
        )
    }

    /// A result with no figures yet.
    pub fn empty(
        id: ScenarioId,
        status: Status,
        note: Option<String>,
        config: serde_json::Value,
    ) -> Self {
        Self {
            id,
            title: id.title().into(),
            status,
            note,
            time_to_target_s: None,
            final_accuracy: None,
            rounds: 0,
            wall_seconds: None,
            wan_bytes: None,
            wan_bytes_per_round: None,
            speedup: None,
            accuracy_delta_points: None,
            wan_mode: None,
            relay_lateness: None,
            workers: None,
            role_splits: Vec::new(),
            progress: Vec::new(),
            config,
        }
    }
}

/// `text` with every run of whitespace (newlines included) replaced by one space, so that a
/// multi-line message fits a markdown list item.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct E2eResults {
    /// The command line that produced it.
    pub command: String,
    /// The lab mode(s) the scenarios ran in, as the launches reported them.
    pub lab_mode: String,
    /// Model parameters (f32 elements).
    pub model_params: usize,
    /// The shared settings (model, data, rounds, target, WAN).
    pub params: MatrixParams,
    /// Wall seconds of the whole matrix.
    pub total_wall_s: f64,
    /// One entry per scenario, in table order.
    pub scenarios: Vec<ScenarioResult>,
}

/// Fills `speedup` and `accuracy_delta_points` of every scenario against the flat baseline: the
/// speed-up is the baseline's time to target over the scenario's, so it exists only when both
/// reached the target.
pub fn apply_baseline(results: &mut [ScenarioResult]) {
    let base = results
        .iter()
        .find(|r| r.id == ScenarioId::Flat)
        .map(|r| (r.time_to_target_s, r.final_accuracy));
    let (base_t, base_acc) = base.unwrap_or((None, None));
    for r in results.iter_mut() {
        r.speedup = match (base_t, r.time_to_target_s) {
            (Some(b), Some(t)) if t > 0.0 => Some(b / t),
            _ => None,
        };
        r.accuracy_delta_points = match (base_acc, r.final_accuracy) {
            (Some(b), Some(a)) => Some((a - b) * 100.0),
            _ => None,
        };
    }
}

/// `1234567` → `1,234,567`.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in the largest fitting decimal unit (`8.96 MB`).
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

/// How the split reads in the settings line.
fn split_words(split: ShardStrategy) -> &'static str {
    match split {
        ShardStrategy::ByClass => "non-IID: split by class, each data center holds its own digits",
        ShardStrategy::Iid => "IID split: every worker sees every digit",
    }
}

/// The table of where each role's round went, for the scenarios whose report had one.
fn role_table(s: &mut String, r: &E2eResults) {
    let rows: Vec<_> = r
        .scenarios
        .iter()
        .flat_map(|x| x.role_splits.iter().map(move |row| (x, row)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nWhere each role's round went (ms per training round, mean over the role's processes; \
         docs/benchmarks.md, \"Where each role's round went\"). Workers: compute includes \
         writing the replies into the replica, LAN wait is waiting for the local server (its \
         WAN wait included), idle is waiting for batches and the rest. Servers count as \
         processes, in the most telling phase of any of their threads: WAN wait while one waits \
         on the WAN, else codec and compute while one handles a round, else idle while one hands \
         replies on, else waiting for their peers (a local server's workers: LAN wait; a global \
         server's DCs: WAN wait).\n"
    );
    let _ = writeln!(
        s,
        "| Scenario | Role | Compute | Codec | LAN wait | WAN wait | Idle | Round |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for (x, row) in rows {
        let p = &row.split;
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            x.title,
            row.role.replace('_', " "),
            row.processes,
            p.compute_ms,
            p.codec_ms,
            p.lan_wait_ms,
            p.wan_wait_ms,
            p.idle_ms,
            p.total_ms()
        );
    }
}

/// The markdown of `results.md`: settings, the table, notes, and the plots.
pub fn render_markdown(r: &E2eResults) -> String {
    let p = &r.params;
    let target_pct = p.target_accuracy * 100.0;
    let mut s = String::new();
    let _ = writeln!(s, "# geomx bench e2e\n");
    let _ = writeln!(s, "Command: `{}`\n", r.command);
    let hidden: Vec<String> = p.hidden.iter().map(|h| h.to_string()).collect();
    let _ = writeln!(
        s,
        "Lab mode: **{}**; WAN per data center: {} Mbit/s each way, {} ms one way, loss {}; TCP \
         congestion control {}. \
         {} DCs × {} workers, MLP 64-{}-10 ({} parameters, {} per dense copy) on the UCI digits \
         ({}), batch {} per worker, SGD lr {} momentum 0.9, {} rounds (HFA k1 = {}, k2 = {}), test \
         evaluation every {} rounds; target {:.1} % test accuracy; cap {} s per scenario. \
         Whole matrix: {:.0} s.\n",
        r.lab_mode,
        p.wan.rate_mbit,
        p.wan.delay_ms,
        p.wan.loss,
        p.congestion.as_deref().unwrap_or("the system's default"),
        p.data_centers,
        p.workers_per_dc,
        hidden.join("-"),
        grouped(r.model_params as u64),
        human_bytes(r.model_params as f64 * 4.0),
        split_words(p.split),
        p.batch_size,
        p.lr,
        p.rounds,
        p.hfa_k1,
        p.hfa_k2,
        p.eval_every,
        target_pct,
        p.cap_s,
        r.total_wall_s,
    );
    let degraded: Vec<&str> = r
        .scenarios
        .iter()
        .filter(|x| x.relay_lateness.is_some_and(|l| l.degraded))
        .map(|x| x.title.as_str())
        .collect();
    if !degraded.is_empty() {
        let _ = writeln!(
            s,
            "**DEGRADED:** the delay relay's p99 lateness exceeded 1 ms in {}: those rows saw \
             more WAN delay than configured.\n",
            degraded.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "| Scenario | Time to {target_pct:.1} % (s) | Speed-up vs flat | Final accuracy | Δ vs flat (points) | WAN bytes | WAN bytes / round | Rounds | Wall (s) | Relay lateness | Status |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for x in r
        .scenarios
        .iter()
        // Scenarios that did not run (unavailable) or failed appear under the notes only.
        .filter(|x| !matches!(x.status, Status::Unavailable | Status::Failed))
    {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.title,
            opt(x.time_to_target_s, |t| format!("{t:.1}")),
            opt(x.speedup, |v| format!("{v:.1}×")),
            opt(x.final_accuracy, |a| format!("{a:.4}")),
            opt(x.accuracy_delta_points, |d| format!("{d:+.2}")),
            opt(x.wan_bytes, grouped),
            opt(x.wan_bytes_per_round, human_bytes),
            x.rounds,
            opt(x.wall_seconds, |w| format!("{w:.1}")),
            opt(x.relay_lateness, |l| l.mark()),
            x.status.label(),
        );
    }
    let split: Vec<_> = r
        .scenarios
        .iter()
        .filter_map(|x| x.workers.map(|w| (x, w)))
        .collect();
    if !split.is_empty() {
        let _ = writeln!(
            s,
            "\nWhere a worker's round went (ms per round, mean over the workers; samples per \
             second of all workers together). Compute is forward and backward (HFA, ESync: the \
             local steps); wait is waiting for the replies (HFA, ESync: the averaging); apply is \
             writing them into the replica; codec is encoding the pushes and decoding the \
             replies; copy is moving parameters, gradients and batches between the host and the \
             model's tensors.\n"
        );
        let _ = writeln!(
            s,
            "| Scenario | Samples/s | Data | Compute | Codec | Copy | Wait | Apply | Other |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (x, w) in split {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                x.title,
                w.samples_per_s,
                w.split.data_ms,
                w.split.compute_ms,
                w.split.codec_ms,
                w.split.copy_ms,
                w.split.wait_ms,
                w.split.apply_ms,
                w.split.other_ms
            );
        }
    }
    role_table(&mut s, r);
    let notes: Vec<&ScenarioResult> = r.scenarios.iter().filter(|x| x.note.is_some()).collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for x in notes {
            let _ = writeln!(
                s,
                "- {} ({}): {}",
                x.title,
                x.status.label(),
                x.note.as_deref().unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        s,
        "\nTimes are wall seconds from the reporting worker's start to its first test evaluation \
         at or above the target (so they resolve to {} rounds), not counting the time it spent \
         evaluating. WAN bytes are counted at the local \
         servers' sockets (headers included); the flat baseline's \"local servers\" are one \
         pass-through per worker, so its WAN bytes are every worker's own traffic. Relay \
         lateness is how late the netns lab's delay relay released packets (p99 and max; \
         \"DEGRADED\" when p99 > 1 ms); \"—\" where no delay relay ran.\n",
        p.eval_every
    );
    let _ = writeln!(s, "![test accuracy vs wall time](accuracy.png)\n");
    let _ = writeln!(s, "![WAN bytes per round](wan_bytes.png)");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(id: ScenarioId, t: Option<f64>, acc: Option<f64>) -> ScenarioResult {
        let mut r = ScenarioResult::empty(id, Status::Reached, None, serde_json::Value::Null);
        r.time_to_target_s = t;
        r.final_accuracy = acc;
        r
    }

    #[test]
    fn speedup_is_baseline_time_over_scenario_time() {
        let mut v = vec![
            res(ScenarioId::Flat, Some(60.0), Some(0.97)),
            res(ScenarioId::Hips, Some(30.0), Some(0.965)),
            res(ScenarioId::HipsBisparse, Some(2.5), Some(0.98)),
            res(ScenarioId::Hfa, None, Some(0.90)),
        ];
        apply_baseline(&mut v);
        assert_eq!(v[0].speedup, Some(1.0));
        assert_eq!(v[1].speedup, Some(2.0));
        assert_eq!(v[2].speedup, Some(24.0));
        assert_eq!(v[3].speedup, None, "did not reach the target");
        let d: Vec<f64> = v.iter().map(|r| r.accuracy_delta_points.unwrap()).collect();
        for (got, want) in d.iter().zip([0.0, -0.5, 1.0, -7.0]) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
    }

    #[test]
    fn no_speedup_without_a_baseline_time() {
        let mut v = vec![
            res(ScenarioId::Flat, None, Some(0.9)),
            res(ScenarioId::Hips, Some(3.0), Some(0.96)),
        ];
        apply_baseline(&mut v);
        assert!(v.iter().all(|r| r.speedup.is_none()));
        let mut w = vec![res(ScenarioId::Hips, Some(3.0), Some(0.96))];
        apply_baseline(&mut w);
        assert_eq!(w[0].speedup, None);
        assert_eq!(w[0].accuracy_delta_points, None);
    }

    #[test]
    fn number_formats() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(3_604_780_976), "3,604,780,976");
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(8_962_088.0), "8.96 MB");
        assert_eq!(human_bytes(1.5e9), "1.50 GB");
    }

    #[test]
    fn markdown_has_one_row_per_run_scenario_and_notes() {
        let mut v = vec![
            res(ScenarioId::Flat, Some(60.0), Some(0.97)),
            res(ScenarioId::HipsBisparse, Some(2.5), Some(0.98)),
            ScenarioResult::unavailable(ScenarioId::Dgt, "transport.inter:\n   | unknown"),
            ScenarioResult::empty(
                ScenarioId::Mixed,
                Status::Failed,
                Some("launch exit code 1".into()),
                serde_json::Value::Null,
            ),
        ];
        v[1].wan_bytes = Some(1_234_567);
        v[1].wan_bytes_per_round = Some(26_082.0);
        v[1].workers = Some(crate::hips::throughput::MeanSplit {
            samples_per_s: 1000.0,
            split: crate::hips::throughput::RoundMs {
                data_ms: 0.1,
                compute_ms: 5.0,
                wait_ms: 2.5,
                apply_ms: 0.4,
                codec_ms: 0.3,
                copy_ms: 0.2,
                other_ms: 0.05,
            },
        });
        let split = crate::hips::time_split::RoleSplit {
            rounds: 120,
            compute_ms: 5.4,
            codec_ms: 0.3,
            lan_wait_ms: 2.5,
            wan_wait_ms: 0.0,
            idle_ms: 0.15,
        };
        v[1].role_splits = vec![
            crate::hips::time_split::RoleSplitRow {
                role: "worker".into(),
                processes: 4,
                split,
            },
            crate::hips::time_split::RoleSplitRow {
                role: "local_server".into(),
                processes: 2,
                split: crate::hips::time_split::RoleSplit {
                    compute_ms: 0.1,
                    codec_ms: 0.2,
                    lan_wait_ms: 5.0,
                    wan_wait_ms: 3.0,
                    idle_ms: 0.05,
                    ..split
                },
            },
        ];
        v[1].rounds = 120;
        let lateness = |p99: f64, max: f64| Lateness {
            packets: 10,
            p50_lateness_us: 50.0,
            p99_lateness_us: p99,
            max_lateness_us: max,
            realtime: true,
            keep_awake: true,
            napi_thread: true,
            degraded: p99 > 1000.0,
        };
        v[0].relay_lateness = Some(lateness(1050.0, 7000.0));
        v[1].relay_lateness = Some(lateness(250.0, 900.0));
        apply_baseline(&mut v);
        let r = E2eResults {
            command: "geomx bench e2e --quick".into(),
            lab_mode: "netns".into(),
            model_params: 19_210,
            params: MatrixParams::quick(),
            total_wall_s: 42.0,
            scenarios: v,
        };
        let md = render_markdown(&r);
        assert!(md.contains("Command: `geomx bench e2e --quick`"));
        assert!(md.contains("Lab mode: **netns**"));
        assert!(md.contains("| Scenario | Time to 90.0 % (s) |"));
        // The first table: the header line and the rows after its separator.
        let rows: Vec<&str> = md
            .lines()
            .skip_while(|l| !l.starts_with("| Scenario"))
            .take_while(|l| l.starts_with('|'))
            .filter(|l| l.starts_with("| "))
            .collect();
        assert_eq!(rows.len(), 3, "header + 2 run scenarios: {rows:?}");
        assert_eq!(
            rows[2],
            "| HiPS + Bi-Sparse | 2.5 | 24.0× | 0.9800 | +1.00 | 1,234,567 | 26.08 kB | 120 | — | p99 0.25 ms, max 0.9 ms | reached |"
        );
        assert!(
            rows[1].contains("| DEGRADED: p99 1.05 ms, max 7.0 ms |"),
            "{}",
            rows[1]
        );
        assert!(
            md.contains("**DEGRADED:** the delay relay's p99 lateness exceeded 1 ms in Flat PS"),
            "{md}"
        );
        assert!(md.contains("- HiPS + DGT (unavailable): transport.inter: | unknown\n"));
        assert!(md.contains("- MixedSync (DC-ASGD) (failed): launch exit code 1\n"));
        assert!(md.contains("![test accuracy vs wall time](accuracy.png)"));
        // Every row of the first table has the header's number of cells.
        let cells = |l: &str| l.matches('|').count();
        assert!(md
            .lines()
            .skip_while(|l| !l.starts_with("| Scenario"))
            .take_while(|l| l.starts_with('|'))
            .all(|l| cells(l) == cells(rows[0])));
        // The split table: one row per scenario that reported its workers.
        let split: Vec<&str> = md
            .lines()
            .skip_while(|l| !l.starts_with("| Scenario | Samples/s"))
            .take_while(|l| l.starts_with('|'))
            .collect();
        assert_eq!(split.len(), 3, "header, separator, one row: {split:?}");
        assert_eq!(
            split[2],
            "| HiPS + Bi-Sparse | 1000 | 0.10 | 5.00 | 0.30 | 0.20 | 2.50 | 0.40 | 0.05 |"
        );
        // The role table: a row per role that reported, the round its parts add up to.
        let roles: Vec<&str> = md
            .lines()
            .skip_while(|l| !l.starts_with("| Scenario | Role"))
            .take_while(|l| l.starts_with('|'))
            .collect();
        assert_eq!(roles.len(), 4, "header, separator, two roles: {roles:?}");
        assert_eq!(
            roles[2],
            "| HiPS + Bi-Sparse | worker (4) | 5.40 | 0.30 | 2.50 | 0.00 | 0.15 | 8.35 |"
        );
        assert_eq!(
            roles[3],
            "| HiPS + Bi-Sparse | local server (2) | 0.10 | 0.20 | 5.00 | 3.00 | 0.05 | 8.35 |"
        );
    }

    #[test]
    fn results_round_trip_through_json() {
        let r = E2eResults {
            command: "c".into(),
            lab_mode: "off".into(),
            model_params: 1,
            params: MatrixParams::full(),
            total_wall_s: 1.0,
            scenarios: vec![res(ScenarioId::Mixed, Some(1.0), Some(0.5))],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"id\":\"mixed\""));
        assert_eq!(serde_json::from_str::<E2eResults>(&text).unwrap(), r);
    }
}
