//! The TOML form of `[cluster]`: data centers as a list of tables or as the shorthand
//! `data_centers = N` + `workers_per_dc = n`.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::{ClusterConfig, DataCenterConfig};

/// Workers per data center when the shorthand omits `workers_per_dc`.
const DEFAULT_WORKERS_PER_DC: usize = 2;

/// `[cluster]` as written; converted to [`ClusterConfig`] after parsing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    #[serde(default = "defaults::global_servers")]
    global_servers: usize,
    #[serde(default = "defaults::central_dc")]
    central_dc: String,
    #[serde(default = "defaults::host")]
    host: String,
    #[serde(default)]
    base_port: u16,
    #[serde(default)]
    coordinator: Option<String>,
    #[serde(default)]
    global_server_addrs: Vec<String>,
    #[serde(default)]
    data_centers: Option<DataCenters>,
    #[serde(default)]
    workers_per_dc: Option<usize>,
}

mod defaults {
    use super::ClusterConfig;

    pub fn global_servers() -> usize {
        ClusterConfig::default().global_servers
    }
    pub fn central_dc() -> String {
        ClusterConfig::default().central_dc
    }
    pub fn host() -> String {
        ClusterConfig::default().host
    }
}

/// `data_centers`: a count or a list of tables.
pub(super) enum DataCenters {
    Count(usize),
    List(Vec<DataCenterConfig>),
}

impl<'de> Deserialize<'de> for DataCenters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DataCenters;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of data centers or a list of [[cluster.data_centers]] tables")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DataCenters, E> {
                usize::try_from(v)
                    .map(DataCenters::Count)
                    .map_err(|_| E::custom(format!("{v} data centers is too many")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DataCenters, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a number of data centers")))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DataCenters, A::Error> {
                let mut list = Vec::new();
                while let Some(dc) = seq.next_element::<DataCenterConfig>()? {
                    list.push(dc);
                }
                Ok(DataCenters::List(list))
            }
        }
        d.deserialize_any(V)
    }
}

impl TryFrom<RawCluster> for ClusterConfig {
    type Error = String;

    fn try_from(raw: RawCluster) -> Result<Self, String> {
        let data_centers = match (raw.data_centers, raw.workers_per_dc) {
            (None, None) => ClusterConfig::default().data_centers,
            (None, Some(_)) | (Some(DataCenters::List(_)), Some(_)) => {
                return Err("cluster.workers_per_dc: only valid with `data_centers = N`".into())
            }
            (Some(DataCenters::List(list)), None) => list,
            (Some(DataCenters::Count(n)), per) => {
                DataCenterConfig::numbered(n, per.unwrap_or(DEFAULT_WORKERS_PER_DC)).ok_or_else(
                    || {
                        format!(
                            "cluster.data_centers: {n} data centers, at most {}",
                            geomx_net::coord::MAX_NODES
                        )
                    },
                )?
            }
        };
        Ok(ClusterConfig {
            global_servers: raw.global_servers,
            central_dc: raw.central_dc,
            host: raw.host,
            base_port: raw.base_port,
            coordinator: raw.coordinator,
            global_server_addrs: raw.global_server_addrs,
            data_centers,
        })
    }
}
