//! CUDA kernels against their CPU oracles (the crate's CPU kernels). Every test skips, printing
//! why, when no CUDA device, driver or NVRTC is available.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use geomx_kernels::cuda::fill::{bits_at, splitmix64, uniform_at};
use geomx_kernels::cuda::{CudaDevice, CudaError, CudaSlice, TopkWorkspace};
use geomx_kernels::device::Device;
use geomx_kernels::dgt_score::BlockScores;
use geomx_kernels::topk::TopkScratch;
use geomx_kernels::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, topk_exact, SparseVec};

/// The GPU, or `None` (with the reason printed) on a machine without one.
fn gpu() -> Option<Arc<CudaDevice>> {
    match CudaDevice::new(0) {
        Ok(d) => Some(d),
        Err(e @ (CudaError::NoCudaDevice { .. } | CudaError::NvrtcUnavailable { .. })) => {
            eprintln!("skipping CUDA test: {e}");
            None
        }
        Err(e) => panic!("unexpected CUDA error while opening device 0: {e}"),
    }
}

fn up<T: cudarc::driver::DeviceRepr>(d: &CudaDevice, x: &[T]) -> CudaSlice<T> {
    d.stream().clone_htod(x).expect("upload")
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(
    d: &CudaDevice,
    x: &CudaSlice<T>,
) -> Vec<T> {
    d.stream().clone_dtoh(x).expect("download")
}

fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    d: &CudaDevice,
    n: usize,
) -> CudaSlice<T> {
    d.stream().alloc_zeros(n).expect("alloc")
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// f32 inputs for the cast tests: spec edges, every midpoint between adjacent finite halves and
/// its ±1 ulp neighbours, every half widened, and 10^6 + 3 random bit patterns.
fn cast_inputs() -> Vec<f32> {
    let mut x: Vec<f32> = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFF80_0001),
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        2f32.powi(-14),
        2f32.powi(-24),
        2f32.powi(-25),
        2f32.powi(-25) * (1.0 + 2f32.powi(-23)),
        1.5 * 2f32.powi(-24),
        f32::from_bits(1),
        f32::from_bits(0x807F_FFFF),
        f32::MAX,
        f32::from_bits(0x7F7F_7FFF),
        f32::from_bits(0x7F7F_8000),
    ]
    .to_vec();
    for h in 0u16..0x7C00 {
        let lo = f16_to_f32(h);
        let hi = f16_to_f32(h + 1);
        let mid = ((f64::from(lo) + f64::from(hi)) / 2.0) as f32;
        for m in [
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            x.push(m);
            x.push(-m);
        }
    }
    x.extend((0..=u16::MAX).map(f16_to_f32));
    x.extend((0..1_000_003u64).map(|i| f32::from_bits(bits_at(11, i))));
    x
}

#[test]
fn f16_casts_are_bit_exact() {
    let Some(d) = gpu() else { return };
    // Widening: all 65,536 patterns.
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let mut wide = zeros::<f32>(&d, all.len());
    d.f16_to_f32(&up(&d, &all), &mut wide).unwrap();
    let wide = down(&d, &wide);
    for (&h, &w) in all.iter().zip(&wide) {
        assert_eq!(w.to_bits(), f16_to_f32(h).to_bits(), "widen {h:#06x}");
    }
    // Narrowing.
    let x = cast_inputs();
    let mut h = zeros::<u16>(&d, x.len());
    d.f32_to_f16(&up(&d, &x), &mut h).unwrap();
    let h = down(&d, &h);
    for (&xi, &hi) in x.iter().zip(&h) {
        assert_eq!(hi, f32_to_f16(xi), "narrow {:#010x}", xi.to_bits());
    }
}

#[test]
fn bf16_casts_are_bit_exact() {
    let Some(d) = gpu() else { return };
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let mut wide = zeros::<f32>(&d, all.len());
    d.bf16_to_f32(&up(&d, &all), &mut wide).unwrap();
    let wide = down(&d, &wide);
    for (&h, &w) in all.iter().zip(&wide) {
        assert_eq!(w.to_bits(), bf16_to_f32(h).to_bits(), "widen {h:#06x}");
    }
    let x = cast_inputs();
    let mut b = zeros::<u16>(&d, x.len());
    d.f32_to_bf16(&up(&d, &x), &mut b).unwrap();
    let b = down(&d, &b);
    for (&xi, &bi) in x.iter().zip(&b) {
        assert_eq!(bi, f32_to_bf16(xi), "narrow {:#010x}", xi.to_bits());
    }
}

