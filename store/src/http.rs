//! The image store over HTTP, for other CTSes and recovery wrappers. Nested by the CTS at
//! `/images`:
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | JSON list of [`ImageSummary`](gca_protocol::images::ImageSummary) |
//! | `GET /{id}` | the `manifest.json` bytes as stored; `X-GCA-Digest` and `ETag` = its digest |
//! | `GET`/`HEAD /{id}/files/{*path}` | a file, streamed; one `Range` (`a-b`, `a-`, `-n`) → 206; `If-Range` (format 2: made from its chunks, each checked) |
//! | `POST /{id}/chunks` `{"chunks": [hex, ...]}` | the chunks' bytes, concatenated in the order asked: only chunks the image's manifest names, at most 1024 ([`ChunksRequest`]) |
//! | `DELETE /{id}` | `{"id": .., "freed_bytes": ..}` |
//! | `POST /{id}/export` `{"dir", "digest"?, "remove"?}` | copy into the owner's directory ([`crate::export`]): `{"id", "path", "files", "bytes", "already", "removed"}` |
//!
//! Export statuses: 200 done (or done before: `already`); 400 bad ID, directory (not
//! absolute and normalized) or digest, or a bad body; 403 the directory is a symbolic link,
//! not a directory, inside the store, or not owned by the image's owner; 404 no such image (and no finished
//! export with the given digest); 409 the manifest names no owner, the digest differs, the
//! directory does not exist, or `DIR/ID` holds something else; 500 a stored file does not
//! match the manifest, or another I/O error (the message names the path); 507 no space or
//! quota left. Nothing is left in the directory after an error.
//!
//! Every ID and path is parsed into an [`ImageId`] / [`RelPath`] before it reaches the store,
//! and only files the manifest lists are served. The requests and answers are
//! `gca_protocol::images`; errors are JSON `ErrorBody`s with the status
//! [`Error::http_status`] gives.

