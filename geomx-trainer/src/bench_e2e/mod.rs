//! `geomx bench e2e`: the end-to-end scenario matrix behind an emulated WAN.
//!
//! One command runs, one after the other and each through the normal launcher (`geomx launch`
//! with a generated configuration, inside the WAN lab of its `[wan]` section), the flat parameter
//! server baseline and the HiPS variants ([`scenario::ScenarioId`]), then writes into the output
//! folder:
//!
//! - `results.json`: every figure, the progress lines and configuration of each scenario, the lab
//!   mode ([`results::E2eResults`]);
//! - `results.md`: the table (time to target accuracy, final accuracy, WAN bytes in total and per
//!   round, speed-up over the flat baseline);
//! - `accuracy.png` (test accuracy vs wall time) and `wan_bytes.png` (WAN bytes per round);
//! - `configs/<scenario>.toml`, `runs/<scenario>.json` (launch reports), `logs/<scenario>.log`.
//!
//! A scenario this build cannot configure (the validator rejects it) is listed as unavailable
//! with the validator's message; one that fails or hits the per-scenario wall cap is reported as
//! such, never dropped.

pub mod cli;
pub mod plot;
pub mod results;
pub mod runner;
pub mod scenario;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use results::{apply_baseline, render_markdown, E2eResults, ScenarioResult, Status};
use runner::{run_launch, LaunchFiles, Outcome};
use scenario::{scenario_config, select, MatrixParams, ScenarioId};

use crate::hips::worker::Progress;

