//! A seeded synthetic classification task of any size, for benchmarks that need big models.
//!
//! A random linear *teacher* `T` (`classes × features`, entries N(0, 1)) labels inputs drawn
//! uniformly from [-1, 1]^features: `label = argmax_c (T x)_c`. The classes are linearly separable, so
//! an MLP can learn them; train and test samples come from the same teacher.

pub use crate::config::SyntheticSpec;

use super::{rng, DataError, Dataset, TrainTest};

/// Generates the train/test pair of `spec`.
pub fn generate(spec: &SyntheticSpec) -> Result<TrainTest, DataError> {
    if spec.features == 0 || spec.classes < 2 || spec.train_samples == 0 || spec.test_samples == 0 {
        return Err(DataError::Shape(format!(
            "synthetic data needs features >= 1, classes >= 2 and samples >= 1, got {spec:?}"
        )));
    }
    let mut teacher_rng = rng::rng_for(spec.seed, &[0]);
    let teacher: Vec<f64> = (0..spec.classes * spec.features)
        .map(|_| rng::normal_f64(&mut teacher_rng))
        .collect();
    let make = |n: usize, stream: u64| {
        let mut r = rng::rng_for(spec.seed, &[stream]);
        let mut features = Vec::with_capacity(n * spec.features);
        let mut labels = Vec::with_capacity(n);
        let mut x = vec![0f64; spec.features];
        for _ in 0..n {
            for v in x.iter_mut() {
                *v = 2.0 * rng::unit_f64(&mut r) - 1.0;
            }
            let mut best = (0usize, f64::NEG_INFINITY);
            for c in 0..spec.classes {
                let row = &teacher[c * spec.features..(c + 1) * spec.features];
                let score: f64 = row.iter().zip(&x).map(|(t, v)| t * v).sum();
                if score > best.1 {
                    best = (c, score);
                }
            }
            features.extend(x.iter().map(|&v| v as f32));
            labels.push(best.0 as u32);
        }
        Dataset::new(features, labels, spec.features, spec.classes)
    };
    Ok(TrainTest {
        train: make(spec.train_samples, 1)?,
        test: make(spec.test_samples, 2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_shapes_and_all_classes_present() {
        let spec = SyntheticSpec {
            features: 20,
            classes: 4,
            train_samples: 400,
            test_samples: 100,
            seed: 9,
        };
        let a = generate(&spec).unwrap();
        let b = generate(&spec).unwrap();
        assert_eq!(a.train, b.train);
        assert_eq!(a.test, b.test);
        assert_eq!(
            (a.train.len(), a.train.n_features(), a.train.n_classes()),
            (400, 20, 4)
        );
        assert_ne!(a.train.row(0), a.test.row(0));
        let mut counts = [0usize; 4];
        for &l in a.train.labels() {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c >= 40), "{counts:?}");
        let other = generate(&SyntheticSpec {
            seed: 10,
            ..spec.clone()
        })
        .unwrap();
        assert_ne!(other.train, a.train);
        assert!(generate(&SyntheticSpec { classes: 1, ..spec }).is_err());
    }
}
