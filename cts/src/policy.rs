//! Who may do what at a CTS: the one place its authorization is decided (the CTS half of the
//! matrix in ARCHITECTURE.md).
//!
//! - On the public port, callers are certificates ([`Caller`]): the GCS alone checkpoints,
//!   deletes and exports images; admins read the status and the jobs; another CTS reads an
//!   image only for a recovery the GCS has recorded (the image's job routed to that CTS,
//!   being recovered or running there) — [`Cts::peer_may_read`]; discovery (WSDL, schemas,
//!   health, where the local socket is) is open.
//! - On the local socket, callers are local users (`SO_PEERCRED`, [`LocalCaller`]): a user
//!   registers, checkpoints, fetches and recovers only jobs and images that are theirs
//!   ([`owner_may`]), with every process of the job plainly theirs ([`plainly_theirs`]);
//!   root may do what the CTS can.
//!
//! A refusal is an `AccessDenied` fault naming who was seen and what was needed.

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gca_drivers::proc;
use gca_protocol::fault::Fault;
use gca_protocol::identity::{Caller, Role};
use gca_protocol::messages::{GidRequest, JobState};
use gca_protocol::server::ApiError;

use crate::error::{Error, Result};
use crate::service::{Cts, LocalCaller};

/// What a certificate caller asks of the public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicOp {
    /// SOAP `DoCheckpoint`, `POST /api/v1/jobs/{gid}/checkpoint`.
    DoCheckpoint,
    /// `/api/v1/status`, `/api/v1/jobs`, `/api/v1/jobs/{gid}`.
    ReadStatus,
    /// `GET /images`.
    ListImages,
    /// `GET /images/{id}`: the manifest.
    ReadManifest,
    /// `GET`/`HEAD /images/{id}/files/...` and `POST /images/{id}/chunks`: the image's bytes
    /// (memory pages, files; the chunks its manifest names).
    ReadFiles,
    /// `DELETE /images/{id}`.
    DeleteImage,
    /// `POST /images/{id}/export`.
    ExportImage,
}

impl PublicOp {
    fn roles(self) -> &'static [Role] {
        match self {
            PublicOp::DoCheckpoint | PublicOp::DeleteImage | PublicOp::ExportImage => &[Role::Gcs],
            PublicOp::ReadStatus | PublicOp::ListImages => &[Role::Admin, Role::Gcs],
            PublicOp::ReadManifest => &[Role::Admin, Role::Gcs, Role::Cts],
            // Only a CTS recovering the job: nobody else needs a job's memory.
            PublicOp::ReadFiles => &[Role::Cts],
        }
    }

    fn what(self) -> &'static str {
        match self {
            PublicOp::DoCheckpoint => "checkpoint jobs of this CTS",
            PublicOp::ReadStatus => "read this CTS's status and jobs",
            PublicOp::ListImages => "list this CTS's images",
            PublicOp::ReadManifest => "read an image's manifest",
            PublicOp::ReadFiles => "read an image's files",
            PublicOp::DeleteImage => "delete images",
            PublicOp::ExportImage => "export images",
        }
    }
}

/// May `caller` do `op` at all (a CTS's image reads are narrowed further by
/// [`Cts::peer_may_read`])?
pub fn authorize(caller: &Caller, op: PublicOp) -> std::result::Result<(), Fault> {
    let roles = op.roles();
    let needs = roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Identified(i) if roles.contains(&i.role) => Ok(()),
        Caller::Anonymous => Err(Fault::unauthenticated(format!(
            "to {} a caller needs a client certificate with the role {needs} ({caller} was seen)",
            op.what()
        ))),
        _ => Err(Fault::denied(format!(
            "{caller} may not {}: that needs the role {needs}",
            op.what()
        ))),
    }
}

/// How long a peer's right to read one image, once the GCS confirmed it, is remembered
/// (the files of one fetch are read within it).
pub const PEER_GRANT_TTL: Duration = Duration::from_secs(120);

impl Cts {
    /// Another CTS reads an image of ours only for a recovery the GCS has recorded: the
    /// image's job is routed to that CTS and is being recovered (or already runs) there.
    /// The GCS is asked once per peer and image within [`PEER_GRANT_TTL`].
    pub async fn peer_may_read(&self, peer: &str, image: &str) -> Result<()> {
        let key = (peer.to_string(), image.to_string());
        if let Some(at) = self.peer_grants().get(&key) {
            if at.elapsed() < PEER_GRANT_TTL {
                return Ok(());
            }
        }
        let refuse = |why: String| {
            Err(Error::Fault(Fault::denied(format!(
                "cts:{peer} may not read image {image}: {why}"
            ))))
        };
        let Some(gid) = self.gid_of_image(image).await else {
            return refuse("there is no such image here".into());
        };
        let job = self
            .link()
            .query::<gca_protocol::ops::GetJobOp>(&GidRequest { gid: gid.clone() })
            .await
            .map_err(|f| {
                Error::Fault(Fault {
                    message: format!(
                        "cannot ask the GCS whether cts:{peer} recovers job {gid:?}: {}",
                        f.message
                    ),
                    ..f
                })
            })?
            .job;
        if job.cts_instance != peer
            || !matches!(job.state, JobState::Recovering | JobState::Running)
        {
            return refuse(format!(
                "the GCS records job {gid:?} {} on CTS {:?}, not being recovered on {peer:?}",
                job.state, job.cts_instance
            ));
        }
        self.peer_grants().insert(key, Instant::now());
        Ok(())
    }
}

