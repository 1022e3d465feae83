//! Optimizer steps against hand-computed values (sync.md oracles 1, 2, 6).

use super::*;

fn close(a: f32, b: f64, tol: f64) -> bool {
    (f64::from(a) - b).abs() <= tol
}

#[test]
fn sgd_plain_momentum_nesterov_weight_decay() {
    let mut w = vec![1.0f32];
    let mut o = Optimizer::new(
        OptimizerConfig::Sgd(SgdConfig {
            lr: 0.1,
            ..SgdConfig::default()
        }),
        &w,
        1,
    )
    .unwrap();
    o.step(&mut w, &[2.0], 0).unwrap();
    assert_eq!(w[0], 1.0 - 0.1 * 2.0);

    // Momentum 0.9, two steps of g = 1: buf = 1 then 1.9; w = 1 − 0.1 − 0.19 = 0.71.
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..SgdConfig::default()
    };
    let mut w = vec![1.0f32];
    let mut o = Optimizer::new(OptimizerConfig::Sgd(cfg), &w, 1).unwrap();
    o.step(&mut w, &[1.0], 0).unwrap();
    o.step(&mut w, &[1.0], 0).unwrap();
    assert!(close(w[0], 0.71, 1e-6), "{}", w[0]);

    // Nesterov: d = g + μ·buf: step 1 d = 1.9, step 2 buf = 1.9, d = 1 + 1.71 = 2.71.
    let cfg = SgdConfig {
        nesterov: true,
        ..cfg
    };
    let mut w = vec![1.0f32];
    let mut o = Optimizer::new(OptimizerConfig::Sgd(cfg), &w, 1).unwrap();
    o.step(&mut w, &[1.0], 0).unwrap();
    assert!(close(w[0], 0.81, 1e-6));
    o.step(&mut w, &[1.0], 0).unwrap();
    assert!(close(w[0], 0.81 - 0.271, 1e-6), "{}", w[0]);

    // Weight decay 0.5: d = 2 + 0.5·1 = 2.5.
    let cfg = SgdConfig {
        lr: 0.1,
        weight_decay: 0.5,
        ..SgdConfig::default()
    };
    let mut w = vec![1.0f32];
    let mut o = Optimizer::new(OptimizerConfig::Sgd(cfg), &w, 1).unwrap();
    o.step(&mut w, &[2.0], 0).unwrap();
    assert!(close(w[0], 0.75, 1e-7));
    assert!(o.step(&mut w, &[1.0, 2.0], 0).is_err());
}

#[test]
fn adam_first_steps_by_hand() {
    // Step 1 of Adam moves every coordinate by lr·g/(|g| + eps') ≈ lr·sign(g).
    let cfg = AdamConfig {
        lr: 0.01,
        ..AdamConfig::default()
    };
    let mut w = vec![1.0f32, -1.0, 0.5];
    let mut o = Optimizer::new(OptimizerConfig::Adam(cfg), &w, 1).unwrap();
    o.step(&mut w, &[3.0, -0.2, 0.0], 0).unwrap();
    assert!(
        close(w[0], 0.99, 1e-6) && close(w[1], -0.99, 1e-6) && w[2] == 0.5,
        "{w:?}"
    );
    // Step 2 with g = 1 after g = 3 (coordinate 0), computed in f64.
    o.step(&mut w, &[1.0, -0.2, 0.0], 0).unwrap();
    let (b1, b2) = (0.9f64, 0.999f64);
    let m = b1 * (0.1 * 3.0) + 0.1 * 1.0;
    let v = b2 * (0.001 * 9.0) + 0.001 * 1.0;
    let step = 0.01 * (m / (1.0 - b1 * b1)) / ((v / (1.0 - b2 * b2)).sqrt() + 1e-8);
    assert!(
        close(w[0], 0.99 - step, 1e-6),
        "{} vs {}",
        w[0],
        0.99 - step
    );
    // AdamW: decoupled decay shrinks w before the Adam step.
    let cfg = AdamConfig {
        lr: 0.1,
        weight_decay: 0.1,
        decoupled: true,
        ..AdamConfig::default()
    };
    let mut w = vec![2.0f32];
    let mut o = Optimizer::new(OptimizerConfig::Adam(cfg), &w, 1).unwrap();
    o.step(&mut w, &[1.0], 0).unwrap();
    assert!(close(w[0], 2.0 - 0.02 - 0.1, 1e-6), "{}", w[0]);
}

