//! `geomx deploy k8s FILE --out DIR`: Kubernetes manifests and a container recipe.
//!
//! [`manifests`] gives, for a job named `NAME`:
//! - ConfigMap `NAME-job` with the job file (`job.toml`), mounted at `/etc/geomx`;
//! - per tier (central, then each data center `d`), a headless Service `NAME-central` /
//!   `NAME-dc<d>` (`publishNotReadyAddresses`, so names resolve while pods start) and an Indexed
//!   Job of the same name, completions = the tier's size, whose pods are `<job>-<index>` in the
//!   Service's subdomain. Each pod runs `geomx run --from-env` with `GEOMX_TIER`, the
//!   coordinator's address `NAME-central-0.NAME-central:PORT` and its pod IP as the bind host;
//!   `backoffLimit: 0` ends a Job at its first failed pod, and geomx's own timeouts end the rest.
//! - GPU models (`model.device = "cuda…"`) request `nvidia.com/gpu: 1` for every pod of the DC
//!   Jobs (the local server's pod too: one Job per DC has one pod template); the central tier
//!   never needs a GPU.
//!
//! [`containerfile`] builds the binary in one stage and copies it, with libtorch when the model
//! needs it, into a slim runtime image. [`pods`] reads manifests back into the pods a cluster
//! would run (the offline harness of the tests uses it).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::from_env::{BIND_HOST_VAR, COORDINATOR_VAR, TIER_VAR};
use super::roles::{RoleTable, Tier};
use super::slurm::uses_gpu;
use super::DeployError;
use crate::config::{Config, ModelKind, SecurityMode, SECURITY_DIR_ENV};

/// Where the ConfigMap with the job file is mounted.
pub const CONFIG_DIR: &str = "/etc/geomx";
/// The job file's key in the ConfigMap.
pub const CONFIG_KEY: &str = "job.toml";

/// What the manifests name besides the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sOptions {
    /// Prefix of every resource name (a DNS label, at most 40 characters).
    pub name: String,
    /// The container image with `geomx` on its PATH.
    pub image: String,
    /// `metadata.namespace` of every resource, if any.
    pub namespace: Option<String>,
    /// The coordinator's port.
    pub coordinator_port: u16,
    /// CPU request of each pod.
    pub cpu: String,
    /// Memory request of each pod.
    pub memory: String,
}

/// A DNS-1035 label from `s`: lower-case letters, digits and `-`, starting with a letter.
pub fn dns_label(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out = out.trim_matches('-').to_string();
    if out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out
    } else {
        format!("g-{out}").trim_end_matches('-').to_string()
    }
}

fn tier_suffix(t: Tier) -> String {
    match t {
        Tier::Central => "central".into(),
        Tier::Dc(d) => format!("dc{d}"),
    }
}

/// Name of the Service and the Job of `tier`.
pub fn tier_name(name: &str, t: Tier) -> String {
    format!("{name}-{}", tier_suffix(t))
}

/// The coordinator's address as the pods see it.
pub fn coordinator_address(o: &K8sOptions) -> String {
    let svc = tier_name(&o.name, Tier::Central);
    format!("{svc}-0.{svc}:{}", o.coordinator_port)
}

fn labels(o: &K8sOptions, t: Option<Tier>) -> Value {
    let mut m = json!({
        "app.kubernetes.io/name": "geomx",
        "app.kubernetes.io/instance": o.name,
    });
    if let Some(t) = t {
        m["geomx.io/tier"] = json!(tier_suffix(t));
    }
    m
}

