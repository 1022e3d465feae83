//! ESync (sync.md "ESync"), without IO: the state machine that decides, after each local step of
//! each worker, whether it takes another step or pushes; the frames workers and the coordinator
//! exchange for it; and the combination of the workers' model deltas (plain or FedNova).
//!
//! The machine runs inside the coordinator process (the `esync` endpoint it registers, see
//! [`crate::hips::coordinator`]) and is advanced with the coordinator's own monotonic `now`
//! (seconds since any fixed origin); workers report only durations, never timestamps.
//!
//! The deltas travel through HFA's model-averaging path with k1 = k2 = 1 and data weighting, which
//! forms m' = m + Σ_r p_r·(u_r − m) with p_r = 1/W (equal shards). Every worker starts a round at
//! the milestone (w_prev = m) and pushes u_r = m + s·a_r·Δ_r ([`push_factor`], [`round_scale`]):
//! with a_r = 1/k_r and s = γ·τ_eff this is FedNova, with a_r = 1 and s = γ the plain rule. The
//! new milestone m' is then the combined model itself, and every worker adopts it: the workers and
//! the global servers hold the same θ after every round, bit for bit. τ_eff needs every worker's
//! k_r before the push: a FedNova worker asks the coordinator for the round's step counts
//! (`Steps`), answered once every worker has been told to push.
//!
//! A `Reset` also carries the `Ask{r, 0, c}` the spec sends after every reset (always answered
//! *step*), so a worker starts its next round's first step right away; it does not wait for the
//! Reset's reply until its next request (requests on one connection are answered in order). Per
//! round a worker thus sends k Asks, its push, one Reset and (FedNova) one `Steps`.

/// Role name under which the coordinator registers its ESync endpoint in the membership table.
pub const ROLE: &str = "esync";

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
    last_steps: Vec<u64>,
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
            last_steps: Vec::new(),
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
    /// with a new round starts it (every k ← 0, ready ← false). Returns the local step counts of
    /// every worker in the round that ended (what each had asked with when told to push); `None`
    /// for an unknown worker.
    pub fn reset(&mut self, r: usize, round: u64, now: f64) -> Option<&[u64]> {
        if r >= self.workers.len() {
            return None;
        }
        if round > self.t {
            self.t = round;
            self.last_steps.clear();
            for w in &mut self.workers {
                self.last_steps.push(w.k);
                w.k = 0;
                w.ready = false;
            }
        }
        let t = self.t;
        let w = &mut self.workers[r];
        w.round = t;
        w.te = now;
        Some(&self.last_steps)
    }

    /// The local step counts of every worker in `round`: known once every worker has been told
    /// to push in the current round (`Ok(None)` until then), or the counts of the round that
    /// ended last. An older round is an error.
    pub fn round_steps(&self, round: u64) -> Result<Option<Vec<u64>>, EsyncError> {
        if round + 1 == self.t {
            return Ok(Some(self.last_steps.clone()));
        }
        if round != self.t {
            return Err(EsyncError::StaleSteps {
                round,
                current: self.t,
            });
        }
        let all = self.workers.iter().all(|w| w.ready && w.round == self.t);
        Ok(all.then(|| self.workers.iter().map(|w| w.k).collect()))
    }

    /// Answers one decoded request at `now`.
    pub fn handle(&mut self, req: &Request, now: f64) -> Result<Reply, EsyncError> {
        let n = self.workers.len();
        let (Request::Ask { worker, c, .. }
        | Request::Reset { worker, c, .. }
        | Request::Steps { worker, c, .. }) = *req;
        if !(c.is_finite() && c >= 0.0) {
            return Err(EsyncError::Malformed(format!(
                "worker {worker} reported a step duration of {c} s"
            )));
        }
        if worker as usize >= n {
            return Err(EsyncError::UnknownWorker { worker, n });
        }
        let r = worker as usize;
        match *req {
            Request::Ask { k, .. } => self
                .ask(r, k, c, now)
                .map(Reply::Answer)
                .ok_or(EsyncError::UnknownWorker { worker, n }),
            Request::Reset { round, .. } => {
                if round < self.t {
                    return Err(EsyncError::StaleReset {
                        worker,
                        round,
                        current: self.t,
                    });
                }
                // A reset starts the next round at most: a far-future round would make every
                // genuine reset stale.
                if round > self.t + 1 {
                    return Err(EsyncError::FutureReset {
                        worker,
                        round,
                        current: self.t,
                    });
                }
                let steps = self
                    .reset(r, round, now)
                    .map(<[u64]>::to_vec)
                    .ok_or(EsyncError::UnknownWorker { worker, n })?;
                // The Ask{r, 0, c} that follows every reset (its answer is always step).
                self.ask(r, 0, c, now);
                Ok(Reply::Steps(steps))
            }
            Request::Steps { round, .. } => Ok(match self.round_steps(round)? {
                Some(steps) => Reply::Steps(steps),
                None => Reply::Wait,
            }),
        }
    }
}

