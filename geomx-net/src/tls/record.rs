//! The TLS 1.3 record layer (RFC 8446 §5), sans-IO, for the traffic keys of a finished handshake.
//!
//! rustls performs the handshake; its traffic secrets are then taken over (as kTLS would take
//! them, `rustls::ExtractedSecrets`) so the drivers can seal a frame's header and payload
//! straight from the caller's buffers into records and open records straight into the frame
//! decoder's input, with `ring`'s AES-256-GCM or ChaCha20-Poly1305. The records are standard
//! TLS 1.3 application-data records: a rustls peer reads them (tested).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
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
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    limit: u64,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKey").field("seq", &self.seq).finish()
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
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
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
}

impl Sealer {
    /// A sealer with the transmit key.
    pub fn new(key: RecordKey) -> Sealer {
        Sealer { key }
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
}

impl Opener {
    /// An opener with the receive key.
    pub fn new(key: RecordKey) -> Opener {
        Opener {
            key,
            partial: Vec::new(),
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
                let n = self.open_in_place(hdr, &mut out[start..])?;
                out.truncate(start + n);
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
            HANDSHAKE => Err(TlsError::Protocol(
                "post-handshake message (key update / ticket), which geomx peers never send".into(),
            )),
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
        // A close_notify alert sealed by hand: content [1, 0] with content type 21.
        let hdr = record_header(2 + 1 + TAG_LEN);
        sealed.extend_from_slice(&hdr);
        sealed.extend_from_slice(&[1, 0, ALERT]);
        let nonce = s.key.next_nonce().unwrap();
        let tag = s
            .key
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(hdr), &mut sealed[RECORD_HEADER..])
            .unwrap();
        sealed.extend_from_slice(tag.as_ref());
        assert!(matches!(
            o.open(&sealed, &mut Vec::new()),
            Err(TlsError::PeerClosed)
        ));
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
}
