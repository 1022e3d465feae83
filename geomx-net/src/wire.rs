//! The geomx wire format: a fixed 56-byte little-endian header followed by the payload.
//!
//! Layout (byte offsets; all integers little-endian):
//!
//! | off | size | field |
//! |----:|-----:|-------|
//! | 0 | 4 | magic `b"GMXF"` |
//! | 4 | 1 | wire version ([`WIRE_VERSION`]) |
//! | 5 | 1 | message kind ([`MsgKind`]) |
//! | 6 | 1 | payload codec tag ([`PayloadCodec`]) |
//! | 7 | 1 | flags (must be 0 in version 1) |
//! | 8 | 4 | sender node id |
//! | 12 | 4 | payload length in bytes |
//! | 16 | 8 | request id (0 for unsolicited frames) |
//! | 24 | 8 | key |
//! | 32 | 8 | version / round number |
//! | 40 | 8 | range offset (application units, geomx uses elements) |
//! | 48 | 8 | total length of the keyed tensor (same units) |
//!
//! Decoding is total: every malformed input yields a [`WireError`], and no buffer larger than the
//! configured maximum frame size is ever allocated. The incremental [`FrameDecoder`] accepts the
//! byte stream in arbitrary chunks.

use core::mem::MaybeUninit;

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Frame magic, the ASCII bytes `GMXF` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"GMXF");
/// Wire format version spoken by this crate.
pub const WIRE_VERSION: u8 = 1;
/// Size of [`FrameHeader`] on the wire in bytes.
pub const HEADER_LEN: usize = 56;
/// Default maximum frame size (header + payload) accepted by decoders: 256 MiB.
pub const MAX_FRAME: usize = 256 << 20;