#[test]
fn device_fill_matches_its_cpu_mirror() {
    let Some(d) = gpu() else { return };
    let mut x = zeros::<f32>(&d, 100_003);
    d.fill_uniform(&mut x, 5).unwrap();
    let x = down(&d, &x);
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(
            v.to_bits(),
            uniform_at(5, i as u64).to_bits(),
            "uniform {i}"
        );
        assert!((-1.0..1.0).contains(&v));
    }
    let mut y = zeros::<f32>(&d, 1001);
    d.fill_bits(&mut y, 9).unwrap();
    let y = down(&d, &y);
    for (i, &v) in y.iter().enumerate() {
        assert_eq!(v.to_bits(), bits_at(9, i as u64), "bits {i}");
    }
}

/// The copy stream sees what the default stream's kernels wrote before the copy was queued, and
/// the default stream's later work sees what the copy stream brought to the device.
#[test]
fn copy_stream_is_ordered_with_the_default_stream() {
    use cudarc::driver::DevicePtr;
    use geomx_kernels::cuda::CopyStream;
    let Some(d) = gpu() else { return };
    let n = (1 << 22) + 5;
    let copies = CopyStream::new(&d).unwrap();
    let mut x = zeros::<f32>(&d, n);
    let mut host = d.pinned::<f32>(n).unwrap();
    for seed in 0..3u64 {
        // A kernel writes x on the default stream; the copy is queued right behind it.
        d.fill_uniform(&mut x, seed).unwrap();
        let (ptr, guard) = x.device_ptr(d.stream());
        drop(guard);
        let dst = CudaDevice::pinned_mut(&mut host).unwrap();
        (dst[0], dst[n - 1]) = (-1.0, -1.0);
        // SAFETY: `x` and `host` live and are untouched until `wait` below.
        let copied = unsafe { copies.dtoh_after_default(ptr + 4, &mut dst[1..n - 1]) }.unwrap();
        copied.wait().unwrap();
        let dst = CudaDevice::pinned_mut(&mut host).unwrap();
        for (i, v) in dst.iter().enumerate().take(n - 1).skip(1) {
            assert_eq!(
                v.to_bits(),
                uniform_at(seed, i as u64).to_bits(),
                "seed {seed} element {i}"
            );
        }
        // The elements outside the copied range were not written.
        assert_eq!((dst[0], dst[n - 1]), (-1.0, -1.0), "seed {seed}");
        // Back to the device: the default stream's download afterwards sees the new values.
        for (i, v) in dst.iter_mut().enumerate() {
            *v = i as f32 + seed as f32;
        }
        let dst = CudaDevice::pinned_mut(&mut host).unwrap();
        // SAFETY: `x` lives until the download below, which the default stream orders after it.
        let up = unsafe { copies.htod(dst, ptr, seed != 1) }.unwrap();
        up.order_default().unwrap();
        let back = down(&d, &x);
        for (i, v) in back.iter().enumerate() {
            assert_eq!(*v, i as f32 + seed as f32, "seed {seed} element {i}");
        }
    }
}

/// Test vectors for top-k: `kind` 0 = small integer set with zeros and ±0 (many ties),
/// 1 = uniform, 2 = random bit patterns (NaN, inf, subnormals), 3 = one constant with every
/// seventh element zero (all ties: the lowest indices win).
fn topk_input(n: usize, kind: u32, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let r = splitmix64(seed ^ i.wrapping_mul(0x9E37));
            match kind {
                0 => match r % 9 {
                    0 => 0.0,
                    1 => -0.0,
                    m => (m as f32 - 5.0) * 0.5,
                },
                1 => uniform_at(seed, i),
                2 => f32::from_bits(r as u32),
                _ => {
                    if i % 7 == 0 {
                        0.0
                    } else {
                        -1.25
                    }
                }
            }
        })
        .collect()
}

