//! Signed images (XtreemOS "secure restart from checkpoint images"): the CTS that takes an
//! image signs what identifies it, the GCS keeps the signature in the checkpoint record, and
//! whoever restores verifies it against the site CA before anything is restored. A tampered
//! image (its manifest digest changes), a forged record (no key of the named CTS) or a record
//! whose image, job or owner was swapped is then refused.
//!
//! What is signed, as UTF-8 lines (`key=value`, in this order, each ended by `\n`):
//! `gca-image-signature-v1`, `checkpoint-id`, `gid`, `digest`, `owner` (`uid:gid`), `cts`,
//! `cts-type`, and, for a record with facts ([`crate::facts`]), a last line
//! `facts=sha256:<hex>` (the digest of the facts' canonical JSON form): a record without
//! facts is signed (and verifies) exactly as before, and facts cannot be added, removed or
//! changed without breaking the signature. The key is the CTS's TLS key; the signature carries the CTS's certificate,
//! which must chain to the site CA, be valid when the GCS registered the record, and carry
//! the identity `cts:<CTSName>`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use base64::Engine;
use chrono::{DateTime, Utc};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::SignatureScheme;

use crate::identity::{CertificateFacts, Identity, IdentityRule, Role};
use crate::messages::{CheckpointRecord, ImageOwner, ImageSignature};
use crate::transport::{read_certs, read_key, TlsConfig};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The facts a signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedFacts<'a> {
    pub checkpoint_id: &'a str,
    pub gid: &'a str,
    pub digest: &'a str,
    pub owner: ImageOwner,
    pub cts_name: &'a str,
    pub cts_type: &'a str,
    /// [`crate::facts::ImageFacts::digest`] of the record's facts, if it has any.
    pub facts: Option<String>,
}

impl<'a> SignedFacts<'a> {
    /// The facts of a record; `None` when it has no digest or owner to sign.
    pub fn of(r: &'a CheckpointRecord) -> Option<Self> {
        Some(SignedFacts {
            checkpoint_id: &r.id,
            gid: &r.gid,
            digest: r.digest.as_deref()?,
            owner: r.owner?,
            cts_name: &r.cts_name,
            cts_type: &r.cts_type,
            facts: r.facts.as_ref().map(|f| f.digest()),
        })
    }

    fn payload(&self) -> Vec<u8> {
        let mut p = format!(
            "gca-image-signature-v1\ncheckpoint-id={}\ngid={}\ndigest={}\nowner={}\ncts={}\ncts-type={}\n",
            self.checkpoint_id, self.gid, self.digest, self.owner, self.cts_name, self.cts_type
        );
        if let Some(f) = &self.facts {
            p.push_str(&format!("facts={f}\n"));
        }
        p.into_bytes()
    }
}

/// (name in records, TLS scheme that signs it, webpki algorithm that verifies it)
const ALGORITHMS: &[(
    &str,
    SignatureScheme,
    &dyn rustls::pki_types::SignatureVerificationAlgorithm,
)] = &[
    (
        "ecdsa-p256-sha256",
        SignatureScheme::ECDSA_NISTP256_SHA256,
        webpki::ring::ECDSA_P256_SHA256,
    ),
    (
        "ecdsa-p384-sha384",
        SignatureScheme::ECDSA_NISTP384_SHA384,
        webpki::ring::ECDSA_P384_SHA384,
    ),
    ("ed25519", SignatureScheme::ED25519, webpki::ring::ED25519),
    (
        "rsa-pss-sha256",
        SignatureScheme::RSA_PSS_SHA256,
        webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    ),
];

/// Signs with a CTS's key.
pub struct Signer {
    key: Arc<dyn rustls::sign::SigningKey>,
    certificate: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(***)")
    }
}

