//! geomx-trainer: the reference trainer for geo-distributed training.
//!
//! It wires `geomx-net` (transport) and `geomx-kernels` (compression math) into the HiPS hierarchy:
//! workers → one local server per data center → global server(s), started by one `geomx` binary.
#![warn(missing_docs)]

pub mod bench_cmd;
pub mod bench_dgt;
pub mod bench_e2e;
pub mod bench_sched;
pub mod bench_sync;
pub mod bench_tls;
pub mod checkpoint;
pub mod clock;
pub mod codec;
pub mod config;
pub mod data;
pub mod deploy;
pub mod engine;
pub mod hash;
pub mod hips;
pub mod launch;
pub mod placement;
pub mod report;
pub mod security;
pub mod wanlab;

/// Locks a mutex, recovering the data of a poisoned one (a panicked thread already logged).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
