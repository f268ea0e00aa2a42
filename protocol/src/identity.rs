//! Who is calling: the X.509 identities of the Grid Checkpointing Architecture (paper section
//! 6, the GSI model: every grid component and user has a certificate).
//!
//! A certificate issued by the site CA (`gcactl pki issue`) names its holder's [`Role`] and
//! name in a URI subject alternative name, `urn:gca:role:<role>:<name>` (e.g.
//! `urn:gca:role:cts:node1-criu`). A site with its own PKI maps its certificates instead, by
//! subject DN or by a subject alternative name, with [`IdentityRule`]s in the services'
//! configuration. Rules are tried first, in order, then the URN.
//!
//! What a [`Caller`] may do is decided by each service's policy module, never here.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::descriptor;

/// The prefix of the URI SAN that carries a role and a name.
pub const ROLE_URN_PREFIX: &str = "urn:gca:role:";

/// What a certificate holder is in the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A site administrator: classes, descriptors, unregistering, retention, every listing.
    Admin,
    /// A grid broker or scheduler: checkpoints, placement and recovery queries, subscriptions.
    Broker,
    /// A Checkpoint Translation Service instance, by its instance name.
    Cts,
    /// The Grid Checkpoint Service (all replicas share one identity).
    Gcs,
    /// A grid user: discovery only (a job's owner acts through its resource's CTS).
    User,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Admin, Role::Broker, Role::Cts, Role::Gcs, Role::User];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Broker => "broker",
            Role::Cts => "cts",
            Role::Gcs => "gcs",
            Role::User => "user",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (admin, broker, cts, gcs or user)"))
    }
}

/// An authenticated role and name, e.g. `cts:node1-criu`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// A role and a name (1-64 of `[A-Za-z0-9._-]`, starting alphanumeric).
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, String> {
        let name = name.into();
        if !descriptor::is_valid_name(&name) {
            return Err(descriptor::invalid_name_message(
                &format!("{role} identity name"),
                &name,
            ));
        }
        Ok(Identity { role, name })
    }

    /// The URI SAN that carries this identity in a site certificate.
    pub fn urn(&self) -> String {
        format!("{ROLE_URN_PREFIX}{}:{}", self.role, self.name)
    }

    /// Reads `urn:gca:role:<role>:<name>`.
    pub fn from_urn(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(ROLE_URN_PREFIX)?;
        let (role, name) = rest.split_once(':')?;
        Identity::new(role.parse().ok()?, name).ok()
    }

    /// Whether this is the CTS instance `name`.
    pub fn is_cts(&self, name: &str) -> bool {
        self.role == Role::Cts && self.name == name
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.name)
    }
}

impl std::str::FromStr for Identity {
    type Err = String;
    /// `role:name`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (role, name) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not role:name"))?;
        Identity::new(role.parse()?, name)
    }
}

/// A site's mapping of certificates issued by its own PKI to GCA identities: a certificate
/// whose subject DN is `subject` (as [`CertificateFacts::subject`] prints it, e.g.
/// `CN=node1.example.org, O=Grid`), or which carries the subject alternative name `san`
/// (`DNS:node1.example.org`, `URI:...`, `email:...`, `IP:10.0.0.1`), is `role:name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub san: Option<String>,
    pub role: Role,
    pub name: String,
}

impl IdentityRule {
    /// Checks the rule itself (exactly one matcher, a valid name).
    pub fn validate(&self) -> Result<(), String> {
        match (&self.subject, &self.san) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(format!(
                    "identity rule for {}:{} needs exactly one of `subject` and `san`",
                    self.role, self.name
                ))
            }
        }
        Identity::new(self.role, self.name.clone()).map(|_| ())
    }

    fn matches(&self, facts: &CertificateFacts) -> bool {
        match (&self.subject, &self.san) {
            (Some(s), _) => normalize_dn(s) == normalize_dn(&facts.subject),
            (None, Some(san)) => facts.sans.iter().any(|x| x.eq_ignore_ascii_case(san)),
            (None, None) => false,
        }
    }
}

