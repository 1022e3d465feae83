//! The HiPS roles in one process (threads) over loopback, with a model whose gradients are known:
//! the FSA round's arithmetic through the real transport (hips.md oracles 1, 4 and 5), and a
//! coordinator that survives garbage bytes (oracle 7, second part).

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geomx_net::{KvClient, NetError, NetOptions, PayloadCodec};
use geomx_trainer::config::{Config, DataCenterConfig, DataConfig, SyncAlgorithm};
use geomx_trainer::data::{shard_indices, Batcher, Dataset, Samples, ShardStrategy, TrainTest};
use geomx_trainer::engine::optim::{AdamConfig, SgdConfig};
use geomx_trainer::engine::reference::fsa_reference;
use geomx_trainer::engine::{
    params_hash, EngineError, Evaluation, Model, OptimizerConfig, TensorSpec,
};
use geomx_trainer::hips::node::FatalHook;
use geomx_trainer::hips::slices::KeyMap;
use geomx_trainer::hips::worker::ProgressSink;
use geomx_trainer::hips::{
    coordinator, global_server, local_server, worker, ClusterPlan, JobSpec, RoleStats,
};

const SAMPLES: usize = 48;
const DATA_SEED: u64 = 5;

/// A model whose gradient depends only on the batch's single sample: g[key][i] = grad(x, key, i).
struct KnownGrads {
    specs: Vec<TensorSpec>,
    /// Gradients on a grid of 2^-2 and θ_0 on 2^-3, so that a few rounds of sums and halvings
    /// stay exact in f32.
    exact: bool,
}

/// The gradient [`KnownGrads`] produces.
fn grad_of(exact: bool, x: f32, key: usize, i: usize) -> f32 {
    if exact {
        (grad(x, key, i) * 4.0).round() / 4.0
    } else {
        grad(x, key, i)
    }
}

/// An "awkward" value (not a short binary fraction) so that summation order shows in the bits.
fn grad(x: f32, key: usize, i: usize) -> f32 {
    ((x + 1.0) * 0.123_456_7 * (i + 1 + 100 * key) as f32).sin() * 3.7
}

impl Model for KnownGrads {
    fn tensors(&self) -> &[TensorSpec] {
        &self.specs
    }

    fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        self.specs
            .iter()
            .enumerate()
            .map(|(k, s)| {
                (0..s.len())
                    .map(|i| {
                        let v = (seed as f32 + (i * 7 + k) as f32 * 0.377).cos();
                        if self.exact {
                            (v * 8.0).round() / 8.0
                        } else {
                            v
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn forward(&self, _params: &[Vec<f32>], features: &[f32]) -> Result<Vec<f32>, EngineError> {
        Ok(vec![0.0; features.len() * 2])
    }

    fn backward_layerwise(
        &self,
        _params: &[Vec<f32>],
        batch: Samples<'_>,
        on_grad: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<f32, EngineError> {
        let x = batch.features[0];
        for (key, s) in self.specs.iter().enumerate().rev() {
            on_grad(
                key,
                (0..s.len())
                    .map(|i| grad_of(self.exact, x, key, i))
                    .collect(),
            );
        }
        Ok(0.0)
    }

    fn evaluate(&self, _params: &[Vec<f32>], data: Samples<'_>) -> Result<Evaluation, EngineError> {
        Ok(Evaluation {
            loss: 0.0,
            accuracy: 0.0,
            samples: data.len(),
        })
    }
}

fn data() -> TrainTest {
    let features: Vec<f32> = (0..SAMPLES).map(|i| i as f32).collect();
    let labels: Vec<u32> = (0..SAMPLES as u32).map(|i| i % 2).collect();
    let train = Dataset::new(features, labels, 1, 2).unwrap();
    TrainTest {
        test: train.clone(),
        train,
    }
}

fn job(workers: Vec<usize>, servers: usize, rounds: u64) -> JobSpec {
    let model = KnownGrads {
        specs: vec![
            TensorSpec {
                name: "w".into(),
                shape: vec![37],
            },
            TensorSpec {
                name: "b".into(),
                shape: vec![5],
            },
        ],
        exact: false,
    };
    let lens = vec![37, 5];
    let mut net = NetOptions::default();
    net.conn.request_timeout = Duration::from_secs(20);
    JobSpec {
        // min_range 4 so that the 37-element key is split across servers.
        plan: ClusterPlan::new(workers, servers, 99, lens.clone(), 1_000_000, 4).unwrap(),
        keys: KeyMap::whole(&lens, &[0, 0]),
        p3: None,
        tsengine: None,
        ts_intra: None,
        model: Arc::new(model),
        optimizer: OptimizerConfig::Sgd(SgdConfig {
            lr: 1.0,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }),
        seed: 3,
        rounds,
        data_config: DataConfig {
            batch_size: 1,
            split: ShardStrategy::Iid,
            seed: DATA_SEED,
            ..DataConfig::default()
        },
        data: Arc::new(data()),
        eval_every: 0,
        net,
        registration_timeout: Duration::from_secs(20),
        config_hash: 77,
        intra: Default::default(),
        worker_sparse: None,
        inter: Default::default(),
        slowdown: Vec::new(),
        sync: SyncAlgorithm::Fsa,
        hfa: Default::default(),
        esync: Default::default(),
        mixed_optimizer: geomx_kernels::optim::OptimizerConfig::Sgd(Default::default()),
        mixed_lr_scale: Default::default(),
        nonfinite: Default::default(),
        checkpoint: None,
        resume: None,
        export: None,
        // Mutual TLS with an in-process CA, made on first use.
        security: Default::default(),
        lost_worker: Default::default(),
        lost_dc: Default::default(),
        lost_global_server: Default::default(),
        lost_coordinator: Default::default(),
        min_dcs: 1,
        keyring: Default::default(),
    }
}

/// Runs every role of `job` on its own thread; returns their stats (coordinator first).
fn run_cluster(job: &JobSpec, before_roles: impl FnOnce(&str)) -> Vec<RoleStats> {
    run_cluster_at(job, "127.0.0.1:0", before_roles, || {})
}

/// [`run_cluster`] with DC 0's local server bound at `local0`; `before_workers` runs once the
/// servers are started and before any worker is.
fn run_cluster_at(
    job: &JobSpec,
    local0: &str,
    before_roles: impl FnOnce(&str),
    before_workers: impl FnOnce(),
) -> Vec<RoleStats> {
    run_cluster_watched(job, local0, before_roles, before_workers, Arc::new(|_| {}))
}

/// [`run_cluster_at`] with worker (dc 0, rank 0)'s progress lines handed to `progress` (on that
/// worker's thread: it waits while `progress` runs).
fn run_cluster_watched(
    job: &JobSpec,
    local0: &str,
    before_roles: impl FnOnce(&str),
    before_workers: impl FnOnce(),
    progress: ProgressSink,
) -> Vec<RoleStats> {
    let o = run_roles(
        job,
        job,
        local0,
        before_roles,
        before_workers,
        progress,
        |_, _, c| c.to_string(),
    );
    let out = o
        .results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("role failed: {e}; fatal: {:?}", o.fatal)))
        .collect();
    assert!(o.fatal.is_empty(), "{:?}", o.fatal);
    out
}

/// What every role of a run returned, and the fatal messages raised.
struct Outcome {
    results: Vec<Result<RoleStats, String>>,
    fatal: Vec<String>,
}

/// Runs every role of `job` on its own thread (the global servers with `global_job`, worker
/// (d, r) reaching the coordinator at `worker_coord(d, r, coordinator address)`) and collects
/// what each returned: once one has failed, the rest get 3 s in all (in this harness a fatal
/// error only records its message; processes of a real job exit on it).
fn run_roles(
    job: &JobSpec,
    global_job: &JobSpec,
    local0: &str,
    before_roles: impl FnOnce(&str),
    before_workers: impl FnOnce(),
    progress: ProgressSink,
    worker_coord: impl Fn(u32, u32, &str) -> String,
) -> Outcome {
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let e2 = errors.clone();
    let fatal: FatalHook = Arc::new(move |m: &str| e2.lock().unwrap().push(m.to_string()));
    let (res_tx, res_rx) = std::sync::mpsc::channel();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    {
        let (j, tx) = (job.clone(), res_tx.clone());
        std::thread::spawn(move || {
            let r = coordinator::run(&j, "127.0.0.1:0", |a| addr_tx.send(a.to_string()).unwrap());
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
    }
    let coord = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    before_roles(&coord);
    let plan = &job.plan;
    let spawn = |f: Box<dyn FnOnce() -> Result<RoleStats, String> + Send>| {
        let tx = res_tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
    };
    for s in 0..plan.num_global_servers() as u32 {
        let (j, c, f) = (global_job.clone(), coord.clone(), fatal.clone());
        spawn(Box::new(move || {
            global_server::run(&j, s, &c, "127.0.0.1:0", f).map_err(|e| e.to_string())
        }));
    }
    for d in 0..plan.num_dcs() as u32 {
        let (j, c, f) = (job.clone(), coord.clone(), fatal.clone());
        let bind = if d == 0 { local0 } else { "127.0.0.1:0" }.to_string();
        spawn(Box::new(move || {
            local_server::run(&j, d, &c, &bind, f).map_err(|e| e.to_string())
        }));
    }
    before_workers();
    for (d, &n) in plan.workers_per_dc.iter().enumerate() {
        let d = d as u32;
        for r in 0..n as u32 {
            let c = worker_coord(d, r, &coord);
            let (j, f, p) = (job.clone(), fatal.clone(), progress.clone());
            spawn(Box::new(move || {
                worker::run(&j, d, r, &c, "127.0.0.1", f, p).map_err(|e| e.to_string())
            }));
        }
    }
    let total = 1 + plan.num_global_servers() + plan.num_dcs() + plan.total_workers();
    let mut results = Vec::new();
    let mut failed_at = None;
    for _ in 0..total {
        let wait = match failed_at {
            None => Duration::from_secs(120),
            Some(t) => Duration::from_secs(3).saturating_sub(std::time::Instant::elapsed(&t)),
        };
        match res_rx.recv_timeout(wait) {
            Ok(r) => {
                if r.is_err() && failed_at.is_none() {
                    failed_at = Some(std::time::Instant::now());
                }
                results.push(r);
            }
            Err(_) => {
                results.push(Err("cluster hung (or ended by a fatal error)".to_string()));
                break;
            }
        }
    }
    let fatal = errors.lock().unwrap().clone();
    Outcome { results, fatal }
}

/// The feature value of the sample each worker uses in each round, by (round, dc, rank).
fn samples(job: &JobSpec) -> Vec<Vec<Vec<f32>>> {
    let w = job.plan.total_workers();
    let train = &job.data.train;
    let shards = shard_indices(train.labels(), w, ShardStrategy::Iid, DATA_SEED).unwrap();
    let mut batchers: Vec<Batcher> = shards
        .into_iter()
        .enumerate()
        .map(|(i, s)| Batcher::new(s, 1, DATA_SEED, i as u64).unwrap())
        .collect();
    (0..job.rounds)
        .map(|_| {
            let mut i = 0;
            job.plan
                .workers_per_dc
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| {
                            let idx = batchers[i].next_indices()[0];
                            i += 1;
                            train.row(idx)[0]
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Reference FSA: per element, sum each DC's workers in rank order, the DCs in DC order, divide
/// by W, θ ← θ − 1·ḡ. `dc_major = false` sums in a different (wrong) order, to show the
/// comparison can tell.
fn reference(job: &JobSpec, dc_major: bool) -> Vec<Vec<f32>> {
    let mut theta = job.model.init(job.seed);
    let w = job.plan.total_workers() as f32;
    for round in samples(job) {
        for (key, t) in theta.iter_mut().enumerate() {
            for (i, v) in t.iter_mut().enumerate() {
                let g = if dc_major {
                    let mut total: Option<f32> = None;
                    for dc in &round {
                        let mut s: Option<f32> = None;
                        for &x in dc {
                            let gx = grad(x, key, i);
                            s = Some(s.map_or(gx, |a| a + gx));
                        }
                        let s = s.unwrap();
                        total = Some(total.map_or(s, |a| a + s));
                    }
                    total.unwrap()
                } else {
                    round
                        .iter()
                        .flatten()
                        .rev()
                        .map(|&x| grad(x, key, i))
                        .sum::<f32>()
                };
                *v -= g / w;
            }
        }
    }
    theta
}

fn worker_hashes(stats: &[RoleStats]) -> Vec<u64> {
    let h: Vec<u64> = stats
        .iter()
        .filter(|s| s.role == "worker")
        .map(|s| s.param_hash.unwrap())
        .collect();
    assert!(!h.is_empty());
    h
}

/// Oracle 1: 2 DCs × 2 workers, SGD lr 1: θ_1 = θ_0 − ((g11+g12)+(g21+g22))/4 bit-exactly.
#[test]
fn oracle1_two_by_two_bit_exact_through_the_network() {
    let j = job(vec![2, 2], 1, 1);
    let want = params_hash(&reference(&j, true));
    assert_ne!(
        want,
        params_hash(&reference(&j, false)),
        "test cannot see the order"
    );
    let stats = run_cluster(&j, |_| {});
    for h in worker_hashes(&stats) {
        assert_eq!(h, want);
    }
}

/// A local server makes a fresh job's θ_0 from the model's seed and checks it against the
/// global servers' digests: where they start from other values (here another seed), it pulls
/// theirs, and every replica still ends at the reference from the global servers' θ_0. (HFA:
/// the milestone starts at the local server's θ_0, so a wrong one would show at the end.)
#[test]
fn a_local_servers_seeded_theta0_that_differs_from_the_global_servers_is_pulled_instead() {
    let j = unit_hfa_job(vec![2, 2], 2);
    let mut g = j.clone();
    g.seed = j.seed + 1;
    let want = unit_hfa_reference(&g, g.model.init(g.seed));
    assert_ne!(
        want,
        unit_hfa_reference(&j, j.model.init(j.seed)),
        "one θ_0"
    );
    let o = run_roles(
        &j,
        &g,
        "127.0.0.1:0",
        |_| {},
        || {},
        Arc::new(|_| {}),
        |_, _, c| c.to_string(),
    );
    assert!(o.fatal.is_empty(), "{:?}", o.fatal);
    let stats: Vec<RoleStats> = o.results.into_iter().map(|r| r.unwrap()).collect();
    for h in worker_hashes(&stats) {
        assert_eq!(h, want);
    }
}

/// Oracle 1, uneven DCs: 3 workers + 1 worker still weigh 1/4 each.
#[test]
fn oracle1_three_plus_one_weights_every_worker_a_quarter() {
    let j = job(vec![3, 1], 1, 1);
    let want = params_hash(&reference(&j, true));
    let stats = run_cluster(&j, |_| {});
    for h in worker_hashes(&stats) {
        assert_eq!(h, want);
    }
}

/// Oracles 4 and 5: several rounds with keys split over 1, 2 and 3 global servers all match the
/// reference bit for bit, and every replica agrees.
#[test]
fn split_ranges_over_servers_match_reference_over_rounds() {
    for servers in 1..=3 {
        let j = job(vec![2, 1], servers, 6);
        assert!(j.plan.placement.key_ranges(0).len() > 1 || servers == 1);
        let want = params_hash(&reference(&j, true));
        let stats = run_cluster(&j, |_| {});
        for h in worker_hashes(&stats) {
            assert_eq!(h, want, "{servers} global servers");
        }
    }
}

/// Oracle 7, second part: garbage on the coordinator's port does not disturb the job.
#[test]
fn garbage_bytes_to_the_coordinator_do_not_change_the_result() {
    let j = job(vec![2, 2], 2, 3);
    let want = params_hash(&reference(&j, true));
    let stats = run_cluster(&j, |coord| {
        let mut s = TcpStream::connect(coord).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage that is no frame");
        let mut s2 = TcpStream::connect(coord).unwrap();
        let _ = s2.write_all(&[0x47, 0x4d, 0x58, 0x46, 9, 9, 9, 9]);
    });
    for h in worker_hashes(&stats) {
        assert_eq!(h, want);
    }
}

/// The real MLP on digits, distributed over 2 global servers with uneven DCs, ends bit-identical
/// to TRAINER's single-process FSA reference, for SGD with momentum and for Adam.
#[test]
fn mlp_run_matches_the_single_process_fsa_reference() {
    for adam in [false, true] {
        let mut cfg = Config::default();
        cfg.cluster.global_servers = 2;
        cfg.cluster.data_centers =
            vec![DataCenterConfig::new("a", 3), DataCenterConfig::new("b", 1)];
        cfg.placement.min_range = 64;
        cfg.train.rounds = Some(15);
        cfg.train.eval_every = 0;
        if adam {
            cfg.train.optimizer = OptimizerConfig::Adam(AdamConfig::default());
        }
        cfg.validate().unwrap();
        let j = JobSpec::from_config(&cfg).unwrap();
        assert!(
            j.plan.placement.ranges.len() > j.plan.key_lens.len(),
            "no key was split"
        );
        let reference = fsa_reference(&cfg, &j.data, None).unwrap();
        assert_eq!(reference.rounds, 15);
        let want = params_hash(&reference.params);
        let stats = run_cluster(&j, |_| {});
        for h in worker_hashes(&stats) {
            assert_eq!(h, want, "adam = {adam}");
        }
    }
}

/// A loopback address whose port was free a moment ago (for a local server bound at a known
/// address).
fn free_loopback_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// Oracle 7, second part, on the data plane: a stranger pushing to a local server and raw garbage
/// on its port are refused without disturbing the job.
#[test]
fn strangers_and_garbage_at_a_local_server_do_not_change_the_result() {
    // Plaintext, so that the stranger's frames reach the local server's admission (with mutual
    // TLS they never get past the handshake: geomx-trainer/tests/security.rs).
    let mut j = job(vec![2, 2], 1, 300);
    j.security = geomx_trainer::config::SecurityMode::Off;
    let want = params_hash(&reference(&j, true));
    let addr = free_loopback_addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a, st) = (addr.clone(), stop.clone());
    let refused = Arc::new(Mutex::new(Vec::new()));
    let r2 = refused.clone();
    let intruder = std::thread::spawn(move || {
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok(mut s) = TcpStream::connect(&a) {
                let _ = s.write_all(b"\x00\x01garbage, not a frame\r\n");
            }
            if let Ok(c) = KvClient::connect(a.as_str(), 4242, NetOptions::default()) {
                let p = c.push(0, 0, PayloadCodec::DenseF32, 0, 37, &[0u8; 37 * 4]);
                if let Ok(p) = p {
                    r2.lock()
                        .unwrap()
                        .push(p.wait(Duration::from_secs(2)).is_err());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    // Workers start only once the stranger has tried at least one push (refused or unanswered),
    // so the claim below does not depend on how threads are scheduled.
    let first = refused.clone();
    let stats = run_cluster_at(
        &j,
        &addr,
        |_| {},
        move || {
            let t = std::time::Instant::now();
            while first.lock().unwrap().is_empty() {
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "the stranger never got to push"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        },
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    intruder.join().unwrap();
    for h in worker_hashes(&stats) {
        assert_eq!(h, want);
    }
    let refused = refused.lock().unwrap();
    eprintln!("stranger pushes refused: {}", refused.len());
    assert!(!refused.is_empty(), "the stranger never got to push");
    assert!(refused.iter().all(|&e| e), "a stranger's push was accepted");
}

/// An authenticated member's bad requests (security.md): during a mutual-TLS run, once every
/// worker has pushed, a second connection under worker (dc 0, rank 0)'s own certificate pulls an
/// unknown key and pushes a key the real worker already pushed, and worker (dc 1, rank 0)'s
/// certificate pushes at dc 0's local server. Each gets an error reply, and the job ends with
/// the parameters of the undisturbed reference.
#[test]
fn an_authenticated_members_bad_requests_get_error_replies_and_the_job_goes_on() {
    let mut j = job(vec![2, 2], 1, 30);
    assert_eq!(j.security, geomx_trainer::config::SecurityMode::Mtls);
    // Progress lines (worker dc 0 rank 0) every 5 rounds: the first comes once round 5 is done,
    // so every worker has pushed and holds its id at its local server.
    j.eval_every = 5;
    let want = params_hash(&reference(&j, true));
    let addr = free_loopback_addr();
    let replies = Arc::new(Mutex::new(Vec::<String>::new()));
    let (jj, a, r2) = (j.clone(), addr.clone(), replies.clone());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let progress: ProgressSink = Arc::new(move |_| {
        if d2.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let wait = Duration::from_secs(20);
        let answer = |p: Result<geomx_net::Pending, NetError>| match p.map(|p| p.wait(wait)) {
            Ok(Err(NetError::Remote(m))) => r2.lock().unwrap().push(m),
            other => panic!("a bad request was not refused: {other:?}"),
        };
        // Every node id the job may have given (coordinator, servers and workers: 1..=8).
        let own = jj.net_as("worker", 0, 0).unwrap();
        let other_dc = jj.net_as("worker", 1, 0).unwrap();
        for id in 1..=8u32 {
            let c = KvClient::connect(a.as_str(), id, own.clone()).unwrap();
            answer(c.pull(1 << 40, 0, 0, 1));
            answer(c.push(0, 5, PayloadCodec::DenseF32, 0, 37, &[0u8; 37 * 4]));
            let c = KvClient::connect(a.as_str(), id, other_dc.clone()).unwrap();
            answer(c.push(1, 5, PayloadCodec::DenseF32, 0, 5, &[0u8; 5 * 4]));
        }
    });
    let stats = run_cluster_watched(&j, &addr, |_| {}, || {}, progress);
    assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    for h in worker_hashes(&stats) {
        assert_eq!(h, want);
    }
    let replies = replies.lock().unwrap();
    let has = |s: &str| replies.iter().any(|m| m.contains(s));
    assert!(has("pull of unknown key"), "{replies:?}");
    assert!(
        has("already connected"),
        "no duplicate push refused: {replies:?}"
    );
    assert!(
        has("the certificate of worker dc 1 rank 0 may not speak for"),
        "{replies:?}"
    );
    let local0 = stats
        .iter()
        .find(|s| s.role == "local_server" && s.dc == 0)
        .unwrap();
    assert_eq!(local0.refused_requests, replies.len() as u64);
}

/// Forwards one connection's bytes both ways and flips one bit in the body of the `n`-th TLS
/// record (content type 23) from the client: an on-path attacker who changes one frame.
fn tampering_proxy(target: String, n: usize) -> String {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        let mut s = TcpStream::connect(&target).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
        let mut seen = 0;
        loop {
            let mut hdr = [0u8; 5];
            if c.read_exact(&mut hdr).is_err() {
                break;
            }
            let mut body = vec![0u8; usize::from(u16::from_be_bytes([hdr[3], hdr[4]]))];
            if c.read_exact(&mut body).is_err() {
                break;
            }
            if hdr[0] == 23 {
                seen += 1;
                if seen == n {
                    body[0] ^= 0x04;
                }
            }
            if s.write_all(&hdr).is_err() || s.write_all(&body).is_err() {
                break;
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    addr
}

/// A tampered TCP record (security.md): a proxy between a worker and the coordinator flips one
/// bit of a record after the handshake. The coordinator refuses the record, tells the worker
/// (bad_record_mac) and drops it, and the job ends naming the cause.
#[test]
fn a_tampered_record_on_a_members_link_ends_the_job_naming_the_cause() {
    let mut j = job(vec![1, 1], 1, 1_000_000);
    j.registration_timeout = Duration::from_secs(5);
    j.net.conn.heartbeat_interval = Duration::from_millis(50);
    let o = run_roles(
        &j,
        &j,
        "127.0.0.1:0",
        |_| {},
        || {},
        Arc::new(|_| {}),
        |d, r, c| {
            if (d, r) == (0, 0) {
                // The client's encrypted handshake flight is at most 3 records.
                tampering_proxy(c.to_string(), 6)
            } else {
                c.to_string()
            }
        },
    );
    let mut said: Vec<String> = o.results.into_iter().filter_map(Result::err).collect();
    said.extend(o.fatal);
    eprintln!("{said:#?}");
    // The coordinator aborts the job naming the failed authentication, and the worker learns
    // from the alert why its link was dropped.
    assert!(
        said.iter().any(|m| m.contains("job aborted")
            && m.contains("worker (dc 0, rank 0)")
            && m.contains("record authentication failed")),
        "the abort does not name the cause: {said:#?}"
    );
    assert!(
        said.iter().any(|m| m.contains("bad_record_mac")),
        "the worker was not told: {said:#?}"
    );
}

/// sync.md oracle 4: HFA with K1 = K2 = 1, equal shards and `average` is synchronous model
/// averaging: after every step each worker holds the mean of the W locally updated models. Each
/// round adds 2 bits to the grid (2^-3 at θ_0) and magnitudes stay below 32, so for 6 rounds every
/// operation is exact and the single-process reference below (each worker steps from the shared
/// model, then the plain mean) must match bit for bit.
#[test]
fn hfa_with_unit_periods_is_synchronous_model_averaging() {
    let j = unit_hfa_job(vec![2, 2], 1);
    let want = unit_hfa_reference(&j, j.model.init(j.seed));
    let stats = run_cluster(&j, |_| {});
    for h in worker_hashes(&stats) {
        assert_eq!(h, want);
    }
}

/// HFA with k1 = k2 = 1 over 6 rounds of the exact [`KnownGrads`].
fn unit_hfa_job(workers: Vec<usize>, servers: usize) -> JobSpec {
    let mut j = job(workers, servers, 6);
    let specs = j.model.tensors().to_vec();
    j.model = Arc::new(KnownGrads { specs, exact: true });
    j.sync = SyncAlgorithm::Hfa;
    j
}

/// The hash of [`unit_hfa_job`]'s final model from `m` (θ_0): every round each worker steps
/// its copy of the model, and the new model is their mean.
fn unit_hfa_reference(j: &JobSpec, mut m: Vec<Vec<f32>>) -> u64 {
    let w = j.plan.total_workers() as f32;
    for round in samples(j) {
        for (key, mk) in m.iter_mut().enumerate() {
            for (i, v) in mk.iter_mut().enumerate() {
                // lr = 1: worker x holds v − g(x); the new model is their mean.
                let models: Vec<f32> = round
                    .iter()
                    .flatten()
                    .map(|&x| *v - grad_of(true, x, key, i))
                    .collect();
                *v = models.iter().sum::<f32>() / w;
            }
        }
    }
    params_hash(&m)
}

/// sync.md oracle 5 (cadence): K1 = 2, K2 = 3, 2 DCs × 2 workers, 16 steps. Every worker runs its
/// own SGD; every 2 steps each DC averages its models (no WAN); every 6 steps the DC averages move
/// the milestone, which everyone adopts. The run ends 4 steps after the last global round, so each
/// DC holds its own average: another cadence would end elsewhere. Grids stay exact (one bit per
/// averaging from 2^-3), so the reference matches bit for bit.
#[test]
fn hfa_cadence_averages_locally_every_k1_and_globally_every_k1_k2_steps() {
    let (k1, k2, rounds) = (2u64, 3u64, 16u64);
    let mut j = job(vec![2, 2], 1, rounds);
    let specs = j.model.tensors().to_vec();
    j.model = Arc::new(KnownGrads { specs, exact: true });
    j.sync = SyncAlgorithm::Hfa;
    j.hfa.k1 = k1;
    j.hfa.k2 = k2;
    let theta0 = j.model.init(j.seed);
    // models[dc][rank][key][i]
    let mut models = vec![vec![theta0.clone(); 2]; 2];
    let mut m = theta0;
    for (step, round) in samples(&j).into_iter().enumerate() {
        for (dc, xs) in round.iter().enumerate() {
            for (rank, &x) in xs.iter().enumerate() {
                for (key, t) in models[dc][rank].iter_mut().enumerate() {
                    for (i, v) in t.iter_mut().enumerate() {
                        *v -= grad_of(true, x, key, i);
                    }
                }
            }
        }
        let done = step as u64 + 1;
        if done % k1 != 0 {
            continue;
        }
        let avg: Vec<Vec<Vec<f32>>> = models
            .iter()
            .map(|dc| {
                (0..dc[0].len())
                    .map(|key| {
                        (0..dc[0][key].len())
                            .map(|i| (dc[0][key][i] + dc[1][key][i]) / 2.0)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        if (done / k1) % k2 == 0 {
            // Data weighting with equal DCs: the new milestone is the mean of the DC averages.
            for (key, mk) in m.iter_mut().enumerate() {
                for (i, v) in mk.iter_mut().enumerate() {
                    *v = (avg[0][key][i] + avg[1][key][i]) / 2.0;
                }
            }
            models = vec![vec![m.clone(); 2]; 2];
        } else {
            models = avg.into_iter().map(|a| vec![a.clone(), a]).collect();
        }
    }
    let want: Vec<u64> = models.iter().map(|dc| params_hash(&dc[0])).collect();
    assert_ne!(want[0], want[1], "the DCs' final averages should differ");
    let stats = run_cluster(&j, |_| {});
    let workers: Vec<&RoleStats> = stats.iter().filter(|s| s.role == "worker").collect();
    assert_eq!(workers.len(), 4);
    for s in workers {
        assert_eq!(
            s.param_hash,
            Some(want[s.dc as usize]),
            "dc {} rank {}",
            s.dc,
            s.rank
        );
    }
}
