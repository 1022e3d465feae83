//! CIFAR-10 in its binary distribution (`cifar-10-batches-bin/`): `data_batch_1.bin` …
//! `data_batch_5.bin` (training) and `test_batch.bin`. Each file is a sequence of 3,073-byte
//! records: the label byte (0–9), then 1,024 red, 1,024 green and 1,024 blue pixels of a 32×32
//! image, rows outermost.
//!
//! Samples become 3,072 features in the same channel-major (C × H × W) order, scaled to [0, 1],
//! which is the layout the libtorch models read.

use std::path::{Path, PathBuf};

pub use crate::config::CifarConfig;

use super::{DataError, Dataset, TrainTest};

/// Image side in pixels.
pub const SIDE: usize = 32;
/// Colour channels.
pub const CHANNELS: usize = 3;
/// Features per sample (3 × 32 × 32).
pub const FEATURES: usize = CHANNELS * SIDE * SIDE;
/// Bytes per record: the label and the pixels.
pub const RECORD: usize = 1 + FEATURES;
/// Number of classes.
pub const CLASSES: usize = 10;
/// The training files, in load order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test file.
pub const TEST_FILE: &str = "test_batch.bin";

/// Decodes the records of one batch file.
pub fn decode(bytes: &[u8], path: &Path) -> Result<(Vec<f32>, Vec<u32>), DataError> {
    let bad = |reason: String| DataError::Cifar {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(bad(format!(
            "{} bytes is not a positive multiple of the {RECORD}-byte record",
            bytes.len()
        )));
    }
    let n = bytes.len() / RECORD;
    let mut features = Vec::with_capacity(n * FEATURES);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] as usize >= CLASSES {
            return Err(bad(format!(
                "record {i} has label {}, not below {CLASSES}",
                rec[0]
            )));
        }
        labels.push(u32::from(rec[0]));
        features.extend(rec[1..].iter().map(|&p| f32::from(p) / 255.0));
    }
    Ok((features, labels))
}

/// Encodes samples as a batch file (used by tests and tools that write small CIFAR files).
/// `pixels` holds `labels.len() × 3072` bytes in channel-major order.
pub fn encode(labels: &[u8], pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(labels.len() * RECORD);
    for (label, img) in labels.iter().zip(pixels.chunks_exact(FEATURES)) {
        out.push(*label);
        out.extend_from_slice(img);
    }
    out
}

fn load_files(dir: &Path, names: &[&str]) -> Result<Dataset, DataError> {
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for name in names {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| DataError::Cifar {
            path: path.clone(),
            reason: format!("read failed: {e}"),
        })?;
        let (f, l) = decode(&bytes, &path)?;
        features.extend(f);
        labels.extend(l);
    }
    Dataset::new(features, labels, FEATURES, CLASSES)
}

/// Loads the five training batches and the test batch from `cfg.dir`. When files are missing,
/// the error lists every expected file that is absent.
pub fn load(cfg: &CifarConfig) -> Result<TrainTest, DataError> {
    let missing: Vec<PathBuf> = TRAIN_FILES
        .iter()
        .chain([&TEST_FILE])
        .map(|name| cfg.dir.join(name))
        .filter(|p| !p.is_file())
        .collect();
    if !missing.is_empty() {
        return Err(DataError::MissingFiles {
            what: "CIFAR-10 binary batches (cifar-10-batches-bin)",
            missing,
        });
    }
    Ok(TrainTest {
        train: load_files(&cfg.dir, &TRAIN_FILES)?,
        test: load_files(&cfg.dir, &[TEST_FILE])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("geomx-cifar-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Image `i` of a generated file: pixel `j` is `(7·i + j) mod 256`.
    fn pixels(first: usize, n: usize) -> Vec<u8> {
        (first..first + n)
            .flat_map(|i| (0..FEATURES).map(move |j| ((7 * i + j) % 256) as u8))
            .collect()
    }

    #[test]
    fn loads_generated_batches_in_file_order() {
        let dir = temp_dir("ok");
        for (b, name) in TRAIN_FILES.iter().enumerate() {
            let labels = [b as u8, 9 - b as u8];
            std::fs::write(dir.join(name), encode(&labels, &pixels(2 * b, 2))).unwrap();
        }
        std::fs::write(dir.join(TEST_FILE), encode(&[3], &pixels(100, 1))).unwrap();
        let tt = load(&CifarConfig { dir: dir.clone() }).unwrap();
        assert_eq!((tt.train.len(), tt.test.len()), (10, 1));
        assert_eq!(tt.train.n_features(), 3_072);
        assert_eq!(tt.train.labels(), &[0, 9, 1, 8, 2, 7, 3, 6, 4, 5]);
        assert_eq!(tt.test.labels(), &[3]);
        // Sample 3 (file 2, record 1): pixel j = (21 + j) mod 256; the green plane starts at 1024.
        let row = tt.train.row(3);
        assert_eq!(row[0], 21.0 / 255.0);
        assert_eq!(row[1024], ((21 + 1024) % 256) as f32 / 255.0);
        assert_eq!(row[3071], ((21 + 3071) % 256) as f32 / 255.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = temp_dir("bad");
        std::fs::write(dir.join("data_batch_1.bin"), encode(&[1], &pixels(0, 1))).unwrap();
        let err = load(&CifarConfig { dir: dir.clone() })
            .unwrap_err()
            .to_string();
        for name in ["data_batch_2.bin", "data_batch_5.bin", "test_batch.bin"] {
            assert!(err.contains(name), "{err}");
        }
        assert!(!err.contains("data_batch_1.bin"), "{err}");

        let short = decode(&[0; RECORD + 5], Path::new("x.bin"))
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("x.bin") && short.contains("3078 bytes"),
            "{short}"
        );
        let mut rec = encode(&[0], &pixels(0, 1));
        rec[0] = 10;
        let label = decode(&rec, Path::new("y.bin")).unwrap_err().to_string();
        assert!(label.contains("record 0 has label 10"), "{label}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
