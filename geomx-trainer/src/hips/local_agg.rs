//! Lower-tier aggregation at a local server (hips.md FSA steps 1–2), without IO.
//!
//! A [`LocalAggregator`] collects the n_d worker pushes of `(key, round)` and, once all are in, forms
//! s_d = g_1 + … + g_{n_d} added in worker-rank order, whatever order the pushes arrived in.

use super::AggError;

/// Per-key collection state.
#[derive(Debug)]
struct KeySlot {
    len: usize,
    round: u64,
    pushes: Vec<Option<Vec<f32>>>,
}

/// A completed local sum: the rank-ordered sum of the pushes of `ranks`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSum {
    /// Σ of the pushes, added in rank order.
    pub sum: Vec<f32>,
    /// The ranks summed, ascending (all of the DC's workers unless some were lost).
    pub ranks: Vec<u32>,
}

impl LocalSum {
    /// How many workers the sum counts.
    pub fn count(&self) -> u32 {
        self.ranks.len() as u32
    }
}

/// Rounds a membership change completed: (key, round, sum).
pub type Completed = Vec<(usize, u64, LocalSum)>;

/// Collects the pushes of one DC's workers and sums them in rank order.
///
/// Every worker is a member from the start. A lost worker ([`LocalAggregator::lose`]) stops
/// counting: the rounds waiting for it close with the workers present. A worker that comes back
/// ([`LocalAggregator::join`]) counts again from the round every key has reached, so no key's
/// round changes its members once it collects.
#[derive(Debug)]
pub struct LocalAggregator {
    keys: Vec<KeySlot>,
    /// Per rank: the first round it counts in; `None` while lost.
    member_from: Vec<Option<u64>>,
}

impl LocalAggregator {
    /// An aggregator for keys of `key_lens` elements, `n_workers` workers, starting at round `start`.
    pub fn new(key_lens: &[usize], n_workers: usize, start: u64) -> Self {
        let keys = key_lens
            .iter()
            .map(|&len| KeySlot {
                len,
                round: start,
                pushes: vec![None; n_workers],
            })
            .collect();
        Self {
            keys,
            member_from: vec![Some(start); n_workers],
        }
    }

    /// The round `key` currently collects, if the key exists.
    pub fn round(&self, key: usize) -> Option<u64> {
        self.keys.get(key).map(|k| k.round)
    }

    /// The highest round any key collects (where a rejoining worker starts).
    pub fn top_round(&self) -> u64 {
        self.keys.iter().map(|k| k.round).max().unwrap_or(0)
    }

    /// Whether worker `rank` is a member (not lost).
    pub fn is_member(&self, rank: usize) -> bool {
        self.member_from.get(rank).is_some_and(Option::is_some)
    }

    fn counts(&self, rank: usize, round: u64) -> bool {
        self.member_from
            .get(rank)
            .copied()
            .flatten()
            .is_some_and(|from| from <= round)
    }

    /// Records worker `rank`'s gradient for `(key, round)`. Returns the rank-ordered sum when this
    /// was the last missing push; the key then collects `round + 1`.
    pub fn push(
        &mut self,
        key: usize,
        round: u64,
        rank: usize,
        grad: Vec<f32>,
    ) -> Result<Option<LocalSum>, AggError> {
        let n = self.member_from.len();
        let slot = self.keys.get(key).ok_or(AggError::UnknownKey(key))?;
        if round != slot.round {
            return Err(AggError::WrongVersion {
                key,
                expected: slot.round,
                got: round,
            });
        }
        if grad.len() != slot.len {
            return Err(AggError::LengthMismatch {
                key,
                expected: slot.len,
                got: grad.len(),
            });
        }
        if rank >= n {
            return Err(AggError::BadSender { sender: rank, n });
        }
        if !self.counts(rank, round) {
            return Err(AggError::NotMember { key, round, rank });
        }
        let cell = &mut self.keys[key].pushes[rank];
        if cell.is_some() {
            return Err(AggError::Duplicate {
                key,
                round,
                sender: rank,
            });
        }
        *cell = Some(grad);
        Ok(self.complete(key))
    }

