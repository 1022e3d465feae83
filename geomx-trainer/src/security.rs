//! Where each process of a job gets its certificate: the [`Keyring`].
//!
//! * `geomx launch` makes an ephemeral job CA in memory and writes each child's credentials to
//!   the child's stdin ([`Keyring::read_bundles`]); nothing secret touches the disk.
//! * Jobs started otherwise (Slurm, Kubernetes, by hand on several hosts) read them from
//!   `security.dir`, made by `geomx pki` ([`Keyring::from_dir`], [`issue_job`]).
//! * In-process clusters (tests, `launch::threads`) use an ephemeral CA directly
//!   ([`Keyring::ephemeral`]).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use geomx_net::tls::{Credentials, Identity, JobCa, TlsContext};

use crate::hips::plan::roles;
use crate::hips::ClusterPlan;

/// Validity of an ephemeral job CA and its certificates.
const EPHEMERAL_DAYS: u32 = 30;

/// The file stem of a process's key and certificate in a credentials directory.
pub fn file_stem(id: &Identity) -> String {
    format!("{}-dc{}-rank{}", id.role, id.dc, id.rank)
}

/// Every (role, dc, rank) of a job: coordinator, ESync endpoint, global and local servers,
/// workers.
pub fn job_identities(plan: &ClusterPlan) -> Vec<Identity> {
    identities(
        &plan.workers_per_dc,
        plan.num_global_servers(),
        plan.central_dc,
    )
}

/// [`job_identities`] of the job `cfg` describes (without loading its data).
pub fn config_identities(cfg: &crate::config::Config) -> Vec<Identity> {
    let workers: Vec<usize> = cfg.cluster.data_centers.iter().map(|d| d.workers).collect();
    identities(
        &workers,
        cfg.cluster.global_servers,
        cfg.cluster.central_index(),
    )
}

fn identities(workers_per_dc: &[usize], global_servers: usize, c: u32) -> Vec<Identity> {
    let mut v = vec![(roles::COORDINATOR, c, 0), (crate::hips::esync::ROLE, c, 0)];
    v.extend((0..global_servers as u32).map(|s| (roles::GLOBAL_SERVER, c, s)));
    for (d, &n) in workers_per_dc.iter().enumerate() {
        v.push((roles::LOCAL_SERVER, d as u32, 0));
        v.extend((0..n as u32).map(|r| (roles::WORKER, d as u32, r)));
    }
    v.into_iter()
        .filter_map(|(role, dc, rank)| Identity::new(role, dc, rank).ok())
        .collect()
}

/// Issues credentials for every process of the job into `dir` (`geomx pki issue`), and the
/// job secret if `dir` has none yet.
pub fn issue_job(ca: &JobCa, plan: &ClusterPlan, dir: &Path) -> Result<usize, String> {
    issue_identities(ca, &job_identities(plan), dir)
}

/// Issues credentials for `ids` into `dir`, and the job secret if `dir` has none yet.
pub fn issue_identities(ca: &JobCa, ids: &[Identity], dir: &Path) -> Result<usize, String> {
    ensure_secret_file(dir)?;
    for id in ids {
        ca.issue(id)
            .and_then(|c| c.write(dir, &file_stem(id)))
            .map_err(|e| format!("issuing {id}: {e}"))?;
    }
    Ok(ids.len())
}

/// Length of the job secret.
pub const SECRET_LEN: usize = 32;

