//! Helpers shared by the integration tests that start whole clusters with `geomx launch`.
//! Each test file includes this module with `mod support;` and uses what it needs.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The small in-process job of the agreement and checkpoint tests: digits, MLP hidden [16] (keys
/// of 1024, 16, 160 and 10 elements), 2 global servers, dc0 with 2 workers and dc1 with 1; the
/// `[train]` table and what follows are the test's own.
pub const SMALL_JOB: &str = "[cluster]\nglobal_servers = 2\n\
     [[cluster.data_centers]]\nname = \"dc0\"\nworkers = 2\n\
     [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 1\n\
     [model]\nhidden = [16]\n[data]\nbatch_size = 8\n";

pub mod capture;

/// The `geomx` binary under test.
pub const GEOMX: &str = env!("CARGO_BIN_EXE_geomx");

/// A scratch path unique to this test process: `$TMP/geomx-<tag>-<pid>-<name>`.
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("geomx-{tag}-{}-{name}", std::process::id()))
}

/// A scratch directory path for a job's checkpoints (and the coordinator's snapshot file), in
/// memory (`/dev/shm`) where this machine has one, else like [`scratch`]. These tests are about
/// recovery, and their processes wait for each save's fsync: on the disk the build writes to,
/// right after a build (its output still being written back), one worker's 5 KB checkpoint
/// took 89.7 s and a coordinator snapshot up to 14 s (2026-12-07); a job waits for such saves,
/// and its 120 s request timeouts ran out. A disk that slow is the deployment's concern (a save
/// that takes a second or more is logged: "checkpoint written slowly"), not these tests'.
pub fn ckpt_scratch(tag: &str, name: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() && can_create_in(shm, name) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("geomx-{tag}-{}-{name}", std::process::id()))
}

/// Whether a file can be created (and removed) in `dir` (probed under `name`).
fn can_create_in(dir: &std::path::Path, name: &str) -> bool {
    let probe = dir.join(format!("geomx-probe-{}-{name}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Longest a launch in a test may take before it is stopped and the test fails (a hang fails the
/// test instead of blocking CI; a loaded 2-core machine needs far less than this).
pub const LAUNCH_LIMIT: Duration = Duration::from_secs(600);

/// Runs `cmd` to completion like [`Command::output`], but stops it (SIGTERM, then SIGKILL 20 s
/// later) and panics with its stderr once `limit` has passed.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let mut termed = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        let t = started.elapsed();
        if t > limit && !termed {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            termed = true;
        }
        if t > limit + Duration::from_secs(20) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        !termed,
        "{cmd:?} still running after {limit:?}; stderr:\n{}",
        String::from_utf8_lossy(&stderr)
    );
    Output {
        status,
        stdout,
        stderr,
    }
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
    let out = output_within(
        Command::new(GEOMX)
            .args(["launch", "--quiet", "--report"])
            .arg(&report)
            .arg(&cfg)
            .envs(envs.iter().copied()),
        LAUNCH_LIMIT,
    );
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

/// Runs `cfg` in this process (`launch::threads`, 180 s at most) as job `name`: every replica
/// and the global servers must end on the same θ. Returns the job and its report.
pub fn run_in_threads(
    name: &str,
    cfg: &geomx_trainer::config::Config,
) -> (geomx_trainer::hips::JobSpec, geomx_trainer::report::Report) {
    let job = geomx_trainer::hips::JobSpec::from_config(cfg).unwrap();
    let r = geomx_trainer::launch::threads::run(&job, cfg.to_json(), Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: keys {} param_hash {} global {} accuracy {:.3}",
        job.plan.key_lens.len(),
        r.param_hash,
        r.global_param_hash,
        r.final_test_accuracy
    );
    assert!(r.replicas_identical, "{name}");
    assert_eq!(r.param_hash, r.global_param_hash, "{name}");
    (job, r)
}

/// `r` ended where `base` ended, bit for bit (replicas, global θ, accuracy).
pub fn assert_bit_identical(
    r: &geomx_trainer::report::Report,
    base: &geomx_trainer::report::Report,
    name: &str,
) {
    assert_eq!(r.param_hash, base.param_hash, "{name}");
    assert_eq!(r.global_param_hash, base.global_param_hash, "{name}");
    assert_eq!(
        r.final_test_accuracy.to_bits(),
        base.final_test_accuracy.to_bits(),
        "{name}"
    );
}
