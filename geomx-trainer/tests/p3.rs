//! P3 (scheduling.md): slicing, priority sending and the gated forward pass change when bytes
//! move, never the values. Oracle 2: after 20 rounds of FSA, every worker and the global servers
//! hold exactly the θ of the unsliced run (SGD and Adam, 1 and 2 global servers); and P3 works
//! with every codec (replicas agree with the global θ).
//!
//! Each run is a whole cluster on loopback threads (`launch::threads`): 2 DCs (2 + 1 workers), an
//! MLP whose weight tensors are cut into several slices of 1024 elements.

use geomx_trainer::config::{Config, Credit};
use geomx_trainer::hips::JobSpec;
use geomx_trainer::report::Report;

mod support;

/// digits (64 features, 10 classes), hidden [48, 32]: tensors of 3072, 48, 1536, 32, 320 and 10
/// elements, which P3 with S = 1024 cuts into 3 + 1 + 2 + 1 + 1 + 1 = 9 keys.
fn config(servers: usize, optimizer: &str, extra: &str, p3: bool) -> Config {
    let toml = format!(
        "[cluster]\nglobal_servers = {servers}\n\
         [[cluster.data_centers]]\nname = \"dc0\"\nworkers = 2\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 1\n\
         [model]\nhidden = [48, 32]\n[data]\nbatch_size = 8\n\
         [train]\nrounds = 20\neval_every = 0\n{optimizer}\n\
         [placement]\nmin_range = 64\n\
         [scheduling.p3]\nenabled = {p3}\nslice_elems = 1024\n{extra}"
    );
    Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn run(name: &str, cfg: &Config) -> (JobSpec, Report) {
    let (job, r) = support::run_in_threads(name, cfg);
    // The workers' and local servers' pushing connections: `credit_bytes = "auto"` settles
    // within 15 rounds of the 20, `"path"` (the default) sizes them to the path; a fixed
    // credit is neither.
    let sized = job
        .p3
        .as_ref()
        .is_some_and(|p| matches!(p.credit_bytes, Credit::Sized(_)));
    for p in &r.processes {
        let tuned = sized && matches!(p.role.as_str(), "worker" | "local_server");
        assert_eq!(p.p3_credit.is_some(), tuned, "{name}: {p:?}");
    }
    assert_eq!(r.skipped_updates, 0, "{name}");
    (job, r)
}

const SGD: &str = "[train.optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9";
const ADAM: &str = "[train.optimizer]\nkind = \"adam\"\nlr = 0.01";

#[test]
fn p3_fsa_is_bit_identical_to_the_unsliced_run() {
    for servers in [1, 2] {
        for (opt_name, opt) in [("sgd", SGD), ("adam", ADAM)] {
            let name = format!("{opt_name}, {servers} global server(s)");
            let (plain_job, plain) =
                run(&format!("plain {name}"), &config(servers, opt, "", false));
            let (p3_job, p3) = run(&format!("p3 {name}"), &config(servers, opt, "", true));
            assert_eq!(plain_job.plan.key_lens.len(), 6);
            assert_eq!(p3_job.plan.key_lens.len(), 9, "{name}: slices are keys");
            support::assert_bit_identical(&p3, &plain, &name);
            assert!(
                p3.final_test_accuracy > 0.2,
                "{name}: training went nowhere"
            );
        }
    }
}

#[test]
fn p3_works_with_compressed_tiers_mixed_sync_and_dgt() {
    let bisparse = "[compression]\nintra = { codec = \"fp16\" }\n[compression.inter]\n\
                    codec = \"bisparse\"\ndensity = 0.1\nmin_size = 100\nvalues = \"f32\"\n\
                    warmup_rounds = 0\nselection = \"exact\"\nresync_every = 0\n";
    // Appended to the [scheduling.p3] table.
    let auto = "credit_bytes = \"auto\"\n";
    run("p3 auto credit", &config(2, ADAM, auto, true));
    run(
        "p3 fixed credit",
        &config(1, SGD, "credit_bytes = 262144\n", true),
    );
    let (_, r) = run("p3 bisparse", &config(2, SGD, bisparse, true));
    // The WAN tier's bytes: Bi-Sparse selected per slice.
    assert!(r.codec_bytes.get("sparse").copied().unwrap_or(0) > 0);
    let mixed = "[sync]\nalgorithm = \"mixed\"\n";
    run("p3 mixed", &config(2, SGD, mixed, true));
    // DGT carries the slice sums up; their counts still go through the priority sender.
    let dgt = "[transport]\ninter = \"dgt\"\n";
    let (_, r) = run("p3 dgt", &config(1, SGD, dgt, true));
    assert!(
        r.processes.iter().any(|p| p.dgt.is_some()),
        "DGT was not used"
    );
}

#[test]
fn p3_refuses_model_averaging_and_tiny_slices() {
    let hfa =
        Config::from_toml_str("[sync]\nalgorithm = \"hfa\"\n[scheduling.p3]\nenabled = true\n")
            .unwrap_err()
            .to_string();
    assert!(hfa.contains("scheduling.p3.enabled"), "{hfa}");
    let tiny = Config::from_toml_str("[scheduling.p3]\nslice_elems = 10\n")
        .unwrap_err()
        .to_string();
    assert!(tiny.contains("scheduling.p3.slice_elems"), "{tiny}");
}

/// `slice_elems = "auto"`: `geomx launch` probes each candidate size for a few rounds, runs the
/// job with the fastest, and the job ends with the θ of the run without P3 (FSA), so the probes
/// left nothing behind. A process started on its own refuses "auto", naming the field.
#[test]
fn launch_tunes_an_auto_slice_size_before_the_job() {
    // digits (64 features): the 64 × 320 weight (20,480 elements) makes all three candidates
    // cut it differently.
    let toml = |p3: &str| {
        format!(
            "[[cluster.data_centers]]\nname = \"dc0\"\nworkers = 1\n\
             [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 1\n\
             [model]\nhidden = [320, 64]\n[data]\nbatch_size = 8\n\
             [train]\nrounds = 8\neval_every = 0\n{SGD}\n[scheduling.p3]\n{p3}"
        )
    };
    let auto = toml("enabled = true\nslice_elems = \"auto\"\n");
    let tuned = support::launch_report("p3", "auto-slices", &auto);
    let plain = support::launch_report("p3", "auto-slices-plain", &toml("enabled = false\n"));
    let t = &tuned["p3_tuning"];
    let candidates: Vec<u64> = serde_json::from_value(t["candidates"].clone()).unwrap();
    let round_ms: Vec<f64> = serde_json::from_value(t["round_ms"].clone()).unwrap();
    assert_eq!(candidates, [4_096, 16_384, 65_536], "{t}");
    assert_eq!(t["probe_rounds"], 5);
    assert_eq!(round_ms.len(), 3);
    assert!(round_ms.iter().all(|&ms| ms > 0.0), "{t}");
    let fastest = (0..3)
        .min_by(|&a, &b| round_ms[a].total_cmp(&round_ms[b]))
        .unwrap();
    assert_eq!(t["chosen"], candidates[fastest]);
    // The job itself ran with the chosen size, for its own rounds.
    assert_eq!(
        tuned["config"]["scheduling"]["p3"]["slice_elems"],
        t["chosen"]
    );
    assert_eq!(tuned["rounds"], 8);
    assert!(tuned["replicas_identical"].as_bool().unwrap());
    assert_eq!(tuned["param_hash"], plain["param_hash"]);
    assert!(plain.get("p3_tuning").is_none());

    let cfg = Config::from_toml_str(&auto).unwrap();
    let e = JobSpec::from_config(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("scheduling.p3.slice_elems") && e.contains("geomx launch"),
        "{e}"
    );
    // A deployment has no launcher to run the probes: refused before anything is written.
    let file = support::scratch("p3", "auto-slices-deploy.toml");
    std::fs::write(&file, &auto).unwrap();
    for target in ["slurm", "k8s"] {
        let dir = support::scratch("p3", &format!("auto-slices-{target}"));
        let out = support::output_within(
            std::process::Command::new(support::GEOMX)
                .args(["deploy", target])
                .arg(&file)
                .arg("--out")
                .arg(&dir),
            std::time::Duration::from_secs(60),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{target}: deployed \"auto\"");
        assert!(
            stderr.contains("scheduling.p3.slice_elems"),
            "{target}: {stderr}"
        );
        assert!(!dir.exists(), "{target}: wrote {}", dir.display());
    }
    let _ = std::fs::remove_file(file);
}
