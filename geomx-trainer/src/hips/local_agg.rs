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
    received: usize,
}

/// Collects the pushes of one DC's workers and sums them in rank order.
#[derive(Debug)]
pub struct LocalAggregator {
    keys: Vec<KeySlot>,
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
                received: 0,
            })
            .collect();
        Self { keys }
    }

    /// The round `key` currently collects, if the key exists.
    pub fn round(&self, key: usize) -> Option<u64> {
        self.keys.get(key).map(|k| k.round)
    }

    /// Records worker `rank`'s gradient for `(key, round)`. Returns the rank-ordered sum when this
    /// was the last missing push; the key then collects `round + 1`.
    pub fn push(
        &mut self,
        key: usize,
        round: u64,
        rank: usize,
        grad: Vec<f32>,
    ) -> Result<Option<Vec<f32>>, AggError> {
        let slot = self.keys.get_mut(key).ok_or(AggError::UnknownKey(key))?;
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
        let n = slot.pushes.len();
        let cell = slot
            .pushes
            .get_mut(rank)
            .ok_or(AggError::BadSender { sender: rank, n })?;
        if cell.is_some() {
            return Err(AggError::Duplicate {
                key,
                round,
                sender: rank,
            });
        }
        *cell = Some(grad);
        slot.received += 1;
        if slot.received < n {
            return Ok(None);
        }
        let mut it = slot.pushes.iter_mut().map(|p| p.take().unwrap_or_default());
        let mut sum = it.next().unwrap_or_default();
        for g in it {
            for (s, x) in sum.iter_mut().zip(&g) {
                *s += *x;
            }
        }
        slot.received = 0;
        slot.round += 1;
        Ok(Some(sum))
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
            assert_eq!(out.unwrap()[0].to_bits(), expected.to_bits());
        }
    }

    #[test]
    fn completes_only_when_all_workers_pushed_then_advances() {
        let mut agg = LocalAggregator::new(&[2, 1], 2, 5);
        assert_eq!(agg.push(0, 5, 1, vec![1.0, 2.0]).unwrap(), None);
        assert_eq!(
            agg.push(0, 5, 0, vec![3.0, 4.0]).unwrap(),
            Some(vec![4.0, 6.0])
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
}
