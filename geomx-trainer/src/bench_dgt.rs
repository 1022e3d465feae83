//! `geomx bench dgt [--quick]`: round completion time of DGT versus all-TCP transfer of the same
//! tensors over a rate-limited, lossy link (issue 7, dgt.md), measured in one run.
//!
//! Per loss rate p ∈ {1 %, 5 %, 10 %} a fresh WAN-lab link ([`DgtLab`]: 100 Mbit/s each way,
//! 10 ms one way, random loss p on every IP packet each way) carries `warmup` + `rounds` rounds
//! of one tensor from the site to the central namespace; each series opens its own connection,
//! and its first round (TCP's slow start from the initial window) is reported apart, not in the
//! percentiles:
//! * **TCP**: a geomx-net `Push` of the whole tensor (one frame); the round ends when the
//!   central side's handler holds the whole tensor (the client waits for the empty reply
//!   before the next round, but the reply's trip back is not counted).
//! * **DGT**: the same tensor through a [`DgtClient`](geomx_net::dgt::link::DgtClient) with
//!   reliable share k = 0.8 (the spec's default) and k = 0.5 (C = 3, paced at 90 % of the link,
//!   blocks sized to the 1500-byte MTU, GSO off behind the loss filter); the round ends when the
//!   [`DgtServer`] delivers it (`Delivery::delivered_at`; lost blocks zero, 5 ms deadline after
//!   the first copy of the terminator).
//!
//! Both ends run in one process (in two namespaces), so both times are read off one clock:
//! from the start of the push until the central side holds the round's tensor.
//!
//! * **Encrypted** (`tcp mtls`, `dgt k=0.8 mtls`): the same under mutual TLS, as a default
//!   launch runs it: TLS on the TCP connection and on DGT's reliable channel, every datagram
//!   sealed (AES-256-GCM, key exported from the reliable channel's session).
//!
//! Without root the benchmark cannot build the link and says so (no loopback stand-in: loopback
//! has neither the rate limit nor the loss the comparison is about).

use std::sync::Arc;
use std::time::{Duration, Instant};

use geomx_net::dgt::link::{DgtServer, ServerTls};
use geomx_net::dgt::ValueType;
use geomx_net::tls::{Identity, JobCa, Security, TlsContext};
use geomx_net::{Handler, KvClient, KvServer, NetOptions, PayloadCodec, Request, Responder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::DgtTransportConfig;
use crate::hips::dgt::{link_config, DgtUplink};
use crate::hips::dgt_lab::{self, DgtLab, LossScope, CENTRAL_ADDR};
use crate::wanlab::delay::Lateness;
use geomx_net::congestion::Algorithm;

/// Settings of one benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct DgtBenchOptions {
    /// Elements (f32) of the tensor sent each round.
    pub elems: usize,
    /// Measured rounds per (loss, transport).
    pub rounds: usize,
    /// Rounds sent first on each fresh connection and left out of the figures (reported
    /// apart): the first round of a connection starts TCP from its initial window.
    pub warmup: usize,
    /// Link rate each way, Mbit/s.
    pub rate_mbit: f64,
    /// Loss probabilities.
    pub losses: Vec<f64>,
    /// One-way delay of the link, ms (the WAN lab's TUN relay; 0 = none).
    pub delay_ms: f64,
    /// TCP congestion control of both transports' TCP connections (`None`: the lab
    /// namespaces' default, which they take from the host's).
    pub congestion: Option<Algorithm>,
}

impl DgtBenchOptions {
    /// The full run: 2 MiB tensors, 200 rounds after one warm-up round, 100 Mbit/s,
    /// 1 / 5 / 10 % loss.
    pub fn full() -> Self {
        Self {
            elems: 1 << 19,
            rounds: 200,
            warmup: 1,
            rate_mbit: 100.0,
            losses: vec![0.01, 0.05, 0.10],
            delay_ms: 10.0,
            congestion: None,
        }
    }

    /// A smoke-size run: 512 KiB tensors, 8 rounds after one warm-up round.
    pub fn quick() -> Self {
        Self {
            elems: 1 << 17,
            rounds: 8,
            ..Self::full()
        }
    }
}

