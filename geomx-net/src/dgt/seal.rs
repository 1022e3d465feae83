//! Sealed DGT datagrams (sans-IO): AEAD with a key exported from the reliable channel's TLS
//! session ([`crate::tls::handshake::DGT_EXPORTER_LABEL`]), and a replay window per channel.
//!
//! | off | size | field |
//! |----:|-----:|-------|
//! | 0 | 4 | sender id (little-endian, clear: picks the key) |
//! | 4 | 8 | sequence number of this channel (big-endian, clear) |
//! | 12 | n | the DGT datagram (header and values), encrypted |
//! | 12 + n | 16 | tag |
//!
//! The nonce is (channel, 0, 0, 0, sequence number): the sender numbers each channel's
//! datagrams from 0, so no (key, nonce) pair repeats, and a datagram replayed on another channel's
//! socket fails to open. The 12 clear bytes and the channel are authenticated (additional data).
//! A datagram that fails to open is counted as forged; one whose sequence number was seen, or is
//! older than the window, as replayed. Neither reaches the receiver core, so neither can
//! pre-empt or overwrite a real block.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

/// Bytes a sealed datagram adds: the clear prefix and the tag.
pub const SEAL_OVERHEAD: usize = PREFIX + aead::MAX_TAG_LEN;
const PREFIX: usize = 12;
/// Sequence numbers remembered behind the highest seen, per channel.
pub const REPLAY_WINDOW: u64 = 128;
const NCH: usize = super::MAX_CHANNELS as usize + 1;

fn key(secret: &[u8; 32], aes: bool) -> LessSafeKey {
    let alg = if aes {
        &aead::AES_256_GCM
    } else {
        &aead::CHACHA20_POLY1305
    };
    // Both algorithms take 32-byte keys: this cannot fail.
    LessSafeKey::new(UnboundKey::new(alg, secret).unwrap_or_else(|_| unreachable!()))
}

