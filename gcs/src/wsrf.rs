//! The GCS's WS-Resources (WSRF 1.2): the service resource (the registry), one resource per
//! job, per checkpoint record and per CTS instance. Their resource property documents, the
//! WS-ResourceProperties operations on them, and WS-ResourceLifetime on jobs.
//!
//! The documents are built from the database on every request (no state in memory), as
//! `gca.xsd` declares them: `gca:GCSResourceProperties`, `gca:JobResourceProperties`,
//! `gca:CheckpointResourceProperties`, `gca:CTSInstanceResourceProperties`.

use std::time::Duration;

use chrono::Utc;
use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::{fmt_time, CtsInstance, XmlContent};
use gca_protocol::ns;
use gca_protocol::wsn::Topic;
use gca_protocol::wsrf::{self, PropertyName, ResourceKind, ResourceRef, RlRequest, RpRequest};
use gca_protocol::xml::Element;

use crate::db;
use crate::error::{Error, Result};
use crate::policy::{self, Op};
use crate::service::{Ctx, Gcs};

/// Properties of the GCS resource, in document order.
pub const GCS_PROPERTIES: &[PropertyName] = &[
    (ns::GCA, "CheckpointerClass"),
    (ns::GCA, "CTSTypeEntry"),
    (ns::GCA, "CTSInstanceEntry"),
    (ns::GCA, "CheckpointerClassCount"),
    (ns::GCA, "CTSTypeCount"),
    (ns::GCA, "CTSInstanceCount"),
    (ns::GCA, "JobCount"),
    (ns::GCA, "CheckpointCount"),
    (ns::WSRF_RP, "QueryExpressionDialect"),
    (ns::WSRF_RL, "CurrentTime"),
    (ns::WSRF_SG, "MembershipContentRule"),
    (ns::WSRF_SG, "Entry"),
    (ns::WSNT, "TopicExpression"),
    (ns::WSNT, "FixedTopicSet"),
    (ns::WSNT, "TopicExpressionDialect"),
];

/// Properties of a subscription resource (WS-BaseNotification SubscriptionManagerRP plus its
/// WS-RL times).
pub const SUBSCRIPTION_PROPERTIES: &[PropertyName] = &[
    (ns::WSNT, "ConsumerReference"),
    (ns::WSNT, "Filter"),
    (ns::WSNT, "CreationTime"),
    (ns::WSRF_RL, "CurrentTime"),
    (ns::WSRF_RL, "TerminationTime"),
];

/// Properties of a job resource, in document order.
pub const JOB_PROPERTIES: &[PropertyName] = &[
    (ns::GCA, "GID"),
    (ns::GCA, "State"),
    (ns::GCA, "CTSInstance"),
    (ns::GCA, "CTSType"),
    (ns::GCA, "LocalID"),
    (ns::GCA, "RegisteredAt"),
    (ns::GCA, "UpdatedAt"),
    (ns::GCA, "CheckpointCount"),
    (ns::GCA, "LatestCheckpoint"),
    (ns::GCA, "Recoveries"),
    (ns::GCA, "ExitStatus"),
    (ns::GCA, "Signal"),
    (ns::GCA, "Retention"),
    (ns::GCA, "Checkpoint"),
    (ns::WSRF_RL, "CurrentTime"),
    (ns::WSRF_RL, "TerminationTime"),
];

/// Properties of a checkpoint record resource.
pub const CHECKPOINT_PROPERTIES: &[PropertyName] = &[
    (ns::GCA, "CheckpointID"),
    (ns::GCA, "GID"),
    (ns::GCA, "SequenceNumber"),
    (ns::GCA, "CTSName"),
    (ns::GCA, "CTSType"),
    (ns::GCA, "TakenAt"),
    (ns::GCA, "ImageName"),
    (ns::GCA, "ExecutionManager"),
    (ns::GCA, "SizeBytes"),
    (ns::GCA, "Digest"),
    (ns::GCA, "Parent"),
    (ns::GCA, "Origin"),
    (ns::GCA, "JobStopped"),
    (ns::GCA, "RegisteredAt"),
    (ns::GCA, "ImageState"),
    (ns::GCA, "KeptIn"),
    (ns::GCA, "ImageError"),
    (ns::GCA, "Owner"),
    (ns::GCA, "Signature"),
    (ns::GCA, "Facts"),
    (ns::GCA, "Location"),
];

