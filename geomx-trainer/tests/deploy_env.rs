//! `geomx run --from-env` with wrong environments: a clear error naming the variable and the
//! expected value, and no process waits forever.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{output_within, GEOMX};

/// Runs `geomx run` with exactly `env` (plus PATH) and the extra arguments; returns (success,
/// stderr). Bounded: a hang fails the test.
fn run_with(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = output_within(
        Command::new(GEOMX)
            .arg("run")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied()),
        Duration::from_secs(120),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn more_tasks_than_roles() {
    let (ok, err) = run_with(
        &[
            ("SLURM_PROCID", "8"),
            ("SLURM_NTASKS", "9"),
            ("SLURM_JOB_NODELIST", "node[01-02]"),
        ],
        &["--from-env"],
    );
    assert!(!ok);
    assert!(
        err.contains(
            "error: SLURM_NTASKS: 9, expected 8 (the job file has 8 processes: 1 coordinator, 1 \
             global server, 2 local servers, 4 workers)"
        ),
        "{err}"
    );
}

#[test]
fn two_launchers_at_once() {
    let (ok, err) = run_with(
        &[
            ("JOB_COMPLETION_INDEX", "1"),
            ("RANK", "1"),
            ("WORLD_SIZE", "8"),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("error: GEOMX_LAUNCHER: not set, but variables of 2 launchers are present"),
        "{err}"
    );
}

#[test]
fn a_missing_coordinator() {
    let (ok, err) = run_with(
        &[("JOB_COMPLETION_INDEX", "2"), ("GEOMX_TIER", "0")],
        &["--from-env"],
    );
    assert!(!ok);
    assert!(
        err.contains("error: GEOMX_COORDINATOR: not set; expected the coordinator's HOST:PORT"),
        "{err}"
    );
}

#[test]
fn role_flags_and_from_env_exclude_each_other() {
    let (ok, err) = run_with(&[], &["--from-env", "--role", "worker"]);
    assert!(!ok);
    assert!(err.contains("cannot be used with"), "{err}");
    let (ok, err) = run_with(&[], &[]);
    assert!(!ok);
    assert!(
        err.contains("error: GEOMX_LAUNCHER: not set, and no launcher variables found"),
        "{err}"
    );
}
