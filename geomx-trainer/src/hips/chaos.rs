//! Faults a process injects into itself on cue (`geomx launch --chaos`), so that a test or a
//! user can reproduce one cell of the fault matrix exactly: the launcher picks the target process
//! and hands it [`CHAOS_ENV`]; the process acts at the named point of the named round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Environment variable with this process's fault, e.g. `kill@round=200:mid-push`.
pub const CHAOS_ENV: &str = "GEOMX_CHAOS";

/// Prefix of the stdout line a process prints as it injects its fault (then the time in
/// milliseconds since the Unix epoch): the launcher dates the fault by it.
pub const FAULT_LINE: &str = "GEOMX_FAULT ";

/// Prefix of the stdout line a local server prints when its site's link is to be cut (then the
/// time in milliseconds since the Unix epoch and the cut's length in milliseconds).
pub const CUT_LINE: &str = "GEOMX_CUT ";

/// What the process does to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL: the process is gone, its connections close at once.
    Kill,
    /// SIGSTOP for this long, then SIGCONT (from a helper process): the process falls silent;
    /// peers see it only through their heartbeat timeout.
    Stop(Duration),
    /// The WAN link of the process's site goes dark for this long: the process (a local server)
    /// only announces the moment with a [`CUT_LINE`]; the launcher drops every packet of the
    /// site's link meanwhile.
    Cut(Duration),
}

/// Where in the round the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// As the round starts, before any push.
    Start,
    /// After the round's first push, before the rest.
    MidPush,
    /// After every push, while the replies are awaited.
    ReplyWait,
}

/// A fault of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfFault {
    /// What happens.
    pub action: Action,
    /// In which round (0-based).
    pub round: u64,
    /// Where in that round.
    pub point: Point,
    /// `@after=DURATION` instead of a round: this long after the job started running (the
    /// coordinator, which counts no rounds); `round` is then `u64::MAX`.
    pub after: Option<Duration>,
}

/// Parses `500ms` or `3s`.
fn duration(text: &str) -> Option<Duration> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    text.strip_suffix('s')?
        .parse()
        .ok()
        .map(Duration::from_secs)
}

impl SelfFault {
    /// Parses `ACTION@round=N[:POINT]`: ACTION `kill` or `stop=DURATION` (`3s`, `500ms`), POINT
    /// `start` (the default), `mid-push` or `reply-wait`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (action, at) = text
            .split_once('@')
            .ok_or_else(|| format!("{text:?}: expected ACTION@round=N[:POINT]"))?;
        let action = match action.split_once('=') {
            None if action == "kill" => Action::Kill,
            Some((verb @ ("stop" | "cut"), d)) => {
                let d = duration(d)
                    .filter(|d| !d.is_zero() && *d <= Duration::from_secs(600))
                    .ok_or_else(|| format!("{text:?}: {verb} needs a duration of 1ms to 600s"))?;
                if verb == "stop" {
                    Action::Stop(d)
                } else {
                    Action::Cut(d)
                }
            }
            _ => {
                return Err(format!(
                    "{text:?}: unknown action {action:?} (expected kill, stop=DURATION or \
                     cut=DURATION)"
                ))
            }
        };
        if let Some(d) = at.strip_prefix("after=") {
            let after = duration(d)
                .filter(|d| *d <= Duration::from_secs(3600))
                .ok_or_else(|| format!("{text:?}: after needs a duration of at most 3600s"))?;
            return Ok(Self {
                action,
                round: u64::MAX,
                point: Point::Start,
                after: Some(after),
            });
        }
        let (round, point) = at.split_once(':').unwrap_or((at, "start"));
        let round = round
            .strip_prefix("round=")
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| format!("{text:?}: expected round=N after '@'"))?;
        let point = match point {
            "start" => Point::Start,
            "mid-push" => Point::MidPush,
            "reply-wait" => Point::ReplyWait,
            other => {
                return Err(format!(
                    "{text:?}: unknown point {other:?} (expected start, mid-push or reply-wait)"
                ))
            }
        };
        Ok(Self {
            action,
            round,
            point,
            after: None,
        })
    }

    /// This process's fault from [`CHAOS_ENV`], if any (a malformed value is an error).
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(CHAOS_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// Acts if the fault is due at `point` of `round` (once per process: a stopped process that
    /// resumes goes on).
    pub fn at(&self, round: u64, point: Point) {
        static FIRED: AtomicBool = AtomicBool::new(false);
        if (round, point) != (self.round, self.point) || FIRED.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(round, ?point, action = ?self.action, "chaos: injecting a fault");
        self.strike();
    }

    /// Injects the fault now (once per process: a stopped process that wakes does not stop
    /// again).
    pub fn fire(&self) {
        static FIRED: AtomicBool = AtomicBool::new(false);
        if FIRED.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(action = ?self.action, "chaos: injecting a fault");
        self.strike();
    }

    fn strike(&self) {
        use std::io::Write;
        if let Action::Cut(d) = self.action {
            // Not this process's fault: the launcher cuts the link, the process goes on.
            println!(
                "{CUT_LINE}{} {}",
                super::round_log::unix_ms(),
                d.as_millis()
            );
            let _ = std::io::stdout().flush();
            return;
        }
        println!("{FAULT_LINE}{}", super::round_log::unix_ms());
        let _ = std::io::stdout().flush();
        match self.action {
            Action::Cut(_) => {}
            Action::Kill => signal_self(Signal::Kill),
            Action::Stop(d) => {
                // The helper wakes this process up; it cannot do so itself once stopped.
                let wake = format!(
                    "sleep {:.3}; kill -CONT {}",
                    d.as_secs_f64(),
                    std::process::id()
                );
                match std::process::Command::new("sh").args(["-c", &wake]).spawn() {
                    Ok(_) => signal_self(Signal::Stop),
                    Err(e) => {
                        tracing::error!(error = %e, "chaos: no helper to wake this process; not stopping")
                    }
                }
            }
        }
    }
}

