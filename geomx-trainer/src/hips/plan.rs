//! The cluster plan: who exists, which keys exist, who owns which range. A pure function of the
//! configuration, so every process computes the same one.

use crate::placement::{Placement, PlacementError};

/// Role names as registered with the coordinator.
pub mod roles {
    /// A global server (central DC).
    pub const GLOBAL_SERVER: &str = "global_server";
    /// The local server of a DC.
    pub const LOCAL_SERVER: &str = "local_server";
    /// A worker.
    pub const WORKER: &str = "worker";
    /// The coordinator (never registers; used in abort notices).
    pub const COORDINATOR: &str = "coordinator";
}

/// Topology and key layout of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlan {
    /// n_d: workers of each DC that trains (index = DC).
    pub workers_per_dc: Vec<usize>,
    /// DC index the global servers run in (registration identity only).
    pub central_dc: u32,
    /// Element count of every key (tensor), in key order.
    pub key_lens: Vec<usize>,
    /// MultiGPS placement of the keys' ranges on the global servers.
    pub placement: Placement,
}

impl ClusterPlan {
    /// Builds the plan; `bound_max` and `min_range` are the placement's split bounds.
    pub fn new(
        workers_per_dc: Vec<usize>,
        global_servers: usize,
        central_dc: u32,
        key_lens: Vec<usize>,
        bound_max: usize,
        min_range: usize,
    ) -> Result<Self, PlacementError> {
        let placement = Placement::compute(&key_lens, global_servers, bound_max, min_range)?;
        Ok(Self {
            workers_per_dc,
            central_dc,
            key_lens,
            placement,
        })
    }

    /// D: number of DCs with a local server.
    pub fn num_dcs(&self) -> usize {
        self.workers_per_dc.len()
    }

    /// W: workers in all DCs.
    pub fn total_workers(&self) -> usize {
        self.workers_per_dc.iter().sum()
    }

    /// S: number of global servers.
    pub fn num_global_servers(&self) -> usize {
        self.placement.num_servers()
    }

    /// The ranges of `key` as (range id, offset, length), in offset order (empty for an unknown
    /// key): the segments of a reply that travels per range.
    pub fn key_parts(&self, key: usize) -> Vec<(usize, usize, usize)> {
        self.placement
            .key_ranges(key)
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                self.placement
                    .range_id(key, i)
                    .map(|id| (id, r.offset, r.len))
            })
            .collect()
    }

    /// Every process the coordinator must see register, as (role, dc, rank).
    pub fn expected_processes(&self) -> Vec<(String, u32, u32)> {
        let mut out = Vec::new();
        for s in 0..self.num_global_servers() {
            out.push((roles::GLOBAL_SERVER.to_string(), self.central_dc, s as u32));
        }
        for (d, &n) in self.workers_per_dc.iter().enumerate() {
            out.push((roles::LOCAL_SERVER.to_string(), d as u32, 0));
            for r in 0..n {
                out.push((roles::WORKER.to_string(), d as u32, r as u32));
            }
        }
        out
    }

    /// Hash of the plan (topology, key lengths and placement table), part of the config hash.
    pub fn hash(&self) -> u64 {
        let mut h = crate::hash::Fnv1a::new();
        h.write(&(self.workers_per_dc.len() as u64).to_le_bytes());
        for &n in &self.workers_per_dc {
            h.write(&(n as u64).to_le_bytes());
        }
        h.write(&u64::from(self.central_dc).to_le_bytes());
        for &n in &self.key_lens {
            h.write(&(n as u64).to_le_bytes());
        }
        h.write(&self.placement.hash().to_le_bytes());
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_processes_and_counts() {
        let p = ClusterPlan::new(vec![3, 1], 2, 0, vec![100, 10], 1000, 4).unwrap();
        assert_eq!(p.num_dcs(), 2);
        assert_eq!(p.total_workers(), 4);
        assert_eq!(p.num_global_servers(), 2);
        let e = p.expected_processes();
        assert_eq!(e.len(), 2 + 2 + 4);
        assert!(e.contains(&("worker".into(), 0, 2)));
        assert!(e.contains(&("global_server".into(), 0, 1)));
        assert!(e.contains(&("local_server".into(), 1, 0)));
    }

    #[test]
    fn hash_sees_topology_and_placement() {
        let a = ClusterPlan::new(vec![2, 2], 1, 0, vec![100, 10], 1000, 4).unwrap();
        let b = ClusterPlan::new(vec![2, 2], 2, 0, vec![100, 10], 1000, 4).unwrap();
        let c = ClusterPlan::new(vec![2, 1], 1, 0, vec![100, 10], 1000, 4).unwrap();
        assert_eq!(a.hash(), a.clone().hash());
        assert_ne!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
    }
}
