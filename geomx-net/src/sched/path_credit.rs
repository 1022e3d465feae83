//! Sizing a priority connection's send buffer (its P3 credit) to the path it crosses, from what
//! the kernel measured of that path.
//!
//! A priority writer needs a send buffer that holds the path's bandwidth × round trip (less, and
//! the connection cannot fill the link) and little more (the excess is a first-come, first-served
//! queue between the priority heap and the wire, where an urgent slice waits). A fixed credit
//! fits one path only: 256 KiB holds a 100 Mbit/s link with a 10 ms round trip, but caps one with
//! a 100 ms round trip at about 40 Mbit/s (Linux doubles `SO_SNDBUF`: 512 KiB / 100 ms).
//!
//! [`PathCredit`] keeps the connection's credit at
//!
//! ```text
//! credit = (MARGIN × max_rate × min_rtt + unsent + largest_write) / 2
//! ```
//!
//! - `max_rate`: the highest delivery rate the kernel sampled (`tcpi_delivery_rate`) within the
//!   last [`RATE_WINDOW`]; a window, because samples taken while the writer had nothing to send
//!   are low;
//! - `min_rtt`: the path's lowest round trip (`tcpi_min_rtt`);
//! - `unsent`, `largest_write`: what the socket may hold unsent (`TCP_NOTSENT_LOWAT`) and the
//!   largest frame written so far, which both count against the buffer;
//! - `/ 2`: the kernel doubles the value set, for its bookkeeping, and counts that bookkeeping
//!   against it; [`MARGIN`] covers the rest of the bookkeeping and the rate's noise.
//!
//! The writer starts with a large credit ([`INITIAL`]), so its first bursts measure the path, not
//! the credit. Should a credit ever cap the rate, the rate measured is then what the buffer
//! allows, and the formula gives more than the credit (MARGIN × 2 × the share of the buffer that
//! holds data, more than 1 with any realistic bookkeeping), so the credit grows until the link, not
//! the buffer, limits the rate. Changes smaller than an eighth are not applied, and the credit is
//! recomputed at most once per round trip. Sans-IO: the writer passes each sample and applies
//! what it returns.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::tcp_state::TcpRate;

/// Headroom over the bandwidth × round trip the buffer is sized for.
pub const MARGIN: f64 = 1.5;

/// How long a delivery-rate sample counts towards the maximum.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The credit a connection starts with, before anything was measured: 4 MiB, Linux's default
/// ceiling of an autotuned send buffer (`net.ipv4.tcp_wmem`), which fills most paths.
pub const INITIAL: u32 = 4 << 20;

/// The smallest credit applied.
pub const FLOOR: u32 = 16 << 10;

/// The largest credit applied (the kernel caps `SO_SNDBUF` at `net.core.wmem_max` anyway).
pub const CEILING: u32 = 256 << 20;

/// Recomputed at most this often, however short the round trip.
const MIN_INTERVAL: Duration = Duration::from_millis(5);

/// Samples kept in the window at most (older ones go first).
const MAX_SAMPLES: usize = 4096;

/// One connection's path-sized credit (see the module docs).
#[derive(Debug, Clone)]
pub struct PathCredit {
    credit: u32,
    /// `TCP_NOTSENT_LOWAT` of the connection, bytes.
    unsent: u32,
    largest_write: usize,
    /// (when, bytes/s), oldest first.
    rates: VecDeque<(Instant, u64)>,
    min_rtt: Option<Duration>,
    last_update: Option<Instant>,
    /// The kernel was seen holding the buffer below the credit (warned once).
    capped: bool,
}

impl PathCredit {
    /// A controller for a connection whose socket may hold `unsent` bytes unsent
    /// (`TCP_NOTSENT_LOWAT`), starting at [`INITIAL`].
    pub fn new(unsent: u32) -> Self {
        Self {
            credit: INITIAL,
            unsent,
            largest_write: 0,
            rates: VecDeque::new(),
            min_rtt: None,
            last_update: None,
            capped: false,
        }
    }

    /// The credit to use now.
    pub fn credit(&self) -> u32 {
        self.credit
    }

    /// The bandwidth × round trip measured so far, bytes (`None` before a rate and a round trip).
    pub fn bdp(&self) -> Option<f64> {
        let rate = self.rates.iter().map(|&(_, r)| r).max()?;
        Some(rate as f64 * self.min_rtt?.as_secs_f64())
    }

    /// A frame of `bytes` was written; `sample` is the kernel's measurement after it (if it has
    /// one). Returns the credit to apply when it changes.
    pub fn observe(&mut self, now: Instant, bytes: usize, sample: Option<TcpRate>) -> Option<u32> {
        self.largest_write = self.largest_write.max(bytes);
        let s = sample?;
        if s.min_rtt > Duration::ZERO {
            self.min_rtt = Some(s.min_rtt);
        }
        if s.delivery_rate > 0 {
            if self.rates.len() == MAX_SAMPLES {
                self.rates.pop_front();
            }
            self.rates.push_back((now, s.delivery_rate));
        }
        while self
            .rates
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > RATE_WINDOW)
        {
            self.rates.pop_front();
        }
        let every = self.min_rtt.unwrap_or(MIN_INTERVAL).max(MIN_INTERVAL);
        if self
            .last_update
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return None;
        }
        let bdp = self.bdp()?;
        self.last_update = Some(now);
        let want = (MARGIN * bdp + f64::from(self.unsent) + self.largest_write as f64) / 2.0;
        let want = want.clamp(f64::from(FLOOR), f64::from(CEILING)) as u32;
        let step = self.credit / 8;
        if want.abs_diff(self.credit) <= step {
            return None;
        }
        self.credit = want;
        Some(want)
    }
}

