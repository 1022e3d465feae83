//! The scenario matrix of `geomx bench e2e` and the configuration each scenario runs.
//!
//! Every scenario trains the same model on the same data shards with the same optimizer; only the
//! hierarchy, the codecs, the synchronisation algorithm or the WAN transport differ. Configurations
//! are built as TOML tables (so that a scenario's file can be written out and re-run with
//! `geomx launch`) and checked by [`Config::from_toml_str`], whose validation decides whether a
//! scenario is available in this build.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{Config, ConfigError, ShardStrategy};

/// One row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioId {
    /// Flat parameter server across the WAN ("vanilla"): every worker pushes straight to the global
    /// server, through a pass-through local server of its own behind its data center's WAN link.
    Flat,
    /// HiPS with fully synchronous aggregation, dense f32.
    Hips,
    /// HiPS with FP16 on both tiers.
    HipsFp16,
    /// HiPS with Bi-Sparse (top 1 %, FP16 values) on the WAN tier.
    HipsBisparse,
    /// HiPS with MPQ (large tensors Bi-Sparse, small ones FP16) on the WAN tier.
    HipsMpq,
    /// Hierarchical frequency aggregation (local SGD, LAN averaging every k1 steps, WAN every k1·k2).
    Hfa,
    /// HFA whose global servers apply DiLoCo's outer Nesterov step to the DCs' averaged delta.
    HfaDiloco,
    /// HFA with Bi-Sparse on the WAN tier.
    HfaBisparse,
    /// HFA with FP16 on both tiers.
    HfaFp16,
    /// HFA whose local steps are corrected by SCAFFOLD's control variates.
    HfaScaffold,
    /// HFA with FP16 on both tiers and SCAFFOLD's control variates.
    HfaFp16Scaffold,
    /// ESync: fast workers take extra local steps while the slowest takes one; deltas are
    /// combined every round.
    Esync,
    /// MixedSync: synchronous inside DCs, asynchronous DC-ASGD between them.
    Mixed,
    /// HiPS with DGT (differential gradient transmission) as the WAN transport.
    Dgt,
    /// DGT carrying FP16 values (the WAN tier's fp16 codec without scaling).
    DgtFp16,
    /// The control: the HFA data centers with no WAN exchange at all (each trains on its own
    /// shards). It must stay below the target, which shows the target needs the WAN.
    Isolated,
}

impl ScenarioId {
    /// Every scenario, in table order (the flat baseline first).
    pub const ALL: [ScenarioId; 16] = [
        ScenarioId::Flat,
        ScenarioId::Hips,
        ScenarioId::HipsFp16,
        ScenarioId::HipsBisparse,
        ScenarioId::HipsMpq,
        ScenarioId::Hfa,
        ScenarioId::HfaDiloco,
        ScenarioId::HfaBisparse,
        ScenarioId::HfaFp16,
        ScenarioId::HfaScaffold,
        ScenarioId::HfaFp16Scaffold,
        ScenarioId::Esync,
        ScenarioId::Mixed,
        ScenarioId::Dgt,
        ScenarioId::DgtFp16,
        ScenarioId::Isolated,
    ];

