//! The messages GCA components exchange, in one Rust form with two wire forms: JSON (serde) and
//! XML in the `urn:gca:v1` namespace (the [`XmlContent`] impls, matching `schemas/gca.xsd`).
//!
//! Every operation is a pair of types tied together by an [`Operation`] impl in
//! [`crate::ops`]; the request element is named after the operation and the response element
//! is `{Operation}Response`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::ns::GCA;
use crate::xml::{Element, XmlError};

/// Content of a GCA element: how to write its children and read them back.
pub trait XmlContent: Sized {
    fn write_children(&self, el: &mut Element);
    fn read_children(el: &Element) -> Result<Self, XmlError>;

    /// This value as an element `gca:{name}`.
    fn to_element(&self, name: &str) -> Element {
        let mut el = Element::new(GCA, name);
        self.write_children(&mut el);
        el
    }
}

pub fn fmt_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_time(el: &Element, name: &str) -> Result<Option<DateTime<Utc>>, XmlError> {
    match el.child(GCA, name) {
        None => Ok(None),
        Some(c) => {
            let t = c.text();
            DateTime::parse_from_rfc3339(t.trim())
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|e| c.error(format!("<{name}> is not an xsd:dateTime ({e}): {t:?}")))
        }
    }
}

fn req_time(el: &Element, name: &str) -> Result<DateTime<Utc>, XmlError> {
    parse_time(el, name)?.ok_or_else(|| {
        el.error(format!(
            "<{}> is missing the required element <{name}>",
            el.name
        ))
    })
}

pub(crate) fn texts(el: &Element, name: &str) -> Vec<String> {
    el.children_named(GCA, name)
        .map(|c| c.text().trim().to_string())
        .collect()
}

pub(crate) fn push_texts(el: &mut Element, name: &str, values: &[String]) {
    for v in values {
        el.push_text_child(GCA, name, v.clone());
    }
}

pub(crate) fn push_opt(el: &mut Element, name: &str, v: &Option<impl ToString>) {
    if let Some(v) = v {
        el.push_text_child(GCA, name, v.to_string());
    }
}

pub(crate) fn push(el: &mut Element, name: &str, v: impl ToString) {
    el.push_text_child(GCA, name, v.to_string());
}

pub(crate) fn list<T: XmlContent>(el: &Element, name: &str) -> Result<Vec<T>, XmlError> {
    el.children_named(GCA, name).map(T::read_children).collect()
}

pub(crate) fn push_list<T: XmlContent>(el: &mut Element, name: &str, items: &[T]) {
    for i in items {
        el.push_child(i.to_element(name));
    }
}

pub(crate) fn req_child<'a>(el: &'a Element, name: &str) -> Result<&'a Element, XmlError> {
    el.child(GCA, name).ok_or_else(|| {
        el.error(format!(
            "<{}> is missing the required element <{name}>",
            el.name
        ))
    })
}

pub(crate) fn opt_child<T: XmlContent>(el: &Element, name: &str) -> Result<Option<T>, XmlError> {
    el.child(GCA, name).map(T::read_children).transpose()
}

fn bool_or(el: &Element, name: &str, default: bool) -> Result<bool, XmlError> {
    Ok(el.opt_bool(GCA, name)?.unwrap_or(default))
}

// ---------------------------------------------------------------------------------------------
// Shared value types

/// A key/value property (functional properties of a core service, class requirements).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Property {
    pub name: String,
    pub value: String,
}

impl Property {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

impl XmlContent for Property {
    fn write_children(&self, el: &mut Element) {
        push(el, "Name", &self.name);
        push(el, "Value", &self.value);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            name: el.req_text(GCA, "Name")?,
            value: el
                .child(GCA, "Value")
                .map(|v| v.text().trim().to_string())
                .unwrap_or_default(),
        })
    }
}

/// A checkpointer class (paper 5.4): the properties every member must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointerClass {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub properties: Vec<Property>,
    /// Defined by the GCS itself (`basic`); cannot be changed.
    #[serde(default)]
    pub builtin: bool,
}

impl XmlContent for CheckpointerClass {
    fn write_children(&self, el: &mut Element) {
        push(el, "Name", &self.name);
        push_opt(el, "Description", &self.description);
        push_list(el, "Property", &self.properties);
        push(el, "BuiltIn", self.builtin);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            name: el.req_text(GCA, "Name")?,
            description: el.opt_text(GCA, "Description"),
            properties: list(el, "Property")?,
            builtin: bool_or(el, "BuiltIn", false)?,
        })
    }
}

/// An auxiliary wrapper (paper 3.4): its name and its parameters, which may hold placeholders.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WrapperSpec {
    pub name: String,
    #[serde(default)]
    pub parameters: Vec<String>,
}

impl XmlContent for WrapperSpec {
    fn write_children(&self, el: &mut Element) {
        push(el, "Name", &self.name);
        push_texts(el, "Parameter", &self.parameters);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            name: el.req_text(GCA, "Name")?,
            parameters: texts(el, "Parameter"),
        })
    }
}

/// What the core service under a CTS type can do (paper 3.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreService {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Takes checkpoint requests from outside (doCheckpoint).
    pub external_checkpoints: bool,
    /// Takes checkpoints on its own (periodic, or the job itself).
    pub internal_checkpoints: bool,
    /// Can recover a job on a computing resource other than the one that checkpointed it.
    pub recover_on_other_resource: bool,
    /// Can recover from any image, not only the latest.
    pub recover_from_any_image: bool,
    #[serde(default)]
    pub properties: Vec<Property>,
}

impl XmlContent for CoreService {
    fn write_children(&self, el: &mut Element) {
        push(el, "Name", &self.name);
        push_opt(el, "Version", &self.version);
        push(el, "ExternalCheckpoints", self.external_checkpoints);
        push(el, "InternalCheckpoints", self.internal_checkpoints);
        push(el, "RecoverOnOtherResource", self.recover_on_other_resource);
        push(el, "RecoverFromAnyImage", self.recover_from_any_image);
        push_list(el, "Property", &self.properties);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        let req_bool = |name: &str| {
            el.opt_bool(GCA, name)?.ok_or_else(|| {
                el.error(format!(
                    "<{}> is missing the required element <{name}>",
                    el.name
                ))
            })
        };
        Ok(Self {
            name: el.req_text(GCA, "Name")?,
            version: el.opt_text(GCA, "Version"),
            external_checkpoints: req_bool("ExternalCheckpoints")?,
            internal_checkpoints: req_bool("InternalCheckpoints")?,
            recover_on_other_resource: req_bool("RecoverOnOtherResource")?,
            recover_from_any_image: req_bool("RecoverFromAnyImage")?,
            properties: list(el, "Property")?,
        })
    }
}