/// Why the coordinator refused an ESync request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EsyncError {
    /// The frame does not decode.
    #[error("malformed ESync request: {0}")]
    Malformed(String),
    /// A worker index outside the job.
    #[error("ESync request from worker {worker}, but the job has {n} workers")]
    UnknownWorker {
        /// Index received.
        worker: u32,
        /// Number of workers.
        n: usize,
    },
    /// Step counts asked for a round that is neither the current one nor the last that ended.
    #[error("step counts of round {round} asked for, but round {current} is running")]
    StaleSteps {
        /// Round asked for.
        round: u64,
        /// The current global round.
        current: u64,
    },
    /// A reset for a round beyond the next one.
    #[error("worker {worker} reset to round {round}, but the current round is {current}")]
    FutureReset {
        /// The worker index of the request.
        worker: u32,
        /// The round it named.
        round: u64,
        /// The current round t.
        current: u64,
    },
    /// A reset for a round that already ended.
    #[error("worker {worker} reset to round {round}, but round {current} already started")]
    StaleReset {
        /// Worker index.
        worker: u32,
        /// Round received.
        round: u64,
        /// The current global round.
        current: u64,
    },
}

/// Frame key of an `Ask` request.
const KEY_ASK: u64 = 0;
/// Frame key of a `Reset` request.
const KEY_RESET: u64 = 1;
/// Frame key of a `Steps` request.
const KEY_STEPS: u64 = 2;

/// A worker's request to the coordinator's ESync endpoint. On the wire it is a push frame:
/// `key` 0 = Ask, 1 = Reset, 2 = Steps; `version` = k or the round; payload = worker u32 LE,
/// c f64 LE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Request {
    /// `Ask{r, k, c}`: after `k` local steps this round, the last of which took `c` seconds.
    Ask {
        /// Worker index (DCs in order, ranks within).
        worker: u32,
        /// Local steps taken this round.
        k: u64,
        /// Duration of the last step in seconds (before the first, a warm-up step's).
        c: f64,
    },
    /// `Reset{r, round}`: the worker received the aggregated model and starts `round`. It also
    /// carries the `Ask{r, 0, c}` that follows every reset: that ask is always answered *step*,
    /// so the worker starts its first local step without waiting for a reply.
    Reset {
        /// Worker index.
        worker: u32,
        /// The round it starts.
        round: u64,
        /// Duration of its last step in seconds.
        c: f64,
    },
    /// `Steps{r, round}`: the step counts of every worker in `round` (FedNova's τ_eff), answered
    /// once all of them were told to push.
    Steps {
        /// Worker index.
        worker: u32,
        /// The round (the machine's t) whose counts are wanted.
        round: u64,
        /// Duration of its last step in seconds.
        c: f64,
    },
}

impl Request {
    /// The worker index the request names.
    pub fn worker(&self) -> u32 {
        match *self {
            Request::Ask { worker, .. }
            | Request::Reset { worker, .. }
            | Request::Steps { worker, .. } => worker,
        }
    }

    /// `(key, version, payload)` of the push frame carrying this request.
    pub fn to_frame(&self) -> (u64, u64, Vec<u8>) {
        let (key, version, worker, c) = match *self {
            Request::Ask { worker, k, c } => (KEY_ASK, k, worker, c),
            Request::Reset { worker, round, c } => (KEY_RESET, round, worker, c),
            Request::Steps { worker, round, c } => (KEY_STEPS, round, worker, c),
        };
        let mut p = worker.to_le_bytes().to_vec();
        p.extend_from_slice(&c.to_le_bytes());
        (key, version, p)
    }

