//! The `[data]` types that are pure configuration (defined here so that the configuration does not
//! depend on the data loaders; `crate::data` re-exports them).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Samples in the fixed training split of the embedded UCI digits (validation checks batch sizes
/// against it before anything is loaded).
pub const DIGITS_TRAIN_SAMPLES: usize = 1_437;

/// How samples are assigned to workers (`data.split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShardStrategy {
    /// IID: a seeded shuffle of all samples, cut into equal contiguous shards.
    #[default]
    Iid,
    /// Non-IID: samples sorted by label (stable, so ties keep data-set order), cut into equal
    /// contiguous shards; each worker sees only one or a few classes.
    ByClass,
}

/// Size and seed of a synthetic task (`[data.synthetic]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    /// Features per sample.
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
    /// Training samples.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
    /// Seed of the teacher and the samples.
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            features: 256,
            classes: 10,
            train_samples: 8_192,
            test_samples: 1_024,
            seed: 1,
        }
    }
}

/// `[data.cifar10]`: where the binary batches are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CifarConfig {
    /// Folder holding `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`.
    pub dir: PathBuf,
}
