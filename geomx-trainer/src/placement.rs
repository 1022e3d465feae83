//! MultiGPS key placement across global servers (hips.md, "Keys, ranges and placement").
//!
//! The placement is a pure function of (tensor sizes in key order, number of servers S, split bound
//! B_max, minimum range), so every process computes the same table:
//!
//! 1. Bound B = clamp(⌊total_elements / (11·S)⌋, min_range, B_max).
//! 2. A tensor of n > B elements becomes m = ⌈n/B⌉ ranges whose sizes differ by at most one element
//!    (the first n mod m ranges get the extra element); others are one range.
//! 3. Ranges are sorted by (bytes descending, key ascending, range index ascending).
//! 4. Each range goes to the server with the fewest bytes so far (ties: lowest server index).

/// Default split bound B_max in elements (`MXNET_KVSTORE_BIGARRAY_BOUND`).
pub const DEFAULT_BOUND_MAX: usize = 1_000_000;
/// Default minimum range size in elements.
pub const DEFAULT_MIN_RANGE: usize = 4096;
/// Bytes per parameter element (f32).
pub const ELEM_BYTES: u64 = 4;

/// Errors from [`Placement::compute`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// S = 0.
    #[error("placement needs at least one global server")]
    NoServers,
    /// min_range is 0 or larger than B_max.
    #[error("invalid split bounds: min_range {min_range} must be in 1..=bound_max {bound_max}")]
    BadBounds {
        /// Configured minimum range.
        min_range: usize,
        /// Configured B_max.
        bound_max: usize,
    },
    /// A range would not fit the u32 element count of the wire format.
    #[error("range of {0} elements does not fit in u32")]
    RangeTooLarge(usize),
}

/// One contiguous element range of a key: the unit of ownership on the global tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    /// The key (tensor index in the model).
    pub key: usize,
    /// Index of this range within its key (0-based, in offset order).
    pub index: usize,
    /// First element of the range inside the key's tensor.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Global server that owns the range.
    pub server: usize,
}

impl Range {
    /// Size of the range in bytes (f32 elements).
    pub fn bytes(&self) -> u64 {
        self.len as u64 * ELEM_BYTES
    }
}

/// The placement table: every range of every key and its owning server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Split bound B actually used (after clamping).
    pub bound: usize,
    /// True when B was raised to min_range (the 1.10 balance guarantee then does not apply).
    pub clamped_up: bool,
    /// Ranges in (key, index) order.
    pub ranges: Vec<Range>,
    /// Bytes of parameters owned by each server.
    pub server_bytes: Vec<u64>,
    /// For each key, the indices into `ranges` of its ranges (in offset order).
    key_ranges: Vec<std::ops::Range<usize>>,
}

