//! The coordinator role: registration, ids, membership, barriers, liveness, Shutdown / Abort
//! (geomx-net's [`Coordinator`] with this job's expected processes), and under ESync the ESync
//! state machine ([`super::esync::Esync`]).
//!
//! ESync runs in this process, not in a separate service: the coordinator binds a small KV
//! endpoint next to its own port, registers it as the member `esync` (so workers find its address
//! in the membership table) and answers workers' Ask / Reset requests with the machine, advanced
//! with this process's monotonic clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use geomx_net::coord::{CoordOptions, CoordOutcome, Coordinator, PROTOCOL_VERSION};
use geomx_net::{Handler, KvServer, MsgKind, PayloadCodec, Request, Responder};

use super::admit::Admission;
use super::chaos::SelfFault;
use super::esync::{self, Esync};
use super::node::{FatalHook, Node};
use super::{lock, JobSpec, RoleStats, RunError};
use crate::config::SyncAlgorithm;
use crate::hips::node::Identity;
use crate::hips::plan::roles;

/// Environment variable that makes a coordinator (under `resilience.lost_coordinator =
/// "continue"`) continue a running job from its snapshot instead of starting one: `geomx launch`
/// sets it to `1` when it restarts the coordinator; a deployment's restart policy may too.
pub const RESTART_ENV: &str = "GEOMX_COORDINATOR_RESTART";

/// How long a member whose connection to the coordinator dropped may take to reconnect: three
/// detection times, and at least 2 s.
fn reattach_window(job: &JobSpec) -> Duration {
    (job.net.conn.peer_timeout * 3).max(Duration::from_secs(2))
}

