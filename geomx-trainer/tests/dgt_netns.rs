//! DGT under real loss (dgt.md test oracle, wan-lab.md loss filter): every role of a 2-DC job runs
//! on its own thread, the coordinator and global server inside a "central" network namespace,
//! the local servers and workers inside a "site" namespace; the veth between them drops 10 % of
//! the UDP datagrams each way (classic-BPF filter into a `pfifo limit 0` class). FSA training with
//! `transport.inter = "dgt"` converges within 2 accuracy points of the all-TCP run on the same
//! link, the DGT counters saw the loss, and they agree with the filter's drops. A second test runs
//! the same job as processes through `geomx launch` with `[wan] mode = "netns"` (router, delay).
//! Root only: otherwise each test prints its SKIPPED line and returns.

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geomx_net::dgt::link::{DgtServer, ServerTls, MAX_DGT_HANDSHAKES};
use geomx_net::dgt::ValueType;
use geomx_net::tls::{Identity, JobCa, Security, TlsContext, MAX_HANDSHAKES_PER_ADDR};
use geomx_net::NetOptions;
use geomx_trainer::config::{Config, DgtTransportConfig};
use geomx_trainer::hips::dgt;
use geomx_trainer::hips::dgt_lab::{self, DgtLab, LossScope, Serving, CENTRAL_ADDR};
use geomx_trainer::hips::node::FatalHook;
use geomx_trainer::hips::worker::ProgressSink;
use geomx_trainer::hips::{coordinator, global_server, local_server, worker, JobSpec, RoleStats};

mod support;

const EXAMPLE: &str = include_str!("../../examples/dgt.toml");

fn config(dgt: bool) -> Config {
    // hidden [64]: at MTU 1500 the 4,096-element weight spans 12 blocks of 1,408 bytes, so with
    // k = 0.5 half of them cross the lossy UDP channels.
    let mut toml = EXAMPLE
        .replace("rounds = 400", "rounds = 300")
        .replace("eval_every = 100", "eval_every = 300")
        .replace("k = 0.8 ", "k = 0.5 ")
        .replace("gso = true ", "gso = false ");
    if !dgt {
        toml = toml.replace("inter = \"dgt\"", "inter = \"tcp\"");
    }
    let c = Config::from_toml_str(&toml).unwrap();
    c.validate().unwrap();
    c
}

/// Runs every role of `job` on `lab`; returns their stats.
fn run_cluster(lab: &DgtLab, job: &JobSpec) -> Vec<RoleStats> {
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let e2 = errors.clone();
    let fatal: FatalHook = Arc::new(move |m: &str| e2.lock().unwrap().push(m.to_string()));
    let progress: ProgressSink = Arc::new(|_| {});
    let (res_tx, res_rx) = std::sync::mpsc::channel();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let central = format!("{CENTRAL_ADDR}:0");
    {
        let (j, tx, a) = (job.clone(), res_tx.clone(), central.clone());
        lab.spawn_in(false, move || {
            let r = coordinator::run(&j, &a, |x| addr_tx.send(x.to_string()).unwrap());
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })
        .unwrap();
    }
    let coord = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let spawn = |site: bool, f: Box<dyn FnOnce() -> Result<RoleStats, String> + Send>| {
        let tx = res_tx.clone();
        lab.spawn_in(site, move || {
            let _ = tx.send(f());
        })
        .unwrap();
    };
    let plan = &job.plan;
    for s in 0..plan.num_global_servers() as u32 {
        let (j, c, f, a) = (job.clone(), coord.clone(), fatal.clone(), central.clone());
        spawn(
            false,
            Box::new(move || global_server::run(&j, s, &c, &a, f).map_err(|e| e.to_string())),
        );
    }
    for (d, &n) in plan.workers_per_dc.iter().enumerate() {
        let d = d as u32;
        let (j, c, f) = (job.clone(), coord.clone(), fatal.clone());
        spawn(
            true,
            Box::new(move || {
                local_server::run(&j, d, &c, "127.0.0.1:0", f).map_err(|e| e.to_string())
            }),
        );
        for r in 0..n as u32 {
            let (j, c, f, p) = (job.clone(), coord.clone(), fatal.clone(), progress.clone());
            spawn(
                true,
                Box::new(move || {
                    worker::run(&j, d, r, &c, "127.0.0.1", f, p).map_err(|e| e.to_string())
                }),
            );
        }
    }
    let total = 1 + plan.num_global_servers() + plan.num_dcs() + plan.total_workers();
    let mut out = Vec::new();
    for _ in 0..total {
        match res_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(s)) => out.push(s),
            Ok(Err(e)) => panic!("role failed: {e}; fatal: {:?}", errors.lock().unwrap()),
            Err(_) => panic!("cluster hung; fatal: {:?}", errors.lock().unwrap()),
        }
    }
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    out
}

