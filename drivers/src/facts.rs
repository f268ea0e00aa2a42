//! Compatibility before restore, on a resource: the facts the CTS reports about it (at
//! registration) and records with a checkpoint of a job (before the dump), and the checks
//! only the target can make before an image is fetched (the files the image needs, their
//! digests, `criu cpuinfo check` against the image's `cpuinfo.img`). The rules themselves
//! are [`gca_protocol::facts`], shared with the GCS.
//!
//! What is collected of a job, from `/proc` just before the dump, for its root process and
//! every descendant: the root's executable (`/proc/PID/exe`), the files mapped into each
//! process (`/proc/PID/maps`, file-backed, not deleted) with the SHA-256 of their content
//! (files up to [`MAX_HASHED_BYTES`]), and the regular files each had open (`/proc/PID/fd`).
//! A file opened between this and the dump is not recorded (CRIU then still names it, at
//! restore, if it is missing).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use gca_protocol::driver_config::DriverConfig;
use gca_protocol::facts::{
    judge, Compatibility, CpuRule, FileFact, ImageFacts, MappedRule, ResourceFacts, Rules, CRIU,
    MAX_FILES,
};
use sha2::Digest;

use crate::runner::{last_lines, run};

/// Mapped files larger than this are recorded without a digest (hashing them would make a
/// checkpoint slow; their presence is still checked).
pub const MAX_HASHED_BYTES: u64 = 64 * 1024 * 1024;

/// How long `criu --version`, `criu cpuinfo dump` and `criu cpuinfo check` may take.
const CRIU_TIMEOUT: Duration = Duration::from_secs(30);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The CRIU binary a driver configuration runs, when it is the CRIU driver.
pub fn criu_of(cfg: &DriverConfig) -> Option<PathBuf> {
    match cfg {
        DriverConfig::Criu(c) => crate::criu::Criu::new(c.clone())
            .ok()
            .map(|c| c.path().to_path_buf()),
        _ => None,
    }
}

/// The facts of this resource: `uname -m`, `uname -r`, and with `criu` its version and
/// `criu cpuinfo dump`'s image. A CRIU that cannot be run gives no CRIU facts (the
/// driver's own self-check reports why).
pub async fn resource_facts(criu: Option<&Path>) -> ResourceFacts {
    let u = rustix::system::uname();
    let mut facts = ResourceFacts {
        architecture: u.machine().to_string_lossy().into_owned(),
        kernel: u.release().to_string_lossy().into_owned(),
        criu_version: None,
        cpuinfo: None,
    };
    if let Some(criu) = criu {
        facts.criu_version = criu_version(criu).await;
        if facts.criu_version.is_some() {
            match cpuinfo_dump(criu).await {
                Ok(img) => facts.cpuinfo = Some(B64.encode(img)),
                Err(e) => {
                    tracing::warn!(error = %e, "criu cpuinfo dump failed; CPU features are not recorded")
                }
            }
        }
    }
    facts
}

fn criu_command(criu: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(criu);
    cmd.env("LC_ALL", "C");
    cmd
}

