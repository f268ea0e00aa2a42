//! The command-template driver, configured over CRIU's command line: a site adds a core
//! service by configuration alone.

use gca_protocol::fault::FaultKind;
use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::TestGcs;

fn criu() -> String {
    std::env::var("GCA_CRIU").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/local/sbin/criu").exists() {
            "/usr/local/sbin/criu".into()
        } else {
            "criu".into()
        }
    })
}

fn driver() -> String {
    let c = criu();
    format!(
        "kind = \"command\"\ncheck = [{c:?}, \"check\"]\ncheckpoint = [{c:?}, \"dump\", \"-t\", \"{{PID}}\", \"-D\", \"{{IMAGE_DIR}}\", \"-o\", \"dump.log\", \"--leave-running\"]\ncheckpoint_and_stop = [{c:?}, \"dump\", \"-t\", \"{{PID}}\", \"-D\", \"{{IMAGE_DIR}}\", \"-o\", \"dump.log\"]\n"
    )
}

#[tokio::test]
async fn a_configured_command_line_checkpoints_real_jobs() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-cmd", "criu", &driver(), "").await;
    let job = TestJob::counter(cts.dir.path());
    job.wait_for_values(2).await;
    cts.register("gid-cmd", job.pid).await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-cmd".into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint through the command driver");
    assert_eq!(record.sequence, Some(1));
    let image = cts.image_files(&record.id);
    for f in ["pstree.img", "dump.log", "manifest.json"] {
        assert!(image.join(f).is_file(), "{f} missing");
    }
    let before = job.last();
    job.wait_past(before + 2).await;

    let stopped = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-cmd".into(),
            stop: true,
        })
        .await
        .unwrap();
    assert_eq!(stopped.sequence, Some(2));
    assert!(stopped.job_stopped);
    assert!(!job.running());
}

#[tokio::test]
async fn a_failing_command_is_a_fault_with_its_output() {
    let gcs = TestGcs::start().await;
    let failing = "kind = \"command\"\ncheckpoint = [\"bash\", \"-c\", \"echo cannot checkpoint {GID} >&2; exit 4\"]\n";
    let cts = TestCts::registered(&gcs, "cts-cmd-fail", "criu", failing, "").await;
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-cmd-fail", job.pid).await;
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-cmd-fail".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::OperationFailed);
    assert!(
        err.message.contains("cannot checkpoint gid-cmd-fail"),
        "{}",
        err.message
    );
    assert!(gcs_checkpoints(&gcs, "gid-cmd-fail").await.is_empty());
    assert!(job.running());
}

#[tokio::test]
async fn a_template_with_an_unknown_placeholder_stops_the_cts_at_start() {
    let cfg = gca_protocol::driver_config::DriverConfig::Command(
        toml::from_str("checkpoint = [\"dump\", \"{PDI}\"]").unwrap(),
    );
    let err = match gca_drivers::make_driver(&cfg) {
        Ok(_) => panic!("a typo in a template must be caught at start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("PDI"), "{err}");
}
