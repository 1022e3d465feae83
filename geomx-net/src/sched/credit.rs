//! Tuning a priority sender's credit from measured round times.
//!
//! The credit is what a connection may hold unacknowledged ([`crate::NetOptions::send_buffer`],
//! applied to a live connection with [`crate::KvClient::set_send_buffer`]). Too little and it
//! caps the throughput (it must cover bandwidth × round trip); too much and the socket's own
//! queue, first come first served, sits between the priority heap and the wire. The best value
//! depends on the path, so [`CreditTuner`] measures: it tries a wide geometric ladder of credits
//! for a few rounds each, then the neighbours of the best, and keeps the credit whose rounds were
//! fastest. Every process of a job runs the same schedule, so their credits change at the same
//! round boundaries. Sans-IO: the caller passes each round's duration and applies what it returns.

/// Rounds each candidate is measured for.
pub const ROUNDS_PER_CANDIDATE: usize = 2;

/// The coarse ladder: 64 KiB to 16 MiB, ×4 apart.
pub const LADDER: [u32; 5] = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];

/// A tuner's state: measuring a candidate, or settled on one.
#[derive(Debug, Clone, PartialEq)]
pub struct CreditTuner {
    /// Candidates in the order they are tried; the refinement appends the best's neighbours.
    candidates: Vec<u32>,
    /// Round times measured per candidate (seconds).
    times: Vec<Vec<f64>>,
    /// The candidate being measured.
    current: usize,
    /// Rounds to ignore before the first measurement (start-up).
    warmup: usize,
    refined: bool,
    settled: Option<u32>,
}

impl Default for CreditTuner {
    fn default() -> Self {
        Self::new(&LADDER, 1)
    }
}

impl CreditTuner {
    /// A tuner over `ladder` (at least one candidate; an empty ladder uses [`LADDER`]) that
    /// ignores the first `warmup` rounds.
    pub fn new(ladder: &[u32], warmup: usize) -> Self {
        let candidates = if ladder.is_empty() {
            LADDER.to_vec()
        } else {
            ladder.to_vec()
        };
        Self {
            times: vec![Vec::new(); candidates.len()],
            candidates,
            current: 0,
            warmup,
            refined: false,
            settled: None,
        }
    }

    /// Rounds the whole search takes, warm-up included (at most).
    pub fn max_rounds(&self) -> usize {
        self.warmup + (self.candidates.len() + 2) * ROUNDS_PER_CANDIDATE
    }

    /// The credit to use now.
    pub fn credit(&self) -> u32 {
        self.settled.unwrap_or(self.candidates[self.current])
    }

    /// The chosen credit once the search is over.
    pub fn settled(&self) -> Option<u32> {
        self.settled
    }

    /// Each candidate's best measured round time (seconds), in the order tried.
    pub fn measured(&self) -> Vec<(u32, f64)> {
        self.candidates
            .iter()
            .zip(&self.times)
            .filter_map(|(&c, t)| best(t).map(|b| (c, b)))
            .collect()
    }

    /// A round under [`CreditTuner::credit`] took `seconds`; returns the credit to apply from
    /// the next round on when it changes. Non-finite or negative times are ignored.
    pub fn record(&mut self, seconds: f64) -> Option<u32> {
        if self.settled.is_some() || !seconds.is_finite() || seconds < 0.0 {
            return None;
        }
        if self.warmup > 0 {
            self.warmup -= 1;
            return None;
        }
        let before = self.credit();
        self.times[self.current].push(seconds);
        if self.times[self.current].len() >= ROUNDS_PER_CANDIDATE {
            self.advance();
        }
        let after = self.credit();
        (after != before).then_some(after)
    }

    /// The next candidate: the rest of the ladder, then the best's unmeasured neighbours (half and
    /// double), then the fastest of all.
    fn advance(&mut self) {
        let last = self.current + 1 == self.candidates.len();
        if last && !self.refined {
            self.refined = true;
            let b = self.best_candidate();
            for c in [b / 2, b.saturating_mul(2)] {
                if c > 0 && !self.candidates.contains(&c) {
                    self.candidates.push(c);
                    self.times.push(Vec::new());
                }
            }
        }
        if self.current + 1 < self.candidates.len() {
            self.current += 1;
        } else {
            self.settled = Some(self.best_candidate());
        }
    }

    /// The candidate with the fastest measured round (its best round: noise only slows rounds).
    fn best_candidate(&self) -> u32 {
        self.measured()
            .into_iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(self.candidates[0], |(c, _)| c)
    }
}

/// The fastest of `t`.
fn best(t: &[f64]) -> Option<f64> {
    t.iter().copied().min_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round time of a credit on a path whose bandwidth × round trip is `bdp`: below it the
    /// throughput suffers, above it the urgent slices wait behind the socket's queue.
    fn round_time(credit: u32, bdp: f64) -> f64 {
        let c = f64::from(credit);
        if c < bdp {
            1.0 * bdp / c
        } else {
            1.0 + 0.05 * (c / bdp).log2()
        }
    }

    fn run(bdp: f64, noise: &[f64]) -> (CreditTuner, usize) {
        let mut t = CreditTuner::default();
        let mut rounds = 0;
        while t.settled().is_none() {
            let n = noise
                .get(rounds % noise.len().max(1))
                .copied()
                .unwrap_or(0.0);
            let c = t.credit();
            t.record(round_time(c, bdp) + n);
            rounds += 1;
            assert!(rounds <= t.max_rounds(), "no decision in {rounds} rounds");
        }
        (t, rounds)
    }

    #[test]
    fn it_settles_near_the_bandwidth_delay_product_within_15_rounds() {
        for (bdp, want) in [
            (150e3, 256 << 10),
            (6e6, 8 << 20),
            (40e3, 64 << 10),
            (700e3, 1 << 20),
        ] {
            let (t, rounds) = run(bdp, &[0.0, 0.02, 0.01]);
            assert!(rounds <= 15, "{rounds} rounds");
            assert_eq!(t.settled(), Some(want), "bdp {bdp}: {:?}", t.measured());
            assert_eq!(t.credit(), want);
        }
    }

    #[test]
    fn changes_are_reported_once_and_bad_times_ignored() {
        let mut t = CreditTuner::new(&[100, 200], 1);
        assert_eq!(t.credit(), 100);
        assert_eq!(t.record(5.0), None, "warm-up");
        assert_eq!(t.record(f64::NAN), None);
        assert_eq!(t.record(-1.0), None);
        assert_eq!(t.record(1.0), None);
        assert_eq!(t.record(1.0), Some(200));
        assert_eq!(t.record(2.0), None);
        // 200 was slower: the refinement tries 50 (100's half; 200 is known).
        assert_eq!(t.record(2.0), Some(50));
        assert_eq!(t.record(3.0), None);
        assert_eq!(t.record(3.0), Some(100));
        assert_eq!(t.settled(), Some(100));
        assert_eq!(t.record(0.1), None, "settled for good");
        assert_eq!(t.measured(), [(100, 1.0), (200, 2.0), (50, 3.0)]);
        assert_eq!(CreditTuner::new(&[], 0).credit(), LADDER[0]);
    }
}
