//! Per-worker mini-batch iteration with a seeded shuffle per epoch.

use super::{rng, DataError, Dataset};

/// Endless iterator over full mini-batches of one worker's shard.
///
/// Epoch `e` visits the shard in the order of a shuffle seeded by `(seed, worker, e)`; a tail shorter
/// than `batch_size` is skipped, so every batch is full and every worker with an equal shard runs
/// the same number of batches per epoch.
#[derive(Debug, Clone)]
pub struct Batcher {
    shard: Vec<usize>,
    order: Vec<usize>,
    batch_size: usize,
    seed: u64,
    worker: u64,
    epoch: u64,
    pos: usize,
}

impl Batcher {
    /// A batcher over `shard` (indices into the training set) for global worker index `worker`.
    pub fn new(
        shard: Vec<usize>,
        batch_size: usize,
        seed: u64,
        worker: u64,
    ) -> Result<Self, DataError> {
        if batch_size == 0 || batch_size > shard.len() {
            return Err(DataError::Split(format!(
                "batch size {batch_size} does not fit a shard of {} samples",
                shard.len()
            )));
        }
        let mut b = Self {
            order: Vec::new(),
            shard,
            batch_size,
            seed,
            worker,
            epoch: 0,
            pos: 0,
        };
        b.reshuffle();
        Ok(b)
    }

    fn reshuffle(&mut self) {
        self.order.clone_from(&self.shard);
        let mut r = rng::rng_for(self.seed, &[0x0042_4154_4348, self.worker, self.epoch]);
        rng::shuffle(&mut self.order, &mut r);
        self.pos = 0;
    }

    /// The shard: indices into the training set.
    pub fn shard(&self) -> &[usize] {
        &self.shard
    }

    /// Full batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.shard.len() / self.batch_size
    }

    /// The epoch the next batch belongs to (starting at 0).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where the iteration stands, `(epoch, position in the epoch's order)`: with the
    /// constructor's arguments, all a checkpoint needs to continue it ([`Batcher::seek`]).
    pub fn cursor(&self) -> (u64, usize) {
        (self.epoch, self.pos)
    }

    /// Continues from a [`Batcher::cursor`] of a batcher built with the same arguments; a
    /// position past the epoch's order is refused.
    pub fn seek(&mut self, epoch: u64, pos: usize) -> Result<(), DataError> {
        if pos > self.shard.len() {
            return Err(DataError::Split(format!(
                "batch cursor {pos} is past a shard of {} samples",
                self.shard.len()
            )));
        }
        self.epoch = epoch;
        self.reshuffle();
        self.pos = pos;
        Ok(())
    }

    /// Continues as if `batches` batches had been taken since the start (a worker rejoining a
    /// running job at round `batches` takes that round's batch, as it would have).
    pub fn skip_to(&mut self, batches: u64) {
        let per_epoch = self.batches_per_epoch().max(1) as u64;
        self.epoch = batches / per_epoch;
        self.reshuffle();
        self.pos = (batches % per_epoch) as usize * self.batch_size;
    }

    /// Indices of the next batch.
    pub fn next_indices(&mut self) -> &[usize] {
        if self.pos + self.batch_size > self.order.len() {
            self.epoch += 1;
            self.reshuffle();
        }
        let start = self.pos;
        self.pos += self.batch_size;
        &self.order[start..self.pos]
    }

    /// The next batch gathered from `data` (the training set the shard indexes).
    pub fn next_batch(&mut self, data: &Dataset) -> Dataset {
        let idx = self.next_indices().to_vec();
        data.gather(&idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sought_cursor_continues_the_same_sequence() {
        let shard: Vec<usize> = (0..10).collect();
        let mut a = Batcher::new(shard.clone(), 3, 4, 1).unwrap();
        for _ in 0..4 {
            a.next_indices();
        }
        let (epoch, pos) = a.cursor();
        assert_eq!((epoch, pos), (1, 3));
        let mut b = Batcher::new(shard.clone(), 3, 4, 1).unwrap();
        b.seek(epoch, pos).unwrap();
        for _ in 0..7 {
            assert_eq!(a.next_indices(), b.next_indices());
        }
        assert!(b.seek(0, 11).is_err());
    }

    #[test]
    fn skipping_to_a_batch_continues_the_sequence_there() {
        let shard: Vec<usize> = (0..10).collect();
        for n in [0u64, 1, 3, 4, 7, 9] {
            let mut a = Batcher::new(shard.clone(), 3, 4, 1).unwrap();
            for _ in 0..n {
                a.next_indices();
            }
            let mut b = Batcher::new(shard.clone(), 3, 4, 1).unwrap();
            b.skip_to(n);
            for _ in 0..5 {
                assert_eq!(a.next_indices(), b.next_indices(), "after {n} batches");
            }
        }
    }

    #[test]
    fn epochs_cover_the_shard_once_and_reshuffle() {
        let shard: Vec<usize> = (100..110).collect();
        let mut b = Batcher::new(shard.clone(), 3, 4, 1).unwrap();
        assert_eq!(b.batches_per_epoch(), 3);
        let mut epoch0 = Vec::new();
        for _ in 0..3 {
            assert_eq!(b.epoch(), 0);
            epoch0.extend_from_slice(b.next_indices());
        }
        let mut epoch1 = Vec::new();
        for _ in 0..3 {
            epoch1.extend_from_slice(b.next_indices());
            assert_eq!(b.epoch(), 1);
        }
        for e in [&epoch0, &epoch1] {
            let mut s = e.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), 9);
            assert!(s.iter().all(|i| shard.contains(i)));
        }
        assert_ne!(epoch0, epoch1);
        // Same seed and worker: same sequence; another worker: another one.
        let mut again = Batcher::new(shard.clone(), 3, 4, 1).unwrap();
        assert_eq!(again.next_indices(), &epoch0[..3]);
        let mut other = Batcher::new(shard, 3, 4, 2).unwrap();
        assert_ne!(other.next_indices(), &epoch0[..3]);
    }

    #[test]
    fn batch_larger_than_shard_is_rejected() {
        assert!(Batcher::new(vec![1, 2], 3, 0, 0).is_err());
        assert!(Batcher::new(vec![1, 2], 0, 0, 0).is_err());
    }

    #[test]
    fn next_batch_gathers_rows() {
        let d = Dataset::new((0..8).map(|v| v as f32).collect(), vec![0, 1, 0, 1], 2, 2).unwrap();
        let mut b = Batcher::new(vec![0, 1, 2, 3], 4, 0, 0).unwrap();
        let batch = b.next_batch(&d);
        assert_eq!(batch.len(), 4);
        let mut rows: Vec<f32> = batch.features().iter().step_by(2).copied().collect();
        rows.sort_by(f32::total_cmp);
        assert_eq!(rows, vec![0.0, 2.0, 4.0, 6.0]);
    }
}
