//! The delay relay's core (sans-IO): packets in with their arrival time, packets out at arrival +
//! delay(source link) + delay(destination link), one FIFO per (source, destination) link pair.
//!
//! Times are nanoseconds on the caller's monotonic clock. A constant delay per pair keeps each
//! pair's queue sorted, so the next release is the minimum over the queue heads.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use super::naming::{link_of, MAX_LINKS};

/// Why a packet was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not an IPv4 packet (or too short to be one).
    NotIpv4,
    /// Source or destination is not on a lab link.
    NotLab,
    /// Its pair's queue is full.
    QueueFull,
}

/// Counters of the relay.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DelayStats {
    /// Packets queued.
    pub packets: u64,
    /// Bytes queued.
    pub bytes: u64,
    /// Packets released.
    pub released: u64,
    /// Packets queued when the counters were taken.
    #[serde(default)]
    pub queued: u64,
    /// Packets rejected (not IPv4, not a lab address, queue full).
    pub rejected: u64,
    /// Largest total queue depth seen, in packets.
    pub max_queue: usize,
    /// Lateness (actual − due release) histogram: bucket b counts lateness in [b, b+1) × 50 µs,
    /// the last bucket everything beyond.
    pub lateness_hist: Vec<u64>,
    /// Largest lateness seen, in nanoseconds.
    pub max_lateness_ns: u64,
    /// Whether the relay thread runs with real-time priority (`SCHED_FIFO`).
    #[serde(default)]
    pub realtime: bool,
    /// Whether the keep-awake spinners ran ([`super::awake`]).
    #[serde(default)]
    pub keep_awake: bool,
    /// Whether the kernel forwarded released packets in the TUN device's own real-time NAPI
    /// thread (otherwise inside the relay's writes).
    #[serde(default)]
    pub napi_thread: bool,
    /// CPU time of the relay thread, in nanoseconds (its `schedstat`).
    #[serde(default)]
    pub cpu_ns: u64,
    /// Time the relay thread spent runnable but waiting for a CPU, in nanoseconds.
    #[serde(default)]
    pub runqueue_wait_ns: u64,
}

/// The relay's fidelity bound on p99 lateness (wan-lab.md): above it a run is *degraded*.
pub const P99_LATENESS_BOUND_NS: u64 = 1_000_000;
/// The bound on the largest lateness that `geomx wan-lab --selftest` checks.
pub const MAX_LATENESS_BOUND_NS: u64 = 5_000_000;

/// The relay's lateness in the form every report and benchmark prints.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lateness {
    /// Packets released.
    pub packets: u64,
    /// Median lateness, µs (upper edge of its 50 µs bucket).
    pub p50_lateness_us: f64,
    /// 99th-percentile lateness, µs (upper edge of its 50 µs bucket).
    pub p99_lateness_us: f64,
    /// Largest lateness, µs.
    pub max_lateness_us: f64,
    /// Whether the relay thread had real-time priority.
    pub realtime: bool,
    /// Whether the keep-awake spinners ran.
    pub keep_awake: bool,
    /// Whether the kernel forwarded released packets in its own real-time NAPI thread.
    #[serde(default)]
    pub napi_thread: bool,
    /// p99 lateness above [`P99_LATENESS_BOUND_NS`]: the emulated delay was not kept.
    pub degraded: bool,
}

impl Lateness {
    /// A short mark for tables: `p99 0.15 ms, max 0.9 ms`, with `DEGRADED` in front when it is.
    pub fn mark(&self) -> String {
        format!(
            "{}p99 {:.2} ms, max {:.1} ms",
            if self.degraded { "DEGRADED: " } else { "" },
            self.p99_lateness_us / 1e3,
            self.max_lateness_us / 1e3
        )
    }
}

/// Width of one lateness bucket.
const BUCKET_NS: u64 = 50_000;
/// Number of lateness buckets (the last is open-ended): 0–10 ms in 50 µs steps.
const BUCKETS: usize = 201;

impl DelayStats {
    /// The lateness figures of these counters.
    pub fn lateness(&self) -> Lateness {
        let p99 = self.lateness_quantile_ns(0.99);
        Lateness {
            packets: self.released,
            p50_lateness_us: self.lateness_quantile_ns(0.5) as f64 / 1e3,
            p99_lateness_us: p99 as f64 / 1e3,
            max_lateness_us: self.max_lateness_ns as f64 / 1e3,
            realtime: self.realtime,
            keep_awake: self.keep_awake,
            napi_thread: self.napi_thread,
            degraded: p99 > P99_LATENESS_BOUND_NS,
        }
    }

