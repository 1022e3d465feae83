//! Oracle 8 of compression.md (wire round trips, rejections, scatter-add), oracle 9 byte counts.

use super::*;
use crate::dense::{decode_dense, encode_dense};
use rand::{Rng, SeedableRng};

fn random_sparse(rng: &mut rand::rngs::StdRng, n: u32, density: f64) -> SparseVec {
    let mut idx = Vec::new();
    let mut val = Vec::new();
    for i in 0..n {
        if rng.random::<f64>() < density {
            idx.push(i);
            // Multiples of 2^-4 in (-16, 16): exact in f32, f16 and bf16 (8 significant bits), and
            // sums are exact in f32 regardless of order.
            val.push(f32::from(rng.random_range(-256i16..256)) / 16.0);
        }
    }
    SparseVec::new(n, idx, val).unwrap()
}

#[test]
fn sparse_round_trip_all_value_types() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let s = random_sparse(&mut rng, 10_000, 0.01);
    let mut buf = Vec::new();
    for vt in [ValueType::F32, ValueType::F16, ValueType::Bf16] {
        for sc in [Scaling::None, Scaling::Pow2] {
            s.encode(vt, sc, &mut buf);
            assert_eq!(buf.len(), sparse_payload_len(s.count(), vt));
            let d = SparseVec::decode(&buf, 3, 10_000).unwrap();
            // Values have at most 8 significant bits: exact in all three types.
            assert_eq!(d, s, "{vt:?} {sc:?}");
            let mut dense = vec![0.0; 10_000];
            scatter_add_payload(&buf, 3, &mut dense).unwrap();
            assert_eq!(dense, s.to_dense());
        }
    }
    assert_eq!(
        sparse_payload_len(s.count(), ValueType::F32),
        12 + 8 * s.count()
    );
    // Empty vector.
    SparseVec::empty(5).encode(ValueType::F32, Scaling::None, &mut buf);
    assert_eq!(buf.len(), 12);
    assert!(SparseVec::decode(&buf, 3, 5).unwrap().is_empty());
}

#[test]
fn sparse_f16_scaling_keeps_small_values() {
    let s = SparseVec::new(4, vec![0, 3], vec![1e-6, -3e-7]).unwrap();
    let mut buf = Vec::new();
    s.encode(ValueType::F16, Scaling::Pow2, &mut buf);
    let d = SparseVec::decode(&buf, 0, 4).unwrap();
    for (a, b) in d.values().iter().zip(s.values()) {
        assert!(((a - b) / b).abs() < 1e-3, "{a} vs {b}");
    }
    s.encode(ValueType::F16, Scaling::None, &mut buf);
    let d = SparseVec::decode(&buf, 0, 4).unwrap();
    assert!(((d.values()[1] - s.values()[1]) / s.values()[1]).abs() > 1e-3);
}

