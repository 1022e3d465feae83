//! The blocking mutual-TLS 1.3 handshake on a fresh TCP connection, bounded in time and size.
//!
//! Records are read one at a time (header, then exactly its body), so when rustls reports the
//! handshake finished, no byte of the application stream has been consumed: the traffic keys
//! are then extracted and the connection's driver carries on with [`Sealer`] / [`super::record::Opener`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ConnectionCommon, ServerConnection};

use super::identity::{Identity, JOB_SERVER_NAME};
use super::record::{RecordKey, Sealer, RECORD_HEADER};
use super::{Session, TlsContext, TlsError};

/// Largest handshake record body accepted (RFC 8446 ciphertext bound).
const MAX_HANDSHAKE_RECORD: usize = (1 << 14) + 256;
/// Most bytes a peer may send before its handshake completes (certificate chains are ~1 KiB).
const MAX_HANDSHAKE_BYTES: usize = 64 << 10;
/// Label of the exporter that keys DGT datagrams (RFC 8446 §7.5).
pub const DGT_EXPORTER_LABEL: &[u8] = b"EXPORTER-geomx-dgt-datagrams-v1";

/// One connection's application traffic secrets, as rustls derives them during the handshake
/// (its key log, asked for these two labels only): with them the record keys can be updated.
#[derive(Debug, Default)]
struct SecretLog(Mutex<[Option<Vec<u8>>; 2]>);

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let i = match label {
            CLIENT_SECRET => 0,
            SERVER_SECRET => 1,
            _ => return,
        };
        self.0.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(secret.to_vec());
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(label, CLIENT_SECRET | SERVER_SECRET)
    }
}

impl SecretLog {
    /// (transmit, receive) secrets of `side`.
    fn take(&self, side: HandshakeSide) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (c, v) = (s[0].take(), s[1].take());
        match side {
            HandshakeSide::Client => (c, v),
            HandshakeSide::Server => (v, c),
        }
    }
}

/// Which end of the handshake this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeSide {
    /// Connected: TLS client.
    Client,
    /// Accepted: TLS server.
    Server,
}

/// Runs the handshake on `stream` (blocking), finishing by `deadline`. On success the stream's
/// timeouts are cleared and the returned [`Session`] holds the record keys and the peer's
/// verified identity.
pub fn handshake(
    stream: &mut TcpStream,
    ctx: &TlsContext,
    side: HandshakeSide,
    deadline: Instant,
) -> Result<Session, TlsError> {
    // Each connection's configuration carries its own key log (a clone; handshakes are rare).
    let log = Arc::new(SecretLog::default());
    let res = match side {
        HandshakeSide::Client => {
            let name = ServerName::try_from(JOB_SERVER_NAME)
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            let mut cfg = (*ctx.client).clone();
            cfg.key_log = log.clone();
            let conn = ClientConnection::new(Arc::new(cfg), name)
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            run(stream, conn, deadline, &log, side)
        }
        HandshakeSide::Server => {
            let mut cfg = (*ctx.server).clone();
            cfg.key_log = log.clone();
            let conn = ServerConnection::new(Arc::new(cfg))
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            run(stream, conn, deadline, &log, side)
        }
    };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    // A member is at the other end: its host's next connections skip the strangers' queue.
    if let (Ok(_), Ok(peer)) = (&res, stream.peer_addr()) {
        ctx.member_hosts().note(peer.ip());
    }
    res
}

/// What [`run`] needs of a client or server connection.
trait Extract: Sized {
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error>;
}

impl Extract for ClientConnection {
    #[allow(deprecated)]
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        self.dangerous_extract_secrets()
    }
}

impl Extract for ServerConnection {
    #[allow(deprecated)]
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        self.dangerous_extract_secrets()
    }
}

fn set_timeouts(stream: &TcpStream, deadline: Instant) -> Result<(), TlsError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(TlsError::Timeout);
    }
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    Ok(())
}

fn io_err(e: std::io::Error) -> TlsError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => TlsError::Timeout,
        std::io::ErrorKind::UnexpectedEof => TlsError::Dropped,
        _ => TlsError::Io(e.to_string()),
    }
}

fn run<C, D>(
    stream: &mut TcpStream,
    mut conn: C,
    deadline: Instant,
    log: &SecretLog,
    side: HandshakeSide,
) -> Result<Session, TlsError>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<D>> + Extract,
{
    let mut received = 0usize;
    let mut rec = Vec::with_capacity(RECORD_HEADER + 4096);
    loop {
        while conn.wants_write() {
            set_timeouts(stream, deadline)?;
            conn.write_tls(stream).map_err(io_err)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        // One record: the header, then exactly its body.
        set_timeouts(stream, deadline)?;
        rec.resize(RECORD_HEADER, 0);
        stream.read_exact(&mut rec).map_err(io_err)?;
        let body = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
        if !(20..=23).contains(&rec[0]) || rec[1] != 3 || body > MAX_HANDSHAKE_RECORD {
            return Err(TlsError::Handshake(
                "the peer did not start a TLS handshake (plaintext geomx peer, or a stranger?)"
                    .into(),
            ));
        }
        received += RECORD_HEADER + body;
        if received > MAX_HANDSHAKE_BYTES {
            return Err(TlsError::Handshake(format!(
                "handshake larger than {MAX_HANDSHAKE_BYTES} bytes"
            )));
        }
        rec.resize(RECORD_HEADER + body, 0);
        set_timeouts(stream, deadline)?;
        stream
            .read_exact(&mut rec[RECORD_HEADER..])
            .map_err(io_err)?;
        let mut input = &rec[..];
        while !input.is_empty() {
            conn.read_tls(&mut input).map_err(io_err)?;
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (best effort), then fail.
            let _ = conn.write_tls(stream);
            let _ = stream.flush();
            return Err(TlsError::Handshake(e.to_string()));
        }
    }
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::Handshake("the peer presented no certificate".into()))
        .and_then(Identity::from_cert)?;
    let mut dgt_key = [0u8; 32];
    conn.export_keying_material(&mut dgt_key, DGT_EXPORTER_LABEL, None)
        .map_err(|e| TlsError::Handshake(format!("exporter: {e}")))?;
    let secrets = conn
        .extract()
        .map_err(|e| TlsError::Handshake(format!("extracting traffic keys: {e}")))?;
    let aes = !matches!(
        secrets.tx.1,
        rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { .. }
    );
    let key = |(seq, keys): &(u64, rustls::ConnectionTrafficSecrets), secret: Option<Vec<u8>>| {
        match secret {
            Some(s) => RecordKey::from_rustls_secret(*seq, keys, &s),
            None => {
                tracing::warn!("no traffic secret from the handshake: keys cannot be updated");
                RecordKey::from_rustls(*seq, keys)
            }
        }
    };
    let (tx_secret, rx_secret) = log.take(side);
    let (sealer, opener) = Sealer::pair(key(&secrets.tx, tx_secret)?, key(&secrets.rx, rx_secret)?);
    Ok(Session {
        peer,
        sealer,
        opener,
        dgt_key,
        aes,
    })
}
