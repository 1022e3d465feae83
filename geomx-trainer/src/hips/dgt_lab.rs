//! A two-namespace WAN link for the DGT benchmark and tests (wan-lab.md, reduced): a site
//! namespace and a central namespace joined by one veth pair (site 198.18.1.2, central
//! 198.18.1.1), each direction shaped by htb to a rate with a classic-BPF random-loss filter into
//! a `pfifo limit 0` drop class. `gso_max_segs 1` on both ends makes TCP hand the qdisc one
//! segment per packet, so the loss filter drops single packets as on a real link (DGT's own UDP
//! GSO is turned off behind such a filter for the same reason).
//!
//! Threads enter a namespace with `setns(2)` ([`DgtLab::spawn_in`]); the lab deletes its
//! namespaces (and with them the veths and qdiscs) when dropped. Names follow wan-lab.md:
//! `gx<pid in hex>-…`, so a sweeper of stale labs recognises them.
//!
//! This is a private minimal lab: the WAN-lab module's primitives were not committed when the
//! DGT benchmark was written.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Why the lab could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Creating namespaces failed (not root, or no CAP_SYS_ADMIN / CAP_NET_ADMIN).
    #[error("needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) to create network namespaces: {0}")]
    NoRoot(String),
    /// An `ip` / `tc` command failed.
    #[error("`{cmd}` failed: {err}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its standard error.
        err: String,
    },
    /// Entering a namespace failed.
    #[error("entering namespace {0}: {1}")]
    Enter(String, std::io::Error),
}

/// Which packets the loss filter may drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossScope {
    /// Every IP packet (TCP too).
    All,
    /// UDP datagrams only.
    Udp,
}

/// The classic-BPF bytecode of wan-lab.md: match (→ drop class) with probability `p`.
pub fn loss_bytecode(p: f64, scope: LossScope) -> String {
    let t = (p.clamp(0.0, 1.0) * 4_294_967_296.0)
        .round()
        .min(4_294_967_295.0) as u64;
    match scope {
        LossScope::All => format!("4,32 0 0 4294963256,37 1 0 {t},6 0 0 4294967295,6 0 0 0"),
        LossScope::Udp => {
            format!("6,48 0 0 23,21 0 3 17,32 0 0 4294963256,37 1 0 {t},6 0 0 4294967295,6 0 0 0")
        }
    }
}

