//! Mutual TLS 1.3 for every TCP link: job certificates that bind a process to its role, rustls
//! for the handshake, and a record layer the drivers run themselves.
//!
//! * [`pki`]: the job CA ([`JobCa`]) and members' [`Credentials`].
//! * [`Identity`]: the (role, dc, rank) a certificate speaks for.
//! * [`TlsContext`]: a member's rustls configuration (TLS 1.3 only, AES-256-GCM or
//!   ChaCha20-Poly1305, the job CA as the only trust anchor, client certificates required).
//! * [`handshake`](handshake::handshake): the blocking handshake on a fresh connection, bounded
//!   in time and bytes; it yields a [`Session`]: the record keys, the peer's verified identity
//!   and an exported key for DGT datagrams.
//! * [`record`]: the TLS 1.3 record layer (sans-IO [`Sealer`] / [`Opener`]).
//!
//! Endpoints take a [`Security`] in [`crate::NetOptions`]; with [`Security::Mtls`] a connection
//! carries no frame until its handshake has succeeded, and the peer's [`Identity`] is available
//! to handlers ([`crate::PeerHandle::identity`]).

pub mod handshake;
mod identity;
pub mod pki;
pub mod record;
pub mod slots;

use std::sync::Arc;

use rustls::crypto::ring::cipher_suite::{
    TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use handshake::{handshake, HandshakeSide};
pub use identity::{Identity, JOB_SERVER_NAME};
pub use pki::{Credentials, JobCa, MAX_VALID_DAYS};
pub use record::{Opener, RecordAead, RecordKey, Sealer};
pub use slots::{
    HandshakeSlot, HandshakeSlots, MemberHosts, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDR,
};

/// Errors of authentication, key handling and the record layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// The handshake failed (bad or unknown certificate, wrong CA, not TLS, …).
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
    /// A certificate's geomx identity is missing or malformed.
    #[error("certificate identity: {0}")]
    Identity(String),
    /// Making or parsing keys and certificates failed.
    #[error("{0}")]
    Pki(String),
    /// A key or certificate file could not be read or written.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// A record failed authentication: tampered, forged, replayed or reordered data.
    #[error("record authentication failed (tampered, forged or replayed data)")]
    BadRecordMac,
    /// The peer broke the TLS record protocol.
    #[error("record protocol: {0}")]
    Protocol(String),
    /// The peer sent a fatal alert.
    #[error("the peer sent TLS alert {0} ({name})", name = record::alert_name(*.0))]
    Alert(u8),
    /// The peer closed the TLS stream (close_notify).
    #[error("the peer closed the TLS stream")]
    PeerClosed,
    /// A traffic key reached its record limit (2^24 AES-GCM records, about 256 GiB).
    #[error("the traffic key reached its record limit; reconnect")]
    KeyExhausted,
    /// The crypto library failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// Socket I/O failed during the handshake.
    #[error("i/o: {0}")]
    Io(String),
    /// The peer closed the connection before the handshake finished.
    #[error("the peer closed the connection during the handshake")]
    Dropped,
}

impl TlsError {
    /// Whether the peer ended the connection during the handshake without an answer (closed or
    /// reset it). A server past its handshake bounds ([`slots`]) closes new connections at
    /// once, so a member retries these, unlike a refusal of its certificate.
    pub fn is_dropped(&self) -> bool {
        matches!(self, TlsError::Dropped | TlsError::Io(_))
    }

    pub(crate) fn io(path: &std::path::Path, e: std::io::Error) -> TlsError {
        TlsError::File {
            path: path.display().to_string(),
            msg: e.to_string(),
        }
    }
}

impl From<std::io::Error> for TlsError {
    fn from(e: std::io::Error) -> Self {
        TlsError::Io(e.to_string())
    }
}

