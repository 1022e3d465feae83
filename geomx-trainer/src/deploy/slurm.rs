//! `geomx deploy slurm FILE --out DIR`: the sbatch script of a job.
//!
//! Two layouts, both one `srun` step in which every task runs `geomx run --from-env`:
//!
//! - [`SlurmLayout::Allocation`] (default): one allocation of N tasks; task i is flat index i of
//!   the role table (coordinator, global servers, then each DC's local server and workers). Works
//!   on any cluster, a single node included.
//! - [`SlurmLayout::Heterogeneous`]: one heterogeneous component for the central tier and one per
//!   data center (`#SBATCH hetjob`), started together with `srun --het-group=0-D`, so that each
//!   DC can have its own partition or constraints. Slurm's backfill scheduler places each
//!   component on nodes of its own, so it needs 1 + D nodes.
//!
//! The step's stdout (every task's marked lines, `--label`led) goes to `DIR/job-<id>.log`; after
//! the step, `geomx deploy report` turns it into `DIR/report.json`, the report `geomx launch
//! --report` writes. Any task that fails ends the step (`--kill-on-bad-exit`), and the script
//! fails with it.

use std::fmt::Write as _;

use super::roles::{RoleTable, Tier};
use super::DeployError;
use crate::config::{Config, SecurityMode};

/// How the job's processes map onto Slurm tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlurmLayout {
    /// One allocation; task = flat index of the role table.
    #[default]
    Allocation,
    /// One heterogeneous component per tier.
    Heterogeneous,
}

/// What the script names besides the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmOptions {
    /// Task layout.
    pub layout: SlurmLayout,
    /// The `geomx` binary as the compute nodes see it (`$GEOMX` at submission overrides it).
    pub geomx: String,
    /// The output folder, absolute, on a file system the nodes share.
    pub dir: String,
    /// File name of the job file in `dir`.
    pub config_file: String,
    /// `--job-name`.
    pub job_name: String,
    /// `--partition`, if any.
    pub partition: Option<String>,
    /// `--time`, if any.
    pub time: Option<String>,
    /// The coordinator's port; `None`: 20000 + job id mod 10000 (docs/deployment.md).
    pub coordinator_port: Option<u16>,
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether the job's model computes on a GPU (`model.device` = `cuda…`).
pub fn uses_gpu(cfg: &Config) -> bool {
    cfg.model.device.starts_with("cuda")
}

fn check_directive(what: &str, v: &str) -> Result<(), DeployError> {
    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(DeployError::Invalid(format!(
            "{what} {v:?}: expected a value without spaces"
        )));
    }
    Ok(())
}