impl Placement {
    /// Computes the size-balanced placement of tensors with `sizes` elements (key order) on
    /// `servers` global servers.
    pub fn compute(
        sizes: &[usize],
        servers: usize,
        bound_max: usize,
        min_range: usize,
    ) -> Result<Self, PlacementError> {
        if servers == 0 {
            return Err(PlacementError::NoServers);
        }
        if min_range == 0 || min_range > bound_max {
            return Err(PlacementError::BadBounds {
                min_range,
                bound_max,
            });
        }
        let total: usize = sizes.iter().sum();
        let raw = total / (11 * servers);
        let bound = raw.clamp(min_range, bound_max);
        let clamped_up = raw < min_range;

        let mut ranges = Vec::new();
        let mut key_ranges = Vec::with_capacity(sizes.len());
        for (key, &n) in sizes.iter().enumerate() {
            let start = ranges.len();
            let m = if n > bound { n.div_ceil(bound) } else { 1 };
            let (base, extra) = (n / m, n % m);
            let mut offset = 0;
            for index in 0..m {
                let len = base + usize::from(index < extra);
                if u32::try_from(len).is_err() {
                    return Err(PlacementError::RangeTooLarge(len));
                }
                ranges.push(Range {
                    key,
                    index,
                    offset,
                    len,
                    server: 0,
                });
                offset += len;
            }
            key_ranges.push(start..ranges.len());
        }

        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (&ranges[a], &ranges[b]);
            rb.len
                .cmp(&ra.len)
                .then(ra.key.cmp(&rb.key))
                .then(ra.index.cmp(&rb.index))
        });
        let mut server_bytes = vec![0u64; servers];
        for i in order {
            let target = server_bytes
                .iter()
                .enumerate()
                .min_by_key(|&(s, &b)| (b, s))
                .map(|(s, _)| s)
                .unwrap_or(0);
            ranges[i].server = target;
            server_bytes[target] += ranges[i].bytes();
        }
        Ok(Self {
            bound,
            clamped_up,
            ranges,
            server_bytes,
            key_ranges,
        })
    }

    /// Number of keys.
    pub fn num_keys(&self) -> usize {
        self.key_ranges.len()
    }

    /// Number of global servers.
    pub fn num_servers(&self) -> usize {
        self.server_bytes.len()
    }

    /// The ranges of `key` in offset order (empty for an unknown key).
    pub fn key_ranges(&self, key: usize) -> &[Range] {
        match self.key_ranges.get(key) {
            Some(r) => &self.ranges[r.clone()],
            None => &[],
        }
    }

    /// Global range id (index into `ranges`) of range `index` of `key`.
    pub fn range_id(&self, key: usize, index: usize) -> Option<usize> {
        let r = self.key_ranges.get(key)?;
        (index < r.len()).then(|| r.start + index)
    }

    /// The ranges owned by `server`, in (key, index) order.
    pub fn server_ranges(&self, server: usize) -> impl Iterator<Item = &Range> {
        self.ranges.iter().filter(move |r| r.server == server)
    }

    /// 64-bit FNV-1a hash of the table (part of the configuration hash).
    pub fn hash(&self) -> u64 {
        let mut h = crate::engine::Fnv1a::new();
        h.write(&(self.bound as u64).to_le_bytes());
        for r in &self.ranges {
            for v in [r.key, r.index, r.offset, r.len, r.server] {
                h.write(&(v as u64).to_le_bytes());
            }
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loads(p: &Placement) -> (u64, u64) {
        let max = *p.server_bytes.iter().max().unwrap();
        let min = *p.server_bytes.iter().min().unwrap();
        (max, min)
    }

    #[test]
    fn spec_example_two_servers_differ_by_at_most_one_range() {
        let sizes = [1_000_000, 500_000, 500_000, 10];
        let p = Placement::compute(&sizes, 2, DEFAULT_BOUND_MAX, DEFAULT_MIN_RANGE).unwrap();
        // total 2_000_010 / 22 = 90_909 → B = 90_909; 10^6 → 11 ranges, 5·10^5 → 6 ranges.
        assert_eq!(p.bound, 90_909);
        assert_eq!(p.key_ranges(0).len(), 12);
        assert_eq!(p.key_ranges(1).len(), 6);
        assert_eq!(p.key_ranges(3).len(), 1);
        let largest = p.ranges.iter().map(Range::bytes).max().unwrap();
        let (max, min) = loads(&p);
        assert!(max - min <= largest, "{max} - {min} > {largest}");
        assert_eq!(p.server_bytes.iter().sum::<u64>(), 2_000_010 * 4);
    }

    #[test]
    fn split_sizes_differ_by_at_most_one_and_extra_goes_first() {
        // total 10_003 on 1 server → B = ⌊10_003 / 11⌋ = 909 (above min_range 100).
        let p = Placement::compute(&[10_003], 1, 1_000_000, 100).unwrap();
        let r = p.key_ranges(0);
        assert_eq!(r.len(), 10_003usize.div_ceil(909));
        let lens: Vec<usize> = r.iter().map(|r| r.len).collect();
        let extra = 10_003 % r.len();
        for (i, &l) in lens.iter().enumerate() {
            assert_eq!(l, 10_003 / r.len() + usize::from(i < extra));
        }
    }

    #[test]
    fn small_models_are_clamped_and_not_split() {
        let p = Placement::compute(
            &[2048, 32, 320, 10],
            2,
            DEFAULT_BOUND_MAX,
            DEFAULT_MIN_RANGE,
        )
        .unwrap();
        assert!(p.clamped_up);
        assert_eq!(p.bound, DEFAULT_MIN_RANGE);
        assert_eq!(p.ranges.len(), 4);
        // Greedy: 2048 → s0, 320 → s1, 32 → s1, 10 → s1.
        assert_eq!(p.server_bytes, vec![2048 * 4, 362 * 4]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert_eq!(
            Placement::compute(&[1], 0, 10, 1),
            Err(PlacementError::NoServers)
        );
        assert!(matches!(
            Placement::compute(&[1], 1, 10, 11),
            Err(PlacementError::BadBounds { .. })
        ));
        assert!(matches!(
            Placement::compute(&[1], 1, 10, 0),
            Err(PlacementError::BadBounds { .. })
        ));
    }

    #[test]
    fn range_lookup() {
        let p = Placement::compute(&[10, 300, 7], 3, 1000, 50).unwrap();
        assert_eq!(p.num_keys(), 3);
        assert_eq!(p.num_servers(), 3);
        let id = p.range_id(1, 1).unwrap();
        assert_eq!(p.ranges[id].key, 1);
        assert_eq!(p.ranges[id].index, 1);
        assert!(p.range_id(1, 99).is_none());
        assert!(p.range_id(9, 0).is_none());
        assert!(p.key_ranges(9).is_empty());
        let owned: usize = (0..3).map(|s| p.server_ranges(s).count()).sum();
        assert_eq!(owned, p.ranges.len());
    }

    proptest! {
        #[test]
        fn placement_properties(
            sizes in proptest::collection::vec(0usize..200_000, 1..12),
            servers in 1usize..6,
            min_range in 1usize..5000,
        ) {
            let p = Placement::compute(&sizes, servers, 50_000.max(min_range), min_range).unwrap();
            // Determinism.
            let q = Placement::compute(&sizes, servers, 50_000.max(min_range), min_range).unwrap();
            prop_assert_eq!(&p, &q);
            prop_assert_eq!(p.hash(), q.hash());
            // Full coverage without overlap: each key's ranges tile [0, n) in order.
            for (key, &n) in sizes.iter().enumerate() {
                let mut next = 0;
                let rs = p.key_ranges(key);
                let (lo, hi) = (rs.iter().map(|r| r.len).min().unwrap(), rs.iter().map(|r| r.len).max().unwrap());
                prop_assert!(hi - lo <= 1);
                for r in rs {
                    prop_assert_eq!(r.offset, next);
                    prop_assert!(r.len <= p.bound || rs.len() == 1);
                    prop_assert!(r.server < servers);
                    next += r.len;
                }
                prop_assert_eq!(next, n);
            }
            let total: u64 = sizes.iter().map(|&n| n as u64 * ELEM_BYTES).sum();
            prop_assert_eq!(p.server_bytes.iter().sum::<u64>(), total);
            // Recount loads from the table.
            for s in 0..servers {
                prop_assert_eq!(p.server_ranges(s).map(Range::bytes).sum::<u64>(), p.server_bytes[s]);
            }
            // Greedy bound.
            let largest = p.ranges.iter().map(Range::bytes).max().unwrap();
            let (max, min) = loads(&p);
            prop_assert!(max - min <= largest);
            // Balance when B was not raised to min_range.
            if !p.clamped_up && min > 0 {
                prop_assert!(max as f64 / min as f64 <= 1.10, "{} / {}", max, min);
            }
        }
    }
}
