//! Transport measurements: goodput of push + pull against a raw-TCP baseline measured in the same
//! run, and pipelined small-push rate. `summary` is what `geomx bench net` prints; the criterion
//! bench (`benches/benches/net.rs`) uses the same building blocks.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geomx_net::tls::{
    Identity, JobCa, Opener, RecordAead, RecordKey, Sealer, Security, TlsContext,
};
use geomx_net::{
    DriverKind, Handler, KvClient, KvServer, MsgKind, NetOptions, PayloadCodec, Request, Responder,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// What `summary` measures.
#[derive(Debug, Clone)]
pub struct SummaryOptions {
    /// Payload sizes for the goodput comparison.
    pub sizes: Vec<usize>,
    /// Bytes moved per measurement (per size; at least 4 round trips).
    pub bytes_per_measurement: usize,
    /// At most this many round trips per measurement (bounds the small sizes' run time).
    pub max_round_trips: usize,
    /// Measurements per (size, transport), interleaved; the best is reported.
    pub repeats: usize,
    /// Pushes in the pipelined-rate measurement.
    pub pipelined_pushes: usize,
    /// Requests kept in flight in the pipelined measurement.
    pub window: usize,
    /// Plaintext bytes through the record layer per AEAD in the per-core measurement.
    pub aead_bytes: usize,
}

impl Default for SummaryOptions {
    /// The full run: 4 KiB, 1 MiB, 64 MiB; about 20-40 s on 2 cores.
    fn default() -> Self {
        SummaryOptions {
            sizes: vec![4 << 10, 1 << 20, 64 << 20],
            bytes_per_measurement: 256 << 20,
            max_round_trips: 10_000,
            repeats: 5,
            pipelined_pushes: 100_000,
            window: 256,
            aead_bytes: 256 << 20,
        }
    }
}

impl SummaryOptions {
    /// A small run for smoke tests (well under a second of transfers).
    pub fn quick() -> Self {
        SummaryOptions {
            sizes: vec![4 << 10, 1 << 20],
            bytes_per_measurement: 8 << 20,
            max_round_trips: 500,
            repeats: 1,
            pipelined_pushes: 5_000,
            window: 64,
            aead_bytes: 4 << 20,
        }
    }
}

/// A server that keeps the last pushed payload per key and returns it on pull (recycling replaced
/// payload buffers, as embedders are meant to).
#[derive(Default)]
pub struct StoreHandler {
    store: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
}

impl Handler for StoreHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        match req.kind {
            MsgKind::Push => {
                let v = req.version;
                let old = self
                    .store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(req.key, req.payload);
                if let Some(old) = old {
                    geomx_net::bufpool::recycle(old);
                }
                let _ = reply.send(v, PayloadCodec::Raw, &[]);
            }
            MsgKind::Pull => {
                let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
                let empty = Vec::new();
                let data = store.get(&req.key).unwrap_or(&empty);
                let _ = reply.send(req.version, PayloadCodec::Raw, data);
            }
            _ => {
                let _ = reply.error("unsupported");
            }
        }
    }
}

/// A loopback server + client pair on one driver.
pub struct KvPair {
    /// The server (kept alive).
    pub server: KvServer,
    /// The connected client.
    pub client: KvClient,
}

impl KvPair {
    /// Starts a [`StoreHandler`] server and connects a client, both on `driver`.
    pub fn new(driver: DriverKind) -> Result<KvPair, geomx_net::NetError> {
        Self::with_options(NetOptions {
            driver,
            ..NetOptions::default()
        })
    }

    /// Like [`KvPair::new`] with explicit options.
    pub fn with_options(opts: NetOptions) -> Result<KvPair, geomx_net::NetError> {
        Self::with_server_client(opts.clone(), opts)
    }

    /// With the server's and the client's own options (e.g. their certificates).
    pub fn with_server_client(
        server: NetOptions,
        client: NetOptions,
    ) -> Result<KvPair, geomx_net::NetError> {
        let server = KvServer::bind("127.0.0.1:0", StoreHandler::default(), server)?;
        let client = KvClient::connect(server.local_addr(), 1, client)?;
        Ok(KvPair { server, client })
    }

    /// One push of `payload` then one pull of it back (recycling the pulled buffer); returns the
    /// pulled length.
    pub fn push_pull(&self, payload: &[u8]) -> Result<usize, geomx_net::NetError> {
        self.client
            .push(0, 0, PayloadCodec::Raw, 0, 0, payload)?
            .wait(WAIT)?;
        let payload = self.client.pull(0, 0, 0, 0)?.wait(WAIT)?.payload;
        let n = payload.len();
        geomx_net::bufpool::recycle(payload);
        Ok(n)
    }

