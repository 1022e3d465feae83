//! `geomx launch` with the libtorch CNN (feature `tch`): 2 data centers train on generated
//! MNIST-format IDX files (gzip) and converge; every role is its own process on loopback.
#![cfg(feature = "tch")]

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::{write::GzEncoder, Compression};
use geomx_trainer::data::idx::encode_u8;

mod support;

fn scratch(name: &str) -> PathBuf {
    support::scratch("tch-test", name)
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
    // Several processes share the cores: one libtorch thread each.
    let r = support::launch_with("tch-test", "cnn", &config, &[("OMP_NUM_THREADS", "1")]).report;
    let acc = support::accuracy(&r);
    assert!(acc >= 0.9, "final test accuracy {acc}");
    assert_eq!(r["rounds"], 40);
    assert!(r["replicas_identical"].as_bool().unwrap());
    assert_eq!(r["config"]["model"]["kind"], "cnn");
    std::fs::remove_dir_all(dir).unwrap();
}
