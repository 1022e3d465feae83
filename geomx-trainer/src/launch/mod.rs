//! `geomx launch`: the whole cluster on this machine as separate processes.
//!
//! The launcher resolves the configuration, writes it to a temporary file, starts the coordinator
//! (`geomx run --role coordinator` on port 0) and reads its address from the child's stdout, then
//! starts every global server, local server and worker with that address; all other ports are
//! OS-assigned and travel through the coordinator's membership table. Children print
//! machine-readable lines (see [`lines`]); the launcher turns progress lines into text, collects the
//! final stats into a [`Report`], and if any child fails kills the rest and returns its error.

pub mod role;
pub mod slices;
pub mod supervise;
pub mod threads;
pub mod wan;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::device::{round_robin_device, visible_count, CUDA_LOCAL};
use crate::config::{Config, ConfigError, SecurityMode, WanMode};
use crate::hips::plan::roles;
use crate::hips::worker::Progress;
use crate::hips::{JobSpec, RoleStats, RunError};
use crate::report::Report;
use crate::security::Keyring;
use geomx_net::tls::Identity;

/// Prefixes of the lines children print on stdout for the launcher.
pub mod lines {
    /// The coordinator's bound address.
    pub const COORDINATOR: &str = "GEOMX_COORDINATOR ";
    /// A [`crate::hips::worker::Progress`] as JSON.
    pub const PROGRESS: &str = "GEOMX_PROGRESS ";
    /// A process's final [`crate::hips::RoleStats`] as JSON.
    pub const STATS: &str = "GEOMX_STATS ";
}

/// How long the coordinator may take to print its address.
const COORDINATOR_START: Duration = Duration::from_secs(30);
/// How long a restarted child may still run after the coordinator ended the job successfully.
const LATE_RESTART_GRACE: Duration = Duration::from_secs(5);
/// Stderr lines kept per child for error messages.
const TAIL: usize = 12;

/// Errors of `geomx launch`.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The configuration file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration cannot be turned into a job.
    #[error(transparent)]
    Job(#[from] RunError),
    /// A process could not be started or watched.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The coordinator did not come up.
    #[error("coordinator did not start: {0}")]
    Coordinator(String),
    /// `scheduling.p3.slice_elems = "auto"` could not be tuned ([`slices`]).
    #[error("tuning scheduling.p3.slice_elems: {0}")]
    Tuning(String),
    /// The job aborted itself; the notice names the failed process and why.
    #[error("job aborted: {0}")]
    Aborted(String),
    /// A child process failed; the others were stopped.
    #[error("{name} failed ({status}): {detail}")]
    ChildFailed {
        /// The child, e.g. `worker (dc 0, rank 1)`.
        name: String,
        /// How it ended.
        status: String,
        /// Its last error lines and the job's abort reason, if any.
        detail: String,
    },
}

/// What to launch.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// Topology file; `None` runs [`Config::default`].
    pub config: Option<PathBuf>,
    /// Write the JSON report here.
    pub report: Option<PathBuf>,
    /// The `geomx` executable to start children from (default: this executable).
    pub exe: Option<PathBuf>,
    /// Do not print progress lines.
    pub quiet: bool,
    /// Continue the job from the newest complete round of this checkpoint directory.
    pub resume: Option<PathBuf>,
    /// Write the final model here as safetensors (overrides `checkpoint.export`).
    pub save: Option<PathBuf>,
    /// Faults to inject (`--chaos`, see [`supervise::parse_chaos`]).
    pub chaos: Option<String>,
}

#[derive(Clone, Copy)]
enum Stream {
    Out,
    Err,
}

struct Event {
    child: usize,
    stream: Stream,
    line: String,
}

struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    /// The launcher killed it (after another child failed).
    killed: bool,
    tail: VecDeque<String>,
    /// How to start it again: its arguments and credentials.
    args: Vec<String>,
    keys: Option<String>,
    /// Times it was started again.
    restarts: u32,
}

struct Cluster {
    procs: Vec<Proc>,
    readers: Vec<JoinHandle<()>>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    progress: Vec<Progress>,
    stats: Vec<RoleStats>,
    coordinator: Option<String>,
    quiet: bool,
    started: Instant,
    /// When each child injected its `--chaos` fault (ms since the Unix epoch), by child index.
    fault_at: std::collections::HashMap<usize, u64>,
    /// Link cuts announced and not acted on yet: (child, ms since the Unix epoch, length).
    cuts: Vec<(usize, u64, Duration)>,
}

