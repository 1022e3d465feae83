//! `geomx bench tls [--quick]`: what mutual TLS costs on a real WAN link. geomx-net push + pull
//! goodput with `security = mtls` against plaintext, over a WAN-lab link shaped to 1 Gbit/s each
//! way (issue 17's goal: encrypted ≥ 0.95 × plaintext), both measured in the same run.
//!
//! The lab is [`DgtLab`]'s two namespaces (site and central, joined through the router
//! namespace, tbf at the link rate, no loss, no delay). The server (a store: a push keeps the
//! payload, a pull returns it) runs in the central namespace, the client in the site's. Per
//! driver and size the plaintext and encrypted pairs alternate `repeats` times; each figure is
//! the best of its repeats, payload bytes both ways per second (10^6 bytes).
//!
//! Without root the benchmark cannot build the link and says so (loopback has no wire limit:
//! `geomx bench net` measures the CPU cost there).

use std::sync::Arc;
use std::time::{Duration, Instant};

use geomx_bench::net::StoreHandler;
use geomx_net::tls::{Identity, JobCa, Security, TlsContext};
use geomx_net::{DriverKind, KvClient, KvServer, NetOptions, PayloadCodec};
use serde::Serialize;

use crate::hips::dgt_lab::{self, DgtLab, LossScope, CENTRAL_ADDR};

/// Settings of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsBenchOptions {
    /// Link rate each way, Mbit/s.
    pub rate_mbit: f64,
    /// (payload bytes, push + pull round trips) per measurement.
    pub sizes: Vec<(usize, usize)>,
    /// Alternating plaintext / encrypted measurements per (driver, size); the best counts.
    pub repeats: usize,
}

impl TlsBenchOptions {
    /// The full run: 1 MiB × 48 and 64 MiB × 3 round trips, best of 3, at 1 Gbit/s.
    pub fn full() -> Self {
        Self {
            rate_mbit: 1000.0,
            sizes: vec![(1 << 20, 48), (64 << 20, 3)],
            repeats: 3,
        }
    }

    /// A smoke-size run.
    pub fn quick() -> Self {
        Self {
            sizes: vec![(1 << 20, 8), (16 << 20, 1)],
            repeats: 1,
            ..Self::full()
        }
    }
}

/// One (driver, size) comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsRow {
    /// `portable` or `io-uring`.
    pub driver: String,
    /// Payload bytes per push (and per pull).
    pub size_bytes: usize,
    /// Plaintext goodput, MB/s.
    pub plaintext_mbps: f64,
    /// Mutual-TLS goodput, MB/s.
    pub mtls_mbps: f64,
    /// `mtls_mbps / plaintext_mbps`.
    pub mtls_vs_plaintext: f64,
}

/// Result of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsBenchReport {
    /// `netns`, or `not-run` with the reason in `note`.
    pub mode: String,
    /// What was measured, or why not.
    pub note: String,
    /// Link rate each way, Mbit/s.
    pub rate_mbit: f64,
    /// The link's payload ceiling each way in MB/s (rate / 8, before headers).
    pub link_mbps: f64,
    /// One row per (driver, size).
    pub rows: Vec<TlsRow>,
    /// The goal of issue 17.
    pub goal_mtls_vs_plaintext: f64,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The options of `driver` under mutual TLS as `role` of `ca`'s job.
fn mtls(base: &NetOptions, ca: &JobCa, role: &str) -> Result<NetOptions, String> {
    let creds = ca
        .issue(&Identity::new(role, 0, 0).map_err(err)?)
        .map_err(err)?;
    Ok(NetOptions {
        security: Security::Mtls(Arc::new(TlsContext::new(&creds).map_err(err)?)),
        ..base.clone()
    })
}

/// Push + pull goodput (MB/s, payload both ways) of `rounds` round trips of `size` bytes from
/// the site to a store server in the central namespace, after one warm-up round trip.
fn goodput(
    lab: &DgtLab,
    server: NetOptions,
    client: NetOptions,
    size: usize,
    rounds: usize,
) -> Result<f64, String> {
    let (addr, serving) = lab.serve_central(move || {
        let s = KvServer::bind(format!("{CENTRAL_ADDR}:0"), StoreHandler::default(), server)
            .map_err(err)?;
        let addr = s.local_addr();
        Ok((s, addr))
    })?;
    let cli = lab
        .spawn_in(true, move || -> Result<f64, String> {
            let c = KvClient::connect(addr, 1, client).map_err(err)?;
            let payload = vec![0x5au8; size];
            let wait = Duration::from_secs(300);
            let trip = || -> Result<(), String> {
                c.push(0, 0, PayloadCodec::Raw, 0, 0, &payload)
                    .map_err(err)?
                    .wait(wait)
                    .map_err(err)?;
                let r = c.pull(0, 0, 0, 0).map_err(err)?.wait(wait).map_err(err)?;
                if r.payload.len() != size {
                    return Err(format!("pulled {} bytes, pushed {size}", r.payload.len()));
                }
                geomx_net::bufpool::recycle(r.payload);
                Ok(())
            };
            trip()?;
            let t0 = Instant::now();
            for _ in 0..rounds {
                trip()?;
            }
            Ok((2 * size * rounds) as f64 / t0.elapsed().as_secs_f64() / 1e6)
        })
        .map_err(err)?;
    let res = cli
        .join()
        .map_err(|_| "client panicked".to_string())?
        .map_err(err)?;
    drop(serving);
    res
}

