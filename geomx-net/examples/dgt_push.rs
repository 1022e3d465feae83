//! DGT as a library: a parameter-server push over a DGT link on loopback.
//!
//! The sender ranks its blocks by contribution (here: mean |x| per block, the first round's
//! score of geomx-kernels' `BlockScores`), sends the top share k reliably and the rest over three
//! paced UDP channels; the receiver gets the tensor with missing blocks zeroed and late blocks
//! folded into the next round.
//!
//! ```text
//! cargo run -p geomx-net --example dgt_push
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use geomx_net::dgt::link::{DgtClient, DgtServer, LinkError, LinkOptions, Pacing};
use geomx_net::dgt::{DgtConfig, ValueType};

/// Channel of each block: the ⌈k·n⌉ blocks with the largest mean |x| on channel 0, the rest
/// spread evenly over channels 1..=C by rank (the spec's band formula).
fn channel_map(x: &[f32], per: usize, k: f64, channels: u8) -> Vec<u8> {
    let n_b = x.len().div_ceil(per);
    let score = |j: usize| {
        let b = &x[j * per..((j + 1) * per).min(x.len())];
        b.iter().map(|v| f64::from(v.abs())).sum::<f64>() / b.len() as f64
    };
    let mut ranked: Vec<usize> = (0..n_b).collect();
    ranked.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    let n_rel = (k * n_b as f64).ceil() as usize;
    let n_unrel = n_b - n_rel;
    let mut map = vec![0u8; n_b];
    for (rank, &j) in ranked.iter().enumerate().skip(n_rel) {
        map[j] = 1 + ((rank - n_rel) * usize::from(channels) / n_unrel) as u8;
    }
    map
}

fn main() -> Result<(), LinkError> {
    let cfg = DgtConfig {
        deadline: Duration::from_millis(50),
        ..DgtConfig::default()
    };
    let n = 250_000usize;
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // Receiver (e.g. a global parameter server): one key of n f32 values.
    let server = DgtServer::bind(lo, cfg.clone(), &[(0, n as u32, ValueType::F32)], None)?;
    // Sender (e.g. a data center's local server), paced from the measured goodput.
    let opts = LinkOptions {
        pacing: Pacing::Auto {
            min_bps: 50_000_000,
            max_bps: 2_000_000_000,
        },
        ..LinkOptions::default()
    };
    let client = DgtClient::connect(server.local_addr(), 1, cfg.clone(), opts)?;
    let per = client.block_bytes() / 4;
    for round in 0..10u32 {
        let x: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.001 + round as f32).sin()) * (i % 7) as f32)
            .collect();
        let map = channel_map(&x, per, 0.8, cfg.channels);
        client.push_f32(0, round, x.clone(), map)?;
        let d = server
            .recv_delivery(Duration::from_secs(10))
            .ok_or_else(|| LinkError::Timeout("waiting for a delivery".into()))?;
        let exact = d.values.iter().zip(&x).filter(|(a, b)| a == b).count();
        println!(
            "round {round}: {exact}/{n} values exact, {} blocks missing, {} late blocks folded, \
             rate {:?} bit/s",
            d.missing.len(),
            d.folded_late,
            client.stats().rate_bps
        );
    }
    client.flush(Duration::from_secs(10))?;
    let (lost, sent) = server.stats().unreliable_lost_sent();
    let cs = client.stats();
    println!(
        "unreliable blocks lost {lost} of {sent}; {} datagrams in {} system calls (GSO {})",
        cs.datagrams, cs.udp_sends, cs.gso
    );
    Ok(())
}