    /// The sum of `key`'s round when every member's push is in. With no push at all the round
    /// waits for a member, unless every member counts only from a later round: then nobody can
    /// push it, and it completes empty (no ranks; the DC is absent from it upstream).
    fn complete(&mut self, key: usize) -> Option<LocalSum> {
        let slot = &self.keys[key];
        let round = slot.round;
        let waiting =
            (0..self.member_from.len()).any(|r| self.counts(r, round) && slot.pushes[r].is_none());
        let later = self.member_from.iter().flatten().any(|&from| from > round);
        if waiting || (slot.pushes.iter().all(Option::is_none) && !later) {
            return None;
        }
        let slot = &mut self.keys[key];
        let mut ranks = Vec::new();
        let mut sum: Option<Vec<f32>> = None;
        for (r, p) in slot.pushes.iter_mut().enumerate() {
            let Some(g) = p.take() else { continue };
            ranks.push(r as u32);
            match sum.as_mut() {
                None => sum = Some(g),
                Some(s) => s.iter_mut().zip(&g).for_each(|(s, x)| *s += *x),
            }
        }
        slot.round += 1;
        Some(LocalSum {
            sum: sum.unwrap_or_default(),
            ranks,
        })
    }

    /// Worker `rank` is lost: its pushes of the rounds being collected are dropped and it no
    /// longer counts. Returns the `(key, round, sum)` of every round that no longer waits.
    pub fn lose(&mut self, rank: usize) -> Completed {
        let Some(m) = self.member_from.get_mut(rank) else {
            return Vec::new();
        };
        *m = None;
        let mut done = Vec::new();
        for key in 0..self.keys.len() {
            self.keys[key].pushes[rank] = None;
            let round = self.keys[key].round;
            if let Some(s) = self.complete(key) {
                done.push((key, round, s));
            }
        }
        done
    }

