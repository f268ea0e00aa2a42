//! The command line: clap types and argument parsers.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use gca_protocol::messages::{JobState, Property};

/// Exit status: the GCS refused or failed the request, or a local error.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: bad arguments (clap's own usage errors use it too).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the thing named does not exist (`ResourceUnknown`).
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit status: the GCS, or a CTS it had to call, could not be reached (`ServiceUnavailable`).
pub const EXIT_UNAVAILABLE: u8 = 4;

const GLOBAL: &str = "Global options";

const LONG_ABOUT: &str = "\
Admin and broker command line for the Grid Checkpoint Service (GCS).

gcactl talks to the JSON API of the GCS (/api/v1 under --gcs, or GCA_GCS_URL). For an https
GCS, give the CA that signed its certificate with --ca (the system roots are not used), and a
client certificate with --cert and --key when the GCS requires one.

Output is an aligned table by default; with --json, the GCS response is printed as pretty
JSON instead. Errors are printed to stderr as `gcactl: <kind>: <message>`.

Exit status:
  0  success
  1  the GCS refused or failed the request (Conflict, InvalidMessage, InvalidDescriptor,
     AccessDenied, OperationFailed, Internal, ...), or a local error (unreadable file,
     unusable TLS files)
  2  usage error: bad or missing arguments
  3  not found: the GID, checkpoint, class, CTS type or CTS instance named does not exist
     (ResourceUnknown)
  4  unavailable: the GCS, or the CTS it had to call, could not be reached or did not answer
     in time (ServiceUnavailable)";

#[derive(Debug, Parser)]
#[command(
    name = "gcactl",
    version,
    about = "Admin and broker command line for the Grid Checkpoint Service",
    long_about = LONG_ABOUT,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Root URL of the Grid Checkpoint Service.
    #[arg(
        long,
        global = true,
        env = "GCA_GCS_URL",
        help_heading = GLOBAL,
        default_value = "http://127.0.0.1:8080",
        value_name = "URL",
        value_parser = parse_url
    )]
    pub gcs: String,

    /// Print the GCS response as pretty JSON instead of a table.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    /// CA certificate(s) (PEM) to trust for an https GCS.
    #[arg(long, global = true, env = "GCA_CA", value_name = "FILE", help_heading = GLOBAL)]
    pub ca: Option<PathBuf>,

    /// Client certificate (PEM), for a GCS that requires client authentication.
    #[arg(
        long,
        global = true,
        env = "GCA_CERT",
        help_heading = GLOBAL,
        value_name = "FILE",
        requires = "key"
    )]
    pub cert: Option<PathBuf>,

    /// Private key (PEM) of the client certificate.
    #[arg(
        long,
        global = true,
        env = "GCA_KEY",
        help_heading = GLOBAL,
        value_name = "FILE",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,

    /// Request timeout in seconds [default: 30; 120 for `checkpoint`].
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        help_heading = GLOBAL,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: Option<u64>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register and list checkpointer classes.
    #[command(subcommand)]
    Class(ClassCommand),

    /// Register, list and remove CTS types (CTS descriptors).
    #[command(subcommand)]
    Type(TypeCommand),

    /// List and remove running CTS instances.
    #[command(subcommand)]
    Instance(InstanceCommand),

    /// List jobs and show one job.
    #[command(subcommand)]
    Job(JobCommand),

    /// The site CA: make one, issue certificates for GCA identities, show certificates.
    /// Runs locally; needs no GCS.
    #[command(subcommand)]
    Pki(PkiCommand),

    /// Notification subscriptions: list them with their delivery backlog, add, remove.
    #[command(subcommand)]
    Subscription(SubscriptionCommand),

    /// Checkpoint a job now (doCheckpoint), through the CTS in charge of it.
    #[command(
        long_about = "Checkpoint a job now (doCheckpoint): the GCS forwards the request to \
                      the CTS in charge of the job and answers with the new checkpoint.\n\n\
                      This can take a while; the request timeout is 120 seconds unless \
                      --timeout says otherwise."
    )]
    Checkpoint {
        /// Global identifier of the job.
        gid: String,
        /// Stop the job after the checkpoint (e.g. to migrate it).
        #[arg(long)]
        stop: bool,
    },

    /// List the checkpoints of a job.
    Checkpoints {
        /// Global identifier of the job.
        gid: String,
    },

    /// Show where and how a job can be recovered from one of its checkpoints.
    RecoveryInfo {
        /// Global identifier of the job.
        gid: String,
        /// The checkpoint (image) ID to recover from, or `latest`.
        #[arg(long, value_name = "ID|latest", default_value = "latest")]
        image: String,
    },

    /// Let a CTS take a job over by a recovery although it may still run elsewhere (a clone,
    /// or a migration you drive); otherwise a recovery moves a job only when it failed, was
    /// stopped for migration, or its CTS is lost.
    AuthorizeRecovery {
        /// Global identifier of the job.
        gid: String,
        /// The CTS instance that will recover it.
        #[arg(long = "on", value_name = "CTS")]
        cts_instance: String,
        /// Only a recovery from this checkpoint (image) ID.
        #[arg(long, value_name = "ID")]
        image: Option<String>,
    },

    /// Find CTS instances a job can be submitted to (all criteria given must match).
    FindCts(FindCtsArgs),

    /// Set what is kept of a job's checkpoint images when it ends.
    #[command(
        long_about = "Set what is kept of a job's checkpoint images when it ends (it exits with \
                      status 0, or its resource is destroyed). By default they are all \
                      deleted; --keep-last N or --keep-all move the newest N (or all) into \
                      --keep-in DIR, a directory of the job's owner on the resource holding \
                      each image. On a job that has ended already, the policy is applied at \
                      once to the images still stored.",
        group(clap::ArgGroup::new("keep").required(true).multiple(false))
    )]
    Retention {
        /// Global identifier of the job.
        gid: String,
        #[command(flatten)]
        retention: RetentionArgs,
    },
}

