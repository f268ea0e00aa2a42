//! The object-store tier from a CTS (issue 12): with `store.durability = "replicated"` a
//! checkpoint is in the bucket (sealed under the job's key from the GCS) before its record is
//! answered; with `async` it gets there in the background. A real 3-node Garage cluster
//! (`scripts/garage-cluster`; Garage from `scripts/install-garage`, which `scripts/install-deps`
//! runs): the test fails, it does not skip, when Garage is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use gca_protocol::messages::*;
use gca_protocol::ops::{DoCheckpointOp, GetJobKeyOp};
use integration_tests::cts::*;
use integration_tests::TestGcs;

struct Cluster {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/garage-cluster")
}

impl Cluster {
    fn start() -> Self {
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

    fn endpoints(&self) -> Vec<String> {
        self.env["GCA_S3_ENDPOINTS"]
            .split(' ')
            .map(String::from)
            .collect()
    }

    /// The CTS's `[store]` and `[object_store]` tables (the secret in a file).
    fn cts_extra(&self, durability: &str) -> String {
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
    async fn job(&self, gcs: &TestGcs, cts: &str, gid: &str) -> gca_objstore::JobChunks {
        let key = gcs
            .call_as::<GetJobKeyOp>(&format!("cts:{cts}"), GetJobKey { gid: gid.into() })
            .await
            .expect("the job's key, for its CTS");
        let key: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(&key.key)
            .unwrap()
            .try_into()
            .unwrap();
        let bucket = gca_objstore::Bucket::open(&gca_objstore::BucketConfig {
            endpoints: self.endpoints(),
            region: self.env["GCA_S3_REGION"].clone(),
            bucket: self.env["GCA_S3_BUCKET"].clone(),
            access_key_id: self.env["GCA_S3_ACCESS_KEY_ID"].clone(),
            secret_access_key: gca_objstore::Secret::new(
                self.env["GCA_S3_SECRET_ACCESS_KEY"].clone(),
            ),
            prefix: "cts-test".into(),
            allow_http: true,
            request_timeout_secs: 10,
        })
        .unwrap();
        bucket.job(gid, &key)
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

async fn checkpointed(gcs: &TestGcs, cts: &TestCts, gid: &str) -> (CheckpointRecord, TestJob) {
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    let registered = cts.register(gid, job.pid).await;
    job.start(&registered);
    job.wait_for_values(3).await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint");
    (record, job)
}

#[tokio::test]
async fn a_replicated_checkpoint_is_in_the_bucket_when_it_is_answered() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-tier",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("replicated"),
    )
    .await;
    let (record, _job) = checkpointed(&gcs, &cts, "gid-tier-r").await;
    assert_eq!(record.sequence, Some(1));
    // At once: the sealed manifest is there, byte for byte the local one, and every chunk.
    let job = garage.job(&gcs, "cts-tier", "gid-tier-r").await;
    let remote = job
        .get_manifest(&record.id)
        .await
        .unwrap()
        .expect("the manifest is in the bucket when the checkpoint is answered");
    let local =
        std::fs::read(cts.image_dir(&record.id).join("manifest.json")).expect("local manifest");
    assert_eq!(remote, local);
    let manifest = gca_store::Manifest::parse(&remote).unwrap();
    assert!(manifest.is_chunked());
    let chunks = manifest.chunk_set();
    assert!(!chunks.is_empty());
    let ids: Vec<_> = chunks.keys().cloned().collect();
    let all = tokio::task::spawn_blocking(move || {
        use gca_store::ChunkBackend;
        ids.iter()
            .all(|c| job.read(c).is_ok_and(|d| gca_store::ChunkId::of(&d) == *c))
    })
    .await
    .unwrap();
    assert!(
        all,
        "every chunk of the image is in the bucket and opens to itself"
    );
}

#[tokio::test]
async fn an_async_checkpoint_reaches_the_bucket_after_it_is_answered() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-tier-a",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("async"),
    )
    .await;
    let (record, _job) = checkpointed(&gcs, &cts, "gid-tier-a").await;
    assert_eq!(record.sequence, Some(1));
    let job = garage.job(&gcs, "cts-tier-a", "gid-tier-a").await;
    let id = record.id.clone();
    eventually(
        Duration::from_secs(20),
        "the manifest reaches the bucket",
        || {
            let job = &job;
            let id = id.clone();
            async move { matches!(job.get_manifest(&id).await, Ok(Some(_))) }
        },
    )
    .await;
}