fn cpu_topk(v: &[f32], k: usize) -> Vec<u32> {
    let mut out = Vec::new();
    topk_exact(v, k, &mut TopkScratch::default(), &mut out).unwrap();
    out
}

#[test]
fn topk_equals_the_cpu_selection() {
    let Some(d) = gpu() else { return };
    let mut ws = TopkWorkspace::new(&d, 1_000_000).unwrap();
    for n in [1usize, 7, 1000, 4097, 1_000_000] {
        let ks = [1, n.div_ceil(1000), n.div_ceil(100), n];
        for kind in 0..4 {
            let v = topk_input(n, kind, n as u64 * 31 + kind as u64);
            let vd0 = up(&d, &v);
            for &k in &ks {
                let want = cpu_topk(&v, k);
                let mut vd = vd0.clone();
                let sel = d.topk_into(&mut ws, &mut vd, None, k, false).unwrap();
                let (idx, val) = sel.to_host(&d).unwrap();
                let idx32: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                assert_eq!(idx32, want, "n={n} kind={kind} k={k}");
                let want_val: Vec<f32> = want.iter().map(|&i| v[i as usize]).collect();
                assert_eq!(
                    bits(&val),
                    bits(&want_val),
                    "values n={n} kind={kind} k={k}"
                );
                assert_eq!(bits(&down(&d, &vd)), bits(&v), "v changed without a move");
            }
        }
    }
}

#[test]
fn topk_move_zeroes_v_and_u() {
    let Some(d) = gpu() else { return };
    let v = topk_input(50_000, 0, 3);
    let u: Vec<f32> = (0..v.len()).map(|i| i as f32 + 1.0).collect();
    let (mut vd, mut ud) = (up(&d, &v), up(&d, &u));
    let sel = d.topk(&mut vd, Some(&mut ud), 500, true).unwrap();
    let (idx, _) = sel.to_host(&d).unwrap();
    let want = cpu_topk(&v, 500);
    assert_eq!(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), want);
    let (mut ve, mut ue) = (v.clone(), u.clone());
    for &i in &want {
        ve[i as usize] = 0.0;
        ue[i as usize] = 0.0;
    }
    assert_eq!(bits(&down(&d, &vd)), bits(&ve));
    assert_eq!(bits(&down(&d, &ud)), bits(&ue));
}

/// Spec oracle 1 (per round, bit-exact) for the fused update + selection, m = 0 and m = 0.9.
#[test]
fn fused_error_feedback_round_invariant() {
    let Some(d) = gpu() else { return };
    let n = 20_011;
    let k = 200;
    for m in [0.0f32, 0.9] {
        let mut ws = TopkWorkspace::new(&d, n).unwrap();
        let mut u = vec![0f32; n];
        let mut v = vec![0f32; n];
        let (mut ud, mut vd) = (up(&d, &u), up(&d, &v));
        for round in 0..20u64 {
            let g = topk_input(n, 1, 100 + round);
            // CPU reference of the update (the crate's f32 arithmetic, no FMA).
            let mut u_mid = u.clone();
            let mut v_mid = v.clone();
            for i in 0..n {
                u_mid[i] = if m == 0.0 { g[i] } else { m * u[i] + g[i] };
                v_mid[i] = v[i] + u_mid[i];
            }
            let sel = d
                .ef_update_topk(&mut ws, &mut ud, &mut vd, &up(&d, &g), m, k)
                .unwrap();
            let (idx, sent) = sel.to_host(&d).unwrap();
            let want = cpu_topk(&v_mid, k);
            assert_eq!(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                want,
                "m={m} r={round}"
            );
            u = down(&d, &ud);
            v = down(&d, &vd);
            let mut in_sel = vec![false; n];
            for (&i, &s) in idx.iter().zip(&sent) {
                let i = i as usize;
                in_sel[i] = true;
                assert_eq!(s.to_bits(), v_mid[i].to_bits(), "sent value at {i}");
                assert_eq!(v[i].to_bits(), 0, "v after at {i}");
                assert_eq!(u[i].to_bits(), 0, "u after at {i}");
            }
            for i in (0..n).filter(|&i| !in_sel[i]) {
                assert_eq!(v[i].to_bits(), v_mid[i].to_bits(), "residual at {i}");
                assert_eq!(u[i].to_bits(), u_mid[i].to_bits(), "velocity at {i}");
            }
        }
    }
}

