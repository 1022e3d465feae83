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
//!
//! The greedy placement leaves at most one range between the most and the least loaded server,
//! which is a lot when B was raised to `min_range` (small models: a 17k-parameter MLP on three
//! servers with `min_range` 1024 ends 15 % apart). A second candidate, the **contiguous cut**,
//! cuts the parameters (keys in order) into S consecutive slices at the allowed points nearest to
//! the multiples of total / S — a key boundary, or a point inside a key leaving at least
//! `min_range` elements on both sides — and splits each slice's pieces like step 2 (so ranges of
//! one key may differ in size across a cut). Each cut point is off its ideal by less than
//! `min_range` elements (or half a tensor that cannot be cut). The table keeps the contiguous cut
//! when its load spread is strictly smaller, its max/min ratio no worse, and its spread at most its
//! largest range; otherwise the greedy one. Both bounds of the greedy placement therefore hold for
//! the table, and no placement can beat one `min_range` piece of imbalance when every piece must
//! keep `min_range` elements (docs/architecture.md, "MultiGPS placement").

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
    /// `servers` global servers: the greedy placement of the module docs, or the contiguous cut
    /// ([`Placement::compute`] picks the better balanced; see the module docs).
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
        let greedy = Self::greedy(sizes, servers, bound, clamped_up)?;
        let cut = Self::contiguous(sizes, servers, bound, min_range, clamped_up)?;
        Ok(if cut.better_than(&greedy) {
            cut
        } else {
            greedy
        })
    }

    /// Steps 1–4 of the module docs: equal splits, largest first to the least loaded server.
    fn greedy(
        sizes: &[usize],
        servers: usize,
        bound: usize,
        clamped_up: bool,
    ) -> Result<Self, PlacementError> {
        let mut pieces = Vec::with_capacity(sizes.len());
        for (key, &n) in sizes.iter().enumerate() {
            pieces.push((key, 0, n, 0));
        }
        let mut p = Self::from_pieces(sizes.len(), &pieces, servers, bound, clamped_up)?;
        let mut order: Vec<usize> = (0..p.ranges.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (&p.ranges[a], &p.ranges[b]);
            rb.len
                .cmp(&ra.len)
                .then(ra.key.cmp(&rb.key))
                .then(ra.index.cmp(&rb.index))
        });
        p.server_bytes = vec![0u64; servers];
        for i in order {
            let target = p
                .server_bytes
                .iter()
                .enumerate()
                .min_by_key(|&(s, &b)| (b, s))
                .map(|(s, _)| s)
                .unwrap_or(0);
            p.ranges[i].server = target;
            p.server_bytes[target] += p.ranges[i].bytes();
        }
        Ok(p)
    }

    /// The contiguous cut: the parameters, keys in order, cut into `servers` consecutive slices
    /// at the cut points nearest to the multiples of total / S; a key is cut only where both
    /// pieces keep at least `min_range` elements. Each slice's pieces are split like step 2.
    fn contiguous(
        sizes: &[usize],
        servers: usize,
        bound: usize,
        min_range: usize,
        clamped_up: bool,
    ) -> Result<Self, PlacementError> {
        let total: usize = sizes.iter().sum();
        let mut starts = Vec::with_capacity(sizes.len());
        let mut at = 0usize;
        for &n in sizes {
            starts.push(at);
            at += n;
        }
        // Cut points between servers, in element coordinates of the concatenated keys.
        let mut cuts = Vec::with_capacity(servers + 1);
        cuts.push(0usize);
        for s in 1..servers {
            let ideal = ((s as u128 * total as u128) / servers as u128) as usize;
            let prev = *cuts.last().unwrap_or(&0);
            cuts.push(nearest_cut(sizes, &starts, ideal, min_range).max(prev));
        }
        cuts.push(total);
        let mut pieces = Vec::new();
        for (key, (&n, &start)) in sizes.iter().zip(&starts).enumerate() {
            if n == 0 {
                pieces.push((key, 0, 0, server_at(&cuts, start)));
                continue;
            }
            for (s, w) in cuts.windows(2).enumerate() {
                let (lo, hi) = (w[0].max(start), w[1].min(start + n));
                if lo < hi {
                    pieces.push((key, lo - start, hi - lo, s));
                }
            }
        }
        let mut p = Self::from_pieces(sizes.len(), &pieces, servers, bound, clamped_up)?;
        p.server_bytes = vec![0u64; servers];
        for r in &p.ranges {
            p.server_bytes[r.server] += r.bytes();
        }
        Ok(p)
    }

    /// Ranges from pieces (key, offset, length, server) in (key, offset) order: each piece longer
    /// than `bound` becomes ⌈len / bound⌉ ranges whose sizes differ by at most one element (the
    /// extra elements first), all on the piece's server.
    fn from_pieces(
        keys: usize,
        pieces: &[(usize, usize, usize, usize)],
        servers: usize,
        bound: usize,
        clamped_up: bool,
    ) -> Result<Self, PlacementError> {
        let mut ranges = Vec::new();
        let mut key_ranges = vec![0..0; keys];
        let mut next_index = vec![0usize; keys];
        for &(key, offset, n, server) in pieces {
            if next_index[key] == 0 {
                key_ranges[key] = ranges.len()..ranges.len();
            }
            let m = if n > bound { n.div_ceil(bound) } else { 1 };
            let (base, extra) = (n / m, n % m);
            let mut off = offset;
            for i in 0..m {
                let len = base + usize::from(i < extra);
                if u32::try_from(len).is_err() {
                    return Err(PlacementError::RangeTooLarge(len));
                }
                ranges.push(Range {
                    key,
                    index: next_index[key],
                    offset: off,
                    len,
                    server,
                });
                next_index[key] += 1;
                key_ranges[key].end = ranges.len();
                off += len;
            }
        }
        Ok(Self {
            bound,
            clamped_up,
            ranges,
            server_bytes: vec![0; servers],
            key_ranges,
        })
    }

    /// Largest minus smallest server load, and the largest range, in bytes.
    fn spread(&self) -> (u64, u64, u64, u64) {
        let max = self.server_bytes.iter().copied().max().unwrap_or(0);
        let min = self.server_bytes.iter().copied().min().unwrap_or(0);
        let largest = self.ranges.iter().map(Range::bytes).max().unwrap_or(0);
        (max, min, max - min, largest)
    }

    /// Whether `self` balances strictly better than `other` (smaller spread, no worse ratio)
    /// while keeping the greedy bound (spread at most its largest range).
    fn better_than(&self, other: &Self) -> bool {
        let (max, min, spread, largest) = self.spread();
        let (omax, omin, ospread, _) = other.spread();
        spread < ospread
            && spread <= largest
            && u128::from(max) * u128::from(omin) <= u128::from(omax) * u128::from(min)
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
        let mut h = crate::hash::Fnv1a::new();
        h.write(&(self.bound as u64).to_le_bytes());
        for r in &self.ranges {
            for v in [r.key, r.index, r.offset, r.len, r.server] {
                h.write(&(v as u64).to_le_bytes());
            }
        }
        h.finish()
    }
}

