//! One source of truth per round: for every tier-codec combination the configuration accepts
//! (none, fp16, bf16, bisparse, mpq on the WAN tier; none, fp16, bf16 on the LAN tier, and
//! the workers' own bisparse under FSA and MixedSync) under FSA and HFA, and the dense ones
//! under MixedSync, every worker ends bit-identical to the global servers' θ
//! (`replicas_identical` with its full meaning, `global_param_hash == param_hash`).
//!
//! Each run is a whole cluster on loopback threads (`launch::threads`): 2 DCs (2 + 1 workers), 2
//! global servers and a small split bound, so that keys are cut into several ranges and replies
//! travel as per-range segments; a tiny MLP and a few rounds keep the matrix fast.

use std::time::Duration;

mod support;

use geomx_trainer::config::Config;
use geomx_trainer::engine::reference::fsa_reference;
use geomx_trainer::hips::JobSpec;
use geomx_trainer::launch::threads;
use geomx_trainer::report::Report;

/// The WAN codecs the configuration accepts, as `[compression.inter]` bodies.
const INTER: [(&str, &str); 5] = [
    ("none", "codec = \"none\""),
    ("fp16", "codec = \"fp16\""),
    ("bf16", "codec = \"bf16\""),
    (
        "bisparse",
        "codec = \"bisparse\"\ndensity = 0.1\nmin_size = 100\nvalues = \"f32\"\n\
         warmup_rounds = 0\nselection = \"exact\"\nresync_every = 0",
    ),
    (
        "mpq",
        "codec = \"mpq\"\ndensity = 0.1\nmin_size = 100\nwarmup_rounds = 0\nselection = \"exact\"",
    ),
];

/// The LAN codecs of both directions.
const INTRA: [&str; 3] = ["none", "fp16", "bf16"];

/// Worker-side Bi-Sparse as a `[compression] intra` table: the keys of ≥ 100 elements (1024 and
/// 160) go as each worker's own top 10 %, `extra` adds settings.
fn worker_sparse(extra: &str) -> String {
    format!("{{ codec = \"bisparse\", density = 0.1, min_size = 100, warmup_rounds = 0{extra} }}")
}

