//! Issue 16, part 2: a job that survives the loss of workers (`[resilience]`), with real
//! processes. A worker kills itself (`geomx launch --chaos`), its local server closes the rounds
//! with the workers present, the launcher restarts it and it rejoins with the current θ. The
//! final θ must equal a single-process replay of the local servers' round logs bit for bit, every
//! replica must agree, and accuracy must stay within 1 point of the fault-free run.

mod support;

use std::process::Command;

use geomx_trainer::config::Config;
use geomx_trainer::hips::round_log::{replay, PartialRound};
use serde_json::Value;
use support::{ckpt_scratch, output_within, scratch, GEOMX, LAUNCH_LIMIT};

/// 2 DCs × 2 workers, 1500 rounds, fast failure detection. Every training step sleeps at least
/// 1.2 ms (`layer_delay_ms`, values unchanged), so the job lasts seconds however fast the machine
/// is, and a restart (about 0.3 s here) lands well before the end.
fn job(restart: &str) -> String {
    format!(
        "[train]\nrounds = 1500\neval_every = 0\n\
         [model]\nhidden = [16]\nlayer_delay_ms = [0.3, 0.3]\n\
         [cluster]\ndata_centers = 2\nworkers_per_dc = 2\n\
         [timeouts]\nheartbeat_ms = 100\npeer_dead_ms = 1000\n\
         [resilience]\nlost_worker = \"continue\"\nrestart = \"{restart}\"\n"
    )
}

/// Held by every test of this file for its whole run: each starts a cluster of processes (with
/// restarts, and some a WAN lab whose namespaces the kernel tears down for a while after it)
/// and checks detection times and that a restart rejoins before the job ends. Two at once on 2
/// cores made those checks fail: a dying process waits in the kernel while its io_uring rings
/// are torn down (`io_ring_ctx_wait_and_kill` flushing a shared work queue, which the other
/// test's namespace teardown keeps busy), and the launcher restarts it only once it has exited.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `geomx launch` on `toml` with `--chaos chaos` (if any); asserts success; the report.
fn launch(name: &str, toml: &str, chaos: Option<&str>) -> (Value, String) {
    let cfg = scratch("resilience", &format!("{name}.toml"));
    let report = scratch("resilience", &format!("{name}.json"));
    std::fs::write(&cfg, toml).unwrap();
    let mut cmd = Command::new(GEOMX);
    cmd.args(["launch", "--quiet", "--report"])
        .arg(&report)
        .arg(&cfg);
    if let Some(c) = chaos {
        cmd.args(["--chaos", c]);
    }
    let out = output_within(&mut cmd, LAUNCH_LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: {}\n{stderr}", out.status);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let _ = std::fs::remove_file(cfg);
    let _ = std::fs::remove_file(report);
    (r, stderr)
}

/// The partial rounds of the coordinator's round log (its journal of what the servers logged,
/// which outlives a server that dies), checked complete.
fn partial_rounds(r: &Value) -> Vec<PartialRound> {
    let coord = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "coordinator")
        .expect("the coordinator's stats");
    let Some(log) = coord.get("round_log") else {
        return Vec::new();
    };
    assert_eq!(log["lost_records"], 0, "an incomplete round log: {log}");
    serde_json::from_value(log["partial_rounds"].clone()).unwrap()
}

/// The single-process replay of `r`'s round logs, hashed like the report's hashes.
fn replayed_hash(toml: &str, r: &Value) -> String {
    let mut cfg = Config::from_toml_str(toml).unwrap();
    // The emulated compute changes no value; the replay need not sleep.
    cfg.model.layer_delay_ms.clear();
    let data = geomx_trainer::data::load(&cfg.data).unwrap();
    let rounds = r["rounds"].as_u64().unwrap();
    let run = replay(&cfg, &data, rounds, &partial_rounds(r)).unwrap();
    format!("{:016x}", geomx_trainer::hash::params_hash(&run.params))
}

fn accuracy(r: &Value) -> f64 {
    r["final_test_accuracy"].as_f64().unwrap()
}

#[test]
fn a_killed_worker_is_restarted_rejoins_and_the_job_equals_its_replay() {
    let _one = one_at_a_time();
    let toml = job("on-failure");
    let (clean, _) = launch("clean", &toml, None);
    assert!(clean.get("faults").is_none());
    assert_eq!(clean["global_param_hash"], replayed_hash(&toml, &clean));

    let (r, stderr) = launch("killed", &toml, Some("kill:worker:dc1:0@round=40"));
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 1, "{faults:?}\n{stderr}");
    let f = &faults[0];
    assert_eq!(f["process"], "worker (dc 1, rank 0)");
    assert_eq!(f["cause"], "killed by signal 9");
    assert_eq!(f["lost_round"], 40, "{f}");
    // Detected within 1.5 s (a SIGKILL closes the connection: at once).
    assert!(f["detected_after_s"].as_f64().unwrap() <= 1.5, "{f}");
    let back = f["rejoined_round"].as_u64().expect("the worker rejoined");
    assert!(back > 40 && back < 1500, "{f}");
    assert_eq!(r["restarts"]["worker"], 1);
    // The rejoined worker is incarnation 1 and holds the same θ as everyone.
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    let worker = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "worker" && p["dc"] == 1 && p["rank"] == 0)
        .unwrap_or_else(|| panic!("no stats of worker (dc 1, rank 0)\n{stderr}"));
    assert_eq!(worker["incarnation"], 1);
    // The rounds without it are logged, and the final θ is their replay, bit for bit.
    let partial = partial_rounds(&r);
    assert!(partial
        .iter()
        .all(|p| p.dc == 1 && p.ranks == [1] && p.from == 40 && p.to == back));
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
    assert_ne!(r["global_param_hash"], clean["global_param_hash"]);
    let (a, b) = (accuracy(&r), accuracy(&clean));
    eprintln!("fault-free accuracy {b:.4}, with the killed worker {a:.4}; {f}");
    assert!((a - b).abs() <= 0.01, "{a} vs {b}");
}

