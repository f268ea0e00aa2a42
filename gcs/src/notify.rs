//! WS-BaseNotification 1.3 on the GCS: the GCS resource is the NotificationProducer
//! (Subscribe, GetCurrentMessage), each subscription is a WS-Resource
//! (`{service}/subscriptions/{id}`, the SubscriptionManager: Renew, Unsubscribe).
//!
//! Events are queued in the `notifications` table in the transaction of the change that causes
//! them ([`emit`]), one row per matching subscription (a transactional outbox). Every replica
//! runs [`run`]: it claims the first due row of each subscription for a lease (one short
//! statement, `for update skip locked`), POSTs a `wsnt:Notify` to each consumer in its own
//! task, with no transaction open, and then deletes the row on a 2xx, or schedules a retry
//! with exponential backoff, if its lease still holds the row. So a slow consumer delays only
//! its own notifications, a subscription's notifications go out in order, two replicas never
//! deliver one row while a lease holds, and a row survives restarts until it is delivered,
//! given up, or its subscription ends.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use gca_protocol::destinations;
use gca_protocol::fault::{self, Fault, FaultKind};
use gca_protocol::messages::{NewSubscription, SubscriptionInfo, SubscriptionList};
use gca_protocol::ns;
use gca_protocol::soap::{self, SoapVersion};
use gca_protocol::wsn::{self, ManagerRequest, Subscribe, Topic};
use gca_protocol::wsrf::{self, Epr, ResourceKind, ResourceRef};
use gca_protocol::xml::{self, Element};
use sqlx::PgExecutor;
use tokio::sync::Semaphore;

use crate::db;
use crate::error::{Error, Result};
use crate::policy::{self, Op};
use crate::service::{Ctx, Gcs};

/// What to tell a subscriber whose consumer is internal.
const PRIVATE_CONSUMERS: &str = "this GCS delivers only to consumers on public addresses (a site whose consumers are internal sets allow_private_consumers, GCS_ALLOW_PRIVATE_CONSUMERS=true)";

/// Queues `message` (a `gca:{topic}` element) for every subscription it matches, in the
/// caller's transaction.
pub async fn emit(
    db: impl PgExecutor<'_>,
    topic: Topic,
    gid: Option<&str>,
    message: &Element,
) -> Result<()> {
    let n = db::emit(db, topic.as_str(), gid, &message.to_xml()).await?;
    if n > 0 {
        tracing::debug!(
            topic = topic.as_str(),
            gid,
            queued = n,
            "notifications queued"
        );
    }
    Ok(())
}

/// A stored subscription and its backlog, as the JSON API shows it.
fn to_info(s: db::SubscriptionStatus, service_address: &str) -> SubscriptionInfo {
    SubscriptionInfo {
        address: ResourceRef::subscription(&s.row.id)
            .epr(service_address)
            .address,
        id: s.row.id,
        consumer: s.row.consumer_address,
        topics: s.row.topics.unwrap_or_default(),
        gid: s.row.gid,
        created_at: s.row.created_at,
        termination_time: s.row.termination_time,
        pending: s.pending,
        failed: s.failed,
        last_error: s.last_error,
    }
}

fn unknown_subscription(id: &str) -> Error {
    Error::Fault(
        Fault::resource_unknown(format!(
            "no subscription {id:?} at this GCS (it was unsubscribed, expired, or never existed)"
        ))
        .with_code("unknown-subscription"),
    )
}

/// The retry delay after `attempts` failed attempts: base × 2^(attempts-1), capped.
pub fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(30));
    base.saturating_mul(factor).min(max)
}

impl Gcs {
    /// Wakes this replica's deliverer (after a commit that queued notifications).
    pub fn wake_deliverer(&self) {
        self.wake.notify_one();
    }