fn accuracy(stats: &[RoleStats]) -> f64 {
    stats
        .iter()
        .find_map(|s| s.final_test_accuracy)
        .expect("the reporting worker's accuracy")
}

/// One lab test at a time: their traffic and loss counts must not compete for the 2 cores.
static ONE_LAB: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn dgt_converges_with_ten_percent_udp_loss() {
    if dgt_lab::root_available().is_err() {
        println!(
            "{}",
            dgt_lab::skip_line("dgt_converges_with_ten_percent_udp_loss")
        );
        return;
    }
    let _one = serial();
    let lab = DgtLab::build(Some(100.0), 0.10, LossScope::Udp, 0.0).unwrap();
    let tcp = run_cluster(&lab, &JobSpec::from_config(&config(false)).unwrap());
    let (d0, d1) = lab.drops();
    assert_eq!(d0 + d1, 0, "no UDP in the all-TCP run, so nothing dropped");
    let dgt = run_cluster(&lab, &JobSpec::from_config(&config(true)).unwrap());
    let (a_tcp, a_dgt) = (accuracy(&tcp), accuracy(&dgt));
    eprintln!("accuracy: tcp {a_tcp:.4}, dgt {a_dgt:.4}");
    assert!(a_tcp >= 0.9, "all-TCP accuracy {a_tcp}");
    assert!(a_dgt >= a_tcp - 0.02, "dgt {a_dgt} vs tcp {a_tcp}");
    // The zeroed blocks changed the trajectory: the final parameters differ from all-TCP's.
    let hash = |st: &[RoleStats]| st.iter().find_map(|s| s.param_hash).unwrap();
    assert_ne!(
        hash(&tcp),
        hash(&dgt),
        "lost blocks must change the parameters"
    );
    let g = dgt
        .iter()
        .find(|s| s.role == "global_server")
        .and_then(|s| s.dgt.clone())
        .expect("global dgt stats");
    let l: Vec<_> = dgt
        .iter()
        .filter(|s| s.role == "local_server")
        .filter_map(|s| s.dgt.clone())
        .collect();
    assert_eq!(l.len(), 2);
    eprintln!("global {g:?}\nlocal {l:?}");
    let sent: u64 = l.iter().map(|s| s.unreliable_blocks).sum();
    // Datagrams went out, about 10 % were lost for good, none was invalid.
    assert_eq!(
        g.unreliable_blocks, sent,
        "terminators list what the senders sent"
    );
    let lost = g.lost_blocks as f64 / sent as f64;
    assert!(
        (0.06..0.14).contains(&lost),
        "lost fraction {lost} of {sent}"
    );
    assert_eq!(g.invalid, 0);
    // The filter dropped every lost datagram (late ones arrived, so drops ≥ lost), and some of
    // the terminators' datagram copies (the datagrams beyond the blocks); site → central
    // carries the datagrams, central → site only TCP, which the UDP-only filter never drops.
    let copies: u64 = l.iter().map(|s| s.datagrams - s.unreliable_blocks).sum();
    assert!(copies > 0, "{l:?}");
    let (up, down) = lab.drops();
    assert_eq!(down, 0);
    assert!(
        up >= g.lost_blocks && up <= g.lost_blocks + g.late_blocks + copies,
        "drops {up}, {g:?}, copies {copies}"
    );
}

/// `geomx launch` inside the WAN lab (`[wan] mode = "netns"`: 100 Mbit/s, 10 ms one way, 5 % UDP
/// loss): every role is a process in the lab's namespaces, DGT crosses the router and the delay
/// relay, training converges and the receiver counted the loss.
#[test]
fn dgt_launch_in_the_wan_lab() {
    if dgt_lab::root_available().is_err() {
        println!("{}", dgt_lab::skip_line("dgt_launch_in_the_wan_lab"));
        return;
    }
    let _one = serial();
    let toml = format!(
        "{}\n[wan]\nmode = \"netns\"\nrate_mbit = 100.0\ndelay_ms = 10.0\nloss = 0.05\n\
         loss_scope = \"udp\"\n",
        EXAMPLE
            .replace("rounds = 400", "rounds = 200")
            .replace("eval_every = 100", "eval_every = 200")
            .replace("k = 0.8 ", "k = 0.5 ")
            .replace("gso = true ", "gso = false ")
    );
    let r = support::launch_report("dgt-wan", "launch", &toml);
    assert_eq!(r["wan_mode"], "netns");
    let acc = support::accuracy(&r);
    assert!(acc >= 0.9, "accuracy {acc}");
    let g = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "global_server")
        .map(|p| p["dgt"].clone())
        .unwrap();
    let n = |k: &str| g[k].as_u64().unwrap_or(0);
    assert!(n("unreliable_blocks") > 0 && n("lost_blocks") > 0, "{g}");
    assert!(n("lost_blocks") < n("unreliable_blocks") / 5, "{g}");
    assert_eq!(n("invalid"), 0, "{g}");
}

