//! docker-compose.yml and the Dockerfile against the binaries they run. No Docker engine runs
//! here, so the files are read, not run: every service's command (and healthcheck) is parsed
//! against the real binary's `--help`, every environment variable must be one the binary reads
//! (its config's `apply_env`, or a clap `env`) and its value must be accepted by the config
//! types, the CTS's configuration file must load, and ports, URLs, dependencies and the image
//! must agree with each other.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gca_protocol::transport::TlsConfig;
use integration_tests::wrappers::binary;
use yaml_rust2::{Yaml, YamlLoader};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The binaries the image holds; a command starting with one of them is checked against it.
const OUR_BINARIES: &[&str] = &["gcs", "cts", "gcactl", "gca-exec", "gca-recover"];
/// Read by every binary (tracing's filter), not by a config type.
const COMMON_ENV: &[&str] = &["RUST_LOG"];

struct Compose {
    services: BTreeMap<String, Yaml>,
    volumes: BTreeSet<String>,
}

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A mapping with its `<<` merge keys applied (compose resolves them; YAML 1.2 parsers do not).
fn merged(node: &Yaml) -> BTreeMap<String, Yaml> {
    let hash = node.as_hash().expect("a mapping");
    let mut out = BTreeMap::new();
    if let Some(base) = hash.get(&Yaml::String("<<".into())) {
        out.extend(merged(base));
    }
    for (k, v) in hash {
        let k = k.as_str().expect("string keys").to_string();
        if k != "<<" {
            out.insert(k, v.clone());
        }
    }
    out
}