    /// A WS-BaseNotification request (`wsnt:*` body) on `resource`.
    pub async fn notification(
        &self,
        ctx: &Ctx,
        resource: &ResourceRef,
        service_address: &str,
        body: &Element,
        action: Option<&str>,
    ) -> Result<(String, Element)> {
        let op = match body.name.as_str() {
            "GetCurrentMessage" => Op::GetCurrentMessage,
            "Renew" | "Unsubscribe" => Op::ManageSubscription,
            _ => Op::Subscribe,
        };
        policy::authorize(&ctx.caller, op)?;
        let now = Utc::now();
        match (body.name.as_str(), resource) {
            ("Subscribe", ResourceRef::Service | ResourceRef::Resource(ResourceKind::Job, _)) => {
                let mut req = Subscribe::read(body, action, now)?;
                if let Some(g) = &req.gid {
                    gca_protocol::ids::check("GID", g)
                        .map_err(|e| Error::kind(FaultKind::InvalidFilter, e.to_string()))?;
                }
                if let ResourceRef::Resource(_, gid) = resource {
                    // Subscribing on a job resource: only that job's events.
                    if req.gid.as_ref().is_some_and(|g| g != gid) {
                        return Err(Error::kind(
                            FaultKind::InvalidFilter,
                            format!("the gca:GID filter names another job than the job resource {gid:?}"),
                        ));
                    }
                    db::job_lifetime(&self.db, gid)
                        .await?
                        .filter(|l| l.destroyed_at.is_none())
                        .ok_or_else(|| {
                            Error::unknown(format!("no job resource {gid:?} at this GCS"))
                        })?;
                    req.gid = Some(gid.clone());
                }
                self.subscribe(ctx, req, service_address, body, now).await
            }
            ("GetCurrentMessage", ResourceRef::Service) => {
                if !wsrf::action_matches(action, wsn::GET_CURRENT_MESSAGE_REQUEST) {
                    return Err(Error::kind(
                        FaultKind::ActionNotSupported,
                        format!("action {action:?} does not match <wsnt:GetCurrentMessage>"),
                    ));
                }
                let topic = body.child(ns::WSNT, "Topic").ok_or_else(|| {
                    Error::invalid("<wsnt:GetCurrentMessage> needs a <wsnt:Topic>")
                })?;
                let (_, t) = wsn::read_topic_expression(topic)?;
                Err(Error::kind(
                    FaultKind::NoCurrentMessageOnTopic,
                    format!(
                        "the GCS keeps no current message on {}: subscribe to receive its events",
                        t.qname()
                    ),
                ))
            }
            ("Renew" | "Unsubscribe", ResourceRef::Resource(ResourceKind::Subscription, id)) => {
                self.check_subscription_owner(ctx, id).await?;
                let req = ManagerRequest::read(body, action, now)?;
                match req {
                    ManagerRequest::Renew(at) => {
                        if !db::renew_subscription(&self.db, id, at).await? {
                            return Err(unknown_subscription(id));
                        }
                        tracing::info!(subscription = %id, termination = ?at, "subscription renewed");
                        Ok((wsn::RENEW_RESPONSE.into(), wsn::renew_response(now, at)))
                    }
                    ManagerRequest::Unsubscribe => {
                        if !db::delete_subscription(&self.db, id).await? {
                            return Err(unknown_subscription(id));
                        }
                        tracing::info!(subscription = %id, "unsubscribed");
                        Ok((
                            wsn::UNSUBSCRIBE_RESPONSE.into(),
                            Element::new(ns::WSNT, "UnsubscribeResponse"),
                        ))
                    }
                }
            }
            _ => {
                let what = match resource {
                    ResourceRef::Service => "the GCS itself".to_string(),
                    ResourceRef::Resource(k, id) => format!("{} resource {id:?}", k.as_str()),
                };
                Err(Error::kind(
                    FaultKind::ActionNotSupported,
                    format!(
                        "<wsnt:{}> is not served on {what}: Subscribe and GetCurrentMessage go to the GCS (or a job), Renew and Unsubscribe to a subscription's address",
                        body.name
                    ),
                ))
            }
        }
    }

    /// A broker manages only the subscriptions it created (an unknown one is unknown to all).
    pub(crate) async fn check_subscription_owner(&self, ctx: &Ctx, id: &str) -> Result<()> {
        let row = db::get_subscription(&self.db, id)
            .await?
            .ok_or_else(|| unknown_subscription(id))?;
        policy::may_manage_subscription(&ctx.caller, row.owner.as_deref())
    }