/// Properties of a CTS instance resource.
pub const INSTANCE_PROPERTIES: &[PropertyName] = &[
    (ns::GCA, "Name"),
    (ns::GCA, "Type"),
    (ns::GCA, "URL"),
    (ns::GCA, "ExecutionManager"),
    (ns::GCA, "Resource"),
    (ns::GCA, "RegisteredAt"),
    (ns::GCA, "LastSeen"),
    (ns::GCA, "ResourceFacts"),
];

/// How often each GCS looks for job resources whose termination time has passed.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

fn properties_of(r: &ResourceRef) -> &'static [PropertyName] {
    match r {
        ResourceRef::Service => GCS_PROPERTIES,
        ResourceRef::Resource(ResourceKind::Job, _) => JOB_PROPERTIES,
        ResourceRef::Resource(ResourceKind::Checkpoint, _) => CHECKPOINT_PROPERTIES,
        ResourceRef::Resource(ResourceKind::CtsInstance, _) => INSTANCE_PROPERTIES,
        ResourceRef::Resource(ResourceKind::Subscription, _) => SUBSCRIPTION_PROPERTIES,
    }
}

fn unknown(kind: &str, id: &str, why: &str) -> Error {
    Error::Fault(
        Fault::resource_unknown(format!("no {kind} resource {id:?} at this GCS{why}"))
            .with_code("unknown-resource"),
    )
}

/// A `wsrf-sg:Entry` for a CTS instance: the entry EPR is the instance's WS-Resource, the
/// member EPR the CTS's own endpoint, the content the instance as registered.
fn service_group_entry(i: &CtsInstance, service_address: &str) -> Element {
    Element::new(ns::WSRF_SG, "Entry")
        .with_child(
            ResourceRef::instance(&i.name)
                .epr(service_address)
                .to_element(ns::WSRF_SG, "ServiceGroupEntryEPR"),
        )
        .with_child(
            wsrf::Epr {
                address: i.url.clone(),
                reference_parameters: Vec::new(),
            }
            .to_element(ns::WSRF_SG, "MemberServiceEPR"),
        )
        .with_child(
            Element::new(ns::WSRF_SG, "Content").with_child(i.to_element("CTSInstanceEntry")),
        )
}

impl Gcs {
    /// A WS-ResourceProperties request on `resource`: (response action, response element).
    pub async fn resource_properties(
        &self,
        ctx: &Ctx,
        resource: &ResourceRef,
        service_address: &str,
        body: &Element,
        action: Option<&str>,
    ) -> Result<(String, Element)> {
        match resource {
            ResourceRef::Resource(ResourceKind::Subscription, id) => {
                policy::authorize(&ctx.caller, Op::ManageSubscription)?;
                self.check_subscription_owner(ctx, id).await?;
            }
            _ => policy::authorize(&ctx.caller, Op::ReadProperties)?,
        }
        // An unknown resource is reported before anything wrong with the request.
        let doc = self.property_document(resource, service_address).await?;
        let req = RpRequest::read(body, action, properties_of(resource))?;
        Ok(wsrf::answer(&req, &doc).await?)
    }

