//! DGT sender + receiver on virtual time over a scripted link (loss, delay, reorder,
//! duplication): the spec's test oracles 1–8 and 10 (ranking math and adaptive k live in
//! geomx-kernels; here the channel map is an input).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use geomx_net::dgt::{
    DgtConfig, DgtKind, DgtReceiver, DgtSender, TerminatorMode, Transmit, ValueType, Values,
    DGT_VERSION, NOT_SENT,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What the link does with one message.
#[derive(Debug, Clone)]
enum Fate {
    Deliver(Duration),
    Drop,
    Dup(Duration, Duration),
}

type Script = Box<dyn FnMut(&Transmit, &mut ChaCha8Rng) -> Fate>;

/// (arrival, sequence, reliable, bytes), earliest first.
type InFlight = Reverse<(Instant, u64, bool, Vec<u8>)>;

struct Sim {
    t0: Instant,
    now: Instant,
    tx: DgtSender,
    rx: DgtReceiver,
    /// (arrival, seq) → (reliable, bytes)
    flight: BinaryHeap<InFlight>,
    seq: u64,
    log: Vec<(Instant, Transmit)>,
    delivered: Vec<geomx_net::dgt::Delivery>,
    script: Script,
    rng: ChaCha8Rng,
    dropped: [u64; 8],
    dups: u64,
    /// Extra delay of a terminator on the reliable transport (a lost segment that TCP recovers
    /// late); later reliable messages wait behind it, as TCP's in-order delivery makes them.
    slow_terminator: Duration,
    /// No reliable message arrives before this (in-order delivery).
    reliable_floor: Instant,
}

const RELIABLE_DELAY: Duration = Duration::from_micros(500);

impl Sim {
    fn new(cfg: DgtConfig, keys: &[(u32, u32, ValueType)], script: Script, seed: u64) -> Sim {
        let t0 = Instant::now();
        let tx = DgtSender::new(1, cfg.clone(), t0).unwrap();
        let mut rx = DgtReceiver::new(cfg).unwrap();
        for &(k, n, vt) in keys {
            rx.add_key(k, n, vt).unwrap();
        }
        Sim {
            t0,
            now: t0,
            tx,
            rx,
            flight: BinaryHeap::new(),
            seq: 0,
            log: Vec::new(),
            delivered: Vec::new(),
            script,
            rng: ChaCha8Rng::seed_from_u64(seed),
            dropped: [0; 8],
            dups: 0,
            slow_terminator: Duration::ZERO,
            reliable_floor: t0,
        }
    }

    fn schedule(&mut self, at: Instant, reliable: bool, bytes: Vec<u8>) {
        self.seq += 1;
        self.flight.push(Reverse((at, self.seq, reliable, bytes)));
    }

    /// Runs until nothing is pending, or `stop` holds.
    fn run(&mut self, stop: impl Fn(&Sim) -> bool) {
        let mut buf = Vec::new();
        loop {
            while let Some(t) = self.tx.poll_transmit(self.now, &mut buf) {
                assert_eq!(t.len, buf.len());
                self.log.push((self.now, t));
                let bytes = std::mem::take(&mut buf);
                if t.channel == 0 {
                    // The reliable transport: ordered, never lost.
                    let mut at = self.now + RELIABLE_DELAY;
                    if matches!(t.kind, DgtKind::End | DgtKind::Fin) {
                        at += self.slow_terminator;
                    }
                    self.reliable_floor = self.reliable_floor.max(at);
                    self.schedule(self.reliable_floor, true, bytes);
                    continue;
                }
                // Drops and duplicates of blocks are counted (a terminator's datagram copies
                // share their fate but not the receiver's block counters).
                let block = u64::from(t.kind == DgtKind::Block);
                match (self.script)(&t, &mut self.rng) {
                    Fate::Deliver(d) => self.schedule(self.now + d, false, bytes),
                    Fate::Drop => self.dropped[usize::from(t.channel)] += block,
                    Fate::Dup(a, b) => {
                        self.dups += block;
                        self.schedule(self.now + a, false, bytes.clone());
                        self.schedule(self.now + b, false, bytes);
                    }
                }
            }
            while self
                .flight
                .peek()
                .is_some_and(|Reverse((at, ..))| *at <= self.now)
            {
                let Reverse((_, _, reliable, bytes)) = self.flight.pop().unwrap();
                let r = if reliable {
                    self.rx.handle_reliable(self.now, &bytes)
                } else {
                    self.rx.handle_datagram(self.now, &bytes)
                };
                r.unwrap();
            }
            self.rx.handle_timeout(self.now);
            while let Some(d) = self.rx.poll_delivery() {
                self.delivered.push(d);
            }
            if stop(self) {
                return;
            }
            let next = [
                self.tx.poll_timeout(),
                self.rx.poll_timeout(),
                self.flight.peek().map(|Reverse((at, ..))| *at),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) => self.now = self.now.max(t),
                None if self.tx.is_busy() => {}
                None => return,
            }
        }
    }
}

