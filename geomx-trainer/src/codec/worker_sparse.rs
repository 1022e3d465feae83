//! Worker-side Bi-Sparse (`compression.intra.codec = "bisparse"`): each worker sends its
//! local server only the top-k of its own error-feedback accumulator per large key, and keeps
//! the rest for its next pushes. The local server decodes the pushes to dense values and sums
//! them as it sums dense pushes; the replies are unchanged (exact f32 on this tier).
//!
//! A back end that computes on a GPU may keep a key's error feedback on its device
//! ([`WorkerSparse::device_step`], [`WorkerSparse::take_to_device`]) and hand it back before a
//! checkpoint ([`WorkerSparse::set_host_copy`]); this struct then holds the host copy.

use geomx_kernels::sparse::sparse_is_smaller;
use geomx_kernels::topk::k_for_density;
use geomx_kernels::{is_large, Scaling, Selection, ValueType};
use geomx_net::PayloadCodec;

use super::{encode_values, Encoded, RangeCompressor, SparseSpec};

/// A worker's Bi-Sparse pushes: one [`RangeCompressor`] per key of N ≥ T (`min_size`); the
/// smaller keys go dense in the codec's small type (f32 for `bisparse`).
#[derive(Debug)]
pub struct WorkerSparse {
    keys: Vec<Option<RangeCompressor>>,
    /// Keys whose state a device holds (the host copy is as of the last `set_host_copy`).
    on_device: Vec<bool>,
    small: ValueType,
    scaling: Scaling,
}

