//! Clients for GCA services: [`SoapClient`] (service to service: GCS ⇄ CTS, wrappers ⇄ CTS)
//! and [`JsonClient`] (scripts, `gcactl`). Both return the service's typed [`Fault`] on
//! failure; transport problems become `ServiceUnavailable` faults that say which endpoint
//! could not be reached and why.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fault::{ErrorBody, Fault, FaultKind};
use crate::messages::XmlContent;
use crate::ns::GCA;
use crate::ops::Operation;
use crate::soap::{self, SoapVersion};
use crate::xml::Element;

/// Limit on response bodies we read into memory.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

fn transport_fault(endpoint: &str, e: &reqwest::Error) -> Fault {
    if e.is_timeout() {
        Fault::new(
            FaultKind::ServiceUnavailable,
            format!("{endpoint} did not answer in time"),
        )
        .with_code("timeout")
    } else if e.is_connect() {
        Fault::new(
            FaultKind::ServiceUnavailable,
            format!("cannot connect to {endpoint}: {}", root_cause(e)),
        )
        .with_code("unreachable")
    } else {
        Fault::new(
            FaultKind::ServiceUnavailable,
            format!("request to {endpoint} failed: {}", root_cause(e)),
        )
        .with_code("transport")
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg = format!("{msg}: {s}");
        cur = s.source();
    }
    msg
}

/// Why a bounded read of a response body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// Reads a response body of at most `limit` bytes, checking as it streams: a declared length
/// over the limit is refused before reading, and a chunked body as soon as it passes it (the
/// connection is dropped then, so the peer cannot make us buffer more).
pub async fn read_body(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn read_limited(endpoint: &str, resp: reqwest::Response) -> Result<(u16, String), Fault> {
    let status = resp.status().as_u16();
    let bytes = read_body(resp, MAX_RESPONSE_BYTES)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge(_) => Fault::new(
                FaultKind::OperationFailed,
                format!("{endpoint} answered with more than {MAX_RESPONSE_BYTES} bytes"),
            ),
            BodyError::Transport(e) => transport_fault(endpoint, &e),
        })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Fault::new(
            FaultKind::OperationFailed,
            format!("{endpoint} answered with non-UTF-8 text"),
        )
    })?;
    Ok((status, text))
}

/// A SOAP client for one endpoint.
#[derive(Debug, Clone)]
pub struct SoapClient {
    http: reqwest::Client,
    endpoint: String,
    version: SoapVersion,
    reference_parameters: Vec<Element>,
}

impl SoapClient {
    pub fn new(http: reqwest::Client, endpoint: impl Into<String>) -> Self {
        Self {
            http,
            endpoint: endpoint.into(),
            version: SoapVersion::Soap11,
            reference_parameters: Vec::new(),
        }
    }

    pub fn with_version(mut self, version: SoapVersion) -> Self {
        self.version = version;
        self
    }

    /// Reference parameters of the target EPR, echoed as headers on every call.
    pub fn with_reference_parameters(mut self, params: Vec<Element>) -> Self {
        self.reference_parameters = params;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub async fn call<O: Operation>(&self, request: &O::Request) -> Result<O::Response, Fault> {
        self.call_with_timeout::<O>(request, None).await
    }

    /// Calls `O`, bounding the whole exchange by `timeout` when given (otherwise by the HTTP
    /// client's request timeout).
    pub async fn call_with_timeout<O: Operation>(
        &self,
        request: &O::Request,
        timeout: Option<Duration>,
    ) -> Result<O::Response, Fault> {
        let action = O::request_action();
        let (body, _id) = soap::request_envelope(
            self.version,
            &action,
            &self.endpoint,
            &self.reference_parameters,
            request.to_element(O::NAME),
        );
        let mut req = self
            .http
            .post(&self.endpoint)
            .header(
                http::header::CONTENT_TYPE,
                self.version.content_type(&action),
            )
            .body(body);
        if self.version == SoapVersion::Soap11 {
            req = req.header("SOAPAction", format!("\"{action}\""));
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| transport_fault(&self.endpoint, &e))?;
        let (status, text) = read_limited(&self.endpoint, resp).await?;
        let payload = soap::parse_response(&text).map_err(|mut f| {
            if f.kind == FaultKind::OperationFailed && status != 200 && text.trim().is_empty() {
                f.message = format!("{} answered HTTP {status} with no SOAP body", self.endpoint);
            }
            f
        })?;
        let expected = O::response_element();
        if !payload.is(GCA, &expected) {
            return Err(Fault::new(
                FaultKind::OperationFailed,
                format!(
                    "{} answered <{}> where <{expected}> was expected",
                    self.endpoint,
                    payload.qname()
                ),
            ));
        }
        O::Response::read_children(&payload).map_err(|e| {
            Fault::new(
                FaultKind::OperationFailed,
                format!("{} answered an invalid <{expected}>: {e}", self.endpoint),
            )
        })
    }
}

/// A JSON client for the `/api/v1` routes of a service.
#[derive(Debug, Clone)]
pub struct JsonClient {
    http: reqwest::Client,
    base: String,
}

impl JsonClient {
    /// `base` is the service root, e.g. `http://127.0.0.1:8080`.
    pub fn new(http: reqwest::Client, base: impl Into<String>) -> Self {
        Self {
            http,
            base: base.into().trim_end_matches('/').to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Fault> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Fault> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Fault> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, Fault> {
        self.send(self.http.delete(self.url(path))).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, Fault> {
        let resp = req
            .send()
            .await
            .map_err(|e| transport_fault(&self.base, &e))?;
        let (status, text) = read_limited(&self.base, resp).await?;
        if (200..300).contains(&status) {
            return serde_json::from_str(&text).map_err(|e| {
                Fault::new(
                    FaultKind::OperationFailed,
                    format!("{} answered JSON this client cannot read: {e}", self.base),
                )
            });
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Err(b.error),
            Err(_) => Err(Fault::new(
                FaultKind::OperationFailed,
                format!(
                    "{} answered HTTP {status}: {}",
                    self.base,
                    text.chars().take(200).collect::<String>()
                ),
            )),
        }
    }
}

/// Percent-encodes one URL path segment (GIDs and names may hold any character).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with an endless chunked body; counts what it
    /// managed to write before the client went away.
    async fn endless() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let written = Arc::new(AtomicUsize::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
            while s.write_all(chunk.as_bytes()).await.is_ok() {
                counter.fetch_add(64 * 1024, Ordering::SeqCst);
            }
        });
        (url, written)
    }

    #[tokio::test]
    async fn an_endless_chunked_answer_is_cut_off_at_the_limit() {
        let (url, written) = endless().await;
        let http = crate::transport::http_client(&Default::default()).unwrap();
        let client = JsonClient::new(http, url);
        let f = tokio::time::timeout(
            Duration::from_secs(20),
            client.get::<serde_json::Value>("/x"),
        )
        .await
        .expect("the read stops at the limit instead of buffering on")
        .unwrap_err();
        assert_eq!(f.kind, FaultKind::OperationFailed);
        assert!(f.message.contains("more than 16777216 bytes"), "{f}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = written.load(Ordering::SeqCst);
        // Loopback socket buffers (send and receive, autotuned up to several MiB each) hold
        // what the server wrote past the limit; a client that buffered on would let it write
        // for the whole 20 s, gigabytes.
        assert!(
            sent < MAX_RESPONSE_BYTES + 64 * 1024 * 1024,
            "the server could write {sent} bytes"
        );
    }
}
