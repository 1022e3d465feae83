//! DGT on the inter tier: configuration rules, and `geomx launch` with `transport.inter = "dgt"`
//! on loopback converging on digits with the sums really crossing the DGT channels.

mod support;

use geomx_trainer::config::{Config, TransportKind};
use serde_json::Value;
const EXAMPLE: &str = include_str!("../../examples/dgt.toml");

fn role<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == name)
        .unwrap_or_else(|| panic!("no {name} in the report"))
}

#[test]
fn example_parses_and_validates() {
    let c = Config::from_toml_str(EXAMPLE).unwrap();
    c.validate().unwrap();
    assert_eq!(c.transport.inter, TransportKind::Dgt);
    assert_eq!((c.transport.dgt.channels, c.transport.dgt.k), (3, 0.8));
    assert_eq!(c.transport.dgt.rate_mbit, None);
}

#[test]
fn invalid_dgt_settings_name_their_field() {
    let bad = [
        ("[transport.dgt]\nchannels = 8\n", "transport.dgt.channels"),
        ("[transport.dgt]\nk = 1.5\n", "transport.dgt.k"),
        (
            "[transport.dgt]\nk = 0.5\nk_min = 0.6\n",
            "transport.dgt.k_min",
        ),
        (
            "[transport.dgt]\nblock_bytes = 100\n",
            "transport.dgt.block_bytes",
        ),
        (
            "[transport.dgt]\nrate_mbit = 0.0\n",
            "transport.dgt.rate_mbit",
        ),
        (
            "[transport.dgt]\ndeadline_ms = 0\n",
            "transport.dgt.deadline_ms",
        ),
        (
            "[compression]\ninter = { codec = \"fp16\" }\n",
            "compression.inter.codec",
        ),
        ("[sync]\nalgorithm = \"mixed\"\n", "transport.inter"),
    ];
    for (extra, field) in bad {
        // Later tables win over the example's: strip the example's own [transport.dgt] etc.
        let toml = format!("{}\n{extra}", base_without(extra));
        let err = Config::from_toml_str(&toml)
            .and_then(|c| c.validate().map(|_| c))
            .expect_err(extra);
        assert!(err.to_string().contains(field), "{extra}: {err}");
    }
    let intra = EXAMPLE.replace("intra = \"tcp\"", "intra = \"dgt\"");
    let err = Config::from_toml_str(&intra)
        .and_then(|c| c.validate().map(|_| c))
        .unwrap_err();
    assert!(err.to_string().contains("transport.intra"), "{err}");
}

