//! CTS harness: real CTS servers (public port 0 + a UNIX socket in a temporary directory)
//! registered at a real GCS, and real jobs to checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gca_protocol::client::{JsonClient, SoapClient};
use gca_protocol::local::{LocalClient, LocalJob, RegisterLocalJob};
use gca_protocol::messages::*;
use tokio::sync::oneshot;

use crate::TestGcs;

/// The example descriptors, by type name.
pub fn descriptor(cts_type: &str) -> &'static str {
    match cts_type {
        "criu" => crate::CRIU_DESCRIPTOR,
        "app-level" => crate::APP_DESCRIPTOR,
        "vmm" => crate::VMM_DESCRIPTOR,
        other => panic!("no example descriptor for type {other:?}"),
    }
}

/// Registers an example CTS type at the GCS (idempotent).
pub async fn register_type(gcs: &TestGcs, cts_type: &str) {
    gcs.call::<gca_protocol::ops::RegisterDescriptorOp>(RegisterCtsDescriptor {
        descriptor_xml: descriptor(cts_type).to_string(),
    })
    .await
    .expect("register the descriptor");
}

/// The configuration of a test CTS with state under `dir`, serving at `url` (its TOML text,
/// with the test PKI's certificate unless `insecure = true` is in `extra`).
pub fn config_text(setup: &CtsSetup<'_>, dir: &Path, url: &str) -> String {
    let insecure = setup.extra.contains("insecure = true");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let _ = std::fs::remove_file(state.join("cts.sock"));
    let descriptor_path = dir.join("descriptor.xml");
    std::fs::write(&descriptor_path, descriptor(setup.cts_type)).unwrap();
    let base = format!(
        "name = {name:?}\nresource = \"node-{name}\"\nexecution_manager = \"https://node-{name}/wsrf/services/ManagedJobFactoryService\"\ngcs_url = {gcs:?}\ndescriptor = {desc:?}\nstate_dir = {state:?}\npublic_url = {url:?}\nheartbeat_secs = 2\ngcs_wait_secs = 5\n[driver]\n{driver}\n",
        name = setup.name,
        gcs = setup.gcs_url,
        desc = descriptor_path,
        state = state,
        url = url,
        driver = setup.driver,
    );
    // `extra` overrides the defaults above, key by key (tables merged one level deep).
    let mut table: toml::Table = base.parse().expect("base configuration");
    let extra: toml::Table = setup.extra.parse().expect("extra configuration");
    for (k, v) in extra {
        match (table.get_mut(&k), v) {
            (Some(toml::Value::Table(t)), toml::Value::Table(more)) => t.extend(more),
            (_, v) => {
                table.insert(k, v);
            }
        }
    }
    if !insecure {
        let tls = crate::pki::pki().tls(&crate::pki::cts(setup.name));
        table.insert(
            "tls".into(),
            toml::Value::try_from(&tls).expect("TLS settings as TOML"),
        );
    }
    toml::to_string(&table).unwrap()
}

/// A CTS running in this process.
pub struct TestCts {
    pub cts: cts::Cts,
    pub name: String,
    /// Root URL (`http://127.0.0.1:port`).
    pub url: String,
    pub soap: SoapClient,
    pub json: JsonClient,
    pub local: LocalClient,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// How a test CTS is set up.
pub struct CtsSetup<'a> {
    pub name: &'a str,
    pub cts_type: &'a str,
    pub gcs_url: &'a str,
    /// The `[driver]` table's body, e.g. `kind = "criu"`.
    pub driver: &'a str,
    /// Top-level settings and further tables, appended to the configuration.
    pub extra: &'a str,
}

pub const CRIU_DRIVER: &str = "kind = \"criu\"";
/// CRIU with jobs in the host's PID namespace (`namespaces = "off"`): what a site without
/// isolation, or a job gca-exec cannot isolate (not root), gets; the job keeps its wrapper's
/// PID and a restore needs its original PIDs free.
pub const CRIU_DRIVER_HOST_PIDS: &str = "kind = \"criu\"\nnamespaces = \"off\"";

/// The guest of `scripts/build-vmm-guest` (run by `scripts/install-deps`): `$GCA_VMM_GUEST_DIR`
/// or /var/cache/gca/vmm-guest; panics (the test fails) when it is missing.
pub fn vmm_guest_dir() -> PathBuf {
    let dir = std::env::var_os("GCA_VMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/gca/vmm-guest"));
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file(),
        "no VMM guest in {}: run scripts/install-deps (or scripts/build-vmm-guest)",
        dir.display()
    );
    dir
}

