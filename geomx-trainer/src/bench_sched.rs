//! `geomx bench sched`: the schedulers of scheduling.md in the WAN lab, each against its
//! baseline in the same run.
//!
//! **P3.** 2 DCs × 1 worker and one global server; each DC's WAN link is shaped to
//! [`P3_RATE_MBIT`] with [`P3_DELAY_MS`] of one-way delay (`[wan] mode = "auto"`: network
//! namespaces as root, the userspace relay otherwise). The model has the shape of a VGG-style
//! network, where P3 matters: the built-in MLP with hidden layers [`P3_HIDDEN`] on
//! [`P3_FEATURES`] synthetic features holds most of its parameters in its last layers (the
//! 512 × 1024 layer alone is 72 % of 0.73 M), while the emulated compute of
//! `model.layer_delay_ms` = [`P3_LAYER_DELAY_MS`] (forward; the backward pass sleeps twice as
//! long) puts most of the compute in its first layers, as a CNN's convolutions do. A round's push
//! then takes about as long on the WAN as the worker's forward and backward pass
//! (`comm_to_compute` in the results). The same job runs first in first out (tensors as keys,
//! replies applied at the end of the round) and with P3 (the layer next to the input first, the
//! next forward pass gated per layer, every connection's credit sized to its path as by default),
//! both on the portable driver that P3 needs; runs alternate, and the tables show medians. The
//! P3 job asks for `slice_elems = "auto"`: the benchmark first tunes the slice size once, as
//! `geomx launch` does ([`crate::launch::slices`]: a 5-round probe of the job per candidate
//! size), and every P3 run then uses the size chosen. The measure is the workers' mean
//! round time without evaluation (`train_seconds / rounds` of the job report), with its split
//! into compute (the emulated compute included), waiting for replies and applying them.
//!
//! **TSEngine.** 6 DCs × 1 worker and one global server at a central site whose link is the
//! slowest ([`TS_CENTRAL`]); the DCs' links differ in bandwidth and delay ([`TS_SITES`]). With
//! direct pushes and pulls every DC's sum crosses the central link each way (in-cast); through
//! TSEngine the DCs merge partial sums among themselves and forward θ to each other, so fewer
//! copies cross it. The model is the MLP [`TS_HIDDEN`] (2.4 MB of f32) with emulated compute
//! [`TS_LAYER_DELAY_MS`]. The same job runs with direct push and pull and with
//! `[scheduling.tsengine] inter = true`; runs alternate, the tables show medians.
//!
//! The WAN lab's fidelity (the delay relay's lateness) is reported for every run. Results go to
//! `results.json` and `results.md` in the output folder, next to each run's configuration and
//! report.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hips::time_split::{RoleSplit, RoleSplitRow};
use crate::launch::slices::{self, SliceTuning};
use crate::launch::{launch, LaunchError, LaunchOptions};
use crate::report::Report;
use crate::wanlab::probe::median;

/// Bandwidth of each DC's WAN link in the P3 comparison, Mbit/s each way.
pub const P3_RATE_MBIT: f64 = 120.0;
/// One-way delay of each DC's WAN link in the P3 comparison, ms.
pub const P3_DELAY_MS: f64 = 5.0;

