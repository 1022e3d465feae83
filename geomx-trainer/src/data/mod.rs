//! Data sets: the built-in UCI digits, synthetic data, IDX files, and sharding.
