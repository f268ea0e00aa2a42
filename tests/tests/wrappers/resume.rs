//! `gca-exec --recover-if-checkpointed`, the self-recovering mode: the same command line
//! executes a new job, recovers a killed one from its latest usable checkpoint, starts one
//! that was never checkpointed again from the beginning, and refuses one that ended.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

const T: Duration = Duration::from_secs(20);

/// `gca-exec --recover-if-checkpointed --gid GID --cts unix:SOCKET -- bash -c SCRIPT`.
fn resume(cts: &TestCts, gid: &str, script: &str) -> Wrapper {
    let socket = format!("unix:{}", cts.local.socket().display());
    Wrapper::spawn(
        "gca-exec",
        &[
            "--recover-if-checkpointed",
            "--gid",
            gid,
            "--cts",
            &socket,
            "--",
            "bash",
            "-c",
            script,
        ],
        cts.dir.path(),
    )
}

/// A checkpoint through the GCS, with the counter's last value just before and just after.
async fn checkpoint(
    gcs: &TestGcs,
    gid: &str,
    log: &std::path::Path,
) -> (CheckpointRecord, u64, u64) {
    let before = values(log).last().copied().unwrap_or_default();
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint through the GCS");
    let after = values(log).last().copied().unwrap_or_default();
    (record, before, after)
}

async fn counts_past(log: &std::path::Path, n: u64) {
    eventually(T, "the job counts on", || async {
        values(log).last().is_some_and(|v| *v > n)
    })
    .await;
}

/// Kills the job the way a resource manager does (SIGKILL) and waits until the GCS knows it
/// ended.
async fn kill_job(gcs: &TestGcs, gid: &str, job: &mut Wrapper) {
    job.signal("KILL");
    job.wait(T).await;
    eventually(T, "the GCS records the job's end", || async {
        gcs_job(gcs, gid).await.state == JobState::Finished
    })
    .await;
}

/// Where the counter went back: (index of the first value after the restore, the counter's
/// value when it was restored).
fn resumed_from(v: &[u64]) -> Option<(usize, u64)> {
    (1..v.len()).find_map(|i| (v[i] <= v[i - 1]).then(|| (i, v[i] - 1)))
}

#[tokio::test]
async fn executes_a_new_job_and_recovers_it_from_its_latest_checkpoint_after_a_kill() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-resume";
    let log = cts.dir.path().join("counter.log");
    let script = counter_script(&log);

    // A new GID: executed, with the wrapper's PID.
    let mut first = resume(&cts, gid, &script);
    let pid = first.pid;
    eventually(T, "the job registers and counts", || async {
        values(&log).len() >= 5 && cts.local.job(gid).await.is_ok_and(|j| j.pid == pid)
    })
    .await;
    assert_eq!(gcs_job(&gcs, gid).await.recoveries, 0);
    let (older, ..) = checkpoint(&gcs, gid, &log).await;
    counts_past(&log, values(&log).last().copied().unwrap() + 5).await;
    let (latest, before, after) = checkpoint(&gcs, gid, &log).await;
    assert_ne!(older.id, latest.id);
    counts_past(&log, after + 10).await;
    kill_job(&gcs, gid, &mut first).await;
    let killed_at = values(&log).len();

    // The same command line again: recovered from the latest checkpoint, the wrapper its
    // parent.
    let mut second = resume(&cts, gid, &script);
    second.adopt(pid);
    eventually(T, "the job is recovered and counts", || async {
        assert!(
            second.running(),
            "the wrapper ended: {}",
            second.stderr_text()
        );
        values(&log).len() > killed_at + 5
            && cts
                .local
                .job(gid)
                .await
                .is_ok_and(|j| j.pid == pid && j.state == JobState::Running)
    })
    .await;
    let v = values(&log);
    let (at, resumed) = resumed_from(&v).expect("the counter went back to the checkpoint");
    assert_eq!(at, killed_at, "{v:?}");
    assert!(
        before <= resumed && resumed <= after,
        "resumed at {resumed}: the latest checkpoint was taken between {before} and {after}"
    );
    let stat = gca_drivers::proc::stat(pid).expect("the restored job runs");
    assert_eq!(
        stat.ppid, second.pid,
        "the restored job is the wrapper's child"
    );
    let j = gcs_job(&gcs, gid).await;
    assert_eq!((j.state, j.recoveries), (JobState::Running, 1));

    // A resource manager's SIGKILL of the wrapper (it cannot be forwarded) takes the restored
    // job with it: the first run's parent-death signal came back with the image.
    second.signal("KILL");
    second.wait(T).await;
    eventually(T, "the restored job dies with its wrapper", || async {
        gca_drivers::proc::stat(pid).is_none_or(|s| s.state == 'Z')
    })
    .await;
    eventually(T, "the GCS records the job's end", || async {
        gcs_job(&gcs, gid).await.state == JobState::Finished
    })
    .await;
}