    /// The name `--only` takes and files are named after.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioId::Flat => "flat",
            ScenarioId::Hips => "hips",
            ScenarioId::HipsFp16 => "hips-fp16",
            ScenarioId::HipsBisparse => "hips-bisparse",
            ScenarioId::HipsMpq => "hips-mpq",
            ScenarioId::Hfa => "hfa",
            ScenarioId::HfaDiloco => "hfa-diloco",
            ScenarioId::HfaBisparse => "hfa-bisparse",
            ScenarioId::HfaFp16 => "hfa-fp16",
            ScenarioId::HfaScaffold => "hfa-scaffold",
            ScenarioId::HfaFp16Scaffold => "hfa-fp16-scaffold",
            ScenarioId::Esync => "esync",
            ScenarioId::Mixed => "mixed",
            ScenarioId::Dgt => "dgt",
            ScenarioId::DgtFp16 => "dgt-fp16",
            ScenarioId::Isolated => "isolated",
        }
    }

    /// The row title of the results table.
    pub fn title(self) -> &'static str {
        match self {
            ScenarioId::Flat => "Flat PS (vanilla baseline)",
            ScenarioId::Hips => "HiPS FSA",
            ScenarioId::HipsFp16 => "HiPS + FP16",
            ScenarioId::HipsBisparse => "HiPS + Bi-Sparse",
            ScenarioId::HipsMpq => "HiPS + MPQ",
            ScenarioId::Hfa => "HFA",
            ScenarioId::HfaDiloco => "HFA + DiLoCo outer Nesterov",
            ScenarioId::HfaBisparse => "HFA + Bi-Sparse",
            ScenarioId::HfaFp16 => "HFA + FP16",
            ScenarioId::HfaScaffold => "HFA + SCAFFOLD",
            ScenarioId::HfaFp16Scaffold => "HFA + FP16 + SCAFFOLD",
            ScenarioId::Esync => "ESync",
            ScenarioId::Mixed => "MixedSync (DC-ASGD)",
            ScenarioId::Dgt => "HiPS + DGT",
            ScenarioId::DgtFp16 => "HiPS + DGT + FP16",
            ScenarioId::Isolated => "Isolated DCs (control: no WAN exchange)",
        }
    }

    /// Looks a scenario up by [`ScenarioId::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Scenarios whose workers train locally between synchronisations (HFA, and the isolated
    /// control, which is HFA without its WAN exchanges): they run whole `k1 · k2` periods.
    pub fn is_hfa(self) -> bool {
        matches!(
            self,
            ScenarioId::Hfa
                | ScenarioId::HfaDiloco
                | ScenarioId::HfaBisparse
                | ScenarioId::HfaFp16
                | ScenarioId::HfaScaffold
                | ScenarioId::HfaFp16Scaffold
                | ScenarioId::Isolated
        )
    }
}

/// The emulated WAN every scenario runs behind (the `[wan]` section of the configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WanParams {
    /// Lab mode: `off` (plain loopback, no WAN emulation), `netns`, `relay` or `auto`.
    pub mode: String,
    /// Bandwidth of each data center's WAN link, each way, in Mbit/s.
    pub rate_mbit: f64,
    /// One-way delay of each data center's WAN link in milliseconds.
    pub delay_ms: f64,
    /// Random loss probability on the WAN links (0..1).
    pub loss: f64,
}

impl WanParams {
    /// The lab modes `--wan` accepts.
    pub const MODES: [&'static str; 4] = ["off", "netns", "relay", "auto"];

    /// True when a WAN is emulated.
    pub fn enabled(&self) -> bool {
        self.mode != "off"
    }
}

impl Default for WanParams {
    fn default() -> Self {
        Self {
            mode: "auto".into(),
            rate_mbit: 100.0,
            delay_ms: 50.0,
            loss: 0.0,
        }
    }
}

/// Everything the scenarios share: topology, model, data, training length and the WAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixParams {
    /// Training data centers (each behind its own WAN link).
    pub data_centers: usize,
    /// Workers per data center.
    pub workers_per_dc: usize,
    /// Hidden layer widths of the MLP (input 64, 10 classes: the UCI digits).
    pub hidden: Vec<usize>,
    /// Samples per worker per round.
    pub batch_size: usize,
    /// How the training samples are assigned to workers: `by-class` (the default: each data
    /// center holds a disjoint set of classes) or `iid`.
    #[serde(default)]
    pub split: ShardStrategy,
    /// Rounds of the synchronous scenarios (HFA runs them rounded up to whole periods).
    pub rounds: u64,
    /// Test-set evaluation every this many rounds (the resolution of the time to accuracy).
    pub eval_every: u64,
    /// Learning rate of SGD (momentum 0.9).
    pub lr: f64,
    /// HFA: local steps between LAN averagings.
    pub hfa_k1: u64,
    /// HFA: LAN averagings between WAN exchanges.
    pub hfa_k2: u64,
    /// Target test accuracy for the time-to-accuracy figure.
    pub target_accuracy: f64,
    /// Wall-time cap per scenario in seconds; a scenario still running then is stopped.
    pub cap_s: f64,
    /// The emulated WAN.
    pub wan: WanParams,
    /// `[transport] congestion_control` of every scenario (`None`: the system's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub congestion: Option<String>,
}

