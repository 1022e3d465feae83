//! Sharding the training set across the W workers of a run.
//!
//! Worker `w` is the global worker index: data centers in configuration order, ranks in order
//! within each. Every shard has the same size ⌊n / W⌋; the remaining `n mod W` samples are left out
//! so that every worker runs the same number of batches per epoch.

pub use crate::config::ShardStrategy;

use super::{rng, DataError};

/// Returns the sample indices of each of `workers` shards (each of length ⌊n / workers⌋).
pub fn shard_indices(
    labels: &[u32],
    workers: usize,
    strategy: ShardStrategy,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    if workers == 0 || labels.len() < workers {
        return Err(DataError::Split(format!(
            "{} samples cannot be shared by {workers} workers",
            labels.len()
        )));
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    match strategy {
        ShardStrategy::Iid => {
            rng::shuffle(&mut order, &mut rng::rng_for(seed, &[0x0053_4841_5244]))
        }
        ShardStrategy::ByClass => order.sort_by_key(|&i| labels[i]),
    }
    let per = labels.len() / workers;
    Ok(order
        .chunks_exact(per)
        .take(workers)
        .map(<[usize]>::to_vec)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u32> {
        (0..103u32).map(|i| (i * 7) % 5).collect()
    }

    #[test]
    fn iid_shards_are_equal_disjoint_and_seeded() {
        let l = labels();
        let s = shard_indices(&l, 4, ShardStrategy::Iid, 5).unwrap();
        assert_eq!(s.len(), 4);
        assert!(s.iter().all(|x| x.len() == 25));
        let mut all: Vec<usize> = s.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 100);
        assert_eq!(s, shard_indices(&l, 4, ShardStrategy::Iid, 5).unwrap());
        assert_ne!(s, shard_indices(&l, 4, ShardStrategy::Iid, 6).unwrap());
        // A shuffle mixes classes: every shard sees at least 3 of the 5 labels.
        for shard in &s {
            let mut seen: Vec<u32> = shard.iter().map(|&i| l[i]).collect();
            seen.sort_unstable();
            seen.dedup();
            assert!(seen.len() >= 3, "{seen:?}");
        }
    }

    #[test]
    fn by_class_shards_are_label_sorted_blocks() {
        let l = labels();
        let s = shard_indices(&l, 5, ShardStrategy::ByClass, 0).unwrap();
        // 103 samples, about 21 per class (labels 0..5): shard w holds label w only, except for
        // the boundary spill of one or two samples.
        for (w, shard) in s.iter().enumerate() {
            assert_eq!(shard.len(), 20);
            let labels_in: Vec<u32> = shard.iter().map(|&i| l[i]).collect();
            assert!(labels_in.windows(2).all(|p| p[0] <= p[1]));
            let majority = labels_in.iter().filter(|&&x| x as usize == w).count();
            assert!(majority >= 16, "shard {w}: {labels_in:?}");
        }
    }

    #[test]
    fn too_many_workers_is_an_error() {
        assert!(shard_indices(&[0, 1], 3, ShardStrategy::Iid, 0).is_err());
        assert!(shard_indices(&[0, 1], 0, ShardStrategy::ByClass, 0).is_err());
    }
}