/// A retention policy on the command line.
#[derive(Debug, clap::Args)]
#[group(skip)]
pub struct RetentionArgs {
    /// Keep the N most recent images.
    #[arg(long, value_name = "N", group = "keep")]
    pub keep_last: Option<u32>,
    /// Keep every image.
    #[arg(long, group = "keep")]
    pub keep_all: bool,
    /// Keep nothing: delete the images when the job ends (the default policy).
    #[arg(long, group = "keep")]
    pub keep_none: bool,
    /// The owner's directory to move kept images to (with --keep-last or --keep-all).
    #[arg(long, value_name = "DIR")]
    pub keep_in: Option<String>,
}

impl RetentionArgs {
    /// The policy, checked.
    pub fn to_retention(
        &self,
    ) -> Result<gca_protocol::messages::Retention, crate::commands::CliError> {
        use gca_protocol::messages::{Keep, Retention};
        let r = Retention {
            keep: match (self.keep_last, self.keep_all) {
                (Some(_), _) => Keep::Last,
                (None, true) => Keep::All,
                (None, false) => Keep::None,
            },
            keep_last: self.keep_last,
            keep_in: self.keep_in.clone(),
        };
        r.validate().map_err(crate::commands::CliError::Local)?;
        Ok(r)
    }
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a site CA in DIR (ca.pem for everyone, ca.key readable by its owner only).
    Init {
        /// The CA's directory (created 0700).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The site's name, in the CA's subject.
        #[arg(long, value_name = "NAME", default_value = "gca")]
        site: String,
    },
    /// Issue a certificate carrying a GCA identity (urn:gca:role:ROLE:NAME).
    #[command(
        long_about = "Issue a certificate carrying a GCA identity: a URI subject                              alternative name urn:gca:role:ROLE:NAME, which the GCS and the                              CTSes read. Servers (gcs, cts) need --host for every name or                              address clients reach them at. Writes PREFIX.pem and PREFIX.key                              (mode 0600); PREFIX defaults to DIR/ROLE-NAME."
    )]
    Issue {
        /// The CA's directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// admin, broker, cts, gcs or user.
        #[arg(long, value_name = "ROLE")]
        role: gca_protocol::identity::Role,
        /// The holder's name (a CTS's instance name; 1-64 of [A-Za-z0-9._-]).
        #[arg(long, value_name = "NAME")]
        name: String,
        /// A host name or IP address the holder serves at (repeatable).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Where to write it: PREFIX.pem and PREFIX.key.
        #[arg(long, value_name = "PREFIX")]
        out: Option<PathBuf>,
    },
    /// Show what certificates in a PEM file are: identity, subject, issuer, validity.
    Show {
        /// A PEM certificate file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClassCommand {
    /// Register a checkpointer class (or update its description and properties).
    Add {
        /// Name of the class.
        name: String,
        /// What the class stands for.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// A property every member of the class must have (repeatable).
        #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        properties: Vec<Property>,
    },
    /// List the checkpointer classes.
    List,
}

