//! What every non-coordinator role does around its own work: register with the coordinator,
//! watch for Shutdown / Abort, report Done, and fail loudly instead of hanging.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use geomx_net::coord::{CoordClient, CoordEvent, Hello, Membership, PROTOCOL_VERSION};
use geomx_net::{Handler, KvServer, NetError};

use super::{JobSpec, RunError};

/// Called with a message when the job must end at once (Abort broadcast, coordinator lost).
/// The `geomx` binary prints the message and exits non-zero.
pub type FatalHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The address peers are told to connect to: the bound one, which must be routable (binding
/// `0.0.0.0` or `::` would advertise an address no peer can reach).
pub fn advertised(bound: std::net::SocketAddr) -> Result<String, RunError> {
    if bound.ip().is_unspecified() {
        return Err(RunError::Membership(format!(
            "bound to {bound}, which peers cannot connect to: bind an address they can reach \
             (--bind, cluster.host, or the role's address in the topology file)"
        )));
    }
    Ok(bound.to_string())
}

/// Environment variable with the WAN relay routes of this process: `addr=relay,addr=relay,…`.
/// `geomx launch` in relay mode sets it for the processes of a site, so that their connections to
/// the central data center go through the site's userspace relay (wan-lab.md "Without root").
pub const WAN_ROUTES_ENV: &str = "GEOMX_WAN_ROUTES";

/// Parses `addr=relay,…` into pairs (malformed entries are skipped).
pub fn parse_routes(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|e| e.split_once('='))
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .collect()
}

/// `addr`, or the relay that [`WAN_ROUTES_ENV`] routes it through.
pub(super) fn wan_route(addr: &str) -> String {
    static ROUTES: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(|| {
        std::env::var(WAN_ROUTES_ENV)
            .map(|t| parse_routes(&t))
            .unwrap_or_default()
    });
    routes
        .iter()
        .find(|(a, _)| a == addr)
        .map_or_else(|| addr.to_string(), |(_, r)| r.clone())
}

/// Who a process is in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Role name (see [`super::plan::roles`]).
    pub role: &'static str,
    /// Data-center index.
    pub dc: u32,
    /// Rank within (dc, role).
    pub rank: u32,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (dc {}, rank {})", self.role, self.dc, self.rank)
    }
}

/// A registered process: its coordinator connection, the membership table and the Shutdown signal.
pub struct Node {
    /// This process.
    pub me: Identity,
    /// Connection to the coordinator.
    pub coord: CoordClient,
    /// The membership table.
    pub membership: Membership,
    shutdown: Receiver<()>,
    fatal: FatalHook,
}

