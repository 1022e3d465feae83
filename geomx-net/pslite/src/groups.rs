//! ps-lite's node ids, groups and key ranges (pure functions), and the scheduler's barrier counter.

use std::collections::HashMap;

use crate::error::PsError;

/// The scheduler's node id.
pub const SCHEDULER: i32 = 1;
/// The server group bit.
pub const SERVER_GROUP: i32 = 2;
/// The worker group bit.
pub const WORKER_GROUP: i32 = 4;
/// Every group.
pub const ALL_GROUPS: i32 = SCHEDULER + SERVER_GROUP + WORKER_GROUP;

/// Node id of server `rank` (ps-lite: `rank * 2 + 8`).
pub fn server_id(rank: u32) -> i32 {
    rank as i32 * 2 + 8
}

/// Node id of worker `rank` (ps-lite: `rank * 2 + 9`).
pub fn worker_id(rank: u32) -> i32 {
    rank as i32 * 2 + 9
}

/// Rank of a server or worker node id (ps-lite: `max((id - 8) / 2, 0)`).
pub fn id_to_rank(id: i32) -> i32 {
    ((id - 8) / 2).max(0)
}

/// The node ids of a group (1..=7) or of a single node id, as ps-lite's `GetNodeIDs`.
pub fn node_ids(id: i32, servers: u32, workers: u32) -> Result<Vec<i32>, PsError> {
    if (1..=ALL_GROUPS).contains(&id) {
        let mut v = Vec::new();
        if id & WORKER_GROUP != 0 {
            v.extend((0..workers).map(worker_id));
        }
        if id & SERVER_GROUP != 0 {
            v.extend((0..servers).map(server_id));
        }
        if id & SCHEDULER != 0 {
            v.push(SCHEDULER);
        }
        return Ok(v);
    }
    let valid = id >= 8
        && ((id % 2 == 0 && id_to_rank(id) < servers as i32)
            || (id % 2 == 1 && id_to_rank(id) < workers as i32));
    if valid {
        Ok(vec![id])
    } else {
        Err(PsError::Invalid(format!(
            "node {id} doesn't exist ({servers} servers, {workers} workers)"
        )))
    }
}

/// Number of nodes a barrier on `group` waits for.
pub fn group_size(group: i32, servers: u32, workers: u32) -> usize {
    let mut n = 0;
    if group & SCHEDULER != 0 {
        n += 1;
    }
    if group & SERVER_GROUP != 0 {
        n += servers as usize;
    }
    if group & WORKER_GROUP != 0 {
        n += workers as usize;
    }
    n
}

/// Server `rank`'s key range `[begin, end)` with ps-lite's even split of `kMaxKey`.
pub fn key_range(rank: u32, servers: u32) -> (u64, u64) {
    let step = u64::MAX / servers.max(1) as u64;
    (step * rank as u64, step * (rank as u64 + 1))
}

/// Counts barrier entries per group; releases everyone once the group is complete.
#[derive(Debug)]
pub struct BarrierCounter<T> {
    waiting: HashMap<i32, Vec<T>>,
    servers: u32,
    workers: u32,
}

impl<T> BarrierCounter<T> {
    /// A counter for a job of this shape.
    pub fn new(servers: u32, workers: u32) -> Self {
        BarrierCounter {
            waiting: HashMap::new(),
            servers,
            workers,
        }
    }

    /// One entry into `group`'s barrier; returns everyone to release when it completes.
    pub fn enter(&mut self, group: i32, who: T) -> Result<Option<Vec<T>>, PsError> {
        if !(1..=ALL_GROUPS).contains(&group) {
            return Err(PsError::Invalid(format!(
                "barrier group {group} is not in 1..=7"
            )));
        }
        let need = group_size(group, self.servers, self.workers);
        let w = self.waiting.entry(group).or_default();
        w.push(who);
        if w.len() < need {
            return Ok(None);
        }
        Ok(self.waiting.remove(&group))
    }

    /// Everyone still waiting (to fail them).
    pub fn drain(&mut self) -> Vec<T> {
        self.waiting.drain().flat_map(|(_, v)| v).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_groups_match_ps_lite() {
        assert_eq!(
            (server_id(0), server_id(1), worker_id(0), worker_id(2)),
            (8, 10, 9, 13)
        );
        assert_eq!((id_to_rank(8), id_to_rank(13), id_to_rank(1)), (0, 2, 0));
        assert_eq!(node_ids(7, 2, 3).unwrap(), vec![9, 11, 13, 8, 10, 1]);
        assert_eq!(node_ids(WORKER_GROUP, 2, 3).unwrap(), vec![9, 11, 13]);
        assert_eq!(
            node_ids(SERVER_GROUP + SCHEDULER, 2, 3).unwrap(),
            vec![8, 10, 1]
        );
        assert_eq!(node_ids(10, 2, 3).unwrap(), vec![10]);
        assert!(node_ids(12, 2, 3).is_err());
        assert!(node_ids(15, 2, 3).is_err());
        assert!(node_ids(0, 2, 3).is_err());
        assert!(node_ids(-3, 2, 3).is_err());
        assert_eq!(group_size(6, 2, 3), 5);
    }

    #[test]
    fn key_ranges_split_kmaxkey_evenly() {
        assert_eq!(key_range(0, 1), (0, u64::MAX));
        let (a, b) = (key_range(0, 2), key_range(1, 2));
        assert_eq!(a.1, b.0);
        assert_eq!(b.1, u64::MAX - 1, "kMaxKey / 2 * 2");
        assert_eq!(key_range(2, 3).1, u64::MAX);
    }

    #[test]
    fn barrier_releases_complete_groups_only() {
        let mut b = BarrierCounter::new(2, 1);
        assert_eq!(b.enter(6, 'a').unwrap(), None);
        assert_eq!(b.enter(1, 'z').unwrap(), Some(vec!['z']));
        assert_eq!(b.enter(6, 'b').unwrap(), None);
        assert_eq!(b.enter(6, 'c').unwrap(), Some(vec!['a', 'b', 'c']));
        assert_eq!(b.enter(7, 'x').unwrap(), None);
        assert!(b.enter(9, 'q').is_err());
        assert_eq!(b.drain(), vec!['x']);
    }
}
