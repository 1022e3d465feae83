//! The UCI 8×8 optical handwritten digits (1,797 samples, 64 features in 0..16, 10 classes), embedded
//! in the binary from scikit-learn's `digits.csv.gz` (see `geomx-trainer/data/README.md` for its
//! origin and licence).
//!
//! Features are scaled to [0, 1] (divided by 16). The train/test split is fixed: a shuffle of the
//! sample indices seeded with [`SPLIT_SEED`], first [`TRAIN_SAMPLES`] for training, the other
//! [`TEST_SAMPLES`] for testing.

use std::io::Read;

use flate2::read::GzDecoder;

use super::{rng, DataError, Dataset, TrainTest};

/// The gzipped CSV: one sample per line, 64 integer pixels then the label.
static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// Number of samples in the file.
pub const SAMPLES: usize = 1_797;
/// Features per sample (8 × 8 pixels).
pub const FEATURES: usize = 64;
/// Number of classes (digits 0..9).
pub const CLASSES: usize = 10;
/// Samples in the fixed training split.
pub const TRAIN_SAMPLES: usize = crate::config::DIGITS_TRAIN_SAMPLES;
/// Samples in the fixed test split.
pub const TEST_SAMPLES: usize = SAMPLES - TRAIN_SAMPLES;
/// Seed of the fixed train/test shuffle.
pub const SPLIT_SEED: u64 = 0x6765_6f6d_7864; // "geomxd"

/// All 1,797 samples in file order, features scaled to [0, 1].
pub fn all() -> Result<Dataset, DataError> {
    let mut text = String::new();
    GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| DataError::Digits {
            line: 0,
            reason: format!("gzip: {e}"),
        })?;
    parse_csv(&text)
}

/// The fixed split: [`TRAIN_SAMPLES`] training and [`TEST_SAMPLES`] test samples.
pub fn train_test() -> Result<TrainTest, DataError> {
    let all = all()?;
    let mut order: Vec<usize> = (0..all.len()).collect();
    rng::shuffle(&mut order, &mut rng::rng_for(SPLIT_SEED, &[]));
    let (train, test) = order.split_at(TRAIN_SAMPLES);
    Ok(TrainTest {
        train: all.gather(train),
        test: all.gather(test),
    })
}

fn parse_csv(text: &str) -> Result<Dataset, DataError> {
    let mut features = Vec::with_capacity(SAMPLES * FEATURES);
    let mut labels = Vec::with_capacity(SAMPLES);
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let err = |reason: String| DataError::Digits {
            line: i + 1,
            reason,
        };
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != FEATURES + 1 {
            return Err(err(format!(
                "{} fields, expected {}",
                fields.len(),
                FEATURES + 1
            )));
        }
        for (j, f) in fields.iter().enumerate() {
            let v: u32 = f
                .trim()
                .parse()
                .map_err(|_| err(format!("field {}: {f:?} is not an integer", j + 1)))?;
            if j < FEATURES {
                if v > 16 {
                    return Err(err(format!("pixel {} = {v} is above 16", j + 1)));
                }
                features.push(v as f32 / 16.0);
            } else {
                if v as usize >= CLASSES {
                    return Err(err(format!("label {v} is not a digit")));
                }
                labels.push(v);
            }
        }
    }
    if labels.len() != SAMPLES {
        return Err(DataError::Digits {
            line: labels.len(),
            reason: format!("{} samples, expected {SAMPLES}", labels.len()),
        });
    }
    Dataset::new(features, labels, FEATURES, CLASSES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_digits_decode_with_known_shape_and_class_counts() {
        let d = all().unwrap();
        assert_eq!((d.len(), d.n_features(), d.n_classes()), (SAMPLES, 64, 10));
        let mut counts = [0usize; 10];
        for &l in d.labels() {
            counts[l as usize] += 1;
        }
        // Class counts of the UCI digits as scikit-learn ships them.
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        assert!(d.features().iter().all(|&v| (0.0..=1.0).contains(&v)));
        // First sample of the file is a 0 whose first row is "0,0,5,13,9,1,0,0".
        assert_eq!(d.labels()[0], 0);
        assert_eq!(
            &d.row(0)[..8],
            &[
                0.0,
                0.0,
                5.0 / 16.0,
                13.0 / 16.0,
                9.0 / 16.0,
                1.0 / 16.0,
                0.0,
                0.0
            ]
        );
    }

    #[test]
    fn split_is_fixed_and_disjoint() {
        let a = train_test().unwrap();
        let b = train_test().unwrap();
        assert_eq!(a.train, b.train);
        assert_eq!((a.train.len(), a.test.len()), (TRAIN_SAMPLES, TEST_SAMPLES));
        // Every test row differs from the training rows it might duplicate only by identity:
        // check that the multiset of labels adds up to the whole file.
        let all = all().unwrap();
        let mut counts = [0i64; 10];
        for &l in all.labels() {
            counts[l as usize] += 1;
        }
        for &l in a.train.labels().iter().chain(a.test.labels()) {
            counts[l as usize] -= 1;
        }
        assert_eq!(counts, [0; 10]);
        // The test set holds every class.
        assert!((0..10u32).all(|c| a.test.labels().contains(&c)));
    }

    #[test]
    fn malformed_csv_is_reported_with_line() {
        let mut line = vec!["0"; 64];
        line.push("3");
        let good = line.join(",");
        let bad = format!("{good}\n{}\n", good.replacen("0", "17", 1));
        let err = parse_csv(&bad).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("above 16"), "{err}");
        let err = parse_csv("1,2,3\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("3 fields"), "{err}");
    }
}
