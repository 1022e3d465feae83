//! The lab: namespaces, links, shaping, loss and delay behind one guard.

use std::net::Ipv4Addr;

use super::delay::DelayStats;
use super::guard;
use super::naming::{link_addr, Tag, IFNAMSIZ_MAX, MAX_LINKS};
use super::netns::{probe_root, sweep_stale, Netns};
use super::rules::{Direction, RuleSocket};
use super::shaper::{
    class_drops, class_stats, qdisc_stats, relay_ingress_commands, LossFilter, Shaper,
};
use super::tun::TunRelay;
use super::WanLabError;

/// Routing table the router namespace uses to send link traffic into the TUN device.
const RELAY_TABLE: &str = "100";

/// One WAN link: between a site's namespace and the router.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSpec {
    /// Name of the site (for messages and figures).
    pub name: String,
    /// Bandwidth each way in Mbit/s; `None` = unshaped.
    pub rate_mbit: Option<f64>,
    /// One-way delay in milliseconds (added by the relay).
    pub delay_ms: f64,
    /// Random loss, each way.
    pub loss: Option<LossFilter>,
    /// DGT priority classes on the site's uplink (see [`Shaper::dscp_channels`]).
    pub dscp_channels: Option<u8>,
}

impl LinkSpec {
    /// An unshaped link without delay or loss.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            rate_mbit: None,
            delay_ms: 0.0,
            loss: None,
            dscp_channels: None,
        }
    }

    /// The shaper of the site's uplink (egress of its veth in the site namespace).
    pub fn uplink(&self) -> Shaper {
        Shaper {
            rate_mbit: self.rate_mbit,
            dscp_channels: self.dscp_channels,
            loss: self.loss,
        }
    }

    /// The shaper of the site's downlink (egress of the router's veth towards the site).
    pub fn downlink(&self) -> Shaper {
        Shaper {
            rate_mbit: self.rate_mbit,
            dscp_channels: None,
            loss: self.loss,
        }
    }
}

/// The topology: link 0 is the central data center's, links 1.. the other sites'.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LabSpec {
    /// The links in order.
    pub links: Vec<LinkSpec>,
    /// Let the CPUs idle while the delay relay waits (no [`KeepAwake`] spinners). Only for
    /// measuring what the spinners are worth: idle CPUs wake late on virtual machines.
    ///
    /// [`KeepAwake`]: super::awake::KeepAwake
    pub allow_cpu_idle: bool,
}

impl LabSpec {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), WanLabError> {
        if self.links.is_empty() || self.links.len() > MAX_LINKS - 1 {
            return Err(WanLabError::Invalid(format!(
                "a lab needs 1..{} links, got {}",
                MAX_LINKS - 1,
                self.links.len()
            )));
        }
        for l in &self.links {
            if !(l.delay_ms.is_finite() && l.delay_ms >= 0.0) {
                return Err(WanLabError::Invalid(format!(
                    "link {}: delay must be >= 0 ms, got {}",
                    l.name, l.delay_ms
                )));
            }
            l.uplink().validate()?;
        }
        Ok(())
    }
}

/// A built lab. It is the guard of what it made: dropping it kills the adopted processes and
/// deletes its namespaces (as does SIGINT/SIGTERM while it lives).
pub struct Lab {
    tag: Tag,
    id: u64,
    wan: Netns,
    nodes: Vec<Netns>,
    spec: LabSpec,
    relay: Option<TunRelay>,
    /// The router namespace's rtnetlink socket (link cuts).
    rules: Option<RuleSocket>,
}

