//! Oracles 5–7 of compression.md: exhaustive FP16/BF16 checks against an independent reference
//! written here with f64 arithmetic (not bit tricks), plus MSE bounds.

use super::*;
use crate::dense::{decode_dense, encode_dense, Scaling};
use crate::wire::ValueType;
use rand::{Rng, SeedableRng};

/// Reference f16 → f32 by arithmetic. NaN: same sign, quiet, payload in the top mantissa bits.
fn ref_f16_to_f32_bits(h: u16) -> u32 {
    let neg = h & 0x8000 != 0;
    let exp = i32::from((h >> 10) & 0x1F);
    let man = f64::from(h & 0x3FF);
    let sign_bit = if neg { 0x8000_0000u32 } else { 0 };
    if exp == 31 {
        if man == 0.0 {
            return sign_bit | 0x7F80_0000;
        }
        return sign_bit | 0x7FC0_0000 | (u32::from(h & 0x3FF) << 13);
    }
    let mag = if exp == 0 {
        man * 2f64.powi(-24)
    } else {
        (1024.0 + man) * 2f64.powi(exp - 25)
    };
    let v = if neg { -mag } else { mag };
    (v as f32).to_bits()
}

/// Reference f32 → f16 by arithmetic on the half grid with round-half-even.
fn ref_f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if x.is_nan() {
        return sign | 0x7E00 | ((bits >> 13) & 0x3FF) as u16;
    }
    let a = f64::from(x.abs());
    if a >= 65520.0 {
        return sign | 0x7C00;
    }
    if a < 2f64.powi(-14) {
        let q = (a * 2f64.powi(24)).round_ties_even();
        return sign | q as u16; // q = 1024 is the smallest normal, bits 0x0400
    }
    let e = a.log2().floor() as i32;
    // log2 may be off by one at exact powers; fix up so that 2^e ≤ a < 2^(e+1).
    let e = if 2f64.powi(e) > a {
        e - 1
    } else if 2f64.powi(e + 1) <= a {
        e + 1
    } else {
        e
    };
    let m = (a / 2f64.powi(e - 10)).round_ties_even() as u32; // in [1024, 2048]
    sign | ((((e + 15) as u32) << 10) + (m - 1024)) as u16
}

/// Reference f32 → bf16 by arithmetic on the bf16 grid.
fn ref_f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let a = f64::from(x.abs());
    let spacing = if a < 2f64.powi(-126) {
        2f64.powi(-133)
    } else {
        let mut e = a.log2().floor() as i32;
        if 2f64.powi(e) > a {
            e -= 1;
        } else if 2f64.powi(e + 1) <= a {
            e += 1;
        }
        2f64.powi(e - 7)
    };
    let r = (a / spacing).round_ties_even() * spacing;
    let r = if r >= 2f64.powi(128) {
        f64::INFINITY
    } else {
        r
    };
    let v = if x.is_sign_negative() { -r } else { r };
    ((v as f32).to_bits() >> 16) as u16
}

fn narrow_all_paths(xs: &[f32]) -> Vec<Vec<u16>> {
    let mut outs = Vec::new();
    let mut d = vec![0u16; xs.len()];
    f32_to_f16_slice(xs, &mut d);
    outs.push(d);
    let mut b = vec![0u8; 2 * xs.len()];
    paths::narrow_portable(xs, &mut b);
    outs.push(
        b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
    );
    if paths::narrow_f16c(xs, &mut b).is_some() {
        outs.push(
            b.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        );
    }
    outs.push(xs.iter().map(|&x| f32_to_f16(x)).collect());
    outs
}

#[test]
fn f16_widen_exhaustive_all_paths() {
    let halves: Vec<u16> = (0..=u16::MAX).collect();
    let expect: Vec<u32> = halves.iter().map(|&h| ref_f16_to_f32_bits(h)).collect();
    let scalar: Vec<u32> = halves.iter().map(|&h| f16_to_f32(h).to_bits()).collect();
    assert_eq!(scalar, expect);
    let mut out = vec![0f32; halves.len()];
    f16_to_f32_slice(&halves, &mut out);
    assert!(
        out.iter().zip(&expect).all(|(a, &b)| a.to_bits() == b),
        "dispatched path"
    );
    let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    paths::widen_portable(&bytes, &mut out);
    assert!(
        out.iter().zip(&expect).all(|(a, &b)| a.to_bits() == b),
        "portable path"
    );
    if paths::widen_f16c(&bytes, &mut out).is_some() {
        assert!(
            out.iter().zip(&expect).all(|(a, &b)| a.to_bits() == b),
            "f16c path"
        );
    }
}

#[test]
fn f16_narrow_roundtrip_exhaustive() {
    let xs: Vec<f32> = (0..=u16::MAX).map(f16_to_f32).collect();
    for out in narrow_all_paths(&xs) {
        for (h, &back) in (0..=u16::MAX).zip(&out) {
            if xs[h as usize].is_nan() {
                assert!(
                    back & 0x7C00 == 0x7C00 && back & 0x3FF != 0,
                    "{h:#06x} → {back:#06x}"
                );
                assert_eq!(back & 0x8000, h & 0x8000);
            } else {
                assert_eq!(back, h, "{h:#06x}");
            }
        }
    }
}