/// Binds the coordinator at `addr` (port 0 picks one), calls `on_bound` with the bound address,
/// and runs until the job ends. Returns its traffic on Shutdown, the abort notice as an error.
pub fn run(
    job: &JobSpec,
    addr: &str,
    on_bound: impl FnOnce(std::net::SocketAddr),
) -> Result<RoleStats, RunError> {
    let opts = CoordOptions {
        net: job.net_as(roles::COORDINATOR, job.plan.central_dc, 0)?,
        protocol_version: PROTOCOL_VERSION,
        config_hash: job.registration_hash()?,
        registration_timeout: job.registration_timeout,
        rejoinable: [
            (job.workers_may_rejoin(), roles::WORKER),
            (job.dcs_may_rejoin(), roles::LOCAL_SERVER),
            (job.global_servers_may_rejoin(), roles::GLOBAL_SERVER),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, r)| r.to_string())
        .collect(),
        state_file: job.coordinator_state_file(),
        reattach_window: job.coordinator_may_restart().then(|| reattach_window(job)),
    };
    let state_file = opts.state_file.clone();
    let with_esync = job.sync == SyncAlgorithm::Esync;
    let mut expected = job.plan.expected_processes();
    if with_esync {
        expected.push((esync::ROLE.to_string(), job.plan.central_dc, 0));
    }
    let restarted = std::env::var(RESTART_ENV).is_ok_and(|v| v == "1");
    let mut coord = match (&state_file, restarted) {
        (Some(file), true) => {
            let snap = geomx_net::coord::read_snapshot(file).map_err(|e| {
                RunError::Net(
                    format!("restarting the coordinator from {}", file.display()),
                    e,
                )
            })?;
            tracing::warn!(file = %file.display(), "coordinator restarted; members reattach");
            Coordinator::bind_restored(addr, snap, opts)
        }
        _ => Coordinator::bind(addr, expected, opts),
    }
    .map_err(|e| RunError::Net(format!("binding the coordinator at {addr}"), e))?;
    let bound = coord.local_addr();
    on_bound(bound);
    let chaos = SelfFault::from_env().map_err(RunError::Membership)?;
    let mut running_since: Option<Instant> = None;
    // A restart's recovery, for the report: when every member was back.
    let log = super::round_log::RoundLog::default();
    let mut back = !restarted;
    let mut endpoint = if with_esync {
        Some(EsyncEndpoint::start(job, bound)?)
    } else {
        None
    };
    let outcome = loop {
        let step = if chaos.is_some() || !back { 20 } else { 1000 };
        if let Some(o) = coord.wait(Duration::from_millis(step)) {
            break o;
        }
        if !back && coord.reattaching() == 0 {
            back = true;
            let c = job.plan.central_dc;
            let rejoined = super::round_log::MemberChange::Rejoined;
            log.change_of(roles::COORDINATOR, c, 0, rejoined, 0, String::new());
        }
        // `--chaos …:coordinator@after=DUR`: the fault strikes that long after the job runs.
        if let Some(after) = chaos.as_ref().and_then(|c| c.after) {
            if !coord.is_registering() {
                let since = *running_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= after {
                    if let Some(c) = &chaos {
                        c.fire();
                    }
                }
            }
        }
    };
    // The job is over: a later coordinator has nothing to continue.
    if let Some(file) = &state_file {
        let _ = std::fs::remove_file(file);
    }
    let (records, refused) = coord.journal();
    let mut undecodable = 0;
    let items: Vec<super::round_log::LogItem> = records
        .iter()
        .flat_map(|r| {
            serde_json::from_slice::<Vec<super::round_log::LogItem>>(&r.bytes).unwrap_or_else(|e| {
                tracing::warn!(from = %r.from, error = %e, "an undecodable journal record");
                undecodable += 1;
                Vec::new()
            })
        })
        .collect();
    let round_log = (!records.is_empty() || refused > 0).then(|| super::round_log::JournalLog {
        records: records.len() as u64,
        lost_records: refused + undecodable,
        ..super::round_log::JournalLog::from_items(items)
    });
    let mut stats = coord.stats();
    if let Some(e) = endpoint.as_mut() {
        let s = e.server.stats();
        stats.bytes_sent += s.bytes_sent;
        stats.bytes_recv += s.bytes_recv;
    }
    // Give the broadcast a moment to leave before the sockets close.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(mut e) = endpoint {
        e.server.shutdown();
    }
    coord.shutdown();
    match outcome {
        CoordOutcome::Shutdown => {
            let me = Identity {
                role: roles::COORDINATOR,
                dc: job.plan.central_dc,
                rank: 0,
            };
            let mut stats = RoleStats::new(&me, stats);
            stats.incarnation = u32::from(restarted);
            (stats.member_events, _) = log.snapshot();
            stats.round_log = round_log;
            Ok(stats)
        }
        CoordOutcome::Aborted(n) => Err(RunError::Aborted(n.to_string())),
    }
}

/// The ESync endpoint: a KV server answering Ask / Reset / Steps with the state machine.
struct EsyncEndpoint {
    server: KvServer,
}

/// The machine, and the `Steps` requests it cannot answer yet: (round, responder).
struct Machine {
    esync: Esync,
    waiting: Vec<(u64, Responder)>,
}

struct EsyncHandler {
    machine: Mutex<Machine>,
    origin: Instant,
    /// Node id → global worker index, from the membership table (set before the start barrier).
    workers: OnceLock<HashMap<u32, u32>>,
    /// Which connection speaks for which worker; refused requests.
    admission: Admission,
}

impl EsyncHandler {
    /// Refuses a request naming a worker index the requesting connection does not own.
    fn owner_check(
        &self,
        sender: u32,
        r: &esync::Request,
        reply: &Responder,
    ) -> Result<(), String> {
        let claimed = r.worker();
        match self.workers.get().and_then(|m| m.get(&sender)) {
            Some(&w) if w == claimed => self.admission.bind(sender, reply),
            Some(&w) => Err(format!(
                "ESync request for worker {claimed} from node {sender}, which is worker {w}"
            )),
            None => Err(format!(
                "ESync request for worker {claimed} from node {sender}, which is no worker"
            )),
        }
    }
}

