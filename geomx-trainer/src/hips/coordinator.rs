//! The coordinator role: registration, ids, membership, barriers, liveness, Shutdown / Abort
//! (geomx-net's [`Coordinator`] with this job's expected processes), and under ESync the ESync
//! state machine ([`super::esync::Esync`]).
//!
//! ESync runs in this process, not in a separate service: the coordinator binds a small KV
//! endpoint next to its own port, registers it as the member `esync` (so workers find its address
//! in the membership table) and answers workers' Ask / Reset requests with the machine, advanced
//! with this process's monotonic clock.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geomx_net::coord::{CoordOptions, CoordOutcome, Coordinator, PROTOCOL_VERSION};
use geomx_net::{Handler, KvServer, MsgKind, PayloadCodec, Request, Responder};

use super::esync::{self, Esync};
use super::node::{FatalHook, Node};
use super::{lock, JobSpec, RoleStats, RunError};
use crate::config::SyncAlgorithm;
use crate::hips::node::Identity;
use crate::hips::plan::roles;

/// Binds the coordinator at `addr` (port 0 picks one), calls `on_bound` with the bound address,
/// and runs until the job ends. Returns its traffic on Shutdown, the abort notice as an error.
pub fn run(
    job: &JobSpec,
    addr: &str,
    on_bound: impl FnOnce(std::net::SocketAddr),
) -> Result<RoleStats, RunError> {
    let opts = CoordOptions {
        net: job.net,
        protocol_version: PROTOCOL_VERSION,
        config_hash: job.config_hash,
        registration_timeout: job.registration_timeout,
    };
    let with_esync = job.sync == SyncAlgorithm::Esync;
    let mut expected = job.plan.expected_processes();
    if with_esync {
        expected.push((esync::ROLE.to_string(), job.plan.central_dc, 0));
    }
    let mut coord = Coordinator::bind(addr, expected, opts)
        .map_err(|e| RunError::Net(format!("binding the coordinator at {addr}"), e))?;
    let bound = coord.local_addr();
    on_bound(bound);
    let mut endpoint = if with_esync {
        Some(EsyncEndpoint::start(job, bound)?)
    } else {
        None
    };
    let outcome = loop {
        if let Some(o) = coord.wait(Duration::from_secs(1)) {
            break o;
        }
    };
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
            Ok(RoleStats::new(&me, stats))
        }
        CoordOutcome::Aborted(n) => Err(RunError::Aborted(n.to_string())),
    }
}

/// The ESync endpoint: a KV server answering Ask / Reset with the state machine.
struct EsyncEndpoint {
    server: KvServer,
}

struct EsyncHandler {
    machine: Mutex<Esync>,
    origin: Instant,
}

impl Handler for EsyncHandler {
    fn on_request(&self, req: Request, reply: Responder) {
        if req.kind != MsgKind::Push {
            let _ = reply.error(&format!("the ESync endpoint does not serve {:?}", req.kind));
            return;
        }
        let answer = esync::Request::from_frame(req.key, req.version, &req.payload).and_then(|r| {
            let mut m = lock(&self.machine);
            m.handle(&r, self.origin.elapsed().as_secs_f64())
        });
        let _ = match answer {
            Ok(a) => reply.send(req.version, PayloadCodec::Raw, &a.encode()),
            Err(e) => {
                tracing::warn!(error = %e, "ESync request refused");
                reply.error(&e.to_string())
            }
        };
    }
}

impl EsyncEndpoint {
    /// Binds the endpoint on the coordinator's host (the coordinator bound at `coord`) and
    /// registers it as a member from a background thread (registration blocks until everyone is
    /// in); it enters the start barrier and reports Done at once, then only serves requests.
    fn start(job: &JobSpec, coord: SocketAddr) -> Result<Self, RunError> {
        let handler = Arc::new(EsyncHandler {
            machine: Mutex::new(Esync::new(job.plan.total_workers(), job.esync.eps)),
            origin: Instant::now(),
        });
        let bind = SocketAddr::new(coord.ip(), 0);
        let server = KvServer::bind_with_id(bind, 0, handler, job.net)
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
