//! The coordinator's payloads and the DGT round reports are network input (a registration's
//! Hello reaches the coordinator from anyone who can connect under `security.mode = "off"`), and
//! a coordinator snapshot is read back from disk: every decoder, on arbitrary bytes and on
//! mutated valid payloads (a byte set, cut short, extended), never panics, and every valid
//! payload decodes to what was encoded.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use geomx_net::coord::{
    AbortNotice, CoordSnapshot, Hello, JournalRecord, Located, Membership, NodeInfo, NodeKey,
};
use geomx_net::dgt::{ChannelRound, RoundReport};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    prop::string::string_regex("[a-z_:.0-9 ]{0,24}").unwrap()
}

fn node_key() -> impl Strategy<Value = NodeKey> {
    (text(), any::<u32>(), any::<u32>()).prop_map(|(role, dc, rank)| NodeKey { dc, role, rank })
}

fn node_info() -> impl Strategy<Value = NodeInfo> {
    (any::<u32>(), text(), any::<u32>(), any::<u32>(), text()).prop_map(
        |(id, role, dc, rank, addr)| NodeInfo {
            id,
            role,
            dc,
            rank,
            addr,
        },
    )
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        text(),
        any::<u32>(),
        any::<u32>(),
        text(),
        any::<u32>(),
        any::<u64>(),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(role, dc, rank, listen_addr, protocol_version, config_hash, reattach)| Hello {
                role,
                dc,
                rank,
                listen_addr,
                protocol_version,
                config_hash,
                reattach,
            },
        )
}

fn membership() -> impl Strategy<Value = Membership> {
    (
        any::<u32>(),
        prop::collection::vec(node_info(), 0..6),
        any::<u32>(),
    )
        .prop_map(|(my_id, nodes, incarnation)| Membership {
            my_id,
            nodes,
            incarnation,
        })
}

fn located() -> impl Strategy<Value = Located> {
    (
        text(),
        any::<u32>(),
        0u8..3,
        prop::option::of(0u32..u32::MAX - 1),
    )
        .prop_map(|(addr, incarnation, state, ms)| Located {
            addr,
            incarnation,
            live: state == 1,
            reattaching: state == 2,
            dropped_ago: ms.map(|m| Duration::from_millis(u64::from(m))),
        })
}

fn abort() -> impl Strategy<Value = AbortNotice> {
    (text(), any::<u32>(), any::<u32>(), text()).prop_map(|(role, dc, rank, reason)| AbortNotice {
        role,
        dc,
        rank,
        reason,
    })
}

/// A snapshot whose incarnations, lost and done processes are members of its table (the
/// decoder checks that); journal records may come from anyone.
fn snapshot() -> impl Strategy<Value = CoordSnapshot> {
    use prop::sample::Index;
    (
        any::<u32>(),
        any::<u64>(),
        prop::collection::vec(node_info(), 1..4),
        prop::collection::vec((any::<Index>(), any::<u32>()), 0..4),
        prop::collection::vec(any::<Index>(), 0..3),
        prop::collection::vec(any::<Index>(), 0..3),
        prop::collection::vec(
            (node_key(), prop::collection::vec(any::<u8>(), 0..16)),
            0..3,
        ),
    )
        .prop_map(
            |(protocol_version, config_hash, nodes, inc, lost, done, journal)| {
                let key = |i: &Index| {
                    let n = &nodes[i.index(nodes.len())];
                    NodeKey::new(n.role.clone(), n.dc, n.rank)
                };
                CoordSnapshot {
                    protocol_version,
                    config_hash,
                    incarnations: inc
                        .iter()
                        .map(|(i, v)| (key(i), *v))
                        .collect::<BTreeMap<_, _>>(),
                    lost: lost.iter().map(key).collect::<BTreeSet<_>>(),
                    done: done.iter().map(key).collect::<BTreeSet<_>>(),
                    journal: journal
                        .into_iter()
                        .map(|(from, bytes)| JournalRecord { from, bytes })
                        .collect(),
                    nodes,
                }
            },
        )
}

fn report() -> impl Strategy<Value = RoundReport> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec((0u32..1000, 0u32..1000, 0u32..1000), 1..8),
    )
        .prop_map(|(sender, key, round, chans)| RoundReport {
            sender,
            key,
            round,
            channels: chans
                .into_iter()
                .map(|(on_time, late, extra)| ChannelRound {
                    sent: on_time + late + extra,
                    on_time,
                    late,
                })
                .collect(),
        })
}

/// Every decoder on `bytes`: none may panic; what they accept or refuse is theirs to say.
fn decode_all(bytes: &[u8]) {
    let _ = Hello::decode(bytes);
    let _ = Membership::decode(bytes);
    let _ = Located::decode(bytes);
    let _ = NodeKey::decode(bytes);
    let _ = AbortNotice::decode(bytes);
    let _ = CoordSnapshot::decode(bytes);
    let _ = RoundReport::decode(bytes);
}

/// A mutation of a valid payload: one byte set, cut short, or extended.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Cut(usize),
    Extend(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
    ]
}

fn mutate(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Set(i, b) if !bytes.is_empty() => {
            let n = bytes.len();
            bytes[i % n] = *b;
        }
        Mutation::Set(..) => {}
        Mutation::Cut(i) => bytes.truncate(i % (bytes.len() + 1)),
        Mutation::Extend(tail) => bytes.extend_from_slice(tail),
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes);
    }

    #[test]
    fn valid_payloads_round_trip_and_their_mutations_never_panic(
        h in hello(),
        m in membership(),
        l in located(),
        k in node_key(),
        a in abort(),
        s in snapshot(),
        r in report(),
        mutation in mutation(),
    ) {
        prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h.clone());
        prop_assert_eq!(Membership::decode(&m.encode()).unwrap(), m.clone());
        prop_assert_eq!(Located::decode(&l.encode()).unwrap(), l.clone());
        prop_assert_eq!(NodeKey::decode(&k.encode()).unwrap(), k.clone());
        prop_assert_eq!(AbortNotice::decode(&a.encode()).unwrap(), a.clone());
        prop_assert_eq!(CoordSnapshot::decode(&s.encode()).unwrap(), s.clone());
        let mut rb = Vec::new();
        r.encode_into(&mut rb);
        prop_assert_eq!(RoundReport::decode(&rb).unwrap(), r);
        for bytes in [h.encode(), m.encode(), l.encode(), k.encode(), a.encode(), s.encode(), rb] {
            decode_all(&mutate(bytes, &mutation));
        }
    }
}