    /// The resource property document of a resource (ResourceUnknown when there is none).
    pub async fn property_document(
        &self,
        resource: &ResourceRef,
        service_address: &str,
    ) -> Result<Element> {
        let now = Utc::now();
        match resource {
            ResourceRef::Service => {
                let classes = db::list_classes(&self.db).await?;
                let types = self.type_list().await?.types;
                let instances = db::list_instances(&self.db).await?;
                let totals = db::totals(&self.db).await?;
                let mut doc = Element::new(ns::GCA, "GCSResourceProperties");
                for c in &classes {
                    doc.push_child(c.to_element("CheckpointerClass"));
                }
                for t in &types {
                    doc.push_child(t.to_element("CTSTypeEntry"));
                }
                for i in &instances {
                    doc.push_child(i.to_element("CTSInstanceEntry"));
                }
                doc.push_text_child(ns::GCA, "CheckpointerClassCount", classes.len().to_string());
                doc.push_text_child(ns::GCA, "CTSTypeCount", types.len().to_string());
                doc.push_text_child(ns::GCA, "CTSInstanceCount", instances.len().to_string());
                doc.push_text_child(ns::GCA, "JobCount", totals.jobs.to_string());
                doc.push_text_child(ns::GCA, "CheckpointCount", totals.checkpoints.to_string());
                doc.push_text_child(ns::WSRF_RP, "QueryExpressionDialect", wsrf::XPATH_DIALECT);
                doc.push_text_child(ns::WSRF_RL, "CurrentTime", fmt_time(&now));
                // The WS-ServiceGroup view of the CTS instances (the registry a broker
                // discovers): one entry per instance, its CTS as the member.
                doc.push_child(
                    Element::new(ns::WSRF_SG, "MembershipContentRule").with_attr(
                        "",
                        "ContentElements",
                        "gca:CTSInstanceEntry",
                    ),
                );
                for i in &instances {
                    doc.push_child(service_group_entry(i, service_address));
                }
                // WS-BaseNotification NotificationProducerRP: the topics and dialects.
                for p in gca_protocol::wsn::producer_properties() {
                    doc.push_child(p);
                }
                Ok(doc)
            }
            ResourceRef::Resource(ResourceKind::Job, gid) => {
                let lifetime = self.live_job(gid).await?;
                let job = db::get_job(&self.db, gid)
                    .await?
                    .ok_or_else(|| unknown("job", gid, ""))?;
                let mut doc = job.to_element("JobResourceProperties");
                for c in db::checkpoints_of(&self.db, gid).await? {
                    doc.push_child(c.to_element("Checkpoint"));
                }
                doc.children.extend(
                    wsrf::lifetime_properties(now, lifetime.termination_time)
                        .into_iter()
                        .map(gca_protocol::xml::Node::Element),
                );
                Ok(doc)
            }
            ResourceRef::Resource(ResourceKind::Checkpoint, id) => {
                let c = db::get_checkpoint(&self.db, id)
                    .await?
                    .ok_or_else(|| unknown("checkpoint", id, ""))?;
                Ok(c.to_element("CheckpointResourceProperties"))
            }
            ResourceRef::Resource(ResourceKind::CtsInstance, name) => {
                let i = db::get_instance(&self.db, name)
                    .await?
                    .ok_or_else(|| unknown("CTS instance", name, ""))?;
                Ok(i.to_element("CTSInstanceResourceProperties"))
            }
            ResourceRef::Resource(ResourceKind::Subscription, id) => {
                let s = db::get_subscription(&self.db, id)
                    .await?
                    .ok_or_else(|| unknown("subscription", id, ""))?;
                let consumer = gca_protocol::xml::parse(&s.consumer_reference)
                    .map_err(|e| Error::Internal(anyhow::anyhow!("stored consumer EPR: {e}")))?;
                let mut filter = Element::new(ns::WSNT, "Filter");
                for t in s.topics.iter().flatten() {
                    filter.push_child(
                        Element::new(ns::WSNT, "TopicExpression")
                            .with_attr("", "Dialect", s.topic_dialect.clone())
                            .with_text(format!("gca:{t}")),
                    );
                }
                if let Some(g) = &s.gid {
                    filter.push_text_child(ns::GCA, "GID", g.clone());
                }
                let mut doc =
                    Element::new(ns::GCA, "SubscriptionResourceProperties").with_child(consumer);
                if !filter.children.is_empty() {
                    doc.push_child(filter);
                }
                doc.push_text_child(ns::WSNT, "CreationTime", fmt_time(&s.created_at));
                doc.children.extend(
                    wsrf::lifetime_properties(now, s.termination_time)
                        .into_iter()
                        .map(gca_protocol::xml::Node::Element),
                );
                Ok(doc)
            }
        }
    }

    /// The lifetime of a live job resource; a job whose termination time has passed is
    /// destroyed now (the sweep may not have run yet) and is unknown from then on.
    async fn live_job(&self, gid: &str) -> Result<db::JobLifetime> {
        let lifetime = db::job_lifetime(&self.db, gid)
            .await?
            .ok_or_else(|| unknown("job", gid, ""))?;
        if let Some(at) = lifetime.destroyed_at {
            return Err(unknown(
                "job",
                gid,
                &format!(" any more: it was destroyed at {}", fmt_time(&at)),
            ));
        }
        if lifetime.termination_time.is_some_and(|t| t <= Utc::now()) {
            let mut tx = self.db.begin().await?;
            if let Some(unfinished) = db::destroy_job_if_expired(&mut *tx, gid).await? {
                if unfinished {
                    self.emit_job(&mut tx, Topic::JobFinished, gid).await?;
                }
                self.apply_retention(&mut tx, gid).await?;
            }
            tx.commit().await?;
            self.wake_deliverer();
            self.wake_image_tasks();
            return Err(unknown(
                "job",
                gid,
                " any more: its termination time has passed",
            ));
        }
        Ok(lifetime)
    }

