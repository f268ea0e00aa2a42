//! Who may do what at the GCS: the one place authorization is decided (the matrix in
//! ARCHITECTURE.md is this file). The service calls [`authorize`] first in every operation,
//! then, where an operation acts on something a caller may or may not own, the object rules
//! below with the facts it loaded; handlers never decide.
//!
//! Refusals are `AccessDenied` faults (SOAP `gca:AccessDeniedFault`; JSON 401 without a
//! certificate, 403 with the wrong one) that name the identity seen and the role needed, and a
//! refused request writes nothing: every check runs before the operation's first write.

use chrono::{DateTime, Utc};
use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::identity::{Caller, Role};
use gca_protocol::messages::{CheckpointRecord, CtsInstance, Job, JobState};

use crate::error::{Error, Result};

/// Every operation the GCS serves, over SOAP and JSON, as the policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    DoCheckpoint,
    FindCts,
    GetCheckpoints,
    GetRecoveryInfo,
    GetJob,
    ListJobs,
    SetRetention,
    AuthorizeRecovery,
    RegisterClass,
    RegisterDescriptor,
    UnregisterCts,
    ListClasses,
    ListTypes,
    ListInstances,
    RegisterInstance,
    RegisterJob,
    RegisterCheckpoint,
    JobFinished,
    AbandonRecovery,
    /// A job's image key, for the object store (issue 12).
    GetJobKey,
    /// Where a checkpoint's image has got to in an object store (issue 12).
    SetImageLocation,
    /// WS-ResourceProperties on the GCS, a job, a checkpoint or a CTS instance.
    ReadProperties,
    /// WS-ResourceLifetime on a job: SetTerminationTime, Destroy.
    Lifetime,
    Subscribe,
    GetCurrentMessage,
    /// Renew, Unsubscribe and WS-RP on a subscription; JSON show and delete.
    ManageSubscription,
    ListSubscriptions,
}

use Role::{Admin, Broker, Cts, User};

impl Op {
    pub const ALL: [Op; 27] = [
        Op::DoCheckpoint,
        Op::FindCts,
        Op::GetCheckpoints,
        Op::GetRecoveryInfo,
        Op::GetJob,
        Op::ListJobs,
        Op::SetRetention,
        Op::AuthorizeRecovery,
        Op::RegisterClass,
        Op::RegisterDescriptor,
        Op::UnregisterCts,
        Op::ListClasses,
        Op::ListTypes,
        Op::ListInstances,
        Op::RegisterInstance,
        Op::RegisterJob,
        Op::RegisterCheckpoint,
        Op::JobFinished,
        Op::AbandonRecovery,
        Op::GetJobKey,
        Op::SetImageLocation,
        Op::ReadProperties,
        Op::Lifetime,
        Op::Subscribe,
        Op::GetCurrentMessage,
        Op::ManageSubscription,
        Op::ListSubscriptions,
    ];

    /// The GCA operation a SOAP body element names (its local name in `urn:gca:v1`).
    pub fn of_gca_element(name: &str) -> Option<Op> {
        Op::ALL
            .into_iter()
            .filter(|op| {
                !matches!(
                    op,
                    Op::ReadProperties
                        | Op::Lifetime
                        | Op::Subscribe
                        | Op::GetCurrentMessage
                        | Op::ManageSubscription
                        | Op::ListSubscriptions
                )
            })
            .find(|op| op.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::DoCheckpoint => "DoCheckpoint",
            Op::FindCts => "FindCTS",
            Op::GetCheckpoints => "GetCheckpoints",
            Op::GetRecoveryInfo => "GetRecoveryInfo",
            Op::GetJob => "GetJob",
            Op::ListJobs => "ListJobs",
            Op::SetRetention => "SetRetention",
            Op::AuthorizeRecovery => "AuthorizeRecovery",
            Op::RegisterClass => "RegisterCheckpointerClass",
            Op::RegisterDescriptor => "RegisterCTSDescriptor",
            Op::UnregisterCts => "UnregisterCTS",
            Op::ListClasses => "ListCheckpointerClasses",
            Op::ListTypes => "ListCTSTypes",
            Op::ListInstances => "ListCTSInstances",
            Op::RegisterInstance => "RegisterCTSInstance",
            Op::RegisterJob => "RegisterJob",
            Op::RegisterCheckpoint => "RegisterCheckpoint",
            Op::JobFinished => "JobFinished",
            Op::AbandonRecovery => "AbandonRecovery",
            Op::GetJobKey => "GetJobKey",
            Op::SetImageLocation => "SetImageLocation",
            Op::ReadProperties => "WS-ResourceProperties",
            Op::Lifetime => "WS-ResourceLifetime",
            Op::Subscribe => "Subscribe",
            Op::GetCurrentMessage => "GetCurrentMessage",
            Op::ManageSubscription => "a subscription's Renew/Unsubscribe/properties",
            Op::ListSubscriptions => "ListSubscriptions",
        }
    }

