//! Key-value layer over real loopback sockets, run once per available driver.

#[path = "../examples/kv_sum.rs"]
#[allow(dead_code)]
mod kv_sum;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geomx_net::wire::{encode, Frame, FrameHeader};
use geomx_net::{
    ConnConfig, DriverKind, Handler, KvClient, KvServer, MsgKind, NetError, NetOptions,
    PayloadCodec, PeerHandle, Request, Responder,
};

/// Portable always; io_uring where this kernel allows it.
fn drivers() -> Vec<DriverKind> {
    let mut d = vec![DriverKind::Portable];
    match geomx_net::uring_unavailable_reason() {
        None => d.push(DriverKind::IoUring),
        Some(why) => eprintln!("io_uring tests skipped: {why}"),
    }
    d
}

fn opts(driver: DriverKind) -> NetOptions {
    NetOptions {
        driver,
        conn: ConnConfig {
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_millis(200),
            // Long enough that a driver thread starved on a loaded machine is not declared dead;
            // the peer-timeout test sets its own.
            peer_timeout: Duration::from_secs(10),
        },
        connect_timeout: Duration::from_secs(2),
        tick: Duration::from_millis(20),
        ..NetOptions::default()
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn kv_sum_example_is_exact() {
    for d in drivers() {
        assert_eq!(kv_sum::run(d).unwrap(), 0.0, "{d:?}");
    }
}

/// Echoes the payload back with version + 1.
struct Echo;
impl Handler for Echo {
    fn on_request(&self, req: Request, reply: Responder) {
        let _ = reply.send(req.version + 1, req.codec, &req.payload);
    }
}

/// Answers with the name of the driver that serves the request's connection.
struct DriverName;
impl Handler for DriverName {
    fn on_request(&self, _req: Request, reply: Responder) {
        let name = reply.peer().driver().name();
        let _ = reply.send(0, PayloadCodec::Raw, name.as_bytes());
    }
}

/// A handler learns which driver serves a connection (never `Auto`): on the portable one its
/// sends block the reader thread (`PeerHandle::driver`).
#[test]
fn a_handler_sees_the_driver_of_its_connection() {
    for d in drivers() {
        let server = KvServer::bind("127.0.0.1:0", DriverName, opts(d)).unwrap();
        let client = KvClient::connect(server.local_addr(), 7, opts(d)).unwrap();
        let r = client.pull(1, 0, 0, 0).unwrap().wait(WAIT).unwrap();
        assert_eq!(r.payload, d.name().as_bytes(), "{d:?}");
    }
    // `Auto` resolves to the driver actually in use.
    let server = KvServer::bind("127.0.0.1:0", DriverName, opts(DriverKind::Auto)).unwrap();
    let client = KvClient::connect(server.local_addr(), 7, opts(DriverKind::Auto)).unwrap();
    let r = client.pull(1, 0, 0, 0).unwrap().wait(WAIT).unwrap();
    assert_eq!(r.payload, server.driver().name().as_bytes());
}

/// Holds the thread that calls it for `hold` in its first request, then echoes like [`Echo`].
struct HoldsFirst {
    hold: Duration,
    first: std::sync::atomic::AtomicBool,
}
impl Handler for HoldsFirst {
    fn on_request(&self, req: Request, reply: Responder) {
        if self.first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(self.hold);
        }
        let _ = reply.send(req.version + 1, req.codec, &req.payload);
    }
}

/// A portable server's handler that holds its connection's reader thread for 2.5 times the
/// peer timeout (it should not, but a lock or a slow disk can): the client does not take the
/// server for dead (another thread sends the heartbeats meanwhile), the server does not take the
/// client for dead afterwards (its heartbeats wait unread in the kernel), and the connection
/// serves the next request. Before, the client gave up with "no traffic from peer 0 for 1s" (with a 1 s peer timeout).
/// (On io_uring a handler holds the ring: `Handler` asks handlers to return quickly.)
#[test]
fn a_portable_handler_holding_its_reader_past_the_peer_timeout_keeps_the_connection() {
    for d in drivers() {
        let mut o = opts(DriverKind::Portable);
        o.conn.heartbeat_interval = Duration::from_millis(100);
        // 2 s: a loaded 2-core machine can starve a thread for a good part of a second.
        o.conn.peer_timeout = Duration::from_secs(2);
        let handler = HoldsFirst {
            hold: Duration::from_millis(5000),
            first: true.into(),
        };
        let server = KvServer::bind("127.0.0.1:0", handler, o.clone()).unwrap();
        let client =
            KvClient::connect(server.local_addr(), 7, NetOptions { driver: d, ..o }).unwrap();
        let t = Instant::now();
        let r = client
            .push(1, 1, PayloadCodec::Raw, 0, 3, b"abc")
            .unwrap()
            .wait(WAIT)
            .unwrap_or_else(|e| panic!("client on {d:?}: {e}"));
        assert!(t.elapsed() >= Duration::from_millis(5000));
        assert_eq!((r.version, &r.payload[..]), (2, &b"abc"[..]));
        // Past another peer timeout: the server read the client's heartbeats in time.
        std::thread::sleep(Duration::from_millis(3000));
        let r = client
            .push(1, 5, PayloadCodec::Raw, 0, 3, b"xyz")
            .unwrap()
            .wait(WAIT)
            .unwrap_or_else(|e| panic!("client on {d:?}, second request: {e}"));
        assert_eq!((r.version, &r.payload[..]), (6, &b"xyz"[..]));
    }
}

#[test]
fn echo_round_trips_small_and_large_and_counts_bytes() {
    for d in drivers() {
        // No heartbeats during the test: frame counts are then exactly hello + pushes.
        let mut o = opts(d);
        o.conn.heartbeat_interval = Duration::from_secs(60);
        o.conn.peer_timeout = Duration::from_secs(120);
        let server = KvServer::bind("127.0.0.1:0", Echo, o.clone()).unwrap();
        assert_eq!(server.driver(), d);
        let client = KvClient::connect(server.local_addr(), 7, o).unwrap();
        assert_eq!(client.driver(), d);
        for len in [0usize, 4, 4096, 1 << 20, 9 << 20] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let r = client
                .push(3, 41, PayloadCodec::Raw, 10, 20, &payload)
                .unwrap()
                .wait(WAIT)
                .unwrap();
            assert_eq!(
                (r.key, r.version, r.offset, r.total, r.sender),
                (3, 42, 10, 20, 0)
            );
            assert!(r.payload == payload, "{d:?} len {len}");
        }
        let c = client.stats();
        assert_eq!(
            c.frames_sent, c.frames_recv,
            "{d:?}: one reply per push (plus hello/ack): {c:?}"
        );
        assert!(
            c.bytes_sent >= 10 << 20 && c.bytes_recv >= 10 << 20,
            "{c:?}"
        );
        let s = server.stats();
        assert!(s.bytes_recv >= c.bytes_sent - 56 * 4, "{s:?} vs {c:?}");
        if d == DriverKind::IoUring {
            // The 1 MiB and 9 MiB pushes went out with SEND_ZC (copied on loopback).
            assert!(c.zerocopy_sent + c.zerocopy_copied >= 2, "{c:?}");
        } else {
            assert_eq!(c.zerocopy_sent + c.zerocopy_copied, 0);
        }
    }
}

