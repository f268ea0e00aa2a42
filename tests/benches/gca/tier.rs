//! tier: the object-store tier against the object store itself, and a checkpoint that waits
//! for it (`replicated`) against one that does not (`local`).
//!
//! Upload and download go through the functions the CTS uses (`JobChunks::upload_chunks` and
//! `download_chunks`, then the sealed manifest), between an image store on disk and a 3-node
//! Garage cluster on loopback (replication factor 3, `scripts/garage-cluster`); the baselines
//! PUT and GET the same bytes, as one plain object per image file, with the same S3 client
//! crate against the same cluster (the PUT with bytes new to the cluster each time, as the
//! tier's sealed chunks are: see `unlike_before`).

use super::*;

use gca_objstore::{Bucket, JobChunks};
use integration_tests::garage::Cluster;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

/// The same S3 client the tier uses, without the tier: plain objects in the same bucket.
fn plain_client(cluster: &Cluster) -> Arc<dyn ObjectStore> {
    let c = cluster.bucket_config("bench-plain");
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&c.endpoints[0])
        .with_region(&c.region)
        .with_bucket_name(&c.bucket)
        .with_access_key_id(&c.access_key_id)
        .with_secret_access_key(c.secret_access_key.expose())
        .with_virtual_hosted_style_request(false)
        .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
        .build()
        .expect("a plain S3 client");
    Arc::new(store)
}

/// A job key of its own.
fn new_key() -> [u8; gca_objstore::JOB_KEY_LEN] {
    let mut key = [0u8; gca_objstore::JOB_KEY_LEN];
    key.iter_mut()
        .zip(uuid::Uuid::new_v4().as_bytes().iter().cycle())
        .for_each(|(k, b)| *k = *b);
    key
}

fn job(bucket: &Bucket, gid: &str) -> Arc<JobChunks> {
    Arc::new(bucket.job(gid, &new_key()))
}

/// An image's files, read whole into memory (the plain variants send and compare these).
async fn image_files(store: &ImageStore, id: &ImageId) -> Vec<(String, bytes::Bytes)> {
    let dir = store.materialize(id).await.expect("materialize the image");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).expect("the image's files") {
        let e = e.expect("a directory entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "manifest.json" {
            continue;
        }
        files.push((
            name,
            bytes::Bytes::from(std::fs::read(e.path()).expect("a file")),
        ));
    }
    files
}

async fn upload_through_tier(job: &Arc<JobChunks>, store: &ImageStore, id: &ImageId) {
    let bytes = store.manifest_bytes(id).await.expect("the manifest");
    let manifest = Manifest::parse(&bytes).expect("a manifest");
    let refs = gca_objstore::distinct_chunks(manifest.files.iter().flat_map(|f| &f.chunks));
    let (moved, places) = job
        .upload_chunks(store, &refs)
        .await
        .expect("upload the chunks");
    assert_eq!(
        moved.skipped, 0,
        "a fresh job's part of the bucket is empty"
    );
    job.put_manifest(id.as_str(), &bytes, &places)
        .await
        .expect("upload the manifest");
}

async fn download_through_tier(job: &Arc<JobChunks>, into: &ImageStore, id: &ImageId) {
    let (bytes, places) = job
        .get_image(id.as_str())
        .await
        .expect("the manifest from the bucket")
        .expect("the manifest is there");
    let manifest = Manifest::parse(&bytes).expect("a manifest");
    let staging = into.stage(id).await.expect("stage");
    let refs = gca_objstore::distinct_chunks(manifest.files.iter().flat_map(|f| &f.chunks));
    for r in &refs {
        staging.pins().pin(&r.id);
    }
    job.download_chunks(into, &refs, &places)
        .await
        .expect("download the chunks");
    staging
        .commit_with_manifest(bytes)
        .await
        .expect("commit the downloaded image");
}

/// The files with every byte changed by a keystream from `run`: what a plain PUT sends, so
/// that it sends bytes the cluster has not seen. Garage stores data in content-addressed
/// blocks and does not write a block it holds already, so PUTting the same files again would
/// cost it less than a new image. The tier's upload sends new bytes each time too: each
/// repetition is a new job, whose key seals every chunk differently.
fn unlike_before(
    files: &[(String, bytes::Bytes)],
    run: &uuid::Uuid,
) -> Vec<(String, bytes::Bytes)> {
    let mut state = u64::from_le_bytes(run.as_bytes()[..8].try_into().expect("8 bytes")) | 1;
    files
        .iter()
        .map(|(name, data)| {
            let mut out = data.to_vec();
            for word in out.chunks_mut(8) {
                // xorshift64
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                for (b, k) in word.iter_mut().zip(state.to_le_bytes()) {
                    *b ^= k;
                }
            }
            (name.clone(), bytes::Bytes::from(out))
        })
        .collect()
}

