//! The `geomx` binary: `run` one role, `launch` a whole cluster on this machine, `bench`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use geomx_trainer::bench_cmd::{summary, Bench};
use geomx_trainer::config::{Config, LogLevel, Role, RoleSpec};
use geomx_trainer::launch::role::{exit_hook, run_role_to_end, RoleArgs};
use geomx_trainer::launch::{launch, LaunchOptions};

#[derive(Parser)]
#[command(
    name = "geomx",
    version,
    about = "Geo-distributed training with the HiPS hierarchy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one role of a job (multi-host use). Without --role (or with --from-env), takes the role
    /// from the launcher's variables: Slurm, Kubernetes, torchrun, ps-lite's DMLC_* (docs/deployment.md).
    Run(RunArgs),
    /// Start the whole cluster on this machine as separate processes and wait for it.
    Launch {
        /// Topology file (TOML); without it the built-in default runs.
        file: Option<PathBuf>,
        /// Write a JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print no progress lines.
        #[arg(long)]
        quiet: bool,
        /// Continue the job from the newest complete round of this checkpoint directory.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Write the final model here as safetensors.
        #[arg(long, value_name = "PATH")]
        save: Option<PathBuf>,
        /// Inject faults: comma-separated ACTION:ROLE:dcD:RANK@round=N, e.g.
        /// `kill:worker:dc1:0@round=200` (the worker SIGKILLs itself as round 200 starts);
        /// `cut:dc1:5s@round=800` cuts dc1's WAN link for 5 s (in the WAN lab).
        #[arg(long, value_name = "SPEC")]
        chaos: Option<String>,
    },
    /// Write a job's files for a scheduler: a Slurm sbatch script, Kubernetes manifests, a report.
    Deploy {
        #[command(subcommand)]
        what: geomx_trainer::deploy::cli::DeployCmd,
    },
    /// Credentials for jobs not started by `geomx launch` (docs/security.md): `init` makes a job
    /// CA and secret, `issue` a key and certificate for every process of a job.
    Pki {
        #[command(subcommand)]
        what: PkiCmd,
    },
    /// Micro-benchmarks; print one JSON line.
    Bench {
        /// What to measure.
        #[arg(value_enum)]
        what: BenchKind,
        /// A short smoke-size run instead of the full measurement.
        #[arg(long)]
        quick: bool,
        /// Output folder of the benchmarks that write files (e2e).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        e2e: geomx_trainer::bench_e2e::cli::E2eArgs,
    },
    /// Launch the cluster inside the emulated WAN (network namespaces when root, else userspace
    /// relays) and print the lab's figures.
    WanLab {
        /// Topology file (TOML); its wan section sets rate, delay and loss (mode: auto).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write a JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Build the lab only, print `GEOMX_LAB <prefix>` and wait for a signal (clean-up tests).
        #[arg(long, hide = true)]
        hold: bool,
        /// Check the lab's own fidelity instead (root): a 100 Mbit/s, 50 ms link, UDP round trip
        /// and 10 s of bulk TCP; prints one JSON line per run and fails unless p99 relay lateness
        /// <= 1 ms, max <= 5 ms, goodput 90-100 % and round trip within 10 % (docs/wan-lab.md).
        #[arg(long, conflicts_with_all = ["hold", "config", "report"])]
        selftest: bool,
        /// Self-test runs.
        #[arg(long, default_value_t = 1, requires = "selftest")]
        runs: usize,
        /// Self-test without the keep-awake spinners (to measure what they are worth).
        #[arg(long, requires = "selftest")]
        allow_cpu_idle: bool,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Make a job CA (`ca.pem`, `ca.key`) and the job secret (`job.secret`) in DIR (mode 0600).
    Init {
        /// The credentials directory.
        #[arg(long)]
        dir: PathBuf,
        /// Validity of the CA and of the certificates it issues, in days.
        #[arg(long, default_value_t = 30, value_parser = days())]
        days: u32,
    },
    /// Issue `<role>-dc<d>-rank<r>.pem` / `.key` for every process of the job in DIR (its CA
    /// from `geomx pki init`); point `security.dir` (or GEOMX_SECURITY_DIR) at DIR.
    Issue {
        /// The credentials directory.
        #[arg(long)]
        dir: PathBuf,
        /// Topology file (TOML); default: the built-in configuration.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Validity of the certificates, in days.
        #[arg(long, default_value_t = 30, value_parser = days())]
        days: u32,
    },
}

