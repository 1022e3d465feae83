//! ESync (sync.md "ESync"), without IO: the state machine that decides, after each local step of
//! each worker, whether it takes another step or pushes, and the combination of the workers'
//! model deltas (plain or FedNova-normalised).
//!
//! The machine runs inside the coordinator and is advanced with the coordinator's own monotonic
//! `now` (seconds since any fixed origin); workers report only durations, never timestamps.
//! Not wired into the runtime yet: `sync.algorithm = "esync"` is not accepted by the configuration.

/// What a worker does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Run one more local step, then ask again.
    Step,
    /// Push the model delta (a synchronous round over all workers).
    Push,
}

/// Per-worker state.
#[derive(Debug, Clone, Copy)]
struct Worker {
    k: u64,
    c: f64,
    te: f64,
    ready: bool,
    round: u64,
}

/// The ESync state machine of the coordinator.
#[derive(Debug, Clone)]
pub struct Esync {
    eps: f64,
    t: u64,
    workers: Vec<Worker>,
}

impl Esync {
    /// A machine for `workers` workers with tolerance `eps` seconds (default 0.5); the global round
    /// starts at 1 and every worker is in it.
    pub fn new(workers: usize, eps: f64) -> Self {
        Self {
            eps,
            t: 1,
            workers: vec![
                Worker {
                    k: 0,
                    c: 0.0,
                    te: 0.0,
                    ready: false,
                    round: 1,
                };
                workers
            ],
        }
    }

    /// The global round t.
    pub fn round(&self) -> u64 {
        self.t
    }

    /// `Ask{r, k, c}` at `now`: worker `r` has taken `k` local steps this round and its last step
    /// took `c` seconds. `None` for an unknown worker.
    pub fn ask(&mut self, r: usize, k: u64, c: f64, now: f64) -> Option<Answer> {
        let w = self.workers.get_mut(r)?;
        w.te = now;
        w.k = k;
        w.c = c;
        if k == 0 {
            return Some(Answer::Step);
        }
        // The slowest worker: largest c, lowest rank on ties.
        let mut s = 0;
        for (i, x) in self.workers.iter().enumerate() {
            if x.c > self.workers[s].c {
                s = i;
            }
        }
        let slow = self.workers[s];
        if slow.round != self.t {
            return Some(Answer::Step);
        }
        let rest = slow.te + slow.c - now;
        if r == s || slow.ready || c + self.eps > rest {
            self.workers[r].ready = true;
            Some(Answer::Push)
        } else {
            Some(Answer::Step)
        }
    }

    /// `Reset{r, round}` at `now`, after worker `r` received the aggregated model. The first reset
    /// with a new round starts it (every k ← 0, ready ← false). `None` for an unknown worker.
    pub fn reset(&mut self, r: usize, round: u64, now: f64) -> Option<()> {
        if r >= self.workers.len() {
            return None;
        }
        if round > self.t {
            self.t = round;
            for w in &mut self.workers {
                w.k = 0;
                w.ready = false;
            }
        }
        let t = self.t;
        let w = &mut self.workers[r];
        w.round = t;
        w.te = now;
        Some(())
    }
}

/// Normalisation of the combined delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalisation {
    /// w = w_prev + γ·Σ_r p_r·Δ_r.
    None,
    /// FedNova: w = w_prev + γ·τ_eff·Σ_r p_r·Δ_r / k_r with τ_eff = Σ_r p_r·k_r.
    FedNova,
}

