//! The CTS's half of the authorization matrix (ARCHITECTURE.md, "Authorization"), and each
//! attack of issue 10's list as a regression test:
//!
//! - every endpoint of the public port and of the image store, as every role, a foreign CTS,
//!   no certificate, an untrusted and an expired one: refused unless the matrix allows it,
//!   and a refusal changes nothing (the job runs on, the images and the GCS's records are
//!   as they were);
//! - a peer CTS reads an image only once the GCS records the job's recovery on it;
//! - a local unprivileged user (`nobody`, through the 0666 socket with curl) cannot fetch,
//!   recover, checkpoint or see another user's job, cannot register a setuid process, and a
//!   job that starts one is no longer checkpointed;
//! - a local recovery registration on another resource does not take a running job over;
//! - image files are root's, in 0700 directories; job state 0600.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use gca_protocol::local::{FetchImage, LocalRecovery, RegisterLocalJob};
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::cts::*;
use integration_tests::{pki, TestGcs};

/// Who calls the public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Admin,
    Broker,
    Gcs,
    /// A CTS with no recovery of the job recorded.
    Peer,
    User,
    Anonymous,
    Untrusted,
    Expired,
}

const EVERYONE: [Who; 8] = [
    Who::Admin,
    Who::Broker,
    Who::Gcs,
    Who::Peer,
    Who::User,
    Who::Anonymous,
    Who::Untrusted,
    Who::Expired,
];

impl Who {
    fn client(self) -> reqwest::Client {
        let p = pki::pki();
        let with = |f: pki::CertFiles| {
            pki::client_with(gca_protocol::transport::ClientTls {
                ca: Some(p.ca()),
                cert: Some(f.cert),
                key: Some(f.key),
            })
        };
        match self {
            Who::Admin => p.client(pki::ADMIN),
            Who::Broker => p.client(pki::BROKER),
            Who::Gcs => p.client(pki::GCS),
            Who::Peer => p.client("cts:cts-peer"),
            Who::User => p.client("user:alice"),
            Who::Anonymous => p.anonymous(),
            Who::Untrusted => with(p.untrusted_cert(pki::GCS)),
            Who::Expired => with(p.expired_cert(pki::GCS)),
        }
    }
}

use Who::*;

/// An endpoint: what it is, method, path, body, who may call it.
type Case = (
    &'static str,
    &'static str,
    String,
    Option<String>,
    &'static [Who],
);

/// A CTS with a running application-level job and one checkpoint of it.
struct Fixture {
    gcs: TestGcs,
    cts: TestCts,
    job: TestJob,
    record: CheckpointRecord,
}

async fn fixture() -> Fixture {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-a", "app-level", APP_DRIVER, "").await;
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    let registered = cts.register("gid-auth", job.pid).await;
    job.start(&registered);
    job.wait_for_values(3).await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-auth".into(),
            stop: false,
        })
        .await
        .expect("a first checkpoint");
    Fixture {
        gcs,
        cts,
        job,
        record,
    }
}