/// A local server's DGT link under mutual TLS, from the site namespace to the receiver at `addr`,
/// retrying dropped handshakes until `within` has passed.
fn member_link(
    lab: &DgtLab,
    ca: &Arc<JobCa>,
    addr: SocketAddr,
    within: Duration,
) -> Result<(), String> {
    let ca = ca.clone();
    lab.spawn_in(true, move || {
        let creds = ca
            .issue(&Identity::new("local_server", 0, 0).unwrap())
            .unwrap();
        let net = NetOptions {
            security: Security::Mtls(Arc::new(TlsContext::new(&creds).unwrap())),
            ..NetOptions::default()
        };
        let d = DgtTransportConfig::default();
        dgt::connect(addr, 1, &d, &net, Instant::now() + within).map(drop)
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap()
}

/// `n` silent connections to `addr` from the site (`site = true`) or central namespace: a
/// stranger holding TLS handshakes open.
fn silent_flood(lab: &DgtLab, site: bool, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    lab.spawn_in(site, move || {
        (0..n)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect::<Vec<_>>()
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap()
}

/// A global server's DGT receiver for local servers under `ca`, in the central namespace: its
/// address, and what keeps it there.
fn receiver(lab: &DgtLab, ca: &Arc<JobCa>) -> (SocketAddr, Serving) {
    let ca = ca.clone();
    lab.serve_central(move || {
        let creds = ca
            .issue(&Identity::new("global_server", 2, 0).unwrap())
            .unwrap();
        let tls = ServerTls {
            ctx: Arc::new(TlsContext::new(&creds).unwrap()),
            roles: vec!["local_server".into()],
        };
        let (cfg, _) = dgt::link_config(&DgtTransportConfig::default());
        let keys = [(0, 1024, ValueType::F32)];
        let s = DgtServer::bind_secure(CENTRAL_ADDR.into(), cfg, &keys, None, Some(tls))
            .map_err(|e| e.to_string())?;
        let addr = s.local_addr();
        Ok((s, addr))
    })
    .unwrap()
}

/// docs/security.md, "Bounds": a stranger who opens silent connections at the global server's
/// DGT port holds at most a few handshake slots per address (before, one address could take all
/// 16 and every local server's link was refused: the job ended), and a local server whose
/// handshake was dropped tries again until its deadline.
#[test]
fn a_flood_of_silent_dgt_connections_does_not_keep_a_local_server_out() {
    let name = "a_flood_of_silent_dgt_connections_does_not_keep_a_local_server_out";
    if dgt_lab::root_available().is_err() {
        println!("{}", dgt_lab::skip_line(name));
        return;
    }
    let _one = serial();
    let lab = DgtLab::build(None, 0.0, LossScope::Udp, 0.0).unwrap();
    let ca = Arc::new(JobCa::generate("flood", 1).unwrap());
    // A stranger at another address than the local server's (the central namespace's own,
    // not loopback) opens more silent connections than the receiver has slots. The receiver
    // accepts in arrival order, so they are all taken or closed before the member's.
    let (addr, serving) = receiver(&lab, &ca);
    let flood = silent_flood(&lab, false, addr, 3 * MAX_DGT_HANDSHAKES);
    member_link(&lab, &ca, addr, Duration::ZERO).expect("a member from another address");
    drop((flood, serving));
    // The same from the member's own address, at a receiver that has not met the member yet:
    // its handshake is dropped (no retry: an error)…
    let (addr, _serving) = receiver(&lab, &ca);
    let flood = silent_flood(&lab, true, addr, MAX_HANDSHAKES_PER_ADDR);
    let e = member_link(&lab, &ca, addr, Duration::ZERO).unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    // …and retried until the slots free up (the stranger leaves after a second; the receiver
    // would close its connections after its 10 s handshake limit anyway).
    let t = Instant::now();
    let leave = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(flood);
    });
    member_link(&lab, &ca, addr, Duration::from_secs(30)).expect("retried until admitted");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    leave.join().unwrap();
}