/// Collects requests and answers them from another thread in reverse order.
#[derive(Default)]
struct Parker {
    parked: Mutex<Vec<(Request, Responder)>>,
}
impl Handler for Parker {
    fn on_request(&self, req: Request, reply: Responder) {
        self.parked.lock().unwrap().push((req, reply));
    }
}

/// Bytes whose drop is counted: what a driver keeps for an owned reply.
struct Counted(Vec<u8>, Arc<std::sync::atomic::AtomicUsize>);
impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u64 * 7 + seed) as u8).collect()
}

/// Replies with `pattern(key, version)` as an owned payload.
struct OwnedReplies(Arc<std::sync::atomic::AtomicUsize>);
impl Handler for OwnedReplies {
    fn on_request(&self, req: Request, reply: Responder) {
        let bytes = Counted(pattern(req.key as usize, req.version), self.0.clone());
        let _ = reply.send_owned(req.version, PayloadCodec::Raw, Box::new(bytes));
    }
}

#[test]
fn owned_replies_arrive_intact_in_order_and_are_dropped_once_sent() {
    for d in drivers() {
        // A small chunk makes every large reply a partial direct write plus a queued rest.
        for chunk in [geomx_net::MIN_IO_CHUNK, geomx_net::DEFAULT_IO_CHUNK] {
            let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let o = NetOptions {
                io_chunk: chunk,
                ..opts(d)
            };
            let server =
                KvServer::bind("127.0.0.1:0", OwnedReplies(dropped.clone()), o.clone()).unwrap();
            let client = KvClient::connect(server.local_addr(), 3, o).unwrap();
            // Pipelined: the replies (up to 24 MiB, more than the socket buffers hold) queue
            // behind each other in the server's driver while the client has not read them.
            let sizes = [0usize, 5, 4096, 1 << 20, 24 << 20, 3, 70_000, 24 << 20, 1];
            let pending: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    client
                        .push(len as u64, i as u64, PayloadCodec::Raw, 0, 0, &[])
                        .unwrap()
                })
                .collect();
            for (i, p) in pending.into_iter().enumerate() {
                let r = p.wait(WAIT).unwrap();
                assert_eq!(r.version, i as u64, "{d:?} chunk {chunk}");
                assert!(
                    r.payload == pattern(sizes[i], i as u64),
                    "{d:?} chunk {chunk}: reply {i} ({} bytes) differs",
                    sizes[i]
                );
            }
            let deadline = Instant::now() + WAIT;
            while dropped.load(std::sync::atomic::Ordering::SeqCst) < sizes.len() {
                assert!(
                    Instant::now() < deadline,
                    "{d:?}: owned payloads not released"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                dropped.load(std::sync::atomic::Ordering::SeqCst),
                sizes.len()
            );
        }
    }
}

