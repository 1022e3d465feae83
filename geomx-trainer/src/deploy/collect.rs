//! `geomx deploy report`: the job report from what the processes printed.
//!
//! Every `geomx run` prints its final stats (and worker dc 0 rank 0 its progress) as marked lines
//! on stdout (`GEOMX_STATS {json}`, `GEOMX_PROGRESS {json}`). A scheduler collects those streams
//! (Slurm: the step's output file, with or without `--label` prefixes; Kubernetes: the pods'
//! logs); [`scan`] finds the marked lines anywhere in such text and [`assemble`] builds the same
//! report `geomx launch --report` writes.

use std::collections::BTreeSet;

use super::roles::RoleTable;
use super::DeployError;
use crate::config::Config;
use crate::hips::plan::roles;
use crate::hips::worker::Progress;
use crate::hips::RoleStats;
use crate::launch::lines;
use crate::report::Report;

/// The marked lines found in some output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Collected {
    /// Final stats, one per process that finished.
    pub stats: Vec<RoleStats>,
    /// Progress lines in the order found.
    pub progress: Vec<Progress>,
}

/// Finds the stats and progress lines in `text` (a marker may follow a prefix such as srun's
/// `3: `). A marked line that does not parse is an error naming `origin` and the line number.
pub fn scan(text: &str, origin: &str, into: &mut Collected) -> Result<(), DeployError> {
    for (n, line) in text.lines().enumerate() {
        let bad = |what: &str, e: serde_json::Error| {
            DeployError::Invalid(format!("{origin}:{}: unreadable {what} line ({e})", n + 1))
        };
        if let Some(i) = line.find(lines::STATS) {
            let s = serde_json::from_str(&line[i + lines::STATS.len()..])
                .map_err(|e| bad("stats", e))?;
            into.stats.push(s);
        } else if let Some(i) = line.find(lines::PROGRESS) {
            let p = serde_json::from_str(&line[i + lines::PROGRESS.len()..])
                .map_err(|e| bad("progress", e))?;
            into.progress.push(p);
        }
    }
    Ok(())
}

/// The registration name of a table task's role (stats carry these).
fn stats_role(role: crate::config::Role) -> &'static str {
    use crate::config::Role;
    match role {
        Role::Coordinator => roles::COORDINATOR,
        Role::GlobalServer => roles::GLOBAL_SERVER,
        Role::LocalServer => roles::LOCAL_SERVER,
        _ => roles::WORKER,
    }
}