#[test]
fn f16_midpoints_round_to_even() {
    let mut xs = Vec::new();
    let mut want = Vec::new();
    for sign in [0u16, 0x8000] {
        for h in 0u16..=0x7BFF {
            let lo = f64::from(f16_to_f32(h).abs());
            let hi = if h == 0x7BFF {
                65536.0
            } else {
                f64::from(f16_to_f32(h + 1))
            };
            let mid = ((lo + hi) / 2.0) as f32; // exact: 12 significant bits
            assert_eq!(f64::from(mid), (lo + hi) / 2.0);
            let even = if h % 2 == 0 { h } else { h + 1 };
            let s = |m: f32| if sign != 0 { -m } else { m };
            xs.push(s(mid));
            want.push(sign | even);
            xs.push(s(f32::from_bits(mid.to_bits() - 1)));
            want.push(sign | h);
            xs.push(s(f32::from_bits(mid.to_bits() + 1)));
            want.push(sign | (h + 1));
        }
    }
    for out in narrow_all_paths(&xs) {
        for i in 0..xs.len() {
            assert_eq!(
                out[i],
                want[i],
                "x = {:e} ({:#010x})",
                xs[i],
                xs[i].to_bits()
            );
        }
    }
}

#[test]
fn f16_edge_cases() {
    let p = |e: i32| 2f32.powi(e);
    let cases: &[(f32, u16)] = &[
        (0.0, 0x0000),
        (-0.0, 0x8000),
        (f32::INFINITY, 0x7C00),
        (f32::NEG_INFINITY, 0xFC00),
        (65504.0, 0x7BFF),
        (-65504.0, 0xFBFF),
        (65519.99, 0x7BFF),
        (65520.0, 0x7C00),
        (-65520.0, 0xFC00),
        (1e30, 0x7C00),
        (f32::MAX, 0x7C00),
        (p(-14), 0x0400),
        (p(-24), 0x0001),
        (p(-25), 0x0000),
        (-p(-25), 0x8000),
        (p(-25) * (1.0 + p(-23)), 0x0001),
        (1.5 * p(-24), 0x0002),
        (f32::from_bits(1), 0x0000),
        (-f32::from_bits(0x007F_FFFF), 0x8000),
        (1.0, 0x3C00),
        (-2.0, 0xC000),
    ];
    let xs: Vec<f32> = cases.iter().map(|c| c.0).collect();
    for out in narrow_all_paths(&xs) {
        for (i, &(x, h)) in cases.iter().enumerate() {
            assert_eq!(out[i], h, "x = {x:e}");
            assert_eq!(ref_f32_to_f16(x), h, "reference disagrees for {x:e}");
        }
    }
    // NaN: sign kept, quiet, payload top bits kept.
    let nans = [
        0x7F80_0001u32,
        0xFF80_0001,
        0x7FC0_0000,
        0x7FFF_FFFF,
        0xFFA0_2000,
    ];
    let xs: Vec<f32> = nans.iter().map(|&b| f32::from_bits(b)).collect();
    for out in narrow_all_paths(&xs) {
        for (i, &b) in nans.iter().enumerate() {
            let want = ((b >> 16) & 0x8000) as u16 | 0x7E00 | ((b >> 13) & 0x3FF) as u16;
            assert_eq!(out[i], want, "NaN {b:#010x}");
        }
    }
}

#[test]
fn f16_random_bits_match_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let xs: Vec<f32> = (0..1_000_000)
        .map(|_| f32::from_bits(rng.random()))
        .collect();
    let want: Vec<u16> = xs.iter().map(|&x| ref_f32_to_f16(x)).collect();
    for out in narrow_all_paths(&xs) {
        let bad = out.iter().zip(&want).position(|(a, b)| a != b);
        assert!(bad.is_none(), "x = {:#010x}", xs[bad.unwrap()].to_bits());
    }
}

