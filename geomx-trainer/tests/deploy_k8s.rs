//! Kubernetes without a cluster.
//!
//! - The manifests of `geomx deploy k8s` pass `kubernetes-validate` (PyPI, pinned in .ci/run)
//!   against the Kubernetes 1.33 schemas, strictly; skips with a `SKIPPED` line when it is not
//!   installed.
//! - A harness reads the written manifests and runs each pod's command with its environment
//!   (`JOB_COMPLETION_INDEX`, the pod IP, …) in a network namespace of its own, the namespaces
//!   joined by a bridge on 198.19.0.0/16 and every pod's `<hostname>.<subdomain>` in each
//!   namespace's /etc/hosts (`ip netns exec` mounts /etc/netns/<ns>/hosts); the job must end with
//!   `geomx launch`'s `param_hash`. Needs root; skips with a `SKIPPED` line otherwise. Everything
//!   it makes is removed at the end, on panic too, and stale leftovers of killed runs at the start.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use geomx_trainer::config::Config;
use geomx_trainer::deploy::k8s::{self, K8sOptions};
use geomx_trainer::deploy::yaml;
use serde_json::{json, Value};
use support::{launch_report, output_within, scratch, GEOMX, LAUNCH_LIMIT};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Parses a YAML stream into JSON values (yaml-rust2, independent of our writer).
fn parse_yaml(text: &str) -> Vec<Value> {
    fn conv(y: &yaml_rust2::Yaml) -> Value {
        use yaml_rust2::Yaml;
        match y {
            Yaml::Real(r) => json!(r.parse::<f64>().unwrap()),
            Yaml::Integer(i) => json!(i),
            Yaml::String(s) => json!(s),
            Yaml::Boolean(b) => json!(b),
            Yaml::Array(a) => Value::Array(a.iter().map(conv).collect()),
            Yaml::Hash(h) => Value::Object(
                h.iter()
                    .map(|(k, v)| (k.as_str().unwrap().to_string(), conv(v)))
                    .collect(),
            ),
            Yaml::Null => Value::Null,
            other => panic!("unexpected YAML node {other:?}"),
        }
    }
    yaml_rust2::YamlLoader::load_from_str(text)
        .unwrap()
        .iter()
        .map(conv)
        .collect()
}

/// `geomx deploy k8s FILE --out DIR`; returns DIR.
fn deploy(file: &Path, tag: &str) -> PathBuf {
    let dir = scratch("deploy-k8s", tag);
    let _ = std::fs::remove_dir_all(&dir);
    let out = output_within(
        Command::new(GEOMX)
            .args(["deploy", "k8s"])
            .arg(file)
            .arg("--out")
            .arg(&dir),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The kubernetes-validate executable: `$GEOMX_KUBERNETES_VALIDATE`, else on PATH.
fn kubernetes_validate() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GEOMX_KUBERNETES_VALIDATE") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("kubernetes-validate"))
            .find(|p| p.is_file())
    })
}

