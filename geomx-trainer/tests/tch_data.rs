//! Loaders for the files users have on disk, read through a `[data]` configuration, feeding the
//! libtorch models (feature `tch`): MNIST-format IDX (gzip or raw) into the CNN, CIFAR-10 binary
//! batches into ResNet-18.
#![cfg(feature = "tch")]

use std::io::Write;
use std::path::PathBuf;

use flate2::{write::GzEncoder, Compression};
use geomx_trainer::config::{Config, DatasetKind, ModelKind};
use geomx_trainer::data::{self, cifar, idx};
use geomx_trainer::engine::build_model;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("geomx-tch-data-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn idx_gzip_and_raw_files_feed_the_cnn() {
    let dir = scratch("idx");
    let pixels: Vec<u8> = (0..6 * 28 * 28).map(|v| (v % 251) as u8).collect();
    let images = idx::encode_u8(&[6, 28, 28], &pixels);
    let labels = idx::encode_u8(&[6], &[0, 1, 2, 9, 4, 5]);
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), gzip(&images)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), &labels).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), gzip(&labels)).unwrap();
    let toml = format!(
        r#"
[model]
kind = "cnn"
[data]
dataset = "idx"
batch_size = 1
[data.idx]
train_images = "{d}/train-images-idx3-ubyte.gz"
train_labels = "{d}/train-labels-idx1-ubyte"
test_images = "{d}/t10k-images-idx3-ubyte"
test_labels = "{d}/t10k-labels-idx1-ubyte.gz"
"#,
        d = dir.display()
    );
    let cfg: Config = toml::from_str(&toml).unwrap();
    cfg.validate().unwrap();
    let tt = data::load(&cfg.data).unwrap();
    assert_eq!(tt.train, tt.test);
    assert_eq!((tt.train.len(), tt.train.n_features()), (6, 784));
    assert_eq!(tt.train.labels(), &[0, 1, 2, 9, 4, 5]);
    // Normalised as torchvision's MNIST example: (x / 255 - 0.1307) / 0.3081.
    let want = ((784 % 251) as f32 / 255.0 - 0.1307) / 0.3081;
    assert!(
        (tt.train.row(1)[0] - want).abs() <= 1e-6,
        "{}",
        tt.train.row(1)[0]
    );

    let m = build_model(&cfg.model, 784, 10).unwrap();
    assert_eq!(m.tensors()[4].shape, vec![256, 512]);
    let p = m.init(cfg.model.seed);
    let (loss, g) = m.loss_and_grad(&p, tt.train.view()).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    assert_eq!(g.len(), 10);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cifar10_batches_feed_resnet18_and_missing_files_are_named() {
    let dir = scratch("cifar");
    let mut toml = format!(
        "[model]\nkind = \"resnet18\"\n[data]\ndataset = \"cifar10\"\nbatch_size = 2\n\
         [data.cifar10]\ndir = \"{}\"\n",
        dir.display()
    );
    let cfg: Config = toml::from_str(&toml).unwrap();
    assert_eq!(cfg.model.kind, ModelKind::Resnet18);
    assert_eq!(cfg.data.dataset, DatasetKind::Cifar10);
    let err = data::load(&cfg.data).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_1.bin") && err.contains("test_batch.bin"),
        "{err}"
    );

    for (b, name) in cifar::TRAIN_FILES.iter().enumerate() {
        let labels = [b as u8, (b + 5) as u8];
        let pixels: Vec<u8> = (0..2 * cifar::FEATURES)
            .map(|i| ((i * (b + 1)) % 256) as u8)
            .collect();
        std::fs::write(dir.join(name), cifar::encode(&labels, &pixels)).unwrap();
    }
    let pixels: Vec<u8> = (0..2 * cifar::FEATURES).map(|i| (i % 200) as u8).collect();
    std::fs::write(dir.join(cifar::TEST_FILE), cifar::encode(&[3, 7], &pixels)).unwrap();
    toml.push_str("[train]\nrounds = 1\n");
    let cfg: Config = toml::from_str(&toml).unwrap();
    let tt = data::load(&cfg.data).unwrap();
    assert_eq!((tt.train.len(), tt.test.len()), (10, 2));
    assert_eq!(tt.train.labels(), &[0, 5, 1, 6, 2, 7, 3, 8, 4, 9]);

    let m = build_model(&cfg.model, tt.train.n_features(), 10).unwrap();
    assert_eq!(m.num_params(), 11_173_962);
    let p = m.init(1);
    let e = m.evaluate(&p, tt.test.view()).unwrap();
    assert_eq!(e.samples, 2);
    assert!(e.loss.is_finite());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_shipped_examples_parse_and_validate() {
    for (text, kind, dataset) in [
        (
            include_str!("../../examples/cnn-mnist.toml"),
            ModelKind::Cnn,
            DatasetKind::Idx,
        ),
        (
            include_str!("../../examples/resnet18-cifar10.toml"),
            ModelKind::Resnet18,
            DatasetKind::Cifar10,
        ),
    ] {
        let cfg: Config = toml::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!((cfg.model.kind, cfg.data.dataset), (kind, dataset));
    }
}