fn metadata(o: &K8sOptions, name: &str, t: Option<Tier>) -> Value {
    let mut m = json!({"name": name, "labels": labels(o, t)});
    if let Some(ns) = &o.namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// The manifests of the job `cfg` describes; `job_file` is the text the ConfigMap holds.
pub fn manifests(cfg: &Config, job_file: &str, o: &K8sOptions) -> Result<Vec<Value>, DeployError> {
    if o.name.len() > 40 || dns_label(&o.name) != o.name {
        return Err(DeployError::Invalid(format!(
            "name {:?}: expected a DNS label of at most 40 characters (lower-case letters, digits, \
             '-'), e.g. {:?}",
            o.name,
            dns_label(&o.name).chars().take(40).collect::<String>()
        )));
    }
    let table = RoleTable::from_config(cfg);
    let gpu = uses_gpu(cfg);
    let config_map = format!("{}-job", o.name);
    let mut docs = vec![json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(o, &config_map, None),
        "data": {CONFIG_KEY: job_file},
    })];
    // Mutual TLS without a `geomx pki` directory of the user's: a job CA made now, every pod's
    // key in one Secret, mounted read-only for the job's pods (docs/security.md).
    let pki = cfg.security.mode == SecurityMode::Mtls && cfg.security.dir.is_none();
    let secret = format!("{}-pki", o.name);
    let secret_doc = match pki {
        true => Some(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(o, &secret, None),
            "type": "Opaque",
            "stringData": pki_files(cfg)?,
        })),
        false => None,
    };
    for pos in 0..table.tiers() {
        let tier = Tier::from_position(pos);
        let name = tier_name(&o.name, tier);
        let n = table.tier_len(tier);
        let mut svc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(o, &name, Some(tier)),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": true,
                "selector": labels(o, Some(tier)),
            },
        });
        let mut container = json!({
            "name": "geomx",
            "image": o.image,
            "command": ["geomx", "run", "--from-env", "--config", format!("{CONFIG_DIR}/{CONFIG_KEY}")],
            "env": [
                {"name": TIER_VAR, "value": tier.to_string()},
                {"name": COORDINATOR_VAR, "value": coordinator_address(o)},
                {"name": BIND_HOST_VAR, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            "resources": {"requests": {"cpu": o.cpu, "memory": o.memory}},
            "volumeMounts": [{"name": "job", "mountPath": CONFIG_DIR, "readOnly": true}],
        });
        let mut volumes = vec![json!({"name": "job", "configMap": {"name": config_map}})];
        if pki {
            if let Some(e) = container["env"].as_array_mut() {
                e.push(json!({"name": SECURITY_DIR_ENV, "value": PKI_DIR}));
            }
            if let Some(m) = container["volumeMounts"].as_array_mut() {
                m.push(json!({"name": "pki", "mountPath": PKI_DIR, "readOnly": true}));
            }
            volumes.push(
                json!({"name": "pki", "secret": {"secretName": secret, "defaultMode": 0o400}}),
            );
        }
        if tier == Tier::Central {
            let port = json!([{"name": "coordinator", "port": o.coordinator_port,
                               "targetPort": o.coordinator_port, "protocol": "TCP"}]);
            svc["spec"]["ports"] = port;
            container["ports"] = json!([{"name": "coordinator",
                                         "containerPort": o.coordinator_port, "protocol": "TCP"}]);
        }
        if gpu && tier != Tier::Central {
            container["resources"]["limits"] = json!({"nvidia.com/gpu": 1});
        }
        let job = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(o, &name, Some(tier)),
            "spec": {
                "completionMode": "Indexed",
                "completions": n,
                "parallelism": n,
                "backoffLimit": 0,
                "template": {
                    "metadata": {"labels": labels(o, Some(tier))},
                    "spec": {
                        "restartPolicy": "Never",
                        "subdomain": name,
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        });
        docs.push(svc);
        docs.push(job);
    }
    docs.extend(secret_doc);
    Ok(docs)
}

/// Where the Secret with the job's keys is mounted.
pub const PKI_DIR: &str = "/etc/geomx-pki";

/// The files of a fresh `geomx pki` directory for the job: the CA certificate, the job secret,
/// every process's key and certificate (the CA's key is not kept).
fn pki_files(cfg: &Config) -> Result<Value, DeployError> {
    let tmp = std::env::temp_dir().join(format!(
        "geomx-deploy-pki-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let err = |e: String| DeployError::Invalid(format!("making the job's keys: {e}"));
    let ca = geomx_net::tls::JobCa::generate("geomx", PKI_DAYS).map_err(|e| err(e.to_string()))?;
    let res =
        crate::security::issue_identities(&ca, &crate::security::config_identities(cfg), &tmp)
            .map_err(err)
            .and_then(|_| {
                let mut files = serde_json::Map::new();
                let entries = std::fs::read_dir(&tmp).map_err(|e| err(e.to_string()))?;
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let text = std::fs::read_to_string(e.path()).map_err(|e| err(e.to_string()))?;
                    files.insert(name, Value::String(text));
                }
                Ok(Value::Object(files))
            });
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

/// Validity of the certificates a Kubernetes deployment carries, in days.
const PKI_DAYS: u32 = 365;

/// Whether the job's model needs the libtorch back end.
fn needs_tch(cfg: &Config) -> bool {
    !matches!(cfg.model.kind, ModelKind::Mlp)
}

/// The container recipe: build `geomx` in one stage, ship it with its runtime libraries.
pub fn containerfile(cfg: &Config, image: &str) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let head = format!(
        "# geomx {version}: `geomx deploy k8s` wrote this recipe (docs/deployment.md).\n\
         # Build it from the repository root, e.g.:\n\
         #   podman build -f <this folder>/Containerfile -t {image} .\n\
         # Stage 1 builds the binary; stage 2 ships it with its runtime libraries only.\n"
    );
    if !needs_tch(cfg) {
        return format!(
            "{head}\
             FROM docker.io/library/rust:1-bookworm AS build\n\
             WORKDIR /src\n\
             COPY . .\n\
             RUN cargo build --release --locked -p geomx-trainer --bin geomx\n\
             \n\
             # The binary needs glibc, libgcc_s and libm only: the slim image has them.\n\
             FROM docker.io/library/debian:bookworm-slim\n\
             COPY --from=build /src/target/release/geomx /usr/local/bin/geomx\n\
             USER 65534:65534\n\
             ENTRYPOINT [\"/usr/local/bin/geomx\"]\n"
        );
    }
    let site = "/opt/torch/lib/python3.11/site-packages";
    format!(
        "{head}\
         # The model needs libtorch (feature `tch`, docs/tch.md): PyTorch 2.13.0's wheel provides it.\n\
         FROM docker.io/library/rust:1-bookworm AS build\n\
         RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \\\n\
         \x20   && rm -rf /var/lib/apt/lists/*\n\
         RUN python3 -m venv /opt/torch \\\n\
         \x20   && /opt/torch/bin/pip install --no-cache-dir torch==2.13.0\n\
         ENV LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV=/opt/torch \\\n\
         \x20   PYTHON_SYS_EXECUTABLE=/opt/torch/bin/python PATH=/opt/torch/bin:$PATH\n\
         WORKDIR /src\n\
         COPY . .\n\
         RUN cargo build --release --locked -p geomx-trainer --bin geomx --features tch\n\
         \n\
         # libtorch and its CUDA libraries at the path the binary's RUNPATH names; no Python.\n\
         FROM docker.io/library/debian:bookworm-slim\n\
         COPY --from=build {site}/torch/lib {site}/torch/lib\n\
         COPY --from=build {site}/nvidia {site}/nvidia\n\
         COPY --from=build /src/target/release/geomx /usr/local/bin/geomx\n\
         USER 65534:65534\n\
         ENTRYPOINT [\"/usr/local/bin/geomx\"]\n"
    )
}

/// Where one environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// A literal value.
    Value(String),
    /// A downward-API field (`status.podIP`, `metadata.name`, …).
    Field(String),
}

/// One pod a cluster would run for the manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The Job it belongs to.
    pub job: String,
    /// Its completion index.
    pub index: usize,
    /// Its host name (`<job>-<index>`).
    pub hostname: String,
    /// The subdomain (headless Service) it is resolvable in.
    pub subdomain: Option<String>,
    /// Its command and arguments.
    pub command: Vec<String>,
    /// Its environment as written.
    pub env: Vec<(String, EnvSource)>,
    /// ConfigMap and Secret mounts: (mount path, the files).
    pub mounts: Vec<(String, BTreeMap<String, String>)>,
}

