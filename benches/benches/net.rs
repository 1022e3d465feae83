//! Criterion benches for geomx-net over loopback: push + pull per driver and payload size, the
//! raw-TCP echo baseline, and a pipelined burst of 4 KiB pushes.
//! `geomx_bench::net::summary` prints the same comparisons as one JSON report.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use geomx_bench::net::{KvPair, RawMode, RawPair};
use geomx_net::DriverKind;

fn drivers() -> Vec<DriverKind> {
    let mut d = vec![DriverKind::Portable];
    if geomx_net::uring_unavailable_reason().is_none() {
        d.push(DriverKind::IoUring);
    }
    d
}

fn push_pull(c: &mut Criterion) {
    let mut g = c.benchmark_group("net/push_pull");
    g.sample_size(10);
    for size in [4usize << 10, 1 << 20, 16 << 20] {
        let payload = vec![1u8; size];
        g.throughput(Throughput::Bytes(2 * size as u64));
        let mut raw = RawPair::new(size, RawMode::PushPull).expect("raw pair");
        g.bench_with_input(BenchmarkId::new("raw_tcp", size), &size, |b, _| {
            b.iter(|| raw.round_trip(&payload).expect("raw round trip"))
        });
        for d in drivers() {
            let pair = KvPair::new(d).expect("kv pair");
            g.bench_with_input(BenchmarkId::new(d.name(), size), &size, |b, _| {
                b.iter(|| pair.push_pull(&payload).expect("push_pull"))
            });
        }
    }
    g.finish();
}

fn pipelined(c: &mut Criterion) {
    let mut g = c.benchmark_group("net/pipelined_4KiB_x1000");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1000));
    let payload = vec![1u8; 4 << 10];
    for d in drivers() {
        let pair = KvPair::new(d).expect("kv pair");
        g.bench_function(d.name(), |b| {
            b.iter(|| pair.pipelined(&payload, 1000, 256).expect("pipelined"))
        });
    }
    g.finish();
}

criterion_group!(benches, push_pull, pipelined);
criterion_main!(benches);