/// The allowed cut point nearest to `ideal` (ties: the lower): a key boundary, or a point inside a
/// key that leaves at least `min_range` elements on both sides.
fn nearest_cut(sizes: &[usize], starts: &[usize], ideal: usize, min_range: usize) -> usize {
    let Some(k) = (0..sizes.len()).find(|&k| ideal < starts[k] + sizes[k]) else {
        return sizes.iter().sum();
    };
    let (lo, hi) = (starts[k], starts[k] + sizes[k]);
    let mut best = if ideal - lo <= hi - ideal { lo } else { hi };
    if sizes[k] >= 2 * min_range {
        let inside = ideal.clamp(lo + min_range, hi - min_range);
        if inside.abs_diff(ideal) < best.abs_diff(ideal) {
            best = inside;
        }
    }
    best
}

/// The server whose slice [cuts[s], cuts[s + 1]) holds element `at` (the last for the end).
fn server_at(cuts: &[usize], at: usize) -> usize {
    let servers = cuts.len() - 1;
    (0..servers)
        .find(|&s| at < cuts[s + 1])
        .unwrap_or(servers - 1)
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

    /// examples/multi-gps.toml (MLP 64 → 128 → 64 → 10 on 3 servers, B_max 4096, min_range
    /// 1024): the greedy placement is 15 % apart; the contiguous cut balances within 1 %.
    #[test]
    fn small_models_are_balanced_by_the_contiguous_cut() {
        let sizes = [8192, 128, 8192, 64, 640, 10];
        let p = Placement::compute(&sizes, 3, 4096, 1024).unwrap();
        let (max, min) = loads(&p);
        assert!(max as f64 <= 1.01 * min as f64, "{:?}", p.server_bytes);
        let greedy = Placement::greedy(&sizes, 3, p.bound, p.clamped_up).unwrap();
        let (gmax, gmin) = loads(&greedy);
        assert!(
            gmax as f64 > 1.10 * gmin as f64,
            "{:?}",
            greedy.server_bytes
        );
        // Every cut inside a key leaves at least min_range elements on both sides.
        for r in &p.ranges {
            let n = sizes[r.key];
            let on_server: usize = p
                .key_ranges(r.key)
                .iter()
                .filter(|q| q.server == r.server)
                .map(|q| q.len)
                .sum();
            assert!(on_server == n || on_server >= 1024, "{r:?}");
        }
        // With min_range 4096 the keys of 8192 can only be halved: four pieces of 4096 on three
        // servers leave one server twice as loaded whatever the placement (the documented bound);
        // the table is then the greedy one, within one piece.
        let q = Placement::compute(&sizes, 3, 4096, 4096).unwrap();
        let (max, min) = loads(&q);
        assert_eq!(max, 8192 * 4);
        assert!(max - min <= 4096 * 4);
    }

    /// A model large enough that B is not clamped (MLP 784 → 1024 → 1024 → 10) on 3 servers at
    /// the default min_range: within 2 %.
    #[test]
    fn unclamped_models_balance_within_two_percent() {
        let sizes = [784 * 1024, 1024, 1024 * 1024, 1024, 10 * 1024, 10];
        let p = Placement::compute(&sizes, 3, DEFAULT_BOUND_MAX, DEFAULT_MIN_RANGE).unwrap();
        assert!(!p.clamped_up);
        let (max, min) = loads(&p);
        assert!(max as f64 <= 1.02 * min as f64, "{:?}", p.server_bytes);
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
                // A key's ranges on one server come from one piece: near-equal sizes.
                for s in 0..servers {
                    let on: Vec<usize> = rs.iter().filter(|r| r.server == s).map(|r| r.len).collect();
                    if let (Some(lo), Some(hi)) = (on.iter().min(), on.iter().max()) {
                        prop_assert!(hi - lo <= 1);
                    }
                }
                for (i, r) in rs.iter().enumerate() {
                    prop_assert_eq!(r.index, i);
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
