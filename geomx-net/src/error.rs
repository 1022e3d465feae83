//! The error type of every fallible geomx-net operation.

use std::sync::Arc;

use crate::wire::WireError;

/// Errors of the transport, the key-value layer and the coordinator.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// No answer (or no connection / handshake) within the configured or requested time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The peer closed the connection, reset it, or went silent past the liveness timeout.
    #[error("peer closed: {0}")]
    PeerClosed(String),
    /// The peer answered the request with an error message.
    #[error("remote error: {0}")]
    Remote(String),
    /// The peer sent a malformed frame.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// The peer broke the protocol (e.g. a request before the handshake).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The coordinator rejected a registration (version / hash mismatch, unknown or duplicate node).
    #[error("rejected: {0}")]
    Rejected(String),
    /// A payload exceeds the maximum frame size.
    #[error("payload of {len} bytes exceeds the maximum frame size {max}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Maximum frame size.
        max: usize,
    },
    /// The local endpoint was shut down.
    #[error("endpoint shut down")]
    Shutdown,
    /// The requested driver cannot run here.
    #[error("driver unavailable: {0}")]
    DriverUnavailable(String),
    /// Authentication or encryption failed: a failed handshake, an unknown or wrong identity, a
    /// tampered record.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// An operating-system I/O error.
    #[error("i/o error: {0}")]
    Io(Arc<std::io::Error>),
}

impl From<std::io::Error> for NetError {
    fn from(e: std::io::Error) -> Self {
        NetError::Io(Arc::new(e))
    }
}

/// Result alias of this crate.
pub type Result<T, E = NetError> = std::result::Result<T, E>;
