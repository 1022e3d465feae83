//! ps-lite style key-value test: a server sums pushes per key; 2 workers each push 10 keys 50
//! times (integer values in [0, 1000) from a seeded RNG), then pull and check the sums exactly.
//!
//! `cargo run -p geomx-net --example kv_sum [-- auto|io-uring|portable]`

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use geomx_net::{
    DriverKind, Handler, KvClient, KvServer, MsgKind, NetOptions, PayloadCodec, Request, Responder,
};
use rand::{Rng, SeedableRng};

const WORKERS: u32 = 2;
const KEYS: u64 = 10;
const REPEAT: u64 = 50;
const LEN: usize = 1000;

/// Adds every pushed f32 vector into the stored one; a pull returns the store.
#[derive(Default)]
pub struct SumHandler {
    store: Mutex<HashMap<u64, Vec<f32>>>,
}

fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Handler for SumHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        match (req.kind, req.codec) {
            (MsgKind::Push, PayloadCodec::DenseF32) => {
                let vals = to_f32(&req.payload);
                let slot = store
                    .entry(req.key)
                    .or_insert_with(|| vec![0.0; vals.len()]);
                if slot.len() != vals.len() {
                    drop(store);
                    let _ = reply.error("length mismatch");
                    return;
                }
                slot.iter_mut().zip(&vals).for_each(|(s, v)| *s += v);
                drop(store);
                let _ = reply.send(req.version, PayloadCodec::Raw, &[]);
            }
            (MsgKind::Pull, _) => {
                let bytes = store.get(&req.key).map(|v| to_bytes(v)).unwrap_or_default();
                drop(store);
                let _ = reply.send(req.version, PayloadCodec::DenseF32, &bytes);
            }
            _ => {
                drop(store);
                let _ = reply.error("unsupported request");
            }
        }
    }
}

/// The values worker `w` pushes for `key` (the same every repeat).
pub fn worker_values(w: u32, key: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000 * u64::from(w) + key);
    (0..LEN)
        .map(|_| rng.random_range(0..1000u32) as f32)
        .collect()
}

/// Runs the test over loopback with `driver`; returns the total absolute error of all pulls.
pub fn run(driver: DriverKind) -> Result<f64, geomx_net::NetError> {
    let opts = NetOptions {
        driver,
        ..NetOptions::default()
    };
    let server = KvServer::bind("127.0.0.1:0", SumHandler::default(), opts.clone())?;
    let addr = server.local_addr();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let opts = opts.clone();
            std::thread::spawn(move || -> Result<(), geomx_net::NetError> {
                let client = KvClient::connect(addr, 100 + w, opts)?;
                let vals: Vec<Vec<u8>> =
                    (0..KEYS).map(|k| to_bytes(&worker_values(w, k))).collect();
                let mut pending = Vec::new();
                for r in 0..REPEAT {
                    for k in 0..KEYS {
                        let p = client.push(
                            k,
                            r,
                            PayloadCodec::DenseF32,
                            0,
                            LEN as u64,
                            &vals[k as usize],
                        )?;
                        pending.push(p);
                    }
                }
                for p in pending {
                    p.wait(Duration::from_secs(30))?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker thread panicked")?;
    }
    let client = KvClient::connect(addr, 200, opts)?;
    let mut err = 0.0f64;
    for k in 0..KEYS {
        let got = to_f32(
            &client
                .pull(k, 0, 0, LEN as u64)?
                .wait(Duration::from_secs(30))?
                .payload,
        );
        let want: Vec<f64> = (0..LEN)
            .map(|i| {
                (0..WORKERS)
                    .map(|w| f64::from(worker_values(w, k)[i]))
                    .sum::<f64>()
                    * REPEAT as f64
            })
            .collect();
        if got.len() != LEN {
            return Err(geomx_net::NetError::Protocol(format!(
                "key {k}: pulled {} values",
                got.len()
            )));
        }
        err += got
            .iter()
            .zip(&want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .sum::<f64>();
    }
    Ok(err)
}

#[allow(dead_code)]
fn main() {
    let driver = std::env::args()
        .nth(1)
        .map_or(Ok(DriverKind::Auto), |s| s.parse())
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
    match run(driver) {
        Ok(err) => {
            println!(
                "kv_sum: {WORKERS} workers x {KEYS} keys x {REPEAT} pushes, total |error| = {err}"
            );
            if err != 0.0 {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("kv_sum failed: {e}");
            std::process::exit(1);
        }
    }
}
