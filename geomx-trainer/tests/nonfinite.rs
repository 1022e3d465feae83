//! The non-finite policy (`train.nonfinite`): a diverging run ends non-zero naming the key and the
//! round (`abort`, the default); with `skip` an injected NaN drops exactly that round's update of
//! the key everywhere, the run completes with every replica equal to the global θ, and the report
//! counts the drop.

use std::process::Command;
use std::time::Duration;

use geomx_trainer::config::Config;
use geomx_trainer::hips::JobSpec;
use geomx_trainer::launch::threads;
use geomx_trainer::report::Report;

mod support;

/// `lr = 1e20` diverges within a few rounds: the launcher exits non-zero and the error names the
/// key and the round (the job ends at the first non-finite gradient, not at the last round).
#[test]
fn a_diverging_run_aborts_naming_key_and_round() {
    let cfg = support::scratch("nonfinite", "lr.toml");
    std::fs::write(
        &cfg,
        "[train]\nrounds = 400\n[train.optimizer]\nkind = \"sgd\"\nlr = 1e20\n",
    )
    .unwrap();
    let out = Command::new(support::GEOMX)
        .arg("launch")
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let err = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(err.contains("non-finite"), "{err}");
    assert!(err.contains("key ") && err.contains("round "), "{err}");
    // "round N": within the first few rounds of 400.
    let round: u64 = err
        .split("round ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no round number in {err}"));
    assert!(round < 10, "{err}");
}

/// A small job on loopback threads with `train.nonfinite = "skip"` and one injected NaN.
fn run_skip(sync: &str, rounds: u64, inject: (u32, u32, u64, usize), codecs: &str) -> Report {
    let (dc, rank, round, key) = inject;
    let toml = format!(
        "[cluster]\nglobal_servers = 2\n\
         [[cluster.data_centers]]\nname = \"dc0\"\nworkers = 2\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 1\n\
         [model]\nhidden = [16]\n[data]\nbatch_size = 8\n\
         [train]\nrounds = {rounds}\neval_every = 0\nnonfinite = \"skip\"\n\
         [[train.inject_nan]]\ndc = {dc}\nrank = {rank}\nround = {round}\nkey = {key}\n\
         [placement]\nmin_range = 64\n{sync}\n{codecs}\n"
    );
    let cfg = Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let job = JobSpec::from_config(&cfg).unwrap();
    threads::run(&job, cfg.to_json(), Duration::from_secs(120)).unwrap()
}

fn ranges_of(key: usize) -> u64 {
    let cfg = Config::from_toml_str(
        "[cluster]\nglobal_servers = 2\n[model]\nhidden = [16]\n[placement]\nmin_range = 64\n",
    )
    .unwrap();
    JobSpec::from_config(&cfg)
        .unwrap()
        .plan
        .placement
        .key_ranges(key)
        .len() as u64
}

fn by_role(r: &Report, role: &str) -> u64 {
    r.processes
        .iter()
        .filter(|p| p.role == role)
        .map(|p| p.skipped_updates)
        .sum()
}

/// FSA with lossy and sparse codecs (worker-side Bi-Sparse too: the NaN is a value of the
/// worker's sparse push): the NaN of worker (dc 1, rank 0) in key 0 at round 3 drops that round
/// for every range of key 0 (key 0 is split over both servers), nothing else.
#[test]
fn fsa_skip_drops_one_round_of_one_key_everywhere() {
    let n = ranges_of(0);
    assert!(n > 1, "key 0 should be split");
    for codecs in [
        "[compression]\nintra = { codec = \"fp16\" }\ninter = { codec = \"bf16\" }",
        "[compression]\nintra = { codec = \"bf16\" }\n[compression.inter]\ncodec = \"bisparse\"\n\
         density = 0.1\nmin_size = 100\nwarmup_rounds = 0\nselection = \"exact\"",
        "[compression]\nintra = { codec = \"bisparse\", density = 0.1, min_size = 100, \
         warmup_rounds = 0 }",
        "",
    ] {
        let r = run_skip("", 8, (1, 0, 3, 0), codecs);
        assert!(r.replicas_identical, "{codecs}");
        assert_eq!(r.param_hash, r.global_param_hash, "{codecs}");
        assert_eq!(r.skipped_updates, n, "{codecs}");
        assert_eq!(by_role(&r, "local_server"), 1, "{codecs}");
        assert!(r.final_loss.is_finite(), "{codecs}");
    }
}

/// HFA (k1 = k2 = 2): a NaN in a local averaging (push 0) sends the DC back to the milestone
/// (no global drop); a NaN in a global averaging (push 1) drops that milestone move for every
/// range of the key. Either way the run ends with every replica on the global θ.
#[test]
fn hfa_skip_keeps_every_milestone_equal() {
    let sync = "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 2\nk2 = 2";
    let codecs = "[compression]\nintra = { codec = \"fp16\" }\ninter = { codec = \"fp16\" }";
    let local = run_skip(sync, 8, (0, 1, 0, 0), codecs);
    assert!(local.replicas_identical);
    assert_eq!(local.skipped_updates, 0);
    assert_eq!(by_role(&local, "local_server"), 1);
    // Both workers of dc 0 went back to the milestone for key 0.
    assert_eq!(by_role(&local, "worker"), 2);
    let global = run_skip(sync, 8, (0, 1, 1, 2), codecs);
    assert!(global.replicas_identical);
    assert_eq!(global.skipped_updates, ranges_of(2));
}

/// MixedSync: the dropped push is not applied, but the DC still receives the current θ; the
/// final pull leaves every replica on the global θ.
#[test]
fn mixed_sync_skip_ends_on_the_global_theta() {
    let sync = "[sync]\nalgorithm = \"mixed\"";
    let codecs = "[compression]\nintra = { codec = \"bf16\" }\ninter = { codec = \"fp16\" }";
    let r = run_skip(sync, 8, (0, 0, 2, 0), codecs);
    assert!(r.replicas_identical);
    assert_eq!(r.param_hash, r.global_param_hash);
    assert_eq!(r.skipped_updates, ranges_of(0));
}
