//! `[resilience]`: what the loss of a process does to a running job, and how `geomx launch`
//! restarts its children (issue 16, "Membership that changes without stopping the job").

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Codec, Config, ConfigError, HfaWeighting, SyncAlgorithm, TransportKind};

/// What a lost process does to the job (`lost_worker`, `lost_dc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LostWorker {
    /// The job ends, naming the worker (the default).
    #[default]
    Abort,
    /// Its local server closes the rounds with the workers present, the global step divides by
    /// the workers summed, and a restarted worker rejoins with the current θ.
    Continue,
}

/// Whether `geomx launch` restarts a child that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// A failed child fails the job (the default).
    #[default]
    Never,
    /// A failed worker is started again (up to `max_restarts`, after `restart_backoff_ms`).
    OnFailure,
}

/// `[resilience]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// What a lost worker does to the job.
    pub lost_worker: LostWorker,
    /// What a lost local server (a whole data center) does to the job: under `continue` the
    /// global tier goes on with the DCs present (at least `min_dcs`), and a restarted local
    /// server rejoins with the current θ.
    pub lost_dc: LostWorker,
    /// What a lost global server does to the job: under `continue` a restarted global server
    /// reloads its newest checkpoint and the local servers resend the rounds since it, so no
    /// progress is lost and the job ends bit-identical to an uninterrupted one.
    pub lost_global_server: LostWorker,
    /// What a lost coordinator does to the job: under `continue` it keeps its membership in
    /// `checkpoint.dir/coordinator.state`, a restarted one continues from it, and every member
    /// reconnects; the training itself never waits for the coordinator.
    pub lost_coordinator: LostWorker,
    /// Fewest data centers a global round may complete with; below it the job waits.
    pub min_dcs: usize,
    /// Whether `geomx launch` restarts failed processes of the roles whose loss is survivable.
    pub restart: Restart,
    /// Restarts of one process before the launcher gives up and fails the job.
    pub max_restarts: u32,
    /// Wait before a restart, doubled after each restart of the same process.
    pub restart_backoff_ms: u64,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            lost_worker: LostWorker::Abort,
            lost_dc: LostWorker::Abort,
            lost_global_server: LostWorker::Abort,
            lost_coordinator: LostWorker::Abort,
            min_dcs: 1,
            restart: Restart::Never,
            max_restarts: 3,
            restart_backoff_ms: 200,
        }
    }
}

impl ResilienceConfig {
    /// Wait before restart number `n` (1-based) of one process.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u64 << n.saturating_sub(1).min(10);
        Duration::from_millis(self.restart_backoff_ms.saturating_mul(factor))
    }
}