fn load() -> Compose {
    let docs = YamlLoader::load_from_str(&repo_file("docker-compose.yml")).expect("valid YAML");
    let doc = &docs[0];
    let services = doc["services"]
        .as_hash()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect();
    let volumes = doc["volumes"]
        .as_hash()
        .map(|h| h.keys().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    Compose { services, volumes }
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .unwrap_or_else(|| panic!("a list, not {node:?}"))
        .iter()
        .map(|x| match x {
            Yaml::String(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            other => panic!("not a string: {other:?}"),
        })
        .collect()
}

fn environment(service: &BTreeMap<String, Yaml>) -> BTreeMap<String, String> {
    let Some(env) = service.get("environment") else {
        return BTreeMap::new();
    };
    env.as_hash()
        .expect("environment as a mapping")
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("{k:?}: {other:?}"),
            };
            (k.as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// `{bin} {path...} --help`.
fn help(bin: &str, path: &[String]) -> String {
    let out = std::process::Command::new(binary(bin))
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin} {path:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The long options of a help text, and whether each takes a value.
fn long_flags(help: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for line in help.lines().map(str::trim).filter(|l| l.starts_with('-')) {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        for (i, t) in tokens.iter().enumerate() {
            if let Some(name) = t.strip_prefix("--") {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                let takes = tokens.get(i + 1).is_some_and(|n| n.starts_with('<'));
                out.insert(name, takes);
                break;
            }
        }
    }
    out
}

/// The subcommands of a help text ("Commands:" section).
fn subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Environment variables a help text names (`[env: NAME=]`).
fn help_env(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .filter_map(|s| s.split('=').next().map(str::to_string))
        .collect()
}

/// Checks `argv` against the binary's command line: every subcommand exists, every option is
/// one of the command's (with its value), positionals only where the usage has some. Returns
/// the options given (name → value) and the help texts seen.
fn check_command(what: &str, argv: &[String]) -> (BTreeMap<String, String>, String) {
    let bin = argv[0].as_str();
    assert!(
        OUR_BINARIES.contains(&bin),
        "{what}: {bin} is not in the image"
    );
    let mut path: Vec<String> = Vec::new();
    let mut text = help(bin, &path);
    let mut all_help = text.clone();
    let mut given = BTreeMap::new();
    let mut i = 1;
    while i < argv.len() {
        let arg = &argv[i];
        if let Some(flag) = arg.strip_prefix("--") {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            let flags = long_flags(&text);
            let takes = *flags
                .get(name)
                .unwrap_or_else(|| panic!("{what}: `{bin} {}` has no --{name}", path.join(" ")));
            let value = match (takes, inline) {
                (true, Some(v)) => v,
                (true, None) => {
                    i += 1;
                    argv.get(i)
                        .unwrap_or_else(|| panic!("{what}: --{name} needs a value"))
                        .clone()
                }
                (false, None) => String::new(),
                (false, Some(_)) => panic!("{what}: --{name} takes no value"),
            };
            given.insert(name.to_string(), value);
        } else if !subcommands(&text).is_empty() {
            assert!(
                subcommands(&text).contains(arg),
                "{what}: `{bin} {}` has no subcommand {arg:?}",
                path.join(" ")
            );
            path.push(arg.clone());
            text = help(bin, &path);
            all_help.push_str(&text);
        } else {
            let usage = text.lines().find(|l| l.starts_with("Usage:")).unwrap_or("");
            assert!(
                usage.contains('<') || usage.contains("[ARGS"),
                "{what}: `{bin} {}` takes no argument {arg:?} ({usage})",
                path.join(" ")
            );
        }
        i += 1;
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("Usage:") && l.contains("<COMMAND>")),
        "{what}: `{bin} {}` needs a subcommand",
        path.join(" ")
    );
    (given, all_help)
}

/// The environment variables a config's `apply_env` reads.
fn read_by(apply: impl FnOnce(&dyn Fn(&str) -> Option<String>)) -> BTreeSet<String> {
    let asked = RefCell::new(BTreeSet::new());
    apply(&|k: &str| {
        asked.borrow_mut().insert(k.to_string());
        None
    });
    asked.into_inner()
}

/// `(image path, repository path)` of the Dockerfile's `COPY <repo dir> <image dir>` lines.
fn copied_dirs() -> Vec<(String, String)> {
    repo_file("Dockerfile")
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from") && !l.starts_with(". "))
        .filter_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            (parts.len() == 2).then(|| (parts[1].to_string(), parts[0].to_string()))
        })
        .collect()
}

/// The repository file an absolute path of the image comes from (through `COPY`).
fn in_repo(image_path: &str) -> PathBuf {
    for (image_dir, repo_dir) in copied_dirs() {
        if let Some(rest) = image_path.strip_prefix(&format!("{image_dir}/")) {
            return Path::new(REPO).join(repo_dir).join(rest);
        }
    }
    panic!("{image_path} is not copied into the image by the Dockerfile")
}

/// The container port of a `"host:container"` mapping.
fn container_ports(service: &BTreeMap<String, Yaml>) -> Vec<u16> {
    service
        .get("ports")
        .map(strings)
        .unwrap_or_default()
        .iter()
        .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

/// Secure by default: mutual TLS (not `insecure`), with files from a volume the service mounts.
fn check_tls(name: &str, service: &BTreeMap<String, Yaml>, tls: Option<&TlsConfig>) {
    let tls = tls.unwrap_or_else(|| panic!("{name} runs without TLS"));
    let mounts: Vec<String> = service
        .get("volumes")
        .map(strings)
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.split(':').nth(1).map(str::to_string))
        .collect();
    for file in [&tls.ca, &tls.cert, &tls.key] {
        assert!(
            mounts.iter().any(|m| file.starts_with(m)),
            "{name}: {} is in no volume it mounts ({mounts:?})",
            file.display()
        );
    }
}

fn url_host_port(url: &str) -> (String, u16) {
    let u = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    (
        u.host_str().unwrap().to_string(),
        u.port_or_known_default().unwrap(),
    )
}

#[test]
fn every_service_runs_our_binaries_with_their_real_options() {
    let compose = load();
    let names: BTreeSet<&str> = compose.services.keys().map(String::as_str).collect();
    for required in ["postgres", "gcs", "cts"] {
        assert!(names.contains(required), "no {required} service");
    }
    let mut checked = BTreeSet::new();
    let mut listen_ports: BTreeMap<String, u16> = BTreeMap::new();
    let gcs_reads = read_by(|var| gcs::Config::default().apply_env(var).unwrap());

    for (name, node) in &compose.services {
        let service = merged(node);
        // Dependencies and volumes name what the file declares.
        if let Some(deps) = service.get("depends_on") {
            for dep in merged(deps).keys() {
                assert!(names.contains(dep.as_str()), "{name} depends on {dep}");
            }
        }
        for v in service.get("volumes").map(strings).unwrap_or_default() {
            let source = v.split(':').next().unwrap();
            if !source.starts_with('.') && !source.starts_with('/') {
                assert!(compose.volumes.contains(source), "{name}: volume {source}");
            }
        }
        if let Some(check) = service.get("healthcheck") {
            let test = strings(&check["test"]);
            if test[0] == "CMD" && OUR_BINARIES.contains(&test[1].as_str()) {
                check_command(&format!("{name} healthcheck"), &test[1..]);
            }
        }
        let Some(command) = service.get("command").map(strings) else {
            continue;
        };
        if !OUR_BINARIES.contains(&command[0].as_str()) {
            continue;
        }
        assert!(
            service.contains_key("build"),
            "{name} runs {} but does not use the image the Dockerfile builds",
            command[0]
        );
        let (given, help_text) = check_command(name, &command);
        let env = environment(&service);
        let mut known: BTreeSet<String> = help_env(&help_text);
        known.extend(COMMON_ENV.iter().map(|s| s.to_string()));
        match command[0].as_str() {
            "gcs" => {
                known.extend(gcs_reads.iter().cloned());
                let mut config = gcs::Config::default();
                config
                    .apply_env(|k| env.get(k).cloned())
                    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                if let Some(l) = given.get("listen") {
                    config.listen = l.parse().unwrap();
                }
                assert!(
                    !config.listen.ip().is_loopback(),
                    "{name} listens on {} only: unreachable from outside its container",
                    config.listen
                );
                // The database URL comes from a Docker secret (a file) the user makes.
                let secrets = service.get("secrets").map(strings).unwrap_or_default();
                match (&config.database_url, &config.database_url_file) {
                    (Some(db), _) => {
                        let (host, _) = url_host_port(db.expose());
                        assert!(
                            names.contains(host.as_str()),
                            "{name}: database host {host}"
                        );
                    }
                    (None, Some(file)) => {
                        let secret = file
                            .strip_prefix("/run/secrets")
                            .unwrap_or_else(|_| panic!("{name}: {} is no secret", file.display()));
                        assert!(
                            secrets.contains(&secret.display().to_string()),
                            "{name} does not mount the secret {}",
                            secret.display()
                        );
                    }
                    (None, None) => panic!("{name}: no database URL"),
                }
                check_tls(name, &service, config.tls.as_ref());
                assert!(!config.insecure, "{name} is insecure");
                listen_ports.insert(name.clone(), config.listen.port());
                assert_eq!(
                    container_ports(&service),
                    [config.listen.port()],
                    "{name}: published port vs listen"
                );
            }
            "cts" => {
                let file = given.get("config").expect("cts --config");
                let path = in_repo(file);
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let base = cts::config::Config::from_toml(&text)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                known.extend(read_by(|var| base.clone().apply_env(var).unwrap()));
                let mut config = base;
                config
                    .apply_env(|k| env.get(k).cloned())
                    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                check_tls(name, &service, config.tls.as_ref());
                assert!(
                    config.gcs_url.starts_with("https://"),
                    "{name}: {}",
                    config.gcs_url
                );
                // The descriptor, relative to the configuration file (as `Config::load` does).
                let descriptor = path.parent().unwrap().join(&config.descriptor);
                assert!(descriptor.is_file(), "{}", descriptor.display());
                let cts_type =
                    gca_protocol::descriptor::parse(&std::fs::read_to_string(&descriptor).unwrap())
                        .unwrap_or_else(|e| panic!("{}: {e}", descriptor.display()))
                        .name;
                assert!(
                    service
                        .get("privileged")
                        .and_then(Yaml::as_bool)
                        .unwrap_or(false)
                        || !matches!(config.driver, cts::config::DriverConfig::Criu(_)),
                    "{name} drives CRIU unprivileged"
                );
                assert!(
                    !config.listen.ip().is_loopback(),
                    "{name}: {}",
                    config.listen
                );
                assert_eq!(container_ports(&service), [config.listen.port()]);
                // The GCS it reports to is a service of this file, at the port it listens on.
                let (gcs_host, gcs_port) = url_host_port(&config.gcs_url);
                let gcs_service = merged(&compose.services[&gcs_host]);
                assert_eq!(
                    strings(&gcs_service["command"])[0],
                    "gcs",
                    "{name}: CTS_GCS_URL names {gcs_host}"
                );
                listen_ports.insert(format!("{name}->gcs"), gcs_port);
                // Others reach it at its own service name and port.
                let public = config.public_url.clone().expect("a public URL");
                assert_eq!(url_host_port(&public), (name.clone(), config.listen.port()));
                // Its type is registered before it starts, by a service it depends on.
                let registrar = merged(&service["depends_on"])
                    .keys()
                    .find(|dep| {
                        merged(&compose.services[dep.as_str()])
                            .get("command")
                            .map(strings)
                            .is_some_and(|c| c.contains(&"register".to_string()))
                    })
                    .cloned()
                    .unwrap_or_else(|| panic!("{name} depends on no type registration"));
                let reg = strings(&merged(&compose.services[&registrar])["command"]);
                let registered = in_repo(reg.last().unwrap());
                let registered =
                    gca_protocol::descriptor::parse(&std::fs::read_to_string(&registered).unwrap())
                        .unwrap();
                assert_eq!(
                    registered.name, cts_type,
                    "{registrar} registers another type"
                );
            }
            "gcactl" => {
                // The files it is given are in the image.
                for arg in command.iter().filter(|a| a.starts_with('/')) {
                    assert!(in_repo(arg).is_file(), "{name}: {arg}");
                }
                if let Some(url) = given.get("gcs") {
                    let (host, port) = url_host_port(url);
                    listen_ports.insert(format!("{name}->{host}"), port);
                }
            }
            _ => {}
        }
        for key in env.keys() {
            assert!(
                known.contains(key),
                "{name}: {} reads no environment variable {key} (it reads {known:?})",
                command[0]
            );
        }
        checked.insert(command[0].clone());
    }
    for bin in ["gcs", "cts", "gcactl"] {
        assert!(checked.contains(bin), "no service runs {bin}");
    }
    // Whoever calls the GCS calls it at the port it listens on.
    let gcs_port = listen_ports["gcs"];
    for (who, port) in &listen_ports {
        if who.ends_with("->gcs") {
            assert_eq!(*port, gcs_port, "{who}");
        }
    }
}

#[test]
fn the_image_builds_and_holds_every_binary_the_services_run() {
    let dockerfile = repo_file("Dockerfile");
    let build = dockerfile
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build step");
    let packages: BTreeSet<&str> = build
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    for (bin, package) in [
        ("gcs", "gcs"),
        ("gcactl", "gcactl"),
        ("cts", "cts"),
        ("gca-exec", "gca-wrappers"),
        ("gca-recover", "gca-wrappers"),
    ] {
        assert!(
            packages.contains(package),
            "the image does not build {package}"
        );
        assert!(
            dockerfile.contains(&format!("/src/target/release/{bin} "))
                || dockerfile.contains(&format!("/src/target/release/{bin}\n")),
            "the image does not hold {bin}"
        );
    }
    // The Rust image is new enough for every locked dependency.
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust build image");
    let version = parse_version(image.split('-').next().unwrap());
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc names its host");
    let metadata = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        // This platform's packages only: the others' need not be downloaded (offline).
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host])
        .current_dir(REPO)
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let (needed, by) = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                parse_version(p["rust_version"].as_str()?),
                p["name"].as_str()?.to_string(),
            ))
        })
        .max()
        .unwrap();
    assert!(
        version >= needed,
        "rust:{image} is older than {by}'s rust-version {needed:?}"
    );
    // A context without the build tree and the test environments.
    let ignore = repo_file(".dockerignore");
    for dir in ["target", ".venv", "tests/js/node_modules"] {
        assert!(
            ignore.lines().any(|l| l.trim() == dir),
            ".dockerignore lacks {dir}"
        );
    }
}

fn parse_version(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}
