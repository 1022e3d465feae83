//! Transport benchmarks (owned by the geomx-net work).
