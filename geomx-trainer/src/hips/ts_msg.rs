//! TSEngine's messages (`[scheduling.tsengine]`, scheduling.md, "TSEngine";
//! docs/wire-format.md, "TSEngine"). Every one is a geomx-net `Push` whose key is its [`Tier`]'s
//! first key ([`TS_KEYS`] on the inter tier, [`TS_INTRA_KEYS`] on the intra tier) plus an
//! [`Op`], whose version is the round and whose offset is the model key (each key is a bundle of
//! its own); the fields are little-endian. "bundle" below: the key's values. A participant is a
//! local server on the inter tier (the global server is the root) and a worker on the intra tier
//! (its local server is the root); a participant's id is its DC (inter) or its rank (intra).
//!
//! | Op | From → to | Payload | Answer |
//! |---|---|---|---|
//! | `Ready` | participant → root | `merged` u8 | [`PushStep`] |
//! | `Partial` | participant → participant or root | participants u32, workers u32, f32 × bundle | empty |
//! | `Await` | participant → root | an optional [`Sent`] (the push's measurement) | [`PullStart`] |
//! | `Next` | participant → root | an optional [`Sent`] (the last send of θ) | [`PullStep`] |
//! | `Theta` | participant → participant | f32 × bundle | empty |
//!
//! Decoding checks every length and value: a peer's bad message is an error, never a panic.

use std::time::Duration;

use geomx_net::sched::tsengine::{Measurement, NodeId};

/// The first of the keys TSEngine's messages use on the inter tier (one per [`Op`]).
pub const TS_KEYS: u64 = u64::MAX - 32;

/// The first of the keys TSEngine's messages use on the intra tier (one per [`Op`]).
pub const TS_INTRA_KEYS: u64 = TS_KEYS - 16;

/// Which tree a TSEngine message belongs to. Each tier has its own keys, so that a local server
/// tells its workers' messages (it is their root) from the other local servers' (it is their
/// peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Local servers ↔ global server.
    Inter,
    /// Workers ↔ their local server.
    Intra,
}

impl Tier {
    fn first_key(self) -> u64 {
        match self {
            Tier::Inter => TS_KEYS,
            Tier::Intra => TS_INTRA_KEYS,
        }
    }
}

/// The coordinator's id for the root (the global server); local servers are their DC index.
pub const ROOT: NodeId = u32::MAX;

/// Largest transfer duration a report may carry (longer is a peer's nonsense).
const MAX_REPORT: Duration = Duration::from_secs(3600);

/// What a TSEngine message asks or carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A local server holds a partial sum (its own, or merged): where does it go?
    Ready,
    /// A partial sum of some participants' gradient sums.
    Partial,
    /// A local server is done pushing and waits for the round's parameters.
    Await,
    /// A holder of the parameters asks whom to send them to next.
    Next,
    /// The round's parameters, from a holder.
    Theta,
}

impl Op {
    const ALL: [Op; 5] = [Op::Ready, Op::Partial, Op::Await, Op::Next, Op::Theta];

    /// The request key of this op on `tier`.
    pub fn key(self, tier: Tier) -> u64 {
        tier.first_key() + self as u64
    }

