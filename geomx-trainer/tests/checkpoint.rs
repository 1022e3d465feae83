//! Checkpoints and resume (issue 16, part 1): a job checkpointed at round r, ended, and resumed
//! from its checkpoint ends bit-identical to an uninterrupted run; torn, corrupt and foreign
//! checkpoints are refused naming the file, and resume falls back to the previous round.
//!
//! Each run is a whole cluster on loopback threads (`launch::threads`): 2 DCs (2 + 1 workers),
//! 2 global servers with keys split into several ranges, SGD with momentum (optimizer state that
//! must survive), the built-in digits data.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use geomx_trainer::config::{AdamConfig, Config, OptimizerConfig};
use geomx_trainer::hips::JobSpec;
use geomx_trainer::launch::threads;
use geomx_trainer::report::Report;

mod support;

use support::{output_within, GEOMX, LAUNCH_LIMIT};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("geomx-ckpt-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// 12 rounds of FSA, checkpointed every 5 rounds into `dir` (rounds 5 and 10), when given.
fn config(dir: Option<&Path>, lr: f32, extra: &str) -> Config {
    config_with(dir, lr, 12, 5, extra)
}

/// `rounds` rounds, checkpointed every `every` rounds into `dir` when given; `extra` TOML
/// (a `[sync]` section) follows.
fn config_with(dir: Option<&Path>, lr: f32, rounds: u64, every: u64, extra: &str) -> Config {
    let ckpt = dir.map_or(String::new(), |d| {
        format!(
            "[checkpoint]\ndir = {:?}\nevery_rounds = {every}\nkeep = 3\n",
            d.display().to_string()
        )
    });
    let toml = format!(
        "{}[train]\nrounds = {rounds}\neval_every = 0\n\
         [train.optimizer]\nkind = \"sgd\"\nlr = {lr}\nmomentum = 0.9\n\
         [placement]\nmin_range = 64\n{ckpt}{extra}",
        support::SMALL_JOB
    );
    Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn job(cfg: &Config, resume: Option<&Path>) -> JobSpec {
    let mut job = JobSpec::from_config(cfg).unwrap();
    if let Some(d) = resume {
        job.resume_from(cfg, d.to_path_buf()).unwrap();
    }
    job
}

fn run(name: &str, cfg: &Config, resume: Option<&Path>) -> Report {
    let r = threads::run(&job(cfg, resume), cfg.to_json(), Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(r.replicas_identical, "{name}: replicas differ");
    assert_eq!(r.param_hash, r.global_param_hash, "{name}");
    r
}

/// The error of a run expected to fail (fast: registration gives up after 3 s).
fn run_err(cfg: &Config, resume: &Path) -> String {
    let mut cfg = cfg.clone();
    cfg.timeouts.registration_ms = 3_000;
    match threads::run(
        &job(&cfg, Some(resume)),
        cfg.to_json(),
        Duration::from_secs(60),
    ) {
        Ok(_) => panic!("resuming from {} should fail", resume.display()),
        Err(e) => e.to_string(),
    }
}

fn round_dir(dir: &Path, r: u64) -> PathBuf {
    dir.join(format!("round-{r}"))
}

/// The resume oracle: `plain` (uninterrupted) and `cfg` (checkpointing into `dir`) end with one
/// `param_hash`; so does `cfg` resumed at `rounds[0]` (its checkpoint present), and, once that
/// round's directory is removed (the job ended after the earlier checkpoint), at `rounds[1]`.
fn assert_resumes_bit_identical(
    name: &str,
    plain: &Config,
    cfg: &Config,
    dir: &Path,
    rounds: [u64; 2],
) {
    let plain = run(&format!("{name} uninterrupted"), plain, None);
    let full = run(&format!("{name} checkpointed"), cfg, None);
    assert_eq!(full.param_hash, plain.param_hash);
    assert!(round_dir(dir, rounds[0])
        .join("global-server-2-0.ckpt")
        .exists());
    let resumed_at = |r: u64| {
        let resumed = run(&format!("{name} resumed at {r}"), cfg, Some(dir));
        assert_eq!(resumed.param_hash, plain.param_hash, "resumed at round {r}");
    };
    resumed_at(rounds[0]);
    std::fs::remove_dir_all(round_dir(dir, rounds[0])).unwrap();
    resumed_at(rounds[1]);
    let _ = std::fs::remove_dir_all(dir);
}

/// The oracle: checkpointed at round r, ended, resumed → the uninterrupted run's `param_hash`,
/// for r = 10 and r = 5 (the job ended after its round-5 checkpoint: later rounds removed).
#[test]
fn fsa_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let plain = run("uninterrupted", &config(None, 0.1, ""), None);
    let dir = scratch("fsa");
    let cfg = config(Some(&dir), 0.1, "");
    let full = run("checkpointed", &cfg, None);
    // Writing checkpoints changes nothing.
    assert_eq!(full.param_hash, plain.param_hash);
    let mut files: Vec<String> = std::fs::read_dir(round_dir(&dir, 10))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    // 2 global servers, 2 local servers, 3 workers: a state file and a manifest entry each.
    assert_eq!(files.len(), 14, "{files:?}");
    assert!(
        files.contains(&"global-server-2-1.ckpt".to_string()),
        "{files:?}"
    );
    assert!(
        files.contains(&"worker-1-0.manifest.json".to_string()),
        "{files:?}"
    );

    // Resumed at round 10, exporting the final model: the file holds exactly the parameters
    // whose hash the report gives.
    let model = dir.join("model.safetensors");
    let mut with_export = cfg.clone();
    with_export.checkpoint.export = Some(model.clone());
    let from10 = run("resumed at 10", &with_export, Some(&dir));
    assert_eq!(from10.param_hash, plain.param_hash, "resumed at round 10");
    assert_eq!(from10.resumed_from_round, Some(10));
    assert_eq!(plain.resumed_from_round, None);
    let job10 = JobSpec::from_config(&cfg).unwrap();
    let saved = geomx_trainer::engine::export::read_params(&model, job10.model.as_ref()).unwrap();
    assert_eq!(
        format!("{:016x}", geomx_trainer::hash::params_hash(&saved)),
        plain.param_hash
    );
    std::fs::remove_file(&model).unwrap();

    std::fs::remove_dir_all(round_dir(&dir, 10)).unwrap();
    let from5 = run("resumed at 5", &cfg, Some(&dir));
    assert_eq!(from5.param_hash, plain.param_hash, "resumed at round 5");
    assert_eq!(from5.resumed_from_round, Some(5));
    // The resumed run wrote round 10 again, identical to the first one's.
    assert!(round_dir(&dir, 10).join("worker-0-0.ckpt").exists());

    // Control: the same job resumed with another learning rate is another job — refused.
    let other = config(Some(&dir), 0.05, "");
    let e = run_err(&other, &dir);
    assert!(e.contains("configuration hash"), "{e}");
    assert!(e.contains(".manifest.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The oracle under HFA (k1 = k2 = 2, DiLoCo's Nesterov outer step), 20 rounds: checkpoints
/// every 8 rounds (global averagings 2 and 4) hold the outer velocity and the workers' own
/// optimizer state (and, with SCAFFOLD, their control variates); resumed at 16 and at 8, the
/// run ends bit-identical to an uninterrupted one.
#[test]
fn hfa_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let hfa = "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 2\nk2 = 2\nouter = \"nesterov\"\n";
    // With Bi-Sparse (FP16 values) the local servers' residuals and 16-bit carries and the
    // global servers' carry of unsent increment entries (Nesterov's δ is dense) are saved too.
    let bisparse = format!(
        "{hfa}[compression.inter]\ncodec = \"bisparse\"\ndensity = 0.1\nmin_size = 100\n\
         values = \"fp16\"\nwarmup_rounds = 0\nselection = \"exact\"\n"
    );
    // SCAFFOLD's control variates (plain averaging) are saved with the workers' optimizers.
    let scaffold = "[sync]\nalgorithm = \"hfa\"\n[sync.hfa]\nk1 = 2\nk2 = 2\n\
                    correction = \"scaffold\"\n";
    for (name, extra) in [
        ("hfa", hfa.to_string()),
        ("hfa-bisparse", bisparse),
        ("hfa-scaffold", scaffold.to_string()),
    ] {
        let dir = scratch(name);
        assert_resumes_bit_identical(
            name,
            &config_with(None, 0.1, 20, 8, &extra),
            &config_with(Some(&dir), 0.1, 20, 8, &extra),
            &dir,
            [16, 8],
        );
    }
}

/// The oracle under Bi-Sparse: on the WAN tier the local servers' error-feedback residuals and
/// velocities and the workers' per-range replica optimizers are saved; worker-side
/// (`compression.intra.codec = "bisparse"`, sampled selection, FP16 values) each worker's own
/// residual, velocity and FP16 rounding carry (`push.<key>.<j>`; fresh ones would send other
/// values from the first resumed round on). Resumed at 10 and at 5, each run ends bit-identical
/// to an uninterrupted one.
#[test]
fn bisparse_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let cases = [
        (
            "bisparse",
            "[compression.inter]\ncodec = \"bisparse\"\ndensity = 0.1\nmin_size = 100\n\
             values = \"f32\"\nwarmup_rounds = 0\nselection = \"exact\"\nresync_every = 0\n",
        ),
        (
            "worker-bisparse",
            "[compression.intra]\ncodec = \"bisparse\"\ndensity = 0.1\nmin_size = 100\n\
             values = \"fp16\"\nwarmup_rounds = 0\n",
        ),
    ];
    for (name, extra) in cases {
        let dir = scratch(name);
        assert_resumes_bit_identical(
            name,
            &config(None, 0.1, extra),
            &config(Some(&dir), 0.1, extra),
            &dir,
            [10, 5],
        );
    }
}

/// The oracle with lossy dense tiers (FP16 on the WAN tier, BF16 on the LAN tier: increments
/// with the global servers' rounding carry), with MPQ (Bi-Sparse large keys, FP16 small ones)
/// and with Adam (moments and the bias-correction step): resumed at round 5, the run ends
/// bit-identical to an uninterrupted one.
#[test]
fn lossy_codecs_and_adam_resume_bit_identical() {
    let cases = [
        (
            "fp16",
            "[compression]\nintra = { codec = \"bf16\" }\ninter = { codec = \"fp16\" }\n",
        ),
        (
            "mpq",
            "[compression.inter]\ncodec = \"mpq\"\ndensity = 0.1\nmin_size = 100\n\
             warmup_rounds = 0\nselection = \"exact\"\n",
        ),
        ("adam", ""),
    ];
    let with_optimizer = |name: &str, mut cfg: Config| {
        if name == "adam" {
            cfg.train.optimizer = OptimizerConfig::Adam(AdamConfig {
                lr: 0.01,
                ..AdamConfig::default()
            });
            cfg.validate().unwrap();
        }
        cfg
    };
    for (name, extra) in cases {
        let plain = run(name, &with_optimizer(name, config(None, 0.1, extra)), None);
        let dir = scratch(name);
        let cfg = with_optimizer(name, config(Some(&dir), 0.1, extra));
        assert_eq!(run(name, &cfg, None).param_hash, plain.param_hash, "{name}");
        std::fs::remove_dir_all(round_dir(&dir, 10)).unwrap();
        let resumed = run(name, &cfg, Some(&dir));
        assert_eq!(
            resumed.param_hash, plain.param_hash,
            "{name}: resumed at round 5"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A corrupt state file in the newest round is refused (naming the file in the log) and resume
/// falls back to the previous complete round, still ending bit-identical; with no intact round
/// left, resume fails naming the files.
#[test]
fn a_corrupt_newest_round_falls_back_to_the_previous_one() {
    let dir = scratch("corrupt");
    let cfg = config(Some(&dir), 0.1, "");
    let full = run("checkpointed", &cfg, None);
    let f = round_dir(&dir, 10).join("global-server-2-0.ckpt");
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    let resumed = run("resumed past a corrupt round", &cfg, Some(&dir));
    assert_eq!(resumed.param_hash, full.param_hash);
    // The resumed run rewrote round 10; tear a worker's file of round 10 and delete one of
    // round 5: nothing intact is left.
    let w = round_dir(&dir, 10).join("worker-1-0.ckpt");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 3]).unwrap();
    std::fs::remove_file(round_dir(&dir, 5).join("local-server-0-0.ckpt")).unwrap();
    let e = run_err(&cfg, &dir);
    assert!(e.contains("no complete checkpoint round"), "{e}");
    assert!(e.contains("round-10/worker-1-0.ckpt"), "{e}");
    assert!(e.contains("round-5/local-server-0-0.ckpt: missing"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Jobs whose state checkpoints do not hold yet are refused up front, naming the option.
#[test]
fn unsupported_jobs_refuse_resume() {
    let cfg = config(None, 0.1, "[sync]\nalgorithm = \"mixed\"\n");
    let mut job = JobSpec::from_config(&cfg).unwrap();
    let e = job
        .resume_from(&cfg, scratch("never"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--resume:"), "{e}");
    assert!(e.contains("sync.algorithm"), "{e}");
}

/// The processes' children of `parent` whose command line holds every one of `args`.
fn children_with(parent: u32, args: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state ppid …`: the ppid follows the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let words: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        if ppid == Some(parent) && args.iter().all(|a| words.iter().any(|w| w == a)) {
            out.push(pid);
        }
    }
    out
}

/// Whether every process of the 7-process test job has its manifest entry in `round`.
fn round_complete(dir: &Path, round: u64) -> bool {
    std::fs::read_dir(round_dir(dir, round)).is_ok_and(|d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".manifest.json"))
            .count()
            == 7
    })
}

fn launch_ok(args: &[&str], cfg: &Path, report: &Path) -> serde_json::Value {
    let out = output_within(
        Command::new(GEOMX)
            .args(["launch", "--quiet", "--report"])
            .arg(report)
            .args(args)
            .arg(cfg),
        LAUNCH_LIMIT,
    );
    assert!(
        out.status.success(),
        "launch {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// Real processes: `geomx launch` with checkpoints, one worker killed with SIGKILL once a
/// round is complete (the job ends), then `geomx launch --resume DIR --save PATH`: the resumed
/// job's `param_hash` and the exported model equal the uninterrupted run's.
#[test]
fn killed_launch_resumes_bit_identical_and_saves_the_model() {
    let base = support::scratch("ckpt", "launch");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // Every round kept, so that a job that outruns the kill can be cut back to round 5.
    let toml = |dir: &Path| {
        let cfg = config_with(Some(dir), 0.1, 150, 5, "");
        cfg.to_toml_string()
            .unwrap()
            .replace("keep = 3", "keep = 1000")
    };
    let (full_dir, killed_dir) = (base.join("full"), base.join("killed"));
    let (full_cfg, killed_cfg) = (base.join("full.toml"), base.join("killed.toml"));
    std::fs::write(&full_cfg, toml(&full_dir)).unwrap();
    std::fs::write(&killed_cfg, toml(&killed_dir)).unwrap();
    let full_model = base.join("full.safetensors");
    let full = launch_ok(
        &["--save", full_model.to_str().unwrap()],
        &full_cfg,
        &base.join("full.json"),
    );
    let hash = full["param_hash"].as_str().unwrap().to_string();
    assert_eq!(full["rounds"].as_u64(), Some(150), "{full}");

    // The job to kill: once round 5 is complete, SIGKILL worker (dc 1, rank 0).
    let mut launcher = Command::new(GEOMX)
        .args(["launch", "--quiet"])
        .arg(&killed_cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        if round_complete(&killed_dir, 5) {
            for pid in children_with(launcher.id(), &["worker", "--dc", "1"]) {
                // SAFETY: signalling a process this test started (through the launcher).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        assert!(started.elapsed() < LAUNCH_LIMIT, "the job to kill hangs");
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        // The job outran the kill (a fast machine): keep only round 5, which leaves what a kill
        // right after round 5 leaves.
        eprintln!("the job finished before the kill; resuming from round 5");
        for r in geomx_trainer::checkpoint::manifest::rounds(&killed_dir).unwrap() {
            if r != 5 {
                std::fs::remove_dir_all(round_dir(&killed_dir, r)).unwrap();
            }
        }
    }
    let newest = geomx_trainer::checkpoint::manifest::rounds(&killed_dir).unwrap()[0];
    eprintln!("killed job: {status}; newest round directory {newest}");

    let model = base.join("resumed.safetensors");
    let resumed = launch_ok(
        &[
            "--resume",
            killed_dir.to_str().unwrap(),
            "--save",
            model.to_str().unwrap(),
        ],
        &killed_cfg,
        &base.join("resumed.json"),
    );
    assert_eq!(resumed["param_hash"].as_str(), Some(hash.as_str()));
    let from = resumed["resumed_from_round"].as_u64().unwrap();
    assert!(from >= 5 && from % 5 == 0 && from < 150, "{from}");
    assert_eq!(resumed["replicas_identical"].as_bool(), Some(true));
    let job = JobSpec::from_config(&Config::load(&killed_cfg).unwrap()).unwrap();
    for m in [&full_model, &model] {
        let p = geomx_trainer::engine::export::read_params(m, job.model.as_ref()).unwrap();
        assert_eq!(
            format!("{:016x}", geomx_trainer::hash::params_hash(&p)),
            hash,
            "{}",
            m.display()
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// The python interpreter with torch to check exports against, if any: `GEOMX_TORCH_PYTHON`,
/// `PYTHON_SYS_EXECUTABLE` (what `.ci/tch-setup.sh` exports), its default venv, or `python3`.
fn torch_python() -> Option<PathBuf> {
    let venv = std::env::var_os("GEOMX_TORCH_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/geomx/torch-2.13.0"))
        });
    let candidates = ["GEOMX_TORCH_PYTHON", "PYTHON_SYS_EXECUTABLE"]
        .into_iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .chain(venv.map(|v| v.join("bin/python")))
        .chain([PathBuf::from("python3")]);
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import torch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Loads an exported safetensors file into a torch module whose `layers` is an
/// `nn.Sequential` of Linear + ReLU (by hand: no `safetensors` package needed) and prints
/// its logits for the inputs.
const TORCH_SCRIPT: &str = r#"
import json, struct, sys, torch
from torch import nn
path, sizes, xs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
b = open(path, "rb").read()
n = struct.unpack("<Q", b[:8])[0]
header = json.loads(b[8:8 + n])
sd = {}
for name, info in header.items():
    if name == "__metadata__":
        continue
    assert info["dtype"] == "F32", info
    s, e = info["data_offsets"]
    sd[name] = torch.frombuffer(bytearray(b[8 + n + s:8 + n + e]), dtype=torch.float32).reshape(info["shape"])
mods = []
for i in range(len(sizes) - 1):
    mods.append(nn.Linear(sizes[i], sizes[i + 1]))
    if i < len(sizes) - 2:
        mods.append(nn.ReLU())
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*mods)
    def forward(self, x):
        return self.layers(x)
net = Net()
net.load_state_dict(sd, strict=True)
with torch.no_grad():
    print(json.dumps(net(torch.tensor(xs, dtype=torch.float32)).tolist()))
"#;

/// The exported MLP loads into the equivalent PyTorch module with `load_state_dict(strict)`
/// and gives the same logits. Skipped, saying why, where no python has torch.
#[test]
fn exported_mlp_loads_into_torch_with_the_same_logits() {
    use geomx_trainer::engine::Model;
    let Some(py) = torch_python() else {
        eprintln!("skipped: no python with torch (run .ci/tch-setup.sh or set GEOMX_TORCH_PYTHON)");
        return;
    };
    let mlp = geomx_trainer::engine::Mlp::new(64, &[16, 8], 10).unwrap();
    let mut params = mlp.init(11);
    // Non-zero biases, so that they are checked too.
    for t in params.iter_mut().skip(1).step_by(2) {
        for (i, v) in t.iter_mut().enumerate() {
            *v = (i as f32 - 3.0) / 16.0;
        }
    }
    let path = scratch("torch").with_extension("safetensors");
    geomx_trainer::engine::export::write(&path, &mlp, &params).unwrap();
    let rows = 4;
    let x: Vec<f32> = (0..rows * 64)
        .map(|i| ((i * 7) % 17) as f32 / 16.0)
        .collect();
    let want = mlp.forward(&params, &x).unwrap();
    let xs: Vec<&[f32]> = x.chunks(64).collect();
    let out = Command::new(&py)
        .args(["-c", TORCH_SCRIPT])
        .arg(&path)
        .arg(serde_json::to_string(mlp.sizes()).unwrap())
        .arg(serde_json::to_string(&xs).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "torch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<f32> = got.concat();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "torch {g} vs geomx {w}"
        );
    }
    let _ = std::fs::remove_file(&path);
}