/// A CTS type, as an admin describes it in a CTS descriptor (paper 3.3, 5.5). The XML form is
/// the `gca:CTSDescriptor` document; [`crate::descriptor`] parses and validates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtsType {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub core_service: CoreService,
    #[serde(default)]
    pub classes: Vec<String>,
    pub execute_wrapper: WrapperSpec,
    pub recovery_wrapper: WrapperSpec,
    /// Extra arguments appended to the job's own when it is executed.
    #[serde(default)]
    pub job_parameters: Vec<String>,
    /// Extra arguments appended to the job's own when it is recovered.
    #[serde(default)]
    pub recovery_job_parameters: Vec<String>,
    /// Environment variables set for the job (values may hold placeholders).
    #[serde(default)]
    pub environment: Vec<Property>,
}

impl XmlContent for CtsType {
    fn write_children(&self, el: &mut Element) {
        push(el, "Name", &self.name);
        push_opt(el, "Description", &self.description);
        el.push_child(self.core_service.to_element("CoreService"));
        push_texts(el, "CheckpointerClass", &self.classes);
        el.push_child(self.execute_wrapper.to_element("ExecuteWrapper"));
        el.push_child(self.recovery_wrapper.to_element("RecoveryWrapper"));
        push_texts(el, "JobParameter", &self.job_parameters);
        push_texts(el, "RecoveryJobParameter", &self.recovery_job_parameters);
        push_list(el, "Environment", &self.environment);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            name: el.req_text(GCA, "Name")?,
            description: el.opt_text(GCA, "Description"),
            core_service: CoreService::read_children(req_child(el, "CoreService")?)?,
            classes: texts(el, "CheckpointerClass"),
            execute_wrapper: WrapperSpec::read_children(req_child(el, "ExecuteWrapper")?)?,
            recovery_wrapper: WrapperSpec::read_children(req_child(el, "RecoveryWrapper")?)?,
            job_parameters: texts(el, "JobParameter"),
            recovery_job_parameters: texts(el, "RecoveryJobParameter"),
            environment: list(el, "Environment")?,
        })
    }
}

/// A registered CTS type as listed by the GCS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtsTypeInfo {
    pub descriptor: CtsType,
    pub registered_at: DateTime<Utc>,
    pub instance_count: i64,
}

impl XmlContent for CtsTypeInfo {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.descriptor.to_element("CTSDescriptor"));
        push(el, "RegisteredAt", fmt_time(&self.registered_at));
        push(el, "InstanceCount", self.instance_count);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            descriptor: CtsType::read_children(req_child(el, "CTSDescriptor")?)?,
            registered_at: req_time(el, "RegisteredAt")?,
            instance_count: el.opt_parse(GCA, "InstanceCount")?.unwrap_or(0),
        })
    }
}

/// A running CTS (paper 5.5, second stage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtsInstance {
    pub name: String,
    pub cts_type: String,
    /// The CTS's SOAP endpoint (the address of its EPR).
    pub url: String,
    /// The EPR address of the Execution Manager whose jobs this CTS checkpoints.
    pub execution_manager: String,
    /// The computing resource the CTS runs on.
    pub resource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
    /// What the resource offers a restore (architecture, kernel, CRIU, CPU), as the CTS
    /// reported it when it last registered ([`crate::facts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<crate::facts::ResourceFacts>,
}

impl XmlContent for CtsInstance {
    fn write_children(&self, el: &mut Element) {
        push(el, "Name", &self.name);
        push(el, "Type", &self.cts_type);
        push(el, "URL", &self.url);
        push(el, "ExecutionManager", &self.execution_manager);
        push(el, "Resource", &self.resource);
        push_opt(
            el,
            "RegisteredAt",
            &self.registered_at.as_ref().map(fmt_time),
        );
        push_opt(el, "LastSeen", &self.last_seen.as_ref().map(fmt_time));
        if let Some(f) = &self.facts {
            el.push_child(f.to_element("ResourceFacts"));
        }
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            name: el.req_text(GCA, "Name")?,
            cts_type: el.req_text(GCA, "Type")?,
            url: el.req_text(GCA, "URL")?,
            execution_manager: el.req_text(GCA, "ExecutionManager")?,
            resource: el.req_text(GCA, "Resource")?,
            registered_at: parse_time(el, "RegisteredAt")?,
            last_seen: parse_time(el, "LastSeen")?,
            facts: opt_child(el, "ResourceFacts")?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Running under a CTS that can checkpoint it.
    Running,
    /// A recovery wrapper is restoring it.
    Recovering,
    /// Checkpointed and stopped (e.g. for migration); waiting to be recovered.
    Stopped,
    /// Exited; `exit_status` / `signal` say how.
    Finished,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Recovering => "recovering",
            JobState::Stopped => "stopped",
            JobState::Finished => "finished",
        }
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(JobState::Running),
            "recovering" => Ok(JobState::Recovering),
            "stopped" => Ok(JobState::Stopped),
            "finished" => Ok(JobState::Finished),
            other => Err(format!(
                "unknown job state {other:?}; expected running, recovering, stopped or finished"
            )),
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is kept of a job's checkpoint images once the job has ended (it finished with exit
/// status 0, or its WS-Resource was destroyed). XtreemOS's default: nothing, the images are
/// deleted; the job owner can ask for the last N, or all, to be kept in space the owner names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    #[default]
    None,
    Last,
    All,
}

impl Keep {
    pub fn as_str(self) -> &'static str {
        match self {
            Keep::None => "none",
            Keep::Last => "last",
            Keep::All => "all",
        }
    }
}

impl std::str::FromStr for Keep {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Keep::None),
            "last" => Ok(Keep::Last),
            "all" => Ok(Keep::All),
            other => Err(format!(
                "unknown retention {other:?}; expected none, last or all"
            )),
        }
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most images a job can ask to keep by number (`keep = last`).
pub const MAX_KEEP_LAST: u32 = 10_000;
/// The longest owner directory accepted (Linux's PATH_MAX).
pub const MAX_KEEP_IN_LEN: usize = 4096;

/// A job's retention policy: which checkpoint images survive the end of the job, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub keep: Keep,
    /// With `keep = last`: how many of the most recent images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// With `keep = last | all`: the owner's directory the kept images are moved to, an absolute
    /// path on the resource that holds each image (usually a shared file system). It must
    /// exist and belong to the job's owner when the job ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_in: Option<String>,
}

impl Retention {
    /// Keep the last `n` images in `dir`.
    pub fn last(n: u32, dir: impl Into<String>) -> Self {
        Retention {
            keep: Keep::Last,
            keep_last: Some(n),
            keep_in: Some(dir.into()),
        }
    }

    /// Keep every image in `dir`.
    pub fn all(dir: impl Into<String>) -> Self {
        Retention {
            keep: Keep::All,
            keep_last: None,
            keep_in: Some(dir.into()),
        }
    }