impl Handler for EsyncHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        if req.kind != MsgKind::Push {
            let msg = format!("the ESync endpoint does not serve {:?}", req.kind);
            return self.admission.refuse(reply, msg);
        }
        let parsed = esync::Request::from_frame(req.key, req.version, &req.payload)
            .map_err(|e| e.to_string())
            .and_then(|r| self.owner_check(req.sender, &r, &reply).map(|()| r));
        let r = match parsed {
            Ok(r) => r,
            Err(e) => return self.admission.refuse(reply, e),
        };
        let mut m = lock(&self.machine);
        let answer = m.esync.handle(&r, self.origin.elapsed().as_secs_f64());
        let _ = match answer {
            Ok(esync::Reply::Wait) => {
                let round = req.version;
                m.waiting.push((round, reply));
                Ok(())
            }
            Ok(a) => reply.send(req.version, PayloadCodec::Raw, &a.encode()),
            Err(e) => {
                self.admission.refuse(reply, e.to_string());
                Ok(())
            }
        };
        // Any request may have completed a round's step counts.
        let waiting = std::mem::take(&mut m.waiting);
        for (round, r) in waiting {
            match m.esync.round_steps(round) {
                Ok(Some(steps)) => {
                    let _ = r.send(
                        round,
                        PayloadCodec::Raw,
                        &esync::Reply::Steps(steps).encode(),
                    );
                }
                Ok(None) => m.waiting.push((round, r)),
                Err(e) => {
                    let _ = r.error(&e.to_string());
                }
            }
        }
    }
}

impl EsyncEndpoint {
    /// Binds the endpoint on the coordinator's host (the coordinator bound at `coord`) and
    /// registers it as a member from a background thread (registration blocks until everyone is
    /// in); it enters the start barrier and reports Done at once, then only serves requests.
    fn start(job: &JobSpec, coord: SocketAddr) -> Result<Self, RunError> {
        let handler = Arc::new(EsyncHandler {
            machine: Mutex::new(Machine {
                esync: Esync::new(job.plan.total_workers(), job.esync.eps),
                waiting: Vec::new(),
            }),
            origin: Instant::now(),
            workers: OnceLock::new(),
            admission: Admission::default(),
        });
        let bind = SocketAddr::new(coord.ip(), 0);
        let server = KvServer::bind_with_id(
            bind,
            0,
            handler.clone(),
            job.net_as(esync::ROLE, job.plan.central_dc, 0)?,
        )
        .map_err(|e| RunError::Net(format!("binding the ESync endpoint at {bind}"), e))?;
        let listen = super::node::advertised(server.local_addr())?;
        let me = Identity {
            role: esync::ROLE,
            dc: job.plan.central_dc,
            rank: 0,
        };
        // The coordinator itself ends the job on an abort; the endpoint only logs it.
        let fatal: FatalHook = Arc::new(|m: &str| tracing::debug!(message = m, "ESync endpoint"));
        let coord_addr = coord.to_string();
        let job = job.clone();
        std::thread::Builder::new()
            .name("geomx-esync-join".into())
            .spawn(move || {
                // After Done the node's watcher keeps the coordinator connection open until the
                // Shutdown broadcast.
                let joined = Node::join(&coord_addr, me, listen, &job, fatal).and_then(|node| {
                    let workers = node
                        .membership
                        .nodes
                        .iter()
                        .filter(|n| n.role == roles::WORKER)
                        .map(|n| {
                            (
                                n.id,
                                job.worker_index(n.dc as usize, n.rank as usize) as u32,
                            )
                        })
                        .collect();
                    handler
                        .admission
                        .set_members(&node.membership.nodes, |n| n.role == roles::WORKER);
                    let _ = handler.workers.set(workers);
                    node.barrier("all")?;
                    node.coord
                        .done()
                        .map_err(|e| RunError::Net("ESync endpoint reporting done".into(), e))
                });
                if let Err(e) = joined {
                    tracing::error!(error = %e, "the ESync endpoint did not join");
                }
            })
            .map_err(|e| RunError::Io("starting the ESync endpoint".into(), e.to_string()))?;
        Ok(Self { server })
    }
}
