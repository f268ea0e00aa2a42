//! Refusals: a tampered image is not restored; gca-exec without a CTS; programs that cannot be
//! executed.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_tampered_image_is_refused_before_anything_is_restored() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER, "").await;
    let gid = "gid-wrap-tamper";
    let log = a.dir.path().join("counter.log");
    let mut job = exec_counter(&a, gid, &log).await;
    let pid = job.pid;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: true,
        })
        .await
        .unwrap();
    job.wait(T).await;
    // Flip one byte of the largest chunk of the image in A's store.
    let chunk = a.corrupt_image(&record.id);

    // On A (the image is in its store) and on B (fetched from A): refused, permanent.
    for (cts, name) in [(&a, "A"), (&b, "B")] {
        let socket = format!("unix:{}", cts.local.socket().display());
        let mut rec = Wrapper::spawn(
            "gca-recover",
            &["--gid", gid, "--image", "latest", "--cts", &socket],
            cts.dir.path(),
        );
        rec.adopt(pid);
        let code = rec.code(T).await;
        let err = rec.stderr_text();
        assert_eq!(code, 65, "on {name}: {err}");
        assert!(err.starts_with("gca-recover: "), "{err}");
        assert!(err.contains(&record.id), "{err}");
        assert!(
            err.contains(&chunk),
            "the fault names the chunk on {name}: {err}"
        );
        assert!(
            gca_drivers::proc::stat(pid).is_none(),
            "nothing was restored on {name}"
        );
        assert!(cts.local.job(gid).await.is_err());
    }
    assert!(
        !b.image_dir(&record.id).exists(),
        "B kept no copy of a bad image"
    );
    // The withdrawn recovery reaches the GCS through the CTS's outbox (AbandonRecovery), after
    // the wrapper has ended.
    eventually(T, "the GCS puts the job back as it was", || async {
        gcs_job(&gcs, gid).await.state == JobState::Stopped
    })
    .await;
    assert_eq!(gcs_job(&gcs, gid).await.recoveries, 0);
}

#[tokio::test]
async fn gca_exec_refuses_without_a_cts_and_exits_like_a_shell() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let touch = format!("touch {ran:?}");
    let nowhere = format!("unix:{}", dir.path().join("no-cts.sock").display());

    // No CTS: refused (temporary), the job does not run.
    let mut w = Wrapper::spawn(
        "gca-exec",
        &["--gid", "g1", "--cts", &nowhere, "--", "bash", "-c", &touch],
        dir.path(),
    );
    assert_eq!(w.code(T).await, 75, "{}", w.stderr_text());
    assert!(w.stderr_text().starts_with("gca-exec: "));
    assert!(!ran.exists());
    // Unless asked to run it uncheckpointable.
    let mut w = Wrapper::spawn(
        "gca-exec",
        &[
            "--gid",
            "g1",
            "--cts",
            &nowhere,
            "--run-uncheckpointable",
            "--",
            "bash",
            "-c",
            &touch,
        ],
        dir.path(),
    );
    assert_eq!(w.code(T).await, 0, "{}", w.stderr_text());
    assert!(ran.exists());
    assert!(w.stderr_text().contains("UNCHECKPOINTABLE"));

    // Like a shell: 127 not found, 126 not executable.
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    for (program, code) in [
        (dir.path().join("missing").display().to_string(), 127),
        (plain.display().to_string(), 126),
    ] {
        let mut w = Wrapper::spawn(
            "gca-exec",
            &[
                "--gid",
                "g2",
                "--cts",
                &nowhere,
                "--run-uncheckpointable",
                "--",
                &program,
            ],
            dir.path(),
        );
        assert_eq!(w.code(T).await, code, "{}", w.stderr_text());
        assert!(w.stderr_text().contains(&program));
    }

    // A wrong command line is a usage error.
    let mut w = Wrapper::spawn("gca-recover", &["--gid", "g"], dir.path());
    assert_eq!(w.code(T).await, 64);
}

#[tokio::test]
async fn a_missing_file_the_job_had_open_is_an_environment_failure() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let gid = "gid-wrap-missing-file";
    let log = a.dir.path().join("counter.log");
    let mut job = exec_counter(&a, gid, &log).await;
    let pid = job.pid;
    gcs.call::<DoCheckpointOp>(DoCheckpoint {
        gid: gid.into(),
        stop: true,
    })
    .await
    .unwrap();
    job.wait(T).await;
    eventually(T, "the CTS lets the stopped job go", || async {
        a.local.job(gid).await.is_err()
    })
    .await;
    // The job's output file is gone on this resource (say, a scratch directory was wiped).
    std::fs::remove_file(&log).unwrap();
    let socket = format!("unix:{}", a.local.socket().display());
    let mut rec = Wrapper::spawn(
        "gca-recover",
        &["--gid", gid, "--image", "latest", "--cts", &socket],
        a.dir.path(),
    );
    rec.adopt(pid);
    let code = rec.code(T).await;
    let err = rec.stderr_text();
    assert_eq!(code, 72, "{err}");
    assert!(
        err.contains("counter.log"),
        "the message names the missing file: {err}"
    );
    // CRIU's half-made task, if any, is gone (it was the wrapper's child; init reaps it).
    eventually(T, "nothing restored is left running", || async {
        gca_drivers::proc::stat(pid).is_none_or(|s| s.state == 'Z')
    })
    .await;
    // The job can be recovered once the file is back.
    assert_ne!(gcs_job(&gcs, gid).await.state, JobState::Running);
}