/// Spec oracle 2: m = 0, integer gradients |g| < 2^10, 1000 rounds: Σ sent + v == Σ g exactly.
#[test]
fn error_feedback_cumulative_sum_is_exact() {
    let Some(d) = gpu() else { return };
    let n = 3 * 4096 + 17;
    let mut ws = TopkWorkspace::new(&d, n).unwrap();
    let (mut ud, mut vd) = (zeros::<f32>(&d, n), zeros::<f32>(&d, n));
    let mut sum_g = vec![0f64; n];
    let mut sum_sent = vec![0f64; n];
    for round in 0..1000u64 {
        let g: Vec<f32> = (0..n as u64)
            .map(|i| ((splitmix64(round << 32 | i) % 2047) as f32) - 1023.0)
            .collect();
        for (s, &x) in sum_g.iter_mut().zip(&g) {
            *s += f64::from(x);
        }
        let sel = d
            .ef_update_topk(&mut ws, &mut ud, &mut vd, &up(&d, &g), 0.0, 41)
            .unwrap();
        let (idx, sent) = sel.to_host(&d).unwrap();
        for (&i, &s) in idx.iter().zip(&sent) {
            sum_sent[i as usize] += f64::from(s);
        }
    }
    let v = down(&d, &vd);
    for i in 0..n {
        assert_eq!(sum_sent[i] + f64::from(v[i]), sum_g[i], "element {i}");
    }
}

#[test]
fn ef_update_and_threshold_count_match_the_cpu() {
    let Some(d) = gpu() else { return };
    let n = 77_777;
    let u = topk_input(n, 1, 1);
    let v = topk_input(n, 0, 2);
    let g = topk_input(n, 1, 3);
    for m in [0.0f32, 0.9] {
        let (mut ud, mut vd) = (up(&d, &u), up(&d, &v));
        let t = 0.75f32;
        let count = d
            .ef_update_count_ge(&mut ud, &mut vd, &up(&d, &g), m, t)
            .unwrap();
        let (mut uc, mut vc) = (u.clone(), v.clone());
        let cpu = Device::Cpu;
        if m == 0.0 {
            cpu.error_feedback(None, &mut vc, &g, 0.0).unwrap();
        } else {
            cpu.error_feedback(Some(&mut uc), &mut vc, &g, m).unwrap();
            assert_eq!(bits(&down(&d, &ud)), bits(&uc));
        }
        assert_eq!(bits(&down(&d, &vd)), bits(&vc), "m={m}");
        let want = vc
            .iter()
            .filter(|x| **x != 0.0 && x.abs().total_cmp(&t).is_ge())
            .count();
        assert_eq!(count, want as u64);
        // The plain update gives the same bits.
        let (mut ud2, mut vd2) = (up(&d, &u), up(&d, &v));
        d.ef_update(&mut ud2, &mut vd2, &up(&d, &g), m).unwrap();
        assert_eq!(bits(&down(&d, &vd2)), bits(&vc));
    }
}

#[test]
fn scatter_add_equals_sequential_cpu_sum() {
    let Some(d) = gpu() else { return };
    let n = 100_000u32;
    let mut cpu = vec![0f32; n as usize];
    let mut dense = zeros::<f32>(&d, n as usize);
    for dc in 0..4u64 {
        let idx: Vec<u32> = (0..n)
            .filter(|&i| splitmix64(dc << 40 | u64::from(i)) % 5 == 0)
            .collect();
        let val: Vec<f32> = idx
            .iter()
            .map(|&i| uniform_at(dc, u64::from(i)) * 1e3)
            .collect();
        let s = SparseVec::new(n, idx.clone(), val.clone()).unwrap();
        s.scatter_add_into(&mut cpu).unwrap();
        d.scatter_add(&mut dense, 0, &up(&d, &idx), &up(&d, &val))
            .unwrap();
    }
    assert_eq!(bits(&down(&d, &dense)), bits(&cpu));
    // Out-of-range indices are reported, not written.
    let err = d
        .scatter_add(&mut dense, 0, &up(&d, &[1u32, n]), &up(&d, &[1.0f32, 1.0]))
        .unwrap_err();
    assert!(
        matches!(err, CudaError::IndexOutOfRange { count: 1, .. }),
        "{err}"
    );
}

