//! A worker's mini-batches prepared on a background thread while the model computes.
//!
//! The thread owns a copy of the worker's shard only (not the whole training set) and a clone of
//! its [`Batcher`], so the batches and their order are exactly the batcher's. It stays at most
//! `depth` batches ahead (a bounded channel). [`Prefetcher::cursor`] is the position after the
//! last batch handed out, not after the ones prepared ahead, so a checkpoint taken from it
//! resumes the same sequence. A model's [`Stage`] (a GPU back end copying the batch into
//! page-locked memory) runs on the thread too, after augmentation.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use super::{Batcher, DataError, Dataset, ImageAugment, Stage};

/// A batch and the batcher's cursor after it.
type Prepared = (Dataset, (u64, usize));

/// Mini-batches of a [`Batcher`], prepared ahead on a thread.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Option<Receiver<Prepared>>,
    cursor: (u64, usize),
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Prepares `batcher`'s batches from `train` (the training set its shard indexes), at most
    /// `depth` (≥ 1) ahead of the consumer, augmented by `augment` when given (the batch's stream
    /// is the batcher's cursor before it: `epoch << 32 | position`), then staged for the model's
    /// device by `stage` when given ([`Dataset::staged`]; a batch it fails on goes unstaged, with a
    /// warning the first time).
    pub fn new(
        batcher: Batcher,
        train: &Dataset,
        depth: usize,
        augment: Option<ImageAugment>,
        mut stage: Option<Stage>,
    ) -> Result<Prefetcher, DataError> {
        let shard = batcher.shard();
        if let Some(&bad) = shard.iter().find(|&&i| i >= train.len()) {
            return Err(DataError::Split(format!(
                "shard index {bad} is past a training set of {} samples",
                train.len()
            )));
        }
        // The thread's own data: the shard, and where each training index sits in it.
        let local = train.gather(shard);
        let mut position = vec![u32::MAX; train.len()];
        for (p, &i) in shard.iter().enumerate() {
            position[i] = p as u32;
        }
        let cursor = batcher.cursor();
        let (tx, rx) = sync_channel::<Prepared>(depth.max(1) - 1);
        let mut batcher = batcher;
        let thread = std::thread::Builder::new()
            .name("geomx-prefetch".into())
            .spawn(move || {
                let mut idx = Vec::new();
                let mut warned = false;
                loop {
                    let (epoch, pos) = batcher.cursor();
                    idx.clear();
                    idx.extend(batcher.next_indices().iter().map(|&i| position[i] as usize));
                    let mut batch = local.gather(&idx);
                    if let Some(a) = &augment {
                        let stream = epoch << 32 | pos as u64;
                        if let Err(e) = a.apply(&mut batch, stream) {
                            // The consumer sees the channel close; say why here.
                            tracing::error!("prefetch thread: augmentation failed: {e}");
                            return;
                        }
                    }
                    if let Some(st) = stage.as_mut() {
                        match st(&batch) {
                            Ok(s) => batch = batch.with_staged(s),
                            // The model copies the batch itself at its step.
                            Err(e) if !warned => {
                                warned = true;
                                tracing::warn!("prefetch thread: a batch was not staged: {e}");
                            }
                            Err(_) => {}
                        }
                    }
                    // The consumer dropped its end: stop.
                    if tx.send((batch, batcher.cursor())).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| DataError::Split(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Prefetcher {
            rx: Some(rx),
            cursor,
            thread: Some(thread),
        })
    }

    /// The next batch (waits for the thread when it is not ready yet).
    pub fn next_batch(&mut self) -> Result<Dataset, DataError> {
        let rx = self.rx.as_ref().expect("present until drop");
        let (batch, cursor) = rx
            .recv()
            .map_err(|_| DataError::Split("the prefetch thread stopped".into()))?;
        self.cursor = cursor;
        Ok(batch)
    }

    /// The batcher's cursor after the last batch handed out (see [`Batcher::cursor`]).
    pub fn cursor(&self) -> (u64, usize) {
        self.cursor
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel ends the thread at its next send.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Staged;

    fn data(n: usize) -> Dataset {
        let features = (0..n * 2).map(|i| i as f32).collect();
        let labels = (0..n).map(|i| (i % 3) as u32).collect();
        Dataset::new(features, labels, 2, 3).unwrap()
    }

    /// `n` images of `channels × side × side` whose values cycle with period `period`, labels
    /// cycling through 3 classes.
    fn images(n: usize, channels: usize, side: usize, period: usize) -> Dataset {
        let per = channels * side * side;
        let features = (0..n * per)
            .map(|i| (i % period) as f32 / period as f32)
            .collect();
        Dataset::new(features, (0..n as u32).map(|i| i % 3).collect(), per, 3).unwrap()
    }

    /// Random crops (padding 1) and flips of `channels × side × side` images seeded by `seed`,
    /// padding with `fill` (one value per channel).
    fn crop_flip(seed: u64, channels: usize, side: usize, fill: Vec<f32>) -> ImageAugment {
        ImageAugment::new(
            crate::data::Augment::new(seed, 1, true),
            channels,
            side,
            fill,
        )
        .unwrap()
    }

    /// `reference`'s next batch of `train`, augmented by `aug` with the stream of the cursor
    /// before it (what the prefetcher should hand out), and the batch unaugmented.
    fn augmented(
        reference: &mut Batcher,
        train: &Dataset,
        aug: &ImageAugment,
    ) -> (Dataset, Dataset) {
        let (epoch, pos) = reference.cursor();
        let plain = reference.next_batch(train);
        let mut want = plain.clone();
        aug.apply(&mut want, epoch << 32 | pos as u64).unwrap();
        (want, plain)
    }

    /// The prefetched batches equal the batcher's own, across epochs, and the cursor follows
    /// what was handed out, not what was prepared ahead.
    #[test]
    fn prefetched_batches_and_cursor_equal_the_batchers() {
        let train = data(50);
        let shard: Vec<usize> = (5..45).step_by(2).collect();
        let mut direct = Batcher::new(shard.clone(), 3, 7, 2).unwrap();
        for depth in [1, 2, 4] {
            let mut reference = direct.clone();
            let mut p = Prefetcher::new(direct.clone(), &train, depth, None, None).unwrap();
            for _ in 0..20 {
                let want = reference.next_batch(&train);
                let got = p.next_batch().unwrap();
                assert_eq!(got.features(), want.features(), "depth {depth}");
                assert_eq!(got.labels(), want.labels(), "depth {depth}");
                assert_eq!(p.cursor(), reference.cursor(), "depth {depth}");
            }
        }
        // A batcher resumed at a cursor prefetches from there.
        direct.seek(3, 4).unwrap();
        let mut reference = direct.clone();
        let mut p = Prefetcher::new(direct, &train, 2, None, None).unwrap();
        assert_eq!(p.cursor(), (3, 4));
        for _ in 0..5 {
            assert_eq!(
                p.next_batch().unwrap().labels(),
                reference.next_batch(&train).labels()
            );
        }
    }

    /// With an augmentation, each prefetched batch is the batcher's batch augmented with the
    /// stream of the cursor before it, so a resumed batcher augments the same way.
    #[test]
    fn prefetched_batches_are_augmented_per_cursor() {
        let (channels, side, n) = (2, 4, 24);
        let train = images(n, channels, side, 97);
        let aug = crop_flip(11, channels, side, vec![-1.0, -2.0]);
        let b = Batcher::new((0..n).collect(), 5, 3, 1).unwrap();
        let mut reference = b.clone();
        let mut p = Prefetcher::new(b, &train, 2, Some(aug.clone()), None).unwrap();
        let mut changed = 0;
        for _ in 0..12 {
            let (want, plain) = augmented(&mut reference, &train, &aug);
            let got = p.next_batch().unwrap();
            assert_eq!(got, want);
            changed += usize::from(got != plain);
        }
        assert!(changed >= 10, "only {changed} of 12 batches were augmented");
    }

    /// A stage runs on each batch after its augmentation and its copy travels with the batch (and
    /// its view); a batch the stage fails on arrives unstaged; transforming a batch drops the copy.
    #[test]
    fn prefetched_batches_carry_their_staged_copy() {
        let (channels, side, n) = (1, 2, 20);
        let train = images(n, channels, side, 13);
        let aug = crop_flip(5, channels, side, vec![0.0]);
        let mut calls = 0u32;
        let stage: Stage = Box::new(move |b: &Dataset| {
            calls += 1;
            if calls % 3 == 0 {
                return Err(format!("batch {calls} refused"));
            }
            Ok(Staged::new((b.features().to_vec(), b.labels().to_vec())))
        });
        let b = Batcher::new((0..n).collect(), 4, 9, 1).unwrap();
        let mut reference = b.clone();
        let mut p = Prefetcher::new(b, &train, 3, Some(aug.clone()), Some(stage)).unwrap();
        for i in 1..=9u32 {
            let (want, _) = augmented(&mut reference, &train, &aug);
            let mut got = p.next_batch().unwrap();
            assert_eq!(got, want, "batch {i}");
            type Copy = (Vec<f32>, Vec<u32>);
            let copy = got.staged().and_then(|s| s.downcast_ref::<Copy>());
            if i % 3 == 0 {
                assert!(copy.is_none(), "batch {i} was refused by the stage");
                continue;
            }
            assert_eq!(
                copy,
                Some(&(want.features().to_vec(), want.labels().to_vec()))
            );
            let view = got.view();
            assert!(view.staged.and_then(|s| s.downcast_ref::<Copy>()).is_some());
            assert!(view.staged.unwrap().downcast_ref::<u32>().is_none());
            got.features_mut()[0] += 1.0;
            assert!(
                got.staged().is_none(),
                "a transformed batch keeps no stale copy"
            );
        }
    }

    /// Dropping a prefetcher whose thread is blocked on a full channel ends the thread.
    #[test]
    fn dropping_a_prefetcher_stops_its_thread() {
        let train = data(30);
        let b = Batcher::new((0..30).collect(), 4, 1, 0).unwrap();
        let mut p = Prefetcher::new(b, &train, 2, None, None).unwrap();
        p.next_batch().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(p); // joins the thread: the test would hang if it did not end
    }

    /// A shard that indexes past the training set is an error, not a panic in the thread.
    #[test]
    fn a_shard_past_the_training_set_is_refused() {
        let train = data(10);
        let b = Batcher::new(vec![1, 2, 30], 2, 1, 0).unwrap();
        assert!(Prefetcher::new(b, &train, 2, None, None).is_err());
    }
}