    /// Checks the policy is complete and consistent; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        match (self.keep, self.keep_last) {
            (Keep::Last, None) => {
                return Err("keep = last needs KeepLast, the number of images to keep".into())
            }
            (Keep::Last, Some(n)) if n == 0 || n > MAX_KEEP_LAST => {
                return Err(format!(
                    "KeepLast must be between 1 and {MAX_KEEP_LAST}, got {n}"
                ))
            }
            (Keep::None | Keep::All, Some(_)) => {
                return Err(format!(
                    "KeepLast only goes with keep = last (keep is {})",
                    self.keep
                ))
            }
            _ => {}
        }
        match (self.keep, &self.keep_in) {
            (Keep::None, Some(_)) => Err(
                "KeepIn only goes with keep = last or all: with keep = none the images are deleted"
                    .into(),
            ),
            (Keep::Last | Keep::All, None) => Err(format!(
                "keep = {} needs KeepIn, the owner's directory to keep the images in",
                self.keep
            )),
            (_, Some(dir)) => check_keep_in(dir),
            (Keep::None, None) => Ok(()),
        }
    }

    /// The same policy with `keep_in` in its canonical form (no trailing `/`).
    pub fn normalized(mut self) -> Self {
        if let Some(dir) = &mut self.keep_in {
            let trimmed = dir.trim_end_matches('/').len().max(1);
            dir.truncate(trimmed);
        }
        self
    }

    /// How many of the most recent images are kept (`None`: all).
    pub fn kept_count(&self) -> Option<usize> {
        match self.keep {
            Keep::None => Some(0),
            Keep::Last => Some(self.keep_last.unwrap_or(0) as usize),
            Keep::All => None,
        }
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.keep, self.keep_last, &self.keep_in) {
            (Keep::None, _, _) => f.write_str("delete all"),
            (Keep::Last, n, dir) => write!(
                f,
                "keep last {} in {}",
                n.unwrap_or(0),
                dir.as_deref().unwrap_or("?")
            ),
            (Keep::All, _, dir) => write!(f, "keep all in {}", dir.as_deref().unwrap_or("?")),
        }
    }
}

/// An owner directory must be an absolute, normalized path: no `.`/`..` components, no empty
/// components, no control characters, not `/` itself (a trailing `/` is allowed). This is
/// `KeepIn`'s check in [`Retention::validate`]; the CTS applies it too to the directory it is
/// asked to export an image into.
pub fn check_keep_in(dir: &str) -> Result<(), String> {
    if dir.len() > MAX_KEEP_IN_LEN {
        return Err(format!("KeepIn is longer than {MAX_KEEP_IN_LEN} bytes"));
    }
    if !dir.starts_with('/') {
        return Err(format!(
            "KeepIn must be an absolute path on the resource, got {dir:?}"
        ));
    }
    if dir.chars().any(|c| c.is_control()) {
        return Err(format!("KeepIn contains control characters: {dir:?}"));
    }
    let trimmed = dir.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("KeepIn must not be the root directory".into());
    }
    if trimmed[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "KeepIn must be a normalized path (no empty, . or .. components), got {dir:?}"
        ));
    }
    Ok(())
}

impl XmlContent for Retention {
    fn write_children(&self, el: &mut Element) {
        push(el, "Keep", self.keep);
        push_opt(el, "KeepLast", &self.keep_last);
        push_opt(el, "KeepIn", &self.keep_in);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            keep: el.opt_parse(GCA, "Keep")?.unwrap_or_default(),
            keep_last: el.opt_parse(GCA, "KeepLast")?,
            keep_in: el.opt_text(GCA, "KeepIn"),
        })
    }
}

/// Where a checkpoint's image is, as the retention policy moves it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// In the image store of the CTS that took it (or fetched it): the job can recover from it.
    #[default]
    Stored,
    /// Being deleted from the CTS (the job ended and the policy does not keep it).
    Deleting,
    /// Deleted.
    Deleted,
    /// Being moved to the owner's directory.
    Keeping,
    /// Moved to the owner's directory (`kept_in`); no longer served by the CTS.
    Kept,
    /// Deleting or keeping it failed for good (`image_error` says why); the image stays on
    /// the CTS until the retention policy is set again.
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Stored => "stored",
            ImageState::Deleting => "deleting",
            ImageState::Deleted => "deleted",
            ImageState::Keeping => "keeping",
            ImageState::Kept => "kept",
            ImageState::Failed => "failed",
        }
    }
}

impl std::str::FromStr for ImageState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stored" => Ok(ImageState::Stored),
            "deleting" => Ok(ImageState::Deleting),
            "deleted" => Ok(ImageState::Deleted),
            "keeping" => Ok(ImageState::Keeping),
            "kept" => Ok(ImageState::Kept),
            "failed" => Ok(ImageState::Failed),
            other => Err(format!(
                "unknown image state {other:?}; expected stored, deleting, deleted, keeping, kept or failed"
            )),
        }
    }
}

impl std::fmt::Display for ImageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job known to the GCS: its GID and the CTS in charge of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub gid: String,
    pub state: JobState,
    pub cts_instance: String,
    pub cts_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id: Option<String>,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub checkpoint_count: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    pub recoveries: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// What happens to its images when it ends.
    #[serde(default)]
    pub retention: Retention,
}

impl XmlContent for Job {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "State", self.state);
        push(el, "CTSInstance", &self.cts_instance);
        push(el, "CTSType", &self.cts_type);
        push_opt(el, "LocalID", &self.local_id);
        push(el, "RegisteredAt", fmt_time(&self.registered_at));
        push(el, "UpdatedAt", fmt_time(&self.updated_at));
        push(el, "CheckpointCount", self.checkpoint_count);
        push_opt(el, "LatestCheckpoint", &self.latest_checkpoint);
        push(el, "Recoveries", self.recoveries);
        push_opt(el, "ExitStatus", &self.exit_status);
        push_opt(el, "Signal", &self.signal);
        el.push_child(self.retention.to_element("Retention"));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            state: el
                .opt_parse(GCA, "State")?
                .ok_or_else(|| el.error("<Job> has no <State>"))?,
            cts_instance: el.req_text(GCA, "CTSInstance")?,
            cts_type: el.req_text(GCA, "CTSType")?,
            local_id: el.opt_text(GCA, "LocalID"),
            registered_at: req_time(el, "RegisteredAt")?,
            updated_at: req_time(el, "UpdatedAt")?,
            checkpoint_count: el.opt_parse(GCA, "CheckpointCount")?.unwrap_or(0),
            latest_checkpoint: el.opt_text(GCA, "LatestCheckpoint"),
            recoveries: el.opt_parse(GCA, "Recoveries")?.unwrap_or(0),
            exit_status: el.opt_parse(GCA, "ExitStatus")?,
            signal: el.opt_parse(GCA, "Signal")?,
            retention: opt_child(el, "Retention")?.unwrap_or_default(),
        })
    }
}

/// Who asked for a checkpoint (paper 3.3: external or internal requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// doCheckpoint from a broker or another outside component.
    External,
    /// Taken by the CTS on its own schedule.
    Periodic,
    /// Taken by the job (or core service) itself.
    Job,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::External => "external",
            Origin::Periodic => "periodic",
            Origin::Job => "job",
        }
    }
}

