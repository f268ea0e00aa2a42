//! The VMM core service end to end (GCA paper, section 4): a job in a real QEMU virtual
//! machine booted by gca-vmm-exec (the vmm-ready-job-executor) with the Virtual Node Gate
//! inside, checkpointed whole through the GCS, its VM killed, recovered by gca-recover (the
//! vmm-ready-job-resumer) on a second CTS; the job continues from the checkpoint's state, in
//! memory and in its file, and its own exit status is the wrapper's.
//!
//! Needs the guest of `scripts/build-vmm-guest` (run by `scripts/install-deps`) in
//! `$GCA_VMM_GUEST_DIR` or /var/cache/gca/vmm-guest, and qemu-system-x86. The accelerator is
//! the one that build found to boot the guest here (`accel`: `kvm`, or `tcg` where the host's
//! KVM cannot boot a stock kernel).

use std::path::Path;
use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

const T: Duration = Duration::from_secs(120);

/// The numbers the job printed on its console (`count N`).
fn counts(console: &Path) -> Vec<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count ")?.trim().parse().ok())
        .collect()
}

async fn wait_count(console: &Path, at_least: u64, wrapper: &Wrapper) {
    eventually(T, "the job in the VM counts", || async {
        assert!(
            wrapper.running(),
            "the wrapper ended: {}",
            wrapper.stderr_text()
        );
        counts(console).last().is_some_and(|&n| n >= at_least)
    })
    .await;
}

/// Counts in memory (`n`) and in a file of its directory (`count.log`), one number every
/// 0.1 s, printing each; on SIGTERM appends `stopped at N` and exits 9.
const JOB: &str = r#"n=0
trap 'echo "stopped at $n" >> count.log; exit 9' TERM
while [ "$n" -lt 1000000 ]; do
    n=$((n + 1))
    echo "$n" >> count.log
    echo "count $n"
    sleep 0.1 &
    wait $!
done
"#;

#[tokio::test]
async fn a_vm_job_checkpointed_through_the_gcs_continues_on_another_cts_and_ends_with_its_status() {
    let driver = vmm_driver();
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-vmm-a", "vmm", &driver, "").await;
    let b = TestCts::registered(&gcs, "cts-vmm-b", "vmm", &driver, "").await;
    let gid = "gid-vmm-move";
    let input = a.dir.path().join("input");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("job.sh"), JOB).unwrap();
    let input_s = input.display().to_string();
    let a_url = a.url.clone();
    let mut exec = Wrapper::spawn(
        "gca-vmm-exec",
        &[
            "--gid", gid, "--cts", &a_url, "--input", &input_s, "--", "sh", "job.sh",
        ],
        a.dir.path(),
    );
    eventually(T, "gca-vmm-exec registers the job", || async {
        assert!(exec.running(), "gca-vmm-exec ended: {}", exec.stderr_text());
        a.local.job(gid).await.is_ok_and(|j| j.pid == exec.pid)
    })
    .await;
    let run_a = a.local.job(gid).await.unwrap().checkpoint_dir;
    let console_a = run_a.join("console.log");
    wait_count(&console_a, 5, &exec).await;

    // A checkpoint through the GCS; the VM goes on running.
    let before = *counts(&console_a).last().unwrap();
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint through the GCS");
    let after = *counts(&console_a).last().unwrap();
    assert!(!record.job_stopped);
    let image = a.image_files(&record.id);
    for f in ["machine.state", "disk.qcow2", "vm.json", "manifest.json"] {
        assert!(image.join(f).is_file(), "the image has no {f}");
    }
    let machine: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("vm.json")).unwrap()).unwrap();
    assert_eq!(machine["machine"], "pc-q35-7.2");
    assert_eq!(machine["cpu"], "qemu64");
    wait_count(&console_a, after + 10, &exec).await;

    // The VM dies (its QEMU killed); its wrapper ends without the job's status.
    let qemu = child_named(exec.pid, "qemu-system-x86");
    kill(qemu);
    // (The CTS removes the job's run directory once it has ended.)
    let died_at = counts(&console_a).last().copied().unwrap_or_default();
    let code = exec.code(T).await;
    assert_eq!(code, 75, "gca-vmm-exec: {}", exec.stderr_text());
    eventually(T, "the GCS records the job failed", || async {
        gcs_job(&gcs, gid).await.state == JobState::Finished
    })
    .await;
    assert!(died_at >= after + 10);

    // Recovered on B from the checkpoint.
    let out = b.dir.path().join("out");
    let out_s = out.display().to_string();
    let b_url = b.url.clone();
    let mut rec = Wrapper::spawn(
        "gca-recover",
        &[
            "--gid", gid, "--image", &record.id, "--cts", &b_url, "--output", &out_s,
        ],
        b.dir.path(),
    );
    eventually(T, "the job runs again under CTS B", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        b.local
            .job(gid)
            .await
            .is_ok_and(|j| j.state == JobState::Running && j.pid == rec.pid)
    })
    .await;
    assert!(b.image_files(&record.id).join("machine.state").is_file());
    // The restored VM is the resumer's child (killed with it if the test fails).
    rec.adopt(child_named(rec.pid, "qemu-system-x86"));
    let run_b = b.local.job(gid).await.unwrap().checkpoint_dir;
    let console_b = run_b.join("console.log");
    eventually(T, "the restored job counts on", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        counts(&console_b).len() >= 5
    })
    .await;
    // It goes on from the checkpoint's count (memory), not from 0 nor from where A's VM died.
    let resumed = counts(&console_b)[0];
    assert!(
        before < resumed && resumed <= after + 1,
        "resumed at {resumed}; the checkpoint was taken between {before} and {after} (A's VM died at {died_at})"
    );
    let at_gcs = gcs_job(&gcs, gid).await;
    assert_eq!(at_gcs.cts_instance, "cts-vmm-b");
    assert_eq!(at_gcs.state, JobState::Running);

    // SIGTERM to the resumer reaches the job in the guest; its status 9 is the wrapper's, and
    // its directory comes back.
    rec.signal("TERM");
    assert_eq!(rec.code(T).await, 9, "gca-recover: {}", rec.stderr_text());
    let log = std::fs::read_to_string(out.join("count.log")).expect("the job's file came back");
    let lines: Vec<&str> = log.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    let stopped: u64 = last
        .strip_prefix("stopped at ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the job's file ends with {last:?}"));
    // The file is the checkpoint's (1..resumed-1) continued: every number once, in order.
    let numbers: Vec<u64> = lines[..lines.len() - 1]
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(numbers, (1..=stopped).collect::<Vec<_>>());
    assert!(stopped > resumed);
    eventually(
        Duration::from_secs(20),
        "the GCS records exit status 9",
        || async {
            let j = gcs_job(&gcs, gid).await;
            if j.state == JobState::Finished && j.exit_status != Some(9) {
                panic!("the GCS records {j:?}");
            }
            j.state == JobState::Finished && j.exit_status == Some(9)
        },
    )
    .await;
}

/// The PID of `parent`'s child whose name starts with `name`.
fn child_named(parent: i32, name: &str) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid: i32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent && comm.starts_with(&name[..name.len().min(15)]) {
            return pid;
        }
    }
    panic!("process {parent} has no child {name}");
}

fn kill(pid: i32) {
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}
