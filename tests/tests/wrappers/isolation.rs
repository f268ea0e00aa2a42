//! Jobs in their own PID and mount namespaces (issue 13): gca-exec starts the job under a
//! namespace init of its own, CRIU dumps the namespaces and gca-recover restores them into
//! fresh ones, so a recovery never needs the original PIDs to be free: it works while the
//! original still runs on the same machine, and two recoveries of one image run side by side.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use gca_drivers::proc;
use gca_protocol::isolation::NOTE_FILE;
use gca_protocol::messages::*;
use gca_protocol::ops::{AuthorizeRecoveryOp, DoCheckpointOp};
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

const T: Duration = Duration::from_secs(20);

/// `NSpid:` of a process: its PID in each PID namespace, the host's first.
fn nspid(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The PIDs of the lasting processes of the tree of `init` as its namespace sees them: the
/// three lowest (the init, the job, its `sleep 1000` child; the job's short `sleep 0.05`s
/// come and go above them).
fn inner_pids(init: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::iter::once(init)
        .chain(proc::descendants(init))
        .filter_map(|p| nspid(p).last().copied())
        .collect();
    v.sort();
    v.truncate(3);
    v
}

/// Counts on its standard output and into `log` (through a descriptor it keeps open), with a
/// child process for its whole life; on SIGUSR1 writes `marker` and exits 7.
fn job_script(log: &Path, marker: &Path) -> String {
    format!(
        "trap 'echo got-usr1 > {marker:?}; exit 7' USR1; sleep 1000 & exec 3>>{log:?}; i=0; \
         while :; do i=$((i+1)); echo $i >&3; echo $i; sleep 0.05; done"
    )
}

fn numbers(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

async fn checkpoint(gcs: &TestGcs, gid: &str, stop: bool) -> CheckpointRecord {
    gcs.call::<DoCheckpointOp>(DoCheckpoint {
        gid: gid.into(),
        stop,
    })
    .await
    .expect("doCheckpoint through the GCS")
}

async fn authorize(gcs: &TestGcs, gid: &str, cts: &str) {
    gcs.call::<AuthorizeRecoveryOp>(AuthorizeRecovery {
        gid: gid.into(),
        cts_instance: cts.into(),
        checkpoint: None,
    })
    .await
    .expect("AuthorizeRecovery");
}

/// gca-exec of `script` at `cts`; returns the wrapper and the registered PID: the namespace's
/// init, the wrapper's child, PID 1 inside, with the job as its child.
async fn exec_isolated(cts: &TestCts, gid: &str, script: &str) -> (Wrapper, i32) {
    let url = format!("{}{}", cts.url, gca_protocol::ns::CTS_SERVICE_PATH);
    let job = Wrapper::spawn_capturing(
        "gca-exec",
        &["--gid", gid, "--cts", &url, "--", "bash", "-c", script],
        cts.dir.path(),
    );
    eventually(T, "gca-exec registers the job", || async {
        assert!(job.running(), "gca-exec ended: {}", job.stderr_text());
        cts.local.job(gid).await.is_ok()
    })
    .await;
    let init = cts.local.job(gid).await.unwrap().pid;
    assert_ne!(
        init, job.pid,
        "the registered process is the namespace's init"
    );
    assert_eq!(proc::stat(init).unwrap().ppid, job.pid);
    assert_eq!(nspid(init), vec![init, 1], "PID 1 of its own namespace");
    (job, init)
}

/// Waits until `w` wrote at least `n` numbers; returns them.
async fn wait_numbers(w: &Wrapper, n: usize) -> Vec<u64> {
    eventually(T, "the job counts on its standard output", || async {
        assert!(w.running(), "the wrapper ended: {}", w.stderr_text());
        numbers(&w.stdout_text()).len() >= n
    })
    .await;
    numbers(&w.stdout_text())
}

#[tokio::test]
async fn recovered_on_another_cts_while_the_original_runs_with_the_same_pids() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER, "").await;
    let gid = "gid-ns-clone";
    let log = a.dir.path().join("counter.log");
    let marker = a.dir.path().join("usr1");
    let (mut job, init) = exec_isolated(&a, gid, &job_script(&log, &marker)).await;
    let at_gcs = gcs_job(&gcs, gid).await;
    assert_eq!(
        at_gcs.local_id,
        Some(init.to_string()),
        "the GCS shows the host PID of the namespace"
    );
    let before = *wait_numbers(&job, 5).await.last().unwrap();
    // The job, its child and the init, numbered 1, 2, 3 inside.
    eventually(T, "the job's child runs", || async {
        inner_pids(init) == vec![1, 2, 3]
    })
    .await;

    let first = checkpoint(&gcs, gid, false).await;
    let after = *numbers(&job.stdout_text()).last().unwrap();
    assert!(
        a.image_files(&first.id).join(NOTE_FILE).is_file(),
        "the image is of a namespace"
    );
    // A clone of the job on resource B, while the original runs with the same PIDs.
    authorize(&gcs, gid, "cts-b").await;
    let mut rec = Wrapper::spawn_capturing(
        "gca-recover",
        &["--gid", gid, "--image", &first.id, "--cts", &b.url],
        b.dir.path(),
    );
    eventually(T, "the clone runs under CTS B", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        b.local
            .job(gid)
            .await
            .is_ok_and(|j| j.state == JobState::Running && j.pid != rec.pid)
    })
    .await;
    let rinit = b.local.job(gid).await.unwrap().pid;
    assert_ne!(rinit, init);
    assert_eq!(
        proc::stat(rinit).unwrap().ppid,
        rec.pid,
        "the wrapper's child"
    );
    assert_eq!(nspid(rinit), vec![rinit, 1]);
    assert_eq!(
        inner_pids(rinit),
        vec![1, 2, 3],
        "the same PIDs, in a fresh namespace"
    );
    assert_eq!(inner_pids(init), vec![1, 2, 3], "the original runs on");
    // The clone counts on from the checkpoint on its wrapper's standard output (its own
    // pipe, plugged in at the restore), and so does the original on its own.
    let restored = wait_numbers(&rec, 5).await;
    assert!(
        before < restored[0] && restored[0] <= after + 1,
        "resumed at {}, the checkpoint was taken between {before} and {after}",
        restored[0]
    );
    assert_eq!(
        restored,
        (restored[0]..restored[0] + restored.len() as u64).collect::<Vec<_>>()
    );
    let n = numbers(&job.stdout_text()).len();
    wait_numbers(&job, n + 3).await;
    assert_eq!(
        gcs_job(&gcs, gid).await.local_id,
        Some(rinit.to_string()),
        "the GCS shows the clone's host PID"
    );

    // SIGUSR1 to the clone's wrapper reaches the job through the init; its status 7 is the
    // wrapper's and the GCS's.
    rec.signal("USR1");
    assert_eq!(rec.code(T).await, 7, "stderr: {}", rec.stderr_text());
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "got-usr1");
    assert!(proc::stat(rinit).is_none(), "the clone's namespace is gone");
    eventually(T, "the GCS records exit status 7", || async {
        let j = gcs_job(&gcs, gid).await;
        j.state == JobState::Finished && j.exit_status == Some(7)
    })
    .await;
    // The original still runs; SIGTERM ends it, and its wrapper dies of it.
    assert!(job.running() && inner_pids(init) == vec![1, 2, 3]);
    job.signal("TERM");
    let status = job.wait(T).await;
    assert_eq!(status.signal(), Some(15), "stderr: {}", job.stderr_text());
    assert!(proc::stat(init).is_none());
}

