//! Payload bytes by codec class (`f32`, `fp16`, `bf16`, `sparse`): the report's `codec_bytes`.

use std::collections::BTreeMap;

use geomx_kernels::{Layout, ValueType, HEADER_LEN};
use geomx_net::PayloadCodec;

use super::Update;

/// Payload bytes by codec class (`f32`, `fp16`, `bf16`, `sparse`), for the report.
pub type CodecBytes = BTreeMap<String, u64>;

/// Class name of a codec payload (by its header), or `None` if it has none.
fn class_of(payload: &[u8]) -> Option<&'static str> {
    if payload.len() < HEADER_LEN {
        return None;
    }
    if payload[0] == Layout::Sparse as u8 {
        return Some("sparse");
    }
    match ValueType::from_u8(payload[1])? {
        ValueType::F32 => Some("f32"),
        ValueType::F16 => Some("fp16"),
        ValueType::Bf16 => Some("bf16"),
    }
}

fn add(counts: &mut CodecBytes, class: &str, n: usize) {
    *counts.entry(class.to_string()).or_default() += n as u64;
}

/// Counts `n` dense values of type `vt` sent without a codec header (DGT blocks).
pub fn count_values(counts: &mut CodecBytes, vt: ValueType, n: usize) {
    let (class, size) = match vt {
        ValueType::F32 => ("f32", 4),
        ValueType::F16 => ("fp16", 2),
        ValueType::Bf16 => ("bf16", 2),
    };
    add(counts, class, n * size);
}

/// Counts a dense payload sent or received under `codec` (see [`super::encode_values`]).
pub fn count_dense(counts: &mut CodecBytes, codec: PayloadCodec, payload: &[u8]) {
    let class = match codec {
        PayloadCodec::Raw => class_of(payload).unwrap_or("f32"),
        _ => "f32",
    };
    add(counts, class, payload.len());
}

/// Counts an up-push body (after its 4-byte count): a codec payload.
pub fn count_payload(counts: &mut CodecBytes, payload: &[u8]) {
    add(counts, class_of(payload).unwrap_or("f32"), payload.len());
}

/// Counts an [`Update`]: its sparse part (with the 5-byte prefix) as `sparse`, its θ part as
/// `f32`.
pub fn count_update(counts: &mut CodecBytes, b: &[u8]) {
    match Update::split(b, 0) {
        Ok((sparse, theta)) => {
            add(counts, "sparse", 5 + sparse.len());
            if let Some(t) = theta {
                add(counts, "f32", t.len());
            }
        }
        Err(_) => add(counts, "sparse", b.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_values;
    use geomx_kernels::{Scaling, SparseVec};

    #[test]
    fn dense_payloads_are_counted_by_class() {
        let x: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let e = encode_values(&x, ValueType::F16, Scaling::Pow2);
        let mut c = CodecBytes::new();
        count_dense(&mut c, e.codec, &e.bytes);
        count_dense(&mut c, PayloadCodec::DenseF32, &[0; 8]);
        assert_eq!(c["fp16"], 212);
        assert_eq!(c["f32"], 8);
        count_payload(
            &mut c,
            &encode_values(&x, ValueType::Bf16, Scaling::None).bytes,
        );
        assert_eq!(c["bf16"], 212);
    }

    #[test]
    fn updates_count_their_sparse_and_dense_parts() {
        let g = SparseVec::new(10, vec![1, 7], vec![0.5, -2.0]).unwrap();
        let theta: Vec<f32> = (0..10).map(|i| i as f32).collect();
        for t in [None, Some(&theta[..])] {
            let b = Update::encode(&g, ValueType::F32, Scaling::None, t, false);
            let mut c = CodecBytes::new();
            count_update(&mut c, &b);
            assert_eq!(c["sparse"], 5 + 12 + 16);
            assert_eq!(c.get("f32").copied(), t.map(|_| 12 + 40));
        }
    }
}
