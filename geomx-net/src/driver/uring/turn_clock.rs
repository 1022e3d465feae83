//! Where a ring turn's time went, for a warning when one is slow.
//!
//! A ring serves every connection of its endpoint from one thread at a time, so while a turn
//! works (outside its wait for completions) no other connection of the endpoint is read,
//! written or timed. A turn that works for seconds is how a live peer gets declared silent: the
//! e2e hang of 2026-12-05 (a receive that stalled 27 s) and, on 2026-12-06, a local server whose
//! connection to the global server was not read for 27 s while the kernel held its bytes, which
//! ended in "no traffic from peer 0 for 10s". The warning names the phase, the part of the
//! completions (decoding, the endpoint's callbacks, reading a frame's rest inline) and the
//! slowest single completion, so the next such stall says where it was.

use std::time::{Duration, Instant};

/// A turn whose work (its wait for completions left out) takes this long is reported.
pub(super) const SLOW_TURN: Duration = crate::driver::SLOW_HANDLING;

/// Phases of a turn, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Commands from the senders (attach, queued output).
    Commands,
    /// Dispatching held frames and arming receives and sends.
    Arm,
    /// Waiting for completions (not work: left out of the busy time).
    Wait,
    /// Handling completions.
    Complete,
    /// Timers: stalled output, held input, each connection's liveness and heartbeats.
    Tick,
    /// Submitting what callbacks queued.
    After,
}

const PHASES: [Phase; 6] = [
    Phase::Commands,
    Phase::Arm,
    Phase::Wait,
    Phase::Complete,
    Phase::Tick,
    Phase::After,
];

/// Parts of handling completions and held frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// Decoding received bytes into frames (copies from the scratch buffers).
    Decode,
    /// Handing frames to their links: the connection machines and the endpoint's callbacks.
    Dispatch,
    /// Reading the rest of a frame's payload inline (non-blocking `recv` into it).
    InlineRead,
}

const PARTS: [Part; 3] = [Part::Decode, Part::Dispatch, Part::InlineRead];

/// One turn's clock.
#[derive(Debug)]
pub(super) struct TurnClock {
    start: Instant,
    mark: Instant,
    phases: [Duration; PHASES.len()],
    parts: [Duration; PARTS.len()],
    /// The slowest completion: how long, its kind and connection.
    slowest: Option<(Duration, &'static str, usize)>,
}

impl TurnClock {
    /// A turn starting at `now`.
    pub(super) fn start(now: Instant) -> Self {
        TurnClock {
            start: now,
            mark: now,
            phases: [Duration::ZERO; PHASES.len()],
            parts: [Duration::ZERO; PARTS.len()],
            slowest: None,
        }
    }

    /// `phase` ended at `now` (it began where the previous one ended).
    pub(super) fn lap(&mut self, phase: Phase, now: Instant) {
        let i = PHASES.iter().position(|p| *p == phase).unwrap_or(0);
        self.phases[i] += now.saturating_duration_since(self.mark);
        self.mark = self.mark.max(now);
    }

    /// `took` spent in `part`.
    pub(super) fn add(&mut self, part: Part, took: Duration) {
        let i = PARTS.iter().position(|p| *p == part).unwrap_or(0);
        self.parts[i] += took;
    }

    /// One completion of `kind` for connection `idx` took `took` to handle.
    pub(super) fn completion(&mut self, kind: &'static str, idx: usize, took: Duration) {
        if self.slowest.is_none_or(|(t, _, _)| took > t) {
            self.slowest = Some((took, kind, idx));
        }
    }

    /// The turn's work up to `now`, its wait left out.
    pub(super) fn busy(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.start)
            .saturating_sub(self.phases[2])
    }

    /// What to report for a turn that ended at `now`: `None` unless it worked [`SLOW_TURN`]
    /// or longer.
    pub(super) fn report(&self, now: Instant) -> Option<String> {
        let busy = self.busy(now);
        if busy < SLOW_TURN {
            return None;
        }
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        let phases: Vec<String> = PHASES
            .iter()
            .zip(self.phases)
            .map(|(p, d)| format!("{p:?} {}", ms(d)))
            .collect();
        let parts: Vec<String> = PARTS
            .iter()
            .zip(self.parts)
            .map(|(p, d)| format!("{p:?} {}", ms(d)))
            .collect();
        let slowest = self
            .slowest
            .map(|(d, kind, idx)| {
                format!(
                    "; slowest completion: {kind} on connection {idx}, {}",
                    ms(d)
                )
            })
            .unwrap_or_default();
        Some(format!(
            "a ring turn worked {} ({}; of which {}){slowest}",
            ms(busy),
            phases.join(", "),
            parts.join(", "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_turn_names_its_phases_parts_and_slowest_completion_and_leaves_the_wait_out() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = TurnClock::start(t0);
        c.lap(Phase::Commands, at(1));
        c.lap(Phase::Arm, at(3));
        c.lap(Phase::Wait, at(2_003));
        c.completion("recv", 7, Duration::from_millis(40));
        c.completion("recv", 9, Duration::from_millis(900));
        c.completion("send", 7, Duration::from_millis(5));
        c.add(Part::Dispatch, Duration::from_millis(850));
        c.add(Part::InlineRead, Duration::from_millis(50));
        c.lap(Phase::Complete, at(2_948));
        c.lap(Phase::Tick, at(2_950));
        c.lap(Phase::After, at(2_950));
        assert_eq!(c.busy(at(2_950)), Duration::from_millis(950));
        assert_eq!(c.report(at(2_950)), None, "a 2 s wait is not work");
        c.lap(Phase::After, at(3_100));
        let r = c.report(at(3_100)).expect("1.1 s of work");
        assert_eq!(
            r,
            "a ring turn worked 1100.0 ms (Commands 1.0 ms, Arm 2.0 ms, Wait 2000.0 ms, \
             Complete 945.0 ms, Tick 2.0 ms, After 150.0 ms; of which Decode 0.0 ms, \
             Dispatch 850.0 ms, InlineRead 50.0 ms); slowest completion: recv on connection 9, \
             900.0 ms"
        );
    }
}