    /// The tier and op of a request key, if it is one of TSEngine's.
    pub fn of_key(key: u64) -> Option<(Tier, Op)> {
        [Tier::Inter, Tier::Intra].into_iter().find_map(|tier| {
            let i = key.checked_sub(tier.first_key())?;
            Some((tier, *Op::ALL.get(usize::try_from(i).ok()?)?))
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A measured send: to whom, how many bytes, how long until the receiver acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// The receiver.
    pub to: NodeId,
    /// Bytes sent.
    pub bytes: u64,
    /// From the start of the send to the receiver's acknowledgement.
    pub elapsed: Duration,
}

impl Sent {
    const LEN: usize = 4 + 8 + 8;

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
        let nanos = u64::try_from(self.elapsed.as_nanos()).unwrap_or(u64::MAX);
        out.extend_from_slice(&nanos.to_le_bytes());
    }

    fn get(b: &[u8]) -> Result<Sent, String> {
        let (Some(to), Some(bytes), Some(nanos)) = (u32_at(b, 0), u64_at(b, 4), u64_at(b, 12))
        else {
            return Err(format!("measurement of {} bytes", b.len()));
        };
        let elapsed = Duration::from_nanos(nanos);
        if bytes == 0 || elapsed.is_zero() || elapsed > MAX_REPORT {
            return Err(format!("measurement of {bytes} bytes in {elapsed:?}"));
        }
        Ok(Sent { to, bytes, elapsed })
    }

    /// The measurement the coordinator records.
    pub fn measurement(&self) -> Measurement {
        Measurement::new(self.bytes, self.elapsed)
    }
}

/// An optional [`Sent`]: a flag byte, then the measurement if the flag is 1.
fn put_opt(sent: Option<Sent>, out: &mut Vec<u8>) {
    match sent {
        Some(s) => {
            out.push(1);
            s.put(out);
        }
        None => out.push(0),
    }
}

fn get_opt(b: &[u8], what: &str) -> Result<Option<Sent>, String> {
    match b.split_first() {
        Some((0, [])) => Ok(None),
        Some((1, rest)) if rest.len() == Sent::LEN => Sent::get(rest).map(Some),
        _ => Err(format!("{what}: payload of {} bytes", b.len())),
    }
}

/// `Ready`'s payload: whether the sender merged an incoming partial (else: its own sum).
pub fn encode_ready(merged: bool) -> Vec<u8> {
    vec![u8::from(merged)]
}

/// Decodes `Ready`'s payload.
pub fn decode_ready(b: &[u8]) -> Result<bool, String> {
    match b {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(format!("ready: payload of {} bytes", b.len())),
    }
}

/// The answer to `Ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushStep {
    /// Send the partial sum to `to` (a DC, or [`ROOT`]); then the push is done.
    SendTo(NodeId),
    /// A partial of `dcs` participants (DCs, or workers on the intra tier) comes from `from`:
    /// merge it and report `Ready` again.
    ReceiveFrom {
        /// The sender.
        from: NodeId,
        /// Participants the incoming partial sums.
        dcs: u32,
    },
}

impl PushStep {
    /// Encodes the answer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        match *self {
            PushStep::SendTo(to) => {
                out.push(0);
                out.extend_from_slice(&to.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            PushStep::ReceiveFrom { from, dcs } => {
                out.push(1);
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&dcs.to_le_bytes());
            }
        }
        out
    }

    /// Decodes an answer.
    pub fn decode(b: &[u8]) -> Result<PushStep, String> {
        let bad = || format!("push step of {} bytes", b.len());
        if b.len() != 9 {
            return Err(bad());
        }
        let (peer, n) = (u32_at(b, 1).ok_or_else(bad)?, u32_at(b, 5).ok_or_else(bad)?);
        match b[0] {
            0 => Ok(PushStep::SendTo(peer)),
            1 if n > 0 => Ok(PushStep::ReceiveFrom { from: peer, dcs: n }),
            k => Err(format!("push step kind {k} with {n} DCs")),
        }
    }
}

/// `Partial`'s header: participants (DCs, or workers on the intra tier) and workers the sum
/// counts, then f32 values.
pub fn encode_partial(dcs: u32, workers: u32, sum: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + sum.len() * 4);
    out.extend_from_slice(&dcs.to_le_bytes());
    out.extend_from_slice(&workers.to_le_bytes());
    out.extend_from_slice(&super::msg::f32_bytes(sum));
    out
}

/// A decoded `Partial`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// Participants whose sums it holds (DCs, or workers on the intra tier).
    pub dcs: u32,
    /// Workers whose gradients it holds.
    pub workers: u32,
    /// The values.
    pub sum: Vec<f32>,
}

