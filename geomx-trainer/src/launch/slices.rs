//! `scheduling.p3.slice_elems = "auto"`: `geomx launch` tunes P3's slice size before the job.
//!
//! Slices are keys, fixed for a job: every process cuts the tensors the same way, and each key
//! has its own version, aggregation and optimizer state on every role, so the size cannot change
//! while the job runs. Instead the launcher runs a short probe of the same job for each candidate
//! size ([`PROBE_ROUNDS`] rounds from θ_0, in the same kind of WAN lab, with no checkpoints,
//! export or injected faults), takes the workers' mean round time of each, and starts the job with
//! the fastest. The probes are thrown away, so the job trains exactly as one configured with the
//! chosen size; all probes together run at most 15 rounds. The report's `p3_tuning` says what was
//! measured ([`SliceTuning`]).
//!
//! The candidates trade preemption against per-key work: a layer-0 slice may wait behind one
//! slice being written on each hop (16,384 f32 elements are 4.4 ms at 120 Mbit/s), and each key
//! costs a version, an aggregation, an optimizer step and a request on every role.

use serde::{Deserialize, Serialize};

use super::LaunchError;
use crate::config::{Config, SliceElems};
use crate::report::Report;

/// The slice sizes tried, in elements (64 KiB to 1 MiB of f32).
pub const CANDIDATES: [usize; 3] = [4_096, 16_384, 65_536];

/// Rounds of each probe.
pub const PROBE_ROUNDS: u64 = 5;

/// What the tuning measured (the report's `p3_tuning`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceTuning {
    /// Rounds each probe ran (0: one candidate only, nothing to measure).
    pub probe_rounds: u64,
    /// The sizes tried, elements.
    pub candidates: Vec<usize>,
    /// Each candidate's round time, the mean over the probe's workers, ms (empty when nothing
    /// was measured).
    pub round_ms: Vec<f64>,
    /// The size the job ran with: the fastest (the smaller of equal ones).
    pub chosen: usize,
}

impl SliceTuning {
    /// Each probe's size and round time, e.g. `4096: 268.6 ms, 16384: 268.2 ms` (empty when
    /// nothing was measured).
    pub fn probes_text(&self) -> String {
        let probes: Vec<String> = self
            .candidates
            .iter()
            .zip(&self.round_ms)
            .map(|(s, ms)| format!("{s}: {ms:.1} ms"))
            .collect();
        probes.join(", ")
    }
}

/// Whether `cfg` asks for the slice size to be tuned.
pub fn wanted(cfg: &Config) -> bool {
    cfg.scheduling.p3.enabled && cfg.scheduling.p3.slice_elems == SliceElems::Auto
}

/// The candidates that cut tensors of `lens` elements differently: a size at least as large as
/// the largest tensor leaves every tensor whole, so only the smallest such is kept.
pub fn candidates(lens: &[usize]) -> Vec<usize> {
    let largest = lens.iter().copied().max().unwrap_or(0);
    let mut out = Vec::new();
    for c in CANDIDATES {
        out.push(c);
        if c >= largest {
            break;
        }
    }
    out
}

/// The probe of slice size `s`: `cfg` with that size, [`PROBE_ROUNDS`] rounds, evaluation only at
/// the end, and no checkpoints, export or injected NaNs.
pub fn probe_config(cfg: &Config, s: usize) -> Config {
    let mut c = cfg.clone();
    c.scheduling.p3.slice_elems = SliceElems::Elems(s);
    c.train.rounds = Some(PROBE_ROUNDS);
    c.train.epochs = None;
    c.train.eval_every = 0;
    c.train.inject_nan.clear();
    c.checkpoint.dir = None;
    c.checkpoint.export = None;
    c
}

/// The workers' mean round time of a run, ms (`None` without worker figures): their
/// `train_seconds / rounds`, training only.
pub fn round_ms(r: &Report) -> Option<f64> {
    let n = r.workers.len();
    (n > 0).then(|| {
        r.workers
            .iter()
            .map(|w| 1e3 * w.train_seconds / w.rounds.max(1) as f64)
            .sum::<f64>()
            / n as f64
    })
}