#[test]
fn without_restarts_the_job_finishes_with_the_workers_left() {
    let _one = one_at_a_time();
    let toml = job("never");
    let (r, stderr) = launch("norestart", &toml, Some("kill:worker:dc0:1@round=30"));
    let f = &r["faults"][0];
    assert_eq!(f["restarted"], false, "{stderr}");
    assert_eq!(f["rounds_reduced"], 1470, "{f}");
    assert!(r.get("restarts").is_none());
    // Three workers report; they and the global servers agree, and match the replay.
    let workers = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "worker")
        .count();
    assert_eq!(workers, 3);
    assert_eq!(r["replicas_identical"], true);
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

#[test]
fn by_default_a_lost_worker_still_ends_the_job() {
    let _one = one_at_a_time();
    let toml = "[train]\nrounds = 300\n[model]\nhidden = [16]\n";
    let cfg = scratch("resilience", "abort.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = output_within(
        Command::new(GEOMX)
            .args(["launch", "--quiet", "--chaos", "kill:worker:dc1:1@round=20"])
            .arg(&cfg),
        LAUNCH_LIMIT,
    );
    let _ = std::fs::remove_file(cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("worker (dc 1, rank 1)"), "{stderr}");
}

#[test]
fn a_data_center_that_loses_every_worker_waits_for_them_and_the_job_equals_its_replay() {
    let _one = one_at_a_time();
    // 3 DCs × 2 workers: both workers of dc1 die in the same round (one after its first push,
    // one waiting for its replies), one of dc2 later.
    let toml = job("on-failure").replace("data_centers = 2", "data_centers = 3");
    let chaos = "kill:worker:dc1:0@round=100:mid-push,kill:worker:dc1:1@round=100:reply-wait,\
                 kill:worker:dc2:1@round=600";
    let (r, stderr) = launch("dc", &toml, Some(chaos));
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 3, "{faults:?}\n{stderr}");
    assert!(
        faults.iter().all(|f| f["rejoined_round"].is_u64()),
        "{faults:?}"
    );
    assert_eq!(r["restarts"]["worker"], 3);
    assert_eq!(r["replicas_identical"], true);
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

#[test]
fn a_stopped_worker_is_dropped_within_the_detection_time_and_rejoins_after_it_resumes() {
    let _one = one_at_a_time();
    // SIGSTOP for 1.5 s while waiting for its replies: the local server hears nothing for
    // peer_dead_ms (1 s) and drops it; resumed, the worker finds its connections closed, exits,
    // and is restarted. 8000 rounds (at least 9.6 s of emulated compute after the stop): the
    // restart of a debug build on a loaded CI machine took longer than 3000 rounds once.
    let toml = job("on-failure").replace("rounds = 1500", "rounds = 8000");
    let chaos = "stop=1500ms:worker:dc0:1@round=60:reply-wait";
    let (r, stderr) = launch("stop", &toml, Some(chaos));
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 1, "{faults:?}\n{stderr}");
    let f = &faults[0];
    let detected = f["detected_after_s"].as_f64().unwrap();
    eprintln!("stopped worker: {f}");
    assert!((0.9..=1.5).contains(&detected), "{f}");
    assert!(f["rejoined_round"].is_u64(), "{f}\n{stderr}");
    assert_eq!(r["replicas_identical"], true);
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

/// Held by a test that runs the WAN lab: the namespace check before and after its launch must not
/// see another test's lab.
static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `ip netns list` names starting with "gx" (the WAN lab's), when `ip` runs here.
/// Checks that the lab the job of report `r` ran in removed its namespaces. Only its own (named
/// by the report's `wan_lab.prefix`): other labs on the machine may come and go meanwhile.
fn assert_lab_gone(r: &Value) {
    let prefix = r["wan_lab"]["prefix"]
        .as_str()
        .unwrap_or_else(|| panic!("no lab prefix in the report: {}", r["wan_lab"]));
    let own = format!("{prefix}-");
    let left: Vec<String> = lab_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&own))
        .collect();
    assert!(left.is_empty(), "the lab left namespaces behind: {left:?}");
}

