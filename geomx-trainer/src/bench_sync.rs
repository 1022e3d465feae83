//! `geomx bench sync`: the synchronisation algorithms under heterogeneity, in one run.
//!
//! One data center computes 3× slower than the other (`slowdown = 3.0`); the same job runs under
//! FSA, MixedSync with DC-ASGD, HFA and ESync, each as a separate `geomx launch`. The job: 2 DCs ×
//! 1 worker, an MLP with one hidden layer of 1,024 units (140k parameters) on a synthetic
//! 128-feature, 10-class task with 65,536 training samples, batch 64, so that a step's compute
//! dominates a loopback round. One worker per DC because the 2-core machine this was built on
//! cannot give 4 busy workers their own cores, and ESync's extra local steps would then only
//! take CPU from the slow workers. Per algorithm it reports the wall time until the reporting
//! worker (dc 0, rank 0) first measured the target test accuracy ([`target_accuracy`]), the final
//! and best accuracy, the wall time of the whole run and the WAN / LAN bytes. Results go to
//! `sync.json` and `sync.md` in the output folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::launch::{launch, LaunchError, LaunchOptions};
use crate::report::Report;

/// Test accuracy the wall time is measured to: 0.90, where every algorithm's curve is still
/// steep (0.85 for `--quick`).
pub fn target_accuracy(quick: bool) -> f64 {
    if quick {
        0.85
    } else {
        0.90
    }
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct SyncBenchOptions {
    /// Fewer rounds (a smoke run under a minute).
    pub quick: bool,
    /// Folder for `sync.json`, `sync.md` and the per-algorithm reports.
    pub out: PathBuf,
    /// The `geomx` executable to launch (default: this executable).
    pub exe: Option<PathBuf>,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum SyncBenchError {
    /// One algorithm's launch failed.
    #[error("{algorithm}: {source}")]
    Launch {
        /// The algorithm.
        algorithm: String,
        /// Why.
        source: LaunchError,
    },
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One algorithm of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// Short name (also the report file's stem).
    pub name: &'static str,
    /// What it runs, for the table.
    pub settings: &'static str,
    /// Its `[sync]` TOML.
    pub sync_toml: &'static str,
}

/// The four algorithms, FSA first.
pub const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "fsa",
        settings: "fully synchronous, SGD momentum 0.9",
        sync_toml: "[sync]\nalgorithm = \"fsa\"\n",
    },
    Scenario {
        name: "mixed",
        settings: "MixedSync, DC-ASGD λ = 0.04, momentum 0.9",
        sync_toml: "[sync]\nalgorithm = \"mixed\"\n[sync.mixed]\noptimizer = \"dcasgd\"\n\
                    momentum = 0.9\n",
    },
    Scenario {
        name: "hfa",
        settings: "HFA k1 = 5, k2 = 4, average",
        sync_toml: "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\n",
    },
    Scenario {
        name: "esync",
        settings: "ESync ε = 0.1 ms, γ = 1, no normalisation",
        sync_toml: "[sync]\nalgorithm = \"esync\"\n[sync.esync]\neps = 0.0001\n",
    },
];

/// Rounds of the full and the quick run.
pub fn rounds(quick: bool) -> u64 {
    if quick {
        600
    } else {
        2_500
    }
}

/// Launches per algorithm: 3 in the full run (the table shows the medians), 1 with `--quick`.
pub fn repeats(quick: bool) -> usize {
    if quick {
        1
    } else {
        3
    }
}

/// Evaluation interval (rounds) of the full and the quick run.
pub fn eval_every(quick: bool) -> u64 {
    if quick {
        20
    } else {
        25
    }
}

/// The job every algorithm runs (without `[sync]`): 2 DCs × 1 worker, dc1 3× slower, MLP hidden
/// `[1024]` on the synthetic task, batch 64, SGD lr 0.05 momentum 0.9.
pub fn base_config(quick: bool) -> String {
    format!(
        "[[cluster.data_centers]]\nname = \"dc0\"\nworkers = 1\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 1\nslowdown = 3.0\n\
         [model]\nkind = \"mlp\"\nhidden = [1024]\n\
         [data]\ndataset = \"synthetic\"\nbatch_size = 64\n\
         [data.synthetic]\nfeatures = 128\ntrain_samples = 65536\ntest_samples = 512\n\
         [train]\nrounds = {}\neval_every = {}\n\
         [train.optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n",
        rounds(quick),
        eval_every(quick)
    )
}