async fn criu_version(criu: &Path) -> Option<String> {
    let mut cmd = criu_command(criu);
    cmd.arg("--version");
    let out = run(cmd, CRIU_TIMEOUT, false).await.ok()?;
    let v = crate::criu::parse_version(&out.stdout)?;
    Some(v.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
}

/// A fresh private directory under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir =
            std::env::temp_dir().join(format!("gca-{what}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `criu cpuinfo dump`: this CPU's features as CRIU records them (`cpuinfo.img`).
pub async fn cpuinfo_dump(criu: &Path) -> Result<Vec<u8>, String> {
    let dir = TempDir::new("cpuinfo").map_err(|e| format!("temporary directory: {e}"))?;
    let mut cmd = criu_command(criu);
    cmd.arg("cpuinfo").arg("dump").arg("-D").arg(&dir.0);
    let out = run(cmd, CRIU_TIMEOUT, false)
        .await
        .map_err(|e| format!("{} cpuinfo dump: {e:?}", criu.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} cpuinfo dump failed: {}",
            criu.display(),
            last_lines(&format!("{}{}", out.stdout, out.stderr), 3).unwrap_or_default()
        ));
    }
    std::fs::read(dir.0.join("cpuinfo.img")).map_err(|e| format!("cpuinfo.img: {e}"))
}

/// `criu cpuinfo check` of an image's `cpuinfo.img` (base64) on this CPU: `Ok(())` when
/// CRIU accepts it, else what CRIU said.
pub async fn cpuinfo_check(criu: &Path, cpuinfo_b64: &str) -> Result<(), String> {
    let img = B64
        .decode(cpuinfo_b64.trim())
        .map_err(|e| format!("the image's cpuinfo.img is not base64: {e}"))?;
    let dir = TempDir::new("cpuinfo-check").map_err(|e| format!("temporary directory: {e}"))?;
    std::fs::write(dir.0.join("cpuinfo.img"), img).map_err(|e| format!("cpuinfo.img: {e}"))?;
    let mut cmd = criu_command(criu);
    cmd.arg("cpuinfo")
        .arg("check")
        .arg("-D")
        .arg(&dir.0)
        .arg("-o")
        .arg(dir.0.join("check.log"))
        .arg("-v2");
    let out = run(cmd, CRIU_TIMEOUT, false)
        .await
        .map_err(|e| format!("{} cpuinfo check: {e:?}", criu.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let log = std::fs::read_to_string(dir.0.join("check.log")).unwrap_or_default();
    let errors = crate::criu::log_errors(&log);
    Err(if errors.is_empty() {
        last_lines(&format!("{}{}{log}", out.stdout, out.stderr), 2)
            .unwrap_or_else(|| "criu cpuinfo check failed".into())
    } else {
        errors.join("; ")
    })
}

/// `sha256:<hex>` of a file's content, if it is a regular file no larger than
/// [`MAX_HASHED_BYTES`] and readable. Digests are remembered ([`DigestCache`]): a job's
/// libraries are hashed once, not at every checkpoint.
pub fn file_digest(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_HASHED_BYTES {
        return None;
    }
    let key = FileVersion::of(&meta);
    if let Some(d) = DIGESTS.get(&key) {
        return Some(d);
    }
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return None,
        }
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(i64::MAX, |d| d.as_secs() as i64);
    DIGESTS.put(key, &digest, now);
    Some(digest)
}

/// What tells one content of a file from another without reading it: the inode and its
/// size, modification and change times. The change time cannot be set by a user (any
/// write or `utimes` moves it), so a file whose version is unchanged has the content
/// hashed before, with one exception [`DigestCache`] guards against: two writes within
/// one tick of the file system's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Changed so recently that another write within the same clock tick could follow
    /// unseen (as git's "racily clean" entries): such a file is hashed every time.
    fn is_recent(&self, now_secs: i64) -> bool {
        self.ctime.0 >= now_secs - RECENT_SECS
    }
}

/// See [`FileVersion::is_recent`].
const RECENT_SECS: i64 = 2;

/// At most this many digests are remembered; beyond it the cache starts again empty.
const MAX_CACHED_DIGESTS: usize = 4096;

/// The digests of file versions hashed before, process-wide (see [`file_digest`]).
struct DigestCache(std::sync::Mutex<HashMap<FileVersion, String>>);

static DIGESTS: std::sync::LazyLock<DigestCache> = std::sync::LazyLock::new(DigestCache::new);

impl DigestCache {
    fn new() -> Self {
        DigestCache(std::sync::Mutex::new(HashMap::new()))
    }

    fn get(&self, key: &FileVersion) -> Option<String> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).cloned()
    }

    fn put(&self, key: FileVersion, digest: &str, now_secs: i64) {
        if key.is_recent(now_secs) {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CACHED_DIGESTS {
            map.clear();
        }
        map.insert(key, digest.to_string());
    }
}