impl MatrixParams {
    /// The default matrix: an MLP 64-2048-1024-10 (2.24 M parameters, 8.96 MB of f32 per full
    /// exchange), 2 DCs × 2 workers, 100 rounds, target 95 % test accuracy, 420 s cap per scenario
    /// (the flat baseline needs about 2.3 s per round behind 100 Mbit/s, 50 ms links).
    pub fn full() -> Self {
        Self {
            data_centers: 2,
            workers_per_dc: 2,
            hidden: vec![2048, 1024],
            batch_size: 32,
            split: ShardStrategy::ByClass,
            rounds: 100,
            eval_every: 1,
            lr: 0.1,
            // A WAN exchange every 10 rounds: with the data split by class, HFA with k1 · k2 =
            // 50 (two exchanges in 100 rounds) ended at 0.91 and never reached 95 %.
            hfa_k1: 5,
            hfa_k2: 2,
            target_accuracy: 0.95,
            cap_s: 420.0,
            wan: WanParams::default(),
            congestion: None,
        }
    }

    /// The CI smoke size: an MLP 64-256-10 (19 k parameters), 60 rounds, target 90 %.
    pub fn quick() -> Self {
        Self {
            hidden: vec![256],
            rounds: 60,
            target_accuracy: 0.90,
            cap_s: 60.0,
            ..Self::full()
        }
    }

    /// Parameters of the MLP (weights and biases) on the digits (64 inputs, 10 classes).
    pub fn model_params(&self) -> usize {
        use crate::data::digits::{CLASSES, FEATURES};
        let mut prev = FEATURES;
        let mut n = 0;
        for &h in self.hidden.iter().chain(std::iter::once(&CLASSES)) {
            n += prev * h + h;
            prev = h;
        }
        n
    }

    /// Rounds scenario `id` runs: HFA rounds up to whole `k1 · k2` periods.
    pub fn rounds_for(&self, id: ScenarioId) -> u64 {
        if id.is_hfa() {
            let period = (self.hfa_k1 * self.hfa_k2).max(1);
            self.rounds.div_ceil(period) * period
        } else {
            self.rounds
        }
    }
}

/// The `[[cluster.data_centers]]` list of scenario `id`: the HiPS data centers, or for the flat
/// baseline one single-worker DC per worker, named `dc<d>-w<r>` and placed (with `site`) behind the
/// WAN link of its real data center, so that a site's workers share that link. Workers keep their
/// global index (DCs in order, ranks in order) and so their data shard.
pub fn data_centers(id: ScenarioId, p: &MatrixParams) -> Vec<Value> {
    let mut out = Vec::new();
    for d in 0..p.data_centers {
        if id == ScenarioId::Flat {
            for r in 0..p.workers_per_dc {
                let mut dc = json!({ "name": format!("dc{d}-w{r}"), "workers": 1 });
                if p.wan.enabled() {
                    dc["site"] = json!(format!("dc{d}"));
                }
                out.push(dc);
            }
        } else {
            out.push(json!({ "name": format!("dc{d}"), "workers": p.workers_per_dc }));
        }
    }
    out
}