fn sparse_bytes(n_total: u32, idx: &[u32], vals: &[f32]) -> Vec<u8> {
    let h = PayloadHeader {
        layout: Layout::Sparse,
        value_type: ValueType::F32,
        scale_exp: 0,
        n_total,
        count: idx.len() as u32,
    };
    let mut b = h.to_bytes().to_vec();
    for i in idx {
        b.extend_from_slice(&i.to_le_bytes());
    }
    for v in vals {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

#[test]
fn sparse_rejections_name_the_key() {
    let key = 77;
    let ok = sparse_bytes(10, &[1, 5], &[1.0, 2.0]);
    assert!(SparseVec::decode(&ok, key, 10).is_ok());
    let check = |bytes: &[u8], n: usize, want: fn(&DecodeError) -> bool| {
        let e = SparseVec::decode(bytes, key, n).unwrap_err();
        assert!(want(&e), "{e:?}");
        assert!(e.to_string().contains("key 77"), "{e}");
        let mut dense = vec![0.0f32; n];
        assert!(scatter_add_payload(bytes, key, &mut dense).is_err());
        assert!(dense.iter().all(|&v| v == 0.0), "dense touched on error");
    };
    // count > n_total
    let mut b = ok.clone();
    b[8..12].copy_from_slice(&11u32.to_le_bytes());
    check(&b, 10, |e| matches!(e, DecodeError::BadCount { .. }));
    check(&sparse_bytes(10, &[1, 10], &[1.0, 2.0]), 10, |e| {
        matches!(e, DecodeError::IndexOutOfRange { index: 10, .. })
    });
    check(&sparse_bytes(10, &[5, 1], &[1.0, 2.0]), 10, |e| {
        matches!(e, DecodeError::NotAscending { .. })
    });
    check(&sparse_bytes(10, &[5, 5], &[1.0, 2.0]), 10, |e| {
        matches!(e, DecodeError::NotAscending { .. })
    });
    check(&ok[..ok.len() - 1], 10, |e| {
        matches!(e, DecodeError::PayloadLength { .. })
    });
    let mut long = ok.clone();
    long.push(0);
    check(&long, 10, |e| {
        matches!(e, DecodeError::PayloadLength { .. })
    });
    check(&ok, 11, |e| matches!(e, DecodeError::WrongLength { .. }));
    check(&ok[..5], 10, |e| {
        matches!(e, DecodeError::ShortHeader { .. })
    });
    let mut b = ok.clone();
    b[0] = 9;
    check(&b, 10, |e| matches!(e, DecodeError::UnknownLayout { .. }));
    let mut b = ok.clone();
    b[1] = 3;
    check(&b, 10, |e| {
        matches!(e, DecodeError::UnknownValueType { .. })
    });
    let mut b = ok.clone();
    b[2] = 1;
    check(&b, 10, |e| matches!(e, DecodeError::ScaledF32 { .. }));
    // A dense payload is not a sparse one and vice versa.
    let mut dense_buf = Vec::new();
    encode_dense(&[1.0; 10], ValueType::F32, Scaling::None, &mut dense_buf).unwrap();
    check(&dense_buf, 10, |e| {
        matches!(e, DecodeError::WrongLayout { .. })
    });
    assert!(matches!(
        decode_dense(&ok, key, 10),
        Err(DecodeError::WrongLayout { .. })
    ));
}

#[test]
fn dense_rejections() {
    let mut buf = Vec::new();
    encode_dense(&[1.0, 2.0, 3.0], ValueType::F16, Scaling::Pow2, &mut buf).unwrap();
    assert_eq!(decode_dense(&buf, 1, 3).unwrap(), vec![1.0, 2.0, 3.0]);
    let mut b = buf.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        decode_dense(&b, 1, 3),
        Err(DecodeError::BadCount { .. })
    ));
    assert!(matches!(
        decode_dense(&buf[..buf.len() - 2], 1, 3),
        Err(DecodeError::PayloadLength { .. })
    ));
    // A hostile n_total is rejected before any allocation.
    let mut b = buf.clone();
    b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_dense(&b, 1, 3),
        Err(DecodeError::WrongLength { .. })
    ));
}

#[test]
fn fuzz_decoders_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut valid = Vec::new();
    random_sparse(&mut rng, 64, 0.2).encode(ValueType::F16, Scaling::Pow2, &mut valid);
    let mut dense = vec![0.0f32; 64];
    for round in 0..20_000 {
        let mut b = if round % 2 == 0 {
            let len = rng.random_range(0..80);
            (0..len).map(|_| rng.random()).collect::<Vec<u8>>()
        } else {
            valid.clone()
        };
        // Mutate a few bytes, keeping the header plausible half of the time.
        for _ in 0..rng.random_range(1..4) {
            if !b.is_empty() {
                let p = rng.random_range(0..b.len());
                b[p] = rng.random();
            }
        }
        let n = if rng.random::<bool>() {
            64
        } else {
            rng.random_range(0..100)
        };
        let _ = SparseVec::decode(&b, round, n);
        let _ = decode_dense(&b, round, n);
        if n == 64 {
            let _ = scatter_add_payload(&b, round, &mut dense);
        }
    }
}

