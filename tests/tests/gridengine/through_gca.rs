//! GCA jobs under Grid Engine, submitted with the shipped job script and checkpointing
//! environment, with a real GCS, a real CTS and real CRIU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::gridengine::{self as sge, JobGuard, Submit};
use integration_tests::wrappers::{binary, values};
use integration_tests::TestGcs;

const WAIT: Duration = Duration::from_secs(60);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gridengine")
}

/// A counter job (appending to `log` through a descriptor it keeps open) that exits 7 once
/// `stop` exists.
fn counter_job(dir: &Path, log: &Path, stop: &Path) -> PathBuf {
    let script = dir.join("job.sh");
    std::fs::write(
        &script,
        format!(
            "exec 3>>{log:?}; i=0; while :; do i=$((i+1)); echo $i >&3; [ -e {stop:?} ] && exit 7; sleep 0.05; done"
        ),
    )
    .unwrap();
    script
}

/// `qsub -ckpt gca -c WHEN examples/gridengine/gca-job.sh bash JOB` for `gid` at `cts`.
fn submission(name: &str, dir: &Path, gid: &str, cts: &TestCts, when: &str) -> Submit {
    let mut s = Submit::new(name, dir);
    s.ckpt = Some("gca".into());
    s.when = Some(when.into());
    s.env = vec![
        ("GID".into(), gid.into()),
        (
            "CTS_URL".into(),
            format!("unix:{}", cts.local.socket().display()),
        ),
        ("GCA_EXEC".into(), binary("gca-exec").display().to_string()),
        (
            "GCA_CHECKPOINT".into(),
            binary("gca-checkpoint").display().to_string(),
        ),
    ];
    s
}