/// Each file as one object, all at once (as many requests in flight as files).
async fn plain_put(s: &Arc<dyn ObjectStore>, dir: &str, files: &[(String, bytes::Bytes)]) {
    futures::future::try_join_all(files.iter().map(|(name, data)| {
        let path = ObjectPath::from(format!("{dir}/{name}").as_str());
        let payload = PutPayload::from(data.clone());
        async move { s.put(&path, payload).await }
    }))
    .await
    .expect("plain PUT");
}

/// Each file GET into a file next to `dest`'s store, one fsync per file (as durable as the
/// tier's download, which syncs what it wrote).
async fn plain_get(s: &Arc<dyn ObjectStore>, dir: &str, names: &[String], dest: &Path) {
    std::fs::create_dir_all(dest).expect("a download directory");
    futures::future::try_join_all(names.iter().map(|name| {
        let path = ObjectPath::from(format!("{dir}/{name}").as_str());
        let out = dest.join(name);
        async move {
            let mut stream = s.get(&path).await?.into_stream();
            let mut f = tokio::fs::File::create(&out).await.expect("create a file");
            while let Some(b) = stream.next().await {
                f.write_all(&b?).await.expect("write");
            }
            f.sync_all().await.expect("fsync");
            Ok::<(), object_store::Error>(())
        }
    }))
    .await
    .expect("plain GET");
}

pub(super) async fn bench_tier(opts: Options) -> Vec<Row> {
    let cluster = Cluster::start();
    let bucket = Bucket::open(&cluster.bucket_config("bench-tier")).expect("open the bucket");
    let plain = plain_client(&cluster);
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let source = ImageStore::open(&scratch.path().join("source"), None).expect("a store");
    let total = (opts.image_mib / 2).max(16) << 20;
    let id = ImageId::parse("bench-tier-20260101T000000Z-0123456789ab").expect("an image ID");
    let manifest = make_image(&source, id.as_str(), total, false).await;
    let chunks = manifest.files.iter().map(|f| f.chunks.len()).sum::<usize>();
    let files = image_files(&source, &id).await;
    let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let mib = total as f64 / (1u64 << 20) as f64;
    // What the download variants read: the image once through the tier, once plain.
    let fixed_key = new_key();
    upload_through_tier(
        &Arc::new(bucket.job("bench-tier-download", &fixed_key)),
        &source,
        &id,
    )
    .await;
    plain_put(&plain, "fixed", &files).await;
    let refs = (
        &bucket,
        &source,
        &id,
        &plain,
        &files,
        &names,
        &fixed_key,
        scratch.path(),
    );
    let s = interleaved(&opts, "tier", 4, |v| {
        let (bucket, source, id, plain, files, names, fixed_key, scratch) = refs;
        async move {
            let run = uuid::Uuid::new_v4();
            let into = scratch.join(run.simple().to_string());
            // Not timed: bytes no earlier PUT sent (see `unlike_before`).
            let fresh = (v == 1).then(|| unlike_before(files, &run));
            // Not timed either: a recovering CTS has its store open.
            let empty = (v == 2).then(|| ImageStore::open(&into, None).expect("an empty store"));
            let run = run.simple().to_string();
            let start = Instant::now();
            match v {
                0 => upload_through_tier(&job(bucket, &run), source, id).await,
                1 => plain_put(plain, &run, fresh.as_deref().expect("fresh bytes")).await,
                2 => {
                    let store = empty.expect("the empty store");
                    // A client that never saw the job, as on the resource a job is
                    // recovered on.
                    let cold = Arc::new(bucket.job("bench-tier-download", fixed_key));
                    download_through_tier(&cold, &store, id).await;
                }
                _ => plain_get(plain, "fixed", names, &into).await,
            }
            let secs = start.elapsed().as_secs_f64();
            if v >= 2 {
                std::fs::remove_dir_all(&into).expect("remove the download");
            }
            secs / mib
        }
    })
    .await;
    let note = format!(
        "{mib:.0} MiB of random bytes, {chunks} chunks in {} files; 3 Garage nodes on loopback, \
         replication factor 3; {} requests in flight",
        files.len(),
        gca_objstore::IN_FLIGHT
    );
    let mut rows = vec![
        Row {
            bench: "tier",
            measurement: "upload of an image through the tier (a listing of the job's packs, \
                          each missing chunk read back verified and sealed with AES-256-GCM, PUT \
                          in packs of up to 8 MiB with a sealed index each; the sealed manifest) \
                          into an empty job"
                .into(),
            baseline: "plain PUT of as many bytes, one object per file, same S3 client and \
                       cluster; bytes the cluster has not stored before (Garage does not write \
                       a block it holds: the same files again would cost it less)"
                .into(),
            unit: Unit::MibPerSec,
            subject: s[0].clone(),
            base: s[1].clone(),
            note: note.clone(),
        },
        Row {
            bench: "tier",
            measurement: "download of the image through the tier into an empty store by a \
                          client that never saw the job, as a recovery elsewhere (the sealed \
                          manifest with where its chunks are, ranged GETs of the packs, each \
                          chunk opened, BLAKE3 against its name, stored; one sync; manifest \
                          committed)"
                .into(),
            baseline: "plain GET of the same files into files, fsync each".into(),
            unit: Unit::MibPerSec,
            subject: s[2].clone(),
            base: s[3].clone(),
            note,
        },
    ];
    rows.extend(replicated_vs_local(&opts, &cluster).await);
    rows
}

