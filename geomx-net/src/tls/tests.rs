//! Handshakes over loopback: the happy path, strangers, and interoperability with plain rustls.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

fn ctx(ca: &JobCa, role: &str, dc: u32, rank: u32) -> TlsContext {
    TlsContext::new(&ca.issue(&Identity::new(role, dc, rank).unwrap()).unwrap()).unwrap()
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

/// Runs `server` on an accepted connection in a thread and `client` on the connecting end.
fn pair<S, C, A, B>(server: S, client: C) -> (A, B)
where
    S: FnOnce(TcpStream) -> A + Send + 'static,
    C: FnOnce(TcpStream) -> B,
    A: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || server(l.accept().unwrap().0));
    let b = client(TcpStream::connect(addr).unwrap());
    (h.join().unwrap(), b)
}

#[test]
fn members_learn_each_others_identity_and_exchange_records() {
    let ca = JobCa::generate("t", 1).unwrap();
    let s = Arc::new(ctx(&ca, "local-server", 1, 0));
    let c = ctx(&ca, "worker", 1, 3);
    let (srv, cli) = pair(
        move |mut t| {
            let mut sess = handshake(&mut t, &s, HandshakeSide::Server, deadline()).unwrap();
            let mut buf = vec![0u8; 4096];
            let mut plain = Vec::new();
            while plain.len() < 5 {
                let n = t.read(&mut buf).unwrap();
                sess.opener.open(&buf[..n], &mut plain).unwrap();
            }
            let mut out = Vec::new();
            sess.sealer.seal(&[b"pong"], &mut out).unwrap();
            t.write_all(&out).unwrap();
            (sess.peer, plain, sess.dgt_key)
        },
        move |mut t| {
            let mut sess = handshake(&mut t, &c, HandshakeSide::Client, deadline()).unwrap();
            let mut out = Vec::new();
            sess.sealer.seal(&[b"pi", b"ng"], &mut out).unwrap();
            sess.sealer.seal(&[b"!"], &mut out).unwrap();
            t.write_all(&out).unwrap();
            let mut buf = vec![0u8; 4096];
            let mut plain = Vec::new();
            while plain.len() < 4 {
                let n = t.read(&mut buf).unwrap();
                sess.opener.open(&buf[..n], &mut plain).unwrap();
            }
            (sess.peer, plain, sess.dgt_key)
        },
    );
    assert_eq!(srv.0, Identity::new("worker", 1, 3).unwrap());
    assert_eq!(cli.0, Identity::new("local-server", 1, 0).unwrap());
    assert_eq!(srv.1, b"ping!");
    assert_eq!(cli.1, b"pong");
    assert_eq!(srv.2, cli.2, "both ends export the same DGT key");
    assert_ne!(srv.2, [0u8; 32]);
}

#[test]
fn a_certificate_from_another_ca_is_refused_on_both_sides() {
    let ca = JobCa::generate("job", 1).unwrap();
    let other = JobCa::generate("job", 1).unwrap();
    let good = Arc::new(ctx(&ca, "global-server", 0, 0));
    let stranger = ctx(&other, "global-server", 0, 0);
    let (srv, cli) = pair(
        move |mut t| handshake(&mut t, &good, HandshakeSide::Server, deadline()).map(|_| ()),
        move |mut t| handshake(&mut t, &stranger, HandshakeSide::Client, deadline()).map(|_| ()),
    );
    assert!(matches!(srv, Err(TlsError::Handshake(_))), "{srv:?}");
    assert!(matches!(cli, Err(TlsError::Handshake(_))), "{cli:?}");
}

#[test]
fn plaintext_peers_and_silent_peers_are_refused_within_the_deadline() {
    let ca = JobCa::generate("job", 1).unwrap();
    let s = Arc::new(ctx(&ca, "coordinator", 0, 0));
    let s2 = s.clone();
    // A plaintext geomx frame (magic GMXF) instead of a ClientHello.
    let (srv, ()) = pair(
        move |mut t| handshake(&mut t, &s, HandshakeSide::Server, deadline()).map(|_| ()),
        |mut t| {
            let _ = t.write_all(b"GMXF\x01\x00\x00\x00 plaintext hello");
            std::thread::sleep(Duration::from_millis(200));
        },
    );
    assert!(matches!(srv, Err(TlsError::Handshake(_))), "{srv:?}");
    let start = Instant::now();
    let (srv, _keep) = pair(
        move |mut t| {
            handshake(
                &mut t,
                &s2,
                HandshakeSide::Server,
                Instant::now() + Duration::from_millis(300),
            )
            .map(|_| ())
        },
        |t| t,
    );
    assert!(matches!(srv, Err(TlsError::Timeout)), "{srv:?}");
    assert!(start.elapsed() < Duration::from_secs(15));
}

