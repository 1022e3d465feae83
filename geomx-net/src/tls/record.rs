//! The TLS 1.3 record layer (RFC 8446 §5), sans-IO, for the traffic keys of a finished handshake.
//!
//! rustls performs the handshake; its traffic secrets are then taken over (as kTLS would take
//! them, `rustls::ExtractedSecrets`) so the drivers can seal a frame's header and payload
//! straight from the caller's buffers into records and open records straight into the frame
//! decoder's input, with `ring`'s AES-256-GCM or ChaCha20-Poly1305. The records are standard
//! TLS 1.3 application-data records: a rustls peer reads them (tested).
//!
//! Keys are updated in place (RFC 8446 §4.6.3, §7.2): a sealer that holds its traffic secret
//! sends a KeyUpdate and moves to the next generation every [`KEY_UPDATE_EVERY`] records (and
//! when the peer asks), and an opener follows the peer's KeyUpdates, so an AES-GCM connection
//! never reaches the cipher's record limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::hkdf;
use rustls::ConnectionTrafficSecrets;

use super::TlsError;

/// Largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Record header length.
pub const RECORD_HEADER: usize = 5;
/// AEAD tag length.
pub const TAG_LEN: usize = 16;
/// Largest record body accepted (RFC 8446: plaintext + 256).
const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// Bytes a record adds to its plaintext: header, content type, tag.
pub const RECORD_OVERHEAD: usize = RECORD_HEADER + 1 + TAG_LEN;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

/// AES-GCM keys are retired after this many records (RFC 8446 §5.5: 2^24.5); the connection then
/// fails with a clear error rather than weaken.
const AES_GCM_LIMIT: u64 = 1 << 24;

/// A sealer that holds its traffic secret updates its key after this many records (2^23 records,
/// at most 128 GiB: half the AES-GCM limit).
pub const KEY_UPDATE_EVERY: u64 = 1 << 23;

/// Alert description: a record failed authentication (RFC 8446 §6.2).
pub const BAD_RECORD_MAC: u8 = 20;

/// The name of an alert description (RFC 8446 §6), for messages.
pub fn alert_name(description: u8) -> &'static str {
    match description {
        0 => "close_notify",
        10 => "unexpected_message",
        BAD_RECORD_MAC => {
            "bad_record_mac: it could not authenticate our data (tampered on the way?)"
        }
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        46 => "certificate_unknown",
        48 => "unknown_ca",
        50 => "decode_error",
        51 => "decrypt_error",
        80 => "internal_error",
        _ => "unknown alert",
    }
}

/// Handshake message type of a KeyUpdate (RFC 8446 §4.6.3).
const KEY_UPDATE: u8 = 24;

/// A traffic secret with the hash of its cipher suite: what a key update derives the next key
/// from (RFC 8446 §7.1–7.3).
#[derive(Clone)]
pub(crate) struct TrafficSecret {
    hkdf: hkdf::Algorithm,
    secret: Vec<u8>,
}

impl std::fmt::Debug for TrafficSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficSecret").finish_non_exhaustive()
    }
}

/// An HKDF output length for ring.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl TrafficSecret {
    /// `secret` of a suite whose hash is SHA-384 (`sha384`) or SHA-256.
    pub(crate) fn new(sha384: bool, secret: &[u8]) -> TrafficSecret {
        TrafficSecret {
            hkdf: if sha384 {
                hkdf::HKDF_SHA384
            } else {
                hkdf::HKDF_SHA256
            },
            secret: secret.to_vec(),
        }
    }

    /// HKDF-Expand-Label(secret, label, "", len).
    fn expand_label(&self, label: &[u8], len: usize) -> Result<Vec<u8>, TlsError> {
        let full = [b"tls13 ".as_slice(), label].concat();
        let info = [
            &(len as u16).to_be_bytes()[..],
            &[full.len() as u8],
            &full,
            &[0u8],
        ];
        let mut out = vec![0u8; len];
        hkdf::Prk::new_less_safe(self.hkdf, &self.secret)
            .expand(&info, Len(len))
            .and_then(|okm| okm.fill(&mut out))
            .map_err(|_| TlsError::Crypto("HKDF-Expand-Label".into()))?;
        Ok(out)
    }

    /// The next generation's secret: HKDF-Expand-Label(secret, "traffic upd", "", Hash.length).
    fn next(&self) -> Result<TrafficSecret, TlsError> {
        let len = hkdf::KeyType::len(&self.hkdf);
        Ok(TrafficSecret {
            hkdf: self.hkdf,
            secret: self.expand_label(b"traffic upd", len)?,
        })
    }
}

