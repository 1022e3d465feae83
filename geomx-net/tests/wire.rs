//! Wire format: round trips (proptest) and every malformed-input case.

use geomx_net::wire::{
    decode, encode, Frame, FrameDecoder, FrameHeader, MsgKind, PayloadCodec, WireError, HEADER_LEN,
    MAGIC,
};
use proptest::prelude::*;

fn arb_header() -> impl Strategy<Value = FrameHeader> {
    (
        // DGT kinds have payload bounds of their own (tested below).
        prop::sample::select(
            MsgKind::ALL
                .iter()
                .copied()
                .filter(|k| !k.is_dgt())
                .collect::<Vec<_>>(),
        ),
        prop::sample::select(PayloadCodec::ALL.to_vec()),
        any::<u32>(),
        any::<(u64, u64, u64, u64, u64)>(),
    )
        .prop_map(
            |(kind, codec, sender, (request_id, key, version, offset, total))| FrameHeader {
                kind,
                codec,
                sender,
                payload_len: 0,
                request_id,
                key,
                version,
                offset,
                total,
            },
        )
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (arb_header(), 0usize..600).prop_flat_map(|(h, n)| {
        let elems = n / h.codec.element_size() as usize * h.codec.element_size() as usize;
        prop::collection::vec(any::<u8>(), elems).prop_map(move |p| Frame::new(h, p))
    })
}

proptest! {
    #[test]
    fn frame_round_trips(f in arb_frame()) {
        let bytes = encode(&f);
        prop_assert_eq!(bytes.len(), HEADER_LEN + f.payload.len());
        prop_assert_eq!(decode(&bytes, 1 << 20).unwrap(), f);
    }

    #[test]
    fn decoder_accepts_any_chunking(frames in prop::collection::vec(arb_frame(), 1..8), cuts in prop::collection::vec(1usize..97, 1..64)) {
        let stream: Vec<u8> = frames.iter().flat_map(encode).collect();
        let mut dec = FrameDecoder::new(1 << 20);
        let mut out = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < stream.len() {
            let n = cuts[i % cuts.len()].min(stream.len() - pos);
            dec.feed(&stream[pos..pos + n], &mut out).unwrap();
            pos += n;
            i += 1;
        }
        dec.finish().unwrap();
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn direct_reads_match_fed_reads(f in arb_frame(), step in 1usize..50) {
        let bytes = encode(&f);
        let mut dec = FrameDecoder::new(1 << 20);
        let mut out = Vec::new();
        dec.feed(&bytes[..HEADER_LEN], &mut out).unwrap();
        let mut pos = HEADER_LEN;
        while let Some(t) = dec.direct_target(1) {
            let n = step.min(t.len());
            for (slot, b) in t[..n].iter_mut().zip(&bytes[pos..pos + n]) {
                slot.write(*b);
            }
            pos += n;
            // SAFETY: n bytes were written just above.
            unsafe { dec.commit_direct(n, &mut out) };
        }
        prop_assert_eq!(out, vec![f]);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&bytes, 1 << 16);
        let mut dec = FrameDecoder::new(1 << 16);
        let mut out = Vec::new();
        let _ = dec.feed(&bytes, &mut out);
    }
}

fn good() -> Vec<u8> {
    let mut h = FrameHeader::new(MsgKind::Push);
    h.codec = PayloadCodec::DenseF32;
    encode(&Frame::new(h, vec![0u8; 16]))
}

fn expect_err(bytes: &[u8], want: WireError) {
    assert_eq!(decode(bytes, 1024), Err(want.clone()));
    let mut dec = FrameDecoder::new(1024);
    let mut out = Vec::new();
    // Every prefix of the header is accepted silently; the full header is judged.
    if bytes.len() >= HEADER_LEN {
        assert_eq!(dec.feed(bytes, &mut out), Err(want.clone()));
        assert!(out.is_empty());
        assert_eq!(
            dec.feed(&good(), &mut out),
            Err(want),
            "a failed decoder stays failed"
        );
    }
}

#[test]
fn bad_magic() {
    let mut b = good();
    b[0] ^= 1;
    expect_err(&b, WireError::BadMagic(MAGIC ^ 1));
}

#[test]
fn unknown_version() {
    let mut b = good();
    b[4] = 9;
    expect_err(&b, WireError::UnknownVersion(9));
}

#[test]
fn unknown_kind_including_reserved_dgt_range() {
    for k in [0u8, 5, 15, 20, 31, 38, 53, 63, 255] {
        let mut b = good();
        b[5] = k;
        expect_err(&b, WireError::UnknownKind(k));
    }
}

#[test]
fn unknown_codec_and_flags() {
    let mut b = good();
    b[6] = 6;
    expect_err(&b, WireError::UnknownCodec(6));
    let mut b = good();
    b[7] = 0x80;
    expect_err(&b, WireError::BadFlags(0x80));
}

#[test]
fn oversize_is_rejected_before_allocating() {
    let mut b = good();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    b.truncate(HEADER_LEN);
    let want = WireError::Oversize {
        len: HEADER_LEN as u64 + u64::from(u32::MAX),
        max: 1024,
    };
    expect_err(&b, want);
    // Exactly at the limit is fine.
    let mut h = FrameHeader::new(MsgKind::Push);
    h.codec = PayloadCodec::Raw;
    let f = Frame::new(h, vec![7; 1024 - HEADER_LEN]);
    assert_eq!(decode(&encode(&f), 1024).unwrap(), f);
    let f = Frame::new(h, vec![7; 1025 - HEADER_LEN]);
    assert!(matches!(
        decode(&encode(&f), 1024),
        Err(WireError::Oversize {
            len: 1025,
            max: 1024
        })
    ));
}