impl std::str::FromStr for Origin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "external" => Ok(Origin::External),
            "periodic" => Ok(Origin::Periodic),
            "job" => Ok(Origin::Job),
            other => Err(format!(
                "unknown origin {other:?}; expected external, periodic or job"
            )),
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One checkpoint in the GCS bookkeeping (paper 3.3, 5.2 step 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Unique checkpoint (image) ID, chosen by the CTS that took it.
    pub id: String,
    pub gid: String,
    /// Per-GID sequence number, assigned by the GCS when the record is registered (1, 2, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    pub cts_name: String,
    pub cts_type: String,
    pub taken_at: DateTime<Utc>,
    /// Logical image name / locator the CTS can fetch the image by.
    pub image_name: String,
    pub execution_manager: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// `sha256:<hex>` of the image manifest, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The image this one is an increment of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub origin: Origin,
    /// The job was stopped after this checkpoint (migration).
    #[serde(default)]
    pub job_stopped: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<DateTime<Utc>>,
    /// Where the image is (set by the GCS; a CTS registers `stored`).
    #[serde(default)]
    pub image_state: ImageState,
    /// With `kept`: the directory the image was moved to, on the resource of `cts_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_in: Option<String>,
    /// With `failed` (or while retrying): why deleting or keeping the image failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_error: Option<String>,
    /// Whose job the image is, on the resource that took it (the UID and GID of the job's
    /// processes): the only owner a recovery trusts, as it is covered by `signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ImageOwner>,
    /// The taking CTS's signature over the image's identity ([`crate::signature`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ImageSignature>,
    /// What a restore of the image depends on ([`crate::facts`]), covered by `signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<crate::facts::ImageFacts>,
    /// Every place the image is (issue 12): the store of the CTS that took it, an object
    /// store, each with its state. Not covered by `signature` (it changes as uploads finish);
    /// the GCS keeps it up to date (`SetImageLocation`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locations: Vec<ImageLocation>,
}

/// What kind of place an image is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocationKind {
    /// The image store of a CTS instance (`name`; `url` its image's URL).
    Cts,
    /// An S3-compatible object store (`name` is its identity: bucket and prefix, or the
    /// name its `[object_store]` gives it; never a secret).
    ObjectStore,
}

impl LocationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LocationKind::Cts => "cts",
            LocationKind::ObjectStore => "object-store",
        }
    }
}

impl std::str::FromStr for LocationKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cts" => Ok(LocationKind::Cts),
            "object-store" => Ok(LocationKind::ObjectStore),
            other => Err(format!(
                "unknown location kind {other:?}; expected cts or object-store"
            )),
        }
    }
}

impl std::fmt::Display for LocationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a location has the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocationState {
    /// Not there yet: an `async` upload is under way.
    Pending,
    /// The whole image is there.
    Stored,
    /// The upload gave up (`error` says why): the image is not there.
    Failed,
}

impl LocationState {
    pub fn as_str(self) -> &'static str {
        match self {
            LocationState::Pending => "pending",
            LocationState::Stored => "stored",
            LocationState::Failed => "failed",
        }
    }
}

impl std::str::FromStr for LocationState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(LocationState::Pending),
            "stored" => Ok(LocationState::Stored),
            "failed" => Ok(LocationState::Failed),
            other => Err(format!(
                "unknown location state {other:?}; expected pending, stored or failed"
            )),
        }
    }
}

impl std::fmt::Display for LocationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One place an image is (or is on its way to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLocation {
    pub kind: LocationKind,
    /// The CTS instance's name, or the object store's identity.
    pub name: String,
    /// With `cts`: where the image is fetched from (the record's image name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub state: LocationState,
    /// When the GCS last set the state (set by the GCS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// With `failed`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ImageLocation {
    /// The store of CTS `name`, which has the image at `url`.
    pub fn cts(name: &str, url: &str) -> Self {
        Self {
            kind: LocationKind::Cts,
            name: name.to_string(),
            url: Some(url.to_string()),
            state: LocationState::Stored,
            since: None,
            error: None,
        }
    }

    /// The object store `name`, in `state`.
    pub fn object_store(name: &str, state: LocationState, error: Option<String>) -> Self {
        Self {
            kind: LocationKind::ObjectStore,
            name: name.to_string(),
            url: None,
            state,
            since: None,
            error,
        }
    }
}

impl XmlContent for ImageLocation {
    fn write_children(&self, el: &mut Element) {
        push(el, "Kind", self.kind);
        push(el, "Name", &self.name);
        push_opt(el, "URL", &self.url);
        push(el, "State", self.state);
        push_opt(el, "Since", &self.since.as_ref().map(fmt_time));
        push_opt(el, "Error", &self.error);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            kind: el
                .opt_parse(GCA, "Kind")?
                .ok_or_else(|| el.error("<Location> has no <Kind> (cts or object-store)"))?,
            name: el.req_text(GCA, "Name")?,
            url: el.opt_text(GCA, "URL"),
            state: el
                .opt_parse(GCA, "State")?
                .ok_or_else(|| el.error("<Location> has no <State> (pending, stored or failed)"))?,
            since: parse_time(el, "Since")?,
            error: el.opt_text(GCA, "Error"),
        })
    }
}

/// SetImageLocation: the CTS that registered a record (or the one its job is on now) tells
/// the GCS where the image has got to, when an `async` upload to the object store finished
/// (`stored`) or gave up (`failed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetImageLocation {
    pub gid: String,
    pub checkpoint_id: String,
    pub location: ImageLocation,
}

impl XmlContent for SetImageLocation {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "CheckpointID", &self.checkpoint_id);
        el.push_child(self.location.to_element("Location"));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            checkpoint_id: el.req_text(GCA, "CheckpointID")?,
            location: ImageLocation::read_children(req_child(el, "Location")?)?,
        })
    }
}

/// The local owner of a job's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageOwner {
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for ImageOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

impl XmlContent for ImageOwner {
    fn write_children(&self, el: &mut Element) {
        push(el, "UID", self.uid);
        push(el, "GroupID", self.gid);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            uid: el
                .opt_parse(GCA, "UID")?
                .ok_or_else(|| el.error("<Owner> has no <UID>"))?,
            gid: el
                .opt_parse(GCA, "GroupID")?
                .ok_or_else(|| el.error("<Owner> has no <GroupID>"))?,
        })
    }
}

/// A signature by the CTS that took an image: `value` signs the image's identity (checkpoint
/// ID, GID, manifest digest, owner, CTS name and type) with the key of `certificate`, which
/// the site CA issued to that CTS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageSignature {
    /// `ecdsa-p256-sha256`, `ecdsa-p384-sha384`, `ed25519`, `rsa-pss-sha256`.
    pub algorithm: String,
    /// The signer's certificate, base64 DER.
    pub certificate: String,
    /// The signature, base64.
    pub value: String,
}