impl Signer {
    /// The key and certificate of a component's TLS settings.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Signer> {
        let certs = read_certs(cert)?;
        let key_der = read_key(key)?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|e| anyhow!("{}: unusable signing key: {e}", key.display()))?;
        Ok(Signer {
            key,
            certificate: B64.encode(certs[0].as_ref()),
        })
    }

    pub fn from_tls(tls: &TlsConfig) -> anyhow::Result<Signer> {
        Signer::from_files(&tls.cert, &tls.key)
    }

    pub fn sign(&self, facts: &SignedFacts<'_>) -> anyhow::Result<ImageSignature> {
        let schemes: Vec<SignatureScheme> = ALGORITHMS.iter().map(|a| a.1).collect();
        let signer = self
            .key
            .choose_scheme(&schemes)
            .context("the key supports none of the image signature algorithms")?;
        let scheme = signer.scheme();
        let name = ALGORITHMS
            .iter()
            .find(|a| a.1 == scheme)
            .map(|a| a.0)
            .context("unexpected signature scheme")?;
        let value = signer
            .sign(&facts.payload())
            .map_err(|e| anyhow!("signing failed: {e}"))?;
        Ok(ImageSignature {
            algorithm: name.to_string(),
            certificate: self.certificate.clone(),
            value: B64.encode(value),
        })
    }
}

/// Checks signatures against the site CA.
#[derive(Clone)]
pub struct Verifier {
    anchors: Arc<Vec<rustls::pki_types::TrustAnchor<'static>>>,
    rules: Arc<Vec<IdentityRule>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({} trust anchors)", self.anchors.len())
    }
}

/// Why a signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSignature(pub String);

impl Verifier {
    /// Trusts the CAs of `ca` (PEM), mapping foreign certificates with `rules`.
    pub fn new(ca: &Path, rules: Vec<IdentityRule>) -> anyhow::Result<Verifier> {
        let mut anchors = Vec::new();
        for c in read_certs(ca)? {
            let anchor = webpki::anchor_from_trusted_cert(&c)
                .map_err(|e| anyhow!("{}: unusable CA certificate: {e:?}", ca.display()))?
                .to_owned();
            anchors.push(anchor);
        }
        Ok(Verifier {
            anchors: Arc::new(anchors),
            rules: Arc::new(rules),
        })
    }

    pub fn from_tls(tls: &TlsConfig) -> anyhow::Result<Verifier> {
        Verifier::new(&tls.ca, tls.identity.clone())
    }