/// Decodes `Partial` for a bundle of `len` values.
pub fn decode_partial(b: &[u8], len: usize) -> Result<Partial, String> {
    let (Some(dcs), Some(workers)) = (u32_at(b, 0), u32_at(b, 4)) else {
        return Err(format!("partial of {} bytes", b.len()));
    };
    if b.len() != 8 + len * 4 {
        return Err(format!(
            "partial of {} values, the bundle has {len}",
            (b.len().saturating_sub(8)) / 4
        ));
    }
    if dcs == 0 || workers == 0 {
        return Err(format!("partial of {dcs} DCs and {workers} workers"));
    }
    let sum = super::msg::f32_from_bytes(&b[8..]).ok_or("partial values misaligned")?;
    Ok(Partial { dcs, workers, sum })
}

/// The payload of `Await` and `Next`: the measurement of the sender's last send (`Await`: its
/// push; `Next`: its last send of θ, absent on a holder's first `Next`).
pub fn encode_report(sent: Option<Sent>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + Sent::LEN);
    put_opt(sent, &mut out);
    out
}

/// Decodes the payload of `Await` or `Next` (`what` names it in errors).
pub fn decode_report(b: &[u8], what: &str) -> Result<Option<Sent>, String> {
    get_opt(b, what)
}

/// The answer to `Await`: the parameters from the root, or word of the holder sending them.
#[derive(Debug, Clone, PartialEq)]
pub enum PullStart {
    /// The parameters (f32 bytes of the bundle).
    Theta(Vec<u8>),
    /// Holder `from` sends them (`Theta` to this local server).
    From(NodeId),
}

/// Encodes the root's `Await` answer with the parameters.
pub fn encode_pull_theta(theta: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + theta.len());
    out.push(0);
    out.extend_from_slice(theta);
    out
}

/// Encodes an `Await` answer naming the holder that sends.
pub fn encode_pull_from(from: NodeId) -> Vec<u8> {
    let mut out = vec![1];
    out.extend_from_slice(&from.to_le_bytes());
    out
}

impl PullStart {
    /// Decodes an `Await` answer for a bundle of `len` values.
    pub fn decode(b: &[u8], len: usize) -> Result<PullStart, String> {
        match b.split_first() {
            Some((0, theta)) if theta.len() == len * 4 => Ok(PullStart::Theta(theta.to_vec())),
            Some((1, from)) if from.len() == 4 => {
                Ok(PullStart::From(u32_at(from, 0).ok_or("pull start")?))
            }
            _ => Err(format!("pull start of {} bytes (bundle {len})", b.len())),
        }
    }
}

/// The answer to `Next`: send the parameters to a DC, or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullStep {
    /// Send `Theta` to this DC's local server.
    SendTo(NodeId),
    /// Every local server is served or assigned: stop.
    Stop,
}