/// The central site's link in the TSEngine comparison: (Mbit/s each way, one-way delay ms).
pub const TS_CENTRAL: (f64, f64) = (25.0, 10.0);
/// The DCs' links in the TSEngine comparison: (name, Mbit/s each way, one-way delay ms).
pub const TS_SITES: [(&str, f64, f64); 6] = [
    ("dc0", 200.0, 5.0),
    ("dc1", 100.0, 25.0),
    ("dc2", 50.0, 15.0),
    ("dc3", 150.0, 10.0),
    ("dc4", 100.0, 20.0),
    ("dc5", 200.0, 30.0),
];
/// Hidden layers of the TSEngine comparison's model (597,002 parameters on 64 features).
pub const TS_HIDDEN: [usize; 2] = [1024, 512];
/// Emulated forward compute per layer of the TSEngine model, ms.
pub const TS_LAYER_DELAY_MS: [f64; 3] = [20.0, 10.0, 2.0];

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct SchedBenchOptions {
    /// Fewer rounds, one run per mode (a smoke run well under 2 minutes).
    pub quick: bool,
    /// Folder for `results.json`, `results.md` and the runs' files.
    pub out: PathBuf,
    /// The `geomx` executable to launch (default: this executable).
    pub exe: Option<PathBuf>,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum SchedBenchError {
    /// A launch failed.
    #[error("{run}: {source}")]
    Launch {
        /// Which run.
        run: String,
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
    /// A run's report lacks what the benchmark measures.
    #[error("{run}: {what}")]
    Report {
        /// Which run.
        run: String,
        /// What is missing.
        what: String,
    },
}

/// Rounds per run.
pub fn rounds(quick: bool) -> u64 {
    if quick {
        12
    } else {
        40
    }
}

/// Runs per mode.
pub fn repeats(quick: bool) -> usize {
    if quick {
        1
    } else {
        3
    }
}

/// Batch size per worker.
pub const BATCH_SIZE: usize = 128;

/// Hidden layers of the P3 model.
pub const P3_HIDDEN: [usize; 7] = [64, 64, 128, 128, 256, 512, 1024];
/// Input features of the P3 model's synthetic task.
pub const P3_FEATURES: usize = 64;
/// Emulated forward compute per layer of the P3 model, ms (`model.layer_delay_ms`).
pub const P3_LAYER_DELAY_MS: [f64; 8] = [15.0, 15.0, 12.0, 12.0, 8.0, 4.0, 1.0, 0.0];

/// The P3 comparison's job; `p3` switches P3 on, with slices of `slice_elems` (`None`:
/// `"auto"`).
pub fn p3_config(quick: bool, p3: bool, slice_elems: Option<usize>) -> String {
    let slice = slice_elems.map_or_else(|| "\"auto\"".to_string(), |s| s.to_string());
    let list = |v: &[String]| v.join(", ");
    let hidden: Vec<String> = P3_HIDDEN.iter().map(ToString::to_string).collect();
    let delays: Vec<String> = P3_LAYER_DELAY_MS.iter().map(ToString::to_string).collect();
    format!(
        "[[cluster.data_centers]]\nname = \"dc0\"\nworkers = 1\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 1\n\
         [model]\nkind = \"mlp\"\nhidden = [{}]\nlayer_delay_ms = [{}]\n\
         [data]\ndataset = \"synthetic\"\nbatch_size = {BATCH_SIZE}\n\
         [data.synthetic]\nfeatures = {P3_FEATURES}\ntrain_samples = 65536\ntest_samples = 512\n\
         [train]\nrounds = {}\neval_every = 0\n\
         [train.optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
         [transport]\ndriver = \"portable\"\n\
         [wan]\nmode = \"auto\"\nrate_mbit = {P3_RATE_MBIT}\ndelay_ms = {P3_DELAY_MS}\n\
         [scheduling.p3]\nenabled = {p3}\nslice_elems = {slice}\n",
        list(&hidden),
        list(&delays),
        rounds(quick),
    )
}

/// Rounds per TSEngine run.
pub fn ts_rounds(quick: bool) -> u64 {
    if quick {
        3
    } else {
        10
    }
}

/// Dead-peer time of the TSEngine comparison's jobs (`timeouts.peer_dead_ms`; default 10 s). Six
/// DCs' 2.4 MB pushes and replies share the central 25 Mbit/s link: with 10 s, one of about ten
/// quick runs aborted ("no traffic from peer 0 for 10s" at a local server in round 0,
/// 2026-12-06; the cause is not established, docs/benchmarks.md).
pub const TS_PEER_DEAD_MS: u64 = 30_000;

/// The TSEngine comparison's job; `ts` switches TSEngine on (inter tier).
pub fn ts_config(quick: bool, ts: bool) -> String {
    let list = |v: Vec<String>| v.join(", ");
    let mut s = String::new();
    for (name, _, _) in TS_SITES {
        s.push_str(&format!(
            "[[cluster.data_centers]]\nname = \"{name}\"\nworkers = 1\n"
        ));
    }
    s.push_str(&format!(
        "[model]\nkind = \"mlp\"\nhidden = [{}]\nlayer_delay_ms = [{}]\n\
         [data]\ndataset = \"synthetic\"\nbatch_size = {BATCH_SIZE}\n\
         [data.synthetic]\nfeatures = {P3_FEATURES}\ntrain_samples = 16384\ntest_samples = 512\n\
         [train]\nrounds = {}\neval_every = 0\n\
         [train.optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
         [transport]\ndriver = \"portable\"\n\
         [timeouts]\npeer_dead_ms = {TS_PEER_DEAD_MS}\n\
         [wan]\nmode = \"auto\"\n\
         [wan.central]\nrate_mbit = {}\ndelay_ms = {}\n",
        list(TS_HIDDEN.iter().map(ToString::to_string).collect()),
        list(TS_LAYER_DELAY_MS.iter().map(ToString::to_string).collect()),
        ts_rounds(quick),
        TS_CENTRAL.0,
        TS_CENTRAL.1,
    ));
    for (name, rate, delay) in TS_SITES {
        s.push_str(&format!(
            "[[wan.sites]]\nname = \"{name}\"\nrate_mbit = {rate}\ndelay_ms = {delay}\n"
        ));
    }
    s.push_str(&format!("[scheduling.tsengine]\ninter = {ts}\n"));
    s
}

/// The WAN lab's fidelity in one run: the delay relay's lateness (absent when the lab had no
/// relay, e.g. the userspace mode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabFidelity {
    /// Lab mode the launcher used (`netns`, `relay`).
    pub mode: String,
    /// Median lateness of the delay relay, µs.
    pub p50_lateness_us: Option<f64>,
    /// 99th percentile, µs.
    pub p99_lateness_us: Option<f64>,
    /// Largest, µs.
    pub max_lateness_us: Option<f64>,
    /// The relay missed its lateness bound: the emulated delay was not kept.
    pub degraded: Option<bool>,
}

impl LabFidelity {
    /// From a job report's `wan_mode` and `wan_lab`.
    pub fn from_report(r: &Report) -> Self {
        let relay = r.wan_lab.as_ref().and_then(|w| w.get("delay_relay"));
        let num = |k: &str| relay.and_then(|d| d.get(k)).and_then(|v| v.as_f64());
        Self {
            mode: r.wan_mode.clone(),
            p50_lateness_us: num("p50_lateness_us"),
            p99_lateness_us: num("p99_lateness_us"),
            max_lateness_us: num("max_lateness_us"),
            degraded: relay
                .and_then(|d| d.get("degraded"))
                .and_then(|v| v.as_bool()),
        }
    }
}

/// One run: the workers' mean round and where its time went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRun {
    /// Mean round time of the workers, ms (training only, no evaluation).
    pub round_ms: f64,
    /// Forward and backward pass, encoding and queueing the pushes, ms per round.
    pub compute_ms: f64,
    /// Waiting for replies (P3: inside the next forward pass too), ms per round.
    pub wait_ms: f64,
    /// Applying replies, ms per round.
    pub apply_ms: f64,
    /// Every worker and the global servers ended with the same θ.
    pub replicas_identical: bool,
    /// Hash of the workers' final θ.
    pub param_hash: String,
    /// WAN bytes of the run.
    pub wan_bytes: u64,
    /// The P3 credits of the pushing connections (workers, local servers), bytes: sized to the
    /// path (`credit_bytes = "path"`) or tuned from round times (`"auto"`).
    pub tuned_credits: Vec<u64>,
    /// The lab's fidelity.
    pub lab: LabFidelity,
    /// Where each role's round went (the report's `role_splits`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub role_splits: Vec<RoleSplitRow>,
}