    /// The roles that may call the operation at all (object rules may narrow it further).
    pub fn roles(self) -> &'static [Role] {
        match self {
            Op::DoCheckpoint | Op::ListJobs | Op::AuthorizeRecovery | Op::ReadProperties => {
                &[Admin, Broker]
            }
            Op::FindCts | Op::ListClasses | Op::ListTypes => &[Admin, Broker, User],
            // A CTS reads records and recovery information for the recoveries it runs on
            // behalf of local job owners, and jobs to reconcile its own registry.
            Op::GetCheckpoints | Op::GetRecoveryInfo | Op::GetJob => &[Admin, Broker, Cts],
            Op::ListInstances => &[Admin, Broker],
            Op::SetRetention
            | Op::RegisterClass
            | Op::RegisterDescriptor
            | Op::UnregisterCts
            | Op::Lifetime => &[Admin],
            Op::RegisterInstance
            | Op::RegisterJob
            | Op::RegisterCheckpoint
            | Op::JobFinished
            | Op::AbandonRecovery
            | Op::GetJobKey
            | Op::SetImageLocation => &[Cts],
            Op::Subscribe
            | Op::GetCurrentMessage
            | Op::ManageSubscription
            | Op::ListSubscriptions => &[Admin, Broker],
        }
    }
}

fn roles_text(roles: &[Role]) -> String {
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    match names.as_slice() {
        [one] => format!("the role {one}"),
        _ => format!("one of the roles {}", names.join(", ")),
    }
}

/// The fault for a refused request.
pub fn denied(caller: &Caller, message: String) -> Error {
    Error::Fault(match caller {
        Caller::Anonymous => Fault::unauthenticated(message),
        _ => Fault::denied(message),
    })
}

/// May `caller` call `op` at all?
pub fn authorize(caller: &Caller, op: Op) -> Result<()> {
    let roles = op.roles();
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Identified(i) if roles.contains(&i.role) => Ok(()),
        Caller::Anonymous => Err(denied(
            caller,
            format!(
                "{} needs a client certificate with {} ({caller} was seen): present a certificate issued by the site CA (gcactl pki issue; GCA_CERT/GCA_KEY)",
                op.name(),
                roles_text(roles),
            ),
        )),
        _ => Err(denied(
            caller,
            format!(
                "{caller} may not call {}: it needs {}",
                op.name(),
                roles_text(roles)
            ),
        )),
    }
}

/// A CTS acts only as itself: `instance` is the CTS instance the request speaks for.
pub fn acting_as(caller: &Caller, op: Op, instance: &str) -> Result<()> {
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Identified(i) if i.is_cts(instance) => Ok(()),
        _ => Err(denied(
            caller,
            format!(
                "{caller} may not call {} for CTS instance {instance:?}: a CTS acts only as itself (cts:{instance})",
                op.name()
            ),
        )),
    }
}

/// A job's image key goes to the CTS the job is on only: the one running it, the one it was
/// stopped on for a migration, the one recovering it (a recovery registers there before it
/// fetches), or the one it ended on (whose retention tasks may still read its images); and,
/// while the retention policy has it delete images of the job it took
/// (`deleting_its_images`: a job recovered elsewhere since), to that CTS, which removes them
/// from the object store (sweeping the job's chunks takes the key). Not to an admin or a
/// broker: they never read images.
pub fn may_hold_job_key(caller: &Caller, job: &Job, deleting_its_images: bool) -> Result<()> {
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Identified(i) if i.is_cts(&job.cts_instance) => Ok(()),
        Caller::Identified(i) if i.role == Cts && deleting_its_images => Ok(()),
        _ => Err(denied(
            caller,
            format!(
                "{caller} may not have the image key of job {:?}: only the CTS the job is on (cts:{}) may, or one whose images of the job are being deleted",
                job.gid, job.cts_instance
            ),
        )),
    }
}