/// Errors produced while decoding frames. Each one closes the offending connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The version byte is not [`WIRE_VERSION`].
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    /// The kind byte names no [`MsgKind`].
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The codec byte names no [`PayloadCodec`].
    #[error("unknown payload codec {0}")]
    UnknownCodec(u8),
    /// Reserved flag bits are set.
    #[error("reserved flags set: {0:#04x}")]
    BadFlags(u8),
    /// Header + payload would exceed the configured maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// Announced frame length (header + payload).
        len: u64,
        /// Configured maximum.
        max: usize,
    },
    /// The payload length is not a whole number of codec elements.
    #[error("payload of {len} bytes is not a multiple of {elem} for codec {codec:?}")]
    BadPayloadLength {
        /// The codec announced in the header.
        codec: PayloadCodec,
        /// The payload length.
        len: u32,
        /// Element size the length must be a multiple of.
        elem: u32,
    },
    /// Fewer than [`HEADER_LEN`] bytes were given to [`FrameHeader::decode`].
    #[error("truncated header: {0} of 56 bytes")]
    TruncatedHeader(usize),
    /// The buffer ends before the announced payload does.
    #[error("truncated payload: {got} of {want} bytes")]
    TruncatedPayload {
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// Bytes follow a complete frame in a buffer given to [`decode`].
    #[error("{0} trailing bytes after frame")]
    TrailingBytes(usize),
    /// A DGT frame whose codec is not `Raw` or whose payload length does not fit its kind
    /// (see [`MsgKind::check_dgt_payload`]).
    #[error("DGT frame of kind {kind} with a {len}-byte payload")]
    BadDgtFrame {
        /// The kind tag.
        kind: u8,
        /// The announced payload length.
        len: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    UnexpectedEof(usize),
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident, $err:ident { $($(#[$vm:meta])* $v:ident = $n:expr,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $v = $n,)* }
        impl $name {
            /// Every variant, in tag order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// Parses a tag byte.
            pub fn from_u8(b: u8) -> Result<Self, WireError> {
                match b { $($n => Ok($name::$v),)* other => Err(WireError::$err(other)) }
            }
        }
    };
}

wire_enum!(
    /// Message kinds. Tags 48..=63 are the DGT range: 48..=52 are spoken on a DGT reliable
    /// channel (see [`crate::dgt::link`]), 53..=63 are reserved and rejected as unknown.
    MsgKind, UnknownKind {
        /// Connection opening: sender id announces the client's node id.
        Hello = 1,
        /// Server's answer to Hello.
        HelloAck = 2,
        /// Keep-alive; any frame counts as liveness.
        Heartbeat = 3,
        /// Orderly close announcement.
        Goodbye = 4,
        /// Request: push a payload for (key, version, range).
        Push = 16,
        /// Request: pull the value of key with version >= the header's version.
        Pull = 17,
        /// Successful response to the request with the same request id.
        Reply = 18,
        /// Failed response; the payload is a UTF-8 message.
        ErrorReply = 19,
        /// Coordinator request: register (payload: encoded `Hello`).
        Register = 32,
        /// Coordinator request: barrier (payload: group name).
        Barrier = 33,
        /// Coordinator request: this node finished.
        Done = 34,
        /// Coordinator request: abort the job (payload: reason).
        Abort = 35,
        /// Coordinator broadcast: clean shutdown.
        Shutdown = 36,
        /// Coordinator broadcast: the job is aborted (payload: encoded abort notice).
        AbortNotice = 37,
        /// DGT reliable channel: one block (payload: a DGT message, 32-byte header + values).
        DgtBlock = 48,
        /// DGT reliable channel: terminator of (key, round) (payload: DGT header + channel map).
        DgtEnd = 49,
        /// DGT reliable channel, receiver → sender: per-round counters (payload: a DGT report).
        DgtReport = 50,
        /// DGT reliable channel opening, both directions (payload: [`DGT_HELLO_LEN`] bytes).
        DgtHello = 51,
        /// DGT reliable channel, receiver → sender: measured goodput in bit/s (u64 payload).
        DgtRate = 52,
    }
);

/// Payload bytes of a [`MsgKind::DgtHello`] frame.
pub const DGT_HELLO_LEN: usize = 24;
/// Largest payload of a [`MsgKind::DgtBlock`] frame: a 32-byte DGT header + a 1 MiB block.
pub const DGT_MAX_BLOCK_PAYLOAD: usize = 32 + (1 << 20);
/// Largest payload of a [`MsgKind::DgtEnd`] frame: a 32-byte DGT header + 16 Mi channel bytes.
pub const DGT_MAX_END_PAYLOAD: usize = 32 + (1 << 24);

impl MsgKind {
    /// True for the DGT kinds (48..=52), which only a DGT reliable channel speaks.
    pub fn is_dgt(self) -> bool {
        (48..=63).contains(&(self as u8))
    }

    /// Bounds of a DGT frame: codec `Raw` and a payload length that fits the kind (Block: a
    /// header and 1..=1 MiB of values; End: a header and a non-empty channel map; Report: a
    /// header and 1..=8 channels of 12 bytes; Hello: [`DGT_HELLO_LEN`]; Rate: 8 bytes).
    pub fn check_dgt_payload(self, codec: PayloadCodec, len: u32) -> Result<(), WireError> {
        let len_us = len as usize;
        let ok = codec == PayloadCodec::Raw
            && match self {
                MsgKind::DgtBlock => (33..=DGT_MAX_BLOCK_PAYLOAD).contains(&len_us),
                MsgKind::DgtEnd => (32..=DGT_MAX_END_PAYLOAD).contains(&len_us),
                MsgKind::DgtReport => {
                    (44..=32 + 8 * 12).contains(&len_us) && (len_us - 32) % 12 == 0
                }
                MsgKind::DgtHello => len_us == DGT_HELLO_LEN,
                MsgKind::DgtRate => len_us == 8,
                _ => true,
            };
        if ok {
            Ok(())
        } else {
            Err(WireError::BadDgtFrame {
                kind: self as u8,
                len,
            })
        }
    }

    /// True for kinds that expect a Reply/ErrorReply with the same request id.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            MsgKind::Push
                | MsgKind::Pull
                | MsgKind::Register
                | MsgKind::Barrier
                | MsgKind::Done
                | MsgKind::Abort
        )
    }
}

wire_enum!(
    /// Payload codec tags. Only tags live here; the math is in geomx-kernels.
    PayloadCodec, UnknownCodec {
        /// Opaque bytes (control messages, empty payloads).
        Raw = 0,
        /// Dense little-endian f32 values.
        DenseF32 = 1,
        /// Dense IEEE binary16 values.
        DenseF16 = 2,
        /// Dense bfloat16 values.
        DenseBf16 = 3,
        /// Sparse: pairs of (u32 index, f32 value), 8 bytes each.
        SparseF32 = 4,
        /// Sparse: pairs of (u32 index, f16 value), 6 bytes each.
        SparseF16 = 5,
    }
);

impl PayloadCodec {
    /// The payload length must be a multiple of this many bytes.
    pub fn element_size(self) -> u32 {
        match self {
            PayloadCodec::Raw => 1,
            PayloadCodec::DenseF32 => 4,
            PayloadCodec::DenseF16 | PayloadCodec::DenseBf16 => 2,
            PayloadCodec::SparseF32 => 8,
            PayloadCodec::SparseF16 => 6,
        }
    }
}

/// The raw 56-byte header as it lies on the wire (zerocopy, unaligned, little-endian).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RawHeader {
    /// See [`MAGIC`].
    pub magic: U32,
    /// See [`WIRE_VERSION`].
    pub version: u8,
    /// [`MsgKind`] tag.
    pub kind: u8,
    /// [`PayloadCodec`] tag.
    pub codec: u8,
    /// Flags (0).
    pub flags: u8,
    /// Sender node id.
    pub sender: U32,
    /// Payload length in bytes.
    pub payload_len: U32,
    /// Request id.
    pub request_id: U64,
    /// Key.
    pub key: U64,
    /// Version / round.
    pub version_no: U64,
    /// Range offset.
    pub offset: U64,
    /// Total length.
    pub total: U64,
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == HEADER_LEN);

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message kind.
    pub kind: MsgKind,
    /// Payload codec.
    pub codec: PayloadCodec,
    /// Sender node id.
    pub sender: u32,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Request id matching responses to requests (0 = unsolicited).
    pub request_id: u64,
    /// Key (tensor index).
    pub key: u64,
    /// Version or round number.
    pub version: u64,
    /// Range offset.
    pub offset: u64,
    /// Total length of the keyed tensor.
    pub total: u64,
}

