//! Per-job image keys (issue 12): the GCS makes each job's key (32 random bytes) at the first
//! GetJobKey and keeps it wrapped in the database: AES-256-GCM under the GCS's key-wrapping
//! key, with a random nonce and the GID as associated data (a wrapped key copied to another
//! job's row does not open). The wrapping key is a file every replica shares
//! (`job_key_wrapping_key_file`); a database dump alone yields no job key.
//!
//! Wrapped form: `version (1 byte) || nonce (12) || ciphertext+tag (32+16)`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of a job key and of the wrapping key.
pub const KEY_LEN: usize = 32;
const VERSION: u8 = 1;
const AAD_PREFIX: &[u8] = b"gca job key v1\0";

/// The GCS's key-wrapping key, loaded once at start.
pub struct KeyWrapper {
    key: LessSafeKey,
    rng: SystemRandom,
    /// Where it came from, for messages (never its contents).
    pub path: PathBuf,
}

impl std::fmt::Debug for KeyWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyWrapper")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeyWrapper {
    /// Reads the wrapping key from `path` (64 hex digits, a newline allowed), refusing a file
    /// that others than its owner may read.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read the job-key wrapping key {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "the job-key wrapping key {} may be read by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the job-key wrapping key {}", path.display()))?;
        let bytes = hex::decode(text.trim()).ok().filter(|b| b.len() == KEY_LEN);
        let Some(bytes) = bytes else {
            bail!(
                "the job-key wrapping key {} is not {} hex digits (make one with `head -c 32 /dev/urandom | xxd -p -c 64`)",
                path.display(),
                KEY_LEN * 2
            );
        };
        Self::from_bytes(&bytes, path.to_path_buf())
    }

    /// [`KeyWrapper::load`], making the file (mode 0600) first when it does not exist: the
    /// embedded default, whose data directory is this GCS's alone.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            let rng = SystemRandom::new();
            let mut key = [0u8; KEY_LEN];
            rng.fill(&mut key)
                .map_err(|_| anyhow::anyhow!("no random numbers for a wrapping key"))?;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!("cannot create the job-key wrapping key {}", path.display())
                })?;
            writeln!(f, "{}", hex::encode(key))?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "made the job-key wrapping key");
        }
        Self::load(path)
    }

    fn from_bytes(bytes: &[u8], path: PathBuf) -> anyhow::Result<Self> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| anyhow::anyhow!("unusable wrapping key"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
            path,
        })
    }

    /// A new random job key, and its wrapped form for `gid`.
    pub fn new_job_key(&self, gid: &str) -> anyhow::Result<([u8; KEY_LEN], Vec<u8>)> {
        let mut key = [0u8; KEY_LEN];
        self.rng
            .fill(&mut key)
            .map_err(|_| anyhow::anyhow!("no random numbers for a job key"))?;
        let wrapped = self.wrap(gid, &key)?;
        Ok((key, wrapped))
    }

    fn wrap(&self, gid: &str, key: &[u8; KEY_LEN]) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no random numbers for a nonce"))?;
        let mut sealed = key.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(gid)),
                &mut sealed,
            )
            .map_err(|_| anyhow::anyhow!("cannot wrap the key of job {gid:?}"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The job key in `wrapped`, which must have been wrapped for `gid` under this key.
    pub fn unwrap(&self, gid: &str, wrapped: &[u8]) -> anyhow::Result<[u8; KEY_LEN]> {
        let Some((&VERSION, rest)) = wrapped.split_first() else {
            bail!("the stored key of job {gid:?} has an unknown format");
        };
        if rest.len() != NONCE_LEN + KEY_LEN + AES_256_GCM.tag_len() {
            bail!("the stored key of job {gid:?} has the wrong length");
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| anyhow::anyhow!("the stored key of job {gid:?} has a bad nonce"))?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(gid)), &mut buf)
            .map_err(|_| {
                anyhow::anyhow!(
                    "the stored key of job {gid:?} does not open with the wrapping key {} (another GCS's key, or a row copied from another job)",
                    self.path.display()
                )
            })?;
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(plain);
        Ok(key)
    }
}

fn aad(gid: &str) -> Vec<u8> {
    let mut a = AAD_PREFIX.to_vec();
    a.extend_from_slice(gid.as_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapper(dir: &Path) -> KeyWrapper {
        KeyWrapper::load_or_create(&dir.join("wrap.key")).unwrap()
    }

    #[test]
    fn a_wrapped_key_opens_for_its_job_only() {
        let dir = tempfile::tempdir().unwrap();
        let w = wrapper(dir.path());
        let (key, wrapped) = w.new_job_key("job-1").unwrap();
        assert_eq!(w.unwrap("job-1", &wrapped).unwrap(), key);
        assert!(
            !wrapped.windows(KEY_LEN).any(|s| s == key),
            "stored in the clear"
        );
        let e = w.unwrap("job-2", &wrapped).unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
        let mut flipped = wrapped.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(w.unwrap("job-1", &flipped).is_err());
        // Another GCS's wrapping key opens nothing.
        let other = tempfile::tempdir().unwrap();
        assert!(wrapper(other.path()).unwrap("job-1", &wrapped).is_err());
        // Two keys for one job are different keys.
        assert_ne!(w.new_job_key("job-1").unwrap().0, key);
    }

    #[test]
    fn the_wrapping_key_file_is_made_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wrap.key");
        let (_, wrapped) = KeyWrapper::load_or_create(&path)
            .unwrap()
            .new_job_key("j")
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A restart reads the same key.
        assert!(KeyWrapper::load(&path)
            .unwrap()
            .unwrap("j", &wrapped)
            .is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyWrapper::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not hex\n").unwrap();
        let e = KeyWrapper::load(&path).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
    }
}