impl RoundRun {
    /// From a job report (`run` names it in errors).
    pub fn from_report(run: &str, r: &Report) -> Result<Self, SchedBenchError> {
        let Some(round_ms) = slices::round_ms(r) else {
            return Err(SchedBenchError::Report {
                run: run.into(),
                what: "no worker throughput in the report".into(),
            });
        };
        let n = r.workers.len();
        let mean = |f: &dyn Fn(&crate::hips::throughput::WorkerThroughput) -> f64| {
            r.workers.iter().map(f).sum::<f64>() / n as f64
        };
        Ok(Self {
            round_ms,
            compute_ms: mean(&|w| w.split.compute_ms),
            wait_ms: mean(&|w| w.split.wait_ms),
            apply_ms: mean(&|w| w.split.apply_ms),
            replicas_identical: r.replicas_identical,
            param_hash: r.param_hash.clone(),
            wan_bytes: r.wan_bytes,
            tuned_credits: r.processes.iter().filter_map(|p| p.p3_credit).collect(),
            lab: LabFidelity::from_report(r),
            role_splits: r.role_splits.clone(),
        })
    }
}

/// The P3 comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct P3Result {
    /// First in first out, one entry per run.
    pub fifo: Vec<RoundRun>,
    /// P3, one entry per run.
    pub p3: Vec<RoundRun>,
    /// Median FIFO round time / median P3 round time.
    pub p3_speedup: f64,
    /// Slice size of the P3 runs, elements: the one the tuning chose.
    pub slice_elems: usize,
    /// How the slice size was tuned (`slice_elems = "auto"`).
    pub slice_tuning: SliceTuning,
    /// The wire time of one round's push at the link rate / FIFO's median compute time.
    pub comm_to_compute: f64,
    /// Model parameters.
    pub params: usize,
    /// The P3 runs ended with exactly the FIFO runs' θ.
    pub same_result: bool,
}

