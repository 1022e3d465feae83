//! The emulated WAN of `geomx launch` (`[wan]`, wan-lab.md).
//!
//! - `netns`: a [`Lab`] with one namespace per site (link 0 = the central DC: coordinator, global
//!   servers and any data center whose site is `cluster.central_dc`). Every process of a site
//!   starts inside its namespace and binds the site's address `198.18.i.2`: workers reach their
//!   local server over that namespace's loopback (unshaped LAN), the local server reaches the
//!   central DC through the shaped, delayed WAN path.
//! - `relay`: everything on loopback; per site, userspace L4 relays in front of the coordinator
//!   and each global server (pre-assigned ports). The site's processes get the coordinator's relay
//!   as `--coordinator` and the global servers' relays through
//!   [`crate::hips::node::WAN_ROUTES_ENV`].
//! - `auto`: `netns` when namespaces can be created, else `relay`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use super::LaunchError;
use crate::config::{Config, LinkFigures, Site, WanLossScope, WanMode};
use crate::hips::node::WAN_ROUTES_ENV;
use crate::wanlab::relay::{self, L4Relay, RelayParams};
use crate::wanlab::{probe_root, Lab, LabSpec, LinkSpec, LossFilter, LossScope, WanLabError};

/// Report names of the modes.
pub mod modes {
    /// No emulation.
    pub const OFF: &str = "off";
    /// Namespaces, shaping, loss, TUN delay relay.
    pub const NETNS: &str = "netns";
    /// Userspace L4 relays on loopback.
    pub const RELAY: &str = "userspace-relay";
}

/// The lab description of a configuration: one link per site, link 0 the central DC's.
pub fn lab_spec(cfg: &Config) -> LabSpec {
    let links = cfg
        .wan_sites()
        .iter()
        .map(|s| {
            let f = cfg.wan_link(s);
            let scope = match cfg.wan.loss_scope {
                WanLossScope::All => LossScope::All,
                WanLossScope::Udp => LossScope::Udp,
            };
            LinkSpec {
                name: s.name.clone(),
                rate_mbit: f.rate_mbit,
                delay_ms: f.delay_ms,
                loss: (f.loss > 0.0).then_some(LossFilter { p: f.loss, scope }),
                dscp_channels: if s.central {
                    None
                } else {
                    cfg.wan.dscp_channels
                },
            }
        })
        .collect();
    LabSpec {
        links,
        ..LabSpec::default()
    }
}

