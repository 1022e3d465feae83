//! `[wan]`: the emulated WAN `geomx launch` runs the cluster behind (wan-lab.md).
//!
//! ```toml
//! [wan]
//! mode = "auto"          # off (default) | netns | relay | auto (netns when root, else relay)
//! rate_mbit = 100.0      # each site's WAN link, each way
//! delay_ms = 50.0        # one way
//! loss = 0.0             # random loss on each site link, each way
//! loss_scope = "all"     # all | udp
//! [wan.central]          # the central DC's own link (default unshaped, 0 ms, no loss)
//! rate_mbit = 1000.0
//! [[wan.sites]]          # per-site overrides, by site name
//! name = "dc1"
//! delay_ms = 20.0
//! ```
//!
//! A data center's site is `cluster.data_centers[i].site`, or its own name; data centers with the
//! same site share its namespace and WAN link. The central DC's site is `cluster.central_dc`.

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

/// Slowest WAN link the lab emulates, Mbit/s (8 kbit/s, where tc's rates start).
pub const MIN_RATE_MBIT: f64 = 0.008;
/// Fastest WAN link the lab emulates, Mbit/s (1 Tbit/s).
pub const MAX_RATE_MBIT: f64 = 1e6;
/// Longest one-way WAN delay the lab emulates, ms.
pub const MAX_DELAY_MS: f64 = 10_000.0;

/// Lab modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WanMode {
    /// No emulation: every process on loopback.
    #[default]
    Off,
    /// Network namespaces, shaped veths, BPF loss and the TUN delay relay (needs root).
    Netns,
    /// Userspace L4 relays on loopback between each site and the central DC (no root needed).
    Relay,
    /// `netns` when namespaces can be created, else `relay`.
    Auto,
}

/// Which packets the loss applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WanLossScope {
    /// Every packet (netns); in relay mode loss applies to UDP only.
    #[default]
    All,
    /// UDP datagrams only.
    Udp,
}

/// `[wan.central]`: the central data center's link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WanCentralConfig {
    /// Bandwidth each way in Mbit/s; absent = unshaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
    /// One-way delay in milliseconds.
    pub delay_ms: f64,
    /// Random loss probability.
    pub loss: f64,
}

/// One `[[wan.sites]]` entry: overrides for one site's link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanSiteConfig {
    /// The site (a data center's `site`, or its name).
    pub name: String,
    /// Bandwidth each way in Mbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
    /// One-way delay in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<f64>,
    /// Random loss probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

/// `[wan]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WanConfig {
    /// Lab mode.
    pub mode: WanMode,
    /// Bandwidth of each site's link, each way, in Mbit/s.
    pub rate_mbit: f64,
    /// One-way delay of each site's link in milliseconds.
    pub delay_ms: f64,
    /// Random loss probability on each site's link, each way.
    pub loss: f64,
    /// Which packets may be lost.
    pub loss_scope: WanLossScope,
    /// DGT priority classes (DSCP) on each site's uplink for this many unreliable channels
    /// (dgt.md); absent = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dscp_channels: Option<u8>,
    /// The central data center's link.
    pub central: WanCentralConfig,
    /// Per-site overrides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<WanSiteConfig>,
}

impl Default for WanConfig {
    fn default() -> Self {
        Self {
            mode: WanMode::Off,
            rate_mbit: 100.0,
            delay_ms: 50.0,
            loss: 0.0,
            loss_scope: WanLossScope::All,
            dscp_channels: None,
            central: WanCentralConfig::default(),
            sites: Vec::new(),
        }
    }
}

/// The figures of one link after overrides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkFigures {
    /// Mbit/s each way (`None` = unshaped).
    pub rate_mbit: Option<f64>,
    /// One-way delay, ms.
    pub delay_ms: f64,
    /// Loss probability.
    pub loss: f64,
}

/// One site: a namespace and WAN link shared by some data centers.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// Its name.
    pub name: String,
    /// Indices of the data centers behind it.
    pub dcs: Vec<usize>,
    /// Whether it is the central DC's site (link 0).
    pub central: bool,
}

