//! Data sets: the built-in UCI digits, synthetic data, IDX files, CIFAR-10 batches, and sharding.
//!
//! A [`Dataset`] is a dense row-major `f32` feature matrix plus `u32` class labels. Models read a
//! borrowed [`Samples`] view of it. [`load`] builds the train/test pair a configuration names;
//! [`shard_indices`] cuts the training set across workers and [`Batcher`] iterates one worker's shard.

mod batch;
pub mod cifar;
pub mod digits;
pub mod idx;
mod prefetch;
pub mod rng;
mod shard;
mod staged;
pub mod synthetic;
pub mod transform;

use std::path::PathBuf;

pub use batch::Batcher;
pub use prefetch::Prefetcher;
pub use shard::{shard_indices, ShardStrategy};
pub use staged::{Stage, Staged};
pub use transform::{Augment, ImageAugment, Normalize};

use crate::config::{DataConfig, DatasetKind};

/// Errors from loading, validating or slicing data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The embedded digits file could not be decompressed or parsed.
    #[error("digits data, line {line}: {reason}")]
    Digits {
        /// 1-based line of the CSV (0 for decompression errors).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// An IDX file could not be read or is malformed.
    #[error("IDX file {}: {source}", path.display())]
    Idx {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: idx::IdxError,
    },
    /// Two IDX files that must agree (images and labels) do not.
    #[error("IDX files {} and {}: {reason}", images.display(), labels.display())]
    IdxPair {
        /// Images file.
        images: PathBuf,
        /// Labels file.
        labels: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// A CIFAR-10 batch file could not be read or is malformed.
    #[error("CIFAR-10 file {}: {reason}", path.display())]
    Cifar {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Expected files of a data set do not exist.
    #[error(
        "{what}: missing {}",
        missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    MissingFiles {
        /// The data set's description.
        what: &'static str,
        /// Expected files that are absent.
        missing: Vec<PathBuf>,
    },
    /// Buffers that do not form a valid data set.
    #[error("invalid data set: {0}")]
    Shape(String),
    /// A sharding or batching request that cannot be met.
    #[error("cannot split data: {0}")]
    Split(String),
}

/// A borrowed view of `n` samples: `features` is row-major `n × n_features`, `labels` has `n` entries.
#[derive(Debug, Clone, Copy)]
pub struct Samples<'a> {
    /// Row-major features.
    pub features: &'a [f32],
    /// One class label per row.
    pub labels: &'a [u32],
    /// Features per row.
    pub n_features: usize,
    /// The same samples already copied for the model's device by its [`Stage`], if they were.
    pub staged: Option<&'a Staged>,
}

impl Samples<'_> {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// An owned, validated labelled data set.
#[derive(Debug, Clone)]
pub struct Dataset {
    features: Vec<f32>,
    labels: Vec<u32>,
    n_features: usize,
    n_classes: usize,
    /// A model's copy of these samples for its device ([`Dataset::with_staged`]).
    staged: Option<Staged>,
}

/// Data sets are equal when their samples and classes are: a staged copy is the same samples.
impl PartialEq for Dataset {
    fn eq(&self, other: &Dataset) -> bool {
        self.features == other.features
            && self.labels == other.labels
            && self.n_features == other.n_features
            && self.n_classes == other.n_classes
    }
}

impl Dataset {
    /// Builds a data set, checking that `features` has `labels.len() × n_features` finite values and
    /// every label is below `n_classes`.
    pub fn new(
        features: Vec<f32>,
        labels: Vec<u32>,
        n_features: usize,
        n_classes: usize,
    ) -> Result<Self, DataError> {
        if n_features == 0 || n_classes == 0 {
            return Err(DataError::Shape(format!(
                "n_features ({n_features}) and n_classes ({n_classes}) must be >= 1"
            )));
        }
        if labels.len().checked_mul(n_features) != Some(features.len()) {
            return Err(DataError::Shape(format!(
                "{} feature values for {} samples of {} features",
                features.len(),
                labels.len(),
                n_features
            )));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(DataError::Shape(format!(
                "non-finite feature at sample {}, feature {}",
                i / n_features,
                i % n_features
            )));
        }
        if let Some(i) = labels.iter().position(|&l| l as usize >= n_classes) {
            return Err(DataError::Shape(format!(
                "label {} of sample {i} is not below n_classes = {n_classes}",
                labels[i]
            )));
        }
        Ok(Self {
            features,
            labels,
            n_features,
            n_classes,
            staged: None,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per sample.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Number of classes (labels are `0..n_classes`).
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// Row-major features.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// Row-major features, to transform in place (the caller keeps them finite). A staged copy
    /// would no longer match them, so it is dropped.
    pub(crate) fn features_mut(&mut self) -> &mut [f32] {
        self.staged = None;
        &mut self.features
    }

    /// These samples with `staged`, a model's copy of them for its device ([`Stage`]).
    pub fn with_staged(mut self, staged: Staged) -> Dataset {
        self.staged = Some(staged);
        self
    }

    /// The model's copy of these samples for its device, if one was made.
    pub fn staged(&self) -> Option<&Staged> {
        self.staged.as_ref()
    }

    /// Labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The features of sample `i` (panics if `i >= len()`).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.n_features..(i + 1) * self.n_features]
    }

    /// A borrowed view of all samples.
    pub fn view(&self) -> Samples<'_> {
        Samples {
            features: &self.features,
            labels: &self.labels,
            n_features: self.n_features,
            staged: self.staged.as_ref(),
        }
    }

    /// A new data set of the given samples, in the given order (panics on an index out of range:
    /// indices come from this crate's sharding, never from input).
    pub fn gather(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.n_features);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            features,
            labels,
            n_features: self.n_features,
            n_classes: self.n_classes,
            staged: None,
        }
    }
}