impl Lab {
    /// Builds the lab `spec` describes: probes for root, sweeps stale namespaces of dead runs,
    /// then creates everything under a fresh tag. On error, what was made is removed.
    pub fn build(spec: LabSpec) -> Result<Self, WanLabError> {
        spec.validate()?;
        probe_root()?;
        match sweep_stale() {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(?gone, "removed stale lab namespaces");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "stale lab sweep failed"),
        }
        let tag = Tag::next_for_this_process();
        if tag.node_if(spec.links.len()).len() > IFNAMSIZ_MAX {
            return Err(WanLabError::Invalid(format!(
                "interface names of tag {} would exceed {IFNAMSIZ_MAX} bytes",
                tag.as_str()
            )));
        }
        let mut names = vec![tag.wan_ns()];
        names.extend((0..spec.links.len()).map(|i| tag.node_ns(i)));
        let id = guard::register(names);
        let mut lab = Self {
            wan: Netns::existing(&tag.wan_ns()),
            tag,
            id,
            nodes: Vec::new(),
            spec,
            relay: None,
            rules: None,
        };
        lab.make()?; // on error, Drop removes the partial lab
        Ok(lab)
    }

    fn make(&mut self) -> Result<(), WanLabError> {
        let t = self.tag.clone();
        self.wan = Netns::create(&t.wan_ns())?;
        let wan = self.wan.clone();
        self.rules = Some(RuleSocket::open(&wan)?);
        wan.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ])?;
        let delayed = self.spec.links.iter().any(|l| l.delay_ms > 0.0);
        for (i, l) in self.spec.links.iter().enumerate() {
            let node = Netns::create(&t.node_ns(i))?;
            self.nodes.push(node.clone());
            let (nif, wif) = (t.node_if(i), t.wan_if(i));
            let node_addr = format!("{}/24", link_addr(i, true));
            let wan_addr = format!("{}/24", link_addr(i, false));
            let gw = link_addr(i, false).to_string();
            wan.ip(&[
                "link",
                "add",
                &wif,
                "type",
                "veth",
                "peer",
                "name",
                &nif,
                "netns",
                node.name(),
            ])?;
            wan.ip(&["addr", "add", &wan_addr, "dev", &wif])?;
            wan.ip(&["link", "set", &wif, "mtu", "1500", "up"])?;
            node.ip(&["addr", "add", &node_addr, "dev", &nif])?;
            node.ip(&["link", "set", &nif, "mtu", "1500", "up"])?;
            node.ip(&["route", "add", "default", "via", &gw])?;
            if delayed {
                wan.ip(&["rule", "add", "iif", &wif, "lookup", RELAY_TABLE])?;
            }
            l.uplink().apply(&node, &nif)?;
            l.downlink().apply(&wan, &wif)?;
        }
        if delayed {
            let tun = t.tun_if();
            wan.ip(&["tuntap", "add", "mode", "tun", "dev", &tun])?;
            wan.ip(&["link", "set", &tun, "mtu", "1500", "up"])?;
            wan.sysctl(&[&format!("net.ipv4.conf.{tun}.rp_filter=0")])?;
            wan.ip(&["route", "add", "default", "dev", &tun, "table", RELAY_TABLE])?;
            let shaped: Vec<(usize, f64)> = self
                .spec
                .links
                .iter()
                .enumerate()
                .filter_map(|(i, l)| l.rate_mbit.map(|r| (i, r)))
                .collect();
            for c in relay_ingress_commands(&tun, &shaped) {
                wan.tc(&c)?;
            }
            let delays = self
                .spec
                .links
                .iter()
                .map(|l| (l.delay_ms * 1e6).round() as u64)
                .collect();
            self.relay = Some(TunRelay::start(
                &wan,
                &tun,
                delays,
                !self.spec.allow_cpu_idle,
            )?);
        }
        tracing::info!(tag = %t.as_str(), links = self.spec.links.len(), "WAN lab up");
        Ok(())
    }

    /// The lab's tag.
    pub fn tag(&self) -> &Tag {
        &self.tag
    }

    /// What every name of this lab starts with (`gx<tag>`).
    pub fn prefix(&self) -> String {
        self.tag.prefix()
    }

    /// The description it was built from.
    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// The router namespace.
    pub fn wan(&self) -> &Netns {
        &self.wan
    }

    /// The namespace behind link `i` (0 = central).
    pub fn node(&self, i: usize) -> &Netns {
        &self.nodes[i]
    }

    /// The address of the namespace behind link `i` (`198.18.i.2`).
    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        link_addr(i, true)
    }

    /// The site-side interface of link `i` (its uplink qdisc).
    pub fn node_if(&self, i: usize) -> String {
        self.tag.node_if(i)
    }

    /// The router-side interface of link `i` (its downlink qdisc).
    pub fn wan_if(&self, i: usize) -> String {
        self.tag.wan_if(i)
    }

    /// Makes the guard kill process `pid` before deleting the namespaces.
    pub fn adopt_pid(&self, pid: u32) {
        guard::adopt_pid(self.id, pid);
    }

    /// Cuts link `i` (`true`) or restores it (`false`): while cut, the router discards every
    /// packet from or to the site behind it, as a partitioned WAN would (silently: no ICMP, no
    /// reset, so peers learn of it only through their timeouts). Two policy rules ahead of
    /// every other (`blackhole`, priority 1) do it, whatever the link's shaping and delay;
    /// connections survive a cut that ends before their peers give up. Idempotent; set over
    /// rtnetlink ([`RuleSocket`]), so it takes effect at once even on a busy machine.
    pub fn cut(&self, i: usize, on: bool) -> Result<(), WanLabError> {
        let addr = self.node_addr(i);
        let rules = self
            .rules
            .as_ref()
            .ok_or_else(|| WanLabError::Invalid("the lab has no router".into()))?;
        for dir in [Direction::From, Direction::To] {
            rules.blackhole(dir, addr, 1, on)?;
        }
        tracing::info!(link = i, cut = on, "WAN lab link state");
        Ok(())
    }

    /// The delay relay's counters (default when no link has a delay).
    pub fn relay_stats(&self) -> DelayStats {
        self.relay.as_ref().map(TunRelay::stats).unwrap_or_default()
    }

    /// Packets the loss filter dropped on link `i`: (uplink, downlink).
    pub fn loss_drops(&self, i: usize) -> Result<(u64, u64), WanLabError> {
        Ok((
            class_drops(&self.nodes[i], &self.node_if(i))?,
            class_drops(&self.wan, &self.wan_if(i))?,
        ))
    }

    /// `tc -s qdisc show` of every shaped interface, labelled.
    pub fn qdisc_stats(&self) -> String {
        self.per_interface(qdisc_stats)
    }

    /// `tc -s class show` of every shaped interface, labelled.
    pub fn class_stats(&self) -> String {
        self.per_interface(class_stats)
    }

    fn per_interface(&self, show: fn(&Netns, &str) -> Result<String, WanLabError>) -> String {
        let mut out = String::new();
        for (i, l) in self.spec.links.iter().enumerate() {
            for (ns, dev) in [
                (&self.nodes[i], self.node_if(i)),
                (&self.wan, self.wan_if(i)),
            ] {
                if let Ok(s) = show(ns, &dev) {
                    if !s.trim().is_empty() {
                        out.push_str(&format!("# {} {dev}\n{s}", l.name));
                    }
                }
            }
        }
        out
    }

    /// Stops the relay and removes everything now (also what [`Drop`] does).
    pub fn teardown(mut self) -> Option<DelayStats> {
        let stats = self.relay.take().map(TunRelay::stop);
        guard::teardown(self.id);
        stats
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop();
        }
        guard::teardown(self.id);
    }
}
