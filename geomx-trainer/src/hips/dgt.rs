//! DGT on the inter tier (`transport.inter = "dgt"`): local servers push their DC sums to the
//! global servers with differential gradient transmission; the global reply (θ_{r+1}) and the
//! θ_0 pull stay on TCP.
//!
//! Per push of range `id` at round r the local server
//! 1. updates the range's block contributions ([`BlockScores`], EMA α) with the sum,
//! 2. assigns channels (top ⌈k·n⌉ blocks reliable, the rest banded over C UDP channels),
//! 3. hands the sum to its [`DgtClient`] for the range's global server (DGT key = range id,
//!    DGT round = r), and
//! 4. sends the usual TCP `Push` whose payload is only the worker count ([`DGT_PUSH_LEN`]).
//!
//! The global server joins the push with the tensor its [`DgtServer`] delivered for
//! (sender, range, round) — lost blocks are zero, late blocks of round r − 1 folded in — and
//! aggregates it like a dense push. Local servers learn the DGT port of a global server with a
//! `Pull` of [`DGT_INFO_KEY`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use geomx_kernels::dgt_score::{assign_channels, AdaptiveK, BlockScores};
use geomx_net::dgt::link::{
    ClientStats, DgtClient, DgtServer, LinkError, LinkOptions, Pacing, ServerStats, ServerTls,
};
use geomx_net::dgt::{DgtConfig, ValueType};
use serde::{Deserialize, Serialize};

use crate::config::DgtTransportConfig;

/// Key of the `Pull` that asks a global server for its DGT port (answered with a u16 LE).
pub const DGT_INFO_KEY: u64 = u64::MAX;
/// Payload length of a DGT-mode up-push: the u32 worker count alone.
pub const DGT_PUSH_LEN: usize = 4;

/// DGT counters of one role (local server: sender side; global server: receiver side).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DgtRoleStats {
    /// Blocks sent on the reliable channel 0.
    pub reliable_blocks: u64,
    /// Blocks sent (local) or listed by terminators (global) on the unreliable channels.
    pub unreliable_blocks: u64,
    /// Unreliable blocks lost for good (zero in the aggregate).
    pub lost_blocks: u64,
    /// Blocks that arrived after their round's delivery and were folded into the next round.
    pub late_blocks: u64,
    /// Deliveries that waited out the deadline (global servers).
    #[serde(default)]
    pub timed_out: u64,
    /// Messages rejected as invalid (global servers).
    #[serde(default)]
    pub invalid: u64,
    /// Datagrams and the system calls that sent them (local servers; fewer calls with GSO).
    #[serde(default)]
    pub datagrams: u64,
    /// `sendmsg` / `sendto` calls.
    #[serde(default)]
    pub udp_sends: u64,
    /// Last pacing rate in bit/s (local servers).
    #[serde(default)]
    pub rate_bps: u64,
    /// Sealed datagrams that failed to open (forged or tampered): dropped (global servers).
    #[serde(default)]
    pub datagrams_forged: u64,
    /// Sealed datagrams seen before (replays): dropped (global servers).
    #[serde(default)]
    pub datagrams_replayed: u64,
    /// Reliable channels refused or closed for a protocol or admission error (global servers).
    #[serde(default)]
    pub refused_channels: u64,
    /// The reliable share of the last round (local servers; under `adaptive_k` the k_t its
    /// DC's training loss set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reliable_share: Option<f64>,
}

impl DgtRoleStats {
    /// Sender-side counters of a local server, summed over its links (loss and lateness as
    /// the global servers reported them).
    pub fn from_clients(stats: &[ClientStats]) -> Self {
        let mut s = Self::default();
        for c in stats {
            s.reliable_blocks += c.sent.blocks[0];
            s.unreliable_blocks += c.sent.blocks[1..].iter().sum::<u64>();
            s.lost_blocks += c.report_totals[1..].iter().map(|t| t.3).sum::<u64>();
            s.late_blocks += c.report_totals.iter().map(|t| t.2).sum::<u64>();
            s.datagrams += c.datagrams;
            s.udp_sends += c.udp_sends;
            s.rate_bps = s.rate_bps.max(c.rate_bps.unwrap_or(0));
        }
        s
    }