impl Config {
    /// `[resilience]`: a worker's loss is survivable under FSA with f32 tiers over TCP (the
    /// replicas are θ itself, so a rejoining worker needs nothing but θ); restarts need it.
    pub(crate) fn validate_resilience(&self) -> Result<(), ConfigError> {
        let r = &self.resilience;
        let survivable = [
            r.lost_worker,
            r.lost_dc,
            r.lost_global_server,
            r.lost_coordinator,
        ]
        .contains(&LostWorker::Continue);
        if r.restart == Restart::OnFailure && !survivable {
            return Err(ConfigError::invalid(
                "resilience.restart",
                "\"on-failure\" restarts the processes whose loss is survivable, which needs \
                 resilience.lost_worker, lost_dc, lost_global_server or lost_coordinator = \
                 \"continue\" (with \
                 \"abort\" the first loss ends the job)",
            ));
        }
        self.validate_lost_global_server()?;
        // The checkpoint directory's own checks then limit it to FSA and HFA (ESync's state
        // machine, which lives in the coordinator, is not saved).
        if r.lost_coordinator == LostWorker::Continue && self.checkpoint.dir.is_none() {
            return Err(ConfigError::invalid(
                "resilience.lost_coordinator",
                "\"continue\": checkpoint.dir must be set (the coordinator keeps its membership \
                 there)",
            ));
        }
        if r.restart == Restart::OnFailure && r.max_restarts == 0 {
            return Err(ConfigError::invalid(
                "resilience.max_restarts",
                "must be >= 1 with restart = \"on-failure\"",
            ));
        }
        if r.restart_backoff_ms > 60_000 {
            return Err(ConfigError::invalid(
                "resilience.restart_backoff_ms",
                format!("{} is over 60000 ms", r.restart_backoff_ms),
            ));
        }
        if r.min_dcs == 0 || r.min_dcs > self.cluster.data_centers.len() {
            return Err(ConfigError::invalid(
                "resilience.min_dcs",
                format!(
                    "{} is not between 1 and the {} data centers",
                    r.min_dcs,
                    self.cluster.data_centers.len()
                ),
            ));
        }
        if r.lost_dc == LostWorker::Continue {
            let why = if r.lost_worker != LostWorker::Continue {
                Some(
                    "resilience.lost_worker must be \"continue\" too (a lost DC loses its workers)",
                )
            } else if !matches!(self.sync.algorithm, SyncAlgorithm::Fsa | SyncAlgorithm::Hfa) {
                Some("sync.algorithm must be \"fsa\" or \"hfa\"")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ConfigError::invalid(
                    "resilience.lost_dc",
                    format!("\"continue\" supports FSA and HFA so far: {why}"),
                ));
            }
        }
        if r.lost_worker == LostWorker::Abort {
            return Ok(());
        }
        let why = if !matches!(self.sync.algorithm, SyncAlgorithm::Fsa | SyncAlgorithm::Hfa) {
            Some("sync.algorithm must be \"fsa\" or \"hfa\"")
        } else if self.sync.algorithm == SyncAlgorithm::Hfa
            && self.sync.hfa.weighting != HfaWeighting::Data
        {
            Some("sync.hfa.weighting must be \"data\" (a DC weighs the workers it averaged)")
        } else {
            self.plain_tcp_tiers()
        };
        match why {
            Some(why) => Err(ConfigError::invalid(
                "resilience.lost_worker",
                format!(
                    "\"continue\" supports FSA and HFA with f32 tiers over TCP so far (a \
                     rejoining worker needs only θ, or HFA's model and milestone): {why}"
                ),
            )),
            None => Ok(()),
        }
    }
}

