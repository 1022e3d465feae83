//! The single-process FSA reference: what a HiPS run computes, on one machine.
//!
//! Every round each of the W workers (DCs in order, ranks in order) takes its next batch and
//! computes its mean gradient at θ_r; the gradients are summed in rank order within each DC, the DC
//! sums in DC order, divided by W, and the optimizer steps every tensor: θ_{r+1} = opt(θ_r, ḡ).
//! This is the order hips.md prescribes, so a distributed FSA run must match it bit for bit; it is
//! also the check that the default configuration learns.

use super::{build_model, EngineError, Evaluation, Optimizer};
use crate::config::Config;
use crate::data::{batcher_for, DataError, TrainTest};

/// Errors of a reference run.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// Sharding or batching failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model rejected its input.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Result of [`fsa_reference`].
#[derive(Debug, Clone)]
pub struct ReferenceRun {
    /// Parameters after the last round.
    pub params: Vec<Vec<f32>>,
    /// Rounds run.
    pub rounds: u64,
    /// Mean training loss of the W workers' batches, per round.
    pub train_loss: Vec<f32>,
    /// Test evaluations `(round, evaluation)` every `train.eval_every` rounds and at the end.
    pub evals: Vec<(u64, Evaluation)>,
}

impl ReferenceRun {
    /// The evaluation after the last round.
    pub fn final_eval(&self) -> Option<Evaluation> {
        self.evals.last().map(|(_, e)| *e)
    }
}

/// Runs FSA on one machine: `rounds` (or the configured length) of synchronous rounds.
pub fn fsa_reference(
    cfg: &Config,
    data: &TrainTest,
    rounds: Option<u64>,
) -> Result<ReferenceRun, ReferenceError> {
    let model = build_model(&cfg.model, data.train.n_features(), data.train.n_classes())?;
    let workers = cfg.cluster.total_workers();
    let mut batchers = (0..workers)
        .map(|w| batcher_for(&cfg.data, &data.train, workers, w))
        .collect::<Result<Vec<_>, _>>()?;
    let rounds = rounds.unwrap_or_else(|| {
        cfg.train
            .total_rounds(batchers.first().map_or(1, |b| b.batches_per_epoch()))
    });
    let mut params = model.init(cfg.model.seed);
    let mut opts: Vec<Optimizer> = params
        .iter()
        .map(|p| Optimizer::new(&cfg.train.optimizer, p.len()))
        .collect();
    let mut run = ReferenceRun {
        params: Vec::new(),
        rounds,
        train_loss: Vec::with_capacity(rounds as usize),
        evals: Vec::new(),
    };
    for round in 1..=rounds {
        let mut total: Option<Vec<Vec<f32>>> = None;
        let mut loss_sum = 0f32;
        let mut w = 0;
        for dc in &cfg.cluster.data_centers {
            let mut dc_sum: Option<Vec<Vec<f32>>> = None;
            for _ in 0..dc.workers {
                let batch = batchers[w].next_batch(&data.train);
                w += 1;
                let (loss, grads) = model.loss_and_grad(&params, batch.view())?;
                loss_sum += loss;
                accumulate(&mut dc_sum, grads);
            }
            if let Some(s) = dc_sum {
                accumulate(&mut total, s);
            }
        }
        let total = total.unwrap_or_default();
        for ((p, g), opt) in params.iter_mut().zip(total).zip(opts.iter_mut()) {
            let mean: Vec<f32> = g.into_iter().map(|v| v / workers as f32).collect();
            opt.step(p, &mean)?;
        }
        run.train_loss.push(loss_sum / workers as f32);
        let every = cfg.train.eval_every;
        if round == rounds || (every > 0 && round % every == 0) {
            run.evals
                .push((round, model.evaluate(&params, data.test.view())?));
        }
    }
    run.params = params;
    Ok(run)
}

/// `acc += grads` element-wise (acc starts as the first addend).
fn accumulate(acc: &mut Option<Vec<Vec<f32>>>, grads: Vec<Vec<f32>>) {
    match acc {
        None => *acc = Some(grads),
        Some(a) => {
            for (t, g) in a.iter_mut().zip(&grads) {
                t.iter_mut().zip(g).for_each(|(x, y)| *x += y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataCenterConfig;
    use crate::data::synthetic::{generate, SyntheticSpec};

    fn small() -> (Config, TrainTest) {
        let mut cfg = Config::default();
        cfg.model.hidden = vec![8];
        cfg.data.batch_size = 4;
        cfg.train.eval_every = 5;
        let data = generate(&SyntheticSpec {
            features: 6,
            classes: 3,
            train_samples: 64,
            test_samples: 16,
            seed: 3,
        })
        .unwrap();
        (cfg, data)
    }

    #[test]
    fn synthetic_task_is_learnable() {
        // Linear teacher, 4 classes (chance 0.25): the default MLP and optimizer learn it.
        let mut cfg = Config::default();
        cfg.data.dataset = crate::config::DatasetKind::Synthetic;
        cfg.data.synthetic = SyntheticSpec {
            features: 16,
            classes: 4,
            train_samples: 1_024,
            test_samples: 256,
            seed: 5,
        };
        cfg.validate().unwrap();
        let data = crate::data::load(&cfg.data).unwrap();
        let run = fsa_reference(&cfg, &data, Some(150)).unwrap();
        let acc = run.final_eval().unwrap().accuracy;
        assert!(acc >= 0.85, "{:?}", run.evals);
    }

    #[test]
    fn deterministic_and_evaluates_on_schedule() {
        let (cfg, data) = small();
        let a = fsa_reference(&cfg, &data, Some(12)).unwrap();
        let b = fsa_reference(&cfg, &data, Some(12)).unwrap();
        assert_eq!(a.params, b.params);
        assert_eq!(
            a.evals.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![5, 10, 12]
        );
        assert_eq!(a.train_loss.len(), 12);
    }

    #[test]
    fn every_worker_weighs_the_same_whatever_its_dc() {
        // 4 workers as 2+2, 3+1 and 1 DC of 4 see the same batches (global worker order), so θ
        // agrees up to the f32 rounding of the summation order (a few ulps after 10 rounds).
        let (cfg, data) = small();
        let run = |dcs: &[usize]| {
            let mut c = cfg.clone();
            c.cluster.data_centers = dcs
                .iter()
                .enumerate()
                .map(|(i, &n)| DataCenterConfig::new(&format!("dc{i}"), n))
                .collect();
            fsa_reference(&c, &data, Some(10)).unwrap().params
        };
        let base = run(&[2, 2]);
        for other in [run(&[3, 1]), run(&[4])] {
            for (a, b) in base.iter().flatten().zip(other.iter().flatten()) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
        // A single worker is plain mini-batch SGD on its own shard: a different trajectory.
        let single = run(&[1]);
        assert!(base
            .iter()
            .flatten()
            .zip(single.iter().flatten())
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }
}