#[tokio::test]
async fn a_job_never_checkpointed_starts_again_from_the_beginning() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-resume-over";
    let log = cts.dir.path().join("counter.log");
    let script = counter_script(&log);
    let mut first = resume(&cts, gid, &script);
    eventually(T, "the job registers and counts", || async {
        values(&log).len() >= 3 && cts.local.job(gid).await.is_ok()
    })
    .await;
    kill_job(&gcs, gid, &mut first).await;
    let killed_at = values(&log).len();

    let mut second = resume(&cts, gid, &script);
    eventually(T, "the job runs again", || async {
        assert!(
            second.running(),
            "the wrapper ended: {}",
            second.stderr_text()
        );
        values(&log).len() > killed_at + 3
            && cts.local.job(gid).await.is_ok_and(|j| j.pid == second.pid)
    })
    .await;
    let v = values(&log);
    assert_eq!(
        resumed_from(&v),
        Some((killed_at, 0)),
        "counted from 1 again: {v:?}"
    );
    let j = gcs_job(&gcs, gid).await;
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.cts_instance, "cts-a");
    assert_eq!(j.local_id, Some(second.pid.to_string()));
    assert_eq!(
        j.recoveries, 1,
        "a restart counts as a recovery (from no checkpoint)"
    );
    second.signal("TERM");
    second.wait(T).await;
}

#[tokio::test]
async fn an_unusable_latest_image_is_skipped_for_the_one_before() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-resume-skip";
    let log = cts.dir.path().join("counter.log");
    let script = counter_script(&log);
    let mut first = resume(&cts, gid, &script);
    let pid = first.pid;
    eventually(T, "the job registers and counts", || async {
        values(&log).len() >= 5 && cts.local.job(gid).await.is_ok()
    })
    .await;
    let (older, before, after) = checkpoint(&gcs, gid, &log).await;
    counts_past(&log, after + 10).await;
    let (latest, _, latest_after) = checkpoint(&gcs, gid, &log).await;
    counts_past(&log, latest_after + 5).await;
    kill_job(&gcs, gid, &mut first).await;
    // The latest image rots in the store: one byte of its largest file flipped.
    cts.corrupt_image(&latest.id);
    let killed_at = values(&log).len();

    let mut second = resume(&cts, gid, &script);
    second.adopt(pid);
    eventually(T, "the job is recovered from the older image", || async {
        assert!(
            second.running(),
            "the wrapper ended: {}",
            second.stderr_text()
        );
        values(&log).len() > killed_at + 5 && cts.local.job(gid).await.is_ok_and(|j| j.pid == pid)
    })
    .await;
    let err = second.stderr_text();
    assert!(
        err.contains(&latest.id) && err.contains("trying the job's previous checkpoint"),
        "{err}"
    );
    let v = values(&log);
    let (_, resumed) = resumed_from(&v).unwrap();
    assert!(
        before <= resumed && resumed <= after,
        "resumed at {resumed}: the older checkpoint {} was taken between {before} and {after}",
        older.id
    );
    assert_eq!(gcs_job(&gcs, gid).await.recoveries, 1);
    second.signal("TERM");
    second.wait(T).await;
}

