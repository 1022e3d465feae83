//! A real Slurm: `geomx deploy slurm examples/vanilla-hips.toml`, submitted with `sbatch --wait`,
//! must end with the same `param_hash` as `geomx launch` of the same file (FSA on the digits is
//! deterministic). Needs root and the one-node cluster of `scripts/slurm-local.sh up`; skips with
//! a `SKIPPED` line otherwise.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{launch_report, output_within, scratch, GEOMX};

const TEST: &str = "slurm_job_matches_launch";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Why the test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (scripts/slurm-local.sh up runs the daemons as root)".into());
    }
    let sinfo = Command::new("timeout")
        .args(["10", "sinfo", "-h", "-N", "-o", "%T"])
        .output();
    match sinfo {
        Err(e) => Some(format!(
            "Slurm is not installed (sinfo: {e}); run scripts/slurm-local.sh up"
        )),
        Ok(o) if !o.status.success() => Some(format!(
            "Slurm is not up (sinfo: {}); run scripts/slurm-local.sh up",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
        )),
        Ok(o) => {
            let states = String::from_utf8_lossy(&o.stdout).into_owned();
            (!states
                .lines()
                .any(|s| matches!(s.trim(), "idle" | "mixed" | "allocated")))
            .then(|| format!("no Slurm node takes jobs (states: {:?})", states.trim()))
        }
    }
}

/// A port nobody listens on now, below the ephemeral range (the job's coordinator binds it).
fn free_port() -> u16 {
    geomx_net::port::free_loopback_port().unwrap()
}

fn read_all(dir: &Path, prefix: &str) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            out += &format!(
                "--- {name}\n{}\n",
                std::fs::read_to_string(e.path()).unwrap_or_default()
            );
        }
    }
    out
}

#[test]
fn slurm_job_matches_launch() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED {TEST}: {reason}");
        return;
    }
    let file = repo_file("examples/vanilla-hips.toml");
    let toml = std::fs::read_to_string(&file).unwrap();
    let launched = launch_report("deploy-slurm", "launch", &toml);

    let dir = scratch("deploy-slurm", "job");
    let _ = std::fs::remove_dir_all(&dir);
    let out = output_within(
        Command::new(GEOMX)
            .args(["deploy", "slurm"])
            .arg(&file)
            .arg("--out")
            .arg(&dir)
            .args(["--port", &free_port().to_string()]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sbatch = dir.join("geomx.sbatch");
    let submitted = output_within(
        Command::new("sbatch")
            .args(["--wait", "--time=15", "--parsable"])
            .arg(&sbatch),
        Duration::from_secs(900),
    );
    let logs = read_all(&dir, "slurm-") + &read_all(&dir, "job-");
    assert!(
        submitted.status.success(),
        "sbatch --wait failed ({}): {}\n{logs}",
        submitted.status,
        String::from_utf8_lossy(&submitted.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("report.json"))
            .unwrap_or_else(|e| panic!("no report.json ({e}):\n{logs}")),
    )
    .unwrap();
    println!(
        "{TEST}: slurm job {} param_hash {} (launch {}), accuracy {} (launch {})",
        String::from_utf8_lossy(&submitted.stdout).trim(),
        report["param_hash"],
        launched["param_hash"],
        report["final_test_accuracy"],
        launched["final_test_accuracy"]
    );
    assert_eq!(report["rounds"], launched["rounds"]);
    assert_eq!(report["replicas_identical"], true, "{logs}");
    assert_eq!(report["param_hash"], launched["param_hash"], "{logs}");
    assert_eq!(report["processes"].as_array().map(Vec::len), Some(8));
    let _ = std::fs::remove_dir_all(&dir);
}