fn lab_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("gx"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn behind_the_wan_lab_a_killed_and_a_stopped_worker_rejoin() {
    let _one = one_at_a_time();
    // The WAN lab in auto mode: network namespaces as root, loopback relays otherwise. A restart
    // runs in its site's namespace again. 3 DCs × 2 workers, 5 ms links. 2000 rounds (about
    // 25 s after the stop on an idle machine): with 600, a CI run ended the job before the
    // stopped worker's restart rejoined, the worker having exited 8 s after its stop (1.5 s on
    // an idle machine). A dying process waits in the kernel while its io_uring rings are torn
    // down (`io_ring_ctx_wait_and_kill` flushing a shared work queue), which the lab's namespace
    // teardowns can keep busy, and the launcher restarts it only once it has exited.
    let toml = job("on-failure")
        .replace("data_centers = 2", "data_centers = 3")
        .replace("rounds = 1500", "rounds = 2000")
        + "[wan]\nmode = \"auto\"\nrate_mbit = 100\ndelay_ms = 5\n";
    let _lab = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let chaos = "kill:worker:dc1:0@round=50,stop=1500ms:worker:dc2:1@round=100:reply-wait";
    let (r, stderr) = launch("wan", &toml, Some(chaos));
    eprintln!("WAN lab mode {}", r["wan_mode"]);
    let faults = r["faults"].as_array().unwrap();
    eprintln!("faults: {faults:?}; job wall time {} s", r["wall_seconds"]);
    assert_eq!(faults.len(), 2, "{faults:?}\n{stderr}");
    assert!(
        faults.iter().all(|f| f["rejoined_round"].is_u64()),
        "{faults:?}\n{stderr}"
    );
    assert!(
        faults[1]["detected_after_s"].as_f64().unwrap() <= 1.5,
        "{faults:?}"
    );
    assert_eq!(r["replicas_identical"], true);
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
    assert_lab_gone(&r);
}

#[test]
fn under_hfa_killed_workers_rejoin_with_their_dcs_model_and_milestone() {
    let _one = one_at_a_time();
    // HFA k1 = 5, k2 = 4: a worker killed mid-period and one killed while pushing its model
    // (round 2399 ends a global period) rejoin at an averaging with the DC's model and milestone.
    // Late in the run, so that the final accuracy measures the recovery rather than a trajectory
    // that diverged early (a digits test sample is 0.28 points). Plain, and with SCAFFOLD's
    // control variates, which a restarted worker starts again from zero (as the replay does).
    for correction in ["none", "scaffold"] {
        let hfa = format!(
            "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\ncorrection = \"{correction}\"\n"
        );
        let toml = job("on-failure").replace("rounds = 1500", "rounds = 4000") + &hfa;
        let (clean, _) = launch(&format!("hfa-{correction}-clean"), &toml, None);
        let chaos = "kill:worker:dc1:0@round=2004,kill:worker:dc0:1@round=2399:mid-push";
        let (r, stderr) = launch(&format!("hfa-{correction}"), &toml, Some(chaos));
        let faults = r["faults"].as_array().unwrap();
        assert_eq!(faults.len(), 2, "{correction}: {faults:?}\n{stderr}");
        for f in faults {
            let back = f["rejoined_round"].as_u64().expect("rejoined");
            assert_eq!(back % 5, 0, "HFA rejoins at an averaging: {f}");
        }
        assert_eq!(r["restarts"]["worker"], 2, "{correction}");
        assert_eq!(r["replicas_identical"], true, "{correction}: {stderr}");
        // The milestone is the HFA replay of the averagings each worker missed.
        assert_eq!(
            clean["global_param_hash"],
            replayed_hash(&toml, &clean),
            "{correction}"
        );
        assert_eq!(
            r["global_param_hash"],
            replayed_hash(&toml, &r),
            "{correction}"
        );
        let (a, b) = (accuracy(&r), accuracy(&clean));
        eprintln!("HFA ({correction}) fault-free accuracy {b:.4}, with two killed workers {a:.4}");
        assert!((a - b).abs() <= 0.01, "{correction}: {a} vs {b}");
    }
}

#[test]
fn under_hfa_a_killed_coordinator_and_a_stopped_worker_recover() {
    let _one = one_at_a_time();
    // HFA k1 = 5, k2 = 4 with a coordinator that may be lost (its snapshot in a checkpoint
    // directory): the coordinator is killed early and restarted, every member reattaches, and a
    // worker stopped for 1.5 s while waiting for the reply to its model push (round 1499 ends a
    // period of k1 = 5) is dropped and rejoins at an averaging. Every replica agrees, within a point of the fault-free accuracy.
    let dir = ckpt_scratch("resilience", "hfa-coord-ckpt");
    let _ = std::fs::remove_dir_all(&dir);
    let toml = job("on-failure").replace("rounds = 1500", "rounds = 3000")
        + &format!(
            "lost_coordinator = \"continue\"\n[checkpoint]\ndir = {:?}\nevery_rounds = 500\n\
             [sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\n",
            dir.display().to_string()
        );
    let (clean, _) = launch("hfa-coord-clean", &toml, None);
    let _ = std::fs::remove_dir_all(&dir);
    let chaos = "kill:coordinator@after=300ms,stop=1500ms:worker:dc1:1@round=1499:reply-wait";
    let (r, stderr) = launch("hfa-coord", &toml, Some(chaos));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(r["restarts"]["coordinator"], 1, "{stderr}");
    let w = fault_of(&r, "worker (dc 1, rank 1)");
    let back = w["rejoined_round"]
        .as_u64()
        .expect("the stopped worker rejoined");
    assert_eq!(back % 5, 0, "HFA rejoins at an averaging: {w}");
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
    let (a, b) = (accuracy(&r), accuracy(&clean));
    eprintln!(
        "HFA fault-free accuracy {b:.4}, with the coordinator killed and a worker stopped {a:.4}"
    );
    assert!((a - b).abs() <= 0.01, "{a} vs {b}");
}

/// `job` with lost local servers survivable too, at most `max_restarts` restarts per process.
fn dc_job(dcs: usize, min_dcs: usize) -> String {
    job("on-failure").replace("data_centers = 2", &format!("data_centers = {dcs}"))
        + &format!("lost_dc = \"continue\"\nmin_dcs = {min_dcs}\nmax_restarts = 5\n")
}

/// The faults of `r` by process name.
fn fault_of<'a>(r: &'a Value, process: &str) -> &'a Value {
    r["faults"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["process"] == process)
        .unwrap_or_else(|| panic!("no fault of {process}: {}", r["faults"]))
}