/// Errors of `geomx bench e2e` (a failing scenario is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// A file or process operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// `--only` named an unknown scenario, or an option is out of range.
    #[error("{0}")]
    Usage(String),
    /// A launch report could not be read.
    #[error("report {}: {message}", path.display())]
    Report {
        /// The report file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Drawing or encoding a plot failed.
    #[error("plot: {0}")]
    Plot(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// Output folder (created).
    pub out: PathBuf,
    /// The shared settings of the matrix ([`MatrixParams::full`] or [`MatrixParams::quick`],
    /// with the command line's overrides).
    pub params: MatrixParams,
    /// Scenario names to run (empty: all).
    pub only: Vec<String>,
    /// The `geomx` executable to launch (default: this executable).
    pub exe: Option<PathBuf>,
    /// The command line, recorded in the results.
    pub command: String,
}

/// Checks the options a user can set.
fn check(p: &MatrixParams) -> Result<(), E2eError> {
    let bad = |m: String| Err(E2eError::Usage(m));
    if !scenario::WanParams::MODES.contains(&p.wan.mode.as_str()) {
        return bad(format!(
            "--wan: {:?} is not one of {:?}",
            p.wan.mode,
            scenario::WanParams::MODES
        ));
    }
    // The lab's bounds (`[wan]`), so that no scenario's configuration is refused later.
    use crate::config::{MAX_DELAY_MS, MAX_RATE_MBIT, MIN_RATE_MBIT};
    if !(MIN_RATE_MBIT..=MAX_RATE_MBIT).contains(&p.wan.rate_mbit) {
        return bad(format!(
            "--rate-mbit: must be in [{MIN_RATE_MBIT}, {MAX_RATE_MBIT}], got {}",
            p.wan.rate_mbit
        ));
    }
    if !(0.0..=MAX_DELAY_MS).contains(&p.wan.delay_ms) {
        return bad(format!(
            "--delay-ms: must be in [0, {MAX_DELAY_MS}], got {}",
            p.wan.delay_ms
        ));
    }
    if !(0.0..1.0).contains(&p.wan.loss) {
        return bad(format!("--loss: must be in [0, 1), got {}", p.wan.loss));
    }
    if !(0.0..=1.0).contains(&p.target_accuracy) {
        return bad(format!(
            "--target: must be in [0, 1], got {}",
            p.target_accuracy
        ));
    }
    if p.eval_every == 0 {
        return bad("--eval-every: must be >= 1".into());
    }
    if p.hfa_k1 == 0 || p.hfa_k2 == 0 {
        return bad(format!(
            "--hfa-k1 / --hfa-k2: must be >= 1, got {} / {}",
            p.hfa_k1, p.hfa_k2
        ));
    }
    if !(p.cap_s > 0.0 && Duration::try_from_secs_f64(p.cap_s).is_ok()) {
        return bad(format!(
            "--cap-s: must be > 0 and at most {} s, got {}",
            u64::MAX,
            p.cap_s
        ));
    }
    Ok(())
}

fn mkdir(p: &Path) -> Result<(), E2eError> {
    std::fs::create_dir_all(p).map_err(|e| E2eError::Io(format!("creating {}", p.display()), e))
}

fn write(p: &Path, text: &str) -> Result<(), E2eError> {
    std::fs::write(p, text).map_err(|e| E2eError::Io(format!("writing {}", p.display()), e))
}

/// Turns one launch's outcome into the scenario's figures.
fn result_of(
    id: ScenarioId,
    p: &MatrixParams,
    config: serde_json::Value,
    outcome: Outcome,
) -> ScenarioResult {
    let target = p.target_accuracy;
    match outcome {
        Outcome::Done(report, json) => {
            let ttt = report.time_to_accuracy(target);
            let status = if ttt.is_some() {
                Status::Reached
            } else {
                Status::NotReached
            };
            let mut r = ScenarioResult::empty(id, status, None, config);
            r.time_to_target_s = ttt;
            r.final_accuracy = report
                .final_test_accuracy
                .is_finite()
                .then_some(report.final_test_accuracy);
            r.rounds = report.rounds;
            r.wall_seconds = Some(report.wall_seconds);
            r.wan_bytes = Some(report.wan_bytes);
            r.wan_bytes_per_round = Some(report.wan_bytes_per_round);
            r.relay_lateness = report.relay_lateness();
            r.workers = crate::hips::throughput::MeanSplit::of(&report.workers);
            r.role_splits = report.role_splits.clone();
            r.wan_mode = json
                .get("wan_mode")
                .and_then(|m| m.as_str())
                .map(String::from);
            let mut progress = report.progress.clone();
            progress.sort_by_key(|p| p.round);
            r.note = hfa_note(id, p, &progress);
            r.progress = progress;
            r
        }
        Outcome::Capped { wall_s, progress } => {
            let mut progress = progress;
            progress.sort_by_key(|p| p.round);
            let mut r = ScenarioResult::empty(
                id,
                Status::Capped,
                Some(format!(
                    "stopped at the {:.0} s wall cap after {} evaluated rounds; no final report, \
                     so no WAN bytes",
                    p.cap_s,
                    progress.last().map(|x| x.round).unwrap_or(0)
                )),
                config,
            );
            r.time_to_target_s = progress
                .iter()
                .find(|x| x.test_accuracy >= target)
                .map(|x| x.elapsed_s);
            r.final_accuracy = progress.last().map(|x| x.test_accuracy);
            r.rounds = progress.last().map(|x| x.round).unwrap_or(0);
            r.wall_seconds = Some(wall_s);
            r.progress = progress;
            r
        }
        Outcome::Failed(msg) => ScenarioResult::empty(id, Status::Failed, Some(msg), config),
    }
}

/// For HFA: a note when the reporting worker's own model reached the target before the first
/// WAN exchange (round k1·k2), i.e. without any inter-DC synchronisation.
fn hfa_note(id: ScenarioId, p: &MatrixParams, progress: &[Progress]) -> Option<String> {
    let first_wan = p.hfa_k1 * p.hfa_k2;
    let hit = progress
        .iter()
        .find(|x| x.test_accuracy >= p.target_accuracy)?;
    if id == ScenarioId::Isolated {
        return Some(format!(
            "the control reached the target at round {} with no WAN exchange: this target does \
             not need the WAN",
            hit.round
        ));
    }
    (id.is_hfa() && hit.round < first_wan).then(|| {
        format!(
            "the reporting worker's model reached the target at round {} (LAN averaging every {} \
             steps), before the first WAN exchange at round {first_wan}",
            hit.round, p.hfa_k1
        )
    })
}

/// The lab mode(s) the launches reported; the requested mode when none did.
fn lab_mode(scenarios: &[ScenarioResult], requested: &str) -> String {
    let modes: BTreeSet<&str> = scenarios
        .iter()
        .filter_map(|s| s.wan_mode.as_deref())
        .collect();
    if modes.is_empty() {
        if requested == "off" {
            "off".into()
        } else {
            format!("{requested} (not reported by the launcher)")
        }
    } else {
        modes.into_iter().collect::<Vec<_>>().join(", ")
    }
}

/// Writes `results.json`, `results.md` and the plots for `r` into `out`.
pub fn write_outputs(out: &Path, r: &E2eResults) -> Result<(), E2eError> {
    let json = serde_json::to_string_pretty(r)
        .map_err(|e| E2eError::Io("encoding results".into(), std::io::Error::other(e)))?;
    write(&out.join("results.json"), &json)?;
    write(&out.join("results.md"), &render_markdown(r))?;
    plot::accuracy_plot(r, &out.join("accuracy.png"))?;
    plot::wan_bytes_plot(r, &out.join("wan_bytes.png"))
}

/// Runs the matrix and writes the outputs; returns the results.
pub fn run(opts: &E2eOptions) -> Result<E2eResults, E2eError> {
    let p = &opts.params;
    check(p)?;
    let ids = select(&opts.only).map_err(E2eError::Usage)?;
    mkdir(&opts.out)?;
    let out = std::path::absolute(&opts.out)
        .map_err(|e| E2eError::Io(format!("resolving {}", opts.out.display()), e))?;
    for sub in ["configs", "runs", "logs"] {
        mkdir(&out.join(sub))?;
    }
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe()
            .map_err(|e| E2eError::Io("locating the geomx executable".into(), e))?,
    };
    let started = Instant::now();
    let mut scenarios = Vec::new();
    for (k, &id) in ids.iter().enumerate() {
        let name = id.name();
        let (text, cfg) = match scenario_config(id, p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("e2e [{}/{}] {name}: unavailable: {e}", k + 1, ids.len());
                scenarios.push(ScenarioResult::unavailable(id, &e.to_string()));
                continue;
            }
        };
        let files = LaunchFiles {
            dir: out.clone(),
            config: out.join("configs").join(format!("{name}.toml")),
            report: out.join("runs").join(format!("{name}.json")),
            log: out.join("logs").join(format!("{name}.log")),
        };
        write(&files.config, &text)?;
        eprintln!(
            "e2e [{}/{}] {name}: {} rounds, cap {:.0} s ...",
            k + 1,
            ids.len(),
            p.rounds_for(id),
            p.cap_s
        );
        let outcome = run_launch(&exe, &files, Duration::from_secs_f64(p.cap_s))?;
        let r = result_of(id, p, cfg.to_json(), outcome);
        eprintln!(
            "e2e [{}/{}] {name}: {} — time to target {}, final accuracy {}, WAN {} bytes, wall {}",
            k + 1,
            ids.len(),
            r.status.label(),
            r.time_to_target_s
                .map(|t| format!("{t:.1} s"))
                .unwrap_or_else(|| "—".into()),
            r.final_accuracy
                .map(|a| format!("{a:.4}"))
                .unwrap_or_else(|| "—".into()),
            r.wan_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "—".into()),
            r.wall_seconds
                .map(|w| format!("{w:.1} s"))
                .unwrap_or_else(|| "—".into()),
        );
        scenarios.push(r);
    }
    apply_baseline(&mut scenarios);
    let results = E2eResults {
        command: opts.command.clone(),
        lab_mode: lab_mode(&scenarios, &p.wan.mode),
        model_params: p.model_params(),
        params: p.clone(),
        total_wall_s: started.elapsed().as_secs_f64(),
        scenarios,
    };
    write_outputs(&out, &results)?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(round: u64, acc: f64, t: f64) -> Progress {
        Progress {
            round,
            loss: 0.0,
            test_loss: 0.0,
            test_accuracy: acc,
            elapsed_s: t,
        }
    }

    #[test]
    fn options_out_of_range_are_usage_errors_naming_the_flag() {
        let ok = MatrixParams::quick();
        assert!(check(&ok).is_ok());
        type Edit = fn(&mut MatrixParams);
        let cases: [(&str, Edit); 10] = [
            ("--eval-every", |p| p.eval_every = 0),
            ("--hfa-k1", |p| p.hfa_k2 = 0),
            ("--wan", |p| p.wan.mode = "tunnel".into()),
            ("--rate-mbit", |p| p.wan.rate_mbit = 0.0),
            ("--delay-ms", |p| p.wan.delay_ms = -1.0),
            ("--loss", |p| p.wan.loss = 1.0),
            ("--cap-s", |p| p.cap_s = f64::NAN),
            ("--cap-s", |p| p.cap_s = 1e300),
            ("--rate-mbit", |p| p.wan.rate_mbit = 1e-300),
            ("--delay-ms", |p| p.wan.delay_ms = 1e300),
        ];
        for (flag, f) in cases {
            let mut p = ok.clone();
            f(&mut p);
            match check(&p) {
                Err(E2eError::Usage(m)) => assert!(m.starts_with(flag), "{m}"),
                r => panic!("{flag}: {r:?}"),
            }
        }
    }

    #[test]
    fn capped_runs_keep_their_progress_and_report_the_target_honestly() {
        let p = MatrixParams::quick();
        let r = result_of(
            ScenarioId::Flat,
            &p,
            serde_json::Value::Null,
            Outcome::Capped {
                wall_s: 60.0,
                progress: vec![pr(20, 0.92, 8.0), pr(10, 0.80, 4.0)],
            },
        );
        assert_eq!(r.status, Status::Capped);
        assert_eq!(r.time_to_target_s, Some(8.0));
        assert_eq!(r.final_accuracy, Some(0.92));
        assert_eq!(r.rounds, 20);
        assert_eq!(r.wan_bytes, None);
        assert!(r.note.as_deref().unwrap().contains("60 s wall cap"));
        let f = result_of(
            ScenarioId::Hips,
            &p,
            serde_json::Value::Null,
            Outcome::Failed("launch exit code 1: boom".into()),
        );
        assert_eq!(f.status, Status::Failed);
        assert_eq!(f.note.as_deref(), Some("launch exit code 1: boom"));
    }

    #[test]
    fn finished_runs_take_their_figures_from_the_report() {
        let p = MatrixParams::quick();
        let mut report = crate::report::Report::assemble(
            vec![],
            vec![pr(20, 0.95, 2.0), pr(10, 0.85, 1.0)],
            20,
            3.0,
            vec![],
            serde_json::Value::Null,
        );
        report.wan_bytes = 2000;
        report.wan_bytes_per_round = 100.0;
        let json = serde_json::json!({ "wan_mode": "netns" });
        let r = result_of(
            ScenarioId::Hips,
            &p,
            serde_json::Value::Null,
            Outcome::Done(Box::new(report.clone()), json),
        );
        assert_eq!(r.status, Status::Reached);
        assert_eq!(r.time_to_target_s, Some(2.0));
        assert_eq!(
            r.final_accuracy, None,
            "NaN accuracy (no worker stats) is absent"
        );
        assert_eq!(
            (r.wan_bytes, r.wan_bytes_per_round),
            (Some(2000), Some(100.0))
        );
        assert_eq!(r.wan_mode.as_deref(), Some("netns"));
        assert_eq!(r.progress[0].round, 10, "sorted by round");
        let mut q = p.clone();
        q.target_accuracy = 0.99;
        let n = result_of(
            ScenarioId::Hips,
            &q,
            serde_json::Value::Null,
            Outcome::Done(Box::new(report), serde_json::Value::Null),
        );
        assert_eq!(n.status, Status::NotReached);
        assert_eq!(n.time_to_target_s, None);
    }

    #[test]
    fn hfa_reaching_the_target_before_any_wan_exchange_is_noted() {
        let mut p = MatrixParams::full();
        (p.hfa_k1, p.hfa_k2) = (10, 5); // first WAN exchange at round 50
        let early = [pr(10, 0.9, 1.0), pr(20, 0.96, 2.0)];
        let late = [pr(40, 0.9, 1.0), pr(50, 0.96, 2.0)];
        let n = hfa_note(ScenarioId::Hfa, &p, &early).unwrap();
        assert!(n.contains("round 20") && n.contains("round 50"), "{n}");
        assert_eq!(hfa_note(ScenarioId::Hfa, &p, &late), None);
        assert_eq!(hfa_note(ScenarioId::Hips, &p, &early), None);
        assert_eq!(hfa_note(ScenarioId::HfaFp16, &p, &[pr(10, 0.5, 1.0)]), None);
    }

    #[test]
    fn lab_mode_comes_from_the_reports() {
        let mut a =
            ScenarioResult::empty(ScenarioId::Flat, Status::Reached, None, Default::default());
        let mut b = a.clone();
        assert_eq!(lab_mode(&[a.clone()], "off"), "off");
        assert_eq!(
            lab_mode(&[a.clone()], "auto"),
            "auto (not reported by the launcher)"
        );
        a.wan_mode = Some("netns".into());
        b.wan_mode = Some("netns".into());
        assert_eq!(lab_mode(&[a.clone(), b.clone()], "auto"), "netns");
        b.wan_mode = Some("userspace-relay".into());
        assert_eq!(lab_mode(&[a, b], "auto"), "netns, userspace-relay");
    }

    #[test]
    fn unknown_scenarios_fail_before_anything_runs() {
        let dir = std::env::temp_dir().join(format!("geomx-e2e-only-{}", std::process::id()));
        let opts = E2eOptions {
            out: dir.clone(),
            params: MatrixParams::quick(),
            only: vec!["flat,bogus".into()],
            exe: Some("/nonexistent".into()),
            command: "t".into(),
        };
        assert!(matches!(run(&opts), Err(E2eError::Usage(m)) if m.contains("bogus")));
        assert!(!dir.exists(), "nothing written");
    }
}
