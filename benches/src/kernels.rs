//! Kernel benchmarks (owned by the geomx-kernels work).
