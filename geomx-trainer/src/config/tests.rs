//! Tests of parsing, defaults, validation, hashing, DMLC variables and the default run.

use std::collections::HashMap;

use super::*;
use crate::data;
use crate::engine::optim::{AdamConfig, SgdConfig};
use crate::engine::reference::fsa_reference;

const VANILLA: &str = include_str!("../../../examples/vanilla-hips.toml");
const MULTI_GPS: &str = include_str!("../../../examples/multi-gps.toml");

#[test]
fn default_validates_and_has_the_documented_shape() {
    let c = Config::default();
    c.validate().unwrap();
    assert_eq!(c.cluster.global_servers, 1);
    assert_eq!(c.cluster.data_centers.len(), 2);
    assert_eq!(c.cluster.total_workers(), 4);
    assert_eq!(c.sync.algorithm, SyncAlgorithm::Fsa);
    assert_eq!(c.timeouts.heartbeat(), Duration::from_secs(1));
    assert_eq!(c.timeouts.peer_dead(), Duration::from_secs(10));
    assert_eq!(c.timeouts.registration(), Duration::from_secs(60));
    assert_eq!(
        (c.placement.split_bound, c.placement.min_range),
        (1_000_000, 4_096)
    );
    assert_eq!(c.cluster.global_worker_index(1, 1), Some(3));
    assert_eq!(c.cluster.global_worker_index(1, 2), None);
    assert_eq!(c.cluster.global_worker_index(2, 0), None);
}

#[test]
fn empty_file_is_the_default_and_examples_parse() {
    assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    assert_eq!(Config::from_toml_str(VANILLA).unwrap(), Config::default());
    let m = Config::from_toml_str(MULTI_GPS).unwrap();
    assert_eq!(m.cluster.global_servers, 3);
    assert_eq!(m.cluster.total_workers(), 5);
    assert_eq!(m.cluster.central_dc, "dc0");
    assert_eq!(m.model.hidden, vec![128, 64]);
    assert_eq!(m.placement.split_bound, 4096);
}

