//! Images as chunks with real CRIU jobs: a second checkpoint of an almost unchanged job stores
//! and transfers only the chunks that changed; an image written by a store before chunks
//! (format 1, whole files) is still fetched and recovered.

use std::time::Duration;

use gca_protocol::local::FetchImage;
use gca_protocol::messages::*;
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

use super::criu::{checkpoint, exec_job, stop_job, wait_values};

const T: Duration = Duration::from_secs(30);

/// A counter that holds ~21 MB of random text in its memory (a bash variable), unchanged
/// between checkpoints.
fn big_counter(log: &std::path::Path) -> String {
    format!(
        "big=$(head -c 16000000 /dev/urandom | base64 -w0); {}",
        counter_script(log)
    )
}

/// Recovers `gid` from `image` on `cts` with gca-recover, adopting `pid`; waits until it runs.
async fn recover_on(cts: &TestCts, gid: &str, image: &str, pid: i32) -> Wrapper {
    let url = cts.url.clone();
    let mut rec = Wrapper::spawn(
        "gca-recover",
        &["--gid", gid, "--image", image, "--cts", &url],
        cts.dir.path(),
    );
    rec.adopt(pid);
    eventually(T, "the job runs again", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        cts.local
            .job(gid)
            .await
            .is_ok_and(|j| j.pid == pid && j.state == JobState::Running)
    })
    .await;
    rec
}

#[tokio::test]
async fn a_second_checkpoint_stores_and_transfers_only_the_changed_chunks() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-chunks";
    let log = a.dir.path().join("counter.log");
    let mut job = exec_job(&gcs, &a, gid, &big_counter(&log)).await;
    let pid = job.pid;
    wait_values(&log, 5).await;

    let first = checkpoint(&gcs, gid, false).await;
    let m1 = a.image_manifest(&first.id);
    assert!(m1.is_chunked(), "format 2");
    assert!(m1.total_bytes > 16_000_000, "{}", m1.total_bytes);
    let (_, stored_one) = a.stored_chunks();
    // One image, stored once (CRIU's images hold some repeated pages: at most its size).
    assert!(
        stored_one <= m1.total_bytes,
        "{stored_one} > {}",
        m1.total_bytes
    );

    wait_values(&log, values(&log).len() + 5).await;
    let second = stop_job(&gcs, &a, gid, &mut job).await;
    let m2 = a.image_manifest(&second.id);
    let (_, stored_two) = a.stored_chunks();
    let added = stored_two - stored_one;
    // The counter changed a few pages; the 21 MB it holds did not.
    assert!(
        added * 8 < m2.total_bytes,
        "the second checkpoint added {added} bytes of chunks for an image of {}",
        m2.total_bytes
    );

    // B recovers from the first image (all of it crosses), then fetches the second: only
    // the chunks B lacks cross.
    let mut rec = recover_on(&b, gid, &first.id, pid).await;
    let (_, b_after_first) = b.stored_chunks();
    assert!(
        b_after_first >= stored_one * 9 / 10,
        "{b_after_first} {stored_one}"
    );
    let fetched = b
        .local
        .fetch_image(&FetchImage {
            gid: gid.into(),
            checkpoint_id: second.id.clone(),
            digest: second.digest.clone(),
        })
        .await
        .expect("B fetches the second image");
    assert!(fetched.fetched);
    assert!(
        fetched.bytes_transferred * 8 < m2.total_bytes,
        "{} bytes crossed for an image of {}",
        fetched.bytes_transferred,
        m2.total_bytes
    );
    assert!(fetched.bytes_transferred > 0);
    let (_, b_after_second) = b.stored_chunks();
    assert_eq!(b_after_second - b_after_first, fetched.bytes_transferred);
    // And it is whole: CRIU's files, made from chunks.
    assert!(fetched.image_dir.join("pstree.img").is_file());
    assert_eq!(
        std::fs::metadata(fetched.image_dir.join("pstree.img"))
            .unwrap()
            .len(),
        m2.files
            .iter()
            .find(|f| f.path == "pstree.img")
            .unwrap()
            .size
    );
    rec.kill_job_and_wait(T).await;
}

#[tokio::test]
async fn an_image_in_the_old_whole_file_format_is_fetched_and_recovered() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(
        &gcs,
        "cts-a",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        "[store]\nwhole_files = true",
    )
    .await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-old-format";
    let log = a.dir.path().join("counter.log");
    let mut job = exec_job(&gcs, &a, gid, &counter_script(&log)).await;
    let pid = job.pid;
    wait_values(&log, 5).await;
    let record = stop_job(&gcs, &a, gid, &mut job).await;
    let m = a.image_manifest(&record.id);
    assert_eq!(m.format, 1, "written as before chunks");
    assert!(a.image_dir(&record.id).join("pstree.img").is_file());
    assert_eq!(a.stored_chunks().0, 0);
    let stopped_at = values(&log).len();

    let mut rec = recover_on(&b, gid, &record.id, pid).await;
    wait_values(&log, stopped_at + 3).await;
    // B keeps it as it is: same format, same digest.
    assert_eq!(b.image_manifest(&record.id).format, 1);
    assert_eq!(b.stored_chunks().0, 0);
    rec.kill_job_and_wait(T).await;
}
