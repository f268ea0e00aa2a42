//! The wrappers through a real resource manager: a job submitted with `gca-exec` is
//! checkpointed through the GCS and stopped, resubmitted with `gca-recover`, continues from its
//! state, and `scancel` of the recovered job reaches it through the wrapper; Slurm records the
//! job's own exit status.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::slurm::{self, JobGuard, Submit};
use integration_tests::wrappers::{binary, values};
use integration_tests::TestGcs;

const WAIT: Duration = Duration::from_secs(30);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_checkpoint_stop_resubmit_recover_and_scancel() {
    through_slurm(false).await
}

/// The same with the job in its own PID and mount namespaces (gca-exec runs as root under
/// the test cluster): wrapper → namespace init → job, all under the batch shell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_job_is_submitted_checkpointed_recovered_into_a_fresh_namespace_and_scancelled()
{
    through_slurm(true).await
}

async fn through_slurm(isolated: bool) {
    slurm::check_cluster();
    let gcs = TestGcs::start().await;
    let (name, driver, gid) = if isolated {
        ("cts-slurm-ns", CRIU_DRIVER, "gid-slurm-ns")
    } else {
        ("cts-slurm", CRIU_DRIVER_HOST_PIDS, "gid-slurm")
    };
    let cts = TestCts::registered(&gcs, name, "criu", driver, "").await;
    let dir = tempfile::Builder::new()
        .prefix("gca-slurm")
        .tempdir()
        .unwrap();
    let log = dir.path().join("counter.log");
    let flag = dir.path().join("term.txt");
    // The job: counts through an open descriptor; on SIGTERM it notes it and exits 3.
    let job = format!(
        "trap 'echo got TERM >> {flag:?}; exit 3' TERM; exec 3>>{log:?}; i=0; while :; do i=$((i+1)); echo $i >&3; sleep 0.05; done"
    );
    let script = dir.path().join("job.sh");
    std::fs::write(&script, job).unwrap();
    // Submitted with the shipped example batch scripts.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/slurm");
    let keep = dir.path().join("kept");
    std::fs::create_dir(&keep).unwrap();
    let mut submit = Submit::new("gca-exec", dir.path());
    submit.extra.push(format!(
        "--export=ALL,GID={gid},CTS_URL=unix:{},GCA_EXEC={},GCA_RECOVER={},GCA_CHECKPOINT={},KEEP_LAST=1,KEEP_IN={}",
        cts.local.socket().display(),
        binary("gca-exec").display(),
        binary("gca-recover").display(),
        binary("gca-checkpoint").display(),
        keep.display(),
    ));
    let job_args = vec!["bash".to_string(), script.display().to_string()];
    let (s1, e1, a1) = (
        submit.clone(),
        examples.join("execute.sbatch"),
        job_args.clone(),
    );
    let first = blocking(move || s1.script(&e1, &a1)).await;
    let _g1 = JobGuard(first);
    eventually(WAIT, "the job registers and counts", || async {
        values(&log).len() >= 5 && cts.local.job(gid).await.is_ok()
    })
    .await;
    let registered = cts.local.job(gid).await.unwrap();
    assert_eq!(
        gcs_job(&gcs, gid).await.retention,
        Retention::last(1, keep.display().to_string()),
        "KEEP_LAST/KEEP_IN of execute.sbatch reach the GCS"
    );

    // The time limit nears (what `--signal=B:USR1@120` sends; here by hand): the batch shell
    // has its CTS checkpoint the user's job (gca-checkpoint, over the local socket).
    blocking(move || slurm::signal(first, "USR1", true)).await;
    eventually(WAIT, "gca-checkpoint checkpoints the job", || async {
        gcs_checkpoints(&gcs, gid).await.len() == 1
    })
    .await;
    assert!(cts.local.job(gid).await.is_ok(), "the job runs on");

    // Checkpoint through the GCS and stop the job (migration); the Slurm job ends.
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: true,
        })
        .await
        .expect("doCheckpoint of the Slurm job");
    assert!(record.job_stopped);
    let state = blocking(move || slurm::wait_finished(first, WAIT)).await;
    assert_ne!(state, "RUNNING");
    let at_stop = values(&log);
    eventually(WAIT, "the CTS lets the stopped job go", || async {
        cts.cts.list_jobs(None).is_empty()
    })
    .await;

    // Resubmit with gca-recover: the job continues from its state, with its PID.
    let mut s2 = submit.clone();
    s2.name = "gca-recover".into();
    let e2 = examples.join("recover.sbatch");
    let second = blocking(move || s2.script(&e2, &job_args)).await;
    let _g2 = JobGuard(second);
    let last = *at_stop.last().unwrap();
    eventually(WAIT, "the recovered job counts on", || async {
        values(&log).last().is_some_and(|v| *v > last + 5)
    })
    .await;
    let after = values(&log);
    let expected: Vec<u64> = (1..=*after.last().unwrap()).collect();
    assert_eq!(
        after, expected,
        "the counter continues where it stopped: nothing lost or repeated"
    );
    let running = cts.local.job(gid).await.unwrap();
    if isolated {
        // A fresh namespace: another host PID, PID 1 inside.
        let nspid = std::fs::read_to_string(format!("/proc/{}/status", running.pid))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:").map(str::to_string))
            .unwrap();
        assert_eq!(
            nspid.split_whitespace().collect::<Vec<_>>(),
            vec![running.pid.to_string(), "1".into()],
            "the restored namespace's init"
        );
    } else {
        assert_eq!(
            running.pid, registered.pid,
            "the recovered job has its PID back"
        );
    }
    let at_gcs = gcs_job(&gcs, gid).await;
    assert_eq!(at_gcs.state, JobState::Running);
    assert_eq!(at_gcs.recoveries, 1);

    // scancel: SIGTERM reaches the job through the wrapper; Slurm records the job's status.
    blocking(move || slurm::cancel(second)).await;
    let text = blocking({
        let flag = flag.clone();
        move || slurm::wait_file_contains(&flag, "got TERM", WAIT)
    })
    .await;
    assert!(text.contains("got TERM"));
    blocking(move || slurm::wait_finished(second, WAIT)).await;
    let (status, _signal) = slurm::exit_code(second);
    assert_eq!(status, 3, "Slurm records the job's own exit status");
    eventually(WAIT, "the GCS records the job's end", || async {
        gcs_job(&gcs, gid).await.state == JobState::Finished
    })
    .await;
    assert_eq!(gcs_job(&gcs, gid).await.exit_status, Some(3));
    // Ended by a signal with status 3, not 0: its image stays, for a recovery.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = gcs_checkpoints(&gcs, gid).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].image_state, ImageState::Stored);
    assert!(cts.image_dir(&record.id).exists());
}