    /// `n` pushes of `payload` with up to `window` in flight; returns pushes per second.
    pub fn pipelined(
        &self,
        payload: &[u8],
        n: usize,
        window: usize,
    ) -> Result<f64, geomx_net::NetError> {
        let t0 = Instant::now();
        let mut inflight = std::collections::VecDeque::with_capacity(window);
        for i in 0..n {
            if inflight.len() >= window {
                let p: geomx_net::Pending = inflight.pop_front().expect("non-empty");
                p.wait(WAIT)?;
            }
            inflight.push_back(self.client.push(
                i as u64 % 64,
                0,
                PayloadCodec::Raw,
                0,
                0,
                payload,
            )?);
        }
        for p in inflight {
            p.wait(WAIT)?;
        }
        Ok(n as f64 / t0.elapsed().as_secs_f64())
    }
}

/// How the raw-TCP baseline moves the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// The same exchange as push + pull, without framing: the client writes the payload, the
    /// server answers an 8-byte ack; the client writes an 8-byte request, the server writes the
    /// payload back. Two round trips, like ours.
    PushPull,
    /// Plain echo: the client writes the payload, the server writes it back. One round trip.
    Echo,
}

/// Raw baseline: plain blocking TCP between the caller and one server thread, buffers reused.
pub struct RawPair {
    stream: TcpStream,
    mode: RawMode,
    buf: Vec<u8>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RawPair {
    /// Starts the server thread for payloads of `size` bytes.
    pub fn new(size: usize, mode: RawMode) -> std::io::Result<RawPair> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let thread = std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; size];
            let mut small = [0u8; 8];
            loop {
                let ok = match mode {
                    RawMode::Echo => s.read_exact(&mut buf).and_then(|_| s.write_all(&buf)),
                    RawMode::PushPull => s
                        .read_exact(&mut buf)
                        .and_then(|_| s.write_all(&small))
                        .and_then(|_| s.read_exact(&mut small))
                        .and_then(|_| s.write_all(&buf)),
                };
                if ok.is_err() {
                    return;
                }
            }
        });
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(RawPair {
            stream,
            mode,
            buf: vec![0u8; size],
            thread: Some(thread),
        })
    }

    /// Moves `payload` (of the pair's size) to the server and back.
    pub fn round_trip(&mut self, payload: &[u8]) -> std::io::Result<()> {
        debug_assert_eq!(payload.len(), self.buf.len());
        self.stream.write_all(payload)?;
        if self.mode == RawMode::PushPull {
            let mut small = [0u8; 8];
            self.stream.read_exact(&mut small)?;
            self.stream.write_all(&small)?;
        }
        self.stream.read_exact(&mut self.buf)
    }
}