#[test]
fn dgt_block_mean_matches_block_scores() {
    let Some(d) = gpu() else { return };
    for (n, per) in [
        (1usize, 1024usize),
        (1023, 1024),
        (1025, 1024),
        (1_000_000, 1024),
        (5000, 352),
    ] {
        let x = topk_input(n, 1, n as u64);
        let nb = n.div_ceil(per);
        let mut out = zeros::<f64>(&d, nb);
        d.block_mean_abs(&up(&d, &x), per, &mut out).unwrap();
        let got = down(&d, &out);
        // α = 0: the contribution is exactly this round's mean.
        let mut scores = BlockScores::new(n, per, 0.0).unwrap();
        scores.update(&x).unwrap();
        for (j, (&g, &w)) in got.iter().zip(scores.scores()).enumerate() {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs(),
                "n={n} block {j}: {g} vs {w}"
            );
        }
    }
}

/// The run-time dispatch gives the same results on both backends.
#[test]
fn device_enum_cuda_matches_cpu() {
    let Some(_) = gpu() else { return };
    let gpu = Device::cuda(0).unwrap();
    assert!(gpu.is_cuda());
    let cpu = Device::Cpu;
    let x = topk_input(123_457, 2, 8);
    let (mut a, mut b) = (vec![0u16; x.len()], vec![0u16; x.len()]);
    assert_eq!(
        gpu.f32_to_f16(&x, &mut a).unwrap(),
        cpu.f32_to_f16(&x, &mut b).unwrap()
    );
    assert_eq!(a, b);
    assert_eq!(
        gpu.f32_to_bf16(&x, &mut a).unwrap(),
        cpu.f32_to_bf16(&x, &mut b).unwrap()
    );
    assert_eq!(a, b);
    let v = topk_input(123_457, 0, 9);
    assert_eq!(
        gpu.topk_exact(&v, 1234).unwrap(),
        cpu.topk_exact(&v, 1234).unwrap()
    );
    let (mut v1, mut v2) = (v.clone(), v.clone());
    let (mut u1, mut u2) = (v.clone(), v.clone());
    let s1 = gpu.take_topk(Some(&mut u1), &mut v1, 999).unwrap();
    let s2 = cpu.take_topk(Some(&mut u2), &mut v2, 999).unwrap();
    assert_eq!(s1, s2);
    assert_eq!(bits(&v1), bits(&v2));
    assert_eq!(bits(&u1), bits(&u2));
    let (mut d1, mut d2) = (vec![1f32; v.len()], vec![1f32; v.len()]);
    gpu.scatter_add(&s1, &mut d1).unwrap();
    cpu.scatter_add(&s2, &mut d2).unwrap();
    assert_eq!(bits(&d1), bits(&d2));
}

/// Tensors above 2^32 elements: 64-bit launch arithmetic in the casts and the top-k passes.
#[test]
fn more_than_2_pow_32_elements() {
    let Some(d) = gpu() else { return };
    let n: usize = (1usize << 32) + 4099;
    let need = n * (4 + 2) + (1 << 30);
    let (free, _) = d.mem_info().unwrap();
    if free < need {
        eprintln!("skipping >2^32 test: {free} bytes free, {need} needed");
        return;
    }
    let s = d.stream().clone();
    let mut x = zeros::<f32>(&d, n);
    d.fill_bits(&mut x, 77).unwrap();
    let mut h = zeros::<u16>(&d, n);
    d.f32_to_f16(&x, &mut h).unwrap();
    let windows = [0..4096, (1 << 32) - 2048..(1 << 32) + 2048, n - 4099..n];
    for w in windows {
        let hw = s.clone_dtoh(&h.slice(w.clone())).unwrap();
        for (j, &hv) in w.clone().zip(&hw) {
            assert_eq!(
                hv,
                f32_to_f16(f32::from_bits(bits_at(77, j as u64))),
                "index {j}"
            );
        }
    }
    drop(h);
    // Top-k: uniform |x| < 1 everywhere except five planted values, two beyond 2^32.
    d.fill_uniform(&mut x, 78).unwrap();
    let planted = [
        (3usize, 5.0f32),
        (1 << 31, -4.0),
        ((1 << 32) - 1, 3.0),
        (1 << 32, -2.0),
        (n - 1, 7.0),
    ];
    for &(i, val) in &planted {
        s.memcpy_htod(&[val], &mut x.slice_mut(i..i + 1)).unwrap();
    }
    let sel = d.topk(&mut x, None, planted.len(), true).unwrap();
    let (idx, val) = sel.to_host(&d).unwrap();
    assert_eq!(idx, planted.iter().map(|p| p.0 as u64).collect::<Vec<_>>());
    assert_eq!(val, planted.iter().map(|p| p.1).collect::<Vec<_>>());
    let after = s.clone_dtoh(&x.slice(n - 1..n)).unwrap();
    assert_eq!(after, vec![0.0], "moved value beyond 2^32 not cleared");
}