/// Round times of one transport at one loss rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// `tcp`, or `dgt k=<share>`.
    pub transport: String,
    /// Loss probability of the link.
    pub loss: f64,
    /// Median round completion time, ms.
    pub median_ms: f64,
    /// 95th percentile (nearest rank), ms.
    pub p95_ms: f64,
    /// 99th percentile (nearest rank), ms.
    pub p99_ms: f64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// The warm-up rounds, ms (not in the figures above).
    pub warmup_ms: Vec<f64>,
    /// DGT: fraction of the tensor's blocks missing at delivery (zeroed), over the measured
    /// rounds.
    pub missing_fraction: f64,
    /// Packets the link's loss filter dropped during the series (both directions).
    pub link_drops: u64,
    /// (measured round, ms) of every round over [`SLOW_ROUND`] × the median: when they come
    /// tells their cause (e.g. BBR's min-RTT probe, once per 10 s of a busy connection).
    pub slow_rounds: Vec<(usize, f64)>,
}

/// Result of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DgtBenchReport {
    /// `netns`, or `not-run` with the reason in `note`.
    pub mode: String,
    /// Why it did not run, or remarks.
    pub note: String,
    /// Tensor elements per round.
    pub elems: usize,
    /// Measured rounds per series.
    pub rounds: usize,
    /// Warm-up rounds per series, before the measured ones.
    pub warmup: usize,
    /// Link rate, Mbit/s.
    pub rate_mbit: f64,
    /// TCP congestion control of both transports' TCP connections, and whether the benchmark
    /// set it (`--congestion`) or it is the system's default, e.g. `bbr (system default)`.
    pub congestion: String,
    /// One series per (loss, transport).
    pub series: Vec<Series>,
    /// The delay relay's lateness of each loss rate's lab (all its series together).
    pub lab_lateness: Vec<LabLateness>,
}

/// The delay relay's lateness of one lab.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabLateness {
    /// The lab's loss probability.
    pub loss: f64,
    /// Its relay's lateness (`degraded` when p99 > 1 ms).
    pub lateness: Lateness,
}

/// Nearest-rank quantile of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Round times and, for DGT, the fraction of blocks missing in each round.
struct Rounds {
    ms: Vec<f64>,
    missing: Vec<f64>,
}

/// The figures of one series: its first `warmup` rounds apart, the rest measured.
fn series(transport: &str, loss: f64, r: Rounds, warmup: usize, drops: u64) -> Series {
    let w = warmup.min(r.ms.len());
    let mut ms = r.ms[w..].to_vec();
    ms.sort_by(f64::total_cmp);
    let median = quantile(&ms, 0.5);
    let measured = r.missing.get(w..).unwrap_or(&[]);
    Series {
        transport: transport.into(),
        loss,
        median_ms: median,
        p95_ms: quantile(&ms, 0.95),
        p99_ms: quantile(&ms, 0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        warmup_ms: r.ms[..w].to_vec(),
        missing_fraction: measured.iter().sum::<f64>() / measured.len().max(1) as f64,
        link_drops: drops,
        slow_rounds: r.ms[w..]
            .iter()
            .enumerate()
            .filter(|&(_, &m)| m > SLOW_ROUND * median)
            .map(|(i, &m)| (i, m))
            .collect(),
    }
}

/// A measured round slower than this many medians is listed in [`Series::slow_rounds`].
pub const SLOW_ROUND: f64 = 1.5;

/// Notes when each round's push arrived (its version is the round), then answers it.
#[derive(Default)]
struct Arrivals(std::sync::Mutex<std::collections::HashMap<u64, Instant>>);

impl Handler for Arrivals {
    fn on_request(&self, req: Request, reply: Responder) {
        let now = Instant::now();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.version, now);
        let _ = reply.send(req.version + 1, PayloadCodec::Raw, &[]);
    }
}