impl PullStep {
    /// Encodes the answer.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            PullStep::SendTo(to) => {
                let mut out = vec![1];
                out.extend_from_slice(&to.to_le_bytes());
                out
            }
            PullStep::Stop => vec![0],
        }
    }

    /// Decodes an answer.
    pub fn decode(b: &[u8]) -> Result<PullStep, String> {
        match b {
            [0] => Ok(PullStep::Stop),
            [1, rest @ ..] if rest.len() == 4 => {
                Ok(PullStep::SendTo(u32_at(rest, 0).ok_or("pull step")?))
            }
            _ => Err(format!("pull step of {} bytes", b.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_map_to_their_keys_and_nothing_else_does() {
        for op in Op::ALL {
            for tier in [Tier::Inter, Tier::Intra] {
                assert_eq!(Op::of_key(op.key(tier)), Some((tier, op)));
            }
        }
        assert_ne!(Op::Ready.key(Tier::Inter), Op::Ready.key(Tier::Intra));
        assert_eq!(Op::of_key(TS_KEYS - 1), None);
        assert_eq!(Op::of_key(TS_KEYS + 5), None);
        assert_eq!(Op::of_key(TS_INTRA_KEYS - 1), None);
        assert_eq!(Op::of_key(TS_INTRA_KEYS + 5), None);
        assert_eq!(Op::of_key(0), None);
        assert_eq!(Op::of_key(super::super::msg::REJOIN_KEY), None);
        assert_eq!(Op::of_key(super::super::msg::LOSS_KEY), None);
    }

    #[test]
    fn messages_roundtrip() {
        assert!(decode_ready(&encode_ready(true)).unwrap());
        assert!(!decode_ready(&encode_ready(false)).unwrap());
        for s in [
            PushStep::SendTo(ROOT),
            PushStep::SendTo(2),
            PushStep::ReceiveFrom { from: 1, dcs: 3 },
        ] {
            assert_eq!(PushStep::decode(&s.encode()).unwrap(), s);
        }
        let p = decode_partial(&encode_partial(2, 5, &[1.5, -2.0, 0.25]), 3).unwrap();
        assert_eq!(
            p,
            Partial {
                dcs: 2,
                workers: 5,
                sum: vec![1.5, -2.0, 0.25]
            }
        );
        let sent = Sent {
            to: 1,
            bytes: 10_000_000,
            elapsed: Duration::from_millis(500),
        };
        assert_eq!(
            decode_report(&encode_report(Some(sent)), "await").unwrap(),
            Some(sent)
        );
        assert_eq!(decode_report(&encode_report(None), "await").unwrap(), None);
        assert_eq!(
            decode_report(&encode_report(Some(sent)), "next").unwrap(),
            Some(sent)
        );
        // Spec oracle 11's units: 10 MB in 0.5 s.
        assert_eq!(sent.measurement().rate().unwrap(), 2e7);
        let theta = super::super::msg::f32_bytes(&[1.0, 2.0]).into_owned();
        assert_eq!(
            PullStart::decode(&encode_pull_theta(&theta), 2).unwrap(),
            PullStart::Theta(theta)
        );
        assert_eq!(
            PullStart::decode(&encode_pull_from(4), 2).unwrap(),
            PullStart::From(4)
        );
        for s in [PullStep::SendTo(3), PullStep::Stop] {
            assert_eq!(PullStep::decode(&s.encode()).unwrap(), s);
        }
    }

    #[test]
    fn bad_messages_are_errors() {
        assert!(decode_ready(&[]).is_err());
        assert!(decode_ready(&[2]).is_err());
        assert!(decode_ready(&[0, 0]).is_err());
        assert!(PushStep::decode(&[0; 8]).is_err());
        assert!(PushStep::decode(&[2; 9]).is_err());
        // A receive of no DCs.
        assert!(PushStep::decode(
            &PushStep::SendTo(1)
                .encode()
                .iter()
                .enumerate()
                .map(|(i, &b)| if i == 0 { 1 } else { b })
                .collect::<Vec<_>>()
        )
        .is_err());
        let good = encode_partial(1, 2, &[1.0, 2.0]);
        assert!(decode_partial(&good, 3).is_err());
        assert!(decode_partial(&good[..good.len() - 1], 2).is_err());
        assert!(decode_partial(&good[..7], 2).is_err());
        assert!(decode_partial(&encode_partial(0, 2, &[1.0, 2.0]), 2).is_err());
        assert!(decode_partial(&encode_partial(1, 0, &[1.0, 2.0]), 2).is_err());
        let sent = Sent {
            to: 1,
            bytes: 1,
            elapsed: Duration::from_millis(1),
        };
        let mut long = encode_report(Some(sent));
        long.push(0);
        assert!(decode_report(&long, "await").is_err());
        assert!(decode_report(&[1, 0], "await").is_err());
        assert!(decode_report(&[2], "await").is_err());
        let zero = Sent {
            elapsed: Duration::ZERO,
            ..sent
        };
        assert!(decode_report(&encode_report(Some(zero)), "next").is_err());
        let empty = Sent { bytes: 0, ..sent };
        assert!(decode_report(&encode_report(Some(empty)), "next").is_err());
        assert!(PullStart::decode(&encode_pull_theta(&[0; 4]), 2).is_err());
        assert!(PullStart::decode(&[1, 0, 0], 2).is_err());
        assert!(PullStart::decode(&[], 2).is_err());
        assert!(PullStep::decode(&[1, 0, 0, 0]).is_err());
        assert!(PullStep::decode(&[2]).is_err());
    }
}