impl Config {
    /// The site of data center `dc`: its `site`, or its own name.
    pub fn site_of(&self, dc: usize) -> &str {
        let d = &self.cluster.data_centers[dc];
        d.site.as_deref().unwrap_or(&d.name)
    }

    /// The lab's sites: the central one first (hosting the coordinator and global servers, and any
    /// data center whose site is `cluster.central_dc`), then the others in order of appearance.
    pub fn wan_sites(&self) -> Vec<Site> {
        let central = &self.cluster.central_dc;
        let mut sites = vec![Site {
            name: central.clone(),
            dcs: Vec::new(),
            central: true,
        }];
        for d in 0..self.cluster.data_centers.len() {
            let s = self.site_of(d);
            match sites.iter_mut().find(|x| x.name == s) {
                Some(x) => x.dcs.push(d),
                None => sites.push(Site {
                    name: s.to_string(),
                    dcs: vec![d],
                    central: false,
                }),
            }
        }
        sites
    }

    /// The link figures of `site` after `[wan.central]` or `[[wan.sites]]` overrides.
    pub fn wan_link(&self, site: &Site) -> LinkFigures {
        let w = &self.wan;
        if site.central {
            return LinkFigures {
                rate_mbit: w.central.rate_mbit,
                delay_ms: w.central.delay_ms,
                loss: w.central.loss,
            };
        }
        let o = w.sites.iter().find(|s| s.name == site.name);
        LinkFigures {
            rate_mbit: Some(o.and_then(|o| o.rate_mbit).unwrap_or(w.rate_mbit)),
            delay_ms: o.and_then(|o| o.delay_ms).unwrap_or(w.delay_ms),
            loss: o.and_then(|o| o.loss).unwrap_or(w.loss),
        }
    }