/// The relay between a site and the central DC: rates in series (the smaller), delays and
/// losses added.
pub fn relay_params(site: &LinkFigures, central: &LinkFigures, seed: u64) -> RelayParams {
    let rate_mbit = match (site.rate_mbit, central.rate_mbit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    RelayParams {
        rate_mbit,
        delay_ms: site.delay_ms + central.delay_ms,
        loss: (site.loss + central.loss).min(0.99),
        seed,
    }
}

/// A free loopback port for a global server to bind (below the ephemeral range, so that no
/// outgoing connection takes it before the server binds it).
fn free_port() -> Result<u16, LaunchError> {
    geomx_net::port::free_loopback_port()
        .map_err(|e| LaunchError::Io("picking a port for a global server".into(), e))
}

fn lab_err(e: WanLabError) -> LaunchError {
    LaunchError::Io("WAN lab".into(), std::io::Error::other(e.to_string()))
}

/// The WAN of one launch; tears down on drop.
pub struct Wan {
    mode: &'static str,
    lab: Option<Lab>,
    relays: Vec<L4Relay>,
    /// Relay mode: the site of each relay.
    relay_site: Vec<usize>,
    sites: Vec<Site>,
    figures: Vec<LinkFigures>,
    /// Site index of each data center.
    dc_site: Vec<usize>,
    /// Relay mode: the coordinator's relay of each site (`None` for the central site).
    coord_relay: Vec<Option<String>>,
    /// Relay mode: the routes text of each site.
    routes: Vec<String>,
}

impl Wan {
    /// Resolves the mode and prepares it: builds the lab (netns) or pre-assigns the global
    /// servers' ports in `cfg` (relay). Per-role addresses of the topology are dropped in
    /// `netns` mode (every process binds its site's address).
    pub fn prepare(cfg: &mut Config, quiet: bool) -> Result<Self, LaunchError> {
        let sites = cfg.wan_sites();
        let figures: Vec<LinkFigures> = sites.iter().map(|s| cfg.wan_link(s)).collect();
        let mut dc_site = vec![0; cfg.cluster.data_centers.len()];
        for (i, s) in sites.iter().enumerate() {
            for &d in &s.dcs {
                dc_site[d] = i;
            }
        }
        let mode = match cfg.wan.mode {
            WanMode::Off => modes::OFF,
            WanMode::Netns => modes::NETNS,
            WanMode::Relay => modes::RELAY,
            WanMode::Auto => match probe_root() {
                Ok(()) => modes::NETNS,
                Err(e) => {
                    eprintln!("geomx: {e}; using the userspace relay on loopback instead");
                    modes::RELAY
                }
            },
        };
        let mut wan = Self {
            mode,
            lab: None,
            relays: Vec::new(),
            relay_site: Vec::new(),
            sites,
            figures,
            dc_site,
            coord_relay: Vec::new(),
            routes: Vec::new(),
        };
        match mode {
            modes::NETNS => {
                cfg.cluster.coordinator = None;
                cfg.cluster.global_server_addrs.clear();
                for d in &mut cfg.cluster.data_centers {
                    d.local_server = None;
                    d.worker_addrs.clear();
                }
                let lab = Lab::build(lab_spec(cfg)).map_err(lab_err)?;
                if !quiet {
                    eprintln!(
                        "geomx: WAN lab {} up: {}",
                        lab.prefix(),
                        wan.describe_links()
                    );
                }
                wan.lab = Some(lab);
            }
            modes::RELAY => {
                cfg.cluster.global_server_addrs = (0..cfg.cluster.global_servers)
                    .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
                    .collect::<Result<_, _>>()?;
                if !quiet {
                    eprintln!(
                        "geomx: userspace WAN relays on loopback: {}",
                        wan.describe_links()
                    );
                }
            }
            _ => {}
        }
        Ok(wan)
    }

    fn describe_links(&self) -> String {
        self.sites
            .iter()
            .zip(&self.figures)
            .map(|(s, f)| {
                format!(
                    "{} {} / {} ms / loss {}",
                    s.name,
                    f.rate_mbit
                        .map_or("unshaped".to_string(), |r| format!("{r} Mbit/s")),
                    f.delay_ms,
                    f.loss
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The report's name of the mode that ran.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Site index of data center `dc` (`None` = the central DC's processes).
    fn site(&self, dc: Option<usize>) -> usize {
        dc.map_or(0, |d| self.dc_site.get(d).copied().unwrap_or(0))
    }

    /// Where the coordinator binds (`None` = the launcher's default).
    pub fn coordinator_bind(&self, base_port: u16) -> Option<String> {
        self.lab
            .as_ref()
            .map(|l| format!("{}:{base_port}", l.node_addr(0)))
    }

    /// The command that starts `exe` for a process of data center `dc` (`None` = central).
    pub fn command(&self, exe: &Path, dc: Option<usize>) -> Result<Command, LaunchError> {
        let site = self.site(dc);
        match &self.lab {
            Some(l) => l.node(site).command(exe).map_err(lab_err),
            None => {
                let mut c = Command::new(exe);
                if let Some(r) = self.routes.get(site).filter(|r| !r.is_empty()) {
                    c.env(WAN_ROUTES_ENV, r);
                }
                Ok(c)
            }
        }
    }

    /// The `--bind` host of a process of data center `dc` (`None` = central).
    pub fn bind_host(&self, dc: Option<usize>) -> Option<String> {
        self.lab
            .as_ref()
            .map(|l| l.node_addr(self.site(dc)).to_string())
    }

    /// The coordinator address a process of data center `dc` registers with.
    pub fn coordinator_for(&self, dc: Option<usize>, coord: &str) -> String {
        self.coord_relay
            .get(self.site(dc))
            .cloned()
            .flatten()
            .unwrap_or_else(|| coord.to_string())
    }

    /// Relay mode, once the coordinator's address is known: starts each site's relays (to the
    /// coordinator and to every global server) and the routes its processes use.
    pub fn start_relays(
        &mut self,
        coord: &str,
        global_servers: &[String],
    ) -> Result<(), LaunchError> {
        if self.mode != modes::RELAY {
            return Ok(());
        }
        let parse = |a: &str| {
            a.parse::<SocketAddr>().map_err(|e| {
                LaunchError::Io(
                    format!("relay target {a}"),
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                )
            })
        };
        let central = self.figures[0];
        for (i, s) in self.sites.iter().enumerate() {
            if s.central {
                self.coord_relay.push(None);
                self.routes.push(String::new());
                continue;
            }
            let p = relay_params(&self.figures[i], &central, i as u64);
            let r = relay::tcp("127.0.0.1:0", parse(coord)?, p).map_err(lab_err)?;
            self.coord_relay.push(Some(r.local_addr().to_string()));
            self.relays.push(r);
            self.relay_site.push(i);
            let mut routes = Vec::new();
            for g in global_servers {
                let r = relay::tcp("127.0.0.1:0", parse(g)?, p).map_err(lab_err)?;
                routes.push(format!("{g}={}", r.local_addr()));
                self.relays.push(r);
                self.relay_site.push(i);
            }
            self.routes.push(routes.join(","));
        }
        Ok(())
    }

    /// Whether the WAN link of data center `dc` can be cut: there is a WAN, and `dc` is not in
    /// the central DC's site (whose link every other site reaches the servers through).
    pub fn cuttable(&self, dc: usize) -> Result<(), String> {
        if self.mode == modes::OFF {
            return Err("cutting a link needs the WAN lab ([wan] mode)".into());
        }
        if self
            .sites
            .get(self.site(Some(dc)))
            .is_none_or(|s| s.central)
        {
            return Err(format!(
                "dc {dc} is in the central DC's site; only another site's link can be cut"
            ));
        }
        Ok(())
    }

    /// Cuts (`true`) or restores (`false`) the WAN link of data center `dc`'s site: every packet
    /// from or to the site is dropped in `netns` mode, its relays pass nothing in `relay` mode.
    pub fn cut(&self, dc: usize, on: bool) -> Result<(), LaunchError> {
        let site = self.site(Some(dc));
        if let Some(l) = &self.lab {
            l.cut(site, on).map_err(lab_err)?;
        }
        for (r, _) in self
            .relays
            .iter()
            .zip(&self.relay_site)
            .filter(|(_, &s)| s == site)
        {
            r.set_cut(on);
        }
        Ok(())
    }

    /// Makes the lab's guard kill `pid` before removing the namespaces.
    pub fn adopt(&self, pid: u32) {
        if let Some(l) = &self.lab {
            l.adopt_pid(pid);
        }
    }

    /// The lab's figures for the report: links, relay counters, loss-filter drops.
    pub fn figures(&self) -> serde_json::Value {
        let links: Vec<serde_json::Value> = self
            .sites
            .iter()
            .zip(&self.figures)
            .enumerate()
            .map(|(i, (s, f))| {
                let mut v = serde_json::json!({
                    "site": s.name,
                    "central": s.central,
                    "data_centers": s.dcs,
                    "rate_mbit": f.rate_mbit,
                    "delay_ms": f.delay_ms,
                    "loss": f.loss,
                });
                if let Some(l) = &self.lab {
                    if let Ok((up, down)) = l.loss_drops(i) {
                        v["loss_drops_up"] = up.into();
                        v["loss_drops_down"] = down.into();
                    }
                }
                v
            })
            .collect();
        let mut out = serde_json::json!({ "mode": self.mode, "links": links });
        if let Some(l) = &self.lab {
            let st = l.relay_stats();
            out["prefix"] = l.prefix().into();
            let mut relay = serde_json::to_value(st.lateness()).unwrap_or_default();
            relay["bytes"] = st.bytes.into();
            relay["rejected"] = st.rejected.into();
            relay["max_queue"] = st.max_queue.into();
            out["delay_relay"] = relay;
            out["qdisc_stats"] = l.qdisc_stats().into();
        }
        if !self.relays.is_empty() {
            use std::sync::atomic::Ordering::Relaxed;
            let bytes: u64 = self
                .relays
                .iter()
                .map(|r| r.counters().bytes.load(Relaxed))
                .sum();
            let conns: u64 = self
                .relays
                .iter()
                .map(|r| r.counters().connections.load(Relaxed))
                .sum();
            out["l4_relays"] = serde_json::json!({
                "relays": self.relays.len(),
                "connections": conns,
                "bytes": bytes,
            });
        }
        out
    }
}

/// `geomx wan-lab --hold`: builds the lab of `cfg`, prints `GEOMX_LAB <prefix>` and waits until a
/// signal ends the process (the guard then tears the lab down). For tests of the clean-up.
pub fn hold(cfg: &Config) -> Result<(), LaunchError> {
    let lab = Lab::build(lab_spec(cfg)).map_err(lab_err)?;
    println!("GEOMX_LAB {}", lab.prefix());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_spec_has_the_central_link_first_and_site_figures() {
        let cfg = Config::from_toml_str(
            "[wan]\nmode = \"netns\"\nloss = 0.02\nloss_scope = \"udp\"\ndscp_channels = 3\n\
             [[wan.sites]]\nname = \"dc1\"\ndelay_ms = 10.0",
        )
        .unwrap();
        let s = lab_spec(&cfg);
        let names: Vec<&str> = s.links.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["central", "dc0", "dc1"]);
        assert_eq!(s.links[0].rate_mbit, None);
        assert_eq!(s.links[0].loss, None);
        assert_eq!(s.links[0].dscp_channels, None);
        assert_eq!(s.links[1].rate_mbit, Some(100.0));
        assert_eq!(s.links[1].delay_ms, 50.0);
        assert_eq!(s.links[2].delay_ms, 10.0);
        assert_eq!(
            s.links[2].loss,
            Some(LossFilter {
                p: 0.02,
                scope: LossScope::Udp
            })
        );
        assert_eq!(s.links[2].dscp_channels, Some(3));
    }

    #[test]
    fn relay_params_put_the_links_in_series() {
        let site = LinkFigures {
            rate_mbit: Some(100.0),
            delay_ms: 50.0,
            loss: 0.01,
        };
        let central = LinkFigures {
            rate_mbit: Some(40.0),
            delay_ms: 5.0,
            loss: 0.0,
        };
        let p = relay_params(&site, &central, 1);
        assert_eq!(p.rate_mbit, Some(40.0));
        assert_eq!(p.delay_ms, 55.0);
        assert_eq!(p.loss, 0.01);
        let unshaped = LinkFigures {
            rate_mbit: None,
            ..central
        };
        assert_eq!(relay_params(&site, &unshaped, 1).rate_mbit, Some(100.0));
    }
}
