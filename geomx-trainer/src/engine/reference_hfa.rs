//! The single-process HFA reference: what a HiPS HFA run computes, on one machine.
//!
//! Each of the W workers (DCs in order, ranks in order) takes its next batch every training
//! round and steps its own model with its own optimizer. Every `k1` rounds each DC averages its
//! workers' models (w̄_d = Σ_i w_i / n_d, ranks in order); every `k2`-th averaging is global:
//! each DC contributes s_d = f_d·(w̄_d − m) (f_d = n_d for `data` weighting, W/D for `equal`),
//! Σ_d s_d (DCs in order) is divided by the workers summed, the outer step turns that mean Δ into
//! the increment δ (Δ itself, or DiLoCo's Nesterov step) and the milestone moves: m ← m + δ.
//! Every worker then starts again from m. With `correction = "scaffold"` every worker's steps use
//! its control variates ([`super::scaffold`]), updated at each global averaging it counted in.
//! This is sync.md's HFA with f32 tiers, in the order the servers compute it, so a distributed
//! run must match it bit for bit.
//!
//! [`hfa_reference_with`] also replays a run that lost processes: a worker (or a whole DC) that
//! does not count in an averaging is absent from it, and a worker that counts again after an
//! averaging it missed has rejoined: it starts from its DC's model after that averaging (the
//! milestone if no worker of the DC counted) with fresh optimizer state and zero variates, as a
//! restarted worker does.

use geomx_kernels::optim::DilocoOuter;

use super::reference::{accumulate, start, ReferenceError, ReferenceRun, Start};
use super::scaffold::ControlVariates;
use super::Optimizer;
use crate::config::{Config, HfaWeighting, OuterOptimizer};
use crate::data::TrainTest;

