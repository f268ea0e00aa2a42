//! Compatibility before restore with real CRIU: the facts a checkpoint records, a candidate
//! refused by gca-recover before anything is registered or fetched (exit 72, with the
//! reason) because its CRIU version differs or a file the job had open is missing, and the
//! same candidate accepted when its site relaxes the rule in `[compatibility]`.
//!
//! Every CTS runs the same CRIU here; a CTS reports another CRIU version through its
//! `[facts] criu_version` setting (what the GCS and the CTS judge images by).

use std::time::Duration;

use gca_protocol::facts::Verdict;
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

const T: Duration = Duration::from_secs(20);

/// `script` under gca-exec at `cts`, registered, counting to 3 in `log`.
async fn exec(cts: &TestCts, gid: &str, script: &str, log: &std::path::Path) -> Wrapper {
    let job = Wrapper::spawn(
        "gca-exec",
        &["--gid", gid, "--cts", &cts.url, "--", "bash", "-c", script],
        cts.dir.path(),
    );
    eventually(T, "the job runs registered", || async {
        cts.local.job(gid).await.is_ok_and(|j| j.pid == job.pid) && values(log).len() >= 3
    })
    .await;
    job
}

/// Checkpoints and stops the job through the GCS; waits until its CTS let it go.
async fn stop(gcs: &TestGcs, cts: &TestCts, gid: &str, job: &mut Wrapper) -> CheckpointRecord {
    let r = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: true,
        })
        .await
        .expect("doCheckpoint");
    job.wait(T).await;
    eventually(T, "the CTS lets the stopped job go", || async {
        cts.local.job(gid).await.is_err()
    })
    .await;
    r
}

async fn recovery_info(gcs: &TestGcs, gid: &str) -> RecoveryInfo {
    gcs.call::<GetRecoveryInfoOp>(GetRecoveryInfo {
        gid: gid.into(),
        image: LATEST.into(),
    })
    .await
    .unwrap()
}

fn recover(cts: &TestCts, gid: &str, pid: i32) -> Wrapper {
    let mut rec = Wrapper::spawn(
        "gca-recover",
        &["--gid", gid, "--image", "latest", "--cts", &cts.url],
        cts.dir.path(),
    );
    rec.adopt(pid);
    rec
}

/// gca-recover at `cts` gives up with 72 before anything is registered or fetched; returns
/// its message.
async fn refused(gcs: &TestGcs, cts: &TestCts, gid: &str, pid: i32, image: &str) -> String {
    let mut rec = recover(cts, gid, pid);
    let code = rec.code(T).await;
    let err = rec.stderr_text();
    assert_eq!(code, 72, "{err}");
    assert!(err.contains("nothing was fetched"), "{err}");
    assert!(
        !cts.image_dir(image).exists(),
        "the image was fetched into {}'s store",
        cts.name
    );
    let job = gcs_job(gcs, gid).await;
    assert_eq!(job.state, JobState::Stopped, "nothing was registered");
    assert_eq!(job.recoveries, 0);
    err
}

/// gca-recover at `cts` gets the job running there; then ends it.
async fn recovers(cts: &TestCts, gid: &str, pid: i32) {
    let mut rec = recover(cts, gid, pid);
    eventually(T, "the job runs again", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        cts.local
            .job(gid)
            .await
            .is_ok_and(|j| j.pid == pid && j.state == JobState::Running)
    })
    .await;
    rec.signal("TERM");
    rec.wait(T).await;
}