/// A writer's step after each frame: feeds `path` (when the connection is path-sized) the
/// frame's size and the kernel's sample (`rate`, read only then), applies a changed credit with
/// `set` (which returns the send buffer the kernel then reports, doubled), and returns it. A
/// failure to apply is logged (the connection's own errors surface on its next write), and so,
/// once per connection, is a kernel that holds the buffer below the credit: Linux caps
/// `SO_SNDBUF` at `net.core.wmem_max` (212,992 bytes unless raised), which caps the
/// connection's throughput at about that much per round trip.
pub(crate) fn follow(
    path: Option<&mut PathCredit>,
    bytes: usize,
    rate: impl FnOnce() -> Option<TcpRate>,
    set: impl FnOnce(usize) -> Result<usize, crate::NetError>,
) -> Option<u32> {
    let path = path?;
    let c = path.observe(Instant::now(), bytes, rate())?;
    match set(c as usize) {
        Ok(held) if held / 2 < c as usize - c as usize / 64 && !path.capped => {
            path.capped = true;
            tracing::warn!(
                credit = c,
                held = held / 2,
                "the kernel holds this P3 connection's send buffer below the credit its path \
                 needs (net.core.wmem_max caps SO_SNDBUF), which caps its throughput: raise \
                 net.core.wmem_max to at least {} (sysctl -w net.core.wmem_max=...)",
                2 * c as usize
            );
        }
        Ok(_) => tracing::debug!(credit = c, "P3 credit sized to the path"),
        Err(e) => tracing::debug!(error = %e, credit = c, "P3 credit not applied"),
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rtt_ms: f64, rate: u64) -> Option<TcpRate> {
        Some(TcpRate {
            min_rtt: Duration::from_secs_f64(rtt_ms / 1e3),
            delivery_rate: rate,
        })
    }

    /// A path of `rate` bytes/s and `rtt` seconds behind a writer of `write`-byte frames: the
    /// rate the kernel measures under a credit is the path's, or what the buffer lets through
    /// (twice the credit, of which `payload` holds data, less the unsent bytes, per round trip).
    fn measured(credit: u32, rate: f64, rtt: f64, unsent: u32, payload: f64) -> u64 {
        let in_flight = (2.0 * f64::from(credit) * payload - f64::from(unsent)).max(1.0);
        (in_flight / rtt).min(rate) as u64
    }

    /// Runs a writer for `secs` of virtual time, one frame per ms; returns the controller.
    fn run(p: &mut PathCredit, secs: f64, rate: f64, rtt: f64, payload: f64) {
        let t0 = Instant::now();
        for ms in 0..(secs * 1e3) as u64 {
            let now = t0 + Duration::from_millis(ms);
            let r = measured(p.credit(), rate, rtt, p.unsent, payload);
            p.observe(now, 65_540, sample(rtt * 1e3, r));
        }
    }

    #[test]
    fn the_credit_settles_at_the_formula_for_the_measured_path() {
        // 120 Mbit/s and 10 ms (the sched benchmark's lab), 100 Mbit/s and 100 ms (the e2e
        // WAN), 1 Gbit/s and 200 ms.
        for (rate, rtt) in [(15e6, 0.010), (12.5e6, 0.100), (125e6, 0.200)] {
            let mut p = PathCredit::new(16 << 10);
            run(&mut p, 3.0, rate, rtt, 0.9);
            let bdp = rate * rtt;
            let want = (MARGIN * bdp + f64::from(16u32 << 10) + 65_540.0) / 2.0;
            let c = f64::from(p.credit());
            assert!(
                (c - want).abs() <= want / 8.0,
                "{rate} B/s, {rtt} s: {c} vs {want}"
            );
            // The buffer (twice the credit) holds the path's bandwidth × round trip, and less
            // than twice it beyond the unsent bytes and a frame.
            assert!(2.0 * c * 0.9 >= bdp + f64::from(16u32 << 10), "{c}");
            assert!(
                2.0 * c <= 2.0 * bdp + 2.0 * 65_540.0 + f64::from(16u32 << 10),
                "{c}"
            );
        }
    }

    #[test]
    fn a_credit_that_caps_the_rate_grows_until_the_link_limits_it() {
        // Started small on a 100 ms path: the rate it measures is the buffer's, and it grows.
        let mut p = PathCredit::new(64 << 10);
        p.credit = 256 << 10;
        let (rate, rtt) = (12.5e6, 0.100);
        let capped = measured(p.credit(), rate, rtt, p.unsent, 0.75);
        assert!(
            (capped as f64) < rate / 2.0,
            "the start is capped: {capped}"
        );
        run(&mut p, 5.0, rate, rtt, 0.75);
        let c = p.credit();
        assert_eq!(
            measured(c, rate, rtt, p.unsent, 0.75) as f64,
            rate,
            "credit {c} still caps the rate"
        );
        assert!(f64::from(c) < 1.5 * rate * rtt, "{c}");
    }

    #[test]
    fn small_changes_wait_and_updates_come_once_per_round_trip() {
        let t0 = Instant::now();
        let mut p = PathCredit::new(16 << 10);
        assert_eq!(p.observe(t0, 1000, None), None, "nothing measured");
        assert_eq!(p.observe(t0, 1000, sample(10.0, 0)), None, "no rate yet");
        let first = p.observe(t0, 1000, sample(10.0, 10_000_000));
        // (1.5 × 100 kB + 16 KiB + 1000) / 2.
        assert_eq!(first, Some(83_692));
        assert_eq!(p.credit(), 83_692);
        let soon = t0 + Duration::from_millis(5);
        assert_eq!(
            p.observe(soon, 1000, sample(10.0, 20_000_000)),
            None,
            "within an rtt"
        );
        let later = t0 + Duration::from_millis(11);
        assert_eq!(
            p.observe(later, 1000, sample(10.0, 20_000_000)),
            Some(158_692)
        );
        // 5 % more: below an eighth, kept.
        let next = t0 + Duration::from_millis(30);
        assert_eq!(p.observe(next, 1000, sample(10.0, 21_000_000)), None);
        assert_eq!(p.credit(), 158_692);
    }

    /// A path-sized priority sender and reply queue over loopback: both connections leave the
    /// initial 4 MiB for what the path measures, and the kernel holds what they set (up to
    /// `net.core.wmem_max`, which caps `SO_SNDBUF`).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_sized_sender_and_reply_queue_follow_their_loopback_path() {
        use crate::sched::priority::PrioritySender;
        use crate::sched::reply::{ReplyQueue, SharedBytes};
        use crate::{Handler, KvClient, KvServer, NetOptions, PayloadCodec, Request, Responder};
        use std::sync::{Arc, Mutex};

        struct Echo {
            queue: ReplyQueue,
            peer: Mutex<Option<crate::PeerHandle>>,
        }
        impl Handler for Echo {
            fn on_request(&self, req: Request, reply: Responder) {
                *self.peer.lock().unwrap() = Some(reply.peer());
                let payload: SharedBytes = Arc::new(req.payload);
                self.queue
                    .send(0, reply, req.version + 1, req.codec, payload);
            }
        }
        let unsent = 16 << 10;
        let opts = NetOptions {
            notsent_lowat: Some(unsent),
            send_buffer: Some(INITIAL as usize),
            ..NetOptions::default()
        };
        let echo = Arc::new(Echo {
            queue: ReplyQueue::sized_by_path("test-path-replies", unsent),
            peer: Mutex::new(None),
        });
        let server = KvServer::bind("127.0.0.1:0", echo.clone(), opts.clone()).unwrap();
        let client = KvClient::connect(server.local_addr(), 1, opts).unwrap();
        let sender = PrioritySender::sized_by_path(client.clone(), "test-path", unsent).unwrap();
        for round in 0..100u64 {
            let q = sender
                .push(0, 1, round, PayloadCodec::Raw, 0, 1, vec![7u8; 64 << 10])
                .unwrap();
            let r = q.wait(Duration::from_secs(30)).unwrap();
            assert_eq!((r.version, r.payload.len()), (round + 1, 64 << 10));
        }
        let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(usize::MAX);
        let c = sender.path_credit().expect("the sender sized its credit") as usize;
        assert!((FLOOR as usize..=CEILING as usize).contains(&c), "{c}");
        assert_eq!(client.send_buffer().unwrap(), 2 * c.min(wmem_max));
        let peer = echo.peer.lock().unwrap().clone().unwrap();
        let held = peer.send_buffer().unwrap();
        assert_ne!(
            held,
            2 * (INITIAL as usize).min(wmem_max),
            "replies still at the start"
        );
        assert!(held >= 2 * (FLOOR as usize).min(wmem_max), "{held}");
    }

    #[test]
    fn old_rates_expire_and_the_credit_stays_within_its_bounds() {
        let t0 = Instant::now();
        let mut p = PathCredit::new(0);
        assert!(p.observe(t0, 10, sample(0.01, 1_000)).is_some());
        assert_eq!(p.credit(), FLOOR, "a tiny path gets the floor");
        p.observe(
            t0 + Duration::from_millis(10),
            10,
            sample(0.01, u64::MAX / 4),
        );
        assert_eq!(p.credit(), CEILING, "a huge one the ceiling");
        // 11 s later the huge sample is gone; the new small one decides.
        let late = t0 + Duration::from_secs(11);
        assert_eq!(p.observe(late, 10, sample(10.0, 1_000_000)), Some(FLOOR));
        assert_eq!(p.bdp(), Some(10_000.0));
    }
}
