//! One submission that survives requeues: `examples/slurm/self-recovering.sbatch` runs a job
//! through `gca-exec --recover-if-checkpointed`; after a checkpoint through the GCS,
//! `scontrol requeue` kills it and Slurm runs the script again, which resumes the job from that
//! checkpoint; the time-limit warning (SIGUSR1 to the batch shell) checkpoints it through its
//! CTS and requeues it, and it resumes from that one; Slurm and the GCS record its own exit
//! status.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::slurm::{self, JobGuard, Submit};
use integration_tests::wrappers::{binary, values};
use integration_tests::TestGcs;

const WAIT: Duration = Duration::from_secs(45);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The first place after `from` where the counter went back: (index, the value it was
/// restored with).
fn resumed_from(v: &[u64], from: usize) -> Option<(usize, u64)> {
    (from.max(1)..v.len()).find_map(|i| (v[i] <= v[i - 1]).then(|| (i, v[i] - 1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_job_resumes_from_its_latest_checkpoint() {
    requeued(false).await
}

/// The same with the job in its own namespaces: every requeue restores into a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_isolated_job_resumes_from_its_latest_checkpoint_in_a_fresh_namespace() {
    requeued(true).await
}

async fn requeued(isolated: bool) {
    slurm::check_cluster();
    let gcs = TestGcs::start().await;
    let (name, driver, gid) = if isolated {
        ("cts-slurm-rq-ns", CRIU_DRIVER, "gid-slurm-requeue-ns")
    } else {
        ("cts-slurm-rq", CRIU_DRIVER_HOST_PIDS, "gid-slurm-requeue")
    };
    let cts = TestCts::registered(&gcs, name, "criu", driver, "").await;
    let dir = tempfile::Builder::new()
        .prefix("gca-slurm")
        .tempdir()
        .unwrap();
    let (log, script) = slurm::counting_job(dir.path());
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/slurm/self-recovering.sbatch");
    let mut submit = Submit::new("gca-self-recovering", dir.path());
    submit.extra.push(format!(
        "--export=ALL,GID={gid},CTS_URL=unix:{},GCA_EXEC={},GCA_CHECKPOINT={}",
        cts.local.socket().display(),
        binary("gca-exec").display(),
        binary("gca-checkpoint").display(),
    ));
    let args = vec!["bash".to_string(), script.display().to_string()];
    let id = blocking(move || submit.script(&example, &args)).await;
    let _guard = JobGuard(id);
    eventually(WAIT, "the job registers and counts", || async {
        values(&log).len() >= 5 && cts.local.job(gid).await.is_ok()
    })
    .await;
    let pid = cts.local.job(gid).await.unwrap().pid;

    // A checkpoint through the GCS; the job counts on; scontrol requeue kills it.
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
        values(&log).last().is_some_and(|v| *v > after + 10)
    })
    .await;
    let killed_at = values(&log).len();
    blocking(move || slurm::requeue(id)).await;
    blocking(move || slurm::wait_requeued_running(id, 1, WAIT)).await;
    eventually(WAIT, "the requeued job resumes and counts", || async {
        let v = values(&log);
        resumed_from(&v, killed_at).is_some_and(|(i, _)| v.len() > i + 5)
            && cts
                .local
                .job(gid)
                .await
                .is_ok_and(|j| j.state == JobState::Running)
    })
    .await;
    let v = values(&log);
    let (_, resumed) = resumed_from(&v, killed_at).unwrap();
    assert!(
        before <= resumed && resumed <= after,
        "resumed at {resumed}: checkpoint {} was taken between {before} and {after}",
        taken.id
    );
    let running = cts.local.job(gid).await.unwrap();
    if isolated {
        let status = std::fs::read_to_string(format!("/proc/{}/status", running.pid)).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
            "the restored namespace's init: {status}"
        );
    } else {
        assert_eq!(running.pid, pid, "the restored job has its PID back");
    }
    let j = gcs_job(&gcs, gid).await;
    assert_eq!((j.state, j.recoveries), (JobState::Running, 1));

    // The time-limit warning (what --signal=B:USR1@120 sends): the batch shell checkpoints
    // the job through its CTS and requeues it; it resumes from that checkpoint.
    let warned_at = values(&log).len();
    let warned_value = *values(&log).last().unwrap();
    blocking(move || slurm::signal(id, "USR1", true)).await;
    eventually(WAIT, "the batch shell checkpoints the job", || async {
        gcs_checkpoints(&gcs, gid).await.len() == 2
    })
    .await;
    let second = gcs_checkpoints(&gcs, gid).await.remove(1);
    blocking(move || slurm::wait_requeued_running(id, 2, WAIT)).await;
    eventually(
        WAIT,
        "the job resumes from the second checkpoint",
        || async {
            let v = values(&log);
            resumed_from(&v, warned_at).is_some_and(|(i, _)| v.len() > i + 5)
                && cts
                    .local
                    .job(gid)
                    .await
                    .is_ok_and(|j| j.state == JobState::Running)
        },
    )
    .await;
    let v = values(&log);
    let (at, resumed) = resumed_from(&v, warned_at).unwrap();
    assert!(
        warned_value <= resumed && resumed < v[at - 1],
        "resumed at {resumed}: checkpoint {} was taken after {warned_value}, before the kill at {}",
        second.id,
        v[at - 1]
    );
    let j = gcs_job(&gcs, gid).await;
    assert_eq!((j.recoveries, j.latest_checkpoint), (2, Some(second.id)));
    assert_eq!(blocking(move || slurm::restarts(id)).await, 2);

    // scancel: SIGTERM reaches the job, which exits 3; Slurm and the GCS record it.
    blocking(move || slurm::cancel(id)).await;
    blocking(move || slurm::wait_finished(id, WAIT)).await;
    assert_eq!(blocking(move || slurm::exit_code(id)).await.0, 3);
    eventually(WAIT, "the GCS records the job's end", || async {
        let j = gcs_job(&gcs, gid).await;
        j.state == JobState::Finished && j.exit_status == Some(3)
    })
    .await;
    let out = std::fs::read_to_string(dir.path().join(format!("slurm-{id}.out"))).unwrap();
    for line in [
        "start 0",
        "start 1",
        "start 2",
        "time limit near",
        "requeueing job",
    ] {
        assert!(out.contains(line), "{line:?} in the job's output: {out}");
    }
}
