//! Classes, CTS descriptors, instances and jobs: registration, idempotence, conflicts.

use gca_protocol::fault::FaultKind;
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::*;

fn class(name: &str, props: &[(&str, &str)]) -> CheckpointerClass {
    CheckpointerClass {
        name: name.into(),
        description: Some(format!("{name} class")),
        properties: props.iter().map(|(k, v)| Property::new(*k, *v)).collect(),
        builtin: false,
    }
}

#[tokio::test]
async fn basic_class_exists_after_migration() {
    let gcs = TestGcs::start().await;
    let classes = gcs
        .call::<ListClassesOp>(ListRequest {})
        .await
        .unwrap()
        .classes;
    let basic = classes
        .iter()
        .find(|c| c.name == "basic")
        .expect("built-in basic class");
    assert!(basic.builtin);
    for key in ["processes", "threads", "io", "network", "ipc"] {
        assert!(
            basic.properties.iter().any(|p| p.name == key),
            "basic lacks {key}"
        );
    }
    let err = gcs
        .call::<RegisterClassOp>(RegisterCheckpointerClass {
            class: class("basic", &[]),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert!(err.message.contains("built-in"), "{}", err.message);
}

#[tokio::test]
async fn class_registration_is_idempotent_and_conflicts_when_different() {
    let gcs = TestGcs::start().await;
    let c = class("migratable", &[("recover-on-other-resource", "true")]);
    let first = gcs
        .call::<RegisterClassOp>(RegisterCheckpointerClass { class: c.clone() })
        .await
        .unwrap();
    assert_eq!(first.outcome, Registration::Created);
    let again = gcs
        .call::<RegisterClassOp>(RegisterCheckpointerClass { class: c.clone() })
        .await
        .unwrap();
    assert_eq!(again.outcome, Registration::Unchanged);
    let different = class("migratable", &[("recover-on-other-resource", "false")]);
    let err = gcs
        .call::<RegisterClassOp>(RegisterCheckpointerClass { class: different })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    let listed = gcs
        .call::<ListClassesOp>(ListRequest {})
        .await
        .unwrap()
        .classes;
    let stored = listed.iter().find(|x| x.name == "migratable").unwrap();
    assert_eq!(
        stored.properties, c.properties,
        "a refused registration changes nothing"
    );
}

#[tokio::test]
async fn descriptor_registration_checks_classes_and_membership() {
    let gcs = TestGcs::start().await;
    let created = gcs
        .call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
            descriptor_xml: CRIU_DESCRIPTOR.into(),
        })
        .await
        .unwrap();
    assert_eq!(created.outcome, Registration::Created);
    assert_eq!(created.cts_type.name, "criu");
    assert_eq!(created.cts_type.classes, vec!["basic".to_string()]);
    let again = gcs
        .call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
            descriptor_xml: CRIU_DESCRIPTOR.into(),
        })
        .await
        .unwrap();
    assert_eq!(again.outcome, Registration::Unchanged);

    let changed = CRIU_DESCRIPTOR.replace("<Version>4.1</Version>", "<Version>4.2</Version>");
    let err = gcs
        .call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
            descriptor_xml: changed,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict, "{}", err.message);

    // A class the type does not satisfy: membership refused, nothing registered.
    gcs.call::<RegisterClassOp>(RegisterCheckpointerClass {
        class: class("networked", &[("network", "tcp")]),
    })
    .await
    .unwrap();
    let app = APP_DESCRIPTOR.replace(
        "<CheckpointerClass>basic</CheckpointerClass>",
        "<CheckpointerClass>basic</CheckpointerClass><CheckpointerClass>networked</CheckpointerClass>",
    );
    let err = gcs
        .call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
            descriptor_xml: app,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidDescriptor);
    assert!(
        err.message.contains("network=tcp") && err.message.contains("none"),
        "{}",
        err.message
    );
    let unknown = APP_DESCRIPTOR.replace(
        "<CheckpointerClass>basic</CheckpointerClass>",
        "<CheckpointerClass>nosuch</CheckpointerClass>",
    );
    let err = gcs
        .call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
            descriptor_xml: unknown,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidDescriptor);
    assert!(err.message.contains("nosuch"));
    let types = gcs
        .call::<ListCtsTypesOp>(ListRequest {})
        .await
        .unwrap()
        .types;
    assert_eq!(types.len(), 1, "only the valid descriptor is registered");
}