/// A training set and a held-out test set with the same feature count and classes.
#[derive(Debug, Clone)]
pub struct TrainTest {
    /// Training samples (sharded across workers).
    pub train: Dataset,
    /// Test samples (evaluation only).
    pub test: Dataset,
}

/// The batcher of global worker `worker` out of `workers`: the training set is sharded with
/// `cfg.split` and `cfg.seed`, and the worker's batches are shuffled per epoch with the same seed.
pub fn batcher_for(
    cfg: &DataConfig,
    train: &Dataset,
    workers: usize,
    worker: usize,
) -> Result<Batcher, DataError> {
    let mut shards = shard_indices(train.labels(), workers, cfg.split, cfg.seed)?;
    if worker >= shards.len() {
        return Err(DataError::Split(format!(
            "worker {worker} of {workers} does not exist"
        )));
    }
    Batcher::new(
        shards.swap_remove(worker),
        cfg.batch_size,
        cfg.seed,
        worker as u64,
    )
}

/// Loads the train/test pair that a `[data]` configuration names, normalised as
/// [`normalizer_for`] says.
pub fn load(cfg: &DataConfig) -> Result<TrainTest, DataError> {
    let mut data = load_raw(cfg)?;
    if let Some(n) = normalizer_for(cfg) {
        for set in [&mut data.train, &mut data.test] {
            let row = set.n_features();
            n.apply(set.features_mut(), row)?;
        }
    }
    Ok(data)
}

/// The per-channel normalisation of a configuration's images: torchvision's customary CIFAR-10
/// and MNIST figures for `cifar10` and `idx` data when `normalize` is on, none otherwise (the
/// digits and synthetic features are used as they are).
pub fn normalizer_for(cfg: &DataConfig) -> Option<Normalize> {
    match cfg.dataset {
        _ if !cfg.normalize => None,
        DatasetKind::Cifar10 => Some(Normalize::cifar10()),
        DatasetKind::Idx => Some(Normalize::mnist()),
        DatasetKind::Digits | DatasetKind::Synthetic => None,
    }
}

/// The training-batch augmentation of global worker `worker`: CIFAR-10's random crop and flip
/// when `augment` is on, seeded by `cfg.seed` and the worker; none for other data sets.
pub fn augment_for(cfg: &DataConfig, worker: usize) -> Result<Option<ImageAugment>, DataError> {
    if !cfg.augment || cfg.dataset != DatasetKind::Cifar10 {
        return Ok(None);
    }
    // Padding is the value a black pixel has after normalisation, as torchvision pads first.
    let fill = normalizer_for(cfg).map_or(vec![0.0; cifar::CHANNELS], |n| n.normalized_zero());
    let seed = rng::derive_seed(cfg.seed, &[AUGMENT_TAG, worker as u64]);
    ImageAugment::new(Augment::cifar10(seed), cifar::CHANNELS, cifar::SIDE, fill).map(Some)
}

/// Label of the augmentation seeds in [`rng::derive_seed`].
const AUGMENT_TAG: u64 = 0x4155_4731;

