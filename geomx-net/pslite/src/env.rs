//! The launch variables ps-lite reads (`DMLC_*`, `PS_VERBOSE`, `PORT`) and geomx's own
//! (`GEOMX_PSLITE_*`), parsed from any lookup function so tests need no process environment.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::Duration;

use geomx_net::DriverKind;

use crate::error::PsError;

/// Every variable the library reads; the C++ `Postoffice` resolves these through
/// `ps::Environment` (so `Environment::Init` works) and hands them to `gxps_start`.
pub const VARIABLES: &[&str] = &[
    "DMLC_ROLE",
    "DMLC_NUM_SERVER",
    "DMLC_NUM_WORKER",
    "DMLC_PS_ROOT_URI",
    "DMLC_PS_ROOT_PORT",
    "DMLC_NODE_HOST",
    "DMLC_INTERFACE",
    "PORT",
    "PS_VERBOSE",
    "GEOMX_PSLITE_DRIVER",
    "GEOMX_PSLITE_PORT_FILE",
    "GEOMX_PSLITE_REGISTRATION_TIMEOUT_MS",
    "GEOMX_PSLITE_PEER_TIMEOUT_MS",
    "GEOMX_PSLITE_CUSTOMER_WAIT_MS",
    "GEOMX_PSLITE_IO_CHUNK",
];

/// The default of `GEOMX_PSLITE_IO_CHUNK`: as ZeroMQ, whole messages of up to a few megabytes
/// go to the kernel in one call (geomx-net's own default is smaller, see
/// [`geomx_net::DEFAULT_IO_CHUNK`], for machines that run latency-critical threads beside it).
pub const DEFAULT_IO_CHUNK: usize = 4 << 20;

/// A process's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs the coordinator, counts barriers.
    Scheduler,
    /// Holds key ranges.
    Server,
    /// Pushes and pulls.
    Worker,
}

impl Role {
    /// The name used in `DMLC_ROLE` and in coordinator registrations.
    pub fn name(self) -> &'static str {
        match self {
            Role::Scheduler => "scheduler",
            Role::Server => "server",
            Role::Worker => "worker",
        }
    }

    /// The C ABI value (`GXPS_ROLE_*`).
    pub fn code(self) -> i32 {
        match self {
            Role::Scheduler => 1,
            Role::Server => 2,
            Role::Worker => 3,
        }
    }

    /// Parses a `DMLC_ROLE` value.
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim() {
            "scheduler" => Some(Role::Scheduler),
            "server" => Some(Role::Server),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }
}

/// The parsed launch configuration of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsEnv {
    /// `DMLC_ROLE`.
    pub role: Role,
    /// `DMLC_NUM_SERVER`.
    pub num_servers: u32,
    /// `DMLC_NUM_WORKER`.
    pub num_workers: u32,
    /// `DMLC_PS_ROOT_URI`: the scheduler's host.
    pub root_uri: String,
    /// `DMLC_PS_ROOT_PORT`: the scheduler's port (0 on the scheduler: any free port, written to
    /// `port_file`).
    pub root_port: u16,
    /// `DMLC_NODE_HOST`: the address this process announces.
    pub node_host: Option<String>,
    /// `DMLC_INTERFACE`: announce this interface's IPv4 address.
    pub interface: Option<String>,
    /// `PORT`: the port of this process's data endpoint (default: any free port).
    pub port: u16,
    /// `PS_VERBOSE`.
    pub verbose: i32,
    /// `GEOMX_PSLITE_DRIVER`: `auto` (default), `io-uring` or `portable`.
    pub driver: DriverKind,
    /// `GEOMX_PSLITE_PORT_FILE`: where a scheduler started with port 0 writes its port.
    pub port_file: Option<String>,
    /// `GEOMX_PSLITE_REGISTRATION_TIMEOUT_MS` (default 300 s): the job aborts if not every
    /// process registered by then.
    pub registration_timeout: Duration,
    /// `GEOMX_PSLITE_PEER_TIMEOUT_MS` (default 10 s): a silent peer is declared dead.
    pub peer_timeout: Duration,
    /// `GEOMX_PSLITE_CUSTOMER_WAIT_MS` (default 30 s): how long a request for an app that does not
    /// exist yet (or has no request handler yet) waits before it is answered with an error.
    pub customer_wait: Duration,
    /// `GEOMX_PSLITE_IO_CHUNK` (bytes, default [`DEFAULT_IO_CHUNK`], at least
    /// [`geomx_net::MIN_IO_CHUNK`]): the most bytes one send or receive system call moves.
    pub io_chunk: usize,
}

fn required(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
    what: &str,
) -> Result<String, PsError> {
    match get(name) {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => Err(PsError::Env(format!("{name} is not set ({what})"))),
    }
}

fn number<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T, PsError> {
    v.trim()
        .parse()
        .map_err(|_| PsError::Env(format!("{name}={v:?} is not {what}")))
}

