//! Nothing from outside the job can end it: a default-shaped launch on loopback while strangers
//! connect to every server port (coordinator, global server, both local servers) and send forged
//! frames — Pulls and Pushes of unknown keys, malformed pushes, Hellos that borrow a member's node
//! id and then disconnect, TSEngine requests, bytes that are no frame at all. The job must finish
//! with the same parameters as an undisturbed run.
//!
//! * With `security.mode = "off"` the frames reach the servers, which must refuse (and count)
//!   them.
//! * With mutual TLS (the default) a stranger never gets past the handshake, on any port; a
//!   member's certificate presented for the wrong role or data center is refused too.
//! * A packet capture of a default launch holds no frame magic; with `"off"` it does.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use geomx_net::wire::{self, Frame, FrameHeader, MsgKind, PayloadCodec};
use serde_json::Value;

mod support;

use support::GEOMX;

/// `n` distinct loopback ports that were free a moment ago, below the ephemeral range (so
/// that no outgoing connection takes one before the launch binds it).
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let p = geomx_net::port::free_loopback_port().unwrap();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

/// The job: 2 DCs × 2 workers, one global server, fixed addresses so the strangers know them;
/// `security` is the job file's `[security]` table.
fn config_with(ports: &[u16], security: &str) -> String {
    config(ports) + "[security]\n" + security
}

/// The job every test here attacks. Its emulated compute (10 ms per layer forward, twice that
/// backward: 40 rounds take at least 2.4 s whatever the machine) keeps it running while the
/// attackers act: on a fast machine the job alone took 0.4 s and could end before an intruder's
/// request reached a server.
fn config(ports: &[u16]) -> String {
    format!(
        "[cluster]\nglobal_servers = 1\ncoordinator = \"127.0.0.1:{}\"\n\
         global_server_addrs = [\"127.0.0.1:{}\"]\n\
         [[cluster.data_centers]]\nname = \"dc0\"\nworkers = 2\nlocal_server = \"127.0.0.1:{}\"\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 2\nlocal_server = \"127.0.0.1:{}\"\n\
         [train]\nrounds = 40\neval_every = 20\n\
         [model]\nlayer_delay_ms = [10.0, 10.0]\n",
        ports[0], ports[1], ports[2], ports[3]
    )
}

fn launch(config: &Path, report: &Path) -> Output {
    let mut cmd = Command::new(GEOMX);
    cmd.arg("launch")
        .arg("--quiet")
        .arg("--report")
        .arg(report)
        .arg(config);
    support::output_within(&mut cmd, support::LAUNCH_LIMIT)
}

fn run_job(name: &str, toml: &str) -> (Output, PathBuf) {
    let cfg = support::scratch("security", &format!("{name}.toml"));
    std::fs::write(&cfg, toml).unwrap();
    let report = support::scratch("security", &format!("{name}.json"));
    (launch(&cfg, &report), report)
}

fn frame(kind: MsgKind, sender: u32, request_id: u64, key: u64, payload: Vec<u8>) -> Vec<u8> {
    let mut h = FrameHeader::new(kind);
    h.sender = sender;
    h.request_id = request_id;
    h.key = key;
    h.version = 1;
    h.codec = PayloadCodec::DenseF32;
    wire::encode(&Frame::new(h, payload))
}

/// One stranger session as node `id`: a Hello, then (unless `hello_only`) requests no member
/// would send — unknown keys, a push whose payload is not a whole number of f32 — and a close.
fn session(addr: SocketAddr, id: u32, hello_only: bool, garbage: bool) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if garbage {
        return s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok();
    }
    let mut bytes = frame(MsgKind::Hello, id, 0, 0, Vec::new());
    if !hello_only {
        bytes.extend(frame(MsgKind::Pull, id, 1, 1 << 40, Vec::new()));
        bytes.extend(frame(MsgKind::Push, id, 2, 1 << 40, vec![0; 8]));
        bytes.extend(frame(MsgKind::Push, id, 3, 0, vec![1, 2, 3]));
        bytes.extend(frame(MsgKind::Pull, id, 4, u64::MAX, Vec::new()));
        // TSEngine's requests (keys 2^64 - 32 + op), which this job does not run.
        for (op, payload) in [
            (0u64, vec![0]),
            (1, vec![0; 12]),
            (3, vec![0]),
            (4, vec![0; 4]),
        ] {
            bytes.extend(frame(
                MsgKind::Push,
                id,
                5 + op,
                u64::MAX - 32 + op,
                payload,
            ));
        }
    }
    s.write_all(&bytes).is_ok()
}