#[test]
fn records_interoperate_with_rustls_in_both_directions() {
    let ca = JobCa::generate("job", 1).unwrap();
    let s = Arc::new(ctx(&ca, "local-server", 0, 0));
    let c = ctx(&ca, "worker", 0, 0);
    let ccfg = c.client.clone();
    let (got, ()) = pair(
        move |mut t| {
            let mut sess = handshake(&mut t, &s, HandshakeSide::Server, deadline()).unwrap();
            let big: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
            let mut out = Vec::new();
            sess.sealer.seal(&[&big], &mut out).unwrap();
            t.write_all(&out).unwrap();
            let mut buf = vec![0u8; 8192];
            let mut plain = Vec::new();
            while plain.len() < 30_000 {
                let n = t.read(&mut buf).unwrap();
                assert!(n > 0);
                sess.opener.open(&buf[..n], &mut plain).unwrap();
            }
            plain
        },
        move |mut t| {
            // Plain rustls on the client side, no geomx record layer.
            let name = rustls::pki_types::ServerName::try_from(JOB_SERVER_NAME).unwrap();
            let mut conn = rustls::ClientConnection::new(ccfg, name).unwrap();
            let mut tls = rustls::Stream::new(&mut conn, &mut t);
            let data: Vec<u8> = (0..30_000u32).map(|i| (i % 199) as u8).collect();
            tls.write_all(&data).unwrap();
            let mut got = vec![0u8; 50_000];
            tls.read_exact(&mut got).unwrap();
            assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
        },
    );
    let want: Vec<u8> = (0..30_000u32).map(|i| (i % 199) as u8).collect();
    assert_eq!(got, want);
}

#[test]
fn key_updates_interoperate_with_rustls_in_both_directions() {
    let ca = JobCa::generate("job", 1).unwrap();
    let s = Arc::new(ctx(&ca, "local-server", 0, 0));
    let c = ctx(&ca, "worker", 0, 0);
    let ccfg = c.client.clone();
    let n = 200_000u32;
    let (got, ()) = pair(
        move |mut t| {
            let mut sess = handshake(&mut t, &s, HandshakeSide::Server, deadline()).unwrap();
            // A KeyUpdate every 2 records: 13 records, 6 updates that rustls must follow.
            sess.sealer.set_update_every(2);
            let big: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
            let mut out = Vec::new();
            sess.sealer.seal(&[&big], &mut out).unwrap();
            assert_eq!(sess.sealer.generation(), 6);
            t.write_all(&out).unwrap();
            let mut buf = vec![0u8; 8192];
            let mut plain = Vec::new();
            while plain.len() < 60_000 {
                let k = t.read(&mut buf).unwrap();
                assert!(k > 0);
                sess.opener.open(&buf[..k], &mut plain).unwrap();
            }
            assert_eq!(
                sess.opener.generation(),
                1,
                "rustls's key update was not followed"
            );
            plain
        },
        move |mut t| {
            let name = rustls::pki_types::ServerName::try_from(JOB_SERVER_NAME).unwrap();
            let mut conn = rustls::ClientConnection::new(ccfg, name).unwrap();
            let data: Vec<u8> = (0..60_000u32).map(|i| (i % 199) as u8).collect();
            rustls::Stream::new(&mut conn, &mut t)
                .write_all(&data[..30_000])
                .unwrap();
            conn.refresh_traffic_keys().unwrap();
            let mut tls = rustls::Stream::new(&mut conn, &mut t);
            tls.write_all(&data[30_000..]).unwrap();
            let mut got = vec![0u8; n as usize];
            tls.read_exact(&mut got).unwrap();
            assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
        },
    );
    let want: Vec<u8> = (0..60_000u32).map(|i| (i % 199) as u8).collect();
    assert_eq!(got, want);
}