fn forward(
    child: usize,
    stream: Stream,
    r: impl std::io::Read + Send + 'static,
    tx: Sender<Event>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("geomx-launch-io-{child}"))
        .spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx
                    .send(Event {
                        child,
                        stream,
                        line,
                    })
                    .is_err()
                {
                    break;
                }
            }
        })
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

impl Cluster {
    fn new(quiet: bool) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            procs: Vec::new(),
            readers: Vec::new(),
            tx,
            rx,
            progress: Vec::new(),
            stats: Vec::new(),
            coordinator: None,
            quiet,
            started: Instant::now(),
            fault_at: Default::default(),
            cuts: Vec::new(),
        }
    }

    /// Starts a child `geomx run ARGS`; `keys`, when given, is written to its stdin (its
    /// credentials, see [`Keys`]).
    fn spawn(
        &mut self,
        cmd: Command,
        name: String,
        args: &[String],
        keys: Option<String>,
    ) -> Result<(), LaunchError> {
        let idx = self.procs.len();
        let child = self.start(cmd, &name, idx, args, keys.as_deref())?;
        self.procs.push(Proc {
            name,
            child,
            status: None,
            killed: false,
            tail: VecDeque::new(),
            args: args.to_vec(),
            keys,
            restarts: 0,
        });
        Ok(())
    }

    /// Starts child `idx` again with its arguments and credentials (a new incarnation).
    fn restart(&mut self, idx: usize, cmd: Command) -> Result<(), LaunchError> {
        let (name, args, keys) = {
            let p = &self.procs[idx];
            (p.name.clone(), p.args.clone(), p.keys.clone())
        };
        let child = self.start(cmd, &name, idx, &args, keys.as_deref())?;
        let p = &mut self.procs[idx];
        p.child = child;
        p.status = None;
        p.restarts += 1;
        Ok(())
    }

    fn start(
        &mut self,
        mut cmd: Command,
        name: &str,
        idx: usize,
        args: &[String],
        keys: Option<&str>,
    ) -> Result<Child, LaunchError> {
        cmd.arg("run").args(args);
        if keys.is_some() {
            cmd.arg("--credentials-stdin").stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| LaunchError::Io(format!("starting {name}"), e))?;
        if let (Some(text), Some(mut stdin)) = (keys, child.stdin.take()) {
            // A few KiB into an empty pipe: never blocks. Closing it ends the child's read.
            stdin
                .write_all(text.as_bytes())
                .map_err(|e| LaunchError::Io(format!("handing {name} its credentials"), e))?;
        }
        let io_err = |e| LaunchError::Io(format!("watching {name}"), e);
        if let Some(o) = child.stdout.take() {
            self.readers
                .push(forward(idx, Stream::Out, o, self.tx.clone()).map_err(io_err)?);
        }
        if let Some(e) = child.stderr.take() {
            self.readers
                .push(forward(idx, Stream::Err, e, self.tx.clone()).map_err(io_err)?);
        }
        eprintln!("geomx launch: started {name} pid {}", child.id());
        Ok(child)
    }

    fn handle(&mut self, ev: Event) {
        let p = &mut self.procs[ev.child];
        match ev.stream {
            Stream::Err => {
                eprintln!("[{}] {}", p.name, ev.line);
                if p.tail.len() == TAIL {
                    p.tail.pop_front();
                }
                p.tail.push_back(ev.line);
            }
            Stream::Out => {
                if let Some(a) = ev.line.strip_prefix(lines::COORDINATOR) {
                    self.coordinator = Some(a.trim().to_string());
                } else if let Some(t) = ev.line.strip_prefix(crate::hips::chaos::FAULT_LINE) {
                    if let Ok(ms) = t.trim().parse() {
                        self.fault_at.insert(ev.child, ms);
                    }
                } else if let Some(t) = ev.line.strip_prefix(crate::hips::chaos::CUT_LINE) {
                    let mut it = t.split_whitespace().map(str::parse::<u64>);
                    if let (Some(Ok(ms)), Some(Ok(len))) = (it.next(), it.next()) {
                        self.cuts.push((ev.child, ms, Duration::from_millis(len)));
                    }
                } else if let Some(j) = ev.line.strip_prefix(lines::PROGRESS) {
                    match serde_json::from_str::<Progress>(j) {
                        Ok(pr) => {
                            if !self.quiet {
                                let mut out = std::io::stdout().lock();
                                let _ = writeln!(
                                    out,
                                    "round {:>6}  loss {:.4}  test loss {:.4}  test accuracy {:.4}  ({:.2} s)",
                                    pr.round,
                                    pr.loss,
                                    pr.test_loss,
                                    pr.test_accuracy,
                                    self.started.elapsed().as_secs_f64()
                                );
                                let _ = out.flush();
                            }
                            self.progress.push(pr);
                        }
                        Err(e) => eprintln!("[{}] unreadable progress line ({e}): {j}", p.name),
                    }
                } else if let Some(j) = ev.line.strip_prefix(lines::STATS) {
                    match serde_json::from_str::<RoleStats>(j) {
                        Ok(s) => self.stats.push(s),
                        Err(e) => eprintln!("[{}] unreadable stats line ({e}): {j}", p.name),
                    }
                } else {
                    println!("[{}] {}", p.name, ev.line);
                }
            }
        }
    }

    fn pump(&mut self, wait: Duration) {
        if let Ok(ev) = self.rx.recv_timeout(wait) {
            self.handle(ev);
        }
        while let Ok(ev) = self.rx.try_recv() {
            self.handle(ev);
        }
    }

    /// Polls every child; returns the indices of those that failed since the last poll.
    fn poll(&mut self) -> Result<Vec<usize>, LaunchError> {
        let mut failed = Vec::new();
        for (i, p) in self.procs.iter_mut().enumerate() {
            if p.status.is_none() {
                p.status = reap_if_exited(&mut p.child)
                    .map_err(|e| LaunchError::Io(format!("waiting for {}", p.name), e))?;
                if p.status.is_some_and(|s| !s.success()) {
                    failed.push(i);
                }
            }
        }
        Ok(failed)
    }

    fn all_exited(&self) -> bool {
        self.procs.iter().all(|p| p.status.is_some())
    }

    /// Waits for the readers to reach end of file and handles what they read.
    fn drain(&mut self) {
        drop(std::mem::replace(
            &mut self.tx,
            crossbeam_channel::unbounded().0,
        ));
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        while let Ok(ev) = self.rx.try_recv() {
            self.handle(ev);
        }
    }

    /// Stops every child still running and builds the error for the failed one.
    fn fail(&mut self, first: usize) -> LaunchError {
        // Let the job's own abort reach the others briefly, so their messages name the cause.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && !self.all_exited() {
            self.pump(Duration::from_millis(20));
            let _ = self.poll();
        }
        self.kill_all();
        self.drain();
        // A child killed from outside (by a signal the launcher did not send) is the root cause;
        // otherwise the job's abort notice names it; otherwise the first child that failed.
        use std::os::unix::process::ExitStatusExt;
        let signalled = self
            .procs
            .iter()
            .position(|p| !p.killed && p.status.is_some_and(|s| s.signal().is_some()));
        let abort = self
            .procs
            .iter()
            .flat_map(|q| q.tail.iter())
            .find_map(|l| l.split_once("job aborted: ").map(|(_, n)| n.to_string()));
        if let (None, Some(notice)) = (signalled, &abort) {
            return LaunchError::Aborted(notice.clone());
        }
        let p = &self.procs[signalled.unwrap_or(first)];
        let mut detail: Vec<String> = p
            .tail
            .iter()
            .filter(|l| l.starts_with("error"))
            .cloned()
            .collect();
        if detail.is_empty() {
            detail.extend(p.tail.back().cloned());
        }
        if let Some(a) = abort {
            detail.push(format!("job aborted: {a}"));
        }
        LaunchError::ChildFailed {
            name: p.name.clone(),
            status: p
                .status
                .as_ref()
                .map(describe)
                .unwrap_or_else(|| "unknown".into()),
            detail: if detail.is_empty() {
                "no error output".into()
            } else {
                detail.join("; ")
            },
        }
    }

    fn kill_all(&mut self) {
        for p in self.procs.iter_mut().filter(|p| p.status.is_none()) {
            p.stop();
        }
    }
}