/// Where a record's image has got to is told by the CTS that registered the record (its
/// uploader) or the one the job is on now; no other CTS.
pub fn may_set_location(caller: &Caller, record: &CheckpointRecord, job: &Job) -> Result<()> {
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Identified(i) if i.is_cts(&record.cts_name) || i.is_cts(&job.cts_instance) => {
            Ok(())
        }
        _ => Err(denied(
            caller,
            format!(
                "{caller} may not set the locations of checkpoint {:?} of job {:?}: only the CTS that registered it (cts:{}) or the one the job is on (cts:{}) may",
                record.id, job.gid, record.cts_name, job.cts_instance
            ),
        )),
    }
}

/// The owner recorded for a subscription: who created it.
pub fn subscription_owner(caller: &Caller) -> Option<String> {
    caller.identity().map(|i| i.to_string())
}

/// A broker lists, renews and removes only the subscriptions it created; an admin all.
pub fn may_manage_subscription(caller: &Caller, owner: Option<&str>) -> Result<()> {
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Identified(i) if i.role == Admin => Ok(()),
        Caller::Identified(i) if owner == Some(i.to_string().as_str()) => Ok(()),
        _ => Err(denied(
            caller,
            format!(
                "{caller} may not manage this subscription: it belongs to {}",
                owner.unwrap_or("nobody (created without an identity)")
            ),
        )),
    }
}

/// Whether a listing of subscriptions is limited to the caller's own: `Some(owner)` for a
/// broker, `None` (all) for an admin or in insecure mode.
pub fn subscription_filter(caller: &Caller) -> Option<String> {
    match caller {
        Caller::Identified(i) if i.role != Admin => Some(i.to_string()),
        Caller::Identified(_) | Caller::Insecure => None,
        // Nobody else gets this far (authorize refused them); list nothing.
        _ => Some(String::new()),
    }
}

/// What the GCS knows about a job a CTS asks to recover (`RegisterJob` with `Recovery`).
pub struct RecoveryFacts<'a> {
    pub job: &'a Job,
    pub destroyed: bool,
    /// The CTS the job is routed to now, if it is still registered, and when it was last
    /// heard from.
    pub current_last_seen: Option<DateTime<Utc>>,
    /// A CTS not heard from for this long is lost.
    pub lost_after: chrono::Duration,
    /// A broker asked at the GCS (AuthorizeRecovery) for this job to be recovered on the
    /// requesting CTS.
    pub granted: bool,
    pub now: DateTime<Utc>,
}

/// A recovery moves a GID only when the job is not running elsewhere (it failed, was stopped
/// for migration, or its CTS is lost), or when a broker asked for that recovery at the GCS:
/// a running job is never taken over by a local registration.
pub fn may_move_job(caller: &Caller, to: &CtsInstance, f: &RecoveryFacts<'_>) -> Result<()> {
    let job = f.job;
    if f.destroyed {
        return Err(Error::Fault(
            Fault::resource_unknown(format!(
                "job {:?} was destroyed; it cannot be recovered",
                job.gid
            ))
            .with_code("job-destroyed"),
        ));
    }
    if job.cts_instance == to.name || f.granted || caller.is_insecure() {
        return Ok(());
    }
    let failed =
        job.state == JobState::Finished && (job.exit_status != Some(0) || job.signal.is_some());
    let lost = match f.current_last_seen {
        None => true,
        Some(seen) => f.now - seen > f.lost_after,
    };
    if failed || job.state == JobState::Stopped || lost {
        return Ok(());
    }
    let why = match job.state {
        JobState::Running => "runs",
        JobState::Recovering => "is being recovered",
        JobState::Finished => "finished successfully",
        JobState::Stopped => "was stopped",
    };
    Err(Error::Fault(
        Fault::new(
            FaultKind::AccessDenied,
            format!(
                "job {:?} {why} on CTS {:?}, which was heard from {} s ago; CTS {:?} may recover it only when it failed, was stopped for migration or its CTS is lost, or after a broker's AuthorizeRecovery at the GCS",
                job.gid,
                job.cts_instance,
                f.current_last_seen
                    .map(|s| (f.now - s).num_seconds().max(0))
                    .unwrap_or_default(),
                to.name
            ),
        )
        .with_code("recovery-not-authorized"),
    ))
}

