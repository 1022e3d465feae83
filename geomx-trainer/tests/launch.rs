//! End-to-end tests of the `geomx` binary: `geomx launch` starts every role as its own process on
//! loopback. Round counts and timeouts are small so the whole file runs in seconds.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::{accuracy, assert_within_two_points_of_fsa, wan_bytes, GEOMX};

/// A unique scratch file path for this test process.
fn scratch(name: &str) -> PathBuf {
    support::scratch("test", name)
}

fn write_config(name: &str, toml: &str) -> PathBuf {
    let p = scratch(name);
    std::fs::write(&p, toml).unwrap();
    p
}

fn launch(config: Option<&Path>, report: &Path) -> Output {
    let mut cmd = Command::new(GEOMX);
    cmd.arg("launch").arg("--quiet").arg("--report").arg(report);
    if let Some(c) = config {
        cmd.arg(c);
    }
    support::output_within(&mut cmd, support::LAUNCH_LIMIT)
}

fn read_report(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "launch failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The built-in default (2 DCs × 2 workers, one global server, MLP on digits) converges. Its
/// wall time is printed, not asserted (a few seconds idle; a loaded machine may take far longer).
#[test]
fn default_launch_reaches_093_on_digits() {
    let report = scratch("default.json");
    let t = Instant::now();
    let out = launch(None, &report);
    let elapsed = t.elapsed();
    assert_ok(&out);
    let r = read_report(&report);
    let acc = r["final_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.93, "final test accuracy {acc}");
    eprintln!(
        "default launch: {elapsed:?} in all, report wall {} s",
        r["wall_seconds"]
    );
    assert_eq!(r["rounds"], 400);
    assert!(r["replicas_identical"].as_bool().unwrap());
    assert!(r["wan_bytes"].as_u64().unwrap() > 0);
    // Every worker push crosses the LAN, one sum per DC crosses the WAN: LAN ≈ 2 × WAN here.
    let (lan, wan) = (
        r["lan_bytes"].as_u64().unwrap(),
        r["wan_bytes"].as_u64().unwrap(),
    );
    assert!(
        lan > wan * 3 / 2 && lan < wan * 5 / 2,
        "lan {lan} wan {wan}"
    );
    assert_eq!(r["per_global_server_bytes"].as_array().unwrap().len(), 1);
    // Each worker reports its samples per second and where its step time went: 400 rounds of
    // 32 samples; the parts of a round add up to no more than its wall time.
    let workers = r["workers"].as_array().unwrap();
    let expected = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "worker")
        .count();
    assert_eq!(workers.len(), expected);
    let mut total = 0.0;
    for w in workers {
        assert_eq!(
            (w["rounds"].as_u64(), w["samples"].as_u64()),
            (Some(400), Some(400 * 32)),
            "{w}"
        );
        let sps = w["samples_per_s"].as_f64().unwrap();
        let secs = w["train_seconds"].as_f64().unwrap();
        assert!(sps > 0.0 && (sps * secs - 12_800.0).abs() < 1.0, "{w}");
        let part = |k: &str| w[k].as_f64().unwrap();
        let parts = part("data_ms")
            + part("compute_ms")
            + part("wait_ms")
            + part("apply_ms")
            + part("codec_ms")
            + part("copy_ms");
        assert!(part("compute_ms") > 0.0 && part("wait_ms") > 0.0, "{w}");
        // The built-in engine computes on the host vectors: nothing is copied.
        assert_eq!(part("copy_ms"), 0.0, "{w}");
        assert!(parts <= secs * 1e3 / 400.0 + 1e-6, "{w}");
        total += sps;
    }
    assert!((r["samples_per_s"].as_f64().unwrap() - total).abs() < 1e-6 * total);
    // Where each role's round went: one row per data-plane role, over the 400 rounds; no part
    // is negative; the local servers wait on both tiers and the global server on the WAN.
    let rows = r["role_splits"].as_array().unwrap();
    let row = |role: &str| rows.iter().find(|x| x["role"] == role).unwrap();
    let ms = |x: &Value, k: &str| x[k].as_f64().unwrap();
    let round_ms = |x: &Value| {
        [
            "compute_ms",
            "codec_ms",
            "lan_wait_ms",
            "wan_wait_ms",
            "idle_ms",
        ]
        .iter()
        .map(|k| {
            assert!(ms(x, k) >= 0.0, "{x}");
            ms(x, k)
        })
        .sum::<f64>()
    };
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (role, n) in [("worker", 4), ("local_server", 2), ("global_server", 1)] {
        assert_eq!(
            (
                row(role)["processes"].as_u64(),
                row(role)["rounds"].as_u64()
            ),
            (Some(n), Some(400))
        );
    }
    let (w, l, g) = (row("worker"), row("local_server"), row("global_server"));
    // A worker's parts are its round: its training seconds over the rounds, averaged.
    let mean_round = workers
        .iter()
        .map(|x| x["train_seconds"].as_f64().unwrap() * 1e3 / 400.0)
        .sum::<f64>()
        / workers.len() as f64;
    assert!(
        (round_ms(w) - mean_round).abs() < 1e-6 * mean_round,
        "{w} {mean_round}"
    );
    assert_eq!(ms(w, "wan_wait_ms"), 0.0);
    assert!(
        ms(w, "compute_ms") > 0.0 && ms(w, "lan_wait_ms") > 0.0,
        "{w}"
    );
    assert!(
        ms(l, "lan_wait_ms") > 0.0 && ms(l, "wan_wait_ms") > 0.0,
        "{l}"
    );
    assert!(
        ms(g, "wan_wait_ms") > 0.0 && ms(g, "lan_wait_ms") == 0.0,
        "{g}"
    );
    assert_eq!(
        r["config"]["cluster"]["data_centers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let _ = std::fs::remove_file(report);
}

fn multigps_config(servers: usize) -> String {
    format!(
        "[cluster]\nglobal_servers = {servers}\n[train]\nrounds = 20\neval_every = 10\n\
         [placement]\nmin_range = 64\n"
    )
}

/// hips.md oracle 5: 1, 2 and 3 global servers give bit-identical parameters after 20 rounds, and
/// two servers carry bytes within 10 % of each other.
#[test]
fn global_server_count_does_not_change_parameters_and_balances_bytes() {
    let mut hashes = Vec::new();
    for s in 1..=3 {
        let cfg = write_config(&format!("gps{s}.toml"), &multigps_config(s));
        let report = scratch(&format!("gps{s}.json"));
        let out = launch(Some(&cfg), &report);
        assert_ok(&out);
        let r = read_report(&report);
        assert!(r["replicas_identical"].as_bool().unwrap());
        let per: Vec<u64> = r["per_global_server_bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(per.len(), s);
        let (max, min) = (*per.iter().max().unwrap(), *per.iter().min().unwrap());
        assert!(min > 0);
        if s == 2 {
            assert!(max as f64 <= 1.10 * min as f64, "unbalanced: {per:?}");
        }
        hashes.push(r["param_hash"].as_str().unwrap().to_string());
        let _ = std::fs::remove_file(cfg);
        let _ = std::fs::remove_file(report);
    }
    assert_eq!(hashes[0], hashes[1]);
    assert_eq!(hashes[0], hashes[2]);
}

/// Launches `toml` (a long run), waits until rounds are running (the first progress line), sends
/// `signal` to `worker` (e.g. "worker (dc 1, rank 0)") and waits for the launcher to exit.
/// Returns its status, the time from the signal to its exit, and its stderr lines.
fn disturb_worker(
    name: &str,
    toml: &str,
    signal: &str,
    worker: &str,
) -> (ExitStatus, Duration, Vec<String>) {
    let cfg = write_config(name, toml);
    let mut child = Command::new(GEOMX)
        .arg("launch")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let el = err_lines.clone();
    let err_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            el.lock().unwrap().push(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Everyone registered and the rounds run once a progress line shows up.
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("no progress line");
        if line.starts_with("round") {
            break;
        }
    }
    // The pid line comes on stderr, read by another thread: wait for it.
    let prefix = format!("geomx launch: started {worker} pid ");
    let asked = Instant::now();
    let victim = loop {
        let found = err_lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(&prefix).map(|p| p.trim().to_string()));
        match found {
            Some(pid) => break pid,
            None if asked.elapsed() > Duration::from_secs(60) => panic!("no pid line for {worker}"),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let sent = Instant::now();
    let st = Command::new("kill")
        .arg(signal)
        .arg(&victim)
        .status()
        .unwrap();
    assert!(st.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if sent.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("launcher still running 60 s after {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = sent.elapsed();
    err_reader.join().unwrap();
    let _ = std::fs::remove_file(cfg);
    let lines = err_lines.lock().unwrap().clone();
    (status, took, lines)
}

fn final_error(lines: &[String]) -> &str {
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {lines:#?}"))
}

/// Slack over the peer timeout for detection, the abort broadcast and the launcher's exit on a
/// loaded 2-core machine (hips.md oracle 7 says 5 s on an idle one). The bound only proves the
/// run fails instead of hanging; the detection time itself is printed.
const EXIT_SLACK: Duration = Duration::from_secs(15);

/// hips.md oracle 7: a worker killed mid-run fails the run at once with an error naming its dc
/// and rank (a closed connection: no need to wait for the peer timeout).
#[test]
fn killed_worker_fails_the_run_naming_dc_and_rank() {
    let (status, took, lines) = disturb_worker(
        "kill.toml",
        "[train]\nrounds = 100000000\neval_every = 20\n[timeouts]\npeer_dead_ms = 3000\n",
        "-9",
        "worker (dc 1, rank 0)",
    );
    assert!(!status.success());
    eprintln!("killed worker: launcher exited {took:?} after the kill");
    assert!(took < Duration::from_secs(3) + EXIT_SLACK, "took {took:?}");
    let err = final_error(&lines);
    assert!(err.contains("worker (dc 1, rank 0)"), "{err}");
}

fn launch_error(name: &str, toml: &str) -> String {
    let cfg = write_config(name, toml);
    let out = Command::new(GEOMX)
        .arg("launch")
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(cfg);
    assert!(!out.status.success(), "{name} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bad topology files end with an error naming the field, before any process starts.
#[test]
fn bad_topology_files_get_clear_errors() {
    let cases = [
        (
            "zero-gs.toml",
            "[cluster]\nglobal_servers = 0\n",
            "cluster.global_servers",
        ),
        (
            "zero-workers.toml",
            "[[cluster.data_centers]]\nname = \"a\"\nworkers = 0\n",
            "workers",
        ),
        (
            "unknown-key.toml",
            "[cluster]\nglobal_serverz = 2\n",
            "global_serverz",
        ),
        ("bad-type.toml", "[train]\nrounds = \"many\"\n", "rounds"),
        ("bad-toml.toml", "[cluster\n", "bad-toml.toml"),
    ];
    for (name, toml, needle) in cases {
        let err = launch_error(name, toml);
        assert!(err.contains(needle), "{name}: {err}");
        assert!(
            !err.contains("started"),
            "{name}: processes were started: {err}"
        );
    }
    let missing = Command::new(GEOMX)
        .args(["launch", "/nonexistent/geomx.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/geomx.toml"));
}

/// `geomx run` without enough identity fails with a usage error, not a hang.
#[test]
fn run_without_role_or_dmlc_env_is_an_error() {
    let out = Command::new(GEOMX)
        .args(["run"])
        .env_remove("DMLC_ROLE")
        .env_remove("DMLC_ROLE_GLOBAL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DMLC_ROLE"));
    let out = Command::new(GEOMX)
        .args(["run", "--role", "worker", "--dc", "0", "--rank", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("coordinator"));
}

/// `geomx pki --days` outside 1..=36,500 is a usage error naming the flag (2^32 − 1 days
/// panicked in the date arithmetic before), and writes nothing.
#[test]
fn pki_validity_out_of_range_is_a_usage_error() {
    let dir = std::env::temp_dir().join(format!("geomx-pki-days-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for cmd in ["init", "issue"] {
        for days in ["0", "36501", "4294967295"] {
            let out = Command::new(GEOMX)
                .args(["pki", cmd, "--dir"])
                .arg(&dir)
                .args(["--days", days])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} --days {days}: {err}");
            assert!(err.contains("--days"), "{cmd} --days {days}: {err}");
        }
    }
    assert!(!dir.exists());
}

/// A worker that stops answering (SIGSTOP, connection still open) is declared dead after the
/// configured peer timeout; the run fails naming it instead of hanging.
#[test]
fn stopped_worker_is_declared_dead_within_the_peer_timeout() {
    let (status, took, lines) = disturb_worker(
        "stop.toml",
        "[train]\nrounds = 100000000\neval_every = 20\n[timeouts]\npeer_dead_ms = 3000\nheartbeat_ms = 500\n",
        "-STOP",
        "worker (dc 0, rank 1)",
    );
    assert!(!status.success());
    eprintln!("stopped worker: launcher exited {took:?} after SIGSTOP (peer timeout 3 s)");
    assert!(took < Duration::from_secs(3) + EXIT_SLACK, "took {took:?}");
    let err = final_error(&lines);
    assert!(err.contains("worker (dc 0, rank 1)"), "{err}");
}

/// `geomx bench net|kernels --quick` print one JSON object each.
#[test]
fn bench_subcommands_print_one_json_line() {
    for what in ["net", "kernels"] {
        let out = Command::new(GEOMX)
            .args(["bench", what, "--quick"])
            .output()
            .unwrap();
        assert_ok(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert!(v.is_object() && v.get("error").is_none(), "{what}: {v}");
    }
}

/// 2 DCs × 2 workers, an MLP with hidden [512] on digits (weights of 32,768 and 5,120 elements
/// exceed T = 1000; the biases stay below), `rounds` rounds, then `extra` TOML.
fn codec_config(rounds: u64, extra: &str) -> String {
    format!(
        "[cluster]\ndata_centers = 2\nworkers_per_dc = 2\n[model]\nkind = \"mlp\"\nhidden = [512]\n\
         [train]\nrounds = {rounds}\neval_every = {rounds}\n{extra}"
    )
}

fn launch_report(name: &str, toml: &str) -> Value {
    support::launch_report("test", name, toml)
}

fn codec_bytes(r: &Value, class: &str) -> u64 {
    r["codec_bytes"][class].as_u64().unwrap_or(0)
}

/// compression.md on the WAN tier: Bi-Sparse at ρ = 0.01 with FP16 values moves ≤ 5 % of the WAN
/// bytes of uncompressed FSA (push + pull, frame headers included) and ends within 1 accuracy
/// point; FP16 on both tiers moves ≤ 52 % and ends within 0.5 point.
#[test]
fn bisparse_and_fp16_cut_wan_bytes_and_keep_accuracy() {
    let rounds = 300;
    let none = launch_report("codec-none", &codec_config(rounds, ""));
    let fp16 = launch_report(
        "codec-fp16",
        &codec_config(
            rounds,
            "[compression]\nintra = { codec = \"fp16\" }\ninter = { codec = \"fp16\" }\n",
        ),
    );
    let bisparse = launch_report(
        "codec-bisparse",
        &codec_config(
            rounds,
            "[compression.inter]\ncodec = \"bisparse\"\ndensity = 0.01\nmin_size = 1000\n\
             values = \"fp16\"\nwarmup_rounds = 0\n",
        ),
    );
    let wan = |r: &Value| r["wan_bytes"].as_u64().unwrap() as f64;
    for (name, r) in [("none", &none), ("fp16", &fp16), ("bisparse", &bisparse)] {
        eprintln!(
            "{name}: wan_bytes {} ({:.1} % of none), per round {:.0}, lan_bytes {}, accuracy {:.4}, \
             codec_bytes {}",
            wan(r),
            100.0 * wan(r) / wan(&none),
            r["wan_bytes_per_round"].as_f64().unwrap(),
            r["lan_bytes"],
            accuracy(r),
            r["codec_bytes"]
        );
        assert!(r["replicas_identical"].as_bool().unwrap(), "{name}");
        assert_eq!(r["rounds"], rounds, "{name}");
    }
    assert!(
        wan(&bisparse) <= 0.05 * wan(&none),
        "bisparse {}",
        wan(&bisparse)
    );
    assert!(
        accuracy(&bisparse) >= accuracy(&none) - 0.01,
        "bisparse accuracy"
    );
    assert!(wan(&fp16) <= 0.52 * wan(&none), "fp16 {}", wan(&fp16));
    assert!(accuracy(&fp16) >= accuracy(&none) - 0.005, "fp16 accuracy");
    // Payload classes: FP16 is all 16-bit; uncompressed all f32; Bi-Sparse sends the large
    // tensors sparse and the biases (below T) dense f32.
    assert_eq!(codec_bytes(&fp16, "f32"), 0);
    assert!(codec_bytes(&fp16, "fp16") > 0);
    assert_eq!(codec_bytes(&none, "fp16") + codec_bytes(&none, "sparse"), 0);
    assert!(codec_bytes(&bisparse, "sparse") > 0);
    // Dense f32 biases (512 + 10 elements; values counted): push and reply, both DCs.
    assert_eq!(
        codec_bytes(&bisparse, "f32"),
        rounds * 2 * 2 * (4 * 512 + 4 * 10)
    );
    let wpr = bisparse["wan_bytes_per_round"].as_f64().unwrap();
    assert!((wpr - wan(&bisparse) / rounds as f64).abs() < 1e-6);
}

/// MPQ: tensors of N ≥ T go Bi-Sparse with f32 values, smaller ones dense FP16, read from the
/// per-codec byte counters (FP16 = 12 + 2N per payload, exactly).
#[test]
fn mpq_sends_small_tensors_fp16_and_large_ones_sparse() {
    let rounds = 60;
    let r = launch_report(
        "codec-mpq",
        &codec_config(
            rounds,
            "[compression.inter]\ncodec = \"mpq\"\nmin_size = 1000\ndensity = 0.01\n\
             warmup_rounds = 0\n",
        ),
    );
    assert!(r["replicas_identical"].as_bool().unwrap());
    assert_eq!(codec_bytes(&r, "f32"), 0, "{}", r["codec_bytes"]);
    assert_eq!(
        codec_bytes(&r, "fp16"),
        rounds * 2 * 2 * (12 + 2 * 512 + 12 + 2 * 10)
    );
    // Sparse f32 values: each push holds k = ⌈0.01·N⌉ entries of 8 bytes per large tensor (plus
    // headers); the pull at most D·k.
    let sparse = codec_bytes(&r, "sparse");
    let k = 328 + 52;
    assert!(sparse >= rounds * 2 * (12 * 2 + 8 * k), "sparse {sparse}");
    assert!(sparse <= rounds * 2 * (12 * 2 + 8 * k + 2 * (5 + 12) + 8 * 2 * k));
}

/// Bi-Sparse replicas: workers apply the optimizer to the sparse mean gradient and match the global
/// server's θ bit for bit at every dense resynchronisation (FP16 values, Adam, warm-up).
#[test]
fn bisparse_replicas_match_global_parameters_at_every_resync() {
    let r = launch_report(
        "codec-resync",
        &codec_config(
            40,
            "[train.optimizer]\nkind = \"adam\"\nlr = 0.001\n[compression.inter]\n\
             codec = \"bisparse\"\ndensity = 0.01\nmin_size = 1000\nvalues = \"fp16\"\n\
             warmup_rounds = 10\nresync_every = 10\n",
        ),
    );
    assert!(r["replicas_identical"].as_bool().unwrap());
    let workers: Vec<&Value> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "worker")
        .collect();
    assert_eq!(workers.len(), 4);
    for w in workers {
        // 4 resynchronisations × 2 sparse keys.
        assert_eq!(w["resyncs"], 8, "{w}");
        assert!(w.get("resync_mismatches").is_none(), "{w}");
    }
}

/// sync.md oracle 9 for MixedSync: the DCs asynchronous at the global tier (DC-ASGD, and the plain
/// optimizer) end within 2 accuracy points of FSA on digits; the global server records staleness
/// for both DCs. DC-ASGD gets FSA's SGD momentum 0.9 (its own default is 0, which needs more
/// rounds: about 0.94 after 300).
#[test]
fn mixed_sync_converges_within_two_points_of_fsa() {
    let base = "[cluster]\ndata_centers = 2\nworkers_per_dc = 2\n[train]\nrounds = 300\neval_every = 300\n";
    let fsa = launch_report("sync-fsa", base);
    for (name, extra) in [
        (
            "sync-mixed-dcasgd",
            "[sync]\nalgorithm = \"mixed\"\n[sync.mixed]\nmomentum = 0.9\n",
        ),
        (
            "sync-mixed-plain",
            "[sync]\nalgorithm = \"mixed\"\n[sync.mixed]\noptimizer = \"plain\"\n",
        ),
    ] {
        let r = launch_report(name, &format!("{base}{extra}"));
        assert_within_two_points_of_fsa(name, &r, &fsa, 300, "");
        let global = r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["role"] == "global_server")
            .unwrap_or_else(|| panic!("{name}: no global server stats"));
        let st = global["staleness"].as_array().unwrap();
        assert_eq!(st.len(), 2, "{name}");
        for s in st {
            // Every DC pushed each of the 300 rounds once per range.
            assert!(s["pushes"].as_u64().unwrap() >= 300, "{name}: {s}");
        }
    }
}

/// sync.md oracles 5 and 9 for HFA: K1 = 5, K2 = 4 (average) and DiLoCo's Nesterov outer step end
/// within 2 accuracy points of FSA on digits, and the WAN carries one exchange per 20 steps.
#[test]
fn hfa_converges_within_two_points_of_fsa_with_a_twentieth_of_the_wan_rounds() {
    let base = "[cluster]\ndata_centers = 2\nworkers_per_dc = 2\n[train]\nrounds = 300\neval_every = 300\n";
    let fsa = launch_report("hfa-fsa", base);
    for (name, extra) in [
        (
            "hfa-average",
            "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\n",
        ),
        (
            "hfa-nesterov",
            "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\nouter = \"nesterov\"\n",
        ),
    ] {
        let r = launch_report(name, &format!("{base}{extra}"));
        let lan = format!(", lan_bytes {}", r["lan_bytes"]);
        assert_within_two_points_of_fsa(name, &r, &fsa, 300, &lan);
        // After every global round all replicas hold the milestone.
        assert!(r["replicas_identical"].as_bool().unwrap(), "{name}");
        // 15 WAN exchanges instead of 300 (plus the θ_0 pull): about 1/20 of FSA's bytes.
        let ratio = wan_bytes(&r) as f64 / wan_bytes(&fsa) as f64;
        assert!(ratio > 0.045 && ratio < 0.06, "{name}: WAN ratio {ratio}");
    }
}