fn tensors(n: usize, rounds: usize) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    (0..rounds)
        .map(|_| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Mutual TLS of the encrypted series: the central (global server) and the site (local server)
/// certificates of one job CA.
struct Pki {
    central: Arc<TlsContext>,
    site: Arc<TlsContext>,
}

impl Pki {
    fn new() -> Result<Pki, String> {
        let ca = JobCa::generate("bench-dgt", 1).map_err(err)?;
        let ctx = |role: &str| -> Result<Arc<TlsContext>, String> {
            let creds = ca
                .issue(&Identity::new(role, 0, 0).map_err(err)?)
                .map_err(err)?;
            Ok(Arc::new(TlsContext::new(&creds).map_err(err)?))
        };
        Ok(Pki {
            central: ctx(crate::hips::plan::roles::GLOBAL_SERVER)?,
            site: ctx(crate::hips::plan::roles::LOCAL_SERVER)?,
        })
    }

    /// Plaintext options, or mutual TLS with `ctx`; TCP congestion control `cc`.
    fn opts(
        tls: Option<&Pki>,
        ctx: impl Fn(&Pki) -> &Arc<TlsContext>,
        cc: Option<Algorithm>,
    ) -> NetOptions {
        NetOptions {
            security: tls.map_or(Security::Off, |p| Security::Mtls(ctx(p).clone())),
            congestion: cc,
            ..NetOptions::default()
        }
    }
}

/// TCP round times (ms) on `lab` (encrypted with `tls`).
fn run_tcp(
    lab: &DgtLab,
    data: &Arc<Vec<Vec<f32>>>,
    tls: Option<&Pki>,
    cc: Option<Algorithm>,
) -> Result<Vec<f64>, String> {
    let opts = Pki::opts(tls, |p| &p.central, cc);
    let client_opts = Pki::opts(tls, |p| &p.site, cc);
    let arrivals = Arc::new(Arrivals::default());
    let handler = arrivals.clone();
    let (addr, serving) = lab.serve_central(move || {
        let s = KvServer::bind(format!("{CENTRAL_ADDR}:0"), handler, opts).map_err(err)?;
        let addr = s.local_addr();
        Ok((s, addr))
    })?;
    let data = data.clone();
    let client = lab
        .spawn_in(true, move || -> Result<Vec<f64>, String> {
            let c = KvClient::connect(addr, 1, client_opts).map_err(err)?;
            let mut out = Vec::with_capacity(data.len());
            for (r, x) in data.iter().enumerate() {
                let bytes = crate::hips::msg::f32_bytes(x);
                let t0 = Instant::now();
                let p = c
                    .push(
                        0,
                        r as u64,
                        PayloadCodec::DenseF32,
                        0,
                        x.len() as u64,
                        &bytes,
                    )
                    .map_err(err)?;
                p.wait(Duration::from_secs(120)).map_err(err)?;
                let arrived = arrivals
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&(r as u64))
                    .copied()
                    .ok_or_else(|| format!("round {r}: the server noted no arrival"))?;
                out.push(arrived.duration_since(t0).as_secs_f64() * 1e3);
            }
            Ok(out)
        })
        .map_err(err)?;
    let res = client
        .join()
        .map_err(|_| "tcp client panicked".to_string())?
        .map_err(err)?;
    drop(serving);
    res
}