/// Builds the report of the job `cfg` describes from `c`; `rounds` and `param_bytes` are the
/// job's (from its `JobSpec`). Errors when a process of the job did not report, or one reported
/// twice.
pub fn assemble(
    cfg: &Config,
    mut c: Collected,
    rounds: u64,
    param_bytes: Vec<u64>,
    wall_seconds: f64,
) -> Result<Report, DeployError> {
    let table = RoleTable::from_config(cfg);
    let key = |role: &str, dc: u32, rank: u32| (role.to_string(), dc, rank);
    let mut seen = BTreeSet::new();
    for s in &c.stats {
        // The coordinator reports with the dc and rank it was started with; key it by role only.
        let k = if s.role == roles::COORDINATOR {
            key(&s.role, 0, 0)
        } else {
            key(&s.role, s.dc, s.rank)
        };
        if !seen.insert(k) {
            return Err(DeployError::Invalid(format!(
                "{} (dc {}, rank {}) reported twice: the output holds more than one run",
                s.role, s.dc, s.rank
            )));
        }
    }
    let missing: Vec<String> = table
        .all()
        .into_iter()
        .filter(|t| {
            let role = stats_role(t.role);
            let k = if role == roles::COORDINATOR {
                key(role, 0, 0)
            } else {
                key(role, t.dc, t.rank)
            };
            !seen.contains(&k)
        })
        .map(|t| t.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(DeployError::Invalid(format!(
            "{} of {} processes reported no final stats: {}",
            missing.len(),
            table.len(),
            missing.join(", ")
        )));
    }
    c.progress.sort_by_key(|p| p.round);
    Ok(Report::assemble(
        c.stats,
        c.progress,
        rounds,
        wall_seconds,
        param_bytes,
        cfg.to_json(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One process's final-stats line; local servers also report the global
    /// copy they last received (`global_hash`).
    fn stats(role: &str, dc: u32, rank: u32, hash: Option<u64>) -> String {
        stats_with_global(role, dc, rank, hash, None)
    }

    fn stats_with_global(
        role: &str,
        dc: u32,
        rank: u32,
        hash: Option<u64>,
        global_hash: Option<u64>,
    ) -> String {
        format!(
            "{}{}",
            lines::STATS,
            serde_json::json!({
                "role": role, "dc": dc, "rank": rank, "served_bytes": 10, "client_bytes": 5,
                "param_hash": hash, "global_param_hash": global_hash, "final_loss": 0.5, "staleness": [],
                "final_test_accuracy": if role == "worker" && dc == 0 && rank == 0 { Some(0.9) } else { None },
                "codec_bytes": {}, "resyncs": 0, "resync_mismatches": 0, "topk_fallbacks": 0,
            })
        )
    }

    fn full_output(prefix: bool) -> String {
        full_output_with_globals(prefix, [0xabc, 0xabc])
    }

    fn full_output_with_globals(prefix: bool, globals: [u64; 2]) -> String {
        let mut lines_out = vec![
            stats("coordinator", 2, 0, None),
            stats("global_server", 2, 0, None),
        ];
        for dc in 0..2 {
            lines_out.push(stats_with_global(
                "local_server",
                dc,
                0,
                None,
                Some(globals[dc as usize]),
            ));
            for r in 0..2 {
                lines_out.push(stats("worker", dc, r, Some(0xabc)));
            }
        }
        lines_out.push(format!(
            "{}{}",
            lines::PROGRESS,
            r#"{"round":400,"loss":0.1,"test_loss":0.2,"test_accuracy":0.9}"#
        ));
        lines_out.push("some log line".into());
        lines_out
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if prefix {
                    format!("{i}: {l}")
                } else {
                    l.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_complete_run_makes_the_launch_report() {
        for prefix in [false, true] {
            let mut c = Collected::default();
            scan(&full_output(prefix), "job.log", &mut c).unwrap();
            assert_eq!((c.stats.len(), c.progress.len()), (8, 1));
            let r = assemble(&Config::default(), c, 400, vec![100], 1.5).unwrap();
            assert_eq!(r.param_hash, "0000000000000abc");
            assert!(r.replicas_identical);
            assert_eq!(r.rounds, 400);
            assert_eq!(r.final_test_accuracy, 0.9);
            assert_eq!(r.wan_bytes, 10);
        }
    }

    #[test]
    fn a_data_center_whose_global_copy_differs_breaks_replica_identity() {
        let mut c = Collected::default();
        scan(
            &full_output_with_globals(false, [0xabc, 0xabd]),
            "job.log",
            &mut c,
        )
        .unwrap();
        let r = assemble(&Config::default(), c, 400, vec![100], 1.5).unwrap();
        assert_eq!(r.param_hash, "0000000000000abc");
        assert!(!r.replicas_identical);
    }

    #[test]
    fn missing_and_doubled_processes_are_errors() {
        let text = full_output(false);
        let mut c = Collected::default();
        scan(&text, "x", &mut c).unwrap();
        c.stats
            .retain(|s| !(s.role == "worker" && s.dc == 1 && s.rank == 1));
        let e = assemble(&Config::default(), c, 400, vec![100], 1.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "1 of 8 processes reported no final stats: worker (dc 1, rank 1)"
        );
        let mut c = Collected::default();
        scan(&format!("{text}\n{text}"), "x", &mut c).unwrap();
        let e = assemble(&Config::default(), c, 400, vec![100], 1.0).unwrap_err();
        assert!(e.to_string().contains("reported twice"), "{e}");
        let e = scan(
            &format!("ok\n{}{{nope", lines::STATS),
            "job.log",
            &mut Collected::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("job.log:2: unreadable stats line"),
            "{e}"
        );
    }
}
