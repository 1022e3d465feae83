//! Criterion benches for the CPU kernels. Every group also times a memcpy of the same bytes, so
//! the report shows the kernel next to its baseline from the same run.
//!
//! Run: `cargo bench -p geomx-bench --bench kernels`.
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use geomx_bench::kernels::{memcpy, normal_data, payload_words, sparse_data};
use geomx_kernels::cast;
use geomx_kernels::dense::{encode_dense, Scaling};
use geomx_kernels::rng::{selection_seed, Tier};
use geomx_kernels::sparse::{scatter_add_many, MergeScratch, SparseVec};
use geomx_kernels::topk::{topk_exact, topk_sampled, SampledParams, TopkScratch};
use geomx_kernels::wire::ValueType;

const N: usize = 1 << 22;

fn casts(c: &mut Criterion) {
    let x = normal_data(N, 1);
    let mut copy = vec![0f32; N];
    let mut h = vec![0u16; N];
    let mut back = vec![0f32; N];
    let mut out = Vec::new();
    let mut g = c.benchmark_group("cast");
    g.throughput(Throughput::Bytes(4 * N as u64));
    g.bench_function("memcpy_f32", |b| b.iter(|| memcpy(&x, &mut copy)));
    g.bench_function("f32_to_f16", |b| {
        b.iter(|| black_box(cast::f32_to_f16_slice(black_box(&x), &mut h)))
    });
    g.bench_function("f32_to_bf16", |b| {
        b.iter(|| black_box(cast::f32_to_bf16_slice(black_box(&x), &mut h)))
    });
    g.bench_function("encode_dense_f16_pow2", |b| {
        b.iter(|| {
            black_box(encode_dense(
                black_box(&x),
                ValueType::F16,
                Scaling::Pow2,
                &mut out,
            ))
        })
    });
    cast::f32_to_f16_slice(&x, &mut h);
    g.bench_function("f16_to_f32 (bytes written)", |b| {
        b.iter(|| cast::f16_to_f32_slice(black_box(&h), &mut back))
    });
    g.finish();
}

fn topk(c: &mut Criterion) {
    let x = normal_data(N, 2);
    let mut copy = vec![0f32; N];
    let mut scratch = TopkScratch::default();
    let mut sel = Vec::new();
    let mut g = c.benchmark_group("topk_1pct");
    g.throughput(Throughput::Bytes(4 * N as u64));
    g.bench_function("memcpy_f32", |b| b.iter(|| memcpy(&x, &mut copy)));
    let params = SampledParams::default();
    let mut round = 0;
    g.bench_function("sampled", |b| {
        b.iter(|| {
            round += 1;
            let seed = selection_seed(1, Tier::Inter, 0, 0, round);
            black_box(
                topk_sampled(&x, 0.01, &params, seed, &mut scratch, &mut sel).map(|o| o.count),
            )
        })
    });
    let exact_count = SampledParams {
        tolerance: 0.0,
        ..params
    };
    g.bench_function("sampled_exact_count", |b| {
        b.iter(|| {
            round += 1;
            let seed = selection_seed(1, Tier::Inter, 0, 0, round);
            black_box(
                topk_sampled(&x, 0.01, &exact_count, seed, &mut scratch, &mut sel).map(|o| o.count),
            )
        })
    });
    g.bench_function("exact", |b| {
        b.iter(|| black_box(topk_exact(&x, N / 100, &mut scratch, &mut sel)))
    });
    g.finish();
}

fn scatter(c: &mut Criterion) {
    for (name, n) in [
        ("scatter_1pct_dense_1MiB", 1usize << 18),
        ("scatter_1pct_dense_16MiB", N),
    ] {
        let parts: Vec<SparseVec> = (0..4).map(|d| sparse_data(n, 0.01, 10 + d)).collect();
        let refs: Vec<&SparseVec> = parts.iter().collect();
        let flat = payload_words(&parts);
        let mut flat_copy = vec![0u32; flat.len()];
        let mut dense = vec![0f32; n];
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(4 * flat.len() as u64));
        g.bench_function("memcpy_payload", |b| {
            b.iter(|| memcpy(&flat, &mut flat_copy))
        });
        g.bench_function("scatter_add_x4", |b| {
            b.iter(|| {
                for p in &parts {
                    p.scatter_add_into(&mut dense).expect("length");
                }
            })
        });
        g.bench_function("scatter_add_many_x4", |b| {
            b.iter(|| scatter_add_many(&refs, &mut dense).expect("length"))
        });
        let mut scratch = MergeScratch::default();
        g.bench_function("merge_x4", |b| {
            b.iter(|| black_box(SparseVec::merge_with(&refs, &mut scratch)))
        });
        g.finish();
    }
}

criterion_group!(benches, casts, topk, scatter);
criterion_main!(benches);
