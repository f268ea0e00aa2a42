//! The tests' site PKI: a real CA made with `gca-pki` (what `gcactl pki` uses) under
//! `<workspace>/target/test-pki`, shared by every test process of a run (made once, under a
//! file lock), and certificates issued on demand, one per identity, for 127.0.0.1 and
//! localhost. Every test server runs mutual TLS with these; every test client presents one.
//!
//! Also: a second, untrusted CA (`other-ca`) and expired certificates, for the tests that
//! check they are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use gca_pki::{IssueRequest, SiteCa};
use gca_protocol::identity::{Identity, Role};
use gca_protocol::transport::{self, ClientSettings, ClientTls, TlsConfig};

/// The identities the harness calls with by default.
pub const ADMIN: &str = "admin:test-admin";
pub const BROKER: &str = "broker:test-broker";
pub const GCS: &str = "gcs:test-gcs";

pub struct TestPki {
    dir: PathBuf,
    clients: Mutex<HashMap<String, reqwest::Client>>,
}

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

static PKI: OnceLock<TestPki> = OnceLock::new();

/// The shared test PKI.
pub fn pki() -> &'static TestPki {
    PKI.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .join("target/test-pki");
        std::fs::create_dir_all(&dir).expect("create target/test-pki");
        let pki = TestPki {
            dir,
            clients: Mutex::new(HashMap::new()),
        };
        pki.locked(|| {
            for ca in ["ca", "other-ca"] {
                if !pki.dir.join(ca).join(gca_pki::CA_CERT).exists() {
                    SiteCa::init(&pki.dir.join(ca), ca).expect("make the test CA");
                }
            }
        });
        pki
    })
}

pub fn identity(s: &str) -> Identity {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test identity {s:?}: {e}"))
}

impl TestPki {
    fn locked<T>(&self, f: impl FnOnce() -> T) -> T {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))
            .expect("open the test PKI lock");
        let mut lock = fd_lock::RwLock::new(file);
        let _guard = lock.write().expect("lock the test PKI");
        f()
    }

    /// The test GCSes' job-key wrapping key (made once, mode 0600).
    pub fn job_key_wrapping_key(&self) -> PathBuf {
        let path = self.dir.join("job-key-wrapping.key");
        self.locked(|| {
            gcs::job_keys::KeyWrapper::load_or_create(&path).expect("the test wrapping key")
        });
        path
    }

    /// The site CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca").join(gca_pki::CA_CERT)
    }

    /// A certificate of the site CA for `id` (`role:name`), valid for a year from yesterday.
    pub fn cert(&self, id: &str) -> CertFiles {
        self.issue("ca", id, "", None)
    }

    /// A certificate for `id` issued by another CA, which the services do not trust.
    pub fn untrusted_cert(&self, id: &str) -> CertFiles {
        self.issue("other-ca", id, "untrusted-", None)
    }

    /// A certificate of the site CA for `id` that expired last year.
    pub fn expired_cert(&self, id: &str) -> CertFiles {
        let start = chrono::Utc::now() - chrono::Duration::days(400);
        self.issue("ca", id, "expired-", Some(start))
    }

    fn issue(
        &self,
        ca: &str,
        id: &str,
        prefix: &str,
        not_before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> CertFiles {
        let identity = identity(id);
        let stem = self
            .dir
            .join(format!("{prefix}{}-{}", identity.role, identity.name));
        let files = CertFiles {
            cert: stem.with_extension("pem"),
            key: stem.with_extension("key"),
        };
        if files.cert.exists() && files.key.exists() {
            return files;
        }
        self.locked(|| {
            if files.cert.exists() && files.key.exists() {
                return;
            }
            let site = SiteCa::load(&self.dir.join(ca)).expect("load the test CA");
            let mut req = IssueRequest::new(identity.clone()).hosts(["127.0.0.1", "localhost"]);
            if let Some(start) = not_before {
                req.not_before = Some(start);
                req.days = 30;
            }
            let issued = site.issue(&req).expect("issue a test certificate");
            // Written beside and renamed, so a reader never sees half a pair.
            let tmp = stem.with_extension(format!("tmp{}", std::process::id()));
            let (c, k) = issued.write(&tmp).expect("write the test certificate");
            std::fs::rename(k, &files.key).unwrap();
            std::fs::rename(c, &files.cert).unwrap();
        });
        files
    }

    /// The TLS settings of a service whose certificate is `id`'s.
    pub fn tls(&self, id: &str) -> TlsConfig {
        let files = self.cert(id);
        TlsConfig {
            ca: self.ca(),
            cert: files.cert,
            key: files.key,
            identity: Vec::new(),
        }
    }

    /// Client TLS settings for `id`, or with no certificate (`None`).
    pub fn client_tls(&self, id: Option<&str>) -> ClientTls {
        match id {
            Some(id) => {
                let files = self.cert(id);
                ClientTls {
                    ca: Some(self.ca()),
                    cert: Some(files.cert),
                    key: Some(files.key),
                }
            }
            None => ClientTls {
                ca: Some(self.ca()),
                ..Default::default()
            },
        }
    }

    /// An HTTP client that trusts the site CA and presents `id`'s certificate (cached).
    pub fn client(&self, id: &str) -> reqwest::Client {
        let mut clients = self.clients.lock().unwrap();
        clients
            .entry(id.to_string())
            .or_insert_with(|| client_with(self.client_tls(Some(id))))
            .clone()
    }

    /// A client that trusts the site CA but presents no certificate.
    pub fn anonymous(&self) -> reqwest::Client {
        client_with(self.client_tls(None))
    }

    /// `GCA_CA`, `GCA_CERT`, `GCA_KEY` for a child process acting as `id`.
    pub fn env(&self, id: &str) -> Vec<(String, String)> {
        let files = self.cert(id);
        vec![
            (transport::ENV_CA.into(), self.ca().display().to_string()),
            (transport::ENV_CERT.into(), files.cert.display().to_string()),
            (transport::ENV_KEY.into(), files.key.display().to_string()),
        ]
    }

    /// The signer of CTS `name` (its certificate's key), for records tests register.
    pub fn signer(&self, cts: &str) -> gca_protocol::signature::Signer {
        let files = self.cert(&format!("cts:{cts}"));
        gca_protocol::signature::Signer::from_files(&files.cert, &files.key)
            .expect("the test CTS's signing key")
    }
}

pub fn client_with(tls: ClientTls) -> reqwest::Client {
    transport::http_client(&ClientSettings {
        tls,
        ..Default::default()
    })
    .expect("test HTTP client")
}

/// `cts:<name>`.
pub fn cts(name: &str) -> String {
    Identity::new(Role::Cts, name)
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string()
}