use std::io::SeekFrom;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use gca_protocol::images::{
    ChunksRequest, Deleted, ExportRequest, DIGEST_HEADER, MAX_CHUNKS_PER_REQUEST,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::chunks::{ChunkId, ChunkRef};
use crate::error::Error;
use crate::export::export_image;
use crate::manifest::Manifest;
use crate::names::{ImageId, RelPath};
use crate::store::ImageStore;

const STREAM_CHUNK: usize = 64 * 1024;

/// The routes, relative to where the CTS nests them (`/images`).
pub fn routes() -> Router<ImageStore> {
    Router::new()
        .route("/", get(list))
        .route("/{id}", get(manifest).delete(delete))
        .route("/{id}/files/{*path}", get(file))
        .route("/{id}/chunks", post(chunks))
        .route("/{id}/export", post(export))
}

/// The largest export request body read.
const MAX_EXPORT_BODY: usize = 64 * 1024;
/// The largest chunk request body read (1024 names of 64 hex digits, quoted, with commas).
const MAX_CHUNKS_BODY: usize = 80 * 1024;
/// Chunks are read from the store in groups of about this many bytes, two groups ahead.
const READ_GROUP: usize = 1 << 20;

impl From<PathRejection> for Error {
    fn from(e: PathRejection) -> Self {
        Error::BadRequest(format!("bad image URL: {e}"))
    }
}

type ApiResult = Result<Response, Error>;

async fn list(State(store): State<ImageStore>) -> ApiResult {
    Ok(Json(store.list().await?).into_response())
}

async fn manifest(
    State(store): State<ImageStore>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let bytes = store.manifest_bytes(&ImageId::parse(&id)?).await?;
    let digest = Manifest::digest_of(&bytes);
    let mut res = Response::new(Body::from(bytes));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(DIGEST_HEADER, hv(&digest));
    h.insert(header::ETAG, hv(&format!("\"{digest}\"")));
    Ok(res)
}

async fn delete(
    State(store): State<ImageStore>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let freed_bytes = store.delete(&ImageId::parse(&id)?).await?;
    tracing::info!(image = %id, freed_bytes, "image deleted");
    Ok(Json(Deleted { id, freed_bytes }).into_response())
}

async fn export(
    State(store): State<ImageStore>,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> ApiResult {
    let Path(id) = id?;
    let bytes = axum::body::to_bytes(body, MAX_EXPORT_BODY)
        .await
        .map_err(|e| {
            Error::BadRequest(format!(
                "cannot read the export request (at most {MAX_EXPORT_BODY} bytes): {e}"
            ))
        })?;
    let req: ExportRequest = serde_json::from_slice(&bytes).map_err(|e| {
        Error::ExportInvalid(format!(
            "invalid export request: {e}; expected {{\"dir\": \"/absolute/dir\", \"digest\": \"sha256:...\", \"remove\": true}}"
        ))
    })?;
    let result = match ImageId::parse(&id) {
        Ok(image) => export_image(&store, &image, &req).await,
        Err(e) => Err(Error::ExportInvalid(e.to_string())),
    };
    match result {
        Ok(done) => Ok(Json(done).into_response()),
        Err(e) => {
            tracing::warn!(image = %id, dir = %req.dir, status = e.http_status(), error = %e, "image export failed");
            Err(e)
        }
    }
}

/// `POST /{id}/chunks`: chunks the image's manifest names, concatenated. A name that is not
/// 64 hex digits, or a chunk the image does not name, refuses the whole request (a peer
/// authorized for one image reads no other image's chunks through it).
async fn chunks(
    State(store): State<ImageStore>,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> ApiResult {
    let Path(id) = id?;
    let image = ImageId::parse(&id)?;
    let bytes = axum::body::to_bytes(body, MAX_CHUNKS_BODY)
        .await
        .map_err(|e| {
            Error::BadRequest(format!(
                "cannot read the chunk request (at most {MAX_CHUNKS_BODY} bytes): {e}"
            ))
        })?;
    let req: ChunksRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::BadRequest(format!("invalid chunk request: {e}")))?;
    if req.chunks.is_empty() || req.chunks.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(Error::BadRequest(format!(
            "a chunk request names 1 to {MAX_CHUNKS_PER_REQUEST} chunks, not {}",
            req.chunks.len()
        )));
    }
    let m = store.manifest(&image).await?;
    if !m.is_chunked() {
        return Err(Error::NotFound(format!(
            "image {id} is stored as whole files (format {}): read its files",
            m.format
        )));
    }
    let named = m.chunk_set();
    let mut refs = Vec::with_capacity(req.chunks.len());
    for c in &req.chunks {
        let cid = ChunkId::parse(c).ok_or_else(|| {
            Error::BadRequest(format!(
                "bad chunk name {}: a chunk is named by 64 lower-case hex digits",
                crate::names::shown(c)
            ))
        })?;
        let size = *named
            .get(&cid)
            .ok_or_else(|| Error::NotFound(format!("image {id} names no chunk {cid}")))?;
        refs.push((ChunkRef { id: cid, size }, 0usize, size as usize));
    }
    let total: u64 = refs.iter().map(|(r, _, _)| u64::from(r.size)).sum();
    let mut res = Response::new(Body::from_stream(chunk_stream(
        store,
        id,
        "(chunk request)".into(),
        refs,
        false,
    )));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    Ok(res)
}

/// The bytes `skip..skip+take` of each chunk, read from the store a group at a time on
/// blocking threads (two groups ahead); with `verify`, each chunk checked against its name.
/// An error ends the stream (the peer sees a short body).
fn chunk_stream(
    store: ImageStore,
    image: String,
    file: String,
    refs: Vec<(ChunkRef, usize, usize)>,
    verify: bool,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
    let mut groups: Vec<Vec<(ChunkRef, usize, usize)>> = Vec::new();
    let mut size = 0usize;
    for r in refs {
        if groups.is_empty() || size >= READ_GROUP {
            groups.push(Vec::new());
            size = 0;
        }
        size += r.2;
        groups.last_mut().expect("a group").push(r);
    }
    futures::stream::iter(groups)
        .map(move |group| {
            let store = store.clone();
            let image = image.clone();
            let file = file.clone();
            async move {
                tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
                    let mut out = Vec::with_capacity(group.iter().map(|g| g.2).sum());
                    for (r, skip, take) in group {
                        let data = if verify {
                            store.read_chunk(&image, &file, &r)
                        } else {
                            store.read_chunk_unverified(&image, &r)
                        }
                        .map_err(|e| {
                            tracing::error!(image = %image, chunk = %r.id, error = %e,
                                "cannot serve a chunk");
                            std::io::Error::other(e.to_string())
                        })?;
                        out.extend_from_slice(&data[skip..skip + take]);
                    }
                    Ok(Bytes::from(out))
                })
                .await
                .map_err(std::io::Error::other)?
            }
        })
        .buffered(2)
}