impl Pod {
    /// `hostname.subdomain` (the name peers use), or the host name alone.
    pub fn dns_name(&self) -> String {
        match &self.subdomain {
            Some(s) => format!("{}.{s}", self.hostname),
            None => self.hostname.clone(),
        }
    }

    /// The environment the container sees with pod IP `ip`, as Kubernetes sets it: the variables
    /// as written (downward-API fields resolved), `JOB_COMPLETION_INDEX` and `HOSTNAME`.
    pub fn environment(&self, ip: &str) -> Result<Vec<(String, String)>, DeployError> {
        let mut out = vec![
            ("HOSTNAME".to_string(), self.hostname.clone()),
            ("JOB_COMPLETION_INDEX".to_string(), self.index.to_string()),
        ];
        for (k, src) in &self.env {
            let v = match src {
                EnvSource::Value(v) => v.clone(),
                EnvSource::Field(f) => match f.as_str() {
                    "status.podIP" => ip.to_string(),
                    "metadata.name" => self.hostname.clone(),
                    "metadata.annotations['batch.kubernetes.io/job-completion-index']" => {
                        self.index.to_string()
                    }
                    other => {
                        return Err(DeployError::Invalid(format!(
                            "pod {}: env {k} reads field {other:?}, which the harness does not \
                             provide",
                            self.hostname
                        )))
                    }
                },
            };
            out.push((k.clone(), v));
        }
        Ok(out)
    }
}