/// Sends stranger sessions to `addr` until `stop`, counting the ones that got through.
fn stranger(addr: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let mut i: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        // Ids 1..=12 cover every member of this job; 999 and 0 are none.
        let id = match i % 14 {
            12 => 999,
            13 => 0,
            k => k + 1,
        };
        if session(addr, id, i % 3 == 1, i % 7 == 6) {
            sent.fetch_add(1, Ordering::Relaxed);
        }
        i = i.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn report(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "launch failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the job behind `ports` with `security` while strangers attack every port; returns the
/// report and how many stranger sessions got their bytes out.
fn attacked(name: &str, ports: &[u16], security: &str) -> (Value, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = ports
        .iter()
        .map(|&p| {
            let (stop, sent) = (stop.clone(), sent.clone());
            let addr = SocketAddr::from(([127, 0, 0, 1], p));
            std::thread::spawn(move || stranger(addr, stop, sent))
        })
        .collect();
    let (out, rep) = run_job(name, &config_with(ports, security));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_ok(&out);
    (report(&rep), sent.load(Ordering::Relaxed))
}

fn refused(r: &Value) -> u64 {
    r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["refused_requests"].as_u64().unwrap_or(0))
        .sum()
}

fn assert_same_result(r: &Value, base: &Value) {
    assert_eq!(r["rounds"], base["rounds"]);
    assert_eq!(
        r["param_hash"], base["param_hash"],
        "the strangers changed the result"
    );
    assert_eq!(r["global_param_hash"], base["global_param_hash"]);
    assert!(r["replicas_identical"].as_bool().unwrap());
}

#[test]
fn with_mutual_tls_strangers_never_get_past_the_handshake() {
    let (out, base) = run_job("tls-baseline", &config(&free_ports(4)));
    assert_ok(&out);
    let base = report(&base);
    let (r, sent) = attacked("tls-attacked", &free_ports(4), "mode = \"mtls\"\n");
    assert!(sent > 0, "no stranger session got its bytes out");
    assert_eq!(refused(&r), 0, "a stranger's frame reached a handler: {r}");
    assert_same_result(&r, &base);
}

#[test]
fn forged_frames_from_strangers_never_end_the_job() {
    let off = "mode = \"off\"\n";
    let (out, base) = run_job("baseline", &config_with(&free_ports(4), off));
    assert_ok(&out);
    let base = report(&base);

    let (r, sent) = attacked("attacked", &free_ports(4), off);
    assert!(sent > 0, "no stranger session got through");
    assert!(refused(&r) > 0, "no forged request was refused: {r}");
    assert_same_result(&r, &base);
}

/// A job member's client under `dir`'s certificate for (`role`, `dc`, `rank`).
fn member_client(
    dir: &Path,
    role: &str,
    dc: u32,
    rank: u32,
    addr: SocketAddr,
) -> Result<geomx_net::KvClient, geomx_net::NetError> {
    use geomx_net::tls::{Credentials, Identity, Security, TlsContext};
    let id = Identity::new(role, dc, rank).unwrap();
    let stem = geomx_trainer::security::file_stem(&id);
    let creds = Credentials::read(
        &dir.join("ca.pem"),
        &dir.join(format!("{stem}.pem")),
        &dir.join(format!("{stem}.key")),
    )
    .unwrap();
    let opts = geomx_net::NetOptions {
        security: Security::Mtls(Arc::new(TlsContext::new(&creds).unwrap())),
        connect_timeout: Duration::from_secs(2),
        ..geomx_net::NetOptions::default()
    };
    geomx_net::KvClient::connect(addr, 999, opts)
}

#[test]
fn a_members_certificate_is_refused_for_another_role_or_data_center() {
    use geomx_trainer::config::Config;
    let dir = support::scratch("security", "pki");
    let _ = std::fs::remove_dir_all(&dir);
    let ports = free_ports(4);
    let sec = format!("dir = {:?}\n", dir.display().to_string());
    let toml = config_with(&ports, &sec);
    let cfg = Config::from_toml_str(&toml).unwrap();
    let ca = geomx_net::tls::JobCa::generate("test", 1).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    ca.write(&dir).unwrap();
    let ids = geomx_trainer::security::config_identities(&cfg);
    geomx_trainer::security::issue_identities(&ca, &ids, &dir).unwrap();

    let (out, base) = run_job("pki-baseline", &toml);
    assert_ok(&out);
    let base = report(&base);

    // During a second run: worker dc1 rank 0's certificate pushes and pulls at dc0's local
    // server, a local server's at the global server as if it were dc1's, and worker dc1's
    // registers at the coordinator as worker dc0 rank 0.
    let ports2 = free_ports(4);
    let toml2 = config_with(&ports2, &sec);
    let stop = Arc::new(AtomicBool::new(false));
    let refusals = Arc::new(AtomicU64::new(0));
    let (d2, s2, r2) = (dir.clone(), stop.clone(), refusals.clone());
    let intruder = std::thread::spawn(move || {
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        while !s2.load(Ordering::Relaxed) {
            let tries = [
                (("worker", 1, 0), at(ports2[2])),
                (("local_server", 0, 0), at(ports2[3])),
                (("worker", 0, 1), at(ports2[1])),
            ];
            for ((role, dc, rank), addr) in tries {
                let Ok(c) = member_client(&d2, role, dc, rank, addr) else {
                    continue;
                };
                let push = c.push(0, 1, PayloadCodec::DenseF32, 0, 2, &[0u8; 8]);
                let pull = c.pull(1 << 40, 0, 0, 1);
                for p in [push, pull].into_iter().flatten() {
                    if let Err(geomx_net::NetError::Remote(_)) = p.wait(Duration::from_secs(10)) {
                        r2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Registration under another identity.
            let hello = geomx_net::coord::Hello {
                role: "worker".into(),
                dc: 0,
                rank: 0,
                listen_addr: String::new(),
                protocol_version: geomx_net::coord::PROTOCOL_VERSION,
                config_hash: 0,
                reattach: None,
            };
            if let Ok(c) = member_client(&d2, "worker", 1, 0, at(ports2[0])) {
                let p = c.request(FrameHeader::new(MsgKind::Register), &hello.encode());
                if let Ok(Err(geomx_net::NetError::Remote(m))) =
                    p.map(|p| p.wait(Duration::from_secs(10)))
                {
                    assert!(m.contains("may not register as worker dc 0 rank 0"), "{m}");
                    r2.fetch_add(1, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (out, rep) = run_job("pki-attacked", &toml2);
    stop.store(true, Ordering::Relaxed);
    intruder.join().unwrap();
    assert_ok(&out);
    let r = report(&rep);
    assert!(
        refusals.load(Ordering::Relaxed) > 0,
        "no wrong-role request was answered with a refusal"
    );
    assert!(refused(&r) > 0, "the servers counted no refusal: {r}");
    assert_same_result(&r, &base);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_capture_of_a_default_launch_holds_no_frame_magic() {
    let magic = b"GMXF".to_vec();
    // A DGT block's header: magic 0x4758 (little-endian), version, kind 48.
    let [m0, m1] = geomx_net::dgt::DGT_MAGIC.to_le_bytes();
    let dgt = vec![m0, m1, geomx_net::dgt::DGT_VERSION, 48];
    let run = |name: &str, security: &str| {
        let cap = match support::capture::Capture::start(vec![magic.clone(), dgt.clone()]) {
            Ok(c) => c,
            Err(why) => {
                eprintln!("capture test skipped: {why}");
                return None;
            }
        };
        // The WAN tier over DGT, so that its reliable channel and its datagrams are captured too.
        let toml = config_with(&free_ports(4), security) + "[transport]\ninter = \"dgt\"\n";
        let (out, _) = run_job(name, &toml);
        let seen = cap.stop();
        assert_ok(&out);
        Some(seen)
    };
    let Some(tls) = run("capture-tls", "mode = \"mtls\"\n") else {
        return;
    };
    let plain = run("capture-off", "mode = \"off\"\n").unwrap();
    eprintln!("captured: mtls {tls:?}, off {plain:?}");
    assert!(tls.packets > 100, "the capture saw almost nothing: {tls:?}");
    assert_eq!(
        tls.hits[0], 0,
        "a GMXF frame header crossed lo in the clear"
    );
    assert!(
        plain.hits[0] > 100,
        "the capture misses plaintext frames: {plain:?}"
    );
    assert_eq!(tls.hits[1], 0, "a DGT block header crossed lo in the clear");
    assert!(
        plain.hits[1] > 100,
        "the capture misses plaintext DGT blocks: {plain:?}"
    );
}

/// An on-path attacker on `lo` during a DGT launch: every 4th UDP datagram it sees is sent again
/// (a replay) and once more with one byte of its authenticated header flipped (tampered), from
/// its own socket, to the port it was sent to. The global server must count and drop both kinds, and the job must complete
/// with replicas that agree.
#[test]
fn replayed_and_tampered_dgt_datagrams_are_counted_dropped_and_training_completes() {
    let attacker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let own = attacker.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let s2 = sent.clone();
    let mut seen = 0u64;
    let cap = support::capture::Capture::start_with(Vec::new(), move |pkt| {
        // lo's link header (14 bytes), then IPv4 carrying UDP.
        let Some(ip) = pkt.get(14..) else { return };
        if ip.len() < 28 || ip[0] >> 4 != 4 || ip[9] != 17 {
            return;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(udp) = ip.get(ihl..) else { return };
        if udp.len() <= 8 {
            return;
        }
        let (sport, dport) = (
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
        );
        if sport == own {
            return;
        }
        // Every 4th datagram, so the job is not flooded.
        seen += 1;
        if seen % 4 != 0 {
            return;
        }
        let payload = &udp[8..];
        let to = SocketAddr::from(([127, 0, 0, 1], dport));
        // Tampered: the sequence number in the clear prefix (sender u32, sequence u64) changed,
        // so it is no replay and must fail authentication. (A copy of a seen datagram with its
        // body changed is refused as a replay before any decryption.)
        let mut tampered = payload.to_vec();
        tampered[4] ^= 0x80;
        if attacker.send_to(payload, to).is_ok() && attacker.send_to(&tampered, to).is_ok() {
            s2.fetch_add(1, Ordering::Relaxed);
        }
    });
    let cap = match cap {
        Ok(c) => c,
        Err(why) => {
            eprintln!("datagram attack test skipped: {why}");
            return;
        }
    };
    // Small blocks, most of them on the unreliable channels, so that many datagrams cross lo.
    let toml = config(&free_ports(4))
        + "[transport]\ninter = \"dgt\"\n[transport.dgt]\nk = 0.2\nblock_bytes = 512\n";
    let (out, rep) = run_job("dgt-replay", &toml);
    let _ = cap.stop();
    assert_ok(&out);
    let r = report(&rep);
    assert!(sent.load(Ordering::Relaxed) > 0, "no datagram was replayed");
    assert!(r["replicas_identical"].as_bool().unwrap(), "{r}");
    let count = |field: &str| -> u64 {
        r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["dgt"][field].as_u64())
            .sum()
    };
    let (replayed, forged) = (count("datagrams_replayed"), count("datagrams_forged"));
    eprintln!(
        "attacker sent {} pairs; the receiver counted {replayed} replayed, {forged} forged",
        sent.load(Ordering::Relaxed)
    );
    assert!(replayed > 0, "no replay was counted: {r}");
    assert!(forged > 0, "no tampered datagram was counted: {r}");
}
