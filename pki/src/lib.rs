//! # gca-pki — the site CA
//!
//! Every GCA component and user has an X.509 identity (paper section 6). A site without its own
//! PKI makes a CA with [`SiteCa::init`] (`gcactl pki init`) and issues one certificate per
//! component with [`SiteCa::issue`] (`gcactl pki issue --role cts --name node1-criu --host
//! node1`). The role and name travel in a URI subject alternative name,
//! `urn:gca:role:<role>:<name>` ([`gca_protocol::identity`]), which is what the services read.
//! Sites with their own CA map their certificates with identity rules instead and do not need
//! this crate.
//!
//! A CA directory holds `ca.pem` (the certificate, for everyone) and `ca.key` (mode 0600, for
//! the issuer only). Keys are ECDSA P-256.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gca_protocol::identity::{CertificateFacts, Identity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// A site CA, loaded from its directory.
pub struct SiteCa {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

/// What to put into a certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub identity: Identity,
    /// Host names and IP addresses the holder serves at (servers need them: the GCS, CTSes).
    pub hosts: Vec<String>,
    /// Validity, from `not_before` (default: now, minus a minute of clock skew).
    pub not_before: Option<chrono::DateTime<chrono::Utc>>,
    pub days: u32,
}

impl IssueRequest {
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            hosts: Vec::new(),
            not_before: None,
            days: 365,
        }
    }

    pub fn hosts<I: IntoIterator<Item = S>, S: Into<String>>(mut self, hosts: I) -> Self {
        self.hosts = hosts.into_iter().map(Into::into).collect();
        self
    }
}

/// An issued certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `PREFIX.pem` (0644) and `PREFIX.key` (0600); refuses to overwrite either.
    pub fn write(&self, prefix: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = with_ext(prefix, "pem");
        let key = with_ext(prefix, "key");
        for p in [&cert, &key] {
            if p.exists() {
                bail!(
                    "{} exists already; remove it or choose another --out",
                    p.display()
                );
            }
        }
        write_new(&key, self.key_pem.as_bytes(), 0o600)?;
        write_new(&cert, self.cert_pem.as_bytes(), 0o644)?;
        Ok((cert, key))
    }
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    // The umask may have taken bits away; never added any.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

fn offset(t: chrono::DateTime<chrono::Utc>) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .with_context(|| format!("{t} is out of range for a certificate"))
}

impl SiteCa {
    /// Makes a CA in `dir` (created 0700 if missing); refuses when one is there already.
    pub fn init(dir: &Path, site: &str) -> anyhow::Result<SiteCa> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            bail!(
                "{} already holds a CA ({CA_CERT}/{CA_KEY}); use it, or choose another directory",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("GCA site CA {site}"));
        dn.push(DnType::OrganizationName, site);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = chrono::Utc::now();
        params.not_before = offset(now - chrono::Duration::minutes(1))?;
        params.not_after = offset(now + chrono::Duration::days(3650))?;
        let cert = params.self_signed(&key).context("signing the CA")?;
        write_new(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
        SiteCa::load(dir)
    }

    /// Loads the CA of `dir` (its key must not be readable by others).
    pub fn load(dir: &Path) -> anyhow::Result<SiteCa> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).with_context(|| {
            format!(
                "reading {} (make a CA with `gcactl pki init --dir {}`)",
                cert_path.display(),
                dir.display()
            )
        })?;
        let meta = std::fs::metadata(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "{} is readable by others (mode {:o}); chmod 600 it",
                key_path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .with_context(|| format!("{} is not a CA certificate", cert_path.display()))?;
        // Re-signing the same subject and key gives the issuer rcgen signs with; the
        // certificates it issues chain to the original `ca.pem`.
        let cert = params
            .self_signed(&key)
            .with_context(|| format!("{} does not match {}", key_path.display(), CA_CERT))?;
        Ok(SiteCa {
            dir: dir.to_path_buf(),
            cert,
            key,
            cert_pem,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `req.identity`.
    pub fn issue(&self, req: &IssueRequest) -> anyhow::Result<Issued> {
        if req.days == 0 {
            bail!("a certificate must be valid for at least one day");
        }
        let key = KeyPair::generate().context("generating the key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.identity.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::URI(
            req.identity
                .urn()
                .try_into()
                .context("the identity URN is not ASCII")?,
        ));
        for host in &req.hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    host.clone()
                        .try_into()
                        .with_context(|| format!("{host:?} is not a host name"))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if serves(req.identity.role) {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        let start = req
            .not_before
            .unwrap_or_else(|| chrono::Utc::now() - chrono::Duration::minutes(1));
        params.not_before = offset(start)?;
        params.not_after = offset(start + chrono::Duration::days(i64::from(req.days)))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .context("signing the certificate")?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Roles whose holders run servers (and so get the TLS server usage).
fn serves(role: Role) -> bool {
    matches!(role, Role::Gcs | Role::Cts | Role::Broker)
}

/// What `gcactl pki show` prints about a PEM certificate file.
pub fn show(path: &Path) -> anyhow::Result<Vec<CertificateFacts>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        let der = der.with_context(|| format!("{} is not a PEM file", path.display()))?;
        out.push(
            CertificateFacts::from_der(&der)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        );
    }
    if out.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_certificates_that_carry_identities() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = SiteCa::init(&ca_dir, "test-site").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        assert!(
            SiteCa::init(&ca_dir, "again").is_err(),
            "never replaces a CA"
        );

        let id: Identity = "cts:node1-criu".parse().unwrap();
        let issued = SiteCa::load(&ca_dir)
            .unwrap()
            .issue(&IssueRequest::new(id.clone()).hosts(["node1", "127.0.0.1"]))
            .unwrap();
        let (cert, key) = issued.write(&dir.path().join("node1")).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert!(issued.write(&dir.path().join("node1")).is_err());
        let facts = show(&cert).unwrap();
        assert_eq!(facts.len(), 1);
        let f = &facts[0];
        assert_eq!(f.identity(&[]), Some(id));
        assert!(f.sans.contains(&"DNS:node1".to_string()), "{:?}", f.sans);
        assert!(f.sans.contains(&"IP:127.0.0.1".to_string()), "{:?}", f.sans);
        assert!(!f.is_ca);
        assert!(f.not_after > chrono::Utc::now() + chrono::Duration::days(364));
        let ca_facts = show(&ca.cert_path()).unwrap();
        assert!(ca_facts[0].is_ca);
        assert_eq!(f.issuer, ca_facts[0].subject);

        std::fs::set_permissions(ca_dir.join(CA_KEY), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = SiteCa::load(&ca_dir).err().unwrap();
        assert!(format!("{err:#}").contains("readable by others"), "{err:#}");
    }
}
