//! The role table: which task of a job is which role, a pure function of the job file.
//!
//! A job of S global servers and data centers 0..D with n_d workers has N = 1 + S + Σ(1 + n_d)
//! processes, in **tiers**:
//!
//! | tier | index in tier | role |
//! |---|---|---|
//! | 0 (central) | 0 | coordinator |
//! | 0 (central) | 1..=S | global server, rank index − 1 |
//! | d + 1 (data center d) | 0 | local server of DC d |
//! | d + 1 (data center d) | 1..=n_d | worker of DC d, rank index − 1 |
//!
//! The flat task index (Slurm's `SLURM_PROCID` in one allocation, torchrun's `RANK`, one Indexed
//! Job over the whole job) runs through the tiers in this order. Launchers with one group per tier
//! (Slurm heterogeneous components, one Kubernetes Job or LeaderWorkerSet group per tier) give the
//! tier and the index in it.

use std::fmt;

use super::DeployError;
use crate::config::{Config, Role, RoleSpec};

/// A group of processes that runs together: the central tier or one data center.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The coordinator and the global servers.
    Central,
    /// Data center `d` (index into `cluster.data_centers`): its local server and workers.
    Dc(u32),
}

impl Tier {
    /// The tier with position `i` in the table (0 = central, d + 1 = DC d).
    pub fn from_position(i: usize) -> Tier {
        match i {
            0 => Tier::Central,
            i => Tier::Dc(i as u32 - 1),
        }
    }

    /// This tier's position in the table.
    pub fn position(self) -> usize {
        match self {
            Tier::Central => 0,
            Tier::Dc(d) => d as usize + 1,
        }
    }

    /// Parses `GEOMX_TIER`: `central` or a data-center index.
    pub fn parse(s: &str) -> Option<Tier> {
        match s.trim() {
            "central" => Some(Tier::Central),
            n if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                n.parse().ok().map(Tier::Dc)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Central => f.pad("central"),
            Tier::Dc(d) => f.pad(&d.to_string()),
        }
    }
}

/// One process of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    /// Its role.
    pub role: Role,
    /// Data-center index (the central DC's index for the central tier, as `geomx launch` does).
    pub dc: u32,
    /// Rank within the role (and DC).
    pub rank: u32,
}

impl Task {
    /// The [`RoleSpec`] `geomx run` runs this task with.
    pub fn spec(&self) -> RoleSpec {
        RoleSpec::new(self.role, self.dc, self.rank)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (dc {}, rank {})", self.role, self.dc, self.rank)
    }
}

/// The job's tasks by tier; see the module doc for the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleTable {
    /// DC index of the central tier's processes (`cluster.central_dc`'s position, or D for a
    /// separate site).
    pub central_dc: u32,
    /// S.
    pub global_servers: u32,
    /// n_d of each data center.
    pub workers: Vec<u32>,
    /// Names of the data centers (for messages).
    pub dc_names: Vec<String>,
}

impl RoleTable {
    /// The table of a (validated) configuration.
    pub fn from_config(cfg: &Config) -> Self {
        let dcs = &cfg.cluster.data_centers;
        Self {
            central_dc: dcs
                .iter()
                .position(|d| d.name == cfg.cluster.central_dc)
                .unwrap_or(dcs.len()) as u32,
            global_servers: cfg.cluster.global_servers as u32,
            workers: dcs.iter().map(|d| d.workers as u32).collect(),
            dc_names: dcs.iter().map(|d| d.name.clone()).collect(),
        }
    }

    /// Number of tiers, 1 + D.
    pub fn tiers(&self) -> usize {
        1 + self.workers.len()
    }

    /// Whether `tier` exists in this job.
    pub fn has(&self, tier: Tier) -> bool {
        match tier {
            Tier::Central => true,
            Tier::Dc(d) => (d as usize) < self.workers.len(),
        }
    }

    /// Processes in `tier` (1 + S, or 1 + n_d); 0 for a tier the job does not have.
    pub fn tier_len(&self, tier: Tier) -> usize {
        match tier {
            Tier::Central => 1 + self.global_servers as usize,
            Tier::Dc(d) => self.workers.get(d as usize).map_or(0, |&n| 1 + n as usize),
        }
    }

    /// Flat index of `tier`'s first process.
    pub fn tier_offset(&self, tier: Tier) -> usize {
        (0..tier.position())
            .map(|i| self.tier_len(Tier::from_position(i)))
            .sum()
    }

    /// N, every process of the job.
    pub fn len(&self) -> usize {
        (0..self.tiers())
            .map(|i| self.tier_len(Tier::from_position(i)))
            .sum()
    }

    /// Never true: a job has at least its coordinator.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Process `index` of `tier`, if it exists.
    pub fn task(&self, tier: Tier, index: usize) -> Option<Task> {
        if index >= self.tier_len(tier) {
            return None;
        }
        let i = index as u32;
        Some(match (tier, i) {
            (Tier::Central, 0) => Task {
                role: Role::Coordinator,
                dc: self.central_dc,
                rank: 0,
            },
            (Tier::Central, s) => Task {
                role: Role::GlobalServer,
                dc: self.central_dc,
                rank: s - 1,
            },
            (Tier::Dc(d), 0) => Task {
                role: Role::LocalServer,
                dc: d,
                rank: 0,
            },
            (Tier::Dc(d), r) => Task {
                role: Role::Worker,
                dc: d,
                rank: r - 1,
            },
        })
    }