/// Runs HFA on one machine for `rounds` training rounds (or the configured length), where
/// `counts(dc, rank, tensor, averaging)` says whether worker (dc, rank)'s model of `tensor`
/// counts in local averaging `averaging` (0-based; averaging `a` follows training round
/// `(a + 1)·k1 − 1`). The result's `params` is the milestone m (the global servers' θ).
pub fn hfa_reference_with(
    cfg: &Config,
    data: &TrainTest,
    rounds: Option<u64>,
    counts: impl Fn(usize, usize, usize, u64) -> bool,
) -> Result<ReferenceRun, ReferenceError> {
    let hfa = &cfg.sync.hfa;
    if hfa.isolated {
        return Err(ReferenceError::Unsupported(
            "sync.hfa.isolated (no global averaging) has no HFA reference".into(),
        ));
    }
    let (k1, k2) = (hfa.k1.max(1), hfa.k2.max(1));
    let dcs: Vec<usize> = cfg.cluster.data_centers.iter().map(|d| d.workers).collect();
    let workers: usize = dcs.iter().sum();
    let Start {
        model,
        mut batchers,
        rounds,
        theta0: mut m,
    } = start(cfg, data, rounds)?;
    let n_t = m.len();
    let fresh = |m: &[Vec<f32>]| -> Vec<Optimizer> {
        m.iter()
            .map(|p| Optimizer::new(&cfg.train.optimizer, p.len()))
            .collect()
    };
    let mut outer = m
        .iter()
        .map(|p| match hfa.outer {
            OuterOptimizer::Average => Ok(None),
            OuterOptimizer::Nesterov => {
                DilocoOuter::new(p.len(), hfa.outer_momentum, hfa.outer_lr).map(Some)
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ReferenceError::Unsupported(format!("sync.hfa outer step: {e}")))?;
    let mut params = vec![m.clone(); workers];
    let lens: Vec<usize> = m.iter().map(Vec::len).collect();
    let variates = || ControlVariates::of(hfa, &cfg.train.optimizer, &lens);
    let mut cvs: Vec<Option<ControlVariates>> = (0..workers).map(|_| variates()).collect();
    let mut opts: Vec<Vec<Optimizer>> = (0..workers).map(|_| fresh(&m)).collect();
    // Whether each worker's tensor counted in the last averaging.
    let mut counted = vec![vec![true; n_t]; workers];
    // Each DC's workers' model after the last averaging, per tensor (`None`: the milestone).
    let mut dc_model: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; n_t]; dcs.len()];
    let index = |d: usize, r: usize| dcs[..d].iter().sum::<usize>() + r;
    let mut run = ReferenceRun {
        params: Vec::new(),
        rounds,
        train_loss: Vec::with_capacity(rounds as usize),
        evals: Vec::new(),
    };
    for round in 0..rounds {
        let averaging = round / k1;
        if round % k1 == 0 && averaging > 0 {
            // Workers that count again after missing the last averaging have rejoined.
            for (d, &n_d) in dcs.iter().enumerate() {
                for r in 0..n_d {
                    let w = index(d, r);
                    for t in 0..n_t {
                        if counts(d, r, t, averaging) && !counted[w][t] {
                            params[w][t] = dc_model[d][t].clone().unwrap_or_else(|| m[t].clone());
                            opts[w][t] = Optimizer::new(&cfg.train.optimizer, m[t].len());
                            if let Some(cv) = cvs[w].as_mut() {
                                cv.reset(t);
                            }
                        }
                    }
                }
            }
        }
        let mut loss_sum = 0f32;
        for w in 0..workers {
            let batch = batchers[w].next_batch(&data.train);
            let (loss, mut grads) = model.loss_and_grad(&params[w], batch.view())?;
            loss_sum += loss;
            for (t, g) in grads.iter_mut().enumerate() {
                if let Some(cv) = &cvs[w] {
                    cv.correct(t, g);
                }
                opts[w][t].step(&mut params[w][t], g)?;
            }
        }
        run.train_loss.push(loss_sum / workers as f32);
        if (round + 1) % k1 == 0 {
            let global = (averaging + 1) % k2 == 0;
            for t in 0..n_t {
                // SCAFFOLD: the milestone and every worker's model before a global averaging.
                let before = (global && cvs.iter().any(Option::is_some)).then(|| {
                    (
                        m[t].clone(),
                        params.iter().map(|p| p[t].clone()).collect::<Vec<_>>(),
                    )
                });
                average_tensor(
                    &Tensor {
                        t,
                        averaging,
                        global,
                        dcs: &dcs,
                        total_workers: workers,
                        weighting: hfa.weighting,
                    },
                    &counts,
                    &mut params,
                    &mut m[t],
                    outer[t].as_mut(),
                    &mut dc_model,
                )?;
                for (d, &n_d) in dcs.iter().enumerate() {
                    for r in 0..n_d {
                        let w = index(d, r);
                        counted[w][t] = counts(d, r, t, averaging);
                        if let (Some(cv), Some((x, ys))) = (cvs[w].as_mut(), &before) {
                            if counted[w][t] {
                                cv.update(t, x, &ys[w], &m[t]);
                            }
                        }
                    }
                }
            }
        }
        let every = cfg.train.eval_every;
        if round + 1 == rounds || (every > 0 && (round + 1) % every == 0) {
            run.evals
                .push((round + 1, model.evaluate(&m, data.test.view())?));
        }
    }
    run.params = m;
    Ok(run)
}

/// One tensor's averaging: which, and the cluster's shape.
struct Tensor<'a> {
    t: usize,
    averaging: u64,
    global: bool,
    dcs: &'a [usize],
    total_workers: usize,
    weighting: HfaWeighting,
}

