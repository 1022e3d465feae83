//! Bounded binary encoding of coordinator payloads (little-endian, u32 length prefixes).

use crate::error::NetError;

/// Longest string accepted in a coordinator payload.
const MAX_STR: usize = 4096;
use super::MAX_NODES;

#[derive(Default)]
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn err(&self, msg: &str) -> NetError {
        NetError::Protocol(format!("bad {} payload: {msg}", self.what))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], NetError> {
        if self.buf.len() < n {
            return Err(self.err("truncated"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, NetError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, NetError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn str(&mut self) -> Result<String, NetError> {
        let n = self.u32()? as usize;
        if n > MAX_STR {
            return Err(self.err("string too long"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    /// Length-prefixed bytes of at most `max`.
    pub(crate) fn bytes(&mut self, max: usize) -> Result<Vec<u8>, NetError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.err("field too long"));
        }
        Ok(self.take(n)?.to_vec())
    }

    /// A count of entries each at least `min_size` bytes long: never more than the bytes left
    /// can hold.
    pub(crate) fn count_of(&mut self, min_size: usize) -> Result<usize, NetError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size.max(1)) > self.buf.len() {
            return Err(self.err("more entries than bytes"));
        }
        Ok(n)
    }

    pub(crate) fn count(&mut self) -> Result<usize, NetError> {
        let n = self.u32()? as usize;
        if n > MAX_NODES {
            return Err(self.err("too many entries"));
        }
        Ok(n)
    }

    pub(crate) fn end(&self) -> Result<(), NetError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}