/// DGT round times (ms) and the fraction of blocks missing at delivery in each round
/// (encrypted and sealed with `tls`).
fn run_dgt(
    lab: &DgtLab,
    data: &Arc<Vec<Vec<f32>>>,
    rate_mbit: f64,
    k: f64,
    tls: Option<&Pki>,
    cc: Option<Algorithm>,
) -> Result<Rounds, String> {
    let d = DgtTransportConfig {
        k,
        rate_mbit: Some(rate_mbit * 0.9),
        gso: false,
        ..DgtTransportConfig::default()
    };
    let n = data[0].len();
    let d2 = d.clone();
    let server_tls = tls.map(|p| ServerTls {
        ctx: p.central.clone(),
        roles: vec![crate::hips::plan::roles::LOCAL_SERVER.to_string()],
    });
    let client_opts = Pki::opts(tls, |p| &p.site, cc);
    let ((addr, deliveries), serving) = lab.serve_central(move || {
        let (cfg, _) = link_config(&d2);
        let s = DgtServer::bind_secure(
            CENTRAL_ADDR.into(),
            cfg,
            &[(0, n as u32, ValueType::F32)],
            None,
            server_tls,
        )
        .map_err(err)?;
        let out = (s.local_addr(), s.deliveries().clone());
        Ok((s, out))
    })?;
    let data = data.clone();
    let client = lab
        .spawn_in(true, move || -> Result<Rounds, String> {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let link = crate::hips::dgt::connect(addr, 1, &d, &client_opts, deadline)?;
            let mut up = DgtUplink::new(&d, ValueType::F32)?;
            let n_b = link.num_blocks(n, ValueType::F32);
            let (mut ms, mut missing) = (Vec::new(), Vec::new());
            for (r, x) in data.iter().enumerate() {
                let t0 = Instant::now();
                up.push(&link, 0, r as u64, x.clone())?;
                let del = deliveries
                    .recv_timeout(Duration::from_secs(120))
                    .map_err(|_| format!("round {r}: no delivery"))?;
                ms.push(del.delivered_at.duration_since(t0).as_secs_f64() * 1e3);
                missing.push(del.missing.len() as f64 / n_b.max(1) as f64);
            }
            Ok(Rounds { ms, missing })
        })
        .map_err(err)?;
    let res = client
        .join()
        .map_err(|_| "dgt client panicked".to_string())?
        .map_err(err)?;
    drop(serving);
    res
}

/// The default TCP congestion control inside `lab`'s namespaces.
fn lab_default_congestion(lab: &DgtLab) -> Result<String, String> {
    lab.spawn_in(true, || {
        // A thread reads the sysctls of the namespace it is in.
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("reading the lab's default congestion control: {e}"))
    })
    .map_err(err)?
    .join()
    .map_err(|_| "reading the lab's congestion control panicked".to_string())?
    .map_err(err)?
}

/// Runs the benchmark; `Ok` with mode `not-run` when namespaces cannot be created.
pub fn run(opts: &DgtBenchOptions) -> Result<DgtBenchReport, String> {
    let mut report = DgtBenchReport {
        mode: "netns".into(),
        note: format!(
            "loss on every IP packet, each way; {} ms one-way delay; DGT C = 3, paced at 90 % of \
             the link, GSO off, 5 ms deadline; `mtls`: TLS 1.3 on TCP and DGT's reliable \
             channel, datagrams sealed",
            opts.delay_ms
        ),
        elems: opts.elems,
        rounds: opts.rounds,
        warmup: opts.warmup,
        rate_mbit: opts.rate_mbit,
        congestion: match opts.congestion {
            Some(a) => format!("{a} (set)"),
            None => "system default".into(),
        },
        series: Vec::new(),
        lab_lateness: Vec::new(),
    };
    if let Err(e) = dgt_lab::root_available() {
        report.mode = "not-run".into();
        report.note = format!("cannot run: {e}");
        return Ok(report);
    }
    let data = Arc::new(tensors(opts.elems, opts.warmup + opts.rounds));
    let pki = Pki::new()?;
    for &p in &opts.losses {
        let lab =
            DgtLab::build(Some(opts.rate_mbit), p, LossScope::All, opts.delay_ms).map_err(err)?;
        if opts.congestion.is_none() {
            report.congestion = format!("{} (system default)", lab_default_congestion(&lab)?);
        }
        let before = lab.drops();
        let sum = |a: (u64, u64), b: (u64, u64)| (b.0 + b.1).saturating_sub(a.0 + a.1);
        let mut last = before;
        // Plaintext TCP and DGT at both shares, then the encrypted pair.
        let runs: [(Option<f64>, Option<&Pki>); 5] = [
            (None, None),
            (Some(0.8), None),
            (Some(0.5), None),
            (None, Some(&pki)),
            (Some(0.8), Some(&pki)),
        ];
        for (k, tls) in runs {
            let suffix = if tls.is_some() { " mtls" } else { "" };
            let (name, rounds) = match k {
                None => {
                    let ms = run_tcp(&lab, &data, tls, opts.congestion)?;
                    let missing = vec![0.0; ms.len()];
                    ("tcp".to_string(), Rounds { ms, missing })
                }
                Some(k) => (
                    format!("dgt k={k}"),
                    run_dgt(&lab, &data, opts.rate_mbit, k, tls, opts.congestion)?,
                ),
            };
            let now = lab.drops();
            report.series.push(series(
                &(name + suffix),
                p,
                rounds,
                opts.warmup,
                sum(last, now),
            ));
            last = now;
        }
        if let Some(lateness) = lab.relay_lateness() {
            report.lab_lateness.push(LabLateness { loss: p, lateness });
        }
    }
    Ok(report)
}