/// A path as `/proc` shows it, if it names a file that can be looked for again: absolute,
/// not deleted, without surrounding blanks (records trim them) or control characters (XML
/// cannot carry them), in UTF-8 (a name that is not cannot be named in a record: left out).
fn usable_path(p: &str) -> Option<&str> {
    (p.starts_with('/')
        && !p.ends_with(" (deleted)")
        && p.trim() == p
        && !p
            .chars()
            .any(|c| c.is_control() || c == char::REPLACEMENT_CHARACTER))
    .then_some(p)
}

/// The job's executable, mapped files and open regular files (see the module comment);
/// blocking (reads `/proc` and hashes files).
pub fn process_facts(pid: i32) -> (Option<FileFact>, Vec<FileFact>, Vec<String>) {
    let pids: Vec<i32> = std::iter::once(pid)
        .chain(crate::proc::descendants(pid))
        .collect();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.to_str().and_then(usable_path).map(str::to_string));
    let mut mapped = BTreeSet::new();
    let mut open = BTreeSet::new();
    for p in &pids {
        if let Ok(maps) = std::fs::read(format!("/proc/{p}/maps")) {
            for line in String::from_utf8_lossy(&maps).lines() {
                // address perms offset dev inode pathname
                let mut f = line.splitn(6, ' ');
                let inode = f.nth(4).unwrap_or("0");
                let path = f.next().unwrap_or("").trim_start();
                if inode != "0" {
                    if let Some(path) = usable_path(path) {
                        mapped.insert(path.to_string());
                    }
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) {
            for fd in fds.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let Some(target) = target.to_str().and_then(usable_path) else {
                    continue;
                };
                if std::fs::metadata(fd.path()).is_ok_and(|m| m.is_file()) {
                    open.insert(target.to_string());
                }
            }
        }
    }
    if let Some(e) = &exe {
        mapped.remove(e);
    }
    let executable = exe.map(|path| FileFact {
        digest: file_digest(Path::new(&path)),
        path,
    });
    let mapped_files: Vec<FileFact> = mapped
        .into_iter()
        .take(MAX_FILES / 2)
        .map(|path| FileFact {
            digest: file_digest(Path::new(&path)),
            path,
        })
        .collect();
    let open_files: Vec<String> = open.into_iter().take(MAX_FILES / 2).collect();
    (executable, mapped_files, open_files)
}

/// The facts of a checkpoint of a job: this resource's, and for a CRIU image the job's
/// process facts ([`process_facts`], run on a blocking thread).
pub async fn image_facts(
    resource: &ResourceFacts,
    checkpointer: &str,
    pid: i32,
    declared: Vec<gca_protocol::messages::Property>,
) -> ImageFacts {
    let mut facts = ImageFacts {
        resource: resource.clone(),
        checkpointer: checkpointer.to_string(),
        declared,
        ..Default::default()
    };
    if checkpointer == CRIU {
        if let Ok((exe, mapped, open)) =
            tokio::task::spawn_blocking(move || process_facts(pid)).await
        {
            facts.executable = exe;
            facts.mapped_files = mapped;
            facts.open_files = open;
        }
    }
    facts
}

