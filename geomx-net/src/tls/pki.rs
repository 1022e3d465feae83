//! The job's certificate authority and the credentials it issues (ECDSA P-256, via `rcgen`).
//!
//! `geomx launch` makes an ephemeral [`JobCa`] in memory and hands each child its
//! [`Credentials`]; multi-host jobs keep a CA on disk (`geomx pki`).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::identity::{Identity, JOB_SERVER_NAME};
use super::TlsError;

/// Certificates are valid from this long before they were made (clock skew between hosts).
const BACKDATE: time::Duration = time::Duration::hours(1);

fn pki_err(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Pki(format!("{what}: {e}"))
}

/// A job certificate authority: signs member certificates.
pub struct JobCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    valid_days: u32,
}

impl std::fmt::Debug for JobCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCa").finish_non_exhaustive()
    }
}

impl JobCa {
    /// A new CA named after `job`, valid for `valid_days` (and the certificates it issues too).
    pub fn generate(job: &str, valid_days: u32) -> Result<JobCa, TlsError> {
        let key = KeyPair::generate().map_err(pki_err("CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("CA"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("geomx job CA {job}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, valid_days)?;
        let cert = params
            .self_signed(&key)
            .map_err(pki_err("CA certificate"))?;
        Ok(JobCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            valid_days,
        })
    }

    /// A CA from its certificate and private key (PEM), e.g. written by [`JobCa::write`].
    pub fn from_pem(cert_pem: &str, key_pem: &str, valid_days: u32) -> Result<JobCa, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(pki_err("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(pki_err("CA certificate"))?;
        Ok(JobCa {
            cert_pem: cert_pem.to_string(),
            issuer,
            valid_days,
        })
    }

    /// The CA certificate (PEM), which every member trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PEM). Keep it secret: it can mint any identity.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| TlsError::io(dir, e))?;
        write_private(&dir.join("ca.pem"), self.cert_pem.as_bytes())?;
        write_private(&dir.join("ca.key"), self.key_pem().as_bytes())
    }

    /// Reads `ca.pem` and `ca.key` from `dir`.
    pub fn read(dir: &Path, valid_days: u32) -> Result<JobCa, TlsError> {
        let cert = read_text(&dir.join("ca.pem"))?;
        let key = read_text(&dir.join("ca.key"))?;
        JobCa::from_pem(&cert, &key, valid_days)
    }

    /// Issues a key and certificate for `id`, usable as TLS client and server.
    pub fn issue(&self, id: &Identity) -> Result<Credentials, TlsError> {
        let key = KeyPair::generate().map_err(pki_err("member key"))?;
        let mut params = CertificateParams::new(vec![JOB_SERVER_NAME.to_string(), id.dns_name()])
            .map_err(pki_err("member certificate"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.to_string());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, self.valid_days)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(pki_err("member certificate"))?;
        Ok(Credentials {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Longest validity of a job CA and its certificates, in days (100 years; beyond it dates stop
/// fitting a certificate long before the arithmetic does).
pub const MAX_VALID_DAYS: u32 = 36_500;

fn set_validity(params: &mut CertificateParams, valid_days: u32) -> Result<(), TlsError> {
    if valid_days > MAX_VALID_DAYS {
        return Err(TlsError::Pki(format!(
            "a validity of {valid_days} days is more than {MAX_VALID_DAYS}"
        )));
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(i64::from(valid_days.max(1)));
    Ok(())
}

/// What a member needs to join a job: the CA certificate, its own certificate and key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The job CA's certificate.
    pub ca_pem: String,
    /// This member's certificate.
    pub cert_pem: String,
    /// This member's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// One PEM text: the CA certificate, the member certificate, then the key (how `geomx
    /// launch` hands credentials to a child over a pipe).
    pub fn to_bundle(&self) -> String {
        format!("{}{}{}", self.ca_pem, self.cert_pem, self.key_pem)
    }

    /// Parses [`Credentials::to_bundle`]'s text: exactly two certificates and one private key.
    pub fn from_bundle(text: &str) -> Result<Credentials, TlsError> {
        let mut certs = Vec::new();
        let mut key = None;
        for item in rustls::pki_types::pem::PemObject::pem_slice_iter(text.as_bytes()) {
            let item: PemItem = item.map_err(|e| TlsError::Pki(format!("bad PEM: {e}")))?;
            match item {
                PemItem::Cert(c) => certs.push(c),
                PemItem::Key(k) if key.is_none() => key = Some(k),
                PemItem::Key(_) => return Err(TlsError::Pki("more than one private key".into())),
            }
        }
        let found = usize::from(key.is_some());
        let (Some(key), [ca, cert]) = (key, certs.as_slice()) else {
            return Err(TlsError::Pki(format!(
                "a credential bundle holds 2 certificates and 1 key, found {} and {found}",
                certs.len(),
            )));
        };
        Ok(Credentials {
            ca_pem: pem_cert(ca),
            cert_pem: pem_cert(cert),
            key_pem: key,
        })
    }

    /// Reads the three PEM files.
    pub fn read(ca: &Path, cert: &Path, key: &Path) -> Result<Credentials, TlsError> {
        Ok(Credentials {
            ca_pem: read_text(ca)?,
            cert_pem: read_text(cert)?,
            key_pem: read_text(key)?,
        })
    }

    /// Writes `<stem>.pem` and `<stem>.key` (mode 0600) and `ca.pem` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| TlsError::io(dir, e))?;
        write_private(&dir.join(format!("{stem}.pem")), self.cert_pem.as_bytes())?;
        write_private(&dir.join(format!("{stem}.key")), self.key_pem.as_bytes())?;
        let ca = dir.join("ca.pem");
        if !ca.exists() {
            write_private(&ca, self.ca_pem.as_bytes())?;
        }
        Ok(())
    }

    pub(crate) fn ca_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| TlsError::Pki(format!("CA certificate: {e}")))
    }

    /// The identity this member's certificate states.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        Identity::from_cert(&self.cert_der()?)
    }

    pub(crate) fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| TlsError::Pki(format!("certificate: {e}")))
    }

    pub(crate) fn key_der(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError::Pki(format!("private key: {e}")))
    }
}

