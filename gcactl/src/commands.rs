//! Each command: build the request, call the GCS JSON API, render the answer.
//!
//! Rendering is kept in pure `render_*` functions (typed response in, text out) so it can be
//! tested without a server.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use gca_protocol::client::{path_segment, JsonClient};
use gca_protocol::messages::{
    AuthorizeRecovery, CheckpointList, CheckpointRecord, CheckpointerClass, ClassList,
    ClassRegistered, CtsInstanceList, CtsTypeList, DescriptorRegistered, FindCts, FindCtsResponse,
    GetCheckpoints, JobInfo, JobList, NewSubscription, Property, RecoveryAuthorized,
    RecoveryCandidate, RecoveryInfo, RegisterCheckpointerClass, RegisterCtsDescriptor,
    Registration, SubscriptionInfo, SubscriptionList, Unregistered, WrapperSpec,
};
use gca_protocol::transport::{http_client, ClientSettings, ClientTls};
use gca_protocol::{Fault, FaultKind};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::cli::{
    ClassCommand, Cli, Command, FindCtsArgs, InstanceCommand, JobCommand, SubscriptionCommand,
    TypeCommand, EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE,
};
use crate::table::{key_values, Table};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// doCheckpoint waits for the CTS to take the checkpoint.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a command failed.
#[derive(Debug)]
pub enum CliError {
    /// The GCS answered with a fault, or could not be reached.
    Fault(Fault),
    /// Something went wrong before the request was sent (files, TLS settings).
    Local(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Fault(f) => match f.kind {
                FaultKind::ResourceUnknown => EXIT_NOT_FOUND,
                FaultKind::ServiceUnavailable => EXIT_UNAVAILABLE,
                _ => EXIT_FAILURE,
            },
            CliError::Local(_) => EXIT_FAILURE,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Fault(fault) => {
                // The kind as the JSON API spells it (`ServiceUnavailable`, `ResourceUnknown`).
                write!(f, "{:?}: {}", fault.kind, fault.message)
            }
            CliError::Local(msg) => f.write_str(msg),
        }
    }
}

impl From<Fault> for CliError {
    fn from(f: Fault) -> Self {
        CliError::Fault(f)
    }
}

/// Runs the command and returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, CliError> {
    if let Command::Pki(command) = cli.command {
        return crate::pki::run(command, cli.json);
    }
    let timeout = match (cli.timeout, &cli.command) {
        (Some(secs), _) => Duration::from_secs(secs),
        (None, Command::Checkpoint { .. }) => CHECKPOINT_TIMEOUT,
        (None, _) => DEFAULT_TIMEOUT,
    };
    let settings = ClientSettings {
        tls: ClientTls {
            ca: cli.ca.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
        },
        connect_timeout: CONNECT_TIMEOUT.min(timeout),
        request_timeout: timeout,
    };
    let http = http_client(&settings).map_err(|e| CliError::Local(format!("{e:#}")))?;
    let https_without_ca = cli.gcs.to_ascii_lowercase().starts_with("https://") && cli.ca.is_none();
    let gcs = Gcs {
        client: JsonClient::new(http, cli.gcs),
        json: cli.json,
    };
    gcs.dispatch(cli.command).await.map_err(|e| match e {
        CliError::Fault(mut f)
            if https_without_ca
                && f.kind == FaultKind::ServiceUnavailable
                && matches!(f.code.as_deref(), Some("unreachable" | "transport"))
                && f.message.to_ascii_lowercase().contains("certificate") =>
        {
            f.message
                .push_str(" (for an https GCS, give its CA certificate with --ca or GCA_CA)");
            CliError::Fault(f)
        }
        e => e,
    })
}

struct Gcs {
    client: JsonClient,
    json: bool,
}

