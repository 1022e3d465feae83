//! A worker's throughput and where its step time goes, for the job report.
//!
//! Each round a worker records how long it waited for its batch (`data`), computed (forward and
//! backward; the pushes are sent as each key's payload is ready: `compute`), waited for the
//! servers' replies (`wait`), applied them to its replica (`apply`), encoded its pushes and
//! decoded the replies (`codec`, [`crate::clock::span`]; a model that encodes on its GPU counts
//! that as `compute`) and copied parameters, gradients and batches between the host and the
//! model's tensors (`copy`, [`crate::clock::copy_span`]: the host thread's part of a GPU model's
//! transfers; none for the built-in engine, which computes on the host vectors). Under HFA and
//! ESync the local steps count as `compute` and the exchanges with the coordinator and the
//! averaging as `wait`. Evaluation and checkpoints are not part of a step.

use std::time::Duration;

use crate::clock::Mark;

use serde::{Deserialize, Serialize};

/// Seconds of one round, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepSplit {
    /// Training samples the round consumed.
    pub samples: u64,
    /// Waiting for the next batch (the prefetch thread had not prepared it).
    pub data_s: f64,
    /// Forward and backward (and starting the pushes).
    pub compute_s: f64,
    /// Waiting for replies or for the averaging of the other workers.
    pub wait_s: f64,
    /// Updating the replica with the replies.
    pub apply_s: f64,
    /// Encoding pushes and decoding replies.
    pub codec_s: f64,
    /// Copying between the host and the model's tensors.
    pub copy_s: f64,
}

/// A part of a worker's round that [`StepSplit::charge`] books time to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPart {
    /// [`StepSplit::compute_s`].
    Compute,
    /// [`StepSplit::wait_s`].
    Wait,
    /// [`StepSplit::apply_s`].
    Apply,
}

impl StepSplit {
    /// Books the time since `since` to `part`, less what this thread spent in codecs and
    /// copies meanwhile, which goes to `codec_s` and `copy_s`.
    pub fn charge(&mut self, part: StepPart, since: Mark) {
        let spent = since.elapsed();
        self.codec_s += spent.codec.as_secs_f64();
        self.copy_s += spent.copy.as_secs_f64();
        let rest = spent.rest().as_secs_f64();
        match part {
            StepPart::Compute => self.compute_s += rest,
            StepPart::Wait => self.wait_s += rest,
            StepPart::Apply => self.apply_s += rest,
        }
    }

    /// Seconds booked to wait, apply, codec and copy: what a part that contains those calls
    /// leaves out of its own time.
    pub fn booked(&self) -> f64 {
        self.wait_s + self.apply_s + self.codec_s + self.copy_s
    }
}

/// Mean milliseconds per round, by part (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundMs {
    /// Waiting for the batch.
    pub data_ms: f64,
    /// Forward and backward (HFA, ESync: the local steps).
    pub compute_ms: f64,
    /// Waiting for replies (HFA, ESync: the averaging).
    pub wait_ms: f64,
    /// Updating the replica with the replies.
    pub apply_ms: f64,
    /// Encoding pushes and decoding replies.
    #[serde(default)]
    pub codec_ms: f64,
    /// Copying between the host and the model's tensors.
    #[serde(default)]
    pub copy_ms: f64,
    /// The rest of the round (bookkeeping, progress lines).
    pub other_ms: f64,
}

impl RoundMs {
    /// The mean of `parts` (none: zeros).
    fn mean<'a>(parts: impl ExactSizeIterator<Item = &'a RoundMs>) -> RoundMs {
        let n = parts.len().max(1) as f64;
        let mut m = RoundMs::default();
        for p in parts {
            m.data_ms += p.data_ms / n;
            m.compute_ms += p.compute_ms / n;
            m.wait_ms += p.wait_ms / n;
            m.apply_ms += p.apply_ms / n;
            m.codec_ms += p.codec_ms / n;
            m.copy_ms += p.copy_ms / n;
            m.other_ms += p.other_ms / n;
        }
        m
    }
}

/// A worker's throughput over a run (the job report's `workers`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerThroughput {
    /// Data center.
    pub dc: u32,
    /// Rank within the data center.
    pub rank: u32,
    /// Rounds recorded.
    pub rounds: u64,
    /// Training samples consumed.
    pub samples: u64,
    /// Seconds of the recorded rounds (without evaluation and checkpoints).
    pub train_seconds: f64,
    /// `samples / train_seconds`.
    pub samples_per_s: f64,
    /// Where a round's time went.
    #[serde(flatten)]
    pub split: RoundMs,
}

/// The workers of a run together: their summed samples per second and the mean of their
/// per-round split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanSplit {
    /// Samples per second of all workers.
    pub samples_per_s: f64,
    /// The workers' mean split.
    #[serde(flatten)]
    pub split: RoundMs,
}

impl MeanSplit {
    /// The workers' figures together; `None` for none.
    pub fn of(workers: &[WorkerThroughput]) -> Option<MeanSplit> {
        if workers.is_empty() {
            return None;
        }
        Some(MeanSplit {
            samples_per_s: workers.iter().map(|w| w.samples_per_s).sum(),
            split: RoundMs::mean(workers.iter().map(|w| &w.split)),
        })
    }
}

/// Sums of a worker's rounds.
#[derive(Debug, Clone, Default)]
pub struct ThroughputMeter {
    rounds: u64,
    wall_s: f64,
    /// The rounds' splits summed (their samples too).
    parts: StepSplit,
}