impl Drop for RawPair {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Goodput in MB/s (10^6 bytes) of `rounds` round trips each moving `2 * size` bytes.
fn goodput(size: usize, rounds: usize, secs: f64) -> f64 {
    (2 * size * rounds) as f64 / secs / 1e6
}

/// The same options under mutual TLS: server and client certificates of one in-memory job CA.
fn with_mtls(o: &NetOptions, ca: &JobCa, role: &str) -> Option<NetOptions> {
    let creds = ca.issue(&Identity::new(role, 0, 0).ok()?).ok()?;
    let ctx = Arc::new(TlsContext::new(&creds).ok()?);
    Some(NetOptions {
        security: Security::Mtls(ctx),
        ..o.clone()
    })
}

/// The transports compared: portable, io_uring, and io_uring with `SEND_ZC` disabled (to measure
/// what zero copy costs or gains here), each plaintext and (`-mtls`) encrypted.
fn variants() -> Vec<(String, NetOptions, NetOptions)> {
    let plain = plain_variants();
    let Ok(ca) = JobCa::generate("bench", 1) else {
        return plain.into_iter().map(|(n, o)| (n, o.clone(), o)).collect();
    };
    let mut v = Vec::new();
    for (n, o) in plain {
        let tls = with_mtls(&o, &ca, "local_server").zip(with_mtls(&o, &ca, "worker"));
        v.push((n.clone(), o.clone(), o));
        if let Some((s, c)) = tls {
            v.push((format!("{n}-mtls"), s, c));
        }
    }
    v
}

fn plain_variants() -> Vec<(String, NetOptions)> {
    let base = NetOptions::default();
    let mut v = vec![(
        "portable".to_string(),
        NetOptions {
            driver: DriverKind::Portable,
            ..base.clone()
        },
    )];
    if geomx_net::uring_unavailable_reason().is_none() {
        v.push((
            "io-uring".into(),
            NetOptions {
                driver: DriverKind::IoUring,
                ..base.clone()
            },
        ));
        v.push((
            "io-uring-nozc".into(),
            NetOptions {
                driver: DriverKind::IoUring,
                zerocopy_threshold: usize::MAX,
                ..base.clone()
            },
        ));
    }
    v
}

/// Runs every measurement once in this process and returns the figures as JSON:
/// goodput (MB/s) of raw TCP and of push + pull per driver and size, ratios ours / raw, and
/// pipelined 4 KiB pushes per second per driver.
pub fn summary(opts: &SummaryOptions) -> Value {
    let pairs: Vec<(String, KvPair)> = variants()
        .into_iter()
        .filter_map(|(n, s, c)| KvPair::with_server_client(s, c).ok().map(|p| (n, p)))
        .collect();
    let mut rows = Vec::new();
    for &size in &opts.sizes {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let rounds = (opts.bytes_per_measurement / (2 * size)).clamp(4, opts.max_round_trips);
        let mut raws = Vec::new();
        for mode in [RawMode::PushPull, RawMode::Echo] {
            match RawPair::new(size, mode) {
                Ok(r) => raws.push(r),
                Err(e) => return json!({ "error": format!("raw baseline: {e}") }),
            }
        }
        let mut best_raw = [0.0f64; 2];
        let mut best: Vec<f64> = vec![0.0; pairs.len()];
        // Warm-up, then interleave raw and ours so drift hits both alike.
        for r in &mut raws {
            let _ = r.round_trip(&payload);
        }
        for (_, p) in &pairs {
            let _ = p.push_pull(&payload);
        }
        for _ in 0..opts.repeats.max(1) {
            for (j, r) in raws.iter_mut().enumerate() {
                let t0 = Instant::now();
                let ok = (0..rounds).all(|_| r.round_trip(&payload).is_ok());
                if ok {
                    best_raw[j] =
                        best_raw[j].max(goodput(size, rounds, t0.elapsed().as_secs_f64()));
                }
            }
            for (i, (_, p)) in pairs.iter().enumerate() {
                let t0 = Instant::now();
                let ok =
                    (0..rounds).all(|_| p.push_pull(&payload).map(|n| n == size).unwrap_or(false));
                if ok {
                    best[i] = best[i].max(goodput(size, rounds, t0.elapsed().as_secs_f64()));
                }
            }
        }
        let mut row = json!({
            "payload_bytes": size,
            "round_trips": rounds,
            "raw_tcp_MBps": round2(best_raw[0]),
            "raw_tcp_echo_MBps": round2(best_raw[1]),
        });
        for (i, (d, _)) in pairs.iter().enumerate() {
            row[format!("{d}_MBps")] = json!(round2(best[i]));
            row[format!("{d}_ratio")] = json!(round3(best[i] / best_raw[0].max(1e-9)));
            row[format!("{d}_ratio_vs_echo")] = json!(round3(best[i] / best_raw[1].max(1e-9)));
            // Encrypted / plaintext of the same driver, measured in the same run.
            if let Some(plain) = d.strip_suffix("-mtls") {
                if let Some(j) = pairs.iter().position(|(n, _)| n == plain) {
                    row[format!("{d}_vs_plaintext")] = json!(round3(best[i] / best[j].max(1e-9)));
                }
            }
        }
        rows.push(row);
    }
    let small = vec![7u8; 4 << 10];
    let mut pipelined = serde_json::Map::new();
    for (d, p) in &pairs {
        let mut best = 0.0f64;
        for _ in 0..opts.repeats.max(1) {
            if let Ok(r) = p.pipelined(&small, opts.pipelined_pushes, opts.window) {
                best = best.max(r);
            }
        }
        pipelined.insert(d.clone(), json!(best.round()));
    }
    let counters: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(d, p)| {
            let c = p.client.stats();
            (
                d.clone(),
                json!({ "bytes_sent": c.bytes_sent, "bytes_recv": c.bytes_recv, "frames_sent": c.frames_sent,
                        "frames_recv": c.frames_recv, "zerocopy_sent": c.zerocopy_sent, "zerocopy_copied": c.zerocopy_copied }),
            )
        })
        .collect();
    json!({
        "what": "loopback goodput (MB/s, payload bytes both ways) of push+pull per driver, plaintext and mutual TLS (-mtls; _vs_plaintext = encrypted / plaintext of the same driver), vs raw blocking TCP doing the same exchange (raw_tcp: payload, 8-byte ack, 8-byte request, payload) and a plain echo (raw_tcp_echo); ratio = ours / raw_tcp; best of `repeats` interleaved runs; pipelined 4 KiB pushes per second; one core's seal and open throughput per AEAD beside openssl speed",
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
        "io_uring": geomx_net::uring_unavailable_reason().map_or(json!("available"), |r| json!(r)),
        "goodput": rows,
        "pipelined_4KiB_pushes_per_s": pipelined,
        "window": opts.window,
        "client_counters": counters,
        "aead_per_core_MBps": aead_per_core(opts.aead_bytes),
        "openssl_speed_16KiB_MBps": openssl_speed(),
        "targets": { "ratio_for_1MiB_and_up": 0.9, "pipelined_4KiB_pushes_per_s": 100000, "mtls_vs_plaintext_1MiB_and_up": 0.5 },
    })
}

