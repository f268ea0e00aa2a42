//! A small WS-BaseNotification consumer for tests: an HTTP server on 127.0.0.1:0 that collects
//! the bodies POSTed to it, and can fail the first K requests (HTTP 503).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use gca_protocol::ns;
use gca_protocol::transport;
use gca_protocol::xml::{self, Element};
use tokio::sync::oneshot;

/// One Notify as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: String,
    pub headers: HeaderMap,
}

pub struct Consumer {
    pub url: String,
    /// Every request, accepted or failed.
    pub requests: Arc<AtomicUsize>,
    /// Requests still to fail.
    pub fail_next: Arc<AtomicUsize>,
    accepted: Arc<Mutex<Vec<Received>>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Consumer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/consumer", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let fail_next = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let state = (requests.clone(), fail_next.clone(), accepted.clone());
        let app = axum::Router::new().route(
            "/consumer",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (requests, fail_next, accepted) = state.clone();
                async move {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let fail = fail_next
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if fail {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    accepted.lock().unwrap().push(Received {
                        body: String::from_utf8_lossy(&body).into_owned(),
                        headers,
                    });
                    axum::http::StatusCode::ACCEPTED
                }
            }),
        );
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(transport::serve(listener, None, app, async move {
            let _ = rx.await;
        }));
        Consumer {
            url,
            requests,
            fail_next,
            accepted,
            stop: Some(tx),
        }
    }

    /// Fails the next `k` requests.
    pub fn fail(&self, k: usize) {
        self.fail_next.store(k, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.accepted.lock().unwrap().clone()
    }

    /// Waits until at least `n` notifications were accepted (panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Notification> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got.iter().map(|r| Notification::parse(&r.body)).collect();
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "expected {n} notifications within {timeout:?}, got {}: {:#?}",
                    got.len(),
                    got.iter().map(|r| &r.body).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// All notifications accepted so far.
    pub fn notifications(&self) -> Vec<Notification> {
        self.received()
            .iter()
            .map(|r| Notification::parse(&r.body))
            .collect()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A parsed `wsnt:Notify` (one NotificationMessage).
#[derive(Debug, Clone)]
pub struct Notification {
    pub action: String,
    pub topic: String,
    pub dialect: String,
    pub subscription_address: String,
    pub producer_address: String,
    pub message: Element,
    pub envelope: Element,
}

impl Notification {
    pub fn parse(text: &str) -> Self {
        let env = xml::parse(text).expect("a Notify is XML");
        assert!(env.is(ns::SOAP11, "Envelope"), "SOAP 1.1 envelope: {text}");
        let action = env
            .child(ns::SOAP11, "Header")
            .and_then(|h| h.opt_text(ns::WSA, "Action"))
            .unwrap_or_default();
        let notify = env
            .child(ns::SOAP11, "Body")
            .and_then(|b| b.child(ns::WSNT, "Notify"))
            .unwrap_or_else(|| panic!("no wsnt:Notify in {text}"));
        let nm = notify
            .child(ns::WSNT, "NotificationMessage")
            .expect("NotificationMessage");
        let topic_el = nm.child(ns::WSNT, "Topic").expect("Topic");
        let resolved = topic_el
            .resolve_qname(&topic_el.text())
            .expect("the topic's prefix is declared");
        let topic = format!("{{{}}}{}", resolved.0.unwrap_or_default(), resolved.1);
        let addr = |name: &str| {
            nm.child(ns::WSNT, name)
                .and_then(|e| e.opt_text(ns::WSA, "Address"))
                .unwrap_or_default()
        };
        let message = nm
            .child(ns::WSNT, "Message")
            .and_then(|m| m.elements().next())
            .cloned()
            .expect("a message element");
        Notification {
            action,
            topic,
            dialect: topic_el.attr("", "Dialect").unwrap_or("").to_string(),
            subscription_address: addr("SubscriptionReference"),
            producer_address: addr("ProducerReference"),
            message,
            envelope: env.clone(),
        }
    }

    /// The topic's local name (in urn:gca:v1).
    pub fn topic_name(&self) -> &str {
        self.topic
            .strip_prefix("{urn:gca:v1}")
            .unwrap_or_else(|| panic!("topic {} is not in urn:gca:v1", self.topic))
    }
}