/// The report as a markdown table.
pub fn render_markdown(r: &DgtBenchReport) -> String {
    let mut s = format!(
        "DGT vs TCP, {} f32 per round ({:.1} MiB), {} rounds after {} warm-up, {} Mbit/s, TCP \
         congestion control {}, mode {}\n{}\n\n",
        r.elems,
        r.elems as f64 * 4.0 / (1 << 20) as f64,
        r.rounds,
        r.warmup,
        r.rate_mbit,
        r.congestion,
        r.mode,
        r.note
    );
    if r.series.is_empty() {
        return s;
    }
    s.push_str(
        "| loss | transport | median ms | p95 ms | p99 ms | mean ms | warm-up ms | blocks missing \
         | link drops | slow rounds (round: ms) |\n",
    );
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for x in &r.series {
        let warmup: Vec<String> = x.warmup_ms.iter().map(|m| format!("{m:.1}")).collect();
        let slow: Vec<String> = x
            .slow_rounds
            .iter()
            .map(|(i, m)| format!("{i}: {m:.0}"))
            .collect();
        s.push_str(&format!(
            "| {:.0} % | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} % | {} | {} |\n",
            x.loss * 100.0,
            x.transport,
            x.median_ms,
            x.p95_ms,
            x.p99_ms,
            x.mean_ms,
            warmup.join(" / "),
            x.missing_fraction * 100.0,
            x.link_drops,
            slow.join(", ")
        ));
    }
    for l in &r.lab_lateness {
        s.push_str(&format!(
            "\nDelay relay at {:.0} % loss: {}{}",
            l.loss * 100.0,
            l.lateness.mark(),
            if l.lateness.degraded {
                " (the lab added more delay than configured)"
            } else {
                ""
            }
        ));
    }
    if !r.lab_lateness.is_empty() {
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((quantile(&v, 0.5), quantile(&v, 0.99)), (50.0, 99.0));
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        // The first round is the warm-up: out of the figures, reported apart.
        let r = Rounds {
            ms: vec![90.0, 5.0, 1.0, 3.0, 4.5],
            missing: vec![0.5, 0.0, 0.1, 0.2, 0.1],
        };
        let s = series("tcp", 0.01, r, 1, 2);
        assert_eq!(
            (s.median_ms, s.p95_ms, s.p99_ms, s.mean_ms),
            (3.0, 5.0, 5.0, 3.375)
        );
        assert_eq!(s.warmup_ms, vec![90.0]);
        assert!((s.missing_fraction - 0.1).abs() < 1e-12);
        // Over 1.5 × the median (4.5 ms): measured round 0 only (4.5 itself is not over).
        assert_eq!(s.slow_rounds, vec![(0, 5.0)]);
        let md = render_markdown(&DgtBenchReport {
            mode: "netns".into(),
            note: String::new(),
            elems: 4,
            rounds: 4,
            warmup: 1,
            rate_mbit: 100.0,
            congestion: "bbr (system default)".into(),
            series: vec![s],
            lab_lateness: vec![],
        });
        assert!(
            md.contains("TCP congestion control bbr (system default)"),
            "{md}"
        );
        assert!(
            md.contains("| 1 % | tcp | 3.0 | 5.0 | 5.0 | 3.4 | 90.0 | 10.00 % | 2 | 0: 5 |"),
            "{md}"
        );
    }
}