fn deliver_all(d: Duration) -> Script {
    Box::new(move |_, _| Fate::Deliver(d))
}

/// Reference ranking: mean |x| per block descending, ties by id; ⌈k·n⌉ reliable, unreliable
/// rank q → channel 1 + ⌊q·C/(n − n_rel)⌋; all-zero blocks NOT_SENT.
fn reference_map(x: &[f32], per: usize, k: f64, c: u8) -> Vec<u8> {
    let n_b = x.len().div_ceil(per);
    let blocks: Vec<&[f32]> = (0..n_b)
        .map(|j| &x[j * per..((j + 1) * per).min(x.len())])
        .collect();
    let mut ids: Vec<usize> = (0..n_b)
        .filter(|&j| blocks[j].iter().any(|&v| v != 0.0))
        .collect();
    let score = |j: usize| {
        blocks[j].iter().map(|v| f64::from(v.abs())).sum::<f64>() / blocks[j].len() as f64
    };
    ids.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    let n = ids.len();
    let n_rel = ((k * n as f64).ceil() as usize).min(n);
    let mut map = vec![NOT_SENT; n_b];
    for (rank, &j) in ids.iter().enumerate() {
        map[j] = if rank < n_rel {
            0
        } else {
            1 + ((rank - n_rel) * usize::from(c) / (n - n_rel)) as u8
        };
    }
    map
}

fn tensor(rng: &mut ChaCha8Rng, n: usize, per: usize, zero_block_every: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    if zero_block_every > 0 {
        for j in (0..n.div_ceil(per)).step_by(zero_block_every) {
            x[j * per..((j + 1) * per).min(n)].fill(0.0);
        }
    }
    x
}

fn cfg() -> DgtConfig {
    DgtConfig {
        block_bytes: 1024,
        rate_bps: Some(1_000_000_000),
        ..DgtConfig::default()
    }
}

/// Bit-exact comparison naming the first differing element.
fn assert_bits(got: &[f32], want: &[f32], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{ctx}: element {i}: got {} want {}", got[i], want[i]);
    }
}

/// Independent binary16 reference: (-1)^s · 2^(e−15) · (1 + m/1024), subnormals m · 2^−24.
fn f16_ref(h: u16) -> f32 {
    let s = if h >> 15 == 1 { -1.0f64 } else { 1.0 };
    let e = i32::from((h >> 10) & 0x1f);
    let m = f64::from(h & 0x3ff);
    let v = if e == 0 {
        s * m * 2f64.powi(-24)
    } else {
        s * 2f64.powi(e - 15) * (1.0 + m / 1024.0)
    };
    v as f32
}