impl XmlContent for ImageSignature {
    fn write_children(&self, el: &mut Element) {
        push(el, "Algorithm", &self.algorithm);
        push(el, "Certificate", &self.certificate);
        push(el, "Value", &self.value);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            algorithm: el.req_text(GCA, "Algorithm")?,
            certificate: el.req_text(GCA, "Certificate")?,
            value: el.req_text(GCA, "Value")?,
        })
    }
}

impl CheckpointRecord {
    /// Equality of what the CTS reports, ignoring what the GCS adds (sequence, registration
    /// time): used to make re-registration idempotent. The signature's value is not
    /// compared, only its algorithm and certificate: ECDSA and RSA-PSS signatures are
    /// randomized, so a CTS that signs the same facts again (a record rebuilt from its image
    /// after a restart) makes a different value for the same report; the GCS verifies it
    /// before it compares.
    pub fn same_report(&self, other: &CheckpointRecord) -> bool {
        let strip = |r: &CheckpointRecord| CheckpointRecord {
            signature: r.signature.as_ref().map(|s| ImageSignature {
                value: String::new(),
                ..s.clone()
            }),
            sequence: None,
            registered_at: None,
            image_state: ImageState::Stored,
            kept_in: None,
            image_error: None,
            locations: Vec::new(),
            taken_at: r.taken_at.with_nanosecond_micros(),
            ..r.clone()
        };
        strip(self) == strip(other)
    }
}

trait MicrosPrecision {
    fn with_nanosecond_micros(&self) -> Self;
}

impl MicrosPrecision for DateTime<Utc> {
    /// PostgreSQL keeps microseconds; compare at that precision.
    fn with_nanosecond_micros(&self) -> Self {
        use chrono::Timelike;
        let n = self.nanosecond();
        self.with_nanosecond(n - n % 1000).unwrap_or(*self)
    }
}

impl XmlContent for CheckpointRecord {
    fn write_children(&self, el: &mut Element) {
        push(el, "CheckpointID", &self.id);
        push(el, "GID", &self.gid);
        push_opt(el, "SequenceNumber", &self.sequence);
        push(el, "CTSName", &self.cts_name);
        push(el, "CTSType", &self.cts_type);
        push(el, "TakenAt", fmt_time(&self.taken_at));
        push(el, "ImageName", &self.image_name);
        push(el, "ExecutionManager", &self.execution_manager);
        push_opt(el, "SizeBytes", &self.size_bytes);
        push_opt(el, "Digest", &self.digest);
        push_opt(el, "Parent", &self.parent);
        push(el, "Origin", self.origin);
        push(el, "JobStopped", self.job_stopped);
        push_opt(
            el,
            "RegisteredAt",
            &self.registered_at.as_ref().map(fmt_time),
        );
        push(el, "ImageState", self.image_state);
        push_opt(el, "KeptIn", &self.kept_in);
        push_opt(el, "ImageError", &self.image_error);
        if let Some(o) = &self.owner {
            el.push_child(o.to_element("Owner"));
        }
        if let Some(s) = &self.signature {
            el.push_child(s.to_element("Signature"));
        }
        if let Some(f) = &self.facts {
            el.push_child(f.to_element("Facts"));
        }
        push_list(el, "Location", &self.locations);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            id: el.req_text(GCA, "CheckpointID")?,
            gid: el.req_text(GCA, "GID")?,
            sequence: el.opt_parse(GCA, "SequenceNumber")?,
            cts_name: el.req_text(GCA, "CTSName")?,
            cts_type: el.req_text(GCA, "CTSType")?,
            taken_at: req_time(el, "TakenAt")?,
            image_name: el.req_text(GCA, "ImageName")?,
            execution_manager: el.req_text(GCA, "ExecutionManager")?,
            size_bytes: el.opt_parse(GCA, "SizeBytes")?,
            digest: el.opt_text(GCA, "Digest"),
            parent: el.opt_text(GCA, "Parent"),
            origin: el
                .opt_parse(GCA, "Origin")?
                .ok_or_else(|| el.error("<Origin> is required (external, periodic or job)"))?,
            job_stopped: bool_or(el, "JobStopped", false)?,
            registered_at: parse_time(el, "RegisteredAt")?,
            image_state: el.opt_parse(GCA, "ImageState")?.unwrap_or_default(),
            kept_in: el.opt_text(GCA, "KeptIn"),
            image_error: el.opt_text(GCA, "ImageError"),
            owner: opt_child(el, "Owner")?,
            signature: opt_child(el, "Signature")?,
            facts: opt_child(el, "Facts")?,
            locations: list(el, "Location")?,
        })
    }
}

/// A CTS instance matched by FindCTS, with everything a broker needs to submit a job to it
/// (paper 5.1 steps 1-2). Parameters are patterns; expand them with [`crate::placeholders`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtsOffer {
    pub instance: CtsInstance,
    pub core_service: CoreService,
    pub classes: Vec<String>,
    pub execute_wrapper: WrapperSpec,
    pub recovery_wrapper: WrapperSpec,
    pub job_parameters: Vec<String>,
    pub recovery_job_parameters: Vec<String>,
    pub environment: Vec<Property>,
}

impl XmlContent for CtsOffer {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.instance.to_element("Instance"));
        el.push_child(self.core_service.to_element("CoreService"));
        push_texts(el, "CheckpointerClass", &self.classes);
        el.push_child(self.execute_wrapper.to_element("ExecuteWrapper"));
        el.push_child(self.recovery_wrapper.to_element("RecoveryWrapper"));
        push_texts(el, "JobParameter", &self.job_parameters);
        push_texts(el, "RecoveryJobParameter", &self.recovery_job_parameters);
        push_list(el, "Environment", &self.environment);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            instance: CtsInstance::read_children(req_child(el, "Instance")?)?,
            core_service: CoreService::read_children(req_child(el, "CoreService")?)?,
            classes: texts(el, "CheckpointerClass"),
            execute_wrapper: WrapperSpec::read_children(req_child(el, "ExecuteWrapper")?)?,
            recovery_wrapper: WrapperSpec::read_children(req_child(el, "RecoveryWrapper")?)?,
            job_parameters: texts(el, "JobParameter"),
            recovery_job_parameters: texts(el, "RecoveryJobParameter"),
            environment: list(el, "Environment")?,
        })
    }
}

/// Where and how a job can be recovered from one image (paper 5.3 steps 2-5), with the
/// recovery wrapper's parameters already expanded for that candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryCandidate {
    pub instance: CtsInstance,
    pub recovery_wrapper: WrapperSpec,
    pub job_parameters: Vec<String>,
    pub environment: Vec<Property>,
    /// Whether this candidate can restore the image, and why not ([`crate::facts::judge`];
    /// the candidate's CTS checks the rest before it fetches anything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatibility: Option<crate::facts::Compatibility>,
}