fn run(args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| LabError::Command {
            cmd: args.join(" "),
            err: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: args.join(" "),
            err: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True if this process may create network namespaces (probed with a throw-away one).
pub fn root_available() -> Result<(), LabError> {
    let name = format!("gx{:x}-probe", std::process::id());
    let _ = run(&["ip", "netns", "del", &name]);
    run(&["ip", "netns", "add", &name]).map_err(|e| LabError::NoRoot(e.to_string()))?;
    let _ = run(&["ip", "netns", "del", &name]);
    Ok(())
}

/// The skip line of a test that needs the lab (wan-lab.md's wording).
pub fn skip_line(test: &str) -> String {
    format!(
        "SKIPPED {test}: needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) to create network namespaces"
    )
}

/// One shaped, lossy link between a site and the central namespace.
#[derive(Debug)]
pub struct DgtLab {
    site: String,
    central: String,
    site_if: String,
    central_if: String,
}

/// Address of the site end.
pub const SITE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// Address of the central end.
pub const CENTRAL_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

static SEQ: AtomicU32 = AtomicU32::new(0);

impl DgtLab {
    /// Builds the link: `rate_mbit` each way (`None`: unshaped), loss `p` each way on `scope`.
    pub fn build(rate_mbit: Option<f64>, p: f64, scope: LossScope) -> Result<DgtLab, LabError> {
        root_available()?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("gx{:x}-g{seq}", std::process::id());
        let lab = DgtLab {
            site: format!("{tag}s"),
            central: format!("{tag}c"),
            site_if: format!("{tag}s"),
            central_if: format!("{tag}c"),
        };
        for ns in [&lab.site, &lab.central] {
            run(&["ip", "netns", "add", ns])?;
        }
        let (s, c) = (lab.site.as_str(), lab.central.as_str());
        let (si, ci) = (lab.site_if.as_str(), lab.central_if.as_str());
        run(&[
            "ip", "link", "add", si, "netns", s, "type", "veth", "peer", "name", ci, "netns", c,
        ])?;
        for (ns, dev, addr) in [(s, si, SITE_ADDR), (c, ci, CENTRAL_ADDR)] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "link",
                "set",
                "dev",
                dev,
                "gso_max_segs",
                "1",
            ])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            lab.shape(ns, dev, rate_mbit, p, scope)?;
        }
        Ok(lab)
    }

    fn shape(
        &self,
        ns: &str,
        dev: &str,
        rate_mbit: Option<f64>,
        p: f64,
        scope: LossScope,
    ) -> Result<(), LabError> {
        if rate_mbit.is_none() && p <= 0.0 {
            return Ok(());
        }
        let rate = format!(
            "{}kbit",
            (rate_mbit.unwrap_or(10_000.0) * 1000.0).round() as u64
        );
        let tc = |args: &[&str]| {
            let mut v = vec!["tc", "-n", ns];
            v.extend_from_slice(args);
            run(&v)
        };
        tc(&[
            "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q",
            "100",
        ])?;
        tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &rate,
            "ceil", &rate,
        ])?;
        tc(&[
            "class", "add", "dev", dev, "parent", "1:1", "classid", "1:10", "htb", "rate", &rate,
            "ceil", &rate,
        ])?;
        tc(&[
            "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "pfifo", "limit", "1000",
        ])?;
        if p > 0.0 {
            tc(&[
                "class", "add", "dev", dev, "parent", "1:1", "classid", "1:99", "htb", "rate",
                "8kbit", "ceil", &rate,
            ])?;
            tc(&[
                "qdisc", "add", "dev", dev, "parent", "1:99", "handle", "99:", "pfifo", "limit",
                "0",
            ])?;
            let code = loss_bytecode(p, scope);
            tc(&[
                "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "2", "bpf",
                "bytecode", &code, "classid", "1:99",
            ])?;
        }
        Ok(())
    }

    /// Packets the loss filter dropped so far: (site → central, central → site).
    pub fn drops(&self) -> (u64, u64) {
        let d = |ns: &str, dev: &str| {
            run(&["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev])
                .map(|out| parse_drops(&out, "99:"))
                .unwrap_or(0)
        };
        (
            d(&self.site, &self.site_if),
            d(&self.central, &self.central_if),
        )
    }

    /// Runs `f` on a new thread inside the site (`site = true`) or central namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        site: bool,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>, LabError> {
        let ns = if site { &self.site } else { &self.central }.clone();
        let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
            .map_err(|e| LabError::Enter(ns.clone(), e))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; setns only changes this thread's network namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                let _ = tx.send(Err(std::io::Error::last_os_error()));
                panic!("setns failed");
            }
            let _ = tx.send(Ok(()));
            f()
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(h),
            Ok(Err(e)) => Err(LabError::Enter(ns, e)),
            Err(_) => Err(LabError::Enter(ns, std::io::Error::other("thread died"))),
        }
    }
}

impl Drop for DgtLab {
    fn drop(&mut self) {
        for ns in [&self.site, &self.central] {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                tracing::warn!(%ns, error = %e, "namespace not deleted");
            }
        }
    }
}

/// The `dropped N` count of qdisc `handle` in `tc -s qdisc show` output.
pub fn parse_drops(out: &str, handle: &str) -> u64 {
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if l.contains(&format!("qdisc pfifo {handle}")) {
            if let Some(stats) = lines.next() {
                if let Some(i) = stats.find("dropped ") {
                    let rest = &stats[i + 8..];
                    let n: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                    return n.parse().unwrap_or(0);
                }
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytecode_thresholds() {
        assert_eq!(
            loss_bytecode(0.1, LossScope::All),
            "4,32 0 0 4294963256,37 1 0 429496730,6 0 0 4294967295,6 0 0 0"
        );
        assert!(loss_bytecode(1.0, LossScope::Udp).contains("37 1 0 4294967295"));
        assert!(loss_bytecode(0.0, LossScope::Udp).starts_with("6,48 0 0 23,21 0 3 17,"));
    }

    #[test]
    fn drops_parsed_from_tc_output() {
        let out = "qdisc htb 1: root refcnt 2 r2q 100 default 0x10\n Sent 1 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)\n\
                   qdisc pfifo 99: parent 1:99 limit 0p\n Sent 0 bytes 0 pkt (dropped 1958, overlimits 0 requeues 0)\n";
        assert_eq!(parse_drops(out, "99:"), 1958);
        assert_eq!(parse_drops(out, "10:"), 0);
    }
}
