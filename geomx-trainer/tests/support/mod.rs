//! Helpers shared by the integration tests that start whole clusters with `geomx launch`.
//! Each test file includes this module with `mod support;` and uses what it needs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The `geomx` binary under test.
pub const GEOMX: &str = env!("CARGO_BIN_EXE_geomx");

/// A scratch path unique to this test process: `$TMP/geomx-<tag>-<pid>-<name>`.
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("geomx-{tag}-{}-{name}", std::process::id()))
}

/// A launch's report and its stderr.
pub struct Launched {
    /// The JSON report.
    pub report: Value,
    /// What the launcher (and its children) wrote to stderr.
    pub stderr: String,
}

/// Writes `toml` to a scratch file, runs `geomx launch --quiet --report` on it with the extra
/// environment `envs`, asserts success (printing stderr otherwise), and returns the report and
/// stderr. The scratch files are removed.
pub fn launch_with(tag: &str, name: &str, toml: &str, envs: &[(&str, &str)]) -> Launched {
    let cfg = scratch(tag, &format!("{name}.toml"));
    let report = scratch(tag, &format!("{name}.json"));
    std::fs::write(&cfg, toml).unwrap();
    let out = Command::new(GEOMX)
        .args(["launch", "--quiet", "--report"])
        .arg(&report)
        .arg(&cfg)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{name}: launch failed: {}\nstderr:\n{stderr}",
        out.status
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let _ = std::fs::remove_file(cfg);
    let _ = std::fs::remove_file(report);
    Launched { report: r, stderr }
}

/// [`launch_with`] without extra environment, returning only the report.
pub fn launch_report(tag: &str, name: &str, toml: &str) -> Value {
    launch_with(tag, name, toml, &[]).report
}

/// The report's final test accuracy.
pub fn accuracy(r: &Value) -> f64 {
    r["final_test_accuracy"].as_f64().unwrap()
}

/// The report's WAN bytes.
pub fn wan_bytes(r: &Value) -> u64 {
    r["wan_bytes"].as_u64().unwrap()
}

/// sync.md oracle 9: prints `r` against the FSA run `fsa` (accuracy, WAN bytes, wall time, and
/// `extra`), then asserts that `r` ran `rounds` rounds and ended within 2 accuracy points of FSA.
pub fn assert_within_two_points_of_fsa(
    name: &str,
    r: &Value,
    fsa: &Value,
    rounds: u64,
    extra: &str,
) {
    eprintln!(
        "{name}: accuracy {:.4} (fsa {:.4}), wan_bytes {} (fsa {}), wall {:.2}s (fsa {:.2}s){extra}",
        accuracy(r),
        accuracy(fsa),
        wan_bytes(r),
        wan_bytes(fsa),
        r["wall_seconds"].as_f64().unwrap(),
        fsa["wall_seconds"].as_f64().unwrap()
    );
    assert_eq!(r["rounds"], rounds, "{name}");
    assert!(
        accuracy(r) >= accuracy(fsa) - 0.02,
        "{name}: {} vs fsa {}",
        accuracy(r),
        accuracy(fsa)
    );
}