#[test]
fn scatter_add_and_merge_equal_dense_sum() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    // Longer than one scatter block, so blocks and cursors are exercised.
    let n = 70_000;
    for d in [1usize, 2, 3, 7] {
        let parts: Vec<SparseVec> = (0..d).map(|_| random_sparse(&mut rng, n, 0.05)).collect();
        let mut want = vec![0.0f32; n as usize];
        for p in &parts {
            for (w, x) in want.iter_mut().zip(p.to_dense()) {
                *w += x;
            }
        }
        let mut got = vec![0.0f32; n as usize];
        for p in &parts {
            p.scatter_add_into(&mut got).unwrap();
        }
        assert_eq!(got, want);
        let refs: Vec<&SparseVec> = parts.iter().collect();
        let mut blocked = vec![0.0f32; n as usize];
        scatter_add_many(&refs, &mut blocked).unwrap();
        assert!(blocked
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let merged = SparseVec::merge(&refs).unwrap();
        assert_eq!(merged, SparseVec::from_dense_nonzero(&want).unwrap());
    }
    // Cancellation: entries summing to zero are omitted; -0.0 never appears.
    let a = SparseVec::new(4, vec![0, 1], vec![1.5, -0.0]).unwrap();
    let b = SparseVec::new(4, vec![0, 2], vec![-1.5, 2.0]).unwrap();
    let m = SparseVec::merge(&[&a, &b]).unwrap();
    assert_eq!(m.indices(), &[2]);
    assert_eq!(m.values(), &[2.0]);
    // Length mismatches are errors.
    assert!(SparseVec::merge(&[&a, &SparseVec::empty(5)]).is_err());
    assert!(a.scatter_add_into(&mut [0.0; 3]).is_err());
    assert!(scatter_add_many(&[&a], &mut [0.0; 3]).is_err());
    assert!(SparseVec::new(4, vec![1, 1], vec![1.0, 1.0]).is_err());
    assert!(SparseVec::new(4, vec![4], vec![1.0]).is_err());
    assert!(SparseVec::new(4, vec![1], vec![]).is_err());
}

#[test]
fn mpq_byte_counts() {
    use crate::mpq::{choose_codec, MpqCodec};
    let t = 1000usize;
    let mut buf = Vec::new();
    let x = vec![1.0f32; t - 1];
    assert_eq!(choose_codec(x.len(), t), MpqCodec::DenseF16);
    encode_dense(&x, MpqCodec::DenseF16.value_type(), Scaling::Pow2, &mut buf).unwrap();
    assert_eq!(buf.len(), 12 + 2 * (t - 1));
    assert_eq!(choose_codec(t, t), MpqCodec::SparseF32);
    let s = SparseVec::new(t as u32, vec![3, 9], vec![1.0, 2.0]).unwrap();
    s.encode(MpqCodec::SparseF32.value_type(), Scaling::None, &mut buf);
    assert_eq!(buf.len(), 12 + 8 * 2);
    assert!(sparse_is_smaller(124, ValueType::F32, 250));
    assert!(!sparse_is_smaller(125, ValueType::F32, 250));
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn sparse(n: u32) -> impl Strategy<Value = SparseVec> {
        proptest::collection::btree_map(0..n, -1000i32..1000, 0..(n as usize).min(64)).prop_map(
            move |m| {
                let (i, v): (Vec<u32>, Vec<f32>) =
                    m.into_iter().map(|(i, v)| (i, v as f32 * 0.37)).unzip();
                SparseVec::new(n, i, v).unwrap()
            },
        )
    }

    proptest! {
        #[test]
        fn merge_equals_scatter_bit_for_bit(parts in proptest::collection::vec(sparse(100), 1..6)) {
            let refs: Vec<&SparseVec> = parts.iter().collect();
            let mut dense = vec![0.0f32; 100];
            for p in &parts {
                p.scatter_add_into(&mut dense).unwrap();
            }
            let merged = SparseVec::merge(&refs).unwrap();
            let want = SparseVec::from_dense_nonzero(&dense).unwrap();
            // A reused scratch gives the same result (it is left zeroed), also for a shorter key.
            let mut scratch = MergeScratch::default();
            let short = SparseVec::new(7, vec![6], vec![f32::NAN]).unwrap();
            SparseVec::merge_with(&[&short], &mut scratch).unwrap();
            prop_assert_eq!(SparseVec::merge_with(&refs, &mut scratch).unwrap(), merged.clone());
            prop_assert_eq!(SparseVec::merge_with(&refs, &mut scratch).unwrap(), merged.clone());
            prop_assert_eq!(merged.indices(), want.indices());
            prop_assert!(merged.values().iter().zip(want.values()).all(|(a, b)| a.to_bits() == b.to_bits()));
            let mut blocked = vec![0.0f32; 100];
            scatter_add_many(&refs, &mut blocked).unwrap();
            prop_assert!(blocked.iter().zip(&dense).all(|(a, b)| a.to_bits() == b.to_bits()));
        }

        #[test]
        fn codec_round_trip(s in sparse(1000)) {
            let mut buf = Vec::new();
            s.encode(ValueType::F32, Scaling::None, &mut buf);
            prop_assert_eq!(SparseVec::decode(&buf, 1, 1000).unwrap(), s);
        }
    }
}

