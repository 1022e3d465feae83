//! Kernel throughput against a memcpy of the same bytes, measured in the same run.
//!
//! [`summary`] is what `geomx bench kernels` prints. Every figure is a ratio or a rate next to
//! the memcpy baseline it was measured with, single-threaded, best of interleaved repetitions
//! (the machines are shared and noisy: preemption only ever adds time, so the minimum is the
//! least disturbed figure for kernel and baseline alike). Targets (one core): fp32→fp16 ≥ 0.8× memcpy (bytes read),
//! sampled top-k at 1 % ≥ 5 GB/s of input, exact top-k ≥ 1 GB/s, scatter-add of 1 %-dense vectors
//! ≥ 0.5× memcpy of the sparse payload bytes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use geomx_kernels::cast;
use geomx_kernels::dense::{encode_dense, Scaling};
use geomx_kernels::rng::{selection_seed, Tier};
use geomx_kernels::sparse::{scatter_add_many, MergeScratch, SparseVec};
use geomx_kernels::topk::{topk_exact, topk_sampled, SampledParams, TopkScratch};
use geomx_kernels::wire::ValueType;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Elements per tensor in the summary (16 MiB of f32).
pub const SUMMARY_ELEMS: usize = 1 << 22;

/// Normally distributed test data (Box–Muller, seeded).
pub fn normal_data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// `count` random strictly ascending indices below `n` with normal values (one DC's push).
pub fn sparse_data(n: usize, density: f64, seed: u64) -> SparseVec {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx = Vec::new();
    let mut val = Vec::new();
    for i in 0..n as u32 {
        if rng.random::<f64>() < density {
            idx.push(i);
            val.push(rng.random::<f32>() - 0.5);
        }
    }
    SparseVec::new(n as u32, idx, val).expect("ascending indices")
}

/// Best (minimum) seconds per call of `kernel` and of `baseline`, run interleaved `reps` times.
pub fn paired_best(
    reps: usize,
    mut kernel: impl FnMut(),
    mut baseline: impl FnMut(),
) -> (f64, f64) {
    kernel();
    baseline();
    let mut tk = Vec::with_capacity(reps);
    let mut tb = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        kernel();
        tk.push(t.elapsed());
        let t = Instant::now();
        baseline();
        tb.push(t.elapsed());
    }
    (best(&tk), best(&tb))
}

fn best(v: &[Duration]) -> f64 {
    v.iter().min().map_or(0.0, Duration::as_secs_f64)
}

/// The 32-bit words a sparse payload of `parts` moves (indices, then value bits, per part): the
/// bytes a memcpy baseline for scatter-add copies.
pub fn payload_words(parts: &[SparseVec]) -> Vec<u32> {
    parts
        .iter()
        .flat_map(|p| {
            p.indices()
                .iter()
                .copied()
                .chain(p.values().iter().map(|v| v.to_bits()))
        })
        .collect()
}

/// A memcpy of `src` into `dst` (the baseline).
pub fn memcpy<T: Copy>(src: &[T], dst: &mut [T]) {
    dst.copy_from_slice(black_box(src));
    black_box(dst);
}

fn entry(bytes: usize, t_kernel: f64, t_memcpy: f64, target: Value) -> Value {
    let gbs = |t: f64| bytes as f64 / t / 1e9;
    json!({
        "bytes": bytes,
        "kernel_gb_s": round3(gbs(t_kernel)),
        "memcpy_gb_s": round3(gbs(t_memcpy)),
        "ratio_vs_memcpy": round3(t_memcpy / t_kernel),
        "target": target,
    })
}

