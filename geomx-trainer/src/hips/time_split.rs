//! Where each role's round went: compute, codec, LAN wait, WAN wait and idle, in milliseconds
//! per training round, for the job report (`role_splits`) and the e2e results
//! (docs/benchmarks.md, "Where each role's round went").
//!
//! - **Workers** (one training thread): compute is forward, backward, the local steps, updating
//!   the replica and the copies between the host and the model's tensors; codec is encoding
//!   pushes and decoding replies; LAN wait is waiting for the local server's replies or
//!   averagings (its only peer); idle is waiting for batches and the rest of the round.
//! - **Servers** are measured as processes, whatever their threads do at once: at every moment
//!   the process is in the most telling phase any of its threads is in. WAN wait while some
//!   thread waits on the WAN (a local server's uplink waiting for the global tier's replies,
//!   or under P3 for its socket to take a push); else busy while some thread handles a round
//!   (encoding, decoding, summing, the optimizer), split into codec and compute in the
//!   proportion of the threads' own codec time; else idle while some thread hands replies on
//!   or writes a checkpoint; else waiting for its peers: LAN wait at a local server (the DC's
//!   workers computing and pushing), WAN wait at a global server (the DCs). The time runs from
//!   the first round's work to the last. A local server's phases are those of its key uplinks
//!   (from the moment a key's sum is complete to the moment its reply is handed on), so its
//!   decoding and summing of the workers' pushes, on the threads that read them, is part of its
//!   LAN wait; a global server's are those of its request handlers.
//!
//! A worker's LAN wait contains its local server's WAN wait: the local server's row says how
//! much of a round the WAN took.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::throughput::WorkerThroughput;
use crate::clock::Mark;

/// Milliseconds per training round by part (one process, or the mean of a role's processes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleSplit {
    /// Training rounds the figures are over.
    pub rounds: u64,
    /// The role's own arithmetic.
    pub compute_ms: f64,
    /// Encoding and decoding payloads.
    pub codec_ms: f64,
    /// Waiting on peers inside the data center.
    pub lan_wait_ms: f64,
    /// Waiting on peers across the WAN.
    pub wan_wait_ms: f64,
    /// The rest of the round.
    pub idle_ms: f64,
}

impl RoleSplit {
    /// A worker's split from its throughput figures (see the module docs).
    pub fn of_worker(t: &WorkerThroughput) -> RoleSplit {
        let s = &t.split;
        RoleSplit {
            rounds: t.rounds,
            compute_ms: s.compute_ms + s.apply_ms + s.copy_ms,
            codec_ms: s.codec_ms,
            lan_wait_ms: s.wait_ms,
            wan_wait_ms: 0.0,
            idle_ms: s.data_ms + s.other_ms,
        }
    }

    /// All parts together: the round's time.
    pub fn total_ms(&self) -> f64 {
        self.compute_ms + self.codec_ms + self.lan_wait_ms + self.wan_wait_ms + self.idle_ms
    }

    /// The mean of `splits` (`None` for none).
    pub fn mean(splits: &[RoleSplit]) -> Option<RoleSplit> {
        let n = splits.len() as f64;
        Self::combine(splits, |v| v.iter().fold(0.0, |m, x| m + x / n))
    }

    /// Each part of `splits` combined by `f` (a mean, a median) over their values of it, and
    /// the most rounds of any (`None` for none).
    pub fn combine(splits: &[RoleSplit], f: impl Fn(Vec<f64>) -> f64) -> Option<RoleSplit> {
        if splits.is_empty() {
            return None;
        }
        let part = |g: fn(&RoleSplit) -> f64| f(splits.iter().map(g).collect());
        Some(RoleSplit {
            rounds: splits.iter().map(|s| s.rounds).max().unwrap_or(0),
            compute_ms: part(|s| s.compute_ms),
            codec_ms: part(|s| s.codec_ms),
            lan_wait_ms: part(|s| s.lan_wait_ms),
            wan_wait_ms: part(|s| s.wan_wait_ms),
            idle_ms: part(|s| s.idle_ms),
        })
    }
}

/// A role's mean split in the job report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleSplitRow {
    /// Role name (`worker`, `local_server`, `global_server`).
    pub role: String,
    /// Processes of the role that reported a split.
    pub processes: usize,
    /// Their mean split.
    #[serde(flatten)]
    pub split: RoleSplit,
}