/// The segmented kernels (one launch for all of a model's tensors) against the host's pow2 FP16
/// encoder, segment by segment: the maximum |x| key, the exponent derived from it and every
/// payload byte. Segments: empty ones, the cast edge cases (NaN, inf, subnormals: no scaling),
/// random values of magnitudes from 2^-140 to 2^100 (every scaling regime), and 70,000 short
/// segments (more than one launch's 65,535).
#[test]
fn segmented_fp16_encoding_equals_the_host_encoder() {
    use geomx_kernels::cuda::pow2_factors;
    use geomx_kernels::dense::{max_abs_key, pow2_exponent};
    use geomx_kernels::{encode_dense, Scaling, ValueType, HEADER_LEN};
    let Some(d) = gpu() else { return };
    let mut segs: Vec<Vec<f32>> = vec![Vec::new(), cast_inputs(), Vec::new()];
    for (i, e) in [-140i32, -126, -100, -30, -1, 0, 7, 15, 16, 40, 100]
        .iter()
        .enumerate()
    {
        let n = 1 + (splitmix64(i as u64) % 5000) as usize;
        let s = 2f64.powi(*e);
        segs.push(
            (0..n)
                .map(|j| ((uniform_at(i as u64 + 7, j as u64) as f64 * 2.0 - 1.0) * s) as f32)
                .collect(),
        );
    }
    for i in 0..70_000u64 {
        segs.push((0..3).map(|j| uniform_at(i, j) * (i % 97) as f32).collect());
    }
    let lens: Vec<usize> = segs.iter().map(Vec::len).collect();
    let flat: Vec<f32> = segs.concat();
    let layout = d.segments(&lens).expect("segments");
    assert_eq!(layout.total(), flat.len());
    let src = up(&d, &flat);
    let mut keys = zeros::<u32>(&d, lens.len());
    d.max_abs_key_segments(&src, &layout, &mut keys)
        .expect("max");
    let keys = down(&d, &keys);
    let mut factors = Vec::with_capacity(2 * lens.len());
    for (s, seg) in segs.iter().enumerate() {
        assert_eq!(keys[s], max_abs_key(seg), "max key of segment {s}");
        let (a, b) = pow2_factors(pow2_exponent(keys[s]));
        factors.extend([a, b]);
    }
    let factors = up(&d, &factors);
    let mut out = zeros::<u16>(&d, flat.len());
    d.f32_to_f16_scaled_segments(&src, &layout, &factors, &mut out)
        .expect("cast");
    let out = down(&d, &out);
    let mut host = Vec::new();
    for (s, seg) in segs.iter().enumerate() {
        encode_dense(seg, ValueType::F16, Scaling::Pow2, &mut host).unwrap();
        let gpu_bytes: Vec<u8> = out[layout.range(s)]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        assert!(
            host[HEADER_LEN..] == gpu_bytes[..],
            "segment {s} ({} values) differs",
            seg.len()
        );
    }
    // Mismatched lengths are errors, not launches.
    let mut short = zeros::<u16>(&d, flat.len() - 1);
    assert!(d
        .f32_to_f16_scaled_segments(&src, &layout, &up(&d, &[1f32, 1.0]), &mut short)
        .is_err());
}
