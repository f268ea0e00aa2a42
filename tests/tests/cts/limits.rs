//! The CTS's `[limits]`: what callers and a GCS that is away can make it hold. Each limit,
//! reached, is a clear refusal naming it, and a refusal takes nothing (no image, no record).

use std::time::Duration;

use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::*;
use integration_tests::cts::*;
use integration_tests::TestGcs;

/// A command driver whose checkpoint takes two seconds: long enough to overlap another.
const SLOW_DRIVER: &str =
    "kind = \"command\"\ncheckpoint = [\"sh\", \"-c\", \"sleep 2; echo state > state\"]\n";

fn images(cts: &TestCts) -> usize {
    std::fs::read_dir(cts.state_dir().join("store").join("images"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn checkpoint(cts: &TestCts, gid: &str) -> Result<CheckpointRecord, Fault> {
    cts.json
        .post(
            &format!("/api/v1/jobs/{gid}/checkpoint"),
            &serde_json::json!({}),
        )
        .await
}

#[tokio::test]
async fn checkpoints_beyond_the_resources_limit_are_refused_as_busy() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-in-flight",
        "criu",
        SLOW_DRIVER,
        "[limits]\ncheckpoints_in_flight = 1",
    )
    .await;
    let a = TestJob::counter(cts.dir.path());
    let b = TestJob::counter(cts.dir.path());
    cts.register("gid-busy-a", a.pid).await;
    cts.register("gid-busy-b", b.pid).await;

    let staging = cts.state_dir().join("store").join("staging");
    let (first, second) = tokio::join!(checkpoint(&cts, "gid-busy-a"), async {
        // The first has its place once its image is being written.
        eventually(Duration::from_secs(10), "the first checkpoint runs", || {
            let running = std::fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_some());
            async move { running }
        })
        .await;
        checkpoint(&cts, "gid-busy-b").await
    });
    let first = first.expect("the first checkpoint has the resource's one place");
    let refused = second.expect_err("a second one at the same time has no place");
    assert_eq!(refused.kind, FaultKind::ServiceUnavailable, "{refused:?}");
    assert_eq!(refused.code.as_deref(), Some("cts-busy"), "{refused:?}");
    assert!(
        refused.message.contains("checkpoints_in_flight"),
        "the refusal names the limit: {}",
        refused.message
    );
    assert_eq!(images(&cts), 1, "the refused checkpoint stored nothing");
    assert_eq!(gcs_checkpoints(&gcs, "gid-busy-b").await.len(), 0);
    assert_eq!(first.sequence, Some(1));
    // Once the place is free, the other job's checkpoint is taken.
    let later = checkpoint(&cts, "gid-busy-b").await.expect("a free place");
    assert_eq!(later.sequence, Some(1));
}

#[tokio::test]
async fn a_full_outbox_refuses_checkpoints_and_keeps_what_it_holds() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-outbox-full",
        "criu",
        CRIU_DRIVER,
        "gcs_wait_secs = 1\n[limits]\noutbox_max_items = 2",
    )
    .await;
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-full", job.pid).await;
    let addr = gcs.addr;
    let database_url = gcs.database_url.clone();
    gcs.shutdown().await;

    let mut taken = Vec::new();
    for _ in 0..2 {
        let r = checkpoint(&cts, "gid-full")
            .await
            .expect("taken while the outbox has room");
        taken.push(r.id);
    }
    let refused = checkpoint(&cts, "gid-full")
        .await
        .expect_err("the outbox holds its limit");
    assert_eq!(refused.kind, FaultKind::ServiceUnavailable, "{refused:?}");
    assert_eq!(refused.code.as_deref(), Some("outbox-full"), "{refused:?}");
    assert!(
        refused.message.contains("outbox_max_items"),
        "{}",
        refused.message
    );
    assert_eq!(
        images(&cts),
        2,
        "nothing was dumped for the refused checkpoint"
    );
    assert!(job.running(), "the refusal left the job alone");

    // The GCS back: both records arrive, and checkpoints are taken again.
    let gcs = TestGcs::start_at(addr, &database_url).await;
    eventually(Duration::from_secs(20), "the outbox drains", || async {
        cts.cts.link().status().pending == 0
    })
    .await;
    let records = gcs_checkpoints(&gcs, "gid-full").await;
    assert_eq!(
        records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        taken
    );
    let next = checkpoint(&cts, "gid-full").await.expect("room again");
    assert_eq!(next.sequence, Some(3));
}

/// Forks `sleep 37` and registers it over the CTS's local socket (`argv[1]`) as GID
/// `argv[2]`; prints the HTTP answer.
const REGISTER_A_CHILD: &str = r#"
import json, os, socket, sys
pid = os.fork()
if pid == 0:
    fd = os.open("/dev/null", os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)
    os.execvp("sleep", ["sleep", "37"])
body = json.dumps({"gid": sys.argv[2], "pid": pid})
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(("POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
           "Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)).encode())
answer = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    answer += chunk
print(answer.decode())
"#;

#[tokio::test]
async fn a_local_user_registers_up_to_their_limit_of_jobs() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-per-user",
        "criu",
        CRIU_DRIVER,
        "[limits]\njobs_per_user = 1",
    )
    .await;
    open_to_local_users(&cts);
    // As a wrapper would: `nobody` starts a job (`sleep 37`, its child) and registers it (a
    // user registers only processes of their own they started).
    let socket = cts.local.socket().display().to_string();
    let start_and_register = |gid: &str| {
        let args = [
            "-u".to_string(),
            "nobody".into(),
            "--".into(),
            "python3".into(),
            "-c".into(),
            REGISTER_A_CHILD.into(),
            socket.clone(),
            gid.into(),
        ];
        async move {
            let out = tokio::process::Command::new("runuser")
                .args(&args)
                .output()
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0);
            (status, text)
        }
    };
    let (status, text) = start_and_register("gid-user-1").await;
    assert!((200..300).contains(&status), "{status} {text}");
    let (status, text) = start_and_register("gid-user-2").await;
    let _ = std::process::Command::new("pkill")
        .args(["-u", "nobody", "-x", "-f", "sleep 37"])
        .status();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("too-many-jobs"), "{text}");
    assert!(text.contains("limits.jobs_per_user"), "{text}");
    assert!(cts.local.job("gid-user-2").await.is_err());
    let gcs_has = gcs
        .call::<gca_protocol::ops::GetJobOp>(GidRequest {
            gid: "gid-user-2".into(),
        })
        .await;
    assert!(gcs_has.is_err(), "the refused job is not at the GCS either");
}