    /// Decodes a push frame's `key`, `version` and `payload`.
    pub fn from_frame(key: u64, version: u64, payload: &[u8]) -> Result<Self, EsyncError> {
        let (Ok(w), Ok(c)) = (
            <[u8; 4]>::try_from(payload.get(..4).unwrap_or_default()),
            <[u8; 8]>::try_from(payload.get(4..).unwrap_or_default()),
        ) else {
            return Err(EsyncError::Malformed(format!(
                "{} payload bytes (expected 12)",
                payload.len()
            )));
        };
        let (worker, c) = (u32::from_le_bytes(w), f64::from_le_bytes(c));
        match key {
            KEY_ASK => Ok(Request::Ask {
                worker,
                k: version,
                c,
            }),
            KEY_RESET => Ok(Request::Reset {
                worker,
                round: version,
                c,
            }),
            KEY_STEPS => Ok(Request::Steps {
                worker,
                round: version,
                c,
            }),
            k => Err(EsyncError::Malformed(format!(
                "key {k} (ask: key 0, reset: key 1, steps: key 2)"
            ))),
        }
    }
}

/// The coordinator's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// To an Ask: step again or push (payload: one byte, 0 = step, 1 = push).
    Answer(Answer),
    /// To a Reset or Steps: every worker's local step count in the round (u64 LE each).
    Steps(Vec<u64>),
    /// To a Steps request whose counts are not known yet: the endpoint holds the request and
    /// answers it with [`Reply::Steps`] later (never sent).
    Wait,
}

impl Reply {
    /// The reply payload.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Answer(Answer::Step) => vec![0],
            Reply::Answer(Answer::Push) => vec![1],
            Reply::Steps(s) => s.iter().flat_map(|k| k.to_le_bytes()).collect(),
            Reply::Wait => Vec::new(),
        }
    }

    /// Decodes the reply to an Ask.
    pub fn decode_answer(payload: &[u8]) -> Result<Answer, EsyncError> {
        match payload {
            [0] => Ok(Answer::Step),
            [1] => Ok(Answer::Push),
            other => Err(EsyncError::Malformed(format!("answer {other:?}"))),
        }
    }

    /// Decodes the reply to a Reset from a job of `workers` workers.
    pub fn decode_steps(payload: &[u8], workers: usize) -> Result<Vec<u64>, EsyncError> {
        if payload.len() != workers * 8 {
            return Err(EsyncError::Malformed(format!(
                "{} bytes of step counts for {workers} workers",
                payload.len()
            )));
        }
        Ok(payload
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }
}

pub use crate::config::EsyncNormalisation as Normalisation;

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
            Normalisation::Fednova => pr / k as f64,
        };
        for (o, &x) in out.iter_mut().zip(d) {
            *o += w * f64::from(x);
        }
    }
    let scale = match norm {
        Normalisation::None => gamma,
        Normalisation::Fednova => gamma * tau_eff,
    };
    Some(out.into_iter().map(|x| (scale * x) as f32).collect())
}

/// a_r: the factor worker r applies to its delta Δ_r = w_r − w_prev before pushing
/// u_r = m + a_r·Δ_r (1, or 1/k_r for FedNova).
pub fn push_factor(norm: Normalisation, k: u64) -> f32 {
    match norm {
        Normalisation::None => 1.0,
        Normalisation::Fednova => 1.0 / k.max(1) as f32,
    }
}

/// The model a worker pushes: u = m + a·(w − w_prev), element-wise.
pub fn push_model(m: &[f32], w: &[f32], w_prev: &[f32], a: f32) -> Vec<f32> {
    m.iter()
        .zip(w.iter().zip(w_prev))
        .map(|(&m, (&w, &p))| m + a * (w - p))
        .collect()
}