#[test]
fn manifests_pass_kubernetes_validate() {
    const TEST: &str = "manifests_pass_kubernetes_validate";
    let Some(kv) = kubernetes_validate() else {
        println!(
            "SKIPPED {TEST}: kubernetes-validate is not installed (pip install \
             kubernetes-validate==1.33.1, or set GEOMX_KUBERNETES_VALIDATE)"
        );
        return;
    };
    let dir = deploy(&repo_file("examples/vanilla-hips.toml"), "validate");
    // A GPU job's manifests too (built from the library: a CPU-only binary refuses to load a
    // libtorch model's job file).
    let mut gpu = Config::default();
    gpu.model.device = "cuda:local".into();
    let o = K8sOptions {
        name: "geomx-gpu".into(),
        image: "registry.example/geomx:0.1.0".into(),
        namespace: Some("training".into()),
        coordinator_port: 9092,
        cpu: "2".into(),
        memory: "4Gi".into(),
    };
    let docs = k8s::manifests(&gpu, &gpu.to_toml_string().unwrap(), &o).unwrap();
    let gpu_yaml = dir.join("gpu.yaml");
    std::fs::write(&gpu_yaml, yaml::documents(&docs)).unwrap();
    let out = output_within(
        Command::new(&kv)
            .args(["--kubernetes-version", "1.33.0", "--strict"])
            .arg(dir.join("geomx.yaml"))
            .arg(&gpu_yaml),
        Duration::from_secs(300),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{TEST}: kubernetes-validate --strict (1.33.0):\n{text}");
    assert!(out.status.success(), "{text}");
    // 8 documents each (ConfigMap, a Service and a Job per tier, the Secret with the job's keys),
    // all valid.
    assert_eq!(text.matches(" passed for resource ").count(), 16, "{text}");
    assert_eq!(
        text.matches(" passed for resource secret/").count(),
        2,
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&gpu_yaml)
            .unwrap()
            .matches("nvidia.com/gpu: 1")
            .count(),
        2,
        "one GPU per pod of each DC Job"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `cmd` and panics with its output unless it succeeds.
fn sh(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespace names of this harness: `gk<pid hex>-…` (the WAN lab's are `gx…`).
fn prefix_of(pid: u32) -> String {
    format!("gk{pid:x}")
}

/// Deletes namespaces (and their /etc/netns folders) left by harness runs whose process is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        let Some(pid) = name
            .strip_prefix("gk")
            .and_then(|r| r.split_once('-'))
            .and_then(|(hex, _)| u32::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}

/// The harness's namespaces and processes; dropping it kills the processes and removes the
/// namespaces with their interfaces and /etc/netns folders.
struct Cluster {
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

#[test]
fn pods_in_network_namespaces_match_launch() {
    const TEST: &str = "pods_in_network_namespaces_match_launch";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED {TEST}: needs root to create network namespaces");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        println!("SKIPPED {TEST}: the ip command (iproute2) is not installed");
        return;
    }
    sweep_stale();
    let file = repo_file("examples/vanilla-hips.toml");
    let launched = launch_report(
        "deploy-k8s",
        "launch",
        &std::fs::read_to_string(&file).unwrap(),
    );
    let dir = deploy(&file, "harness");
    let docs = parse_yaml(&std::fs::read_to_string(dir.join("geomx.yaml")).unwrap());
    let pods = k8s::pods(&docs).unwrap();
    assert_eq!(pods.len(), 8);

    let prefix = prefix_of(std::process::id());
    let switch = format!("{prefix}-sw");
    let mut cl = Cluster {
        namespaces: Vec::new(),
        children: Vec::new(),
    };
    sh(&["ip", "netns", "add", &switch]);
    cl.namespaces.push(switch.clone());
    sh(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &switch, "link", "set", "br0", "up"]);
    let ip_of = |i: usize| format!("198.19.0.{}", 10 + i);
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for (i, p) in pods.iter().enumerate() {
        hosts += &format!("{} {} {}\n", ip_of(i), p.dns_name(), p.hostname);
    }
    for (i, _) in pods.iter().enumerate() {
        let ns = format!("{prefix}-p{i}");
        sh(&["ip", "netns", "add", &ns]);
        cl.namespaces.push(ns.clone());
        let port = format!("p{i}");
        sh(&[
            "ip", "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        sh(&[
            "ip", "-n", &switch, "link", "set", &port, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/16", ip_of(i)),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let etc = PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("hosts"), &hosts).unwrap();
    }

    // Start every pod: its command, its environment only, its ConfigMap files at a scratch path
    // (the command's references to the mount path are pointed there).
    let logs = scratch("deploy-k8s", "logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    let mut outputs = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let ns = format!("{prefix}-p{i}");
        let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
        for (mount, data) in &p.mounts {
            let d = logs.join(format!("{}-{}", p.hostname, mount.replace('/', "_")));
            std::fs::create_dir_all(&d).unwrap();
            for (k, v) in data {
                std::fs::write(d.join(k), v).unwrap();
            }
            rewrites.insert(mount.clone(), d.display().to_string());
        }
        let fix = |s: &str| {
            rewrites
                .iter()
                .find_map(|(m, d)| s.strip_prefix(m.as_str()).map(|rest| format!("{d}{rest}")))
                .unwrap_or_else(|| s.to_string())
        };
        assert_eq!(p.command[0], "geomx", "{:?}", p.command);
        let args: Vec<String> = p.command[1..].iter().map(|a| fix(a)).collect();
        // Variables naming a mount path (GEOMX_SECURITY_DIR) are pointed at the files too.
        let env: Vec<(String, String)> = p
            .environment(&ip_of(i))
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, fix(&v)))
            .collect();
        let out_path = logs.join(format!("{}.out", p.hostname));
        let err_path = logs.join(format!("{}.err", p.hostname));
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, GEOMX])
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        cl.children.push((p.hostname.clone(), child));
        outputs.push((out_path, err_path));
    }
    let tails = || {
        outputs
            .iter()
            .map(|(_, e)| {
                let t = std::fs::read_to_string(e).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                format!(
                    "--- {}\n{}",
                    e.display(),
                    lines[lines.len().saturating_sub(6)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let deadline = Instant::now() + LAUNCH_LIMIT;
    loop {
        let mut running = 0;
        for (name, c) in &mut cl.children {
            match c.try_wait().unwrap() {
                None => running += 1,
                Some(s) if !s.success() => panic!("pod {name} failed ({s}):\n{}", tails()),
                Some(_) => {}
            }
        }
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods still running after {LAUNCH_LIMIT:?}:\n{}",
            tails()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The report from the pods' logs, as `kubectl logs` would give them.
    let config = logs
        .join(format!("{}-_etc_geomx", pods[0].hostname))
        .join("job.toml");
    let report_path = logs.join("report.json");
    let out = output_within(
        Command::new(GEOMX)
            .args(["deploy", "report", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&report_path)
            .args(outputs.iter().map(|(o, _)| o)),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    println!(
        "{TEST}: 8 pods in 9 namespaces: param_hash {} (launch {}), accuracy {} (launch {})",
        report["param_hash"],
        launched["param_hash"],
        report["final_test_accuracy"],
        launched["final_test_accuracy"]
    );
    assert_eq!(report["replicas_identical"], true);
    assert_eq!(report["param_hash"], launched["param_hash"]);
    drop(cl);
    // Nothing of this run is left.
    let left = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .lines()
    .filter(|l| l.starts_with(&format!("{prefix}-")))
    .count();
    assert_eq!(left, 0);
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::remove_dir_all(&dir);
}
