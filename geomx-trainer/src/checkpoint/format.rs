//! The state file of one process: a versioned, self-checking container of named tensors.
//!
//! ```text
//! magic "GXCKPT\r\n" (8) | format u32 | config_hash u64 | round u64 | entries u32
//! entry: name_len u16 | name (UTF-8) | kind u8 (0 = f32, 1 = u64) | count u64 | count values (LE)
//! trailer: FNV-1a 64 of every byte before it (u64 LE)
//! ```
//!
//! Decoding never trusts the bytes: every length is checked against what is left before anything
//! is allocated, names are bounded, duplicates and trailing bytes are refused, and the trailer
//! must match.

use std::collections::BTreeMap;

use crate::hash::Fnv1a;

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"GXCKPT\r\n";

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Longest entry name accepted.
pub const MAX_NAME: usize = 256;

/// Most entries accepted in one file.
pub const MAX_ENTRIES: usize = 1 << 20;

const HEADER: usize = 8 + 4 + 8 + 8 + 4;
const TRAILER: usize = 8;

/// One named value of a state file.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A tensor (parameters, moments, residuals).
    F32(Vec<f32>),
    /// Counters and cursors (round, epoch, position, steps).
    U64(Vec<u64>),
}

/// Why bytes are not a valid state file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file does not start with [`MAGIC`].
    #[error("not a geomx checkpoint (bad magic)")]
    Magic,
    /// Written by another format version.
    #[error("checkpoint format {0}, this build reads format {FORMAT_VERSION}")]
    Version(u32),
    /// Shorter than its header, an entry or its trailer says.
    #[error("truncated: {0}")]
    Truncated(String),
    /// The content hash does not match (a torn or altered file).
    #[error("content hash {found:016x} does not match the stored {stored:016x}")]
    Hash {
        /// FNV-1a of the bytes read.
        found: u64,
        /// The trailer.
        stored: u64,
    },
    /// A structurally invalid entry.
    #[error("bad entry: {0}")]
    Entry(String),
}

/// The decoded state of one process at one round.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateFile {
    /// The job's configuration hash (`JobSpec::config_hash`).
    pub config_hash: u64,
    /// Rounds completed when the state was taken.
    pub round: u64,
    /// Named values, in name order.
    pub entries: BTreeMap<String, Entry>,
}

