//! End-to-end tests of the synchronisation algorithms through `geomx launch` (every role its own
//! process on loopback): ESync with the coordinator's state machine, under one DC computing 3×
//! slower. Round counts are small so each launch takes a second or two.

mod support;

use serde_json::Value;
use support::{assert_within_two_points_of_fsa, wan_bytes};

/// dc1 3× slower, 300 rounds on digits: `workers` per DC, MLP hidden [`hidden`].
fn base(workers: usize, hidden: usize) -> String {
    format!(
        "[[cluster.data_centers]]\nname = \"dc0\"\nworkers = {workers}\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = {workers}\nslowdown = 3.0\n\
         [model]\nkind = \"mlp\"\nhidden = [{hidden}]\n\
         [train]\nrounds = 300\neval_every = 300\n"
    )
}

/// Launches `toml` with info logs; returns the report and the launcher's stderr lines.
fn launch(name: &str, toml: &str) -> (Value, Vec<String>) {
    let l = support::launch_with("sync-test", name, toml, &[("RUST_LOG", "info")]);
    (l.report, l.stderr.lines().map(str::to_string).collect())
}

/// Local steps per DC from the workers' "ESync local steps" log lines.
fn local_steps(lines: &[String]) -> [Vec<u64>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    for l in lines.iter().filter(|l| l.contains("ESync local steps")) {
        let field = |name: &str| -> u64 {
            let rest = &l[l.find(&format!("{name}=")).unwrap() + name.len() + 1..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        out[field("dc") as usize].push(field("local_steps"));
    }
    out
}

/// sync.md oracle 9 for ESync: with dc1 3× slower, ESync ends within 2 accuracy points of FSA
/// on digits: plain ESync on 2 DCs × 2 workers (MLP hidden [64]), FedNova on 2 DCs × 1 worker
/// (hidden [512]: FedNova scales the combined step by the mean step count, so it needs steps
/// long against the loopback round trip, or fast workers take many steps per round and the
/// amplified step diverges). Every replica ends identical; every worker takes at least one local
/// step per round and the fast DC's workers take more than the slow DC's (the coordinator let
/// them step while waiting); the WAN carries one model exchange per round, like FSA's gradients.
#[test]
fn esync_converges_within_two_points_of_fsa_with_a_slow_dc() {
    for (name, workers, hidden, norm) in [
        ("esync-none", 2, 64, "none"),
        ("esync-fednova", 1, 512, "fednova"),
    ] {
        let base = base(workers, hidden);
        let (fsa, _) = launch(&format!("{name}-fsa"), &base);
        let toml = format!(
            "{base}[sync]\nalgorithm = \"esync\"\n[sync.esync]\neps = 0.0001\n\
             normalisation = \"{norm}\"\n"
        );
        let (r, lines) = launch(name, &toml);
        let steps = local_steps(&lines);
        assert_within_two_points_of_fsa(name, &r, &fsa, 300, &format!(", local steps {steps:?}"));
        assert!(r["replicas_identical"].as_bool().unwrap(), "{name}");
        assert!(
            steps.iter().all(|d| d.len() == workers),
            "{name}: {steps:?}"
        );
        assert!(
            steps.iter().flatten().all(|&k| k >= 300),
            "{name}: {steps:?}"
        );
        let per_dc: Vec<u64> = steps.iter().map(|d| d.iter().sum()).collect();
        assert!(per_dc[0] > per_dc[1], "{name}: {steps:?}");
        // The report splits each worker's rounds: local steps are compute, the exchanges wait;
        // the fast DC's workers take more local steps, so more samples, than the slow DC's.
        let w = r["workers"].as_array().unwrap();
        assert_eq!(w.len(), 2 * workers, "{name}");
        for x in w {
            assert!(x["compute_ms"].as_f64().unwrap() > 0.0, "{name}: {x}");
            assert!(x["wait_ms"].as_f64().unwrap() > 0.0, "{name}: {x}");
        }
        let samples = |dc: u64| -> u64 {
            w.iter()
                .filter(|x| x["dc"] == dc)
                .map(|x| x["samples"].as_u64().unwrap())
                .sum()
        };
        assert!(samples(0) > samples(1), "{name}: {w:?}");
        let ratio = wan_bytes(&r) as f64 / wan_bytes(&fsa) as f64;
        assert!(ratio > 0.9 && ratio < 1.1, "{name}: WAN ratio {ratio}");
    }
}