impl FrameHeader {
    /// A header of `kind` with every other field zero / Raw.
    pub fn new(kind: MsgKind) -> Self {
        FrameHeader {
            kind,
            codec: PayloadCodec::Raw,
            sender: 0,
            payload_len: 0,
            request_id: 0,
            key: 0,
            version: 0,
            offset: 0,
            total: 0,
        }
    }

    /// Serialises the header into its 56 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let raw = RawHeader {
            magic: U32::new(MAGIC),
            version: WIRE_VERSION,
            kind: self.kind as u8,
            codec: self.codec as u8,
            flags: 0,
            sender: U32::new(self.sender),
            payload_len: U32::new(self.payload_len),
            request_id: U64::new(self.request_id),
            key: U64::new(self.key),
            version_no: U64::new(self.version),
            offset: U64::new(self.offset),
            total: U64::new(self.total),
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Parses and validates a header from the first [`HEADER_LEN`] bytes of `buf`, checking the
    /// announced frame size against `max_frame`.
    pub fn decode(buf: &[u8], max_frame: usize) -> Result<FrameHeader, WireError> {
        let (raw, _) =
            RawHeader::read_from_prefix(buf).map_err(|_| WireError::TruncatedHeader(buf.len()))?;
        if raw.magic.get() != MAGIC {
            return Err(WireError::BadMagic(raw.magic.get()));
        }
        if raw.version != WIRE_VERSION {
            return Err(WireError::UnknownVersion(raw.version));
        }
        let kind = MsgKind::from_u8(raw.kind)?;
        let codec = PayloadCodec::from_u8(raw.codec)?;
        if raw.flags != 0 {
            return Err(WireError::BadFlags(raw.flags));
        }
        let payload_len = raw.payload_len.get();
        let len = HEADER_LEN as u64 + u64::from(payload_len);
        if len > max_frame as u64 {
            return Err(WireError::Oversize {
                len,
                max: max_frame,
            });
        }
        if kind.is_dgt() {
            kind.check_dgt_payload(codec, payload_len)?;
        }
        let elem = codec.element_size();
        if payload_len % elem != 0 {
            return Err(WireError::BadPayloadLength {
                codec,
                len: payload_len,
                elem,
            });
        }
        Ok(FrameHeader {
            kind,
            codec,
            sender: raw.sender.get(),
            payload_len,
            request_id: raw.request_id.get(),
            key: raw.key.get(),
            version: raw.version_no.get(),
            offset: raw.offset.get(),
            total: raw.total.get(),
        })
    }
}

/// A complete frame: header and owned payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header; `header.payload_len == payload.len()`.
    pub header: FrameHeader,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Builds a frame, setting `header.payload_len` from the payload. The length field is 32 bits:
    /// callers keep payloads below 4 GiB (the kv layer refuses larger ones with `TooLarge`).
    pub fn new(mut header: FrameHeader, payload: Vec<u8>) -> Frame {
        header.payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        Frame { header, payload }
    }
}