/// Whether this resource can restore an image with `image`'s facts: [`judge`] against
/// this resource's facts and `rules`, then what only this resource can tell: each needed
/// file is present (unless `rules.ignore_missing` names it), mapped files have their
/// recorded digest (unless `rules.mapped_files = present`), and `criu cpuinfo check`
/// accepts the image's CPU features (unless `rules.cpu = ignore`). Blocking work runs on a
/// blocking thread.
pub async fn check_here(
    image: Option<&ImageFacts>,
    here: &ResourceFacts,
    rules: &Rules,
    criu: Option<&Path>,
) -> Compatibility {
    let mut c = judge(image, Some(here), rules);
    let Some(image) = image else { return c };
    if image.checkpointer != CRIU {
        return c;
    }
    c.notes.retain(|n| !n.contains("checked on the resource"));
    let needed: Vec<(String, Option<String>, &'static str)> = image
        .needed_paths()
        .map(|(p, d, w)| (p.to_string(), d.map(str::to_string), w))
        .collect();
    let rules_owned = rules.clone();
    let files = tokio::task::spawn_blocking(move || check_files(&needed, &rules_owned))
        .await
        .unwrap_or_else(|e| (vec![format!("the file check failed: {e}")], Vec::new()));
    for r in files.0 {
        c.refuse(r);
    }
    c.notes.extend(files.1);
    if rules.cpu == CpuRule::Check {
        match (&image.resource.cpuinfo, criu) {
            (Some(img), Some(criu)) => match cpuinfo_check(criu, img).await {
                Ok(()) => c
                    .notes
                    .push("CPU features: criu cpuinfo check accepts the image's".into()),
                Err(why) => c.refuse(format!(
                    "the CPU lacks features the image needs (criu cpuinfo check: {why})"
                )),
            },
            (Some(_), None) => c.refuse(
                "the image's CPU features cannot be checked: no CRIU on the resource".into(),
            ),
            (None, _) => {}
        }
    }
    c
}

fn check_files(
    needed: &[(String, Option<String>, &'static str)],
    rules: &Rules,
) -> (Vec<String>, Vec<String>) {
    let (mut reasons, mut notes) = (Vec::new(), Vec::new());
    for (path, digest, what) in needed {
        let p = Path::new(path);
        if std::fs::metadata(p).is_err() {
            match rules.ignored(path) {
                Some(pattern) => notes.push(format!(
                    "{path} missing ({what}): accepted (compatibility.ignore_missing {pattern:?})"
                )),
                None => reasons.push(format!("{path} missing ({what})")),
            }
            continue;
        }
        if let (Some(want), MappedRule::SameDigest) = (digest, rules.mapped_files) {
            match file_digest(p) {
                Some(have) if &have == want => {}
                Some(have) => reasons.push(format!(
                    "{path} differs from the image's ({what}: {have}, the image's {want})"
                )),
                None => reasons.push(format!(
                    "{path} cannot be read to compare it with the image's ({what})"
                )),
            }
        }
    }
    (reasons, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_s_facts_name_its_executable_its_libraries_and_its_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("in.dat");
        std::fs::write(&data, "x").unwrap();
        let _held = std::fs::File::open(&data).unwrap();
        let (exe, mapped, open) = process_facts(std::process::id() as i32);
        let exe = exe.expect("an executable");
        assert_eq!(
            Path::new(&exe.path),
            std::env::current_exe().unwrap().as_path()
        );
        let big = std::fs::metadata(&exe.path).unwrap().len() > MAX_HASHED_BYTES;
        assert_eq!(exe.digest.is_none(), big, "{exe:?}");
        let libc = mapped
            .iter()
            .find(|f| f.path.contains("libc.so"))
            .unwrap_or_else(|| panic!("libc among {mapped:?}"));
        assert_eq!(libc.digest, file_digest(Path::new(&libc.path)));
        assert!(libc.digest.is_some());
        assert!(open.contains(&data.display().to_string()), "{open:?}");
    }

    #[test]
    fn files_are_checked_present_and_with_their_digest_unless_relaxed() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib.so");
        std::fs::write(&lib, "one").unwrap();
        let digest = file_digest(&lib);
        std::fs::write(&lib, "two").unwrap();
        let missing = dir.path().join("data/in.dat").display().to_string();
        let needed = vec![
            (lib.display().to_string(), digest, "mapped file"),
            (missing.clone(), None, "file the job had open"),
        ];
        let (reasons, _) = check_files(&needed, &Rules::default());
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("differs from the image's"));
        assert_eq!(
            reasons[1],
            format!("{missing} missing (file the job had open)")
        );
        let relaxed = Rules {
            mapped_files: MappedRule::Present,
            ignore_missing: vec![format!("{}/data/*", dir.path().display())],
            ..Rules::default()
        };
        let (reasons, notes) = check_files(&needed, &relaxed);
        assert!(reasons.is_empty(), "{reasons:?}");
        assert!(
            notes[0].contains("compatibility.ignore_missing"),
            "{notes:?}"
        );
    }

    #[test]
    fn a_digest_is_remembered_per_file_version_and_not_for_a_file_just_changed() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib.so");
        std::fs::write(&lib, "one").unwrap();
        let v1 = FileVersion::of(&std::fs::metadata(&lib).unwrap());
        let cache = DigestCache::new();
        // Just changed: not remembered (a second write in the same tick could follow).
        cache.put(v1, "sha256:one", v1.ctime.0);
        assert_eq!(cache.get(&v1), None);
        // Changed long enough ago: remembered for that version only.
        let later = v1.ctime.0 + RECENT_SECS + 1;
        cache.put(v1, "sha256:one", later);
        assert_eq!(cache.get(&v1).as_deref(), Some("sha256:one"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&lib, "two").unwrap();
        let v2 = FileVersion::of(&std::fs::metadata(&lib).unwrap());
        assert_ne!(v1, v2, "same size, new content: another version");
        assert_eq!(cache.get(&v2), None);
        // Bounded: a full cache starts again empty.
        for i in 0..MAX_CACHED_DIGESTS as u64 {
            cache.put(
                FileVersion {
                    ino: i + 1_000_000,
                    ..v1
                },
                "x",
                later,
            );
        }
        assert!(cache.0.lock().unwrap().len() <= MAX_CACHED_DIGESTS);
        // And the file's real digest follows its content.
        assert_ne!(file_digest(&lib), Some("sha256:one".into()));
        assert_eq!(
            file_digest(&lib),
            Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(b"two"))
            ))
        );
    }
}