/// A CRIU checkpoint of a 64 MiB job at a CTS with `durability = "replicated"` against the
/// same at a CTS with `local`, both steady state (the previous image stored, so only the
/// chunks that changed are written and uploaded).
async fn replicated_vs_local(opts: &Options, cluster: &Cluster) -> Vec<Row> {
    let gcs = TestGcs::start().await;
    let local = TestCts::registered(&gcs, "bench-local", "criu", CRIU_DRIVER, "").await;
    let repl = TestCts::registered(
        &gcs,
        "bench-replicated",
        "criu",
        CRIU_DRIVER,
        &cluster.cts_extra("replicated"),
    )
    .await;
    let mut jobs = Vec::new();
    for (cts, gid) in [
        (&local, "bench-tier-local"),
        (&repl, "bench-tier-replicated"),
    ] {
        let job = big_job(cts.dir.path()).await;
        cts.register(gid, job.pid).await;
        jobs.push(job);
    }
    let per_rep = if opts.quick { 1 } else { 3 };
    let kept: [std::sync::Mutex<Option<String>>; 2] = Default::default();
    let refs = (&local, &repl, &kept);
    let s = interleaved(opts, "tier checkpoint", 2, |v| {
        let (local, repl, kept) = refs;
        async move {
            let (cts, gid) = if v == 0 {
                (repl, "bench-tier-replicated")
            } else {
                (local, "bench-tier-local")
            };
            let req = DoCheckpoint {
                gid: gid.into(),
                stop: false,
            };
            let checkpoint = || async {
                cts.soap
                    .call::<CtsDoCheckpointOp>(&req)
                    .await
                    .expect("a CRIU checkpoint through the CTS")
            };
            if kept[v].lock().unwrap().is_none() {
                *kept[v].lock().unwrap() = Some(checkpoint().await.id);
            }
            let mut secs = 0.0;
            for _ in 0..per_rep {
                let start = Instant::now();
                let r = checkpoint().await;
                secs += start.elapsed().as_secs_f64();
                let old = kept[v].lock().unwrap().replace(r.id);
                if let Some(old) = old {
                    cts.cts
                        .store()
                        .delete(&ImageId::parse(&old).expect("an image ID"))
                        .await
                        .expect("delete the previous image");
                }
            }
            secs / per_rep as f64
        }
    })
    .await;
    assert!(jobs.iter().all(|j| j.running()), "the jobs survived");
    let rows = vec![Row {
        bench: "tier",
        measurement: "CRIU checkpoint of a 64 MiB job with durability `replicated` (acknowledged \
                      once the new chunks and the sealed manifest are in the 3-node Garage), \
                      steady state"
            .into(),
        baseline: "the same with durability `local`, another CTS of the same type".into(),
        unit: Unit::Millis,
        subject: s[0].clone(),
        base: s[1].clone(),
        note: format!("{per_rep} checkpoints per repetition each"),
    }];
    drop(jobs);
    drop(local);
    drop(repl);
    finish(gcs).await;
    rows
}
