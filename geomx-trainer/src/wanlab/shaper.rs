//! Bandwidth, priority classes and random loss on one interface with `tc` (wan-lab.md).
//!
//! [`Shaper::commands`] is the pure part (the `tc` argument lists, unit-tested);
//! [`Shaper::apply`] runs them in a namespace. Layouts:
//! - rate only: `tbf rate R burst 64kb latency 50ms` as the root qdisc;
//! - with loss or DSCP classes: `htb` root (`r2q 100`), parent class `1:1 rate R ceil R`, data
//!   classes under it, the drop class `1:99` with a `pfifo limit 0` leaf, the loss filter (prio 1)
//!   and the DSCP filters (prio 2).

use super::netns::Netns;
use super::WanLabError;

/// Rate used for "unshaped" when an htb is needed anyway (loss on an unshaped link).
const UNSHAPED_MBIT: f64 = 100_000.0;
/// The class the loss filter sends packets to; its leaf drops everything.
pub const DROP_CLASS: &str = "1:99";
/// `ld rand` in classic BPF: `ld [SKF_AD_OFF + SKF_AD_RANDOM]` = −4096 + 56 as u32.
const LD_RAND: u32 = 4_294_963_256;

/// Which packets the loss filter may drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossScope {
    /// Every IP packet.
    All,
    /// UDP datagrams only (TCP sees no loss).
    Udp,
    /// Packets whose ToS byte (DSCP << 2) equals this value (ECN bits ignored).
    Tos(u8),
}

/// Random loss: a classic-BPF filter sending a fraction `p` of the packets in `scope` to the drop
/// class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossFilter {
    /// Drop probability in [0, 1].
    pub p: f64,
    /// Which packets.
    pub scope: LossScope,
}

impl LossFilter {
    /// The threshold T = round(p·2^32) (clamped to u32): a packet is dropped when the kernel's
    /// random u32 is ≤ T, i.e. with probability (T + 1)/2^32.
    pub fn threshold(&self) -> u32 {
        (self.p.clamp(0.0, 1.0) * 4_294_967_296.0)
            .round()
            .min(u32::MAX as f64) as u32
    }

    /// The filter program in `tc … bpf bytecode` form. Offsets start at the Ethernet header (veth
    /// egress): ToS at byte 15, IP protocol at byte 23.
    pub fn bytecode(&self) -> String {
        let t = self.threshold();
        // Tail: ld rand; jgt #T → no match; match (−1 = the filter's classid); no match (0).
        let tail = [
            format!("32 0 0 {LD_RAND}"),
            format!("37 1 0 {t}"),
            "6 0 0 4294967295".to_string(),
            "6 0 0 0".to_string(),
        ];
        let head: Vec<String> = match self.scope {
            LossScope::All => vec![],
            // ldb [23]; jeq #17 else jump to "no match" (3 ahead).
            LossScope::Udp => vec!["48 0 0 23".into(), "21 0 3 17".into()],
            // ldb [15]; and #0xfc; jeq #tos else no match.
            LossScope::Tos(tos) => vec![
                "48 0 0 15".into(),
                "84 0 0 252".into(),
                format!("21 0 3 {}", tos & 0xfc),
            ],
        };
        let prog: Vec<String> = head.into_iter().chain(tail).collect();
        format!("{},{}", prog.len(), prog.join(","))
    }
}

/// The qdisc configuration of one interface's egress.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Shaper {
    /// Rate in Mbit/s; `None` = unshaped.
    pub rate_mbit: Option<f64>,
    /// DGT priority classes for C unreliable channels (dgt.md: channel i has ToS (C − i)·32,
    /// the reliable TCP channel ToS C·32); `None` = no classes.
    pub dscp_channels: Option<u8>,
    /// Random loss.
    pub loss: Option<LossFilter>,
}

fn rate_arg(mbit: f64) -> String {
    // kbit keeps fractional Mbit/s exact enough.
    format!("{}kbit", (mbit * 1000.0).round().max(8.0) as u64)
}

