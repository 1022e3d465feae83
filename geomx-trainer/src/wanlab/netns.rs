//! Network namespaces: create, delete, run `ip`/`tc`/`sysctl` inside, run threads and child
//! processes inside; the root probe and the stale-namespace sweep.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use super::cmd::{run, run_str};
use super::naming::parse_pid;
use super::WanLabError;

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// A named network namespace (as `ip netns` manages them). Dropping the value does not delete the
/// namespace; [`Netns::delete`] or the lab's guard does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` (`ip netns add`) with its loopback up.
    pub fn create(name: &str) -> Result<Self, WanLabError> {
        run_str("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle to an existing namespace.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace (its interfaces, qdiscs and TUN devices go with it); a missing
    /// namespace is not an error.
    pub fn delete(&self) -> Result<(), WanLabError> {
        match run_str("ip", &["netns", "del", &self.name]) {
            Ok(_) => Ok(()),
            Err(_) if !list()?.contains(&self.name) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs `ip -n <ns> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String, WanLabError> {
        let mut a = vec!["-n".to_string(), self.name.clone()];
        a.extend(args.iter().map(|s| s.to_string()));
        run("ip", &a)
    }

    /// Writes `value` to `/sys/<path>` as the namespace sees it (`ip netns exec` mounts the
    /// namespace's own sysfs), e.g. `class/net/<dev>/threaded`.
    pub fn write_sysfs(&self, path: &str, value: &str) -> Result<(), WanLabError> {
        use std::io::Write;
        let target = format!("/sys/{path}");
        let line = format!("ip netns exec {} tee {target}", self.name);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "tee", &target])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| WanLabError::io(format!("starting `{line}`"), e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(value.as_bytes())
                .map_err(|e| WanLabError::io(format!("writing to `{line}`"), e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| WanLabError::io(format!("waiting for `{line}`"), e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(WanLabError::Command {
                command: line,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Runs `tc -n <ns> args…`.
    pub fn tc(&self, args: &[String]) -> Result<String, WanLabError> {
        let mut a = vec!["-n".to_string(), self.name.clone()];
        a.extend(args.iter().cloned());
        run("tc", &a)
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<(), WanLabError> {
        let mut a = vec!["netns", "exec", &self.name, "sysctl", "-q", "-w"];
        a.extend(settings);
        run_str("ip", &a).map(|_| ())
    }

    fn handle(&self) -> Result<File, WanLabError> {
        let path = PathBuf::from(NETNS_DIR).join(&self.name);
        File::open(&path).map_err(|e| WanLabError::io(format!("opening {}", path.display()), e))
    }

    /// Moves the calling thread into the namespace (sockets it opens afterwards live there).
    pub fn enter_current_thread(&self) -> Result<(), WanLabError> {
        let f = self.handle()?;
        // SAFETY: setns on a valid, open namespace fd; affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(WanLabError::io(
                format!("entering namespace {}", self.name),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Starts a thread inside the namespace running `f`.
    pub fn spawn<T, F>(&self, f: F) -> Result<JoinHandle<Result<T, WanLabError>>, WanLabError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let ns = self.clone();
        std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                ns.enter_current_thread()?;
                Ok(f())
            })
            .map_err(|e| WanLabError::io("starting a namespace thread", e))
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<T, F>(&self, f: F) -> Result<T, WanLabError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.spawn(f)?.join().map_err(|_| {
            WanLabError::Invalid(format!("a thread in namespace {} panicked", self.name))
        })?
    }

    /// A command whose process starts inside the namespace (it enters it between fork and exec,
    /// so its pid is the one the caller sees).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, WanLabError> {
        use std::os::unix::process::CommandExt;
        let f = self.handle()?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only calls setns, which is
        // async-signal-safe; the fd stays open because the closure owns the File.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// Names of all namespaces `ip netns` knows.
pub fn list() -> Result<Vec<String>, WanLabError> {
    let out = run_str("ip", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Names of all network interfaces of the calling thread's namespace.
pub fn links() -> Result<Vec<String>, WanLabError> {
    let out = run_str("ip", &["-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

/// Whether this process may build labs: creates and deletes a throw-away namespace.
pub fn probe_root() -> Result<(), WanLabError> {
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("gx{:x}-probe{n}", std::process::id());
    match run_str("ip", &["netns", "add", &name]) {
        Ok(_) => {
            let _ = run_str("ip", &["netns", "del", &name]);
            Ok(())
        }
        Err(e) => Err(WanLabError::NotRoot(e.to_string())),
    }
}

/// Whether process `pid` is running.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes the lab namespaces (`gx<pid>…`) whose process no longer runs; returns their names.
pub fn sweep_stale() -> Result<Vec<String>, WanLabError> {
    let mut gone = Vec::new();
    for name in list()? {
        if let Some(pid) = parse_pid(&name) {
            if !alive(pid) {
                tracing::info!(namespace = %name, pid, "deleting a stale lab namespace");
                Netns::existing(&name).delete()?;
                gone.push(name);
            }
        }
    }
    Ok(gone)
}
