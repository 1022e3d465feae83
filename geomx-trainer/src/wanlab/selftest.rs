//! `geomx wan-lab --selftest`: the lab's fidelity check with hard numeric bounds (wan-lab.md
//! oracles 1 and 2 plus the relay's lateness bound). Speed and timing targets live here, not in
//! `cargo test`: the integration tests assert only what holds on any loaded machine.
//!
//! One run builds a central site (unshaped, 0 ms) and one data center behind a shaped, delayed
//! link, measures a UDP round trip (median of 20 ping-pongs), then bulk TCP from the data center
//! to the central site, and reads the delay relay's counters and the machine's steal time.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::delay::{MAX_LATENESS_BOUND_NS, P99_LATENESS_BOUND_NS};
use super::probe::{bulk_tcp_mbit, median, udp_pings};
use super::{Lab, LabSpec, LinkSpec, WanLabError};

/// What one self-test run sets up.
#[derive(Debug, Clone, PartialEq)]
pub struct SelftestOptions {
    /// The data center's link rate each way, Mbit/s.
    pub rate_mbit: f64,
    /// Its one-way delay, ms.
    pub delay_ms: f64,
    /// Length of the bulk TCP transfer (after its first byte).
    pub bulk: Duration,
    /// The start of the transfer left out of the goodput (slow start).
    pub skip: Duration,
    /// UDP ping-pongs for the round trip.
    pub pings: usize,
    /// Let the CPUs idle (no keep-awake spinners): to measure what the spinners are worth.
    pub allow_cpu_idle: bool,
}

impl Default for SelftestOptions {
    /// wan-lab.md oracle 1: 100 Mbit/s, 50 ms, 10 s of bulk TCP with the first 2 s left out.
    fn default() -> Self {
        Self {
            rate_mbit: 100.0,
            delay_ms: 50.0,
            bulk: Duration::from_secs(10),
            skip: Duration::from_secs(2),
            pings: 20,
            allow_cpu_idle: false,
        }
    }
}

/// The figures of one run (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelftestReport {
    /// Whether every bound held.
    pub ok: bool,
    /// The bounds that did not hold, in words.
    pub failures: Vec<String>,
    /// `debug` or `release`: how this binary was built.
    pub build: &'static str,
    /// Configured rate, Mbit/s.
    pub rate_mbit: f64,
    /// Configured one-way delay, ms.
    pub delay_ms: f64,
    /// Bulk TCP goodput, Mbit/s.
    pub goodput_mbit: f64,
    /// `goodput_mbit / rate_mbit`.
    pub rate_ratio: f64,
    /// Median UDP round trip of the packets (kernel receive timestamps), ms.
    pub rtt_ms: f64,
    /// Median UDP round trip as the application saw it (its threads' wake-ups included), ms.
    pub app_rtt_ms: f64,
    /// The round trip the link should show: 2 × delay, ms.
    pub expected_rtt_ms: f64,
    /// Largest of the packets' UDP round trips, ms.
    pub rtt_max_ms: f64,
    /// Packets the delay relay released.
    pub packets: u64,
    /// Its median lateness, µs.
    pub p50_lateness_us: f64,
    /// Its 99th-percentile lateness, µs.
    pub p99_lateness_us: f64,
    /// Its largest lateness, µs.
    pub max_lateness_us: f64,
    /// The largest number of packets it held at once.
    pub max_queue: usize,
    /// Whether its thread had real-time priority.
    pub realtime: bool,
    /// Whether the keep-awake spinners ran.
    pub keep_awake: bool,
    /// Whether the kernel forwarded released packets in its own real-time NAPI thread.
    pub napi_thread: bool,
    /// CPU time of the relay thread, ms.
    pub relay_cpu_ms: f64,
    /// Time the relay thread waited for a CPU while runnable, ms.
    pub relay_runqueue_wait_ms: f64,
    /// Steal time of the machine's CPUs during the run (all CPUs together), ms: time the
    /// hypervisor ran something else while this machine wanted to run.
    pub steal_ms: f64,
    /// CPUs online.
    pub cpus: usize,
    /// Wall time of the run, s.
    pub wall_s: f64,
}

