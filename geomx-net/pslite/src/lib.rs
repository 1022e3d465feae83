//! geomx-pslite: geomx-net as a drop-in transport for ps-lite applications.
//!
//! Two layers:
//! * a C ABI (`include/geomx_pslite.h`, the `gxps_*` functions in [`ffi`]) over geomx-net's
//!   [`KvServer`](geomx_net::KvServer) / [`KvClient`](geomx_net::KvClient) and
//!   [`Coordinator`](geomx_net::coord::Coordinator) / [`CoordClient`](geomx_net::coord::CoordClient);
//!   errors come back as codes plus a message, never as a panic across the boundary;
//! * a C++ header set (`include/ps/`) with ps-lite's public API (`ps::Start`, `KVWorker`,
//!   `KVServer`, `SimpleApp`, `SArray`, `Postoffice`, the `CHECK` / `LOG` macros) implemented on
//!   the C ABI, so ps-lite applications compile unchanged against `libgeomx_pslite.a`.
//!
//! Processes are launched as with ps-lite (`DMLC_ROLE`, `DMLC_NUM_SERVER`, `DMLC_NUM_WORKER`,
//! `DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`, `DMLC_NODE_HOST`, `DMLC_INTERFACE`); the scheduler
//! process runs geomx's coordinator. See `docs/pslite.md`.
#![warn(missing_docs)]

pub mod codec;
pub mod customer;
pub mod env;
pub mod error;
pub mod ffi;
pub mod groups;
pub mod keep;
pub mod message;
pub mod node;

pub use error::{PsError, Result};