async fn file(
    State(store): State<ImageStore>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let Path((id, rel)) = path?;
    let image = ImageId::parse(&id)?;
    let rel_path = RelPath::parse(&rel)?;
    let m = store.manifest(&image).await?;
    if m.is_chunked() {
        let entry = m
            .files
            .into_iter()
            .find(|f| f.path == rel_path.as_str())
            .ok_or_else(|| Error::NotFound(format!("image {id} has no file {rel}")))?;
        return chunked_file(store, method, &headers, id, entry);
    }
    let (disk_path, entry) = store.file(&image, &rel_path).await?;
    let mut f = match tokio::fs::File::open(&disk_path).await {
        Ok(f) => f,
        // Deleted between reading the manifest and opening the file.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!("no image {id} in this store")))
        }
        Err(e) => {
            return Err(Error::Io {
                context: format!("cannot open file {rel} of image {id}"),
                source: e,
            })
        }
    };
    let len = f
        .metadata()
        .await
        .map_err(|e| Error::Io {
            context: format!("cannot read file {rel} of image {id}"),
            source: e,
        })?
        .len();
    if len != entry.size {
        return Err(Error::Corrupt(format!(
            "file {rel} of image {id} has {len} bytes, its manifest says {}",
            entry.size
        )));
    }
    let etag = format!("\"{}\"", entry.etag());

    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_matches(&headers, &etag))
        .map(|r| parse_range(r, len))
        .unwrap_or(RangeSpec::Full);

    let (status, start, count) = match range {
        RangeSpec::Full => (StatusCode::OK, 0, len),
        RangeSpec::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        RangeSpec::Unsatisfiable => {
            return Err(Error::RangeNotSatisfiable {
                message: format!("range not satisfiable: file {rel} of image {id} has {len} bytes"),
                len,
            });
        }
    };

    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        if start > 0 {
            f.seek(SeekFrom::Start(start))
                .await
                .map_err(|e| Error::Io {
                    context: format!("cannot read file {rel} of image {id}"),
                    source: e,
                })?;
        }
        Body::from_stream(ReaderStream::with_capacity(f.take(count), STREAM_CHUNK))
    };
    Ok(file_response(body, status, &etag, start, count, len))
}

/// A file of a format 2 image, made from its chunks (each checked), with one `Range`.
fn chunked_file(
    store: ImageStore,
    method: Method,
    headers: &HeaderMap,
    id: String,
    entry: crate::manifest::FileEntry,
) -> ApiResult {
    let len = entry.size;
    let etag = format!("\"{}\"", entry.etag());
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_matches(headers, &etag))
        .map(|r| parse_range(r, len))
        .unwrap_or(RangeSpec::Full);
    let (status, start, count) = match range {
        RangeSpec::Full => (StatusCode::OK, 0, len),
        RangeSpec::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        RangeSpec::Unsatisfiable => {
            return Err(Error::RangeNotSatisfiable {
                message: format!(
                    "range not satisfiable: file {} of image {id} has {len} bytes",
                    entry.path
                ),
                len,
            });
        }
    };
    let body = if method == Method::HEAD || count == 0 {
        Body::empty()
    } else {
        let end = start + count;
        let mut refs = Vec::new();
        let mut at = 0u64;
        for c in &entry.chunks {
            let (a, b) = (at, at + u64::from(c.size));
            at = b;
            if b <= start || a >= end {
                continue;
            }
            let skip = start.saturating_sub(a) as usize;
            let take = (b.min(end) - a) as usize - skip;
            refs.push((*c, skip, take));
        }
        Body::from_stream(chunk_stream(store, id, entry.path.to_string(), refs, true))
    };
    Ok(file_response(body, status, &etag, start, count, len))
}