#[tokio::test]
async fn another_criu_version_is_refused_before_any_fetch_and_accepted_when_relaxed() {
    let gcs = TestGcs::start().await;
    // cts-b takes the image; cts-a reports another CRIU minor version; cts-c too, at a site
    // that accepts another minor version.
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let a = TestCts::registered(
        &gcs,
        "cts-a",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        "[facts]\ncriu_version = \"4.0.0\"\n",
    )
    .await;
    let c = TestCts::registered(
        &gcs,
        "cts-c",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        "[facts]\ncriu_version = \"4.0.0\"\n[compatibility]\ncriu_version = \"same-major\"\n",
    )
    .await;
    let gid = "gid-compat-criu";
    let log = b.dir.path().join("counter.log");
    let mut job = exec(&b, gid, &counter_script(&log), &log).await;
    let pid = job.pid;
    let record = stop(&gcs, &b, gid, &mut job).await;

    // The record carries the facts, as signed by cts-b.
    let facts = record.facts.clone().expect("the record's facts");
    let here = b.cts.resource_facts();
    assert_eq!(facts.resource, here);
    let criu = here.criu_version.clone().expect("CRIU's version");
    assert!(facts.resource.cpuinfo.is_some(), "criu cpuinfo dump");
    assert!(facts.executable.as_ref().unwrap().path.ends_with("bash"));
    assert!(facts.mapped_files.iter().any(|f| f.path.contains("libc")));
    assert!(
        facts.open_files.contains(&log.display().to_string()),
        "{:?}",
        facts.open_files
    );

    // The GCS (strict rules) puts cts-b first and says why the others cannot.
    let info = recovery_info(&gcs, gid).await;
    let names: Vec<&str> = info
        .candidates
        .iter()
        .map(|c| c.instance.name.as_str())
        .collect();
    assert_eq!(names, ["cts-b", "cts-a", "cts-c"]);
    let why = info.candidates[1].compatibility.as_ref().unwrap();
    assert_eq!(why.verdict, Verdict::Incompatible);
    assert!(
        why.reasons[0].starts_with(&format!("CRIU 4.0.0 differs from {criu}")),
        "{why:?}"
    );

    let err = refused(&gcs, &a, gid, pid, &record.id).await;
    assert!(
        err.contains(&format!("CRIU 4.0.0 differs from {criu}")),
        "{err}"
    );
    // cts-c's site accepts another minor version: its CTS judges so, fetches and restores.
    recovers(&c, gid, pid).await;
    assert!(c.image_files(&record.id).join("pstree.img").is_file());
}

#[tokio::test]
async fn a_missing_open_file_is_refused_before_any_fetch_unless_the_site_ignores_it() {
    let gcs = TestGcs::start().await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let data = b.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let input = data.join("in.dat");
    std::fs::write(&input, "input\n").unwrap();
    let c = TestCts::registered(
        &gcs,
        "cts-c",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        &format!(
            "[compatibility]\nignore_missing = [{:?}]\n",
            format!("{}/*", data.display())
        ),
    )
    .await;
    let gid = "gid-compat-file";
    let log = b.dir.path().join("counter.log");
    let script = format!("exec 4<{input:?}; {}", counter_script(&log));
    let mut job = exec(&b, gid, &script, &log).await;
    let pid = job.pid;
    let record = stop(&gcs, &b, gid, &mut job).await;
    assert!(record
        .facts
        .as_ref()
        .unwrap()
        .open_files
        .contains(&input.display().to_string()));
    // The input is gone (a scratch directory wiped).
    std::fs::remove_file(&input).unwrap();

    // The GCS cannot see files: every candidate is compatible, the files left to its CTS.
    let info = recovery_info(&gcs, gid).await;
    for cand in &info.candidates {
        let v = cand.compatibility.as_ref().unwrap();
        assert_eq!(v.verdict, Verdict::Compatible, "{v:?}");
    }
    let err = refused(&gcs, &a, gid, pid, &record.id).await;
    assert!(
        err.contains(&format!(
            "{} missing (file the job had open)",
            input.display()
        )),
        "{err}"
    );

    // cts-c's site ignores the missing file: its check lets the image be fetched, and CRIU
    // itself then finds the file missing (72 again, after the fetch): the relaxation is for
    // files provided after the check.
    let mut rec = recover(&c, gid, pid);
    let code = rec.code(T).await;
    let err = rec.stderr_text();
    assert!(!err.contains("nothing was fetched"), "{err}");
    assert!(
        c.image_files(&record.id).join("pstree.img").is_file(),
        "{err}"
    );
    assert_eq!(code, 72, "{err}");
    eventually(T, "the abandoned recovery is undone", || async {
        gcs_job(&gcs, gid).await.state == JobState::Stopped
    })
    .await;

    // With the file back, cts-a accepts and restores.
    std::fs::write(&input, "input\n").unwrap();
    recovers(&a, gid, pid).await;
}
