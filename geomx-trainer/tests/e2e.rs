//! `geomx bench e2e --quick` on two scenarios (the flat baseline and HiPS): the command finishes,
//! and results.json, results.md and both PNG plots exist and parse.

use std::path::{Path, PathBuf};
use std::process::Command;

use geomx_trainer::bench_e2e::results::{E2eResults, Status};
use geomx_trainer::bench_e2e::scenario::ScenarioId;

/// A fresh output folder of this test process, one per test (tests run in parallel).
fn out_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("geomx-e2e-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn png_dimensions(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn quick_matrix_on_three_scenarios_writes_results_and_plots() {
    let out = out_dir("quick");
    let run = Command::new(env!("CARGO_BIN_EXE_geomx"))
        .args([
            "bench",
            "e2e",
            "--quick",
            "--only",
            "isolated,hips,flat",
            "--wan",
            "off",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run geomx bench e2e");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");

    let json = std::fs::read_to_string(out.join("results.json")).unwrap();
    let mut r: E2eResults = serde_json::from_str(&json).unwrap();
    assert_eq!(r.lab_mode, "off");
    let ids: Vec<ScenarioId> = r.scenarios.iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        [ScenarioId::Flat, ScenarioId::Hips, ScenarioId::Isolated],
        "table order"
    );
    // Non-IID by default: each data center holds half the digits, so on its own it cannot get
    // far past half the test set; with the WAN, HiPS learns all ten.
    let iso = r.scenarios.pop().unwrap();
    assert_eq!(iso.status, Status::NotReached, "{:?}", iso.note);
    let acc = iso.final_accuracy.unwrap();
    assert!((0.3..0.6).contains(&acc), "isolated DCs: {acc}");
    assert!(iso.progress.iter().all(|p| p.test_accuracy < 0.6));
    assert_eq!(iso.time_to_target_s, None);
    assert_eq!(iso.speedup, None);
    assert_eq!(
        iso.progress.len() as u64,
        r.params.rounds,
        "an evaluation every round"
    );
    for s in &r.scenarios {
        assert!(
            matches!(s.status, Status::Reached | Status::NotReached),
            "{:?}: {:?} {:?}",
            s.id,
            s.status,
            s.note
        );
        assert_eq!(s.rounds, r.params.rounds);
        assert!(!s.progress.is_empty());
        assert!(s.final_accuracy.unwrap() > 0.5, "{:?} learned", s.id);
        assert!(s.wan_bytes.unwrap() > 0);
        assert!(
            s.config.get("cluster").is_some(),
            "the configuration is recorded"
        );
    }
    // The flat baseline carries every worker's own gradients over the WAN: twice HiPS's bytes with
    // two workers per DC (within headers and heartbeats).
    let (flat, hips) = (&r.scenarios[0], &r.scenarios[1]);
    let ratio = flat.wan_bytes.unwrap() as f64 / hips.wan_bytes.unwrap() as f64;
    assert!(
        (1.9..2.1).contains(&ratio),
        "flat / hips WAN bytes = {ratio}"
    );
    if let (Some(f), Some(h)) = (flat.time_to_target_s, hips.time_to_target_s) {
        let s = hips.speedup.unwrap();
        assert!((s - f / h).abs() < 1e-9);
    }
    assert_eq!(
        flat.speedup.map(|s| (s * 1e9).round()),
        flat.time_to_target_s.map(|_| 1e9)
    );

    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| Scenario | Time to 90.0 % (s) |"), "{md}");
    assert!(md.contains("| Flat PS (vanilla baseline) |"), "{md}");
    assert!(md.contains("| HiPS FSA |"), "{md}");
    assert!(stdout.contains("| HiPS FSA |"), "the table is printed too");
    for png in ["accuracy.png", "wan_bytes.png"] {
        assert_eq!(png_dimensions(&out.join(png)), (1100, 650), "{png}");
    }
    for f in ["configs/flat.toml", "runs/hips.json", "logs/flat.log"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn unknown_scenario_is_a_usage_error() {
    let out = out_dir("bad");
    let run = Command::new(env!("CARGO_BIN_EXE_geomx"))
        .args(["bench", "e2e", "--quick", "--only", "flat,warp", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("unknown scenario \"warp\""), "{stderr}");
    assert!(!out.exists());
}