/// A PEM section of a bundle.
enum PemItem {
    Cert(CertificateDer<'static>),
    Key(String),
}

impl PemObject for PemItem {
    fn from_pem(kind: rustls::pki_types::pem::SectionKind, der: Vec<u8>) -> Option<Self> {
        use rustls::pki_types::pem::SectionKind;
        match kind {
            SectionKind::Certificate => Some(PemItem::Cert(CertificateDer::from(der))),
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey => {
                Some(PemItem::Key(pem_encode(section_label(kind), &der)))
            }
            _ => None,
        }
    }
}

fn section_label(kind: rustls::pki_types::pem::SectionKind) -> &'static str {
    use rustls::pki_types::pem::SectionKind;
    match kind {
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        _ => "PRIVATE KEY",
    }
}

fn pem_cert(der: &CertificateDer<'_>) -> String {
    pem_encode("CERTIFICATE", der.as_ref())
}

/// PEM text of one section (base64, 64 columns).
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::io(path, e))
}

/// Creates `path` readable and writable by its owner only, then writes `bytes`.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(|e| TlsError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TlsError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_credentials_round_trip_and_state_their_identity() {
        let ca = JobCa::generate("t", 1).unwrap();
        let id = Identity::new("worker", 2, 5).unwrap();
        let creds = ca.issue(&id).unwrap();
        let back = Credentials::from_bundle(&creds.to_bundle()).unwrap();
        assert_eq!(back.ca_der().unwrap(), creds.ca_der().unwrap());
        assert_eq!(back.cert_der().unwrap(), creds.cert_der().unwrap());
        assert_eq!(
            back.key_der().unwrap().secret_der(),
            creds.key_der().unwrap().secret_der()
        );
        assert_eq!(Identity::from_cert(&creds.cert_der().unwrap()).unwrap(), id);
        // A CA reloaded from PEM issues certificates under the same name.
        let again = JobCa::from_pem(ca.cert_pem(), &ca.key_pem(), 1).unwrap();
        let c2 = again.issue(&id).unwrap();
        assert_eq!(c2.ca_pem, creds.ca_pem);
        assert!(Credentials::from_bundle(&creds.cert_pem).is_err());
        assert!(Credentials::from_bundle("junk").is_err());
    }

    #[test]
    fn validities_beyond_the_bound_are_refused_not_a_panic() {
        // 2^32 − 1 days overflowed the date arithmetic (a panic in `geomx pki init --days`).
        for days in [MAX_VALID_DAYS + 1, u32::MAX] {
            let e = JobCa::generate("t", days)
                .map(drop)
                .unwrap_err()
                .to_string();
            assert!(e.contains("days"), "{e}");
        }
        let ca = JobCa::generate("t", MAX_VALID_DAYS).unwrap();
        let id = Identity::new("worker", 0, 0).unwrap();
        assert!(ca.issue(&id).is_ok());
        let reloaded = JobCa::from_pem(ca.cert_pem(), &ca.key_pem(), u32::MAX).unwrap();
        assert!(reloaded.issue(&id).is_err());
    }

    #[test]
    fn pem_encoding_matches_the_parser() {
        for n in 1..70 {
            let der: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), &der[..]);
        }
    }
}