fn millis(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
    default_ms: u64,
) -> Result<Duration, PsError> {
    match get(name) {
        Some(v) if !v.trim().is_empty() => {
            let ms: u64 = number(name, &v, "a number of milliseconds")?;
            if ms == 0 {
                return Err(PsError::Env(format!("{name} must be positive")));
            }
            Ok(Duration::from_millis(ms))
        }
        _ => Ok(Duration::from_millis(default_ms)),
    }
}

impl PsEnv {
    /// Parses the variables through `get` (`None` = unset). Errors name the variable.
    pub fn parse(get: &dyn Fn(&str) -> Option<String>) -> Result<PsEnv, PsError> {
        let role_s = required(get, "DMLC_ROLE", "scheduler, server or worker")?;
        let role = Role::parse(&role_s).ok_or_else(|| {
            PsError::Env(format!(
                "DMLC_ROLE={role_s:?} is not scheduler, server or worker"
            ))
        })?;
        let num_servers: u32 = number(
            "DMLC_NUM_SERVER",
            &required(get, "DMLC_NUM_SERVER", "the number of server processes")?,
            "a number of servers",
        )?;
        let num_workers: u32 = number(
            "DMLC_NUM_WORKER",
            &required(get, "DMLC_NUM_WORKER", "the number of worker processes")?,
            "a number of workers",
        )?;
        const MAX_NODES: u32 = 1 << 20;
        if num_servers > MAX_NODES || num_workers > MAX_NODES {
            return Err(PsError::Env(format!(
                "DMLC_NUM_SERVER={num_servers} / DMLC_NUM_WORKER={num_workers}: at most {MAX_NODES} each"
            )));
        }
        let root_uri = required(get, "DMLC_PS_ROOT_URI", "the scheduler's host")?;
        let root_port: u16 = number(
            "DMLC_PS_ROOT_PORT",
            &required(get, "DMLC_PS_ROOT_PORT", "the scheduler's port")?,
            "a port number",
        )?;
        if root_port == 0 && role != Role::Scheduler {
            return Err(PsError::Env(
                "DMLC_PS_ROOT_PORT=0 is only meaningful for the scheduler (any free port)".into(),
            ));
        }
        let port = match get("PORT") {
            Some(v) if !v.trim().is_empty() => number("PORT", &v, "a port number")?,
            _ => 0,
        };
        let verbose = match get("PS_VERBOSE") {
            Some(v) if !v.trim().is_empty() => number("PS_VERBOSE", &v, "an integer")?,
            _ => 0,
        };
        let driver = match get("GEOMX_PSLITE_DRIVER") {
            Some(v) if !v.trim().is_empty() => v
                .trim()
                .parse()
                .map_err(|e: String| PsError::Env(format!("GEOMX_PSLITE_DRIVER: {e}")))?,
            _ => DriverKind::Auto,
        };
        let io_chunk = match get("GEOMX_PSLITE_IO_CHUNK") {
            Some(v) if !v.trim().is_empty() => {
                let n: usize = number("GEOMX_PSLITE_IO_CHUNK", &v, "a number of bytes")?;
                if n < geomx_net::MIN_IO_CHUNK {
                    return Err(PsError::Env(format!(
                        "GEOMX_PSLITE_IO_CHUNK={n}: expected at least {} bytes",
                        geomx_net::MIN_IO_CHUNK
                    )));
                }
                n
            }
            _ => DEFAULT_IO_CHUNK,
        };
        let nonempty = |n: &str| {
            get(n)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Ok(PsEnv {
            role,
            num_servers,
            num_workers,
            root_uri,
            root_port,
            node_host: nonempty("DMLC_NODE_HOST"),
            interface: nonempty("DMLC_INTERFACE"),
            port,
            verbose,
            driver,
            port_file: nonempty("GEOMX_PSLITE_PORT_FILE"),
            registration_timeout: millis(get, "GEOMX_PSLITE_REGISTRATION_TIMEOUT_MS", 300_000)?,
            peer_timeout: millis(get, "GEOMX_PSLITE_PEER_TIMEOUT_MS", 10_000)?,
            customer_wait: millis(get, "GEOMX_PSLITE_CUSTOMER_WAIT_MS", 30_000)?,
            io_chunk,
        })
    }

    /// The address this process announces to the others: `DMLC_NODE_HOST`, else the IPv4
    /// address of `DMLC_INTERFACE`, else the local address that routes to the scheduler, else
    /// 127.0.0.1.
    pub fn announce_host(&self) -> Result<String, PsError> {
        if let Some(h) = &self.node_host {
            return Ok(h.clone());
        }
        if let Some(itf) = &self.interface {
            return interface_ipv4(itf).map(|ip| ip.to_string()).ok_or_else(|| {
                PsError::Env(format!(
                    "DMLC_INTERFACE={itf:?}: no such interface with an IPv4 address"
                ))
            });
        }
        Ok(route_to(&self.root_uri, self.root_port.max(1))
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .to_string())
    }

    /// A hash of the settings every process of a job must agree on (checked at registration).
    pub fn config_hash(&self) -> u64 {
        // FNV-1a over a fixed text: stable across builds and platforms.
        let text = format!(
            "geomx-pslite/1 servers={} workers={} key=u64",
            self.num_servers, self.num_workers
        );
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// The local address the kernel would use to reach `host:port` (no packet is sent).
fn route_to(host: &str, port: u16) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    let target = (host, port).to_socket_addrs().ok()?.find(|a| a.is_ipv4())?;
    if target.ip().is_loopback() {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(target).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The first IPv4 address of interface `name`.
#[cfg(unix)]
pub fn interface_ipv4(name: &str) -> Option<Ipv4Addr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifname.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family we check before reinterpreting.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        if family == libc::AF_INET {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// Interfaces are a Unix notion here.
#[cfg(not(unix))]
pub fn interface_ipv4(_name: &str) -> Option<Ipv4Addr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<PsEnv, PsError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PsEnv::parse(&|k| m.get(k).cloned())
    }

    const BASE: &[(&str, &str)] = &[
        ("DMLC_ROLE", "worker"),
        ("DMLC_NUM_SERVER", "2"),
        ("DMLC_NUM_WORKER", "3"),
        ("DMLC_PS_ROOT_URI", "127.0.0.1"),
        ("DMLC_PS_ROOT_PORT", "8000"),
    ];

    #[test]
    fn parses_the_ps_lite_launch_variables() {
        let e = env(BASE).unwrap();
        assert_eq!(e.role, Role::Worker);
        assert_eq!((e.num_servers, e.num_workers), (2, 3));
        assert_eq!(
            (e.root_uri.as_str(), e.root_port, e.port),
            ("127.0.0.1", 8000, 0)
        );
        assert_eq!(e.driver, DriverKind::Auto);
        assert_eq!(e.announce_host().unwrap(), "127.0.0.1");
        let mut v = BASE.to_vec();
        v.extend([
            ("DMLC_NODE_HOST", "10.1.2.3"),
            ("PORT", "9100"),
            ("PS_VERBOSE", "2"),
        ]);
        let e = env(&v).unwrap();
        assert_eq!(
            (e.announce_host().unwrap().as_str(), e.port, e.verbose),
            ("10.1.2.3", 9100, 2)
        );
    }

    #[test]
    fn errors_name_the_variable() {
        for missing in [
            "DMLC_ROLE",
            "DMLC_NUM_SERVER",
            "DMLC_NUM_WORKER",
            "DMLC_PS_ROOT_URI",
            "DMLC_PS_ROOT_PORT",
        ] {
            let v: Vec<_> = BASE
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = env(&v).unwrap_err().to_string();
            assert!(e.contains(missing), "{e}");
        }
        let mut v = BASE.to_vec();
        v[0] = ("DMLC_ROLE", "boss");
        assert!(env(&v).unwrap_err().to_string().contains("boss"));
        let mut v = BASE.to_vec();
        v[1] = ("DMLC_NUM_SERVER", "two");
        assert!(env(&v).unwrap_err().to_string().contains("DMLC_NUM_SERVER"));
        let mut v = BASE.to_vec();
        v[4] = ("DMLC_PS_ROOT_PORT", "0");
        assert!(env(&v).is_err(), "port 0 only for the scheduler");
        v[0] = ("DMLC_ROLE", "scheduler");
        assert!(env(&v).is_ok());
        let mut v = BASE.to_vec();
        v.push(("GEOMX_PSLITE_DRIVER", "rdma"));
        assert!(env(&v)
            .unwrap_err()
            .to_string()
            .contains("GEOMX_PSLITE_DRIVER"));
        let mut v = BASE.to_vec();
        v.push(("DMLC_INTERFACE", "no-such-itf0"));
        assert!(env(&v).unwrap().announce_host().is_err());
    }

    #[test]
    fn io_chunk_has_a_default_and_a_lower_bound() {
        assert_eq!(env(BASE).unwrap().io_chunk, DEFAULT_IO_CHUNK);
        let mut v = BASE.to_vec();
        v.push(("GEOMX_PSLITE_IO_CHUNK", "262144"));
        assert_eq!(env(&v).unwrap().io_chunk, 256 << 10);
        for bad in ["1024", "lots", "-1"] {
            let mut v = BASE.to_vec();
            v.push(("GEOMX_PSLITE_IO_CHUNK", bad));
            let e = env(&v).unwrap_err().to_string();
            assert!(e.contains("GEOMX_PSLITE_IO_CHUNK"), "{e}");
        }
    }

    #[test]
    fn loopback_interface_resolves() {
        let mut v = BASE.to_vec();
        v.push(("DMLC_INTERFACE", "lo"));
        assert_eq!(env(&v).unwrap().announce_host().unwrap(), "127.0.0.1");
    }

    #[test]
    fn config_hash_depends_on_the_counts() {
        let a = env(BASE).unwrap();
        let mut v = BASE.to_vec();
        v[0] = ("DMLC_ROLE", "server");
        assert_eq!(a.config_hash(), env(&v).unwrap().config_hash());
        v[2] = ("DMLC_NUM_WORKER", "4");
        assert_ne!(a.config_hash(), env(&v).unwrap().config_hash());
    }
}
