//! The single-process FSA reference: what a HiPS run computes, on one machine.
//!
//! Every round each of the W workers (DCs in order, ranks in order) takes its next batch and
//! computes its mean gradient at θ_r; the gradients are summed in rank order within each DC, the DC
//! sums in DC order, divided by W, and the optimizer steps every tensor: θ_{r+1} = opt(θ_r, ḡ).
//! This is the order hips.md prescribes, so a distributed FSA run must match it bit for bit; it is
//! also the check that the default configuration learns. With worker-side Bi-Sparse
//! (`compression.intra.codec = "bisparse"`) each worker's gradient is what its own error
//! feedback sends ([`WorkerSparse`]), decoded as its local server decodes it.

use super::{build_model, EngineError, Evaluation, Optimizer};
use crate::codec::{decode_push, TierCodec, WorkerSparse};
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
    /// The configuration asks for something the reference does not model.
    #[error("{0}")]
    Unsupported(String),
    /// A worker's push could not be encoded or decoded (worker-side Bi-Sparse).
    #[error("worker push: {0}")]
    Codec(String),
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
    fsa_reference_with(cfg, data, rounds, |_, _, _, _| true)
}

/// [`fsa_reference`] where only some workers count: `counts(dc, rank, tensor, round)` says
/// whether worker (dc, rank)'s gradient of `tensor` is summed in `round` (0-based, the round
/// that makes θ_{round+1}). Every worker still takes its batch every round (a worker that rejoins
/// at round r takes batch r, as it would have), and each tensor's mean divides by the workers
/// it summed: a job that lost workers, replayed from its local servers' round logs.
pub fn fsa_reference_with(
    cfg: &Config,
    data: &TrainTest,
    rounds: Option<u64>,
    counts: impl Fn(usize, usize, usize, u64) -> bool,
) -> Result<ReferenceRun, ReferenceError> {
    let workers = cfg.cluster.total_workers();
    let Start {
        model,
        mut batchers,
        rounds,
        theta0: mut params,
    } = start(cfg, data, rounds)?;
    let mut sparse = worker_sparse(cfg, &batchers, &params)?;
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
        let mut total: Vec<Option<Vec<f32>>> = vec![None; params.len()];
        let mut summed = vec![0u32; params.len()];
        let mut loss_sum = 0f32;
        let mut w = 0;
        for (d, dc) in cfg.cluster.data_centers.iter().enumerate() {
            let mut dc_sum: Vec<Option<Vec<f32>>> = vec![None; params.len()];
            for rank in 0..dc.workers {
                let batch = batchers[w].next_batch(&data.train);
                let (loss, grads) = model.loss_and_grad(&params, batch.view())?;
                loss_sum += loss;
                for (t, g) in grads.into_iter().enumerate() {
                    let g = match sparse.get_mut(w) {
                        Some(s) => pushed(s, t, &g, round - 1)?,
                        None => g,
                    };
                    if counts(d, rank, t, round - 1) {
                        accumulate(&mut dc_sum[t], g);
                        summed[t] += 1;
                    }
                }
                w += 1;
            }
            for (t, s) in dc_sum.into_iter().enumerate() {
                if let Some(s) = s {
                    accumulate(&mut total[t], s);
                }
            }
        }
        for (((p, g), n), opt) in params
            .iter_mut()
            .zip(total)
            .zip(summed)
            .zip(opts.iter_mut())
        {
            // A tensor no worker summed (every one lost) waits: the round does not step it.
            let Some(g) = g else { continue };
            let mean: Vec<f32> = g.into_iter().map(|v| v / n as f32).collect();
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

/// Worker-side Bi-Sparse: one [`WorkerSparse`] per worker (global worker order), or none.
fn worker_sparse(
    cfg: &Config,
    batchers: &[crate::data::Batcher],
    theta0: &[Vec<f32>],
) -> Result<Vec<WorkerSparse>, ReferenceError> {
    let per_epoch = batchers.first().map_or(1, |b| b.batches_per_epoch());
    let (intra, spec) = TierCodec::from_config(&cfg.compression.intra, per_epoch).split_pushes();
    let Some(spec) = spec else {
        return Ok(Vec::new());
    };
    let lens: Vec<usize> = theta0.iter().map(Vec::len).collect();
    let mut out = Vec::new();
    for (d, dc) in cfg.cluster.data_centers.iter().enumerate() {
        for rank in 0..dc.workers {
            let at = (d as u32, rank as u32);
            let s = WorkerSparse::new(&spec, intra.scaling(), cfg.model.seed, at, &lens)
                .map_err(ReferenceError::Codec)?;
            out.push(s);
        }
    }
    Ok(out)
}

/// What `sparse` pushes of tensor `t`'s gradient `g` in 0-based round `round`, decoded to dense
/// values as a local server decodes it.
fn pushed(
    sparse: &mut WorkerSparse,
    t: usize,
    g: &[f32],
    round: u64,
) -> Result<Vec<f32>, ReferenceError> {
    let e = sparse.encode(t, g, round).map_err(ReferenceError::Codec)?;
    decode_push(e.codec, &e.bytes, t, g.len(), true).map_err(ReferenceError::Codec)
}

/// What every reference run starts from.
pub(super) struct Start {
    /// The configured model.
    pub model: Box<dyn super::Model>,
    /// One batcher per worker, in global worker order (DCs in order, ranks within).
    pub batchers: Vec<crate::data::Batcher>,
    /// Rounds to run: the ones asked for, or the configured length.
    pub rounds: u64,
    /// θ_0 from the model seed.
    pub theta0: Vec<Vec<f32>>,
}

/// The model, the workers' batchers, the length and θ_0 of a reference run of `cfg`.
pub(super) fn start(
    cfg: &Config,
    data: &TrainTest,
    rounds: Option<u64>,
) -> Result<Start, ReferenceError> {
    let model = build_model(&cfg.model, data.train.n_features(), data.train.n_classes())?;
    let workers = cfg.cluster.total_workers();
    let batchers = (0..workers)
        .map(|w| batcher_for(&cfg.data, &data.train, workers, w))
        .collect::<Result<Vec<_>, _>>()?;
    let rounds = rounds.unwrap_or_else(|| {
        cfg.train
            .total_rounds(batchers.first().map_or(1, |b| b.batches_per_epoch()))
    });
    let theta0 = model.init(cfg.model.seed);
    Ok(Start {
        model,
        batchers,
        rounds,
        theta0,
    })
}

/// `acc += g` element-wise (acc starts as the first addend).
pub(super) fn accumulate(acc: &mut Option<Vec<f32>>, g: Vec<f32>) {
    match acc {
        None => *acc = Some(g),
        Some(a) => a.iter_mut().zip(&g).for_each(|(x, y)| *x += y),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::DataCenterConfig;
    use crate::data::synthetic::{generate, SyntheticSpec};

    /// A small MLP on a tiny synthetic task (also the HFA reference's fixture).
    pub(in crate::engine) fn small() -> (Config, TrainTest) {
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