/// The example without the table that `extra` redefines (TOML forbids defining one twice).
fn base_without(extra: &str) -> String {
    let table = extra.lines().next().unwrap();
    let mut out = String::new();
    let mut skip = false;
    for line in EXAMPLE.lines() {
        if line.starts_with('[') {
            skip = line.trim() == table;
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// FSA with DGT on the WAN tier (2 DCs × 2 workers, digits, loopback, k = 0.5): accuracy ≥ 0.9, the blocks below the reliable share crossed the UDP channels, and the counters
/// of sender and receiver agree.
#[test]
fn dgt_launch_converges_on_digits() {
    // hidden [512]: the 32,768-element weight spans 32 blocks, so half of them go over UDP.
    let toml = EXAMPLE
        .replace("rounds = 400", "rounds = 300")
        .replace("hidden = [64]", "hidden = [512]")
        .replace("k = 0.8 ", "k = 0.5 ");
    let r = support::launch_report("dgt-test", "converge", &toml);
    let acc = r["final_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "final test accuracy {acc}");
    assert_eq!(r["rounds"], 300);
    assert!(r["replicas_identical"].as_bool().unwrap());
    let g = &role(&r, "global_server")["dgt"];
    let l = &role(&r, "local_server")["dgt"];
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    assert!(n(g, "unreliable_blocks") > 0, "global dgt stats {g}");
    assert!(n(g, "reliable_blocks") > 0, "global dgt stats {g}");
    assert!(n(l, "datagrams") > 0, "local dgt stats {l}");
    assert_eq!(n(g, "invalid"), 0, "{g}");
    // Loopback with an 8 MiB receive buffer and pacing: nothing lost for good.
    assert_eq!(n(g, "lost_blocks"), 0, "{g}");
}

/// DGT with FP16 values (issue 20): the inter tier's fp16 codec without scaling narrows each DC
/// sum as the TCP path does and DGT carries 2-byte values; training converges, the local servers
/// count fp16 bytes only, and the receiver loses nothing on loopback. On Linux every process
/// also runs its connections and DGT's reliable channel with `congestion_control = "reno"`
/// (built into every kernel), which the job must accept.
#[test]
fn dgt_with_fp16_values_converges() {
    let mut base = EXAMPLE.to_string();
    if cfg!(target_os = "linux") {
        base = base.replace(
            "[transport]\n",
            "[transport]\ncongestion_control = \"reno\"\n",
        );
        assert!(base.contains("congestion_control = \"reno\""));
    }
    let toml = base
        .replace("rounds = 400", "rounds = 300")
        .replace("hidden = [64]", "hidden = [512]")
        .replace("k = 0.8 ", "k = 0.5 ")
        .replace(
            "inter = { codec = \"none\" }",
            "inter = { codec = \"fp16\", scaling = \"none\" }",
        );
    assert!(toml.contains("scaling = \"none\""));
    let r = support::launch_report("dgt-test", "fp16", &toml);
    let acc = r["final_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "final test accuracy {acc}");
    assert!(r["replicas_identical"].as_bool().unwrap());
    let ls = role(&r, "local_server");
    let bytes = &ls["codec_bytes"];
    assert!(bytes["fp16"].as_u64().unwrap_or(0) > 0, "{bytes}");
    assert_eq!(bytes["f32"].as_u64().unwrap_or(0), 0, "{bytes}");
    let g = &role(&r, "global_server")["dgt"];
    assert!(g["unreliable_blocks"].as_u64().unwrap_or(0) > 0, "{g}");
    assert_eq!(g["invalid"].as_u64().unwrap_or(0), 0, "{g}");
    assert_eq!(g["lost_blocks"].as_u64().unwrap_or(0), 0, "{g}");
}

/// Adaptive k (issue 20): the workers report their training loss with each round, the local
/// servers set DGT's reliable share from their DC's mean (k_t = max(k·L_t/L_0, k_min)). As the
/// loss falls, fewer blocks go reliably: the last share is below k, at least k_min, and
/// training still converges.
#[test]
fn adaptive_k_lowers_the_reliable_share_as_the_loss_falls() {
    let toml = EXAMPLE
        .replace("rounds = 400", "rounds = 300")
        .replace("hidden = [64]", "hidden = [512]")
        .replace("adaptive_k = false", "adaptive_k = true");
    assert!(toml.contains("adaptive_k = true"));
    let r = support::launch_report("dgt-test", "adaptive", &toml);
    let acc = r["final_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "final test accuracy {acc}");
    assert!(r["replicas_identical"].as_bool().unwrap());
    let l = &role(&r, "local_server")["dgt"];
    let share = l["reliable_share"].as_f64().unwrap();
    assert!(
        (0.2..0.8).contains(&share),
        "last reliable share {share}: {l}"
    );
    let g = &role(&r, "global_server")["dgt"];
    assert!(g["unreliable_blocks"].as_u64().unwrap_or(0) > 0, "{g}");
    assert_eq!(g["invalid"].as_u64().unwrap_or(0), 0, "{g}");
}

/// A congestion control the kernel does not have stops the job at its start, naming the field
/// and the algorithm (the form alone is checked by validation, the kernel's support at start).
#[test]
#[cfg(target_os = "linux")]
fn an_unknown_congestion_control_stops_the_launch_naming_the_field() {
    let toml = EXAMPLE.replace(
        "[transport]\n",
        "[transport]\ncongestion_control = \"no-such-cc\"\n",
    );
    assert!(toml.contains("no-such-cc"));
    let cfg = support::scratch("dgt-test", "bad-cc.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = support::output_within(
        std::process::Command::new(support::GEOMX)
            .args(["launch", "--quiet"])
            .arg(&cfg),
        std::time::Duration::from_secs(120),
    );
    let _ = std::fs::remove_file(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the launch must fail:\n{stderr}");
    assert!(
        stderr.contains("transport.congestion_control") && stderr.contains("no-such-cc"),
        "{stderr}"
    );
}
