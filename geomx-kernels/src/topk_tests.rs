//! Oracles 3–4 of compression.md: exact top-k against a sort-based reference, sampled mode
//! properties.

use super::*;
use rand::{Rng, SeedableRng};

/// Reference order: stable sort by |v| descending under total_cmp (NaN above inf), zeros removed.
fn reference_order(v: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..v.len() as u32)
        .filter(|&i| v[i as usize] != 0.0)
        .collect();
    idx.sort_by(|&a, &b| v[b as usize].abs().total_cmp(&v[a as usize].abs()));
    idx
}

fn reference_topk(order: &[u32], k: usize) -> Vec<u32> {
    let mut sel = order[..k.min(order.len())].to_vec();
    sel.sort_unstable();
    sel
}

fn inputs(n: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cases = vec![("normal", crate::cast::tests::normals(n, seed))];
    cases.push((
        "ties",
        (0..n)
            .map(|_| f32::from(rng.random_range(-3i8..=3)))
            .collect(),
    ));
    cases.push((
        "signed zeros",
        (0..n)
            .map(|_| match rng.random_range(0..4) {
                0 => 0.0,
                1 => -0.0,
                2 => 1.0,
                _ => -1.0,
            })
            .collect(),
    ));
    cases.push(("constant", vec![0.5; n]));
    cases.push(("all zero", vec![0.0; n]));
    cases.push((
        "nan and inf",
        (0..n)
            .map(|i| match i % 11 {
                0 => f32::NAN,
                3 => -f32::NAN,
                4 => f32::from_bits(0x7F80_0001),
                5 => f32::NEG_INFINITY,
                6 => f32::INFINITY,
                7 => f32::from_bits(1),
                _ => rng.random::<f32>() - 0.5,
            })
            .collect(),
    ));
    cases
}

#[test]
fn exact_matches_sort_reference() {
    let mut scratch = TopkScratch::default();
    let mut out = Vec::new();
    for n in [1usize, 7, 1000, 1_000_000] {
        let ks = [1, n.div_ceil(1000), n.div_ceil(100), n];
        for (name, v) in inputs(n, n as u64) {
            let order = reference_order(&v);
            for &k in &ks {
                let count = topk_exact(&v, k, &mut scratch, &mut out).unwrap();
                let want = reference_topk(&order, k);
                assert_eq!(count, want.len());
                assert!(out == want, "{name}: n = {n}, k = {k}");
            }
        }
    }
    assert_eq!(
        topk_exact(&[1.0, 2.0], 0, &mut scratch, &mut out).unwrap(),
        0
    );
    assert_eq!(topk_exact(&[], 3, &mut scratch, &mut out).unwrap(), 0);
}

#[test]
fn nan_ranks_above_infinity() {
    let v = [1.0, f32::INFINITY, f32::NAN, -f32::NAN, 3.0];
    let mut scratch = TopkScratch::default();
    let mut out = Vec::new();
    topk_exact(&v, 2, &mut scratch, &mut out).unwrap();
    assert_eq!(out, vec![2, 3]);
    topk_exact(&v, 3, &mut scratch, &mut out).unwrap();
    assert_eq!(out, vec![1, 2, 3]);
}

#[test]
fn portable_scan_matches_dispatched() {
    let v = crate::cast::tests::normals(10_007, 3);
    for t in [1u32, 0x3F80_0000, 0x4000_0000, 0x7F80_0000] {
        let mut got = Vec::new();
        scan_ge(&v, t, |i, key| {
            assert_eq!(key, abs_key(v[i]));
            got.push(i as u32)
        });
        assert_eq!(got, scan_ge_portable_for_tests(&v, t));
    }
}

fn check_sampled_invariants(v: &[f32], sel: &[u32], o: &SelectOutcome, tol: f64) {
    assert_eq!(sel.len(), o.count);
    assert!(sel.windows(2).all(|w| w[0] < w[1]), "ascending");
    assert!(sel.iter().all(|&i| v[i as usize] != 0.0), "no zeros");
    let mut chosen = vec![false; v.len()];
    for &i in sel {
        chosen[i as usize] = true;
    }
    let min_sel = sel
        .iter()
        .map(|&i| abs_key(v[i as usize]))
        .min()
        .unwrap_or(u32::MAX);
    let max_unsel = (0..v.len())
        .filter(|&i| !chosen[i])
        .map(|i| abs_key(v[i]))
        .max()
        .unwrap_or(0);
    assert!(
        sel.is_empty() || min_sel >= max_unsel,
        "min selected ≥ max unselected"
    );
    let k = o.k as f64;
    match o.path {
        SelectPath::Fallback | SelectPath::Exact => {
            let want = reference_topk(&reference_order(v), o.k);
            assert_eq!(sel, &want[..]);
        }
        _ => assert!(
            (o.count as f64) >= (1.0 - tol) * k && (o.count as f64) <= (1.0 + tol) * k,
            "{o:?}"
        ),
    }
}