/// A `[driver]` of kind `vmm` on that guest, a small VM, with the accelerator the guest's
/// build found to boot it here (`accel`: `kvm`, or `tcg` where this machine's KVM cannot).
pub fn vmm_driver() -> String {
    let dir = vmm_guest_dir();
    let accel = std::fs::read_to_string(dir.join("accel"))
        .map(|a| a.trim().to_string())
        .unwrap_or_else(|_| "kvm".into());
    format!(
        "kind = \"vmm\"\nkernel = {:?}\ninitrd = {:?}\naccel = {accel:?}\nmemory_mib = 128\ndisk_mib = 16\n",
        dir.join("vmlinuz"),
        dir.join("initrd.img"),
    )
}
pub const APP_DRIVER: &str = "kind = \"application\"\npoll_interval_ms = 20";

impl TestCts {
    pub async fn start(setup: CtsSetup<'_>) -> Self {
        let dir = tempfile::Builder::new().prefix("cts").tempdir().unwrap();
        Self::start_in(setup, dir).await
    }

    /// Stops this CTS and starts another one on the same state directory (a restart).
    pub async fn restart(self, setup: CtsSetup<'_>) -> Self {
        self.restart_after(setup, || {}).await
    }

    /// Restarts the CTS, doing `meanwhile` while it is down.
    pub async fn restart_after(mut self, setup: CtsSetup<'_>, meanwhile: impl FnOnce()) -> Self {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("CTS task").expect("CTS result");
        }
        self.cts.shutdown();
        let dir = tempfile::Builder::new().prefix("unused").tempdir().unwrap();
        let dir = std::mem::replace(&mut self.dir, dir);
        drop(self);
        meanwhile();
        Self::start_in(setup, dir).await
    }

    async fn start_in(setup: CtsSetup<'_>, dir: tempfile::TempDir) -> Self {
        crate::init_tracing();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let insecure = setup.extra.contains("insecure = true");
        let scheme = if insecure { "http" } else { "https" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let text = config_text(&setup, dir.path(), &url);
        let config = cts::Config::from_toml(&text).expect("test CTS configuration");
        let local_socket = config.local_socket();
        let local = cts::bind_local(&local_socket).expect("bind the local socket");
        let service = cts::build(config).await.expect("build the CTS");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(cts::run(listener, local, service.clone(), async move {
            let _ = rx.await;
        }));
        // The GCS is the CTS's only caller of DoCheckpoint.
        let soap = SoapClient::new(
            crate::http_as(crate::pki::GCS),
            format!("{url}{}", gca_protocol::ns::CTS_SERVICE_PATH),
        );
        TestCts {
            cts: service,
            name: setup.name.to_string(),
            // The GCS's identity: what the CTS's JSON API serves (checkpoints, status) is
            // the GCS's to ask for.
            json: JsonClient::new(crate::http_as(crate::pki::GCS), url.clone()),
            url,
            soap,
            local: LocalClient::new(local_socket),
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A CTS of an example type with the given driver, registered at `gcs`, waiting until the
    /// GCS has its instance registration.
    pub async fn registered(
        gcs: &TestGcs,
        name: &str,
        cts_type: &str,
        driver: &str,
        extra: &str,
    ) -> Self {
        register_type(gcs, cts_type).await;
        let gcs_url = gcs.url.clone();
        let cts = Self::start(CtsSetup {
            name,
            cts_type,
            gcs_url: &gcs_url,
            driver,
            extra,
        })
        .await;
        cts.wait_connected().await;
        cts
    }

    pub async fn wait_connected(&self) {
        eventually(
            Duration::from_secs(10),
            "the CTS registers at the GCS",
            || async { self.cts.link().status().connected },
        )
        .await;
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The directory of image `id` in the CTS's store (its `manifest.json`; in format 1, its
    /// files too).
    pub fn image_dir(&self, id: &str) -> PathBuf {
        self.state_dir().join("store").join("images").join(id)
    }

    /// The files of image `id` made whole (every chunk checked) in a new directory of the
    /// test, with a copy of its `manifest.json`: to read what a checkpoint wrote, whatever
    /// the store's format.
    pub fn image_files(&self, id: &str) -> PathBuf {
        let n = IMAGE_READS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dest = self
            .dir
            .path()
            .join("image-reads")
            .join(format!("{id}.{n}"));
        gca_store::read_image_offline(
            &self.state_dir().join("store"),
            &gca_store::ImageId::parse(id).expect("an image ID"),
            &dest,
        )
        .unwrap_or_else(|e| panic!("cannot read image {id}: {e}"));
        dest
    }

    /// The image's manifest, as stored.
    pub fn image_manifest(&self, id: &str) -> gca_store::Manifest {
        let bytes = std::fs::read(self.image_dir(id).join("manifest.json"))
            .unwrap_or_else(|e| panic!("no manifest for image {id}: {e}"));
        gca_store::Manifest::parse(&bytes).expect("a valid manifest")
    }

    /// This CTS's chunk store as it is on disk now (sealed packs), read as another process.
    fn chunk_store(&self) -> gca_store::LocalChunks {
        gca_store::LocalChunks::at(&self.state_dir().join("store").join("chunks"))
            .expect("the CTS's chunk packs can be read")
    }

    /// The chunks in this CTS's store, and their bytes.
    pub fn stored_chunks(&self) -> (usize, u64) {
        let store = self.chunk_store();
        let ids = gca_store::ChunkBackend::list(&store).expect("list the chunks");
        let bytes = ids
            .iter()
            .map(|id| store.locate(id).unwrap().map_or(0, |l| l.len as u64))
            .sum();
        (ids.len(), bytes)
    }

    /// Flips one byte of the largest piece of image `id` in the store (its largest chunk,
    /// or in format 1 its largest file); returns what was changed (the chunk's hex name or
    /// the file's path).
    pub fn corrupt_image(&self, id: &str) -> String {
        let m = self.image_manifest(id);
        let (path, offset, what) = if m.is_chunked() {
            let c = m
                .files
                .iter()
                .flat_map(|f| f.chunks.iter())
                .max_by_key(|c| c.size)
                .expect("the image has a chunk");
            let at = self.chunk_store().locate(&c.id).unwrap().expect("stored");
            (at.path, at.offset, c.id.to_hex())
        } else {
            let f = m.files.iter().max_by_key(|f| f.size).expect("a file");
            (
                self.image_dir(id).join(f.path.as_str()),
                0,
                f.path.to_string(),
            )
        };
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, offset).unwrap();
        file.write_all_at(&[b[0] ^ 0xff], offset).unwrap();
        what
    }

    pub async fn register(&self, gid: &str, pid: i32) -> LocalJob {
        self.local
            .register(&RegisterLocalJob {
                gid: gid.into(),
                pid,
                periodic_interval_secs: None,
                recovery: None,
                retention: None,
                limits: None,
            })
            .await
            .expect("register the job at the CTS")
    }

    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    /// Stops the CTS (its port closes), keeping its directory (the jobs' files) for the test.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("CTS task").expect("CTS result");
        }
    }
}

