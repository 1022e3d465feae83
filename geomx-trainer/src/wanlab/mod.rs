//! The WAN lab: data centers and WAN links emulated on one Linux machine (wan-lab.md).
//!
//! With root, [`Lab::build`] creates one network namespace per site (`gx<tag>-c` for the central
//! data center, `gx<tag>-dc<i>` for the others) and a router namespace `gx<tag>-wan`, joins each
//! site to the router with a veth pair (link i: `198.18.i.2/24` on the site side, `198.18.i.1/24` on
//! the router side), shapes each link with tbf/htb ([`Shaper`]), drops a random fraction of its
//! packets with a classic-BPF filter ([`LossFilter`]) and delays every packet crossing the router in
//! a userspace TUN relay ([`delay::DelayScheduler`], driven by [`tun::TunRelay`]). The [`Lab`] value
//! is the guard: dropping it (or a panic, SIGINT, SIGTERM) kills the processes it adopted and
//! deletes its namespaces. [`sweep_stale`] removes namespaces left by dead runs.
//!
//! Without root, [`relay`] offers the userspace L4 relay alone (loopback, TCP split at the relay).
//!
//! The primitives are public for other tests and benchmarks:
//! - [`Netns`]: create/delete a namespace, run `ip`/`tc`/`sysctl` in it, run a closure or a child
//!   process inside it;
//! - [`Shaper`] and [`LossFilter`]: the tc configuration of one interface (pure command lists plus
//!   `apply`), with [`shaper::class_drops`] to read a class's drop counter;
//! - [`Lab`] with [`LabSpec`]/[`LinkSpec`]: the whole topology behind one guard.

pub mod awake;
pub mod cmd;
pub mod delay;
pub mod guard;
pub mod lab;
pub mod naming;
pub mod netns;
pub mod probe;
pub mod relay;
pub mod rules;
pub mod selftest;
pub mod shaper;
pub mod tun;

pub use lab::{Lab, LabSpec, LinkSpec};
pub use naming::Tag;
pub use netns::{probe_root, sweep_stale, Netns};
pub use shaper::{LossFilter, LossScope, Shaper};

/// Errors of the WAN lab.
#[derive(Debug, thiserror::Error)]
pub enum WanLabError {
    /// Namespaces cannot be created here (not root).
    #[error("needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) to create network namespaces: {0}")]
    NotRoot(String),
    /// An `ip`, `tc` or `sysctl` command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A system call or socket operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The lab description is inconsistent.
    #[error("{0}")]
    Invalid(String),
}

impl WanLabError {
    pub(crate) fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io(what.into(), e)
    }
}

/// The line a test prints when it cannot run for lack of root (wan-lab.md "Root").
pub fn skip_line(test: &str) -> String {
    format!(
        "SKIPPED {test}: needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) to create network namespaces"
    )
}