/// Tunes the slice size of `cfg`, whose model has tensors of `lens` elements: `probe` runs each
/// candidate's probe job ([`probe_config`]) and returns its report.
pub fn tune(
    cfg: &Config,
    lens: &[usize],
    mut probe: impl FnMut(&Config) -> Result<Report, LaunchError>,
) -> Result<SliceTuning, LaunchError> {
    let candidates = candidates(lens);
    if let [only] = candidates[..] {
        return Ok(SliceTuning {
            probe_rounds: 0,
            candidates,
            round_ms: Vec::new(),
            chosen: only,
        });
    }
    let mut times = Vec::with_capacity(candidates.len());
    for &s in &candidates {
        let report = probe(&probe_config(cfg, s))?;
        let ms = round_ms(&report).ok_or_else(|| {
            LaunchError::Tuning(format!("the probe of {s} elements reported no worker"))
        })?;
        tracing::info!(slice_elems = s, round_ms = ms, "P3 slice size probed");
        times.push(ms);
    }
    let best = (0..candidates.len())
        .min_by(|&a, &b| times[a].total_cmp(&times[b]))
        .expect("at least two candidates");
    Ok(SliceTuning {
        probe_rounds: PROBE_ROUNDS,
        chosen: candidates[best],
        candidates,
        round_ms: times,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hips::throughput::WorkerThroughput;

    #[test]
    fn candidates_stop_at_the_first_that_leaves_every_tensor_whole() {
        assert_eq!(candidates(&[733_322, 10]), CANDIDATES);
        assert_eq!(candidates(&[10_000, 64]), [4_096, 16_384]);
        assert_eq!(candidates(&[4_096]), [4_096]);
        assert_eq!(candidates(&[]), [4_096]);
        // Within the 15 rounds the issue allows.
        assert!(CANDIDATES.len() as u64 * PROBE_ROUNDS <= 15);
    }

    #[test]
    fn a_probe_is_the_job_with_one_size_and_a_few_rounds() {
        let mut cfg = Config::from_toml_str(
            "[scheduling.p3]\nenabled = true\nslice_elems = \"auto\"\n\
             [train]\nepochs = 3\neval_every = 2\n\
             [[train.inject_nan]]\ndc = 0\nrank = 0\nround = 1\nkey = 0\n\
             [checkpoint]\ndir = \"/tmp/geomx-probe-ckpt\"\nexport = \"/tmp/geomx-probe.st\"\n",
        )
        .unwrap();
        assert!(wanted(&cfg));
        let p = probe_config(&cfg, 16_384);
        assert!(!wanted(&p));
        assert_eq!(p.scheduling.p3.slice_elems, SliceElems::Elems(16_384));
        assert_eq!((p.train.rounds, p.train.epochs), (Some(PROBE_ROUNDS), None));
        assert_eq!(p.train.eval_every, 0);
        assert!(p.train.inject_nan.is_empty());
        assert!(p.checkpoint.dir.is_none() && p.checkpoint.export.is_none());
        p.validate().unwrap();
        cfg.scheduling.p3.enabled = false;
        assert!(!wanted(&cfg), "nothing to tune without P3");
    }

    fn report(round_s: &[f64]) -> Report {
        let mut r = Report::assemble(
            Vec::new(),
            Vec::new(),
            5,
            1.0,
            Vec::new(),
            Default::default(),
        );
        r.workers = round_s
            .iter()
            .map(|&s| WorkerThroughput {
                rounds: 5,
                train_seconds: 5.0 * s,
                ..Default::default()
            })
            .collect();
        r
    }

    /// The fastest candidate wins (the smaller of equal ones); every probe runs its own size.
    #[test]
    fn the_fastest_probe_is_chosen() {
        let cfg = Config::default();
        let lens = [100_000];
        let mut seen = Vec::new();
        let t = tune(&cfg, &lens, |c| {
            let s = c.scheduling.p3.slice_elems.elems().unwrap();
            seen.push(s);
            Ok(report(match s {
                4_096 => &[0.30, 0.32],
                16_384 => &[0.25, 0.27],
                _ => &[0.26, 0.26],
            }))
        })
        .unwrap();
        assert_eq!(seen, CANDIDATES);
        assert_eq!(t.chosen, 16_384);
        assert_eq!(t.candidates, CANDIDATES);
        assert_eq!(t.probe_rounds, PROBE_ROUNDS);
        assert!((t.round_ms[1] - 260.0).abs() < 1e-9, "{:?}", t.round_ms);
        let tie = tune(&cfg, &lens, |_| Ok(report(&[0.2]))).unwrap();
        assert_eq!(tie.chosen, 4_096);
        // One candidate: nothing to measure.
        let one = tune(&cfg, &[100], |_| panic!("no probe")).unwrap();
        assert_eq!((one.chosen, one.probe_rounds), (4_096, 0));
        let e = tune(&cfg, &lens, |_| Ok(report(&[]))).unwrap_err();
        assert!(e.to_string().contains("no worker"), "{e}");
    }
}