/// Averages tensor `a.t` of every DC's counted workers; on a global averaging also moves the
/// milestone `m` and sends every worker back to it.
fn average_tensor(
    a: &Tensor<'_>,
    counts: &impl Fn(usize, usize, usize, u64) -> bool,
    params: &mut [Vec<Vec<f32>>],
    m: &mut Vec<f32>,
    outer: Option<&mut DilocoOuter>,
    dc_model: &mut [Vec<Option<Vec<f32>>>],
) -> Result<(), ReferenceError> {
    let t = a.t;
    let mut total: Option<Vec<f32>> = None;
    let mut summed = 0u32;
    let mut first = 0;
    for (d, &n_d) in a.dcs.iter().enumerate() {
        let ranks: Vec<usize> = (0..n_d).filter(|&r| counts(d, r, t, a.averaging)).collect();
        let mut sum: Option<Vec<f32>> = None;
        for &r in &ranks {
            accumulate(&mut sum, params[first + r][t].clone());
        }
        let n = ranks.len();
        let mean = sum.map(|mut s| {
            s.iter_mut().for_each(|x| *x /= n as f32);
            s
        });
        if a.global {
            if let Some(mut s) = mean {
                let f = match a.weighting {
                    HfaWeighting::Data => n as f32,
                    HfaWeighting::Equal => a.total_workers as f32 / a.dcs.len().max(1) as f32,
                };
                s.iter_mut()
                    .zip(m.iter())
                    .for_each(|(x, &mi)| *x = f * (*x - mi));
                accumulate(&mut total, s);
                summed += n as u32;
            }
        } else {
            for &r in &ranks {
                params[first + r][t].clone_from(mean.as_ref().unwrap_or(m));
            }
            dc_model[d][t] = mean;
        }
        first += n_d;
    }
    if !a.global {
        return Ok(());
    }
    if let Some(mut delta) = total {
        delta.iter_mut().for_each(|x| *x /= summed as f32);
        let inc = match outer {
            None => delta,
            Some(o) => {
                let mut inc = vec![0.0; delta.len()];
                o.increment(&delta, &mut inc)
                    .map_err(|e| ReferenceError::Unsupported(format!("outer step: {e}")))?;
                inc
            }
        };
        m.iter_mut().zip(&inc).for_each(|(x, d)| *x += d);
    }
    for p in params.iter_mut() {
        p[t].clone_from(m);
    }
    for d in dc_model.iter_mut() {
        d[t] = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncAlgorithm;
    use crate::engine::reference::fsa_reference;

    fn small(k1: u64, k2: u64) -> (Config, TrainTest) {
        let (mut cfg, data) = crate::engine::reference::tests::small();
        cfg.train.eval_every = 0;
        cfg.sync.algorithm = SyncAlgorithm::Hfa;
        cfg.sync.hfa.k1 = k1;
        cfg.sync.hfa.k2 = k2;
        (cfg, data)
    }

    #[test]
    fn averaging_every_step_globally_is_fsa() {
        // k1 = k2 = 1: every worker steps from m with its own momentum, the DCs' data-weighted
        // deltas average to −lr·(mean momentum step), and momentum is linear in the gradients,
        // so HFA is FSA up to the f32 rounding of the extra averaging (a few ulps in 12 rounds).
        let (cfg, data) = small(1, 1);
        let hfa = hfa_reference_with(&cfg, &data, Some(12), |_, _, _, _| true).unwrap();
        let fsa = fsa_reference(&cfg, &data, Some(12)).unwrap();
        for (a, b) in hfa.params.iter().flatten().zip(fsa.params.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert_eq!(hfa.evals.len(), 1);
    }

    #[test]
    fn lost_workers_and_dcs_change_the_milestone_and_are_deterministic() {
        let (cfg, data) = small(2, 2);
        let full = hfa_reference_with(&cfg, &data, Some(16), |_, _, _, _| true).unwrap();
        // Worker (1, 0) misses averagings 1 to 3 and rejoins at 4; dc 0 misses global averaging 5.
        let lossy = |d: usize, r: usize, _t: usize, a: u64| {
            let away = (d, r) == (1, 0) && (1..4).contains(&a);
            !(away || (d == 0 && a == 5))
        };
        let a = hfa_reference_with(&cfg, &data, Some(16), lossy).unwrap();
        let b = hfa_reference_with(&cfg, &data, Some(16), lossy).unwrap();
        assert_eq!(a.params, b.params);
        assert_ne!(a.params, full.params);
        assert!(a.params.iter().flatten().all(|x| x.is_finite()));
        let mut iso = cfg.clone();
        iso.sync.hfa.isolated = true;
        assert!(matches!(
            hfa_reference_with(&iso, &data, Some(4), |_, _, _, _| true),
            Err(ReferenceError::Unsupported(_))
        ));
    }
}