#[tokio::test]
async fn two_recoveries_of_one_image_run_side_by_side() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER, "").await;
    let c = TestCts::registered(&gcs, "cts-c", "criu", CRIU_DRIVER, "").await;
    let gid = "gid-ns-twice";
    let log = a.dir.path().join("counter.log");
    let marker = a.dir.path().join("usr1");
    let (mut job, init) = exec_isolated(&a, gid, &job_script(&log, &marker)).await;
    wait_numbers(&job, 5).await;
    let record = checkpoint(&gcs, gid, true).await;
    assert!(record.job_stopped);
    // The stop killed the namespace; its wrapper ends like its init.
    assert_eq!(job.wait(T).await.signal(), Some(9), "{}", job.stderr_text());
    assert!(proc::stat(init).is_none());

    let mut recs = Vec::new();
    for cts in [&b, &c] {
        if cts.name == "cts-c" {
            authorize(&gcs, gid, "cts-c").await;
        }
        let rec = Wrapper::spawn_capturing(
            "gca-recover",
            &["--gid", gid, "--image", &record.id, "--cts", &cts.url],
            cts.dir.path(),
        );
        eventually(T, "the recovery runs", || async {
            assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
            cts.local
                .job(gid)
                .await
                .is_ok_and(|j| j.state == JobState::Running && j.pid != rec.pid)
        })
        .await;
        let rinit = cts.local.job(gid).await.unwrap().pid;
        recs.push((rec, rinit));
    }
    let (b_init, c_init) = (recs[0].1, recs[1].1);
    assert_ne!(b_init, c_init);
    for (rec, rinit) in &recs {
        assert_eq!(proc::stat(*rinit).unwrap().ppid, rec.pid);
        assert_eq!(inner_pids(*rinit), vec![1, 2, 3]);
    }
    // Both count on from the same point of the same image.
    let from_b = wait_numbers(&recs[0].0, 5).await;
    let from_c = wait_numbers(&recs[1].0, 5).await;
    assert_eq!(from_b[0], from_c[0], "{from_b:?} {from_c:?}");
    assert!(recs[0].0.running() && recs[1].0.running());
    for (rec, _) in &mut recs {
        rec.signal("TERM");
        assert_eq!(
            rec.wait(T).await.signal(),
            Some(15),
            "{}",
            rec.stderr_text()
        );
    }
    assert!(proc::stat(b_init).is_none() && proc::stat(c_init).is_none());
}