impl StateFile {
    /// An empty state of `round` for the job with `config_hash`.
    pub fn new(config_hash: u64, round: u64) -> Self {
        Self {
            config_hash,
            round,
            entries: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) a tensor.
    pub fn put_f32(&mut self, name: impl Into<String>, v: Vec<f32>) {
        self.entries.insert(name.into(), Entry::F32(v));
    }

    /// Adds (or replaces) counters.
    pub fn put_u64(&mut self, name: impl Into<String>, v: Vec<u64>) {
        self.entries.insert(name.into(), Entry::U64(v));
    }

    /// Takes tensor `name` out, or says why it cannot: missing, another kind, or not `len` long
    /// (`None`: any length).
    pub fn take_f32(&mut self, name: &str, len: Option<usize>) -> Result<Vec<f32>, FormatError> {
        match self.entries.remove(name) {
            Some(Entry::F32(v)) if len.is_none_or(|n| n == v.len()) => Ok(v),
            Some(Entry::F32(v)) => Err(FormatError::Entry(format!(
                "{name}: {} values, expected {}",
                v.len(),
                len.unwrap_or_default()
            ))),
            Some(Entry::U64(_)) => Err(FormatError::Entry(format!("{name}: not a tensor"))),
            None => Err(FormatError::Entry(format!("{name}: missing"))),
        }
    }

    /// Takes counters `name` out, exactly `len` of them.
    pub fn take_u64(&mut self, name: &str, len: usize) -> Result<Vec<u64>, FormatError> {
        match self.entries.remove(name) {
            Some(Entry::U64(v)) if v.len() == len => Ok(v),
            Some(Entry::U64(v)) => Err(FormatError::Entry(format!(
                "{name}: {} counters, expected {len}",
                v.len()
            ))),
            Some(Entry::F32(_)) => Err(FormatError::Entry(format!("{name}: not counters"))),
            None => Err(FormatError::Entry(format!("{name}: missing"))),
        }
    }

    /// Takes one counter.
    pub fn take_scalar(&mut self, name: &str) -> Result<u64, FormatError> {
        Ok(self.take_u64(name, 1)?[0])
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let body: usize = self
            .entries
            .iter()
            .map(|(n, e)| {
                2 + n.len()
                    + 1
                    + 8
                    + match e {
                        Entry::F32(v) => 4 * v.len(),
                        Entry::U64(v) => 8 * v.len(),
                    }
            })
            .sum();
        let mut out = Vec::with_capacity(HEADER + body + TRAILER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.config_hash.to_le_bytes());
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (name, e) in &self.entries {
            // Names are ours and short; a longer one is cut so the file stays decodable.
            let n = &name.as_bytes()[..name.len().min(MAX_NAME)];
            out.extend_from_slice(&(n.len() as u16).to_le_bytes());
            out.extend_from_slice(n);
            match e {
                Entry::F32(v) => {
                    out.push(0);
                    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                    for x in v {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
                Entry::U64(v) => {
                    out.push(1);
                    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                    for x in v {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        let mut h = Fnv1a::new();
        h.write(&out);
        out.extend_from_slice(&h.finish().to_le_bytes());
        out
    }

    /// Decodes and checks a file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        if bytes.len() < HEADER + TRAILER {
            return Err(FormatError::Truncated(format!(
                "{} bytes, less than a header and trailer",
                bytes.len()
            )));
        }
        let (content, trailer) = bytes.split_at(bytes.len() - TRAILER);
        let mut r = Reader {
            buf: content,
            pos: 8,
        };
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        let stored = u64::from_le_bytes(trailer.try_into().unwrap_or_default());
        let mut h = Fnv1a::new();
        h.write(content);
        if h.finish() != stored {
            return Err(FormatError::Hash {
                found: h.finish(),
                stored,
            });
        }
        let config_hash = r.u64()?;
        let round = r.u64()?;
        let n = r.u32()? as usize;
        if n > MAX_ENTRIES {
            return Err(FormatError::Entry(format!(
                "{n} entries, at most {MAX_ENTRIES}"
            )));
        }
        let mut entries = BTreeMap::new();
        for i in 0..n {
            let len = usize::from(r.u16()?);
            if len > MAX_NAME {
                return Err(FormatError::Entry(format!(
                    "entry {i}: name of {len} bytes"
                )));
            }
            let name = std::str::from_utf8(r.take(len, "entry name")?)
                .map_err(|_| FormatError::Entry(format!("entry {i}: name not UTF-8")))?
                .to_string();
            let kind = r.take(1, "entry kind")?[0];
            let count = r.u64()?;
            let width = match kind {
                0 => 4,
                1 => 8,
                k => return Err(FormatError::Entry(format!("{name}: unknown kind {k}"))),
            };
            let bytes = usize::try_from(count)
                .ok()
                .and_then(|c| c.checked_mul(width))
                .filter(|&b| b <= r.left())
                .ok_or_else(|| {
                    FormatError::Truncated(format!(
                        "{name}: {count} values, {} bytes left",
                        r.left()
                    ))
                })?;
            let raw = r.take(bytes, "entry values")?;
            let e = if kind == 0 {
                Entry::F32(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
            } else {
                Entry::U64(
                    raw.chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                        .collect(),
                )
            };
            if entries.insert(name.clone(), e).is_some() {
                return Err(FormatError::Entry(format!("{name}: twice")));
            }
        }
        if r.left() != 0 {
            return Err(FormatError::Entry(format!(
                "{} bytes after the last entry",
                r.left()
            )));
        }
        Ok(Self {
            config_hash,
            round,
            entries,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        if n > self.left() {
            return Err(FormatError::Truncated(format!(
                "{what}: {n} bytes, {} left",
                self.left()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2, "u16")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4, "u32")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8, "u64")?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        let mut s = StateFile::new(0xabcd, 40);
        s.put_f32("theta.0", vec![1.5, -0.0, f32::MIN_POSITIVE]);
        s.put_u64("cursor", vec![3, 7]);
        s.put_f32("empty", Vec::new());
        s
    }

    #[test]
    fn round_trip_is_exact() {
        let s = sample();
        let d = StateFile::decode(&s.encode()).unwrap();
        assert_eq!(d, s);
        let mut d = d;
        assert_eq!(d.take_u64("cursor", 2).unwrap(), vec![3, 7]);
        assert!(d.take_f32("theta.0", Some(4)).is_err());
        assert!(d.take_scalar("nothing").is_err());
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused_without_panic() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(
                StateFile::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(StateFile::decode(&b).is_err(), "byte {i} flipped");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(StateFile::decode(&longer).is_err());
    }

    /// A header that claims absurd sizes (with a matching hash, as a malicious writer could
    /// produce) is refused by the bounds checks, not by allocating.
    #[test]
    fn lying_lengths_are_bounded() {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.push(b'x');
        out.push(0);
        out.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut h = Fnv1a::new();
        h.write(&out);
        out.extend_from_slice(&h.finish().to_le_bytes());
        assert!(matches!(
            StateFile::decode(&out),
            Err(FormatError::Truncated(_))
        ));
        let mut v2 = sample().encode();
        v2[8] = 2;
        assert_eq!(StateFile::decode(&v2), Err(FormatError::Version(2)));
    }
}
