//! Faults a process injects into itself on cue (`geomx launch --chaos`), so that a test or a
//! user can reproduce one cell of the fault matrix exactly: the launcher picks the target process
//! and hands it [`CHAOS_ENV`]; the process acts at the named point of its run.

/// Environment variable with this process's fault, e.g. `kill@round=200`.
pub const CHAOS_ENV: &str = "GEOMX_CHAOS";

/// A fault of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfFault {
    /// SIGKILL itself at the start of round `round` (before its first push of that round).
    KillAtRound(u64),
}

impl SelfFault {
    /// Parses `kill@round=N`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (action, at) = text
            .split_once('@')
            .ok_or_else(|| format!("{text:?}: expected ACTION@round=N"))?;
        let round = at
            .strip_prefix("round=")
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| format!("{text:?}: expected round=N after '@'"))?;
        match action {
            "kill" => Ok(Self::KillAtRound(round)),
            other => Err(format!(
                "{text:?}: unknown action {other:?} (expected kill)"
            )),
        }
    }

    /// This process's fault from [`CHAOS_ENV`], if any (a malformed value is an error).
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(CHAOS_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// Acts if the fault is due at the start of `round`.
    pub fn at_round(&self, round: u64) {
        match *self {
            Self::KillAtRound(r) if r == round => {
                tracing::warn!(round, "chaos: killing this process (SIGKILL)");
                kill_self();
            }
            Self::KillAtRound(_) => {}
        }
    }
}

#[cfg(unix)]
fn kill_self() {
    // SAFETY: kill(2) on this process's own pid with a valid signal number.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(not(unix))]
fn kill_self() {
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kill_at_a_round_and_refuses_the_rest() {
        assert_eq!(
            SelfFault::parse("kill@round=12"),
            Ok(SelfFault::KillAtRound(12))
        );
        for bad in ["kill", "kill@12", "kill@round=x", "stop@round=3", ""] {
            assert!(SelfFault::parse(bad).is_err(), "{bad}");
        }
        // Not due: nothing happens.
        SelfFault::KillAtRound(5).at_round(4);
    }
}
