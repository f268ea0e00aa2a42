//! Two GCS processes on one database serve the same data: no registry state lives in memory.

use std::collections::BTreeSet;

use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::*;

#[tokio::test]
async fn two_replicas_share_routing_bookkeeping_and_numbering() {
    let a = TestGcs::start().await;
    let b = TestGcs::start_on(&a.database_url, |_| {}).await;
    let cts = FakeCts::start("cts-a").await;
    // The CTS registers its checkpoints at replica B while the broker talks to replica A.
    cts.set(|x| x.register_at_gcs = Some(b.endpoint()));
    a.setup_cts("cts-a", "node-a", &cts.url).await;
    b.register_job("job-1", "cts-a").await;

    let via_a = a
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-1".into(),
            stop: false,
        })
        .await
        .unwrap();
    let via_b = b
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-1".into(),
            stop: false,
        })
        .await
        .unwrap();
    assert_eq!((via_a.sequence, via_b.sequence), (Some(1), Some(2)));
    let from_b = b
        .call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of("job-1"))
        .await
        .unwrap();
    let from_a = a
        .call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of("job-1"))
        .await
        .unwrap();
    assert_eq!(from_a, from_b);

    // Concurrent registrations split across both replicas still number 1..n without gaps.
    let template = &via_a;
    let calls = (0..30).map(|i| {
        let soap = if i % 2 == 0 {
            a.soap_as(&pki::cts("cts-a"))
        } else {
            b.soap_as(&pki::cts("cts-a"))
        };
        async move {
            let mut r = template.clone();
            r.id = format!("ck-{i}");
            r.sequence = None;
            r.registered_at = None;
            r.image_name = format!("{}/ck-{i}", r.image_name.rsplit_once('/').unwrap().0);
            let r = signed(r);
            soap.call::<RegisterCheckpointOp>(&RegisterCheckpoint { checkpoint: r })
                .await
                .unwrap()
                .checkpoint
                .sequence
                .unwrap()
        }
    });
    let seqs: BTreeSet<i64> = futures::future::join_all(calls).await.into_iter().collect();
    assert_eq!(seqs, (3..=32).collect::<BTreeSet<_>>());

    // A replica restart loses nothing.
    b.shutdown().await;
    let b2 = TestGcs::start_on(&a.database_url, |_| {}).await;
    let job = b2
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(job.checkpoint_count, 32);
    assert_eq!(job.cts_instance, "cts-a");
}