fn hv(s: &str) -> HeaderValue {
    // Only ever called with ASCII we built (digests, numbers).
    HeaderValue::from_str(s).expect("ASCII header value")
}

/// `If-Range` absent, or naming this representation's (strong) ETag. A date or another ETag
/// means "send the whole file".
fn if_range_matches(headers: &HeaderMap, etag: &str) -> bool {
    match headers.get(header::IF_RANGE) {
        None => true,
        Some(v) => v.to_str().map(|v| v.trim() == etag).unwrap_or(false),
    }
}

/// What to send for a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// The whole file (no range, a range we ignore: another unit, several ranges, bad syntax).
    Full,
    /// Bytes `a..=b`, within the file.
    Partial(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Reads one `bytes=` range (`a-b`, `a-`, `-n`) against a file of `len` bytes.
pub fn parse_range(header: &str, len: u64) -> RangeSpec {
    let header = header.trim();
    let Some((unit, spec)) = header.split_once('=') else {
        return RangeSpec::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeSpec::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if first.is_empty() {
        let Some(n) = num(last) else {
            return RangeSpec::Full;
        };
        if n == 0 || len == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Partial(len.saturating_sub(n), len - 1);
    }
    let Some(a) = num(first) else {
        return RangeSpec::Full;
    };
    let b = if last.is_empty() {
        u64::MAX
    } else {
        match num(last) {
            Some(b) if b >= a => b,
            _ => return RangeSpec::Full,
        }
    };
    if a >= len {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Partial(a, b.min(len - 1))
}

/// The answer carrying `count` bytes of a file of `len` from `start`: the whole file (200) or a
/// range of it (206, with its `Content-Range`), with the validator a resumed fetch sends back.
fn file_response(
    body: Body,
    status: StatusCode,
    etag: &str,
    start: u64,
    count: u64,
    len: u64,
) -> Response {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, hv(etag));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            hv(&format!("bytes {start}-{}/{len}", start + count - 1)),
        );
    }
    res
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::tests::{id, put, rel};
    use gca_protocol::fault::{ErrorBody, Fault};
    use gca_protocol::FaultKind;
    use reqwest::StatusCode as S;
    use sha2::{Digest, Sha256};

    /// A client that never goes through a proxy from the environment.
    pub(crate) fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    async fn serve(store: ImageStore) -> String {
        let app = Router::new().nest("/images", routes()).with_state(store);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/images")
    }

    #[test]
    fn ranges() {
        use RangeSpec::*;
        assert_eq!(parse_range("bytes=0-9", 100), Partial(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Partial(90, 99));
        assert_eq!(parse_range("bytes=90-1000", 100), Partial(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Partial(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), Partial(0, 99));
        assert_eq!(parse_range("BYTES = 5-5", 100), Partial(5, 5));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("bytes=5-1", 100), Full);
        assert_eq!(parse_range("bytes=x-1", 100), Full);
        assert_eq!(parse_range("bytes=+1-2", 100), Full);
        assert_eq!(parse_range("items=0-1", 100), Full);
        assert_eq!(parse_range("bytes", 100), Full);
    }

    async fn error_of(res: reqwest::Response) -> Fault {
        res.json::<ErrorBody>().await.unwrap().error
    }

    #[tokio::test]
    async fn serves_lists_ranges_and_deletes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let m = put(
            &store,
            "img-1",
            &[("pages-1.img", &data), ("d/core.img", b"core")],
        )
        .await;
        let base = serve(store.clone()).await;
        let http = crate::http::tests::client();

        // List.
        let list: Vec<gca_protocol::images::ImageSummary> =
            http.get(&base).send().await.unwrap().json().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, "img-1");

        // Manifest, as stored, with its digest.
        let res = http.get(format!("{base}/img-1")).send().await.unwrap();
        assert_eq!(res.status(), S::OK);
        assert_eq!(res.headers()["content-type"], "application/json");
        let digest = res.headers()[DIGEST_HEADER].to_str().unwrap().to_string();
        assert_eq!(res.headers()["etag"], format!("\"{digest}\"").as_str());
        let bytes = res.bytes().await.unwrap();
        assert_eq!(bytes, store.manifest_bytes(&id("img-1")).await.unwrap());
        assert_eq!(digest, Manifest::digest_of(&bytes));
        assert_eq!(digest, store.digest(&id("img-1")).await.unwrap());

        // Whole file.
        let url = format!("{base}/img-1/files/pages-1.img");
        let res = http.get(&url).send().await.unwrap();
        assert_eq!(res.status(), S::OK);
        assert_eq!(res.headers()["accept-ranges"], "bytes");
        assert_eq!(res.headers()["content-length"], "300000");
        let etag = format!("\"{}\"", m.files[1].etag());
        assert_eq!(m.files[1].path, "pages-1.img");
        assert_eq!(res.headers()["etag"], etag.as_str());
        let body = res.bytes().await.unwrap();
        assert_eq!(&body[..], &data[..]);
        assert_eq!(Some(hex::encode(Sha256::digest(&body))), m.files[1].sha256);
        let res = http
            .get(format!("{base}/img-1/files/d/core.img"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.bytes().await.unwrap(), &b"core"[..]);

        // One range.
        let res = http
            .get(&url)
            .header("range", "bytes=1000-1999")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::PARTIAL_CONTENT);
        assert_eq!(res.headers()["content-range"], "bytes 1000-1999/300000");
        assert_eq!(res.headers()["content-length"], "1000");
        assert_eq!(&res.bytes().await.unwrap()[..], &data[1000..2000]);
        // Open-ended and suffix ranges.
        let res = http
            .get(&url)
            .header("range", "bytes=299990-")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::PARTIAL_CONTENT);
        assert_eq!(&res.bytes().await.unwrap()[..], &data[299_990..]);
        let res = http
            .get(&url)
            .header("range", "bytes=-5")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::PARTIAL_CONTENT);
        assert_eq!(res.headers()["content-range"], "bytes 299995-299999/300000");
        assert_eq!(&res.bytes().await.unwrap()[..], &data[299_995..]);
        // If-Range: matching ETag → range; another → whole file.
        let res = http
            .get(&url)
            .header("range", "bytes=10-19")
            .header("if-range", etag.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::PARTIAL_CONTENT);
        let res = http
            .get(&url)
            .header("range", "bytes=10-19")
            .header("if-range", "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::OK);
        assert_eq!(res.bytes().await.unwrap().len(), 300_000);
        // Several ranges: ignored.
        let res = http
            .get(&url)
            .header("range", "bytes=0-1,5-6")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::OK);
        assert_eq!(res.bytes().await.unwrap().len(), 300_000);
        // Unsatisfiable.
        let res = http
            .get(&url)
            .header("range", "bytes=300000-")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::RANGE_NOT_SATISFIABLE);
        assert_eq!(res.headers()["content-range"], "bytes */300000");
        assert_eq!(error_of(res).await.kind, FaultKind::InvalidMessage);

        // HEAD.
        let res = http.head(&url).send().await.unwrap();
        assert_eq!(res.status(), S::OK);
        assert_eq!(res.headers()["content-length"], "300000");
        assert_eq!(res.headers()["etag"], etag.as_str());
        assert!(res.bytes().await.unwrap().is_empty());
        let res = http
            .head(&url)
            .header("range", "bytes=0-9")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), S::PARTIAL_CONTENT);
        assert_eq!(res.headers()["content-length"], "10");

        // Errors: unknown image, unknown file, the manifest is not a file, bad IDs and paths.
        let res = http.get(format!("{base}/nope")).send().await.unwrap();
        assert_eq!(res.status(), S::NOT_FOUND);
        let f = error_of(res).await;
        assert_eq!(f.kind, FaultKind::ResourceUnknown);
        assert_eq!(f.code.as_deref(), Some("unknown-image"));
        for path in [
            "img-1/files/nope",
            "img-1/files/manifest.json",
            "nope/files/pages-1.img",
        ] {
            let res = http.get(format!("{base}/{path}")).send().await.unwrap();
            assert_eq!(res.status(), S::NOT_FOUND, "{path}");
        }
        for path in [
            "..%2F..%2Fetc",
            ".hidden",
            "img-1/files/..%2Fmanifest.json",
            "img-1/files/d/..%2F..%2Fimg-1%2Fmanifest.json",
            "img-1/files/a%00b",
        ] {
            let res = http.get(format!("{base}/{path}")).send().await.unwrap();
            assert_eq!(res.status(), S::BAD_REQUEST, "{path}");
            assert_eq!(error_of(res).await.kind, FaultKind::InvalidMessage);
        }

        // Delete.
        let res = http.delete(format!("{base}/img-1")).send().await.unwrap();
        assert_eq!(res.status(), S::OK);
        let d: Deleted = res.json().await.unwrap();
        assert_eq!(
            d,
            Deleted {
                id: "img-1".into(),
                freed_bytes: 300_004
            }
        );
        assert_eq!(store.usage(), 0);
        let res = http.get(&url).send().await.unwrap();
        assert_eq!(res.status(), S::NOT_FOUND);
        let res = http.delete(format!("{base}/img-1")).send().await.unwrap();
        assert_eq!(res.status(), S::NOT_FOUND);
        let list: Vec<gca_protocol::images::ImageSummary> =
            http.get(&base).send().await.unwrap().json().await.unwrap();
        assert!(list.is_empty());
    }

    #[tokio::test]
    async fn export_answers_with_statuses_and_json_errors() {
        use crate::export::{OWNER_GID_KEY, OWNER_UID_KEY};
        use gca_protocol::images::Exported;
        use std::os::unix::fs::MetadataExt;
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (the CTS exports as root and chowns to the owner)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("store"), None).unwrap();
        let commit = |id: &'static str, owner: bool| {
            let store = store.clone();
            async move {
                let s = store.stage(&self::id(id)).await.unwrap();
                std::fs::write(s.dir.join("pages.img"), b"pages").unwrap();
                let mut meta = crate::store::tests::meta("job-9");
                if owner {
                    meta.extra.insert(OWNER_UID_KEY.into(), "1000".into());
                    meta.extra.insert(OWNER_GID_KEY.into(), "1000".into());
                }
                s.commit_whole_files(meta).await.unwrap();
            }
        };
        commit("img-1", true).await;
        commit("img-2", true).await;
        commit("orphan", false).await;
        let keep = tmp.path().join("keep");
        std::fs::create_dir(&keep).unwrap();
        std::os::unix::fs::chown(&keep, Some(1000), Some(1000)).unwrap();
        let dir = keep.display().to_string();
        let digest = store.digest(&id("img-1")).await.unwrap();
        let base = serve(store.clone()).await;
        let http = client();
        let export = |id: &str, body: serde_json::Value| {
            http.post(format!("{base}/{id}/export")).json(&body).send()
        };

        let res = export(
            "img-1",
            serde_json::json!({"dir": dir, "digest": digest, "remove": true}),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), S::OK);
        let done: Exported = res.json().await.unwrap();
        assert_eq!(
            done,
            Exported {
                id: "img-1".into(),
                path: format!("{dir}/img-1"),
                files: 1,
                bytes: 5,
                already: false,
                removed: true,
            }
        );
        assert_eq!(
            std::fs::metadata(keep.join("img-1/pages.img"))
                .unwrap()
                .uid(),
            1000
        );
        let res = http.get(format!("{base}/img-1")).send().await.unwrap();
        assert_eq!(res.status(), S::NOT_FOUND, "removed from the store");
        // A retry after a lost answer.
        let res = export(
            "img-1",
            serde_json::json!({"dir": dir, "digest": digest, "remove": true}),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), S::OK);
        let again: serde_json::Value = res.json().await.unwrap();
        assert_eq!(again["already"], true);
        assert_eq!(again["removed"], true);

        // Errors: status, kind and code in the usual JSON shape.
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::os::unix::fs::chown(&other, Some(1001), None).unwrap();
        let cases = [
            (
                "img-2",
                serde_json::json!({"dir": "keep"}),
                S::BAD_REQUEST,
                FaultKind::InvalidMessage,
                "invalid-export",
            ),
            (
                "img-2",
                serde_json::json!({"dir": dir, "remov": true}),
                S::BAD_REQUEST,
                FaultKind::InvalidMessage,
                "invalid-export",
            ),
            (
                "img-2",
                serde_json::json!({"remove": true}),
                S::BAD_REQUEST,
                FaultKind::InvalidMessage,
                "invalid-export",
            ),
            (
                "img-2",
                serde_json::json!({"dir": other.display().to_string()}),
                S::FORBIDDEN,
                FaultKind::AccessDenied,
                "export-dir-refused",
            ),
            (
                "..%2Fimg-2",
                serde_json::json!({"dir": dir}),
                S::BAD_REQUEST,
                FaultKind::InvalidMessage,
                "invalid-export",
            ),
            (
                "nope",
                serde_json::json!({"dir": dir}),
                S::NOT_FOUND,
                FaultKind::ResourceUnknown,
                "unknown-image",
            ),
            (
                "img-2",
                serde_json::json!({"dir": dir, "digest": digest}),
                S::CONFLICT,
                FaultKind::Conflict,
                "digest-mismatch",
            ),
            (
                "orphan",
                serde_json::json!({"dir": dir}),
                S::CONFLICT,
                FaultKind::Conflict,
                "image-owner-unknown",
            ),
            (
                "img-2",
                serde_json::json!({"dir": format!("{dir}/missing")}),
                S::CONFLICT,
                FaultKind::Conflict,
                "export-dir-missing",
            ),
        ];
        for (id, body, status, kind, code) in cases {
            let res = export(id, body.clone()).await.unwrap();
            assert_eq!(res.status(), status, "{body}");
            let f = error_of(res).await;
            assert_eq!(
                (f.kind, f.code.as_deref()),
                (kind, Some(code)),
                "{body}: {}",
                f.message
            );
        }
        let res = export(
            "img-2",
            serde_json::json!({"dir": other.display().to_string()}),
        )
        .await
        .unwrap();
        let msg = error_of(res).await.message;
        assert!(
            msg.ends_with("the directory belongs to uid 1001, not to the job's owner uid 1000"),
            "{msg}"
        );

        // A corrupt stored file: 500 with the reason, nothing left in the directory.
        let p = store
            .file_path(&id("img-2"), &rel("pages.img"))
            .await
            .unwrap();
        std::fs::write(p, b"PAGES").unwrap();
        let res = export("img-2", serde_json::json!({"dir": dir}))
            .await
            .unwrap();
        assert_eq!(res.status(), S::INTERNAL_SERVER_ERROR);
        let f = error_of(res).await;
        assert_eq!(f.code.as_deref(), Some("image-corrupt"));
        assert!(
            f.message.contains("file pages.img has sha256"),
            "{}",
            f.message
        );
        let left: Vec<_> = std::fs::read_dir(&keep)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["img-1"]);
    }
}
