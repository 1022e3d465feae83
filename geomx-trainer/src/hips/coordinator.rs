//! The coordinator role: registration, ids, membership, barriers, liveness, Shutdown / Abort
//! (geomx-net's [`Coordinator`] with this job's expected processes).

use std::time::Duration;

use geomx_net::coord::{CoordOptions, CoordOutcome, Coordinator, PROTOCOL_VERSION};

use super::{JobSpec, RoleStats, RunError};
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
    let mut coord = Coordinator::bind(addr, job.plan.expected_processes(), opts)
        .map_err(|e| RunError::Net(format!("binding the coordinator at {addr}"), e))?;
    on_bound(coord.local_addr());
    let outcome = loop {
        if let Some(o) = coord.wait(Duration::from_secs(1)) {
            break o;
        }
    };
    let stats = coord.stats();
    // Give the broadcast a moment to leave before the sockets close.
    std::thread::sleep(Duration::from_millis(200));
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