#[test]
fn a_lost_data_center_is_left_out_then_rejoins_and_the_job_equals_its_replay() {
    let _one = one_at_a_time();
    // 3 DCs, quorum 2: dc1's local server dies; the global tier goes on with dc0 and dc2, the
    // restarted local server rejoins where the global servers are, and its workers (which lost
    // their server) are restarted and rejoin it. 4000 rounds: with 1500, a CI run ended the job
    // before the restarted local server rejoined (a killed process may take seconds to exit:
    // see `behind_the_wan_lab_a_killed_and_a_stopped_worker_rejoin`).
    let toml = dc_job(3, 2).replace("rounds = 1500", "rounds = 4000");
    let (r, stderr) = launch("dc-lost", &toml, Some("kill:local_server:dc1:0@round=100"));
    let f = fault_of(&r, "local_server (dc 1, rank 0)");
    assert_eq!(f["lost_round"], 100, "{f}\n{stderr}");
    let back = f["rejoined_round"].as_u64().unwrap_or_else(|| {
        panic!(
            "the local server did not rejoin: {}; job wall time {} s\n{stderr}",
            r["faults"], r["wall_seconds"]
        )
    });
    assert!((100..4000).contains(&back), "{f}");
    assert_eq!(r["restarts"]["local_server"], 1);
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    // Rounds without dc1 are logged by the global server, the ones its workers missed after
    // the rejoin by the new local server; the final θ is the replay of both.
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

#[test]
fn under_hfa_a_lost_data_center_and_a_lost_worker_rejoin_and_the_job_equals_its_replay() {
    let _one = one_at_a_time();
    // HFA k1 = 5, k2 = 4 over 3 DCs, quorum 2: dc1's local server dies mid-period (round 1010,
    // the 202nd averaging), the global tier averages dc0 and dc2 until the restarted local
    // server rejoins at a global round, and its workers rejoin it with the milestone; a worker
    // of dc2 is killed while pushing its model. The final milestone equals the single-process
    // HFA replay of the coordinator's round log, bit for bit (the fault-free run too).
    let toml = dc_job(3, 2).replace("rounds = 1500", "rounds = 3000")
        + "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\n";
    let (clean, _) = launch("hfa-dc-clean", &toml, None);
    assert_eq!(clean["global_param_hash"], replayed_hash(&toml, &clean));
    let chaos = "kill:local_server:dc1:0@round=1010,kill:worker:dc2:1@round=1799:mid-push";
    let (r, stderr) = launch("hfa-dc", &toml, Some(chaos));
    let f = fault_of(&r, "local_server (dc 1, rank 0)");
    assert_eq!(
        f["lost_round"], 1000,
        "lost in the period from round 1000: {f}\n{stderr}"
    );
    let back = f["rejoined_round"].as_u64().unwrap_or_else(|| {
        panic!(
            "the local server did not rejoin: {}; job wall time {} s\n{stderr}",
            r["faults"], r["wall_seconds"]
        )
    });
    assert_eq!(back % 20, 0, "a DC rejoins at a global round: {f}");
    assert!((1000..3000).contains(&back), "{f}");
    let w = fault_of(&r, "worker (dc 2, rank 1)");
    assert_eq!(w["rejoined_round"].as_u64().map(|b| b % 5), Some(0), "{w}");
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
    assert_ne!(r["global_param_hash"], clean["global_param_hash"]);
    let (a, b) = (accuracy(&r), accuracy(&clean));
    eprintln!("HFA fault-free accuracy {b:.4}, with a lost DC and a lost worker {a:.4}");
    assert!((a - b).abs() <= 0.01, "{a} vs {b}");
}

#[test]
fn local_servers_killed_mid_push_and_stopped_while_waiting_rejoin_and_the_job_equals_its_replay() {
    let _one = one_at_a_time();
    // 3 DCs, quorum 2. dc1's local server dies after its first push upward of round 100 (the
    // global tier completes the round with what arrived, or without dc1); dc2's is stopped
    // for 2.5 s while it waits for round 700's replies: the global tier finds it silent after
    // the detection time and goes on without it, and it wakes to find itself left out, ends,
    // and its restart rejoins. The final θ is the replay of the rounds without them.
    let toml = dc_job(3, 2);
    let chaos = "kill:local_server:dc1:0@round=100:mid-push,\
                 stop=2500ms:local_server:dc2:0@round=700:reply-wait";
    let (r, stderr) = launch("ls-points", &toml, Some(chaos));
    let killed = fault_of(&r, "local_server (dc 1, rank 0)");
    assert_eq!(killed["cause"], "killed by signal 9", "{killed}\n{stderr}");
    assert!(
        (100..=101).contains(&killed["lost_round"].as_u64().unwrap()),
        "{killed}"
    );
    let stopped = fault_of(&r, "local_server (dc 2, rank 0)");
    assert!(
        stopped["detected_after_s"].as_f64().unwrap() <= 1.5,
        "{stopped}\n{stderr}"
    );
    assert!(
        (700..=701).contains(&stopped["lost_round"].as_u64().unwrap()),
        "{stopped}"
    );
    for f in [killed, stopped] {
        assert!(f["rejoined_round"].is_u64(), "{f}\n{stderr}");
    }
    assert_eq!(r["restarts"]["local_server"], 2, "{stderr}");
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

#[test]
fn below_the_quorum_the_global_tier_waits_for_the_lost_data_center() {
    let _one = one_at_a_time();
    // 2 DCs, quorum 2: while dc0's local server is away no global round completes, so the job
    // does not move on without it. The only rounds without dc0 are those its restarted workers
    // had not rejoined yet, and at most one round per key that was in flight when it rejoined
    // (a range still collecting the round before the rejoin round completes with the DCs
    // that pushed it, rather than wait forever).
    let toml = dc_job(2, 2);
    let (r, stderr) = launch("dc-quorum", &toml, Some("kill:local_server:dc0:0@round=60"));
    let f = fault_of(&r, "local_server (dc 0, rank 0)");
    let lost = f["lost_round"].as_u64().unwrap();
    assert_eq!(f["rejoined_round"], lost, "{f}\n{stderr}");
    let global_partial: Vec<PartialRound> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "global_server")
        .filter_map(|p| p.get("partial_rounds"))
        .flat_map(|v| serde_json::from_value::<Vec<PartialRound>>(v.clone()).unwrap())
        .collect();
    assert!(
        global_partial
            .iter()
            .all(|p| p.to == lost && p.from + 1 == lost),
        "{global_partial:?}"
    );
    assert_eq!(r["replicas_identical"], true);
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

/// `job` with two global servers and a coordinator that may be lost (`lost_global_server`,
/// `lost_coordinator = "continue"`), saving every 50 rounds into a fresh directory of `name`.
fn global_job(name: &str) -> (String, std::path::PathBuf) {
    let dir = ckpt_scratch("resilience", &format!("{name}-ckpt"));
    let _ = std::fs::remove_dir_all(&dir);
    let toml = job("on-failure").replace(
        "workers_per_dc = 2\n",
        "workers_per_dc = 2\nglobal_servers = 2\n",
    ) + &format!(
        "lost_global_server = \"continue\"\nlost_coordinator = \"continue\"\n\
         [checkpoint]\ndir = {:?}\nevery_rounds = 50\n",
        dir.display().to_string()
    );
    (toml, dir)
}

#[test]
fn killed_global_servers_and_coordinator_restart_and_the_job_is_bit_identical() {
    let _one = one_at_a_time();
    // Global server 1 dies while a round collects pushes (restarting from round 100); global
    // server 0 dies once round 700 is complete, before its replies. Checkpoints are written in
    // the background: the replies go out before round 700's file is written, so the restart
    // continues from round 650 (waiting for the disk, it would read round 700's θ back). The
    // local servers resend the rounds since those checkpoints, so nothing is lost: the job ends
    // with the fault-free θ, bit for bit. The coordinator is killed too, 300 ms into the run: its
    // restart continues from its snapshot and every member reattaches.
    let (clean_toml, dir) = global_job("gs-clean");
    let (clean, _) = launch("gs-clean", &clean_toml, None);
    let _ = std::fs::remove_dir_all(dir);
    let (toml, dir) = global_job("gs-killed");
    let chaos = "kill:global-server:1@round=130:mid-push,\
                 kill:global-server:0@round=700:reply-wait,kill:coordinator@after=300ms";
    let (r, stderr) = launch("gs-killed", &toml, Some(chaos));
    let _ = std::fs::remove_dir_all(dir);
    for (process, lost) in [
        ("global_server (dc 2, rank 1)", 129),
        ("global_server (dc 2, rank 0)", 699),
    ] {
        let f = fault_of(&r, process);
        assert_eq!(f["cause"], "killed by signal 9", "{f}\n{stderr}");
        assert_eq!(f["restarted"], true, "{f}");
        assert!(f["detected_after_s"].as_f64().unwrap() <= 1.5, "{f}");
        assert!(f["rejoined_after_s"].is_f64(), "{f}");
        assert_eq!(f["lost_round"], lost, "{f}");
        // The global tier paused; no round ran without it.
        assert_eq!(f["rounds_reduced"], 0, "{f}");
    }
    assert_eq!(r["restarts"]["global_server"], 2);
    for from in [100, 650] {
        let restarted = format!("global server restarted from round {from}");
        assert!(stderr.contains(&restarted), "{restarted}?\n{stderr}");
    }
    assert_eq!(r["restarts"]["coordinator"], 1, "{stderr}");
    let c = fault_of(&r, "coordinator");
    assert!(c["rejoined_after_s"].as_f64().unwrap() < 30.0, "{c}");
    let incarnations: Vec<u64> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "global_server")
        .map(|p| p["incarnation"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(incarnations, [1, 1], "{stderr}");
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    // This once differed from the fault-free run under load (2 CPU hogs beside the whole
    // suite), with every fault detected and restarted as expected; which workers each run's
    // rounds summed was not known. A worker that a loaded machine holds past the detection
    // time (1 s) is dropped and rejoins, in either run: then each run must equal the replay of
    // its own round log instead.
    let (partial, clean_partial) = (partial_rounds(&r), partial_rounds(&clean));
    let why = format!(
        "faults {}, partial rounds {partial:?}; the fault-free run's faults {}, partial rounds \
         {clean_partial:?}",
        r["faults"], clean["faults"]
    );
    if partial.is_empty() && clean_partial.is_empty() {
        assert_eq!(
            r["global_param_hash"], clean["global_param_hash"],
            "the global θ differs from the fault-free run's ({why})\n{stderr}"
        );
        assert_eq!(accuracy(&r), accuracy(&clean));
    } else {
        eprintln!("workers were dropped ({why}): each run is checked against its replay");
        assert_eq!(
            r["global_param_hash"],
            replayed_hash(&toml, &r),
            "{why}\n{stderr}"
        );
        assert_eq!(
            clean["global_param_hash"],
            replayed_hash(&clean_toml, &clean),
            "{why}"
        );
    }
}

#[test]
fn under_hfa_killed_global_servers_restart_and_the_job_is_bit_identical() {
    let _one = one_at_a_time();
    // HFA k1 = 5, k2 = 4 (a global round every 20 training rounds), checkpoints every 100,
    // each on disk before its round's replies (`background = false`). Global server 0 dies at
    // round 600 once the round is complete and saved but before its replies go out: its restart
    // has the increment the DCs never got in its checkpoint, and serves it. Global server 1 dies while round 1320 collects pushes and restarts from round
    // 1300: the local servers resend their deltas since. Replies are increments that every
    // milestone adds, so any lost or doubled one would show: the job must end bit-identical.
    let hfa = "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\n";
    let job = |name: &str| {
        let (toml, dir) = global_job(name);
        let toml = toml.replace("rounds = 1500", "rounds = 3000").replace(
            "every_rounds = 50",
            "every_rounds = 100\nbackground = false",
        );
        (toml + hfa, dir)
    };
    let (toml, dir) = job("gs-hfa-clean");
    let (clean, _) = launch("gs-hfa-clean", &toml, None);
    let _ = std::fs::remove_dir_all(dir);
    let (toml, dir) = job("gs-hfa-killed");
    let chaos = "kill:global-server:0@round=600:reply-wait,\
                 kill:global-server:1@round=1320:mid-push";
    let (r, stderr) = launch("gs-hfa-killed", &toml, Some(chaos));
    let _ = std::fs::remove_dir_all(dir);
    for process in [
        "global_server (dc 2, rank 0)",
        "global_server (dc 2, rank 1)",
    ] {
        let f = fault_of(&r, process);
        assert_eq!(f["cause"], "killed by signal 9", "{f}\n{stderr}");
        assert!(f["rejoined_after_s"].is_f64(), "{f}");
        assert_eq!(f["rounds_reduced"], 0, "{f}");
    }
    assert_eq!(r["restarts"]["global_server"], 2, "{stderr}");
    // Server 0's restart served the saved increment of round 600 (global round 29).
    assert!(
        stderr.contains("reading back the reply of a round the lost server completed"),
        "{stderr}"
    );
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(
        r["global_param_hash"], clean["global_param_hash"],
        "{stderr}"
    );
    assert_eq!(accuracy(&r), accuracy(&clean));
}

/// `global_job` over 3 DCs whose local servers may be lost too (quorum 2).
fn every_role_job(name: &str) -> (String, std::path::PathBuf) {
    let (toml, dir) = global_job(name);
    let toml = toml
        .replace("data_centers = 2", "data_centers = 3")
        .replace(
            "[checkpoint]",
            "lost_dc = \"continue\"\nmin_dcs = 2\nmax_restarts = 5\n[checkpoint]",
        );
    (toml, dir)
}

#[test]
fn a_global_server_restarting_while_a_data_center_is_away_counts_the_dcs_it_saved() {
    let _one = one_at_a_time();
    // dc1's local server dies at round 100 and global server 0 at round 150, before dc1 is back:
    // its restart counts the DCs of its newest checkpoint, which was saved after dc1's loss (a
    // global server saves the first round after every membership change), so it does not wait
    // for dc1; dc1's restart rejoins once the global tier is whole. The replay matches.
    let (toml, dir) = every_role_job("dc-away");
    let chaos = "kill:local_server:dc1:0@round=100,kill:global-server:0@round=150:mid-push";
    let (r, stderr) = launch("dc-away", &toml, Some(chaos));
    let _ = std::fs::remove_dir_all(dir);
    // As below: the report may miss the DC's loss the dead global server logged.
    let ls = fault_of(&r, "local_server (dc 1, rank 0)");
    assert!(
        ls.get("lost_round").is_none_or(|l| l == 100),
        "{ls}\n{stderr}"
    );
    assert_eq!(r["restarts"]["global_server"], 1, "{stderr}");
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

#[test]
fn one_process_of_every_role_killed_and_the_job_equals_its_replay() {
    let _one = one_at_a_time();
    // 3 DCs (quorum 2) × 2 workers, two global servers, every role survivable: dc1's local
    // server dies (its DC is left out, then rejoins), global server 0 dies mid-push and restarts
    // from its checkpoint (whose DC membership it restores), a worker dies, and the coordinator
    // dies and restarts. The final θ is the replay of the coordinator's round log, bit for bit.
    let (toml, dir) = every_role_job("every-role");
    let chaos = "kill:local_server:dc1:0@round=100,kill:global-server:0@round=400:mid-push,\
                 kill:worker:dc2:0@round=700,kill:coordinator@after=2s";
    let (r, stderr) = launch("every-role", &toml, Some(chaos));
    let _ = std::fs::remove_dir_all(dir);
    // The DC's loss and return may be missing from the report when the server that logged them
    // dies with the coordinator (a known gap of the round log's journal, README); the replay
    // below is the oracle.
    let ls = fault_of(&r, "local_server (dc 1, rank 0)");
    assert_eq!(ls["restarted"], true, "{ls}\n{stderr}");
    assert!(ls.get("lost_round").is_none_or(|l| l == 100), "{ls}");
    let gs = fault_of(&r, "global_server (dc 3, rank 0)");
    assert_eq!(gs["rounds_reduced"], 0, "{gs}");
    for role in ["local_server", "global_server", "coordinator"] {
        assert_eq!(
            r["restarts"][role], 1,
            "{role}: {}\n{stderr}",
            r["restarts"]
        );
    }
    assert!(
        r["restarts"]["worker"].as_u64() >= Some(3),
        "{}",
        r["restarts"]
    );
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

#[test]
fn behind_the_wan_lab_a_stopped_global_server_and_a_killed_worker_recover() {
    let _one = one_at_a_time();
    // 3 DCs × 2 workers behind 5 ms links. Global server 0 is stopped for 2.5 s: the local
    // servers see it silent after the detection time (1 s), it wakes to find itself out of the
    // job and fails, and its restart reloads its checkpoint; meanwhile a worker dies and rejoins,
    // and the coordinator is killed and restarted. The final θ is the replay of the rounds the
    // workers missed, bit for bit.
    let (toml, dir) = global_job("gs-wan");
    let toml = toml
        .replace("data_centers = 2", "data_centers = 3")
        .replace("rounds = 1500", "rounds = 600")
        .replace("global_servers = 2\n", "")
        + "[wan]\nmode = \"auto\"\nrate_mbit = 100\ndelay_ms = 5\n";
    let _lab = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let chaos = "stop=2500ms:global-server:0@round=120:reply-wait,kill:worker:dc1:0@round=60,\
                 kill:coordinator@after=200ms";
    let (r, stderr) = launch("gs-wan", &toml, Some(chaos));
    let _ = std::fs::remove_dir_all(dir);
    eprintln!("WAN lab mode {}", r["wan_mode"]);
    // The central DC of 3 DCs is dc3.
    let g = fault_of(&r, "global_server (dc 3, rank 0)");
    assert!(
        g["detected_after_s"].as_f64().unwrap() <= 1.5,
        "{g}\n{stderr}"
    );
    assert!(
        g["rejoined_after_s"].as_f64().is_some_and(|s| s >= 2.5),
        "{g}\n{stderr}"
    );
    let w = fault_of(&r, "worker (dc 1, rank 0)");
    assert!(w["rejoined_round"].is_u64(), "{w}\n{stderr}");
    // One restart for the stop. A second is survivable, and was seen once in a CI run with the
    // whole suite in parallel on 2 cores (the count only, 2026-12-06): with 1 s failure
    // detection, a restarted global server stalled that long while it reloads is dropped again
    // (not proven). The recovery's outcome is checked below either way.
    let gs_restarts = r["restarts"]["global_server"].as_u64().unwrap_or(0);
    assert!(
        (1..=2).contains(&gs_restarts),
        "{}\n{}\n{stderr}",
        r["restarts"],
        r["faults"]
    );
    assert_eq!(r["restarts"]["coordinator"], 1, "{}\n{stderr}", r["faults"]);
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
    assert_lab_gone(&r);
}

#[test]
fn under_hfa_a_stopped_global_server_restarts_alone_and_a_stopped_local_server_rejoins() {
    let _one = one_at_a_time();
    // HFA k1 = 5, k2 = 4 over 3 DCs (quorum 2), every role survivable. The global server is
    // stopped for 2.5 s once global round 30 (training round 600) is saved, before its
    // replies: the local servers find it silent and wait (if they find it alive at its old
    // incarnation, the coordinator tells them it lost its own connection too: it was away, not
    // they); it wakes, ends itself, and its restart serves the saved round. Later dc1's local server is stopped mid-push of a global
    // round: it was the one away, so it ends at once when it wakes, and rejoins. No other DC
    // ends, and the final milestone is the HFA replay.
    let (toml, dir) = every_role_job("hfa-stops");
    let toml = toml
        .replace("rounds = 1500", "rounds = 3000")
        .replace("every_rounds = 50", "every_rounds = 100")
        .replace("global_servers = 2\n", "")
        + "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\n";
    let chaos = "stop=2500ms:global-server:0@round=600:reply-wait,\
                 stop=2500ms:local_server:dc1:0@round=1399:mid-push";
    let (r, stderr) = launch("hfa-stops", &toml, Some(chaos));
    let _ = std::fs::remove_dir_all(dir);
    let g = fault_of(&r, "global_server (dc 3, rank 0)");
    assert!(
        g["detected_after_s"].as_f64().unwrap() <= 1.5,
        "{g}\n{stderr}"
    );
    assert_eq!(g["rounds_reduced"], 0, "{g}");
    // It ended itself as it woke (its own coordinator connection had dropped); the local
    // servers waited for its restart, whether or not they saw it alive at its old incarnation.
    assert!(stderr.contains("this server was away"), "{stderr}");
    let l = fault_of(&r, "local_server (dc 1, rank 0)");
    assert_eq!(l["lost_round"], 1400, "{l}\n{stderr}");
    assert_eq!(l["rejoined_round"].as_u64().map(|b| b % 20), Some(0), "{l}");
    assert_eq!(r["restarts"]["global_server"], 1, "{stderr}");
    // Only dc1's local server found itself left out (the others waited for the global server;
    // a process the supervisor restarted at start-up on a loaded machine does not count). The
    // stopped one may also end on its stale checkpoint write (the round's folder was pruned
    // while it slept): it is out either way, and its restart rejoined (above).
    for dc in [0, 2] {
        assert!(
            !stderr.contains(&format!("it left dc {dc} out")),
            "dc {dc}:\n{stderr}"
        );
    }
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

#[test]
fn a_stopped_coordinator_wakes_to_its_members_reattaching_and_the_job_goes_on() {
    let _one = one_at_a_time();
    // SIGSTOP for 2.5 s: every member finds it silent after the detection time (1 s) and
    // reconnects; it wakes, sees their old connections closed, and takes them back. Training
    // never waited for it: the job ends with the fault-free θ (the replay of no partial round).
    let (toml, dir) = global_job("coord-stop");
    let (r, stderr) = launch(
        "coord-stop",
        &toml,
        Some("stop=2500ms:coordinator@after=300ms"),
    );
    let _ = std::fs::remove_dir_all(dir);
    assert!(r.get("faults").is_none(), "nothing ended: {stderr}");
    assert!(
        stderr.matches("reattached to the coordinator").count() >= 7,
        "every member reattached:\n{stderr}"
    );
    assert_eq!(r["replicas_identical"], true);
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
}

/// `dc_job` with 3 DCs (quorum 2) and 600 rounds behind the WAN lab (5 ms links), detection
/// after `dead_ms`.
fn cut_job(dead_ms: u64) -> String {
    dc_job(3, 2)
        .replace("rounds = 1500", "rounds = 600")
        .replace("peer_dead_ms = 1000", &format!("peer_dead_ms = {dead_ms}"))
        + "[wan]\nmode = \"auto\"\nrate_mbit = 100\ndelay_ms = 5\n"
}

#[test]
fn behind_the_wan_lab_a_cut_shorter_than_the_detection_time_only_delays_the_rounds() {
    let _one = one_at_a_time();
    // dc1's link goes dark for 1 s, detection takes 4 s: TCP retransmits across the gap, nobody
    // is lost, and the job ends with the fault-free θ (the replay of no partial round).
    let toml = cut_job(4000);
    let _lab = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (r, stderr) = launch("cut-short", &toml, Some("cut:dc1:1s@round=100"));
    eprintln!("WAN lab mode {}", r["wan_mode"]);
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 1, "only the cut: {faults:?}\n{stderr}");
    let f = &faults[0];
    assert_eq!(f["process"], "WAN link (dc 1)", "{f}");
    assert_eq!(f["cause"], "link cut for 1.000 s", "{f}");
    assert!(f.get("lost_round").is_none(), "{f}\n{stderr}");
    assert!(r
        .get("restarts")
        .is_none_or(|v| v.as_object().is_some_and(|m| m.is_empty())));
    assert!(partial_rounds(&r).is_empty(), "{:?}", partial_rounds(&r));
    assert_eq!(r["replicas_identical"], true);
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
    assert_lab_gone(&r);
}

#[test]
fn behind_the_wan_lab_a_cut_longer_than_the_detection_time_loses_the_dc_until_it_rejoins() {
    let _one = one_at_a_time();
    // dc1's link goes dark for 3 s, detection takes 1 s: the global tier goes on with dc0 and
    // dc2 (quorum 2), dc1's processes lose the coordinator and fail, and their restarts rejoin
    // once the link is back. The final θ is the replay of the rounds without dc1, bit for bit.
    long_cut(
        "cut-long",
        &cut_job(1000).replace("rounds = 600", "rounds = 1500"),
    );
}

#[test]
fn a_long_cut_under_a_restartable_coordinator_still_loses_only_the_dc() {
    let _one = one_at_a_time();
    // With `lost_coordinator = "continue"`, dc1's processes reconnect to the coordinator
    // instead of ending; its local server then finds the global server gone and must end
    // itself, not the job (`lost_dc = "continue"`), so that its restart rejoins. With
    // `lost_global_server = "continue"` too, the global server must judge dc1 lost (the
    // coordinator lost it as well) rather than end itself as a server that was away.
    let dir = ckpt_scratch("resilience", "cut-coord-ckpt");
    let _ = std::fs::remove_dir_all(&dir);
    let toml = cut_job(1000)
        .replace("rounds = 600", "rounds = 1500")
        .replace(
            "[resilience]\n",
            "[resilience]\nlost_coordinator = \"continue\"\nlost_global_server = \"continue\"\n",
        )
        + &format!(
            "[checkpoint]\ndir = {:?}\nevery_rounds = 50\n",
            dir.display().to_string()
        );
    long_cut("cut-coord", &toml);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn under_hfa_a_cut_longer_than_the_detection_time_loses_the_dc_until_it_rejoins() {
    let _one = one_at_a_time();
    // As above under HFA (k1 = 5, k2 = 4): the DC is lost at a global round, rejoins at one,
    // and the final milestone is the HFA replay of the averagings without it.
    long_cut(
        "hfa-cut-long",
        &(cut_job(1000).replace("rounds = 600", "rounds = 3000")
            + "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 4\n"),
    );
}

/// Runs `toml` with dc1's link cut for 3 s at round 100 (1 s detection) and checks that dc1 was
/// lost and rejoined, and that the final θ is the replay's.
fn long_cut(name: &str, toml: &str) {
    let _lab = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (r, stderr) = launch(name, toml, Some("cut:dc1:3s@round=100"));
    let cut = |f: &&Value| f["process"] == "WAN link (dc 1)";
    assert!(
        r["faults"].as_array().unwrap().iter().any(|f| cut(&f)),
        "no cut: {}\n{stderr}",
        r["faults"]
    );
    let f = fault_of(&r, "WAN link (dc 1)");
    assert_eq!(f["cause"], "link cut for 3.000 s", "{f}");
    assert!(
        f["detected_after_s"].as_f64().unwrap() <= 1.5,
        "{f}\n{stderr}"
    );
    let lost = f["lost_round"].as_u64().unwrap();
    assert!((100..110).contains(&lost), "{f}");
    let back = f["rejoined_round"]
        .as_u64()
        .unwrap_or_else(|| panic!("dc1 did not rejoin: {f}\n{stderr}"));
    assert!(
        f["rejoined_after_s"].as_f64().unwrap() >= 3.0 && back > lost,
        "{f}"
    );
    assert_eq!(f["rounds_reduced"].as_u64(), Some(back - lost), "{f}");
    assert!(
        r["restarts"]["local_server"].as_u64() >= Some(1),
        "{stderr}"
    );
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(toml, &r));
    assert_lab_gone(&r);
}

#[test]
fn a_worker_lost_then_its_local_server_lost_and_the_job_still_equals_its_replay() {
    let _one = one_at_a_time();
    // dc1's local server logs the rounds without its killed worker, then dies itself: its log
    // dies with it, but the coordinator's journal kept it, and the replay of the coordinator's
    // round log is the job's θ. What the surviving processes logged is not enough.
    let toml = dc_job(3, 2);
    let (r, stderr) = launch(
        "worker-then-ls",
        &toml,
        Some("kill:worker:dc1:0@round=50,kill:local_server:dc1:0@round=400"),
    );
    assert_eq!(r["replicas_identical"], true, "{stderr}");
    assert_eq!(r["global_param_hash"], replayed_hash(&toml, &r));
    let survivors: Vec<PartialRound> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.get("partial_rounds"))
        .flat_map(|v| serde_json::from_value::<Vec<PartialRound>>(v.clone()).unwrap())
        .collect();
    let coordinators = partial_rounds(&r);
    assert!(
        coordinators
            .iter()
            .any(|p| p.dc == 1 && p.ranks == [1] && p.from == 50),
        "the killed worker's rounds: {coordinators:?}"
    );
    assert!(
        !survivors.iter().any(|p| p.ranks == [1] && p.from == 50),
        "the killed local server's log survived it? {survivors:?}"
    );
}
