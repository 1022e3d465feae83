//! Token-bucket pacer on caller-supplied time, exact integer arithmetic.

use std::time::{Duration, Instant};

const NANOS: u128 = 1_000_000_000;

/// Token bucket: rate `R` bytes/s, depth `cap` bytes, starting full. Tokens are kept in
/// byte·10⁻⁹ units so that refill and wake-up times are exact.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_bytes_per_s: u128,
    cap: u128,
    tokens: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `cap_bytes` refilled at `rate_bps` bit/s (both > 0).
    pub fn new(rate_bps: u64, cap_bytes: u64, now: Instant) -> TokenBucket {
        let cap = u128::from(cap_bytes) * NANOS;
        TokenBucket {
            rate_bytes_per_s: (u128::from(rate_bps) / 8).max(1),
            cap,
            tokens: cap,
            last: now,
        }
    }

    /// Current rate in bit/s.
    pub fn rate_bps(&self) -> u64 {
        u64::try_from(self.rate_bytes_per_s * 8).unwrap_or(u64::MAX)
    }

    /// Changes the rate (tokens accrued so far are kept).
    pub fn set_rate(&mut self, rate_bps: u64, now: Instant) {
        self.refill(now);
        self.rate_bytes_per_s = (u128::from(rate_bps) / 8).max(1);
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let dt = (now - self.last).as_nanos();
            self.tokens = (self.tokens + dt * self.rate_bytes_per_s).min(self.cap);
            self.last = now;
        }
    }

    /// Takes `bytes` if available now; a datagram larger than the bucket waits for a full bucket.
    pub fn try_take(&mut self, bytes: usize, now: Instant) -> bool {
        self.refill(now);
        let need = (bytes as u128 * NANOS).min(self.cap);
        if self.tokens >= need {
            self.tokens -= need;
            true
        } else {
            false
        }
    }

    /// Earliest time at which `bytes` can be taken (≤ `now` if already possible).
    pub fn ready_at(&self, bytes: usize) -> Instant {
        let need = (bytes as u128 * NANOS).min(self.cap);
        if self.tokens >= need {
            return self.last;
        }
        let ns = (need - self.tokens).div_ceil(self.rate_bytes_per_s);
        self.last + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        // 8000 bit/s = 1000 B/s, bucket 300 B.
        let mut b = TokenBucket::new(8000, 300, t0);
        assert!(b.try_take(100, t0));
        assert!(b.try_take(200, t0));
        assert!(!b.try_take(100, t0));
        let at = b.ready_at(100);
        assert_eq!(at - t0, Duration::from_millis(100));
        assert!(!b.try_take(100, at - Duration::from_nanos(1)));
        assert!(b.try_take(100, at));
        // Refill caps at the depth.
        let later = at + Duration::from_secs(10);
        assert!(b.try_take(300, later));
        assert!(!b.try_take(1, later));
    }
}