    /// Receiver-side counters of a global server.
    pub fn from_server(st: &ServerStats) -> Self {
        let (lost, sent) = st.unreliable_lost_sent();
        Self {
            reliable_blocks: st.channels[0].sent,
            unreliable_blocks: sent,
            lost_blocks: lost,
            late_blocks: st.late(),
            timed_out: st.timed_out,
            invalid: st.invalid,
            datagrams_forged: st.datagrams_forged,
            datagrams_replayed: st.datagrams_replayed,
            refused_channels: st.refused,
            ..Self::default()
        }
    }
}

/// The link settings of `d`: the DGT core's config and the driver options.
pub fn link_config(d: &DgtTransportConfig) -> (DgtConfig, LinkOptions) {
    let mbit = |r: f64| (r * 1e6).round().max(1.0) as u64;
    let cfg = DgtConfig {
        block_bytes: d.block_bytes,
        channels: d.channels,
        rate_bps: d.rate_mbit.map(mbit).or(Some(mbit(d.max_rate_mbit))),
        burst: d.burst,
        deadline: Duration::from_millis(d.deadline_ms),
        window_bytes: (d.window_bytes > 0).then_some(d.window_bytes),
        ..DgtConfig::default()
    };
    let opts = LinkOptions {
        pacing: match d.rate_mbit {
            Some(_) => Pacing::Configured,
            None => Pacing::Auto {
                min_bps: mbit(d.min_rate_mbit),
                max_bps: mbit(d.max_rate_mbit),
            },
        },
        gso: d.gso,
        mtu: d.mtu,
        ..LinkOptions::default()
    };
    (cfg, opts)
}

/// The DGT value type of the inter tier's dense values (f32, or fp16 without scaling).
pub fn value_type(dense: geomx_kernels::ValueType) -> Result<ValueType, String> {
    match dense {
        geomx_kernels::ValueType::F32 => Ok(ValueType::F32),
        geomx_kernels::ValueType::F16 => Ok(ValueType::F16),
        geomx_kernels::ValueType::Bf16 => Err("dgt carries f32 or fp16 values, not bf16".into()),
    }
}

/// A global server's DGT receiver for its ranges `(range id, length)` of `values`, bound on
/// `ip`; with mutual TLS (`net.security`) its reliable channels admit only the job's local
/// servers.
pub fn bind_server(
    ip: IpAddr,
    d: &DgtTransportConfig,
    ranges: &[(usize, usize)],
    values: ValueType,
    net: &geomx_net::NetOptions,
) -> Result<DgtServer, String> {
    let (cfg, _) = link_config(d);
    let keys: Vec<(u32, u32, ValueType)> = ranges
        .iter()
        .map(|&(id, len)| Ok((id_u32(id)?, id_u32(len)?, values)))
        .collect::<Result<_, String>>()?;
    let tls = net.security.context().map(|ctx| ServerTls {
        ctx: ctx.clone(),
        roles: vec![super::plan::roles::LOCAL_SERVER.to_string()],
    });
    DgtServer::bind_secure(ip, cfg, &keys, None, tls).map_err(|e| e.to_string())
}

/// How often a local server tries again to connect its DGT link after the receiver dropped its
/// handshake.
const HANDSHAKE_RETRY: Duration = Duration::from_millis(50);