#[test]
fn dense_pow2_extreme_ranges() {
    use crate::dense::pow2_exponent;
    // max·2^e ∈ [2^14, 2^15) for normal and subnormal maxima; 0 for zero or non-finite.
    for bits in [
        1u32,
        0x0000_0400,
        0x007F_FFFF,
        0x0080_0000,
        0x3F80_0000,
        0x7F7F_FFFF,
    ] {
        let e = i32::from(pow2_exponent(bits));
        let scaled = f64::from(f32::from_bits(bits)) * 2f64.powi(e);
        assert!((16384.0..32768.0).contains(&scaled), "{bits:#x}: e = {e}");
    }
    assert_eq!(pow2_exponent(0), 0);
    assert_eq!(pow2_exponent(0x7F80_0000), 0);
    assert_eq!(pow2_exponent(0x7FC0_0000), 0);
    // Round trips keep 11 significant bits at both ends of the f32 range.
    let mut buf = Vec::new();
    for scale in [1e-41f32, 1e-30, 1.0, 1e30, 3e38] {
        let x: Vec<f32> = (1..=200)
            .map(|i| scale * (i as f32 / 200.0) * if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let st = encode_dense(&x, ValueType::F16, Scaling::Pow2, &mut buf).unwrap();
        assert_eq!(st.nonfinite, 0, "scale {scale:e}");
        let y = decode_dense(&buf, 2, x.len()).unwrap();
        for (a, b) in x.iter().zip(&y) {
            // Relative 2^-11 for values in the FP16 normal range after scaling (≥ max/2^15·2^-14·…);
            // small ones are absolute-bounded by the subnormal step.
            let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = (f64::from(a.abs()) * 2f64.powi(-11)).max(f64::from(max) * 2f64.powi(-39));
            // f32-subnormal inputs carry fewer bits themselves.
            let tol = tol.max(f64::from(f32::from_bits(1)));
            assert!(
                (f64::from(*a) - f64::from(*b)).abs() <= tol,
                "scale {scale:e}: {a:e} vs {b:e}"
            );
        }
    }
    // Without scaling, values past 65504 become inf and are counted.
    let st = encode_dense(
        &[1e5, -1e6, 1.0, f32::NAN],
        ValueType::F16,
        Scaling::None,
        &mut buf,
    )
    .unwrap();
    assert_eq!(st.nonfinite, 3);
    let st = encode_dense(
        &[1e5, f32::INFINITY],
        ValueType::F16,
        Scaling::Pow2,
        &mut buf,
    )
    .unwrap();
    assert_eq!((st.scale_exp, st.nonfinite), (0, 2));
}
