//! A Garage cluster for a test (`scripts/garage-cluster`; the binary from
//! `scripts/install-garage`, which `scripts/install-deps` runs): a test that needs one fails,
//! it does not skip, when Garage is missing. Stopped on drop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use gca_protocol::messages::GetJobKey;
use gca_protocol::ops::GetJobKeyOp;

use crate::TestGcs;

/// N Garage nodes on loopback (RF = N) and the bucket `scripts/garage-cluster` made.
pub struct Cluster {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/garage-cluster")
}

impl Cluster {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gca-garage-")
            .tempdir()
            .unwrap();
        let out = Command::new("bash")
            .arg(script())
            .args(["start", dir.path().to_str().unwrap(), "3"])
            .output()
            .expect("run scripts/garage-cluster");
        assert!(
            out.status.success(),
            "scripts/garage-cluster start failed (scripts/install-garage installs Garage): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.path().join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Cluster { dir, env }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.env["GCA_S3_ENDPOINTS"]
            .split(' ')
            .map(String::from)
            .collect()
    }

    /// The CTS's `[store]` and `[object_store]` tables (the secret in a file).
    pub fn cts_extra(&self, durability: &str) -> String {
        let secret = self.dir.path().join("secret");
        std::fs::write(&secret, &self.env["GCA_S3_SECRET_ACCESS_KEY"]).unwrap();
        format!(
            "[store]\ndurability = {durability:?}\n[object_store]\nendpoints = {:?}\nregion = {:?}\nbucket = {:?}\naccess_key_id = {:?}\nsecret_access_key_file = {:?}\nprefix = \"cts-test\"\nallow_http = true\nrequest_timeout_secs = 10\n",
            self.endpoints(),
            self.env["GCA_S3_REGION"],
            self.env["GCA_S3_BUCKET"],
            self.env["GCA_S3_ACCESS_KEY_ID"],
            secret,
        )
    }

    /// The job's part of the bucket as the CTS sees it, under the job's key from the GCS.
    pub async fn job(&self, gcs: &TestGcs, cts: &str, gid: &str) -> gca_objstore::JobChunks {
        let key = gcs
            .call_as::<GetJobKeyOp>(&format!("cts:{cts}"), GetJobKey { gid: gid.into() })
            .await
            .expect("the job's key, for its CTS");
        let key: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(&key.key)
            .unwrap()
            .try_into()
            .unwrap();
        let bucket = gca_objstore::Bucket::open(&self.bucket_config("cts-test")).unwrap();
        bucket.job(gid, &key)
    }
}

impl Cluster {
    /// The bucket's settings, its names under `prefix`.
    pub fn bucket_config(&self, prefix: &str) -> gca_objstore::BucketConfig {
        gca_objstore::BucketConfig {
            endpoints: self.endpoints(),
            region: self.env["GCA_S3_REGION"].clone(),
            bucket: self.env["GCA_S3_BUCKET"].clone(),
            access_key_id: self.env["GCA_S3_ACCESS_KEY_ID"].clone(),
            secret_access_key: gca_objstore::Secret::new(
                self.env["GCA_S3_SECRET_ACCESS_KEY"].clone(),
            ),
            prefix: prefix.into(),
            allow_http: true,
            request_timeout_secs: 10,
        }
    }

    /// The bucket as anyone with its credentials sees it (nothing opened or sealed).
    pub fn raw_store(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoints()[0])
            .with_region(&self.env["GCA_S3_REGION"])
            .with_bucket_name(&self.env["GCA_S3_BUCKET"])
            .with_access_key_id(&self.env["GCA_S3_ACCESS_KEY_ID"])
            .with_secret_access_key(&self.env["GCA_S3_SECRET_ACCESS_KEY"])
            .with_allow_http(true)
            .build()
            .unwrap()
    }

    /// The names of every object the CTSes' tier wrote (under the `cts-test` prefix).
    pub async fn object_names(&self) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let prefix = object_store::path::Path::from("cts-test");
        let mut names: Vec<String> = self
            .raw_store()
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        names.sort();
        names
    }

    /// Flips one byte in the middle of object `name`.
    pub async fn flip_byte(&self, name: &str) {
        use object_store::ObjectStore;
        let s3 = self.raw_store();
        let path = object_store::path::Path::from(name);
        let mut bytes = s3.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
        let i = bytes.len() / 2;
        bytes[i] ^= 0x01;
        s3.put(&path, object_store::PutPayload::from(bytes))
            .await
            .unwrap();
    }

    /// Kills node `n` (1-based) at once (SIGKILL).
    pub fn kill(&self, n: u32) {
        let ok = Command::new("bash")
            .arg(script())
            .args(["kill", self.dir.path().to_str().unwrap(), &n.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "scripts/garage-cluster kill {n}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status();
    }
}