/// The configuration of scenario `id` as a TOML table (what `geomx launch` reads).
pub fn config_table(id: ScenarioId, p: &MatrixParams) -> Result<toml::Table, toml::ser::Error> {
    let mut v = json!({
        "cluster": {
            "central_dc": "central",
            "data_centers": data_centers(id, p),
        },
        "model": { "kind": "mlp", "hidden": p.hidden, "seed": 42 },
        "data": {
            "dataset": "digits", "split": p.split, "batch_size": p.batch_size, "seed": 7,
        },
        "train": {
            "rounds": p.rounds_for(id),
            "eval_every": p.eval_every,
            "optimizer": { "kind": "sgd", "lr": p.lr, "momentum": 0.9 },
        },
        "log": { "level": "warn" },
    });
    if p.wan.enabled() {
        v["wan"] = json!({
            "mode": p.wan.mode,
            "rate_mbit": p.wan.rate_mbit,
            "delay_ms": p.wan.delay_ms,
            "loss": p.wan.loss,
        });
    }
    let bisparse = json!({
        "codec": "bisparse", "density": 0.01, "min_size": 1000, "selection": "sampled",
        "values": "fp16", "momentum": 0.0, "warmup_rounds": 0, "resync_every": 100,
    });
    let hfa = json!({ "algorithm": "hfa", "hfa": { "k1": p.hfa_k1, "k2": p.hfa_k2 } });
    let hfa_scaffold = json!({ "algorithm": "hfa", "hfa": {
        "k1": p.hfa_k1, "k2": p.hfa_k2, "correction": "scaffold",
    }});
    let fp16_both = json!({ "intra": { "codec": "fp16" }, "inter": { "codec": "fp16" } });
    match id {
        ScenarioId::Flat | ScenarioId::Hips => {}
        ScenarioId::HipsFp16 => v["compression"] = fp16_both,
        ScenarioId::HipsBisparse => v["compression"] = json!({ "inter": bisparse }),
        ScenarioId::HipsMpq => {
            v["compression"] = json!({ "inter": {
                "codec": "mpq", "density": 0.01, "min_size": 1000, "warmup_rounds": 0,
            }})
        }
        ScenarioId::Hfa => v["sync"] = hfa,
        ScenarioId::HfaDiloco => {
            v["sync"] = json!({ "algorithm": "hfa", "hfa": {
                "k1": p.hfa_k1, "k2": p.hfa_k2, "outer": "nesterov",
            }})
        }
        ScenarioId::Isolated => {
            // HFA's LAN averagings, never a WAN exchange.
            v["sync"] = json!({ "algorithm": "hfa", "hfa": {
                "k1": p.hfa_k1, "k2": p.hfa_k2, "isolated": true,
            }})
        }
        ScenarioId::Esync => v["sync"] = json!({ "algorithm": "esync" }),
        ScenarioId::HfaBisparse => {
            v["sync"] = hfa;
            v["compression"] = json!({ "inter": bisparse });
        }
        ScenarioId::HfaFp16 => {
            v["sync"] = hfa;
            v["compression"] = fp16_both;
        }
        ScenarioId::HfaScaffold => v["sync"] = hfa_scaffold,
        ScenarioId::HfaFp16Scaffold => {
            v["sync"] = hfa_scaffold;
            v["compression"] = fp16_both;
        }
        ScenarioId::Mixed => {
            v["sync"] = json!({ "algorithm": "mixed", "mixed": {
                "optimizer": "dcasgd", "lambda_mode": "constant", "lambda": 0.04, "momentum": 0.9,
            }})
        }
        ScenarioId::Dgt => v["transport"] = json!({ "inter": "dgt" }),
        ScenarioId::DgtFp16 => {
            v["transport"] = json!({ "inter": "dgt" });
            v["compression"] = json!({ "inter": { "codec": "fp16", "scaling": "none" } });
        }
    }
    if let Some(cc) = &p.congestion {
        v["transport"]["congestion_control"] = json!(cc);
    }
    toml::Table::try_from(v)
}

