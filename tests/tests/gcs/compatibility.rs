//! Compatibility before restore at the GCS: the facts of records and CTS instances are
//! stored, covered by the record's signature, and GetRecoveryInfo judges every candidate
//! with reasons, compatible ones first, by the GCS's `[compatibility]` rules.

use gca_protocol::facts::*;
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::*;

fn resource(kernel: &str, criu: &str) -> ResourceFacts {
    ResourceFacts {
        architecture: "x86_64".into(),
        kernel: kernel.into(),
        criu_version: Some(criu.into()),
        cpuinfo: Some("Y3B1aW5mbw==".into()),
    }
}

/// A record of `cts-c`'s, taken on kernel 6.18.44 with CRIU 4.1.1, with an open file.
fn record_with_facts(id: &str) -> CheckpointRecord {
    let mut r = checkpoint_record(id, "job-1", "cts-c");
    r.facts = Some(ImageFacts {
        resource: resource("6.18.44-fc-v769", "4.1.1"),
        checkpointer: CRIU.into(),
        executable: Some(FileFact {
            path: "/usr/bin/bash".into(),
            digest: Some(format!("sha256:{}", "cd".repeat(32))),
        }),
        mapped_files: vec![],
        open_files: vec!["/data/in.dat".into()],
        declared: vec![],
    });
    signed(r)
}

async fn register(gcs: &TestGcs, name: &str, facts: Option<ResourceFacts>) {
    let mut i = instance(name, "criu", &format!("node-{name}"), UNREACHABLE_CTS);
    i.facts = facts;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance { instance: i })
        .await
        .unwrap();
}

async fn verdicts(gcs: &TestGcs) -> Vec<(String, Compatibility)> {
    gcs.call::<GetRecoveryInfoOp>(GetRecoveryInfo {
        gid: "job-1".into(),
        image: LATEST.into(),
    })
    .await
    .unwrap()
    .candidates
    .into_iter()
    .map(|c| (c.instance.name, c.compatibility.expect("a verdict")))
    .collect()
}

#[tokio::test]
async fn recovery_info_puts_compatible_candidates_first_with_the_reasons_of_the_others() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-0", "node-0", UNREACHABLE_CTS).await;
    register(&gcs, "cts-a", Some(resource("6.1.0", "4.1.1"))).await;
    register(&gcs, "cts-b", None).await;
    register(&gcs, "cts-c", Some(resource("6.18.44-fc-v769", "4.1.1"))).await;
    register(&gcs, "cts-d", Some(resource("6.19.2", "4.2.0"))).await;
    gcs.register_job("job-1", "cts-c").await;
    let r = record_with_facts("ck-1");
    let registered = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: r.clone(),
        })
        .await
        .unwrap();
    assert_eq!(registered.checkpoint.facts, r.facts, "the facts are kept");

    let v = verdicts(&gcs).await;
    let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
    // Compatible (by name), then unknown (no facts: an older CTS, cts-0 from setup_cts),
    // then incompatible.
    assert_eq!(
        names,
        ["cts-c", "cts-0", "cts-b", "cts-a", "cts-d"],
        "{v:#?}"
    );
    let of = |n: &str| &v.iter().find(|(m, _)| m == n).unwrap().1;
    assert_eq!(of("cts-c").verdict, Verdict::Compatible);
    assert!(
        of("cts-c")
            .notes
            .iter()
            .any(|n| n.contains("checked on the resource before the image is fetched")),
        "{:?}",
        of("cts-c")
    );
    assert_eq!(of("cts-b").verdict, Verdict::Unknown);
    assert_eq!(of("cts-a").verdict, Verdict::Incompatible);
    assert_eq!(
        of("cts-a").reasons,
        ["kernel 6.1.0 < 6.18.44-fc-v769 needed by the image's vDSO and system calls (taken on 6.18.44-fc-v769)"]
    );
    assert_eq!(of("cts-d").verdict, Verdict::Incompatible);
    assert!(
        of("cts-d").reasons[0].starts_with("CRIU 4.2.0 differs from 4.1.1, which took the image"),
        "{:?}",
        of("cts-d")
    );

    // The same over JSON, and in the resource property documents.
    let json: RecoveryInfo = gcs.json.get("/api/v1/jobs/job-1/recovery").await.unwrap();
    assert_eq!(json.candidates[0].instance.name, "cts-c");
    assert_eq!(
        json.candidates[4].compatibility.as_ref().unwrap().verdict,
        Verdict::Incompatible
    );
    assert_eq!(json.checkpoint.facts, r.facts);

    // A replica of a site that relaxes the kernel and CRIU rules accepts both.
    let relaxed = TestGcs::start_on(&gcs.database_url, |c| {
        c.compatibility.kernel = KernelRule::Any;
        c.compatibility.criu_version = CriuRule::SameMajor;
    })
    .await;
    let v = verdicts(&relaxed).await;
    let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["cts-a", "cts-c", "cts-d", "cts-0", "cts-b"],
        "{v:#?}"
    );
    assert!(v[0]
        .1
        .notes
        .iter()
        .any(|n| n.contains("accepted (compatibility.kernel = any)")));
}

#[tokio::test]
async fn facts_are_covered_by_the_signature_and_reported_again_on_registration() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-c", "node-c", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-c").await;
    // Facts changed after the CTS signed the record (say, to pass a compatibility check):
    // refused, nothing written.
    let mut forged = record_with_facts("ck-1");
    forged.facts.as_mut().unwrap().open_files.clear();
    let f = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint { checkpoint: forged })
        .await
        .unwrap_err();
    assert_eq!(f.code.as_deref(), Some("bad-signature"), "{f:?}");
    let mut stripped = record_with_facts("ck-1");
    stripped.facts = None;
    let f = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: stripped,
        })
        .await
        .unwrap_err();
    assert_eq!(f.code.as_deref(), Some("bad-signature"), "{f:?}");
    // A record without facts, signed as before facts existed, is still accepted.
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record("ck-0", "job-1", "cts-c"),
    })
    .await
    .unwrap();

    // A CTS that registers again with other facts (a kernel update) is updated.
    let mut i = instance("cts-c", "criu", "node-c", UNREACHABLE_CTS);
    i.facts = Some(resource("6.19.0", "4.1.1"));
    let r = gcs
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: i.clone(),
        })
        .await
        .unwrap();
    assert_eq!(r.outcome, Registration::Updated);
    assert_eq!(r.instance.facts, i.facts);
    let again = gcs
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance { instance: i })
        .await
        .unwrap();
    assert_eq!(again.outcome, Registration::Unchanged);
}