#[cfg(test)]
mod criu_tests {
    use super::*;

    #[tokio::test]
    async fn criu_records_this_cpu_and_accepts_it_and_refuses_a_garbled_one() {
        let criu = crate::test_support::criu_path();
        let facts = resource_facts(Some(&criu)).await;
        assert!(facts.criu_version.is_some(), "{facts:?}");
        let img = facts.cpuinfo.clone().expect("criu cpuinfo dump");
        cpuinfo_check(&criu, &img)
            .await
            .expect("this CPU's own features");
        // An image naming another CPU: every feature word set.
        let mut raw = B64.decode(&img).unwrap();
        for b in raw.iter_mut().skip(16) {
            *b = 0xff;
        }
        let err = cpuinfo_check(&criu, &B64.encode(&raw)).await.unwrap_err();
        assert!(!err.is_empty());

        // The whole local check: this process's own image facts pass here; with the other
        // CPU they do not, unless the site ignores the CPU.
        let mut image = image_facts(&facts, CRIU, std::process::id() as i32, vec![]).await;
        let c = check_here(Some(&image), &facts, &Rules::default(), Some(&criu)).await;
        assert!(c.is_compatible(), "{c:?}");
        assert!(c
            .notes
            .iter()
            .any(|n| n.contains("criu cpuinfo check accepts")));
        image.resource.cpuinfo = Some(B64.encode(&raw));
        let c = check_here(Some(&image), &facts, &Rules::default(), Some(&criu)).await;
        assert!(
            c.reasons
                .iter()
                .any(|r| r.starts_with("the CPU lacks features")),
            "{c:?}"
        );
        let relaxed = Rules {
            cpu: CpuRule::Ignore,
            ..Rules::default()
        };
        assert!(check_here(Some(&image), &facts, &relaxed, Some(&criu))
            .await
            .is_compatible());
    }
}