/// The value the counter had when it was restored: the first number after the log went
/// back (a restore from a checkpoint taken before the last number written), minus one.
fn resumed_from(v: &[u64], from: usize) -> Option<(usize, u64)> {
    (from.max(1)..v.len()).find_map(|i| (v[i] <= v[i - 1]).then(|| (i, v[i] - 1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_and_rescheduled_jobs_come_back_from_their_checkpoints() {
    sge::check_cell();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-sge", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let dir = tempfile::Builder::new()
        .prefix("gca-sge")
        .tempdir()
        .unwrap();
    let log = dir.path().join("counter.log");
    let stop = dir.path().join("stop");
    let job = counter_job(dir.path(), &log, &stop);
    let gid = "gid-sge-migrate";
    // "x": Grid Engine migrates the job when it is suspended; no periodic checkpoints, so
    // that every checkpoint below is the test's.
    let submit = submission("gca-migrate", dir.path(), gid, &cts, "x");
    let out = submit.output();
    let script = examples().join("gca-job.sh");
    let job_arg = job.display().to_string();
    let id = blocking({
        let s = submit.clone();
        move || s.script(&script, &["bash", &job_arg])
    })
    .await;
    let _guard = JobGuard(id);

    // First run: a new GID, executed; the job has the PID Grid Engine started.
    blocking(move || sge::wait_running(id, WAIT)).await;
    eventually(WAIT, "the job registers and counts", || async {
        values(&log).len() >= 5 && cts.local.job(gid).await.is_ok()
    })
    .await;
    let pid = cts.local.job(gid).await.unwrap().pid;
    assert_eq!(gcs_job(&gcs, gid).await.recoveries, 0);

    // Migration: qmod -sj → migr_command checkpoints and stops the job → Grid Engine
    // reschedules it → restart_command recovers it from that checkpoint, with its PID.
    blocking(move || sge::suspend(id)).await;
    eventually(
        WAIT,
        "migr_command checkpoints and stops the job",
        || async {
            let records = gcs_checkpoints(&gcs, gid).await;
            records.len() == 1 && records[0].job_stopped
        },
    )
    .await;
    let migrated = gcs_checkpoints(&gcs, gid).await.remove(0);
    let at_stop = values(&log);
    blocking(move || sge::wait_state(id, "the restart", WAIT, |s| s == Some("Rr"))).await;
    eventually(WAIT, "the job is recovered and counts on", || async {
        values(&log).len() > at_stop.len() + 5
            && cts
                .local
                .job(gid)
                .await
                .is_ok_and(|j| j.state == JobState::Running)
    })
    .await;
    let v = values(&log);
    assert_eq!(
        v,
        (1..=v.len() as u64).collect::<Vec<_>>(),
        "stopped right after its checkpoint, the job continues where it stopped"
    );
    assert_eq!(
        cts.local.job(gid).await.unwrap().pid,
        pid,
        "its PID is back"
    );
    let j = gcs_job(&gcs, gid).await;
    assert_eq!((j.state, j.recoveries), (JobState::Running, 1));
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        text.contains(&format!("checkpoint {} ", migrated.id)) && text.contains("restarting"),
        "the hooks say what they did in the job's output: {text}"
    );

    // A checkpoint through the GCS, then a reschedule that kills the job without one
    // (qmod -f -rj): the job script runs again and recovers the job from that checkpoint.
    let before = *values(&log).last().unwrap();
    let taken = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint through the GCS");
    let after = *values(&log).last().unwrap();
    eventually(WAIT, "the job counts past its checkpoint", || async {
        values(&log).last().is_some_and(|l| *l > after + 10)
    })
    .await;
    let killed_at = values(&log).len();
    blocking(move || sge::reschedule(id)).await;
    eventually(
        WAIT,
        "the rescheduled job is recovered and counts",
        || async {
            let v = values(&log);
            resumed_from(&v, killed_at).is_some_and(|(i, _)| v.len() > i + 5)
                && gcs_job(&gcs, gid).await.recoveries == 2
        },
    )
    .await;
    let v = values(&log);
    let (_, resumed) = resumed_from(&v, killed_at).unwrap();
    assert!(
        before <= resumed && resumed <= after,
        "recovered from the GCS's checkpoint (taken between {before} and {after}), resumed at {resumed}"
    );
    assert_eq!(gcs_job(&gcs, gid).await.latest_checkpoint, Some(taken.id));

    // The job ends by itself: its exit status reaches Grid Engine and the GCS.
    std::fs::write(&stop, "").unwrap();
    let runs = blocking(move || sge::wait_finished(id, 3, WAIT)).await;
    let reasons: Vec<u32> = runs.iter().map(|r| r.failed).collect();
    assert_eq!(
        reasons,
        vec![24, 25, 0],
        "migrated, rescheduled, ended: {runs:?}"
    );
    assert_eq!(
        runs.last().unwrap().exit_status,
        7,
        "qacct records the job's own exit status"
    );
    eventually(WAIT, "the GCS records the job's end", || async {
        let j = gcs_job(&gcs, gid).await;
        j.state == JobState::Finished && j.exit_status == Some(7)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ckpt_command_checkpoints_periodically_and_qdel_ends_the_job() {
    sge::check_cell();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-sge-m", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let dir = tempfile::Builder::new()
        .prefix("gca-sge")
        .tempdir()
        .unwrap();
    let log = dir.path().join("counter.log");
    let job = counter_job(dir.path(), &log, &dir.path().join("never"));
    let gid = "gid-sge-periodic";
    // "m": ckpt_command every min_cpu_interval of the queue (10 s in the test cell).
    let submit = submission("gca-periodic", dir.path(), gid, &cts, "m");
    let out = submit.output();
    let script = examples().join("gca-job.sh");
    let job_arg = job.display().to_string();
    let id = blocking(move || submit.script(&script, &["bash", &job_arg])).await;
    let _guard = JobGuard(id);
    blocking(move || sge::wait_running(id, WAIT)).await;
    eventually(WAIT, "the job registers", || async {
        cts.local.job(gid).await.is_ok()
    })
    .await;
    eventually(WAIT, "two periodic checkpoints", || async {
        gcs_checkpoints(&gcs, gid).await.len() >= 2
    })
    .await;
    let records = gcs_checkpoints(&gcs, gid).await;
    assert!(records.iter().all(|r| !r.job_stopped));
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    for r in &records {
        assert!(
            text.contains(&format!("checkpoint {} ", r.id)),
            "ckpt_command's message for {} in the job's output: {text}",
            r.id
        );
    }
    assert!(values(&log).len() > 5, "the job keeps counting");

    // qdel: Grid Engine kills the job; it is over for Grid Engine and for the GCS.
    blocking(move || sge::delete(id)).await;
    blocking(move || sge::wait_state(id, "the job to go", WAIT, |s| s.is_none())).await;
    eventually(WAIT, "the GCS records the job's end", || async {
        gcs_job(&gcs, gid).await.state == JobState::Finished
    })
    .await;
    assert_eq!(gcs_job(&gcs, gid).await.signal, Some(9));
}