impl XmlContent for RecoveryCandidate {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.instance.to_element("Instance"));
        el.push_child(self.recovery_wrapper.to_element("RecoveryWrapper"));
        push_texts(el, "JobParameter", &self.job_parameters);
        push_list(el, "Environment", &self.environment);
        if let Some(c) = &self.compatibility {
            el.push_child(c.to_element("Compatibility"));
        }
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            instance: CtsInstance::read_children(req_child(el, "Instance")?)?,
            recovery_wrapper: WrapperSpec::read_children(req_child(el, "RecoveryWrapper")?)?,
            job_parameters: texts(el, "JobParameter"),
            environment: list(el, "Environment")?,
            compatibility: opt_child(el, "Compatibility")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and responses

macro_rules! empty_message {
    ($t:ident) => {
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $t {}
        impl XmlContent for $t {
            fn write_children(&self, _el: &mut Element) {}
            fn read_children(_el: &Element) -> Result<Self, XmlError> {
                Ok(Self {})
            }
        }
    };
}

/// doCheckpoint(GID), from a broker to the GCS, and from the GCS to the CTS in charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoCheckpoint {
    pub gid: String,
    /// Stop the job after the checkpoint (migration); default: leave it running.
    #[serde(default)]
    pub stop: bool,
}

impl XmlContent for DoCheckpoint {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "Stop", self.stop);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            stop: bool_or(el, "Stop", false)?,
        })
    }
}

/// findCTS: any combination of criteria; all given criteria must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindCts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cts_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Required properties of the core service (exact key/value matches).
    #[serde(default)]
    pub properties: Vec<Property>,
    /// Only instances heard from within this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alive_within_secs: Option<i64>,
}

impl XmlContent for FindCts {
    fn write_children(&self, el: &mut Element) {
        push_opt(el, "CTSType", &self.cts_type);
        push_opt(el, "CheckpointerClass", &self.class);
        push_opt(el, "CoreService", &self.core_service);
        push_opt(el, "Resource", &self.resource);
        push_list(el, "Property", &self.properties);
        push_opt(el, "AliveWithinSeconds", &self.alive_within_secs);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            cts_type: el.opt_text(GCA, "CTSType"),
            class: el.opt_text(GCA, "CheckpointerClass"),
            core_service: el.opt_text(GCA, "CoreService"),
            resource: el.opt_text(GCA, "Resource"),
            properties: list(el, "Property")?,
            alive_within_secs: el.opt_parse(GCA, "AliveWithinSeconds")?,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindCtsResponse {
    pub offers: Vec<CtsOffer>,
}

impl XmlContent for FindCtsResponse {
    fn write_children(&self, el: &mut Element) {
        push_list(el, "CTS", &self.offers);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            offers: list(el, "CTS")?,
        })
    }
}

/// A request naming one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GidRequest {
    pub gid: String,
}

impl XmlContent for GidRequest {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
        })
    }
}

/// GetJobKey: the key a job's image chunks are encrypted with in an object store, for the CTS
/// the job is on (running, stopped for migration, being recovered, or last on when it ended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetJobKey {
    pub gid: String,
}

impl XmlContent for GetJobKey {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
        })
    }
}

/// A job's image key: 32 random bytes made by the GCS at the first GetJobKey, the same for
/// every later one. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobKey {
    pub gid: String,
    /// The key, base64 (standard alphabet, padded).
    pub key: String,
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobKey")
            .field("gid", &self.gid)
            .field("key", &"***")
            .field("created_at", &self.created_at)
            .finish()
    }
}

impl XmlContent for JobKey {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "Key", &self.key);
        push(el, "CreatedAt", fmt_time(&self.created_at));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            key: el.req_text(GCA, "Key")?,
            created_at: req_time(el, "CreatedAt")?,
        })
    }
}

/// GetCheckpoints: one page of a job's checkpoint records, in sequence order. A job may have
/// more records than fit one answer: follow [`CheckpointList::next`] (or use
/// [`GetCheckpoints::next_page`]) until it is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetCheckpoints {
    pub gid: String,
    /// Only records with a higher sequence number (the `Next` of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    /// At most this many records (the GCS answers at most its `checkpoints_page_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

impl GetCheckpoints {
    /// The first page of `gid`'s records.
    pub fn of(gid: impl Into<String>) -> Self {
        Self {
            gid: gid.into(),
            after: None,
            limit: None,
        }
    }

    /// The request for the page after `page`, or None when `page` was the last. A `Next`
    /// that does not move forward ends the walk too (so a confused server cannot loop a
    /// client for ever).
    pub fn next_page(&self, page: &CheckpointList) -> Option<Self> {
        let next = page.next?;
        if self.after.is_some_and(|a| next <= a) {
            return None;
        }
        Some(Self {
            after: Some(next),
            ..self.clone()
        })
    }
}

impl XmlContent for GetCheckpoints {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push_opt(el, "After", &self.after);
        push_opt(el, "Limit", &self.limit);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            after: el.opt_parse(GCA, "After")?,
            limit: el.opt_parse(GCA, "Limit")?,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointList {
    pub checkpoints: Vec<CheckpointRecord>,
    /// More records follow: ask again with `After` set to this (the sequence number of the
    /// last record of this page). Absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<i64>,
}

impl XmlContent for CheckpointList {
    fn write_children(&self, el: &mut Element) {
        push_list(el, "Checkpoint", &self.checkpoints);
        push_opt(el, "Next", &self.next);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            checkpoints: list(el, "Checkpoint")?,
            next: el.opt_parse(GCA, "Next")?,
        })
    }
}

/// The image a recovery starts from: `latest` or a checkpoint ID.
pub const LATEST: &str = "latest";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRecoveryInfo {
    pub gid: String,
    /// A checkpoint ID, or `latest`.
    #[serde(default = "latest")]
    pub image: String,
}

fn latest() -> String {
    LATEST.to_string()
}

impl XmlContent for GetRecoveryInfo {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "Image", &self.image);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            image: el.opt_text(GCA, "Image").unwrap_or_else(latest),
        })
    }
}

/// AuthorizeRecovery: a broker lets CTS `cts_instance` take job `gid` over by a recovery
/// (from `checkpoint`, or from any image) although the job may still run elsewhere: a clone,
/// or a migration the broker drives. Without it, a recovery registration moves a job only
/// when it failed, was stopped for migration or its CTS is lost. The grant is used up by that
/// recovery, or expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeRecovery {
    pub gid: String,
    pub cts_instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

impl XmlContent for AuthorizeRecovery {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "CTSInstance", &self.cts_instance);
        push_opt(el, "CheckpointID", &self.checkpoint);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            cts_instance: el.req_text(GCA, "CTSInstance")?,
            checkpoint: el.opt_text(GCA, "CheckpointID"),
        })
    }
}