#[test]
fn no_loss_is_bit_exact_f32_and_f16_all_sizes() {
    let c = cfg();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for vt in [ValueType::F32, ValueType::F16] {
        let per = c.block_bytes / vt.size();
        for n in [1, per - 1, per, per + 1, 1_000_000] {
            let jitter: Script =
                Box::new(|_, r| Fate::Deliver(Duration::from_micros(r.random_range(100..900))));
            let mut sim = Sim::new(c.clone(), &[(9, n as u32, vt)], jitter, 2);
            for round in 0..3u32 {
                let x = tensor(&mut rng, n, per, if n > 4 * per { 7 } else { 0 });
                let map = reference_map(&x, per, 0.5, c.channels);
                let want: Vec<f32> = match vt {
                    ValueType::F32 => {
                        sim.tx.push(9, round, Values::F32(&x), &map).unwrap();
                        x.clone()
                    }
                    ValueType::F16 => {
                        // Normal and subnormal binary16 patterns, sign random; zero blocks kept.
                        let h: Vec<u16> = x
                            .iter()
                            .map(|&v| {
                                if v == 0.0 {
                                    0
                                } else {
                                    rng.random_range(1u16..0x7c00) | (u16::from(v < 0.0) << 15)
                                }
                            })
                            .collect();
                        sim.tx.push(9, round, Values::F16(&h), &map).unwrap();
                        h.iter().map(|&b| f16_ref(b)).collect()
                    }
                };
                sim.run(|_| false);
                let d = sim.delivered.pop().expect("delivered");
                assert!(sim.delivered.is_empty());
                assert_eq!((d.key, d.round, d.sender), (9, round, 1));
                assert!(d.missing.is_empty() && !d.timed_out && d.folded_late == 0);
                assert_bits(&d.values, &want, &format!("{vt:?} n = {n} round {round}"));
                // Exactly the mapped blocks went, each on its channel; zero blocks never.
                let sent: Vec<&Transmit> = sim
                    .log
                    .iter()
                    .map(|(_, t)| t)
                    .filter(|t| t.round == round && t.kind == DgtKind::Block)
                    .collect();
                let mut seen = vec![NOT_SENT; map.len()];
                for t in &sent {
                    // A reliable message may be a run of consecutive blocks.
                    for b in t.block..t.block + t.blocks {
                        assert_eq!(seen[b as usize], NOT_SENT, "block sent twice");
                        seen[b as usize] = t.channel;
                    }
                }
                assert_eq!(seen, map);
            }
            assert_eq!(sim.rx.invalid(), 0);
        }
    }
}

