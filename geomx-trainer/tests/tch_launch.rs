//! `geomx launch` with the libtorch CNN (feature `tch`): 2 data centers train on generated
//! MNIST-format IDX files (gzip) and converge, in fp32 and in mixed precision; every role is its
//! own process on loopback.
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

/// Runs the 2-DC CNN job on generated IDX files with `model.precision = precision`, with P3
/// (slices of 1,024 elements) when `p3`; returns the report after checking that it converged
/// (test accuracy ≥ 0.9) with identical replicas.
fn launch_cnn(precision: &str, overlap: bool, p3: bool) -> serde_json::Value {
    let dir = scratch(&format!("cnn-{precision}-{overlap}-{p3}"));
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
precision = "{}"
overlap = {}

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

[scheduling.p3]
enabled = {}
slice_elems = 1024
"#,
        precision,
        overlap,
        tri.display(),
        trl.display(),
        tei.display(),
        tel.display(),
        p3
    );
    // Several processes share the cores: one libtorch thread each.
    let name = format!("cnn-{precision}-{overlap}-{p3}");
    let r = support::launch_with("tch-test", &name, &config, &[("OMP_NUM_THREADS", "1")]).report;
    let acc = support::accuracy(&r);
    assert!(acc >= 0.9, "{precision}: final test accuracy {acc}");
    assert_eq!(r["rounds"], 40);
    assert!(r["replicas_identical"].as_bool().unwrap());
    assert_eq!(r["config"]["model"]["kind"], "cnn");
    assert_eq!(r["config"]["model"]["precision"], precision);
    // Each step loads the parameters and the batch into libtorch tensors: the report books
    // that as copy, apart from compute, and the parts fit in the round.
    for w in r["workers"].as_array().unwrap() {
        let ms = |k: &str| w[k].as_f64().unwrap();
        assert!(ms("copy_ms") > 0.0 && ms("compute_ms") > 0.0, "{w}");
        let parts: f64 = ["data_ms", "compute_ms", "wait_ms", "apply_ms", "codec_ms"]
            .iter()
            .map(|k| ms(k))
            .sum::<f64>()
            + ms("copy_ms");
        let round_ms = ms("train_seconds") * 1e3 / ms("rounds");
        assert!(parts <= round_ms + 1e-6, "{w}");
    }
    std::fs::remove_dir_all(dir).unwrap();
    r
}

/// The CNN converges, and FSA gives the same model whether the workers push each layer's
/// gradients as the backward pass produces them (`model.overlap`, the default) or after it, and
/// with P3, whose forward pass waits for each layer's slices just before the layer computes.
#[test]
fn two_dc_launch_with_the_tch_cnn_converges_with_and_without_overlap_and_p3() {
    let overlapped = launch_cnn("fp32", true, false);
    let plain = launch_cnn("fp32", false, false);
    let p3 = launch_cnn("fp32", true, true);
    assert_eq!(overlapped["param_hash"], plain["param_hash"]);
    assert_eq!(p3["param_hash"], plain["param_hash"]);
    assert_eq!(overlapped["config"]["model"]["overlap"], true);
    assert_eq!(p3["config"]["scheduling"]["p3"]["enabled"], true);
}

/// bf16 and fp16 with a loss scale train the CNN into the same accuracy band as fp32 (each
/// reaches ≥ 0.9 on the held-out generated images, as the fp32 run above).
#[test]
fn mixed_precision_trains_the_cnn_as_well_as_fp32() {
    for precision in ["bf16", "fp16-amp"] {
        let r = launch_cnn(precision, true, false);
        let loss = r["final_loss"].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite(), "{precision}: final loss {loss}");
    }
}

/// `model.device = "cuda:local"` gives the workers this host's GPUs round robin; on a host
/// without any (here: none listed in CUDA_VISIBLE_DEVICES) the launch fails at once with a
/// message naming the field, before any process starts.
#[test]
fn cuda_local_without_a_gpu_is_a_clear_error() {
    let cfg = support::scratch("tch-test", "cuda-local.toml");
    std::fs::write(
        &cfg,
        "[model]\nkind = \"cnn\"\ndevice = \"cuda:local\"\n[data]\ndataset = \"synthetic\"\n\
         [data.synthetic]\nfeatures = 256\n",
    )
    .unwrap();
    let out = support::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_geomx"))
            .args(["launch", "--quiet"])
            .arg(&cfg)
            .env("CUDA_VISIBLE_DEVICES", ""),
        std::time::Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("model.device") && stderr.contains("has none"),
        "{stderr}"
    );
    assert!(!stderr.contains("started coordinator"), "{stderr}");
    std::fs::remove_file(cfg).unwrap();
}
