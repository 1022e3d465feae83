//! Every payload decoder a role runs on bytes from the network, fed arbitrary bytes and
//! mutations of valid payloads (a byte changed, cut short, extended): none panics, and what one
//! accepts has the size the receiver asked for. The frames around these payloads are fuzzed in
//! geomx-net (tests/wire.rs, tests/conn_fuzz.rs).

use geomx_kernels::{Scaling, SparseVec, ValueType};
use geomx_net::PayloadCodec;
use geomx_trainer::codec::down::split_segments;
use geomx_trainer::codec::update::Update;
use geomx_trainer::codec::{decode_any, decode_values, encode_values};
use geomx_trainer::hips::esync::Reply;
use geomx_trainer::hips::msg::UpPush;
use geomx_trainer::hips::ts_msg::{self, PullStart, PullStep, PushStep};
use proptest::prelude::*;

/// Runs every decoder on `b` for a key (or range) of `n` elements and checks the sizes of what
/// they accept; returns how many decoders accepted it.
fn decode_all(b: &[u8], n: usize) -> usize {
    let mut sizes = Vec::new();
    for codec in (0..=u8::MAX).filter_map(|t| PayloadCodec::from_u8(t).ok()) {
        sizes.extend(decode_values(codec, b, 0, n).ok().map(|v| v.len()));
    }
    sizes.extend(decode_any(b, 0, n).ok().map(|v| v.len()));
    if let Ok(u) = Update::decode(b, 0, n) {
        sizes.push(u.grad.n_total() as usize);
        sizes.extend(u.theta.map(|t| t.len()));
    }
    let mut unsized_ok = 0;
    for up in [
        UpPush::decode(b, 0, n).ok(),
        UpPush::decode_coded(b, 0, n).ok(),
    ]
    .into_iter()
    .flatten()
    {
        match up.sum {
            Some(s) => sizes.push(s.len()),
            None => unsized_ok += 1,
        }
    }
    sizes.extend(ts_msg::decode_partial(b, n).ok().map(|p| p.sum.len()));
    match PullStart::decode(b, n) {
        Ok(PullStart::Theta(t)) => sizes.push(t.len() / 4),
        Ok(_) => unsized_ok += 1,
        Err(_) => {}
    }
    sizes.extend(Reply::decode_steps(b, n).ok().map(|s| s.len()));
    sizes.extend(split_segments(b, n, 0).ok().map(|s| s.len()));
    assert!(sizes.iter().all(|&s| s == n), "sizes {sizes:?} for {n}");
    // Unsized decoders: only that they return.
    unsized_ok += [
        ts_msg::decode_ready(b).is_ok(),
        ts_msg::decode_report(b, "fuzz").is_ok(),
        PushStep::decode(b).is_ok(),
        PullStep::decode(b).is_ok(),
        Reply::decode_answer(b).is_ok(),
    ]
    .into_iter()
    .filter(|&ok| ok)
    .count();
    sizes.len() + unsized_ok
}

/// Valid payloads of a key of `values.len()` elements, one per decoder family.
fn valid_payloads(values: &[f32]) -> Vec<Vec<u8>> {
    let n = values.len();
    let idx: Vec<u32> = (0..n as u32).step_by(3).collect();
    let picked: Vec<f32> = idx.iter().map(|&i| values[i as usize]).collect();
    let sparse = SparseVec::new(n as u32, idx, picked).expect("indices below n");
    let mut sparse_bytes = Vec::new();
    sparse.encode(ValueType::F16, Scaling::None, &mut sparse_bytes);
    vec![
        encode_values(values, ValueType::F32, Scaling::None).bytes,
        encode_values(values, ValueType::F16, Scaling::Pow2).bytes,
        sparse_bytes.clone(),
        Update::encode(&sparse, ValueType::F32, Scaling::None, Some(values), false),
        UpPush::encode(3, values),
        UpPush::encode_coded(2, &sparse_bytes),
        UpPush::encode_skip(1),
        ts_msg::encode_partial(1, 2, values),
        ts_msg::encode_pull_theta(
            &values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        ),
        ts_msg::encode_pull_from(3),
        Reply::Steps((0..n as u64).collect()).encode(),
    ]
}

/// A change to a valid payload.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
}

fn mutate(mut b: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Set(at, v) => {
            if !b.is_empty() {
                let i = at % b.len();
                b[i] = *v;
            }
        }
        Mutation::Truncate(at) => b.truncate(at % (b.len() + 1)),
        Mutation::Extend(tail) => b.extend_from_slice(tail),
    }
    b
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, v)| Mutation::Set(a, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_are_refused_or_decoded_to_the_asked_size(
        b in prop::collection::vec(any::<u8>(), 0..256),
        n in 0usize..48,
    ) {
        decode_all(&b, n);
    }

    #[test]
    fn mutated_valid_payloads_never_panic(
        values in prop::collection::vec(-1e4f32..1e4, 1..40),
        ms in prop::collection::vec(mutation(), 1..4),
        n_delta in -2i64..3,
    ) {
        let n = (values.len() as i64 + n_delta).max(0) as usize;
        for p in valid_payloads(&values) {
            // Unchanged, for the right size and a wrong one; then mutated.
            prop_assert!(decode_all(&p, values.len()) > 0, "a valid payload was refused");
            decode_all(&p, n);
            let m = ms.iter().fold(p, mutate);
            decode_all(&m, values.len());
        }
    }
}