impl Gcs {
    async fn dispatch(&self, command: Command) -> Result<String, CliError> {
        match command {
            Command::Class(ClassCommand::Add {
                name,
                description,
                properties,
            }) => {
                let body = RegisterCheckpointerClass {
                    class: CheckpointerClass {
                        name,
                        description,
                        properties,
                        builtin: false,
                    },
                };
                self.show(
                    self.client.post("/api/v1/classes", &body).await,
                    render_class_registered,
                )
            }
            Command::Class(ClassCommand::List) => {
                self.show(self.client.get("/api/v1/classes").await, render_classes)
            }
            Command::Type(TypeCommand::Register { file }) => {
                let body = RegisterCtsDescriptor {
                    descriptor_xml: read_descriptor(&file)?,
                };
                self.show(
                    self.client.post("/api/v1/cts-types", &body).await,
                    render_descriptor_registered,
                )
            }
            Command::Type(TypeCommand::List) => {
                self.show(self.client.get("/api/v1/cts-types").await, render_types)
            }
            Command::Type(TypeCommand::Remove { name }) => {
                let path = format!("/api/v1/cts-types/{}", path_segment(&name));
                self.show(self.client.delete(&path).await, |_: &Unregistered| {
                    format!("removed CTS type {name}\n")
                })
            }
            Command::Instance(InstanceCommand::List) => self.show(
                self.client.get("/api/v1/cts-instances").await,
                render_instances,
            ),
            Command::Instance(InstanceCommand::Remove { name }) => {
                let path = format!("/api/v1/cts-instances/{}", path_segment(&name));
                self.show(self.client.delete(&path).await, |_: &Unregistered| {
                    format!("removed CTS instance {name}\n")
                })
            }
            Command::Subscription(SubscriptionCommand::List) => self.show(
                self.client.get("/api/v1/subscriptions").await,
                render_subscriptions,
            ),
            Command::Subscription(SubscriptionCommand::Show { id }) => {
                let path = format!("/api/v1/subscriptions/{}", path_segment(&id));
                self.show(self.client.get(&path).await, render_subscription)
            }
            Command::Subscription(SubscriptionCommand::Add {
                consumer,
                topics,
                gid,
                lifetime,
            }) => {
                let body = NewSubscription {
                    consumer,
                    topics,
                    gid,
                    lifetime_secs: lifetime,
                };
                self.show(
                    self.client.post("/api/v1/subscriptions", &body).await,
                    render_subscription,
                )
            }
            Command::Subscription(SubscriptionCommand::Remove { id }) => {
                let path = format!("/api/v1/subscriptions/{}", path_segment(&id));
                self.show(self.client.delete(&path).await, |_: &Value| {
                    format!("unsubscribed {id}\n")
                })
            }
            Command::Job(JobCommand::List {
                state,
                cts_instance,
                limit,
                after,
            }) => {
                let filtered = state.is_some() || cts_instance.is_some() || after.is_some();
                let path = format!(
                    "/api/v1/jobs{}",
                    query(&[
                        ("state", state.map(|s| s.as_str().to_string())),
                        ("cts_instance", cts_instance),
                        ("after", after),
                        ("limit", limit.map(|l| l.to_string())),
                    ])
                );
                self.show(self.client.get(&path).await, |jobs: &JobList| {
                    if let (Some(limit), Some(last)) = (limit, jobs.jobs.last()) {
                        if jobs.jobs.len() as i64 >= limit {
                            eprintln!(
                                "gcactl: more jobs may follow; continue with --after {}",
                                shell_quote(&last.gid)
                            );
                        }
                    }
                    render_jobs(jobs, filtered)
                })
            }
            Command::Job(JobCommand::Show { gid }) => {
                let path = format!("/api/v1/jobs/{}", path_segment(&gid));
                self.show(self.client.get(&path).await, render_job)
            }
            Command::Checkpoint { gid, stop } => {
                let path = format!("/api/v1/jobs/{}/checkpoints", path_segment(&gid));
                let body = serde_json::json!({ "stop": stop });
                self.show(self.client.post(&path, &body).await, render_checkpoint)
            }
            Command::Checkpoints { gid } => {
                // Every page: the GCS answers at most its page size per request.
                let all = self.all_checkpoints(&gid).await.and_then(|list| {
                    serde_json::to_value(list).map_err(|e| {
                        Fault::new(FaultKind::Internal, format!("cannot encode the list: {e}"))
                    })
                });
                self.show(all, |list: &CheckpointList| render_checkpoints(&gid, list))
            }
            Command::Retention { gid, retention } => {
                let path = format!("/api/v1/jobs/{}/retention", path_segment(&gid));
                let body = retention.to_retention()?;
                self.show(self.client.put(&path, &body).await, render_job)
            }
            Command::RecoveryInfo { gid, image } => {
                let path = format!(
                    "/api/v1/jobs/{}/recovery{}",
                    path_segment(&gid),
                    query(&[("image", Some(image))])
                );
                self.show(self.client.get(&path).await, render_recovery)
            }
            Command::AuthorizeRecovery {
                gid,
                cts_instance,
                image,
            } => {
                let path = format!("/api/v1/jobs/{}/recovery-grants", path_segment(&gid));
                let body = AuthorizeRecovery {
                    gid: gid.clone(),
                    cts_instance,
                    checkpoint: image,
                };
                self.show(
                    self.client.post(&path, &body).await,
                    |g: &RecoveryAuthorized| {
                        format!(
                            "CTS {} may recover job {} ({}) until {}\n",
                            g.cts_instance,
                            g.gid,
                            g.checkpoint
                                .as_deref()
                                .map(|c| format!("from {c}"))
                                .unwrap_or_else(|| "from any image".into()),
                            fmt_time(&g.expires_at)
                        )
                    },
                )
            }
            Command::Pki(_) => unreachable!("run() handles pki locally"),
            Command::FindCts(args) => {
                let body = find_request(args);
                self.show(
                    self.client.post("/api/v1/find-cts", &body).await,
                    render_offers,
                )
            }
        }
    }