/// The increment γ·Σ_r p_r·Δ_r (or its FedNova form) of workers with deltas `deltas`, local step
/// counts `steps` (≥ 1) and weights `p` (N_r / N). `None` on mismatched lengths or a zero count.
pub fn combine(
    deltas: &[Vec<f32>],
    steps: &[u64],
    p: &[f64],
    gamma: f64,
    norm: Normalisation,
) -> Option<Vec<f32>> {
    if deltas.len() != steps.len() || deltas.len() != p.len() || steps.contains(&0) {
        return None;
    }
    let n = deltas.first().map_or(0, Vec::len);
    if deltas.iter().any(|d| d.len() != n) {
        return None;
    }
    let tau_eff: f64 = p.iter().zip(steps).map(|(p, &k)| p * k as f64).sum();
    let mut out = vec![0.0f64; n];
    for ((d, &k), &pr) in deltas.iter().zip(steps).zip(p) {
        let w = match norm {
            Normalisation::None => pr,
            Normalisation::FedNova => pr / k as f64,
        };
        for (o, &x) in out.iter_mut().zip(d) {
            *o += w * f64::from(x);
        }
    }
    let scale = match norm {
        Normalisation::None => gamma,
        Normalisation::FedNova => gamma * tau_eff,
    };
    Some(out.into_iter().map(|x| (scale * x) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `rounds` rounds in virtual time with instant aggregation; `duration(r, round)` is
    /// worker r's step time in that round. Returns per round (k, push times).
    fn simulate(
        eps: f64,
        warmup: &[f64],
        rounds: u64,
        duration: impl Fn(usize, u64) -> f64,
    ) -> Vec<(Vec<u64>, Vec<f64>)> {
        let n = warmup.len();
        let mut m = Esync::new(n, eps);
        let mut last: Vec<f64> = warmup.to_vec();
        let mut now = 0.0;
        let mut out = Vec::new();
        for round in 1..=rounds {
            // Every worker asks after the reset (k = 0) and steps.
            let mut next: Vec<Option<f64>> = vec![None; n];
            let mut steps = vec![0u64; n];
            for r in 0..n {
                assert_eq!(m.ask(r, 0, last[r], now), Some(Answer::Step));
                next[r] = Some(now + duration(r, round));
            }
            let mut pushed = vec![f64::NAN; n];
            // Finish events in time order, ties by rank.
            while let Some((r, t)) = next
                .iter()
                .enumerate()
                .filter_map(|(r, t)| t.map(|t| (r, t)))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            {
                let d = duration(r, round);
                steps[r] += 1;
                last[r] = d;
                match m.ask(r, steps[r], d, t).unwrap() {
                    Answer::Step => next[r] = Some(t + d),
                    Answer::Push => {
                        next[r] = None;
                        pushed[r] = t;
                    }
                }
            }
            now = pushed.iter().copied().fold(f64::MIN, f64::max);
            for r in 0..n {
                m.reset(r, round + 1, now).unwrap();
            }
            assert_eq!(m.round(), round + 1);
            out.push((steps, pushed));
        }
        out
    }

    /// sync.md oracle 7: ε = 1.5, steps of 3, 5 and 12 → k = (3, 2, 1) every round, pushes at
    /// 9, 10, 12 and 21, 22, 24.
    #[test]
    fn timeline_of_steady_workers() {
        let d = [3.0, 5.0, 12.0];
        let rounds = simulate(1.5, &d, 2, |r, _| d[r]);
        assert_eq!(rounds[0], (vec![3, 2, 1], vec![9.0, 10.0, 12.0]));
        assert_eq!(rounds[1], (vec![3, 2, 1], vec![21.0, 22.0, 24.0]));
    }

    /// Oracle 7, second part: worker 0 slows to 20 from round 2.
    #[test]
    fn timeline_when_a_worker_slows_down() {
        let d = [3.0, 5.0, 12.0];
        let rounds = simulate(
            1.5,
            &d,
            3,
            |r, round| {
                if r == 0 && round >= 2 {
                    20.0
                } else {
                    d[r]
                }
            },
        );
        assert_eq!(rounds[0], (vec![3, 2, 1], vec![9.0, 10.0, 12.0]));
        assert_eq!(rounds[1], (vec![1, 2, 1], vec![32.0, 22.0, 24.0]));
        assert_eq!(rounds[2], (vec![1, 3, 1], vec![52.0, 47.0, 44.0]));
    }

    #[test]
    fn zero_steps_never_push_and_unknown_workers_are_refused() {
        let mut m = Esync::new(2, 0.5);
        assert_eq!(m.ask(0, 0, 100.0, 0.0), Some(Answer::Step));
        assert_eq!(m.ask(1, 0, 1.0, 0.0), Some(Answer::Step));
        // Worker 0 is the slowest and asks with k = 1: it pushes.
        assert_eq!(m.ask(0, 1, 100.0, 100.0), Some(Answer::Push));
        assert_eq!(m.ask(1, 0, 1.0, 100.0), Some(Answer::Step));
        assert_eq!(m.ask(2, 1, 1.0, 0.0), None);
        assert_eq!(m.reset(2, 2, 0.0), None);
    }

    /// sync.md oracle 8: k = (3, 2, 1), Δ = (3a, 2a, 2a), equal weights, γ = 1: `none` gives 7a/3,
    /// `fednova` 8a/3.
    #[test]
    fn fednova_removes_the_bias_toward_more_steps() {
        let a = [0.75f32, -1.5, 3.0];
        let deltas: Vec<Vec<f32>> = [3.0f32, 2.0, 2.0]
            .iter()
            .map(|f| a.iter().map(|x| f * x).collect())
            .collect();
        let p = [1.0 / 3.0; 3];
        let plain = combine(&deltas, &[3, 2, 1], &p, 1.0, Normalisation::None).unwrap();
        let nova = combine(&deltas, &[3, 2, 1], &p, 1.0, Normalisation::FedNova).unwrap();
        for i in 0..3 {
            assert!((plain[i] - 7.0 * a[i] / 3.0).abs() < 1e-6, "{i}");
            assert!((nova[i] - 8.0 * a[i] / 3.0).abs() < 1e-6, "{i}");
        }
        assert!(combine(&deltas, &[3, 0, 1], &p, 1.0, Normalisation::None).is_none());
        assert!(combine(&deltas, &[3, 2], &p, 1.0, Normalisation::None).is_none());
    }
}
