//! TSEngine on the inter tier (scheduling.md, "TSEngine"): the local servers' sums reach the
//! global server through the push tree and θ comes back through the pull tree. With two DCs
//! every order of the sum is the direct path's (IEEE addition commutes), so FSA ends bit for
//! bit where the direct run ends; with more DCs the sums differ in rounding only, and the job
//! trains as the direct one does. Configurations TSEngine cannot carry are refused, naming the
//! field.
//!
//! Each run is a whole cluster on loopback threads (`launch::threads`).

use std::time::Duration;

use geomx_trainer::config::Config;
use geomx_trainer::hips::JobSpec;
use geomx_trainer::launch::threads;
use geomx_trainer::report::Report;

fn config(workers: &[usize], optimizer: &str, ts: bool) -> Config {
    let dcs: String = workers
        .iter()
        .enumerate()
        .map(|(i, w)| format!("[[cluster.data_centers]]\nname = \"dc{i}\"\nworkers = {w}\n"))
        .collect();
    let toml = format!(
        "{dcs}[model]\nhidden = [48, 32]\n[data]\nbatch_size = 8\n\
         [train]\nrounds = 20\neval_every = 0\n{optimizer}\n\
         [placement]\nmin_range = 64\n\
         [scheduling.tsengine]\ninter = {ts}\n"
    );
    Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn run(name: &str, cfg: &Config) -> Report {
    let job = JobSpec::from_config(cfg).unwrap();
    let r = threads::run(&job, cfg.to_json(), Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: param_hash {} global {} accuracy {:.3}",
        r.param_hash, r.global_param_hash, r.final_test_accuracy
    );
    assert!(r.replicas_identical, "{name}");
    assert_eq!(r.param_hash, r.global_param_hash, "{name}");
    for p in &r.processes {
        assert_eq!(p.refused_requests, 0, "{name}: {p:?}");
    }
    r
}

const SGD: &str = "[train.optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9";
const ADAM: &str = "[train.optimizer]\nkind = \"adam\"\nlr = 0.01";

#[test]
fn with_two_dcs_tsengine_fsa_is_bit_identical_to_the_direct_run() {
    for (opt_name, opt) in [("sgd", SGD), ("adam", ADAM)] {
        let direct = run(&format!("direct {opt_name}"), &config(&[2, 1], opt, false));
        let ts = run(&format!("tsengine {opt_name}"), &config(&[2, 1], opt, true));
        assert_eq!(ts.param_hash, direct.param_hash, "{opt_name}");
        assert_eq!(ts.global_param_hash, direct.global_param_hash, "{opt_name}");
        assert_eq!(
            ts.final_test_accuracy.to_bits(),
            direct.final_test_accuracy.to_bits(),
            "{opt_name}"
        );
        assert!(
            ts.final_test_accuracy > 0.2,
            "{opt_name}: training went nowhere"
        );
    }
}

#[test]
fn with_more_dcs_tsengine_trains_as_the_direct_run_does() {
    for workers in [&[1, 2, 1][..], &[1, 1, 1, 1]] {
        let name = format!("{} DCs", workers.len());
        let direct = run(&format!("direct, {name}"), &config(workers, SGD, false));
        let ts = run(&format!("tsengine, {name}"), &config(workers, SGD, true));
        // The sums differ from the direct path's in rounding only: 20 rounds end close by.
        let gap = (ts.final_test_accuracy - direct.final_test_accuracy).abs();
        assert!(
            gap <= 0.05,
            "{name}: accuracy {} against {}",
            ts.final_test_accuracy,
            direct.final_test_accuracy
        );
        assert!(
            ts.final_test_accuracy > 0.2,
            "{name}: training went nowhere"
        );
    }
}

#[test]
fn tsengine_refuses_what_its_trees_cannot_carry() {
    let base = "[[cluster.data_centers]]\nname = \"a\"\nworkers = 1\n[[cluster.data_centers]]\nname = \"b\"\nworkers = 1\n";
    for (extra, field) in [
        ("[sync]\nalgorithm = \"hfa\"\n", "scheduling.tsengine.inter"),
        (
            "[cluster]\nglobal_servers = 2\n",
            "scheduling.tsengine.inter",
        ),
        (
            "[compression]\ninter = { codec = \"fp16\" }\n",
            "scheduling.tsengine.inter",
        ),
        (
            "[compression]\nintra = { codec = \"fp16\" }\n",
            "scheduling.tsengine.inter",
        ),
        (
            "[transport]\ninter = \"dgt\"\n",
            "scheduling.tsengine.inter",
        ),
        (
            "[scheduling.p3]\nenabled = true\n",
            "scheduling.tsengine.inter",
        ),
        (
            "[resilience]\nlost_worker = \"continue\"\n",
            "scheduling.tsengine.inter",
        ),
        (
            "[train]\nnonfinite = \"skip\"\n",
            "scheduling.tsengine.inter",
        ),
    ] {
        let toml = format!("{base}{extra}[scheduling.tsengine]\ninter = true\n");
        let e = Config::from_toml_str(&toml).expect_err(extra).to_string();
        assert!(e.contains(field), "{extra}: {e}");
        // The same configuration without TSEngine is valid.
        let plain = toml.replace("inter = true", "inter = false");
        Config::from_toml_str(&plain).unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
    for (ts, field) in [
        ("intra = true\n", "scheduling.tsengine.intra"),
        ("max_greed = 1.5\n", "scheduling.tsengine.max_greed"),
    ] {
        let toml = format!("{base}[scheduling.tsengine]\n{ts}");
        let e = Config::from_toml_str(&toml).expect_err(ts).to_string();
        assert!(e.contains(field), "{ts}: {e}");
    }
}