impl Config {
    /// Why the tiers are not f32 over TCP without P3 (what elastic membership and resending
    /// assume so far), if they are not.
    fn plain_tcp_tiers(&self) -> Option<&'static str> {
        if self.compression.intra != Codec::None || self.compression.inter != Codec::None {
            Some("compression.intra and compression.inter must be \"none\"")
        } else if self.transport.inter == TransportKind::Dgt {
            Some("transport.inter must be \"tcp\"")
        } else if self.scheduling.p3.enabled {
            Some("scheduling.p3 must be off")
        } else {
            None
        }
    }

    /// `lost_global_server = "continue"`: a restarted global server reloads its checkpoint and
    /// the local servers resend the rounds since it as they sent them, which needs FSA or HFA
    /// with f32 tiers over TCP, no P3 and `[checkpoint] dir`.
    fn validate_lost_global_server(&self) -> Result<(), ConfigError> {
        if self.resilience.lost_global_server == LostWorker::Abort {
            return Ok(());
        }
        let why = if !matches!(self.sync.algorithm, SyncAlgorithm::Fsa | SyncAlgorithm::Hfa) {
            Some("sync.algorithm must be \"fsa\" or \"hfa\"")
        } else if self.checkpoint.dir.is_none() {
            Some("checkpoint.dir must be set (a restarted global server reloads its checkpoint)")
        } else {
            self.plain_tcp_tiers()
        };
        match why {
            Some(why) => Err(ConfigError::invalid(
                "resilience.lost_global_server",
                format!(
                    "\"continue\" supports FSA and HFA with f32 tiers over TCP so far (the \
                     local servers resend the rounds since the checkpoint): {why}"
                ),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resilient() -> Config {
        let mut c = Config::default();
        c.resilience.lost_worker = LostWorker::Continue;
        c.resilience.restart = Restart::OnFailure;
        c
    }

    #[test]
    fn defaults_abort_and_a_resilient_fsa_job_validates() {
        Config::default().validate().unwrap();
        resilient().validate().unwrap();
        let r = ResilienceConfig::default();
        assert_eq!(r.backoff(1), Duration::from_millis(200));
        assert_eq!(r.backoff(3), Duration::from_millis(800));
    }

    #[test]
    fn unsupported_combinations_name_the_field() {
        let err = |c: Config| c.validate().unwrap_err().to_string();
        let mut c = resilient();
        c.resilience.lost_worker = LostWorker::Abort;
        assert!(err(c).starts_with("resilience.restart:"));
        let mut c = resilient();
        c.resilience.max_restarts = 0;
        assert!(err(c).starts_with("resilience.max_restarts:"));
        let mut c = resilient();
        c.sync.algorithm = SyncAlgorithm::Esync;
        let e = err(c);
        assert!(
            e.starts_with("resilience.lost_worker:") && e.contains("fsa"),
            "{e}"
        );
        let mut c = resilient();
        c.sync.algorithm = SyncAlgorithm::Hfa;
        c.validate().unwrap();
        // A whole DC may be lost under FSA and HFA, not under ESync or MixedSync.
        let mut d = c.clone();
        d.resilience.lost_dc = LostWorker::Continue;
        d.validate().unwrap();
        d.sync.algorithm = SyncAlgorithm::Mixed;
        let e = err(d);
        assert!(
            e.starts_with("resilience.lost_dc:") && e.contains("hfa"),
            "{e}"
        );
        c.sync.hfa.weighting = HfaWeighting::Equal;
        assert!(err(c).contains("weighting"));
        let mut c = resilient();
        c.compression.inter = Codec::Bf16;
        assert!(err(c).contains("compression"));
        let mut c = resilient();
        c.scheduling.p3.enabled = true;
        assert!(err(c).contains("scheduling.p3"));
    }

    #[test]
    fn a_restartable_global_server_needs_fsa_or_hfa_and_checkpoints() {
        let err = |c: Config| c.validate().unwrap_err().to_string();
        let mut c = Config::default();
        c.resilience.lost_global_server = LostWorker::Continue;
        c.resilience.restart = Restart::OnFailure;
        let e = err(c.clone());
        assert!(
            e.starts_with("resilience.lost_global_server:") && e.contains("checkpoint.dir"),
            "{e}"
        );
        c.checkpoint.dir = Some("ckpt".into());
        c.validate().unwrap();
        let mut h = c.clone();
        h.sync.algorithm = SyncAlgorithm::Hfa;
        h.validate().unwrap();
        h.sync.algorithm = SyncAlgorithm::Esync;
        assert!(err(h).contains("sync.algorithm"));
        // A DC may be lost too: a restart restores the DCs its checkpoint counted.
        let mut d = c.clone();
        d.resilience.lost_worker = LostWorker::Continue;
        d.resilience.lost_dc = LostWorker::Continue;
        d.validate().unwrap();
        let mut b = c;
        b.compression.inter = Codec::Bf16;
        assert!(err(b).contains("compression"));
    }

    #[test]
    fn a_restartable_coordinator_needs_a_checkpoint_directory_and_fsa_or_hfa() {
        let err = |c: Config| c.validate().unwrap_err().to_string();
        let mut c = Config::default();
        c.resilience.lost_coordinator = LostWorker::Continue;
        c.resilience.restart = Restart::OnFailure;
        let e = err(c.clone());
        assert!(
            e.starts_with("resilience.lost_coordinator:") && e.contains("checkpoint.dir"),
            "{e}"
        );
        c.checkpoint.dir = Some("ckpt".into());
        c.validate().unwrap();
        c.sync.algorithm = SyncAlgorithm::Esync;
        let e = err(c);
        assert!(e.contains("sync.algorithm"), "{e}");
    }

    #[test]
    fn parses_from_toml() {
        let c = Config::from_toml_str(
            "[resilience]\nlost_worker = \"continue\"\nrestart = \"on-failure\"\nmax_restarts = 5\n",
        )
        .unwrap();
        assert_eq!(c.resilience.max_restarts, 5);
        assert_eq!(c.resilience.restart, Restart::OnFailure);
        assert!(Config::from_toml_str("[resilience]\nlost_worker = \"maybe\"\n").is_err());
    }
}