fn nonce(channel: u8, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = channel;
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(prefix: &[u8], channel: u8) -> [u8; PREFIX + 1] {
    let mut a = [0u8; PREFIX + 1];
    a[..PREFIX].copy_from_slice(prefix);
    a[PREFIX] = channel;
    a
}

/// The sending half: seals each channel's datagrams in sequence (`Debug` shows no key).
#[derive(Debug)]
pub struct DatagramSealer {
    key: LessSafeKey,
    sender: u32,
    next: [u64; NCH],
}

impl DatagramSealer {
    /// A sealer for sender `sender` with the session's exported `secret` (AES-256-GCM when
    /// `aes`, else ChaCha20-Poly1305).
    pub fn new(secret: &[u8; 32], aes: bool, sender: u32) -> DatagramSealer {
        DatagramSealer {
            key: key(secret, aes),
            sender,
            next: [0; NCH],
        }
    }

    /// Writes the sealed form of datagram `plain` of `channel` into `out` (cleared first).
    pub fn seal(&mut self, channel: u8, plain: &[u8], out: &mut Vec<u8>) {
        let ch = usize::from(channel).min(NCH - 1);
        let seq = self.next[ch];
        self.next[ch] += 1;
        out.clear();
        out.extend_from_slice(&self.sender.to_le_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(plain);
        let a = aad(&out[..PREFIX], channel);
        // Sealing in place only fails for messages beyond the AEAD's limit (GiBs): not here.
        if let Ok(tag) = self.key.seal_in_place_separate_tag(
            nonce(channel, seq),
            Aad::from(a),
            &mut out[PREFIX..],
        ) {
            out.extend_from_slice(tag.as_ref());
        }
    }
}

/// Why a sealed datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too short, wrong sender, or failed authentication: forged or tampered.
    Forged,
    /// Authentic, but its sequence number was seen or fell behind the window.
    Replayed,
}

/// The receiving half for one sender: opens datagrams and keeps a replay window per channel
/// (`Debug` shows no key).
#[derive(Debug)]
pub struct DatagramOpener {
    key: LessSafeKey,
    sender: u32,
    /// Per channel: highest sequence number seen + 1 (0: none), and the window behind it.
    top: [u64; NCH],
    seen: [u128; NCH],
}

/// The sender id in a sealed datagram's clear prefix (to pick its opener).
pub fn sealed_sender(datagram: &[u8]) -> Option<u32> {
    let b = datagram.get(..4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl DatagramOpener {
    /// An opener for sender `sender` with the session's exported `secret`.
    pub fn new(secret: &[u8; 32], aes: bool, sender: u32) -> DatagramOpener {
        DatagramOpener {
            key: key(secret, aes),
            sender,
            top: [0; NCH],
            seen: [0; NCH],
        }
    }

    /// Opens `datagram` received on `channel`'s socket in place; returns the DGT datagram.
    pub fn open<'a>(&mut self, channel: u8, datagram: &'a mut [u8]) -> Result<&'a [u8], Refusal> {
        let ch = usize::from(channel);
        if ch >= NCH
            || datagram.len() < SEAL_OVERHEAD
            || sealed_sender(datagram) != Some(self.sender)
        {
            return Err(Refusal::Forged);
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&datagram[4..PREFIX]);
        let seq = u64::from_be_bytes(s);
        // Cheap replay check first; the window is updated only once the datagram is authentic.
        if self.is_replay(ch, seq) {
            return Err(Refusal::Replayed);
        }
        let a = aad(&datagram[..PREFIX], channel);
        let plain = self
            .key
            .open_in_place(nonce(channel, seq), Aad::from(a), &mut datagram[PREFIX..])
            .map_err(|_| Refusal::Forged)?;
        self.mark(ch, seq);
        Ok(plain)
    }

    fn is_replay(&self, ch: usize, seq: u64) -> bool {
        let top = self.top[ch];
        if seq >= top {
            return false;
        }
        let behind = top - 1 - seq;
        behind >= REPLAY_WINDOW || self.seen[ch] & (1u128 << behind) != 0
    }

    fn mark(&mut self, ch: usize, seq: u64) {
        let top = self.top[ch];
        if seq >= top {
            let shift = seq + 1 - top;
            self.seen[ch] = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen[ch] << shift
            };
            self.seen[ch] |= 1;
            self.top[ch] = seq + 1;
        } else {
            self.seen[ch] |= 1u128 << (top - 1 - seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(aes: bool) -> (DatagramSealer, DatagramOpener) {
        let k = [3u8; 32];
        (
            DatagramSealer::new(&k, aes, 9),
            DatagramOpener::new(&k, aes, 9),
        )
    }

    #[test]
    fn sealed_datagrams_open_once_on_their_own_channel() {
        for aes in [true, false] {
            let (mut s, mut o) = pair(aes);
            let msg: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            s.seal(2, &msg, &mut out);
            assert_eq!(out.len(), msg.len() + SEAL_OVERHEAD);
            assert!(
                !out.windows(4).any(|w| w == &msg[..4]),
                "the datagram is encrypted"
            );
            let mut copy = out.clone();
            assert_eq!(o.open(2, &mut copy).unwrap(), &msg[..]);
            let mut again = out.clone();
            assert_eq!(o.open(2, &mut again), Err(Refusal::Replayed));
            // On another channel's socket: not authentic.
            let mut other = out.clone();
            assert_eq!(pair(aes).1.open(3, &mut other), Err(Refusal::Forged));
        }
    }

    #[test]
    fn every_flipped_byte_a_wrong_key_and_a_short_datagram_are_forged() {
        let (mut s, _) = pair(true);
        let mut out = Vec::new();
        s.seal(1, b"block values", &mut out);
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 1;
            let res = pair(true).1.open(1, &mut bad);
            assert!(res.is_err(), "byte {i}");
        }
        let mut wrong = DatagramOpener::new(&[4u8; 32], true, 9);
        assert_eq!(wrong.open(1, &mut out.clone()), Err(Refusal::Forged));
        assert_eq!(
            pair(true).1.open(1, &mut out[..20].to_vec()),
            Err(Refusal::Forged)
        );
    }

    #[test]
    fn the_window_accepts_reordering_and_refuses_old_and_repeated_numbers() {
        let (mut s, mut o) = pair(false);
        let sealed: Vec<Vec<u8>> = (0..300)
            .map(|i| {
                let mut out = Vec::new();
                s.seal(1, &[i as u8; 8], &mut out);
                out
            })
            .collect();
        // Out of order inside the window: all accepted once.
        for i in [5usize, 3, 4, 0, 1, 2, 200] {
            assert!(o.open(1, &mut sealed[i].clone()).is_ok(), "{i}");
        }
        for i in [3usize, 200] {
            assert_eq!(o.open(1, &mut sealed[i].clone()), Err(Refusal::Replayed));
        }
        // 6 is 194 behind 200: beyond the window.
        assert_eq!(o.open(1, &mut sealed[6].clone()), Err(Refusal::Replayed));
        assert!(o.open(1, &mut sealed[150].clone()).is_ok());
        // The same values sealed twice on one channel never give the same bytes (fresh nonce).
        let (mut a, mut b) = (Vec::new(), Vec::new());
        s.seal(1, &[0u8; 8], &mut a);
        s.seal(1, &[0u8; 8], &mut b);
        assert_ne!(a[4..], b[4..]);
    }
}
