//! The operation table: every GCS and CTS operation, with its request and response types.
//!
//! The SOAP dispatcher, the JSON routes, the WSDL and the clients all derive from these
//! names, so an operation is added in one place.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::messages::*;
use crate::ns;

pub trait Operation {
    /// The operation name: the request element's local name, and the WSDL operation.
    const NAME: &'static str;
    const PORT_TYPE: &'static str;
    type Request: XmlContent + Serialize + DeserializeOwned + Send + Sync + 'static;
    type Response: XmlContent + Serialize + DeserializeOwned + Send + Sync + 'static;

    fn request_action() -> String {
        ns::request_action(Self::PORT_TYPE, Self::NAME)
    }
    fn response_action() -> String {
        ns::response_action(Self::PORT_TYPE, Self::NAME)
    }
    fn response_element() -> String {
        format!("{}Response", Self::NAME)
    }
}

macro_rules! operations {
    ($port:expr; $($(#[$doc:meta])* $t:ident = $name:literal : $req:ty => $resp:ty;)*) => {
        $(
            $(#[$doc])*
            pub struct $t;
            impl Operation for $t {
                const NAME: &'static str = $name;
                const PORT_TYPE: &'static str = $port;
                type Request = $req;
                type Response = $resp;
            }
        )*
    };
}

/// Names of every GCS operation, in WSDL order.
pub const GCS_OPERATIONS: &[&str] = &[
    "DoCheckpoint",
    "FindCTS",
    "GetCheckpoints",
    "GetRecoveryInfo",
    "AuthorizeRecovery",
    "GetJob",
    "ListJobs",
    "SetRetention",
    "RegisterCheckpointerClass",
    "RegisterCTSDescriptor",
    "UnregisterCTS",
    "ListCheckpointerClasses",
    "ListCTSTypes",
    "ListCTSInstances",
    "RegisterCTSInstance",
    "RegisterJob",
    "RegisterCheckpoint",
    "JobFinished",
    "AbandonRecovery",
    "GetJobKey",
    "SetImageLocation",
];

operations! { ns::GCS_PORT_TYPE;
    // broker
    /// Checkpoint a job: routed to the CTS in charge of the GID (paper 5.2).
    DoCheckpointOp = "DoCheckpoint": DoCheckpoint => CheckpointRecord;
    /// Find CTS instances by type, class, core service, resource and properties (paper 5.1 step 1).
    FindCtsOp = "FindCTS": FindCts => FindCtsResponse;
    /// One page of a job's checkpoint records (follow `Next`).
    GetCheckpointsOp = "GetCheckpoints": GetCheckpoints => CheckpointList;
    /// What a broker needs to recover a job from an image (paper 5.3 steps 2-5).
    GetRecoveryInfoOp = "GetRecoveryInfo": GetRecoveryInfo => RecoveryInfo;
    /// Let a CTS take a job over by a recovery while it may still run elsewhere.
    AuthorizeRecoveryOp = "AuthorizeRecovery": AuthorizeRecovery => RecoveryAuthorized;
    GetJobOp = "GetJob": GidRequest => JobInfo;
    ListJobsOp = "ListJobs": ListJobs => JobList;
    /// What is kept of a job's images when it ends (XtreemOS: deleted unless the owner asks).
    SetRetentionOp = "SetRetention": SetRetention => JobInfo;
    // admin
    RegisterClassOp = "RegisterCheckpointerClass": RegisterCheckpointerClass => ClassRegistered;
    RegisterDescriptorOp = "RegisterCTSDescriptor": RegisterCtsDescriptor => DescriptorRegistered;
    UnregisterCtsOp = "UnregisterCTS": UnregisterCts => Unregistered;
    ListClassesOp = "ListCheckpointerClasses": ListRequest => ClassList;
    ListCtsTypesOp = "ListCTSTypes": ListRequest => CtsTypeList;
    ListCtsInstancesOp = "ListCTSInstances": ListRequest => CtsInstanceList;
    // CTS-facing
    RegisterCtsInstanceOp = "RegisterCTSInstance": RegisterCtsInstance => InstanceRegistered;
    RegisterJobOp = "RegisterJob": RegisterJob => JobRegistered;
    RegisterCheckpointOp = "RegisterCheckpoint": RegisterCheckpoint => CheckpointRegistered;
    JobFinishedOp = "JobFinished": JobFinished => JobInfo;
    /// A CTS gives up a recovery it registered: the job goes back to how it was.
    AbandonRecoveryOp = "AbandonRecovery": AbandonRecovery => JobInfo;
    /// The key a job's image chunks are encrypted with in an object store (issue 12).
    GetJobKeyOp = "GetJobKey": GetJobKey => JobKey;
    /// Where an image has got to: an `async` upload to the object store finished or gave up.
    SetImageLocationOp = "SetImageLocation": SetImageLocation => CheckpointRecord;
}

/// Names of every CTS operation, in WSDL order.
pub const CTS_OPERATIONS: &[&str] = &["DoCheckpoint"];

operations! { ns::CTS_PORT_TYPE;
    /// The GCS forwarding doCheckpoint to the CTS in charge of the job (paper 5.2 step 4).
    CtsDoCheckpointOp = "DoCheckpoint": DoCheckpoint => CheckpointRecord;
}