#[test]
fn many_in_flight_answered_later_from_another_thread_out_of_order() {
    for d in drivers() {
        let parker = Arc::new(Parker::default());
        let server = KvServer::bind_with_id("127.0.0.1:0", 5, parker.clone(), opts(d)).unwrap();
        let client = KvClient::connect(server.local_addr(), 9, opts(d)).unwrap();
        assert_eq!(client.server_id(), 5);
        let n = 300u64;
        let pending: Vec<_> = (0..n)
            .map(|k| {
                client
                    .push(
                        k,
                        k,
                        PayloadCodec::DenseF32,
                        0,
                        1,
                        &(k as f32).to_le_bytes(),
                    )
                    .unwrap()
            })
            .collect();
        let deadline = Instant::now() + WAIT;
        while parker.parked.lock().unwrap().len() < n as usize {
            assert!(Instant::now() < deadline, "requests did not arrive");
            std::thread::sleep(Duration::from_millis(5));
        }
        let parked = std::mem::take(&mut *parker.parked.lock().unwrap());
        std::thread::spawn(move || {
            for (req, reply) in parked.into_iter().rev() {
                assert_eq!(req.sender, 9);
                let _ = reply.send(req.key * 10, PayloadCodec::DenseF32, &req.payload);
            }
        })
        .join()
        .unwrap();
        for (k, p) in pending.into_iter().enumerate() {
            let r = p.wait(WAIT).unwrap();
            assert_eq!((r.key, r.version), (k as u64, k as u64 * 10));
            assert_eq!(r.payload, (k as f32).to_le_bytes());
        }
    }
}