#[tokio::test]
async fn retention_flags_that_do_not_make_a_policy_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let touch = format!("touch {ran:?}");
    let nowhere = format!("unix:{}", dir.path().join("no-cts.sock").display());
    for (flags, want) in [
        (
            &["--keep-in", "/home/alice/ckpt"][..],
            "--keep-in DIR needs --keep-last N or --keep-all",
        ),
        (&["--keep-last", "2"][..], "--keep-last needs --keep-in DIR"),
        (&["--keep-all"][..], "--keep-all needs --keep-in DIR"),
        (
            &["--keep-last", "0", "--keep-in", "/d"][..],
            "KeepLast must be between 1 and",
        ),
        (
            &["--keep-all", "--keep-in", "ckpt"][..],
            "KeepIn must be an absolute path",
        ),
        (&["--keep-all", "--keep-in", "/a/../b"][..], "normalized"),
        (
            &["--keep-last", "2", "--keep-all", "--keep-in", "/d"][..],
            "cannot be used with",
        ),
    ] {
        // Even --run-uncheckpointable does not run a job whose command line is wrong.
        let mut args = vec!["--gid", "g1", "--cts", &nowhere, "--run-uncheckpointable"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "bash", "-c", &touch]);
        let mut w = Wrapper::spawn("gca-exec", &args, dir.path());
        let err = {
            let code = w.code(T).await;
            let err = w.stderr_text();
            assert_eq!(code, 64, "{flags:?}: {err}");
            err
        };
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(!ran.exists(), "{flags:?}: the job ran");

        let mut args = vec!["--gid", "g1", "--image", "latest", "--cts", &nowhere];
        args.extend_from_slice(flags);
        let mut w = Wrapper::spawn("gca-recover", &args, dir.path());
        assert_eq!(w.code(T).await, 64, "{flags:?}: {}", w.stderr_text());
        assert!(w.stderr_text().contains(want), "{}", w.stderr_text());
    }
}

/// `gca-exec --keep-last 2 --keep-in DIR`: the policy reaches the GCS, and when the job exits
/// 0 its two newest images are in DIR and the older one is gone.
#[tokio::test]
async fn gca_exec_keeps_the_newest_images_when_the_job_exits_0() {
    let gcs = TestGcs::start_with(|c| c.notify_poll_millis = 50).await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let gid = "gid-wrap-retention";
    let keep = a.dir.path().join("kept");
    std::fs::create_dir(&keep).unwrap();
    let keep_in = keep.display().to_string();
    let log = a.dir.path().join("counter.log");
    let flag = a.dir.path().join("finish");
    // Counts until told to finish, then exits 0.
    let script = format!(
        "exec 3>>{log:?}; i=0; while [ ! -e {flag:?} ]; do i=$((i+1)); echo $i >&3; sleep 0.05; done; exit 0"
    );
    let url = a.url.clone();
    let mut job = Wrapper::spawn(
        "gca-exec",
        &[
            "--gid",
            gid,
            "--cts",
            &url,
            "--keep-last",
            "2",
            "--keep-in",
            &keep_in,
            "--",
            "bash",
            "-c",
            &script,
        ],
        a.dir.path(),
    );
    eventually(T, "the job runs registered", || async {
        a.local.job(gid).await.is_ok() && values(&log).len() >= 3
    })
    .await;
    assert_eq!(
        gcs_job(&gcs, gid).await.retention,
        Retention::last(2, keep_in.clone())
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let record = gcs
            .call::<DoCheckpointOp>(DoCheckpoint {
                gid: gid.into(),
                stop: false,
            })
            .await
            .unwrap();
        ids.push(record.id);
    }
    std::fs::write(&flag, "").unwrap();
    assert_eq!(job.code(T).await, 0, "{}", job.stderr_text());
    eventually(T, "the retention policy is carried out", || async {
        let states: Vec<ImageState> = gcs_checkpoints(&gcs, gid)
            .await
            .iter()
            .map(|c| c.image_state)
            .collect();
        states == [ImageState::Deleted, ImageState::Kept, ImageState::Kept]
    })
    .await;
    assert!(!a.image_dir(&ids[0]).exists());
    assert!(!keep.join(&ids[0]).exists());
    for id in &ids[1..] {
        assert!(keep.join(id).join("manifest.json").is_file(), "{id} kept");
        assert!(!a.image_dir(id).exists(), "{id} moved out of the store");
    }
}
