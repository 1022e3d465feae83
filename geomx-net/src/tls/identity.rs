//! Who a certificate speaks for: a (role, data center, rank) triple, carried as a DNS name in the
//! certificate's subject alternative names (`<role>.dc<dc>.rank<rank>.id.geomx`).

use std::fmt;

use rustls::pki_types::CertificateDer;

use super::TlsError;

/// The DNS name every job certificate also carries; clients verify servers against it, so a
/// certificate is valid for a job wherever its process runs (host names and addresses vary).
pub const JOB_SERVER_NAME: &str = "job.geomx";

/// Suffix of the identity names.
const ID_SUFFIX: &str = ".id.geomx";

/// Longest role name.
const MAX_ROLE: usize = 32;

/// A job member's identity, as its certificate states it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Role name (`worker`, `local_server`, `global_server`, `coordinator`, …): lower-case
    /// letters, digits, underscores and inner dashes, at most 32 characters.
    pub role: String,
    /// Data center index.
    pub dc: u32,
    /// Rank within (role, dc).
    pub rank: u32,
}

impl Identity {
    /// An identity; the role must be a DNS label of lower-case letters, digits, underscores and
    /// inner dashes.
    pub fn new(role: &str, dc: u32, rank: u32) -> Result<Identity, TlsError> {
        let ok = !role.is_empty()
            && role.len() <= MAX_ROLE
            && !role.starts_with('-')
            && !role.ends_with('-')
            && role
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(TlsError::Identity(format!(
                "role {role:?} must be 1-{MAX_ROLE} lower-case letters, digits, underscores or inner \
                 dashes"
            )));
        }
        Ok(Identity {
            role: role.to_string(),
            dc,
            rank,
        })
    }

    /// The DNS name that encodes this identity in a certificate.
    pub fn dns_name(&self) -> String {
        format!("{}.dc{}.rank{}{ID_SUFFIX}", self.role, self.dc, self.rank)
    }

    /// Parses a name made by [`Identity::dns_name`]; `None` for any other name.
    pub fn from_dns_name(name: &str) -> Option<Identity> {
        let stem = name.strip_suffix(ID_SUFFIX)?;
        let mut parts = stem.split('.');
        let role = parts.next()?;
        let dc = parts.next()?.strip_prefix("dc")?;
        let rank = parts.next()?.strip_prefix("rank")?;
        if parts.next().is_some() || !all_digits(dc) || !all_digits(rank) {
            return None;
        }
        Identity::new(role, dc.parse().ok()?, rank.parse().ok()?).ok()
    }

    /// The identity stated by a (chain-verified) certificate: exactly one identity name.
    pub fn from_cert(der: &CertificateDer<'_>) -> Result<Identity, TlsError> {
        let cert = webpki::EndEntityCert::try_from(der)
            .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
        let mut ids = cert.valid_dns_names().filter_map(Identity::from_dns_name);
        match (ids.next(), ids.next()) {
            (Some(id), None) => Ok(id),
            (None, _) => Err(TlsError::Identity(
                "the certificate names no geomx identity".into(),
            )),
            (Some(_), Some(_)) => Err(TlsError::Identity(
                "the certificate names more than one geomx identity".into(),
            )),
        }
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit())
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dc {} rank {}", self.role, self.dc, self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_do_not_parse() {
        let id = Identity::new("global_server", 3, 12).unwrap();
        assert_eq!(id.dns_name(), "global_server.dc3.rank12.id.geomx");
        assert_eq!(Identity::from_dns_name(&id.dns_name()), Some(id));
        for bad in [
            "job.geomx",
            "worker.dc0.id.geomx",
            "worker.dc0.rank1.extra.id.geomx",
            "worker.dcx.rank1.id.geomx",
            "worker.dc0.rank-1.id.geomx",
            "Worker.dc0.rank1.id.geomx",
            "worker.dc0.rank99999999999.id.geomx",
            "worker.dc0.rank1.id.geomx.evil",
            ".dc0.rank1.id.geomx",
        ] {
            assert_eq!(Identity::from_dns_name(bad), None, "{bad}");
        }
        assert!(Identity::new("a.b", 0, 0).is_err());
        assert!(Identity::new("-w", 0, 0).is_err());
        assert!(Identity::new(&"w".repeat(33), 0, 0).is_err());
    }
}