#[test]
fn unreliable_loss_keeps_reliable_share_and_counters_add_up() {
    let c = cfg();
    let per = c.block_bytes / 4;
    let n = 200 * per + 17;
    for (i, p) in [0.01, 0.05, 0.10, 0.50].into_iter().enumerate() {
        let script: Script = Box::new(move |t, r| {
            assert_ne!(t.channel, 0);
            if r.random::<f64>() < p {
                Fate::Drop
            } else {
                Fate::Deliver(Duration::from_micros(r.random_range(100..2000)))
            }
        });
        let mut sim = Sim::new(
            c.clone(),
            &[(3, n as u32, ValueType::F32)],
            script,
            10 + i as u64,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(20 + i as u64);
        let mut lost_blocks = 0;
        let mut prev_missing = 0;
        for round in 0..4u32 {
            let x = tensor(&mut rng, n, per, 11);
            let map = reference_map(&x, per, 0.8, c.channels);
            sim.tx.push(3, round, Values::F32(&x), &map).unwrap();
            sim.run(|_| false);
            let d = sim.delivered.pop().unwrap();
            assert_eq!(d.round, round);
            for (j, &ch) in map.iter().enumerate() {
                let r = j * per..((j + 1) * per).min(n);
                let missing = d.missing.contains(&(j as u32));
                if ch == 0 {
                    assert!(!missing, "reliable block {j} missing");
                }
                if missing {
                    assert!(
                        d.values[r].iter().all(|v| v.to_bits() == 0),
                        "missing block {j} not zero"
                    );
                } else {
                    assert_bits(&d.values[r.clone()], &x[r], &format!("block {j}"));
                }
            }
            lost_blocks += d.missing.len() as u64;
            // The previous round's report is final at this delivery.
            if round > 0 {
                let rep = sim.rx.poll_report().expect("report of the previous round");
                assert_eq!(rep.round, round - 1);
                assert_eq!(rep.channels[0].lost(), 0);
                let lost: u64 = rep.channels.iter().map(|c| u64::from(c.lost())).sum();
                assert_eq!(lost, prev_missing);
                let sent: u32 = rep.channels[1..].iter().map(|c| c.sent).sum();
                assert_eq!(rep.unreliable_loss(), prev_missing as f64 / f64::from(sent));
            }
            prev_missing = d.missing.len() as u64;
        }
        let rc = sim.rx.counters();
        let sc = sim.tx.counters();
        let mut total_lost = 0;
        for (ch, k) in rc.iter().enumerate().take(usize::from(c.channels) + 1) {
            assert_eq!(k.sent, k.on_time + k.late + k.lost, "channel {ch}");
            assert_eq!(k.sent, sc.blocks[ch], "channel {ch} sent vs sender");
            assert_eq!(k.lost, sim.dropped[ch], "channel {ch} lost vs link drops");
            assert_eq!(k.late + k.dup + k.stale + k.future_dropped, 0);
            total_lost += k.lost;
        }
        assert_eq!(rc[0].lost, 0);
        assert_eq!(total_lost, lost_blocks);
        if p >= 0.05 {
            assert!(total_lost > 0, "p = {p}: the link dropped nothing");
        }
    }
}

/// Sends two rounds where one unreliable datagram of round 0 is held `hold` long.
/// `settle`: run each round until nothing is pending (else only until it is delivered).
fn late_case(hold: Duration, settle: bool) -> (Sim, Vec<Vec<f32>>, u32) {
    let c = cfg();
    let per = c.block_bytes / 4;
    let n = 20 * per;
    let mut victim = None;
    let script: Script = Box::new(move |t, _| {
        if t.round == 0 && t.channel == 2 && victim.is_none() {
            victim = Some(t.block);
            Fate::Deliver(hold)
        } else {
            Fate::Deliver(Duration::from_micros(300))
        }
    });
    let mut sim = Sim::new(c.clone(), &[(5, n as u32, ValueType::F32)], script, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut sent = Vec::new();
    for round in 0..3u32 {
        let x = tensor(&mut rng, n, per, 0);
        let map = reference_map(&x, per, 0.5, c.channels);
        sim.tx.push(5, round, Values::F32(&x), &map).unwrap();
        sent.push(x);
        let want = round as usize + 1;
        if settle {
            sim.run(|_| false);
        } else {
            sim.run(|s| s.delivered.len() >= want);
        }
    }
    sim.run(|_| false);
    let victim = sim
        .log
        .iter()
        .find(|(_, t)| t.round == 0 && t.channel == 2)
        .unwrap()
        .1
        .block;
    (sim, sent, victim)
}

#[test]
fn late_block_is_folded_into_next_round_bit_exact() {
    // Past round 0's deadline (5 ms), well before round 1's delivery.
    let (sim, sent, victim) = late_case(Duration::from_millis(8), true);
    let d = &sim.delivered;
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].missing, vec![victim]);
    assert!(d[0].timed_out);
    assert_eq!(d[1].folded_late, 1);
    let got: Vec<f32> = d[0]
        .values
        .iter()
        .zip(&d[1].values)
        .map(|(a, b)| a + b)
        .collect();
    let want: Vec<f32> = sent[0].iter().zip(&sent[1]).map(|(a, b)| a + b).collect();
    assert_bits(&got, &want, "delivered_0 + delivered_1");
    assert_bits(&d[2].values, &sent[2], "");
    let k = sim.rx.counters()[2];
    assert_eq!((k.late, k.lost, k.stale), (1, 0, 0));
    assert_eq!(k.sent, k.on_time + k.late + k.lost);
}

#[test]
fn block_after_next_delivery_is_stale_and_not_added() {
    let (sim, sent, victim) = late_case(Duration::from_millis(200), false);
    let d = &sim.delivered;
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].missing, vec![victim]);
    assert_eq!(d[1].folded_late, 0);
    assert_eq!(d[2].folded_late, 0);
    assert_bits(&d[1].values, &sent[1], "");
    assert_bits(&d[2].values, &sent[2], "");
    let k = sim.rx.counters()[2];
    assert_eq!((k.late, k.lost, k.stale), (0, 1, 1));
}