#[tokio::test]
async fn a_job_that_ended_is_not_run_again() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-resume-ended";
    let log = cts.dir.path().join("counter.log");
    let done = cts.dir.path().join("done");
    // Counts until `done` exists, then exits 0.
    let script = format!(
        "exec 3>>{log:?}; i=0; while [ ! -e {done:?} ]; do i=$((i+1)); echo $i >&3; sleep 0.05; done; exit 0"
    );
    let mut first = resume(&cts, gid, &script);
    eventually(T, "the job registers and counts", || async {
        values(&log).len() >= 3 && cts.local.job(gid).await.is_ok()
    })
    .await;
    let (record, ..) = checkpoint(&gcs, gid, &log).await;
    std::fs::write(&done, "").unwrap();
    assert_eq!(first.code(T).await, 0);
    // Exit 0: the job ended, and its images go (no retention policy).
    eventually(T, "the job's image is deleted", || async {
        gcs_checkpoints(&gcs, gid).await[0].image_state == ImageState::Deleted
    })
    .await;
    let ended_at = values(&log).len();

    let mut again = resume(&cts, gid, &script);
    let code = again.code(T).await;
    let err = again.stderr_text();
    assert_eq!(code, 65, "{err}");
    assert!(
        err.starts_with("gca-exec: ") && err.contains("none of its checkpoints"),
        "{err}"
    );
    assert!(err.contains("deleted") || err.contains(&record.id), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(values(&log).len(), ended_at, "the job did not run again");
    assert_eq!(gcs_job(&gcs, gid).await.state, JobState::Finished);
}

/// `runuser -u nobody -- setsid gca-exec --recover-if-checkpointed ...`, stderr into `err`.
fn resume_as_nobody(
    cts: &TestCts,
    gid: &str,
    script: &str,
    err: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "setsid"])
        .arg(binary("gca-exec"))
        .args(["--recover-if-checkpointed", "--gid", gid, "--cts"])
        .arg(format!("unix:{}", cts.local.socket().display()))
        .args(["--", "bash", "-c", script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .expect("runuser")
}

fn kill(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// A local user (nobody) starts their own job again from the beginning, since nothing of
/// anyone's is restored; another user's checkpointed job they cannot take.
#[tokio::test]
async fn a_local_user_starts_their_own_job_over_but_cannot_take_another_users() {
    use std::os::unix::fs::PermissionsExt;
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    for dir in [cts.dir.path().to_path_buf(), cts.state_dir()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = work.path().join("counter.log");
    let err = work.path().join("err");
    let gid = "gid-resume-nobody";
    let script = counter_script(&log);

    let mut first = resume_as_nobody(&cts, gid, &script, &err);
    eventually(T, "nobody's job registers and counts", || async {
        values(&log).len() >= 3 && cts.local.job(gid).await.is_ok()
    })
    .await;
    let pid = cts.local.job(gid).await.unwrap().pid;
    assert_eq!(gca_drivers::proc::uid(pid), Some(65534));
    kill(pid);
    tokio::task::spawn_blocking(move || first.wait())
        .await
        .unwrap()
        .unwrap();
    eventually(T, "the GCS records the job's end", || async {
        gcs_job(&gcs, gid).await.state == JobState::Finished
    })
    .await;
    let killed_at = values(&log).len();

    let mut second = resume_as_nobody(&cts, gid, &script, &err);
    eventually(T, "nobody's job runs again from the beginning", || async {
        values(&log).len() > killed_at + 3 && cts.local.job(gid).await.is_ok_and(|j| j.pid != pid)
    })
    .await;
    assert_eq!(resumed_from(&values(&log)), Some((killed_at, 0)));
    assert_eq!(gcs_job(&gcs, gid).await.recoveries, 1);
    kill(cts.local.job(gid).await.unwrap().pid);
    tokio::task::spawn_blocking(move || second.wait())
        .await
        .unwrap()
        .unwrap();

    // Root's job, checkpointed and killed: nobody lists none of its checkpoints and may not
    // start it over either.
    let root_gid = "gid-resume-roots";
    let root_log = cts.dir.path().join("root.log");
    let mut roots = resume(&cts, root_gid, &counter_script(&root_log));
    eventually(T, "root's job registers and counts", || async {
        values(&root_log).len() >= 3 && cts.local.job(root_gid).await.is_ok()
    })
    .await;
    checkpoint(&gcs, root_gid, &root_log).await;
    kill_job(&gcs, root_gid, &mut roots).await;
    let mut taker = resume_as_nobody(&cts, root_gid, &script, &err);
    // Waited for off this runtime's thread: the CTS answering the wrapper runs on it.
    let status = tokio::task::spawn_blocking(move || taker.wait().unwrap())
        .await
        .unwrap();
    let text = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(65), "{text}");
    assert!(text.contains("not to the caller"), "{text}");
    let j = gcs_job(&gcs, root_gid).await;
    assert_eq!((j.state, j.recoveries), (JobState::Finished, 0));
}