#[test]
fn unanswered_request_times_out_and_dropped_responder_reports_error() {
    for d in drivers() {
        let parker = Arc::new(Parker::default());
        // `bind` takes the handler by value; an `Arc` keeps a handle to its state.
        let server = KvServer::bind("127.0.0.1:0", parker.clone(), opts(d)).unwrap();
        let mut o = opts(d);
        o.conn.request_timeout = Duration::from_millis(300);
        let client = KvClient::connect(server.local_addr(), 1, o).unwrap();
        let t0 = Instant::now();
        let e = client.pull(1, 0, 0, 0).unwrap().wait(WAIT).unwrap_err();
        assert!(matches!(e, NetError::Timeout(_)), "{e}");
        // The request's own timeout, not the 20 s wait, ended it.
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        // The connection still works; a responder dropped unanswered yields a remote error.
        // (Asked by a second client whose request timeout cannot fire first on a slow machine.)
        let patient = KvClient::connect(server.local_addr(), 2, opts(d)).unwrap();
        let p = patient.pull(2, 0, 0, 0).unwrap();
        let deadline = Instant::now() + WAIT;
        while parker.parked.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        parker.parked.lock().unwrap().clear();
        let e = p.wait(WAIT).unwrap_err();
        assert!(
            matches!(e, NetError::Remote(ref m) if m.contains("dropped")),
            "{e}"
        );
    }
}

#[test]
fn server_loss_fails_pending_at_once() {
    for d in drivers() {
        let parker = Arc::new(Parker::default());
        let mut server = KvServer::bind_with_id("127.0.0.1:0", 0, parker.clone(), opts(d)).unwrap();
        let mut o = opts(d);
        o.conn.request_timeout = Duration::from_secs(60);
        let client = KvClient::connect(server.local_addr(), 1, o).unwrap();
        let p = client.push(1, 0, PayloadCodec::Raw, 0, 0, b"x").unwrap();
        let deadline = Instant::now() + WAIT;
        while parker.parked.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        std::mem::forget(std::mem::take(&mut *parker.parked.lock().unwrap()));
        server.shutdown();
        let e = p.wait(WAIT).unwrap_err();
        assert!(matches!(e, NetError::PeerClosed(_)), "{d:?}: {e}");
        // At once: the loss, not the 60 s request timeout, failed it.
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
        assert!(client.closed_reason().is_some());
        assert!(client.push(1, 0, PayloadCodec::Raw, 0, 0, b"x").is_err());
    }
}

#[test]
fn connect_and_handshake_timeouts() {
    for d in drivers() {
        // A bound socket that never listens: connecting is refused, and the port stays ours.
        let closed =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        closed
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        let port = closed.local_addr().unwrap().as_socket().unwrap();
        assert!(KvClient::connect(port, 1, opts(d)).is_err());
        // A listener that never answers the Hello.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let t0 = Instant::now();
        let e = KvClient::connect(silent.local_addr().unwrap(), 1, opts(d))
            .err()
            .unwrap();
        assert!(matches!(e, NetError::Timeout(_)), "{e}");
        assert!(
            t0.elapsed() >= Duration::from_secs(2) && t0.elapsed() < Duration::from_secs(15),
            "{:?}",
            t0.elapsed()
        );
    }
}

#[derive(Default)]
struct Watcher {
    closed: Mutex<Vec<(u32, String)>>,
}
impl Handler for Watcher {
    fn on_request(&self, req: Request, reply: Responder) {
        let _ = reply.send(req.version, PayloadCodec::Raw, &[]);
    }
    fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
        self.closed
            .lock()
            .unwrap()
            .push((peer.node_id(), reason.to_string()));
    }
}

#[test]
fn silent_peer_is_dropped_after_peer_timeout() {
    for d in drivers() {
        let w = Arc::new(Watcher::default());
        let mut o = opts(d);
        o.conn.peer_timeout = Duration::from_secs(2);
        let server = KvServer::bind_with_id("127.0.0.1:0", 0, w.clone(), o).unwrap();
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        let mut hello = FrameHeader::new(MsgKind::Hello);
        hello.sender = 77;
        // Taken before the Hello leaves, so a stall here cannot shorten the measured time.
        let t0 = Instant::now();
        raw.write_all(&encode(&Frame::new(hello, vec![]))).unwrap();
        while w.closed.lock().unwrap().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(20));
        }
        let (id, why) = w.closed.lock().unwrap()[0].clone();
        assert_eq!(id, 77);
        assert!(why.contains("no traffic"), "{why}");
        // The error says what the kernel knew: this peer's stack acknowledged the server's
        // heartbeats (its process is what fell silent).
        eprintln!("{d:?}: {why}");
        if cfg!(target_os = "linux") {
            assert!(why.contains("; TCP: peer's last ack"), "{d:?}: {why}");
            assert!(why.contains(" 0 unacked"), "{d:?}: {why}");
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
        // Everything the server sent (HelloAck + heartbeats) then EOF.
        let mut sink = Vec::new();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = raw.read_to_end(&mut sink);
        assert!(sink.len() >= 56);
    }
}

