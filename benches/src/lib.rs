//! Measurement routines shared by the criterion benches and the `geomx bench` commands.
//!
//! Every routine reports ratios against a baseline measured in the same run (raw sockets, memcpy),
//! because the machines we run on are noisy.

pub mod kernels;
pub mod net;