/// What the CTS and the GCS hold: the images in the store, the GCS's records of the job, and
/// whether the job runs.
async fn state(f: &Fixture) -> (Vec<String>, usize, bool) {
    let mut images: Vec<String> = std::fs::read_dir(f.cts.state_dir().join("store/images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    images.sort();
    (
        images,
        gcs_checkpoints(&f.gcs, "gid-auth").await.len(),
        f.job.running(),
    )
}

#[tokio::test]
async fn every_public_endpoint_of_the_cts_is_allowed_or_refused_by_the_matrix() {
    let f = fixture().await;
    let id = f.record.id.clone();
    let url = f.cts.url.clone();
    let soap = "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><gca:DoCheckpoint xmlns:gca=\"urn:gca:v1\"><gca:GID>gid-auth</gca:GID><gca:Stop>true</gca:Stop></gca:DoCheckpoint></s:Body></s:Envelope>".to_string();
    // (what, method, path, body, who may); the writes last, the refused callers first.
    let cases: Vec<Case> = vec![
        (
            "status",
            "GET",
            "/api/v1/status".into(),
            None,
            &[Admin, Gcs],
        ),
        ("jobs", "GET", "/api/v1/jobs".into(), None, &[Admin, Gcs]),
        (
            "job",
            "GET",
            "/api/v1/jobs/gid-auth".into(),
            None,
            &[Admin, Gcs],
        ),
        ("image list", "GET", "/images".into(), None, &[Admin, Gcs]),
        (
            "manifest",
            "GET",
            format!("/images/{id}"),
            None,
            &[Admin, Gcs],
        ),
        (
            "file",
            "GET",
            format!("/images/{id}/files/state"),
            None,
            &[],
        ),
        (
            "chunks",
            "POST",
            format!("/images/{id}/chunks"),
            Some(format!("{{\"chunks\": [\"{}\"]}}", "0".repeat(64))),
            &[],
        ),
        (
            "export",
            "POST",
            format!("/images/{id}/export"),
            Some("{\"dir\": \"/etc/systemd/system\"}".into()),
            &[Gcs],
        ),
        (
            "JSON checkpoint",
            "POST",
            "/api/v1/jobs/gid-auth/checkpoint".into(),
            Some("{\"stop\": false}".into()),
            &[Gcs],
        ),
        (
            "SOAP DoCheckpoint with stop",
            "POST",
            gca_protocol::ns::CTS_SERVICE_PATH.into(),
            Some(soap),
            &[Gcs],
        ),
        ("delete", "DELETE", format!("/images/{id}"), None, &[Gcs]),
    ];
    let mut problems = Vec::new();
    for (what, method, path, body, allowed) in &cases {
        for who in EVERYONE {
            let may = allowed.contains(&who);
            let before = state(&f).await;
            let mut req = who
                .client()
                .request(method.parse().unwrap(), format!("{url}{path}"));
            if let Some(b) = body {
                req = req
                    .header("content-type", "text/xml; charset=utf-8")
                    .body(b.clone());
            }
            let answer = match req.send().await {
                Err(_) => "handshake refused".to_string(),
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    let denied =
                        status == 401 || status == 403 || text.contains("AccessDeniedFault");
                    let unauthenticated = status == 401 || text.contains("unauthenticated");
                    match (denied, who) {
                        (true, Anonymous) if unauthenticated => "denied".to_string(),
                        (true, Anonymous) => format!("denied without 401: {status} {text}"),
                        (true, _) => "denied".to_string(),
                        (false, _) => format!("{status}"),
                    }
                }
            };
            let refused = answer == "denied" || answer == "handshake refused";
            if may == refused || (matches!(who, Untrusted | Expired) && !refused) {
                problems.push(format!("{what} as {who:?} (allowed: {may}): {answer}"));
            }
            if !may {
                assert_eq!(
                    state(&f).await,
                    before,
                    "{what} as {who:?} was refused but changed something"
                );
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Only the GCS stopped the job and deleted the image.
    assert!(!f.job.running());
    assert!(!f.cts.image_dir(&id).exists());
}

/// A peer reads an image once the GCS records the recovery on it: after the job failed and
/// the peer registered the recovery.
#[tokio::test]
async fn a_peer_cts_reads_an_image_only_for_a_recovery_the_gcs_records_on_it() {
    let f = fixture().await;
    let peer = TestCts::registered(&f.gcs, "cts-peer", "app-level", APP_DRIVER, "").await;
    let url = format!("{}/images/{}/files/state", f.cts.url, f.record.id);
    let read = || async {
        Peer.client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(read().await, 403, "the job runs on cts-a");
    // A local registration of a recovery on the peer while the job runs: refused by the GCS.
    let wrapper = TestJob::script(peer.dir.path(), "sleep 60", &[]);
    let recovery = RegisterLocalJob {
        gid: "gid-auth".into(),
        pid: wrapper.pid,
        periodic_interval_secs: None,
        recovery: Some(LocalRecovery {
            from_checkpoint: Some(f.record.id.clone()),
            restoring: true,
        }),
        retention: None,
        limits: None,
    };
    let err = peer.local.register(&recovery).await.unwrap_err();
    assert_eq!(err.kind, gca_protocol::FaultKind::AccessDenied, "{err:?}");
    assert!(
        err.message.contains("recovery-not-authorized") || err.message.contains("runs on CTS"),
        "{}",
        err.message
    );
    assert_eq!(gcs_job(&f.gcs, "gid-auth").await.cts_instance, "cts-a");
    // The job fails; now the peer may recover it, and read its image.
    signal(&f.job, "KILL");
    eventually(
        Duration::from_secs(10),
        "the job's end reaches the GCS",
        || async { gcs_job(&f.gcs, "gid-auth").await.state == JobState::Finished },
    )
    .await;
    peer.local
        .register(&recovery)
        .await
        .expect("the recovery registers");
    assert_eq!(
        read().await,
        200,
        "the GCS records the recovery on cts-peer"
    );
    let fetched = peer
        .local
        .fetch_image(&FetchImage {
            gid: "gid-auth".into(),
            checkpoint_id: f.record.id.clone(),
            digest: None,
        })
        .await
        .expect("the peer fetches the image");
    assert!(fetched.fetched);
    // Fetched copies are root's alone.
    let file = fetched.image_dir.join("state");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

fn signal(job: &TestJob, sig: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &job.pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// A local user cannot use another user's job through the socket: not fetch its image (the
/// first step of the "local user gets root" chain), not recover, checkpoint or see it.
#[tokio::test]
async fn a_local_user_cannot_use_another_users_job_or_image() {
    let f = fixture().await;
    open_to_local_users(&f.cts);
    let before = state(&f).await;
    let fetch = format!(
        "{{\"gid\": \"gid-auth\", \"checkpoint_id\": \"{}\"}}",
        f.record.id
    );
    for (method, path, body) in [
        ("POST", "/v1/images/fetch".to_string(), Some(fetch.as_str())),
        (
            "GET",
            "/v1/jobs/gid-auth/recovery?image=latest".into(),
            None,
        ),
        (
            "POST",
            "/v1/jobs/gid-auth/checkpoint".into(),
            Some("{\"stop\": true}"),
        ),
        ("GET", "/v1/jobs/gid-auth".into(), None),
    ] {
        let (status, text) = local_as_nobody(&f.cts, method, &path, body).await;
        assert_eq!(status, 403, "{method} {path}: {text}");
        assert!(
            text.contains("not to the caller"),
            "{method} {path}: {text}"
        );
    }
    let (status, text) = local_as_nobody(&f.cts, "GET", "/v1/jobs", None).await;
    assert_eq!(
        (status, text.trim()),
        (200, "[]"),
        "a user sees only their own jobs"
    );
    let (status, text) =
        local_as_nobody(&f.cts, "GET", "/v1/jobs/gid-auth/checkpoints", None).await;
    assert_eq!(
        (status, text.trim()),
        (200, "[]"),
        "a user can recover from none of another user's checkpoints"
    );
    assert_eq!(
        state(&f).await,
        before,
        "nothing was fetched, taken or stopped"
    );
}

/// A setuid program cannot be registered by its user, and a job that starts one is not
/// dumped into an image its user owns.
#[tokio::test]
async fn setuid_processes_are_never_checkpointed_for_their_user() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-suid", "criu", CRIU_DRIVER, "").await;
    open_to_local_users(&cts);
    let suid = cts.dir.path().join("suid-sleep");
    std::fs::copy("/bin/sleep", &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let mut child = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&suid)
        .arg("60")
        .spawn()
        .unwrap();
    let mut pid = 0;
    eventually(Duration::from_secs(5), "the setuid program runs", || {
        let parent = child.id() as i32;
        let found = gca_drivers::proc::descendants(parent)
            .into_iter()
            .chain([parent])
            .find(|p| gca_drivers::proc::stat(*p).is_some_and(|s| s.comm == "suid-sleep"));
        if let Some(p) = found {
            pid = p;
        }
        async move { found.is_some() }
    })
    .await;
    let creds = gca_drivers::proc::credentials(pid).unwrap();
    assert_eq!(
        (creds.uids[0], creds.uids[1]),
        (65534, 0),
        "ruid nobody, euid root"
    );
    let body = format!("{{\"gid\": \"gid-suid\", \"pid\": {pid}}}");
    let (status, text) = local_as_nobody(&cts, "POST", "/v1/jobs", Some(&body)).await;
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("privileged-process") || text.contains("not the caller"),
        "{text}"
    );
    assert!(cts.local.job("gid-suid").await.is_err());

    // gca-exec runs a setuid program without its privileges (no_new_privs).
    let log = cts.dir.path().join("ids");
    let mut w = integration_tests::wrappers::Wrapper::spawn(
        "gca-exec",
        &[
            "--gid",
            "gid-nnp",
            "--cts",
            &format!("unix:{}", cts.local.socket().display()),
            "--",
            "bash",
            "-c",
            &format!("grep ^Uid /proc/self/status > {log:?}; {suid:?} 0; grep ^NoNewPrivs /proc/self/status >> {log:?}"),
        ],
        cts.dir.path(),
    );
    assert_eq!(
        w.code(Duration::from_secs(20)).await,
        0,
        "{}",
        w.stderr_text()
    );
    let ids = std::fs::read_to_string(&log).unwrap();
    assert!(ids.contains("NoNewPrivs:\t1"), "{ids}");
}

/// A job the owner registered that later starts a process of another identity (here: root
/// registers nothing, the job runs as nobody and execs a setuid program) is refused at its
/// next checkpoint, and nothing is stored.
#[tokio::test]
async fn a_job_that_gains_a_privileged_process_is_no_longer_checkpointed() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-gain", "criu", CRIU_DRIVER, "").await;
    open_to_local_users(&cts);
    let suid = cts.dir.path().join("suid-sleep");
    std::fs::copy("/bin/sleep", &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let flag = cts.dir.path().join("go");
    // As nobody: register itself (through a shell that then waits for the flag and starts
    // the setuid program as its child).
    let script = format!("while [ ! -e {flag:?} ]; do sleep 0.05; done; {suid:?} 60 & wait");
    let mut job = Command::new("runuser")
        .args(["-u", "nobody", "--", "setsid", "bash", "-c", &script])
        .spawn()
        .unwrap();
    let mut pid = 0;
    eventually(Duration::from_secs(5), "the job runs as nobody", || {
        let found = std::iter::once(job.id() as i32)
            .chain(gca_drivers::proc::descendants(job.id() as i32))
            .find(|p| {
                gca_drivers::proc::stat(*p).is_some_and(|s| s.comm == "bash")
                    && gca_drivers::proc::uid(*p) == Some(65534)
            });
        if let Some(p) = found {
            pid = p;
        }
        async move { found.is_some() }
    })
    .await;
    // Root registers it for nobody (as a resource manager's root wrapper would).
    cts.register("gid-gain", pid).await;
    std::fs::write(&flag, "").unwrap();
    eventually(Duration::from_secs(5), "the setuid child runs", || async {
        gca_drivers::proc::descendants(pid)
            .iter()
            .any(|p| gca_drivers::proc::stat(*p).is_some_and(|s| s.comm == "suid-sleep"))
    })
    .await;
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-gain".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    let _ = job.kill();
    let _ = Command::new("pkill")
        .args(["-f", &suid.display().to_string()])
        .status();
    let _ = job.wait();
    assert!(
        err.message.contains("setuid") || err.message.contains("UIDs"),
        "{}",
        err.message
    );
    assert!(gcs_checkpoints(&gcs, "gid-gain").await.is_empty());
    assert_eq!(
        std::fs::read_dir(cts.state_dir().join("store/images"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn images_and_job_state_are_roots_alone() {
    let f = fixture().await;
    let store = f.cts.state_dir().join("store");
    for dir in [store.clone(), store.join("images"), store.join("staging")] {
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            dir.display()
        );
    }
    let image = f.cts.image_dir(&f.record.id);
    for e in std::fs::read_dir(&image).unwrap().flatten() {
        assert_eq!(
            e.metadata().unwrap().uid(),
            0,
            "{:?} is the CTS's",
            e.path()
        );
    }
    for e in std::fs::read_dir(f.cts.state_dir().join("jobs"))
        .unwrap()
        .flatten()
    {
        assert_eq!(
            e.metadata().unwrap().permissions().mode() & 0o777,
            0o600,
            "{:?}",
            e.path()
        );
    }
}