/// Answers every request with 1 MiB; records disconnects.
#[derive(Default)]
struct BigReplies(Watcher);
impl Handler for BigReplies {
    fn on_request(&self, req: Request, reply: Responder) {
        let _ = reply.send(req.version, PayloadCodec::Raw, &vec![7u8; 1 << 20]);
    }
    fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
        self.0.on_disconnect(peer, reason)
    }
}

#[test]
fn peer_that_stops_reading_is_dropped_and_the_server_goes_on() {
    for d in drivers() {
        let h = Arc::new(BigReplies::default());
        let mut o = opts(d);
        o.conn.peer_timeout = Duration::from_secs(2);
        o.conn.heartbeat_interval = Duration::from_millis(200);
        let server = KvServer::bind_with_id("127.0.0.1:0", 0, h.clone(), o.clone()).unwrap();
        let addr = server.local_addr();
        // A hostile peer: a valid Hello, then pulls and heartbeats, and it never reads, so the
        // server's replies pile up. Its receive side stays alive (it keeps sending).
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let hostile = std::thread::spawn(move || {
            let mut raw = TcpStream::connect(addr).unwrap();
            raw.set_write_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut hello = FrameHeader::new(MsgKind::Hello);
            hello.sender = 66;
            raw.write_all(&encode(&Frame::new(hello, vec![]))).unwrap();
            let mut id = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                id += 1;
                let mut pull = FrameHeader::new(MsgKind::Pull);
                pull.request_id = id;
                let mut bytes = encode(&Frame::new(pull, vec![]));
                bytes.extend(encode(&Frame::new(
                    FrameHeader::new(MsgKind::Heartbeat),
                    vec![],
                )));
                if raw.write_all(&bytes).is_err() && id > 1000 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            raw
        });
        // A good client keeps being served meanwhile.
        let good = KvClient::connect(addr, 5, o).unwrap();
        let t0 = Instant::now();
        let dropped = loop {
            let r = good.pull(1, 3, 0, 0).unwrap().wait(WAIT).unwrap();
            assert_eq!(r.payload.len(), 1 << 20, "{d:?}");
            let closed = h.0.closed.lock().unwrap().clone();
            if let Some(c) = closed.iter().find(|(id, _)| *id == 66) {
                break c.1.clone();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{d:?}: a peer that never reads was not dropped: {closed:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(dropped.contains("stopped reading"), "{d:?}: {dropped}");
        eprintln!("{d:?}: {dropped}");
        if cfg!(target_os = "linux") {
            assert!(dropped.contains("TCP: peer's last ack"), "{d:?}: {dropped}");
            // A peer that stops reading closes its receive window (the kernel shows it since
            // Linux 5.4).
            assert!(
                dropped.contains("peer's window 0 bytes") || !dropped.contains("peer's window"),
                "{d:?}: {dropped}"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(hostile.join().unwrap());
        // And after it: still served.
        let r = good.pull(2, 4, 0, 0).unwrap().wait(WAIT).unwrap();
        assert_eq!(r.version, 4);
    }
}

#[test]
fn garbage_peer_is_dropped_while_good_peers_keep_pushing() {
    for d in drivers() {
        let handler = Arc::new(kv_sum::SumHandler::default());
        let w = Arc::new(Watcher::default());
        struct Both(Arc<kv_sum::SumHandler>, Arc<Watcher>);
        impl Handler for Both {
            fn on_request(&self, req: Request, reply: Responder) {
                self.0.on_request(req, reply)
            }
            fn on_disconnect(&self, peer: &PeerHandle, reason: &NetError) {
                self.1.on_disconnect(peer, reason)
            }
        }
        let server = KvServer::bind_with_id(
            "127.0.0.1:0",
            0,
            Arc::new(Both(handler, w.clone())),
            opts(d),
        )
        .unwrap();
        let addr = server.local_addr();
        let good: Vec<_> = (0..2u32)
            .map(|wk| {
                std::thread::spawn(move || {
                    let c = KvClient::connect(addr, 10 + wk, opts(d)).unwrap();
                    let one = 1.0f32.to_le_bytes();
                    for round in 0..200u64 {
                        c.push(u64::from(wk), round, PayloadCodec::DenseF32, 0, 1, &one)
                            .unwrap()
                            .wait(WAIT)
                            .unwrap();
                    }
                })
            })
            .collect();
        // Garbage peers of several kinds, interleaved with the good traffic.
        let mut rng = 12345u64;
        let mut bad_conns = 0;
        for i in 0..12 {
            let mut s = TcpStream::connect(addr).unwrap();
            let bytes: Vec<u8> = match i % 4 {
                0 => (0..4096)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng as u8
                    })
                    .collect(),
                1 => {
                    // Valid Hello, then a header announcing 4 GiB.
                    let mut b = encode(&Frame::new(FrameHeader::new(MsgKind::Hello), vec![]));
                    let mut h = FrameHeader::new(MsgKind::Push).encode();
                    h[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
                    b.extend_from_slice(&h);
                    b
                }
                2 => {
                    // Valid Hello, then an unknown kind.
                    let mut b = encode(&Frame::new(FrameHeader::new(MsgKind::Hello), vec![]));
                    let mut h = FrameHeader::new(MsgKind::Push).encode();
                    h[5] = 99;
                    b.extend_from_slice(&h);
                    b
                }
                _ => encode(&Frame::new(FrameHeader::new(MsgKind::Push), vec![1, 2, 3])), // no Hello
            };
            let _ = s.write_all(&bytes);
            bad_conns += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        for g in good {
            g.join().unwrap();
        }
        let c = KvClient::connect(addr, 99, opts(d)).unwrap();
        for wk in 0..2u64 {
            let r = c.pull(wk, 0, 0, 1).unwrap().wait(WAIT).unwrap();
            assert_eq!(
                r.payload,
                200.0f32.to_le_bytes(),
                "{d:?}: nothing lost for good peers"
            );
        }
        let t0 = Instant::now();
        while w.closed.lock().unwrap().len() < bad_conns {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{:?}",
                w.closed.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let reasons = w.closed.lock().unwrap().clone();
        assert!(
            reasons.iter().any(|(_, r)| r.contains("malformed")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|(_, r)| r.contains("before the handshake")),
            "{reasons:?}"
        );
    }
}

#[test]
fn oversize_payload_is_refused_locally() {
    for d in drivers() {
        let mut o = opts(d);
        o.max_frame = 4096;
        let server = KvServer::bind("127.0.0.1:0", Echo, o.clone()).unwrap();
        let client = KvClient::connect(server.local_addr(), 1, o).unwrap();
        let e = client
            .push(0, 0, PayloadCodec::Raw, 0, 0, &[0u8; 4096])
            .err()
            .unwrap();
        assert!(matches!(
            e,
            NetError::TooLarge {
                len: 4096,
                max: 4096
            }
        ));
        assert!(client
            .push(0, 0, PayloadCodec::Raw, 0, 0, &[0u8; 4000])
            .unwrap()
            .wait(WAIT)
            .is_ok());
    }
}

#[test]
fn one_client_shared_by_many_threads() {
    for d in drivers() {
        let server = KvServer::bind("127.0.0.1:0", Echo, opts(d)).unwrap();
        let client = KvClient::connect(server.local_addr(), 3, opts(d)).unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = client.clone();
                std::thread::spawn(move || {
                    for i in 0..300u64 {
                        // Mix sizes so some threads wait on large (zero-copy path) sends.
                        let len = if i % 50 == 0 {
                            300_000
                        } else {
                            64 + (i as usize % 7) * 100
                        };
                        let payload: Vec<u8> = (0..len).map(|j| (j as u64 ^ t ^ i) as u8).collect();
                        let key = t * 1000 + i;
                        let r = c
                            .push(key, i, PayloadCodec::Raw, 0, 0, &payload)
                            .unwrap()
                            .wait(WAIT)
                            .unwrap();
                        assert_eq!((r.key, r.version), (key, i + 1));
                        assert!(r.payload == payload);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Some requests in flight, waited on from another thread than the sender.
        let ps: Vec<_> = (0..50).map(|k| client.pull(k, 0, 0, 0).unwrap()).collect();
        std::thread::spawn(move || {
            for p in ps {
                p.wait(WAIT).unwrap();
            }
        })
        .join()
        .unwrap();
    }
}

/// Forwards each request to an upstream server and answers with its response, waiting inside the
/// handler (not recommended, but it must not deadlock: the upstream client has its own driver).
struct Relay(KvClient);
impl Handler for Relay {
    fn on_request(&self, req: Request, reply: Responder) {
        let up = self
            .0
            .push(req.key, req.version, req.codec, 0, 0, &req.payload)
            .and_then(|p| p.wait(WAIT));
        let _ = match up {
            Ok(r) => reply.send(r.version, r.codec, &r.payload),
            Err(e) => reply.error(&e.to_string()),
        };
    }
}

#[test]
fn handler_may_wait_on_another_client() {
    for d in drivers() {
        let upstream = KvServer::bind("127.0.0.1:0", Echo, opts(d)).unwrap();
        let up_client = KvClient::connect(upstream.local_addr(), 50, opts(d)).unwrap();
        let relay = KvServer::bind("127.0.0.1:0", Relay(up_client), opts(d)).unwrap();
        let client = KvClient::connect(relay.local_addr(), 51, opts(d)).unwrap();
        for (i, len) in [10usize, 200_000, 3].into_iter().enumerate() {
            let payload = vec![i as u8 + 1; len];
            let r = client
                .push(9, i as u64, PayloadCodec::Raw, 0, 0, &payload)
                .unwrap()
                .wait(WAIT)
                .unwrap();
            assert_eq!((r.version, r.payload.len()), (i as u64 + 1, len), "{d:?}");
        }
    }
}

#[test]
#[cfg(target_os = "linux")]
fn congestion_control_is_set_on_both_ends_and_an_unknown_one_fails_connect_and_bind_by_name() {
    use geomx_net::congestion::Algorithm;
    for d in drivers() {
        // reno: built into every Linux kernel and allowed to every user.
        let o = NetOptions {
            congestion: Some(Algorithm::new("reno").unwrap()),
            ..opts(d)
        };
        let server = KvServer::bind("127.0.0.1:0", Echo, o.clone()).unwrap();
        let client = KvClient::connect(server.local_addr(), 7, o.clone()).unwrap();
        let r = client
            .push(1, 1, PayloadCodec::Raw, 0, 3, &[1, 2, 3])
            .unwrap()
            .wait(WAIT)
            .unwrap();
        assert_eq!((r.version, &r.payload[..]), (2, &[1u8, 2, 3][..]), "{d:?}");
        let bad = NetOptions {
            congestion: Some(Algorithm::new("no-such-cc").unwrap()),
            ..opts(d)
        };
        let e = KvClient::connect(server.local_addr(), 8, bad.clone())
            .err()
            .unwrap_or_else(|| panic!("{d:?}: an unknown algorithm must fail the connect"))
            .to_string();
        assert!(e.contains("no-such-cc"), "{d:?}: {e}");
        let e = KvServer::bind("127.0.0.1:0", Echo, bad)
            .err()
            .unwrap_or_else(|| panic!("{d:?}: an unknown algorithm must fail the bind"))
            .to_string();
        assert!(e.contains("no-such-cc"), "{d:?}: {e}");
        // The server goes on serving.
        let r = client
            .push(1, 5, PayloadCodec::Raw, 0, 1, &[9])
            .unwrap()
            .wait(WAIT)
            .unwrap();
        assert_eq!(r.version, 6, "{d:?}");
    }
}
