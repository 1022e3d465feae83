//! TSEngine (scheduling.md, "TSEngine") on the inter tier (the local servers' sums reach the
//! global server through the push tree and θ comes back through the pull tree) and on the intra
//! tier (each DC's workers and their local server, the same way). With two participants every
//! order of the sum is the direct path's (IEEE addition commutes), so FSA ends bit for bit where
//! the direct run ends; with more the sums differ in rounding only, and the job trains as the
//! direct one does. Configurations TSEngine cannot carry are refused, naming the field.
//!
//! Each run is a whole cluster on loopback threads (`launch::threads`).

use geomx_trainer::config::Config;
use geomx_trainer::report::Report;

mod support;

/// `ts`: the `[scheduling.tsengine]` lines.
fn config(workers: &[usize], optimizer: &str, ts: &str) -> Config {
    let dcs: String = workers
        .iter()
        .enumerate()
        .map(|(i, w)| format!("[[cluster.data_centers]]\nname = \"dc{i}\"\nworkers = {w}\n"))
        .collect();
    let toml = format!(
        "{dcs}[model]\nhidden = [48, 32]\n[data]\nbatch_size = 8\n\
         [train]\nrounds = 20\neval_every = 0\n{optimizer}\n\
         [placement]\nmin_range = 64\n\
         [scheduling.tsengine]\n{ts}"
    );
    Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn run(name: &str, cfg: &Config) -> Report {
    let (_, r) = support::run_in_threads(name, cfg);
    for p in &r.processes {
        assert_eq!(p.refused_requests, 0, "{name}: {p:?}");
    }
    r
}

const SGD: &str = "[train.optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9";
const ADAM: &str = "[train.optimizer]\nkind = \"adam\"\nlr = 0.01";
const OFF: &str = "";
const INTER: &str = "inter = true\n";
const INTRA: &str = "intra = true\n";
const BOTH: &str = "intra = true\ninter = true\n";

#[test]
fn with_two_workers_per_dc_tsengine_on_the_intra_tier_is_bit_identical_to_the_direct_run() {
    for (opt_name, opt) in [("sgd", SGD), ("adam", ADAM)] {
        let direct = run(&format!("direct {opt_name}"), &config(&[2, 2], opt, OFF));
        let mut tiers = vec![("intra", INTRA)];
        if opt_name == "sgd" {
            // Two DCs: the inter tier's sums are the direct path's too.
            tiers.push(("both tiers", BOTH));
        }
        for (tier, ts) in tiers {
            let name = format!("tsengine {tier}, {opt_name}");
            let r = run(&name, &config(&[2, 2], opt, ts));
            support::assert_bit_identical(&r, &direct, &name);
        }
        assert!(
            direct.final_test_accuracy > 0.2,
            "{opt_name}: training went nowhere"
        );
    }
}

#[test]
fn with_more_workers_per_dc_tsengine_on_the_intra_tier_trains_as_the_direct_run_does() {
    let workers = [4, 1];
    let direct = run("direct, 4 + 1 workers", &config(&workers, SGD, OFF));
    let ts = run(
        "tsengine intra, 4 + 1 workers",
        &config(&workers, SGD, INTRA),
    );
    // The trees carried transfers between the workers of dc 0 (their servers' traffic), none in
    // the direct run, where workers serve nothing.
    let served = |r: &Report, dc: u32| -> u64 {
        let w = r
            .processes
            .iter()
            .filter(|p| p.role == "worker" && p.dc == dc);
        w.map(|p| p.served_bytes).sum()
    };
    assert!(
        served(&ts, 0) > 0,
        "no worker of dc 0 received from another"
    );
    assert_eq!(served(&ts, 1), 0, "dc 1's one worker has no peer");
    assert_eq!(served(&direct, 0), 0);
    // Four workers' gradients summed in the tree's order: rounding differs, training does not.
    let gap = (ts.final_test_accuracy - direct.final_test_accuracy).abs();
    assert!(
        gap <= 0.05,
        "accuracy {} against {}",
        ts.final_test_accuracy,
        direct.final_test_accuracy
    );
    assert!(ts.final_test_accuracy > 0.2, "training went nowhere");
}

#[test]
fn with_two_dcs_tsengine_fsa_is_bit_identical_to_the_direct_run() {
    for (opt_name, opt) in [("sgd", SGD), ("adam", ADAM)] {
        let direct = run(&format!("direct {opt_name}"), &config(&[2, 1], opt, OFF));
        let ts = run(
            &format!("tsengine {opt_name}"),
            &config(&[2, 1], opt, INTER),
        );
        support::assert_bit_identical(&ts, &direct, opt_name);
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
        let direct = run(&format!("direct, {name}"), &config(workers, SGD, OFF));
        let ts = run(&format!("tsengine, {name}"), &config(workers, SGD, INTER));
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
    let both_tiers = [
        "[sync]\nalgorithm = \"hfa\"\n",
        "[compression]\ninter = { codec = \"fp16\" }\n",
        "[compression]\nintra = { codec = \"fp16\" }\n",
        "[scheduling.p3]\nenabled = true\n",
        "[resilience]\nlost_worker = \"continue\"\n",
        "[train]\nnonfinite = \"skip\"\n",
    ];
    // Only the inter tier's tree needs one global server and TCP between the DCs.
    let inter_only = [
        "[cluster]\nglobal_servers = 2\n",
        "[transport]\ninter = \"dgt\"\n",
    ];
    for (tier, extras) in [
        ("inter", [&both_tiers[..], &inter_only[..]].concat()),
        ("intra", both_tiers.to_vec()),
    ] {
        let on = format!("{tier} = true");
        for extra in extras {
            let toml = format!("{base}{extra}[scheduling.tsengine]\n{on}\n");
            let e = Config::from_toml_str(&toml).expect_err(extra).to_string();
            let field = format!("scheduling.tsengine.{tier}");
            assert!(e.contains(&field), "{tier}, {extra}: {e}");
            // The same configuration without TSEngine is valid.
            let plain = toml.replace(&on, &format!("{tier} = false"));
            Config::from_toml_str(&plain).unwrap_or_else(|e| panic!("{extra}: {e}"));
        }
    }
    for extra in inter_only {
        let toml = format!("{base}{extra}[scheduling.tsengine]\nintra = true\n");
        Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("intra with {extra}: {e}"));
    }
    let toml = format!("{base}[scheduling.tsengine]\nmax_greed = 1.5\n");
    let e = Config::from_toml_str(&toml)
        .expect_err("max_greed")
        .to_string();
    assert!(e.contains("scheduling.tsengine.max_greed"), "{e}");
}
