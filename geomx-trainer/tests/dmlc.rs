//! `geomx run` driven only by the original GeoMX `DMLC_*` variables (plus `GEOMX_DC` /
//! `GEOMX_RANK`): 2 DCs × 2 workers and one global server, each role its own process.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const GEOMX: &str = env!("CARGO_BIN_EXE_geomx");

/// The job's credentials, as an operator would make them for processes a launcher of their own
/// starts: `geomx pki init` and `geomx pki issue` (the built-in configuration has this job's
/// shape: 2 DCs × 2 workers, one global server).
fn pki_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("geomx-dmlc-pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for args in [vec!["pki", "init", "--dir"], vec!["pki", "issue", "--dir"]] {
        let st = Command::new(GEOMX).args(&args).arg(&dir).status().unwrap();
        assert!(st.success(), "geomx {args:?}");
    }
    dir
}

fn spawn(port: u16, vars: &[(&str, &str)]) -> Child {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(pki_dir);
    let mut cmd = Command::new(GEOMX);
    cmd.arg("run")
        .env("GEOMX_SECURITY_DIR", dir)
        .env("DMLC_PS_GLOBAL_ROOT_URI", "127.0.0.1")
        .env("DMLC_PS_GLOBAL_ROOT_PORT", port.to_string())
        .env("DMLC_NUM_GLOBAL_SERVER", "1")
        .env("DMLC_NUM_GLOBAL_WORKER", "2")
        .env("DMLC_NUM_ALL_WORKER", "4")
        .env("DMLC_NUM_WORKER", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn stats_line(out: &str) -> Value {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("GEOMX_STATS "))
        .unwrap_or_else(|| panic!("no stats in {out}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn dmlc_variables_run_a_full_cluster() {
    // The coordinator binds port 0 and prints the port it got; everyone else registers there.
    let mut coord = spawn(0, &[("DMLC_ROLE_GLOBAL", "global_scheduler")]);
    let mut coord_out = BufReader::new(coord.stdout.take().unwrap());
    let mut first = String::new();
    coord_out.read_line(&mut first).unwrap();
    let port: u16 = first
        .trim()
        .strip_prefix("GEOMX_COORDINATOR 127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .parse()
        .unwrap();
    let coord_rest = std::thread::spawn(move || {
        let mut rest = String::new();
        coord_out.read_to_string(&mut rest).unwrap();
        rest
    });
    let mut children = Vec::new();
    children.push(spawn(
        port,
        &[
            ("DMLC_ROLE", "server"),
            ("DMLC_ROLE_GLOBAL", "global_server"),
        ],
    ));
    for d in ["0", "1"] {
        children.push(spawn(port, &[("DMLC_ROLE", "server"), ("GEOMX_DC", d)]));
        for r in ["0", "1"] {
            children.push(spawn(
                port,
                &[("DMLC_ROLE", "worker"), ("GEOMX_DC", d), ("GEOMX_RANK", r)],
            ));
        }
    }
    let start = Instant::now();
    let mut outputs = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
    }
    assert!(coord.wait().unwrap().success());
    assert!(coord_rest.join().unwrap().contains("GEOMX_STATS "));
    assert!(start.elapsed() < Duration::from_secs(60));
    let workers: Vec<Value> = outputs[1..]
        .iter()
        .map(|o| stats_line(o))
        .filter(|s| s["role"] == "worker")
        .collect();
    assert_eq!(workers.len(), 4);
    assert!(workers
        .iter()
        .all(|w| w["param_hash"] == workers[0]["param_hash"]));
    let acc = workers[0]["final_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.93, "accuracy {acc}");
}
