//! The DGT driver over real loopback sockets: TCP reliable channel + UDP channels (GSO and the
//! per-datagram fallback), hello negotiation, reports, auto pacing, malformed input.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use geomx_net::dgt::link::{DgtClient, DgtServer, LinkOptions, Pacing};
use geomx_net::dgt::{DgtConfig, ValueType};
use geomx_net::wire::{encode, Frame, FrameHeader, MsgKind, PayloadCodec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(10);

fn cfg() -> DgtConfig {
    DgtConfig {
        rate_bps: Some(2_000_000_000),
        deadline: Duration::from_millis(200),
        ..DgtConfig::default()
    }
}

/// A channel map: every 4th block reliable, the rest spread over channels 1..=3.
fn map(n_b: usize) -> Vec<u8> {
    (0..n_b)
        .map(|j| if j % 4 == 0 { 0 } else { 1 + (j % 3) as u8 })
        .collect()
}

fn run_rounds(opts: LinkOptions, rounds: u32, n: usize) -> (DgtServer, DgtClient) {
    let server =
        DgtServer::bind(LO, cfg(), &[(3, n as u32, ValueType::F32)], Some(vec![9])).unwrap();
    let client = DgtClient::connect(server.local_addr(), 9, cfg(), opts).unwrap();
    let n_b = client.num_blocks(n, ValueType::F32);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for round in 0..rounds {
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        client.push_f32(3, round, x.clone(), map(n_b)).unwrap();
        let d = server.recv_delivery(WAIT).expect("delivery");
        assert_eq!((d.sender, d.key, d.round), (9, 3, round));
        assert!(
            d.missing.is_empty(),
            "round {round}: {:?} missing",
            d.missing
        );
        assert!(
            d.values
                .iter()
                .zip(&x)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "round {round} not bit-exact"
        );
    }
    client.flush(WAIT).unwrap();
    (server, client)
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < WAIT, "condition not reached");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn loopback_rounds_bit_exact_with_reports() {
    let rounds = 100;
    let (server, client) = run_rounds(LinkOptions::default(), rounds, 20_000);
    // Loopback MTU 65536: the configured 4096-byte blocks fit.
    assert_eq!(client.block_bytes(), 4096);
    // Reports of rounds 0..rounds-1 are final at the next delivery.
    wait_until(|| client.stats().reports == u64::from(rounds - 1));
    wait_until(|| server.stats().deliveries == u64::from(rounds));
    let cs = client.stats();
    let ss = server.stats();
    assert_eq!(ss.invalid, 0);
    for ch in 0..=3 {
        let c = ss.channels[ch];
        assert_eq!(c.sent, c.on_time + c.late + c.lost, "channel {ch}");
        assert_eq!(c.sent, cs.sent.blocks[ch], "channel {ch}");
        assert_eq!(c.lost + c.late + c.dup, 0, "channel {ch}");
        let r = cs.report_totals[ch];
        assert!(r.0 <= c.sent && r.3 == 0, "channel {ch}: {r:?}");
    }
    assert_eq!(
        cs.datagrams,
        cs.sent.blocks[1..].iter().sum::<u64>() + cs.sent.fin_datagrams
    );
    assert_eq!(cs.udp_errors, 0);
    if cs.gso {
        assert!(cs.udp_sends < cs.datagrams, "GSO batches datagrams");
    }
}

#[test]
fn fallback_without_gso_and_small_mtu_blocks() {
    let opts = LinkOptions {
        gso: false,
        mtu: Some(1500),
        ..LinkOptions::default()
    };
    let (server, client) = run_rounds(opts, 5, 5_000);
    let cs = client.stats();
    assert!(!cs.gso);
    // MTU 1500 over IPv4: 1408-byte blocks, one system call per datagram.
    assert_eq!(client.block_bytes(), 1408);
    assert_eq!(cs.udp_sends, cs.datagrams);
    wait_until(|| server.stats().deliveries == 5);
}

#[test]
fn auto_pacing_starts_from_measured_goodput() {
    let opts = LinkOptions {
        pacing: Pacing::Auto {
            min_bps: 10_000_000,
            max_bps: 3_000_000_000,
        },
        ..LinkOptions::default()
    };
    let server = DgtServer::bind(LO, cfg(), &[(1, 50_000, ValueType::F32)], None).unwrap();
    let client = DgtClient::connect(server.local_addr(), 4, cfg(), opts).unwrap();
    assert_eq!(client.stats().rate_bps, Some(100_000_000));
    let n_b = client.num_blocks(50_000, ValueType::F32);
    for round in 0..4 {
        let x = vec![0.5f32; 50_000];
        client.push_f32(1, round, x, map(n_b)).unwrap();
        server.recv_delivery(WAIT).expect("delivery");
    }
    wait_until(|| client.stats().reports >= 3);
    let cs = client.stats();
    let measured = cs.measured_goodput_bps.expect("goodput measured");
    assert!(measured > 0);
    // Then one ×1.05 step per loss-free report, within the bounds.
    let r = cs.rate_bps.unwrap();
    assert!((10_000_000..=3_000_000_000).contains(&r), "{r}");
    assert_ne!(r, 100_000_000, "rate left its start value");
}

#[test]
fn hello_negotiation_refusals() {
    // A sender that is not allowed, and one with the wrong channel count.
    let server = DgtServer::bind(LO, cfg(), &[(1, 100, ValueType::F32)], Some(vec![1])).unwrap();
    assert!(DgtClient::connect(server.local_addr(), 2, cfg(), LinkOptions::default()).is_err());
    let two = DgtConfig {
        channels: 2,
        ..cfg()
    };
    assert!(DgtClient::connect(server.local_addr(), 1, two, LinkOptions::default()).is_err());
    // The server still serves a good sender.
    let ok = DgtClient::connect(server.local_addr(), 1, cfg(), LinkOptions::default()).unwrap();
    ok.push_f32(1, 0, vec![1.0; 100], vec![0]).unwrap();
    let d = server.recv_delivery(WAIT).unwrap();
    assert_eq!(d.values, vec![1.0; 100]);
    wait_until(|| server.stats().refused >= 2);
}

fn raw_frame(kind: MsgKind, sender: u32, payload: Vec<u8>) -> Vec<u8> {
    let h = FrameHeader {
        sender,
        codec: PayloadCodec::Raw,
        ..FrameHeader::new(kind)
    };
    encode(&Frame::new(h, payload))
}

#[test]
fn malformed_reliable_input_is_refused_and_counted() {
    let server = DgtServer::bind(LO, cfg(), &[(1, 100, ValueType::F32)], None).unwrap();
    let addr: SocketAddr = server.local_addr();
    // 1. Garbage bytes; 2. a block before the hello; 3. a DGT frame over its bounds.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(&[0xAB; 200]).unwrap();
    let mut early = TcpStream::connect(addr).unwrap();
    early
        .write_all(&raw_frame(MsgKind::DgtBlock, 5, vec![0; 40]))
        .unwrap();
    let mut huge = TcpStream::connect(addr).unwrap();
    let mut h = FrameHeader::new(MsgKind::DgtBlock).encode();
    h[12..16].copy_from_slice(&(64u32 << 20).to_le_bytes());
    huge.write_all(&h).unwrap();
    wait_until(|| server.stats().refused >= 2);
    // 4. After a good hello: a block frame carrying a terminator kind, and random bytes as a
    //    block message: both counted invalid, the link stays up.
    let client = DgtClient::connect(addr, 7, cfg(), LinkOptions::default()).unwrap();
    let mut rogue = TcpStream::connect(addr).unwrap();
    let mut hello = vec![0u8; 24];
    hello[0..4].copy_from_slice(&4096u32.to_le_bytes());
    hello[4] = 3;
    rogue
        .write_all(&raw_frame(MsgKind::DgtHello, 8, hello))
        .unwrap();
    // A sender waits for the hello answer before sending more (pipelined frames are refused).
    let mut answer = vec![0u8; geomx_net::wire::HEADER_LEN + geomx_net::wire::DGT_HELLO_LEN];
    rogue.set_read_timeout(Some(WAIT)).unwrap();
    std::io::Read::read_exact(&mut rogue, &mut answer).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut bogus: Vec<u8> = (0..64).map(|_| rng.random()).collect();
    bogus[8..12].copy_from_slice(&8u32.to_le_bytes());
    rogue
        .write_all(&raw_frame(MsgKind::DgtBlock, 8, bogus))
        .unwrap();
    wait_until(|| server.stats().invalid >= 1);
    client.push_f32(1, 0, vec![2.0; 100], vec![0]).unwrap();
    let d = server.recv_delivery(WAIT).unwrap();
    assert_eq!((d.sender, d.values[99]), (7, 2.0));
    assert!(client.closed_reason().is_none());
    // 5. A hello with a whole block frame pipelined behind it in one write: refused (the
    //    decoder's pre-hello bound and the no-pipelining check both stand in the way).
    let refused = server.stats().refused;
    let mut eager = TcpStream::connect(addr).unwrap();
    let mut hello = vec![0u8; 24];
    hello[0..4].copy_from_slice(&4096u32.to_le_bytes());
    hello[4] = 3;
    let mut both = raw_frame(MsgKind::DgtHello, 9, hello);
    let mut block: Vec<u8> = (0..64).map(|_| rng.random()).collect();
    block[8..12].copy_from_slice(&9u32.to_le_bytes());
    both.extend(raw_frame(MsgKind::DgtBlock, 9, block));
    eager.write_all(&both).unwrap();
    wait_until(|| server.stats().refused > refused);
}

#[test]
fn datagrams_from_another_host_are_invalid() {
    let server = DgtServer::bind(LO, cfg(), &[(1, 100, ValueType::F32)], None).unwrap();
    let client = DgtClient::connect(server.local_addr(), 7, cfg(), LinkOptions::default()).unwrap();
    // A well-formed block 0 of key 1, round 0, naming sender 7 on channel 1, but sent from
    // 127.0.0.2 (any 127/8 address is local): without the source check it would be accepted.
    let spoof = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut d = vec![0u8; 32 + 400];
    d[0..2].copy_from_slice(&0x4758u16.to_le_bytes());
    d[2] = geomx_net::dgt::DGT_VERSION;
    d[3] = 48; // block
    d[4] = 1; // channel
    d[8..12].copy_from_slice(&7u32.to_le_bytes());
    d[12..16].copy_from_slice(&1u32.to_le_bytes());
    d[28..32].copy_from_slice(&100u32.to_le_bytes());
    spoof.send_to(&d, server.udp_addrs()[0]).unwrap();
    wait_until(|| server.stats().invalid >= 1);
    client.push_f32(1, 0, vec![3.0; 100], vec![0]).unwrap();
    assert_eq!(server.recv_delivery(WAIT).unwrap().values, vec![3.0; 100]);
}

#[test]
fn a_live_sender_id_is_not_taken_over_and_silent_connections_are_capped() {
    use geomx_net::dgt::link::MAX_PENDING_HELLOS;
    let server = DgtServer::bind(LO, cfg(), &[(1, 100, ValueType::F32)], None).unwrap();
    let first = DgtClient::connect(server.local_addr(), 5, cfg(), LinkOptions::default()).unwrap();
    // A second hello for the live id is refused; the first connection keeps it.
    assert!(DgtClient::connect(server.local_addr(), 5, cfg(), LinkOptions::default()).is_err());
    wait_until(|| server.stats().duplicate_hellos == 1);
    first.push_f32(1, 0, vec![2.0; 100], vec![0]).unwrap();
    assert_eq!(server.recv_delivery(WAIT).unwrap().values, vec![2.0; 100]);
    // Connections that never say hello: beyond the cap they are closed at once.
    let extra = 6;
    let silent: Vec<TcpStream> = (0..MAX_PENDING_HELLOS + extra)
        .map(|_| TcpStream::connect(server.local_addr()).unwrap())
        .collect();
    // The refused duplicate hello counts too.
    wait_until(|| server.stats().refused > extra as u64);
    drop(silent);
    // The sender is still served, and once it is gone its id is free again.
    first.push_f32(1, 1, vec![3.0; 100], vec![0]).unwrap();
    assert_eq!(server.recv_delivery(WAIT).unwrap().values, vec![3.0; 100]);
    drop(first);
    wait_until(|| server.stats().peers == 0);
    let again = DgtClient::connect(server.local_addr(), 5, cfg(), LinkOptions::default()).unwrap();
    again.push_f32(1, 0, vec![4.0; 100], vec![0]).unwrap();
    assert_eq!(server.recv_delivery(WAIT).unwrap().values, vec![4.0; 100]);
}

#[test]
fn a_consumer_that_falls_behind_holds_the_senders_back_without_loss() {
    use geomx_net::dgt::link::MAX_QUEUED_DELIVERIES;
    let server = DgtServer::bind(LO, cfg(), &[(1, 64, ValueType::F32)], None).unwrap();
    let client = DgtClient::connect(server.local_addr(), 3, cfg(), LinkOptions::default()).unwrap();
    let rounds = 4 * MAX_QUEUED_DELIVERIES as u32;
    let pusher = std::thread::spawn(move || {
        for r in 0..rounds {
            client.push_f32(1, r, vec![r as f32; 64], vec![0]).unwrap();
        }
        client
    });
    // Nobody consumes: the queue stops at its bound whatever the socket buffers hold (frames
    // already read wait; at most the receiver's two rounds in progress per key may time out
    // into it on top).
    wait_until(|| server.deliveries().len() >= MAX_QUEUED_DELIVERIES);
    std::thread::sleep(Duration::from_millis(300));
    let queued = server.deliveries().len();
    assert!(queued <= MAX_QUEUED_DELIVERIES + 2, "{queued} queued");
    // Then every round arrives, in order.
    for r in 0..rounds {
        let d = server.recv_delivery(WAIT).expect("delivery");
        assert_eq!((d.round, d.values[0]), (r, r as f32));
    }
    let _client = pusher.join().unwrap();
}

#[test]
fn auto_pacing_waits_for_a_goodput_sample_of_sixteen_blocks() {
    let opts = LinkOptions {
        pacing: Pacing::Auto {
            min_bps: 10_000_000,
            max_bps: 10_000_000_000,
        },
        ..LinkOptions::default()
    };
    let server = DgtServer::bind(LO, cfg(), &[(1, 1024, ValueType::F32)], None).unwrap();
    let client = DgtClient::connect(server.local_addr(), 4, cfg(), opts).unwrap();
    // Rounds of one reliable 4 KiB block: a single block is no measurement.
    let push = |round: u32| {
        client
            .push_f32(1, round, vec![0.25; 1024], vec![0])
            .unwrap();
        server.recv_delivery(WAIT).expect("delivery");
    };
    for round in 0..8 {
        push(round);
    }
    client.flush(WAIT).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(client.stats().measured_goodput_bps, None);
    for round in 8..20 {
        push(round);
    }
    wait_until(|| client.stats().measured_goodput_bps.is_some());
}