#[tokio::test]
async fn an_isolated_job_s_exit_status_and_signal_are_the_wrapper_s_and_the_gcs_s() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let (mut job, _) = exec_isolated(&a, "gid-ns-exit", "echo $$; sleep 0.5; exit 3").await;
    assert_eq!(job.code(T).await, 3, "{}", job.stderr_text());
    assert_eq!(
        job.stdout_text().trim(),
        "2",
        "the job is PID 2 of its namespace"
    );
    eventually(T, "the GCS records exit status 3", || async {
        let j = gcs_job(&gcs, "gid-ns-exit").await;
        j.state == JobState::Finished && j.exit_status == Some(3) && j.signal.is_none()
    })
    .await;
    let (mut job, _) = exec_isolated(&a, "gid-ns-sig", "sleep 0.5; kill -TERM $$").await;
    assert_eq!(
        job.wait(T).await.signal(),
        Some(15),
        "{}",
        job.stderr_text()
    );
    eventually(T, "the GCS records signal 15", || async {
        let j = gcs_job(&gcs, "gid-ns-sig").await;
        j.state == JobState::Finished && j.signal == Some(15) && j.exit_status.is_none()
    })
    .await;
}

/// The cgroup v2 of a process (`0::/path`), relative to the cgroup2 mount.
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

async fn status(cts: &TestCts) -> gca_protocol::cts_api::Status {
    cts.json.get("/api/v1/status").await.expect("CTS status")
}