    /// The tier and index in it of flat task `index`, if it exists.
    pub fn locate(&self, index: usize) -> Option<(Tier, usize)> {
        let mut offset = 0;
        for i in 0..self.tiers() {
            let t = Tier::from_position(i);
            let n = self.tier_len(t);
            if index < offset + n {
                return Some((t, index - offset));
            }
            offset += n;
        }
        None
    }

    /// Flat task `index`, if it exists.
    pub fn flat(&self, index: usize) -> Option<Task> {
        self.locate(index).and_then(|(t, i)| self.task(t, i))
    }

    /// Every task in flat order.
    pub fn all(&self) -> Vec<Task> {
        (0..self.len()).filter_map(|i| self.flat(i)).collect()
    }

    /// What the job consists of, for messages: `8 processes: 1 coordinator, 1 global server, 2
    /// local servers, 4 workers`.
    pub fn summary(&self) -> String {
        let plural = |n: usize, what: &str| {
            if n == 1 {
                format!("1 {what}")
            } else {
                format!("{n} {what}s")
            }
        };
        format!(
            "{} processes: 1 coordinator, {}, {}, {}",
            self.len(),
            plural(self.global_servers as usize, "global server"),
            plural(self.workers.len(), "local server"),
            plural(self.workers.iter().map(|&n| n as usize).sum(), "worker")
        )
    }

    /// Checks that `tier` exists, naming `var` (the variable that gave it) otherwise.
    pub fn check_tier(&self, var: &str, tier: Tier) -> Result<(), DeployError> {
        if self.has(tier) {
            return Ok(());
        }
        Err(DeployError::env(
            var,
            format!(
                "{tier}, but the job file has data centers 0..{} only; expected \"central\" or a \
                 data-center index below {}",
                self.workers.len().saturating_sub(1),
                self.workers.len()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(toml: &str) -> RoleTable {
        RoleTable::from_config(&Config::from_toml_str(toml).unwrap())
    }

    fn row(t: Task) -> (Role, u32, u32) {
        (t.role, t.dc, t.rank)
    }

    #[test]
    fn vanilla_hips_flat_order() {
        let t = RoleTable::from_config(&Config::default());
        assert_eq!(t.len(), 8);
        assert_eq!(t.tiers(), 3);
        let rows: Vec<_> = t.all().into_iter().map(row).collect();
        use Role::*;
        assert_eq!(
            rows,
            [
                (Coordinator, 2, 0),
                (GlobalServer, 2, 0),
                (LocalServer, 0, 0),
                (Worker, 0, 0),
                (Worker, 0, 1),
                (LocalServer, 1, 0),
                (Worker, 1, 0),
                (Worker, 1, 1),
            ]
        );
        assert_eq!(
            t.summary(),
            "8 processes: 1 coordinator, 1 global server, 2 local servers, 4 workers"
        );
        assert_eq!(t.flat(8), None);
    }

    #[test]
    fn tiers_of_an_uneven_job_with_a_training_central_dc() {
        let t = table(
            r#"
            [cluster]
            global_servers = 2
            central_dc = "b"
            [[cluster.data_centers]]
            name = "a"
            workers = 1
            [[cluster.data_centers]]
            name = "b"
            workers = 3
            "#,
        );
        assert_eq!(t.central_dc, 1);
        assert_eq!(t.len(), 3 + 2 + 4);
        assert_eq!(t.tier_offset(Tier::Central), 0);
        assert_eq!(t.tier_offset(Tier::Dc(0)), 3);
        assert_eq!(t.tier_offset(Tier::Dc(1)), 5);
        assert_eq!(t.locate(4), Some((Tier::Dc(0), 1)));
        assert_eq!(row(t.flat(2).unwrap()), (Role::GlobalServer, 1, 1));
        assert_eq!(row(t.flat(8).unwrap()), (Role::Worker, 1, 2));
        assert_eq!(t.task(Tier::Dc(0), 2), None);
        assert_eq!(t.task(Tier::Dc(2), 0), None);
        // Every flat index maps to the (tier, index) that maps back to the same task.
        for i in 0..t.len() {
            let (tier, k) = t.locate(i).unwrap();
            assert_eq!(t.tier_offset(tier) + k, i);
            assert_eq!(t.task(tier, k), t.flat(i));
        }
    }

    #[test]
    fn tier_names_parse() {
        assert_eq!(Tier::parse("central"), Some(Tier::Central));
        assert_eq!(Tier::parse("0"), Some(Tier::Dc(0)));
        assert_eq!(Tier::parse(" 12 "), Some(Tier::Dc(12)));
        for bad in ["", "dc0", "-1", "Central", "1.0"] {
            assert_eq!(Tier::parse(bad), None, "{bad:?}");
        }
        for t in [Tier::Central, Tier::Dc(3)] {
            assert_eq!(Tier::parse(&t.to_string()), Some(t));
            assert_eq!(Tier::from_position(t.position()), t);
        }
        let t = RoleTable::from_config(&Config::default());
        let e = t.check_tier("GEOMX_TIER", Tier::Dc(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GEOMX_TIER: 2, but the job file has data centers 0..1 only; expected \"central\" or \
             a data-center index below 2"
        );
    }
}