#[test]
fn sampled_invariants_and_determinism() {
    let p = SampledParams::default();
    let mut scratch = TopkScratch::default();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut paths = std::collections::HashMap::new();
    for (name, v) in inputs(200_000, 11) {
        for (r, density) in [0.01, 0.001, 0.05, 0.25].into_iter().enumerate() {
            let seed = crate::rng::selection_seed(1, crate::rng::Tier::Inter, 0, 5, r as u64);
            let o = topk_sampled(&v, density, &p, seed, &mut scratch, &mut a).unwrap();
            check_sampled_invariants(&v, &a, &o, p.tolerance);
            *paths.entry(o.path).or_insert(0) += 1;
            let o2 = topk_sampled(&v, density, &p, seed, &mut scratch, &mut b).unwrap();
            assert_eq!((o, &a), (o2, &b), "{name}: same seed, same selection");
        }
    }
    // Random inputs are mostly accepted as sampled; constant ones are refined.
    assert!(paths.contains_key(&SelectPath::Accepted), "{paths:?}");
    assert!(paths.contains_key(&SelectPath::Refined), "{paths:?}");
}

#[test]
fn sampled_exact_count_with_zero_tolerance() {
    let p = SampledParams {
        tolerance: 0.0,
        ..SampledParams::default()
    };
    let v = crate::cast::tests::normals(100_000, 8);
    let mut scratch = TopkScratch::default();
    let mut out = Vec::new();
    let want = reference_topk(&reference_order(&v), 1000);
    let mut refined = 0;
    for r in 0..20 {
        let o = topk_sampled(&v, 0.01, &p, r, &mut scratch, &mut out).unwrap();
        assert_eq!(o.count, 1000);
        assert_eq!(out, want);
        refined += (o.path == SelectPath::Refined) as usize;
    }
    // The raised sample rank makes the cheap refinement the usual path.
    assert!(refined >= 18, "{refined} of 20 refined");
}

#[test]
fn sampled_small_tensors_and_bad_params() {
    let p = SampledParams::default();
    let mut scratch = TopkScratch::default();
    let mut out = Vec::new();
    for n in 1..=100usize {
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let o = topk_sampled(&v, 0.001, &p, n as u64, &mut scratch, &mut out).unwrap();
        assert_eq!(o.path, SelectPath::Exact);
        check_sampled_invariants(&v, &out, &o, p.tolerance);
    }
    assert!(topk_sampled(&[1.0], 0.0, &p, 0, &mut scratch, &mut out).is_err());
    assert!(topk_sampled(&[1.0], 1.5, &p, 0, &mut scratch, &mut out).is_err());
    let bad = SampledParams {
        tolerance: 1.0,
        ..p
    };
    assert!(topk_sampled(&[1.0], 0.5, &bad, 0, &mut scratch, &mut out).is_err());
}

#[test]
fn sampled_has_no_index_bias() {
    // i.i.d. inputs, 1000 rounds: selections in the lower and upper halves differ by < 10 %.
    let n = 20_000;
    let p = SampledParams::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut scratch = TopkScratch::default();
    let mut out = Vec::new();
    let (mut lower, mut upper) = (0u64, 0u64);
    let mut v = vec![0f32; n];
    for r in 0..1000 {
        for x in v.iter_mut() {
            *x = rng.random::<f32>() - 0.5;
        }
        let seed = crate::rng::selection_seed(3, crate::rng::Tier::Inter, 1, 2, r);
        topk_sampled(&v, 0.01, &p, seed, &mut scratch, &mut out).unwrap();
        for &i in &out {
            if (i as usize) < n / 2 {
                lower += 1;
            } else {
                upper += 1;
            }
        }
    }
    let diff = (lower as f64 - upper as f64).abs() / (lower.max(upper) as f64);
    assert!(diff < 0.1, "lower {lower}, upper {upper}");
    assert!(lower + upper > 1000 * 150);
}

#[test]
fn k_and_sample_size_formulas() {
    assert_eq!(k_for_density(0.01, 1000), 10);
    assert_eq!(k_for_density(0.01, 1001), 11);
    assert_eq!(k_for_density(0.001, 7), 1);
    assert_eq!(k_for_density(1.0, 7), 7);
    assert_eq!(k_for_density(0.5, 0), 0);
    let p = SampledParams::default();
    assert_eq!(sample_size(&p, 0.01, 1_000_000), 10_000);
    assert_eq!(sample_size(&p, 0.01, 100_000), 2_000);
    assert_eq!(sample_size(&p, 0.001, 100), 100);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(0.0f32),
            Just(-0.0f32),
            Just(f32::NAN),
            Just(-f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(f32::from_bits(1)),
            (-4i8..=4).prop_map(f32::from),
            any::<u32>().prop_map(f32::from_bits),
        ]
    }

    proptest! {
        #[test]
        fn exact_equals_reference(v in proptest::collection::vec(value(), 0..300), k in 0usize..320) {
            let mut scratch = TopkScratch::default();
            let mut out = Vec::new();
            topk_exact(&v, k, &mut scratch, &mut out).unwrap();
            prop_assert_eq!(out, reference_topk(&reference_order(&v), k));
        }

        #[test]
        fn sampled_keeps_invariants(
            v in proptest::collection::vec(value(), 1..3000),
            density in 0.001f64..1.0,
            seed in any::<u64>(),
        ) {
            let p = SampledParams { sample_fraction: 0.01, min_hits: 2, tolerance: 0.2 };
            let mut scratch = TopkScratch::default();
            let mut out = Vec::new();
            let o = topk_sampled(&v, density, &p, seed, &mut scratch, &mut out).unwrap();
            check_sampled_invariants(&v, &out, &o, p.tolerance);
        }
    }
}
