//! `geomx launch` with the libtorch CNN (feature `tch`): 2 data centers train on generated
//! MNIST-format IDX files (gzip) and converge; every role is its own process on loopback.
#![cfg(feature = "tch")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::{write::GzEncoder, Compression};
use geomx_trainer::data::idx::encode_u8;
use serde_json::Value;

const GEOMX: &str = env!("CARGO_BIN_EXE_geomx");

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("geomx-tch-test-{}-{name}", std::process::id()))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// `n` 16×16 images whose label (0..4) is the position of a bright horizontal band, plus
/// deterministic noise; written as gzip IDX images and labels under `dir/prefix-*`.
fn write_band_idx(dir: &Path, prefix: &str, n: usize, seed: u32) -> (PathBuf, PathBuf) {
    let side = 16usize;
    let mut pixels = Vec::with_capacity(n * side * side);
    let mut labels = Vec::with_capacity(n);
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    for i in 0..n {
        let c = i % 4;
        for row in 0..side {
            for _col in 0..side {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let noise = (s % 80) as u8;
                let band = if row / 4 == c { 170 } else { 0 };
                pixels.push(noise + band);
            }
        }
        labels.push(c as u8);
    }
    let images = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labs = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    std::fs::write(
        &images,
        gzip(&encode_u8(&[n as u32, side as u32, side as u32], &pixels)),
    )
    .unwrap();
    std::fs::write(&labs, gzip(&encode_u8(&[n as u32], &labels))).unwrap();
    (images, labs)
}

#[test]
fn two_dc_launch_with_the_tch_cnn_converges() {
    let dir = scratch("cnn");
    std::fs::create_dir_all(&dir).unwrap();
    let (tri, trl) = write_band_idx(&dir, "train", 256, 1);
    let (tei, tel) = write_band_idx(&dir, "t10k", 64, 2);
    let config = format!(
        r#"
[cluster]
data_centers = 2
workers_per_dc = 1

[model]
kind = "cnn"
device = "cpu"
seed = 3

[data]
dataset = "idx"
batch_size = 16

[data.idx]
train_images = "{}"
train_labels = "{}"
test_images = "{}"
test_labels = "{}"
classes = 4

[train]
rounds = 40
eval_every = 20

[train.optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
"#,
        tri.display(),
        trl.display(),
        tei.display(),
        tel.display()
    );
    let cfg = dir.join("cnn.toml");
    std::fs::write(&cfg, config).unwrap();
    let report = dir.join("report.json");
    let out = Command::new(GEOMX)
        .args(["launch", "--quiet", "--report"])
        .arg(&report)
        .arg(&cfg)
        // Several processes share the cores: one libtorch thread each.
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "launch failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let acc = r["final_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "final test accuracy {acc}");
    assert_eq!(r["rounds"], 40);
    assert!(r["replicas_identical"].as_bool().unwrap());
    assert_eq!(r["config"]["model"]["kind"], "cnn");
    std::fs::remove_dir_all(dir).unwrap();
}
