-- WS-BaseNotification on the GCS: subscriptions, and the transactional outbox of notifications
-- still to deliver. Events are inserted in the transaction of the change that causes them (one
-- row per matching subscription); every GCS replica delivers from this table, claiming rows with
-- `for update skip locked`, so each notification is delivered by one replica.

create table subscriptions (
    id                 text primary key,
    -- The consumer EPR: its address, and its reference parameters (XML, echoed as headers).
    consumer_address   text not null,
    consumer_reference text not null,
    -- The topics (local names in urn:gca:v1); null: every topic.
    topics             text[],
    -- The dialect the subscriber used, repeated in wsnt:Topic of each Notify.
    topic_dialect      text not null,
    -- Only events about this GID (the gca:GID filter); null: all.
    gid                text,
    -- The GCS service address the subscriber reached (ProducerReference, SubscriptionReference).
    producer_address   text not null,
    created_at         timestamptz not null default now(),
    -- Null: no scheduled termination.
    termination_time   timestamptz
);
create index subscriptions_termination_idx on subscriptions (termination_time)
    where termination_time is not null;

create table notifications (
    id              bigserial primary key,
    subscription_id text not null references subscriptions (id) on delete cascade,
    topic           text not null,
    -- The gca event element (wsnt:Message content), as XML.
    message         text not null,
    created_at      timestamptz not null default now(),
    attempts        integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error      text,
    -- Set when delivery was given up (kept for the operator until the subscription goes).
    failed_at       timestamptz
);
create index notifications_due_idx on notifications (next_attempt_at, id) where failed_at is null;
create index notifications_subscription_idx on notifications (subscription_id);

-- CTSLost is emitted once per loss: set when it is emitted, cleared when the CTS is heard from.
alter table cts_instances add column lost_notified_at timestamptz;