static IMAGE_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for TestCts {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.cts.shutdown();
    }
}

/// Polls `check` until it holds, or panics after `within` saying what was awaited.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real job: a process in its own session (as under a resource manager), killed and
/// reaped when dropped.
pub struct TestJob {
    pub child: Child,
    pub pid: i32,
    pub log: PathBuf,
}

impl TestJob {
    /// A bash loop that counts and appends each number to `log` through a file descriptor it
    /// keeps open (so a restore must bring back the file offset too).
    pub fn counter(dir: &Path) -> Self {
        let log = dir.join(format!("counter-{}.log", uuid::Uuid::new_v4().simple()));
        let script = format!(
            "exec 3>>{log:?}; i=0; while :; do i=$((i+1)); echo $i >&3; sleep 0.05; done",
            log = log
        );
        Self::spawn(Command::new("setsid").args(["bash", "-c", &script]), log)
    }

    /// `bash -c SCRIPT` in its own session, with extra environment variables.
    pub fn script(dir: &Path, script: &str, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("job-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new("setsid");
        cmd.args(["bash", "-c", script]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(&mut cmd, log)
    }

    /// The application-level demo job, `examples/app-counter.sh`.
    /// Like the execute wrapper: the process starts, is registered, and only then runs
    /// `script` (in place, same PID) with the environment the CTS gave it; call
    /// [`TestJob::start`] with the registration. `{LOG}` in `script` is the job's log file.
    pub fn after_registration(dir: &Path, script: &str, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("job-{}.log", uuid::Uuid::new_v4().simple()));
        let env_file = log.with_extension("env");
        let script = script.replace("{LOG}", &format!("{log:?}"));
        let prelude = format!(
            "while [ ! -s {f:?} ]; do sleep 0.01; done; . {f:?}; {script}",
            f = env_file
        );
        let mut cmd = Command::new("setsid");
        cmd.args(["bash", "-c", &prelude]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(&mut cmd, log)
    }

    /// The application-level demo job, `examples/app-counter.sh`, started after registration.
    pub fn app_counter(dir: &Path, env: &[(&str, &str)]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/app-counter.sh");
        Self::after_registration(dir, &format!("exec bash {script:?} {{LOG}}"), env)
    }

    /// Hands the job the environment from its registration (see `after_registration`).
    pub fn start(&self, registered: &LocalJob) {
        let mut text = String::new();
        for p in &registered.environment {
            text.push_str(&format!(
                "export {}='{}'\n",
                p.name,
                p.value.replace('\'', "'\\''")
            ));
        }
        text.push_str(&format!(
            "export GCA_CHECKPOINT_DIR='{}'\n",
            registered.checkpoint_dir.display()
        ));
        let env_file = self.log.with_extension("env");
        let tmp = env_file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, env_file).unwrap();
    }

    fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        // Our child is not a process group leader, so `setsid` calls setsid() itself and
        // executes bash in place: the PID we see is the job's.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the job");
        let pid = child.id() as i32;
        // Wait until the process runs bash (setsid has executed it).
        for _ in 0..200 {
            if gca_drivers::proc::stat(pid).is_some_and(|s| s.comm == "bash") {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        TestJob { child, pid, log }
    }

    /// The numbers the job has written so far.
    pub fn values(&self) -> Vec<u64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn last(&self) -> u64 {
        self.values().last().copied().unwrap_or(0)
    }

    /// Whether the process is still running (a zombie does not count).
    pub fn running(&self) -> bool {
        gca_drivers::proc::stat(self.pid).is_some_and(|s| s.state != 'Z')
    }

    /// Waits until the job has written at least `n` numbers.
    pub async fn wait_for_values(&self, n: usize) {
        eventually(Duration::from_secs(10), "the job writes", || async {
            self.values().len() >= n
        })
        .await;
    }

    /// Waits until it has grown past `value`.
    pub async fn wait_past(&self, value: u64) {
        eventually(
            Duration::from_secs(10),
            "the job keeps counting",
            || async { self.last() > value },
        )
        .await;
    }
}

impl Drop for TestJob {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The checkpoints the GCS has for `gid`.
pub async fn gcs_checkpoints(gcs: &TestGcs, gid: &str) -> Vec<CheckpointRecord> {
    gcs.call::<gca_protocol::ops::GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of(gid))
        .await
        .expect("GetCheckpoints")
        .checkpoints
}

pub async fn gcs_job(gcs: &TestGcs, gid: &str) -> Job {
    gcs.call::<gca_protocol::ops::GetJobOp>(GidRequest { gid: gid.into() })
        .await
        .expect("GetJob")
        .job
}

/// The CTS's directories reachable by `nobody` (the tests' temporary directories are 0700),
/// so that a local user can talk to its socket.
pub fn open_to_local_users(cts: &TestCts) {
    for dir in [cts.dir.path().to_path_buf(), cts.state_dir()] {
        std::fs::set_permissions(
            &dir,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
        )
        .unwrap();
    }
}

/// `curl` on the CTS's local socket as the unprivileged user `nobody`: (status, body).
pub async fn local_as_nobody(
    cts: &TestCts,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut args = vec![
        "-u".to_string(),
        "nobody".to_string(),
        "--".to_string(),
        "curl".to_string(),
        "-s".to_string(),
        "-w".to_string(),
        "\n%{http_code}".to_string(),
        "--unix-socket".to_string(),
        cts.local.socket().display().to_string(),
        "-X".to_string(),
        method.to_string(),
    ];
    if let Some(b) = body {
        args.extend([
            "-H".into(),
            "content-type: application/json".into(),
            "-d".into(),
            b.into(),
        ]);
    }
    args.push(format!("http://localhost{path}"));
    // Async: the CTS answering it runs on this test's runtime.
    let out = tokio::process::Command::new("runuser")
        .args(&args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