/// A fresh random job secret.
pub fn new_secret() -> Result<[u8; SECRET_LEN], String> {
    let mut s = [0u8; SECRET_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
        .map_err(|_| "no system randomness for the job secret".to_string())?;
    Ok(s)
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<[u8; SECRET_LEN]> {
    let s = s.trim();
    if s.len() != 2 * SECRET_LEN {
        return None;
    }
    let mut out = [0u8; SECRET_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes a new job secret to `dir/job.secret` (mode 0600) unless one exists.
pub fn ensure_secret_file(dir: &Path) -> Result<(), String> {
    let path = dir.join(SECRET_FILE);
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{}\n", to_hex(&new_secret()?)).as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The job secret's file in a credentials directory.
pub const SECRET_FILE: &str = "job.secret";

/// Marks the job secret in the launcher's stdin hand-over.
const SECRET_LINE: &str = "# geomx job secret ";

enum Source {
    /// Credentials handed over by the launcher.
    Bundles(Vec<Credentials>),
    /// A `geomx pki` directory.
    Dir(PathBuf),
    /// A CA in this process that issues on demand.
    Ca(Box<JobCa>),
}

/// The certificates this process may use, by identity.
pub struct Keyring {
    source: Source,
    /// Keys the registration hash; shared by every member of the job.
    secret: OnceLock<Result<[u8; SECRET_LEN], String>>,
    contexts: Mutex<HashMap<Identity, Arc<TlsContext>>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").finish_non_exhaustive()
    }
}

/// Marks the end of one credential bundle in the launcher's stdin hand-over.
const BUNDLE_END: &str = "# end of geomx credentials\n";

impl Keyring {
    fn new(source: Source) -> Keyring {
        Keyring {
            source,
            secret: OnceLock::new(),
            contexts: Mutex::new(HashMap::new()),
        }
    }

    fn with_secret(self, secret: [u8; SECRET_LEN]) -> Keyring {
        let _ = self.secret.set(Ok(secret));
        self
    }

    /// The job secret: given with the keyring, or read from `security.dir`.
    fn secret(&self) -> Result<[u8; SECRET_LEN], String> {
        self.secret
            .get_or_init(|| match &self.source {
                Source::Dir(dir) => {
                    let path = dir.join(SECRET_FILE);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("{} (security.dir): {e}", path.display()))?;
                    from_hex(&text).ok_or_else(|| {
                        format!("{}: not a {SECRET_LEN}-byte hex secret", path.display())
                    })
                }
                _ => Err("the keyring has no job secret".into()),
            })
            .clone()
    }

    /// The configuration hash `h` keyed with the job secret: HMAC-SHA256, first 8 bytes. Only
    /// processes that hold the secret can present the hash registration expects.
    pub fn registration_hash(&self, h: u64) -> Result<u64, String> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.secret()?);
        let tag = ring::hmac::sign(&key, &h.to_le_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        Ok(u64::from_le_bytes(b))
    }

    /// A keyring with a fresh in-memory CA that issues any identity on demand.
    pub fn ephemeral(job: &str) -> Result<Keyring, String> {
        let ca = JobCa::generate(job, EPHEMERAL_DAYS).map_err(|e| e.to_string())?;
        Ok(Keyring::new(Source::Ca(Box::new(ca))).with_secret(new_secret()?))
    }

    /// The CA of an ephemeral keyring (the launcher issues its children's credentials with it).
    pub fn ca(&self) -> Option<&JobCa> {
        match &self.source {
            Source::Ca(ca) => Some(&**ca),
            _ => None,
        }
    }

    /// A keyring reading `dir` (made by `geomx pki`).
    pub fn from_dir(dir: &Path) -> Keyring {
        Keyring::new(Source::Dir(dir.to_path_buf()))
    }

    /// The text the launcher writes to a child's stdin: the job secret of this (ephemeral)
    /// keyring, then one bundle per identity in `ids`, issued by its CA.
    pub fn hand_over(&self, ids: &[Identity]) -> Result<String, String> {
        let ca = self
            .ca()
            .ok_or("only an ephemeral keyring issues credentials")?;
        let mut text = format!("{SECRET_LINE}{}\n", to_hex(&self.secret()?));
        for id in ids {
            let c = ca.issue(id).map_err(|e| format!("issuing {id}: {e}"))?;
            text.push_str(&c.to_bundle());
            text.push_str(BUNDLE_END);
        }
        Ok(text)
    }

    /// Reads the launcher's bundles from `input` (the child's stdin) to its end.
    pub fn read_bundles(input: impl Read) -> Result<Keyring, String> {
        let mut text = String::new();
        input
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading credentials from stdin: {e}"))?;
        let secret = text
            .lines()
            .find_map(|l| l.strip_prefix(SECRET_LINE))
            .and_then(from_hex)
            .ok_or("no job secret on stdin")?;
        let creds = text
            .split(BUNDLE_END)
            .map(|b| {
                b.lines()
                    .filter(|l| !l.starts_with(SECRET_LINE))
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
            })
            .filter(|b| !b.trim().is_empty())
            .map(|b| Credentials::from_bundle(&b).map_err(|e| format!("credentials on stdin: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if creds.is_empty() {
            return Err("no credentials on stdin".into());
        }
        Ok(Keyring::new(Source::Bundles(creds)).with_secret(secret))
    }

    /// The TLS context of `id` in this keyring.
    pub fn context(&self, id: &Identity) -> Result<Arc<TlsContext>, String> {
        let mut cache = crate::lock(&self.contexts);
        if let Some(c) = cache.get(id) {
            return Ok(c.clone());
        }
        let creds = match &self.source {
            Source::Ca(ca) => ca.issue(id).map_err(|e| e.to_string())?,
            Source::Dir(dir) => {
                let stem = file_stem(id);
                Credentials::read(
                    &dir.join("ca.pem"),
                    &dir.join(format!("{stem}.pem")),
                    &dir.join(format!("{stem}.key")),
                )
                .map_err(|e| format!("credentials of {id} (security.dir): {e}"))?
            }
            Source::Bundles(list) => list
                .iter()
                .find(|c| c.identity().is_ok_and(|i| &i == id))
                .cloned()
                .ok_or_else(|| format!("the launcher handed over no certificate for {id}"))?,
        };
        let ctx = Arc::new(TlsContext::new(&creds).map_err(|e| format!("{id}: {e}"))?);
        if ctx.identity() != id {
            return Err(format!(
                "the certificate for {id} states {} instead",
                ctx.identity()
            ));
        }
        cache.insert(id.clone(), ctx.clone());
        Ok(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_survive_the_stdin_hand_over_and_are_found_by_identity() {
        let launcher = Keyring::ephemeral("t").unwrap();
        let a = Identity::new("coordinator", 0, 0).unwrap();
        let b = Identity::new("esync", 0, 0).unwrap();
        let text = launcher.hand_over(&[a.clone(), b.clone()]).unwrap();
        let k = Keyring::read_bundles(text.as_bytes()).unwrap();
        assert_eq!(
            k.registration_hash(7).unwrap(),
            launcher.registration_hash(7).unwrap(),
            "the child keys the hash as the launcher does"
        );
        let other = Keyring::ephemeral("t").unwrap();
        assert_ne!(
            other.registration_hash(7).unwrap(),
            k.registration_hash(7).unwrap()
        );
        assert_ne!(
            k.registration_hash(8).unwrap(),
            k.registration_hash(7).unwrap()
        );
        assert_eq!(k.context(&b).unwrap().identity(), &b);
        assert_eq!(k.context(&a).unwrap().identity(), &a);
        let c = Identity::new("worker", 0, 0).unwrap();
        assert!(k
            .context(&c)
            .unwrap_err()
            .contains("no certificate for worker dc 0 rank 0"));
        assert!(Keyring::read_bundles(&b""[..]).is_err());
        assert!(Keyring::read_bundles(&b"garbage"[..]).is_err());
    }

    #[test]
    fn a_pki_directory_serves_every_process_of_the_job() {
        let dir = std::env::temp_dir().join(format!("geomx-pki-{}", std::process::id()));
        let ca = JobCa::generate("t", 1).unwrap();
        let plan = ClusterPlan::new(vec![2, 1], 2, 0, vec![10, 20], 1 << 20, 1).unwrap();
        let n = issue_job(&ca, &plan, &dir).unwrap();
        assert_eq!(n, 2 + 2 + 2 + 3);
        let k = Keyring::from_dir(&dir);
        let h = k.registration_hash(5).unwrap();
        issue_job(&ca, &plan, &dir).unwrap();
        assert_eq!(
            Keyring::from_dir(&dir).registration_hash(5).unwrap(),
            h,
            "secret kept"
        );
        for id in job_identities(&plan) {
            assert_eq!(k.context(&id).unwrap().identity(), &id);
        }
        let missing = Identity::new("worker", 1, 1).unwrap();
        let err = k.context(&missing).unwrap_err();
        assert!(err.contains("worker-dc1-rank1.pem"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("worker-dc0-rank0.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "keys are private to their owner");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
