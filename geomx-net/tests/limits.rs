//! Bounds that hold against a peer that never reads: a client that pipelines requests with
//! large replies and reads none of them makes the server hold a bounded amount of output, and
//! the server goes on serving everyone else.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geomx_net::wire::{self, Frame, FrameHeader, MsgKind, PayloadCodec};
use geomx_net::{DriverKind, Handler, KvClient, KvServer, NetOptions, Request, Responder};

/// Every Pull is answered at once, on the receiving thread, with `REPLY` bytes.
struct Big {
    answered: AtomicU64,
}

const REPLY: usize = 1 << 20;

impl Handler for Big {
    fn on_request(&self, req: Request, reply: Responder) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        let _ = reply.send(req.version, PayloadCodec::Raw, &vec![7u8; REPLY]);
    }
}

fn frame(kind: MsgKind, request_id: u64) -> Vec<u8> {
    let mut h = FrameHeader::new(kind);
    h.sender = 5;
    h.request_id = request_id;
    wire::encode(&Frame::new(h, Vec::new()))
}

/// Portable, and io_uring where the kernel allows it (else a printed reason).
fn drivers() -> Vec<DriverKind> {
    let mut drivers = vec![DriverKind::Portable];
    match geomx_net::uring_unavailable_reason() {
        None => drivers.push(DriverKind::IoUring),
        Some(why) => eprintln!("io_uring case skipped: {why}"),
    }
    drivers
}

#[test]
fn a_client_that_never_reads_its_replies_holds_bounded_server_memory() {
    let drivers = drivers();
    for driver in drivers {
        let big = Arc::new(Big {
            answered: AtomicU64::new(0),
        });
        // A write that makes no progress fails after the peer timeout (the portable driver's
        // SO_SNDTIMEO): 60 s here, so the reader of the client that reads nothing stays blocked
        // in its write for the whole test.
        let mut opts = NetOptions {
            driver,
            ..NetOptions::default()
        };
        opts.conn.peer_timeout = Duration::from_secs(60);
        let server = KvServer::bind("127.0.0.1:0", big.clone(), opts.clone()).unwrap();
        // 4000 Pulls (4 GB of replies) in one write, then nothing is ever read.
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        let mut bytes = frame(MsgKind::Hello, 0);
        for i in 1..=4000 {
            bytes.extend(frame(MsgKind::Pull, i));
        }
        s.write_all(&bytes).unwrap();
        // The server answers until its bound for the connection's output (16 MiB) and the
        // socket buffers are full, then stops taking requests from it.
        let t = Instant::now();
        let mut last = (0, Instant::now());
        while t.elapsed() < Duration::from_secs(20) {
            let n = big.answered.load(Ordering::Relaxed);
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let answered = big.answered.load(Ordering::Relaxed);
        eprintln!("{driver:?}: {answered} replies of 1 MiB made for a client that reads none");
        assert!(answered > 0, "{driver:?}: no request was served");
        assert!(
            answered < 200,
            "{driver:?}: {answered} MiB of replies held for a client that reads nothing"
        );
        // Others are still served, while that reader is still blocked (both connections
        // open): the accept loop never runs a handler (see the next test). 30 s is generous
        // for the handshake and well under the blocked write's 60 s.
        let mut client = opts.clone();
        client.conn.handshake_timeout = Duration::from_secs(30);
        let c = KvClient::connect(server.local_addr(), 6, client).unwrap();
        let r = c
            .pull(1, 0, 0, 1)
            .unwrap()
            .wait(Duration::from_secs(30))
            .unwrap();
        assert_eq!(r.payload.len(), REPLY);
        // The accept loop counts a connection just after starting it, so on a loaded machine
        // the new one may have answered before it is counted: wait for the count, which stays
        // at 1 if the first connection was dropped.
        let t = Instant::now();
        while server.connections() < 2 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.connections(), 2, "{driver:?}");
        drop(s);
    }
}

/// Records the thread each request is handled on, and answers it.
#[derive(Default)]
struct Where {
    threads: std::sync::Mutex<Vec<String>>,
}

impl Handler for Where {
    fn on_request(&self, req: Request, reply: Responder) {
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().unwrap().push(name);
        let _ = reply.send(req.version, PayloadCodec::Raw, &[]);
    }
}