/// `--days`: 1 to the longest validity a job CA takes.
fn days() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(geomx_net::tls::MAX_VALID_DAYS))
}

fn pki(what: PkiCmd) -> Result<(), String> {
    use geomx_net::tls::JobCa;
    use geomx_trainer::security::{ensure_secret_file, issue_job};
    match what {
        PkiCmd::Init { dir, days } => {
            if dir.join("ca.key").exists() {
                return Err(format!("{} already holds a CA (ca.key)", dir.display()));
            }
            JobCa::generate("geomx", days)
                .and_then(|ca| ca.write(&dir))
                .map_err(|e| e.to_string())?;
            ensure_secret_file(&dir)?;
            eprintln!("geomx pki: CA and job secret in {}", dir.display());
            Ok(())
        }
        PkiCmd::Issue { dir, config, days } => {
            let cfg = match &config {
                Some(p) => Config::load(p).map_err(|e| e.to_string())?,
                None => Config::default(),
            };
            let job = geomx_trainer::hips::JobSpec::from_config(&cfg).map_err(|e| e.to_string())?;
            let ca = JobCa::read(&dir, days).map_err(|e| e.to_string())?;
            let n = issue_job(&ca, &job.plan, &dir)?;
            eprintln!("geomx pki: {n} processes' credentials in {}", dir.display());
            Ok(())
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchKind {
    /// Transport goodput and request rate against raw sockets.
    Net,
    /// Compression kernels against memcpy.
    Kernels,
    /// The end-to-end scenario matrix behind an emulated WAN (writes results into --out).
    E2e,
    /// DGT vs all-TCP round completion time on a 100 Mbit/s link with 1 / 5 / 10 % loss
    /// (network namespaces, root only); prints a table and one JSON line.
    Dgt,
    /// Push + pull goodput with mutual TLS against plaintext over a WAN-lab link shaped to
    /// 1 Gbit/s (network namespaces, root only); prints a table and one JSON line.
    Tls,
    /// FSA, MixedSync, HFA and ESync with one DC 3x slower: time to accuracy, WAN bytes (writes
    /// sync.json and sync.md into --out, default bench-sync).
    Sync,
    /// P3 against first in first out in the WAN lab: round time and its split (writes
    /// results.json and results.md into --out, default bench-sched).
    Sched,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Coordinator,
    GlobalServer,
    LocalServer,
    Worker,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The role; omit to take it from the launcher's variables (as --from-env does).
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
    /// Take the role, data center and rank from the launcher's variables (docs/deployment.md).
    #[arg(long, conflicts_with_all = ["role", "dc", "rank"])]
    from_env: bool,
    /// Topology file (TOML); default: the built-in configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data-center index (local servers, workers).
    #[arg(long)]
    dc: Option<u32>,
    /// Rank within the role (workers, global servers).
    #[arg(long)]
    rank: Option<u32>,
    /// Coordinator address: where it binds (coordinator) or where to register (others).
    #[arg(long)]
    coordinator: Option<String>,
    /// Host to bind and advertise (default: cluster.host).
    #[arg(long)]
    bind: Option<String>,
    /// Continue from the newest complete round of this checkpoint directory (every process of
    /// the job must be given the same directory).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Write the final model here as safetensors (used by worker dc 0, rank 0).
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
    /// Read this process's credentials from stdin (how `geomx launch` hands them over).
    #[arg(long, hide = true)]
    credentials_stdin: bool,
    /// The model's device in this process, overriding model.device ("cpu" or "cuda:N"; how
    /// `geomx launch` gives each worker its GPU of model.device = "cuda:local").
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

fn init_tracing(level: LogLevel) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.as_str()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn run(args: RunArgs) -> Result<(), String> {
    let (cfg, spec) = match args.role {
        Some(r) => {
            let cfg = match &args.config {
                Some(p) => Config::load(p).map_err(|e| e.to_string())?,
                None => Config::default(),
            };
            let role = match r {
                RoleArg::Coordinator => Role::Coordinator,
                RoleArg::GlobalServer => Role::GlobalServer,
                RoleArg::LocalServer => Role::LocalServer,
                RoleArg::Worker => Role::Worker,
            };
            let mut spec = RoleSpec::new(role, 0, 0);
            spec.dc = args.dc;
            spec.rank = args.rank;
            (cfg, spec)
        }
        None => {
            use geomx_trainer::deploy::{from_env, run::prepare};
            let vars: HashMap<String, String> = std::env::vars().collect();
            let launcher = from_env::detect(&vars).map_err(|e| e.to_string())?;
            if launcher != from_env::Launcher::Dmlc {
                let p = prepare(
                    launcher,
                    &vars,
                    args.config.as_deref(),
                    args.coordinator.as_deref(),
                    args.bind.as_deref(),
                )
                .map_err(|e| e.to_string())?;
                init_tracing(p.config.log.level);
                tracing::info!(
                    "{}; binding {}",
                    p.assignment,
                    p.args.bind_host.as_deref().unwrap_or("")
                );
                let mut cfg = p.config;
                if args.save.is_some() {
                    cfg.checkpoint.export.clone_from(&args.save);
                }
                let role_args = RoleArgs {
                    resume: args.resume,
                    credentials_stdin: args.credentials_stdin,
                    ..p.args
                };
                return run_role_to_end(&cfg, &role_args, exit_hook()).map_err(|e| e.to_string());
            }
            let (mut cfg, spec) = Config::from_dmlc_env(&vars).map_err(|e| e.to_string())?;
            if let Some(p) = &args.config {
                // A topology file overrides what the variables implied about the job.
                cfg = Config::load(p).map_err(|e| e.to_string())?;
            }
            (cfg, spec)
        }
    };
    init_tracing(cfg.log.level);
    let mut cfg = cfg;
    if args.save.is_some() {
        cfg.checkpoint.export = args.save;
    }
    if let Some(d) = args.device {
        if geomx_trainer::engine::Device::parse(&d).is_none() {
            return Err(format!("--device: {d:?} is not \"cpu\" or \"cuda:N\""));
        }
        cfg.model.device = d;
    }
    let role_args = RoleArgs {
        spec,
        coordinator: args.coordinator,
        bind_host: args.bind,
        resume: args.resume,
        credentials_stdin: args.credentials_stdin,
    };
    run_role_to_end(&cfg, &role_args, exit_hook()).map_err(|e| e.to_string())
}

/// `geomx wan-lab --selftest`: one JSON line per run; fails if any run missed a bound.
fn wan_lab_selftest(runs: usize, allow_cpu_idle: bool) -> Result<(), String> {
    use geomx_trainer::wanlab::selftest::{self, SelftestOptions};
    let o = SelftestOptions {
        allow_cpu_idle,
        ..SelftestOptions::default()
    };
    let mut failed = 0;
    for i in 1..=runs.max(1) {
        let r = selftest::run(&o).map_err(|e| format!("wan-lab self-test: {e}"))?;
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
        if !r.ok {
            failed += 1;
            eprintln!("self-test run {i}: {}", r.failures.join("; "));
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(format!(
            "wan-lab self-test: {n} of {} runs missed a bound",
            runs.max(1)
        )),
    }
}

/// `geomx wan-lab`.
fn wan_lab(config: Option<PathBuf>, report: Option<PathBuf>, hold: bool) -> Result<(), String> {
    if hold {
        let cfg = match &config {
            Some(p) => Config::load(p).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        return geomx_trainer::launch::wan::hold(&cfg).map_err(|e| e.to_string());
    }
    let opts = LaunchOptions {
        config,
        report,
        exe: None,
        quiet: false,
        ..LaunchOptions::default()
    };
    let r = geomx_trainer::launch::launch_with(&opts, Some(geomx_trainer::config::WanMode::Auto))
        .map_err(|e| e.to_string())?;
    let mut lab = r.wan_lab.clone().unwrap_or_default();
    let qdisc = lab
        .as_object_mut()
        .and_then(|o| o.remove("qdisc_stats"))
        .and_then(|q| q.as_str().map(str::to_string));
    println!("WAN lab ({}):", r.wan_mode);
    println!("{}", serde_json::to_string_pretty(&lab).unwrap_or_default());
    if let Some(q) = qdisc {
        println!("qdisc counters:\n{q}");
    }
    if let Some(l) = r.relay_lateness() {
        println!("delay relay lateness: {}", l.mark());
    }
    let secs = r.wall_seconds.max(1e-9);
    println!(
        "WAN bytes {} ({:.0} per round), WAN goodput {:.2} Mbit/s averaged over the run, time to final accuracy {:.4}: {:.2} s",
        r.wan_bytes,
        r.wan_bytes_per_round,
        r.wan_bytes as f64 * 8.0 / secs / 1e6,
        r.final_test_accuracy,
        r.wall_seconds
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Launch {
            file,
            report,
            quiet,
            resume,
            save,
            chaos,
        } => {
            init_tracing(LogLevel::Warn);
            let opts = LaunchOptions {
                config: file,
                report,
                exe: None,
                quiet,
                resume,
                save,
                chaos,
            };
            launch(&opts).map(|_| ()).map_err(|e| e.to_string())
        }
        Cmd::Deploy { what } => geomx_trainer::deploy::cli::run(what).map_err(|e| e.to_string()),
        Cmd::Pki { what } => pki(what),
        Cmd::WanLab {
            selftest: true,
            runs,
            allow_cpu_idle,
            ..
        } => {
            init_tracing(LogLevel::Warn);
            wan_lab_selftest(runs, allow_cpu_idle)
        }
        Cmd::WanLab {
            config,
            report,
            hold,
            ..
        } => {
            init_tracing(LogLevel::Warn);
            wan_lab(config, report, hold)
        }
        Cmd::Bench {
            what: BenchKind::E2e,
            quick,
            out,
            e2e,
        } => {
            init_tracing(LogLevel::Warn);
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let opts = e2e.to_options(quick, out, command);
            geomx_trainer::bench_e2e::run(&opts)
                .map(|r| {
                    println!("{}", geomx_trainer::bench_e2e::results::render_markdown(&r));
                    eprintln!("e2e: results in {}", opts.out.display());
                })
                .map_err(|e| e.to_string())
        }
        Cmd::Bench {
            what: BenchKind::Sync,
            quick,
            out,
            ..
        } => {
            init_tracing(LogLevel::Warn);
            let opts = geomx_trainer::bench_sync::SyncBenchOptions {
                quick,
                out: out.unwrap_or_else(|| PathBuf::from("bench-sync")),
                exe: None,
            };
            geomx_trainer::bench_sync::run(&opts)
                .map(|r| {
                    println!("{}", geomx_trainer::bench_sync::render_markdown(&r));
                    eprintln!("bench sync: results in {}", opts.out.display());
                })
                .map_err(|e| e.to_string())
        }
        Cmd::Bench {
            what: BenchKind::Sched,
            quick,
            out,
            ..
        } => {
            init_tracing(LogLevel::Warn);
            let opts = geomx_trainer::bench_sched::SchedBenchOptions {
                quick,
                out: out.unwrap_or_else(|| PathBuf::from("bench-sched")),
                exe: None,
            };
            geomx_trainer::bench_sched::run(&opts)
                .map(|r| {
                    println!("{}", geomx_trainer::bench_sched::render_markdown(&r));
                    eprintln!("bench sched: results in {}", opts.out.display());
                })
                .map_err(|e| e.to_string())
        }
        Cmd::Bench {
            what: BenchKind::Tls,
            quick,
            ..
        } => {
            init_tracing(LogLevel::Warn);
            let opts = if quick {
                geomx_trainer::bench_tls::TlsBenchOptions::quick()
            } else {
                geomx_trainer::bench_tls::TlsBenchOptions::full()
            };
            geomx_trainer::bench_tls::run(&opts).map(|r| {
                eprint!("{}", geomx_trainer::bench_tls::render_markdown(&r));
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            })
        }
        Cmd::Bench {
            what: BenchKind::Dgt,
            quick,
            e2e,
            ..
        } => {
            init_tracing(LogLevel::Warn);
            let mut opts = if quick {
                geomx_trainer::bench_dgt::DgtBenchOptions::quick()
            } else {
                geomx_trainer::bench_dgt::DgtBenchOptions::full()
            };
            if let Some(r) = e2e.rounds {
                opts.rounds = r.max(1) as usize;
            }
            if let Some(p) = e2e.loss {
                opts.losses = vec![p];
            }
            opts.congestion = e2e.congestion;
            geomx_trainer::bench_dgt::run(&opts).map(|r| {
                eprint!("{}", geomx_trainer::bench_dgt::render_markdown(&r));
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            })
        }
        Cmd::Bench { what, quick, .. } => {
            let what = match what {
                BenchKind::Net => Bench::Net,
                BenchKind::Kernels => Bench::Kernels,
                // Handled by the arms above.
                BenchKind::E2e
                | BenchKind::Sync
                | BenchKind::Sched
                | BenchKind::Dgt
                | BenchKind::Tls => return ExitCode::FAILURE,
            };
            println!("{}", summary(what, quick));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