enum Signal {
    Kill,
    Stop,
}

#[cfg(unix)]
fn signal_self(s: Signal) {
    let sig = match s {
        Signal::Kill => libc::SIGKILL,
        Signal::Stop => libc::SIGSTOP,
    };
    // SAFETY: kill(2) on this process's own pid with a valid signal number.
    unsafe {
        libc::kill(libc::getpid(), sig);
    }
}

#[cfg(not(unix))]
fn signal_self(s: Signal) {
    if let Signal::Kill = s {
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinators_fault_strikes_a_time_after_the_job_runs() {
        let f = SelfFault::parse("stop=2s@after=500ms").unwrap();
        assert_eq!(f.after, Some(Duration::from_millis(500)));
        assert_eq!(f.action, Action::Stop(Duration::from_secs(2)));
        assert_eq!(f.round, u64::MAX);
        for bad in ["kill@after=", "kill@after=5", "kill@after=7200s"] {
            assert!(SelfFault::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_actions_rounds_and_points_and_refuses_the_rest() {
        assert_eq!(
            SelfFault::parse("kill@round=12"),
            Ok(SelfFault {
                action: Action::Kill,
                round: 12,
                point: Point::Start,
                after: None
            })
        );
        assert_eq!(
            SelfFault::parse("stop=1500ms@round=3:reply-wait"),
            Ok(SelfFault {
                action: Action::Stop(Duration::from_millis(1500)),
                round: 3,
                point: Point::ReplyWait,
                after: None
            })
        );
        assert_eq!(
            SelfFault::parse("cut=5s@round=8").map(|f| f.action),
            Ok(Action::Cut(Duration::from_secs(5)))
        );
        assert_eq!(
            SelfFault::parse("kill@round=0:mid-push").map(|f| f.point),
            Ok(Point::MidPush)
        );
        for bad in [
            "kill",
            "kill@12",
            "kill@round=x",
            "stop@round=3",
            "stop=0s@round=3",
            "stop=2h@round=3",
            "kill@round=3:later",
            "pause@round=1",
            "cut@round=1",
            "cut=0s@round=1",
            "",
        ] {
            assert!(SelfFault::parse(bad).is_err(), "{bad}");
        }
        // Not due: nothing happens.
        SelfFault::parse("kill@round=5")
            .unwrap()
            .at(4, Point::Start);
        SelfFault::parse("kill@round=5")
            .unwrap()
            .at(5, Point::MidPush);
    }
}