/// Connects a local server (node `node_id`) to the DGT receiver at `addr`. A receiver closes
/// connections past its handshake bounds at once ([`geomx_net::tls::slots`]: a stranger may be
/// flooding it with silent connections); such a drop is retried until `deadline`, as the
/// key-value connections are.
pub fn connect(
    addr: SocketAddr,
    node_id: u32,
    d: &DgtTransportConfig,
    net: &geomx_net::NetOptions,
    deadline: Instant,
) -> Result<DgtClient, String> {
    let (cfg, mut opts) = link_config(d);
    opts.congestion = net.congestion;
    let tls = net.security.context().map(|c| &**c);
    loop {
        match DgtClient::connect_secure(addr, node_id, cfg.clone(), opts, tls) {
            Ok(c) => return Ok(c),
            Err(LinkError::Tls(e)) if e.is_dropped() && Instant::now() < deadline => {
                tracing::info!(%addr, error = %e, "dgt handshake dropped; retrying");
                std::thread::sleep(HANDSHAKE_RETRY);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn id_u32(v: usize) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("{v} does not fit DGT's 32-bit fields"))
}

/// The sending half of a local server: contribution scores per range, channel assignment,
/// and the push through the range's link.
pub struct DgtUplink {
    /// The reliable share of this round (k, or k_t under adaptive k).
    k: f64,
    /// `transport.dgt.adaptive_k`: k_t from the DC's training loss, and the last round it took.
    adaptive: Option<(AdaptiveK, Option<u64>)>,
    alpha: f64,
    channels: u8,
    /// The values' type on the wire (fp16: narrowed as the fp16 codec does, no scaling).
    values: ValueType,
    scores: HashMap<usize, BlockScores>,
}

impl DgtUplink {
    /// Scores start at 0 for every range; `values` is the type the blocks carry.
    pub fn new(d: &DgtTransportConfig, values: ValueType) -> Result<Self, String> {
        let adaptive = match d.adaptive_k {
            true => Some((
                AdaptiveK::new(d.k, d.k_min).map_err(|e| e.to_string())?,
                None,
            )),
            false => None,
        };
        Ok(Self {
            k: d.k,
            adaptive,
            alpha: d.alpha,
            channels: d.channels,
            values,
            scores: HashMap::new(),
        })
    }

    /// Under adaptive k: the DC's mean training loss (`loss`, asked once per round and only
    /// under adaptive k) sets the reliable share of `round`; every range of the round shares
    /// it. Without, or without a loss yet, the share stays.
    pub fn observe_loss(&mut self, round: u64, loss: impl FnOnce() -> Option<f64>) {
        let Some((a, fed)) = self.adaptive.as_mut() else {
            return;
        };
        if *fed == Some(round) {
            return;
        }
        if let Some(loss) = loss() {
            *fed = Some(round);
            self.k = a.update(loss);
        }
    }

    /// The reliable share pushes use now.
    pub fn share(&self) -> f64 {
        self.k
    }

    /// The channel map of range `id`'s values `x` at this round (updating its scores).
    pub fn channel_map(
        &mut self,
        id: usize,
        x: &[f32],
        block_bytes: usize,
    ) -> Result<Vec<u8>, String> {
        let per = block_bytes / self.values.size();
        let s = match self.scores.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(BlockScores::new(x.len(), per, self.alpha).map_err(|e| e.to_string())?)
            }
        };
        s.update(x).map_err(|e| e.to_string())?;
        let ranked = s.ranked_sendable();
        assign_channels(&ranked, s.num_blocks(), self.k, self.channels).map_err(|e| e.to_string())
    }

    /// Pushes range `id`'s values of `round` through `link`; returns how many finite values
    /// became ±inf on the wire (fp16 overflow).
    pub fn push(
        &mut self,
        link: &DgtClient,
        id: usize,
        round: u64,
        x: Vec<f32>,
    ) -> Result<usize, String> {
        let map = self.channel_map(id, &x, link.block_bytes())?;
        let round = u32::try_from(round).map_err(|_| format!("round {round} beyond DGT's u32"))?;
        let key = id_u32(id)?;
        let (res, overflow) = match self.values {
            ValueType::F32 => (link.push_f32(key, round, x, map), 0),
            ValueType::F16 => {
                let mut bits = vec![0u16; x.len()];
                let nonfinite = geomx_kernels::cast::f32_to_f16_slice(&x, &mut bits);
                let overflow = nonfinite.saturating_sub(crate::codec::count_nonfinite(&x));
                (link.push_f16(key, round, bits, map), overflow)
            }
        };
        res.map_err(|e| format!("dgt push of range {id}: {e}"))?;
        Ok(overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_map_follows_contribution_ranking() {
        let d = DgtTransportConfig {
            k: 0.5,
            channels: 2,
            alpha: 0.0,
            ..DgtTransportConfig::default()
        };
        let mut up = DgtUplink::new(&d, ValueType::F32).unwrap();
        // 4 blocks of 16 elements (64-byte blocks): means 3, 0 (not sent), 1, 2.
        let mut x = vec![0.0f32; 64];
        for (b, v) in [(0, 3.0), (2, 1.0), (3, 2.0)] {
            x[b * 16..(b + 1) * 16].fill(v);
        }
        let map = up.channel_map(9, &x, 64).unwrap();
        // Ranked 0 (3), 3 (2), 2 (1): ⌈0.5·3⌉ = 2 reliable, block 2 on channel 1, block 1 unsent.
        assert_eq!(map, vec![0, 0xFF, 1, 0]);
    }

    #[test]
    fn adaptive_k_follows_the_dcs_loss_once_per_round() {
        let d = DgtTransportConfig {
            adaptive_k: true,
            ..DgtTransportConfig::default()
        };
        let mut up = DgtUplink::new(&d, ValueType::F32).unwrap();
        // No loss reported yet: the configured share.
        up.observe_loss(0, || None);
        assert_eq!(up.share(), 0.8);
        // dgt.md oracle 9: k = 0.8, k_min = 0.2, losses [2, 1, 0.5, 0.1] → [0.8, 0.4, 0.2, 0.2].
        let mut shares = Vec::new();
        for (round, loss) in [2.0, 1.0, 0.5, 0.1].into_iter().enumerate() {
            up.observe_loss(round as u64, || Some(loss));
            // Every range of a round shares its share: a second report of the round is ignored.
            up.observe_loss(round as u64, || Some(100.0));
            shares.push(up.share());
        }
        assert_eq!(shares, [0.8, 0.4, 0.2, 0.2]);
        // The share decides the channel map: with k_t = 0.2 one block of 3 goes reliably.
        let mut x = vec![0.0f32; 48];
        for (b, v) in [(0, 3.0), (1, 1.0), (2, 2.0)] {
            x[b * 16..(b + 1) * 16].fill(v);
        }
        let map = up.channel_map(1, &x, 64).unwrap();
        assert_eq!(map.iter().filter(|&&c| c == 0).count(), 1, "{map:?}");
        // Without adaptive k, losses change nothing.
        let mut fixed = DgtUplink::new(&DgtTransportConfig::default(), ValueType::F32).unwrap();
        fixed.observe_loss(0, || Some(2.0));
        fixed.observe_loss(1, || Some(0.1));
        assert_eq!(fixed.share(), 0.8);
        // A floor above k is refused.
        let bad = DgtTransportConfig {
            adaptive_k: true,
            k_min: 0.9,
            ..DgtTransportConfig::default()
        };
        assert!(DgtUplink::new(&bad, ValueType::F32).is_err());
    }

    #[test]
    fn rates_and_pacing_from_config() {
        let fixed = DgtTransportConfig {
            rate_mbit: Some(100.0),
            ..DgtTransportConfig::default()
        };
        let (c, o) = link_config(&fixed);
        assert_eq!(
            (c.rate_bps, o.pacing),
            (Some(100_000_000), Pacing::Configured)
        );
        let (_, o) = link_config(&DgtTransportConfig::default());
        assert_eq!(
            o.pacing,
            Pacing::Auto {
                min_bps: 10_000_000,
                max_bps: 10_000_000_000
            }
        );
        let s = DgtRoleStats::from_server(&ServerStats::default());
        assert_eq!(s, DgtRoleStats::default());
        // The priority window: 1 MiB by default, 0 for none.
        let (c, _) = link_config(&DgtTransportConfig::default());
        assert_eq!(c.window_bytes, Some(1 << 20));
        let none = DgtTransportConfig {
            window_bytes: 0,
            ..DgtTransportConfig::default()
        };
        assert_eq!(link_config(&none).0.window_bytes, None);
    }

    /// FP16 values through a real DGT link arrive exactly as the TCP path's fp16 codec (no
    /// scaling) decodes them, and overflows are counted.
    #[test]
    fn fp16_values_arrive_as_the_fp16_codec_decodes_them() {
        use crate::codec::{decode_values, encode_values};
        let d = DgtTransportConfig {
            k: 1.0,
            rate_mbit: Some(1000.0),
            ..DgtTransportConfig::default()
        };
        let lo = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let net = geomx_net::NetOptions::default();
        let n = 3000;
        let server = bind_server(lo, &d, &[(0, n)], ValueType::F16, &net).unwrap();
        let link = connect(server.local_addr(), 1, &d, &net, Instant::now()).unwrap();
        let mut up = DgtUplink::new(&d, ValueType::F16).unwrap();
        let mut x: Vec<f32> = (0..n).map(|i| (i as f32 - 1500.0) * 0.0137).collect();
        x[7] = 1.0e6;
        let overflow = up.push(&link, 0, 0, x.clone()).unwrap();
        assert_eq!(overflow, 1);
        let got = server
            .recv_delivery(std::time::Duration::from_secs(20))
            .expect("delivered");
        let e = encode_values(
            &x,
            geomx_kernels::ValueType::F16,
            geomx_kernels::Scaling::None,
        );
        let want = decode_values(e.codec, &e.bytes, 0, n).unwrap();
        assert_eq!(e.overflow, 1);
        assert!(got.missing.is_empty());
        assert!(
            got.values
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "DGT fp16 values differ from the codec's"
        );
    }
}
