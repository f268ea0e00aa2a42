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

    job.put_manifest(
        "cts-a-1",
        b"{\"manifest\": \"of job 1\"}",
        &Default::default(),
    )
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

/// An image of `files` random-looking files (each `len` bytes) committed into `store`.
async fn image(store: &gca_store::ImageStore, id: &str, files: usize, len: usize) -> Vec<u8> {
    let id = gca_store::ImageId::parse(id).unwrap();
    let staging = store.stage(&id).await.unwrap();
    let mut all = Vec::new();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for f in 0..files {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(staging.dir.join(format!("pages-{f}.img")), &data).unwrap();
        all.extend_from_slice(&data);
    }
    staging
        .commit(gca_store::ImageMeta {
            gid: "gid-s3-packs".into(),
            created_at: std::time::SystemTime::now().into(),
            driver: "criu".into(),
            origin: "cts-a".into(),
            extra: Default::default(),
        })
        .await
        .unwrap();
    all
}

fn refs(m: &gca_store::Manifest) -> Vec<gca_store::ChunkRef> {
    gca_objstore::distinct_chunks(m.files.iter().flat_map(|f| &f.chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_goes_up_in_packs_and_comes_back_verified_into_an_empty_store() {
    let cluster = Cluster::start();
    let bucket = Bucket::open(&cluster.config()).unwrap();
    let job = Arc::new(bucket.job("gid-s3-packs", &key(7)));
    let dirs = tempfile::tempdir().unwrap();
    let a = gca_store::ImageStore::open(&dirs.path().join("a"), None).unwrap();
    let id = gca_store::ImageId::parse("cts-a-20260101T000000Z-000000000001").unwrap();
    let plain = image(&a, id.as_str(), 3, 4 << 20).await;
    let manifest = a.manifest(&id).await.unwrap();
    let chunks = refs(&manifest);
    assert!(chunks.len() > 100, "{} chunks", chunks.len());

    let (up, places) = job.upload_chunks(&a, &chunks).await.unwrap();
    assert_eq!((up.chunks, up.skipped), (chunks.len(), 0));
    assert_eq!(places.len(), chunks.len(), "every chunk placed");
    assert_eq!(up.bytes, plain.len() as u64);
    assert!(
        up.objects <= plain.len().div_ceil(gca_objstore::PACK_BYTES) + 1,
        "{} chunks went as {} packs",
        up.chunks,
        up.objects
    );
    let (again, placed_again) = job.upload_chunks(&a, &chunks).await.unwrap();
    assert_eq!(
        (again.chunks, again.skipped, again.objects),
        (0, chunks.len(), 0),
        "nothing is uploaded twice"
    );
    assert_eq!(
        placed_again, places,
        "the chunks the bucket had are placed too"
    );
    // Another client of the same job (a CTS after a restart) sees the packs from the bucket.
    let fresh = Arc::new(bucket.job("gid-s3-packs", &key(7)));
    assert_eq!(
        fresh.upload_chunks(&a, &chunks).await.unwrap().0.chunks,
        0,
        "the packs' indexes are read back from the bucket"
    );
    let bytes = a.manifest_bytes(&id).await.unwrap();
    job.put_manifest(id.as_str(), &bytes, &places)
        .await
        .unwrap();
    // A client that never saw the job reads the manifest and where its chunks are.
    let cold = Arc::new(bucket.job("gid-s3-packs", &key(7)));
    let (got, placed) = cold.get_image(id.as_str()).await.unwrap().unwrap();
    assert_eq!((&got, &placed), (&bytes, &places));
    assert_eq!(
        cold.get_manifest(id.as_str()).await.unwrap(),
        Some(bytes.clone())
    );

    // The bucket: a pack and an index per pack, the manifest; no plaintext anywhere.
    let objects = cluster.raw_objects().await;
    assert_eq!(
        objects.len(),
        2 * up.objects + 1,
        "{:?}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    for (name, body) in &objects {
        assert!(
            !body.windows(32).any(|w| w == &plain[4096..4128]),
            "{name} holds the plaintext"
        );
    }

    // Into an empty store: every chunk, verified; the image reads back whole.
    let b = gca_store::ImageStore::open(&dirs.path().join("b"), None).unwrap();
    let staging = b.stage(&id).await.unwrap();
    for c in &chunks {
        staging.pins().pin(&c.id);
    }
    let down = cold.download_chunks(&b, &chunks, &placed).await.unwrap();
    assert_eq!(
        (down.chunks, down.bytes),
        (chunks.len(), plain.len() as u64)
    );
    assert_eq!(down.objects, up.objects, "one ranged read per pack");
    assert!(
        !down.listed,
        "the manifest placed every chunk: nothing listed"
    );
    staging.commit_with_manifest(bytes.clone()).await.unwrap();
    b.verify(&id).await.unwrap();
    let dir = b.materialize(&id).await.unwrap();
    let mut back = Vec::new();
    for f in 0..3 {
        back.extend(std::fs::read(dir.join(format!("pages-{f}.img"))).unwrap());
    }
    assert!(back == plain, "the downloaded image is the uploaded one");

    // A flipped byte in a pack: the download stops, naming the chunk.
    let (name, mut body) = objects
        .into_iter()
        .find(|(n, _)| n.contains("/packs/") && !n.ends_with(".index"))
        .unwrap();
    body[5000] ^= 0x01;
    {
        use object_store::ObjectStore;
        cluster
            .raw_store()
            .put(&name.as_str().into(), body.into())
            .await
            .unwrap();
    }
    let c = gca_store::ImageStore::open(&dirs.path().join("c"), None).unwrap();
    let e = fresh
        .download_chunks(&c, &chunks, &places)
        .await
        .unwrap_err();
    assert!(matches!(e, gca_objstore::Error::Corrupt(_)), "{e:?}");
    assert!(
        e.to_string().contains("gid-s3-packs") && e.to_string().contains("chunk "),
        "{e}"
    );

    // A sweep keeping nothing removes every pack and index (the manifest stays its caller's).
    let removed = job.sweep(&BTreeSet::new()).await.unwrap();
    assert_eq!(removed, up.objects);
    let left: Vec<String> = cluster
        .raw_objects()
        .await
        .into_iter()
        .map(|o| o.0)
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with("/manifest"), "{left:?}");
    // Another client of the job had read those packs' indexes: it uploads everything again
    // rather than trusting what it read before the sweep.
    let (again, replaced) = fresh.upload_chunks(&a, &chunks).await.unwrap();
    assert_eq!((again.chunks, again.skipped), (chunks.len(), 0));

    // A download given the places of before the sweep (packs gone since) lists the job's
    // objects and finds the chunks where they are now; one given no places (a manifest an
    // earlier version stored) lists them too.
    for (dir, stale) in [("d", &places), ("e", &Default::default())] {
        let d = gca_store::ImageStore::open(&dirs.path().join(dir), None).unwrap();
        let staging = d.stage(&id).await.unwrap();
        for c in &chunks {
            staging.pins().pin(&c.id);
        }
        let down = cold.download_chunks(&d, &chunks, stale).await.unwrap();
        assert_eq!((down.chunks, down.listed), (chunks.len(), true), "{dir}");
        staging.commit_with_manifest(bytes.clone()).await.unwrap();
        d.verify(&id).await.unwrap();
    }
    assert_ne!(replaced, places, "the chunks are in new packs");
}