#[test]
fn data_center_shorthand_expands_to_named_dcs() {
    let c = Config::from_toml_str("[cluster]\ndata_centers = 3\nworkers_per_dc = 4").unwrap();
    let dcs: Vec<(&str, usize)> = c
        .cluster
        .data_centers
        .iter()
        .map(|d| (d.name.as_str(), d.workers))
        .collect();
    assert_eq!(dcs, vec![("dc0", 4), ("dc1", 4), ("dc2", 4)]);
    let two = Config::from_toml_str("[cluster]\ndata_centers = 2").unwrap();
    assert_eq!(two.cluster, Config::default().cluster);
    // The shorthand serialises as the list form, which parses back to the same value.
    let text = c.to_toml_string().unwrap();
    assert_eq!(Config::from_toml_str(&text).unwrap(), c);
    for (text, needle) in [
        ("[cluster]\nworkers_per_dc = 2", "cluster.workers_per_dc"),
        (
            "[cluster]\nworkers_per_dc = 2\n[[cluster.data_centers]]\nname = \"a\"\nworkers = 1",
            "cluster.workers_per_dc",
        ),
        ("[cluster]\ndata_centers = -1", "-1"),
        // Refused before a list of a trillion data centers is built.
        (
            "[cluster]\ndata_centers = 1000000000000",
            "cluster.data_centers: 1000000000000 data centers, at most 65536",
        ),
        (
            "[cluster]\ndata_centers = \"two\"",
            "number of data centers",
        ),
    ] {
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
    match Config::from_toml_str("[cluster]\ndata_centers = 0") {
        Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "cluster.data_centers"),
        other => panic!("{other:?}"),
    }
    match Config::from_toml_str("[cluster]\ndata_centers = 2\nworkers_per_dc = 0") {
        Err(ConfigError::Invalid { field, .. }) => {
            assert_eq!(field, "cluster.data_centers[0].workers")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn load_reads_files_and_names_them_in_errors() {
    let dir = std::env::temp_dir().join(format!("geomx-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, MULTI_GPS).unwrap();
    assert_eq!(Config::load(&good).unwrap().cluster.global_servers, 3);
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[cluster]\nglobal_server = 2\n").unwrap();
    let err = Config::load(&bad).unwrap_err().to_string();
    assert!(
        err.contains("bad.toml") && err.contains("global_server"),
        "{err}"
    );
    let err = Config::load(dir.join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.toml"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn toml_round_trip_keeps_every_field() {
    let mut c = Config::default();
    c.cluster.global_servers = 2;
    c.cluster.coordinator = Some("10.0.0.1:9092".into());
    c.cluster.global_server_addrs = vec!["10.0.0.1:9100".into(), "[::1]:9101".into()];
    c.cluster.data_centers[1].workers = 3;
    c.cluster.data_centers[1].local_server = Some("10.0.2.1:9200".into());
    c.cluster.data_centers[0].worker_addrs = vec!["a:1".into(), "b:2".into()];
    c.model.hidden = vec![32, 16];
    c.data.split = ShardStrategy::ByClass;
    c.data.dataset = DatasetKind::Synthetic;
    c.train.rounds = None;
    c.train.epochs = Some(3);
    c.train.optimizer = OptimizerConfig::Adam(AdamConfig {
        lr: 0.002,
        ..AdamConfig::default()
    });
    c.transport.driver = Driver::IoUring;
    c.log.level = LogLevel::Trace;
    c.validate().unwrap();
    let text = c.to_toml_string().unwrap();
    assert_eq!(Config::from_toml_str(&text).unwrap(), c, "{text}");
    let default_text = Config::default().to_toml_string().unwrap();
    assert_eq!(
        Config::from_toml_str(&default_text).unwrap(),
        Config::default()
    );
    // JSON (the report's resolved configuration) round-trips too.
    let json = c.to_json();
    assert_eq!(json["cluster"]["data_centers"][1]["workers"], 3);
    assert_eq!(serde_json::from_value::<Config>(json).unwrap(), c);
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    for (text, key) in [
        ("colour = 1", "colour"),
        ("[cluster]\nglobal_server = 2", "global_server"),
        (
            "[[cluster.data_centers]]\nname = \"a\"\nworkers = 1\nwokers = 2",
            "wokers",
        ),
        (
            "[train.optimizer]\nkind = \"sgd\"\nmomentun = 0.5",
            "momentun",
        ),
        (
            "[train.optimizer]\nkind = \"adam\"\nmomentum = 0.5",
            "momentum",
        ),
        ("[sync]\nalgorithm = \"bsp\"", "bsp"),
        ("[compression]\ninter = { codec = \"lz4\" }", "lz4"),
        (
            "[compression]\ninter = { codec = \"bisparse\", densty = 0.1 }",
            "densty",
        ),
        ("[transport]\ninter = \"quic\"", "quic"),
        ("[data]\nsplit = \"by_label\"", "by_label"),
        ("[placement]\nbound = 5", "bound"),
    ] {
        let err = Config::from_toml_str(text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{text}: {msg}");
        assert!(msg.contains(key), "{text}: {msg}");
    }
}

/// Every codec parses with its parameters; m > 0 is accepted with momentum-free SGD.
#[test]
fn codecs_parse_with_their_parameters() {
    use super::{Codec, Fp16Codec, ScalingKind, SelectionKind, SparseCodec, SparseValues};
    let cfg = Config::from_toml_str(
        "[train.optimizer]\nkind = \"sgd\"\nmomentum = 0.0\n\
         [compression]\nintra = { codec = \"fp16\", scaling = \"none\" }\n\
         [compression.inter]\ncodec = \"bisparse\"\ndensity = 0.001\nselection = \"exact\"\n\
         momentum = 0.9\nwarmup_rounds = 7\nclip = 2.5\nresync_every = 100\nvalues = \"fp16\"\n\
         min_size = 1000",
    )
    .unwrap();
    assert_eq!(
        cfg.compression.intra,
        Codec::Fp16(Fp16Codec {
            scaling: ScalingKind::None
        })
    );
    let expect = SparseCodec {
        density: 0.001,
        min_size: 1000,
        selection: SelectionKind::Exact,
        momentum: 0.9,
        warmup_rounds: Some(7),
        clip: Some(2.5),
        resync_every: 100,
        values: SparseValues::Fp16,
        ..SparseCodec::default()
    };
    assert_eq!(cfg.compression.inter, Codec::Bisparse(expect));
    let bf = Config::from_toml_str(
        "[compression]\nintra = { codec = \"bf16\" }\ninter = { codec = \"mpq\" }",
    )
    .unwrap();
    assert_eq!(bf.compression.intra, Codec::Bf16);
    assert_eq!(bf.compression.inter, Codec::Mpq(SparseCodec::default()));
}

#[test]
fn every_bad_value_names_its_field() {
    let dcs = |a: &str, b: &str| {
        format!("[[cluster.data_centers]]\n{a}\n[[cluster.data_centers]]\n{b}\n")
    };
    let cases: Vec<(String, &str)> = vec![
        ("[cluster]\nglobal_servers = 0".into(), "cluster.global_servers"),
        // Beyond what a membership table holds (it overflowed, or took 32 GiB, before).
        ("[cluster]\nglobal_servers = 65537".into(), "cluster.global_servers"),
        ("[cluster]\ndata_centers = 2\nworkers_per_dc = 70000".into(), "cluster.data_centers[0].workers"),
        ("[cluster]\ndata_centers = 3\nworkers_per_dc = 30000".into(), "cluster.data_centers"),
        ("[cluster]\ncentral_dc = \"\"".into(), "cluster.central_dc"),
        ("[cluster]\nhost = \" \"".into(), "cluster.host"),
        ("[cluster]\ncoordinator = \"nohost\"".into(), "cluster.coordinator"),
        (
            "[cluster]\nglobal_servers = 2\nglobal_server_addrs = [\"a:1\"]".into(),
            "cluster.global_server_addrs",
        ),
        ("[cluster]\nglobal_server_addrs = [\"a:x\"]".into(), "cluster.global_server_addrs[0]"),
        ("[cluster]\ndata_centers = []".into(), "cluster.data_centers"),
        (dcs("name = \"a\"\nworkers = 1", "name = \"b\"\nworkers = 0"), "cluster.data_centers[1].workers"),
        (dcs("name = \"a\"\nworkers = 1", "name = \"a\"\nworkers = 1"), "cluster.data_centers[1].name"),
        (dcs("name = \"a b\"\nworkers = 1", "name = \"c\"\nworkers = 1"), "cluster.data_centers[0].name"),
        (
            dcs("name = \"a\"\nworkers = 1\nlocal_server = \"x\"", "name = \"b\"\nworkers = 1"),
            "cluster.data_centers[0].local_server",
        ),
        (
            dcs("name = \"a\"\nworkers = 2\nworker_addrs = [\"h:1\"]", "name = \"b\"\nworkers = 1"),
            "cluster.data_centers[0].worker_addrs",
        ),
        (
            dcs("name = \"a\"\nworkers = 1", "name = \"b\"\nworkers = 2\nworker_addrs = [\"h:1\", \"h\"]"),
            "cluster.data_centers[1].worker_addrs[1]",
        ),
        ("[model]\nhidden = [64, 0]".into(), "model.hidden[1]"),
        ("[data]\nbatch_size = 0".into(), "data.batch_size"),
        ("[data]\nbatch_size = 400".into(), "data.batch_size"),
        ("[data]\ndataset = \"idx\"".into(), "data.idx.train_images"),
        (
            "[data]\ndataset = \"idx\"\n[data.idx]\ntrain_images = \"a\"\ntrain_labels = \"b\"\ntest_images = \"c\"\ntest_labels = \"d\"\nclasses = 1".into(),
            "data.idx.classes",
        ),
        ("[data.synthetic]\nfeatures = 0".into(), "data.synthetic.features"),
        ("[data.synthetic]\nclasses = 1".into(), "data.synthetic.classes"),
        ("[data.synthetic]\ntrain_samples = 0".into(), "data.synthetic.train_samples"),
        ("[data.synthetic]\ntest_samples = 0".into(), "data.synthetic.test_samples"),
        ("[data.synthetic]\nclasses = 4294967296".into(), "data.synthetic.classes"),
        ("[data.synthetic]\ntrain_samples = 4294967296".into(), "data.synthetic.train_samples"),
        ("[data.synthetic]\ntest_samples = 4294967296".into(), "data.synthetic.test_samples"),
        ("[train]\nrounds = 0".into(), "train.rounds"),
        ("[train]\nepochs = 0".into(), "train.epochs"),
        ("[train]\nrounds = 5\nepochs = 2".into(), "train.epochs"),
        ("[train.optimizer]\nkind = \"sgd\"\nlr = 0.0".into(), "train.optimizer.lr"),
        ("[train.optimizer]\nkind = \"sgd\"\nlr = nan".into(), "train.optimizer.lr"),
        ("[train.optimizer]\nkind = \"sgd\"\nmomentum = 1.0".into(), "train.optimizer.momentum"),
        ("[train.optimizer]\nkind = \"sgd\"\nmomentum = 0.0\nnesterov = true".into(), "train.optimizer.nesterov"),
        ("[train.optimizer]\nkind = \"sgd\"\nweight_decay = -1.0".into(), "train.optimizer.weight_decay"),
        ("[train.optimizer]\nkind = \"adam\"\nlr = inf".into(), "train.optimizer.lr"),
        ("[train.optimizer]\nkind = \"adam\"\nbeta1 = 1.5".into(), "train.optimizer.beta1"),
        ("[train.optimizer]\nkind = \"adam\"\nbeta2 = -0.1".into(), "train.optimizer.beta2"),
        ("[train.optimizer]\nkind = \"adam\"\nepsilon = 0.0".into(), "train.optimizer.epsilon"),
        ("[train.optimizer]\nkind = \"adam\"\nweight_decay = inf".into(), "train.optimizer.weight_decay"),
        ("[timeouts]\nconnect_ms = 0".into(), "timeouts.connect_ms"),
        ("[timeouts]\nrequest_ms = 0".into(), "timeouts.request_ms"),
        ("[timeouts]\nregistration_ms = 0".into(), "timeouts.registration_ms"),
        ("[timeouts]\npeer_dead_ms = 0".into(), "timeouts.peer_dead_ms"),
        ("[timeouts]\nheartbeat_ms = 0".into(), "timeouts.heartbeat_ms"),
        ("[timeouts]\nheartbeat_ms = 10000".into(), "timeouts.heartbeat_ms"),
        ("[placement]\nmin_range = 0".into(), "placement.min_range"),
        ("[placement]\nsplit_bound = 100".into(), "placement.split_bound"),
        ("[placement]\nsplit_bound = 5000000000".into(), "placement.split_bound"),
        // SCAFFOLD: SGD's step scales its variates, plain averaging gives the global one, and an
        // isolated run has no global averaging to correct towards.
        (
            "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\ncorrection = \"scaffold\"\n\
             [train.optimizer]\nkind = \"adam\"".into(),
            "sync.hfa.correction",
        ),
        (
            "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\ncorrection = \"scaffold\"\nouter = \"nesterov\"".into(),
            "sync.hfa.correction",
        ),
        (
            "[train]\nrounds = 10\n[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\n\
             correction = \"scaffold\"\nisolated = true".into(),
            "sync.hfa.correction",
        ),
        // Worker-side Bi-Sparse: FSA or MixedSync without P3, nothing to resynchronise, DGC's
        // momentum correction on one tier only, the sparse settings' own checks.
        (
            "[sync]\nalgorithm = \"hfa\"\n[compression]\nintra = { codec = \"bisparse\" }".into(),
            "compression.intra.codec",
        ),
        (
            "[sync]\nalgorithm = \"esync\"\n[compression]\nintra = { codec = \"bisparse\" }".into(),
            "compression.intra.codec",
        ),
        (
            "[scheduling.p3]\nenabled = true\n[compression]\nintra = { codec = \"bisparse\" }".into(),
            "compression.intra.codec",
        ),
        (
            "[compression]\nintra = { codec = \"bisparse\", resync_every = 10 }".into(),
            "compression.intra.resync_every",
        ),
        (
            "[train.optimizer]\nkind = \"sgd\"\nmomentum = 0.0\n[compression]\n\
             intra = { codec = \"bisparse\", momentum = 0.9 }\n\
             inter = { codec = \"bisparse\", momentum = 0.9 }".into(),
            "compression.intra.momentum",
        ),
        (
            "[compression]\nintra = { codec = \"bisparse\", momentum = 0.9 }".into(),
            "compression.intra.momentum",
        ),
        (
            "[compression]\nintra = { codec = \"bisparse\", density = 0.0 }".into(),
            "compression.intra.density",
        ),
        ("[compression]\nintra = { codec = \"mpq\" }".into(), "compression.intra.codec"),
        // The Momentum rule: DGC momentum correction with the default SGD momentum 0.9.
        ("[compression.inter]\ncodec = \"bisparse\"\nmomentum = 0.9".into(), "compression.inter.momentum"),
        (
            "[train.optimizer]\nkind = \"adam\"\n[compression.inter]\ncodec = \"bisparse\"\nmomentum = 0.5".into(),
            "compression.inter.momentum",
        ),
        ("[compression.inter]\ncodec = \"bisparse\"\nmomentum = 1.0".into(), "compression.inter.momentum"),
        ("[compression.inter]\ncodec = \"bisparse\"\ndensity = 0.0".into(), "compression.inter.density"),
        ("[compression.inter]\ncodec = \"mpq\"\ndensity = 1.5".into(), "compression.inter.density"),
        ("[compression.inter]\ncodec = \"bisparse\"\nwarmup_density = 2.0".into(), "compression.inter.warmup_density"),
        ("[compression.inter]\ncodec = \"bisparse\"\nwarmup_epochs = -1.0".into(), "compression.inter.warmup_epochs"),
        ("[compression.inter]\ncodec = \"bisparse\"\nmin_size = 0".into(), "compression.inter.min_size"),
        ("[compression.inter]\ncodec = \"bisparse\"\nclip = 0.0".into(), "compression.inter.clip"),
        ("[compression.inter]\ncodec = \"mpq\"\nvalues = \"fp16\"".into(), "compression.inter.values"),
    ];
    for (text, field) in &cases {
        match Config::from_toml_str(text) {
            Err(ConfigError::Invalid { field: f, message }) => {
                assert_eq!(&f, field, "{text}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{text}: expected an error naming {field}, got {other:?}"),
        }
    }
    // A type error is a parse error that names the key.
    let err = Config::from_toml_str("[cluster]\nglobal_servers = \"two\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("global_servers"), "{err}");
}

#[test]
fn partial_tables_keep_other_defaults_and_rounds_or_epochs_resolve() {
    let c = Config::from_toml_str("[train.optimizer]\nkind = \"sgd\"\nlr = 0.05").unwrap();
    assert_eq!(
        c.train.optimizer,
        OptimizerConfig::Sgd(SgdConfig {
            lr: 0.05,
            ..SgdConfig::default()
        })
    );
    assert_eq!(c.train.rounds, Some(DEFAULT_ROUNDS));
    let e = Config::from_toml_str("[train]\nepochs = 3").unwrap();
    assert_eq!((e.train.rounds, e.train.epochs), (None, Some(3)));
    assert_eq!(e.train.total_rounds(11), 33);
    assert_eq!(e.train.eval_every, 50);
    let a = Config::from_toml_str("[train.optimizer]\nkind = \"adam\"").unwrap();
    assert_eq!(
        a.train.optimizer,
        OptimizerConfig::Adam(AdamConfig::default())
    );
}

#[test]
fn config_hash_is_stable_and_covers_what_results_and_placement_depend_on() {
    let a = Config::default();
    let h = a.config_hash();
    assert_eq!(h, Config::from_toml_str(VANILLA).unwrap().config_hash());
    assert_eq!(h, a.clone().config_hash());
    let mut host = a.clone();
    host.cluster.host = "10.1.1.1".into();
    host.timeouts.request_ms = 5;
    host.transport.driver = Driver::Portable;
    host.log.level = LogLevel::Debug;
    assert_eq!(host.config_hash(), h);
    let mut seed = a.clone();
    seed.model.seed = 43;
    assert_ne!(seed.config_hash(), h);
    let mut lr = a.clone();
    lr.train.optimizer = OptimizerConfig::Sgd(SgdConfig {
        lr: 0.1000001,
        ..SgdConfig::default()
    });
    assert_ne!(lr.config_hash(), h);
    let mut split = a.clone();
    split.placement.min_range = 4_095;
    assert_ne!(split.config_hash(), h);
    // Two processes that disagree on a DC's workers would shard the data differently.
    let mut shape = a.clone();
    shape.cluster.data_centers[0].workers += 1;
    assert_ne!(shape.config_hash(), h);
    let mut servers = a.clone();
    servers.cluster.global_servers += 1;
    assert_ne!(servers.config_hash(), h);
    let mut dgt = a.clone();
    dgt.transport.dgt.channels = 2;
    assert_ne!(dgt.config_hash(), h);
    let mut sec = a.clone();
    sec.security.mode = crate::config::SecurityMode::Off;
    assert_eq!(
        sec.config_hash(),
        h,
        "security settings may differ per process"
    );
}

/// The default run learns: the same model trained in-process on the mean gradient of the 4
/// worker shards (exactly what FSA computes) reaches >= 0.93 test accuracy.
#[test]
fn default_run_reaches_093_test_accuracy_in_process() {
    let cfg = Config::default();
    let data = data::load(&cfg.data).unwrap();
    let run = fsa_reference(&cfg, &data, None).unwrap();
    assert_eq!(run.rounds, DEFAULT_ROUNDS);
    let last = run.final_eval().unwrap();
    assert!(last.accuracy >= 0.93, "{:?}", run.evals);
    assert_eq!(last.samples, data::digits::TEST_SAMPLES);
    let early: f32 = run.train_loss[..10].iter().sum::<f32>() / 10.0;
    let late: f32 = run.train_loss[run.train_loss.len() - 10..]
        .iter()
        .sum::<f32>()
        / 10.0;
    assert!(late < 0.25 * early, "loss {early} -> {late}");
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The environment sets of GeoMX's `run_vanilla_hips.sh` (central party + parties A and B).
#[test]
fn dmlc_env_of_the_original_vanilla_script() {
    let global = [
        ("DMLC_PS_GLOBAL_ROOT_URI", "127.0.0.1"),
        ("DMLC_PS_GLOBAL_ROOT_PORT", "9092"),
        ("DMLC_NUM_GLOBAL_SERVER", "1"),
        ("DMLC_NUM_GLOBAL_WORKER", "2"),
        ("PS_VERBOSE", "1"),
        ("DMLC_INTERFACE", "eth0"),
    ];
    let party = |port: &'static str, workers: &'static str| {
        vec![
            ("DMLC_PS_ROOT_URI", "127.0.0.1"),
            ("DMLC_PS_ROOT_PORT", port),
            ("DMLC_NUM_SERVER", "1"),
            ("DMLC_NUM_WORKER", workers),
        ]
    };

    // Global scheduler: geomx needs W as well (it registers every worker).
    let mut sched = global.to_vec();
    sched.push(("DMLC_ROLE_GLOBAL", "global_scheduler"));
    let err = Config::from_dmlc_env(&env(&sched)).unwrap_err().to_string();
    assert!(err.starts_with("DMLC_NUM_ALL_WORKER"), "{err}");
    sched.push(("DMLC_NUM_ALL_WORKER", "4"));
    let (c, r) = Config::from_dmlc_env(&env(&sched)).unwrap();
    assert_eq!(r.role, Role::Coordinator);
    assert_eq!(c.cluster.coordinator.as_deref(), Some("127.0.0.1:9092"));
    assert_eq!(
        c.cluster
            .data_centers
            .iter()
            .map(|d| d.workers)
            .collect::<Vec<_>>(),
        vec![2, 2]
    );
    assert_eq!(c.log.level, LogLevel::Debug);
    assert_eq!(r.interface.as_deref(), Some("eth0"));

    // Global server (central party).
    let mut gs = global.to_vec();
    gs.extend(party("9093", "1"));
    gs.extend([
        ("DMLC_ROLE_GLOBAL", "global_server"),
        ("DMLC_ROLE", "server"),
        ("DMLC_ENABLE_CENTRAL_WORKER", "0"),
        ("DMLC_NUM_ALL_WORKER", "4"),
    ]);
    let (c, r) = Config::from_dmlc_env(&env(&gs)).unwrap();
    assert_eq!(r.role, Role::GlobalServer);
    assert_eq!(
        (c.cluster.global_servers, c.cluster.total_workers()),
        (1, 4)
    );
    assert_eq!(c.cluster.central_dc, "central");
    assert_eq!(r.dc_coordinator.as_deref(), Some("127.0.0.1:9093"));

    // Master worker.
    let mut mw = party("9093", "1");
    mw.extend([
        ("DMLC_ROLE", "worker"),
        ("DMLC_ROLE_MASTER_WORKER", "1"),
        ("DMLC_NUM_ALL_WORKER", "4"),
    ]);
    assert_eq!(
        Config::from_dmlc_env(&env(&mw)).unwrap().1.role,
        Role::MasterWorker
    );

    // Party scheduler → DC coordinator.
    let mut ps = party("9094", "2");
    ps.push(("DMLC_ROLE", "scheduler"));
    let (c, r) = Config::from_dmlc_env(&env(&ps)).unwrap();
    assert_eq!(r.role, Role::DcCoordinator);
    assert_eq!(c.cluster.data_centers[0].workers, 2);
    assert_eq!(r.dc_coordinator.as_deref(), Some("127.0.0.1:9094"));

    // Local server of party A.
    let mut ls = global.to_vec();
    ls.extend(party("9094", "2"));
    ls.push(("DMLC_ROLE", "server"));
    let (c, r) = Config::from_dmlc_env(&env(&ls)).unwrap();
    assert_eq!(r.role, Role::LocalServer);
    assert_eq!(
        (c.cluster.data_centers.len(), c.cluster.total_workers()),
        (2, 4)
    );
    assert_eq!((r.dc, r.rank), (None, None));

    // Worker of party B, with our optional DC/rank and advertised address.
    let mut wk = party("9095", "2");
    wk.extend([
        ("DMLC_ROLE", "worker"),
        ("DMLC_NUM_ALL_WORKER", "4"),
        ("GEOMX_DC", "1"),
        ("GEOMX_RANK", "0"),
        ("DMLC_NODE_HOST", "10.0.0.7"),
        ("PORT", "9300"),
    ]);
    let (c, r) = Config::from_dmlc_env(&env(&wk)).unwrap();
    assert_eq!(r.role, Role::Worker);
    assert_eq!((r.dc, r.rank, r.port), (Some(1), Some(0), Some(9300)));
    assert_eq!(r.node_host.as_deref(), Some("10.0.0.7"));
    assert_eq!(c.cluster.host, "10.0.0.7");
    assert_eq!(c.cluster.total_workers(), 4);
    assert_eq!(c.cluster.data_centers.len(), 2);
    // Every process that registers agrees on the hash (the master worker and the party
    // scheduler only exit: geomx merged them into the coordinator, and they see part of the
    // cluster).
    let hashes: Vec<u64> = [&sched, &gs, &ls, &wk]
        .iter()
        .map(|e| Config::from_dmlc_env(&env(e)).unwrap().0.config_hash())
        .collect();

    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
}

#[test]
fn dmlc_env_mappings_and_errors() {
    // MultiGPS, central worker enabled, big-array bound, verbose 2.
    let (c, r) = Config::from_dmlc_env(&env(&[
        ("DMLC_ROLE_GLOBAL", "global_server"),
        ("DMLC_NUM_SERVER", "3"),
        ("DMLC_NUM_GLOBAL_WORKER", "3"),
        ("DMLC_NUM_ALL_WORKER", "6"),
        ("DMLC_ENABLE_CENTRAL_WORKER", "1"),
        ("MXNET_KVSTORE_BIGARRAY_BOUND", "2048"),
        ("PS_VERBOSE", "2"),
        ("DMLC_PS_GLOBAL_ROOT_URI", "::1"),
        ("DMLC_PS_GLOBAL_ROOT_PORT", "9000"),
    ]))
    .unwrap();
    assert_eq!(r.role, Role::GlobalServer);
    assert_eq!(c.cluster.global_servers, 3);
    assert_eq!(c.cluster.central_dc, "dc0");
    assert_eq!(c.cluster.total_workers(), 6);
    assert_eq!(
        (c.placement.split_bound, c.placement.min_range),
        (2048, 2048)
    );
    assert_eq!(c.log.level, LogLevel::Trace);
    assert_eq!(c.cluster.coordinator.as_deref(), Some("[::1]:9000"));

    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "DMLC_ROLE"),
        (&[("DMLC_ROLE", "boss")], "DMLC_ROLE"),
        (&[("DMLC_ROLE_GLOBAL", "worker")], "DMLC_ROLE_GLOBAL"),
        (
            &[
                ("DMLC_ROLE_GLOBAL", "global_server"),
                ("DMLC_ROLE", "worker"),
            ],
            "DMLC_ROLE",
        ),
        (
            &[("DMLC_ROLE", "worker"), ("DMLC_ROLE_MASTER_WORKER", "yes")],
            "DMLC_ROLE_MASTER_WORKER",
        ),
        (
            &[("DMLC_ROLE", "worker"), ("DMLC_NUM_WORKER", "two")],
            "DMLC_NUM_WORKER",
        ),
        (
            &[("DMLC_ROLE", "worker"), ("DMLC_NUM_WORKER", "0")],
            "DMLC_NUM_WORKER",
        ),
        // Refused before a trillion data centers are listed.
        (
            &[
                ("DMLC_ROLE_GLOBAL", "global_server"),
                ("DMLC_NUM_GLOBAL_WORKER", "1000000000000"),
                ("DMLC_NUM_ALL_WORKER", "2"),
            ],
            "DMLC_NUM_GLOBAL_WORKER",
        ),
        (
            &[
                ("DMLC_ROLE", "worker"),
                ("DMLC_NUM_WORKER", "2"),
                ("DMLC_NUM_ALL_WORKER", "5"),
            ],
            "DMLC_NUM_ALL_WORKER",
        ),
        (
            &[
                ("DMLC_ROLE", "server"),
                ("DMLC_NUM_WORKER", "3"),
                ("DMLC_NUM_GLOBAL_WORKER", "2"),
                ("DMLC_NUM_ALL_WORKER", "4"),
            ],
            "DMLC_NUM_WORKER",
        ),
        (
            &[("DMLC_ROLE_GLOBAL", "global_scheduler")],
            "DMLC_NUM_GLOBAL_WORKER",
        ),
        (
            &[("DMLC_ROLE", "worker"), ("DMLC_PS_ROOT_URI", "h")],
            "DMLC_PS_ROOT_PORT",
        ),
        (
            &[
                ("DMLC_ROLE", "worker"),
                ("DMLC_PS_ROOT_URI", "h"),
                ("DMLC_PS_ROOT_PORT", "70000"),
            ],
            "DMLC_PS_ROOT_PORT",
        ),
        (&[("DMLC_ROLE", "worker"), ("GEOMX_DC", "1")], "GEOMX_DC"),
        (
            &[("DMLC_ROLE", "worker"), ("PS_VERBOSE", "-1")],
            "PS_VERBOSE",
        ),
    ];
    for (vars, var) in cases {
        match Config::from_dmlc_env(&env(vars)) {
            Err(ConfigError::Env { var: v, message }) => assert_eq!(&v, var, "{vars:?}: {message}"),
            other => panic!("{vars:?}: expected an error naming {var}, got {other:?}"),
        }
    }
}

#[test]
fn sync_algorithms_parse_with_their_parameters_and_defaults() {
    let c = Config::from_toml_str("[sync]\nalgorithm = \"mixed\"").unwrap();
    assert_eq!(c.sync.algorithm, SyncAlgorithm::Mixed);
    assert_eq!(c.sync.mixed, MixedConfig::default());
    let d = c.sync.mixed.dcasgd(0.1, 0.0);
    assert_eq!(d.lambda, geomx_kernels::optim::DcAsgdLambda::Constant(0.04));
    assert_eq!((d.lr, d.momentum, d.weight_decay), (0.1, 0.0, 0.0));

    let c = Config::from_toml_str(
        "[sync]\nalgorithm = \"mixed\"\n[sync.mixed]\nlambda_mode = \"adaptive\"\nlambda0 = 1.5\n\
         m = 0.9\neps = 1e-6",
    )
    .unwrap();
    assert_eq!(
        c.sync.mixed.dcasgd(0.05, 1e-4).lambda,
        geomx_kernels::optim::DcAsgdLambda::Adaptive {
            lambda0: 1.5,
            decay: 0.9,
            eps: 1e-6
        }
    );

    let c = Config::from_toml_str(
        "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 20\nk2 = 10\nweighting = \"equal\"\n\
         outer = \"nesterov\"\nouter_lr = 0.5\nouter_momentum = 0.8\nisolated = true",
    )
    .unwrap();
    assert_eq!(c.sync.algorithm, SyncAlgorithm::Hfa);
    assert_eq!(
        c.sync.hfa,
        HfaConfig {
            k1: 20,
            k2: 10,
            weighting: HfaWeighting::Equal,
            outer: OuterOptimizer::Nesterov,
            outer_lr: 0.5,
            outer_momentum: 0.8,
            isolated: true,
            correction: HfaCorrection::None,
        }
    );
    let c = Config::from_toml_str(
        "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 5\nk2 = 2\ncorrection = \"scaffold\"",
    )
    .unwrap();
    assert_eq!(c.sync.hfa.correction, HfaCorrection::Scaffold);
    let h = HfaConfig::default();
    assert_eq!(
        (h.k1, h.k2, h.weighting, h.outer, h.isolated),
        (1, 1, HfaWeighting::Data, OuterOptimizer::Average, false)
    );
    assert_eq!((h.outer_lr, h.outer_momentum), (0.7, 0.9));

    let c = Config::from_toml_str(
        "[[cluster.data_centers]]\nname = \"a\"\nworkers = 1\nslowdown = 3.0\n\
         [[cluster.data_centers]]\nname = \"b\"\nworkers = 1",
    )
    .unwrap();
    let s: Vec<f64> = c.cluster.data_centers.iter().map(|d| d.slowdown).collect();
    assert_eq!(s, [3.0, 1.0]);
}

#[test]
fn esync_parses_with_its_parameters_and_defaults() {
    let c = Config::from_toml_str("[sync]\nalgorithm = \"esync\"").unwrap();
    assert_eq!(c.sync.algorithm, SyncAlgorithm::Esync);
    assert_eq!(c.sync.algorithm.name(), "esync");
    let e = c.sync.esync;
    assert_eq!(
        (e.eps, e.gamma, e.normalisation),
        (0.5, 1.0, EsyncNormalisation::None)
    );
    let c = Config::from_toml_str(
        "[sync]\nalgorithm = \"esync\"\n[sync.esync]\neps = 0.01\ngamma = 0.5\n\
         normalisation = \"fednova\"",
    )
    .unwrap();
    assert_eq!(
        c.sync.esync,
        EsyncConfig {
            eps: 0.01,
            gamma: 0.5,
            normalisation: EsyncNormalisation::Fednova,
        }
    );
    let esync = "[sync]\nalgorithm = \"esync\"\n";
    for (text, field) in [
        (format!("{esync}[sync.esync]\neps = -0.1"), "sync.esync.eps"),
        (
            format!("{esync}[sync.esync]\ngamma = 0.0"),
            "sync.esync.gamma",
        ),
        (
            format!("{esync}[compression.inter]\ncodec = \"bisparse\""),
            "compression.inter.codec",
        ),
    ] {
        match Config::from_toml_str(&text) {
            Err(ConfigError::Invalid { field: f, message }) => {
                assert_eq!(f, field, "{text}: {message}");
            }
            other => panic!("{text}: expected an error naming {field}, got {other:?}"),
        }
    }
    let err = Config::from_toml_str("[sync.esync]\nfednova = true").unwrap_err();
    assert!(err.to_string().contains("fednova"), "{err}");
    let c = Config::from_toml_str(include_str!("../../../examples/esync.toml")).unwrap();
    assert_eq!(c.sync.algorithm, SyncAlgorithm::Esync);
    assert_eq!(c.cluster.data_centers[1].slowdown, 3.0);
}

#[test]
fn bad_sync_values_name_their_field() {
    let mixed = "[sync]\nalgorithm = \"mixed\"\n";
    let hfa = "[sync]\nalgorithm = \"hfa\"\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{mixed}[compression.inter]\ncodec = \"bisparse\""),
            "compression.inter.codec",
        ),
        (
            format!("{mixed}[compression.inter]\ncodec = \"mpq\""),
            "compression.inter.codec",
        ),
        (
            format!("{mixed}[train.optimizer]\nkind = \"adam\""),
            "sync.mixed.optimizer",
        ),
        (
            format!("{mixed}[sync.mixed]\nlambda = -0.1"),
            "sync.mixed.lambda",
        ),
        (
            format!("{mixed}[sync.mixed]\nlambda_mode = \"adaptive\"\nlambda0 = -1.0"),
            "sync.mixed.lambda0",
        ),
        (
            format!("{mixed}[sync.mixed]\nlambda_mode = \"adaptive\"\nm = 1.0"),
            "sync.mixed.m",
        ),
        (
            format!("{mixed}[sync.mixed]\nlambda_mode = \"adaptive\"\neps = 0.0"),
            "sync.mixed.eps",
        ),
        (
            format!("{mixed}[sync.mixed]\nmomentum = 1.5"),
            "sync.mixed.momentum",
        ),
        (format!("{hfa}[sync.hfa]\nk1 = 0"), "sync.hfa.k1"),
        (
            format!("{hfa}[compression.inter]\ncodec = \"bisparse\"\nmomentum = 0.5"),
            "compression.inter.momentum",
        ),
        (format!("{hfa}[sync.hfa]\nk2 = 0"), "sync.hfa.k2"),
        (
            format!("{hfa}[sync.hfa]\nouter = \"nesterov\"\nouter_lr = 0.0"),
            "sync.hfa.outer_lr",
        ),
        (
            format!("{hfa}[sync.hfa]\nouter = \"nesterov\"\nouter_momentum = 1.0"),
            "sync.hfa.outer_momentum",
        ),
        (
            "[[cluster.data_centers]]\nname = \"a\"\nworkers = 1\nslowdown = 0.5".into(),
            "cluster.data_centers[0].slowdown",
        ),
    ];
    for (text, field) in &cases {
        match Config::from_toml_str(text) {
            Err(ConfigError::Invalid { field: f, message }) => {
                assert_eq!(&f, field, "{text}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{text}: expected an error naming {field}, got {other:?}"),
        }
    }
    // Plain optimizer: DC-ASGD parameters are not consulted, so Adam is fine.
    Config::from_toml_str(&format!(
        "{mixed}[train.optimizer]\nkind = \"adam\"\n[sync.mixed]\noptimizer = \"plain\"\nlambda = -1.0"
    ))
    .unwrap();
    // HFA + Bi-Sparse: momentum correction is refused even with momentum-free SGD, and the
    // sparse codecs themselves are accepted (model deltas with error feedback).
    let sgd = "[train.optimizer]\nkind = \"sgd\"\nmomentum = 0.0\n";
    match Config::from_toml_str(&format!(
        "{hfa}{sgd}[compression.inter]\ncodec = \"bisparse\"\nmomentum = 0.5"
    )) {
        Err(ConfigError::Invalid { field, message }) => {
            assert_eq!(field, "compression.inter.momentum");
            assert!(message.contains("model deltas"), "{message}");
        }
        other => panic!("expected the HFA momentum error, got {other:?}"),
    }
    for codec in ["bisparse", "mpq"] {
        Config::from_toml_str(&format!("{hfa}[compression.inter]\ncodec = \"{codec}\"")).unwrap();
    }
    let err = Config::from_toml_str("[sync.hfa]\nk3 = 1").unwrap_err();
    assert!(err.to_string().contains("k3"), "{err}");
}

#[test]
fn sync_examples_parse() {
    let c = Config::from_toml_str(include_str!("../../../examples/mixed-sync.toml")).unwrap();
    assert_eq!(c.sync.algorithm, SyncAlgorithm::Mixed);
    assert_eq!(c.sync.mixed.optimizer, MixedOptimizer::Dcasgd);
    assert_eq!(c.sync.mixed.momentum, 0.9);
    assert_eq!(c.cluster.data_centers[1].slowdown, 3.0);
    let c = Config::from_toml_str(include_str!("../../../examples/hfa.toml")).unwrap();
    assert_eq!(c.sync.algorithm, SyncAlgorithm::Hfa);
    assert_eq!((c.sync.hfa.k1, c.sync.hfa.k2), (20, 10));
}

#[test]
fn worker_bisparse_example_parses() {
    let c = Config::from_toml_str(include_str!("../../../examples/worker-bisparse.toml")).unwrap();
    let (Codec::Bisparse(intra), Codec::Bisparse(inter)) =
        (&c.compression.intra, &c.compression.inter)
    else {
        panic!("{:?}", c.compression);
    };
    assert_eq!((intra.density, intra.min_size), (0.01, 1000));
    assert_eq!((inter.density, inter.min_size), (0.01, 1000));
}

#[test]
fn nonfinite_policy_and_injected_faults_parse_and_validate() {
    let cfg = Config::default();
    assert_eq!(cfg.train.nonfinite, NonFinitePolicy::Abort);
    assert!(cfg.train.inject_nan.is_empty());
    let cfg = Config::from_toml_str(
        "[train]\nnonfinite = \"skip\"\n[[train.inject_nan]]\ndc = 1\nrank = 1\nround = 3\nkey = 2\n",
    )
    .unwrap();
    assert_eq!(cfg.train.nonfinite, NonFinitePolicy::Skip);
    assert_eq!(
        cfg.train.inject_nan,
        vec![InjectNan {
            dc: 1,
            rank: 1,
            round: 3,
            key: 2
        }]
    );
    // Round trip through TOML keeps both.
    let back = Config::from_toml_str(&cfg.to_toml_string().unwrap()).unwrap();
    assert_eq!(back, cfg);
    for (toml, needle) in [
        ("[train]\nnonfinite = \"ignore\"\n", "nonfinite"),
        (
            "[[train.inject_nan]]\ndc = 0\nrank = 2\nround = 0\nkey = 0\n",
            "train.inject_nan[0]",
        ),
        (
            "[[train.inject_nan]]\ndc = 5\nrank = 0\nround = 0\nkey = 0\n",
            "train.inject_nan[0]",
        ),
    ] {
        let e = Config::from_toml_str(toml).unwrap_err().to_string();
        assert!(e.contains(needle), "{toml}: {e}");
    }
}

#[test]
fn checkpoint_section_parses_and_bad_values_name_their_field() {
    let c = Config::from_toml_str(
        "[checkpoint]\ndir = \"ck\"\nevery_rounds = 5\nkeep = 3\nexport = \"m.safetensors\"",
    )
    .unwrap();
    assert_eq!(
        c.checkpoint.dir.as_deref(),
        Some(std::path::Path::new("ck"))
    );
    assert_eq!((c.checkpoint.every_rounds, c.checkpoint.keep), (5, 3));
    assert_eq!(
        c.checkpoint.export.as_deref(),
        Some(std::path::Path::new("m.safetensors"))
    );
    // Checkpoint settings are local to each process: they leave the configuration hash alone.
    assert_eq!(c.config_hash(), Config::default().config_hash());
    let err = |text: &str| match Config::from_toml_str(text) {
        Err(ConfigError::Invalid { field, message }) => (field, message),
        other => panic!("{text}: expected a refusal, got {other:?}"),
    };
    assert_eq!(
        err("[checkpoint]\nevery_rounds = 0").0,
        "checkpoint.every_rounds"
    );
    assert_eq!(err("[checkpoint]\nkeep = 0").0, "checkpoint.keep");
    assert_eq!(err("[checkpoint]\ndir = \"\"").0, "checkpoint.dir");
    assert_eq!(err("[checkpoint]\nexport = \"\"").0, "checkpoint.export");
    // State the roles do not save yet is refused, naming what to change.
    let (field, message) = err("[checkpoint]\ndir = \"ck\"\n[sync]\nalgorithm = \"mixed\"");
    assert_eq!(field, "checkpoint.dir");
    assert!(message.contains("sync.algorithm"), "{message}");
    // HFA saves at global averagings: every_rounds must be a multiple of k1 * k2.
    let hfa = "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 2\nk2 = 3\n[train]\nrounds = 12\n";
    let (field, message) = err(&format!(
        "{hfa}[checkpoint]\ndir = \"ck\"\nevery_rounds = 4"
    ));
    assert_eq!(field, "checkpoint.every_rounds");
    assert!(message.contains("k1 * k2 = 6"), "{message}");
    Config::from_toml_str(&format!(
        "{hfa}[checkpoint]\ndir = \"ck\"\nevery_rounds = 6"
    ))
    .unwrap();
    // Isolated data centers never reach a global averaging to save at.
    let (field, message) = err(&format!(
        "{}isolated = true\n[checkpoint]\ndir = \"ck\"\nevery_rounds = 6",
        hfa.replace("[train]\nrounds = 12\n", "")
    ));
    assert_eq!(field, "checkpoint.dir");
    assert!(message.contains("isolated"), "{message}");
    let (_, message) = err("[checkpoint]\ndir = \"ck\"\n[transport]\ninter = \"dgt\"");
    assert!(message.contains("transport.inter"), "{message}");
    Config::from_toml_str(
        "[checkpoint]\ndir = \"ck\"\n[compression]\ninter = { codec = \"fp16\" }",
    )
    .unwrap();
    assert!(matches!(
        Config::from_toml_str("[checkpoint]\nevery = 3"),
        Err(ConfigError::Parse { .. })
    ));
}

#[test]
fn the_p3_example_parses_and_p3_settings_are_checked() {
    let c = Config::from_toml_str(include_str!("../../../examples/p3.toml")).unwrap();
    assert!(c.scheduling.p3.enabled);
    assert_eq!(c.scheduling.p3.slice_elems, SliceElems::Auto);
    assert_eq!(c.model.layer_delay_ms.len(), c.model.hidden.len() + 1);
    let d = Config::default().scheduling.p3;
    assert!(!d.enabled);
    assert_eq!(
        (d.slice_elems, d.unsent_bytes, d.credit_bytes),
        (
            SliceElems::Elems(DEFAULT_SLICE_ELEMS),
            DEFAULT_UNSENT_BYTES,
            Credit::PATH
        )
    );
    // "auto" (tuned by `geomx launch`) parses and writes back as the word; anything else that
    // is not a number is refused naming the field.
    let auto = Config::from_toml_str("[scheduling.p3]\nslice_elems = \"auto\"\n").unwrap();
    assert_eq!(auto.scheduling.p3.slice_elems, SliceElems::Auto);
    assert_eq!(auto.scheduling.p3.slice_elems.elems(), None);
    let again = Config::from_toml_str(&auto.to_toml_string().unwrap()).unwrap();
    assert_eq!(again.scheduling.p3.slice_elems, SliceElems::Auto);
    for bad in ["\"many\"", "-5", "1.5"] {
        let e = Config::from_toml_str(&format!("[scheduling.p3]\nslice_elems = {bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("slice_elems"), "{bad}: {e}");
    }
    // The default sizes every P3 connection to its path, starting where the kernel's
    // autotuning would end (4 MiB).
    assert!(d.credit_bytes.pushes_by_path() && d.credit_bytes.replies_by_path());
    assert_eq!(d.credit_bytes.initial(), 4 << 20);
    assert_eq!(Credit::AUTO.initial(), DEFAULT_CREDIT_BYTES);
    let fixed = Config::from_toml_str("[scheduling.p3]\ncredit_bytes = 131072\n").unwrap();
    assert_eq!(fixed.scheduling.p3.credit_bytes, Credit::Bytes(131072));
    assert!(!fixed.scheduling.p3.credit_bytes.replies_by_path());
    let auto = Config::from_toml_str("[scheduling.p3]\ncredit_bytes = \"auto\"\n").unwrap();
    assert!(auto.scheduling.p3.credit_bytes.is_auto());
    // "auto" tunes the pushing connections; the replies are sized to their path.
    assert!(!auto.scheduling.p3.credit_bytes.pushes_by_path());
    assert!(auto.scheduling.p3.credit_bytes.replies_by_path());
    let path = Config::from_toml_str("[scheduling.p3]\ncredit_bytes = \"path\"\n").unwrap();
    assert_eq!(path.scheduling.p3.credit_bytes, Credit::PATH);
    let err = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
    let e = err("[transport]\ndriver = \"io-uring\"\n[scheduling.p3]\nenabled = true\n");
    assert!(
        e.contains("scheduling.p3.enabled") && e.contains("portable"),
        "{e}"
    );
    let e = err("[scheduling.p3]\ncredit_bytes = 100\n");
    assert!(e.contains("scheduling.p3.credit_bytes"), "{e}");
    let e = err("[scheduling.p3]\ncredit_bytes = \"lots\"\n");
    assert!(e.contains("credit_bytes"), "{e}");
    let e = err("[scheduling.p3]\nunknown = 1\n");
    assert!(e.contains("unknown"), "{e}");
    // P3 changes the keys: it is part of what every process must agree on.
    let on = Config::from_toml_str("[scheduling.p3]\nenabled = true\n").unwrap();
    assert_ne!(on.config_hash(), Config::default().config_hash());
}

#[test]
fn emulated_layer_compute_is_checked() {
    let err = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
    let e = err("[model]\nhidden = [8]\nlayer_delay_ms = [1.0]\n");
    assert!(
        e.contains("model.layer_delay_ms") && e.contains("2 layers"),
        "{e}"
    );
    let e = err("[model]\nhidden = [8]\nlayer_delay_ms = [1.0, -2.0]\n");
    assert!(
        e.contains("model.layer_delay_ms") && e.contains("-2"),
        "{e}"
    );
    let e = err("[model]\nkind = \"cnn\"\nlayer_delay_ms = [1.0]\n");
    assert!(e.contains("model.layer_delay_ms"), "{e}");
    let ok = Config::from_toml_str("[model]\nhidden = [8]\nlayer_delay_ms = [1.0, 0]\n").unwrap();
    assert_eq!(ok.model.layer_delay_ms, [1.0, 0.0]);
    // Absent, it leaves the configuration hash of existing jobs alone.
    assert!(!serde_json::to_string(&Config::default().model)
        .unwrap()
        .contains("layer_delay_ms"));
}

#[test]
fn the_resilience_example_validates_and_continues_after_losses() {
    let c = Config::from_toml_str(include_str!("../../../examples/resilience.toml")).unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.resilience.lost_worker,
        crate::config::LostWorker::Continue
    );
    assert_eq!(c.resilience.lost_dc, crate::config::LostWorker::Continue);
    assert_eq!(c.resilience.min_dcs, 2);
    assert_eq!(c.resilience.restart, crate::config::Restart::OnFailure);
}

#[test]
fn the_global_restart_example_validates() {
    let c = Config::from_toml_str(include_str!("../../../examples/global-restart.toml")).unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.resilience.lost_global_server,
        crate::config::LostWorker::Continue
    );
    assert!(c.checkpoint.dir.is_some());
}

#[test]
fn congestion_control_is_checked_by_form_then_by_the_kernel() {
    let e = Config::from_toml_str("[transport]\ncongestion_control = \"b b r\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("transport.congestion_control") && e.contains("b b r"),
        "{e}"
    );
    // Absent, it is left out of the written configuration.
    assert!(!serde_json::to_string(&Config::default().transport)
        .unwrap()
        .contains("congestion_control"));
    assert_eq!(
        Config::default().transport.congestion_checked().unwrap(),
        None
    );
    // Well formed, but this kernel has no such algorithm: refused when the job starts.
    let c = Config::from_toml_str("[transport]\ncongestion_control = \"no-such-cc\"\n").unwrap();
    let e = c.transport.congestion_checked().unwrap_err().to_string();
    assert!(
        e.contains("transport.congestion_control") && e.contains("no-such-cc"),
        "{e}"
    );
    #[cfg(target_os = "linux")]
    {
        // reno is built into every Linux kernel and allowed to every user.
        let c = Config::from_toml_str("[transport]\ncongestion_control = \"reno\"\n").unwrap();
        assert_eq!(
            c.transport
                .congestion_checked()
                .unwrap()
                .map(|a| a.to_string()),
            Some("reno".to_string())
        );
        // A process's own choice, like the driver: processes need not agree on it.
        assert_eq!(c.config_hash(), Config::default().config_hash());
    }
}
