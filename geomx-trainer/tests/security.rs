//! Nothing from outside the job can end it: a default-shaped launch on loopback while strangers
//! connect to every server port (coordinator, global server, both local servers) and send forged
//! frames — Pulls and Pushes of unknown keys, malformed pushes, Hellos that borrow a member's node
//! id and then disconnect, bytes that are no frame at all. The job must finish with the same
//! parameters as an undisturbed run, and the servers must have refused (and counted) the frames.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use geomx_net::wire::{self, Frame, FrameHeader, MsgKind, PayloadCodec};
use serde_json::Value;

mod support;

use support::GEOMX;

/// `n` loopback ports that were free a moment ago (the OS picks them; the listeners are closed
/// before the launch binds them).
fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// The job: 2 DCs × 2 workers, one global server, fixed addresses so the strangers know them.
fn config(ports: &[u16]) -> String {
    format!(
        "[cluster]\nglobal_servers = 1\ncoordinator = \"127.0.0.1:{}\"\n\
         global_server_addrs = [\"127.0.0.1:{}\"]\n\
         [[cluster.data_centers]]\nname = \"dc0\"\nworkers = 2\nlocal_server = \"127.0.0.1:{}\"\n\
         [[cluster.data_centers]]\nname = \"dc1\"\nworkers = 2\nlocal_server = \"127.0.0.1:{}\"\n\
         [train]\nrounds = 40\neval_every = 20\n",
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

#[test]
fn forged_frames_from_strangers_never_end_the_job() {
    let (out, base) = run_job("baseline", &config(&free_ports(4)));
    assert_ok(&out);
    let base = report(&base);

    let ports = free_ports(4);
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
    let (out, attacked) = run_job("attacked", &config(&ports));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_ok(&out);
    let r = report(&attacked);
    assert!(
        sent.load(Ordering::Relaxed) > 0,
        "no stranger session got through"
    );
    let refused: u64 = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["refused_requests"].as_u64().unwrap_or(0))
        .sum();
    assert!(refused > 0, "no forged request was refused: {r}");
    assert_eq!(r["rounds"], base["rounds"]);
    assert_eq!(
        r["param_hash"], base["param_hash"],
        "the strangers changed the result"
    );
    assert_eq!(r["global_param_hash"], base["global_param_hash"]);
    assert!(r["replicas_identical"].as_bool().unwrap());
}
