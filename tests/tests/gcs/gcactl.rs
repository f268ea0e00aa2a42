//! `gcactl` against a real GCS: the admin and broker workflows and its exit codes.

use integration_tests::*;

/// The gcactl binary built alongside this test (target/<profile>/gcactl).
fn gcactl_path() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("gcactl");
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo build --workspace)",
        path.display()
    );
    path
}

async fn gcactl(gcs_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(gcactl_path())
        .arg("--gcs")
        .arg(gcs_url)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn admin_and_broker_workflow() {
    let gcs = TestGcs::start().await;
    let cts = FakeCts::start("cts-a").await;
    cts.set(|b| b.register_at_gcs = Some(gcs.endpoint()));
    let descriptor = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/examples/criu-cts.xml"
    );

    let (code, out, err) = gcactl(&gcs.url, &["type", "register", descriptor]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("criu") && out.contains("created"), "{out}");
    let (code, out, _) = gcactl(
        &gcs.url,
        &[
            "class",
            "add",
            "migratable",
            "--property",
            "recover-on-other-resource=true",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("created"), "{out}");
    let (_, out, _) = gcactl(&gcs.url, &["class", "list"]).await;
    assert!(out.contains("basic") && out.contains("migratable"), "{out}");

    gcs.call::<gca_protocol::ops::RegisterCtsInstanceOp>(
        gca_protocol::messages::RegisterCtsInstance {
            instance: instance("cts-a", "criu", "node-a", &cts.url),
        },
    )
    .await
    .unwrap();
    gcs.register_job("job-9", "cts-a").await;

    let (code, out, err) = gcactl(&gcs.url, &["--json", "checkpoint", "job-9"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sequence"], 1);
    let id = v["id"].as_str().unwrap().to_string();
    let (code, out, _) = gcactl(&gcs.url, &["checkpoints", "job-9"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&id), "{out}");
    let (code, out, _) = gcactl(&gcs.url, &["recovery-info", "job-9"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("gca-recover") && out.contains(&id) && out.contains("--gid"),
        "{out}"
    );
    let (_, out, _) = gcactl(&gcs.url, &["find-cts", "--class", "basic"]).await;
    assert!(out.contains("cts-a") && out.contains("gca-exec"), "{out}");

    let (code, _, err) = gcactl(&gcs.url, &["job", "show", "no-such-job"]).await;
    assert_eq!(code, 3, "not found: {err}");
    assert!(
        err.contains("ResourceUnknown") && err.contains("no-such-job"),
        "{err}"
    );
    let (code, _, err) = gcactl(
        &gcs.url,
        &["class", "add", "migratable", "--property", "x=y"],
    )
    .await;
    assert_eq!(code, 1, "conflict: {err}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (code, _, err) = gcactl(&dead_url, &["class", "list"]).await;
    assert_eq!(code, 4, "unreachable: {err}");
}