/// What a server's thread is doing, for its process's [`PhaseClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting on the WAN.
    Wan,
    /// Handling a round: codec and compute.
    Busy,
    /// Handing replies on, checkpoints: idle.
    Other,
}

/// What a server process waits on when none of its threads is in a [`Phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Its LAN peers (a local server's workers).
    Lan,
    /// Its WAN peers (a global server's DCs).
    Wan,
}

#[derive(Debug, Default)]
struct ClockState {
    /// Threads in each phase (index: [`Phase`] as usize).
    inside: [u32; 3],
    /// The last change, once the clock started.
    since: Option<std::time::Instant>,
    /// Time in each phase as the process's phase, and (index 3) waiting.
    spent: [Duration; 4],
    /// The threads' own busy time and its codec part.
    busy_threads: Duration,
    codec_threads: Duration,
}

impl ClockState {
    /// The process's phase now: the first of WAN, busy, other that some thread is in.
    fn current(&self) -> usize {
        (0..3).find(|&i| self.inside[i] > 0).unwrap_or(3)
    }

    fn advance(&mut self, now: std::time::Instant) {
        if let Some(s) = self.since {
            let cur = self.current();
            self.spent[cur] += now.saturating_duration_since(s);
        }
        self.since = Some(now);
    }
}

/// A server process's time by phase over its threads (see the module docs).
#[derive(Debug)]
pub struct PhaseClock {
    waiting: Waiting,
    state: Mutex<ClockState>,
}