#[tokio::test]
async fn invalid_descriptor_names_the_line_over_soap_and_json() {
    let gcs = TestGcs::start().await;
    let bad = CRIU_DESCRIPTOR.replace("{CTS_URL}", "{CTS_ULR}");
    let line = bad.lines().position(|l| l.contains("{CTS_ULR}")).unwrap() + 1;
    let err = gcs
        .call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
            descriptor_xml: bad.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidDescriptor);
    assert!(err.message.contains("{CTS_ULR}"), "{}", err.message);
    // JSON carries the document as text, so the line is the document's own.
    let resp = http()
        .post(format!("{}/api/v1/cts-types", gcs.url))
        .header("content-type", "application/xml")
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: serde_json::Value = resp.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("line {line}")), "{msg}");
    assert_eq!(body["error"]["kind"], "InvalidDescriptor");
}

#[tokio::test]
async fn instances_register_idempotently_and_update_their_address() {
    let gcs = TestGcs::start().await;
    let i = gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    assert!(i.registered_at.is_some() && i.last_seen.is_some());
    let same = gcs
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance("cts-a", "criu", "node-a", UNREACHABLE_CTS),
        })
        .await
        .unwrap();
    assert_eq!(same.outcome, Registration::Unchanged);
    assert!(same.instance.last_seen >= i.last_seen);
    let moved = gcs
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance("cts-a", "criu", "node-a", "http://127.0.0.1:2/cts"),
        })
        .await
        .unwrap();
    assert_eq!(moved.outcome, Registration::Updated);
    assert_eq!(moved.instance.url, "http://127.0.0.1:2/cts");
    gcs.call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
        descriptor_xml: APP_DESCRIPTOR.into(),
    })
    .await
    .unwrap();
    let err = gcs
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance("cts-a", "app-level", "node-a", "http://127.0.0.1:2/cts"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    let err = gcs
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance("cts-b", "nosuch", "node-b", "http://127.0.0.1:2/cts"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
    let err = gcs
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance("cts-b", "criu", "node-b", "not a url"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidMessage);
}

#[tokio::test]
async fn find_cts_matches_every_criterion() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", "http://127.0.0.1:2/cts"),
    })
    .await
    .unwrap();
    gcs.call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
        descriptor_xml: APP_DESCRIPTOR.into(),
    })
    .await
    .unwrap();
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("app-a", "app-level", "node-a", "http://127.0.0.1:3/cts"),
    })
    .await
    .unwrap();
    let names = |r: FindCtsResponse| {
        let mut v: Vec<String> = r.offers.into_iter().map(|o| o.instance.name).collect();
        v.sort();
        v
    };
    let all = gcs.call::<FindCtsOp>(FindCts::default()).await.unwrap();
    assert_eq!(names(all), ["app-a", "cts-a", "cts-b"]);
    let by_class = gcs
        .call::<FindCtsOp>(FindCts {
            class: Some("basic".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_class.offers.len(), 3);
    let by_core = gcs
        .call::<FindCtsOp>(FindCts {
            core_service: Some("CRIU".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let offer = by_core
        .offers
        .iter()
        .find(|o| o.instance.name == "cts-a")
        .unwrap();
    assert_eq!(offer.execute_wrapper.name, "gca-exec");
    assert!(offer
        .execute_wrapper
        .parameters
        .contains(&"{GID}".to_string()));
    assert_eq!(names(by_core), ["cts-a", "cts-b"]);
    let by_props = gcs
        .call::<FindCtsOp>(FindCts {
            properties: vec![
                Property::new("level", "application"),
                Property::new("recover-on-other-resource", "true"),
            ],
            resource: Some("node-a".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(names(by_props), ["app-a"]);
    let by_type = gcs
        .call::<FindCtsOp>(FindCts {
            cts_type: Some("criu".into()),
            resource: Some("node-b".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(names(by_type), ["cts-b"]);
    let none = gcs
        .call::<FindCtsOp>(FindCts {
            class: Some("nosuch".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.offers.is_empty());
    sqlx::query(
        "update cts_instances set last_seen = now() - interval '1 hour' where name = 'cts-b'",
    )
    .execute(&gcs.pool)
    .await
    .unwrap();
    let alive = gcs
        .call::<FindCtsOp>(FindCts {
            alive_within_secs: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(names(alive), ["app-a", "cts-a"]);
}

#[tokio::test]
async fn unregistering_refuses_what_is_still_in_use() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    let err = gcs
        .call::<UnregisterCtsOp>(UnregisterCts {
            cts_type: Some("criu".into()),
            instance: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict, "{}", err.message);
    let err = gcs
        .call::<UnregisterCtsOp>(UnregisterCts {
            instance: Some("cts-a".into()),
            cts_type: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict, "{}", err.message);
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-1".into(),
        cts_instance: "cts-a".into(),
        exit_status: Some(0),
        signal: None,
    })
    .await
    .unwrap();
    gcs.call::<UnregisterCtsOp>(UnregisterCts {
        instance: Some("cts-a".into()),
        cts_type: None,
    })
    .await
    .unwrap();
    gcs.call::<UnregisterCtsOp>(UnregisterCts {
        cts_type: Some("criu".into()),
        instance: None,
    })
    .await
    .unwrap();
    assert!(gcs
        .call::<ListCtsTypesOp>(ListRequest {})
        .await
        .unwrap()
        .types
        .is_empty());
    let err = gcs
        .call::<UnregisterCtsOp>(UnregisterCts {
            cts_type: Some("criu".into()),
            instance: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
    let err = gcs
        .call::<UnregisterCtsOp>(UnregisterCts::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidMessage);
}

/// Waits until a backend of this database runs a statement starting with `sql` and waits for
/// a lock; false if that does not happen within a few seconds.
async fn backend_waits_in(pool: &sqlx::PgPool, sql: &str) -> bool {
    for _ in 0..100 {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'
               and query ilike $1",
        )
        .bind(format!("{sql}%"))
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// UnregisterCTS against a RegisterJob in flight for the same instance, interleaved on the
/// real database: the registration is held inside its transaction (a test transaction holds
/// an uncommitted row of the same GID, so its insert waits), the unregistration starts, then
/// the registration goes on. The job must not end up routed to a deleted instance: the
/// unregistration waits for the registration and then sees its job.
#[tokio::test]
async fn unregistering_a_cts_waits_for_a_job_being_routed_to_it() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let mut blocker = gcs.pool.begin().await.unwrap();
    sqlx::query(
        "insert into jobs (gid, cts_instance, cts_type, state) values ('job-race', 'cts-a', 'criu', 'running')",
    )
    .execute(&mut *blocker)
    .await
    .unwrap();

    let soap = gcs.soap_as(&pki::cts("cts-a"));
    let register = tokio::spawn(async move {
        soap.call::<RegisterJobOp>(&RegisterJob {
            gid: "job-race".into(),
            cts_instance: "cts-a".into(),
            local_id: Some("4242".into()),
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: None,
        })
        .await
    });
    assert!(
        backend_waits_in(&gcs.pool, "insert into jobs").await,
        "RegisterJob did not reach its insert"
    );

    let admin = gcs.soap_as(pki::ADMIN);
    let mut unregister = tokio::spawn(async move {
        admin
            .call::<UnregisterCtsOp>(&UnregisterCts {
                instance: Some("cts-a".into()),
                cts_type: None,
            })
            .await
    });
    // The unregistration must wait for the registration's transaction (it would have
    // answered by now, deleting the instance, if it had counted the jobs before the delete).
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut unregister).await;
    assert!(
        early.is_err(),
        "UnregisterCTS answered while a registration to the instance was in flight: {:?}",
        early.map(|r| r.unwrap())
    );
    assert!(
        backend_waits_in(&gcs.pool, "delete from cts_instances").await,
        "UnregisterCTS does not wait on the instance row"
    );

    blocker.rollback().await.unwrap();
    let registered = register.await.unwrap().expect("RegisterJob");
    assert_eq!(registered.outcome, Registration::Created);
    let err = unregister.await.unwrap().unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict, "{}", err.message);
    assert!(err.message.contains("1 running job"), "{}", err.message);
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-race".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(job.cts_instance, "cts-a");
    let instances = gcs
        .call::<ListCtsInstancesOp>(ListRequest {})
        .await
        .unwrap()
        .instances;
    assert!(
        instances.iter().any(|i| i.name == "cts-a"),
        "the instance in charge of job-race was deleted"
    );

    // The other order: once the instance is gone, a registration to it is refused.
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-race".into(),
        cts_instance: "cts-a".into(),
        exit_status: Some(0),
        signal: None,
    })
    .await
    .unwrap();
    gcs.call::<UnregisterCtsOp>(UnregisterCts {
        instance: Some("cts-a".into()),
        cts_type: None,
    })
    .await
    .unwrap();
    let err = gcs
        .call::<RegisterJobOp>(RegisterJob {
            gid: "job-late".into(),
            cts_instance: "cts-a".into(),
            local_id: None,
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown, "{}", err.message);
}

#[tokio::test]
async fn jobs_register_move_on_recovery_and_finish() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", "http://127.0.0.1:2/cts"),
    })
    .await
    .unwrap();
    let job = gcs.register_job("job-1", "cts-a").await;
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.cts_type, "criu");
    let reg = |cts: &str, local: &str, recovery: bool, state: Option<JobState>| RegisterJob {
        gid: "job-1".into(),
        cts_instance: cts.into(),
        local_id: Some(local.into()),
        recovery,
        from_checkpoint: None,
        state,
        retention: None,
    };
    let same = gcs
        .call::<RegisterJobOp>(reg("cts-a", "4242", false, None))
        .await
        .unwrap();
    assert_eq!(same.outcome, Registration::Unchanged);
    let err = gcs
        .call::<RegisterJobOp>(reg("cts-b", "99", false, None))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert!(err.message.contains("Recovery=true"), "{}", err.message);

    // A running job is not taken over by a recovery registration of another CTS...
    let err = gcs
        .call::<RegisterJobOp>(reg("cts-b", "", true, Some(JobState::Recovering)))
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind, err.code.as_deref()),
        (FaultKind::AccessDenied, Some("recovery-not-authorized"))
    );
    assert_eq!(
        integration_tests::cts::gcs_job(&gcs, "job-1")
            .await
            .cts_instance,
        "cts-a"
    );
    // ...unless a broker asked for it.
    gcs.authorize_recovery("job-1", "cts-b").await;

    // Recovery on B: recovering, then running; counted once.
    let r = gcs
        .call::<RegisterJobOp>(reg("cts-b", "", true, Some(JobState::Recovering)))
        .await
        .unwrap();
    assert_eq!(r.job.state, JobState::Recovering);
    assert_eq!(r.job.cts_instance, "cts-b");
    let r = gcs
        .call::<RegisterJobOp>(reg("cts-b", "777", true, None))
        .await
        .unwrap();
    assert_eq!(
        (r.job.state, r.job.recoveries, r.job.local_id.as_deref()),
        (JobState::Running, 1, Some("777"))
    );
    let again = gcs
        .call::<RegisterJobOp>(reg("cts-b", "777", true, None))
        .await
        .unwrap();
    assert_eq!(again.outcome, Registration::Unchanged);
    assert_eq!(again.job.recoveries, 1);

    // The old CTS reporting the original process's exit must not finish the moved job.
    let err = gcs
        .call::<JobFinishedOp>(JobFinished {
            gid: "job-1".into(),
            cts_instance: "cts-a".into(),
            exit_status: None,
            signal: Some(9),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    let done = gcs
        .call::<JobFinishedOp>(JobFinished {
            gid: "job-1".into(),
            cts_instance: "cts-b".into(),
            exit_status: Some(3),
            signal: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (done.job.state, done.job.exit_status),
        (JobState::Finished, Some(3))
    );

    let err = gcs
        .call::<RegisterJobOp>(RegisterJob {
            gid: "nope".into(),
            ..reg("cts-b", "1", true, None)
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
    let err = gcs
        .call::<RegisterJobOp>(reg("cts-zzz", "1", false, None))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);

    let listed = gcs
        .call::<ListJobsOp>(ListJobs {
            state: Some(JobState::Finished),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.jobs.len(), 1);
    let running = gcs
        .call::<ListJobsOp>(ListJobs {
            state: Some(JobState::Running),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(running.jobs.is_empty());
}

#[tokio::test]
async fn list_jobs_pages_by_gid() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    for i in 0..7 {
        gcs.register_job(&format!("job-{i}"), "cts-a").await;
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = gcs
            .call::<ListJobsOp>(ListJobs {
                after: after.clone(),
                limit: Some(3),
                ..Default::default()
            })
            .await
            .unwrap();
        if page.jobs.is_empty() {
            break;
        }
        after = page.jobs.last().map(|j| j.gid.clone());
        seen.extend(page.jobs.into_iter().map(|j| j.gid));
    }
    assert_eq!(seen, (0..7).map(|i| format!("job-{i}")).collect::<Vec<_>>());
    let err = gcs
        .call::<ListJobsOp>(ListJobs {
            limit: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidMessage);
}