fn normalize_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| rdn.trim())
        .filter(|rdn| !rdn.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a certificate says, for mapping, messages and `gcactl pki show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateFacts {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    /// `DNS:...`, `IP:...`, `URI:...`, `email:...`.
    pub sans: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub is_ca: bool,
}

impl CertificateFacts {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                    GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b)
                                .map(|a| std::net::IpAddr::from(a).to_string())
                                .ok(),
                            16 => <[u8; 16]>::try_from(*b)
                                .map(|a| std::net::IpAddr::from(a).to_string())
                                .ok(),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            sans.push(format!("IP:{ip}"));
                        }
                    }
                    _ => {}
                }
            }
        }
        let time = |t: x509_parser::time::ASN1Time| {
            DateTime::from_timestamp(t.timestamp(), 0).unwrap_or_default()
        };
        Ok(CertificateFacts {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            sans,
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            is_ca: cert.is_ca(),
        })
    }

    /// The identity the certificate carries: the first matching rule, else its
    /// `urn:gca:role:` URI SAN.
    pub fn identity(&self, rules: &[IdentityRule]) -> Option<Identity> {
        if let Some(rule) = rules.iter().find(|r| r.matches(self)) {
            return Identity::new(rule.role, rule.name.clone()).ok();
        }
        self.sans
            .iter()
            .filter_map(|s| s.strip_prefix("URI:"))
            .find_map(Identity::from_urn)
    }
}

/// The caller of a request, as the transport authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The service runs without TLS (the explicit `insecure` setting): nobody is
    /// authenticated, and the policy lets every caller do everything.
    Insecure,
    /// A TLS connection without a client certificate.
    Anonymous,
    /// A certificate the site CA signed that maps to no identity.
    Unmapped { subject: String },
    /// An authenticated role and name.
    Identified(Identity),
}

impl Caller {
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Identified(i) => Some(i),
            _ => None,
        }
    }

    pub fn role(&self) -> Option<Role> {
        self.identity().map(|i| i.role)
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Caller::Insecure)
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Insecure => f.write_str("an unauthenticated caller (insecure mode)"),
            Caller::Anonymous => f.write_str("a caller without a client certificate"),
            Caller::Unmapped { subject } => write!(
                f,
                "the certificate {subject:?}, which maps to no GCA identity (no urn:gca:role: SAN and no identity rule)"
            ),
            Caller::Identified(i) => write!(f, "{i}"),
        }
    }
}

/// Turns the transport's view of a connection into a [`Caller`]: the service's `insecure`
/// setting, its identity rules, and the client certificate the TLS handshake verified.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    insecure: bool,
    rules: std::sync::Arc<Vec<IdentityRule>>,
}

impl Authenticator {
    /// Plain HTTP: every caller is [`Caller::Insecure`].
    pub fn insecure() -> Self {
        Authenticator {
            insecure: true,
            rules: Default::default(),
        }
    }

    /// TLS with client certificates mapped by `rules`, then by their URN SAN.
    pub fn with_rules(rules: Vec<IdentityRule>) -> Self {
        Authenticator {
            insecure: false,
            rules: std::sync::Arc::new(rules),
        }
    }

    pub fn caller(&self, certificate: Option<&[u8]>) -> Caller {
        if self.insecure {
            return Caller::Insecure;
        }
        let Some(der) = certificate else {
            return Caller::Anonymous;
        };
        match CertificateFacts::from_der(der) {
            Ok(facts) => match facts.identity(&self.rules) {
                Some(identity) => Caller::Identified(identity),
                None => Caller::Unmapped {
                    subject: facts.subject,
                },
            },
            Err(e) => Caller::Unmapped { subject: e },
        }
    }

    /// Wraps `router` so that every request carries its [`Caller`] (read by handlers with the
    /// `Caller` extractor).
    pub fn layer(self, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                let caller = self.caller(
                    req.extensions()
                        .get::<crate::transport::PeerIdentity>()
                        .map(|p| p.certificate.as_ref()),
                );
                req.extensions_mut().insert(caller);
                next.run(req)
            },
        ))
    }
}

/// A handler argument: the request's caller; [`Caller::Anonymous`] when no
/// [`Authenticator::layer`] ran (so a forgotten layer fails closed).
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urns_round_trip_and_bad_ones_are_refused() {
        let id = Identity::new(Role::Cts, "node1-criu").unwrap();
        assert_eq!(id.urn(), "urn:gca:role:cts:node1-criu");
        assert_eq!(Identity::from_urn(&id.urn()), Some(id.clone()));
        assert_eq!("cts:node1-criu".parse::<Identity>().unwrap(), id);
        assert_eq!(Identity::from_urn("urn:gca:role:root:x"), None);
        assert_eq!(Identity::from_urn("urn:gca:role:cts:bad name"), None);
        assert_eq!(Identity::from_urn("urn:other:cts:x"), None);
        assert!(Identity::new(Role::Admin, "").is_err());
        assert!("wizard:x".parse::<Identity>().is_err());
    }

    fn facts(subject: &str, sans: &[&str]) -> CertificateFacts {
        CertificateFacts {
            subject: subject.into(),
            issuer: "CN=ca".into(),
            serial: "01".into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
            not_before: Utc::now(),
            not_after: Utc::now(),
            is_ca: false,
        }
    }

    #[test]
    fn rules_come_before_the_urn_and_match_exactly() {
        let rules = vec![
            IdentityRule {
                subject: Some("CN=node1.example.org,O=Grid".into()),
                san: None,
                role: Role::Cts,
                name: "node1-criu".into(),
            },
            IdentityRule {
                subject: None,
                san: Some("email:ops@example.org".into()),
                role: Role::Admin,
                name: "ops".into(),
            },
        ];
        for r in &rules {
            r.validate().unwrap();
        }
        let f = facts(
            "CN=node1.example.org, O=Grid",
            &["URI:urn:gca:role:admin:x"],
        );
        assert_eq!(f.identity(&rules).unwrap().to_string(), "cts:node1-criu");
        let f = facts("CN=other", &["email:OPS@example.org"]);
        assert_eq!(f.identity(&rules).unwrap().to_string(), "admin:ops");
        let f = facts("CN=other", &["URI:urn:gca:role:broker:b1"]);
        assert_eq!(f.identity(&rules).unwrap().to_string(), "broker:b1");
        assert_eq!(facts("CN=node1.example.org", &[]).identity(&rules), None);
        let bad = IdentityRule {
            subject: Some("CN=a".into()),
            san: Some("DNS:a".into()),
            role: Role::Cts,
            name: "a".into(),
        };
        assert!(bad.validate().is_err());
    }
}