    /// Checks `[wan]` and the data centers' `site` names.
    pub(crate) fn validate_wan(&self) -> Result<(), ConfigError> {
        let bad = |f: String, m: String| Err(ConfigError::invalid(f, m));
        for (i, d) in self.cluster.data_centers.iter().enumerate() {
            if let Some(s) = &d.site {
                if s.is_empty()
                    || !s
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return bad(
                        format!("cluster.data_centers[{i}].site"),
                        format!("{s:?} must be non-empty letters, digits, '-' or '_'"),
                    );
                }
            }
        }
        let w = &self.wan;
        // From the 8 kbit/s tc's rates start at to 1 Tbit/s: the lab's pacing arithmetic (ns per
        // byte, release times) stays in range.
        let rate = |f: &str, v: f64| {
            if (MIN_RATE_MBIT..=MAX_RATE_MBIT).contains(&v) {
                Ok(())
            } else {
                bad(
                    f.into(),
                    format!("{v} must be a number of Mbit/s in [{MIN_RATE_MBIT}, {MAX_RATE_MBIT}]"),
                )
            }
        };
        let delay = |f: &str, v: f64| {
            if (0.0..=MAX_DELAY_MS).contains(&v) {
                Ok(())
            } else {
                bad(
                    f.into(),
                    format!("{v} must be a number of ms in [0, {MAX_DELAY_MS}]"),
                )
            }
        };
        let loss = |f: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                bad(f.into(), format!("{v} must be in [0, 1)"))
            }
        };
        rate("wan.rate_mbit", w.rate_mbit)?;
        delay("wan.delay_ms", w.delay_ms)?;
        loss("wan.loss", w.loss)?;
        if let Some(c) = w.dscp_channels {
            if !(1..=7).contains(&c) {
                return bad("wan.dscp_channels".into(), format!("{c} must be in 1..=7"));
            }
        }
        if let Some(r) = w.central.rate_mbit {
            rate("wan.central.rate_mbit", r)?;
        }
        delay("wan.central.delay_ms", w.central.delay_ms)?;
        loss("wan.central.loss", w.central.loss)?;
        let sites = self.wan_sites();
        if sites.len() > 200 {
            return bad(
                "cluster.data_centers".into(),
                format!("{} WAN sites; the lab supports at most 200", sites.len()),
            );
        }
        for (i, s) in w.sites.iter().enumerate() {
            let f = |n: &str| format!("wan.sites[{i}].{n}");
            if !sites.iter().any(|x| !x.central && x.name == s.name) {
                return bad(
                    f("name"),
                    format!(
                        "{:?} is not a data center's site (the central DC's link is [wan.central])",
                        s.name
                    ),
                );
            }
            if w.sites[..i].iter().any(|o| o.name == s.name) {
                return bad(f("name"), format!("{:?} is overridden twice", s.name));
            }
            if let Some(v) = s.rate_mbit {
                rate(&f("rate_mbit"), v)?;
            }
            if let Some(v) = s.delay_ms {
                delay(&f("delay_ms"), v)?;
            }
            if let Some(v) = s.loss {
                loss(&f("loss"), v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_100_mbit_50_ms() {
        let c = Config::default();
        assert_eq!(c.wan.mode, WanMode::Off);
        let sites = c.wan_sites();
        let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["central", "dc0", "dc1"]);
        assert_eq!(
            c.wan_link(&sites[1]),
            LinkFigures {
                rate_mbit: Some(100.0),
                delay_ms: 50.0,
                loss: 0.0
            }
        );
        assert_eq!(c.wan_link(&sites[0]).rate_mbit, None);
    }

    #[test]
    fn sites_group_data_centers_and_overrides_apply() {
        let c = Config::from_toml_str(
            r#"
            [cluster]
            central_dc = "dc0"
            [[cluster.data_centers]]
            name = "dc0"
            workers = 1
            [[cluster.data_centers]]
            name = "a-w0"
            workers = 1
            site = "a"
            [[cluster.data_centers]]
            name = "a-w1"
            workers = 1
            site = "a"
            [wan]
            mode = "netns"
            delay_ms = 20.0
            [wan.central]
            rate_mbit = 1000.0
            [[wan.sites]]
            name = "a"
            rate_mbit = 50.0
            loss = 0.01
            "#,
        )
        .unwrap();
        let s = c.wan_sites();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].name.as_str(), s[0].dcs.clone()), ("dc0", vec![0]));
        assert_eq!((s[1].name.as_str(), s[1].dcs.clone()), ("a", vec![1, 2]));
        assert_eq!(
            c.wan_link(&s[1]),
            LinkFigures {
                rate_mbit: Some(50.0),
                delay_ms: 20.0,
                loss: 0.01
            }
        );
        assert_eq!(c.wan_link(&s[0]).rate_mbit, Some(1000.0));
        // Round trip through the resolved TOML the launcher hands its children.
        let again = Config::from_toml_str(&c.to_toml_string().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("[wan]\nmode = \"tunnel\"", "unknown variant `tunnel`"),
            ("[wan]\nrate_mbit = 0.0", "wan.rate_mbit"),
            ("[wan]\nrate_mbit = 1e-300", "wan.rate_mbit"),
            ("[wan]\nrate_mbit = 1e300", "wan.rate_mbit"),
            ("[wan]\ndelay_ms = -1.0", "wan.delay_ms"),
            ("[wan]\nloss = 1.0", "wan.loss"),
            ("[wan]\nlos = 0.1", "los"),
            ("[wan]\ndscp_channels = 9", "wan.dscp_channels"),
            ("[wan.central]\nloss = 2.0", "wan.central.loss"),
            ("[[wan.sites]]\nname = \"nowhere\"", "wan.sites[0].name"),
            ("[[wan.sites]]\nname = \"central\"", "wan.sites[0].name"),
            (
                "[[wan.sites]]\nname = \"dc0\"\nrate_mbit = -5.0",
                "wan.sites[0].rate_mbit",
            ),
            (
                "[[wan.sites]]\nname = \"dc0\"\n[[wan.sites]]\nname = \"dc0\"",
                "wan.sites[1].name",
            ),
            (
                "[[cluster.data_centers]]\nname = \"x\"\nworkers = 1\nsite = \"a b\"",
                "cluster.data_centers[0].site",
            ),
        ];
        for (toml, field) in cases {
            let e = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(e.contains(field), "{toml:?}: {e}");
        }
    }
}
