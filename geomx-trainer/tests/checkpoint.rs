//! Checkpoints and resume (issue 16, part 1): a job checkpointed at round r, ended, and resumed
//! from its checkpoint ends bit-identical to an uninterrupted run; torn, corrupt and foreign
//! checkpoints are refused naming the file, and resume falls back to the previous round.
//!
//! Each run is a whole cluster on loopback threads (`launch::threads`): 2 DCs (2 + 1 workers),
//! 2 global servers with keys split into several ranges, SGD with momentum (optimizer state that
//! must survive), the built-in digits data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use geomx_trainer::config::Config;
use geomx_trainer::hips::JobSpec;
use geomx_trainer::launch::threads;
use geomx_trainer::report::Report;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("geomx-ckpt-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// 12 rounds of FSA, checkpointed every 5 rounds into `dir` (rounds 5 and 10), when given.
fn config(dir: Option<&Path>, lr: f32, extra: &str) -> Config {
    let ckpt = dir.map_or(String::new(), |d| {
        format!(
            "[checkpoint]\ndir = {:?}\nevery_rounds = 5\nkeep = 3\n",
            d.display().to_string()
        )
    });
    let toml = format!(
        "[cluster]\nglobal_servers = 2\n\
         [[cluster.data_centers]]\nname = \"dc0\"\nworkers = 2\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 1\n\
         [model]\nhidden = [16]\n[data]\nbatch_size = 8\n\
         [train]\nrounds = 12\neval_every = 0\n\
         [train.optimizer]\nkind = \"sgd\"\nlr = {lr}\nmomentum = 0.9\n\
         [placement]\nmin_range = 64\n{ckpt}{extra}"
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

    let from10 = run("resumed at 10", &cfg, Some(&dir));
    assert_eq!(from10.param_hash, plain.param_hash, "resumed at round 10");

    std::fs::remove_dir_all(round_dir(&dir, 10)).unwrap();
    let from5 = run("resumed at 5", &cfg, Some(&dir));
    assert_eq!(from5.param_hash, plain.param_hash, "resumed at round 5");
    // The resumed run wrote round 10 again, identical to the first one's.
    assert!(round_dir(&dir, 10).join("worker-0-0.ckpt").exists());

    // Control: the same job resumed with another learning rate is another job — refused.
    let other = config(Some(&dir), 0.05, "");
    let e = run_err(&other, &dir);
    assert!(e.contains("configuration hash"), "{e}");
    assert!(e.contains(".manifest.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
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
