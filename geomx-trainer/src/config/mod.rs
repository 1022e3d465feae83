//! Cluster configuration: the TOML topology file, defaults and validation.