    /// A WS-ResourceLifetime request on `resource` (only job resources have a lifetime).
    pub async fn resource_lifetime(
        &self,
        ctx: &Ctx,
        resource: &ResourceRef,
        body: &Element,
        action: Option<&str>,
    ) -> Result<(String, Element)> {
        policy::authorize(&ctx.caller, Op::Lifetime)?;
        let now = Utc::now();
        let req = RlRequest::read(body, action, now)?;
        let gid = match resource {
            ResourceRef::Resource(ResourceKind::Job, gid) => gid,
            other => {
                let what = match other {
                    ResourceRef::Service => "the GCS itself".to_string(),
                    ResourceRef::Resource(k, id) => format!("{} resource {id:?}", k.as_str()),
                };
                let (kind, verb) = match req {
                    RlRequest::Destroy => (FaultKind::ResourceNotDestroyed, "destroyed"),
                    RlRequest::SetTerminationTime(_) => (
                        FaultKind::UnableToSetTerminationTime,
                        "given a termination time",
                    ),
                };
                return Err(Error::kind(
                    kind,
                    format!("{what} cannot be {verb}; only job resources have a lifetime"),
                ));
            }
        };
        self.live_job(gid).await?;
        match req {
            RlRequest::Destroy => {
                if !self.destroy_job(gid).await? {
                    return Err(unknown("job", gid, " any more"));
                }
                tracing::info!(%gid, "job resource destroyed");
                Ok((
                    wsrf::RL_DESTROY_RESPONSE.to_string(),
                    Element::new(ns::WSRF_RL, "DestroyResponse"),
                ))
            }
            RlRequest::SetTerminationTime(at) => {
                if let Some(t) = at {
                    if t <= now {
                        // WS-RL: a time in the past destroys the resource at once.
                        self.destroy_job(gid).await?;
                        tracing::info!(%gid, "job resource destroyed (termination time in the past)");
                    } else {
                        db::set_termination_time(&self.db, gid, at).await?;
                    }
                } else {
                    db::set_termination_time(&self.db, gid, None).await?;
                }
                Ok((
                    wsrf::RL_SET_TERMINATION_TIME_RESPONSE.to_string(),
                    Element::new(ns::WSRF_RL, "SetTerminationTimeResponse")
                        .with_child(wsrf::termination_time_element("NewTerminationTime", at))
                        .with_text_child(ns::WSRF_RL, "CurrentTime", fmt_time(&now)),
                ))
            }
        }
    }

    /// Destroys job resources whose termination time has passed; run periodically.
    pub async fn sweep_expired_jobs(&self) -> Result<usize> {
        let mut tx = self.db.begin().await?;
        let gids = db::destroy_expired_jobs(&mut *tx).await?;
        for (gid, unfinished) in &gids {
            if *unfinished {
                self.emit_job(&mut tx, Topic::JobFinished, gid).await?;
            }
            self.apply_retention(&mut tx, gid).await?;
        }
        tx.commit().await?;
        if !gids.is_empty() {
            self.wake_deliverer();
            self.wake_image_tasks();
        }
        for (gid, _) in &gids {
            tracing::info!(%gid, "job resource destroyed: its termination time passed");
        }
        Ok(gids.len())
    }

    /// Destroys a live job resource (the job is finished; JobFinished when it was not yet).
    async fn destroy_job(&self, gid: &str) -> Result<bool> {
        let mut tx = self.db.begin().await?;
        let Some(job) = db::lock_job(&mut *tx, gid).await? else {
            return Ok(false);
        };
        if !db::destroy_job(&mut *tx, gid).await? {
            return Ok(false);
        }
        if job.state != gca_protocol::messages::JobState::Finished {
            self.emit_job(&mut tx, Topic::JobFinished, gid).await?;
        }
        // Destroying a job ends it: its images go the way its retention policy says.
        self.apply_retention(&mut tx, gid).await?;
        tx.commit().await?;
        self.wake_deliverer();
        self.wake_image_tasks();
        Ok(true)
    }
}
