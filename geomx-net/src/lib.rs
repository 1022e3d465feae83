//! geomx-net: transport for geo-distributed parameter servers.
//!
//! Layers, bottom up:
//! * [`wire`]: the versioned little-endian frame format (56-byte zerocopy header + payload) and a
//!   total, bounded incremental decoder ([`FrameDecoder`]).
//! * [`conn`]: the sans-IO connection state machine (handshake, request/response matching,
//!   request / handshake / liveness timeouts, heartbeats), driven by `now` arguments.
//! * drivers, chosen by [`DriverKind`] in [`NetOptions`]: io_uring on Linux, portable std sockets
//!   and threads everywhere; `Auto` falls back to portable with one log line saying why.
//! * [`kv`]: [`KvServer`] + [`Handler`] and [`KvClient`] (push / pull, many requests in flight,
//!   answers from any thread through a [`Responder`]).
//! * [`coord`]: [`coord::Coordinator`] and [`coord::CoordClient`] (registration, deterministic
//!   ids, barriers, heartbeats, done / shutdown, abort naming the failed process).
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use geomx_net::{Handler, KvClient, KvServer, NetOptions, PayloadCodec, Request, Responder};
//!
//! struct Echo;
//! impl Handler for Echo {
//!     fn on_request(&self, req: Request, reply: Responder) {
//!         let _ = reply.send(req.version + 1, req.codec, &req.payload);
//!     }
//! }
//!
//! let server = KvServer::bind("127.0.0.1:0", Echo, NetOptions::default())?;
//! let client = KvClient::connect(server.local_addr(), 1, NetOptions::default())?;
//! let p = client.push(7, 0, PayloadCodec::DenseF32, 0, 1, &1.5f32.to_le_bytes())?;
//! let r = p.wait(Duration::from_secs(5))?;
//! assert_eq!((r.key, r.version), (7, 1));
//! // HelloAck + the reply (+ a heartbeat if this took longer than the 1 s heartbeat interval).
//! assert!(client.stats().frames_recv >= 2);
//! # Ok::<(), geomx_net::NetError>(())
//! ```
//!
//! See `docs/net.md` for the embedding guide and `docs/wire-format.md` for the frame layout.
#![warn(missing_docs)]

pub mod bufpool;
pub mod congestion;
pub mod conn;
pub mod coord;
/// DGT (differential gradient transmission): sans-IO sender / receiver core, see `docs/dgt.md`.
pub mod dgt;
mod driver;
pub mod error;
pub mod kv;
mod link;
mod owned;
pub mod port;
pub mod sched;
pub mod stats;
mod tcp_state;
pub mod tls;
pub mod wire;

pub use conn::ConnConfig;
pub use driver::{
    uring_unavailable_reason, DriverKind, NetOptions, DEFAULT_IO_CHUNK, DEFAULT_MAX_CONNECTIONS,
    MIN_IO_CHUNK,
};
pub use error::{NetError, Result};
pub use kv::{Handler, KvClient, KvServer, PeerHandle, Pending, Request, Responder, Response};
pub use owned::OwnedBytes;
pub use stats::Counters;
pub use tcp_state::TcpRate;
pub use wire::{
    Frame, FrameDecoder, FrameHeader, MsgKind, PayloadCodec, WireError, HEADER_LEN, MAX_FRAME,
};