/// Reads the train/test pair that a `[data]` configuration names, as stored.
fn load_raw(cfg: &DataConfig) -> Result<TrainTest, DataError> {
    match cfg.dataset {
        DatasetKind::Digits => digits::train_test(),
        DatasetKind::Synthetic => synthetic::generate(&cfg.synthetic),
        DatasetKind::Idx => {
            let paths = &cfg.idx;
            let missing: Vec<PathBuf> = [
                &paths.train_images,
                &paths.train_labels,
                &paths.test_images,
                &paths.test_labels,
            ]
            .into_iter()
            .filter(|p| !p.is_file())
            .cloned()
            .collect();
            if !missing.is_empty() {
                return Err(DataError::MissingFiles {
                    what: "MNIST-format IDX files ([data.idx])",
                    missing,
                });
            }
            let train = idx::load_pair(&paths.train_images, &paths.train_labels, paths.classes)?;
            let test = idx::load_pair(&paths.test_images, &paths.test_labels, paths.classes)?;
            if train.n_features() != test.n_features() {
                return Err(DataError::IdxPair {
                    images: paths.train_images.clone(),
                    labels: paths.test_images.clone(),
                    reason: format!(
                        "train images have {} pixels, test images {}",
                        train.n_features(),
                        test.n_features()
                    ),
                });
            }
            Ok(TrainTest { train, test })
        }
        DatasetKind::Cifar10 => cifar::load(&cfg.cifar10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_new_rejects_bad_shapes() {
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1], 3, 2).is_ok());
        assert!(matches!(
            Dataset::new(vec![0.0; 5], vec![0, 1], 3, 2),
            Err(DataError::Shape(_))
        ));
        assert!(matches!(
            Dataset::new(vec![0.0; 6], vec![0, 2], 3, 2),
            Err(DataError::Shape(_))
        ));
        let mut f = vec![0.0; 6];
        f[4] = f32::NAN;
        let err = Dataset::new(f, vec![0, 1], 3, 2).unwrap_err().to_string();
        assert!(err.contains("sample 1, feature 1"), "{err}");
        assert!(Dataset::new(vec![], vec![], 0, 2).is_err());
    }

    #[test]
    fn load_dispatches_on_the_configured_data_set() {
        let mut cfg = DataConfig::default();
        let digits = load(&cfg).unwrap();
        assert_eq!((digits.train.len(), digits.test.len()), (1_437, 360));
        cfg.dataset = DatasetKind::Synthetic;
        cfg.synthetic.features = 12;
        cfg.synthetic.train_samples = 50;
        cfg.synthetic.test_samples = 10;
        let syn = load(&cfg).unwrap();
        assert_eq!((syn.train.len(), syn.test.n_features()), (50, 12));

        let dir = std::env::temp_dir().join(format!("geomx-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tri"), idx::encode_u8(&[2, 2, 2], &[7; 8])).unwrap();
        std::fs::write(dir.join("tei"), idx::encode_u8(&[1, 3, 3], &[9; 9])).unwrap();
        std::fs::write(dir.join("trl"), idx::encode_u8(&[2], &[0, 1])).unwrap();
        std::fs::write(dir.join("tel"), idx::encode_u8(&[1], &[1])).unwrap();
        cfg.dataset = DatasetKind::Idx;
        cfg.idx.train_images = dir.join("tri");
        cfg.idx.train_labels = dir.join("trl");
        cfg.idx.test_images = dir.join("tri");
        cfg.idx.test_labels = dir.join("trl");
        let same = load(&cfg).unwrap();
        assert_eq!(same.train, same.test);
        cfg.idx.test_images = dir.join("tei");
        cfg.idx.test_labels = dir.join("tel");
        let err = load(&cfg).unwrap_err().to_string();
        assert!(err.contains("4 pixels, test images 9"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_idx_files_are_all_named() {
        let dir = std::env::temp_dir().join(format!("geomx-idx-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tri"), idx::encode_u8(&[2, 2, 2], &[7; 8])).unwrap();
        let mut cfg = DataConfig {
            dataset: DatasetKind::Idx,
            ..DataConfig::default()
        };
        cfg.idx.train_images = dir.join("tri");
        cfg.idx.train_labels = dir.join("train-labels-idx1-ubyte.gz");
        cfg.idx.test_images = dir.join("tri");
        cfg.idx.test_labels = dir.join("t10k-labels-idx1-ubyte");
        let err = load(&cfg).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::MissingFiles { ref missing, .. } if missing.len() == 2));
        assert!(
            msg.contains("train-labels-idx1-ubyte.gz") && msg.contains("t10k-labels-idx1-ubyte"),
            "{msg}"
        );
        assert!(!msg.contains("tri,") && !msg.ends_with("tri"), "{msg}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// CIFAR-10 and IDX images are normalised (when on) and only CIFAR-10 training batches are
    /// augmented, with a padding value that is a black pixel after normalisation and a seed per
    /// worker.
    #[test]
    fn normalisation_and_augmentation_follow_the_config() {
        let mut cfg = DataConfig::default();
        assert!(normalizer_for(&cfg).is_none());
        assert!(augment_for(&cfg, 0).unwrap().is_none());
        cfg.dataset = DatasetKind::Idx;
        assert_eq!(normalizer_for(&cfg), Some(Normalize::mnist()));
        assert!(augment_for(&cfg, 0).unwrap().is_none());
        cfg.dataset = DatasetKind::Cifar10;
        assert_eq!(normalizer_for(&cfg), Some(Normalize::cifar10()));
        let a = augment_for(&cfg, 0).unwrap().unwrap();
        assert_ne!(a, augment_for(&cfg, 1).unwrap().unwrap());
        assert_eq!(a, augment_for(&cfg, 0).unwrap().unwrap());
        // A black image stays black: every padded pixel equals the normalised zero.
        let black = Normalize::cifar10().normalized_zero();
        let mut batch = Dataset::new(
            black
                .iter()
                .flat_map(|&v| vec![v; 1024])
                .cycle()
                .take(3 * cifar::FEATURES)
                .collect(),
            vec![0, 1, 2],
            cifar::FEATURES,
            10,
        )
        .unwrap();
        let before = batch.clone();
        a.apply(&mut batch, 5).unwrap();
        assert_eq!(batch, before);
        cfg.normalize = false;
        cfg.augment = false;
        assert!(normalizer_for(&cfg).is_none());
        assert!(augment_for(&cfg, 0).unwrap().is_none());
    }

    /// `load` normalises IDX images with MNIST's mean and standard deviation.
    #[test]
    fn idx_images_are_loaded_normalised() {
        let dir = std::env::temp_dir().join(format!("geomx-idx-norm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("im"),
            idx::encode_u8(&[2, 2, 2], &[0, 51, 102, 255, 7, 8, 9, 10]),
        )
        .unwrap();
        std::fs::write(dir.join("lb"), idx::encode_u8(&[2], &[0, 1])).unwrap();
        let mut cfg = DataConfig {
            dataset: DatasetKind::Idx,
            ..DataConfig::default()
        };
        cfg.idx.classes = 2;
        for p in [&mut cfg.idx.train_images, &mut cfg.idx.test_images] {
            *p = dir.join("im");
        }
        for p in [&mut cfg.idx.train_labels, &mut cfg.idx.test_labels] {
            *p = dir.join("lb");
        }
        let tt = load(&cfg).unwrap();
        for (got, px) in tt
            .test
            .features()
            .iter()
            .zip([0u8, 51, 102, 255, 7, 8, 9, 10])
        {
            let want = (f64::from(px) / 255.0 - 0.1307) / 0.3081;
            assert!((f64::from(*got) - want).abs() <= 1e-6, "{got} vs {want}");
        }
        cfg.normalize = false;
        assert_eq!(load(&cfg).unwrap().train.features()[3], 1.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn batcher_for_uses_the_worker_shard() {
        let d = Dataset::new((0..40).map(|v| v as f32).collect(), vec![0; 40], 1, 1).unwrap();
        let cfg = DataConfig {
            batch_size: 5,
            ..DataConfig::default()
        };
        let shards = shard_indices(d.labels(), 4, cfg.split, cfg.seed).unwrap();
        let mut b = batcher_for(&cfg, &d, 4, 2).unwrap();
        assert_eq!(b.batches_per_epoch(), 2);
        let mut seen: Vec<usize> = b.next_indices().to_vec();
        seen.extend_from_slice(b.next_indices());
        seen.sort_unstable();
        let mut want = shards[2].clone();
        want.sort_unstable();
        assert_eq!(seen, want);
        assert!(batcher_for(&cfg, &d, 4, 4).is_err());
    }

    #[test]
    fn gather_copies_rows_in_order() {
        let d = Dataset::new((0..12).map(|v| v as f32).collect(), vec![0, 1, 2, 0], 3, 3).unwrap();
        let g = d.gather(&[3, 1]);
        assert_eq!(g.features(), &[9.0, 10.0, 11.0, 3.0, 4.0, 5.0]);
        assert_eq!(g.labels(), &[0, 1]);
        assert_eq!(g.view().len(), 2);
    }
}