#[test]
fn requests_are_never_handled_on_the_accept_loop() {
    // A client's Hello and first request in one write as soon as the connection is up: the
    // server may decode them before its accept loop has finished starting the connection. Had
    // the accept loop run the handler, a reply blocked on a peer that reads nothing would stop
    // it accepting anyone (a CI run saw a second client's handshake time out so).
    for driver in drivers() {
        let opts = NetOptions {
            driver,
            ..NetOptions::default()
        };
        let seen = Arc::new(Where::default());
        let server = KvServer::bind("127.0.0.1:0", seen.clone(), opts).unwrap();
        let clients: Vec<TcpStream> = (0..200u64)
            .map(|i| {
                let mut s = TcpStream::connect(server.local_addr()).unwrap();
                let mut bytes = frame(MsgKind::Hello, 0);
                bytes.extend(frame(MsgKind::Pull, i + 1));
                s.write_all(&bytes).unwrap();
                s
            })
            .collect();
        let t = Instant::now();
        while seen.threads.lock().unwrap().len() < clients.len()
            && t.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let threads = seen.threads.lock().unwrap().clone();
        assert_eq!(threads.len(), clients.len(), "{driver:?}");
        let on_accept = threads.iter().filter(|n| *n == "geomx-net-accept").count();
        assert_eq!(
            on_accept, 0,
            "{driver:?}: {on_accept} requests handled on the accept loop"
        );
    }
}

#[test]
fn a_server_holds_at_most_its_connection_bound() {
    for driver in [DriverKind::Portable, DriverKind::Auto] {
        let big = Arc::new(Big {
            answered: AtomicU64::new(0),
        });
        let opts = NetOptions {
            driver,
            max_connections: 4,
            ..NetOptions::default()
        };
        let server = KvServer::bind("127.0.0.1:0", big, opts.clone()).unwrap();
        let idle: Vec<TcpStream> = (0..10)
            .map(|_| {
                let mut s = TcpStream::connect(server.local_addr()).unwrap();
                s.write_all(&frame(MsgKind::Hello, 0)).unwrap();
                s
            })
            .collect();
        // All ten were accepted; the server kept four.
        let t = Instant::now();
        while server.connections() < 4 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(server.connections(), 4, "{driver:?}");
        // Once they are gone, a client is served again.
        drop(idle);
        let t = Instant::now();
        while server.connections() > 0 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let c = KvClient::connect(server.local_addr(), 6, opts).unwrap();
        let r = c.pull(1, 0, 0, 1).unwrap().wait(Duration::from_secs(20));
        assert_eq!(r.unwrap().payload.len(), REPLY, "{driver:?}");
    }
}

/// Every request is answered at once, on the receiving thread, with `ECHO` bytes.
struct Echo;

const ECHO: usize = 16 << 20;

impl Handler for Echo {
    fn on_request(&self, req: Request, reply: Responder) {
        let _ = reply.send(req.version, PayloadCodec::Raw, &vec![3u8; ECHO]);
    }
}

#[test]
fn large_frames_both_ways_at_once_never_deadlock() {
    // A client pipelines 4 MiB pushes while the server answers each with 4 MiB: both ends have
    // far more than the output bound queued for each other. The server may stop reading a
    // client whose replies pile up, but the client must go on reading, or neither drains.
    let drivers = drivers();
    for driver in drivers {
        let opts = NetOptions {
            driver,
            ..NetOptions::default()
        };
        let server = KvServer::bind("127.0.0.1:0", Arc::new(Echo), opts.clone()).unwrap();
        let c = Arc::new(KvClient::connect(server.local_addr(), 6, opts).unwrap());
        let payload = vec![1u8; ECHO];
        let pulls = {
            let c = c.clone();
            std::thread::spawn(move || {
                (0..4u64)
                    .map(|i| c.pull(2, i, 0, 1).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        let pushes: Vec<_> = (0..8u64)
            .map(|i| c.push(1, i, PayloadCodec::Raw, 0, 1, &payload).unwrap())
            .collect();
        for p in pushes.into_iter().chain(pulls.join().unwrap()) {
            let r = p.wait(Duration::from_secs(60));
            assert_eq!(r.unwrap().payload.len(), ECHO, "{driver:?}");
        }
    }
}
