//! `gcactl pki`: the site CA, run locally (no GCS involved).

use chrono::{SecondsFormat, Utc};
use gca_pki::{IssueRequest, SiteCa};
use gca_protocol::identity::{CertificateFacts, Identity};

use crate::cli::PkiCommand;
use crate::commands::CliError;
use crate::table::key_values;

fn local(e: anyhow::Error) -> CliError {
    CliError::Local(format!("{e:#}"))
}

pub fn run(command: PkiCommand, json: bool) -> Result<String, CliError> {
    match command {
        PkiCommand::Init { dir, site } => {
            let ca = SiteCa::init(&dir, &site).map_err(local)?;
            Ok(format!(
                "made the site CA {}\n  certificate (give it to every component and client): {}\n  key (keep it here, mode 0600): {}\nnext: gcactl pki issue --dir {} --role gcs --name NAME --host HOST\n",
                dir.display(),
                ca.cert_path().display(),
                dir.join(gca_pki::CA_KEY).display(),
                dir.display()
            ))
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            hosts,
            days,
            out,
        } => {
            let identity = Identity::new(role, name).map_err(CliError::Local)?;
            let ca = SiteCa::load(&dir).map_err(local)?;
            let mut req = IssueRequest::new(identity.clone()).hosts(hosts);
            req.days = days;
            let issued = ca.issue(&req).map_err(local)?;
            let prefix =
                out.unwrap_or_else(|| dir.join(format!("{}-{}", identity.role, identity.name)));
            let (cert, key) = issued.write(&prefix).map_err(local)?;
            Ok(format!(
                "issued {identity} (valid {days} days)\n  certificate: {}\n  key: {}\n",
                cert.display(),
                key.display()
            ))
        }
        PkiCommand::Show { file } => {
            let facts = gca_pki::show(&file).map_err(local)?;
            if json {
                let mut out = serde_json::to_string_pretty(&facts)
                    .map_err(|e| CliError::Local(e.to_string()))?;
                out.push('\n');
                return Ok(out);
            }
            Ok(facts.iter().map(render).collect::<Vec<_>>().join("\n"))
        }
    }
}

fn render(f: &CertificateFacts) -> String {
    let now = Utc::now();
    let state = if f.not_after < now {
        "EXPIRED"
    } else if f.not_before > now {
        "not yet valid"
    } else {
        "valid"
    };
    let identity = match f.identity(&[]) {
        Some(i) => i.to_string(),
        None if f.is_ca => "(a CA)".to_string(),
        None => "(none: map it with an identity rule)".to_string(),
    };
    let t = |d: &chrono::DateTime<Utc>| d.to_rfc3339_opts(SecondsFormat::Secs, true);
    key_values(&[
        ("identity", Some(identity)),
        ("subject", Some(f.subject.clone())),
        ("issuer", Some(f.issuer.clone())),
        ("serial", Some(f.serial.clone())),
        ("names", Some(f.sans.join(", "))),
        (
            "valid",
            Some(format!(
                "{} until {} ({state})",
                t(&f.not_before),
                t(&f.not_after)
            )),
        ),
    ])
}