/// The AEAD of a record key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordAead {
    /// AES-256-GCM (preferred where the CPU has AES instructions).
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    ChaCha20Poly1305,
}

/// One direction's traffic key.
pub struct RecordKey {
    alg: &'static aead::Algorithm,
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    limit: u64,
    /// The secret it was derived from: with it the key can be updated.
    secret: Option<TrafficSecret>,
    /// Key updates so far.
    generation: u64,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKey")
            .field("seq", &self.seq)
            .field("generation", &self.generation)
            .finish()
    }
}

impl RecordKey {
    /// The key of one direction from rustls's extracted `(sequence number, secrets)`.
    pub fn from_rustls(
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<RecordKey, TlsError> {
        let (alg, key, iv, limit) = match secrets {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, AES_GCM_LIMIT)
            }
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, AES_GCM_LIMIT)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, u64::MAX)
            }
            _ => return Err(TlsError::Handshake("unsupported cipher suite".into())),
        };
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| TlsError::Handshake("bad IV length".into()))?;
        RecordKey::new(alg, key.as_ref(), iv, seq, limit)
    }

    /// [`RecordKey::from_rustls`] with the traffic secret the key was derived from (RFC 8446
    /// §7.3), which lets the key be updated; the secret is checked against the key.
    pub fn from_rustls_secret(
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
        secret: &[u8],
    ) -> Result<RecordKey, TlsError> {
        let (key, iv, sha384) = match secrets {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (key, iv, true),
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv, false),
            _ => return Err(TlsError::Handshake("unsupported cipher suite".into())),
        };
        RecordKey::from_rustls(seq, secrets)?.with_secret(
            TrafficSecret::new(sha384, secret),
            key.as_ref(),
            iv.as_ref(),
        )
    }

    /// A key from raw material (benchmarks and tests; connections take theirs from the
    /// handshake, [`RecordKey::from_rustls`]).
    pub fn with_key(
        aead: RecordAead,
        key: &[u8; 32],
        iv: [u8; NONCE_LEN],
    ) -> Result<RecordKey, TlsError> {
        match aead {
            RecordAead::Aes256Gcm => RecordKey::new(&aead::AES_256_GCM, key, iv, 0, AES_GCM_LIMIT),
            RecordAead::ChaCha20Poly1305 => {
                RecordKey::new(&aead::CHACHA20_POLY1305, key, iv, 0, u64::MAX)
            }
        }
    }

    /// Attaches the traffic secret this key was derived from, so that it can be updated. The
    /// key and IV derived from `secret` must be this key's (checked: a mismatch means the
    /// secret belongs to another key).
    pub(crate) fn with_secret(
        mut self,
        secret: TrafficSecret,
        key: &[u8],
        iv: &[u8],
    ) -> Result<RecordKey, TlsError> {
        let k = secret.expand_label(b"key", self.alg.key_len())?;
        let v = secret.expand_label(b"iv", NONCE_LEN)?;
        if k != key || v != iv {
            return Err(TlsError::Handshake(
                "the traffic secret does not derive the traffic key".into(),
            ));
        }
        self.secret = Some(secret);
        Ok(self)
    }

    /// The key of the next generation (RFC 8446 §7.2), sequence numbers from 0.
    fn update(&mut self) -> Result<(), TlsError> {
        let Some(secret) = self.secret.as_ref() else {
            return Err(TlsError::Protocol(
                "a key update, but this connection's traffic secret is unknown".into(),
            ));
        };
        let next = secret.next()?;
        let key = next.expand_label(b"key", self.alg.key_len())?;
        let iv: [u8; NONCE_LEN] = next
            .expand_label(b"iv", NONCE_LEN)?
            .try_into()
            .map_err(|_| TlsError::Crypto("IV length".into()))?;
        let mut k = RecordKey::new(self.alg, &key, iv, 0, self.limit)?;
        k.secret = Some(next);
        k.generation = self.generation + 1;
        *self = k;
        Ok(())
    }

    /// Key updates so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn new(
        alg: &'static aead::Algorithm,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        seq: u64,
        limit: u64,
    ) -> Result<RecordKey, TlsError> {
        let key =
            UnboundKey::new(alg, key).map_err(|_| TlsError::Handshake("bad traffic key".into()))?;
        Ok(RecordKey {
            alg,
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
            secret: None,
            generation: 0,
        })
    }

    /// The next record's nonce (IV xor the big-endian sequence number), or an error once the
    /// key's record limit is reached.
    fn next_nonce(&mut self) -> Result<Nonce, TlsError> {
        if self.seq >= self.limit {
            return Err(TlsError::KeyExhausted);
        }
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

fn record_header(body_len: usize) -> [u8; RECORD_HEADER] {
    let l = body_len as u16;
    [APPLICATION_DATA, 3, 3, (l >> 8) as u8, l as u8]
}

/// Seals plaintext into records.
#[derive(Debug)]
pub struct Sealer {
    key: RecordKey,
    /// Records per key generation (when the key's secret is known).
    update_every: u64,
    /// Set by the connection's [`Opener`] when the peer asked for a key update.
    requested: Arc<AtomicBool>,
}

impl Sealer {
    /// A sealer with the transmit key.
    pub fn new(key: RecordKey) -> Sealer {
        Sealer {
            key,
            update_every: KEY_UPDATE_EVERY,
            requested: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Updates the key every `records` records instead of [`KEY_UPDATE_EVERY`] (tests).
    pub fn set_update_every(&mut self, records: u64) {
        self.update_every = records.max(1);
    }

    /// The sealer and the opener of one connection: a KeyUpdate the opener receives with
    /// "update requested" makes the sealer update its key before its next record.
    pub fn pair(tx: RecordKey, rx: RecordKey) -> (Sealer, Opener) {
        let s = Sealer::new(tx);
        let mut o = Opener::new(rx);
        o.requested = s.requested.clone();
        (s, o)
    }

    /// Key updates this sealer made.
    pub fn generation(&self) -> u64 {
        self.key.generation()
    }

    /// Appends one record whose inner plaintext is `body` of content type `ctype`.
    fn seal_record(&mut self, body: &[u8], ctype: u8, out: &mut Vec<u8>) -> Result<(), TlsError> {
        let start = out.len();
        let hdr = record_header(body.len() + 1 + TAG_LEN);
        out.extend_from_slice(&hdr);
        out.extend_from_slice(body);
        out.push(ctype);
        let nonce = self.key.next_nonce()?;
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(hdr), &mut out[start + RECORD_HEADER..])
            .map_err(|_| TlsError::Crypto("seal failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Appends a KeyUpdate record (update not requested) under the current key, then moves to
    /// the next key.
    fn key_update(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_record(&[KEY_UPDATE, 0, 0, 1, 0], HANDSHAKE, out)?;
        self.key.update()
    }

    /// Appends a fatal alert record (`description`, e.g. [`BAD_RECORD_MAC`]) to `out`: what a
    /// connection sends before it closes on bad input (RFC 8446 §6).
    pub fn seal_alert(&mut self, description: u8, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_record(&[2, description], ALERT, out)
    }

    /// Whether the next record goes under a new key.
    fn update_due(&self) -> bool {
        self.key.secret.is_some()
            && (self.key.seq >= self.update_every || self.requested.load(Ordering::Relaxed))
    }

    /// The sealed length of `plain` bytes.
    pub fn sealed_len(plain: usize) -> usize {
        plain + plain.div_ceil(MAX_PLAINTEXT).max(1) * RECORD_OVERHEAD
    }

    /// Appends the records carrying the concatenation of `parts` to `out` (records span part
    /// boundaries; each holds up to [`MAX_PLAINTEXT`] bytes).
    pub fn seal(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), TlsError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        out.reserve(Sealer::sealed_len(total));
        let mut part = 0;
        let mut off = 0;
        let mut left = total;
        loop {
            if self.update_due() {
                self.requested.store(false, Ordering::Relaxed);
                self.key_update(out)?;
            }
            let n = left.min(MAX_PLAINTEXT);
            let start = out.len();
            let hdr = record_header(n + 1 + TAG_LEN);
            out.extend_from_slice(&hdr);
            let mut need = n;
            while need > 0 {
                let p = parts[part];
                let take = (p.len() - off).min(need);
                out.extend_from_slice(&p[off..off + take]);
                off += take;
                need -= take;
                if off == p.len() {
                    part += 1;
                    off = 0;
                }
            }
            out.push(APPLICATION_DATA);
            let nonce = self.key.next_nonce()?;
            let tag = self
                .key
                .key
                .seal_in_place_separate_tag(
                    nonce,
                    Aad::from(hdr),
                    &mut out[start + RECORD_HEADER..],
                )
                .map_err(|_| TlsError::Crypto("seal failed".into()))?;
            out.extend_from_slice(tag.as_ref());
            left -= n;
            if left == 0 {
                return Ok(());
            }
        }
    }
}

/// Opens records into plaintext, across any split of the input.
#[derive(Debug)]
pub struct Opener {
    key: RecordKey,
    /// A record not yet complete in the input.
    partial: Vec<u8>,
    /// Tells the connection's [`Sealer`] that the peer asked for a key update.
    requested: Arc<AtomicBool>,
}

impl Opener {
    /// Key updates of the peer this opener followed.
    pub fn generation(&self) -> u64 {
        self.key.generation()
    }

    /// An opener with the receive key.
    pub fn new(key: RecordKey) -> Opener {
        Opener {
            key,
            partial: Vec::new(),
            requested: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Bytes of an incomplete record held back from the last call.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// How many more input bytes complete the current record (at least 1): a reader that wants
    /// whole records asks for this much.
    pub fn wanted(&self) -> usize {
        if self.partial.len() < RECORD_HEADER {
            return RECORD_HEADER - self.partial.len();
        }
        let body = usize::from(u16::from_be_bytes([self.partial[3], self.partial[4]]));
        (RECORD_HEADER + body)
            .saturating_sub(self.partial.len())
            .max(1)
    }

    /// The length of the next record in `input` (header included), when no partial record is
    /// held and `input` starts with a whole record header.
    pub fn next_record_len(&self, input: &[u8]) -> Option<usize> {
        if !self.partial.is_empty() || input.len() < RECORD_HEADER {
            return None;
        }
        Some(RECORD_HEADER + usize::from(u16::from_be_bytes([input[3], input[4]])))
    }

    /// How many bytes of `input` to feed to [`Opener::open`] to reach the end of the current
    /// record (all of `input` when it ends first): one record at a time.
    pub fn record_step(&self, input: &[u8]) -> usize {
        self.next_record_len(input)
            .unwrap_or_else(|| self.wanted())
            .min(input.len())
    }

    /// Opens the whole record `rec` (header included, no partial record held) straight into
    /// `target`, which must hold its body: the body is copied there and decrypted in place.
    /// Returns the plaintext length, at the start of `target`.
    pub fn open_into(
        &mut self,
        rec: &[u8],
        target: &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<usize, TlsError> {
        check_header(rec)?;
        let body = &rec[RECORD_HEADER..];
        if !self.partial.is_empty()
            || body.len() != usize::from(u16::from_be_bytes([rec[3], rec[4]]))
            || target.len() < body.len()
        {
            return Err(TlsError::Protocol("open_into: not one whole record".into()));
        }
        for (t, &b) in target.iter_mut().zip(body) {
            t.write(b);
        }
        // SAFETY: the first body.len() bytes of target were initialised just above.
        let init =
            unsafe { std::slice::from_raw_parts_mut(target.as_mut_ptr() as *mut u8, body.len()) };
        let hdr: [u8; RECORD_HEADER] = rec[..RECORD_HEADER].try_into().unwrap_or_default();
        self.open_in_place(hdr, init)
    }

    /// Feeds ciphertext; appends the plaintext of every record it completes to `out`. An error
    /// (bad record, failed authentication, alert) is final: the connection must be dropped.
    pub fn open(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        while !input.is_empty() {
            // Complete the header first.
            if self.partial.len() < RECORD_HEADER {
                let take = (RECORD_HEADER - self.partial.len()).min(input.len());
                self.partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.partial.len() < RECORD_HEADER {
                    return Ok(());
                }
                check_header(&self.partial)?;
            }
            let body = usize::from(u16::from_be_bytes([self.partial[3], self.partial[4]]));
            let have = self.partial.len() - RECORD_HEADER;
            let take = (body - have).min(input.len());
            if have == 0 && take == body {
                // The whole body is in the input: decrypt it in place in `out`, no staging.
                let hdr: [u8; RECORD_HEADER] = self.partial[..].try_into().unwrap_or_default();
                self.partial.clear();
                let start = out.len();
                out.extend_from_slice(&input[..body]);
                input = &input[body..];
                match self.open_in_place(hdr, &mut out[start..]) {
                    Ok(n) => out.truncate(start + n),
                    Err(e) => {
                        // Nothing of a record that failed to open may reach the output.
                        out.truncate(start);
                        return Err(e);
                    }
                }
                continue;
            }
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.partial.len() == RECORD_HEADER + body {
                let mut rec = std::mem::take(&mut self.partial);
                let hdr: [u8; RECORD_HEADER] = rec[..RECORD_HEADER].try_into().unwrap_or_default();
                let n = self.open_in_place(hdr, &mut rec[RECORD_HEADER..])?;
                out.extend_from_slice(&rec[RECORD_HEADER..RECORD_HEADER + n]);
                rec.clear();
                self.partial = rec;
            }
        }
        Ok(())
    }

    /// Decrypts one record body in place; returns the application data length at its start.
    fn open_in_place(
        &mut self,
        hdr: [u8; RECORD_HEADER],
        body: &mut [u8],
    ) -> Result<usize, TlsError> {
        let nonce = self.key.next_nonce()?;
        let plain = self
            .key
            .key
            .open_in_place(nonce, Aad::from(hdr), body)
            .map_err(|_| TlsError::BadRecordMac)?;
        // TLSInnerPlaintext: content, content type, zero padding.
        let Some(ct_at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(TlsError::Protocol("record without a content type".into()));
        };
        match plain[ct_at] {
            APPLICATION_DATA if ct_at <= MAX_PLAINTEXT => Ok(ct_at),
            APPLICATION_DATA => Err(TlsError::Protocol("record plaintext too long".into())),
            ALERT if ct_at == 2 && plain[1] == 0 => Err(TlsError::PeerClosed),
            ALERT if ct_at == 2 => Err(TlsError::Alert(plain[1])),
            HANDSHAKE => {
                // Only a KeyUpdate (RFC 8446 §4.6.3), alone in its record.
                match &plain[..ct_at] {
                    [KEY_UPDATE, 0, 0, 1, r @ (0 | 1)] => {
                        if *r == 1 {
                            self.requested.store(true, Ordering::Relaxed);
                        }
                        self.key.update()?;
                        Ok(0)
                    }
                    _ => Err(TlsError::Protocol(
                        "post-handshake message other than a key update".into(),
                    )),
                }
            }
            other => Err(TlsError::Protocol(format!("record content type {other}"))),
        }
    }
}

fn check_header(h: &[u8]) -> Result<(), TlsError> {
    let body = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if h[0] != APPLICATION_DATA || h[1] != 3 || h[2] != 3 {
        return Err(TlsError::Protocol(format!(
            "not a TLS 1.3 application-data record (header {:02x} {:02x} {:02x})",
            h[0], h[1], h[2]
        )));
    }
    if !(1 + TAG_LEN..=MAX_BODY).contains(&body) {
        return Err(TlsError::Protocol(format!("record length {body}")));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn test_pair(alg: &'static aead::Algorithm) -> (Sealer, Opener) {
    let key = [7u8; 32];
    let key = &key[..alg.key_len()];
    let iv = [9u8; NONCE_LEN];
    (
        Sealer::new(RecordKey::new(alg, key, iv, 0, u64::MAX).unwrap()),
        Opener::new(RecordKey::new(alg, key, iv, 0, u64::MAX).unwrap()),
    )
}

/// A key derived from `secret` (SHA-384 suite) that can be updated.
#[cfg(test)]
fn updatable(secret: &[u8]) -> RecordKey {
    let ts = TrafficSecret::new(true, secret);
    let k = ts.expand_label(b"key", 32).unwrap();
    let iv: [u8; NONCE_LEN] = ts
        .expand_label(b"iv", NONCE_LEN)
        .unwrap()
        .try_into()
        .unwrap();
    RecordKey::new(&aead::AES_256_GCM, &k, iv, 0, AES_GCM_LIMIT)
        .unwrap()
        .with_secret(ts, &k, &iv)
        .unwrap()
}

/// A sealer that updates its key every `every` records and the opener that follows it.
#[cfg(test)]
pub(crate) fn test_updating_pair(every: u64) -> (Sealer, Opener) {
    let mut s = Sealer::new(updatable(&[3u8; 48]));
    s.set_update_every(every);
    (s, Opener::new(updatable(&[3u8; 48])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn any_split_of_any_message_opens_to_the_plaintext() {
        for alg in [&aead::AES_256_GCM, &aead::CHACHA20_POLY1305] {
            for n in [
                0,
                1,
                55,
                MAX_PLAINTEXT - 1,
                MAX_PLAINTEXT,
                MAX_PLAINTEXT + 1,
                100_000,
            ] {
                let d = data(n);
                let (mut s, mut o) = test_pair(alg);
                let mut sealed = Vec::new();
                let cut = n / 3;
                s.seal(&[&d[..cut], &d[cut..]], &mut sealed).unwrap();
                assert_eq!(sealed.len(), Sealer::sealed_len(n));
                for step in [1, 7, 4096, sealed.len().max(1)] {
                    let (mut s2, mut o2) = test_pair(alg);
                    let mut again = Vec::new();
                    s2.seal(&[&d], &mut again).unwrap();
                    assert_eq!(
                        again, sealed,
                        "sealing is deterministic for one key and seq"
                    );
                    let mut out = Vec::new();
                    for c in again.chunks(step) {
                        o2.open(c, &mut out).unwrap();
                    }
                    assert_eq!(out, d, "n {n} step {step}");
                    assert_eq!(o2.pending(), 0);
                }
                let mut out = Vec::new();
                o.open(&sealed, &mut out).unwrap();
                assert_eq!(out, d);
            }
        }
    }

    #[test]
    fn whole_records_open_into_a_target_and_mixed_paths_keep_the_sequence() {
        let (mut s, mut o) = test_pair(&aead::AES_256_GCM);
        let d = data(3 * MAX_PLAINTEXT + 100);
        let mut sealed = Vec::new();
        s.seal(&[&d], &mut sealed).unwrap();
        let mut got = Vec::new();
        let mut input = &sealed[..];
        let mut direct = 0;
        while !input.is_empty() {
            match o.next_record_len(input) {
                Some(len) if direct % 2 == 0 => {
                    let mut t = vec![std::mem::MaybeUninit::<u8>::uninit(); len];
                    let n = o.open_into(&input[..len], &mut t).unwrap();
                    got.extend(t[..n].iter().map(|b| unsafe { b.assume_init() }));
                    input = &input[len..];
                }
                _ => {
                    let step = o.record_step(input);
                    o.open(&input[..step], &mut got).unwrap();
                    input = &input[step..];
                }
            }
            direct += 1;
        }
        assert_eq!(got, d);
        // A target too small for the body is refused, not overrun.
        let (mut s, mut o) = test_pair(&aead::AES_256_GCM);
        let mut one = Vec::new();
        s.seal(&[&d[..100]], &mut one).unwrap();
        let mut small = vec![std::mem::MaybeUninit::<u8>::uninit(); 100];
        assert!(o.open_into(&one, &mut small).is_err());
    }

    #[test]
    fn every_flipped_byte_is_refused_and_a_replayed_record_too() {
        let (mut s, _) = test_pair(&aead::AES_256_GCM);
        let mut sealed = Vec::new();
        s.seal(&[&data(100)], &mut sealed).unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            let (_, mut o) = test_pair(&aead::AES_256_GCM);
            let mut out = Vec::new();
            // Refused, or (a longer length in the header) still waiting: never plaintext.
            let res = o.open(&bad, &mut out);
            assert!(
                res.is_err() || (out.is_empty() && o.pending() > 0),
                "byte {i}"
            );
        }
        // The same record twice: the second is out of sequence.
        let (_, mut o) = test_pair(&aead::AES_256_GCM);
        let mut out = Vec::new();
        o.open(&sealed, &mut out).unwrap();
        assert!(matches!(
            o.open(&sealed, &mut out),
            Err(TlsError::BadRecordMac)
        ));
    }

    #[test]
    fn alerts_and_limits_end_the_stream() {
        let (mut s, mut o) = test_pair(&aead::CHACHA20_POLY1305);
        let mut sealed = Vec::new();
        // A close_notify alert: content [1 (warning), 0] with content type 21.
        s.seal_record(&[1, 0], ALERT, &mut sealed).unwrap();
        assert!(matches!(
            o.open(&sealed, &mut Vec::new()),
            Err(TlsError::PeerClosed)
        ));
        // A fatal alert is named.
        let (mut s2, mut o2) = test_pair(&aead::CHACHA20_POLY1305);
        let mut fatal = Vec::new();
        s2.seal_alert(BAD_RECORD_MAC, &mut fatal).unwrap();
        match o2.open(&fatal, &mut Vec::new()) {
            Err(e @ TlsError::Alert(BAD_RECORD_MAC)) => {
                assert!(e.to_string().contains("bad_record_mac"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        s.key.limit = s.key.seq;
        assert!(matches!(
            s.seal(&[b"x"], &mut Vec::new()),
            Err(TlsError::KeyExhausted)
        ));
        let mut huge = vec![APPLICATION_DATA, 3, 3, 0xff, 0xff];
        huge.extend_from_slice(&[0; 10]);
        let (_, mut o) = test_pair(&aead::CHACHA20_POLY1305);
        assert!(matches!(
            o.open(&huge, &mut Vec::new()),
            Err(TlsError::Protocol(_))
        ));
    }

    #[test]
    fn keys_are_updated_every_n_records_and_the_opener_follows() {
        let secret = [5u8; 48];
        let mut s = Sealer::new(updatable(&secret));
        s.set_update_every(3);
        let mut o = Opener::new(updatable(&secret));
        let d = data(10 * MAX_PLAINTEXT + 17);
        let mut sealed = Vec::new();
        s.seal(&[&d], &mut sealed).unwrap();
        s.seal(&[b"tail"], &mut sealed).unwrap();
        // 12 data records, a KeyUpdate before every 3rd one after the first three.
        assert_eq!(s.generation(), 3);
        // A KeyUpdate record: header, message (4 + 1), content type, tag.
        let update = RECORD_HEADER + 5 + 1 + TAG_LEN;
        assert_eq!(
            sealed.len(),
            Sealer::sealed_len(d.len()) + Sealer::sealed_len(4) + 3 * update
        );
        for step in [1, 100, sealed.len()] {
            let mut o2 = Opener::new(updatable(&secret));
            let mut plain = Vec::new();
            for c in sealed.chunks(step) {
                o2.open(c, &mut plain).unwrap();
            }
            assert_eq!(&plain[..d.len()], &d[..]);
            assert_eq!(&plain[d.len()..], b"tail");
            assert_eq!(o2.generation(), 3);
        }
        let mut plain = Vec::new();
        o.open(&sealed, &mut plain).unwrap();
        // A record under a stale key no longer opens, and a key without its secret cannot follow.
        let (mut old, _) = test_pair(&aead::AES_256_GCM);
        let mut stale = Vec::new();
        old.seal(&[b"x"], &mut stale).unwrap();
        assert!(matches!(
            o.open(&stale, &mut plain),
            Err(TlsError::BadRecordMac)
        ));
        let mut s = Sealer::new(updatable(&secret));
        s.set_update_every(1);
        let mut two = Vec::new();
        s.seal(&[b"a"], &mut two).unwrap();
        s.seal(&[b"b"], &mut two).unwrap();
        let (_, mut no_secret) = {
            let ts = TrafficSecret::new(true, &secret);
            let k = ts.expand_label(b"key", 32).unwrap();
            let iv = ts
                .expand_label(b"iv", NONCE_LEN)
                .unwrap()
                .try_into()
                .unwrap();
            let key = |x| RecordKey::new(&aead::AES_256_GCM, &k, x, 0, AES_GCM_LIMIT).unwrap();
            (Sealer::new(key(iv)), Opener::new(key(iv)))
        };
        assert!(matches!(
            no_secret.open(&two, &mut Vec::new()),
            Err(TlsError::Protocol(_))
        ));
    }

    #[test]
    fn a_requested_key_update_is_answered_before_the_next_record() {
        let (a, b) = ([1u8; 48], [2u8; 48]);
        let (mut s, mut o) = Sealer::pair(updatable(&a), updatable(&b));
        // The peer (sealing under b) sends a KeyUpdate with update_requested.
        let mut peer = Sealer::new(updatable(&b));
        let mut rec = Vec::new();
        peer.seal_record(&[KEY_UPDATE, 0, 0, 1, 1], HANDSHAKE, &mut rec)
            .unwrap();
        o.open(&rec, &mut Vec::new()).unwrap();
        assert_eq!(o.generation(), 1);
        let mut out = Vec::new();
        s.seal(&[b"hi"], &mut out).unwrap();
        assert_eq!(s.generation(), 1);
        let mut reader = Opener::new(updatable(&a));
        let mut plain = Vec::new();
        reader.open(&out, &mut plain).unwrap();
        assert_eq!((plain.as_slice(), reader.generation()), (&b"hi"[..], 1));
        // Any other post-handshake message is refused.
        let mut p2 = Sealer::new(updatable(&b));
        let mut bad = Vec::new();
        p2.seal_record(&[4, 0, 0, 1, 0], HANDSHAKE, &mut bad)
            .unwrap();
        let mut o3 = Opener::new(updatable(&b));
        assert!(matches!(
            o3.open(&bad, &mut Vec::new()),
            Err(TlsError::Protocol(_))
        ));
    }
}