/// The TSEngine comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TsResult {
    /// Direct push and pull, one entry per run.
    pub direct: Vec<RoundRun>,
    /// TSEngine on the inter tier, one entry per run.
    pub tsengine: Vec<RoundRun>,
    /// Median direct round time / median TSEngine round time.
    pub tsengine_speedup: f64,
    /// Rounds per run.
    pub rounds: u64,
    /// Model parameters.
    pub params: usize,
}

/// Everything `geomx bench sched` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedBenchResult {
    /// `--quick`.
    pub quick: bool,
    /// Rounds per run.
    pub rounds: u64,
    /// The P3 comparison.
    pub p3: P3Result,
    /// The P3 job's configuration (FIFO; P3 adds `[scheduling.p3] enabled = true`).
    pub p3_config: String,
    /// The TSEngine comparison.
    pub tsengine: TsResult,
    /// The TSEngine job's configuration (direct; TSEngine sets `[scheduling.tsengine]
    /// inter = true`).
    pub tsengine_config: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SchedBenchError + '_ {
    move |source| SchedBenchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The median of one figure over runs.
fn median_of(runs: &[RoundRun], f: fn(&RoundRun) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

/// Each role's split over `runs`, the median of each part, in the order the runs name them.
fn median_roles(runs: &[RoundRun]) -> Vec<(String, RoleSplit)> {
    let mut roles: Vec<&str> = Vec::new();
    for row in runs.iter().flat_map(|r| &r.role_splits) {
        if !roles.contains(&row.role.as_str()) {
            roles.push(&row.role);
        }
    }
    roles
        .into_iter()
        .filter_map(|role| {
            let splits: Vec<RoleSplit> = runs
                .iter()
                .filter_map(|r| r.role_splits.iter().find(|x| x.role == role))
                .map(|x| x.split)
                .collect();
            // Every listed role has a split in some run.
            RoleSplit::combine(&splits, median).map(|s| (role.to_string(), s))
        })
        .collect()
}

/// Markdown table of each mode's roles ([`median_roles`]); empty when no run reported one.
fn render_roles(modes: [(&str, &[RoundRun]); 2]) -> String {
    let rows: Vec<(&str, String, RoleSplit)> = modes
        .iter()
        .flat_map(|(mode, runs)| {
            median_roles(runs)
                .into_iter()
                .map(move |(role, split)| (*mode, role, split))
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\nWhere each role's round went (ms per round, medians over the runs; \
         docs/benchmarks.md, \"Where each role's round went\"):\n\n\
         | mode | role | compute | codec | LAN wait | WAN wait | idle |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (mode, role, p) in rows {
        s.push_str(&format!(
            "| {mode} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            role.replace('_', " "),
            p.compute_ms,
            p.codec_ms,
            p.lan_wait_ms,
            p.wan_wait_ms,
            p.idle_ms
        ));
    }
    s
}

/// Parameters of an MLP with `hidden` layers on the synthetic task: weights and biases.
fn mlp_params(hidden: &[usize]) -> usize {
    let mut sizes = vec![P3_FEATURES];
    sizes.extend(hidden);
    sizes.push(crate::config::SyntheticSpec::default().classes);
    sizes.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
}

/// Parameters of the P3 model.
fn p3_params() -> usize {
    mlp_params(&P3_HIDDEN)
}

/// Launches `toml` as run `name` in `out`; returns its report.
fn launch_run(opts: &SchedBenchOptions, name: &str, toml: &str) -> Result<Report, SchedBenchError> {
    launch_file(opts, name, toml).map_err(|source| SchedBenchError::Launch {
        run: name.into(),
        source,
    })
}

/// [`launch_run`] with the launcher's own error.
fn launch_file(opts: &SchedBenchOptions, name: &str, toml: &str) -> Result<Report, LaunchError> {
    let cfg = opts.out.join(format!("{name}.toml"));
    std::fs::write(&cfg, toml)
        .map_err(|e| LaunchError::Io(format!("writing {}", cfg.display()), e))?;
    tracing::warn!(run = name, "launching");
    launch(&LaunchOptions {
        config: Some(cfg),
        report: Some(opts.out.join(format!("{name}.json"))),
        exe: opts.exe.clone(),
        quiet: true,
        ..LaunchOptions::default()
    })
}

/// Tunes the P3 job's slice size as `geomx launch` does for `slice_elems = "auto"`: one probe of
/// the job per candidate size (runs `p3-probe-<size>`).
fn tune_p3(opts: &SchedBenchOptions) -> Result<SliceTuning, SchedBenchError> {
    let name = "p3 slice tuning";
    let launch_err = |source| SchedBenchError::Launch {
        run: name.into(),
        source,
    };
    let cfg = crate::config::Config::from_toml_str(&p3_config(opts.quick, true, None))
        .map_err(|e| launch_err(e.into()))?;
    let model = crate::engine::build_model(&cfg.model, P3_FEATURES, 10)
        .map_err(|e| launch_err(crate::hips::RunError::Engine(e).into()))?;
    let lens: Vec<usize> = model.tensors().iter().map(|t| t.len()).collect();
    let tuning = slices::tune(&cfg, &lens, |probe| {
        let s = probe.scheduling.p3.slice_elems.elems().unwrap_or_default();
        let toml = probe.to_toml_string().map_err(|e| {
            LaunchError::Io(
                "writing a probe's configuration".into(),
                std::io::Error::other(e),
            )
        })?;
        launch_file(opts, &format!("p3-probe-{s}"), &toml)
    })
    .map_err(launch_err)?;
    eprintln!(
        "bench sched: P3 slice size {} elements (probe rounds {:?} ms for {:?})",
        tuning.chosen, tuning.round_ms, tuning.candidates
    );
    Ok(tuning)
}

/// Runs a comparison: `repeats` alternating runs of the baseline job (`config(false)`, runs
/// named `names[0]-i`) and the scheduled one (`config(true)`, `names[1]-i`).
fn alternate(
    opts: &SchedBenchOptions,
    names: [&str; 2],
    config: impl Fn(bool) -> String,
) -> Result<(Vec<RoundRun>, Vec<RoundRun>), SchedBenchError> {
    let (mut base, mut on_runs) = (Vec::new(), Vec::new());
    for i in 1..=repeats(opts.quick) {
        for on in [false, true] {
            let name = format!("{}-{i}", names[usize::from(on)]);
            let r = launch_run(opts, &name, &config(on))?;
            let run = RoundRun::from_report(&name, &r)?;
            eprintln!(
                "bench sched: {name}: round {:.1} ms (compute {:.1}, wait {:.1}, apply {:.1}), \
                 lab {} p99 lateness {}",
                run.round_ms,
                run.compute_ms,
                run.wait_ms,
                run.apply_ms,
                run.lab.mode,
                fmt_us(run.lab.p99_lateness_us)
            );
            if on { &mut on_runs } else { &mut base }.push(run);
        }
    }
    Ok((base, on_runs))
}

/// Runs the benchmark and writes `results.json` and `results.md` into `opts.out`.
pub fn run(opts: &SchedBenchOptions) -> Result<SchedBenchResult, SchedBenchError> {
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let quick = opts.quick;
    let tuning = tune_p3(opts)?;
    let (fifo, p3) = alternate(opts, ["fifo", "p3"], |on| {
        p3_config(quick, on, Some(tuning.chosen))
    })?;
    let (direct, tsengine) = alternate(opts, ["direct", "tsengine"], |on| ts_config(quick, on))?;
    let params = p3_params();
    let wire_ms = 1e3 * (params * 4 * 8) as f64 / (P3_RATE_MBIT * 1e6);
    let result = SchedBenchResult {
        quick,
        rounds: rounds(quick),
        p3: P3Result {
            p3_speedup: median_of(&fifo, |r| r.round_ms) / median_of(&p3, |r| r.round_ms),
            slice_elems: tuning.chosen,
            slice_tuning: tuning.clone(),
            comm_to_compute: wire_ms / median_of(&fifo, |r| r.compute_ms),
            params,
            same_result: fifo.iter().chain(&p3).all(|r| {
                r.replicas_identical && fifo.first().is_some_and(|f| f.param_hash == r.param_hash)
            }),
            fifo,
            p3,
        },
        p3_config: p3_config(quick, true, None),
        tsengine: TsResult {
            tsengine_speedup: median_of(&direct, |r| r.round_ms)
                / median_of(&tsengine, |r| r.round_ms),
            rounds: ts_rounds(quick),
            params: mlp_params(&TS_HIDDEN),
            direct,
            tsengine,
        },
        tsengine_config: ts_config(quick, false),
    };
    let json = opts.out.join("results.json");
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    std::fs::write(&json, text).map_err(io_err(&json))?;
    let md = opts.out.join("results.md");
    std::fs::write(&md, render_markdown(&result)).map_err(io_err(&md))?;
    Ok(result)
}

fn fmt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.0} µs"))
}

