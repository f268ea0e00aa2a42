//! The object-store tier against a real Garage cluster of three nodes on loopback
//! (`scripts/garage-cluster`; the binary from `scripts/install-garage`, which
//! `scripts/install-deps` runs). Each test has a cluster of its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use gca_objstore::{Bucket, BucketConfig, JobChunks, Secret};
use gca_store::{ChunkBackend, ChunkId};

struct Cluster {
    dir: tempfile::TempDir,
    env: std::collections::HashMap<String, String>,
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

    fn config(&self) -> BucketConfig {
        BucketConfig {
            endpoints: self.env["GCA_S3_ENDPOINTS"]
                .split(' ')
                .map(String::from)
                .collect(),
            region: self.env["GCA_S3_REGION"].clone(),
            bucket: self.env["GCA_S3_BUCKET"].clone(),
            access_key_id: self.env["GCA_S3_ACCESS_KEY_ID"].clone(),
            secret_access_key: Secret::new(self.env["GCA_S3_SECRET_ACCESS_KEY"].clone()),
            prefix: "test".into(),
            allow_http: true,
            request_timeout_secs: 10,
        }
    }

    fn kill(&self, node: u32) {
        let ok = Command::new("bash")
            .arg(script())
            .args(["kill", self.dir.path().to_str().unwrap(), &node.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill node {node}");
    }

    /// The bucket as anyone with its credentials sees it (no sealing).
    fn raw_store(&self) -> object_store::aws::AmazonS3 {
        let c = self.config();
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&c.endpoints[0])
            .with_region(&c.region)
            .with_bucket_name(&c.bucket)
            .with_access_key_id(&c.access_key_id)
            .with_secret_access_key(c.secret_access_key.expose())
            .with_allow_http(true)
            .build()
            .unwrap()
    }

    /// Every object's raw bytes, as anyone with the bucket's credentials reads them.
    async fn raw_objects(&self) -> Vec<(String, Vec<u8>)> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let s3 = self.raw_store();
        let metas: Vec<_> = s3.list(None).try_collect().await.unwrap();
        let mut out = Vec::new();
        for m in metas {
            let bytes = s3.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.push((m.location.to_string(), bytes.to_vec()));
        }
        out
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

fn key(n: u8) -> [u8; 32] {
    [n; 32]
}

/// A chunk of recognisable plaintext.
fn chunk(tag: &str, len: usize) -> Vec<u8> {
    tag.as_bytes().iter().copied().cycle().take(len).collect()
}

/// Runs backend calls off the runtime's workers, as the store does.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_stored_once_sealed_and_read_back_by_their_job_only() {
    let cluster = Cluster::start();
    let bucket = Bucket::open(&cluster.config()).unwrap();
    let job = Arc::new(bucket.job("gid-s3-1", &key(1)));
    let data = chunk("secret-page-of-job-1 ", 100_000);
    let id = ChunkId::of(&data);
    let (j, d) = (job.clone(), data.clone());
    let (absent, wrote, again, present, back) = blocking(move || {
        (
            j.has(&id).unwrap(),
            j.put(&id, &d).unwrap(),
            j.put(&id, &d).unwrap(),
            j.has(&id).unwrap(),
            j.read(&id).unwrap(),
        )
    })
    .await;
    assert!(!absent);
    assert!(wrote, "the first put writes");
    assert!(!again, "the same chunk again is not uploaded");
    assert!(present);
    assert_eq!(back, data);

    job.put_manifest("cts-a-1", b"{\"manifest\": \"of job 1\"}")
        .await
        .unwrap();
    assert_eq!(
        job.get_manifest("cts-a-1").await.unwrap().as_deref(),
        Some(&b"{\"manifest\": \"of job 1\"}"[..])
    );
    assert_eq!(job.get_manifest("cts-a-2").await.unwrap(), None);

    // What anyone with the bucket's credentials sees: no plaintext, no GID, no digest.
    let objects = cluster.raw_objects().await;
    assert_eq!(
        objects.len(),
        2,
        "{:?}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    for (name, bytes) in &objects {
        assert!(!name.contains("gid-s3-1"), "{name}");
        assert!(
            !name.contains(&id.to_hex()),
            "{name} shows the chunk's digest"
        );
        assert!(
            !bytes.windows(20).any(|w| w == &data[..20]),
            "{name} holds the plaintext"
        );
        assert!(
            !String::from_utf8_lossy(bytes).contains("of job 1"),
            "{name}"
        );
    }

    // Another job's key reads nothing of it: not its chunks, not its manifests, even when
    // it is pointed at this job's objects.
    let thief = Arc::new(bucket.job("gid-s3-1", &key(2)));
    let t = thief.clone();
    let (seen, read) = blocking(move || (t.has(&id).unwrap(), t.read(&id))).await;
    assert!(!seen, "names are keyed: another key finds no such chunk");
    assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    let other_job = Arc::new(bucket.job("gid-s3-2", &key(1)));
    let o = other_job.clone();
    assert!(
        !blocking(move || o.has(&id).unwrap()).await,
        "chunks are per job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_object_is_refused_naming_the_chunk() {
    let cluster = Cluster::start();
    let bucket = Bucket::open(&cluster.config()).unwrap();
    let job = Arc::new(bucket.job("gid-s3-flip", &key(3)));
    let data = chunk("flip me ", 70_000);
    let id = ChunkId::of(&data);
    let (j, d) = (job.clone(), data.clone());
    blocking(move || j.put(&id, &d).unwrap()).await;
    // Flip one byte of the stored object, as a faulty disk or an attacker with write access.
    let (name, mut bytes) = cluster.raw_objects().await.remove(0);
    bytes[1000] ^= 0x01;
    {
        use object_store::ObjectStore;
        let s3 = cluster.raw_store();
        s3.put(&name.as_str().into(), bytes.into()).await.unwrap();
    }
    let j = job.clone();
    let e = blocking(move || j.read(&id)).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    let text = e.to_string();
    assert!(
        text.contains(&id.to_hex()) && text.contains("gid-s3-flip"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_loses_nothing_and_stops_nothing() {
    let cluster = Cluster::start();
    let bucket = Bucket::open(&cluster.config()).unwrap();
    let job = Arc::new(bucket.job("gid-s3-node", &key(4)));
    let before: Vec<Vec<u8>> = (0..4)
        .map(|i| chunk(&format!("before {i} "), 50_000))
        .collect();
    let (j, b) = (job.clone(), before.clone());
    blocking(move || {
        for c in &b {
            j.put(&ChunkId::of(c), c).unwrap();
        }
    })
    .await;
    // Node 1 is the first endpoint: the client goes on with the next.
    cluster.kill(1);
    let after: Vec<Vec<u8>> = (0..4)
        .map(|i| chunk(&format!("after {i} "), 50_000))
        .collect();
    let (j, b, a) = (job.clone(), before.clone(), after.clone());
    blocking(move || {
        for c in &a {
            assert!(
                j.put(&ChunkId::of(c), c).unwrap(),
                "written with a node down"
            );
        }
        for c in b.iter().chain(&a) {
            assert_eq!(
                &j.read(&ChunkId::of(c)).unwrap(),
                c,
                "read with a node down"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_removes_the_unreferenced_chunks_of_a_job_only() {
    let cluster = Cluster::start();
    let bucket = Bucket::open(&cluster.config()).unwrap();
    let job = Arc::new(bucket.job("gid-s3-gc", &key(5)));
    let neighbour = Arc::new(bucket.job("gid-s3-other", &key(6)));
    let chunks: Vec<Vec<u8>> = (0..6).map(|i| chunk(&format!("gc {i} "), 30_000)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    let (j, n, c) = (job.clone(), neighbour.clone(), chunks.clone());
    blocking(move || {
        for c in &c {
            j.put(&ChunkId::of(c), c).unwrap();
            n.put(&ChunkId::of(c), c).unwrap();
        }
    })
    .await;
    let keep: BTreeSet<ChunkId> = ids[..3].iter().copied().collect();
    assert_eq!(job.sweep(&keep).await.unwrap(), 3);
    assert_eq!(
        job.sweep(&keep).await.unwrap(),
        0,
        "a second sweep finds nothing"
    );
    let (j, n, ids2) = (job.clone(), neighbour.clone(), ids.clone());
    let (mine, theirs) = blocking(move || {
        (
            ids2.iter().map(|id| j.has(id).unwrap()).collect::<Vec<_>>(),
            ids2.iter().map(|id| n.has(id).unwrap()).collect::<Vec<_>>(),
        )
    })
    .await;
    assert_eq!(mine, [true, true, true, false, false, false]);
    assert_eq!(theirs, [true; 6], "another job's chunks are not touched");
}

#[test]
fn plain_http_and_bad_endpoints_are_refused_up_front() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let mut c = BucketConfig {
        endpoints: vec!["http://127.0.0.1:9".into()],
        region: "garage".into(),
        bucket: "b".into(),
        access_key_id: "GK0".into(),
        secret_access_key: Secret::new("s"),
        prefix: String::new(),
        allow_http: false,
        request_timeout_secs: 5,
    };
    let e = Bucket::open(&c).unwrap_err().to_string();
    assert!(e.contains("plain HTTP"), "{e}");
    c.endpoints = vec!["ftp://x".into()];
    assert!(Bucket::open(&c).is_err());
    c.endpoints.clear();
    assert!(Bucket::open(&c).is_err());
    assert!(
        !format!("{c:?}").contains("\"s\""),
        "the secret is not in Debug"
    );
}

#[allow(dead_code)]
fn _assert_backend(j: JobChunks) -> Box<dyn ChunkBackend> {
    Box::new(j)
}