impl ThroughputMeter {
    /// Records a round of `wall`, split as `split`.
    pub fn record(&mut self, wall: Duration, split: StepSplit) {
        self.rounds += 1;
        self.wall_s += wall.as_secs_f64();
        self.parts.samples += split.samples;
        self.parts.data_s += split.data_s;
        self.parts.compute_s += split.compute_s;
        self.parts.wait_s += split.wait_s;
        self.parts.apply_s += split.apply_s;
        self.parts.codec_s += split.codec_s;
        self.parts.copy_s += split.copy_s;
    }

    /// The summary of worker (`dc`, `rank`); `None` before any round.
    pub fn summary(&self, dc: u32, rank: u32) -> Option<WorkerThroughput> {
        if self.rounds == 0 {
            return None;
        }
        let per_round = |s: f64| s * 1e3 / self.rounds as f64;
        let p = &self.parts;
        let parts = p.data_s + p.compute_s + p.wait_s + p.apply_s + p.codec_s + p.copy_s;
        Some(WorkerThroughput {
            dc,
            rank,
            rounds: self.rounds,
            samples: p.samples,
            train_seconds: self.wall_s,
            samples_per_s: if self.wall_s > 0.0 {
                p.samples as f64 / self.wall_s
            } else {
                0.0
            },
            split: RoundMs {
                data_ms: per_round(p.data_s),
                compute_ms: per_round(p.compute_s),
                wait_ms: per_round(p.wait_s),
                apply_ms: per_round(p.apply_s),
                codec_ms: per_round(p.codec_s),
                copy_ms: per_round(p.copy_s),
                other_ms: per_round((self.wall_s - parts).max(0.0)),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_moves_the_codec_time_out_of_its_part() {
        let mut split = StepSplit::default();
        let spin = |d: Duration| {
            let t = std::time::Instant::now();
            while t.elapsed() < d {
                std::hint::spin_loop();
            }
        };
        let m = Mark::now();
        spin(Duration::from_millis(10));
        {
            let _c = crate::clock::span();
            spin(Duration::from_millis(20));
        }
        split.charge(StepPart::Wait, m);
        assert!(split.codec_s >= 0.020, "{split:?}");
        assert!(split.wait_s >= 0.010, "{split:?}");
        assert_eq!((split.compute_s, split.apply_s), (0.0, 0.0));
        assert_eq!(split.booked(), split.wait_s + split.codec_s);
        // A part with no codec work keeps all of its time.
        let codec = split.codec_s;
        let m = Mark::now();
        spin(Duration::from_millis(5));
        split.charge(StepPart::Compute, m);
        assert!(split.compute_s >= 0.005, "{split:?}");
        assert_eq!(split.codec_s, codec);
        assert_eq!(split.copy_s, 0.0);
        // Copies go to their own part.
        let (compute, m) = (split.compute_s, Mark::now());
        {
            let _c = crate::clock::copy_span();
            spin(Duration::from_millis(10));
        }
        split.charge(StepPart::Compute, m);
        assert!(split.copy_s >= 0.010, "{split:?}");
        assert!(split.compute_s - compute < 0.010, "{split:?}");
        assert_eq!(split.codec_s, codec);
        assert_eq!(
            split.booked(),
            split.wait_s + split.apply_s + split.codec_s + split.copy_s
        );
    }

    #[test]
    fn the_summary_averages_rounds_and_keeps_the_rest_apart() {
        let mut m = ThroughputMeter::default();
        assert_eq!(m.summary(0, 0), None);
        let split = |d, c, w, a| StepSplit {
            samples: 32,
            data_s: d,
            compute_s: c,
            wait_s: w,
            apply_s: a,
            codec_s: a / 2.0,
            copy_s: a / 4.0,
        };
        m.record(Duration::from_millis(100), split(0.01, 0.05, 0.02, 0.01));
        m.record(Duration::from_millis(300), split(0.03, 0.15, 0.06, 0.03));
        let s = m.summary(1, 2).unwrap();
        assert_eq!((s.dc, s.rank, s.rounds, s.samples), (1, 2, 2, 64));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(s.train_seconds, 0.4), "{s:?}");
        assert!(close(s.samples_per_s, 160.0), "{s:?}");
        let p = s.split;
        assert!(
            close(p.data_ms, 20.0) && close(p.compute_ms, 100.0),
            "{s:?}"
        );
        assert!(close(p.wait_ms, 40.0) && close(p.apply_ms, 20.0), "{s:?}");
        assert!(close(p.codec_ms, 10.0) && close(p.copy_ms, 5.0), "{s:?}");
        assert!(close(p.other_ms, 5.0), "{s:?}");
        let mut t = s.clone();
        t.samples_per_s = 40.0;
        t.split.compute_ms = 300.0;
        let m = MeanSplit::of(&[s.clone(), t]).unwrap();
        assert!(close(m.samples_per_s, 200.0), "{m:?}");
        assert!(
            close(m.split.compute_ms, 200.0) && close(m.split.wait_ms, 40.0),
            "{m:?}"
        );
        // The JSON keeps the parts at the top level.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["compute_ms"].as_f64(), Some(p.compute_ms));
        assert_eq!(serde_json::from_value::<WorkerThroughput>(json).unwrap(), s);
        assert_eq!(MeanSplit::of(&[]), None);
    }
}