#[test]
fn dcasgd_hand_value_and_backups() {
    // w = 1.0, w_bak = 0.5, g = 2.0, η = 0.1, λ = 0.04 → 0.792.
    let cfg = DcAsgdConfig {
        lr: 0.1,
        ..DcAsgdConfig::default()
    };
    let theta0 = vec![0.5f32];
    let mut o = Optimizer::new(OptimizerConfig::DcAsgd(cfg), &theta0, 2).unwrap();
    let mut w = vec![1.0f32];
    o.step(&mut w, &[2.0], 1).unwrap();
    assert!(close(w[0], 0.792, 1e-7), "{}", w[0]);
    // Only sender 1's backup changed.
    assert_eq!(o.backup(1), Some(&w[..]));
    assert_eq!(o.backup(0), Some(&[0.5f32][..]));
    assert!(matches!(
        o.step(&mut w, &[2.0], 2),
        Err(KernelError::UnknownSender { .. })
    ));

    // Adaptive: MS = 0, g = 2 → MS = 0.2, λ = 2 / sqrt(0.2 + 1e-7).
    let cfg = DcAsgdConfig {
        lr: 0.1,
        lambda: DcAsgdLambda::Adaptive {
            lambda0: 2.0,
            decay: 0.95,
            eps: 1e-7,
        },
        ..DcAsgdConfig::default()
    };
    let mut o = Optimizer::new(OptimizerConfig::DcAsgd(cfg), &theta0, 1).unwrap();
    let mut w = vec![1.0f32];
    o.step(&mut w, &[2.0], 0).unwrap();
    let lambda = 2.0 / (0.2f64 + 1e-7).sqrt();
    let want = 1.0 - 0.1 * (2.0 + lambda * 4.0 * 0.5);
    assert!(close(w[0], want, 1e-5), "{} vs {want}", w[0]);

    // Momentum form: mom = −η·d; w = w + mom.
    let cfg = DcAsgdConfig {
        lr: 0.1,
        momentum: 0.5,
        ..DcAsgdConfig::default()
    };
    let mut o = Optimizer::new(OptimizerConfig::DcAsgd(cfg), &theta0, 1).unwrap();
    let mut w = vec![1.0f32];
    o.step(&mut w, &[2.0], 0).unwrap();
    assert!(close(w[0], 0.792, 1e-7));
}