#[test]
fn bf16_exhaustive() {
    for h in 0..=u16::MAX {
        let x = bf16_to_f32(h);
        assert_eq!(x.to_bits(), u32::from(h) << 16);
        let back = f32_to_bf16(x);
        if x.is_nan() {
            assert!(f32::from_bits(u32::from(back) << 16).is_nan());
            assert_eq!(back & 0x8000, h & 0x8000);
        } else {
            assert_eq!(back, h);
        }
        // Midpoints between adjacent finite magnitudes.
        if h & 0x7FFF < 0x7F80 {
            let mid = (u32::from(h) << 16) | 0x8000;
            let even = if h % 2 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_bf16(f32::from_bits(mid)), even, "{mid:#010x}");
            assert_eq!(f32_to_bf16(f32::from_bits(mid - 1)), h);
            assert_eq!(f32_to_bf16(f32::from_bits(mid + 1)), h + 1);
            assert_eq!(ref_f32_to_bf16(f32::from_bits(mid)), even);
        }
    }
    assert_eq!(f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
    assert!(bf16_to_f32(f32_to_bf16(f32::from_bits(0x7F80_0001))).is_nan());
    assert_eq!(f32_to_bf16(f32::from_bits(0x7F7F_7FFF)), 0x7F7F);
    assert_eq!(f32_to_bf16(f32::from_bits(0x7F7F_8000)), 0x7F80);
    assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
    assert_eq!(f32_to_bf16(-f32::MAX), 0xFF80);
    assert_eq!(f32_to_bf16(f32::from_bits(1)), 0x0000);
    assert_eq!(f32_to_bf16(f32::from_bits(0x0000_8000)), 0x0000); // tie → even
    assert_eq!(f32_to_bf16(f32::from_bits(0x0001_8000)), 0x0002); // tie → even
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut xs: Vec<f32> = (0..1_000_000)
        .map(|_| f32::from_bits(rng.random()))
        .collect();
    // Plus every tie and its neighbours, so the vectorised kernel sees them too.
    for h in 0..=u16::MAX {
        let mid = (u32::from(h) << 16) | 0x8000;
        xs.extend([mid - 1, mid, mid + 1].map(f32::from_bits));
    }
    let mut fast = vec![0u16; xs.len()];
    f32_to_bf16_slice(&xs, &mut fast);
    for (x, &h) in xs.iter().zip(&fast) {
        let want = ref_f32_to_bf16(*x);
        assert_eq!(f32_to_bf16(*x), want, "{:#010x}", x.to_bits());
        assert_eq!(h, want, "slice kernel {:#010x}", x.to_bits());
    }
    // The byte kernels agree with the scalar definition.
    let xs: Vec<f32> = (0..=u16::MAX)
        .map(|h| f32::from_bits(u32::from(h) << 16 | 0x1234))
        .collect();
    let mut bytes = vec![0u8; 2 * xs.len()];
    f32_to_bf16_bytes(&xs, &mut bytes);
    let mut back = vec![0f32; xs.len()];
    bf16_bytes_to_f32(&bytes, &mut back);
    for (x, b) in xs.iter().zip(&back) {
        assert_eq!(b.to_bits(), u32::from(f32_to_bf16(*x)) << 16);
    }
}

/// N(0,1) by Box–Muller from a seeded generator.
pub(crate) fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        out.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
        out.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
    }
    out.truncate(n);
    out
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn mse_bounds_on_normal_tensor() {
    let n = 128 * 128 * 64;
    let x = normals(n, 42);
    let mut buf = Vec::new();
    let cases = [
        (ValueType::F16, Scaling::None, 5e-8),
        (ValueType::Bf16, Scaling::None, 4e-6),
        (ValueType::F16, Scaling::Pow2, 5e-8),
    ];
    for (vt, sc, bound) in cases {
        let st = encode_dense(&x, vt, sc, &mut buf).unwrap();
        assert_eq!(st.nonfinite, 0);
        assert_eq!(buf.len(), 12 + 2 * n);
        let y = decode_dense(&buf, 9, n).unwrap();
        let e = mse(&x, &y);
        assert!(e < bound && e > bound / 10.0, "{vt:?} {sc:?}: mse {e:e}");
    }
    // All-zero input: zeros, finite, for every codec.
    let z = vec![0.0f32; 1000];
    for vt in [ValueType::F32, ValueType::F16, ValueType::Bf16] {
        for sc in [Scaling::None, Scaling::Pow2] {
            let st = encode_dense(&z, vt, sc, &mut buf).unwrap();
            assert_eq!(st.scale_exp, 0);
            let y = decode_dense(&buf, 1, z.len()).unwrap();
            assert!(y.iter().all(|&v| v == 0.0 && v.is_finite()));
        }
    }
}

/// The slice loops check their lengths in every build (the F16C path would otherwise read and
/// write past the shorter buffer): a mismatch panics before any element is touched.
#[test]
fn f16_slice_loops_refuse_mismatched_lengths() {
    let src = [1.0f32; 17];
    for dst_len in [2 * 17 - 2, 2 * 17 + 2, 0] {
        let mut dst = vec![0u8; dst_len];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::narrow_f16(&src, None, &mut dst)
        }));
        assert!(r.is_err(), "narrow into {dst_len} bytes");
        assert!(dst.iter().all(|&b| b == 0), "narrow wrote before refusing");
    }
    let bytes = [0u8; 2 * 17];
    for dst_len in [16, 18] {
        let mut dst = vec![7.0f32; dst_len];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::widen_f16(&bytes, None, &mut dst)
        }));
        assert!(r.is_err(), "widen into {dst_len} values");
        assert!(dst.iter().all(|&v| v == 7.0), "widen wrote before refusing");
    }
    // Matching lengths still convert.
    let mut dst = vec![0u8; 34];
    assert_eq!(super::narrow_f16(&src, None, &mut dst), 0);
}