    /// The q-quantile of lateness in nanoseconds (upper edge of its bucket); 0 without releases.
    pub fn lateness_quantile_ns(&self, q: f64) -> u64 {
        let total: u64 = self.lateness_hist.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in self.lateness_hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return if b + 1 == BUCKETS {
                    self.max_lateness_ns
                } else {
                    (b as u64 + 1) * BUCKET_NS
                };
            }
        }
        self.max_lateness_ns
    }
}

struct Queued {
    due: u64,
    packet: Vec<u8>,
}

/// The scheduler: per-link one-way delays, per-pair FIFOs, counters.
pub struct DelayScheduler {
    delay_ns: Vec<u64>,
    queues: Vec<VecDeque<Queued>>,
    /// Indices of non-empty queues (few pairs are active at once).
    active: Vec<usize>,
    depth: usize,
    max_depth: usize,
    stats: DelayStats,
}

/// Source and destination IPv4 addresses of a raw IP packet.
pub fn ipv4_addrs(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let a = |o: usize| Ipv4Addr::new(packet[o], packet[o + 1], packet[o + 2], packet[o + 3]);
    Some((a(12), a(16)))
}

impl DelayScheduler {
    /// A scheduler for links whose one-way delays are `delay_ns[i]`, holding at most `max_depth`
    /// packets per pair.
    pub fn new(delay_ns: Vec<u64>, max_depth: usize) -> Self {
        let n = delay_ns.len().min(MAX_LINKS);
        Self {
            queues: (0..n * n).map(|_| VecDeque::new()).collect(),
            delay_ns,
            active: Vec::new(),
            depth: 0,
            max_depth,
            stats: DelayStats {
                lateness_hist: vec![0; BUCKETS],
                ..Default::default()
            },
        }
    }

    fn pair(&self, packet: &[u8]) -> Result<(usize, usize), Rejected> {
        let (s, d) = ipv4_addrs(packet).ok_or(Rejected::NotIpv4)?;
        let n = self.delay_ns.len();
        match (link_of(s), link_of(d)) {
            (Some(s), Some(d)) if s < n && d < n => Ok((s, d)),
            _ => Err(Rejected::NotLab),
        }
    }

    /// Queues `packet`, arrived at `now`; returns its due release time.
    pub fn push(&mut self, packet: Vec<u8>, now: u64) -> Result<u64, Rejected> {
        let r = self.pair(&packet).and_then(|(s, d)| {
            let q = s * self.delay_ns.len() + d;
            if self.queues[q].len() >= self.max_depth {
                return Err(Rejected::QueueFull);
            }
            let due = now + self.delay_ns[s] + self.delay_ns[d];
            self.stats.bytes += packet.len() as u64;
            if self.queues[q].is_empty() {
                self.active.push(q);
            }
            self.queues[q].push_back(Queued { due, packet });
            Ok(due)
        });
        match r {
            Ok(_) => {
                self.stats.packets += 1;
                self.depth += 1;
                self.stats.max_queue = self.stats.max_queue.max(self.depth);
            }
            Err(_) => self.stats.rejected += 1,
        }
        r
    }

    /// The earliest due release, if anything is queued.
    pub fn next_due(&self) -> Option<u64> {
        self.active
            .iter()
            .filter_map(|&q| self.queues[q].front().map(|p| p.due))
            .min()
    }

    /// Removes and returns the packet with the earliest due time if it is due at `now`, and
    /// records its lateness (`now` − due).
    pub fn pop_due(&mut self, now: u64) -> Option<Vec<u8>> {
        let (i, &q) = self
            .active
            .iter()
            .enumerate()
            .filter(|(_, &q)| self.queues[q].front().is_some_and(|p| p.due <= now))
            .min_by_key(|(_, &q)| self.queues[q].front().map(|p| p.due))?;
        let p = self.queues[q].pop_front()?;
        if self.queues[q].is_empty() {
            self.active.swap_remove(i);
        }
        self.depth -= 1;
        let late = now - p.due;
        self.stats.released += 1;
        self.stats.max_lateness_ns = self.stats.max_lateness_ns.max(late);
        let b = ((late / BUCKET_NS) as usize).min(BUCKETS - 1);
        self.stats.lateness_hist[b] += 1;
        Some(p.packet)
    }