    /// Decodes the response and renders it; with `--json`, prints it as pretty JSON instead.
    /// All the checkpoint records of `gid`, following the GCS's pages (`next`).
    async fn all_checkpoints(&self, gid: &str) -> Result<CheckpointList, Fault> {
        let mut all = CheckpointList::default();
        let mut req = GetCheckpoints::of(gid);
        loop {
            let path = format!(
                "/api/v1/jobs/{}/checkpoints{}",
                path_segment(gid),
                query(&[("after", req.after.map(|a| a.to_string()))])
            );
            let page: CheckpointList = self.client.get(&path).await?;
            let next = req.next_page(&page);
            all.checkpoints.extend(page.checkpoints);
            match next {
                Some(n) => req = n,
                None => return Ok(all),
            }
        }
    }

    fn show<T: DeserializeOwned + Serialize>(
        &self,
        response: Result<Value, Fault>,
        render: impl FnOnce(&T) -> String,
    ) -> Result<String, CliError> {
        let value = response?;
        let typed = serde_json::from_value::<T>(value.clone());
        if self.json {
            // Re-serialized from the message type, the fields keep the order the GCS wrote
            // them in; JSON this gcactl cannot read is printed as it came (keys sorted).
            let pretty = match &typed {
                Ok(t) => serde_json::to_string_pretty(t),
                Err(_) => serde_json::to_string_pretty(&value),
            };
            let mut out =
                pretty.map_err(|e| CliError::Local(format!("cannot print the response: {e}")))?;
            out.push('\n');
            return Ok(out);
        }
        let typed = typed.map_err(|e| {
            Fault::new(
                FaultKind::OperationFailed,
                format!(
                    "{} answered JSON this gcactl cannot read ({e}); --json prints it as it is",
                    self.client.base()
                ),
            )
        })?;
        Ok(render(&typed))
    }
}

fn find_request(args: FindCtsArgs) -> FindCts {
    FindCts {
        cts_type: args.cts_type,
        class: args.class,
        core_service: args.core_service,
        resource: args.resource,
        properties: args.properties,
        alive_within_secs: args.alive_within,
    }
}

fn read_descriptor(file: &Path) -> Result<String, CliError> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Local(format!("cannot read the descriptor from stdin: {e}")))?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|e| {
            CliError::Local(format!(
                "cannot read descriptor file {}: {e}",
                file.display()
            ))
        })
    }
}

/// `?k=v&...` from the pairs that have a value (percent-encoded); empty when none do.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", path_segment(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

// ---------------------------------------------------------------------------------------------
// Formatting helpers

/// RFC 3339 at seconds precision, UTC.
pub fn fmt_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn fmt_opt_time(t: Option<&DateTime<Utc>>) -> String {
    t.map(fmt_time).unwrap_or_else(|| "-".into())
}

fn or_dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn fmt_properties(props: &[Property]) -> String {
    if props.is_empty() {
        return "-".into();
    }
    props
        .iter()
        .map(|p| format!("{}={}", p.name, p.value))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

fn outcome(o: Registration) -> &'static str {
    o.as_str()
}

/// Quotes `s` for a POSIX shell: bare when it only holds characters no shell treats
/// specially, otherwise in single quotes (with `'` written as `'\''`).
pub fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A command line from words, each shell-quoted.
pub fn shell_join<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    words
        .into_iter()
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The wrapper, its parameters, `--`, then the job parameters.
pub fn recovery_command(wrapper: &WrapperSpec, job_parameters: &[String]) -> String {
    shell_join(
        std::iter::once(wrapper.name.as_str())
            .chain(wrapper.parameters.iter().map(String::as_str))
            .chain(std::iter::once("--"))
            .chain(job_parameters.iter().map(String::as_str)),
    )
}

fn wrapper_line(wrapper: &WrapperSpec) -> String {
    shell_join(
        std::iter::once(wrapper.name.as_str()).chain(wrapper.parameters.iter().map(String::as_str)),
    )
}

/// `NAME=value` lines, values shell-quoted, so they can be pasted after `env`.
fn environment_lines(env: &[Property]) -> Vec<String> {
    env.iter()
        .map(|p| format!("{}={}", p.name, shell_quote(&p.value)))
        .collect()
}