/// What the slice tuning measured, in words.
fn tuning_text(t: &SliceTuning) -> String {
    if t.round_ms.is_empty() {
        return "`slice_elems = \"auto\"`: the only candidate".into();
    }
    format!(
        "`slice_elems = \"auto\"`, the fastest of {}-round probes: {}",
        t.probe_rounds,
        t.probes_text()
    )
}

/// The results as Markdown: one row per mode (medians) and the runs' figures.
pub fn render_markdown(r: &SchedBenchResult) -> String {
    let p = &r.p3;
    let runs = p.fifo.len();
    let mut s = format!(
        "## P3 against first in first out\n\n\
         2 DCs × 1 worker, one global server, portable driver; WAN links {P3_RATE_MBIT} Mbit/s, \
         {P3_DELAY_MS} ms one way. MLP hidden {P3_HIDDEN:?} on {P3_FEATURES} synthetic features \
         ({} parameters) with emulated compute {P3_LAYER_DELAY_MS:?} ms per layer forward (twice \
         that backward), batch {BATCH_SIZE}, {} rounds{}; P3 slices of {} elements ({}), each \
         connection's credit sized to its path (the default; the pushing connections' credits \
         in the table). One round's \
         push takes {:.2}× the FIFO compute time on the wire. Medians of {runs} run(s) per mode, \
         runs alternating.\n\n\
         | mode | round | compute | wait | apply | per run | credits | lab p99 lateness | \
         same θ |\n|---|---|---|---|---|---|---|---|---|\n",
        p.params,
        r.rounds,
        if r.quick { ", --quick" } else { "" },
        p.slice_elems,
        tuning_text(&p.slice_tuning),
        p.comm_to_compute,
    );
    for (name, rows) in [("FIFO", &p.fifo), ("P3", &p.p3)] {
        let med = |f: fn(&RoundRun) -> f64| median_of(rows, f);
        let per_run: Vec<String> = rows.iter().map(|x| format!("{:.1}", x.round_ms)).collect();
        let lateness: Vec<String> = rows.iter().map(|x| fmt_us(x.lab.p99_lateness_us)).collect();
        let credits: Vec<String> = rows
            .iter()
            .flat_map(|x| &x.tuned_credits)
            .map(|c| format!("{} KiB", c >> 10))
            .collect();
        s.push_str(&format!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {} | {} |\n",
            med(|x| x.round_ms),
            med(|x| x.compute_ms),
            med(|x| x.wait_ms),
            med(|x| x.apply_ms),
            per_run.join(" / "),
            if credits.is_empty() {
                "–".into()
            } else {
                credits.join(", ")
            },
            lateness.join(" / "),
            if p.same_result { "yes" } else { "no" },
        ));
    }
    s.push_str(&format!("\n**p3_speedup = {:.3}**\n", p.p3_speedup));
    s.push_str(&render_roles([("FIFO", &p.fifo), ("P3", &p.p3)]));
    s.push_str(&render_tsengine(&r.tsengine, r.quick));
    s
}

