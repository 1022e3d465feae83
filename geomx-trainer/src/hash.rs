//! FNV-1a hashing: the configuration hash and the replica check's parameter hash.

/// 64-bit FNV-1a hash of parameter tensors (key order, little-endian f32 bits, each tensor preceded
/// by its length): the replica check of hips.md compares these.
pub fn params_hash(params: &[Vec<f32>]) -> u64 {
    let mut h = Fnv1a::new();
    for t in params {
        write_tensor(&mut h, t);
    }
    h.finish()
}

/// [`params_hash`] of one tensor: a global server's digest of a range's θ.
pub fn values_hash(values: &[f32]) -> u64 {
    let mut h = Fnv1a::new();
    write_tensor(&mut h, values);
    h.finish()
}

fn write_tensor(h: &mut Fnv1a, t: &[f32]) {
    h.write(&(t.len() as u64).to_le_bytes());
    for v in t {
        h.write(&v.to_bits().to_le_bytes());
    }
}

/// Incremental 64-bit FNV-1a.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Fnv1a {
    /// A hasher at the FNV offset basis.
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// Feeds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_vectors() {
        // Published FNV-1a 64 test vectors.
        let h = |s: &str| {
            let mut f = Fnv1a::new();
            f.write(s.as_bytes());
            f.finish()
        };
        assert_eq!(h(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(h("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(h("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn params_hash_sees_every_bit_and_the_split() {
        let a = vec![vec![1.0f32, 2.0], vec![3.0]];
        let b = vec![vec![1.0f32], vec![2.0, 3.0]];
        let c = vec![
            vec![1.0f32, 2.0],
            vec![f32::from_bits(3.0f32.to_bits() + 1)],
        ];
        assert_ne!(params_hash(&a), params_hash(&b));
        assert_ne!(params_hash(&a), params_hash(&c));
        assert_eq!(params_hash(&a), params_hash(&a.clone()));
    }
}
