//! DGT over real UDP sockets on loopback: ToS / priority marks read back, and 100 rounds
//! delivered bit-exact with 0 % loss. The reliable channel is an in-memory ordered queue here
//! (the TCP carriage of channel-0 messages is not built yet); each reliable message is handed
//! over only after every datagram sent before it was received, as on an ordered path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use geomx_net::dgt::udp::{channel_tos, DEFAULT_RECV_BUFFER};
use geomx_net::dgt::{DgtConfig, DgtReceiver, DgtSender, UdpChannels, ValueType, Values, NOT_SENT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn channel_sockets_carry_their_tos() {
    let ch = UdpChannels::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 3, DEFAULT_RECV_BUFFER).unwrap();
    assert_eq!(ch.channels(), 3);
    for i in 1..=3 {
        assert_eq!(ch.tos(i).unwrap(), channel_tos(3, i));
        assert_eq!(ch.tos(i).unwrap(), u32::from(3 - i) * 32);
    }
    #[cfg(target_os = "linux")]
    for i in 1..=3u8 {
        let p = socket2::SockRef::from(ch.socket(i).unwrap())
            .priority()
            .unwrap();
        assert_eq!(p, u32::from(3 - i));
    }
    assert!(ch.socket(0).is_err() && ch.socket(4).is_err());
    // IPv6 traffic class, where the host has ::1.
    if let Ok(v6) = UdpChannels::bind(IpAddr::V6(Ipv6Addr::LOCALHOST), 2, 1 << 16) {
        assert_eq!((v6.tos(1).unwrap(), v6.tos(2).unwrap()), (32, 0));
    }
}

#[test]
fn loopback_hundred_rounds_bit_exact() {
    let cfg = DgtConfig {
        rate_bps: Some(2_000_000_000),
        ..DgtConfig::default()
    };
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let tx_socks = UdpChannels::bind(lo, cfg.channels, DEFAULT_RECV_BUFFER).unwrap();
    let rx_socks = UdpChannels::bind(lo, cfg.channels, DEFAULT_RECV_BUFFER).unwrap();
    let dest = rx_socks.local_addrs().unwrap();
    let n = 20_000usize;
    let per = cfg.block_bytes / 4;
    let n_b = n.div_ceil(per);
    let mut tx = DgtSender::new(2, cfg.clone(), Instant::now()).unwrap();
    let mut rx = DgtReceiver::new(cfg.clone()).unwrap();
    rx.add_key(11, n as u32, ValueType::F32).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut buf = Vec::new();
    let mut rbuf = vec![0u8; 65536];
    let (mut sent, mut got) = (0u64, 0u64);
    for round in 0..100u32 {
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let map: Vec<u8> = (0..n_b)
            .map(|j| if j % 4 == 0 { 0 } else { 1 + (j % 3) as u8 })
            .collect();
        assert!(!map.contains(&NOT_SENT));
        tx.push(11, round, Values::F32(&x), &map).unwrap();
        let mut delivered = None;
        let start = Instant::now();
        while delivered.is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "round {round} stuck"
            );
            let now = Instant::now();
            buf.clear();
            if let Some(t) = tx.poll_transmit(now, &mut buf) {
                if t.channel == 0 {
                    // Ordered reliable path: first everything sent before it.
                    while got < sent {
                        assert!(start.elapsed() < Duration::from_secs(10), "datagram lost");
                        if let Some((_, len, _)) = rx_socks.try_recv(&mut rbuf).unwrap() {
                            rx.handle_datagram(Instant::now(), &rbuf[..len]).unwrap();
                            got += 1;
                        }
                    }
                    rx.handle_reliable(Instant::now(), &buf).unwrap();
                } else {
                    tx_socks
                        .send_to(t.channel, &buf, dest[usize::from(t.channel) - 1])
                        .unwrap();
                    sent += 1;
                }
            } else if let Some((_, len, _)) = rx_socks.try_recv(&mut rbuf).unwrap() {
                rx.handle_datagram(Instant::now(), &rbuf[..len]).unwrap();
                got += 1;
            } else {
                std::thread::yield_now();
            }
            rx.handle_timeout(Instant::now());
            delivered = rx.poll_delivery();
        }
        let d = delivered.unwrap();
        assert_eq!(d.round, round);
        assert!(
            d.missing.is_empty(),
            "round {round}: {:?} missing",
            d.missing
        );
        let same = d
            .values
            .iter()
            .zip(&x)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "round {round} not bit-exact");
    }
    let c = rx.counters();
    assert_eq!(c.iter().map(|k| k.lost + k.late + k.dup).sum::<u64>(), 0);
}