/// A small job: digits, MLP hidden [16] (keys of 1024, 16, 160 and 10 elements), 2 global servers
/// with ranges of about 64 elements. `intra` is a codec name, or an inline table (`{ … }`).
fn config(sync: &str, rounds: u64, inter: &str, intra: &str) -> Config {
    let intra = match intra.starts_with('{') {
        true => intra.to_string(),
        false => format!("{{ codec = \"{intra}\" }}"),
    };
    let toml = format!(
        "{}[train]\nrounds = {rounds}\neval_every = 0\n\
         [placement]\nmin_range = 64\n\
         {sync}\n\
         [compression]\nintra = {intra}\n[compression.inter]\n{inter}\n",
        support::SMALL_JOB
    );
    Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn run(name: &str, cfg: &Config) -> Report {
    let job = JobSpec::from_config(cfg).unwrap();
    assert!(
        job.plan.placement.ranges.len() > job.plan.key_lens.len() + 2,
        "{name}: keys should be split into several ranges"
    );
    threads::run(&job, cfg.to_json(), Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every worker and the global servers hold the same θ; no resync was needed or missed, no
/// round was dropped.
fn assert_agreement(name: &str, r: &Report) {
    eprintln!(
        "{name}: param_hash {} global {} accuracy {:.3} codec_bytes {:?}",
        r.param_hash, r.global_param_hash, r.final_test_accuracy, r.codec_bytes
    );
    assert!(r.replicas_identical, "{name}");
    assert_eq!(r.param_hash, r.global_param_hash, "{name}");
    assert_eq!(r.param_hash.len(), 16, "{name}");
    assert_eq!(r.skipped_updates, 0, "{name}");
    for p in &r.processes {
        assert_eq!(p.resync_mismatches, 0, "{name}: {p:?}");
        assert_eq!(p.resyncs, 0, "{name}: {p:?}");
    }
    assert!(r.final_test_accuracy > 0.2, "{name}: training went nowhere");
}

/// The codec classes the WAN bytes show: the run really used the codec it names.
fn assert_codec_used(name: &str, inter: &str, r: &Report) {
    let has = |c: &str| r.codec_bytes.get(c).copied().unwrap_or(0) > 0;
    match inter {
        "none" => assert!(has("f32") && !has("fp16") && !has("bf16"), "{name}"),
        "fp16" => assert!(has("fp16") && !has("f32"), "{name}"),
        "bf16" => assert!(has("bf16") && !has("f32"), "{name}"),
        "bisparse" => assert!(has("sparse") && has("f32"), "{name}"),
        _ => assert!(has("sparse") && has("fp16"), "{name}"),
    }
}

#[test]
fn fsa_replicas_equal_the_global_theta_for_every_codec_pair() {
    let sparse = worker_sparse("");
    for (inter_name, inter) in INTER {
        for intra in INTRA.iter().copied().chain([sparse.as_str()]) {
            let name = format!("fsa inter={inter_name} intra={intra}");
            let r = run(&name, &config("", 12, inter, intra));
            assert_agreement(&name, &r);
            assert_codec_used(&name, inter_name, &r);
        }
    }
}

/// Worker-side Bi-Sparse (`compression.intra.codec = "bisparse"`): each worker sends its local
/// server the top 10 % of its own error-feedback accumulator for the keys of ≥ 100 elements. The
/// distributed FSA run (2 DCs of 2 + 1 workers, 2 global servers, keys cut into ranges) ends
/// with the single-process reference's θ bit for bit, and every replica with it, for exact and
/// sampled selection (each worker its own samples), FP16 values (their rounding error fed back)
/// and DGC's momentum correction with momentum-free SGD. The pushes are smaller (LAN bytes), and
/// the sparsification changes the run (the dense run ends elsewhere).
#[test]
fn worker_side_bisparse_equals_its_single_process_reference() {
    let hash = |p: &[Vec<f32>]| format!("{:016x}", geomx_trainer::hash::params_hash(p));
    let none = INTER[0].1;
    let dense = run("fsa dense", &config("", 12, none, "none"));
    let plain_sgd = "[train.optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.0";
    let cases = [
        ("exact", ", selection = \"exact\"", ""),
        ("sampled fp16", ", values = \"fp16\"", ""),
        (
            "momentum",
            ", selection = \"exact\", momentum = 0.9",
            plain_sgd,
        ),
    ];
    for (name, extra, sync) in cases {
        let name = format!("worker bisparse {name}");
        let cfg = config(sync, 12, none, &worker_sparse(extra));
        let r = run(&name, &cfg);
        assert_agreement(&name, &r);
        let data = geomx_trainer::data::load(&cfg.data).unwrap();
        let reference = fsa_reference(&cfg, &data, Some(12)).unwrap();
        assert_eq!(r.global_param_hash, hash(&reference.params), "{name}");
        assert_ne!(r.global_param_hash, dense.global_param_hash, "{name}");
        eprintln!(
            "{name}: lan_bytes {} (dense {})",
            r.lan_bytes, dense.lan_bytes
        );
        assert!(
            (r.lan_bytes as f64) < 0.8 * dense.lan_bytes as f64,
            "{name}: lan_bytes {} against {}",
            r.lan_bytes,
            dense.lan_bytes
        );
    }
}

#[test]
fn hfa_milestones_equal_the_global_theta_for_every_codec_pair() {
    let sync = "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 2\nk2 = 2";
    for (inter_name, inter) in &INTER {
        for intra in INTRA {
            let name = format!("hfa inter={inter_name} intra={intra}");
            let r = run(&name, &config(sync, 16, inter, intra));
            assert_agreement(&name, &r);
            assert_codec_used(&name, inter_name, &r);
        }
    }
}

/// HFA with SCAFFOLD's control variates (`correction = "scaffold"`): the distributed run (2 DCs
/// of 2 + 1 workers, 2 global servers, keys cut into ranges, FP16 on the WAN tier) ends with
/// the single-process reference's θ bit for bit, every replica with it; the correction changes
/// the run (the reference without it ends elsewhere).
#[test]
fn hfa_with_scaffold_equals_its_single_process_reference() {
    use geomx_trainer::engine::reference_hfa::hfa_reference_with;
    let hash = |p: &[Vec<f32>]| format!("{:016x}", geomx_trainer::hash::params_hash(p));
    let sync = "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 2\nk2 = 2";
    for inter in ["codec = \"none\"", "codec = \"fp16\""] {
        let name = format!("hfa scaffold {inter}");
        let scaffold = format!("{sync}\ncorrection = \"scaffold\"");
        let cfg = config(&scaffold, 16, inter, "none");
        let r = run(&name, &cfg);
        assert_agreement(&name, &r);
        let data = geomx_trainer::data::load(&cfg.data).unwrap();
        let all = |_, _, _, _| true;
        let reference = hfa_reference_with(&cfg, &data, Some(16), all).unwrap();
        if inter.contains("none") {
            assert_eq!(r.global_param_hash, hash(&reference.params), "{name}");
        }
        let plain = config(sync, 16, inter, "none");
        let without = hfa_reference_with(&plain, &data, Some(16), all).unwrap();
        assert_ne!(hash(&without.params), hash(&reference.params), "{name}");
    }
}

#[test]
fn mixed_sync_replicas_equal_the_global_theta_after_the_final_pull() {
    let sync = "[sync]\nalgorithm = \"mixed\"";
    let sparse = worker_sparse("");
    for (inter_name, inter) in &INTER[..3] {
        for intra in INTRA.iter().copied().chain([sparse.as_str()]) {
            let name = format!("mixed inter={inter_name} intra={intra}");
            let r = run(&name, &config(sync, 12, inter, intra));
            assert_agreement(&name, &r);
            assert_codec_used(&name, inter_name, &r);
        }
    }
}

/// On the portable driver the servers write every reply that can be large (push replies, pull
/// answers, the final pulls) from a writer thread per connection, not from the reader thread
/// (`hips::replies`). FSA and HFA still end with the default driver's θ bit for bit, and
/// MixedSync's replicas agree with the global θ after its final pull.
#[test]
fn replicas_agree_on_the_portable_driver_whose_replies_leave_from_writer_threads() {
    let none = "codec = \"none\"";
    let runs = [
        ("fsa", "", 12),
        (
            "hfa",
            "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 2\nk2 = 2",
            16,
        ),
        ("mixed", "[sync]\nalgorithm = \"mixed\"", 12),
    ];
    for (sync_name, sync, rounds) in runs {
        let name = format!("{sync_name} portable");
        let portable = format!("{sync}\n[transport]\ndriver = \"portable\"");
        let cfg = config(&portable, rounds, none, "none");
        let job = JobSpec::from_config(&cfg).unwrap();
        assert_eq!(job.net.driver, geomx_net::DriverKind::Portable, "{name}");
        let r = run(&name, &cfg);
        assert_agreement(&name, &r);
        if sync_name != "mixed" {
            let default = run(sync_name, &config(sync, rounds, none, "none"));
            assert_eq!(
                r.param_hash, default.param_hash,
                "{name}: θ differs by driver"
            );
        }
    }
}

/// The combinations the configuration refuses are exactly the ones left out above: sparse codecs
/// on the WAN under MixedSync, and on the LAN mpq, and bisparse under HFA.
#[test]
fn the_matrix_covers_every_accepted_combination() {
    let accepted = |sync: &str, inter: &str, intra: &str| {
        let toml = format!(
            "{sync}\n[compression]\nintra = {{ codec = \"{intra}\" }}\n[compression.inter]\n{inter}\n"
        );
        Config::from_toml_str(&toml).is_ok()
    };
    let syncs = [
        ("fsa", ""),
        ("hfa", "[sync]\nalgorithm = \"hfa\""),
        ("mixed", "[sync]\nalgorithm = \"mixed\""),
    ];
    for (sync_name, sync) in syncs {
        for (inter_name, inter) in INTER {
            for intra in ["none", "fp16", "bf16", "bisparse", "mpq"] {
                let lan = INTRA.contains(&intra) || (intra == "bisparse" && sync_name != "hfa");
                let in_matrix =
                    lan && (sync_name != "mixed" || !matches!(inter_name, "bisparse" | "mpq"));
                assert_eq!(
                    accepted(sync, inter, intra),
                    in_matrix,
                    "{sync_name} inter={inter_name} intra={intra}"
                );
            }
        }
    }
}