/// Sealing plus opening throughput of one core through geomx's record layer, in MB/s of
/// plaintext, per AEAD: `bytes` through 16 KiB records, best of 3.
fn aead_per_core(bytes: usize) -> Value {
    let data = vec![0x5au8; 1 << 20];
    let mut out = serde_json::Map::new();
    for (name, alg) in [
        ("aes_256_gcm", RecordAead::Aes256Gcm),
        ("chacha20_poly1305", RecordAead::ChaCha20Poly1305),
    ] {
        let mut best_seal = 0.0f64;
        let mut best_open = 0.0f64;
        for _ in 0..3 {
            let key = |iv| RecordKey::with_key(alg, &[7; 32], iv);
            let (Ok(tx), Ok(rx)) = (key([1; 12]), key([1; 12])) else {
                continue;
            };
            let (mut s, mut o) = (Sealer::new(tx), Opener::new(rx));
            let (mut sealed, mut plain) = (Vec::new(), Vec::new());
            let reps = (bytes / data.len()).max(1);
            let (mut t_seal, mut t_open) = (0.0, 0.0);
            for _ in 0..reps {
                sealed.clear();
                plain.clear();
                let t0 = Instant::now();
                if s.seal(&[&data], &mut sealed).is_err() {
                    break;
                }
                t_seal += t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                if o.open(&sealed, &mut plain).is_err() {
                    break;
                }
                t_open += t1.elapsed().as_secs_f64();
            }
            let mb = (reps * data.len()) as f64 / 1e6;
            best_seal = best_seal.max(mb / t_seal.max(1e-9));
            best_open = best_open.max(mb / t_open.max(1e-9));
        }
        out.insert(
            name.into(),
            json!({ "seal": round2(best_seal), "open": round2(best_open) }),
        );
    }
    out.insert(
        "aes_hardware".into(),
        json!(geomx_net::tls::has_aes_hardware()),
    );
    Value::Object(out)
}

/// `openssl speed -evp aes-256-gcm` in this run (16 KiB blocks, MB/s), or why not.
fn openssl_speed() -> Value {
    let out = std::process::Command::new("openssl")
        .args([
            "speed",
            "-seconds",
            "1",
            "-bytes",
            "16384",
            "-evp",
            "aes-256-gcm",
        ])
        .output();
    let Ok(out) = out else {
        return json!("openssl not installed");
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "AES-256-GCM   <k bytes per second>k".
    let v = text.lines().rev().find_map(|l| {
        l.split_whitespace()
            .last()?
            .strip_suffix('k')?
            .parse::<f64>()
            .ok()
    });
    match v {
        Some(kb) => json!(round2(kb * 1000.0 / 1e6)),
        None => json!(format!("unparsed output: {}", text.trim())),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_summary_has_every_figure() {
        let v = summary(&SummaryOptions::quick());
        let rows = v["goodput"].as_array().expect("rows");
        assert_eq!(rows.len(), 2);
        for r in rows {
            assert!(r["raw_tcp_MBps"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["portable_MBps"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["portable-mtls_MBps"].as_f64().unwrap() > 0.0, "{r}");
            assert!(
                r["portable-mtls_vs_plaintext"].as_f64().unwrap() > 0.0,
                "{r}"
            );
        }
        assert!(
            v["pipelined_4KiB_pushes_per_s"]["portable"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn raw_pair_echoes() {
        for mode in [RawMode::PushPull, RawMode::Echo] {
            let mut r = RawPair::new(1000, mode).unwrap();
            r.round_trip(&[3u8; 1000]).unwrap();
            assert_eq!(r.buf, vec![3u8; 1000]);
        }
    }
}