impl WorkerSparse {
    /// The pushes of worker `rank` of DC `dc` for keys of `key_lens` elements.
    pub fn new(
        spec: &SparseSpec,
        scaling: Scaling,
        run_seed: u64,
        (dc, rank): (u32, u32),
        key_lens: &[usize],
    ) -> Result<Self, String> {
        let keys = key_lens
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                if !is_large(n, spec.min_size) {
                    return Ok(None);
                }
                if u32::try_from(n).is_err() {
                    return Err(format!(
                        "key {k}: {n} elements do not fit a sparse payload (at most 2^32 - 1)"
                    ));
                }
                RangeCompressor::for_worker(spec, scaling, run_seed, dc, rank, k, n).map(Some)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            on_device: vec![false; key_lens.len()],
            small: spec.small,
            scaling,
        })
    }

    /// Whether key `key` travels sparse (N ≥ T).
    pub fn is_sparse(&self, key: usize) -> bool {
        matches!(self.keys.get(key), Some(Some(_)))
    }

    /// The FP16 scaling of the payloads.
    pub fn scaling(&self) -> Scaling {
        self.scaling
    }

    /// Round `round`'s push of `key` for the gradient `grad`: the sparse top-k of the key's
    /// accumulator (or dense f32 where the sparse form would not be smaller) as a codec payload
    /// (`Raw`), or the dense payload of a small key. A key whose state a device holds is refused.
    pub fn encode(&mut self, key: usize, grad: &[f32], round: u64) -> Result<Encoded, String> {
        if self.on_device.get(key).copied().unwrap_or(false) {
            return Err(format!("key {key}: its error feedback is on the device"));
        }
        match self.keys.get_mut(key) {
            Some(Some(c)) => {
                let (bytes, overflow) = c.push(grad, round)?;
                Ok(Encoded {
                    codec: PayloadCodec::Raw,
                    bytes,
                    overflow,
                })
            }
            Some(None) => Ok(encode_values(grad, self.small, self.scaling)),
            None => Err(format!("key {key} outside the model")),
        }
    }

    /// How a back end that keeps `key`'s error feedback on its device pushes it in `round`:
    /// `Some((momentum, k))` when the key is sparse and every round's push is the exact top `k`
    /// of f32 values without clipping (never dense: the sparse form is smaller at every density
    /// of the warm-up), which is what [`WorkerSparse::encode`] computes; `None` otherwise (a
    /// small key, sampled selection, clipping, 16-bit values: the host encodes those).
    pub fn device_step(&self, key: usize, round: u64) -> Option<(f32, usize)> {
        let c = self.keys.get(key)?.as_ref()?;
        let cfg = c.config();
        let n = c.residual().len();
        let widest = match cfg.warmup_rounds {
            0 => cfg.density,
            _ => cfg.density.max(cfg.warmup_density),
        };
        let plain = matches!(cfg.selection, Selection::Exact)
            && cfg.clip_norm.is_none()
            && cfg.value_type == ValueType::F32
            && sparse_is_smaller(k_for_density(widest, n), ValueType::F32, n);
        plain.then(|| (cfg.momentum, k_for_density(cfg.density_at(round), n)))
    }

    /// Hands `key`'s state to a device: `Some((u, v))` to upload when the host held it (u is
    /// zeros when the momentum is 0), `None` when the device already holds it or the key is not
    /// sparse. From then on [`WorkerSparse::encode`] refuses the key.
    pub fn take_to_device(&mut self, key: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let c = self.keys.get(key)?.as_ref()?;
        if std::mem::replace(&mut self.on_device[key], true) {
            return None;
        }
        let v = c.residual().to_vec();
        let u = match c.velocity() {
            [] => vec![0.0; v.len()],
            u => u.to_vec(),
        };
        Some((u, v))
    }

    /// The keys whose state a device holds.
    pub fn device_keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.on_device
            .iter()
            .enumerate()
            .filter_map(|(k, &d)| d.then_some(k))
    }

    /// Sets the host copy of the state a device holds for `key` (before a checkpoint): `u`
    /// (ignored when the momentum is 0) and `v`.
    pub fn set_host_copy(&mut self, key: usize, u: Vec<f32>, v: Vec<f32>) -> Result<(), String> {
        let c = self
            .keys
            .get_mut(key)
            .and_then(Option::as_mut)
            .ok_or_else(|| format!("key {key} is not sparse"))?;
        let u = if c.velocity().is_empty() {
            Vec::new()
        } else {
            u
        };
        c.import_state(vec![u, v, Vec::new()])
    }

    /// The sparse keys' compressors, with their keys (for checkpoints).
    pub fn compressors(&self) -> impl Iterator<Item = (usize, &RangeCompressor)> {
        self.keys
            .iter()
            .enumerate()
            .filter_map(|(k, c)| c.as_ref().map(|c| (k, c)))
    }

    /// [`WorkerSparse::compressors`], to restore their state.
    pub fn compressors_mut(&mut self) -> impl Iterator<Item = (usize, &mut RangeCompressor)> {
        self.keys
            .iter_mut()
            .enumerate()
            .filter_map(|(k, c)| c.as_mut().map(|c| (k, c)))
    }

    /// Exact-top-k fallbacks of sampled selection so far, over every key.
    pub fn fallbacks(&self) -> u64 {
        self.compressors().map(|(_, c)| c.fallbacks()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_any;
    use crate::config::SelectionKind;
    use geomx_kernels::{Layout, PayloadHeader};

    fn spec(selection: SelectionKind) -> SparseSpec {
        let mut s = crate::codec::compressor::tests::spec(0.01, 1000);
        if selection == SelectionKind::Sampled {
            s.bisparse.selection = Selection::Sampled(geomx_kernels::SampledParams::default());
        }
        s
    }

    fn grad(n: usize, round: u64) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u64 * 7919 + round * 31) % 1013) as f32 / 64.0 - 7.9)
            .collect()
    }

    /// Keys of N ≥ T go as sparse codec payloads of k = ⌈ρN⌉ entries that decode to values of
    /// the gradient; smaller keys go dense f32, exactly the gradient.
    #[test]
    fn large_keys_go_sparse_and_small_keys_dense() {
        let lens = [3000, 10, 1000, 999];
        let mut w = WorkerSparse::new(&spec(SelectionKind::Exact), Scaling::Pow2, 5, (1, 0), &lens)
            .unwrap();
        assert_eq!(
            (0..4).map(|k| w.is_sparse(k)).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        for (k, &n) in lens.iter().enumerate() {
            let g = grad(n, 0);
            let e = w.encode(k, &g, 0).unwrap();
            if w.is_sparse(k) {
                assert_eq!(e.codec, PayloadCodec::Raw);
                let h = PayloadHeader::parse(&e.bytes, k as u64, n).unwrap();
                assert_eq!(h.layout, Layout::Sparse);
                assert_eq!(h.count as usize, n.div_ceil(100));
                let sent = decode_any(&e.bytes, k, n).unwrap();
                for (i, (&s, &x)) in sent.iter().zip(&g).enumerate() {
                    assert!(s == 0.0 || s == x, "key {k} element {i}");
                }
            } else {
                assert_eq!(e.codec, PayloadCodec::DenseF32);
                assert_eq!(crate::codec::f32_from_bytes(&e.bytes).unwrap(), g);
            }
        }
        assert_eq!(w.compressors().map(|(k, _)| k).collect::<Vec<_>>(), [0, 2]);
        assert!(w.encode(4, &[1.0], 0).is_err(), "key outside the model");
    }

    /// The device path is offered exactly where it computes what `encode` computes: exact top-k
    /// of f32 values without clipping, never dense at any density of the warm-up, large keys.
    #[test]
    fn the_device_takes_only_plain_exact_top_k() {
        let lens = [3000, 10];
        let step = |sp: &SparseSpec, round| {
            WorkerSparse::new(sp, Scaling::Pow2, 1, (0, 0), &lens)
                .unwrap()
                .device_step(0, round)
        };
        let exact = spec(SelectionKind::Exact);
        assert_eq!(step(&exact, 0), Some((0.0, 30)));
        let w = WorkerSparse::new(&exact, Scaling::Pow2, 1, (0, 0), &lens).unwrap();
        assert_eq!(w.device_step(1, 0), None, "small key");
        assert_eq!(step(&spec(SelectionKind::Sampled), 0), None);
        let mut fp16 = exact.clone();
        fp16.bisparse.value_type = ValueType::F16;
        assert_eq!(step(&fp16, 0), None);
        let mut clipped = exact.clone();
        clipped.bisparse.clip_norm = Some(1.0);
        assert_eq!(step(&clipped, 0), None);
        let mut half = exact.clone();
        half.bisparse.density = 0.5;
        assert_eq!(step(&half, 0), None, "dense is smaller at ρ = 0.5");
        let mut warm = exact.clone();
        warm.bisparse.warmup_rounds = 4;
        warm.bisparse.warmup_density = 0.25;
        assert_eq!(step(&warm, 0), Some((0.0, 750)));
        assert_eq!(step(&warm, 4), Some((0.0, 30)));
        warm.bisparse.warmup_density = 0.6;
        assert_eq!(step(&warm, 9), None, "dense in the first rounds");
        let mut momentum = exact;
        momentum.bisparse.momentum = 0.9;
        assert_eq!(step(&momentum, 0), Some((0.9, 30)));
    }

    /// Handing a key to the device gives its state once (u as zeros without momentum), the host
    /// then refuses to encode it, and the state set back is what a checkpoint exports.
    #[test]
    fn a_key_handed_to_the_device_comes_back_for_checkpoints() {
        let lens = [3000, 10];
        let mut w = WorkerSparse::new(&spec(SelectionKind::Exact), Scaling::Pow2, 1, (0, 0), &lens)
            .unwrap();
        for r in 0..3 {
            w.encode(0, &grad(3000, r), r).unwrap();
        }
        let v = w.compressors().next().unwrap().1.residual().to_vec();
        assert!(v.iter().any(|x| *x != 0.0));
        assert_eq!(w.take_to_device(0), Some((vec![0.0; 3000], v.clone())));
        assert_eq!(w.take_to_device(0), None);
        assert_eq!(w.take_to_device(1), None, "small key");
        assert_eq!(w.device_keys().collect::<Vec<_>>(), [0]);
        assert!(w.encode(0, &grad(3000, 3), 3).is_err());
        assert!(
            w.encode(1, &grad(10, 3), 3).is_ok(),
            "small keys stay on the host"
        );
        let later: Vec<f32> = v.iter().map(|x| x * 0.5).collect();
        w.set_host_copy(0, vec![1.0; 3000], later.clone()).unwrap();
        let state = w.compressors().next().unwrap().1.export_state();
        assert_eq!(
            state,
            vec![Vec::new(), later, Vec::new()],
            "no velocity at m = 0"
        );
        assert!(w.set_host_copy(1, vec![], vec![]).is_err());
    }

    /// Sampled selection: a worker replays its own samples, and two workers of one DC draw
    /// different ones (their selections differ in some round on the same inputs).
    #[test]
    fn each_worker_samples_with_its_own_stream() {
        let sp = spec(SelectionKind::Sampled);
        let lens = [20_000];
        let run = |rank| {
            let mut w = WorkerSparse::new(&sp, Scaling::Pow2, 7, (0, rank), &lens).unwrap();
            (0..20)
                .map(|r| w.encode(0, &grad(lens[0], r), r).unwrap().bytes)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(0), run(0));
        assert_ne!(run(0), run(1));
    }
}
