-- Identities and signed images (issue 10): who created each subscription, the owner and the
-- CTS's signature of each checkpoint image, and brokers' authorizations to recover a job on
-- a given CTS while it may still run elsewhere.

alter table subscriptions add column owner text;

alter table checkpoints
    add column owner_uid bigint,
    add column owner_gid bigint,
    add column signature jsonb;

create table recovery_grants (
    gid text not null references jobs (gid) on delete cascade,
    cts_instance text not null,
    granted_by text not null,
    checkpoint_id text,
    granted_at timestamptz not null default now(),
    expires_at timestamptz not null,
    primary key (gid, cts_instance)
);

-- What a job was before a recovery moved it (routing, state, how it ended, its termination
-- time), kept while the recovery is `recovering`, so that a recovery its CTS abandons
-- (AbandonRecovery: the image was refused, the restore failed) puts the job back as it was.
alter table jobs add column before_recovery jsonb;
