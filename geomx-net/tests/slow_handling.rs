//! A handler that holds the thread reading its connection for over a second is logged, with
//! where the time went (docs/net.md, "Slow ring turns"): that is how a live peer can be
//! declared silent, and the log is what tells it apart afterwards.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geomx_net::{
    ConnConfig, DriverKind, Handler, KvClient, KvServer, NetOptions, PayloadCodec, Request,
    Responder,
};

/// Everything logged by any thread of this test binary.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Answers after holding the calling thread (the connection's reader, or the ring) for 1.3 s.
struct Sleepy;
impl Handler for Sleepy {
    fn on_request(&self, req: Request, reply: Responder) {
        std::thread::sleep(Duration::from_millis(1300));
        let _ = reply.send(req.version, PayloadCodec::Raw, &[1, 2, 3]);
    }
}

#[test]
fn a_handler_that_holds_the_reading_thread_for_a_second_is_logged_with_where_the_time_went() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let mut drivers = vec![(DriverKind::Portable, "handling one read's input took")];
    match geomx_net::uring_unavailable_reason() {
        None => drivers.push((DriverKind::IoUring, "a ring turn worked")),
        Some(why) => eprintln!("io_uring part skipped: {why}"),
    }
    for (driver, expect) in drivers {
        let opts = NetOptions {
            driver,
            conn: ConnConfig {
                handshake_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(30),
                heartbeat_interval: Duration::from_millis(200),
                peer_timeout: Duration::from_secs(30),
            },
            ..NetOptions::default()
        };
        let server =
            KvServer::bind_with_id("127.0.0.1:0", 0, Arc::new(Sleepy), opts.clone()).expect("bind");
        let client = KvClient::connect(server.local_addr(), 3, opts).expect("connect");
        let r = client
            .pull(1, 7, 0, 0)
            .expect("pull")
            .wait(Duration::from_secs(30))
            .expect("reply");
        assert_eq!(r.payload, vec![1, 2, 3], "{driver:?}");
        // Other slow turns or reads may be logged on a loaded machine: one line must say it.
        // It is written once the handler has returned, which may be after the reply arrived.
        let wanted = |l: &&str| {
            l.contains(expect)
                && ms_after(l, expect) >= 1000.0
                && (driver == DriverKind::Portable
                    // The time was in the callbacks, handling a receive's completion.
                    || (l.contains("slowest completion: recv")
                        && ms_after(l, "Dispatch ") >= 1000.0))
        };
        let t0 = std::time::Instant::now();
        let line = loop {
            let text = log.text();
            if let Some(l) = text.lines().find(wanted) {
                break l.to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{driver:?}: no {expect:?} in the log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!("{driver:?}: {line}");
    }
}

/// The milliseconds written right after `label` in `line` (0 if none).
fn ms_after(line: &str, label: &str) -> f64 {
    line.split_once(label)
        .and_then(|(_, rest)| rest.trim_start().split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}