impl Proc {
    /// Kills the child and reaps it.
    fn stop(&mut self) {
        self.killed = true;
        let _ = self.child.kill();
        // Not reaped yet, so the pid is still ours; the WAN lab's guard must forget it first.
        crate::wanlab::guard::forget_pid(self.child.id());
        self.status = self.child.wait().ok();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The child's exit status if it has exited, reaping it only after the WAN lab's guard forgot its
/// pid (a reaped pid may be reused; the guard signals lab pids as root).
fn reap_if_exited(child: &mut Child) -> std::io::Result<Option<ExitStatus>> {
    if !has_exited(child.id())? {
        return Ok(None);
    }
    crate::wanlab::guard::forget_pid(child.id());
    child.try_wait()
}

/// Whether process `pid` (our child) has exited, without reaping it (`waitid` with `WNOWAIT`).
#[cfg(target_os = "linux")]
fn has_exited(pid: u32) -> std::io::Result<bool> {
    // SAFETY: a zeroed siginfo_t is valid for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: waitid on our own child with a valid out-pointer; WNOWAIT leaves it unreaped.
    let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (si_pid is 0 when the child has not exited).
    Ok(unsafe { info.si_pid() } != 0)
}

#[cfg(not(target_os = "linux"))]
fn has_exited(_pid: u32) -> std::io::Result<bool> {
    Ok(true)
}

/// Children get SIGKILL when the launcher dies, so a killed launcher leaves no cluster behind.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// Name of a child process.
/// The credentials `geomx launch` hands its children: an ephemeral job CA in memory, each
/// child's key and certificate written to its stdin (`None` when `security.mode = "off"` or
/// `security.dir` provides them).
struct Keys(Option<Keyring>);

impl Keys {
    fn new(cfg: &Config) -> Result<Keys, LaunchError> {
        if cfg.security.mode != SecurityMode::Mtls || cfg.security.dir.is_some() {
            return Ok(Keys(None));
        }
        Keyring::ephemeral("launch")
            .map(|k| Keys(Some(k)))
            .map_err(|e| LaunchError::Io("making the job CA".into(), std::io::Error::other(e)))
    }

    /// The stdin text of the child that is each of `ids` (role, dc, rank).
    fn for_child(&self, ids: &[(&str, u32, u32)]) -> Result<Option<String>, LaunchError> {
        let Some(k) = &self.0 else {
            return Ok(None);
        };
        let err =
            |e: String| LaunchError::Io("issuing credentials".into(), std::io::Error::other(e));
        let ids = ids
            .iter()
            .map(|&(role, dc, rank)| Identity::new(role, dc, rank).map_err(|e| err(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        k.hand_over(&ids).map(Some).map_err(err)
    }
}

/// The `--device` of each of `workers` workers (spawn order): with `model.device = "cuda:local"`
/// this host's GPUs round robin (those `CUDA_VISIBLE_DEVICES` lists, else those libtorch sees),
/// otherwise none (the configuration's device).
fn worker_devices(device: &str, workers: usize) -> Result<Vec<Option<String>>, LaunchError> {
    if device != CUDA_LOCAL {
        return Ok(vec![None; workers]);
    }
    let gpus = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => visible_count(&v),
        Err(_) => crate::engine::cuda_device_count(),
    };
    (0..workers)
        .map(|i| {
            round_robin_device(device, i, gpus)
                .map_err(|e| LaunchError::Config(ConfigError::invalid("model.device", e)))
        })
        .collect()
}

fn child_name(role: &str, dc: u32, rank: u32) -> String {
    format!("{role} (dc {dc}, rank {rank})")
}

/// Launches the cluster `opts` describes and waits for it; returns the run report (also written
/// to `opts.report`).
pub fn launch(opts: &LaunchOptions) -> Result<Report, LaunchError> {
    launch_with(opts, None)
}

/// [`launch`] with the configuration's `wan.mode` replaced by `wan_mode` when given (`geomx
/// wan-lab` runs with `auto`).
pub fn launch_with(opts: &LaunchOptions, wan_mode: Option<WanMode>) -> Result<Report, LaunchError> {
    let mut cfg = match &opts.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(m) = wan_mode {
        cfg.wan.mode = m;
    }
    cfg.security_from_env(|k| std::env::var(k).ok())?;
    if opts.save.is_some() {
        cfg.checkpoint.export.clone_from(&opts.save);
    }
    let tuning = tune_slices(&mut cfg, opts)?;
    let mut report = launch_config(cfg, opts)?;
    report.p3_tuning = tuning;
    if let Some(path) = &opts.report {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| LaunchError::Io("encoding the report".into(), std::io::Error::other(e)))?;
        std::fs::write(path, json)
            .map_err(|e| LaunchError::Io(format!("writing {}", path.display()), e))?;
    }
    Ok(report)
}

/// Under `scheduling.p3.slice_elems = "auto"`: runs the probes ([`slices`]) and sets the size
/// they chose in `cfg`; what they measured.
fn tune_slices(
    cfg: &mut Config,
    opts: &LaunchOptions,
) -> Result<Option<slices::SliceTuning>, LaunchError> {
    if !slices::wanted(cfg) {
        return Ok(None);
    }
    if opts.resume.is_some() {
        return Err(ConfigError::invalid(
            "scheduling.p3.slice_elems",
            "\"auto\" with --resume: set the size the first run chose (its report's \
             p3_tuning.chosen), which its checkpoints' keys follow",
        )
        .into());
    }
    // The model's tensors, from the job with any slice size.
    let lens: Vec<usize> = JobSpec::from_config(&slices::probe_config(cfg, slices::CANDIDATES[0]))?
        .model
        .tensors()
        .iter()
        .map(|t| t.len())
        .collect();
    let probe_opts = LaunchOptions {
        exe: opts.exe.clone(),
        quiet: true,
        ..LaunchOptions::default()
    };
    let tuning = slices::tune(cfg, &lens, |probe| {
        launch_config(probe.clone(), &probe_opts)
    })?;
    if !opts.quiet {
        println!(
            "P3 slice size: {} elements (rounds of the {}-round probes: {})",
            tuning.chosen,
            tuning.probe_rounds,
            if tuning.round_ms.is_empty() {
                "one candidate, none run".into()
            } else {
                tuning.probes_text()
            }
        );
    }
    cfg.scheduling.p3.slice_elems = crate::config::SliceElems::Elems(tuning.chosen);
    Ok(Some(tuning))
}

/// Launches the cluster of the resolved configuration `cfg` and waits for it.
fn launch_config(mut cfg: Config, opts: &LaunchOptions) -> Result<Report, LaunchError> {
    let mut job = JobSpec::from_config(&cfg)?;
    if let Some(dir) = &opts.resume {
        // Checked here once; every child is then told the same directory.
        job.resume_from(&cfg, dir.clone())?;
    }
    // Built before the configuration is written: relay mode pre-assigns global server ports.
    // Declared before the cluster, so the children are stopped before the lab goes away.
    let mut wan = wan::Wan::prepare(&mut cfg, opts.quiet)?;
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe()
            .map_err(|e| LaunchError::Io("locating the geomx executable".into(), e))?,
    };
    let text = cfg.to_toml_string().map_err(|e| {
        LaunchError::Io(
            "writing the resolved configuration".into(),
            std::io::Error::other(e),
        )
    })?;
    let file = TempFile::new(&text)?;
    let conf = file.0.display().to_string();
    let host = cfg.cluster.host.clone();
    let started = Instant::now();

    let worker_devices = worker_devices(&cfg.model.device, job.plan.total_workers())?;
    let keys = Keys::new(&cfg)?;
    let chaos = match &opts.chaos {
        Some(spec) => supervise::parse_chaos(
            spec,
            &job.plan.workers_per_dc,
            job.plan.num_global_servers(),
            job.plan.central_dc,
        )
        .map_err(|m| ConfigError::invalid("--chaos", m))?,
        None => Vec::new(),
    };
    supervise::check_chaos_rounds(&chaos, job.rounds_per_local(), job.rounds_per_global())
        .map_err(|m| ConfigError::invalid("--chaos", m))?;
    for f in chaos.iter().filter(|f| f.fault.starts_with("cut=")) {
        wan.cuttable(f.dc as usize)
            .map_err(|m| ConfigError::invalid("--chaos", format!("cut:dc{}: {m}", f.dc)))?;
    }
    // The data center of each local server, by child index (the one a link cut names).
    let mut local_server_dc = std::collections::HashMap::new();
    // Children that may be restarted, by index: (role, dc, rank, site).
    let mut restartable = std::collections::HashMap::new();
    // The chaos fault of (role, dc, rank), if any, for its first incarnation.
    let chaos_cmd = |cmd: &mut Command, role: &str, dc: u32, rank: u32| {
        cmd.env_remove(crate::hips::chaos::CHAOS_ENV);
        if let Some(f) = chaos
            .iter()
            .find(|f| (f.role.as_str(), f.dc, f.rank) == (role, dc, rank))
        {
            cmd.env(crate::hips::chaos::CHAOS_ENV, &f.fault);
        }
    };
    let mut cl = Cluster::new(opts.quiet);
    let coord_bind = wan
        .coordinator_bind(cfg.cluster.base_port)
        .or_else(|| cfg.cluster.coordinator.clone())
        .unwrap_or_else(|| format!("{host}:{}", cfg.cluster.base_port));
    let mut cmd = wan.command(&exe, None)?;
    chaos_cmd(&mut cmd, roles::COORDINATOR, job.plan.central_dc, 0);
    if job.coordinator_may_restart() {
        restartable.insert(0, (roles::COORDINATOR, job.plan.central_dc, 0, None));
    }
    cl.spawn(
        cmd,
        roles::COORDINATOR.into(),
        &[
            "--role".into(),
            "coordinator".into(),
            "--config".into(),
            conf.clone(),
            "--coordinator".into(),
            coord_bind,
        ],
        keys.for_child(&[
            (roles::COORDINATOR, job.plan.central_dc, 0),
            (crate::hips::esync::ROLE, job.plan.central_dc, 0),
        ])?,
    )?;
    let deadline = Instant::now() + COORDINATOR_START;
    let coord = loop {
        cl.pump(Duration::from_millis(20));
        if let Some(a) = cl.coordinator.clone() {
            break a;
        }
        if let Some(&i) = cl.poll()?.first() {
            return Err(cl.fail(i));
        }
        if Instant::now() > deadline {
            return Err(LaunchError::Coordinator(format!(
                "no address within {COORDINATOR_START:?}"
            )));
        }
    };
    wan.adopt(cl.procs[0].child.id());
    // A restarted coordinator binds the address its members know (port 0 picked one).
    let args = &mut cl.procs[0].args;
    if let Some(i) = args.iter().position(|a| a == "--coordinator") {
        if let Some(a) = args.get_mut(i + 1) {
            a.clone_from(&coord);
        }
    }
    wan.start_relays(&coord, &cfg.cluster.global_server_addrs)?;
    let plan = &job.plan;
    // `site` = the data center whose site the process runs in (`None`: the central DC's).
    let common = |role: &str, dc: u32, rank: u32, site: Option<usize>| -> Vec<String> {
        let mut a = vec![
            "--role".into(),
            role.into(),
            "--config".into(),
            conf.clone(),
            "--coordinator".into(),
            wan.coordinator_for(site, &coord),
            "--dc".into(),
            dc.to_string(),
            "--rank".into(),
            rank.to_string(),
        ];
        if let Some(h) = wan.bind_host(site) {
            a.extend(["--bind".into(), h]);
        }
        if let Some(dir) = &opts.resume {
            a.extend(["--resume".into(), dir.display().to_string()]);
        }
        a
    };
    for s in 0..plan.num_global_servers() as u32 {
        let mut cmd = wan.command(&exe, None)?;
        chaos_cmd(&mut cmd, roles::GLOBAL_SERVER, plan.central_dc, s);
        if job.global_servers_may_rejoin() {
            restartable.insert(
                cl.procs.len(),
                (roles::GLOBAL_SERVER, plan.central_dc, s, None),
            );
        }
        cl.spawn(
            cmd,
            child_name(roles::GLOBAL_SERVER, plan.central_dc, s),
            &common("global-server", plan.central_dc, s, None),
            keys.for_child(&[(roles::GLOBAL_SERVER, plan.central_dc, s)])?,
        )?;
        wan.adopt(cl.procs.last().map_or(0, |p| p.child.id()));
    }
    let mut devices = worker_devices.into_iter();
    for (d, &n) in plan.workers_per_dc.iter().enumerate() {
        let site = Some(d);
        let d = d as u32;
        let mut cmd = wan.command(&exe, site)?;
        chaos_cmd(&mut cmd, roles::LOCAL_SERVER, d, 0);
        if job.dcs_may_rejoin() {
            restartable.insert(cl.procs.len(), (roles::LOCAL_SERVER, d, 0, site));
        }
        local_server_dc.insert(cl.procs.len(), d);
        cl.spawn(
            cmd,
            child_name(roles::LOCAL_SERVER, d, 0),
            &common("local-server", d, 0, site),
            keys.for_child(&[(roles::LOCAL_SERVER, d, 0)])?,
        )?;
        wan.adopt(cl.procs.last().map_or(0, |p| p.child.id()));
        for r in 0..n as u32 {
            let mut args = common("worker", d, r, site);
            if let Some(dev) = devices.next().flatten() {
                args.extend(["--device".into(), dev]);
            }
            let mut cmd = wan.command(&exe, site)?;
            chaos_cmd(&mut cmd, roles::WORKER, d, r);
            if job.workers_may_rejoin() {
                restartable.insert(cl.procs.len(), (roles::WORKER, d, r, site));
            }
            cl.spawn(
                cmd,
                child_name(roles::WORKER, d, r),
                &args,
                keys.for_child(&[(roles::WORKER, d, r)])?,
            )?;
            wan.adopt(cl.procs.last().map_or(0, |p| p.child.id()));
        }
    }
    let resilience = &cfg.resilience;
    let mut faults: Vec<supervise::FaultRecord> = Vec::new();
    // Restarts waiting for their backoff: (when, child index).
    let mut pending: Vec<(Instant, usize)> = Vec::new();
    let mut coordinator_done: Option<Instant> = None;
    // Cut links and when they are restored: (when, data center).
    let mut cut_until: Vec<(Instant, u32)> = Vec::new();
    loop {
        cl.pump(Duration::from_millis(20));
        for (child, unix_ms, len) in std::mem::take(&mut cl.cuts) {
            let Some(&dc) = local_server_dc.get(&child) else {
                continue;
            };
            wan.cut(dc as usize, true)?;
            eprintln!("geomx launch: cut the WAN link of dc {dc} for {len:?}");
            cut_until.push((Instant::now() + len, dc));
            faults.push(supervise::FaultRecord::link_cut(
                dc,
                len,
                started.elapsed().as_secs_f64(),
                unix_ms,
            ));
        }
        let now = Instant::now();
        for &(_, dc) in cut_until.iter().filter(|(t, _)| *t <= now) {
            wan.cut(dc as usize, false)?;
            eprintln!("geomx launch: restored the WAN link of dc {dc}");
        }
        cut_until.retain(|(t, _)| *t > now);
        let failed = cl.poll()?;
        if !failed.is_empty() {
            // A chaos fault's line was printed before the process died; let it arrive.
            cl.pump(Duration::from_millis(50));
        }
        for i in failed {
            // A lost worker (local server) is survivable under `lost_worker` (`lost_dc`) =
            // "continue"; anything else, or a process out of restarts, fails the job as before.
            let Some(&(role, dc, rank, _)) = restartable.get(&i) else {
                return Err(cl.fail(i));
            };
            let p = &cl.procs[i];
            // The coordinator's end is the job's, unless it was killed and will be restarted.
            let coordinator_away = pending.iter().any(|&(_, j)| j == 0);
            let job_over = i != 0 && cl.procs[0].status.is_some() && !coordinator_away;
            // A coordinator that exited on its own decided the job's outcome; only one that was
            // killed (a signal) is restarted.
            use std::os::unix::process::ExitStatusExt;
            let killed = p.status.is_some_and(|s| s.signal().is_some());
            let restart = resilience.restart == crate::config::Restart::OnFailure
                && !job_over
                && (i != 0 || killed);
            if i == 0 && !restart {
                return Err(cl.fail(i));
            }
            if restart && p.restarts >= resilience.max_restarts {
                return Err(cl.fail(i));
            }
            let status = p.status.as_ref().map(describe).unwrap_or_default();
            eprintln!(
                "geomx launch: {} ended ({status}){}",
                p.name,
                if restart { "; restarting it" } else { "" }
            );
            faults.push(supervise::FaultRecord {
                process: p.name.clone(),
                role: role.into(),
                dc,
                rank,
                cause: status,
                at_s: started.elapsed().as_secs_f64(),
                unix_ms: cl
                    .fault_at
                    .remove(&i)
                    .unwrap_or_else(crate::hips::round_log::unix_ms),
                restarted: restart,
                detected_after_s: None,
                rejoined_after_s: None,
                lost_round: None,
                rejoined_round: None,
                rounds_reduced: None,
            });
            if restart {
                pending.push((Instant::now() + resilience.backoff(p.restarts + 1), i));
            }
        }
        let now = Instant::now();
        let (mut due, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(t, _)| *t <= now);
        pending = later;
        // The coordinator first: the others' restarts need it.
        due.sort_by_key(|&(_, i)| i);
        for (_, i) in due {
            if i != 0 && cl.procs[0].status.is_some() && !pending.iter().any(|&(_, j)| j == 0) {
                continue; // the job ended meanwhile
            }
            let site = restartable.get(&i).and_then(|w| w.3);
            let mut cmd = wan.command(&exe, site)?;
            cmd.env_remove(crate::hips::chaos::CHAOS_ENV);
            if i == 0 {
                // It continues the running job from its snapshot.
                cmd.env(crate::hips::coordinator::RESTART_ENV, "1");
            }
            cl.restart(i, cmd)?;
            wan.adopt(cl.procs[i].child.id());
        }
        // After a successful end, a restarted worker that never registered cannot any more.
        if cl.procs[0].status.is_some_and(|s| s.success()) {
            let ended = *coordinator_done.get_or_insert_with(Instant::now);
            if ended.elapsed() > LATE_RESTART_GRACE {
                for p in cl.procs.iter_mut() {
                    if p.status.is_none() && p.restarts > 0 {
                        eprintln!("geomx launch: stopping {}: the job has finished", p.name);
                        p.stop();
                    }
                }
            }
        }
        if pending.is_empty() && cl.all_exited() {
            break;
        }
    }
    cl.drain();
    let wall = started.elapsed().as_secs_f64();
    let mut report = Report::assemble(
        std::mem::take(&mut cl.stats),
        std::mem::take(&mut cl.progress),
        job.rounds,
        wall,
        plan.placement.server_bytes.clone(),
        cfg.to_json(),
    );
    // What the processes logged, and what the coordinator's journal kept of processes that
    // died since (each event once), in time order.
    let mut events = Vec::new();
    for e in report.processes.iter().flat_map(|p| {
        p.member_events
            .iter()
            .chain(p.round_log.iter().flat_map(|l| &l.member_events))
    }) {
        if !events.contains(e) {
            events.push(e.clone());
        }
    }
    events.sort_by_key(|e| e.unix_ms);
    supervise::match_events(&mut faults, &events, job.rounds);
    supervise::complete_cuts(&mut faults);
    for (i, &(role, ..)) in &restartable {
        let n = cl.procs[*i].restarts;
        if n > 0 {
            *report.restarts.entry(role.to_string()).or_default() += n;
        }
    }
    report.faults = faults;
    report.wan_mode = wan.mode().to_string();
    if wan.mode() != wan::modes::OFF {
        report.wan_lab = Some(wan.figures());
    }
    if !opts.quiet {
        println!(
            "done: {} rounds in {:.2} s, test accuracy {:.4}, {:.0} samples/s, WAN {} bytes, LAN {} bytes, per global server {:?}",
            report.rounds, report.wall_seconds, report.final_test_accuracy, report.samples_per_s, report.wan_bytes, report.lan_bytes, report.per_global_server_bytes
        );
    }
    Ok(report)
}

/// The resolved configuration on disk for the children; removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> Result<Self, LaunchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("geomx-launch-{}-{nanos}.toml", std::process::id()));
        std::fs::write(&path, text)
            .map_err(|e| LaunchError::Io(format!("writing {}", path.display()), e))?;
        Ok(Self(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wanlab::guard;

    /// A child that exited is seen without being reaped, its pid leaves the WAN lab's guard, and
    /// only then is it reaped: the guard can no longer signal a pid the kernel may reuse.
    #[cfg(target_os = "linux")]
    #[test]
    fn exited_children_are_forgotten_by_the_guard_before_they_are_reaped() {
        let lab = guard::register(Vec::new());
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        guard::adopt_pid(lab, pid);
        // Block until it exits, leaving it unreaped (WNOWAIT).
        // SAFETY: as in `has_exited`, without WNOHANG.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(guard::pids(lab), vec![pid]);
        assert!(has_exited(pid).unwrap());
        let status = reap_if_exited(&mut child).unwrap();
        assert!(status.is_some_and(|s| s.success()));
        assert!(guard::pids(lab).is_empty());
        guard::teardown(lab);
        // A running child is neither reaped nor forgotten.
        let lab = guard::register(Vec::new());
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        guard::adopt_pid(lab, sleeper.id());
        assert_eq!(reap_if_exited(&mut sleeper).unwrap(), None);
        assert_eq!(guard::pids(lab), vec![sleeper.id()]);
        let _ = sleeper.kill();
        guard::forget_pid(sleeper.id());
        let _ = sleeper.wait();
        guard::teardown(lab);
    }
}