    /// Packets queued now.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The counters.
    pub fn stats(&self) -> &DelayStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(src: [u8; 4], dst: [u8; 4], id: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[27] = id;
        p
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn release_is_arrival_plus_both_link_delays_in_order() {
        // Central at 0 ms, dc1 at 25 ms, dc2 at 10 ms.
        let mut s = DelayScheduler::new(vec![0, 25 * MS, 10 * MS], 100);
        let c = [198, 18, 0, 2];
        let d1 = [198, 18, 1, 2];
        let d2 = [198, 18, 2, 2];
        assert_eq!(s.push(pkt(d1, c, 1), 0), Ok(25 * MS));
        assert_eq!(s.push(pkt(d1, d2, 2), MS), Ok(36 * MS));
        assert_eq!(s.push(pkt(c, d2, 3), 2 * MS), Ok(12 * MS));
        assert_eq!(s.push(pkt(d1, c, 4), 3 * MS), Ok(28 * MS));
        assert_eq!(s.next_due(), Some(12 * MS));
        assert_eq!(s.pop_due(11 * MS), None);
        // Everything due by 40 ms comes out in due order (FIFO within a pair).
        let mut ids = Vec::new();
        while let Some(p) = s.pop_due(40 * MS) {
            ids.push(p[27]);
        }
        assert_eq!(ids, vec![3, 1, 4, 2]);
        assert_eq!(s.depth(), 0);
        assert_eq!(s.next_due(), None);
        let st = s.stats();
        assert_eq!((st.packets, st.released, st.max_queue), (4, 4, 4));
        // Lateness: 28, 15, 12, 4 ms; max 28 ms lands in the open bucket.
        assert_eq!(st.max_lateness_ns, 28 * MS);
        assert_eq!(st.lateness_hist[80], 1);
        assert_eq!(st.lateness_hist[BUCKETS - 1], 3);
    }

    #[test]
    fn non_lab_and_overflow_are_rejected_and_counted() {
        let mut s = DelayScheduler::new(vec![MS, MS], 2);
        assert_eq!(
            s.push(pkt([10, 0, 0, 1], [198, 18, 0, 2], 0), 0),
            Err(Rejected::NotLab)
        );
        assert_eq!(
            s.push(pkt([198, 18, 5, 2], [198, 18, 0, 2], 0), 0),
            Err(Rejected::NotLab)
        );
        assert_eq!(s.push(vec![0x60; 40], 0), Err(Rejected::NotIpv4));
        let a = [198, 18, 1, 2];
        let b = [198, 18, 0, 2];
        assert!(s.push(pkt(a, b, 0), 0).is_ok());
        assert!(s.push(pkt(a, b, 1), 0).is_ok());
        assert_eq!(s.push(pkt(a, b, 2), 0), Err(Rejected::QueueFull));
        // The reverse pair has its own queue.
        assert!(s.push(pkt(b, a, 3), 0).is_ok());
        assert_eq!(s.stats().rejected, 4);
    }

    #[test]
    fn lateness_quantiles_come_from_the_histogram() {
        let mut s = DelayScheduler::new(vec![0, 0], 1000);
        let a = [198, 18, 1, 2];
        let b = [198, 18, 0, 2];
        for i in 0..100u64 {
            s.push(pkt(a, b, 0), i * MS).unwrap();
            // 99 packets 10 µs late, one 1 ms late.
            let late = if i == 99 { MS } else { 10_000 };
            assert!(s.pop_due(i * MS + late).is_some());
        }
        assert_eq!(s.stats().lateness_quantile_ns(0.5), BUCKET_NS);
        assert_eq!(s.stats().lateness_quantile_ns(0.99), BUCKET_NS);
        assert_eq!(s.stats().lateness_quantile_ns(1.0), 21 * BUCKET_NS);
    }

    #[test]
    fn lateness_is_degraded_only_above_one_ms_at_p99() {
        let run = |late_ns: u64| {
            let mut s = DelayScheduler::new(vec![0, 0], 1000);
            let (a, b) = ([198, 18, 1, 2], [198, 18, 0, 2]);
            for i in 0..100u64 {
                s.push(pkt(a, b, 0), i * MS).unwrap();
                s.pop_due(i * MS + late_ns).unwrap();
            }
            s.stats().lateness()
        };
        // 960 µs lies in the bucket [950, 1000) µs: p99 reads 1000 µs, within the bound.
        let ok = run(960_000);
        assert_eq!((ok.p99_lateness_us, ok.degraded), (1000.0, false));
        assert_eq!(ok.packets, 100);
        assert_eq!(ok.mark(), "p99 1.00 ms, max 1.0 ms");
        let bad = run(1_000_000);
        assert_eq!((bad.p99_lateness_us, bad.degraded), (1050.0, true));
        assert_eq!(bad.mark(), "DEGRADED: p99 1.05 ms, max 1.0 ms");
    }
}
