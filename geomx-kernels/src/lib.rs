//! geomx-kernels: compression math for geo-distributed training.