    async fn subscribe(
        &self,
        ctx: &Ctx,
        req: Subscribe,
        service_address: &str,
        body: &Element,
        now: chrono::DateTime<Utc>,
    ) -> Result<(String, Element)> {
        let consumer_el = body
            .child(ns::WSNT, "ConsumerReference")
            .cloned()
            .unwrap_or_else(|| req.consumer.to_element(ns::WSNT, "ConsumerReference"));
        let row = self
            .create_subscription(
                ctx,
                &req.consumer.address,
                consumer_el,
                &req.topics,
                &req.dialect,
                req.gid.clone(),
                req.termination,
                service_address,
                now,
            )
            .await?;
        let epr = ResourceRef::subscription(&row.id).epr(service_address);
        Ok((
            wsn::SUBSCRIBE_RESPONSE.into(),
            wsn::subscribe_response(&epr, now, row.termination_time),
        ))
    }

    /// Stores a new subscription (Subscribe over SOAP, or the JSON API). `termination`: None
    /// for the default lifetime, Some(None) for none.
    #[allow(clippy::too_many_arguments)]
    async fn create_subscription(
        &self,
        ctx: &Ctx,
        consumer: &str,
        consumer_reference: Element,
        topics: &[Topic],
        dialect: &str,
        gid: Option<String>,
        termination: Option<Option<chrono::DateTime<Utc>>>,
        service_address: &str,
        now: chrono::DateTime<Utc>,
    ) -> Result<db::SubscriptionRow> {
        let address = consumer.trim().to_string();
        let usable = reqwest::Url::parse(&address)
            .ok()
            .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !usable {
            return Err(Error::kind(
                FaultKind::SubscribeCreationFailed,
                format!(
                    "the consumer address {address:?} is not an http(s) URL the GCS can POST notifications to (pull delivery is not offered)"
                ),
            ));
        }
        if !self.config.allow_private_consumers {
            if let Ok(url) = reqwest::Url::parse(&address) {
                destinations::check_url_host(&url).map_err(|why| {
                    Error::kind(
                        FaultKind::SubscribeCreationFailed,
                        format!("the consumer address {address:?} is refused: {why}; {PRIVATE_CONSUMERS}"),
                    )
                })?;
            }
        }
        let termination = match termination {
            Some(t) => t,
            // A default lifetime past what can be represented is none.
            None => i64::try_from(self.config.subscription_default_lifetime_secs)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .and_then(|d| gca_protocol::wsrf::after(now, d)),
        };
        let row = db::SubscriptionRow {
            id: uuid::Uuid::new_v4().to_string(),
            consumer_address: address,
            consumer_reference: consumer_reference.to_xml(),
            topics: (!topics.is_empty())
                .then(|| topics.iter().map(|t| t.as_str().to_string()).collect()),
            topic_dialect: dialect.to_string(),
            gid,
            producer_address: service_address.to_string(),
            created_at: now,
            termination_time: termination,
            owner: policy::subscription_owner(&ctx.caller),
        };
        let admission = db::insert_subscription_within(
            &self.db,
            &row,
            self.config.max_subscriptions_per_identity,
            self.config.max_subscriptions,
        )
        .await?;
        let who = row.owner.as_deref().unwrap_or("(no identity)");
        match admission {
            db::SubscriptionAdmission::Inserted => {}
            db::SubscriptionAdmission::OwnerFull(n) => {
                tracing::info!(owner = %who, subscriptions = n, "subscription refused: per-identity limit");
                return Err(Error::Fault(
                    Fault::new(
                        FaultKind::SubscribeCreationFailed,
                        format!(
                            "{who} holds {n} live subscriptions, the most one identity may hold (max_subscriptions_per_identity = {}); unsubscribe some, or let them expire, first",
                            self.config.max_subscriptions_per_identity
                        ),
                    )
                    .with_code(fault::SUBSCRIPTIONS_PER_IDENTITY_LIMIT),
                ));
            }
            db::SubscriptionAdmission::Full(n) => {
                tracing::warn!(
                    subscriptions = n,
                    "subscription refused: the GCS holds its limit of subscriptions"
                );
                return Err(Error::Fault(
                    Fault::new(
                        FaultKind::SubscribeCreationFailed,
                        format!(
                            "the GCS holds {n} live subscriptions, its limit (max_subscriptions = {}); try again when some have ended",
                            self.config.max_subscriptions
                        ),
                    )
                    .with_code(fault::SUBSCRIPTIONS_LIMIT),
                ));
            }
        }
        tracing::info!(subscription = %row.id, consumer = %row.consumer_address, topics = ?row.topics, gid = ?row.gid, "subscribed");
        Ok(row)
    }