/// How an endpoint protects its connections.
#[derive(Clone, Default)]
pub enum Security {
    /// Plaintext frames, self-declared identities: tests and plaintext peers (ps-lite).
    #[default]
    Off,
    /// Mutual TLS 1.3 with the job's certificates.
    Mtls(Arc<TlsContext>),
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Off => f.write_str("Off"),
            Security::Mtls(ctx) => write!(f, "Mtls({})", ctx.identity),
        }
    }
}

impl PartialEq for Security {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Security::Off, Security::Off) => true,
            (Security::Mtls(a), Security::Mtls(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Security {}

impl Security {
    /// The TLS context, if on.
    pub fn context(&self) -> Option<&Arc<TlsContext>> {
        match self {
            Security::Off => None,
            Security::Mtls(c) => Some(c),
        }
    }
}

/// A member's TLS configuration: its identity, certificate and key, and the job CA.
pub struct TlsContext {
    identity: Identity,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// Addresses of the peers that completed a handshake under this context.
    members: MemberHosts,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Whether this CPU has AES instructions (then AES-256-GCM is preferred over ChaCha20).
pub fn has_aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

impl TlsContext {
    /// The context of the member `creds` were issued to.
    pub fn new(creds: &Credentials) -> Result<TlsContext, TlsError> {
        let cert = creds.cert_der()?;
        let identity = Identity::from_cert(&cert)?;
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = if has_aes_hardware() {
            vec![TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256]
        } else {
            vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_256_GCM_SHA384]
        };
        let provider: Arc<CryptoProvider> = Arc::new(provider);
        let mut roots = RootCertStore::empty();
        roots
            .add(creds.ca_der()?)
            .map_err(|e| TlsError::Pki(format!("CA certificate: {e}")))?;
        let roots = Arc::new(roots);
        let tls = |e: rustls::Error| TlsError::Pki(e.to_string());
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(vec![cert.clone()], creds.key_der()?)
            .map_err(tls)?;
        client.enable_secret_extraction = true;
        client.resumption = rustls::client::Resumption::disabled();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Pki(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], creds.key_der()?)
            .map_err(tls)?;
        server.enable_secret_extraction = true;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(TlsContext {
            identity,
            client: Arc::new(client),
            server: Arc::new(server),
            members: MemberHosts::default(),
        })
    }

    /// This member's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The hosts of the members that completed a handshake with this process under this
    /// context, either side: their connections take handshake slots from a pool strangers
    /// cannot fill ([`slots`]).
    pub fn member_hosts(&self) -> &MemberHosts {
        &self.members
    }
}

/// A finished handshake: the record keys and what was learnt about the peer.
#[derive(Debug)]
pub struct Session {
    /// The peer's verified identity.
    pub peer: Identity,
    /// Seals what this end sends.
    pub sealer: Sealer,
    /// Opens what the peer sends.
    pub opener: Opener,
    /// A 32-byte secret both ends share, exported from the session
    /// ([`handshake::DGT_EXPORTER_LABEL`]): the key of DGT's datagrams.
    pub dgt_key: [u8; 32],
    /// Whether the session uses AES-256-GCM (else ChaCha20-Poly1305).
    pub aes: bool,
}

/// A connection's [`Session`] (or none, on plaintext) taken apart for its I/O: the identity
/// goes to the endpoint, the sealer to the write side, the opener to the read side, the datagram
/// key to DGT.
#[derive(Default)]
pub(crate) struct SessionParts {
    pub(crate) identity: Option<Identity>,
    pub(crate) sealer: Option<Sealer>,
    pub(crate) opener: Option<Opener>,
    /// The exported datagram key and whether the session uses AES (else ChaCha20).
    pub(crate) datagram_key: Option<([u8; 32], bool)>,
}

impl From<Option<Session>> for SessionParts {
    fn from(s: Option<Session>) -> SessionParts {
        match s {
            None => SessionParts::default(),
            Some(s) => SessionParts {
                identity: Some(s.peer),
                sealer: Some(s.sealer),
                opener: Some(s.opener),
                datagram_key: Some((s.dgt_key, s.aes)),
            },
        }
    }
}

#[cfg(test)]
mod tests;