impl PhaseClock {
    /// A clock that books the time no thread is in a phase as `waiting`; it starts at the
    /// first [`PhaseClock::enter`].
    pub fn new(waiting: Waiting) -> PhaseClock {
        PhaseClock {
            waiting,
            state: Mutex::new(ClockState::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ClockState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A thread enters `phase` (phases nest: a busy thread may wait on the WAN).
    pub fn enter(&self, phase: Phase) {
        self.with(|s| {
            s.advance(std::time::Instant::now());
            s.inside[phase as usize] += 1;
        });
    }

    /// A thread leaves `phase`.
    pub fn leave(&self, phase: Phase) {
        self.with(|s| {
            s.advance(std::time::Instant::now());
            s.inside[phase as usize] = s.inside[phase as usize].saturating_sub(1);
        });
    }

    /// A thread was busy since `since`, less `waited` on the WAN meanwhile: its codec part of
    /// that divides the process's busy time into codec and compute.
    pub fn thread_busy(&self, since: Mark, waited: Duration) {
        let spent = since.elapsed();
        self.with(|s| {
            s.busy_threads += spent.wall.saturating_sub(waited);
            s.codec_threads += spent.codec;
        });
    }

    /// The time since the first phase to the last change, per training round of `rounds`.
    pub fn split(&self, rounds: u64) -> Option<RoleSplit> {
        let s = self.with(|s| (s.spent, s.busy_threads, s.codec_threads));
        let (spent, busy_threads, codec_threads) = s;
        let wall: Duration = spent.iter().sum();
        if rounds == 0 || wall.is_zero() {
            return None;
        }
        let ms = |x: Duration| x.as_secs_f64() * 1e3 / rounds as f64;
        let busy = ms(spent[Phase::Busy as usize]);
        let codec_share = if busy_threads.is_zero() {
            0.0
        } else {
            (codec_threads.as_secs_f64() / busy_threads.as_secs_f64()).min(1.0)
        };
        let waiting = ms(spent[3]);
        let (lan, wan_rest) = match self.waiting {
            Waiting::Lan => (waiting, 0.0),
            Waiting::Wan => (0.0, waiting),
        };
        Some(RoleSplit {
            rounds,
            compute_ms: busy * (1.0 - codec_share),
            codec_ms: busy * codec_share,
            lan_wait_ms: lan,
            wan_wait_ms: ms(spent[Phase::Wan as usize]) + wan_rest,
            idle_ms: ms(spent[Phase::Other as usize]),
        })
    }
}

/// Times a thread's waits on the WAN, telling its process's clock.
pub struct WanWait<'a> {
    clock: Option<&'a PhaseClock>,
    /// This thread's time waiting on the WAN so far.
    pub total: Duration,
}

impl<'a> WanWait<'a> {
    /// Waits told to `clock` (`None`: only timed).
    pub fn new(clock: Option<&'a PhaseClock>) -> Self {
        WanWait {
            clock,
            total: Duration::ZERO,
        }
    }

    /// Runs `f`, a wait on the WAN.
    pub fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        if let Some(c) = self.clock {
            c.enter(Phase::Wan);
        }
        let t = std::time::Instant::now();
        let out = f();
        self.total += t.elapsed();
        if let Some(c) = self.clock {
            c.leave(Phase::Wan);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hips::throughput::RoundMs;

    #[test]
    fn a_process_is_in_the_most_telling_phase_of_its_threads() {
        let c = PhaseClock::new(Waiting::Lan);
        assert_eq!(c.split(10), None);
        let pause = || std::thread::sleep(Duration::from_millis(30));
        // Thread A busy, then waiting on the WAN while thread B is busy: WAN counts.
        let t0 = std::time::Instant::now();
        c.enter(Phase::Busy);
        pause();
        c.enter(Phase::Wan);
        c.enter(Phase::Busy);
        pause();
        c.leave(Phase::Busy);
        c.leave(Phase::Wan);
        c.leave(Phase::Busy);
        // No thread in a phase: the local server waits for its workers.
        pause();
        c.enter(Phase::Other);
        pause();
        c.leave(Phase::Other);
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        c.thread_busy(Mark::now(), Duration::ZERO);
        let s = c.split(2).unwrap();
        let at_least = |x: f64| x >= 15.0 - 1e-9;
        assert!(at_least(s.compute_ms) && at_least(s.wan_wait_ms), "{s:?}");
        assert!(at_least(s.lan_wait_ms) && at_least(s.idle_ms), "{s:?}");
        // Nothing counted twice: the parts are no more than the wall time (4 pauses, 2 rounds).
        assert!(s.total_ms() >= 60.0 - 1e-9, "{s:?}");
        assert!(s.total_ms() * 2.0 <= wall + 1e-6, "{s:?} over {wall} ms");
        assert_eq!((s.codec_ms, s.rounds), (0.0, 2));
        // A global server's waiting is WAN wait; busy time splits by the threads' codec share.
        let g = PhaseClock::new(Waiting::Wan);
        g.enter(Phase::Busy);
        let m = Mark::now();
        {
            let _c = crate::clock::span();
            pause();
        }
        pause();
        g.thread_busy(m, Duration::ZERO);
        g.leave(Phase::Busy);
        pause();
        g.enter(Phase::Busy);
        g.leave(Phase::Busy);
        let s = g.split(1).unwrap();
        assert!(s.codec_ms > 0.0 && s.compute_ms > 0.0, "{s:?}");
        assert!((s.codec_ms + s.compute_ms) >= 60.0 - 1e-9, "{s:?}");
        assert!(at_least(s.wan_wait_ms) && s.lan_wait_ms == 0.0, "{s:?}");
        // WanWait times its waits and tells the clock.
        let mut w = WanWait::new(Some(&g));
        assert_eq!(w.time(|| 7), 7);
        let mut quiet = WanWait::new(None);
        quiet.time(pause);
        assert!(quiet.total >= Duration::from_millis(30));
    }

    #[test]
    fn a_workers_split_maps_its_throughput_parts() {
        let t = WorkerThroughput {
            dc: 0,
            rank: 1,
            rounds: 5,
            samples: 160,
            train_seconds: 1.0,
            samples_per_s: 160.0,
            split: RoundMs {
                data_ms: 1.0,
                compute_ms: 100.0,
                wait_ms: 80.0,
                apply_ms: 4.0,
                codec_ms: 10.0,
                copy_ms: 2.0,
                other_ms: 5.0,
            },
        };
        let r = RoleSplit::of_worker(&t);
        assert_eq!(
            (
                r.compute_ms,
                r.codec_ms,
                r.lan_wait_ms,
                r.wan_wait_ms,
                r.idle_ms
            ),
            (106.0, 10.0, 80.0, 0.0, 6.0)
        );
        assert_eq!(r.total_ms(), 202.0);
        let m = RoleSplit::mean(&[r, RoleSplit { idle_ms: 16.0, ..r }]).unwrap();
        assert_eq!(m.idle_ms, 11.0);
        assert_eq!(RoleSplit::mean(&[]), None);
    }
}
