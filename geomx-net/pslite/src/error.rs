//! Typed errors and the numeric codes the C ABI returns.

use geomx_net::NetError;

/// Success.
pub const GXPS_OK: i32 = 0;
/// A bad argument: a null pointer, a length mismatch, an unknown node, a bad group.
pub const GXPS_E_INVALID: i32 = 1;
/// The call is not allowed now: before `Start`, after `Finalize`, or twice.
pub const GXPS_E_STATE: i32 = 2;
/// A key lies outside every server's key range.
pub const GXPS_E_KEY_RANGE: i32 = 3;
/// A transport failure (connect, send, peer closed, timeout).
pub const GXPS_E_NET: i32 = 4;
/// The job was aborted (a process died or called abort); the message names it.
pub const GXPS_E_ABORTED: i32 = 5;
/// The remote side answered with an error (e.g. its request handler failed).
pub const GXPS_E_REMOTE: i32 = 6;
/// A panic inside the library was caught at the boundary (a bug; the message says where).
pub const GXPS_E_PANIC: i32 = 7;
/// A `DMLC_*` variable is missing or malformed.
pub const GXPS_E_ENV: i32 = 8;
/// No such customer handle or unanswered request.
pub const GXPS_E_NOT_FOUND: i32 = 9;
/// A peer broke the message format.
pub const GXPS_E_PROTOCOL: i32 = 10;

/// Every failure of this crate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PsError {
    /// A bad argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Not allowed in the current state.
    #[error("{0}")]
    State(String),
    /// A key outside every server's range.
    #[error("{0}")]
    KeyRange(String),
    /// A transport failure.
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// The job was aborted.
    #[error("job aborted: {0}")]
    Aborted(String),
    /// The remote side reported an error.
    #[error("remote: {0}")]
    Remote(String),
    /// A caught panic.
    #[error("internal error (panic): {0}")]
    Panic(String),
    /// A missing or malformed environment variable.
    #[error("environment: {0}")]
    Env(String),
    /// No such object.
    #[error("not found: {0}")]
    NotFound(String),
    /// A malformed message from a peer.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl PsError {
    /// The C ABI code of this error.
    pub fn code(&self) -> i32 {
        match self {
            PsError::Invalid(_) => GXPS_E_INVALID,
            PsError::State(_) => GXPS_E_STATE,
            PsError::KeyRange(_) => GXPS_E_KEY_RANGE,
            PsError::Net(_) => GXPS_E_NET,
            PsError::Aborted(_) => GXPS_E_ABORTED,
            PsError::Remote(_) => GXPS_E_REMOTE,
            PsError::Panic(_) => GXPS_E_PANIC,
            PsError::Env(_) => GXPS_E_ENV,
            PsError::NotFound(_) => GXPS_E_NOT_FOUND,
            PsError::Protocol(_) => GXPS_E_PROTOCOL,
        }
    }

    /// Maps a transport error of a request: an error reply becomes [`PsError::Remote`].
    pub fn from_request(e: NetError) -> PsError {
        match e {
            NetError::Remote(m) => PsError::Remote(m),
            other => PsError::Net(other),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = PsError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_non_zero() {
        let all = [
            PsError::Invalid(String::new()),
            PsError::State(String::new()),
            PsError::KeyRange(String::new()),
            PsError::Net(NetError::Shutdown),
            PsError::Aborted(String::new()),
            PsError::Remote(String::new()),
            PsError::Panic(String::new()),
            PsError::Env(String::new()),
            PsError::NotFound(String::new()),
            PsError::Protocol(String::new()),
        ];
        let mut codes: Vec<i32> = all.iter().map(PsError::code).collect();
        assert!(codes.iter().all(|&c| c != GXPS_OK));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert!(matches!(
            PsError::from_request(NetError::Remote("x".into())),
            PsError::Remote(_)
        ));
    }
}