#[derive(Debug, Subcommand)]
pub enum TypeCommand {
    /// Register a CTS type from a CTS descriptor XML file.
    Register {
        /// The descriptor file (`-` reads standard input).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// List the registered CTS types.
    List,
    /// Remove a CTS type (it must have no instances left).
    Remove {
        /// Name of the CTS type.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// List the registered CTS instances.
    List,
    /// Remove a CTS instance.
    Remove {
        /// Name of the CTS instance.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// List live subscriptions with pending and failed notifications.
    List,
    /// Show one subscription.
    Show {
        /// Subscription ID.
        id: String,
    },
    /// Subscribe a consumer URL: the GCS POSTs WS-BaseNotification Notify messages to it.
    Add {
        /// The consumer's http(s) URL.
        consumer: String,
        /// A topic (CheckpointTaken, JobRegistered, JobRecovered, JobFinished,
        /// CTSRegistered, CTSLost); repeatable; none: every topic.
        #[arg(long = "topic", value_name = "TOPIC")]
        topics: Vec<String>,
        /// Only events about this job.
        #[arg(long, value_name = "GID")]
        gid: Option<String>,
        /// Seconds until the subscription ends (0: never; default: the GCS's default).
        #[arg(long, value_name = "SECS")]
        lifetime: Option<u64>,
    },
    /// Unsubscribe.
    Remove {
        /// Subscription ID.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List jobs, ordered by GID.
    List {
        /// Only jobs in this state.
        #[arg(long, value_name = "STATE", value_parser = job_state_parser())]
        state: Option<JobState>,
        /// Only jobs under this CTS instance.
        #[arg(long = "cts", value_name = "NAME")]
        cts_instance: Option<String>,
        /// Return at most N jobs.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        limit: Option<i64>,
        /// Only jobs whose GID sorts after this one (for paging).
        #[arg(long, value_name = "GID")]
        after: Option<String>,
    },
    /// Show one job.
    Show {
        /// Global identifier of the job.
        gid: String,
    },
}

#[derive(Debug, Args)]
pub struct FindCtsArgs {
    /// CTS type.
    #[arg(long = "type", value_name = "TYPE")]
    pub cts_type: Option<String>,
    /// Checkpointer class the CTS type must belong to.
    #[arg(long, value_name = "CLASS")]
    pub class: Option<String>,
    /// Core checkpointing service (e.g. blcr).
    #[arg(long, value_name = "NAME")]
    pub core_service: Option<String>,
    /// Computing resource the CTS runs on.
    #[arg(long, value_name = "RESOURCE")]
    pub resource: Option<String>,
    /// A property the core service must have, exactly (repeatable).
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub properties: Vec<Property>,
    /// Only instances heard from within the last SECS seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(i64).range(1..))]
    pub alive_within: Option<i64>,
}

/// Parses `KEY=VALUE` (split at the first `=`; the value may be empty or hold more `=`).
pub fn parse_key_value(s: &str) -> Result<Property, String> {
    match s.split_once('=') {
        None => Err(format!(
            "expected KEY=VALUE, but {s:?} has no '=' (write KEY= for an empty value)"
        )),
        Some(("", _)) => Err(format!("expected KEY=VALUE, but {s:?} has an empty KEY")),
        Some((k, v)) => Ok(Property::new(k, v)),
    }
}

/// Accepts `http://` and `https://` URLs only, so a missing scheme is a usage error rather
/// than an unreachable service.
fn parse_url(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not an http:// or https:// URL (e.g. http://127.0.0.1:8080)"
        )),
    }
}

fn job_state_parser() -> impl TypedValueParser<Value = JobState> {
    PossibleValuesParser::new([
        JobState::Running.as_str(),
        JobState::Recovering.as_str(),
        JobState::Stopped.as_str(),
        JobState::Finished.as_str(),
    ])
    .try_map(|s| s.parse::<JobState>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn key_value_splits_at_the_first_equals_sign() {
        assert_eq!(
            parse_key_value("arch=x86_64"),
            Ok(Property::new("arch", "x86_64"))
        );
        assert_eq!(
            parse_key_value("opts=a=b"),
            Ok(Property::new("opts", "a=b"))
        );
        assert_eq!(parse_key_value("empty="), Ok(Property::new("empty", "")));
    }

    #[test]
    fn key_value_without_equals_or_key_is_refused() {
        let e = parse_key_value("arch").unwrap_err();
        assert!(e.contains("no '='"), "{e}");
        let e = parse_key_value("=x86_64").unwrap_err();
        assert!(e.contains("empty KEY"), "{e}");
    }

    #[test]
    fn key_value_without_equals_is_a_usage_error() {
        let err = Cli::try_parse_from(["gcactl", "find-cts", "--property", "arch"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), i32::from(EXIT_USAGE));
        assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn properties_repeat_and_globals_go_anywhere() {
        let cli = Cli::try_parse_from([
            "gcactl",
            "class",
            "add",
            "linux-x86",
            "--property",
            "os=linux",
            "--property",
            "arch=x86_64",
            "--json",
            "--gcs",
            "https://gcs.example.org:8443/",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.gcs, "https://gcs.example.org:8443/");
        match cli.command {
            Command::Class(ClassCommand::Add {
                name, properties, ..
            }) => {
                assert_eq!(name, "linux-x86");
                assert_eq!(
                    properties,
                    vec![
                        Property::new("os", "linux"),
                        Property::new("arch", "x86_64")
                    ]
                );
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn job_states_and_urls_are_checked() {
        let cli = Cli::try_parse_from(["gcactl", "job", "list", "--state", "stopped"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Job(JobCommand::List {
                state: Some(JobState::Stopped),
                ..
            })
        ));
        assert!(Cli::try_parse_from(["gcactl", "job", "list", "--state", "zombie"]).is_err());
        assert!(
            Cli::try_parse_from(["gcactl", "--gcs", "localhost:8080", "class", "list"]).is_err()
        );
        assert!(Cli::try_parse_from(["gcactl", "--gcs", "http://", "class", "list"]).is_err());
    }

    #[test]
    fn cert_and_key_go_together() {
        let err = Cli::try_parse_from(["gcactl", "--cert", "c.pem", "class", "list"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn recovery_image_defaults_to_latest() {
        let cli = Cli::try_parse_from(["gcactl", "recovery-info", "job-1"]).unwrap();
        match cli.command {
            Command::RecoveryInfo { gid, image } => {
                assert_eq!(gid, "job-1");
                assert_eq!(image, "latest");
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