/// s: the factor on the averaged increment m' − m: γ, or for FedNova γ·τ_eff with
/// τ_eff = Σ_r p_r·k_r = mean of `steps` (p_r = 1/W).
pub fn round_scale(norm: Normalisation, gamma: f32, steps: &[u64]) -> f32 {
    match norm {
        Normalisation::None => gamma,
        Normalisation::Fednova => {
            let tau = steps.iter().map(|&k| k as f64).sum::<f64>() / steps.len().max(1) as f64;
            (f64::from(gamma) * tau) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `req` as the runtime does: frame → decode → [`Esync::handle`] → reply bytes → decode.
    fn over_wire(m: &mut Esync, req: Request, now: f64, workers: usize) -> Reply {
        let (key, version, payload) = req.to_frame();
        let decoded = Request::from_frame(key, version, &payload).unwrap();
        assert_eq!(decoded, req);
        let bytes = m.handle(&decoded, now).unwrap().encode();
        match req {
            Request::Ask { .. } => Reply::Answer(Reply::decode_answer(&bytes).unwrap()),
            Request::Reset { .. } | Request::Steps { .. } => {
                Reply::Steps(Reply::decode_steps(&bytes, workers).unwrap())
            }
        }
    }

    /// Runs `rounds` rounds in virtual time with instant aggregation; `duration(r, round)` is
    /// worker r's step time in that round. Returns per round (k, push times). With `wire`, every
    /// request goes through the frames the runtime sends, and each Reset must answer the round's
    /// step counts.
    fn simulate(
        eps: f64,
        warmup: &[f64],
        rounds: u64,
        wire: bool,
        duration: impl Fn(usize, u64) -> f64,
    ) -> Vec<(Vec<u64>, Vec<f64>)> {
        let n = warmup.len();
        let mut m = Esync::new(n, eps);
        let ask = |m: &mut Esync, r: usize, k: u64, c: f64, now: f64| -> Answer {
            if !wire {
                return m.ask(r, k, c, now).unwrap();
            }
            let req = Request::Ask {
                worker: r as u32,
                k,
                c,
            };
            match over_wire(m, req, now, n) {
                Reply::Answer(a) => a,
                other => panic!("{other:?}"),
            }
        };
        let mut last: Vec<f64> = warmup.to_vec();
        let mut now = 0.0;
        let mut out = Vec::new();
        for round in 1..=rounds {
            // Every worker asks after the reset (k = 0; over the wire the reset carried it, except
            // before round 1) and steps.
            let mut next: Vec<Option<f64>> = vec![None; n];
            let mut steps = vec![0u64; n];
            for r in 0..n {
                if !wire || round == 1 {
                    assert_eq!(ask(&mut m, r, 0, last[r], now), Answer::Step);
                }
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
                match ask(&mut m, r, steps[r], d, t) {
                    Answer::Step => next[r] = Some(t + d),
                    Answer::Push => {
                        next[r] = None;
                        pushed[r] = t;
                    }
                }
            }
            now = pushed.iter().copied().fold(f64::MIN, f64::max);
            for (r, &c) in last.iter().enumerate() {
                if wire {
                    let req = Request::Reset {
                        worker: r as u32,
                        round: round + 1,
                        c,
                    };
                    assert_eq!(over_wire(&mut m, req, now, n), Reply::Steps(steps.clone()));
                } else {
                    assert_eq!(m.reset(r, round + 1, now).unwrap(), &steps[..]);
                }
            }
            assert_eq!(m.round(), round + 1);
            out.push((steps, pushed));
        }
        out
    }

    /// sync.md oracle 7: ε = 1.5, steps of 3, 5 and 12 → k = (3, 2, 1) every round, pushes at
    /// 9, 10, 12 and 21, 22, 24 (directly and through the runtime's frames).
    #[test]
    fn timeline_of_steady_workers() {
        let d = [3.0, 5.0, 12.0];
        for wire in [false, true] {
            let rounds = simulate(1.5, &d, 2, wire, |r, _| d[r]);
            assert_eq!(rounds[0], (vec![3, 2, 1], vec![9.0, 10.0, 12.0]), "{wire}");
            assert_eq!(rounds[1], (vec![3, 2, 1], vec![21.0, 22.0, 24.0]), "{wire}");
        }
    }

    /// Oracle 7, second part: worker 0 slows to 20 from round 2.
    #[test]
    fn timeline_when_a_worker_slows_down() {
        let d = [3.0, 5.0, 12.0];
        for wire in [false, true] {
            let rounds = simulate(1.5, &d, 3, wire, |r, round| {
                if r == 0 && round >= 2 {
                    20.0
                } else {
                    d[r]
                }
            });
            assert_eq!(rounds[0], (vec![3, 2, 1], vec![9.0, 10.0, 12.0]), "{wire}");
            assert_eq!(rounds[1], (vec![1, 2, 1], vec![32.0, 22.0, 24.0]), "{wire}");
            assert_eq!(rounds[2], (vec![1, 3, 1], vec![52.0, 47.0, 44.0]), "{wire}");
        }
    }

    /// The benchmark's shape: 2 DCs × 2 workers, dc 1 about three times slower (ε small). A step
    /// that would end just when the slowest worker's does is not taken (c + ε > rest): steps of 1
    /// and 3 give k = (2, 2, 1, 1); steps of 1 and 3.5 give (3, 3, 1, 1).
    #[test]
    fn three_times_slower_dc_gives_two_or_three_local_steps() {
        for (slow, fast_k) in [(3.0, 2), (3.5, 3)] {
            let d = [1.0, 1.0, slow, slow];
            for (k, pushes) in simulate(0.01, &d, 4, true, |r, _| d[r]) {
                assert_eq!(k, vec![fast_k, fast_k, 1, 1], "slow {slow}");
                assert!(pushes[0] <= pushes[2], "slow {slow}: {pushes:?}");
            }
        }
    }

    /// A reset to a far-future round is refused and leaves the round where it was, so the
    /// genuine resets that follow are not stale.
    #[test]
    fn future_reset_is_refused_and_changes_nothing() {
        let mut m = Esync::new(2, 0.5);
        let reset = |worker, round| Request::Reset {
            worker,
            round,
            c: 0.1,
        };
        assert!(matches!(
            m.handle(&reset(1, u64::MAX), 1.0),
            Err(EsyncError::FutureReset { current: 1, .. })
        ));
        assert!(matches!(
            m.handle(&reset(0, 3), 1.0),
            Err(EsyncError::FutureReset { current: 1, .. })
        ));
        assert_eq!(m.round(), 1);
        assert!(m.handle(&reset(0, 2), 1.0).is_ok());
        assert!(m.handle(&reset(1, 2), 1.0).is_ok());
        assert_eq!(m.round(), 2);
    }

    #[test]
    fn malformed_and_stale_requests_are_refused() {
        let mut m = Esync::new(2, 0.5);
        assert!(matches!(
            Request::from_frame(0, 1, &[0; 11]),
            Err(EsyncError::Malformed(_))
        ));
        assert!(matches!(
            Request::from_frame(3, 1, &[0; 12]),
            Err(EsyncError::Malformed(_))
        ));
        let nan = Request::Ask {
            worker: 0,
            k: 1,
            c: f64::NAN,
        };
        assert!(matches!(m.handle(&nan, 0.0), Err(EsyncError::Malformed(_))));
        let stranger = Request::Ask {
            worker: 7,
            k: 1,
            c: 1.0,
        };
        assert_eq!(
            m.handle(&stranger, 0.0),
            Err(EsyncError::UnknownWorker { worker: 7, n: 2 })
        );
        let reset = |round| Request::Reset {
            worker: 1,
            round,
            c: 1.0,
        };
        assert_eq!(m.handle(&reset(2), 1.0), Ok(Reply::Steps(vec![0, 0])));
        assert!(matches!(
            m.handle(&reset(1), 1.0),
            Err(EsyncError::StaleReset { current: 2, .. })
        ));
        assert!(Reply::decode_answer(&[2]).is_err());
        assert!(Reply::decode_steps(&[0; 12], 2).is_err());
    }

    /// The runtime's path (every worker starts at the milestone, pushes u_r = m + s·a_r·Δ_r, the
    /// servers average: the new milestone is the next model) equals [`combine`] (f64 reference)
    /// within 1e-5, for both normalisations and γ = 0.5.
    #[test]
    fn worker_side_scaling_through_the_averaging_path_equals_combine() {
        let n = 7;
        let m: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
        let w_prev = m.clone();
        let steps = [3u64, 1, 2];
        let deltas: Vec<Vec<f32>> = (0..3)
            .map(|r| {
                (0..n)
                    .map(|i| ((i * 5 + r * 3) as f32 * 0.7).cos() * 0.05 * steps[r] as f32)
                    .collect()
            })
            .collect();
        let p = [1.0 / 3.0; 3];
        for norm in [Normalisation::None, Normalisation::Fednova] {
            // What the HFA path forms: m' = m + (Σ_r (u_r − m)) / W.
            let s = round_scale(norm, 0.5, &steps);
            let pushed: Vec<Vec<f32>> = (0..3)
                .map(|r| {
                    let w: Vec<f32> = w_prev.iter().zip(&deltas[r]).map(|(a, d)| a + d).collect();
                    push_model(&m, &w, &w_prev, s * push_factor(norm, steps[r]))
                })
                .collect();
            let m_new: Vec<f32> = (0..n)
                .map(|i| m[i] + pushed.iter().map(|u| u[i] - m[i]).sum::<f32>() / 3.0)
                .collect();
            let want = combine(&deltas, &steps, &p, 0.5, norm).unwrap();
            for i in 0..n {
                let got = m_new[i] - w_prev[i];
                assert!(
                    (got - want[i]).abs() < 1e-5,
                    "{norm:?} {i}: {got} vs {}",
                    want[i]
                );
            }
        }
        // FedNova's τ_eff is the mean step count; plain ESync ignores the counts.
        assert_eq!(round_scale(Normalisation::Fednova, 0.5, &steps), 1.0);
        assert_eq!(round_scale(Normalisation::None, 0.5, &steps), 0.5);
        assert_eq!(push_factor(Normalisation::Fednova, 4), 0.25);
    }

    /// `Steps` waits until every worker was told to push, then answers the round's counts; after
    /// the next reset it answers the ended round's counts; older rounds are refused.
    #[test]
    fn step_counts_are_answered_once_every_worker_pushes() {
        let mut m = Esync::new(2, 0.5);
        let steps = |round| Request::Steps {
            worker: 0,
            round,
            c: 1.0,
        };
        assert_eq!(m.handle(&steps(1), 0.0), Ok(Reply::Wait));
        assert_eq!(m.ask(0, 0, 3.0, 0.0), Some(Answer::Step));
        assert_eq!(m.ask(1, 0, 1.0, 0.0), Some(Answer::Step));
        // Worker 0 (slowest) pushes after one step; worker 1 then pushes after its second.
        assert_eq!(m.ask(1, 1, 1.0, 1.0), Some(Answer::Step));
        assert_eq!(m.ask(0, 1, 3.0, 3.0), Some(Answer::Push));
        assert_eq!(m.handle(&steps(1), 3.0), Ok(Reply::Wait));
        assert_eq!(m.ask(1, 2, 1.0, 3.0), Some(Answer::Push));
        assert_eq!(m.handle(&steps(1), 3.0), Ok(Reply::Steps(vec![1, 2])));
        let (key, version, payload) = steps(1).to_frame();
        assert_eq!(Request::from_frame(key, version, &payload), Ok(steps(1)));
        m.reset(0, 2, 4.0);
        assert_eq!(m.handle(&steps(1), 4.0), Ok(Reply::Steps(vec![1, 2])));
        assert_eq!(m.handle(&steps(2), 4.0), Ok(Reply::Wait));
        m.reset(1, 3, 5.0);
        assert!(m.handle(&steps(1), 5.0).is_err());
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
        let nova = combine(&deltas, &[3, 2, 1], &p, 1.0, Normalisation::Fednova).unwrap();
        for i in 0..3 {
            assert!((plain[i] - 7.0 * a[i] / 3.0).abs() < 1e-6, "{i}");
            assert!((nova[i] - 8.0 * a[i] / 3.0).abs() < 1e-6, "{i}");
        }
        assert!(combine(&deltas, &[3, 0, 1], &p, 1.0, Normalisation::None).is_none());
        assert!(combine(&deltas, &[3, 2], &p, 1.0, Normalisation::None).is_none());
    }
}
