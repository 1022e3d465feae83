//! Seeded randomness for sampled top-k: the per-(run, tier, DC, key, round) seed and a small,
//! fast generator (SplitMix64 output function over a Weyl sequence).
//!
//! Both are fully specified here so that every process (and the CUDA port) draws the same sample
//! positions: new positions every round, identical positions when a run is replayed.

/// Communication tier of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Worker ↔ local server.
    Intra = 0,
    /// Local server ↔ global server.
    Inter = 1,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 finaliser: a bijective 64-bit mix.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The selection seed `hash(run_seed, tier, dc, key, round)`: each field is absorbed in that order
/// as `h ← mix64(h ⊕ field + GOLDEN)` starting from `h = mix64(run_seed)`.
pub fn selection_seed(run_seed: u64, tier: Tier, dc: u32, key: u64, round: u64) -> u64 {
    let mut h = mix64(run_seed);
    for field in [tier as u64, u64::from(dc), key, round] {
        h = mix64((h ^ field).wrapping_add(GOLDEN));
    }
    h
}

/// SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SampleRng {
    state: u64,
}

impl SampleRng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> SampleRng {
        SampleRng { state: seed }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// A position in `0..n` (`n ≥ 1`) by 64×64 → 128-bit multiply-shift; the bias is at most
    /// n / 2^64.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_per_field() {
        let base = selection_seed(7, Tier::Inter, 1, 2, 3);
        assert_eq!(base, selection_seed(7, Tier::Inter, 1, 2, 3));
        assert_ne!(base, selection_seed(8, Tier::Inter, 1, 2, 3));
        assert_ne!(base, selection_seed(7, Tier::Intra, 1, 2, 3));
        assert_ne!(base, selection_seed(7, Tier::Inter, 2, 2, 3));
        assert_ne!(base, selection_seed(7, Tier::Inter, 1, 3, 3));
        assert_ne!(base, selection_seed(7, Tier::Inter, 1, 2, 4));
        // Swapping two fields changes the seed.
        assert_ne!(base, selection_seed(7, Tier::Inter, 2, 1, 3));
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = SampleRng::new(1);
        let mut hist = [0u32; 10];
        for _ in 0..100_000 {
            let x = r.below(10);
            assert!(x < 10);
            hist[x as usize] += 1;
        }
        // Each bucket expects 10,000 ± ~95 (1 sigma); allow 5 sigma.
        for h in hist {
            assert!((9_500..=10_500).contains(&h), "{hist:?}");
        }
    }
}