/// AbandonRecovery: the CTS a job is being recovered on gives the recovery up (the image was
/// refused, the restore failed): the GCS puts the job back as it was before the recovery
/// moved it (its CTS, state and how it ended), and does not count the recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbandonRecovery {
    pub gid: String,
    pub cts_instance: String,
}

impl XmlContent for AbandonRecovery {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "CTSInstance", &self.cts_instance);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            cts_instance: el.req_text(GCA, "CTSInstance")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryAuthorized {
    pub gid: String,
    pub cts_instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    pub expires_at: DateTime<Utc>,
}

impl XmlContent for RecoveryAuthorized {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "CTSInstance", &self.cts_instance);
        push_opt(el, "CheckpointID", &self.checkpoint);
        push(el, "ExpiresAt", fmt_time(&self.expires_at));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            cts_instance: el.req_text(GCA, "CTSInstance")?,
            checkpoint: el.opt_text(GCA, "CheckpointID"),
            expires_at: req_time(el, "ExpiresAt")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryInfo {
    pub gid: String,
    pub checkpoint: CheckpointRecord,
    /// The CTS type that must recover the job (the one that checkpointed it).
    pub cts_type: String,
    /// The type can only recover on the resource that took the checkpoint.
    pub same_resource_only: bool,
    /// The resource the checkpoint was taken on.
    pub original_resource: Option<String>,
    pub candidates: Vec<RecoveryCandidate>,
}

impl XmlContent for RecoveryInfo {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        el.push_child(self.checkpoint.to_element("Checkpoint"));
        push(el, "CTSType", &self.cts_type);
        push(el, "SameResourceOnly", self.same_resource_only);
        push_opt(el, "OriginalResource", &self.original_resource);
        push_list(el, "Candidate", &self.candidates);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            checkpoint: CheckpointRecord::read_children(req_child(el, "Checkpoint")?)?,
            cts_type: el.req_text(GCA, "CTSType")?,
            same_resource_only: bool_or(el, "SameResourceOnly", false)?,
            original_resource: el.opt_text(GCA, "OriginalResource"),
            candidates: list(el, "Candidate")?,
        })
    }
}

/// Whether a registration created something new or found it registered already, unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    Created,
    Unchanged,
    Updated,
}

impl Registration {
    pub fn as_str(self) -> &'static str {
        match self {
            Registration::Created => "created",
            Registration::Unchanged => "unchanged",
            Registration::Updated => "updated",
        }
    }
}

impl std::str::FromStr for Registration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "created" => Ok(Registration::Created),
            "unchanged" => Ok(Registration::Unchanged),
            "updated" => Ok(Registration::Updated),
            other => Err(format!("unknown registration outcome {other:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCheckpointerClass {
    pub class: CheckpointerClass,
}

impl XmlContent for RegisterCheckpointerClass {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.class.to_element("CheckpointerClass"));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            class: CheckpointerClass::read_children(req_child(el, "CheckpointerClass")?)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassRegistered {
    pub class: CheckpointerClass,
    pub outcome: Registration,
}

impl XmlContent for ClassRegistered {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.class.to_element("CheckpointerClass"));
        push(el, "Outcome", self.outcome.as_str());
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            class: CheckpointerClass::read_children(req_child(el, "CheckpointerClass")?)?,
            outcome: el
                .opt_parse(GCA, "Outcome")?
                .unwrap_or(Registration::Created),
        })
    }
}

/// registerCTSDescriptor: the descriptor document as text (JSON) or inline element (SOAP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCtsDescriptor {
    pub descriptor_xml: String,
}

impl XmlContent for RegisterCtsDescriptor {
    fn write_children(&self, el: &mut Element) {
        // The descriptor travels as an element; a client holding text parses it first.
        if let Ok(d) = crate::xml::parse(&self.descriptor_xml) {
            el.push_child(d);
        }
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        let d = el.child(GCA, "CTSDescriptor").ok_or_else(|| {
            el.error("<RegisterCTSDescriptor> must contain a <gca:CTSDescriptor> element")
        })?;
        Ok(Self {
            descriptor_xml: d.to_xml(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorRegistered {
    pub cts_type: CtsType,
    pub outcome: Registration,
}

impl XmlContent for DescriptorRegistered {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.cts_type.to_element("CTSDescriptor"));
        push(el, "Outcome", self.outcome.as_str());
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            cts_type: CtsType::read_children(req_child(el, "CTSDescriptor")?)?,
            outcome: el
                .opt_parse(GCA, "Outcome")?
                .unwrap_or(Registration::Created),
        })
    }
}

/// unregisterCTS: remove a CTS instance, or a CTS type with no instances left.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisterCts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cts_type: Option<String>,
}

impl XmlContent for UnregisterCts {
    fn write_children(&self, el: &mut Element) {
        push_opt(el, "Instance", &self.instance);
        push_opt(el, "CTSType", &self.cts_type);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            instance: el.opt_text(GCA, "Instance"),
            cts_type: el.opt_text(GCA, "CTSType"),
        })
    }
}

empty_message!(Unregistered);
empty_message!(ListRequest);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassList {
    pub classes: Vec<CheckpointerClass>,
}

impl XmlContent for ClassList {
    fn write_children(&self, el: &mut Element) {
        push_list(el, "CheckpointerClass", &self.classes);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            classes: list(el, "CheckpointerClass")?,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtsTypeList {
    pub types: Vec<CtsTypeInfo>,
}

impl XmlContent for CtsTypeList {
    fn write_children(&self, el: &mut Element) {
        push_list(el, "CTSType", &self.types);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            types: list(el, "CTSType")?,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtsInstanceList {
    pub instances: Vec<CtsInstance>,
}

impl XmlContent for CtsInstanceList {
    fn write_children(&self, el: &mut Element) {
        push_list(el, "CTSInstance", &self.instances);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            instances: list(el, "CTSInstance")?,
        })
    }
}

/// listJobs with optional filters and keyset paging (by GID).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListJobs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cts_instance: Option<String>,
    /// Return jobs whose GID sorts after this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

impl XmlContent for ListJobs {
    fn write_children(&self, el: &mut Element) {
        push_opt(el, "State", &self.state);
        push_opt(el, "CTSInstance", &self.cts_instance);
        push_opt(el, "After", &self.after);
        push_opt(el, "Limit", &self.limit);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            state: el.opt_parse(GCA, "State")?,
            cts_instance: el.opt_text(GCA, "CTSInstance"),
            after: el.opt_text(GCA, "After"),
            limit: el.opt_parse(GCA, "Limit")?,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

impl XmlContent for JobList {
    fn write_children(&self, el: &mut Element) {
        push_list(el, "Job", &self.jobs);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            jobs: list(el, "Job")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub job: Job,
}

impl XmlContent for JobInfo {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.job.to_element("Job"));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            job: Job::read_children(req_child(el, "Job")?)?,
        })
    }
}

/// registerCTSInstance: a CTS announcing itself (at start-up, and again after restarts or when
/// the GCS comes back); doubles as its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCtsInstance {
    pub instance: CtsInstance,
}