/// The machine's total steal time so far, ms (`/proc/stat`); 0 where unknown.
pub fn steal_ms() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal …
    let ticks: u64 = cpu
        .split_whitespace()
        .nth(8)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 * 1e3 / hz as f64
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One self-test run (needs root).
pub fn run(o: &SelftestOptions) -> Result<SelftestReport, WanLabError> {
    let started = Instant::now();
    let site = LinkSpec {
        rate_mbit: Some(o.rate_mbit),
        delay_ms: o.delay_ms,
        ..LinkSpec::new("dc1")
    };
    let lab = Lab::build(LabSpec {
        links: vec![LinkSpec::new("central"), site],
        allow_cpu_idle: o.allow_cpu_idle,
    })?;
    let steal0 = steal_ms();
    let pings = udp_pings(&lab, 1, 0, o.pings)?;
    let goodput = bulk_tcp_mbit(&lab, 0, 1, o.skip, o.bulk)?;
    let steal = steal_ms() - steal0;
    let st = lab.teardown().unwrap_or_default();
    let l = st.lateness();
    let path: Vec<f64> = pings.iter().map(|p| p.path_ms).collect();
    let rtt_max = path.iter().copied().fold(0.0, f64::max);
    let mut r = SelftestReport {
        ok: false,
        failures: Vec::new(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        rate_mbit: o.rate_mbit,
        delay_ms: o.delay_ms,
        goodput_mbit: goodput,
        rate_ratio: goodput / o.rate_mbit,
        rtt_ms: median(path),
        app_rtt_ms: median(pings.iter().map(|p| p.app_ms).collect()),
        expected_rtt_ms: 2.0 * o.delay_ms,
        rtt_max_ms: rtt_max,
        packets: l.packets,
        p50_lateness_us: l.p50_lateness_us,
        p99_lateness_us: l.p99_lateness_us,
        max_lateness_us: l.max_lateness_us,
        max_queue: st.max_queue,
        realtime: st.realtime,
        keep_awake: st.keep_awake,
        napi_thread: st.napi_thread,
        relay_cpu_ms: st.cpu_ns as f64 / 1e6,
        relay_runqueue_wait_ms: st.runqueue_wait_ns as f64 / 1e6,
        steal_ms: steal,
        cpus: cpus(),
        wall_s: started.elapsed().as_secs_f64(),
    };
    r.failures = failures(&r);
    r.ok = r.failures.is_empty();
    Ok(r)
}

/// The bounds a run must meet: p99 lateness ≤ 1 ms, max lateness ≤ 5 ms, goodput 90–100 % of the
/// rate, round trip within 10 % of 2 × delay.
pub fn failures(r: &SelftestReport) -> Vec<String> {
    let mut f = Vec::new();
    let p99_bound = P99_LATENESS_BOUND_NS as f64 / 1e3;
    let max_bound = MAX_LATENESS_BOUND_NS as f64 / 1e3;
    if r.p99_lateness_us > p99_bound {
        f.push(format!(
            "p99 lateness {:.0} µs > {p99_bound:.0} µs",
            r.p99_lateness_us
        ));
    }
    if r.max_lateness_us > max_bound {
        f.push(format!(
            "max lateness {:.0} µs > {max_bound:.0} µs",
            r.max_lateness_us
        ));
    }
    if !(0.9..=1.0).contains(&r.rate_ratio) {
        f.push(format!(
            "goodput {:.1} Mbit/s outside 90–100 % of {} Mbit/s",
            r.goodput_mbit, r.rate_mbit
        ));
    }
    if (r.rtt_ms - r.expected_rtt_ms).abs() > 0.1 * r.expected_rtt_ms {
        f.push(format!(
            "round trip {:.2} ms not within 10 % of {:.0} ms",
            r.rtt_ms, r.expected_rtt_ms
        ));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> SelftestReport {
        SelftestReport {
            ok: true,
            failures: vec![],
            build: "debug",
            rate_mbit: 100.0,
            delay_ms: 50.0,
            goodput_mbit: 95.0,
            rate_ratio: 0.95,
            rtt_ms: 100.5,
            app_rtt_ms: 100.7,
            expected_rtt_ms: 100.0,
            rtt_max_ms: 101.0,
            packets: 10,
            p50_lateness_us: 50.0,
            p99_lateness_us: 1000.0,
            max_lateness_us: 5000.0,
            max_queue: 1,
            realtime: true,
            keep_awake: true,
            napi_thread: true,
            relay_cpu_ms: 1.0,
            relay_runqueue_wait_ms: 0.0,
            steal_ms: 0.0,
            cpus: 2,
            wall_s: 1.0,
        }
    }

    #[test]
    fn bounds_are_inclusive_and_each_failure_is_named() {
        assert_eq!(failures(&good()), Vec::<String>::new());
        let mut r = good();
        r.p99_lateness_us = 1050.0;
        r.max_lateness_us = 5001.0;
        r.rate_ratio = 0.89;
        r.rtt_ms = 111.0;
        let f = failures(&r);
        assert_eq!(f.len(), 4, "{f:?}");
        assert!(f[0].starts_with("p99 lateness 1050"), "{f:?}");
        assert!(f[1].starts_with("max lateness 5001"), "{f:?}");
        assert!(f[2].starts_with("goodput"), "{f:?}");
        assert!(f[3].starts_with("round trip 111.00"), "{f:?}");
    }

    #[test]
    fn steal_is_a_finite_non_negative_figure() {
        let s = steal_ms();
        assert!(s.is_finite() && s >= 0.0, "{s}");
    }
}