fn field<'a>(v: &'a Value, path: &str) -> Result<&'a Value, DeployError> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .ok_or_else(|| DeployError::Invalid(format!("manifest: no {path}")))
}

fn text(v: &Value, path: &str) -> Result<String, DeployError> {
    field(v, path)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| DeployError::Invalid(format!("manifest: {path} is not a string")))
}

/// The pods a cluster would run for `docs` (Indexed Jobs, with their ConfigMaps).
pub fn pods(docs: &[Value]) -> Result<Vec<Pod>, DeployError> {
    let kind = |d: &Value| {
        d.get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let mut maps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for d in docs
        .iter()
        .filter(|d| kind(d) == "ConfigMap" || kind(d) == "Secret")
    {
        let key = if kind(d) == "Secret" {
            "stringData"
        } else {
            "data"
        };
        let data = field(d, key)?
            .as_object()
            .ok_or_else(|| DeployError::Invalid(format!("manifest: {key} is not a map")))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        maps.insert(text(d, "metadata.name")?, data);
    }
    let mut out = Vec::new();
    for d in docs.iter().filter(|d| kind(d) == "Job") {
        let job = text(d, "metadata.name")?;
        if text(d, "spec.completionMode")? != "Indexed" {
            return Err(DeployError::Invalid(format!(
                "Job {job}: not an Indexed Job"
            )));
        }
        let n = field(d, "spec.completions")?
            .as_u64()
            .ok_or_else(|| DeployError::Invalid(format!("Job {job}: completions")))?;
        let spec = field(d, "spec.template.spec")?;
        let subdomain = spec
            .get("subdomain")
            .and_then(Value::as_str)
            .map(str::to_string);
        let volumes: BTreeMap<String, String> = spec
            .get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let source = match (v.get("configMap"), v.get("secret")) {
                    (Some(cm), _) => cm.get("name")?,
                    (None, Some(s)) => s.get("secretName")?,
                    (None, None) => return None,
                };
                Some((
                    v.get("name")?.as_str()?.to_string(),
                    source.as_str()?.to_string(),
                ))
            })
            .collect();
        let containers = spec
            .get("containers")
            .and_then(Value::as_array)
            .filter(|c| c.len() == 1)
            .ok_or_else(|| DeployError::Invalid(format!("Job {job}: expected one container")))?;
        let c = &containers[0];
        let strings = |key: &str| -> Vec<String> {
            c.get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let mut command = strings("command");
        command.extend(strings("args"));
        let mut env = Vec::new();
        for e in c.get("env").and_then(Value::as_array).into_iter().flatten() {
            let name = text(e, "name")?;
            let src = match (e.get("value"), e.get("valueFrom")) {
                (Some(v), _) => EnvSource::Value(v.as_str().unwrap_or_default().to_string()),
                (None, Some(from)) => EnvSource::Field(text(from, "fieldRef.fieldPath")?),
                (None, None) => EnvSource::Value(String::new()),
            };
            env.push((name, src));
        }
        let mut mounts = Vec::new();
        for m in c
            .get("volumeMounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let vol = text(m, "name")?;
            let cm = volumes.get(&vol).ok_or_else(|| {
                DeployError::Invalid(format!(
                    "Job {job}: volume {vol} is neither a ConfigMap nor a Secret volume"
                ))
            })?;
            let data = maps.get(cm).ok_or_else(|| {
                DeployError::Invalid(format!("Job {job}: {cm} is not in the manifests"))
            })?;
            mounts.push((text(m, "mountPath")?, data.clone()));
        }
        for index in 0..n as usize {
            out.push(Pod {
                job: job.clone(),
                index,
                hostname: format!("{job}-{index}"),
                subdomain: subdomain.clone(),
                command: command.clone(),
                env: env.clone(),
                mounts: mounts.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> K8sOptions {
        K8sOptions {
            name: "geomx-vanilla-hips".into(),
            image: "registry.example/geomx:0.1.0".into(),
            namespace: None,
            coordinator_port: 9092,
            cpu: "1".into(),
            memory: "1Gi".into(),
        }
    }

    #[test]
    fn one_service_and_indexed_job_per_tier_plus_the_config_map() {
        let docs = manifests(&Config::default(), "x = 1\n", &opts()).unwrap();
        let kinds: Vec<(String, String)> = docs
            .iter()
            .map(|d| (text(d, "kind").unwrap(), text(d, "metadata.name").unwrap()))
            .collect();
        let k = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            kinds,
            [
                k("ConfigMap", "geomx-vanilla-hips-job"),
                k("Service", "geomx-vanilla-hips-central"),
                k("Job", "geomx-vanilla-hips-central"),
                k("Service", "geomx-vanilla-hips-dc0"),
                k("Job", "geomx-vanilla-hips-dc0"),
                k("Service", "geomx-vanilla-hips-dc1"),
                k("Job", "geomx-vanilla-hips-dc1"),
                k("Secret", "geomx-vanilla-hips-pki"),
            ]
        );
        assert_eq!(docs[1]["spec"]["clusterIP"], "None");
        assert_eq!(docs[2]["spec"]["completions"], 2);
        assert_eq!(docs[4]["spec"]["completions"], 3);
        // CPU model: no GPU anywhere.
        assert!(!serde_json::to_string(&docs)
            .unwrap()
            .contains("nvidia.com/gpu"));

        let pods = pods(&docs).unwrap();
        assert_eq!(pods.len(), 8);
        let p = &pods[3];
        assert_eq!(
            p.dns_name(),
            "geomx-vanilla-hips-dc0-1.geomx-vanilla-hips-dc0"
        );
        assert_eq!(
            p.command,
            [
                "geomx",
                "run",
                "--from-env",
                "--config",
                "/etc/geomx/job.toml"
            ]
        );
        let env: BTreeMap<_, _> = p.environment("198.19.0.13").unwrap().into_iter().collect();
        assert_eq!(env["JOB_COMPLETION_INDEX"], "1");
        assert_eq!(env["GEOMX_TIER"], "0");
        assert_eq!(env["GEOMX_BIND_HOST"], "198.19.0.13");
        assert_eq!(
            env["GEOMX_COORDINATOR"],
            "geomx-vanilla-hips-central-0.geomx-vanilla-hips-central:9092"
        );
        assert_eq!(p.mounts[0].0, "/etc/geomx");
        assert_eq!(p.mounts[0].1["job.toml"], "x = 1\n");
        // Mutual TLS: every pod's key in the Secret, its directory named to the process.
        assert_eq!(env["GEOMX_SECURITY_DIR"], PKI_DIR);
        assert_eq!(p.mounts[1].0, PKI_DIR);
        let files = &p.mounts[1].1;
        for f in [
            "ca.pem",
            "job.secret",
            "worker-dc0-rank1.pem",
            "worker-dc0-rank1.key",
        ] {
            assert!(files.contains_key(f), "{f}: {:?}", files.keys());
        }
        assert!(
            !files.contains_key("ca.key"),
            "the CA's key stays out of the cluster"
        );
        // The coordinator is pod 0 of the central Job, which the central Service names.
        assert_eq!(
            format!("{}:9092", pods[0].dns_name()),
            coordinator_address(&opts())
        );
    }

    #[test]
    fn gpu_workers_request_a_gpu_and_the_central_tier_none() {
        let mut cfg = Config::default();
        cfg.model.device = "cuda:local".into();
        let docs = manifests(&cfg, "", &opts()).unwrap();
        let gpu = |d: &Value| {
            d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                .as_u64()
        };
        assert_eq!(gpu(&docs[2]), None);
        assert_eq!(gpu(&docs[4]), Some(1));
        assert_eq!(gpu(&docs[6]), Some(1));
        assert!(containerfile(&cfg, "img").contains("--bin geomx\n"));
        cfg.model.kind = ModelKind::Resnet18;
        let c = containerfile(&cfg, "img");
        assert!(
            c.contains("--features tch") && c.contains("torch==2.13.0"),
            "{c}"
        );
        assert_eq!(c.matches("FROM ").count(), 2, "{c}");
    }

    #[test]
    fn names_are_dns_labels() {
        assert_eq!(dns_label("vanilla-hips"), "vanilla-hips");
        assert_eq!(dns_label("My_Job.v2"), "my-job-v2");
        assert_eq!(dns_label("2dc"), "g-2dc");
        assert_eq!(dns_label("--a--b--"), "a-b");
        let mut o = opts();
        o.name = "Bad_Name".into();
        let e = manifests(&Config::default(), "", &o).unwrap_err();
        assert!(e.to_string().contains("\"bad-name\""), "{e}");
        o.name = "a".repeat(41);
        assert!(manifests(&Config::default(), "", &o).is_err());
    }
}