/// What a CTS may register as a checkpoint record: one of a job it is or was in charge of,
/// with its own name and type, an image under its own registered URL, and a digest.
pub fn may_register_record(
    caller: &Caller,
    record: &CheckpointRecord,
    job: &Job,
    instance: &CtsInstance,
    took_earlier_checkpoints: bool,
) -> Result<()> {
    acting_as(caller, Op::RegisterCheckpoint, &record.cts_name)?;
    if caller.is_insecure() {
        return Ok(());
    }
    // A refusal of the record, not of the caller (code `record-refused`): a CTS sets such a
    // record aside instead of retrying it.
    let refuse = |why: String| {
        Err(Error::Fault(
            Fault::new(
                FaultKind::AccessDenied,
                format!(
                    "{caller} may not register checkpoint {:?} of job {:?}: {why}",
                    record.id, record.gid
                ),
            )
            .with_code(gca_protocol::fault::RECORD_REFUSED),
        ))
    };
    if job.cts_instance != record.cts_name && !took_earlier_checkpoints {
        return refuse(format!(
            "the job is in charge of CTS {:?}, not {:?}",
            job.cts_instance, record.cts_name
        ));
    }
    if record.cts_type != instance.cts_type || record.cts_type != job.cts_type {
        return refuse(format!(
            "the record says type {:?}; the CTS is of type {:?} and the job of {:?}",
            record.cts_type, instance.cts_type, job.cts_type
        ));
    }
    if !same_origin(&record.image_name, &instance.url) {
        return refuse(format!(
            "its image {:?} is not served by the CTS's registered address {:?}",
            record.image_name, instance.url
        ));
    }
    if record.digest.is_none() {
        return refuse("a record needs the image's digest".into());
    }
    Ok(())
}

/// Same scheme, host and port.
fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => {
            a.scheme() == b.scheme()
                && a.host_str() == b.host_str()
                && a.port_or_known_default() == b.port_or_known_default()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gca_protocol::identity::Identity;

    fn who(s: &str) -> Caller {
        Caller::Identified(s.parse::<Identity>().unwrap())
    }

    #[test]
    fn the_matrix_refuses_with_the_identity_and_the_role_needed() {
        assert!(authorize(&who("broker:b"), Op::DoCheckpoint).is_ok());
        assert!(authorize(&Caller::Insecure, Op::RegisterClass).is_ok());
        let f = authorize(&who("broker:b"), Op::RegisterCheckpoint)
            .unwrap_err()
            .into_fault();
        assert_eq!(f.kind, FaultKind::AccessDenied);
        assert!(f.message.contains("broker:b"), "{}", f.message);
        assert!(f.message.contains("the role cts"), "{}", f.message);
        let f = authorize(&Caller::Anonymous, Op::FindCts)
            .unwrap_err()
            .into_fault();
        assert_eq!(f.code.as_deref(), Some("unauthenticated"));
        assert_eq!(f.http_status(), 401);
        // Nobody but a CTS registers records; a GCS identity calls no GCS operation.
        for op in Op::ALL {
            assert!(authorize(&who("gcs:main"), op).is_err(), "{op:?}");
        }
        assert!(acting_as(&who("cts:a"), Op::RegisterJob, "a").is_ok());
        assert!(acting_as(&who("cts:a"), Op::RegisterJob, "b").is_err());
    }

    #[test]
    fn subscriptions_belong_to_their_creator() {
        assert!(may_manage_subscription(&who("broker:b"), Some("broker:b")).is_ok());
        assert!(may_manage_subscription(&who("broker:c"), Some("broker:b")).is_err());
        assert!(may_manage_subscription(&who("admin:x"), Some("broker:b")).is_ok());
        assert_eq!(
            subscription_filter(&who("broker:b")).as_deref(),
            Some("broker:b")
        );
        assert_eq!(subscription_filter(&who("admin:x")), None);
    }
}