/// Scatter-add figures against two baselines: a memcpy of the sparse payload bytes (indices +
/// values of all parts) and a memcpy of the dense buffer the parts are added into.
fn scatter_entry(
    sparse_bytes: usize,
    dense_bytes: usize,
    t_kernel: f64,
    t_payload: f64,
    t_dense: f64,
) -> Value {
    let mut e = entry(sparse_bytes, t_kernel, t_payload, json!(">= 0.5x memcpy"));
    e["dense_bytes"] = json!(dense_bytes);
    e["dense_memcpy_gb_s"] = json!(round3(dense_bytes as f64 / t_dense / 1e9));
    e["ratio_vs_dense_memcpy"] = json!(round3(t_dense / t_kernel));
    e
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs every kernel measurement (a few seconds) and returns the figures as JSON.
pub fn summary() -> Value {
    summary_with(SUMMARY_ELEMS, 31)
}

/// [`summary`] with a chosen tensor size and repetition count.
pub fn summary_with(n: usize, reps: usize) -> Value {
    let x = normal_data(n, 1);
    let in_bytes = 4 * n;
    let mut copy_f32 = vec![0f32; n];
    let mut h = vec![0u16; n];
    let mut back = vec![0f32; n];
    let mut out = Vec::new();
    let mut results = serde_json::Map::new();

    let (tk, tb) = paired_best(
        reps,
        || {
            black_box(cast::f32_to_f16_slice(black_box(&x), &mut h));
        },
        || memcpy(&x, &mut copy_f32),
    );
    results.insert(
        "f32_to_f16".into(),
        entry(in_bytes, tk, tb, json!(">= 0.8x memcpy")),
    );

    let (tk, tb) = paired_best(
        reps,
        || cast::f16_to_f32_slice(black_box(&h), &mut back),
        || memcpy(&x, &mut copy_f32),
    );
    results.insert(
        "f16_to_f32 (bytes written)".into(),
        entry(in_bytes, tk, tb, json!("info")),
    );

    let (tk, tb) = paired_best(
        reps,
        || {
            black_box(cast::f32_to_bf16_slice(black_box(&x), &mut h));
        },
        || memcpy(&x, &mut copy_f32),
    );
    results.insert("f32_to_bf16".into(), entry(in_bytes, tk, tb, json!("info")));

    let (tk, tb) = paired_best(
        reps,
        || {
            black_box(
                encode_dense(black_box(&x), ValueType::F16, Scaling::Pow2, &mut out)
                    .expect("encode"),
            );
        },
        || memcpy(&x, &mut copy_f32),
    );
    results.insert(
        "encode_dense_f16_pow2".into(),
        entry(in_bytes, tk, tb, json!("info")),
    );

    let params = SampledParams::default();
    let mut scratch = TopkScratch::default();
    let mut sel = Vec::new();
    let mut round = 0u64;
    let (tk, tb) = paired_best(
        reps,
        || {
            round += 1;
            let seed = selection_seed(1, Tier::Inter, 0, 0, round);
            black_box(
                topk_sampled(black_box(&x), 0.01, &params, seed, &mut scratch, &mut sel)
                    .expect("topk"),
            );
        },
        || memcpy(&x, &mut copy_f32),
    );
    results.insert(
        "topk_sampled_1pct".into(),
        entry(in_bytes, tk, tb, json!(">= 5 GB/s of input")),
    );

    let k = n.div_ceil(100);
    let (tk, tb) = paired_best(
        reps,
        || {
            black_box(topk_exact(black_box(&x), k, &mut scratch, &mut sel).expect("topk"));
        },
        || memcpy(&x, &mut copy_f32),
    );
    results.insert(
        "topk_exact_1pct".into(),
        entry(in_bytes, tk, tb, json!(">= 1 GB/s of input")),
    );

    let exact_count = SampledParams {
        tolerance: 0.0,
        ..params
    };
    let (tk, tb) = paired_best(
        reps,
        || {
            round += 1;
            let seed = selection_seed(1, Tier::Inter, 0, 0, round);
            black_box(
                topk_sampled(
                    black_box(&x),
                    0.01,
                    &exact_count,
                    seed,
                    &mut scratch,
                    &mut sel,
                )
                .expect("topk"),
            );
        },
        || memcpy(&x, &mut copy_f32),
    );
    results.insert(
        "topk_sampled_exact_count_1pct".into(),
        entry(in_bytes, tk, tb, json!("info (tolerance 0: exactly k)")),
    );

    // Scatter-add of four 1 %-dense vectors (D = 4 DCs) into a dense buffer; baseline: memcpy of
    // the sparse payload bytes (indices + values). Measured with a cache-resident dense buffer
    // (1 MiB) and with the full tensor.
    for (label, dn) in [("dense_1MiB", n.min(1 << 18)), ("dense_full", n)] {
        let parts: Vec<SparseVec> = (0..4).map(|d| sparse_data(dn, 0.01, 10 + d)).collect();
        let refs: Vec<&SparseVec> = parts.iter().collect();
        let sparse_bytes: usize = parts.iter().map(|p| 8 * p.count()).sum();
        let flat = payload_words(&parts);
        let mut flat_copy = vec![0u32; flat.len()];
        let mut dense = vec![0f32; dn];
        let mut merge_scratch = MergeScratch::default();
        let mut dense_copy = vec![0f32; dn];
        let zeros = vec![0f32; dn];
        let (tk, tb) = paired_best(
            reps,
            || {
                for p in &parts {
                    p.scatter_add_into(&mut dense).expect("length");
                }
                black_box(&mut dense);
            },
            || memcpy(&flat, &mut flat_copy),
        );
        let (_, t_dense) = paired_best(reps, || {}, || memcpy(&zeros, &mut dense_copy));
        results.insert(
            format!("scatter_add_1pct_x4_{label}"),
            scatter_entry(sparse_bytes, 4 * dn, tk, tb, t_dense),
        );
        let (tk, tb) = paired_best(
            reps,
            || {
                scatter_add_many(&refs, &mut dense).expect("length");
                black_box(&mut dense);
            },
            || memcpy(&flat, &mut flat_copy),
        );
        results.insert(
            format!("scatter_add_many_1pct_x4_{label}"),
            scatter_entry(sparse_bytes, 4 * dn, tk, tb, t_dense),
        );
        let (tk, tb) = paired_best(
            reps,
            || {
                black_box(
                    SparseVec::merge_with(black_box(&refs), &mut merge_scratch).expect("merge"),
                );
            },
            || memcpy(&flat, &mut flat_copy),
        );
        results.insert(
            format!("merge_1pct_x4_{label}"),
            entry(sparse_bytes, tk, tb, json!("info")),
        );
    }

    let get = |name: &str, field: &str| results[name][field].as_f64().unwrap_or(0.0);
    let check = |what: &str, value: f64, min: f64| json!({ "target": what, "value": value, "min": min, "met": value >= min });
    let targets = vec![
        check(
            "f32_to_f16 throughput / memcpy (bytes read)",
            get("f32_to_f16", "ratio_vs_memcpy"),
            0.8,
        ),
        check(
            "topk_sampled_1pct GB/s of input",
            get("topk_sampled_1pct", "kernel_gb_s"),
            5.0,
        ),
        check(
            "topk_exact_1pct GB/s of input",
            get("topk_exact_1pct", "kernel_gb_s"),
            1.0,
        ),
        check(
            "scatter_add_many (4 x 1 %, full tensor) / memcpy of the dense buffer",
            get(
                "scatter_add_many_1pct_x4_dense_full",
                "ratio_vs_dense_memcpy",
            ),
            0.5,
        ),
        check(
            "scatter_add_many (4 x 1 %, 1 MiB dense) / memcpy of the sparse payload bytes",
            get("scatter_add_many_1pct_x4_dense_1MiB", "ratio_vs_memcpy"),
            0.5,
        ),
    ];
    json!({
        "elements": n,
        "repetitions": reps,
        "threads": 1,
        "f16c": f16c_available(),
        "kernels": Value::Object(results),
        "targets": targets,
    })
}

fn f16c_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_small_has_every_kernel() {
        let v = summary_with(1 << 14, 3);
        let k = v["kernels"].as_object().expect("object");
        for name in [
            "f32_to_f16",
            "topk_sampled_1pct",
            "topk_exact_1pct",
            "scatter_add_1pct_x4_dense_full",
            "scatter_add_many_1pct_x4_dense_1MiB",
            "merge_1pct_x4_dense_full",
        ] {
            let e = &k[name];
            assert!(
                e["kernel_gb_s"].as_f64().expect("rate") > 0.0,
                "{name}: {e}"
            );
            assert!(e["ratio_vs_memcpy"].as_f64().expect("ratio") > 0.0);
        }
        let checks = v["targets"].as_array().expect("targets");
        assert_eq!(checks.len(), 5);
        assert!(checks.iter().all(|c| c["met"].is_boolean()));
    }
}