/// The sbatch script for the job `cfg` describes.
pub fn sbatch(cfg: &Config, o: &SlurmOptions) -> Result<String, DeployError> {
    if !o.dir.starts_with('/') {
        return Err(DeployError::Invalid(format!(
            "output folder {:?}: expected an absolute path",
            o.dir
        )));
    }
    if o.dir.contains('%') || o.dir.contains('\n') {
        return Err(DeployError::Invalid(format!(
            "output folder {:?}: '%' and newlines do not survive #SBATCH --output",
            o.dir
        )));
    }
    check_directive("job name", &o.job_name)?;
    for (what, v) in [("partition", &o.partition), ("time", &o.time)] {
        if let Some(v) = v {
            check_directive(what, v)?;
        }
    }
    let table = RoleTable::from_config(cfg);
    let gpu = uses_gpu(cfg);
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "#!/bin/bash");
    let _ = writeln!(
        w,
        "# geomx {}: `geomx deploy slurm` wrote this script (docs/deployment.md).",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        w,
        "# Submit with: sbatch {}",
        sh_quote(&format!("{}/geomx.sbatch", o.dir))
    );
    let _ = writeln!(w, "# The report is written to {}/report.json.", o.dir);
    let _ = writeln!(w, "#");
    match o.layout {
        SlurmLayout::Allocation => {
            let _ = writeln!(w, "# One allocation of {} tasks; task = role:", table.len());
        }
        SlurmLayout::Heterogeneous => {
            let _ = writeln!(
                w,
                "# One heterogeneous component per tier ({} components); task = role:",
                table.tiers()
            );
        }
    }
    for (i, t) in table.all().iter().enumerate() {
        let (tier, _) = table.locate(i).unwrap_or((Tier::Central, 0));
        let component = match o.layout {
            SlurmLayout::Allocation => String::new(),
            SlurmLayout::Heterogeneous => format!("  component {}", tier.position()),
        };
        let _ = writeln!(w, "#   task {i:>3}{component}  tier {tier:<7}  {t}");
    }
    let dir_sb = o.dir.replace(' ', "\\ ");
    let directive = |w: &mut String, lines: &[String]| {
        for l in lines {
            let _ = writeln!(w, "#SBATCH {l}");
        }
    };
    let mut common = vec![format!("--job-name={}", o.job_name)];
    if let Some(p) = &o.partition {
        common.push(format!("--partition={p}"));
    }
    if let Some(t) = &o.time {
        common.push(format!("--time={t}"));
    }
    let workers_of = |tier: Tier| match tier {
        Tier::Central => 0,
        Tier::Dc(d) => table.workers[d as usize] as usize,
    };
    match o.layout {
        SlurmLayout::Allocation => {
            let mut d = common.clone();
            d.push(format!("--ntasks={}", table.len()));
            d.push(format!("--output={dir_sb}/slurm-%j.out"));
            if gpu {
                d.push(format!("--gpus={}", table.workers.iter().sum::<u32>()));
            }
            directive(w, &d);
        }
        SlurmLayout::Heterogeneous => {
            for c in 0..table.tiers() {
                let tier = Tier::from_position(c);
                if c > 0 {
                    let _ = writeln!(w, "#SBATCH hetjob");
                }
                let mut d = if c == 0 { common.clone() } else { Vec::new() };
                d.push(format!("--ntasks={}", table.tier_len(tier)));
                if c == 0 {
                    d.push(format!("--output={dir_sb}/slurm-%j.out"));
                } else if let Some(p) = &o.partition {
                    d.push(format!("--partition={p}"));
                }
                if gpu && workers_of(tier) > 0 {
                    d.push(format!("--gpus={}", workers_of(tier)));
                }
                directive(w, &d);
            }
        }
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "set -euo pipefail");
    let _ = writeln!(w, "GEOMX=${{GEOMX:-{}}}", sh_quote(&o.geomx));
    let _ = writeln!(w, "DIR={}", sh_quote(&o.dir));
    let _ = writeln!(w, "CONFIG=\"$DIR\"/{}", sh_quote(&o.config_file));
    if let Some(p) = o.coordinator_port {
        let _ = writeln!(w, "export GEOMX_COORDINATOR_PORT={p}");
    }
    if cfg.security.mode == SecurityMode::Mtls && cfg.security.dir.is_none() {
        // A fresh CA and every task's key per job, on the shared folder, readable by the job's
        // user only; removed when the script ends.
        let _ = writeln!(
            w,
            "# Mutual TLS: a job CA and every task's key, private to this job (docs/security.md)."
        );
        let _ = writeln!(w, "export GEOMX_SECURITY_DIR=\"$DIR/pki-$SLURM_JOB_ID\"");
        let _ = writeln!(w, "(umask 077 && mkdir -p \"$GEOMX_SECURITY_DIR\")");
        let _ = writeln!(w, "trap 'rm -rf \"$GEOMX_SECURITY_DIR\"' EXIT");
        let _ = writeln!(w, "\"$GEOMX\" pki init --dir \"$GEOMX_SECURITY_DIR\"");
        let _ = writeln!(
            w,
            "\"$GEOMX\" pki issue --dir \"$GEOMX_SECURITY_DIR\" --config \"$CONFIG\""
        );
    }
    let _ = writeln!(w, "LOG=\"$DIR/job-$SLURM_JOB_ID.log\"");
    let _ = writeln!(w, "started=$(date +%s.%N)");
    let _ = writeln!(
        w,
        "# Every task reads its role from Slurm's variables; a task that fails ends the step."
    );
    let groups = match o.layout {
        SlurmLayout::Allocation => String::new(),
        SlurmLayout::Heterogeneous => format!(" --het-group=0-{}", table.tiers() - 1),
    };
    let _ = writeln!(
        w,
        "srun{groups} --kill-on-bad-exit=1 --label \"$GEOMX\" run --from-env --config \"$CONFIG\" >\"$LOG\""
    );
    let _ = writeln!(
        w,
        "\"$GEOMX\" deploy report --config \"$CONFIG\" --started \"$started\" --out \"$DIR/report.json\" \"$LOG\""
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(layout: SlurmLayout) -> SlurmOptions {
        SlurmOptions {
            layout,
            geomx: "/opt/geomx/bin/geomx".into(),
            dir: "/shared/run 1".into(),
            config_file: "geomx.toml".into(),
            job_name: "geomx-vanilla-hips".into(),
            partition: Some("gpu".into()),
            time: None,
            coordinator_port: None,
        }
    }

    #[test]
    fn one_allocation_of_every_role() {
        let s = sbatch(&Config::default(), &opts(SlurmLayout::Allocation)).unwrap();
        assert!(s.starts_with("#!/bin/bash\n"), "{s}");
        assert!(s.contains("#SBATCH --ntasks=8\n"), "{s}");
        assert!(s.contains("#SBATCH --partition=gpu\n"), "{s}");
        assert!(
            s.contains("#SBATCH --output=/shared/run\\ 1/slurm-%j.out\n"),
            "{s}"
        );
        assert!(!s.contains("hetjob") && !s.contains("--gpus"), "{s}");
        assert!(
            s.contains("pki issue --dir \"$GEOMX_SECURITY_DIR\" --config \"$CONFIG\"\n"),
            "{s}"
        );
        assert!(
            s.contains("#   task   0  tier central  coordinator (dc 2, rank 0)"),
            "{s}"
        );
        assert!(
            s.contains("#   task   7  tier 1        worker (dc 1, rank 1)"),
            "{s}"
        );
        assert!(
            s.contains("GEOMX=${GEOMX:-/opt/geomx/bin/geomx}\nDIR='/shared/run 1'\n"),
            "{s}"
        );
        assert!(s.contains(
            "srun --kill-on-bad-exit=1 --label \"$GEOMX\" run --from-env --config \"$CONFIG\" >\"$LOG\"\n"
        ), "{s}");
        assert!(s.contains("deploy report --config \"$CONFIG\""), "{s}");
        assert_eq!(s.matches("#SBATCH --ntasks").count(), 1);
    }

    #[test]
    fn heterogeneous_components_per_tier() {
        let mut cfg = Config::default();
        cfg.cluster.data_centers[1].workers = 3;
        cfg.model.device = "cuda:local".into();
        let mut o = opts(SlurmLayout::Heterogeneous);
        o.coordinator_port = Some(23456);
        let s = sbatch(&cfg, &o).unwrap();
        let directives: Vec<&str> = s.lines().filter(|l| l.starts_with("#SBATCH")).collect();
        assert_eq!(
            directives,
            [
                "#SBATCH --job-name=geomx-vanilla-hips",
                "#SBATCH --partition=gpu",
                "#SBATCH --ntasks=2",
                "#SBATCH --output=/shared/run\\ 1/slurm-%j.out",
                "#SBATCH hetjob",
                "#SBATCH --ntasks=3",
                "#SBATCH --partition=gpu",
                "#SBATCH --gpus=2",
                "#SBATCH hetjob",
                "#SBATCH --ntasks=4",
                "#SBATCH --partition=gpu",
                "#SBATCH --gpus=3",
            ]
        );
        assert!(
            s.contains("srun --het-group=0-2 --kill-on-bad-exit=1"),
            "{s}"
        );
        assert!(s.contains("export GEOMX_COORDINATOR_PORT=23456\n"), "{s}");
        assert!(
            s.contains("#   task   3  component 1  tier 0        worker (dc 0, rank 0)"),
            "{s}"
        );
    }

    #[test]
    fn refuses_what_sbatch_would_misread() {
        let mut o = opts(SlurmLayout::Allocation);
        o.dir = "relative".into();
        assert!(sbatch(&Config::default(), &o).is_err());
        let mut o = opts(SlurmLayout::Allocation);
        o.dir = "/a%b".into();
        assert!(sbatch(&Config::default(), &o).is_err());
        let mut o = opts(SlurmLayout::Allocation);
        o.job_name = "two words".into();
        assert!(sbatch(&Config::default(), &o).is_err());
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("/a/b-c.d"), "/a/b-c.d");
        assert_eq!(sh_quote(""), "''");
    }
}