/// Encodes a frame into one contiguous buffer.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut h = frame.header;
    h.payload_len = frame.payload.len() as u32;
    let mut out = Vec::with_capacity(HEADER_LEN + frame.payload.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&frame.payload);
    out
}

/// Decodes exactly one frame occupying all of `buf`.
pub fn decode(buf: &[u8], max_frame: usize) -> Result<Frame, WireError> {
    let header = FrameHeader::decode(buf, max_frame)?;
    let want = header.payload_len as usize;
    let got = buf.len() - HEADER_LEN;
    if got < want {
        return Err(WireError::TruncatedPayload { got, want });
    }
    if got > want {
        return Err(WireError::TrailingBytes(got - want));
    }
    Ok(Frame {
        header,
        payload: buf[HEADER_LEN..].to_vec(),
    })
}

/// Incremental frame decoder: feed it the byte stream in arbitrary chunks.
///
/// It never allocates more than the announced payload, which is bounded by the maximum frame size,
/// and it reports the first malformed header as an error (after which the connection must be
/// closed; further input is refused with the same error). Large payload buffers come from the
/// [`crate::bufpool`] when a recycled one fits, and are never zero-filled: bytes are only exposed
/// once received.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    head: [u8; HEADER_LEN],
    head_len: usize,
    /// Header and payload buffer (capacity >= announced length, length = bytes received).
    body: Option<(FrameHeader, Vec<u8>)>,
    failed: Option<WireError>,
}

impl FrameDecoder {
    /// A decoder accepting frames up to `max_frame` bytes (header included).
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder {
            max_frame,
            head: [0; HEADER_LEN],
            head_len: 0,
            body: None,
            failed: None,
        }
    }

    /// The maximum frame size this decoder accepts.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Consumes all of `data`, appending every completed frame to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<Frame>) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        while !data.is_empty() {
            if let Some((h, body)) = &mut self.body {
                let take = (h.payload_len as usize - body.len()).min(data.len());
                body.extend_from_slice(&data[..take]);
                data = &data[take..];
                self.finish_body(out);
            } else {
                let take = (HEADER_LEN - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&data[..take]);
                self.head_len += take;
                data = &data[take..];
                if self.head_len == HEADER_LEN {
                    self.start_body(out)?;
                }
            }
        }
        Ok(())
    }

    fn start_body(&mut self, out: &mut Vec<Frame>) -> Result<(), WireError> {
        self.head_len = 0;
        match FrameHeader::decode(&self.head, self.max_frame) {
            Ok(h) => {
                self.body = Some((h, crate::bufpool::take(h.payload_len as usize)));
                self.finish_body(out);
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn finish_body(&mut self, out: &mut Vec<Frame>) {
        if matches!(&self.body, Some((h, body)) if body.len() == h.payload_len as usize) {
            let (header, payload) = self.body.take().expect("checked above");
            out.push(Frame { header, payload });
        }
    }

    /// When at least `min` (and at least 1) more payload bytes are expected, the unfilled part of
    /// the payload buffer, so a driver can receive large payloads straight into place and then
    /// call [`FrameDecoder::commit_direct`]. `None` otherwise.
    pub fn direct_target(&mut self, min: usize) -> Option<&mut [MaybeUninit<u8>]> {
        let (h, body) = self.body.as_mut()?;
        let want = h.payload_len as usize - body.len();
        if want < min.max(1) {
            return None;
        }
        Some(&mut body.spare_capacity_mut()[..want])
    }

    /// Records that the first `n` bytes of the slice last returned by
    /// [`FrameDecoder::direct_target`] were written; completes the frame when its payload is full.
    ///
    /// # Safety
    /// Those `n` bytes must have been initialised (e.g. by a successful `recv` returning `n`), and
    /// `n` must not exceed that slice's length.
    pub unsafe fn commit_direct(&mut self, n: usize, out: &mut Vec<Frame>) {
        if let Some((h, body)) = &mut self.body {
            let n = n.min(h.payload_len as usize - body.len());
            // SAFETY: guaranteed by the caller: n initialised bytes follow the current length.
            unsafe { body.set_len(body.len() + n) };
            self.finish_body(out);
        }
    }

    /// Bytes of an unfinished frame held by the decoder (0 at a frame boundary).
    pub fn buffered(&self) -> usize {
        self.head_len + self.body.as_ref().map_or(0, |(_, b)| HEADER_LEN + b.len())
    }

    /// Checks the stream may end here: an error if a frame is half-received.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.buffered() {
            0 => Ok(()),
            n => Err(WireError::UnexpectedEof(n)),
        }
    }
}