/// One algorithm's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncBenchRow {
    /// Algorithm name.
    pub algorithm: String,
    /// Its settings.
    pub settings: String,
    /// Rounds run.
    pub rounds: u64,
    /// Wall seconds from the reporting worker's start to the first evaluation at or above the
    /// target accuracy; `None` if never reached (the median over the runs; never reached counts
    /// as longest).
    pub time_to_target_s: Option<f64>,
    /// `time_to_target_s` of each run, in launch order.
    pub time_to_target_runs_s: Vec<Option<f64>>,
    /// Test accuracy at the end.
    pub final_accuracy: f64,
    /// Best test accuracy of any evaluation.
    pub best_accuracy: f64,
    /// Wall seconds of the whole launch.
    pub wall_seconds: f64,
    /// Bytes between local and global servers.
    pub wan_bytes: u64,
    /// Bytes between workers and local servers.
    pub lan_bytes: u64,
}

impl SyncBenchRow {
    /// The row of algorithm `s` from its launch report, timed to accuracy `target`.
    pub fn from_report(s: &Scenario, r: &Report, target: f64) -> Self {
        Self {
            algorithm: s.name.into(),
            settings: s.settings.into(),
            rounds: r.rounds,
            time_to_target_s: r.time_to_accuracy(target),
            time_to_target_runs_s: vec![r.time_to_accuracy(target)],
            final_accuracy: r.final_test_accuracy,
            best_accuracy: r
                .progress
                .iter()
                .map(|p| p.test_accuracy)
                .fold(f64::NAN, f64::max),
            wall_seconds: r.wall_seconds,
            wan_bytes: r.wan_bytes,
            lan_bytes: r.lan_bytes,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

/// The row of one algorithm's runs: every figure is the median over the runs (the lower one of
/// an even count); a time never reached counts as longest. `None` without runs.
pub fn median_row(runs: &[SyncBenchRow]) -> Option<SyncBenchRow> {
    let first = runs.first()?;
    let of = |f: fn(&SyncBenchRow) -> f64| median(runs.iter().map(f).collect());
    let time = of(|r| r.time_to_target_s.unwrap_or(f64::INFINITY));
    Some(SyncBenchRow {
        algorithm: first.algorithm.clone(),
        settings: first.settings.clone(),
        rounds: first.rounds,
        time_to_target_s: time.is_finite().then_some(time),
        time_to_target_runs_s: runs.iter().map(|r| r.time_to_target_s).collect(),
        final_accuracy: of(|r| r.final_accuracy),
        best_accuracy: of(|r| r.best_accuracy),
        wall_seconds: of(|r| r.wall_seconds),
        wan_bytes: of(|r| r.wan_bytes as f64) as u64,
        lan_bytes: of(|r| r.lan_bytes as f64) as u64,
    })
}

/// The whole measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncBenchResult {
    /// Test accuracy the wall time is measured to.
    pub target_accuracy: f64,
    /// True for `--quick`.
    pub quick: bool,
    /// Launches per algorithm.
    pub repeats: usize,
    /// The common job (TOML without `[sync]`).
    pub base_config: String,
    /// One row per algorithm, FSA first.
    pub rows: Vec<SyncBenchRow>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SyncBenchError + '_ {
    move |source| SyncBenchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Runs every scenario [`repeats`] times (interleaved, so that load changes of the machine hit
/// every algorithm alike) and writes `sync.json`, `sync.md` and `<name>-<run>.json` (each launch
/// report) into `opts.out`.
pub fn run(opts: &SyncBenchOptions) -> Result<SyncBenchResult, SyncBenchError> {
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let base = base_config(opts.quick);
    let target = target_accuracy(opts.quick);
    let n = repeats(opts.quick);
    let mut runs: Vec<Vec<SyncBenchRow>> = vec![Vec::with_capacity(n); SCENARIOS.len()];
    let order = (0..n).flat_map(|i| (0..SCENARIOS.len()).map(move |k| (i, k)));
    for (i, k) in order {
        let s = &SCENARIOS[k];
        let cfg = opts.out.join(format!("{}.toml", s.name));
        std::fs::write(&cfg, format!("{base}{}", s.sync_toml)).map_err(io_err(&cfg))?;
        let report = opts.out.join(format!("{}-{}.json", s.name, i + 1));
        tracing::warn!(algorithm = s.name, run = i + 1, "launching");
        let r = launch(&LaunchOptions {
            config: Some(cfg),
            report: Some(report),
            exe: opts.exe.clone(),
            quiet: true,
            ..LaunchOptions::default()
        })
        .map_err(|source| SyncBenchError::Launch {
            algorithm: s.name.into(),
            source,
        })?;
        let row = SyncBenchRow::from_report(s, &r, target);
        eprintln!(
            "bench sync: run {}/{n} {:<6} time to {target}: {}, final accuracy {:.4}, wall \
             {:.1} s, WAN {} bytes",
            i + 1,
            row.algorithm,
            fmt_time(row.time_to_target_s),
            row.final_accuracy,
            row.wall_seconds,
            row.wan_bytes
        );
        runs[k].push(row);
    }
    let result = SyncBenchResult {
        target_accuracy: target,
        quick: opts.quick,
        repeats: n,
        base_config: base,
        rows: runs.iter().filter_map(|r| median_row(r)).collect(),
    };
    let json = opts.out.join("sync.json");
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    std::fs::write(&json, text).map_err(io_err(&json))?;
    let md = opts.out.join("sync.md");
    std::fs::write(&md, render_markdown(&result)).map_err(io_err(&md))?;
    Ok(result)
}

fn fmt_time(t: Option<f64>) -> String {
    t.map_or_else(|| "not reached".into(), |t| format!("{t:.2} s"))
}

/// The results as a markdown table (wall times relative to FSA's in parentheses).
pub fn render_markdown(r: &SyncBenchResult) -> String {
    let fsa_t = r
        .rows
        .iter()
        .find(|x| x.algorithm == "fsa")
        .and_then(|x| x.time_to_target_s);
    let runs = if r.repeats > 1 {
        format!("; medians of {} runs", r.repeats)
    } else {
        String::new()
    };
    let mut s = format!(
        "One DC 3× slower (2 DCs × 1 worker, MLP hidden [1024] on synthetic 128-feature data, \
         batch 64, {} rounds{}{runs}). Time to test accuracy {:.2} (worker dc 0 rank 0, from its \
         start; evaluated every {} rounds); speed-up over FSA in parentheses.\n\n\
         | algorithm | settings | time to {:.2} | per run | final acc. | best acc. | wall | \
         WAN bytes | LAN bytes |\n|---|---|---|---|---|---|---|---|---|\n",
        r.rows.first().map_or(0, |x| x.rounds),
        if r.quick { ", --quick" } else { "" },
        r.target_accuracy,
        eval_every(r.quick),
        r.target_accuracy,
    );
    for x in &r.rows {
        let speedup = match (fsa_t, x.time_to_target_s) {
            (Some(f), Some(t)) if x.algorithm != "fsa" && t > 0.0 => format!(" ({:.2}×)", f / t),
            _ => String::new(),
        };
        let per_run: Vec<String> = x
            .time_to_target_runs_s
            .iter()
            .map(|t| t.map_or_else(|| "–".into(), |t| format!("{t:.1}")))
            .collect();
        s.push_str(&format!(
            "| {} | {} | {}{} | {} | {:.4} | {:.4} | {:.1} s | {} | {} |\n",
            x.algorithm,
            x.settings,
            fmt_time(x.time_to_target_s),
            speedup,
            per_run.join(" / "),
            x.final_accuracy,
            x.best_accuracy,
            x.wall_seconds,
            x.wan_bytes,
            x.lan_bytes
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SyncAlgorithm};

    #[test]
    fn every_scenario_is_a_valid_job_with_a_slow_dc() {
        let want = [
            SyncAlgorithm::Fsa,
            SyncAlgorithm::Mixed,
            SyncAlgorithm::Hfa,
            SyncAlgorithm::Esync,
        ];
        for quick in [false, true] {
            for (s, alg) in SCENARIOS.iter().zip(want) {
                let c = Config::from_toml_str(&format!("{}{}", base_config(quick), s.sync_toml))
                    .unwrap_or_else(|e| panic!("{}: {e}", s.name));
                assert_eq!(c.sync.algorithm, alg);
                assert_eq!(c.train.rounds, Some(rounds(quick)));
                let slow: Vec<f64> = c.cluster.data_centers.iter().map(|d| d.slowdown).collect();
                assert_eq!(slow, [1.0, 3.0]);
                assert_eq!(c.model.hidden, [1024]);
                assert_eq!(c.train.eval_every, eval_every(quick));
                assert!(target_accuracy(quick) > 0.5 && target_accuracy(quick) < 1.0);
            }
        }
    }

    fn row(name: &str, t: Option<f64>) -> SyncBenchRow {
        SyncBenchRow {
            algorithm: name.into(),
            settings: "s".into(),
            rounds: 10,
            time_to_target_s: t,
            time_to_target_runs_s: vec![t],
            final_accuracy: 0.9,
            best_accuracy: 0.91,
            wall_seconds: 3.0,
            wan_bytes: 100,
            lan_bytes: 200,
        }
    }

    #[test]
    fn markdown_has_a_row_per_algorithm_with_speedups_over_fsa() {
        let r = SyncBenchResult {
            target_accuracy: 0.95,
            quick: true,
            repeats: 1,
            base_config: String::new(),
            rows: vec![
                row("fsa", Some(4.0)),
                row("esync", Some(2.0)),
                row("hfa", None),
            ],
        };
        let md = render_markdown(&r);
        let lines: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(lines.len(), 4, "{md}");
        assert!(lines[1].contains("| 4.00 s | 4.0 |"), "{md}");
        assert!(lines[2].contains("2.00 s (2.00×)"), "{md}");
        assert!(lines[3].contains("not reached"), "{md}");
        assert!(md.contains("--quick"));
    }

    #[test]
    fn medians_count_a_missed_target_as_longest() {
        let mut a = row("esync", Some(3.0));
        a.final_accuracy = 0.95;
        let b = row("esync", None);
        let mut c = row("esync", Some(5.0));
        c.wan_bytes = 50;
        let m = median_row(&[a.clone(), b.clone(), c]).unwrap();
        assert_eq!(m.time_to_target_s, Some(5.0));
        assert_eq!(m.time_to_target_runs_s, vec![Some(3.0), None, Some(5.0)]);
        assert_eq!((m.final_accuracy, m.wan_bytes), (0.9, 100));
        // Two of three never reached it: neither does the median.
        assert_eq!(
            median_row(&[a, b.clone(), b]).unwrap().time_to_target_s,
            None
        );
        assert!(median_row(&[]).is_none());
        assert_eq!((repeats(true), repeats(false)), (1, 3));
    }

    #[test]
    fn rows_take_time_to_target_and_best_accuracy_from_the_report() {
        use crate::hips::worker::Progress;
        let p = |round, acc, t| Progress {
            round,
            loss: 0.1,
            test_loss: 0.1,
            test_accuracy: acc,
            elapsed_s: t,
        };
        let rep = Report::assemble(
            vec![],
            vec![p(10, 0.9, 1.0), p(20, 0.96, 2.0), p(30, 0.94, 3.0)],
            30,
            3.5,
            vec![],
            serde_json::Value::Null,
        );
        let r = SyncBenchRow::from_report(&SCENARIOS[3], &rep, 0.95);
        assert_eq!(r.time_to_target_s, Some(2.0));
        assert_eq!(r.best_accuracy, 0.96);
        assert_eq!((r.algorithm.as_str(), r.rounds), ("esync", 30));
    }
}
