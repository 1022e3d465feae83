//! The WAN link of the DGT benchmark and netns test, on the WAN-lab primitives
//! ([`crate::wanlab`]): a central namespace (link 0, unshaped) and one site namespace (link 1)
//! behind the lab's router, the site's link shaped each way by htb to a rate, with the
//! classic-BPF random-loss filter of wan-lab.md and an optional one-way delay (TUN relay).
//!
//! On top of the lab, `gso_max_segs 1` on both ends of the site's veth makes TCP hand the qdisc
//! one segment per packet, so the loss filter drops single packets as on a real link instead of
//! whole TSO bursts (DGT's own UDP GSO is turned off behind such a filter for the same reason).
//! Threads enter a namespace with [`DgtLab::spawn_in`]; dropping the lab tears it down.

use std::net::Ipv4Addr;

use crate::wanlab::naming::link_addr;
use crate::wanlab::{probe_root, Lab, LabSpec, LinkSpec, LossFilter, WanLabError};

pub use crate::wanlab::LossScope;

/// Address of the central namespace (link 0).
pub const CENTRAL_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Address of the site namespace (link 1).
pub const SITE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

/// `Ok` if this process may create network namespaces.
pub fn root_available() -> Result<(), WanLabError> {
    probe_root()
}

/// The skip line of a test that needs the lab (wan-lab.md's wording).
pub fn skip_line(test: &str) -> String {
    crate::wanlab::skip_line(test)
}

/// A central and a site namespace joined by a shaped, lossy WAN link.
pub struct DgtLab {
    lab: Lab,
}

impl std::fmt::Debug for DgtLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DgtLab")
            .field("prefix", &self.lab.prefix())
            .finish()
    }
}

impl DgtLab {
    /// Builds the lab: the site's link at `rate_mbit` each way (`None`: unshaped), random loss
    /// `p` each way on `scope`, `delay_ms` one way (0: no relay).
    pub fn build(
        rate_mbit: Option<f64>,
        p: f64,
        scope: LossScope,
        delay_ms: f64,
    ) -> Result<DgtLab, WanLabError> {
        let site = LinkSpec {
            rate_mbit,
            delay_ms,
            loss: (p > 0.0).then_some(LossFilter { p, scope }),
            ..LinkSpec::new("site")
        };
        let lab = Lab::build(LabSpec {
            links: vec![LinkSpec::new("central"), site],
            ..LabSpec::default()
        })?;
        debug_assert_eq!(
            (lab.node_addr(0), lab.node_addr(1)),
            (CENTRAL_ADDR, link_addr(1, true))
        );
        lab.node(1)
            .ip(&["link", "set", "dev", &lab.node_if(1), "gso_max_segs", "1"])?;
        lab.wan()
            .ip(&["link", "set", "dev", &lab.wan_if(1), "gso_max_segs", "1"])?;
        Ok(DgtLab { lab })
    }

    /// Packets the loss filter dropped so far: (site → central, central → site).
    pub fn drops(&self) -> (u64, u64) {
        self.lab.loss_drops(1).unwrap_or((0, 0))
    }

    /// The delay relay's lateness so far (`None` without a delay).
    pub fn relay_lateness(&self) -> Option<crate::wanlab::delay::Lateness> {
        let st = self.lab.relay_stats();
        (st.packets > 0).then(|| st.lateness())
    }

    /// Runs `bind` on a new thread inside the central namespace and keeps the server it made
    /// there until the returned [`Serving`] is dropped; returns what `bind` handed out
    /// (addresses, queues).
    pub fn serve_central<S: 'static, A: Send + 'static>(
        &self,
        bind: impl FnOnce() -> Result<(S, A), String> + Send + 'static,
    ) -> Result<(A, Serving), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = self
            .spawn_in(false, move || match bind() {
                Ok((server, out)) => {
                    let _ = tx.send(Ok(out));
                    let _ = stopped.recv();
                    drop(server);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| e.to_string())?;
        let serving = Serving {
            stop: Some(stop),
            thread: Some(thread),
        };
        let out = rx
            .recv()
            .map_err(|_| "the central server's thread ended".to_string())??;
        Ok((out, serving))
    }

    /// Runs `f` on a new thread inside the site (`site = true`) or central namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        site: bool,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T, WanLabError>>, WanLabError> {
        self.lab.node(usize::from(site)).spawn(f)
    }
}

/// A server kept alive in the central namespace ([`DgtLab::serve_central`]); dropping it stops
/// the server and joins its thread.
pub struct Serving {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), WanLabError>>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_lab_plan() {
        assert_eq!(CENTRAL_ADDR, link_addr(0, true));
        assert_eq!(SITE_ADDR, link_addr(1, true));
        assert!(skip_line("t").starts_with("SKIPPED t: needs root"));
    }
}