fn args(line: &str, dev: &str) -> Vec<String> {
    line.replace("DEV", dev)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl Shaper {
    /// Whether the interface needs any qdisc at all.
    pub fn is_noop(&self) -> bool {
        self.rate_mbit.is_none() && self.dscp_channels.is_none() && self.loss.is_none()
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), WanLabError> {
        if let Some(r) = self.rate_mbit {
            if !(r.is_finite() && r > 0.0) {
                return Err(WanLabError::Invalid(format!(
                    "rate must be > 0 Mbit/s, got {r}"
                )));
            }
        }
        if let Some(c) = self.dscp_channels {
            if !(1..=7).contains(&c) {
                return Err(WanLabError::Invalid(format!(
                    "DSCP channels must be 1..=7, got {c}"
                )));
            }
        }
        if let Some(l) = self.loss {
            if !(0.0..=1.0).contains(&l.p) {
                return Err(WanLabError::Invalid(format!(
                    "loss must be in [0, 1], got {}",
                    l.p
                )));
            }
        }
        Ok(())
    }

    /// The `tc` argument lists that configure egress of `dev` (empty when there is nothing to do).
    pub fn commands(&self, dev: &str) -> Vec<Vec<String>> {
        if self.is_noop() {
            return Vec::new();
        }
        let rate = self.rate_mbit.unwrap_or(UNSHAPED_MBIT);
        let r = rate_arg(rate);
        if self.dscp_channels.is_none() && self.loss.is_none() {
            // Burst: 64 KB, or 2 ms worth at high rates.
            let burst = ((rate * 1e6 / 8.0 * 0.002) as u64).max(64 * 1024);
            return vec![args(
                &format!("qdisc add dev DEV root tbf rate {r} burst {burst} latency 50ms"),
                dev,
            )];
        }
        let mut out: Vec<Vec<String>> = Vec::new();
        let add = |out: &mut Vec<Vec<String>>, l: String| out.push(args(&l, dev));
        let channels = self.dscp_channels.unwrap_or(0) as u32;
        // Data classes: with DSCP, 1:10 reliable … 1:(10+C) best effort (default); else 1:10 only.
        let default = 10 + channels;
        add(
            &mut out,
            format!("qdisc add dev DEV root handle 1: htb default {default} r2q 100"),
        );
        add(
            &mut out,
            format!("class add dev DEV parent 1: classid 1:1 htb rate {r} ceil {r}"),
        );
        if channels == 0 {
            add(
                &mut out,
                format!("class add dev DEV parent 1:1 classid 1:10 htb rate {r} ceil {r}"),
            );
        } else {
            let reliable = rate_arg(rate * 0.94);
            add(
                &mut out,
                format!(
                    "class add dev DEV parent 1:1 classid 1:10 htb rate {reliable} ceil {r} prio 0"
                ),
            );
            for i in 1..=channels {
                add(
                    &mut out,
                    format!(
                        "class add dev DEV parent 1:1 classid 1:{} htb rate 1mbit ceil {r} prio {}",
                        10 + i,
                        i.min(7)
                    ),
                );
            }
            for i in 0..=channels {
                add(
                    &mut out,
                    format!(
                        "qdisc add dev DEV parent 1:{} handle {}: pfifo limit 200",
                        10 + i,
                        10 + i
                    ),
                );
            }
        }
        if let Some(l) = self.loss {
            add(
                &mut out,
                format!(
                    "class add dev DEV parent 1:1 classid {DROP_CLASS} htb rate 1mbit ceil {r}"
                ),
            );
            add(
                &mut out,
                "qdisc add dev DEV parent 1:99 handle 99: pfifo limit 0".into(),
            );
            // The program is one argument (it contains spaces).
            let mut f = args(
                "filter add dev DEV parent 1: protocol ip prio 1 bpf bytecode",
                dev,
            );
            f.push(l.bytecode());
            f.extend(args(&format!("classid {DROP_CLASS}"), dev));
            out.push(f);
        }
        if channels > 0 {
            // Reliable channel: ToS C·32, and any TCP; channel i: ToS (C − i)·32.
            for i in 0..channels {
                add(&mut out, format!(
                    "filter add dev DEV parent 1: protocol ip prio 2 u32 match ip dsfield {:#x} 0xfc flowid 1:{}",
                    (channels - i) * 32,
                    10 + i
                ));
            }
            add(&mut out, "filter add dev DEV parent 1: protocol ip prio 3 u32 match ip protocol 6 0xff flowid 1:10".into());
        }
        out
    }

    /// Configures egress of `dev` in namespace `ns`.
    pub fn apply(&self, ns: &Netns, dev: &str) -> Result<(), WanLabError> {
        self.validate()?;
        for c in self.commands(dev) {
            ns.tc(&c)?;
        }
        Ok(())
    }
}

/// The `tc` argument lists that shape the traffic *entering* the delay relay: on the TUN device's
/// egress (where the router queues packets for the relay to read), one htb class per shaped link
/// `(i, rate)` for packets destined to that link's `/24`, with a FIFO of 50 ms at that rate (as the
/// link's own `tbf … latency 50ms`); everything else passes unshaped.
///
/// A link's downlink is also shaped after the relay (its router-side veth). Shaping before the
/// delay as well changes no packet's timing (a constant delay and a FIFO rate limiter commute),
/// but it keeps bursts from unshaped senders (the central site) from reaching the relay at
/// gigabit rates only to be queued or dropped behind the link's shaper: the relay's work per
/// second is then bounded by the links' rates.
pub fn relay_ingress_commands(tun: &str, links: &[(usize, f64)]) -> Vec<Vec<String>> {
    if links.is_empty() {
        return Vec::new();
    }
    let mut out = vec![args(
        "qdisc add dev DEV root handle 1: htb default 0 r2q 100",
        tun,
    )];
    for &(i, rate) in links {
        let (r, class) = (rate_arg(rate), 0x10 + i);
        let limit = ((rate * 1e6 / 8.0 * 0.05 / 1500.0) as u64).max(100);
        out.push(args(
            &format!("class add dev DEV parent 1: classid 1:{class:x} htb rate {r} ceil {r}"),
            tun,
        ));
        out.push(args(
            &format!("qdisc add dev DEV parent 1:{class:x} handle {class:x}: pfifo limit {limit}"),
            tun,
        ));
        out.push(args(
            &format!(
                "filter add dev DEV parent 1: protocol ip prio 1 u32 match ip dst 198.18.{i}.0/24 flowid 1:{class:x}"
            ),
            tun,
        ));
    }
    out
}

/// `tc -s class show dev <dev>` in `ns` (the lab's qdisc drop counters).
pub fn class_stats(ns: &Netns, dev: &str) -> Result<String, WanLabError> {
    ns.tc(&args("-s class show dev DEV", dev))
}

/// `tc -s qdisc show dev <dev>` in `ns` (sent bytes and packets, drops, overlimits per qdisc).
pub fn qdisc_stats(ns: &Netns, dev: &str) -> Result<String, WanLabError> {
    ns.tc(&args("-s qdisc show dev DEV", dev))
}

/// Packets dropped by the leaf qdisc of the drop class on `dev` (0 when there is none).
pub fn class_drops(ns: &Netns, dev: &str) -> Result<u64, WanLabError> {
    let out = ns.tc(&args("-s qdisc show dev DEV", dev))?;
    Ok(parse_qdisc_drops(&out, "99:"))
}

/// The `dropped` counter of the qdisc with `handle` in `tc -s qdisc show` output.
pub fn parse_qdisc_drops(out: &str, handle: &str) -> u64 {
    let mut in_it = false;
    for line in out.lines() {
        if line.starts_with("qdisc ") {
            in_it = line.split_whitespace().nth(2) == Some(handle);
        } else if in_it {
            if let Some(rest) = line.split("dropped ").nth(1) {
                return rest
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent interpreter of the classic-BPF subset the filter uses.
    fn interpret(code: &str, packet: &[u8], rand: u32) -> u32 {
        let mut it = code.split(',');
        let n: usize = it.next().unwrap().parse().unwrap();
        let prog: Vec<[u32; 4]> = it
            .map(|ins| {
                let v: Vec<u32> = ins.split(' ').map(|x| x.parse().unwrap()).collect();
                [v[0], v[1], v[2], v[3]]
            })
            .collect();
        assert_eq!(prog.len(), n);
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let [op, jt, jf, k] = prog[pc];
            pc += 1;
            match op {
                0x20 if k == LD_RAND => a = rand,
                0x30 => a = packet[k as usize] as u32,
                0x54 => a &= k,
                0x15 => pc += if a == k { jt } else { jf } as usize,
                0x25 => pc += if a > k { jt } else { jf } as usize,
                0x06 => return k,
                _ => panic!("opcode {op}"),
            }
        }
    }

    fn packet(tos: u8, proto: u8) -> Vec<u8> {
        let mut p = vec![0u8; 64];
        p[14] = 0x45;
        p[15] = tos;
        p[23] = proto;
        p
    }

    #[test]
    fn loss_filter_matches_the_specs_bytecode() {
        let f = LossFilter {
            p: 0.1,
            scope: LossScope::Udp,
        };
        assert_eq!(f.threshold(), 429_496_730);
        assert_eq!(
            f.bytecode(),
            "6,48 0 0 23,21 0 3 17,32 0 0 4294963256,37 1 0 429496730,6 0 0 4294967295,6 0 0 0"
        );
        let all = LossFilter {
            p: 0.1,
            scope: LossScope::All,
        };
        assert_eq!(
            all.bytecode(),
            "4,32 0 0 4294963256,37 1 0 429496730,6 0 0 4294967295,6 0 0 0"
        );
    }

    #[test]
    fn loss_filter_drops_the_right_packets_with_the_right_probability() {
        let cases = [
            (LossScope::All, packet(0, 6), true),
            (LossScope::Udp, packet(0, 17), true),
            (LossScope::Udp, packet(0, 6), false),
            (LossScope::Tos(0x40), packet(0x41, 17), true),
            (LossScope::Tos(0x40), packet(0x20, 17), false),
        ];
        for p in [0.0, 0.1, 0.5, 1.0] {
            let f = |scope| LossFilter { p, scope };
            for (scope, pkt, eligible) in &cases {
                let code = f(*scope).bytecode();
                // Fraction of the rand range that matches: sample it on a fine grid.
                let grid = 10_000u64;
                let hits = (0..grid)
                    .filter(|i| {
                        let r = (i * (u32::MAX as u64) / (grid - 1)) as u32;
                        interpret(&code, pkt, r) == u32::MAX
                    })
                    .count() as f64
                    / grid as f64;
                let want = if *eligible { p } else { 0.0 };
                assert!(
                    (hits - want).abs() <= 1.5 / grid as f64,
                    "{scope:?} p={p}: {hits}"
                );
            }
        }
    }

    #[test]
    fn plain_rate_is_one_tbf() {
        let s = Shaper {
            rate_mbit: Some(100.0),
            ..Default::default()
        };
        assert_eq!(
            s.commands("v0"),
            vec![args(
                "qdisc add dev v0 root tbf rate 100000kbit burst 65536 latency 50ms",
                "v0"
            )]
        );
        assert!(Shaper::default().commands("v0").is_empty());
    }

    #[test]
    fn dscp_classes_and_loss_use_htb_with_filters_in_order() {
        let s = Shaper {
            rate_mbit: Some(50.0),
            dscp_channels: Some(3),
            loss: Some(LossFilter {
                p: 0.05,
                scope: LossScope::Udp,
            }),
        };
        let c: Vec<String> = s.commands("X").iter().map(|a| a.join(" ")).collect();
        assert_eq!(
            c[0],
            "qdisc add dev X root handle 1: htb default 13 r2q 100"
        );
        assert!(c.contains(
            &"class add dev X parent 1:1 classid 1:10 htb rate 47000kbit ceil 50000kbit prio 0"
                .to_string()
        ));
        assert!(c.contains(
            &"class add dev X parent 1:1 classid 1:13 htb rate 1mbit ceil 50000kbit prio 3"
                .to_string()
        ));
        assert!(c.contains(&"qdisc add dev X parent 1:99 handle 99: pfifo limit 0".to_string()));
        let f: Vec<&String> = c.iter().filter(|l| l.starts_with("filter")).collect();
        assert!(f[0].contains("prio 1 bpf"), "{}", f[0]);
        assert!(f[1].ends_with("dsfield 0x60 0xfc flowid 1:10"), "{}", f[1]);
        assert!(f[2].ends_with("dsfield 0x40 0xfc flowid 1:11"), "{}", f[2]);
        assert!(f[3].ends_with("dsfield 0x20 0xfc flowid 1:12"), "{}", f[3]);
        assert!(f[4].ends_with("protocol 6 0xff flowid 1:10"), "{}", f[4]);
        assert!(Shaper {
            dscp_channels: Some(8),
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn qdisc_drops_parse() {
        let out = "qdisc htb 1: root refcnt 2 r2q 100 default 0x10\n Sent 1 bytes 1 pkt (dropped 5, overlimits 0 requeues 0)\nqdisc pfifo 99: parent 1:99 limit 0p\n Sent 0 bytes 0 pkt (dropped 1958, overlimits 0 requeues 0)\n";
        assert_eq!(parse_qdisc_drops(out, "99:"), 1958);
        assert_eq!(parse_qdisc_drops(out, "1:"), 5);
        assert_eq!(parse_qdisc_drops(out, "7:"), 0);
    }

    #[test]
    fn relay_ingress_gets_one_class_per_shaped_destination() {
        assert!(relay_ingress_commands("gxt-t", &[]).is_empty());
        let c: Vec<String> = relay_ingress_commands("gxt-t", &[(1, 100.0), (2, 10.0)])
            .iter()
            .map(|a| a.join(" "))
            .collect();
        assert_eq!(
            c,
            [
                "qdisc add dev gxt-t root handle 1: htb default 0 r2q 100",
                "class add dev gxt-t parent 1: classid 1:11 htb rate 100000kbit ceil 100000kbit",
                "qdisc add dev gxt-t parent 1:11 handle 11: pfifo limit 416",
                "filter add dev gxt-t parent 1: protocol ip prio 1 u32 match ip dst 198.18.1.0/24 flowid 1:11",
                "class add dev gxt-t parent 1: classid 1:12 htb rate 10000kbit ceil 10000kbit",
                "qdisc add dev gxt-t parent 1:12 handle 12: pfifo limit 100",
                "filter add dev gxt-t parent 1: protocol ip prio 1 u32 match ip dst 198.18.2.0/24 flowid 1:12",
            ]
        );
    }
}