#[test]
fn duplicates_are_ignored() {
    let c = cfg();
    let per = c.block_bytes / 4;
    let n = 40 * per + 3;
    let script: Script = Box::new(|_, r| {
        Fate::Dup(
            Duration::from_micros(r.random_range(100..3000)),
            Duration::from_micros(r.random_range(100..3000)),
        )
    });
    let mut sim = Sim::new(c.clone(), &[(1, n as u32, ValueType::F32)], script, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for round in 0..3u32 {
        let x = tensor(&mut rng, n, per, 5);
        let map = reference_map(&x, per, 0.3, c.channels);
        sim.tx.push(1, round, Values::F32(&x), &map).unwrap();
        sim.run(|_| false);
        let d = sim.delivered.pop().unwrap();
        assert_bits(&d.values, &x, "");
    }
    let rc = sim.rx.counters();
    let dup: u64 = rc.iter().map(|k| k.dup + k.stale).sum();
    assert_eq!(dup, sim.dups);
    assert!(rc.iter().map(|k| k.dup).sum::<u64>() > 0);
}

#[test]
fn strict_priority_in_transmit_log() {
    let c = DgtConfig {
        rate_bps: Some(50_000_000),
        ..cfg()
    };
    let per = c.block_bytes / 4;
    let n = 60 * per;
    let mut sim = Sim::new(
        c.clone(),
        &[(1, n as u32, ValueType::F32), (2, n as u32, ValueType::F32)],
        deliver_all(Duration::from_micros(200)),
        7,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = tensor(&mut rng, n, per, 0);
    let map = reference_map(&x, per, 0.5, c.channels);
    sim.tx.push(1, 0, Values::F32(&x), &map).unwrap();
    // Let key 1 get part-way through its unreliable blocks, then push key 2.
    sim.run(|s| s.log.iter().filter(|(_, t)| t.channel == 2).count() >= 3);
    let cut = sim.log.len();
    let y = tensor(&mut rng, n, per, 0);
    let map2 = reference_map(&y, per, 0.5, c.channels);
    sim.tx.push(2, 0, Values::F32(&y), &map2).unwrap();
    sim.run(|_| false);
    // Right after the push, all 30 reliable blocks of key 2 leave before any datagram (in
    // runs of consecutive blocks).
    let rel2 = map2.iter().filter(|&&m| m == 0).count() as u32;
    let first: Vec<&Transmit> = sim.log[cut..]
        .iter()
        .map(|(_, t)| t)
        .take_while(|t| t.channel == 0 && t.key == 2)
        .collect();
    assert_eq!(first.iter().map(|t| t.blocks).sum::<u32>(), rel2);
    // Replay queue contents: a datagram of channel i leaves only if channels < i are empty.
    let mut q = [0i64; 8];
    for (i, (_, t)) in sim.log.iter().enumerate() {
        // All blocks are non-zero: every map entry is a channel.
        if i == 0 {
            for &ch in map.iter() {
                q[usize::from(ch)] += 1;
            }
        }
        if i == cut {
            for &ch in map2.iter() {
                q[usize::from(ch)] += 1;
            }
        }
        if t.kind == DgtKind::Block {
            let ch = usize::from(t.channel);
            assert!(
                q[..ch].iter().all(|&v| v == 0),
                "channel {ch} left with {:?} queued",
                q
            );
            q[ch] -= i64::from(t.blocks);
        }
    }
    assert!(q.iter().all(|&v| v == 0));
}

#[test]
fn pacing_respects_rate_and_timeout() {
    let rate = 10_000_000u64; // 10 Mbit/s
    let c = DgtConfig {
        rate_bps: Some(rate),
        burst: 4,
        ..cfg()
    };
    let per = c.block_bytes / 4;
    let n = 100 * per;
    let mut sim = Sim::new(
        c.clone(),
        &[(1, n as u32, ValueType::F32)],
        deliver_all(Duration::from_micros(100)),
        9,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let x = tensor(&mut rng, n, per, 0);
    let map = reference_map(&x, per, 0.1, c.channels);
    sim.tx.push(1, 0, Values::F32(&x), &map).unwrap();
    // poll_transmit gives nothing before poll_timeout, and something at it.
    let mut buf = Vec::new();
    while sim.tx.poll_transmit(sim.t0, &mut buf).is_some() {
        buf.clear();
    }
    let at = sim.tx.poll_timeout().expect("paced datagram waiting");
    assert!(at > sim.t0);
    assert!(sim
        .tx
        .poll_transmit(at - Duration::from_nanos(1), &mut buf)
        .is_none());
    assert!(sim.tx.poll_transmit(at, &mut buf).is_some());
    buf.clear();
    sim.run(|_| false);
    let udp: Vec<(Instant, usize)> = sim
        .log
        .iter()
        .filter(|(_, t)| t.channel != 0)
        .map(|(at, t)| (*at, t.len + c.ip_overhead))
        .collect();
    assert!(udp.len() > 50);
    let burst = (4 * (32 + c.block_bytes + c.ip_overhead)) as f64;
    for i in 0..udp.len() {
        let mut bytes = 0.0;
        for &(t, len) in &udp[i..] {
            bytes += len as f64;
            let dt = (t - udp[i].0).as_secs_f64();
            assert!(
                bytes <= rate as f64 / 8.0 * dt + burst + 1e-6,
                "over rate at {dt}s"
            );
        }
    }
    // And no slower than the rate: the log starts with an empty bucket, so the span is the
    // time to earn the bytes after the first datagram.
    let total: usize = udp[1..].iter().map(|u| u.1).sum();
    let span = (udp.last().unwrap().0 - udp[0].0).as_secs_f64();
    assert!(span <= total as f64 / (rate as f64 / 8.0) + 1e-6, "{span}");
}

#[test]
fn terminator_placement_modes() {
    for mode in [
        TerminatorMode::Split,
        TerminatorMode::AfterAll,
        TerminatorMode::AfterReliable,
    ] {
        let c = DgtConfig {
            terminator: mode,
            ..cfg()
        };
        let per = c.block_bytes / 4;
        let n = 30 * per;
        // after_reliable: unreliable datagrams take longer than the terminator + deadline.
        let mut sim = Sim::new(
            c.clone(),
            &[(1, n as u32, ValueType::F32)],
            deliver_all(match mode {
                TerminatorMode::AfterReliable => Duration::from_millis(6),
                _ => Duration::from_micros(300),
            }),
            11,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut sent = Vec::new();
        for round in 0..4u32 {
            // Multiples of 1/8 in (-8, 8): every sum below is exact in f32. Round 3 is all
            // zeros (nothing but the terminator goes) and collects round 2's late blocks.
            let x: Vec<f32> = tensor(&mut rng, n, per, 0)
                .iter()
                .map(|&v| {
                    if round == 3 {
                        0.0
                    } else {
                        (v * 64.0).round() / 8.0
                    }
                })
                .collect();
            let map = reference_map(&x, per, 0.5, c.channels);
            sim.tx.push(1, round, Values::F32(&x), &map).unwrap();
            sent.push(x);
            sim.run(|_| false);
        }
        for round in 0..3u32 {
            let pos = |f: &dyn Fn(&Transmit) -> bool| {
                sim.log
                    .iter()
                    .rposition(|(_, t)| t.round == round && f(t))
                    .unwrap()
            };
            let last_unrel = pos(&|t| t.channel != 0 && t.kind == DgtKind::Block);
            let last_rel = pos(&|t| t.channel == 0 && t.kind == DgtKind::Block);
            match mode {
                TerminatorMode::Split => {
                    // The map right after the reliable blocks, the terminator after the last
                    // datagram on the reliable channel and as datagrams on channel 1.
                    assert_eq!(pos(&|t| t.kind == DgtKind::Map), last_rel + 1);
                    assert!(pos(&|t| t.kind == DgtKind::Fin && t.channel == 0) > last_unrel);
                    let copies: Vec<usize> = (0..sim.log.len())
                        .filter(|&i| {
                            let t = &sim.log[i].1;
                            t.round == round && t.kind == DgtKind::Fin && t.channel == 1
                        })
                        .collect();
                    assert_eq!(copies.len(), geomx_net::dgt::FIN_DATAGRAMS);
                    assert!(copies.iter().all(|&i| i > last_unrel));
                    assert!(!sim
                        .log
                        .iter()
                        .any(|(_, t)| t.kind == DgtKind::End && t.round == round));
                }
                TerminatorMode::AfterAll => assert!(pos(&|t| t.kind == DgtKind::End) > last_unrel),
                TerminatorMode::AfterReliable => {
                    let end = pos(&|t| t.kind == DgtKind::End);
                    assert_eq!(end, last_rel + 1);
                    assert!(end < last_unrel);
                }
            }
        }
        let d = &sim.delivered;
        assert_eq!(d.len(), 4);
        if mode != TerminatorMode::AfterReliable {
            for r in 0..4 {
                assert_bits(&d[r].values, &sent[r], "");
            }
        } else {
            // Unreliable blocks overtaken by the terminator are late and folded one round on.
            assert!(d[1].folded_late > 0 && d[3].folded_late > 0);
            let late: u64 = sim.rx.counters()[1..].iter().map(|k| k.late).sum();
            let unrel: u64 = sim.tx.counters().blocks[1..].iter().sum();
            assert_eq!(late, unrel);
            for j in 0..n {
                let got: f32 = d.iter().map(|d| d.values[j]).sum();
                let want: f32 = sent.iter().map(|x| x[j]).sum();
                assert_eq!(got.to_bits(), want.to_bits(), "element {j}");
            }
        }
    }
}

/// The terminator on the reliable transport arrives 220 ms late in every round (Linux recovers
/// a lone lost segment after 1.5 round trips + 200 ms): with the split terminator a round is
/// delivered from its datagram copies at the deadline after the last datagram; with one End
/// after everything it waits for the reliable copy. Every seventh block is lost, so no round
/// completes before its deadline. With the datagram copies lost too, the split round waits for
/// the reliable terminator like End does, and still delivers the same values.
#[test]
fn a_late_reliable_terminator_costs_the_split_terminator_nothing() {
    let slow = Duration::from_millis(220);
    for (mode, lose_copies) in [
        (TerminatorMode::Split, false),
        (TerminatorMode::Split, true),
        (TerminatorMode::AfterAll, false),
    ] {
        let c = DgtConfig {
            terminator: mode,
            ..cfg()
        };
        let per = c.block_bytes / 4;
        let n = 60 * per;
        let script: Script = Box::new(move |t, _| {
            let lost_block = t.kind == DgtKind::Block && t.block % 7 == 0;
            if lost_block || (lose_copies && t.kind == DgtKind::Fin) {
                Fate::Drop
            } else {
                Fate::Deliver(Duration::from_micros(300))
            }
        });
        let mut sim = Sim::new(c.clone(), &[(3, n as u32, ValueType::F32)], script, 21);
        sim.slow_terminator = slow;
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        for round in 0..5u32 {
            let x = tensor(&mut rng, n, per, 0);
            let map = reference_map(&x, per, 0.5, c.channels);
            let start = sim.now;
            sim.tx.push(3, round, Values::F32(&x), &map).unwrap();
            sim.run(|s| s.delivered.len() > round as usize);
            let d = &sim.delivered[round as usize];
            let last_dgram = sim
                .log
                .iter()
                .filter(|(_, t)| t.round == round && t.kind == DgtKind::Block && t.channel != 0)
                .map(|(at, _)| *at)
                .max()
                .unwrap();
            let took = d.delivered_at - start;
            let ctx = format!("{mode:?}, copies lost {lose_copies}, round {round}");
            assert!(d.timed_out && !d.missing.is_empty(), "{ctx}");
            if mode == TerminatorMode::Split && !lose_copies {
                assert!(
                    d.delivered_at <= last_dgram + c.deadline + Duration::from_millis(1),
                    "{ctx}: {took:?}"
                );
            } else {
                assert!(took >= slow, "{ctx}: {took:?}");
            }
            for j in 0..map.len() {
                let r = j * per..((j + 1) * per).min(n);
                if d.missing.contains(&(j as u32)) {
                    assert_eq!(j % 7, 0, "{ctx}: block {j}");
                    assert!(d.values[r].iter().all(|v| v.to_bits() == 0), "{ctx}");
                } else {
                    assert_bits(&d.values[r.clone()], &x[r], &ctx);
                }
            }
            // Let the late reliable terminator land before the next round starts.
            sim.run(|_| false);
        }
        let rc = sim.rx.counters();
        assert_eq!(
            rc.iter().map(|k| k.dup + k.stale).sum::<u64>(),
            0,
            "{mode:?}"
        );
    }
}

#[test]
fn fuzzed_headers_never_panic_and_are_counted() {
    let c = cfg();
    let per = c.block_bytes / 4;
    let n = 3 * per + 5;
    let mut tx = DgtSender::new(4, c.clone(), Instant::now()).unwrap();
    let mut rx = DgtReceiver::new(c.clone()).unwrap();
    rx.add_key(8, n as u32, ValueType::F32).unwrap();
    let x: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
    tx.push(8, 0, Values::F32(&x), &[0, 1, 2, 3]).unwrap();
    let now = Instant::now();
    let mut msgs = Vec::new();
    let mut buf = Vec::new();
    while let Some(t) = tx.poll_transmit(now, &mut buf) {
        msgs.push((t, std::mem::take(&mut buf)));
    }
    let dgram = msgs.iter().find(|(t, _)| t.channel == 3).unwrap().1.clone();
    // Each header field corrupted on its own: rejected and counted.
    let bad: [(usize, &[u8]); 11] = [
        (0, &[0, 0]),
        (2, &[DGT_VERSION + 1]),
        (3, &[47]),
        (4, &[0]),
        (5, &[1]),
        (6, &[1, 0]),
        (12, &[9, 0, 0, 0]),
        (20, &[4, 0, 0, 0]),
        (24, &[1, 0, 0, 0]),
        (28, &[1, 0, 0, 0]),
        (4, &[2]),
    ];
    let mut invalid = 0;
    for (off, val) in bad {
        let mut m = dgram.clone();
        m[off..off + val.len()].copy_from_slice(val);
        let before = rx.invalid();
        if off == 4 && val == [2] {
            // Channel changed before the terminator is known: accepted, then discarded by it.
            rx.handle_datagram(now, &m).unwrap();
            continue;
        }
        assert!(rx.handle_datagram(now, &m).is_err(), "offset {off}");
        invalid += 1;
        assert_eq!(rx.invalid(), before + 1);
    }
    assert!(rx.handle_datagram(now, &dgram[..dgram.len() - 1]).is_err());
    assert!(rx.handle_datagram(now, &dgram[..31]).is_err());
    invalid += 2;
    assert_eq!(rx.invalid(), invalid);
    // Random bytes, and random mutations of valid messages: never a panic.
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for i in 0..20_000 {
        let m: Vec<u8> = if i % 2 == 0 {
            let len = rng.random_range(0..80);
            (0..len).map(|_| rng.random()).collect()
        } else {
            let mut m = msgs[rng.random_range(0..msgs.len())].1.clone();
            for _ in 0..rng.random_range(1..4) {
                let p = rng.random_range(0..m.len());
                m[p] = rng.random();
            }
            m
        };
        let _ = rx.handle_datagram(now, &m);
        let _ = rx.handle_reliable(now, &m);
        rx.handle_timeout(now + Duration::from_millis(i));
        while rx.poll_delivery().is_some() {}
    }
}

#[test]
fn random_delays_only_late_sum_over_rounds_is_exact() {
    // Datagrams delayed 0–12 ms (the deadline is 5 ms), reordered, none lost: every block is on
    // time or late, never stale, because each round starts after the previous one settled.
    let c = cfg();
    let per = c.block_bytes / 4;
    let n = 50 * per + 9;
    for seed in 0..4u64 {
        let script: Script =
            Box::new(|_, r| Fate::Deliver(Duration::from_micros(r.random_range(0..12_000))));
        let mut sim = Sim::new(
            c.clone(),
            &[(2, n as u32, ValueType::F32)],
            script,
            100 + seed,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(200 + seed);
        let mut sent: Vec<Vec<f32>> = Vec::new();
        for round in 0..6u32 {
            // Multiples of 1/8 in (-8, 8) so that every sum is exact; the last round is zero
            // and only collects the late blocks of the one before.
            let x: Vec<f32> = tensor(&mut rng, n, per, 9)
                .iter()
                .map(|&v| {
                    if round == 5 {
                        0.0
                    } else {
                        (v * 64.0).round() / 8.0
                    }
                })
                .collect();
            let k = rng.random_range(0.0..1.0);
            let map = reference_map(&x, per, k, c.channels);
            sim.tx.push(2, round, Values::F32(&x), &map).unwrap();
            sent.push(x);
            sim.run(|_| false);
        }
        assert_eq!(sim.delivered.len(), 6);
        let got: Vec<f32> = (0..n)
            .map(|j| sim.delivered.iter().map(|d| d.values[j]).sum())
            .collect();
        let want: Vec<f32> = (0..n).map(|j| sent.iter().map(|x| x[j]).sum()).collect();
        assert_bits(&got, &want, &format!("seed {seed}"));
        let rc = sim.rx.counters();
        let late: u64 = rc.iter().map(|k| k.late).sum();
        assert!(late > 0, "seed {seed}: nothing was late");
        for (ch, k) in rc.iter().enumerate() {
            assert_eq!((k.lost, k.stale, k.dup), (0, 0, 0), "channel {ch}");
            assert_eq!(k.sent, k.on_time + k.late);
            assert_eq!(k.sent, sim.tx.counters().blocks[ch]);
        }
    }
}