#[test]
fn dcasgd_lambda_zero_equals_sgd_bit_for_bit() {
    // Scripted arrival order DC 1, 2, 2, 1, 2 with fixed gradients.
    let n = 64;
    let theta0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
    let grads: Vec<Vec<f32>> = (0..5)
        .map(|r| (0..n).map(|i| ((i * 7 + r * 3) as f32).sin()).collect())
        .collect();
    let order = [0usize, 1, 1, 0, 1];
    let dc = DcAsgdConfig {
        lr: 0.05,
        lambda: DcAsgdLambda::Constant(0.0),
        ..DcAsgdConfig::default()
    };
    let sgd = SgdConfig {
        lr: 0.05,
        ..SgdConfig::default()
    };
    let mut a = Optimizer::new(OptimizerConfig::DcAsgd(dc), &theta0, 2).unwrap();
    let mut b = Optimizer::new(OptimizerConfig::Sgd(sgd), &theta0, 2).unwrap();
    let (mut wa, mut wb) = (theta0.clone(), theta0.clone());
    for (g, &d) in grads.iter().zip(&order) {
        a.step(&mut wa, g, d).unwrap();
        b.step(&mut wb, g, d).unwrap();
        assert!(wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn diloco_worked_example_and_plain_average() {
    // m = 1.0, mean model 0.8 → v = 0.2, m = 0.734; next mean 0.634 → v = 0.28, m = 0.4876.
    let mut o = DilocoOuter::new(1, 0.9, 0.7).unwrap();
    let mut m = vec![1.0f32];
    let mut inc = vec![0.0f32];
    o.increment(&[0.8 - m[0]], &mut inc).unwrap();
    apply_increment(&mut m, &inc).unwrap();
    assert!(
        close(o.velocity()[0], 0.2, 1e-6) && close(m[0], 0.734, 1e-6),
        "{m:?}"
    );
    o.increment(&[0.634 - m[0]], &mut inc).unwrap();
    apply_increment(&mut m, &inc).unwrap();
    assert!(
        close(o.velocity()[0], 0.28, 1e-6) && close(m[0], 0.4876, 1e-6),
        "{m:?}"
    );

    // η_out = 1, μ = 0: the increment is Δ bit for bit (plain HFA averaging).
    let mut o = DilocoOuter::new(5, 0.0, 1.0).unwrap();
    let delta = [0.1f32, -0.0, 0.0, -3.5e-9, 1e30];
    let mut inc = [9.0f32; 5];
    o.increment(&delta, &mut inc).unwrap();
    assert!(
        inc.iter()
            .zip(&delta)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{inc:?}"
    );
    assert!(DilocoOuter::new(1, 1.0, 0.7).is_err());
    assert!(o.increment(&[1.0], &mut [0.0]).is_err());
}

#[test]
fn config_validation() {
    let bad = [
        OptimizerConfig::Sgd(SgdConfig {
            lr: f32::NAN,
            ..SgdConfig::default()
        }),
        OptimizerConfig::Sgd(SgdConfig {
            nesterov: true,
            ..SgdConfig::default()
        }),
        OptimizerConfig::Adam(AdamConfig {
            beta2: 1.0,
            ..AdamConfig::default()
        }),
        OptimizerConfig::Adam(AdamConfig {
            eps: 0.0,
            ..AdamConfig::default()
        }),
        OptimizerConfig::DcAsgd(DcAsgdConfig {
            lambda: DcAsgdLambda::Constant(-1.0),
            ..DcAsgdConfig::default()
        }),
    ];
    for c in bad {
        assert!(Optimizer::new(c, &[0.0], 1).is_err(), "{c:?}");
    }
    assert!(Optimizer::new(OptimizerConfig::DcAsgd(DcAsgdConfig::default()), &[0.0], 0).is_err());
    assert!(!OptimizerConfig::Sgd(SgdConfig::default()).has_momentum());
    assert!(OptimizerConfig::Adam(AdamConfig::default()).has_momentum());
}

/// `set_backup` replaces one sender's backup (the next step compensates against it), rejects a
/// wrong length or sender, and is a no-op for optimizers without backups.
#[test]
fn dcasgd_backups_can_be_set_to_what_a_sender_holds() {
    let cfg = DcAsgdConfig {
        lr: 0.1,
        ..DcAsgdConfig::default()
    };
    let mut o = Optimizer::new(OptimizerConfig::DcAsgd(cfg), &[0.5], 2).unwrap();
    o.set_backup(1, &[0.25]).unwrap();
    assert_eq!(o.backup(1), Some(&[0.25f32][..]));
    assert_eq!(o.backup(0), Some(&[0.5f32][..]));
    assert!(o.set_backup(1, &[0.0, 1.0]).is_err());
    assert!(matches!(
        o.set_backup(2, &[0.0]),
        Err(KernelError::UnknownSender { .. })
    ));
    // w = 1, w_bak = 0.25, g = 2: w − 0.1·(2 + 0.04·4·0.75) = 0.788.
    let mut w = vec![1.0f32];
    o.step(&mut w, &[2.0], 1).unwrap();
    let want = 1.0f32 - 0.1 * (2.0 + 0.04 * 2.0 * 2.0 * (1.0 - 0.25));
    assert_eq!(w[0].to_bits(), want.to_bits());
    let mut sgd = Optimizer::new(OptimizerConfig::Sgd(SgdConfig::default()), &[0.5], 2).unwrap();
    sgd.set_backup(0, &[1.0]).unwrap();
    assert_eq!(sgd.backup(0), None);
}

/// `export_state` / `import_state` round-trip every optimizer: a restored copy steps bit for bit
/// like the original; a state of another shape is refused and changes nothing.
#[test]
fn exported_state_restores_bit_identical_steps() {
    let configs = [
        OptimizerConfig::Sgd(SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            ..SgdConfig::default()
        }),
        OptimizerConfig::Adam(AdamConfig::default()),
        OptimizerConfig::DcAsgd(DcAsgdConfig {
            lr: 0.1,
            momentum: 0.5,
            ..DcAsgdConfig::default()
        }),
    ];
    for cfg in configs {
        let theta0 = [0.5f32, -0.25, 1.0];
        let mut a = Optimizer::new(cfg, &theta0, 2).unwrap();
        let mut w = theta0.to_vec();
        for i in 0..3 {
            a.step(&mut w, &[0.1, -0.2 * i as f32, 0.3], i % 2).unwrap();
        }
        let (tensors, t) = a.export_state();
        let mut b = Optimizer::new(cfg, &theta0, 2).unwrap();
        b.import_state(tensors.clone(), t).unwrap();
        let mut wb = w.clone();
        a.step(&mut w, &[0.2, 0.1, -0.4], 1).unwrap();
        b.step(&mut wb, &[0.2, 0.1, -0.4], 1).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&w), bits(&wb), "{cfg:?}");
        let mut short = tensors.clone();
        short.pop();
        assert!(b.import_state(short, t).is_err());
        let mut wrong = tensors;
        wrong[0].push(1.0);
        assert!(b.import_state(wrong, t).is_err());
        assert_eq!(b.export_state(), a.export_state(), "{cfg:?}");
    }
}

/// DiLoCo's velocity round-trips through `set_velocity`; a wrong length is refused.
#[test]
fn diloco_velocity_can_be_restored() {
    let mut a = DilocoOuter::new(2, 0.9, 0.7).unwrap();
    let mut out = [0.0f32; 2];
    a.increment(&[0.5, -1.0], &mut out).unwrap();
    let mut b = DilocoOuter::new(2, 0.9, 0.7).unwrap();
    assert!(b.set_velocity(vec![0.0]).is_err());
    b.set_velocity(a.velocity().to_vec()).unwrap();
    let (mut oa, mut ob) = ([0.0f32; 2], [0.0f32; 2]);
    a.increment(&[0.25, 0.5], &mut oa).unwrap();
    b.increment(&[0.25, 0.5], &mut ob).unwrap();
    assert_eq!(oa, ob);
}