    /// JSON API: subscribe a consumer URL to topics by name.
    pub async fn subscribe_json(
        &self,
        ctx: &Ctx,
        req: NewSubscription,
        service_address: &str,
    ) -> Result<SubscriptionInfo> {
        policy::authorize(&ctx.caller, Op::Subscribe)?;
        let topics = req
            .topics
            .iter()
            .map(|name| {
                Topic::ALL
                    .into_iter()
                    .find(|t| t.as_str() == name.trim())
                    .ok_or_else(|| {
                        Error::kind(
                            FaultKind::TopicNotSupported,
                            format!(
                                "unknown topic {name:?}; the topics are {}",
                                Topic::ALL.map(Topic::as_str).join(", ")
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(g) = &req.gid {
            gca_protocol::ids::check("GID", g).map_err(|e| Error::invalid(e.to_string()))?;
        }
        let now = Utc::now();
        let termination = match req.lifetime_secs {
            None => None,
            Some(0) => Some(None),
            Some(s) => Some(Some(
                chrono::Duration::try_seconds(s.min(100 * 365 * 24 * 3600) as i64)
                    .and_then(|d| gca_protocol::wsrf::after(now, d))
                    .ok_or_else(|| Error::invalid("lifetime_secs is too large"))?,
            )),
        };
        let consumer = Epr {
            address: req.consumer.trim().to_string(),
            reference_parameters: Vec::new(),
        };
        let row = self
            .create_subscription(
                ctx,
                &req.consumer,
                consumer.to_element(ns::WSNT, "ConsumerReference"),
                &topics,
                wsn::SIMPLE_DIALECT,
                req.gid,
                termination,
                service_address,
                now,
            )
            .await?;
        self.subscription_status(&row.id, service_address).await
    }

    /// JSON API: every live subscription, with its backlog.
    pub async fn list_subscriptions(
        &self,
        ctx: &Ctx,
        service_address: &str,
    ) -> Result<SubscriptionList> {
        policy::authorize(&ctx.caller, Op::ListSubscriptions)?;
        let owner = policy::subscription_filter(&ctx.caller);
        Ok(SubscriptionList {
            subscriptions: db::subscription_status(&self.db, None, owner.as_deref())
                .await?
                .into_iter()
                .map(|s| to_info(s, service_address))
                .collect(),
        })
    }

    /// JSON API: one live subscription.
    pub async fn subscription_info(
        &self,
        ctx: &Ctx,
        id: &str,
        service_address: &str,
    ) -> Result<SubscriptionInfo> {
        policy::authorize(&ctx.caller, Op::ManageSubscription)?;
        self.check_subscription_owner(ctx, id).await?;
        self.subscription_status(id, service_address).await
    }

    async fn subscription_status(
        &self,
        id: &str,
        service_address: &str,
    ) -> Result<SubscriptionInfo> {
        db::subscription_status(&self.db, Some(id), None)
            .await?
            .into_iter()
            .next()
            .map(|s| to_info(s, service_address))
            .ok_or_else(|| unknown_subscription(id))
    }

    /// JSON API: Unsubscribe.
    pub async fn unsubscribe(&self, ctx: &Ctx, id: &str) -> Result<()> {
        policy::authorize(&ctx.caller, Op::ManageSubscription)?;
        self.check_subscription_owner(ctx, id).await?;
        if !db::delete_subscription(&self.db, id).await? {
            return Err(unknown_subscription(id));
        }
        tracing::info!(subscription = %id, "unsubscribed");
        Ok(())
    }

    /// How long a claim holds a notification: its POST's bound plus room to record the
    /// outcome. A replica that dies mid-POST leaves the notification to others after this.
    fn notify_lease(&self) -> Duration {
        Duration::from_secs(self.config.notify_timeout_secs.max(1)) + Duration::from_secs(30)
    }

    /// Claims the first due notification of as many subscriptions as there are free delivery
    /// slots, and starts one delivery per subscription (each holding a slot): consumers are
    /// delivered independently, so a slow one delays only its own notifications. Returns how
    /// many deliveries started.
    pub async fn dispatch_due(&self, slots: &Arc<Semaphore>) -> Result<usize> {
        let free = slots.available_permits();
        if free == 0 {
            return Ok(0);
        }
        let lease = uuid::Uuid::new_v4();
        let due =
            db::claim_due_notifications(&self.db, free as i64, lease, self.notify_lease(), None)
                .await?;
        let started = due.len();
        for n in due {
            // Only this loop takes slots, so the ones counted above are still free.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            let gcs = self.clone();
            tokio::spawn(async move {
                gcs.deliver_subscription(n, lease).await;
                drop(permit);
                // A slot is free: there may be more to claim.
                gcs.wake_deliverer();
            });
        }
        Ok(started)
    }

    /// Delivers `first`, then the later notifications of its subscription while they are due,
    /// one at a time and in order; stops at the first failure (the rest waits for its retry).
    async fn deliver_subscription(&self, first: db::DueNotification, lease: uuid::Uuid) {
        let mut next = Some(first);
        while let Some(n) = next.take() {
            match self.deliver_one(&n, lease).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(notification = n.id, subscription = %n.subscription_id, error = %e, "recording a delivery failed");
                    return;
                }
            }
            next = match db::claim_due_notifications(
                &self.db,
                1,
                lease,
                self.notify_lease(),
                Some(&n.subscription_id),
            )
            .await
            {
                Ok(v) => v.into_iter().next(),
                Err(e) => {
                    tracing::warn!(subscription = %n.subscription_id, error = %e, "claiming the next notification failed");
                    None
                }
            };
        }
    }

    /// One POST and its outcome (outside any transaction); true when it was delivered.
    async fn deliver_one(&self, n: &db::DueNotification, lease: uuid::Uuid) -> Result<bool> {
        match self.send_notify(n).await {
            Ok(()) => {
                if db::delete_notification(&self.db, n.id, lease).await? {
                    tracing::debug!(notification = n.id, subscription = %n.subscription_id, topic = %n.topic, "notification delivered");
                } else {
                    tracing::warn!(notification = n.id, subscription = %n.subscription_id, "notification delivered after its lease ran out; it may be delivered again");
                }
                Ok(true)
            }
            Err(why) => {
                let attempts = u32::try_from(n.attempts).unwrap_or(0) + 1;
                let give_up = attempts >= self.config.notify_max_attempts.max(1);
                let wait = backoff(
                    attempts,
                    Duration::from_millis(self.config.notify_retry_base_millis.max(1)),
                    Duration::from_secs(self.config.notify_retry_max_secs.max(1)),
                );
                db::notification_failed(&self.db, n.id, lease, &why, wait, give_up).await?;
                if give_up {
                    tracing::error!(notification = n.id, subscription = %n.subscription_id, consumer = %n.consumer_address, attempts, error = %why, "notification given up");
                } else {
                    tracing::warn!(notification = n.id, subscription = %n.subscription_id, consumer = %n.consumer_address, attempts, retry_in = ?wait, error = %why, "notification not delivered; will retry");
                }
                Ok(false)
            }
        }
    }

    /// POSTs one `wsnt:Notify` (SOAP 1.1, WS-Addressing; the consumer EPR's reference
    /// parameters as headers). Ok on a 2xx answer.
    async fn send_notify(&self, n: &db::DueNotification) -> std::result::Result<(), String> {
        let consumer = xml::parse(&n.consumer_reference)
            .ok()
            .and_then(|el| Epr::from_element(&el).ok())
            .unwrap_or(Epr {
                address: n.consumer_address.clone(),
                reference_parameters: Vec::new(),
            });
        let mut message =
            xml::parse(&n.message).map_err(|e| format!("stored message is not XML: {e}"))?;
        wsrf::add_eprs(&mut message, &n.producer_address);
        let body = wsn::notify(
            &ResourceRef::subscription(&n.subscription_id).epr(&n.producer_address),
            &n.topic_dialect,
            &n.topic,
            &ResourceRef::Service.epr(&n.producer_address),
            message,
        );
        let (envelope, _) = soap::request_envelope(
            SoapVersion::Soap11,
            wsn::NOTIFY,
            &n.consumer_address,
            &consumer.reference_parameters,
            body,
        );
        if !self.config.allow_private_consumers {
            let url = reqwest::Url::parse(&n.consumer_address)
                .map_err(|e| format!("the consumer address is not a URL: {e}"))?;
            destinations::check_url(&url).await.map_err(|why| {
                format!("the consumer address is refused: {why}; {PRIVATE_CONSUMERS}")
            })?;
        }
        let resp = self
            .consumers
            .post(&n.consumer_address)
            .header(
                "content-type",
                SoapVersion::Soap11.content_type(wsn::NOTIFY),
            )
            .header("SOAPAction", format!("\"{}\"", wsn::NOTIFY))
            .timeout(Duration::from_secs(self.config.notify_timeout_secs.max(1)))
            .body(envelope)
            .send()
            .await
            .map_err(|e| format!("POST to {} failed: {e}", n.consumer_address))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("the consumer answered HTTP {}", resp.status()))
        }
    }

    /// The periodic part: CTS instances not heard from become lost (once per loss, a
    /// `gca:CTSLost` event), expired subscriptions are removed.
    pub async fn notification_sweep(&self) -> Result<()> {
        let lost_after = Duration::from_secs_f64(self.config.cts_lost_after_secs.max(0.001));
        let mut tx = self.db.begin().await?;
        let lost = db::mark_lost_instances(&mut *tx, lost_after).await?;
        for i in &lost {
            use gca_protocol::messages::XmlContent;
            emit(
                &mut *tx,
                Topic::CtsLost,
                None,
                &i.to_element(&Topic::CtsLost.message_name()),
            )
            .await?;
        }
        tx.commit().await?;
        for i in &lost {
            tracing::warn!(cts.name = %i.name, last_seen = ?i.last_seen, "CTS instance lost: not heard from");
        }
        for id in db::delete_expired_subscriptions(&self.db).await? {
            tracing::info!(subscription = %id, "subscription expired");
        }
        Ok(())
    }
}

/// The notification task of one replica: sweeps and starts deliveries whenever woken (by a
/// commit of this replica, or a delivery that finished), and every `notify_poll_millis` for
/// rows queued by other replicas, retries coming due and lost CTSes. At most
/// `notify_concurrency` deliveries run at once.
pub async fn run(gcs: Gcs) {
    gcs.wait_ready().await;
    let poll = Duration::from_millis(gcs.config.notify_poll_millis.max(10));
    let slots = Arc::new(Semaphore::new(gcs.config.notify_concurrency.max(1)));
    loop {
        tokio::select! {
            _ = gcs.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
        if let Err(e) = gcs.notification_sweep().await {
            tracing::warn!(error = %e, "notification sweep failed");
        }
        if let Err(e) = gcs.dispatch_due(&slots).await {
            tracing::warn!(error = %e, "delivering notifications failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(backoff(1, b, m), Duration::from_millis(100));
        assert_eq!(backoff(2, b, m), Duration::from_millis(200));
        assert_eq!(backoff(4, b, m), Duration::from_millis(800));
        assert_eq!(backoff(5, b, m), m);
        assert_eq!(backoff(100, b, m), m);
    }
}