    /// Checks `sig` over `facts`: the certificate chains to the site CA and was valid at
    /// `at`, names `cts:<facts.cts_name>`, and the signature is its key's over the facts.
    pub fn verify(
        &self,
        sig: &ImageSignature,
        facts: &SignedFacts<'_>,
        at: DateTime<Utc>,
    ) -> Result<Identity, BadSignature> {
        let bad = |why: String| BadSignature(why);
        let der = B64
            .decode(sig.certificate.trim())
            .map_err(|e| bad(format!("the signer certificate is not base64: {e}")))?;
        let cert_der = CertificateDer::from(der.clone());
        let cert = webpki::EndEntityCert::try_from(&cert_der)
            .map_err(|e| bad(format!("the signer certificate is not X.509: {e:?}")))?;
        let algs: Vec<&dyn rustls::pki_types::SignatureVerificationAlgorithm> =
            webpki::ALL_VERIFICATION_ALGS.to_vec();
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            at.timestamp().max(0) as u64,
        ));
        cert.verify_for_usage(
            &algs,
            &self.anchors,
            &[],
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            bad(format!(
                "the signer certificate does not chain to the site CA or was not valid at {at}: {e:?}"
            ))
        })?;
        let identity = CertificateFacts::from_der(&der)
            .map_err(bad)?
            .identity(&self.rules)
            .ok_or_else(|| bad("the signer certificate carries no GCA identity".into()))?;
        if identity.role != Role::Cts || identity.name != facts.cts_name {
            return Err(bad(format!(
                "the image was signed by {identity}, not by the CTS that the record names (cts:{})",
                facts.cts_name
            )));
        }
        let alg = ALGORITHMS
            .iter()
            .find(|a| a.0 == sig.algorithm)
            .ok_or_else(|| bad(format!("unknown signature algorithm {:?}", sig.algorithm)))?
            .2;
        let value = B64
            .decode(sig.value.trim())
            .map_err(|e| bad(format!("the signature is not base64: {e}")))?;
        cert.verify_signature(alg, &facts.payload(), &value)
            .map_err(|_| {
                bad(format!(
                    "the signature does not match checkpoint {:?} of job {:?} (digest {}, owner {}): the image, its record or its owner was changed after {} signed it",
                    facts.checkpoint_id, facts.gid, facts.digest, facts.owner, identity
                ))
            })?;
        Ok(identity)
    }

    /// Verifies a record's signature at the time the GCS registered it (or now).
    pub fn verify_record(&self, r: &CheckpointRecord) -> Result<Identity, BadSignature> {
        let sig = r.signature.as_ref().ok_or_else(|| {
            BadSignature(format!(
                "checkpoint {:?} of job {:?} is not signed by the CTS that took it",
                r.id, r.gid
            ))
        })?;
        let facts = SignedFacts::of(r).ok_or_else(|| {
            BadSignature(format!(
                "checkpoint {:?} of job {:?} has no digest or owner to verify",
                r.id, r.gid
            ))
        })?;
        self.verify(sig, &facts, r.registered_at.unwrap_or_else(Utc::now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA in a temporary directory and a certificate for `cts:<name>` signed by it.
    fn site(name: &str) -> (tempfile::TempDir, Verifier, Signer) {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            format!("urn:gca:role:cts:{name}").try_into().unwrap(),
        ));
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        let w = |n: &str, t: String| std::fs::write(dir.path().join(n), t).unwrap();
        w("ca.pem", ca.pem());
        w("cts.pem", cert.pem());
        w("cts.key", key.serialize_pem());
        let verifier = Verifier::new(&dir.path().join("ca.pem"), vec![]).unwrap();
        let signer =
            Signer::from_files(&dir.path().join("cts.pem"), &dir.path().join("cts.key")).unwrap();
        (dir, verifier, signer)
    }

    fn facts<'a>(cts: &'a str, digest: &'a str) -> SignedFacts<'a> {
        SignedFacts {
            checkpoint_id: "ck-1",
            gid: "job-1",
            digest,
            owner: ImageOwner {
                uid: 1000,
                gid: 100,
            },
            cts_name: cts,
            cts_type: "criu",
            facts: None,
        }
    }

    #[test]
    fn signatures_verify_and_every_change_is_caught() {
        let (_d, verifier, signer) = site("node1");
        let now = Utc::now();
        let f = facts("node1", "sha256:aa");
        let sig = signer.sign(&f).unwrap();
        assert_eq!(sig.algorithm, "ecdsa-p256-sha256");
        assert_eq!(
            verifier.verify(&sig, &f, now).unwrap().to_string(),
            "cts:node1"
        );
        let tampered = facts("node1", "sha256:bb");
        let err = verifier.verify(&sig, &tampered, now).unwrap_err();
        assert!(
            err.0.contains("was changed after cts:node1 signed it"),
            "{err}"
        );
        let mut other_owner = f.clone();
        other_owner.owner.uid = 0;
        assert!(verifier.verify(&sig, &other_owner, now).is_err());
        // Signed by node1, claimed to be node2's.
        let err = verifier
            .verify(&sig, &facts("node2", "sha256:aa"), now)
            .unwrap_err();
        assert!(
            err.0.contains("not by the CTS that the record names"),
            "{err}"
        );
        // Outside the certificate's validity.
        let err = verifier
            .verify(&sig, &f, "2040-01-01T00:00:00Z".parse().unwrap())
            .unwrap_err();
        assert!(err.0.contains("was not valid"), "{err}");
        // Another site's CA.
        let (_d2, other_site, _) = site("node1");
        assert!(other_site.verify(&sig, &f, now).is_err());
        // Facts: signed with them, the record verifies only with the same facts; a record
        // signed without facts verifies as before but not with facts added.
        let mut with_facts = f.clone();
        with_facts.facts = Some("sha256:11".into());
        let fsig = signer.sign(&with_facts).unwrap();
        assert!(verifier.verify(&fsig, &with_facts, now).is_ok());
        assert!(verifier.verify(&fsig, &f, now).is_err());
        let mut changed = with_facts.clone();
        changed.facts = Some("sha256:12".into());
        assert!(verifier.verify(&fsig, &changed, now).is_err());
        assert!(verifier.verify(&sig, &with_facts, now).is_err());
        let mut garbled = sig.clone();
        garbled.value = "not base64!".into();
        assert!(verifier.verify(&garbled, &f, now).is_err());
    }
}
