//! Seeded, version-stable random helpers shared by data and engine code.
//!
//! Everything here is built on `ChaCha8Rng` raw output plus fixed arithmetic, so a given seed gives
//! the same shuffles, shards and initial parameters on every platform and with every `rand` 0.9.x.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SplitMix64 finaliser: a cheap bijective mixer used to derive independent sub-seeds.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Derives a sub-seed from a base seed and a list of labels (e.g. worker index, epoch).
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed), |acc, &p| {
        mix64(acc ^ mix64(p.wrapping_add(0x5851_F42D_4C95_7F2D)))
    })
}

/// A ChaCha8 generator seeded from `seed` and `parts` (see [`derive_seed`]).
pub fn rng_for(seed: u64, parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(seed, parts))
}

/// Uniform integer in `0..n` (n ≥ 1) by a 64×64→128-bit multiply; the bias is below 2^-40 for
/// any n up to 2^24, far below anything a shuffle of a data set could show.
pub fn below(rng: &mut impl RngCore, n: usize) -> usize {
    debug_assert!(n >= 1);
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// Uniform f64 in [0, 1) with 53 random bits.
pub fn unit_f64(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal sample (Box–Muller, one of the pair).
pub fn normal_f64(rng: &mut impl RngCore) -> f64 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - unit_f64(rng);
    let u2 = unit_f64(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Fisher–Yates shuffle driven by [`below`].
pub fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i + 1);
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<usize> = (0..1000).collect();
        let mut b = a.clone();
        shuffle(&mut a, &mut rng_for(7, &[1]));
        shuffle(&mut b, &mut rng_for(7, &[1]));
        assert_eq!(a, b);
        let mut c: Vec<usize> = (0..1000).collect();
        shuffle(&mut c, &mut rng_for(7, &[2]));
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, sorted);
    }

    #[test]
    fn below_and_unit_ranges_and_normal_moments() {
        let mut rng = rng_for(3, &[]);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[below(&mut rng, 7)] += 1;
        }
        // Each bucket expects 10,000; 5 standard deviations is about 470.
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
        let n = 50_000;
        let xs: Vec<f64> = (0..n).map(|_| normal_f64(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        // Standard errors: mean 0.0045, variance about 0.0063.
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.04, "var {var}");
        assert!((0..1000).all(|_| (0.0..1.0).contains(&unit_f64(&mut rng))));
    }
}