#[test]
fn payload_not_whole_elements() {
    for (codec, elem) in [
        (PayloadCodec::DenseF32, 4),
        (PayloadCodec::DenseF16, 2),
        (PayloadCodec::DenseBf16, 2),
        (PayloadCodec::SparseF32, 8),
        (PayloadCodec::SparseF16, 6),
    ] {
        let mut h = FrameHeader::new(MsgKind::Push);
        h.codec = codec;
        let b = encode(&Frame::new(h, vec![0; elem as usize + 1]));
        expect_err(
            &b,
            WireError::BadPayloadLength {
                codec,
                len: elem + 1,
                elem,
            },
        );
    }
}

#[test]
fn truncation_and_trailing_bytes() {
    let b = good();
    for cut in 0..HEADER_LEN {
        assert_eq!(
            decode(&b[..cut], 1024),
            Err(WireError::TruncatedHeader(cut))
        );
    }
    for cut in HEADER_LEN..b.len() {
        assert_eq!(
            decode(&b[..cut], 1024),
            Err(WireError::TruncatedPayload {
                got: cut - HEADER_LEN,
                want: 16
            })
        );
        let mut dec = FrameDecoder::new(1024);
        let mut out = Vec::new();
        dec.feed(&b[..cut], &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(dec.finish(), Err(WireError::UnexpectedEof(cut)));
    }
    let mut long = b.clone();
    long.push(1);
    assert_eq!(decode(&long, 1024), Err(WireError::TrailingBytes(1)));
}

#[test]
fn header_layout_is_little_endian_and_56_bytes() {
    let h = FrameHeader {
        kind: MsgKind::Pull,
        codec: PayloadCodec::DenseBf16,
        sender: 0x0102_0304,
        payload_len: 0,
        request_id: 0x1112_1314_1516_1718,
        key: 5,
        version: 6,
        offset: 7,
        total: 8,
    };
    let b = h.encode();
    assert_eq!(&b[0..4], b"GMXF");
    assert_eq!(b[4], 1);
    assert_eq!(b[5], 17);
    assert_eq!(b[6], 3);
    assert_eq!(&b[8..12], &[4, 3, 2, 1]);
    assert_eq!(&b[16..24], &0x1112_1314_1516_1718u64.to_le_bytes());
    assert_eq!(b[24], 5);
    assert_eq!(b[32], 6);
    assert_eq!(b[40], 7);
    assert_eq!(b[48], 8);
}

fn dgt_frame(kind: MsgKind, codec: PayloadCodec, len: usize) -> Vec<u8> {
    let h = FrameHeader {
        codec,
        ..FrameHeader::new(kind)
    };
    encode(&Frame::new(h, vec![0u8; len]))
}

#[test]
fn dgt_kinds_are_spoken_with_bounded_payloads() {
    use geomx_net::wire::{DGT_HELLO_LEN, DGT_MAX_BLOCK_PAYLOAD};
    let ok = [
        (MsgKind::DgtBlock, 33),
        (MsgKind::DgtBlock, DGT_MAX_BLOCK_PAYLOAD),
        (MsgKind::DgtEnd, 32),
        (MsgKind::DgtReport, 44),
        (MsgKind::DgtReport, 32 + 8 * 12),
        (MsgKind::DgtHello, DGT_HELLO_LEN),
        (MsgKind::DgtRate, 8),
    ];
    for (k, len) in ok {
        assert!(k.is_dgt());
        let f = decode(&dgt_frame(k, PayloadCodec::Raw, len), 4 << 20).unwrap();
        assert_eq!((f.header.kind, f.payload.len()), (k, len));
    }
    let bad = [
        (MsgKind::DgtBlock, 0),
        (MsgKind::DgtBlock, 32),
        (MsgKind::DgtBlock, DGT_MAX_BLOCK_PAYLOAD + 1),
        (MsgKind::DgtEnd, 31),
        (MsgKind::DgtReport, 32),
        (MsgKind::DgtReport, 45),
        (MsgKind::DgtReport, 32 + 9 * 12),
        (MsgKind::DgtHello, DGT_HELLO_LEN - 1),
        (MsgKind::DgtRate, 7),
        (MsgKind::DgtRate, 9),
    ];
    for (k, len) in bad {
        let b = dgt_frame(k, PayloadCodec::Raw, len);
        assert_eq!(
            decode(&b, 4 << 20),
            Err(WireError::BadDgtFrame {
                kind: k as u8,
                len: len as u32
            }),
            "{k:?} with {len} bytes"
        );
        // The incremental decoder fails on the header, before buffering the payload.
        let mut dec = FrameDecoder::new(4 << 20);
        let mut out = Vec::new();
        assert!(dec.feed(&b[..HEADER_LEN], &mut out).is_err());
        assert!(out.is_empty());
    }
    // DGT frames must say codec Raw.
    let b = dgt_frame(MsgKind::DgtRate, PayloadCodec::DenseF32, 8);
    assert_eq!(
        decode(&b, 1 << 20),
        Err(WireError::BadDgtFrame { kind: 52, len: 8 })
    );
    assert!(!MsgKind::Push.is_dgt());
}
