//! `geomx deploy …`: the subcommands and what they write.

use std::path::{Path, PathBuf};

use super::collect::{assemble, scan, Collected};
use super::k8s::{self, K8sOptions};
use super::slurm::{self, SlurmLayout, SlurmOptions};
use super::{yaml, DeployError, DEFAULT_COORDINATOR_PORT};
use crate::config::Config;
use crate::hips::JobSpec;

/// `geomx deploy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DeployCmd {
    /// Write DIR/geomx.sbatch (and the resolved job file DIR/geomx.toml): `sbatch --wait
    /// DIR/geomx.sbatch` runs the job; its report lands in DIR/report.json.
    Slurm {
        /// Job file (TOML).
        file: PathBuf,
        /// Output folder, on a file system the compute nodes share.
        #[arg(long)]
        out: PathBuf,
        /// One heterogeneous component per tier instead of one allocation (needs 1 + D nodes).
        #[arg(long)]
        het: bool,
        /// The geomx binary as the nodes see it (default: this binary).
        #[arg(long)]
        geomx: Option<String>,
        /// Slurm partition.
        #[arg(long)]
        partition: Option<String>,
        /// Time limit (`--time`).
        #[arg(long)]
        time: Option<String>,
        /// Coordinator port (default: 20000 + job id mod 10000).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Write DIR/geomx.yaml (ConfigMap, a headless Service and an Indexed Job per tier) and
    /// DIR/Containerfile.
    K8s {
        /// Job file (TOML).
        file: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Container image with geomx on its PATH.
        #[arg(long, default_value = concat!("geomx:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Resource name prefix (default: `geomx-<file stem>`).
        #[arg(long)]
        name: Option<String>,
        /// Namespace of the resources.
        #[arg(long)]
        namespace: Option<String>,
        /// Coordinator port.
        #[arg(long, default_value_t = DEFAULT_COORDINATOR_PORT)]
        port: u16,
        /// CPU request per pod.
        #[arg(long, default_value = "1")]
        cpu: String,
        /// Memory request per pod.
        #[arg(long, default_value = "1Gi")]
        memory: String,
    },
    /// Build the run report from the processes' output (the Slurm step's log, the pods' logs).
    Report {
        /// The job file the processes ran.
        #[arg(long)]
        config: PathBuf,
        /// Where to write the JSON report.
        #[arg(long)]
        out: PathBuf,
        /// Unix time (seconds) the job started, for wall_seconds.
        #[arg(long)]
        started: Option<f64>,
        /// Output files holding the processes' GEOMX_STATS / GEOMX_PROGRESS lines.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
}

fn write(path: &Path, text: &str) -> Result<(), DeployError> {
    std::fs::write(path, text)
        .map_err(|e| DeployError::io(format!("writing {}", path.display()), e))
}

fn absolute(p: &Path) -> Result<PathBuf, DeployError> {
    std::fs::create_dir_all(p)
        .map_err(|e| DeployError::io(format!("creating {}", p.display()), e))?;
    p.canonicalize()
        .map_err(|e| DeployError::io(format!("resolving {}", p.display()), e))
}

fn stem(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "job".into())
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The job file `file`, refused when it leaves to `geomx launch` what a deployed job must fix:
/// a P3 slice size of `"auto"`.
fn deployable(file: &std::path::Path) -> Result<Config, DeployError> {
    let cfg = Config::load(file)?;
    if crate::launch::slices::wanted(&cfg) {
        return Err(crate::config::ConfigError::invalid(
            "scheduling.p3.slice_elems",
            "\"auto\" is tuned by `geomx launch` on one machine; a deployed job needs a number \
             of elements (a `geomx launch` of the job reports the size it chose as \
             p3_tuning.chosen)",
        )
        .into());
    }
    Ok(cfg)
}

/// Runs one `geomx deploy` subcommand; prints what it wrote.
pub fn run(cmd: DeployCmd) -> Result<(), DeployError> {
    match cmd {
        DeployCmd::Slurm {
            file,
            out,
            het,
            geomx,
            partition,
            time,
            port,
        } => {
            let cfg = deployable(&file)?;
            let dir = absolute(&out)?;
            let geomx = match geomx {
                Some(g) => g,
                None => std::env::current_exe()
                    .map_err(|e| DeployError::io("locating the geomx binary", e))?
                    .display()
                    .to_string(),
            };
            let o = SlurmOptions {
                layout: if het {
                    SlurmLayout::Heterogeneous
                } else {
                    SlurmLayout::Allocation
                },
                geomx,
                dir: dir.display().to_string(),
                config_file: "geomx.toml".into(),
                job_name: k8s::dns_label(&format!("geomx-{}", stem(&file))),
                partition,
                time,
                coordinator_port: port,
            };
            let script = slurm::sbatch(&cfg, &o)?;
            let text = cfg
                .to_toml_string()
                .map_err(|e| DeployError::Invalid(format!("writing the job file: {e}")))?;
            write(&dir.join("geomx.toml"), &text)?;
            let sb = dir.join("geomx.sbatch");
            write(&sb, &script)?;
            println!(
                "wrote {} and {}",
                sb.display(),
                dir.join("geomx.toml").display()
            );
            Ok(())
        }
        DeployCmd::K8s {
            file,
            out,
            image,
            name,
            namespace,
            port,
            cpu,
            memory,
        } => {
            let cfg = deployable(&file)?;
            let dir = absolute(&out)?;
            let o = K8sOptions {
                name: name.unwrap_or_else(|| k8s::dns_label(&format!("geomx-{}", stem(&file)))),
                image,
                namespace,
                coordinator_port: port,
                cpu,
                memory,
            };
            let text = cfg
                .to_toml_string()
                .map_err(|e| DeployError::Invalid(format!("writing the job file: {e}")))?;
            let docs = k8s::manifests(&cfg, &text, &o)?;
            let y = dir.join("geomx.yaml");
            write(&y, &yaml::documents(&docs))?;
            let c = dir.join("Containerfile");
            write(&c, &k8s::containerfile(&cfg, &o.image))?;
            println!("wrote {} and {}", y.display(), c.display());
            Ok(())
        }
        DeployCmd::Report {
            config,
            out,
            started,
            logs,
        } => {
            let cfg = Config::load(&config)?;
            let mut c = Collected::default();
            for l in &logs {
                let text = std::fs::read_to_string(l)
                    .map_err(|e| DeployError::io(format!("reading {}", l.display()), e))?;
                scan(&text, &l.display().to_string(), &mut c)?;
            }
            let job = JobSpec::from_config(&cfg)
                .map_err(|e| DeployError::Invalid(format!("{}: {e}", config.display())))?;
            let wall = started.map_or(0.0, |s| (now_unix() - s).max(0.0));
            let report = assemble(
                &cfg,
                c,
                job.rounds,
                job.plan.placement.server_bytes.clone(),
                wall,
            )?;
            let json = serde_json::to_string_pretty(&report)
                .map_err(|e| DeployError::Invalid(format!("encoding the report: {e}")))?;
            write(&out, &json)?;
            println!(
                "report {}: {} rounds, test accuracy {:.4}, param_hash {}, replicas identical: {}",
                out.display(),
                report.rounds,
                report.final_test_accuracy,
                report.param_hash,
                report.replicas_identical
            );
            Ok(())
        }
    }
}