/// The configuration text of scenario `id` and its validated [`Config`]. An error means the
/// scenario is not available in this build (e.g. a codec the algorithm does not support yet).
pub fn scenario_config(id: ScenarioId, p: &MatrixParams) -> Result<(String, Config), ConfigError> {
    let table = config_table(id, p).map_err(|e| ConfigError::Parse {
        origin: id.name().into(),
        message: e.to_string(),
    })?;
    let text = format!(
        "# geomx bench e2e: scenario \"{}\" ({})\n{}",
        id.name(),
        id.title(),
        toml::to_string(&table).map_err(|e| ConfigError::Parse {
            origin: id.name().into(),
            message: e.to_string(),
        })?
    );
    let cfg = Config::from_toml_str(&text)?;
    Ok((text, cfg))
}

/// Parses `--only a,b`: scenario names separated by commas (empty: the whole matrix).
pub fn select(only: &[String]) -> Result<Vec<ScenarioId>, String> {
    if only.is_empty() {
        return Ok(ScenarioId::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in only.iter().flat_map(|s| s.split(',')).map(str::trim) {
        if name.is_empty() {
            continue;
        }
        let id = ScenarioId::from_name(name).ok_or_else(|| {
            let names: Vec<&str> = ScenarioId::ALL.iter().map(|s| s.name()).collect();
            format!("unknown scenario {name:?} (known: {})", names.join(", "))
        })?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    // Keep table order, whatever order they were named in.
    out.sort_by_key(|id| ScenarioId::ALL.iter().position(|s| s == id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Codec, SyncAlgorithm};

    fn off() -> MatrixParams {
        let mut p = MatrixParams::quick();
        p.wan.mode = "off".into();
        p
    }

    #[test]
    fn congestion_control_reaches_every_scenario_and_keeps_dgt() {
        let mut p = off();
        p.congestion = Some("reno".into());
        for id in ScenarioId::ALL {
            let (text, cfg) = scenario_config(id, &p).unwrap();
            assert_eq!(
                cfg.transport.congestion_control.as_deref(),
                Some("reno"),
                "{}: {text}",
                id.name()
            );
        }
        let (_, dgt) = scenario_config(ScenarioId::Dgt, &p).unwrap();
        assert_eq!(dgt.transport.inter, crate::config::TransportKind::Dgt);
        let (_, hips) = scenario_config(ScenarioId::Hips, &off()).unwrap();
        assert_eq!(hips.transport.congestion_control, None);
    }

    #[test]
    fn flat_baseline_is_one_pass_through_dc_per_worker_keeping_shards() {
        let p = off();
        let (_, flat) = scenario_config(ScenarioId::Flat, &p).unwrap();
        let (_, hips) = scenario_config(ScenarioId::Hips, &p).unwrap();
        let dcs = &flat.cluster.data_centers;
        assert_eq!(dcs.len(), p.data_centers * p.workers_per_dc);
        assert!(dcs.iter().all(|d| d.workers == 1));
        let names: Vec<&str> = dcs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["dc0-w0", "dc0-w1", "dc1-w0", "dc1-w1"]);
        assert_eq!(
            flat.cluster.total_workers(),
            hips.cluster.total_workers(),
            "same number of workers"
        );
        // Worker (d, r) of HiPS is flat DC d·n + r, rank 0: same global index, same shard.
        for d in 0..p.data_centers {
            for r in 0..p.workers_per_dc {
                assert_eq!(
                    flat.cluster
                        .global_worker_index(d * p.workers_per_dc + r, 0)
                        .unwrap(),
                    hips.cluster.global_worker_index(d, r).unwrap()
                );
            }
        }
        // Only the topology differs.
        let mut same_shape = flat.clone();
        same_shape.cluster = hips.cluster.clone();
        assert_eq!(same_shape.config_hash(), hips.config_hash());
        assert_eq!(hips.cluster.data_centers.len(), p.data_centers);
    }

    #[test]
    fn flat_sites_are_the_real_data_centers_when_the_wan_is_on() {
        let mut p = off();
        let sites = |p: &MatrixParams| -> Vec<Option<String>> {
            data_centers(ScenarioId::Flat, p)
                .iter()
                .map(|d| d.get("site").and_then(|s| s.as_str()).map(String::from))
                .collect()
        };
        assert!(sites(&p).iter().all(Option::is_none));
        p.wan.mode = "relay".into();
        let s = sites(&p);
        assert_eq!(s, ["dc0", "dc0", "dc1", "dc1"].map(|x| Some(x.to_string())));
        let t = config_table(ScenarioId::Flat, &p).unwrap();
        let wan = t["wan"].as_table().unwrap();
        assert_eq!(wan["mode"].as_str(), Some("relay"));
        assert_eq!(wan["rate_mbit"].as_float(), Some(100.0));
        assert_eq!(wan["delay_ms"].as_float(), Some(50.0));
        // HiPS keeps its own DCs, no site needed.
        let h = data_centers(ScenarioId::Hips, &p);
        assert!(h.iter().all(|d| d.get("site").is_none()));
    }

    #[test]
    fn flat_workers_share_their_sites_wan_link_in_the_lab() {
        let mut p = off();
        p.wan.mode = "netns".into();
        p.wan.rate_mbit = 50.0;
        p.wan.delay_ms = 20.0;
        for id in [ScenarioId::Flat, ScenarioId::Hips] {
            let (_, cfg) = scenario_config(id, &p).unwrap();
            assert_eq!(cfg.wan.mode, crate::config::WanMode::Netns);
            let sites = cfg.wan_sites();
            let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["central", "dc0", "dc1"], "{id:?}");
            let per_site: Vec<usize> = sites[1..].iter().map(|s| s.dcs.len()).collect();
            let want = if id == ScenarioId::Flat { 2 } else { 1 };
            assert_eq!(per_site, [want, want], "{id:?}: DCs behind each site link");
            for s in &sites[1..] {
                let l = cfg.wan_link(s);
                assert_eq!((l.rate_mbit, l.delay_ms), (Some(50.0), 20.0));
            }
        }
    }

    #[test]
    fn scenarios_differ_in_the_intended_fields() {
        let p = off();
        let cfg = |id| scenario_config(id, &p).unwrap().1;
        assert_eq!(cfg(ScenarioId::Hips).compression.inter, Codec::None);
        assert!(matches!(
            cfg(ScenarioId::HipsFp16).compression.inter,
            Codec::Fp16(_)
        ));
        assert!(matches!(
            cfg(ScenarioId::HipsFp16).compression.intra,
            Codec::Fp16(_)
        ));
        match cfg(ScenarioId::HipsBisparse).compression.inter {
            Codec::Bisparse(s) => assert_eq!(s.density, 0.01),
            c => panic!("{c:?}"),
        }
        assert!(matches!(
            cfg(ScenarioId::HipsMpq).compression.inter,
            Codec::Mpq(_)
        ));
        let hfa = cfg(ScenarioId::Hfa);
        assert_eq!(hfa.sync.algorithm, SyncAlgorithm::Hfa);
        assert_eq!((hfa.sync.hfa.k1, hfa.sync.hfa.k2), (p.hfa_k1, p.hfa_k2));
        assert_eq!(
            hfa.train.rounds,
            Some(60),
            "60 is a whole number of 10-step periods"
        );
        assert_eq!(cfg(ScenarioId::Mixed).sync.algorithm, SyncAlgorithm::Mixed);
        for id in [ScenarioId::Flat, ScenarioId::Hips, ScenarioId::HipsMpq] {
            let c = cfg(id);
            assert_eq!(c.model.hidden, p.hidden);
            assert_eq!(c.train.rounds, Some(p.rounds));
            assert_eq!(c.sync.algorithm, SyncAlgorithm::Fsa);
        }
    }

    #[test]
    fn the_matrix_is_non_iid_by_default_and_adds_the_control_and_the_missing_pairs() {
        let p = off();
        let cfg = |id| scenario_config(id, &p).unwrap().1;
        for id in ScenarioId::ALL {
            assert_eq!(cfg(id).data.split, ShardStrategy::ByClass, "{id:?}");
        }
        // HFA + Bi-Sparse is configurable now: sparse deltas, no momentum correction.
        let hb = cfg(ScenarioId::HfaBisparse);
        assert_eq!(hb.sync.algorithm, SyncAlgorithm::Hfa);
        assert!(
            matches!(&hb.compression.inter, crate::config::Codec::Bisparse(c) if c.momentum == 0.0)
        );
        let mut iid = p.clone();
        iid.split = ShardStrategy::Iid;
        assert_eq!(
            scenario_config(ScenarioId::Hips, &iid)
                .unwrap()
                .1
                .data
                .split,
            ShardStrategy::Iid
        );
        // The control is HFA with the same periods, minus the WAN exchanges.
        let (iso, hfa) = (cfg(ScenarioId::Isolated), cfg(ScenarioId::Hfa));
        assert!(iso.sync.hfa.isolated && !hfa.sync.hfa.isolated);
        let mut same = iso.clone();
        same.sync.hfa.isolated = false;
        assert_eq!(same, hfa, "only the WAN exchange differs");
        let job = crate::hips::JobSpec::from_config(&iso).unwrap();
        assert!(
            job.rounds_per_global() > job.rounds,
            "no global averaging in the run"
        );
        let diloco = cfg(ScenarioId::HfaDiloco).sync.hfa;
        assert_eq!(diloco.outer, crate::config::OuterOptimizer::Nesterov);
        assert_eq!((diloco.k1, diloco.k2), (p.hfa_k1, p.hfa_k2));
        assert_eq!(cfg(ScenarioId::Esync).sync.algorithm, SyncAlgorithm::Esync);
        assert_eq!(cfg(ScenarioId::Esync).train.rounds, Some(p.rounds));
    }

    #[test]
    fn hfa_rounds_up_to_whole_periods() {
        let mut p = off();
        p.rounds = 61;
        assert_eq!(p.rounds_for(ScenarioId::Hfa), 70);
        assert_eq!(p.rounds_for(ScenarioId::Isolated), 70);
        assert_eq!(p.rounds_for(ScenarioId::HfaDiloco), 70);
        assert_eq!(p.rounds_for(ScenarioId::Esync), 61);
        assert_eq!(p.rounds_for(ScenarioId::HfaFp16), 70);
        assert_eq!(p.rounds_for(ScenarioId::Hips), 61);
        let mut f = MatrixParams::full(); // k1 · k2 = 10
        f.rounds = 115;
        assert_eq!(f.rounds_for(ScenarioId::Hfa), 120);
        f.rounds = 100;
        assert_eq!(f.rounds_for(ScenarioId::Hfa), 100);
    }

    #[test]
    fn model_size_of_the_default_matrix() {
        // 64·2048 + 2048 + 2048·1024 + 1024 + 1024·10 + 10 = 133,120 + 2,098,176 + 10,250.
        assert_eq!(MatrixParams::full().model_params(), 2_241_546);
        assert_eq!(MatrixParams::quick().model_params(), 64 * 256 + 256 + 2570);
    }

    #[test]
    fn selection_keeps_table_order_and_rejects_unknown_names() {
        assert_eq!(select(&[]).unwrap(), ScenarioId::ALL.to_vec());
        assert_eq!(
            select(&["hips-fp16,flat".into(), "flat".into()]).unwrap(),
            vec![ScenarioId::Flat, ScenarioId::HipsFp16]
        );
        let e = select(&["flat,nope".into()]).unwrap_err();
        assert!(e.contains("\"nope\"") && e.contains("hips-bisparse"), "{e}");
        for id in ScenarioId::ALL {
            assert_eq!(ScenarioId::from_name(id.name()), Some(id));
        }
    }

    #[test]
    fn config_text_round_trips_through_the_parser() {
        let p = off();
        let (text, cfg) = scenario_config(ScenarioId::HipsBisparse, &p).unwrap();
        assert!(text.starts_with("# geomx bench e2e: scenario \"hips-bisparse\""));
        assert_eq!(Config::from_toml_str(&text).unwrap(), cfg);
    }
}