/// The drivers compared: portable, and io_uring where the kernel has it.
fn drivers() -> Vec<(&'static str, DriverKind)> {
    let mut d = vec![("portable", DriverKind::Portable)];
    if geomx_net::uring_unavailable_reason().is_none() {
        d.push(("io-uring", DriverKind::IoUring));
    }
    d
}

/// Runs the benchmark; `Ok` with mode `not-run` when namespaces cannot be created.
pub fn run(opts: &TlsBenchOptions) -> Result<TlsBenchReport, String> {
    let mut report = TlsBenchReport {
        mode: "netns".into(),
        note: format!(
            "push + pull through a WAN-lab link shaped to {} Mbit/s each way (tbf, no loss, no \
             delay); best of {} alternating runs",
            opts.rate_mbit, opts.repeats
        ),
        rate_mbit: opts.rate_mbit,
        link_mbps: opts.rate_mbit / 8.0,
        rows: Vec::new(),
        goal_mtls_vs_plaintext: 0.95,
    };
    if let Err(e) = dgt_lab::root_available() {
        report.mode = "not-run".into();
        report.note = format!("cannot run: {e}");
        return Ok(report);
    }
    let lab = DgtLab::build(Some(opts.rate_mbit), 0.0, LossScope::All, 0.0).map_err(err)?;
    let ca = JobCa::generate("bench-tls", 1).map_err(err)?;
    for (name, driver) in drivers() {
        let plain = NetOptions {
            driver,
            ..NetOptions::default()
        };
        let (server, client) = (
            mtls(&plain, &ca, "local_server")?,
            mtls(&plain, &ca, "worker")?,
        );
        for &(size, rounds) in &opts.sizes {
            let (mut p, mut t) = (0f64, 0f64);
            for _ in 0..opts.repeats.max(1) {
                p = p.max(goodput(&lab, plain.clone(), plain.clone(), size, rounds)?);
                t = t.max(goodput(&lab, server.clone(), client.clone(), size, rounds)?);
            }
            report.rows.push(TlsRow {
                driver: name.into(),
                size_bytes: size,
                plaintext_mbps: round2(p),
                mtls_mbps: round2(t),
                mtls_vs_plaintext: round3(t / p),
            });
        }
    }
    Ok(report)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The report as a markdown table.
pub fn render_markdown(r: &TlsBenchReport) -> String {
    let mut s = format!("Mutual TLS vs plaintext, mode {}\n{}\n\n", r.mode, r.note);
    if r.rows.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "| driver | size | plaintext MB/s | mtls MB/s | mtls / plaintext (goal ≥ {}) |\n\
         |---|---:|---:|---:|---:|\n",
        r.goal_mtls_vs_plaintext
    ));
    for x in &r.rows {
        s.push_str(&format!(
            "| {} | {} KiB | {:.1} | {:.1} | {:.3} |\n",
            x.driver,
            x.size_bytes >> 10,
            x.plaintext_mbps,
            x.mtls_mbps,
            x.mtls_vs_plaintext
        ));
    }
    s.push_str(&format!(
        "\nLink ceiling: {:.1} MB/s each way (push + pull goodput counts both ways, one at a \
         time).\n",
        r.link_mbps
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_row_and_the_goal() {
        let r = TlsBenchReport {
            mode: "netns".into(),
            note: "n".into(),
            rate_mbit: 1000.0,
            link_mbps: 125.0,
            rows: vec![TlsRow {
                driver: "io-uring".into(),
                size_bytes: 1 << 20,
                plaintext_mbps: 110.0,
                mtls_mbps: 108.0,
                mtls_vs_plaintext: 0.982,
            }],
            goal_mtls_vs_plaintext: 0.95,
        };
        let md = render_markdown(&r);
        assert!(
            md.contains("| io-uring | 1024 KiB | 110.0 | 108.0 | 0.982 |"),
            "{md}"
        );
        assert!(md.contains("goal ≥ 0.95"), "{md}");
    }
}