/// The guard of the image endpoints (`/images/...`): decides from the method and path,
/// before the store sees the request.
pub async fn images_guard(State(cts): State<Cts>, req: Request, next: Next) -> Response {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous);
    let path = req.uri().path().trim_start_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let op = match (req.method().as_str(), parts.as_slice()) {
        ("GET", []) => PublicOp::ListImages,
        ("GET", [_]) => PublicOp::ReadManifest,
        ("GET" | "HEAD", [_, "files", ..]) | ("POST", [_, "chunks"]) => PublicOp::ReadFiles,
        ("DELETE", [_]) => PublicOp::DeleteImage,
        ("POST", [_, "export"]) => PublicOp::ExportImage,
        // Nothing to guard: the store answers 404/405.
        _ => return next.run(req).await,
    };
    if let Err(f) = authorize(&caller, op) {
        return ApiError(f).into_response();
    }
    if let (Caller::Identified(i), [image, ..]) = (&caller, parts.as_slice()) {
        if i.role == Role::Cts {
            if let Err(e) = cts.peer_may_read(&i.name, image).await {
                return ApiError(e.into_fault()).into_response();
            }
        }
    }
    // With an object store, a delete (the retention policy) takes the image from the bucket
    // too; `?gid=` names the job for a delete retried after the local image went.
    if let (PublicOp::DeleteImage, true, [image]) = (op, cts.has_object_store(), parts.as_slice()) {
        return delete_everywhere(&cts, image, req.uri().query()).await;
    }
    next.run(req).await
}

async fn delete_everywhere(cts: &Cts, image: &str, query: Option<&str>) -> Response {
    let gid = query.and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "gid")
            .map(|(_, v)| percent_decode(v))
    });
    let id = match gca_store::ImageId::parse(image) {
        Ok(id) => id,
        Err(e) => return ApiError(Error::from(e).into_fault()).into_response(),
    };
    match cts.delete_image_everywhere(&id, gid.as_deref()).await {
        Ok(Some(freed_bytes)) => axum::Json(gca_protocol::images::Deleted {
            id: id.to_string(),
            freed_bytes,
        })
        .into_response(),
        Ok(None) => ApiError(
            Fault::resource_unknown(format!(
                "no image {id} in this store (removed from the object store, if it was there)"
            ))
            .with_code("image-not-found"),
        )
        .into_response(),
        Err(e) => {
            tracing::warn!(checkpoint.id = %id, error = %e, "image delete failed");
            ApiError(e.into_fault()).into_response()
        }
    }
}

/// `%XX` escapes and `+` of a query value (a GID is URL-safe text in practice).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A local user may act on what is theirs: root on anything.
pub fn owner_may(caller: &LocalCaller, owner_uid: u32, what: &str) -> Result<()> {
    if caller.uid == 0 || caller.uid == owner_uid {
        return Ok(());
    }
    Err(Error::denied(format!(
        "{what} belongs to user {owner_uid}, not to the caller (user {}); a local user acts only on their own jobs and images",
        caller.uid
    )))
}

/// A job a local user registers or checkpoints must be plainly theirs: every process of the
/// tree with only their UIDs and GIDs, no capabilities, dumpable (so nothing setuid, setgid
/// or of another user ever gets into an image the user owns). Root may register anything.
pub fn plainly_theirs(caller_uid: u32, pid: i32, what: &str) -> Result<()> {
    if caller_uid == 0 {
        return Ok(());
    }
    match proc::foreign_process(pid, caller_uid) {
        None => Ok(()),
        Some(why) => Err(Error::Fault(
            Fault::denied(format!(
                "{what} cannot be checkpointed for user {caller_uid}: {why}; only processes that are plainly the user's are"
            ))
            .with_code("privileged-process"),
        )),
    }
}

/// The caller's PID must be the registered process or one of its ancestors (a wrapper
/// registers itself, or the job it restored), so a user cannot claim a process they merely
/// own and did not start through a wrapper.
pub fn caller_starts(caller: &LocalCaller, pid: i32) -> Result<()> {
    if caller.uid == 0 {
        return Ok(());
    }
    match caller.pid {
        Some(c) if proc::is_descendant(pid, c) => Ok(()),
        _ => Err(Error::denied(format!(
            "process {pid} is not the caller (PID {}) or one of its descendants; a wrapper registers itself or the job it started",
            caller.pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into())
        ))),
    }
}