#[tokio::test]
async fn a_job_with_a_child_and_an_open_file_is_dumped_frozen_in_its_cgroup_and_restored_in_a_fresh_one(
) {
    let gcs = TestGcs::start().await;
    let parent = format!("gca-tests/{}", uuid::Uuid::new_v4().simple());
    let extra = format!("[cgroup]\nparent = {parent:?}\n");
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, &extra).await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER, &extra).await;
    // The CTS says what isolation its jobs get.
    let st = status(&a).await.isolation;
    assert!(st.cgroups, "{st:?}");
    assert_eq!(st.namespaces, "auto");
    let parent_dir = std::path::PathBuf::from(st.cgroup_parent.clone().unwrap());
    assert!(parent_dir.ends_with(&parent), "{st:?}");
    let limits_here = st.controllers.iter().any(|c| c == "memory");

    let gid = "gid-ns-cgroup";
    let log = a.dir.path().join("counter.log");
    let marker = a.dir.path().join("usr1");
    let (mut job, init) = exec_isolated(&a, gid, &job_script(&log, &marker)).await;
    wait_numbers(&job, 5).await;
    let view = a.local.job(gid).await.unwrap();
    let cg = view.cgroup.expect("the job has a cgroup");
    assert!(
        cg.path
            .starts_with(&format!("/{parent}/gca-gid-ns-cgroup-")),
        "{cg:?}"
    );
    // The whole tree is in it: the init, the job, its child.
    eventually(T, "the job's tree is in its cgroup", || async {
        let procs = inner_pids(init);
        procs == vec![1, 2, 3]
            && std::iter::once(init)
                .chain(proc::descendants(init))
                .all(|p| [String::new(), cg.path.clone()].contains(&cgroup_of(p)))
    })
    .await;
    // Its usage is in the CTS's status.
    eventually(T, "the job's CPU time is counted", || async {
        let u = a.local.job(gid).await.unwrap().cgroup.unwrap();
        u.cpu_usec.is_some_and(|c| c > 0) && u.processes >= 3
    })
    .await;
    // The cgroup is root's: its user could not write its limits or move out.
    let dir = std::path::PathBuf::from(format!(
        "{}{}",
        parent_dir.parent().unwrap().parent().unwrap().display(),
        cg.path
    ));
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&dir).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o022), (0, 0), "{}", dir.display());

    // The dump froze the cgroup (cgroup v2's cgroup.freeze: the driver freezes it, CRIU finds it
    // frozen) rather than seizing task by task, and the cgroup is thawed once the dump is done.
    let first = checkpoint(&gcs, gid, false).await;
    let dump_log = std::fs::read_to_string(a.image_files(&first.id).join("dump.log")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "0",
        "the cgroup is thawed after the dump"
    );
    assert!(
        dump_log.contains("Detected cgroup V2 freezer") && dump_log.contains("cgroup.freeze=1"),
        "{}",
        dump_log
            .lines()
            .filter(|l| l.contains("freez"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let n = numbers(&job.stdout_text()).len();
    wait_numbers(&job, n + 3).await; // thawed, it counts on
    let record = checkpoint(&gcs, gid, true).await;
    assert_eq!(job.wait(T).await.signal(), Some(9));
    eventually(T, "the job's cgroup goes with it", || async {
        !dir.exists()
    })
    .await;
    let logged = values(&log).len();

    let mut rec = Wrapper::spawn_capturing(
        "gca-recover",
        &["--gid", gid, "--image", &record.id, "--cts", &b.url],
        b.dir.path(),
    );
    eventually(T, "the job runs again under CTS B", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        b.local
            .job(gid)
            .await
            .is_ok_and(|j| j.state == JobState::Running && j.pid != rec.pid)
    })
    .await;
    let rinit = b.local.job(gid).await.unwrap().pid;
    let rcg = b
        .local
        .job(gid)
        .await
        .unwrap()
        .cgroup
        .expect("a fresh cgroup");
    assert_ne!(rcg.path, cg.path);
    assert_eq!(
        inner_pids(rinit),
        vec![1, 2, 3],
        "the job and its child, restored"
    );
    for p in std::iter::once(rinit).chain(proc::descendants(rinit)) {
        let cg = cgroup_of(p);
        // (A short `sleep 0.05` of the job may have ended meanwhile.)
        if !cg.is_empty() {
            assert_eq!(cg, rcg.path, "process {p}");
        }
    }
    // Its open file: it goes on appending to the log.
    eventually(T, "the restored job writes its file", || async {
        values(&log).len() >= logged + 3
    })
    .await;
    rec.signal("TERM");
    assert_eq!(rec.wait(T).await.signal(), Some(15));

    // Limits: where this host's cgroup v2 has the memory controller, a job's memory.max is
    // written and travels with its image; here (a hybrid host whose memory controller is
    // cgroup v1's) a job asking for one is refused with the reason, and nothing runs.
    let url = format!("{}{}", a.url, gca_protocol::ns::CTS_SERVICE_PATH);
    let mut limited = Wrapper::spawn_capturing(
        "gca-exec",
        &[
            "--gid",
            "gid-ns-limited",
            "--cts",
            &url,
            "--memory-max",
            "268435456",
            "--",
            "sleep",
            "30",
        ],
        a.dir.path(),
    );
    if limits_here {
        eventually(T, "the limited job runs", || async {
            a.local.job("gid-ns-limited").await.is_ok()
        })
        .await;
        let cg = a.local.job("gid-ns-limited").await.unwrap().cgroup.unwrap();
        assert_eq!(cg.limits.memory_max_bytes, Some(268435456));
        limited.signal("TERM");
        limited.wait(T).await;
    } else {
        let code = limited.code(T).await;
        assert_ne!(code, 0);
        let said = limited.stderr_text();
        assert!(
            said.contains("memory controller is not available") && said.contains("cgroup v1"),
            "{said}"
        );
    }
    let _ = std::fs::remove_dir(parent_dir);
}

#[tokio::test]
async fn the_self_recovering_mode_recovers_an_isolated_job_into_a_fresh_namespace() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let gid = "gid-ns-resume";
    let log = a.dir.path().join("counter.log");
    let socket = format!("unix:{}", a.local.socket().display());
    let script = counter_script(&log);
    let args = [
        "--recover-if-checkpointed",
        "--gid",
        gid,
        "--cts",
        &socket,
        "--",
        "bash",
        "-c",
        &script,
    ];
    let mut first = Wrapper::spawn_capturing("gca-exec", &args, a.dir.path());
    eventually(T, "the job runs in its namespace", || async {
        assert!(first.running(), "{}", first.stderr_text());
        values(&log).len() >= 5 && a.local.job(gid).await.is_ok_and(|j| j.pid != first.pid)
    })
    .await;
    let init = a.local.job(gid).await.unwrap().pid;
    assert_eq!(nspid(init), vec![init, 1]);
    let before = values(&log).last().copied().unwrap();
    checkpoint(&gcs, gid, false).await;
    let after = values(&log).last().copied().unwrap();
    // A resource manager's SIGKILL of the wrapper ends the namespace (its init dies with its
    // parent).
    first.signal("KILL");
    first.wait(T).await;
    eventually(T, "the namespace dies with its wrapper", || async {
        proc::stat(init).is_none_or(|s| s.state == 'Z')
    })
    .await;
    eventually(T, "the GCS records the job's end", || async {
        gcs_job(&gcs, gid).await.state == JobState::Finished
    })
    .await;
    let killed_at = values(&log).len();

    // The same command line: recovered into a fresh namespace.
    let mut second = Wrapper::spawn_capturing("gca-exec", &args, a.dir.path());
    eventually(T, "the job is recovered and counts", || async {
        assert!(second.running(), "{}", second.stderr_text());
        values(&log).len() > killed_at + 5
            && a.local
                .job(gid)
                .await
                .is_ok_and(|j| j.state == JobState::Running && j.pid != second.pid)
    })
    .await;
    let rinit = a.local.job(gid).await.unwrap().pid;
    assert_eq!(proc::stat(rinit).unwrap().ppid, second.pid);
    assert_eq!(nspid(rinit), vec![rinit, 1]);
    let resumed = values(&log)[killed_at];
    assert!(
        before < resumed && resumed <= after + 1,
        "resumed at {resumed}, checkpointed between {before} and {after}"
    );
    assert_eq!(gcs_job(&gcs, gid).await.recoveries, 1);
    second.signal("KILL");
    second.wait(T).await;
    eventually(
        T,
        "the restored namespace dies with its wrapper",
        || async { proc::stat(rinit).is_none_or(|s| s.state == 'Z') },
    )
    .await;
}