impl Node {
    /// Registers `me` (serving at `listen_addr`, empty if it serves nothing) with the coordinator at
    /// `coord_addr` (retrying while nothing listens there, up to the job's registration timeout)
    /// and starts the event watcher. Blocks until every process registered.
    pub fn join(
        coord_addr: &str,
        me: Identity,
        listen_addr: String,
        job: &JobSpec,
        fatal: FatalHook,
    ) -> Result<Self, RunError> {
        let net = job.net_as(me.role, me.dc, me.rank)?;
        let config_hash = job.registration_hash()?;
        let hello = Hello {
            role: me.role.to_string(),
            dc: me.dc,
            rank: me.rank,
            listen_addr,
            protocol_version: PROTOCOL_VERSION,
            config_hash,
            reattach: None,
        };
        // Processes of a job start in any order: retry while the coordinator is not listening
        // yet, up to the registration timeout. Each attempt connects within at most a second:
        // a restarted process behind a link that is still cut then registers within about a
        // second of the link's return, instead of after TCP's SYN backoff (1, 3, 7 s …).
        let deadline = Instant::now() + job.registration_timeout;
        let mut attempt = net.clone();
        attempt.connect_timeout = attempt.connect_timeout.min(Duration::from_secs(1));
        let (coord, membership) = loop {
            match CoordClient::register(coord_addr, hello.clone(), attempt.clone()) {
                Ok((c, m)) => break (c.reconnecting(job.coordinator_may_restart()), m),
                Err(NetError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(NetError::Timeout(m))
                    if m.starts_with("connect") && Instant::now() < deadline =>
                {
                    tracing::info!(%m, "the coordinator is not reachable yet; retrying");
                }
                // The coordinator dropped the connection during the TLS handshake: it bounds
                // the handshakes in flight per address, which a whole one-host cluster
                // starting on a loaded machine can exceed. Transient: retry.
                Err(e) if handshake_dropped(&e) && Instant::now() < deadline => {
                    tracing::info!(error = %e, "the coordinator dropped the handshake; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                // A restart faster than the coordinator's sight of the loss: retry.
                Err(NetError::Rejected(m))
                    if m.contains(geomx_net::coord::STILL_REGISTERED)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) if e.to_string().contains(geomx_net::coord::JOB_FINISHED) => {
                    return Err(RunError::JobFinished(format!(
                        "{me}: the job finished before this process registered"
                    )));
                }
                Err(e) => {
                    return Err(RunError::Net(
                        format!("registering {me} with the coordinator at {coord_addr}"),
                        e,
                    ))
                }
            }
        };
        if let geomx_net::tls::Security::Mtls(ctx) = &net.security {
            note_member_hosts(ctx, &membership);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        spawn_watcher(coord.clone(), tx, fatal.clone(), me.to_string())?;
        Ok(Self {
            me,
            coord,
            membership,
            shutdown: rx,
            fatal,
        })
    }

    /// Node id the coordinator assigned to this process.
    pub fn id(&self) -> u32 {
        self.membership.my_id
    }

    /// Address of the process (role, dc, rank), from the membership table, after the WAN
    /// relay routes of [`WAN_ROUTES_ENV`] (the launcher's relay mode).
    pub fn addr_of(&self, role: &str, dc: u32, rank: u32) -> Result<String, RunError> {
        self.membership
            .find(role, dc, rank)
            .map(|n| wan_route(&n.addr))
            .ok_or_else(|| RunError::Membership(format!("{role} (dc {dc}, rank {rank}) missing")))
    }

    /// A connection to (`role`, `dc`, `rank`) at its address in the membership table. A
    /// restarted process (incarnation > 0) may have registered before that server's own next
    /// incarnation did (both restarted after a cut link, say) and hold its old address: it asks
    /// the coordinator where the server listens now and retries until the server accepts,
    /// within the registration timeout.
    pub fn connect_server(
        &self,
        role: &str,
        dc: u32,
        rank: u32,
        job: &JobSpec,
    ) -> Result<geomx_net::KvClient, RunError> {
        let mut addr = self.addr_of(role, dc, rank)?;
        let deadline = Instant::now() + job.registration_timeout;
        let key = geomx_net::coord::NodeKey::new(role, dc, rank);
        loop {
            match geomx_net::KvClient::connect(addr.as_str(), self.id(), self.net(job)?) {
                Ok(c) => return Ok(c),
                // A server drops handshakes past its bound per address (one-host clusters
                // starting at once): transient, retried like a restarting server.
                Err(e)
                    if (self.membership.incarnation == 0 && !handshake_dropped(&e))
                        || Instant::now() >= deadline =>
                {
                    return Err(RunError::Net(
                        format!("connecting to {role} (dc {dc}, rank {rank}) at {addr}"),
                        e,
                    ))
                }
                Err(e) => {
                    tracing::info!(%role, dc, rank, %addr, error = %e, "server not there yet; asking the coordinator")
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(at) = self.coord.locate(&key) {
                if at.live {
                    addr = wan_route(&at.addr);
                }
            }
        }
    }

    /// Enters the barrier of `group`.
    pub fn barrier(&self, group: &str) -> Result<(), RunError> {
        self.coord
            .barrier(group)
            .map_err(|e| RunError::Net(format!("barrier {group}"), e))
    }

    /// Asks the coordinator to abort the job naming this process, then ends it through the fatal
    /// hook (the Abort broadcast usually does first). Never returns normally in the binary.
    pub fn abort(&self, reason: &str) {
        abort_via(&self.coord, &self.fatal, &self.me.to_string(), reason);
    }

    /// Binds a server for `handler` at `bind_addr`, then registers `me` with its address.
    pub fn serve_and_join(
        coord_addr: &str,
        me: Identity,
        bind_addr: &str,
        handler: Arc<dyn Handler>,
        job: &JobSpec,
        fatal: FatalHook,
    ) -> Result<(KvServer, Self), RunError> {
        let server =
            KvServer::bind_with_id(bind_addr, 0, handler, job.net_as(me.role, me.dc, me.rank)?)
                .map_err(|e| RunError::Net(format!("binding {me} at {bind_addr}"), e))?;
        let listen = advertised(server.local_addr())?;
        let node = Self::join(coord_addr, me, listen, job, fatal)?;
        Ok((server, node))
    }

    /// This process's transport options: with mutual TLS, under its own certificate.
    pub fn net(&self, job: &JobSpec) -> Result<geomx_net::NetOptions, RunError> {
        job.net_as(self.me.role, self.me.dc, self.me.rank)
    }

    /// A handle that aborts the job from any thread (e.g. a server callback).
    pub fn aborter(&self) -> Aborter {
        Aborter {
            coord: self.coord.clone(),
            fatal: self.fatal.clone(),
            me: self.me.to_string(),
        }
    }

    /// Reports Done and waits up to `timeout` for the coordinator's Shutdown.
    pub fn finish(&self, timeout: Duration) -> Result<(), RunError> {
        self.coord
            .done()
            .map_err(|e| RunError::Net("reporting done".into(), e))?;
        self.shutdown.recv_timeout(timeout).map_err(|_| {
            RunError::Timeout(format!(
                "no shutdown from the coordinator within {timeout:?}"
            ))
        })?;
        self.coord.close();
        Ok(())
    }
}

/// Notes the address of every member that advertises one (IP literals: a name would make
/// registration wait on a resolver) as a member host of this process's TLS context: their
/// first connections to its servers take handshake slots strangers cannot fill
/// ([`geomx_net::tls::slots`]).
fn note_member_hosts(ctx: &geomx_net::tls::TlsContext, m: &geomx_net::coord::Membership) {
    for n in &m.nodes {
        if let Ok(a) = n.addr.parse::<std::net::SocketAddr>() {
            ctx.member_hosts().note(a.ip());
        }
    }
}

/// Whether `e` is a TLS handshake the server dropped at the socket (it bounds handshakes in
/// flight per address), not one it refused on its merits (certificate, identity, alert).
fn handshake_dropped(e: &NetError) -> bool {
    matches!(e, NetError::Tls(t) if t.is_dropped())
}

/// Asks the servers behind `clients` to count this restarted process again (a `Pull` of
/// [`super::msg::REJOIN_KEY`] proposing a round), proposing the highest round any of them named
/// until all name the same one, which it returns: a worker asks its local server, a local server
/// every global server. Retried while a server still holds the lost incarnation's connection (it
/// refuses until it has seen that connection close), up to the job's wait limit.
pub(super) fn rejoin(clients: &[geomx_net::KvClient], job: &JobSpec) -> Result<u64, RunError> {
    let deadline = Instant::now() + job.wait_limit();
    let mut at = 0u64;
    loop {
        let answers: Result<Vec<u64>, NetError> = clients
            .iter()
            .map(|c| {
                c.pull(super::msg::REJOIN_KEY, at, 0, 0)
                    .and_then(|p| p.wait(job.wait_limit()))
                    .map(|r| r.version)
            })
            .collect();
        match answers {
            Ok(froms) => {
                let top = froms.iter().copied().max().unwrap_or(0);
                if froms.iter().all(|&f| f == top) {
                    return Ok(top);
                }
                at = top;
            }
            // A refusal is retried; a connection that is gone (the server died meanwhile) is
            // not: this process ends and its restart finds the server's.
            Err(e) if Instant::now() >= deadline || super::upstream::recoverable(&e) => {
                return Err(RunError::Net("rejoining the job".into(), e));
            }
            Err(e) => {
                tracing::info!(error = %e, "rejoin refused; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Aborts the job from any thread; see [`Node::aborter`].
#[derive(Clone)]
pub struct Aborter {
    coord: CoordClient,
    fatal: FatalHook,
    me: String,
}

impl Aborter {
    /// Aborts the job with `reason` without blocking the caller.
    pub fn abort(&self, reason: String) {
        let a = self.clone();
        let spawned = std::thread::Builder::new()
            .name("geomx-abort".into())
            .spawn(move || abort_via(&a.coord, &a.fatal, &a.me, &reason));
        if let Err(e) = spawned {
            (self.fatal)(&format!("{}: cannot start abort thread: {e}", self.me));
        }
    }
}

fn abort_via(coord: &CoordClient, fatal: &FatalHook, me: &str, reason: &str) {
    tracing::error!(%me, %reason, "aborting the job");
    if let Err(e) = coord.abort(reason) {
        tracing::warn!(error = %e, "abort request not acknowledged");
    }
    // The Abort broadcast normally ends the process first; this covers a lost coordinator.
    std::thread::sleep(Duration::from_millis(500));
    fatal(&format!("{me}: {reason}"));
}

fn spawn_watcher(
    coord: CoordClient,
    shutdown: Sender<()>,
    fatal: FatalHook,
    me: String,
) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name("geomx-coord-watch".into())
        .spawn(move || loop {
            match coord.wait_event(Duration::from_secs(1)) {
                None => continue,
                Some(CoordEvent::Shutdown) => {
                    let _ = shutdown.send(());
                    return;
                }
                Some(CoordEvent::Abort(n)) => {
                    fatal(&format!("job aborted: {n}"));
                    return;
                }
                Some(CoordEvent::CoordinatorLost(m)) => {
                    fatal(&format!("{me}: lost the coordinator: {m}"));
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| RunError::Io("starting the coordinator watcher".into(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_advertised_addresses_are_member_hosts() {
        use geomx_net::coord::{Membership, NodeInfo};
        use geomx_net::tls::{Identity as TlsId, JobCa, TlsContext};
        let ca = JobCa::generate("t", 1).unwrap();
        let creds = ca.issue(&TlsId::new("worker", 0, 0).unwrap()).unwrap();
        let ctx = TlsContext::new(&creds).unwrap();
        let node = |id, addr: &str| NodeInfo {
            id,
            role: "local_server".into(),
            dc: id,
            rank: 0,
            addr: addr.into(),
        };
        let m = Membership {
            my_id: 1,
            nodes: vec![
                node(1, "198.18.1.2:5000"),
                node(2, "[fd00::7]:80"),
                node(3, "ls-0:80"),
                node(4, ""),
            ],
            incarnation: 0,
        };
        note_member_hosts(&ctx, &m);
        let hosts = ctx.member_hosts();
        assert!(hosts.contains([198, 18, 1, 2].into()));
        assert!(hosts.contains("fd00::7".parse().unwrap()));
        assert!(!hosts.contains([198, 18, 2, 2].into()));
    }

    #[test]
    fn wan_routes_parse() {
        assert_eq!(
            parse_routes("127.0.0.1:5=127.0.0.1:9, bad,=x,[::1]:7=[::1]:8"),
            vec![
                ("127.0.0.1:5".to_string(), "127.0.0.1:9".to_string()),
                ("[::1]:7".to_string(), "[::1]:8".to_string())
            ]
        );
    }

    #[test]
    fn unspecified_bind_addresses_are_not_advertised() {
        assert_eq!(
            advertised("127.0.0.1:5000".parse().unwrap()).unwrap(),
            "127.0.0.1:5000"
        );
        assert_eq!(advertised("[::1]:7".parse().unwrap()).unwrap(), "[::1]:7");
        let e = advertised("0.0.0.0:5000".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("--bind"), "{e}");
        assert!(advertised("[::]:5000".parse().unwrap()).is_err());
    }
}