    /// Worker `rank` comes back: it counts from the highest round any key collects, which it
    /// returns (the worker starts there, with θ of that round), with the `(key, round, sum)` of
    /// the earlier rounds that no longer wait (those nobody is left to push complete empty).
    /// `None` for an unknown rank.
    pub fn join(&mut self, rank: usize) -> Option<(u64, Completed)> {
        let from = self.top_round();
        *self.member_from.get_mut(rank)? = Some(from);
        let mut done = Vec::new();
        for key in 0..self.keys.len() {
            while self.keys[key].round < from {
                let round = self.keys[key].round;
                match self.complete(key) {
                    Some(s) => done.push((key, round, s)),
                    None => break,
                }
            }
        }
        Some((from, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_rank_order_not_arrival_order() {
        // Values where float addition order matters: (1e8 + 1) - 1e8 vs 1e8 - 1e8 + 1.
        let g = [vec![1.0e8f32], vec![1.0f32], vec![-1.0e8f32]];
        let expected = (g[0][0] + g[1][0]) + g[2][0];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut agg = LocalAggregator::new(&[1], 3, 0);
            let mut out = None;
            for &r in &order {
                out = agg.push(0, 0, r, g[r].clone()).unwrap();
            }
            assert_eq!(out.unwrap().sum[0].to_bits(), expected.to_bits());
        }
    }

    #[test]
    fn completes_only_when_all_workers_pushed_then_advances() {
        let mut agg = LocalAggregator::new(&[2, 1], 2, 5);
        assert_eq!(agg.push(0, 5, 1, vec![1.0, 2.0]).unwrap(), None);
        assert_eq!(
            agg.push(0, 5, 0, vec![3.0, 4.0]).unwrap(),
            Some(LocalSum {
                sum: vec![4.0, 6.0],
                ranks: vec![0, 1]
            })
        );
        assert_eq!(agg.round(0), Some(6));
        assert_eq!(agg.round(1), Some(5));
        assert_eq!(agg.push(0, 6, 0, vec![1.0, 1.0]).unwrap(), None);
    }

    #[test]
    fn rejects_protocol_errors() {
        let mut agg = LocalAggregator::new(&[2], 2, 0);
        assert_eq!(
            agg.push(0, 1, 0, vec![0.0; 2]),
            Err(AggError::WrongVersion {
                key: 0,
                expected: 0,
                got: 1
            })
        );
        assert_eq!(
            agg.push(3, 0, 0, vec![0.0; 2]),
            Err(AggError::UnknownKey(3))
        );
        assert_eq!(
            agg.push(0, 0, 2, vec![0.0; 2]),
            Err(AggError::BadSender { sender: 2, n: 2 })
        );
        assert!(matches!(
            agg.push(0, 0, 0, vec![0.0; 3]),
            Err(AggError::LengthMismatch { .. })
        ));
        agg.push(0, 0, 0, vec![0.0; 2]).unwrap();
        assert!(matches!(
            agg.push(0, 0, 0, vec![0.0; 2]),
            Err(AggError::Duplicate { .. })
        ));
    }

    #[test]
    fn a_lost_worker_closes_the_rounds_waiting_for_it_and_rejoins_later() {
        // Two keys, three workers. Key 0: ranks 0 and 2 pushed; key 1: rank 1 (then lost).
        let mut agg = LocalAggregator::new(&[1, 1], 3, 0);
        assert_eq!(agg.push(0, 0, 0, vec![1.0]).unwrap(), None);
        assert_eq!(agg.push(0, 0, 2, vec![4.0]).unwrap(), None);
        assert_eq!(agg.push(1, 0, 1, vec![8.0]).unwrap(), None);
        // Rank 1 lost: key 0 closes with ranks 0 and 2; key 1 drops rank 1's push and waits.
        let done = agg.lose(1);
        assert_eq!(
            done,
            vec![(
                0,
                0,
                LocalSum {
                    sum: vec![5.0],
                    ranks: vec![0, 2]
                }
            )]
        );
        assert!(!agg.is_member(1));
        assert!(matches!(
            agg.push(1, 0, 1, vec![8.0]),
            Err(AggError::NotMember { rank: 1, .. })
        ));
        assert_eq!(agg.push(1, 0, 0, vec![1.0]).unwrap(), None);
        let s = agg.push(1, 0, 2, vec![2.0]).unwrap().unwrap();
        assert_eq!((s.sum, s.ranks), (vec![3.0], vec![0, 2]));
        // Key 0 at round 1 has rank 0's push; rank 1 rejoins: both keys collect round 1, so
        // it counts from round 1 and key 0 waits for it.
        assert_eq!(agg.push(0, 1, 0, vec![1.0]).unwrap(), None);
        assert_eq!(agg.join(1), Some((1, Vec::new())));
        assert_eq!(agg.push(0, 1, 2, vec![1.0]).unwrap(), None);
        let s = agg.push(0, 1, 1, vec![1.0]).unwrap().unwrap();
        assert_eq!(s.ranks, vec![0, 1, 2]);
        assert!(agg.join(7).is_none());
    }

    #[test]
    fn a_rejoining_worker_skips_the_rounds_some_key_already_passed() {
        let mut agg = LocalAggregator::new(&[1, 1], 2, 0);
        agg.lose(1);
        // Key 0 completes round 0 alone; key 1 still collects round 0.
        assert!(agg.push(0, 0, 0, vec![1.0]).unwrap().is_some());
        assert_eq!(agg.join(1), Some((1, Vec::new())));
        // Round 0 of key 1 does not wait for rank 1; round 1 of both keys does.
        assert!(agg.push(1, 0, 0, vec![1.0]).unwrap().is_some());
        assert!(agg.push(0, 1, 0, vec![1.0]).unwrap().is_none());
        assert!(agg.push(0, 1, 1, vec![1.0]).unwrap().is_some());
    }

    #[test]
    fn with_every_worker_lost_a_round_waits() {
        let mut agg = LocalAggregator::new(&[1], 2, 0);
        assert!(agg.lose(0).is_empty());
        assert!(agg.lose(1).is_empty());
        assert_eq!(agg.round(0), Some(0));
        assert_eq!(agg.join(0), Some((0, Vec::new())));
        assert!(agg.push(0, 0, 0, vec![1.0]).unwrap().is_some());
    }

    #[test]
    fn rounds_nobody_is_left_to_push_complete_empty_when_a_worker_rejoins_later() {
        // Both workers die in round 0: rank 0 had pushed key 1 and rank 1 both keys, so key 1
        // completed round 0 and key 0 is left with no push (both are dropped).
        let mut agg = LocalAggregator::new(&[1, 1], 2, 0);
        assert!(agg.push(1, 0, 0, vec![1.0]).unwrap().is_none());
        assert!(agg.push(0, 0, 1, vec![2.0]).unwrap().is_none());
        assert!(agg.push(1, 0, 1, vec![2.0]).unwrap().is_some());
        assert!(agg.lose(1).is_empty(), "rank 0 still counts for key 0");
        assert!(agg.lose(0).is_empty(), "no member: key 0's round waits");
        // Rank 1 rejoins from round 1: nobody can push key 0's round 0, which completes empty.
        let (from, done) = agg.join(1).unwrap();
        assert_eq!(from, 1);
        assert_eq!(
            done,
            vec![(
                0,
                0,
                LocalSum {
                    sum: Vec::new(),
                    ranks: Vec::new()
                }
            )]
        );
        assert_eq!(agg.round(0), Some(1));
        assert!(agg.push(0, 1, 1, vec![1.0]).unwrap().is_some());
    }
}