/// The TSEngine comparison as Markdown.
fn render_tsengine(t: &TsResult, quick: bool) -> String {
    let sites: Vec<String> = TS_SITES
        .iter()
        .map(|(n, rate, delay)| format!("{n} {rate} Mbit/s {delay} ms"))
        .collect();
    let mut s = format!(
        "\n## TSEngine against direct push and pull\n\n\
         {} DCs × 1 worker, one global server at the central site (link {} Mbit/s, {} ms one \
         way); DC links {}. MLP hidden {TS_HIDDEN:?} on {P3_FEATURES} synthetic features ({} \
         parameters) with emulated compute {TS_LAYER_DELAY_MS:?} ms per layer forward (twice \
         that backward), batch {BATCH_SIZE}, {} rounds{}. Medians of {} run(s) per mode, runs \
         alternating.\n\n\
         | mode | round | compute | wait | per run | WAN bytes | lab p99 lateness |\n\
         |---|---|---|---|---|---|---|\n",
        TS_SITES.len(),
        TS_CENTRAL.0,
        TS_CENTRAL.1,
        sites.join(", "),
        t.params,
        t.rounds,
        if quick { ", --quick" } else { "" },
        t.direct.len(),
    );
    for (name, rows) in [("direct", &t.direct), ("TSEngine", &t.tsengine)] {
        let med = |f: fn(&RoundRun) -> f64| median_of(rows, f);
        let per_run: Vec<String> = rows.iter().map(|x| format!("{:.1}", x.round_ms)).collect();
        let lateness: Vec<String> = rows.iter().map(|x| fmt_us(x.lab.p99_lateness_us)).collect();
        s.push_str(&format!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {:.0} | {} |\n",
            med(|x| x.round_ms),
            med(|x| x.compute_ms),
            med(|x| x.wait_ms),
            per_run.join(" / "),
            med(|x| x.wan_bytes as f64),
            lateness.join(" / "),
        ));
    }
    s.push_str(&format!(
        "\n**tsengine_speedup = {:.3}**\n",
        t.tsengine_speedup
    ));
    s.push_str(&render_roles([
        ("direct", &t.direct),
        ("TSEngine", &t.tsengine),
    ]));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, P3Config, SliceElems};

    #[test]
    fn both_jobs_are_valid_and_differ_only_in_p3() {
        for quick in [false, true] {
            let fifo = Config::from_toml_str(&p3_config(quick, false, Some(16_384))).unwrap();
            let p3 = Config::from_toml_str(&p3_config(quick, true, Some(16_384))).unwrap();
            let auto = Config::from_toml_str(&p3_config(quick, true, None)).unwrap();
            assert_eq!(auto.scheduling.p3.slice_elems, SliceElems::Auto);
            assert!(!fifo.scheduling.p3.enabled && p3.scheduling.p3.enabled);
            let mut same = p3.clone();
            same.scheduling.p3.enabled = false;
            assert_eq!(same, fifo);
            assert_eq!(p3.model.hidden.len() + 1, 8, "8 layers");
            // The credit is the default, sized to each connection's path.
            assert_eq!(
                p3.scheduling.p3,
                P3Config {
                    enabled: true,
                    slice_elems: SliceElems::Elems(16_384),
                    ..P3Config::default()
                }
            );
        }
        let cfg = Config::from_toml_str(&p3_config(true, true, None)).unwrap();
        let model = crate::engine::build_model(&cfg.model, P3_FEATURES, 10).unwrap();
        assert_eq!(p3_params(), model.num_params());
        // Most parameters in the last layers.
        let last = model.tensors()[12].len();
        assert!(last as f64 > 0.7 * p3_params() as f64, "{last}");
    }

    #[test]
    fn the_tsengine_jobs_are_valid_and_differ_only_in_tsengine() {
        for quick in [false, true] {
            let direct = Config::from_toml_str(&ts_config(quick, false)).unwrap();
            let ts = Config::from_toml_str(&ts_config(quick, true)).unwrap();
            assert!(!direct.scheduling.tsengine.inter && ts.scheduling.tsengine.inter);
            let mut same = ts.clone();
            same.scheduling.tsengine.inter = false;
            assert_eq!(same, direct);
            assert_eq!(ts.cluster.data_centers.len(), TS_SITES.len());
            // The central link is the slowest.
            let sites = ts.wan_sites();
            let rates: Vec<f64> = sites
                .iter()
                .filter_map(|s| ts.wan_link(s).rate_mbit)
                .collect();
            assert_eq!(rates.len(), TS_SITES.len() + 1);
            assert!(rates[1..].iter().all(|&r| r > rates[0]), "{rates:?}");
        }
        let cfg = Config::from_toml_str(&ts_config(true, true)).unwrap();
        let model = crate::engine::build_model(&cfg.model, P3_FEATURES, 10).unwrap();
        assert_eq!(mlp_params(&TS_HIDDEN), model.num_params());
        // examples/tsengine.toml is this job (its own length and evaluation).
        let ex = Config::from_toml_str(include_str!("../../examples/tsengine.toml")).unwrap();
        assert!(ex.scheduling.tsengine.inter);
        assert_eq!(ex.scheduling, cfg.scheduling);
        assert_eq!(ex.cluster, cfg.cluster);
        assert_eq!(ex.wan, cfg.wan);
        assert_eq!(ex.timeouts, cfg.timeouts);
        assert_eq!(ex.timeouts.peer_dead_ms, TS_PEER_DEAD_MS);
        assert_eq!(ex.model, cfg.model);
        assert_eq!(ex.data.synthetic, cfg.data.synthetic);
    }

    #[test]
    fn the_markdown_shows_the_speedup_and_every_run() {
        let run = |ms: f64| RoundRun {
            round_ms: ms,
            compute_ms: 100.0,
            wait_ms: ms - 100.0,
            apply_ms: 1.0,
            replicas_identical: true,
            param_hash: "ab".into(),
            wan_bytes: 1,
            tuned_credits: vec![262144],
            lab: LabFidelity {
                mode: "netns".into(),
                p99_lateness_us: Some(250.0),
                ..LabFidelity::default()
            },
            role_splits: vec![RoleSplitRow {
                role: "local_server".into(),
                processes: 2,
                split: RoleSplit {
                    rounds: 12,
                    wan_wait_ms: ms / 2.0,
                    lan_wait_ms: ms / 2.0,
                    ..RoleSplit::default()
                },
            }],
        };
        let r = SchedBenchResult {
            quick: true,
            rounds: 12,
            p3: P3Result {
                fifo: vec![run(300.0), run(320.0)],
                p3: vec![run(240.0), run(250.0)],
                p3_speedup: 1.25,
                slice_elems: 16_384,
                slice_tuning: SliceTuning {
                    probe_rounds: 5,
                    candidates: vec![4_096, 16_384, 65_536],
                    round_ms: vec![261.5, 255.25, 270.0],
                    chosen: 16_384,
                },
                comm_to_compute: 1.1,
                params: p3_params(),
                same_result: true,
            },
            p3_config: String::new(),
            tsengine: TsResult {
                direct: vec![run(900.0)],
                tsengine: vec![run(600.0)],
                tsengine_speedup: 1.5,
                rounds: 5,
                params: mlp_params(&TS_HIDDEN),
            },
            tsengine_config: String::new(),
        };
        let md = render_markdown(&r);
        assert!(md.contains("tsengine_speedup = 1.500"), "{md}");
        assert!(md.contains("600.0"), "{md}");
        assert!(md.contains("p3_speedup = 1.250"), "{md}");
        assert!(md.contains("300.0 / 320.0"), "{md}");
        assert!(md.contains("250 µs"), "{md}");
        assert!(md.contains("256 KiB"), "{md}");
        // The roles' table: medians over each mode's runs (FIFO 300 and 320 ms: the upper
        // median, 160 ms each way).
        assert!(
            md.contains("| FIFO | local server | 0.0 | 0.0 | 160.0 | 160.0 | 0.0 |"),
            "{md}"
        );
        assert!(md.contains("| TSEngine | local server | 0.0 | 0.0 | 300.0 | 300.0 | 0.0 |"));
        assert!(render_roles([("a", &[]), ("b", &[])]).is_empty());
    }
}