impl XmlContent for RegisterCtsInstance {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.instance.to_element("CTSInstance"));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            instance: CtsInstance::read_children(req_child(el, "CTSInstance")?)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRegistered {
    pub instance: CtsInstance,
    pub outcome: Registration,
}

impl XmlContent for InstanceRegistered {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.instance.to_element("CTSInstance"));
        push(el, "Outcome", self.outcome.as_str());
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            instance: CtsInstance::read_children(req_child(el, "CTSInstance")?)?,
            outcome: el
                .opt_parse(GCA, "Outcome")?
                .unwrap_or(Registration::Created),
        })
    }
}

/// registerJob: a CTS telling the GCS it is in charge of a GID (paper 3.4.1, 5.1 step 4, and
/// with `recovery` set, 5.3 step 11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterJob {
    pub gid: String,
    pub cts_instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id: Option<String>,
    /// The job is being recovered: move the GID's routing to this CTS.
    #[serde(default)]
    pub recovery: bool,
    /// With `recovery`: the checkpoint the job is restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_checkpoint: Option<String>,
    /// With `recovery`: `recovering` while the image is being restored, `running` once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// The owner's retention policy, if given at submission (a new job without one gets the
    /// default; a recovery without one keeps the job's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

impl XmlContent for RegisterJob {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "CTSInstance", &self.cts_instance);
        push_opt(el, "LocalID", &self.local_id);
        push(el, "Recovery", self.recovery);
        push_opt(el, "FromCheckpoint", &self.from_checkpoint);
        push_opt(el, "State", &self.state);
        if let Some(r) = &self.retention {
            el.push_child(r.to_element("Retention"));
        }
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            cts_instance: el.req_text(GCA, "CTSInstance")?,
            local_id: el.opt_text(GCA, "LocalID"),
            recovery: bool_or(el, "Recovery", false)?,
            from_checkpoint: el.opt_text(GCA, "FromCheckpoint"),
            state: el.opt_parse(GCA, "State")?,
            retention: opt_child(el, "Retention")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRegistered {
    pub job: Job,
    pub outcome: Registration,
}

impl XmlContent for JobRegistered {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.job.to_element("Job"));
        push(el, "Outcome", self.outcome.as_str());
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            job: Job::read_children(req_child(el, "Job")?)?,
            outcome: el
                .opt_parse(GCA, "Outcome")?
                .unwrap_or(Registration::Created),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCheckpoint {
    pub checkpoint: CheckpointRecord,
}

impl XmlContent for RegisterCheckpoint {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.checkpoint.to_element("Checkpoint"));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            checkpoint: CheckpointRecord::read_children(req_child(el, "Checkpoint")?)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRegistered {
    pub checkpoint: CheckpointRecord,
    pub outcome: Registration,
}

impl XmlContent for CheckpointRegistered {
    fn write_children(&self, el: &mut Element) {
        el.push_child(self.checkpoint.to_element("Checkpoint"));
        push(el, "Outcome", self.outcome.as_str());
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            checkpoint: CheckpointRecord::read_children(req_child(el, "Checkpoint")?)?,
            outcome: el
                .opt_parse(GCA, "Outcome")?
                .unwrap_or(Registration::Created),
        })
    }
}

/// jobFinished: the job under a CTS exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFinished {
    pub gid: String,
    pub cts_instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl XmlContent for JobFinished {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        push(el, "CTSInstance", &self.cts_instance);
        push_opt(el, "ExitStatus", &self.exit_status);
        push_opt(el, "Signal", &self.signal);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            cts_instance: el.req_text(GCA, "CTSInstance")?,
            exit_status: el.opt_parse(GCA, "ExitStatus")?,
            signal: el.opt_parse(GCA, "Signal")?,
        })
    }
}

/// setRetention: the job owner (or its broker) changes what is kept of the job's images when it
/// ends. On a job that has ended already, the new policy is applied at once to the images that
/// are still stored (or whose deletion or keeping failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRetention {
    pub gid: String,
    pub retention: Retention,
}

impl XmlContent for SetRetention {
    fn write_children(&self, el: &mut Element) {
        push(el, "GID", &self.gid);
        el.push_child(self.retention.to_element("Retention"));
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            gid: el.req_text(GCA, "GID")?,
            retention: Retention::read_children(req_child(el, "Retention")?)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// JSON API only: notification subscriptions for scripts and operators. (SOAP clients use
// WS-BaseNotification; a subscription made either way is the same WS-Resource.)

/// A notification subscription, with its delivery backlog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    pub id: String,
    /// Its WS-Resource address (Renew, Unsubscribe, WS-RP over SOAP).
    pub address: String,
    /// Where notifications are POSTed (as WS-BaseNotification `Notify` messages).
    pub consumer: String,
    /// Topic names in `urn:gca:v1`; empty: every topic.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Only events about this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    pub created_at: DateTime<Utc>,
    /// None: no scheduled end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_time: Option<DateTime<Utc>>,
    /// Notifications waiting for delivery (or their retry).
    pub pending: i64,
    /// Notifications given up after their last attempt.
    pub failed: i64,
    /// The most recent delivery error, if any notification has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionList {
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// `POST /api/v1/subscriptions`: subscribe a consumer URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSubscription {
    pub consumer: String,
    /// Topic names (`CheckpointTaken`, ...); empty: every topic.
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    /// Seconds until it ends; absent: the GCS's default lifetime; 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_secs: Option<u64>,
}

#[cfg(test)]
mod location_tests {
    use super::*;

    #[test]
    fn a_set_image_location_survives_xml_and_json_and_refuses_unknown_states() {
        let req = SetImageLocation {
            gid: "job-1".into(),
            checkpoint_id: "ck-1".into(),
            location: ImageLocation {
                since: Some(
                    "2026-12-02T10:00:00.123456Z"
                        .parse::<DateTime<Utc>>()
                        .unwrap(),
                ),
                ..ImageLocation::object_store(
                    "s3://gca/site",
                    LocationState::Failed,
                    Some("no route".into()),
                )
            },
        };
        let el = req.to_element("SetImageLocation");
        let back = SetImageLocation::read_children(&el).unwrap();
        assert_eq!(back, req);
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["location"]["kind"], "object-store");
        assert_eq!(json["location"]["state"], "failed");
        assert_eq!(
            serde_json::from_value::<SetImageLocation>(json).unwrap(),
            req
        );
        assert!("gone".parse::<LocationState>().is_err());
        assert!("disk".parse::<LocationKind>().is_err());
        let mut bad = req.location.to_element("Location");
        for c in bad.children.iter_mut() {
            if let crate::xml::Node::Element(e) = c {
                if e.name == "State" {
                    e.children = vec![crate::xml::Node::Text("gone".into())];
                }
            }
        }
        assert!(ImageLocation::read_children(&bad).is_err());
    }
}