/// Appends `label: first` and further values on aligned continuation lines.
fn push_multi(out: &mut String, indent: &str, label: &str, width: usize, values: &[String]) {
    let label = format!("{label}:");
    match values.split_first() {
        None => out.push_str(&format!("{indent}{label:<width$}  -\n")),
        Some((first, rest)) => {
            out.push_str(&format!("{indent}{label:<width$}  {first}\n"));
            for v in rest {
                out.push_str(&format!("{indent}{:<width$}  {v}\n", ""));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Renderers

pub fn render_class_registered(r: &ClassRegistered) -> String {
    format!(
        "checkpointer class {}: {}\n",
        r.class.name,
        outcome(r.outcome)
    )
}

pub fn render_classes(list: &ClassList) -> String {
    if list.classes.is_empty() {
        return "no checkpointer classes registered\n".into();
    }
    let mut t = Table::new(&["NAME", "BUILTIN", "PROPERTIES", "DESCRIPTION"]);
    for c in &list.classes {
        t.row([
            c.name.clone(),
            yes_no(c.builtin),
            fmt_properties(&c.properties),
            or_dash(c.description.as_deref()),
        ]);
    }
    t.render()
}

pub fn render_descriptor_registered(r: &DescriptorRegistered) -> String {
    format!("CTS type {}: {}\n", r.cts_type.name, outcome(r.outcome))
}

pub fn render_types(list: &CtsTypeList) -> String {
    if list.types.is_empty() {
        return "no CTS types registered\n".into();
    }
    let mut t =
        Table::new(&["NAME", "CORE SERVICE", "CLASSES", "INSTANCES", "REGISTERED"]).right(3);
    for info in &list.types {
        let d = &info.descriptor;
        let core = match &d.core_service.version {
            Some(v) => format!("{} {v}", d.core_service.name),
            None => d.core_service.name.clone(),
        };
        t.row([
            d.name.clone(),
            core,
            fmt_list(&d.classes),
            info.instance_count.to_string(),
            fmt_time(&info.registered_at),
        ]);
    }
    t.render()
}

pub fn render_instances(list: &CtsInstanceList) -> String {
    if list.instances.is_empty() {
        return "no CTS instances registered\n".into();
    }
    let mut t = Table::new(&[
        "NAME",
        "TYPE",
        "RESOURCE",
        "URL",
        "EXECUTION MANAGER",
        "LAST SEEN",
        "PLATFORM",
    ]);
    for i in &list.instances {
        t.row([
            i.name.clone(),
            i.cts_type.clone(),
            i.resource.clone(),
            i.url.clone(),
            i.execution_manager.clone(),
            fmt_opt_time(i.last_seen.as_ref()),
            platform(i.facts.as_ref()),
        ]);
    }
    t.render()
}

/// A resource's restore facts in one cell: `x86_64 6.18.44 criu-4.1.1` (`-`: none reported).
fn platform(f: Option<&gca_protocol::facts::ResourceFacts>) -> String {
    match f {
        None => "-".into(),
        Some(f) => {
            let mut s = format!("{} {}", f.architecture, f.kernel);
            if let Some(v) = &f.criu_version {
                s.push_str(&format!(" criu-{v}"));
            }
            s
        }
    }
}

pub fn render_subscriptions(list: &SubscriptionList) -> String {
    if list.subscriptions.is_empty() {
        return "no subscriptions\n".into();
    }
    let mut t = Table::new(&[
        "ID",
        "CONSUMER",
        "TOPICS",
        "GID",
        "ENDS",
        "PENDING",
        "FAILED",
        "LAST ERROR",
    ])
    .right(5)
    .right(6);
    for s in &list.subscriptions {
        t.row([
            s.id.clone(),
            s.consumer.clone(),
            topics(s),
            s.gid.clone().unwrap_or("-".into()),
            fmt_opt_time(s.termination_time.as_ref()),
            s.pending.to_string(),
            s.failed.to_string(),
            s.last_error.clone().unwrap_or("-".into()),
        ]);
    }
    t.render()
}

fn topics(s: &SubscriptionInfo) -> String {
    if s.topics.is_empty() {
        "all".into()
    } else {
        s.topics.join(",")
    }
}

pub fn render_subscription(s: &SubscriptionInfo) -> String {
    key_values(&[
        ("ID", Some(s.id.clone())),
        ("Address", Some(s.address.clone())),
        ("Consumer", Some(s.consumer.clone())),
        ("Topics", Some(topics(s))),
        ("GID", s.gid.clone()),
        ("Created at", Some(fmt_time(&s.created_at))),
        (
            "Ends",
            Some(
                s.termination_time
                    .as_ref()
                    .map(fmt_time)
                    .unwrap_or("never".into()),
            ),
        ),
        ("Pending", Some(s.pending.to_string())),
        ("Failed", Some(s.failed.to_string())),
        ("Last error", s.last_error.clone()),
    ])
}

pub fn render_jobs(list: &JobList, filtered: bool) -> String {
    if list.jobs.is_empty() {
        return if filtered {
            "no registered jobs match\n".into()
        } else {
            "no jobs registered\n".into()
        };
    }
    let mut t = Table::new(&[
        "GID",
        "STATE",
        "CTS INSTANCE",
        "CTS TYPE",
        "CHECKPOINTS",
        "LATEST CHECKPOINT",
        "RECOVERIES",
        "UPDATED",
    ])
    .right(4)
    .right(6);
    for j in &list.jobs {
        t.row([
            j.gid.clone(),
            j.state.to_string(),
            j.cts_instance.clone(),
            j.cts_type.clone(),
            j.checkpoint_count.to_string(),
            or_dash(j.latest_checkpoint.as_deref()),
            j.recoveries.to_string(),
            fmt_time(&j.updated_at),
        ]);
    }
    t.render()
}

pub fn render_job(info: &JobInfo) -> String {
    let j = &info.job;
    key_values(&[
        ("GID", Some(j.gid.clone())),
        ("State", Some(j.state.to_string())),
        ("CTS instance", Some(j.cts_instance.clone())),
        ("CTS type", Some(j.cts_type.clone())),
        ("Local ID", j.local_id.clone()),
        ("Registered at", Some(fmt_time(&j.registered_at))),
        ("Updated at", Some(fmt_time(&j.updated_at))),
        ("Checkpoints", Some(j.checkpoint_count.to_string())),
        ("Latest checkpoint", j.latest_checkpoint.clone()),
        ("Recoveries", Some(j.recoveries.to_string())),
        ("Exit status", j.exit_status.map(|s| s.to_string())),
        ("Signal", j.signal.map(|s| s.to_string())),
        ("Retention", Some(j.retention.to_string())),
    ])
}

pub fn render_checkpoint(c: &CheckpointRecord) -> String {
    key_values(&[
        ("Checkpoint ID", Some(c.id.clone())),
        (
            "Sequence",
            Some(c.sequence.map(|s| s.to_string()).unwrap_or("-".into())),
        ),
        ("Image", Some(c.image_name.clone())),
        ("GID", Some(c.gid.clone())),
        ("CTS", Some(format!("{} ({})", c.cts_name, c.cts_type))),
        ("Taken at", Some(fmt_time(&c.taken_at))),
        ("Size", c.size_bytes.map(|b| format!("{b} bytes"))),
        ("Job stopped", Some(yes_no(c.job_stopped))),
        ("Image state", Some(image_state(c))),
        ("Image error", c.image_error.clone()),
    ])
}

/// `stored`, `kept in DIR`, `deleted`...
fn image_state(c: &CheckpointRecord) -> String {
    match &c.kept_in {
        Some(dir) => format!("{} in {dir}", c.image_state),
        None => c.image_state.to_string(),
    }
}

pub fn render_checkpoints(gid: &str, list: &CheckpointList) -> String {
    if list.checkpoints.is_empty() {
        return format!("no checkpoints registered for job {gid}\n");
    }
    let mut t = Table::new(&[
        "SEQ",
        "CHECKPOINT ID",
        "TAKEN AT",
        "ORIGIN",
        "CTS",
        "STOPPED",
        "SIZE",
        "IMAGE",
        "STATE",
    ])
    .right(0)
    .right(6);
    for c in &list.checkpoints {
        t.row([
            c.sequence.map(|s| s.to_string()).unwrap_or("-".into()),
            c.id.clone(),
            fmt_time(&c.taken_at),
            c.origin.to_string(),
            c.cts_name.clone(),
            yes_no(c.job_stopped),
            c.size_bytes.map(|b| b.to_string()).unwrap_or("-".into()),
            c.image_name.clone(),
            image_state(c),
        ]);
    }
    t.render()
}

pub fn render_recovery(r: &RecoveryInfo) -> String {
    let c = &r.checkpoint;
    let mut out = key_values(&[
        ("GID", Some(r.gid.clone())),
        ("Checkpoint", Some(c.id.clone())),
        ("Sequence", c.sequence.map(|s| s.to_string())),
        ("Taken at", Some(fmt_time(&c.taken_at))),
        ("Image", Some(c.image_name.clone())),
        ("CTS type", Some(r.cts_type.clone())),
        ("Original resource", r.original_resource.clone()),
        ("Same resource only", Some(yes_no(r.same_resource_only))),
    ]);
    if !c.locations.is_empty() {
        out.push_str(&format!("Locations ({}):\n", c.locations.len()));
        for l in &c.locations {
            out.push_str(&format!("  {}\n", location_line(l)));
        }
    }
    out.push('\n');
    if r.candidates.is_empty() {
        out.push_str(&format!(
            "no CTS instance of type {} registered that can recover this job{}\n",
            r.cts_type,
            match (&r.original_resource, r.same_resource_only) {
                (Some(res), true) => format!(" (it must run on {res})"),
                _ => String::new(),
            }
        ));
        return out;
    }
    out.push_str(&format!("Candidates ({}):\n", r.candidates.len()));
    for (n, cand) in r.candidates.iter().enumerate() {
        out.push('\n');
        render_candidate(&mut out, n + 1, cand);
    }
    out
}

/// `object-store s3://bucket/prefix: pending since 2026-…`, `cts cts-a: stored (URL)`.
fn location_line(l: &gca_protocol::messages::ImageLocation) -> String {
    let mut line = format!("{} {}: {}", l.kind, l.name, l.state);
    if let Some(t) = &l.since {
        line.push_str(&format!(" since {}", fmt_time(t)));
    }
    if let Some(u) = &l.url {
        line.push_str(&format!(" ({u})"));
    }
    if let Some(e) = &l.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

fn render_candidate(out: &mut String, n: usize, cand: &RecoveryCandidate) {
    let i = &cand.instance;
    out.push_str(&format!("  {n}. {}\n", i.name));
    const W: usize = "Environment:".len();
    let indent = "     ";
    for (label, value) in [
        ("Resource", i.resource.clone()),
        ("URL", i.url.clone()),
        (
            "Command",
            recovery_command(&cand.recovery_wrapper, &cand.job_parameters),
        ),
    ] {
        push_multi(out, indent, label, W, &[value]);
    }
    push_multi(
        out,
        indent,
        "Environment",
        W,
        &environment_lines(&cand.environment),
    );
    if let Some(c) = &cand.compatibility {
        push_multi(out, indent, "Verdict", W, &[c.verdict.to_string()]);
        if !c.reasons.is_empty() {
            push_multi(out, indent, "Why not", W, &c.reasons);
        }
        if !c.notes.is_empty() {
            push_multi(out, indent, "Notes", W, &c.notes);
        }
    }
}

pub fn render_offers(r: &FindCtsResponse) -> String {
    if r.offers.is_empty() {
        return "no matching CTS instances registered\n".into();
    }
    let mut t = Table::new(&[
        "INSTANCE",
        "TYPE",
        "RESOURCE",
        "URL",
        "EXECUTION MANAGER",
        "EXECUTE WRAPPER",
    ]);
    for o in &r.offers {
        let i = &o.instance;
        t.row([
            i.name.clone(),
            i.cts_type.clone(),
            i.resource.clone(),
            i.url.clone(),
            i.execution_manager.clone(),
            wrapper_line(&o.execute_wrapper),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use gca_protocol::messages::{CoreService, CtsInstance, CtsOffer, Origin};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 30, 15).unwrap()
            + chrono::Duration::microseconds(123_456)
    }

    fn instance(name: &str) -> CtsInstance {
        CtsInstance {
            name: name.into(),
            cts_type: "blcr-x86".into(),
            url: format!("http://{name}:9000/cts"),
            execution_manager: "http://em.example.org/gram".into(),
            resource: "node1".into(),
            registered_at: Some(t0()),
            last_seen: Some(t0()),
            facts: None,
        }
    }

    fn checkpoint() -> CheckpointRecord {
        CheckpointRecord {
            id: "ck-7".into(),
            gid: "job-1".into(),
            sequence: Some(3),
            cts_name: "cts-a".into(),
            cts_type: "blcr-x86".into(),
            taken_at: t0(),
            image_name: "images/job-1/ck-7".into(),
            execution_manager: "http://em.example.org/gram".into(),
            size_bytes: None,
            digest: None,
            parent: None,
            origin: Origin::External,
            job_stopped: false,
            registered_at: None,
            image_state: Default::default(),
            kept_in: None,
            image_error: None,
            owner: None,
            signature: None,
            facts: None,
            locations: Vec::new(),
        }
    }

    #[test]
    fn shell_quote_leaves_plain_words_bare() {
        assert_eq!(shell_quote("--gid=job-1"), "--gid=job-1");
        assert_eq!(shell_quote("/usr/bin/cr_restart"), "/usr/bin/cr_restart");
        assert_eq!(
            shell_quote("http://h:80/a,b@c+d%20"),
            "http://h:80/a,b@c+d%20"
        );
    }

    #[test]
    fn shell_quote_quotes_everything_else() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("two words"), "'two words'");
        assert_eq!(shell_quote("--gid={GID}"), "'--gid={GID}'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote("~user"), "'~user'");
        assert_eq!(shell_quote("a*b"), "'a*b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("line\nbreak"), "'line\nbreak'");
    }

    #[test]
    fn recovery_command_puts_the_job_parameters_after_a_double_dash() {
        let w = WrapperSpec {
            name: "gca-recover".into(),
            parameters: vec!["--image=ck 7".into(), "--gid=job-1".into()],
        };
        assert_eq!(
            recovery_command(&w, &["--resume".into(), "it's".into()]),
            r"gca-recover '--image=ck 7' --gid=job-1 -- --resume 'it'\''s'"
        );
        assert_eq!(
            recovery_command(&w, &[]),
            "gca-recover '--image=ck 7' --gid=job-1 --"
        );
    }

    #[test]
    fn times_are_rfc3339_seconds() {
        assert_eq!(fmt_time(&t0()), "2024-05-01T12:30:15Z");
        assert_eq!(fmt_opt_time(None), "-");
    }

    #[test]
    fn empty_lists_say_so() {
        assert_eq!(
            render_classes(&ClassList::default()),
            "no checkpointer classes registered\n"
        );
        assert_eq!(
            render_types(&CtsTypeList::default()),
            "no CTS types registered\n"
        );
        assert_eq!(
            render_instances(&CtsInstanceList::default()),
            "no CTS instances registered\n"
        );
        assert_eq!(
            render_jobs(&JobList::default(), false),
            "no jobs registered\n"
        );
        assert_eq!(
            render_checkpoints("job-1", &CheckpointList::default()),
            "no checkpoints registered for job job-1\n"
        );
        assert_eq!(
            render_offers(&FindCtsResponse::default()),
            "no matching CTS instances registered\n"
        );
    }

    #[test]
    fn class_list_is_a_table() {
        let list = ClassList {
            classes: vec![
                CheckpointerClass {
                    name: "basic".into(),
                    description: Some("any checkpointer".into()),
                    properties: vec![],
                    builtin: true,
                },
                CheckpointerClass {
                    name: "linux-x86".into(),
                    description: None,
                    properties: vec![Property::new("os", "linux"), Property::new("arch", "x86")],
                    builtin: false,
                },
            ],
        };
        assert_eq!(
            render_classes(&list),
            "NAME       BUILTIN  PROPERTIES          DESCRIPTION\n\
             basic      yes      -                   any checkpointer\n\
             linux-x86  no       os=linux, arch=x86  -\n"
        );
    }

    #[test]
    fn checkpoint_shows_id_sequence_and_image() {
        let out = render_checkpoint(&checkpoint());
        assert!(out.starts_with(
            "Checkpoint ID:  ck-7\nSequence:       3\nImage:          images/job-1/ck-7\n"
        ));
        assert!(
            out.contains("Taken at:       2024-05-01T12:30:15Z\n"),
            "{out}"
        );
    }

    #[test]
    fn recovery_info_lists_each_candidate_with_its_command_line() {
        let info = RecoveryInfo {
            gid: "job-1".into(),
            checkpoint: checkpoint(),
            cts_type: "blcr-x86".into(),
            same_resource_only: false,
            original_resource: Some("node1".into()),
            candidates: vec![RecoveryCandidate {
                instance: instance("cts-b"),
                recovery_wrapper: WrapperSpec {
                    name: "gca-recover".into(),
                    parameters: vec!["--image=ck-7".into(), "--cts=http://cts-b:9000/cts".into()],
                },
                job_parameters: vec!["--restart".into()],
                environment: vec![
                    Property::new("GCA_GID", "job-1"),
                    Property::new("NOTE", "two words"),
                ],
                compatibility: Some(gca_protocol::facts::Compatibility {
                    verdict: gca_protocol::facts::Verdict::Incompatible,
                    reasons: vec![
                        "kernel 6.1 < 6.18 needed by the image's vDSO".into(),
                        "/data/in.dat missing".into(),
                    ],
                    notes: vec![],
                }),
            }],
        };
        let out = render_recovery(&info);
        assert!(out.contains("Checkpoint:          ck-7\n"), "{out}");
        assert!(out.contains("CTS type:            blcr-x86\n"), "{out}");
        assert!(
            out.ends_with(
                "Candidates (1):\n\
                 \n  1. cts-b\n\
                 \x20    Resource:     node1\n\
                 \x20    URL:          http://cts-b:9000/cts\n\
                 \x20    Command:      gca-recover --image=ck-7 --cts=http://cts-b:9000/cts -- --restart\n\
                 \x20    Environment:  GCA_GID=job-1\n\
                 \x20                  NOTE='two words'\n\
                 \x20    Verdict:      incompatible\n\
                 \x20    Why not:      kernel 6.1 < 6.18 needed by the image's vDSO\n\
                 \x20                  /data/in.dat missing\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn instances_show_their_platform() {
        let mut a = instance("cts-a");
        a.facts = Some(gca_protocol::facts::ResourceFacts {
            architecture: "x86_64".into(),
            kernel: "6.18.44".into(),
            criu_version: Some("4.1.1".into()),
            cpuinfo: None,
        });
        let out = render_instances(&CtsInstanceList {
            instances: vec![a, instance("cts-b")],
        });
        assert!(out.lines().next().unwrap().ends_with("PLATFORM"), "{out}");
        assert!(out.contains("x86_64 6.18.44 criu-4.1.1"), "{out}");
        assert!(
            out.lines().nth(2).unwrap().trim_end().ends_with('-'),
            "{out}"
        );
    }

    #[test]
    fn recovery_info_lists_where_the_image_is() {
        use gca_protocol::messages::{ImageLocation, LocationState};
        let mut c = checkpoint();
        c.locations = vec![
            ImageLocation::cts("cts-a", "https://node-a/images/ck-1"),
            ImageLocation::object_store(
                "s3://gca/site",
                LocationState::Failed,
                Some("no route".into()),
            ),
        ];
        let info = RecoveryInfo {
            gid: "job-1".into(),
            checkpoint: c,
            cts_type: "criu".into(),
            same_resource_only: false,
            original_resource: None,
            candidates: vec![],
        };
        let out = render_recovery(&info);
        assert!(out.contains("Locations (2):\n"), "{out}");
        assert!(
            out.contains("  cts cts-a: stored (https://node-a/images/ck-1)\n"),
            "{out}"
        );
        assert!(
            out.contains("  object-store s3://gca/site: failed: no route\n"),
            "{out}"
        );
    }

    #[test]
    fn recovery_info_without_candidates_says_why() {
        let info = RecoveryInfo {
            gid: "job-1".into(),
            checkpoint: checkpoint(),
            cts_type: "blcr-x86".into(),
            same_resource_only: true,
            original_resource: Some("node1".into()),
            candidates: vec![],
        };
        assert!(render_recovery(&info).ends_with(
            "no CTS instance of type blcr-x86 registered that can recover this job \
             (it must run on node1)\n"
        ));
    }

    #[test]
    fn offers_show_the_execute_wrapper_patterns() {
        let r = FindCtsResponse {
            offers: vec![CtsOffer {
                instance: instance("cts-a"),
                core_service: CoreService {
                    name: "blcr".into(),
                    version: None,
                    external_checkpoints: true,
                    internal_checkpoints: false,
                    recover_on_other_resource: true,
                    recover_from_any_image: true,
                    properties: vec![],
                },
                classes: vec![],
                execute_wrapper: WrapperSpec {
                    name: "gca-execute".into(),
                    parameters: vec!["--gid={GID}".into(), "--cts={CTS_URL}".into()],
                },
                recovery_wrapper: WrapperSpec::default(),
                job_parameters: vec![],
                recovery_job_parameters: vec![],
                environment: vec![],
            }],
        };
        let out = render_offers(&r);
        let mut lines = out.lines();
        assert!(lines.next().unwrap().starts_with("INSTANCE  TYPE"));
        assert!(lines
            .next()
            .unwrap()
            .ends_with("gca-execute '--gid={GID}' '--cts={CTS_URL}'"));
    }

    #[test]
    fn query_strings_skip_missing_values_and_encode_the_rest() {
        assert_eq!(query(&[("a", None)]), "");
        assert_eq!(
            query(&[
                ("state", Some("running".into())),
                ("x", None),
                ("after", Some("job 1/2&3".into())),
            ]),
            "?state=running&after=job%201%2F2%263"
        );
    }

    #[test]
    fn faults_map_to_exit_codes() {
        let code = |k| CliError::Fault(Fault::new(k, "m")).exit_code();
        assert_eq!(code(FaultKind::ResourceUnknown), EXIT_NOT_FOUND);
        assert_eq!(code(FaultKind::ServiceUnavailable), EXIT_UNAVAILABLE);
        assert_eq!(code(FaultKind::Conflict), EXIT_FAILURE);
        assert_eq!(code(FaultKind::InvalidDescriptor), EXIT_FAILURE);
        assert_eq!(CliError::Local("x".into()).exit_code(), EXIT_FAILURE);
        assert_eq!(
            CliError::Fault(Fault::new(FaultKind::ResourceUnknown, "no job x")).to_string(),
            "ResourceUnknown: no job x"
        );
    }
}
